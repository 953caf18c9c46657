//! The load run's tally: counts, a set-up latency histogram (`hdrhistogram`, microseconds),
//! failures by reason, media and text figures, and a per-second timeline, fed with the
//! devices' [`Outcome`]s and the instants they happened. Produces the live progress line and
//! the final [`LoadReport`] (serialised with `--json`). Sans-IO; it draws nothing.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use serde::Serialize;

use super::device_calls::Outcome;

/// Longest latency the histograms hold (longer values are clamped to it): 10 minutes in us.
const MAX_LATENCY_US: u64 = 600_000_000;

/// Most seconds the timeline keeps (a bounded run is far shorter).
const MAX_TIMELINE_SECS: usize = 24 * 3600;

/// Most distinct failure reasons kept; the rest are grouped as `other`.
const MAX_REASONS: usize = 64;

fn histogram() -> Result<Histogram<u64>, hdrhistogram::CreationError> {
    // Three significant digits from 1 us to MAX_LATENCY_US.
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let us = u64::try_from(d.as_micros())
        .unwrap_or(MAX_LATENCY_US)
        .clamp(1, MAX_LATENCY_US);
    // In range by the clamp above.
    let _ = h.record(us);
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Samples.
    pub count: u64,
    /// Mean.
    pub mean_ms: f64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p99_9_ms: f64,
    /// Largest.
    pub max_ms: f64,
}

impl LatencySummary {
    fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p99_9_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        }
    }
}

/// One second of the run (counted from the first call).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SecondSample {
    /// Second since the calls began.
    pub second: u64,
    /// Calls started in this second.
    pub attempted: u64,
    /// Calls answered in this second.
    pub answered: u64,
    /// Calls that failed in this second.
    pub failed: u64,
    /// Median set-up latency of the calls answered in this second.
    pub setup_p50_ms: f64,
    /// 99th percentile of the same.
    pub setup_p99_ms: f64,
}

/// Media figures over all calls (frames sent by the devices and echoed back by the peer).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct MediaSummary {
    /// Frames the devices sent.
    pub frames_sent: u64,
    /// Frames that came back.
    pub frames_received: u64,
    /// Lost share in percent (sent but not back).
    pub loss_percent: f64,
}

/// Text message figures.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct TextSummary {
    /// Texts sent.
    pub attempted: u64,
    /// Texts answered 2xx.
    pub delivered: u64,
    /// Texts not delivered.
    pub failed: u64,
    /// Failures by reason.
    pub failures: BTreeMap<String, u64>,
    /// SendText to TextStatus.
    pub latency: LatencySummary,
}

/// What one node did in the run (by the node id its Welcome named, or its address).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct NodeFigures {
    /// Devices logged in there after the logins.
    pub devices_at_start: u64,
    /// Devices logged in there at the end.
    pub devices_at_end: u64,
    /// Calls answered while the device was there.
    pub answered: u64,
    /// Calls that failed while the device was there.
    pub failed: u64,
    /// Devices that came there after losing another node.
    pub reconnects_in: u64,
}

/// Devices that lost their node and logged in again.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ReconnectSummary {
    /// Logins again after a loss.
    pub reconnects: u64,
    /// Of which resumed the session (token accepted).
    pub resumed: u64,
    /// Devices that gave up (no node took them within `--reconnect-secs`).
    pub gave_up: u64,
    /// Devices still logging in again when the run ended.
    pub reconnecting_at_end: u64,
    /// Logins again by cause (`connection lost`, `goodbye draining`, ...).
    pub causes: BTreeMap<String, u64>,
    /// Calls that went on across a reconnect.
    pub calls_kept: u64,
    /// Calls that were lost with their node.
    pub calls_lost: u64,
    /// From the loss to the new Welcome.
    pub time: LatencySummary,
}

/// The final report of a load run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// `outgoing` (devices place calls) or `incoming` (devices answer).
    pub mode: String,
    /// Devices asked for.
    pub devices: u32,
    /// Devices that logged in.
    pub devices_connected: u32,
    /// Devices that did not.
    pub login_failures: u32,
    /// The first login error.
    pub first_login_error: Option<String>,
    /// Seconds the logins took.
    pub login_secs: f64,
    /// Calls per second asked for.
    pub target_cps: f64,
    /// Seconds of calling asked for.
    pub duration_secs: f64,
    /// Hold time of each call (milliseconds).
    pub hold_ms: u64,
    /// Calls started (outgoing: dialed; incoming: offered to a device).
    pub attempted: u64,
    /// Calls answered.
    pub answered: u64,
    /// Calls that ended without an answer (or never ended).
    pub failed: u64,
    /// Starts due while every device already had its most calls (not attempted).
    pub not_placed_devices_busy: u64,
    /// Calls started per second over the calling window.
    pub achieved_cps: f64,
    /// Dial (or IncomingCall) to the answered event.
    pub setup_latency: LatencySummary,
    /// Failures by reason (`busy 486`, `error limit_exceeded`, `timeout`, ...).
    pub failures: BTreeMap<String, u64>,
    /// How answered calls ended (`local_hangup`, `remote_hangup`, ...).
    pub answered_ended: BTreeMap<String, u64>,
    /// Media figures (with `--media`).
    pub media: Option<MediaSummary>,
    /// Text figures (with `--texts-per-s`).
    pub texts: Option<TextSummary>,
    /// Most calls in progress at once.
    pub peak_calls_in_progress: u64,
    /// Seconds from the first call to the last outcome.
    pub elapsed_secs: f64,
    /// Per-second counts and latencies.
    pub timeline: Vec<SecondSample>,
    /// Figures per node (several with a cluster; one otherwise).
    pub nodes: BTreeMap<String, NodeFigures>,
    /// Reconnects after a lost node.
    pub reconnects: ReconnectSummary,
}

/// What the progress line shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    /// Calls started.
    pub attempted: u64,
    /// Calls answered.
    pub answered: u64,
    /// Calls failed.
    pub failed: u64,
    /// Calls in progress.
    pub in_progress: u64,
    /// Calls started in the last full second.
    pub cps: u64,
    /// Set-up median over the run so far (ms).
    pub p50_ms: f64,
    /// Set-up p99 over the run so far (ms).
    pub p99_ms: f64,
}

impl Progress {
    /// The progress line.
    pub fn line(&self) -> String {
        format!(
            "attempted {} answered {} failed {} live {} | {} calls/s | setup p50 {:.2} ms p99 {:.2} ms",
            self.attempted,
            self.answered,
            self.failed,
            self.in_progress,
            self.cps,
            self.p50_ms,
            self.p99_ms
        )
    }
}

#[derive(Debug)]
struct Second {
    attempted: u64,
    answered: u64,
    failed: u64,
    setup: Histogram<u64>,
}

/// Accumulates outcomes into the report.
#[derive(Debug)]
pub struct Tally {
    start: Instant,
    attempted: u64,
    answered: u64,
    failed: u64,
    finished: u64,
    not_placed: u64,
    peak: u64,
    last_outcome: Instant,
    setup: Histogram<u64>,
    failures: BTreeMap<String, u64>,
    answered_ended: BTreeMap<String, u64>,
    media: MediaSummary,
    texts: TextSummary,
    text_latency: Histogram<u64>,
    seconds: Vec<Second>,
    /// An empty histogram with the bounds above, cloned for each new second.
    empty: Histogram<u64>,
    nodes: BTreeMap<String, NodeFigures>,
    reconnects: ReconnectSummary,
    reconnect_time: Histogram<u64>,
}

/// Most distinct nodes kept apart in the figures; the rest are grouped as `other`.
const MAX_NODES: usize = 256;

fn count_reason(map: &mut BTreeMap<String, u64>, reason: &str) {
    let key = if map.contains_key(reason) || map.len() < MAX_REASONS {
        reason.to_string()
    } else {
        "other".to_string()
    };
    *map.entry(key).or_insert(0) += 1;
}

impl Tally {
    /// A tally whose timeline starts at `start` (the first call).
    pub fn new(start: Instant) -> Result<Self, hdrhistogram::CreationError> {
        let empty = histogram()?;
        Ok(Self {
            start,
            attempted: 0,
            answered: 0,
            failed: 0,
            finished: 0,
            not_placed: 0,
            peak: 0,
            last_outcome: start,
            setup: empty.clone(),
            failures: BTreeMap::new(),
            answered_ended: BTreeMap::new(),
            media: MediaSummary::default(),
            texts: TextSummary::default(),
            text_latency: empty.clone(),
            seconds: Vec::new(),
            reconnect_time: empty.clone(),
            empty,
            nodes: BTreeMap::new(),
            reconnects: ReconnectSummary::default(),
        })
    }

    fn node(&mut self, node: &str) -> &mut NodeFigures {
        let key = if self.nodes.contains_key(node) || self.nodes.len() < MAX_NODES {
            node.to_string()
        } else {
            "other".to_string()
        };
        self.nodes.entry(key).or_default()
    }

    /// [`Tally::add`] for an outcome on a device logged in at `node`.
    pub fn add_on(&mut self, node: &str, outcome: &Outcome) {
        match outcome {
            Outcome::Answered { .. } => self.node(node).answered += 1,
            Outcome::Finished {
                answered: false, ..
            } => self.node(node).failed += 1,
            Outcome::Reconnected { .. } => self.node(node).reconnects_in += 1,
            _ => {}
        }
        self.add(outcome);
    }

    /// Where the devices are: at the start (after the logins) or at the end.
    pub fn placement(&mut self, nodes: &[String], at_end: bool) {
        for node in nodes {
            let figures = self.node(node);
            if at_end {
                figures.devices_at_end += 1;
            } else {
                figures.devices_at_start += 1;
            }
        }
    }

    /// A device gave up reconnecting.
    pub fn gave_up(&mut self) {
        self.reconnects.gave_up += 1;
    }

    /// A device was still logging in again when the run ended.
    pub fn reconnecting_at_end(&mut self) {
        self.reconnects.reconnecting_at_end += 1;
    }

    fn second(&mut self, at: Instant) -> Option<&mut Second> {
        let idx = usize::try_from(at.saturating_duration_since(self.start).as_secs()).ok()?;
        if idx >= MAX_TIMELINE_SECS {
            return None;
        }
        while self.seconds.len() <= idx {
            self.seconds.push(Second {
                attempted: 0,
                answered: 0,
                failed: 0,
                setup: self.empty.clone(),
            });
        }
        self.seconds.get_mut(idx)
    }

    /// Calls in progress (started, not finished).
    pub fn in_progress(&self) -> u64 {
        self.attempted.saturating_sub(self.finished)
    }

    /// Calls started and not yet finished nor answered.
    pub fn unresolved(&self) -> u64 {
        self.attempted
            .saturating_sub(self.answered)
            .saturating_sub(self.failed)
    }

    /// Every started call has finished.
    pub fn all_finished(&self) -> bool {
        self.finished >= self.attempted
    }

    /// A call was started at `at`.
    pub fn started(&mut self, at: Instant) {
        self.attempted += 1;
        self.peak = self.peak.max(self.in_progress());
        if let Some(s) = self.second(at) {
            s.attempted += 1;
        }
    }

    /// A start was due but every device was at its limit.
    pub fn not_placed(&mut self) {
        self.not_placed += 1;
    }

    /// Texts sent.
    pub fn text_sent(&mut self) {
        self.texts.attempted += 1;
    }

    /// Texts sent and still without a status.
    pub fn texts_pending(&self) -> u64 {
        self.texts
            .attempted
            .saturating_sub(self.texts.delivered)
            .saturating_sub(self.texts.failed)
    }

    /// Adds one outcome.
    pub fn add(&mut self, outcome: &Outcome) {
        match outcome {
            Outcome::Offered { at } => self.started(*at),
            Outcome::Answered { at, setup } => {
                self.answered += 1;
                self.last_outcome = self.last_outcome.max(*at);
                record(&mut self.setup, *setup);
                if let Some(s) = self.second(*at) {
                    s.answered += 1;
                    record(&mut s.setup, *setup);
                }
            }
            Outcome::Finished {
                at,
                answered,
                reason,
                media_sent,
                media_received,
            } => {
                self.finished += 1;
                self.last_outcome = self.last_outcome.max(*at);
                self.media.frames_sent += media_sent;
                self.media.frames_received += (*media_received).min(*media_sent);
                if *answered {
                    count_reason(&mut self.answered_ended, reason);
                } else {
                    self.failed += 1;
                    count_reason(&mut self.failures, reason);
                    if let Some(s) = self.second(*at) {
                        s.failed += 1;
                    }
                }
            }
            Outcome::Reconnected {
                cause,
                resumed,
                calls_kept,
                calls_lost,
                took,
                ..
            } => {
                self.reconnects.reconnects += 1;
                count_reason(&mut self.reconnects.causes, cause);
                self.reconnects.resumed += u64::from(*resumed);
                self.reconnects.calls_kept += calls_kept;
                self.reconnects.calls_lost += calls_lost;
                record(&mut self.reconnect_time, *took);
            }
            Outcome::Text {
                latency,
                delivered,
                reason,
                ..
            } => {
                record(&mut self.text_latency, *latency);
                if *delivered {
                    self.texts.delivered += 1;
                } else {
                    self.texts.failed += 1;
                    count_reason(&mut self.texts.failures, reason);
                }
            }
        }
    }

    /// The run is over: calls still unresolved are counted as failed (`unfinished`).
    pub fn close(&mut self) {
        let left = self.unresolved();
        if left > 0 {
            self.failed += left;
            *self.failures.entry("unfinished".into()).or_insert(0) += left;
        }
        self.finished = self.attempted;
    }

    /// The progress line's figures at `now`.
    pub fn progress(&self, now: Instant) -> Progress {
        let current = now.saturating_duration_since(self.start).as_secs();
        let last_full = usize::try_from(current.saturating_sub(1)).unwrap_or(usize::MAX);
        let cps = if current == 0 {
            0
        } else {
            self.seconds.get(last_full).map_or(0, |s| s.attempted)
        };
        Progress {
            attempted: self.attempted,
            answered: self.answered,
            failed: self.failed,
            in_progress: self.in_progress(),
            cps,
            p50_ms: if self.setup.is_empty() {
                0.0
            } else {
                ms(self.setup.value_at_quantile(0.5))
            },
            p99_ms: if self.setup.is_empty() {
                0.0
            } else {
                ms(self.setup.value_at_quantile(0.99))
            },
        }
    }

    /// Builds the report. `run` carries the settings and login figures.
    pub fn report(&self, run: RunFacts, calling_window: Duration, media: bool) -> LoadReport {
        let window = calling_window.as_secs_f64();
        let mut texts = self.texts.clone();
        texts.latency = LatencySummary::of(&self.text_latency);
        LoadReport {
            mode: run.mode,
            devices: run.devices,
            devices_connected: run.devices_connected,
            login_failures: run.login_failures,
            first_login_error: run.first_login_error,
            login_secs: run.login_secs,
            target_cps: run.target_cps,
            duration_secs: run.duration_secs,
            hold_ms: run.hold_ms,
            attempted: self.attempted,
            answered: self.answered,
            failed: self.failed,
            not_placed_devices_busy: self.not_placed,
            achieved_cps: if window > 0.0 {
                self.attempted as f64 / window
            } else {
                0.0
            },
            setup_latency: LatencySummary::of(&self.setup),
            failures: self.failures.clone(),
            answered_ended: self.answered_ended.clone(),
            media: media.then(|| {
                let mut m = self.media.clone();
                m.loss_percent = if m.frames_sent == 0 {
                    0.0
                } else {
                    100.0 * (m.frames_sent - m.frames_received) as f64 / m.frames_sent as f64
                };
                m
            }),
            texts: (texts.attempted > 0).then_some(texts),
            peak_calls_in_progress: self.peak,
            nodes: self.nodes.clone(),
            reconnects: ReconnectSummary {
                time: LatencySummary::of(&self.reconnect_time),
                ..self.reconnects.clone()
            },
            elapsed_secs: self
                .last_outcome
                .saturating_duration_since(self.start)
                .as_secs_f64(),
            timeline: self
                .seconds
                .iter()
                .enumerate()
                .map(|(i, s)| SecondSample {
                    second: i as u64,
                    attempted: s.attempted,
                    answered: s.answered,
                    failed: s.failed,
                    setup_p50_ms: if s.setup.is_empty() {
                        0.0
                    } else {
                        ms(s.setup.value_at_quantile(0.5))
                    },
                    setup_p99_ms: if s.setup.is_empty() {
                        0.0
                    } else {
                        ms(s.setup.value_at_quantile(0.99))
                    },
                })
                .collect(),
        }
    }
}

/// Facts of the run that the tally does not see.
#[derive(Debug, Clone, Default)]
pub struct RunFacts {
    /// `outgoing` or `incoming`.
    pub mode: String,
    /// Devices asked for.
    pub devices: u32,
    /// Devices logged in.
    pub devices_connected: u32,
    /// Devices that failed to log in.
    pub login_failures: u32,
    /// First login error.
    pub first_login_error: Option<String>,
    /// Login phase length.
    pub login_secs: f64,
    /// Calls per second asked for.
    pub target_cps: f64,
    /// Calling window asked for.
    pub duration_secs: f64,
    /// Hold per call.
    pub hold_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(at: Instant, answered: bool, reason: &str, sent: u64, got: u64) -> Outcome {
        Outcome::Finished {
            at,
            answered,
            reason: reason.into(),
            media_sent: sent,
            media_received: got,
        }
    }

    #[test]
    fn counts_latencies_failures_and_timeline_add_up() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0).unwrap();
        for i in 0..100u64 {
            let at = t0 + Duration::from_millis(i * 20); // 50 per second over 2 s
            t.started(at);
            if i % 10 == 9 {
                t.add(&finished(at, false, "busy 486", 0, 0));
            } else {
                t.add(&Outcome::Answered {
                    at,
                    setup: Duration::from_micros(1000 + i * 10),
                });
                t.add(&finished(at, true, "local_hangup", 50, 49));
            }
        }
        assert!(t.all_finished());
        let r = t.report(
            RunFacts {
                mode: "outgoing".into(),
                ..Default::default()
            },
            Duration::from_secs(2),
            true,
        );
        assert_eq!((r.attempted, r.answered, r.failed), (100, 90, 10));
        assert_eq!(r.attempted, r.answered + r.failed);
        assert_eq!(r.failures.get("busy 486"), Some(&10));
        assert_eq!(r.answered_ended.get("local_hangup"), Some(&90));
        assert!((r.achieved_cps - 50.0).abs() < 1e-9);
        assert_eq!(r.setup_latency.count, 90);
        assert!(
            r.setup_latency.p50_ms > 1.3 && r.setup_latency.p50_ms < 1.6,
            "{:?}",
            r.setup_latency
        );
        assert!(r.setup_latency.max_ms >= r.setup_latency.p99_9_ms);
        assert!(r.setup_latency.p99_ms >= r.setup_latency.p90_ms);
        let media = r.media.unwrap();
        assert_eq!((media.frames_sent, media.frames_received), (4500, 4410));
        assert!((media.loss_percent - 2.0).abs() < 1e-9);
        assert_eq!(r.timeline.len(), 2);
        assert_eq!(r.timeline[0].attempted, 50);
        assert_eq!(r.timeline[1].answered + r.timeline[1].failed, 50);
        assert!(r.timeline[1].setup_p50_ms > r.timeline[0].setup_p50_ms);
        assert!(r.texts.is_none());
    }

    #[test]
    fn closing_counts_unresolved_calls_as_failed() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0).unwrap();
        for _ in 0..3 {
            t.started(t0);
        }
        t.add(&Outcome::Answered {
            at: t0,
            setup: Duration::from_millis(2),
        });
        assert_eq!(t.unresolved(), 2);
        assert!(!t.all_finished());
        assert_eq!(t.progress(t0).in_progress, 3);
        t.close();
        let r = t.report(RunFacts::default(), Duration::ZERO, false);
        assert_eq!((r.attempted, r.answered, r.failed), (3, 1, 2));
        assert_eq!(r.failures.get("unfinished"), Some(&2));
        assert_eq!(r.achieved_cps, 0.0);
        assert!(r.media.is_none());
        assert_eq!(r.peak_calls_in_progress, 3);
    }

    #[test]
    fn progress_shows_the_last_full_second() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0).unwrap();
        for i in 0..30u64 {
            t.started(t0 + Duration::from_millis(i * 50)); // 20 in second 0, 10 in second 1
        }
        let p = t.progress(t0 + Duration::from_millis(1500));
        assert_eq!(p.cps, 20);
        assert_eq!(t.progress(t0 + Duration::from_millis(500)).cps, 0);
        assert!(p.line().contains("attempted 30"));
    }

    #[test]
    fn texts_and_reason_overflow() {
        let t0 = Instant::now();
        let mut t = Tally::new(t0).unwrap();
        for i in 0..(MAX_REASONS as u64 + 5) {
            t.started(t0);
            t.add(&finished(t0, false, &format!("reason {i}"), 0, 0));
        }
        t.text_sent();
        t.text_sent();
        t.add(&Outcome::Text {
            at: t0,
            latency: Duration::from_millis(3),
            delivered: true,
            reason: "200".into(),
        });
        t.add(&Outcome::Text {
            at: t0,
            latency: Duration::from_millis(5),
            delivered: false,
            reason: "404".into(),
        });
        let r = t.report(RunFacts::default(), Duration::from_secs(1), false);
        assert_eq!(r.failures.len(), MAX_REASONS + 1);
        assert_eq!(r.failures.get("other"), Some(&5));
        let texts = r.texts.unwrap();
        assert_eq!((texts.attempted, texts.delivered, texts.failed), (2, 1, 1));
        assert_eq!(texts.failures.get("404"), Some(&1));
        assert_eq!(texts.latency.count, 2);
        // Latencies beyond the histogram's range are clamped, not refused.
        t.add(&Outcome::Answered {
            at: t0,
            setup: Duration::from_secs(100_000),
        });
        assert_eq!(t.progress(t0).p99_ms, ms(t.setup.value_at_quantile(0.99)));
    }
}
