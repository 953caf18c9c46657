//! Session timers (RFC 4028), sans-IO: the `Session-Expires` and `Min-SE` header fields, the
//! negotiation of a session interval and its refresher on either side of an INVITE (or of a
//! refresh), and the schedule that follows from it ([`SessionTimer`]: when to refresh, when to
//! give the session up).
//!
//! It does not send anything, keep a clock or retry a request: the call (the gateway's call
//! core) asks it what to answer and when to act, and the user agent retries an INVITE refused
//! with 422 ([`crate::ua::UserAgent::send_with_auth`]).

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::message::{HeaderError, HeaderName, Headers};

/// The option tag of session timers (Supported, Require).
pub const OPTION_TAG: &str = "timer";

/// The smallest session interval RFC 4028 allows anyone to ask for (section 4: 90 s).
pub const MIN_SE_FLOOR: u32 = 90;

/// The session interval RFC 4028 recommends (section 4: 1800 s).
pub const DEFAULT_SESSION_EXPIRES: u32 = 1800;

/// Who refreshes the session: the UAC or the UAS of the request that negotiated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    /// The request's sender.
    Uac,
    /// The request's receiver.
    Uas,
}

impl Refresher {
    /// The parameter's value.
    pub fn as_str(self) -> &'static str {
        match self {
            Refresher::Uac => "uac",
            Refresher::Uas => "uas",
        }
    }
}

/// A `Session-Expires` value: the session interval in seconds and, maybe, its refresher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionExpires {
    /// The session interval, in seconds.
    pub delta: u32,
    /// Who refreshes (absent: not chosen yet).
    pub refresher: Option<Refresher>,
}

impl fmt::Display for SessionExpires {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.delta)?;
        if let Some(r) = self.refresher {
            write!(f, ";refresher={}", r.as_str())?;
        }
        Ok(())
    }
}

fn delta_seconds(s: &str) -> Option<u32> {
    let s = s.trim();
    if s.is_empty() || s.len() > 10 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u64>().ok().and_then(|v| u32::try_from(v).ok())
}

impl FromStr for SessionExpires {
    type Err = &'static str;

    /// `delta-seconds *(SEMI se-params)`; an unknown parameter is ignored, a `refresher` other
    /// than `uac` or `uas` is an error.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(';');
        let delta = parts
            .next()
            .and_then(delta_seconds)
            .ok_or("not a number of seconds")?;
        if delta == 0 {
            return Err("a session interval of 0");
        }
        let mut refresher = None;
        for param in parts {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            if name.trim().eq_ignore_ascii_case("refresher") {
                refresher = Some(match value.trim().to_ascii_lowercase().as_str() {
                    "uac" => Refresher::Uac,
                    "uas" => Refresher::Uas,
                    _ => return Err("refresher is neither uac nor uas"),
                });
            }
        }
        Ok(Self { delta, refresher })
    }
}

/// The session timer header fields of a message.
pub trait TimerHeaders {
    /// `Session-Expires` (or `x`); `None` when absent.
    fn session_expires(&self) -> Result<Option<SessionExpires>, HeaderError>;
    /// `Min-SE` in seconds (its parameters ignored); `None` when absent.
    fn min_se(&self) -> Result<Option<u32>, HeaderError>;
    /// Whether `Supported` (or `Require`) names `timer`.
    fn supports_timer(&self) -> bool;
}

impl TimerHeaders for Headers {
    fn session_expires(&self) -> Result<Option<SessionExpires>, HeaderError> {
        let Some(text) = self.text(&HeaderName::SessionExpires)? else {
            return Ok(None);
        };
        text.parse()
            .map(Some)
            .map_err(|e| HeaderError::invalid(HeaderName::SessionExpires, e))
    }

    fn min_se(&self) -> Result<Option<u32>, HeaderError> {
        let Some(text) = self.text(&HeaderName::MinSe)? else {
            return Ok(None);
        };
        let value = text.split(';').next().unwrap_or_default();
        delta_seconds(value)
            .map(Some)
            .ok_or_else(|| HeaderError::invalid(HeaderName::MinSe, "not a number of seconds"))
    }

    fn supports_timer(&self) -> bool {
        let named = |tags: Result<Vec<&str>, HeaderError>| {
            tags.is_ok_and(|t| t.iter().any(|t| t.eq_ignore_ascii_case(OPTION_TAG)))
        };
        named(self.supported()) || named(self.require())
    }
}

/// This side's session timer settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerConfig {
    /// The session interval asked for in requests and granted at most in answers (seconds).
    pub session_expires: u32,
    /// The smallest interval accepted from a peer (seconds, at least [`MIN_SE_FLOOR`]).
    pub min_se: u32,
}

impl Default for TimerConfig {
    fn default() -> Self {
        Self {
            session_expires: DEFAULT_SESSION_EXPIRES,
            min_se: MIN_SE_FLOOR,
        }
    }
}

/// A negotiated session timer, from this side's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// The session interval.
    pub interval: u32,
    /// Who refreshes, as the answer to the negotiating request says it.
    pub refresher: Refresher,
    /// Whether this side refreshes.
    pub we_refresh: bool,
}

impl Negotiated {
    /// The `Session-Expires` value that states it.
    pub fn session_expires(&self) -> SessionExpires {
        SessionExpires {
            delta: self.interval,
            refresher: Some(self.refresher),
        }
    }

    /// The header fields of a 2xx that answers the negotiating request: `Session-Expires`,
    /// and `Require: timer` when the request's sender refreshes (RFC 4028 section 9).
    pub fn answer_headers(&self) -> Vec<(HeaderName, String)> {
        let mut headers = vec![(
            HeaderName::SessionExpires,
            self.session_expires().to_string(),
        )];
        if self.refresher == Refresher::Uac {
            headers.push((HeaderName::Require, OPTION_TAG.to_string()));
        }
        headers
    }
}

/// What a UAS does with a request (an INVITE, or a refresh) as to session timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UasTimer {
    /// The interval asked for is below this side's minimum: answer 422 with this `Min-SE`.
    TooBrief {
        /// This side's minimum.
        min_se: u32,
    },
    /// Answer with this timer.
    Use(Negotiated),
}

impl TimerConfig {
    /// The header fields of a request this side sends as UAC (an INVITE, or, with the running
    /// interval and refresher, a refresh or another re-INVITE or UPDATE): `Supported: timer`,
    /// `Session-Expires`, `Min-SE`. The refresher is named as the request's: `Uac` is us.
    pub fn request_headers(&self, running: Option<(u32, Refresher)>) -> Vec<(HeaderName, String)> {
        let se = match running {
            Some((interval, refresher)) => SessionExpires {
                delta: interval,
                refresher: Some(refresher),
            },
            None => SessionExpires {
                delta: self.session_expires,
                refresher: None,
            },
        };
        vec![
            (HeaderName::Supported, OPTION_TAG.to_string()),
            (HeaderName::SessionExpires, se.to_string()),
            (HeaderName::MinSe, self.min_se.to_string()),
        ]
    }

    /// RFC 4028 section 9, as the UAS of `request` (its header fields): 422 when the interval
    /// asked for is below our minimum; else the interval, at most ours but never below the
    /// request's `Min-SE`; the refresher the request named, else the UAC when it supports
    /// timers (it asked for them), else us. A request without `Session-Expires` gets our
    /// interval with us as refresher: a refresh is a plain re-INVITE or UPDATE any peer
    /// answers. A malformed header field is an error (answer 400).
    pub fn negotiate_uas(&self, request: &Headers) -> Result<UasTimer, HeaderError> {
        let asked = request.session_expires()?;
        let their_min = request.min_se()?.unwrap_or(MIN_SE_FLOOR);
        let Some(asked) = asked else {
            let interval = self.session_expires.max(their_min);
            return Ok(UasTimer::Use(Negotiated {
                interval,
                refresher: Refresher::Uas,
                we_refresh: true,
            }));
        };
        if asked.delta < self.min_se {
            return Ok(UasTimer::TooBrief {
                min_se: self.min_se,
            });
        }
        let interval = asked.delta.min(self.session_expires.max(their_min));
        let refresher = asked.refresher.unwrap_or(if request.supports_timer() {
            Refresher::Uac
        } else {
            Refresher::Uas
        });
        Ok(UasTimer::Use(Negotiated {
            interval,
            refresher,
            we_refresh: refresher == Refresher::Uas,
        }))
    }

    /// RFC 4028 section 7.2, as the UAC that sent a request with our `Session-Expires`: the
    /// timer a 2xx states (`None` when it states none: no session timer); a 2xx without a
    /// refresher leaves the refreshing to us. An interval below one second is taken as one.
    pub fn negotiate_uac(&self, answer: Option<SessionExpires>) -> Option<Negotiated> {
        let answer = answer?;
        let refresher = answer.refresher.unwrap_or(Refresher::Uac);
        Some(Negotiated {
            interval: answer.delta.max(1),
            refresher,
            we_refresh: refresher == Refresher::Uac,
        })
    }
}

/// What a [`SessionTimer`] says is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerDue {
    /// This side refreshes now.
    Refresh,
    /// No refresh came in time: end the session (BYE).
    Expired,
}

/// A running session timer: when this side refreshes (half the interval after the last
/// refresh, RFC 4028 section 10) or, when the peer refreshes, when the session is given up
/// (the interval minus the smaller of 32 s and a third of it, section 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionTimer {
    negotiated: Negotiated,
    refreshed_at: Instant,
}

impl SessionTimer {
    /// A timer negotiated (or refreshed) at `now`.
    pub fn new(negotiated: Negotiated, now: Instant) -> Self {
        Self {
            negotiated,
            refreshed_at: now,
        }
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> Negotiated {
        self.negotiated
    }

    /// When the session was last refreshed (or the timer negotiated).
    pub fn refreshed_at(&self) -> Instant {
        self.refreshed_at
    }

    /// The instant the next thing is due.
    pub fn deadline(&self) -> Instant {
        let interval = Duration::from_secs(u64::from(self.negotiated.interval));
        if self.negotiated.we_refresh {
            self.refreshed_at + interval / 2
        } else {
            let margin = Duration::from_secs(32).min(interval / 3);
            self.refreshed_at + interval.saturating_sub(margin)
        }
    }

    /// What is due at `now`, if anything.
    pub fn due(&self, now: Instant) -> Option<TimerDue> {
        if now < self.deadline() {
            return None;
        }
        Some(if self.negotiated.we_refresh {
            TimerDue::Refresh
        } else {
            TimerDue::Expired
        })
    }

    /// Once this side's refresh failed without ending the dialog: the session is given up at
    /// its expiry like a peer's missed refresh (the interval after the last good refresh,
    /// less the margin).
    pub fn refresh_failed(&mut self) {
        self.negotiated.we_refresh = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(lines: &[(HeaderName, &str)]) -> Headers {
        let mut h = Headers::new();
        for (n, v) in lines {
            h.push(n.clone(), *v);
        }
        h
    }

    #[test]
    fn session_expires_parses_and_prints() {
        let se: SessionExpires = "1800;refresher=uas".parse().unwrap();
        assert_eq!(se.delta, 1800);
        assert_eq!(se.refresher, Some(Refresher::Uas));
        assert_eq!(se.to_string(), "1800;refresher=uas");
        let se: SessionExpires = "90 ; Refresher = UAC;other=1".parse().unwrap();
        assert_eq!(se.refresher, Some(Refresher::Uac));
        assert_eq!("4000".parse::<SessionExpires>().unwrap().refresher, None);
        for bad in ["", "abc", "0", "90;refresher=both", "99999999999"] {
            assert!(bad.parse::<SessionExpires>().is_err(), "{bad}");
        }
    }

    #[test]
    fn compact_form_and_min_se_are_read() {
        let mut h = Headers::new();
        h.push(HeaderName::from_bytes(b"x").unwrap(), "120");
        h.push(HeaderName::MinSe, "90;x=y");
        assert_eq!(h.session_expires().unwrap().unwrap().delta, 120);
        assert_eq!(h.min_se().unwrap(), Some(90));
        let h = headers(&[(HeaderName::MinSe, "soon")]);
        assert!(h.min_se().is_err());
    }

    #[test]
    fn uas_refuses_an_interval_below_its_minimum_with_its_min_se() {
        let config = TimerConfig {
            session_expires: 1800,
            min_se: 120,
        };
        let h = headers(&[(HeaderName::SessionExpires, "100")]);
        assert_eq!(
            config.negotiate_uas(&h).unwrap(),
            UasTimer::TooBrief { min_se: 120 }
        );
    }

    #[test]
    fn uas_keeps_the_named_refresher_and_lowers_the_interval_not_below_min_se() {
        let config = TimerConfig {
            session_expires: 600,
            min_se: 90,
        };
        let h = headers(&[
            (HeaderName::SessionExpires, "3600;refresher=uas"),
            (HeaderName::MinSe, "900"),
        ]);
        let UasTimer::Use(n) = config.negotiate_uas(&h).unwrap() else {
            panic!("422");
        };
        assert_eq!(
            n.interval, 900,
            "lowered to the request's Min-SE, not below"
        );
        assert_eq!(n.refresher, Refresher::Uas);
        assert!(n.we_refresh);
        assert_eq!(
            n.answer_headers(),
            vec![(HeaderName::SessionExpires, "900;refresher=uas".to_string())]
        );
    }

    #[test]
    fn uas_picks_the_refresher_when_the_request_names_none() {
        let config = TimerConfig::default();
        let supporting = headers(&[
            (HeaderName::Supported, "100rel, timer"),
            (HeaderName::SessionExpires, "1800"),
        ]);
        let UasTimer::Use(n) = config.negotiate_uas(&supporting).unwrap() else {
            panic!("422");
        };
        assert_eq!(n.refresher, Refresher::Uac);
        assert!(!n.we_refresh);
        assert!(n
            .answer_headers()
            .contains(&(HeaderName::Require, "timer".to_string())));
        // A proxy inserted the header; the UAC itself knows nothing of timers.
        let unaware = headers(&[(HeaderName::SessionExpires, "1800")]);
        let UasTimer::Use(n) = config.negotiate_uas(&unaware).unwrap() else {
            panic!("422");
        };
        assert_eq!(n.refresher, Refresher::Uas);
        // No header at all: we refresh.
        let UasTimer::Use(n) = config.negotiate_uas(&Headers::new()).unwrap() else {
            panic!("422");
        };
        assert!(n.we_refresh);
        assert_eq!(n.interval, 1800);
    }

    #[test]
    fn uac_follows_the_answer() {
        let config = TimerConfig::default();
        assert_eq!(config.negotiate_uac(None), None);
        let n = config
            .negotiate_uac(Some("300;refresher=uas".parse().unwrap()))
            .unwrap();
        assert!(!n.we_refresh);
        let n = config.negotiate_uac(Some("300".parse().unwrap())).unwrap();
        assert!(n.we_refresh);
        assert_eq!(
            config.request_headers(Some((300, Refresher::Uac)))[1],
            (HeaderName::SessionExpires, "300;refresher=uac".to_string())
        );
    }

    #[test]
    fn the_schedule_refreshes_at_half_and_expires_before_the_end() {
        let t0 = Instant::now();
        let ours = SessionTimer::new(
            Negotiated {
                interval: 90,
                refresher: Refresher::Uas,
                we_refresh: true,
            },
            t0,
        );
        assert_eq!(ours.deadline(), t0 + Duration::from_secs(45));
        assert_eq!(ours.due(t0 + Duration::from_secs(44)), None);
        assert_eq!(
            ours.due(t0 + Duration::from_secs(45)),
            Some(TimerDue::Refresh)
        );
        let mut theirs = ours;
        theirs.refresh_failed();
        // 90 - min(32, 30) = 60.
        assert_eq!(theirs.deadline(), t0 + Duration::from_secs(60));
        assert_eq!(
            theirs.due(t0 + Duration::from_secs(60)),
            Some(TimerDue::Expired)
        );
        let long = SessionTimer::new(
            Negotiated {
                interval: 1800,
                refresher: Refresher::Uac,
                we_refresh: false,
            },
            t0,
        );
        assert_eq!(long.deadline(), t0 + Duration::from_secs(1800 - 32));
    }
}
