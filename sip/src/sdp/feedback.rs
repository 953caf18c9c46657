//! RTCP feedback capabilities of a media stream (`a=rtcp-fb`, RFC 4585 section 4.2): which key
//! frame requests a side takes, Picture Loss Indication (`nack pli`) and Full Intra Request
//! (`ccm fir`, RFC 5104 section 7.1), and the lines this side writes.
//!
//! What it does not do: no NACK retransmission, no TMMBR or other codec control messages, no
//! `trr-int`; feedback given for one payload type counts for the whole stream (the relay asks
//! for key frames of the stream, not of a format).

/// What a stream's `a=rtcp-fb` attributes allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RtcpFeedback {
    /// The description had at least one `a=rtcp-fb` attribute for the stream (without any,
    /// the writer negotiated nothing either way).
    pub listed: bool,
    /// `nack pli`: the writer takes Picture Loss Indications.
    pub pli: bool,
    /// `ccm fir`: the writer takes Full Intra Requests.
    pub fir: bool,
}

impl RtcpFeedback {
    /// Both key frame requests: what this side offers for video.
    pub const KEY_FRAMES: RtcpFeedback = RtcpFeedback {
        listed: true,
        pli: true,
        fir: true,
    };

    /// Adds one `a=rtcp-fb` value (`<payload type or *> <type> [<parameter>]`); unknown
    /// types and parameters are listed but allow nothing.
    pub fn add(&mut self, value: &str) {
        self.listed = true;
        let mut words = value.split_ascii_whitespace().skip(1);
        let kind = words.next().unwrap_or_default();
        let parameter = words.next().unwrap_or_default();
        if kind.eq_ignore_ascii_case("nack") && parameter.eq_ignore_ascii_case("pli") {
            self.pli = true;
        } else if kind.eq_ignore_ascii_case("ccm") && parameter.eq_ignore_ascii_case("fir") {
            self.fir = true;
        }
    }

    /// What both sides allow (an answer lists only feedback its offer listed, RFC 4585 4.2).
    pub fn both(self, other: RtcpFeedback) -> RtcpFeedback {
        RtcpFeedback {
            listed: self.listed && other.listed,
            pli: self.pli && other.pli,
            fir: self.fir && other.fir,
        }
    }

    /// The attribute values to write, for every payload type (`*`).
    pub fn values(self) -> impl Iterator<Item = &'static str> {
        [(self.pli, "* nack pli"), (self.fir, "* ccm fir")]
            .into_iter()
            .filter_map(|(on, value)| on.then_some(value))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_read_and_written() {
        let mut fb = RtcpFeedback::default();
        assert!(!fb.listed);
        fb.add("96 nack");
        assert_eq!(
            fb,
            RtcpFeedback {
                listed: true,
                pli: false,
                fir: false
            }
        );
        fb.add("* NACK PLI");
        fb.add("97 goog-remb");
        assert!(fb.pli && !fb.fir);
        fb.add("96 ccm fir");
        assert_eq!(fb, RtcpFeedback::KEY_FRAMES);
        assert_eq!(
            RtcpFeedback::KEY_FRAMES.values().collect::<Vec<_>>(),
            ["* nack pli", "* ccm fir"]
        );
        let only_fir = RtcpFeedback {
            listed: true,
            pli: false,
            fir: true,
        };
        assert_eq!(
            RtcpFeedback::KEY_FRAMES
                .both(only_fir)
                .values()
                .collect::<Vec<_>>(),
            ["* ccm fir"]
        );
        assert!(
            !RtcpFeedback::KEY_FRAMES
                .both(RtcpFeedback::default())
                .listed
        );
        // Garbage is listed but allows nothing.
        let mut odd = RtcpFeedback::default();
        odd.add("");
        odd.add("* ccm");
        assert_eq!(
            odd,
            RtcpFeedback {
                listed: true,
                pli: false,
                fir: false
            }
        );
    }
}
