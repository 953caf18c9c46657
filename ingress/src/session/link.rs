//! The transport a device session runs over, and its control stream: a QUIC connection of its
//! own (ALPN `mbfp/1`), or a WebTransport session (HTTP/3 over QUIC, ALPN `h3`, the way a
//! browser reaches the node; docs/protocol.md section 1). The MBFP session on top is the same:
//! its control frames on the first bidirectional stream the device opens, its media in
//! datagrams.
//!
//! What it does not do: no HTTP/3 beyond what `web-transport-quinn` does for one WebTransport
//! session per connection (no other requests, no pooling); no framing and no session logic
//! (the driver); no limits (the endpoint's, the same for both).

use bytes::Bytes;

/// Why a datagram could not be sent to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The link's send buffer is full: try again shortly.
    #[error("datagram send buffer full")]
    Blocked,
    /// Larger than the link can carry now.
    #[error("datagram too large for the device link")]
    TooLarge,
    /// The device does not accept datagrams.
    #[error("datagrams not supported on the device link")]
    Unsupported,
    /// The connection is gone.
    #[error("device connection closed")]
    Closed,
}

/// A device's connection: raw QUIC or WebTransport. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) enum Transport {
    /// MBFP directly on QUIC.
    Quic(quinn::Connection),
    /// MBFP inside a WebTransport session (boxed: it is much larger than a connection handle).
    WebTransport(Box<web_transport_quinn::Session>),
}

/// The device's half of the control stream: where frames are written.
pub(crate) enum ControlSend {
    Quic(quinn::SendStream),
    WebTransport(web_transport_quinn::SendStream),
}

/// The control stream's other half: where the device's frames are read.
pub(crate) enum ControlRecv {
    Quic(quinn::RecvStream),
    WebTransport(web_transport_quinn::RecvStream),
}

impl Transport {
    /// The metrics label of the transport.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Transport::Quic(_) => "quic",
            Transport::WebTransport(_) => "webtransport",
        }
    }

    /// Bytes a datagram of this transport carries before MBFP's: none on QUIC; over
    /// WebTransport the session id (a varint, at most 8 bytes; the limit announced in
    /// `Welcome` leaves room for the largest).
    pub(crate) fn datagram_overhead(&self) -> u32 {
        match self {
            Transport::Quic(_) => 0,
            Transport::WebTransport(_) => 8,
        }
    }

    /// Waits for the device to open its control stream.
    pub(crate) async fn accept_bi(&self) -> Result<(ControlSend, ControlRecv), String> {
        match self {
            Transport::Quic(conn) => conn
                .accept_bi()
                .await
                .map(|(s, r)| (ControlSend::Quic(s), ControlRecv::Quic(r)))
                .map_err(|e| e.to_string()),
            Transport::WebTransport(session) => session
                .accept_bi()
                .await
                .map(|(s, r)| (ControlSend::WebTransport(s), ControlRecv::WebTransport(r)))
                .map_err(|e| e.to_string()),
        }
    }

    /// The next media datagram from the device; an error once the connection is gone. Over
    /// WebTransport a datagram without this session's id (empty, or another session's) is
    /// skipped: it is the peer's mistake, not the end of the session.
    pub(crate) async fn read_datagram(&self) -> Result<Bytes, ()> {
        match self {
            Transport::Quic(conn) => conn.read_datagram().await.map_err(|_| ()),
            Transport::WebTransport(session) => loop {
                match session.read_datagram().await {
                    Ok(datagram) => return Ok(datagram),
                    Err(web_transport_quinn::SessionError::WebTransportError(
                        web_transport_quinn::WebTransportError::UnknownSession,
                    )) => continue,
                    Err(_) => return Err(()),
                }
            },
        }
    }

    /// Resolves once the connection is closed, by either side.
    pub(crate) async fn closed(&self) {
        match self {
            Transport::Quic(conn) => {
                conn.closed().await;
            }
            Transport::WebTransport(session) => {
                session.closed().await;
            }
        }
    }

    /// Closes with an MBFP close code (docs/protocol.md section 5); over WebTransport the
    /// code goes in the session's close (the browser's `WebTransport.closed` sees it).
    pub(crate) fn close(&self, code: u32, reason: &[u8]) {
        match self {
            Transport::Quic(conn) => conn.close(code.into(), reason),
            Transport::WebTransport(session) => session.close(code, reason),
        }
    }

    /// Sends one datagram without waiting (see [`super::DeviceLink::send_datagram`]).
    pub(crate) fn send_datagram(&self, datagram: Bytes) -> Result<(), LinkError> {
        match self {
            Transport::Quic(conn) => {
                if conn.datagram_send_buffer_space() < datagram.len() {
                    return Err(LinkError::Blocked);
                }
                conn.send_datagram(datagram).map_err(map_send_error)
            }
            Transport::WebTransport(session) => {
                let max = session.max_datagram_size();
                if max == 0 {
                    return Err(LinkError::Unsupported);
                }
                if datagram.len() > max {
                    return Err(LinkError::TooLarge);
                }
                if session.datagram_send_buffer_space() < datagram.len() {
                    return Err(LinkError::Blocked);
                }
                session.send_datagram(datagram).map_err(|e| match e {
                    web_transport_quinn::SessionError::SendDatagramError(e) => map_send_error(e),
                    _ => LinkError::Closed,
                })
            }
        }
    }

    /// The largest datagram the device takes now, if known (over WebTransport, less the
    /// session's own header).
    pub(crate) fn max_datagram_size(&self) -> Option<usize> {
        match self {
            Transport::Quic(conn) => conn.max_datagram_size(),
            Transport::WebTransport(session) => {
                Some(session.max_datagram_size()).filter(|&n| n > 0)
            }
        }
    }
}

fn map_send_error(e: quinn::SendDatagramError) -> LinkError {
    match e {
        quinn::SendDatagramError::TooLarge => LinkError::TooLarge,
        quinn::SendDatagramError::UnsupportedByPeer | quinn::SendDatagramError::Disabled => {
            LinkError::Unsupported
        }
        quinn::SendDatagramError::ConnectionLost(_) => LinkError::Closed,
    }
}

impl ControlSend {
    /// Writes all of `buf`; `false` once the stream or the connection is gone.
    pub(crate) async fn write_all(&mut self, buf: &[u8]) -> bool {
        match self {
            ControlSend::Quic(s) => s.write_all(buf).await.is_ok(),
            ControlSend::WebTransport(s) => s.write_all(buf).await.is_ok(),
        }
    }

    /// Finishes the stream, then waits (at most `within`) for the device to have read it all.
    pub(crate) async fn finish_and_wait(&mut self, within: std::time::Duration) {
        match self {
            ControlSend::Quic(s) => {
                if s.finish().is_ok() {
                    let _ = tokio::time::timeout(within, s.stopped()).await;
                }
            }
            ControlSend::WebTransport(s) => {
                if s.finish().is_ok() {
                    let _ = tokio::time::timeout(within, s.stopped()).await;
                }
            }
        }
    }
}

impl ControlRecv {
    /// The next chunk of the stream (from quinn's own buffers); `None` at its end.
    pub(crate) async fn read_chunk(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        match self {
            ControlRecv::Quic(r) => match r.read_chunk(max, true).await {
                Ok(chunk) => Ok(chunk.map(|c| c.bytes)),
                Err(e) => Err(e.into()),
            },
            ControlRecv::WebTransport(r) => match r.read_chunk(max, true).await {
                Ok(chunk) => Ok(chunk.map(|c| c.bytes)),
                Err(e) => Err(std::io::Error::other(e.to_string())),
            },
        }
    }
}
