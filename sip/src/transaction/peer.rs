//! Where messages go: the response address rules of RFC 3261 section 18.2.2 with RFC 3581 `rport` ([`response_destination`]), and the `received` /
//! `rport` stamping a server transport does on every request it receives (section 18.2.1,
//! [`stamp_received`]).
//!
//! No name resolution happens here: when the rules need DNS (a `maddr` or sent-by that is a
//! domain name), the request's source address is used instead, which is what a NAT-facing
//! gateway wants anyway. Connection management (reusing or opening a TCP connection) is the
//! endpoint's job.

use std::net::SocketAddr;

use crate::message::{HeaderError, HeaderName, Request, Rport, Via};
pub use crate::peer::Peer;

/// Where responses to a request go (RFC 3261 section 18.2.2, RFC 3581 section 4), given the
/// request's top Via and the peer it came from.
///
/// * Reliable transport: back to `source`, i.e. over the connection the request came on.
/// * UDP with `rport`: the `received` address (or the source address when the Via was not
///   stamped) at the `rport` port (or the source port when the `rport` has no value).
/// * UDP otherwise: the `received` address, else the sent-by address when it is an IP, else
///   the source address (no DNS here); at the sent-by port (or 5060).
pub fn response_destination(via: &Via, source: &Peer) -> Peer {
    if source.is_reliable() {
        return *source;
    }
    // A Via `maddr` is ignored (RFC 3261 18.2.2 would send there): honouring it lets anyone
    // aim the responses, and their retransmissions, at a third party.
    let addr = match via.rport() {
        Some(rport) => {
            let ip = via.received_ip().unwrap_or(source.addr.ip());
            let port = match rport {
                Rport::Port(p) => p,
                Rport::Requested => source.addr.port(),
            };
            SocketAddr::new(ip, port)
        }
        None => {
            let ip = via
                .received_ip()
                .or_else(|| via.host.ip())
                .unwrap_or(source.addr.ip());
            SocketAddr::new(ip, via.port_or_default())
        }
    };
    Peer::new(addr, source.transport)
}

/// What a server transport does to a request it receives (RFC 3261 section 18.2.1, RFC 3581):
/// adds `received=<source ip>` to the top Via when the sent-by host is not that address, and
/// when the client asked for `rport`, fills it with the source port (and always adds
/// `received`). Returns whether the top Via changed (it is then rewritten in canonical form).
/// Call it before [`TransactionLayer::handle_request`](super::TransactionLayer::handle_request)
/// so that the TU's responses, which copy the Via, carry the stamp.
///
/// A top Via whose sent-by is the source's IP address, written as such, and that asks for no
/// `rport` needs no stamp whatever else it holds: it is left as it is without being parsed, and
/// the answer is `Ok(false)` even if the rest of it is malformed. Any other Via is parsed, and
/// `Err` means there is none or it cannot be read.
pub fn stamp_received(request: &mut Request, source: SocketAddr) -> Result<bool, HeaderError> {
    if request
        .headers
        .top_via_value()
        .is_some_and(|v| needs_no_stamp(v, source))
    {
        return Ok(false);
    }
    let mut via = request.headers.top_via()?;
    let mut changed = false;
    let rport_requested = matches!(via.rport(), Some(Rport::Requested));
    if rport_requested {
        via.set_rport(source.port());
        changed = true;
    }
    if (rport_requested || via.host.ip() != Some(source.ip()))
        && via.received_ip() != Some(source.ip())
    {
        via.set_received(source.ip());
        changed = true;
    }
    if changed {
        request.headers.remove_first_value(&HeaderName::Via);
        request.headers.prepend_via(&via);
    }
    Ok(changed)
}

/// Whether the top Via `value` (as written) surely needs no stamp from `source`: its sent-by
/// host is `source`'s IP address and no parameter is a bare `rport`. `false` means "parse it
/// and see": a sent-by that is not an IP literal, LWS inside the protocol, anything unusual.
/// Parameters are split at every `;`, quoted or not, so a bare `rport` is never missed (a
/// quoted value that looks like one only sends the Via the long way).
fn needs_no_stamp(value: &str, source: SocketAddr) -> bool {
    let Some((protocol, rest)) = value.split_once([' ', '\t']) else {
        return false;
    };
    if !protocol.starts_with("SIP/2.0/") {
        return false;
    }
    let mut parts = rest.split(';');
    let sent_by = parts.next().unwrap_or_default().trim();
    let host_ip = if let Ok(addr) = sent_by.parse::<SocketAddr>() {
        addr.ip()
    } else if let Ok(ip) = sent_by
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or(sent_by)
        .parse::<std::net::IpAddr>()
    {
        ip
    } else {
        return false;
    };
    host_ip == source.ip()
        && !parts.any(|p| {
            let name = p.split('=').next().unwrap_or_default().trim();
            name.eq_ignore_ascii_case("rport") && !p.contains('=')
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{Method, Uri};

    fn via(s: &str) -> Via {
        Via::parse(s).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn reliable_transport_answers_on_the_connection() {
        let src = Peer::tcp(addr("198.51.100.7:40001"));
        let v = via("SIP/2.0/TCP client.example.com:5070;branch=z9hG4bKa;received=192.0.2.1");
        assert_eq!(response_destination(&v, &src), src);
    }

    #[test]
    fn udp_uses_received_and_sent_by_port() {
        let src = Peer::udp(addr("198.51.100.7:40001"));
        let v = via("SIP/2.0/UDP client.example.com:5070;branch=z9hG4bKa;received=192.0.2.1");
        assert_eq!(
            response_destination(&v, &src),
            Peer::udp(addr("192.0.2.1:5070"))
        );
        let no_port = via("SIP/2.0/UDP client.example.com;branch=z9hG4bKa;received=192.0.2.1");
        assert_eq!(
            response_destination(&no_port, &src).addr,
            addr("192.0.2.1:5060")
        );
    }

    #[test]
    fn udp_without_received_uses_an_ip_sent_by_else_the_source() {
        let src = Peer::udp(addr("198.51.100.7:40001"));
        let ip = via("SIP/2.0/UDP 192.0.2.9:5080;branch=z9hG4bKa");
        assert_eq!(response_destination(&ip, &src).addr, addr("192.0.2.9:5080"));
        let domain = via("SIP/2.0/UDP client.example.com:5080;branch=z9hG4bKa");
        assert_eq!(
            response_destination(&domain, &src).addr,
            addr("198.51.100.7:5080")
        );
    }

    #[test]
    fn rport_wins_over_the_sent_by_port() {
        let src = Peer::udp(addr("198.51.100.7:40001"));
        let stamped =
            via("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKa;rport=40001;received=198.51.100.7");
        assert_eq!(
            response_destination(&stamped, &src).addr,
            addr("198.51.100.7:40001")
        );
        let requested = via("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKa;rport");
        assert_eq!(
            response_destination(&requested, &src).addr,
            addr("198.51.100.7:40001")
        );
    }

    #[test]
    fn maddr_is_ignored() {
        // Responses go where the request came from, not to a third party named in the Via.
        let src = Peer::udp(addr("198.51.100.7:40001"));
        let v = via("SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKa;maddr=224.2.0.1;ttl=16");
        assert_eq!(response_destination(&v, &src).addr, addr("10.0.0.5:5062"));
        let v = via("SIP/2.0/UDP 10.0.0.5:5062;branch=z9hG4bKa;maddr=192.0.2.99;rport");
        assert_eq!(
            response_destination(&v, &src).addr,
            addr("198.51.100.7:40001")
        );
    }

    fn request_with_via(v: &str) -> Request {
        let mut r = Request::new(Method::Options, Uri::parse("sip:a@b").unwrap());
        r.headers.push(HeaderName::Via, v);
        r.headers.push(
            HeaderName::Via,
            "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKp",
        );
        r
    }

    #[test]
    fn stamping_adds_received_and_rport() {
        let mut r = request_with_via("SIP/2.0/UDP 10.0.0.5:5060;branch=z9hG4bKa;rport");
        assert!(stamp_received(&mut r, addr("198.51.100.7:40001")).unwrap());
        let top = r.headers.top_via().unwrap();
        assert_eq!(top.rport(), Some(Rport::Port(40001)));
        assert_eq!(top.received_ip(), Some("198.51.100.7".parse().unwrap()));
        assert_eq!(top.branch(), Some("z9hG4bKa"));
        assert_eq!(r.headers.via().unwrap().len(), 2);
        // A second stamp from the same source changes nothing.
        assert!(!stamp_received(&mut r, addr("198.51.100.7:40001")).unwrap());
    }

    #[test]
    fn stamping_leaves_a_matching_sent_by_alone() {
        let mut r = request_with_via("SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa");
        assert!(!stamp_received(&mut r, addr("198.51.100.7:5060")).unwrap());
        assert_eq!(
            r.headers.top_via_branch(),
            Some("z9hG4bKa"),
            "untouched Via"
        );
        let mut d = request_with_via("SIP/2.0/UDP client.example.com;branch=z9hG4bKa");
        assert!(stamp_received(&mut d, addr("198.51.100.7:5060")).unwrap());
        assert_eq!(
            d.headers.top_via().unwrap().received(),
            Some("198.51.100.7")
        );
        let mut none = Request::new(Method::Options, Uri::parse("sip:a@b").unwrap());
        assert!(stamp_received(&mut none, addr("198.51.100.7:5060")).is_err());
    }

    /// The quick answer (no parse) agrees with the parse wherever it is given.
    #[test]
    fn the_quick_no_stamp_answer_agrees_with_the_parse() {
        let source = addr("198.51.100.7:5060");
        let v6 = addr("[2001:db8::7]:5060");
        let cases: &[(&str, SocketAddr, bool)] = &[
            (
                "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa",
                source,
                true,
            ),
            (
                "SIP/2.0/UDP 198.51.100.7;branch=z9hG4bKa;received=198.51.100.7",
                source,
                true,
            ),
            (
                "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa;rport=5060",
                source,
                true,
            ),
            ("SIP/2.0/UDP [2001:db8::7]:5060;branch=z9hG4bKa", v6, true),
            ("SIP/2.0/UDP [2001:db8::7];branch=z9hG4bKa", v6, true),
            // Each of these goes the long way.
            (
                "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa;rport",
                source,
                false,
            ),
            (
                "SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa; RPort ",
                source,
                false,
            ),
            (
                "SIP/2.0/UDP 198.51.100.7:5060;x=\"a;rport\";branch=z9hG4bKa",
                source,
                true,
            ),
            (
                "SIP/2.0/UDP 198.51.100.7:5060;x=\"a; rport;\";branch=z9hG4bKa",
                source,
                false,
            ),
            (
                "SIP/2.0/UDP 198.51.100.8:5060;branch=z9hG4bKa",
                source,
                false,
            ),
            (
                "SIP/2.0/UDP client.example.com;branch=z9hG4bKa",
                source,
                false,
            ),
            (
                "SIP / 2.0 / UDP 198.51.100.7;branch=z9hG4bKa",
                source,
                false,
            ),
            ("SIP/2.0/UDP [2001:db8::8]:5060;branch=z9hG4bKa", v6, false),
            ("SIP/2.0/UDP", source, false),
        ];
        for (via, from, quick) in cases {
            assert_eq!(needs_no_stamp(via, *from), *quick, "{via}");
            let mut r = request_with_via(via);
            let parsed = r.headers.top_via();
            if *quick {
                // The parse would not have stamped it either.
                let parsed = parsed.unwrap();
                assert!(!matches!(parsed.rport(), Some(Rport::Requested)), "{via}");
                assert_eq!(parsed.host.ip(), Some(from.ip()), "{via}");
                assert!(!stamp_received(&mut r, *from).unwrap(), "{via}");
            }
        }
        // A bare rport from the source's own address is still filled in.
        let mut r = request_with_via("SIP/2.0/UDP 198.51.100.7:5060;branch=z9hG4bKa;rport");
        assert!(stamp_received(&mut r, addr("198.51.100.7:40001")).unwrap());
        assert_eq!(
            r.headers.top_via().unwrap().rport(),
            Some(Rport::Port(40001))
        );
    }
}
