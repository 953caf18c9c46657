//! RFC 3264 offer/answer: building offers and answers from local capabilities, hold and resume
//! offers, the `o=` versioning of one session, and reading the remote media endpoint (what a
//! media relay sends RTP to).
//!
//! Answers support plain RTP (`RTP/AVP`, and `RTP/AVPF` whose feedback is optional) and, by the
//! local [`SrtpPolicy`], SRTP with SDES keys (`RTP/SAVP`, `RTP/SAVPF`, RFC 4568); streams offered
//! with other protocols are rejected (port 0). One audio, one video and one
//! application stream (RTP carrying a format such as a device's data stream) are accepted at
//! most; further streams of the same type are rejected.

use super::attribute::{Attribute, Direction};
use super::codec::Codec;
use super::connection::Connection;
use super::crypto::{choose, Crypto, SrtpPolicy};
use super::feedback::RtcpFeedback;
use super::session::{MediaDescription, MediaKind, Origin, Protocol, SessionDescription, Timing};
use rand::Rng;
use std::net::{IpAddr, SocketAddr};

/// One local media stream: the RTP port and the codecs in order of preference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaConfig {
    /// The local RTP port (RTCP is on the next port).
    pub port: u16,
    /// Codecs, preferred first (telephone-event included here if wanted).
    pub codecs: Vec<Codec>,
    /// This side's SDES keys for the stream, one per suite, preferred first: offered as they
    /// are under [`SrtpPolicy::Require`]; in answers, the one of the chosen suite goes under the
    /// offered tag. Empty: no SRTP for this stream.
    pub crypto: Vec<Crypto>,
    /// The RTCP feedback this side takes on the stream (`a=rtcp-fb`): offered as it is,
    /// answered with what the offer lists too. Default: none.
    pub feedback: RtcpFeedback,
    /// This side takes the stream's RTCP on its RTP port (RFC 5761) and has no RTCP port of
    /// its own: `a=rtcp-mux` in offers, and in answers to an offer that has it. Default: off
    /// (RTCP on the next port).
    pub rtcp_mux: bool,
}

impl MediaConfig {
    /// A stream on `port` with `codecs`.
    pub fn new(port: u16, codecs: Vec<Codec>) -> Self {
        MediaConfig {
            port,
            codecs,
            crypto: Vec::new(),
            feedback: RtcpFeedback::default(),
            rtcp_mux: false,
        }
    }
}

/// What this side can do, used both to build offers and to answer them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalMedia {
    /// The address RTP should be sent to (the `c=` line).
    pub address: IpAddr,
    /// The audio stream, if any.
    pub audio: Option<MediaConfig>,
    /// The video stream, if any.
    pub video: Option<MediaConfig>,
    /// An `application` stream carried over RTP (`m=application <port> RTP/AVP <pt>`), if any.
    pub application: Option<MediaConfig>,
    /// The direction this side wants (usually sendrecv).
    pub direction: Direction,
    /// `a=ptime` to put on audio streams, if any.
    pub ptime: Option<u32>,
    /// Answer with only the first common codec (plus the matching telephone-event and comfort
    /// noise) instead of every common codec, so the offerer cannot switch codecs mid-call.
    pub single_codec_answer: bool,
    /// SRTP: never, when offered, or always (see each stream's [`MediaConfig::crypto`]).
    pub srtp: SrtpPolicy,
}

impl LocalMedia {
    /// Audio only, sendrecv, no ptime, every common codec in answers.
    pub fn audio(address: IpAddr, port: u16, codecs: Vec<Codec>) -> Self {
        LocalMedia {
            address,
            audio: Some(MediaConfig::new(port, codecs)),
            video: None,
            application: None,
            direction: Direction::SendRecv,
            ptime: None,
            single_codec_answer: false,
            srtp: SrtpPolicy::Off,
        }
    }

    /// The same with a video stream.
    pub fn with_video(mut self, port: u16, codecs: Vec<Codec>) -> Self {
        self.video = Some(MediaConfig::new(port, codecs));
        self
    }

    /// The same with an RTP `application` stream.
    pub fn with_application(mut self, port: u16, codecs: Vec<Codec>) -> Self {
        self.application = Some(MediaConfig::new(port, codecs));
        self
    }

    /// The same with another direction.
    pub fn with_direction(mut self, direction: Direction) -> Self {
        self.direction = direction;
        self
    }
}

/// How to put a call on hold (RFC 3264 section 8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldMode {
    /// sendrecv streams become sendonly, recvonly ones inactive (music on hold possible).
    SendOnly,
    /// Every stream becomes inactive.
    Inactive,
}

impl HoldMode {
    /// The direction a stream with direction `direction` gets on hold.
    pub fn apply(self, direction: Direction) -> Direction {
        match self {
            HoldMode::SendOnly => Direction::from_flags(direction.sends(), false),
            HoldMode::Inactive => Direction::Inactive,
        }
    }
}

/// Our hold: its mode and the per-m-line directions to go back to on resume.
#[derive(Debug, Clone)]
struct HoldState {
    mode: HoldMode,
    resume_directions: Vec<Direction>,
}

/// Why an offer or answer could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    /// The offer has no media descriptions.
    #[error("offer has no media")]
    NoMedia,
    /// No offered stream could be accepted: no codec in common (answer 488).
    #[error("no codec in common")]
    NoCommonCodec,
    /// The local configuration has no stream with codecs.
    #[error("no local media configured")]
    NoLocalMedia,
    /// A local stream lists the same payload type twice.
    #[error("payload type {0} used twice")]
    DuplicatePayloadType(u8),
    /// Hold or resume was asked before any description was sent.
    #[error("no previous local description")]
    NoPreviousDescription,
}

/// The state of our side of one SDP session (one dialog): the origin line and its version,
/// the last description we sent, and hold state.
///
/// The version in `o=` goes up by one whenever a new description differs from the previous
/// one and stays the same when it does not (RFC 3264 section 8), and the rest of `o=` never
/// changes, even if the media address does (e.g. after a cluster takeover).
///
/// ```
/// use thalamus_sip::sdp::{Codec, LocalMedia, SdpSession, SessionDescription, MediaKind};
/// let local = LocalMedia::audio(
///     "192.0.2.10".parse().unwrap(),
///     40000,
///     vec![Codec::opus(111), Codec::pcmu(), Codec::telephone_event(101, 8000)],
/// );
/// let mut session = SdpSession::new(4242);
/// let offer = session.create_offer(&local).unwrap();
/// let offer_text = offer.to_string(); // body of the INVITE
///
/// // The far end answers (here: a PCMU-only phone).
/// let mut remote_session = SdpSession::new(7);
/// let remote_local = LocalMedia::audio("198.51.100.5".parse().unwrap(), 5004, vec![Codec::pcmu()]);
/// let answer = remote_session
///     .create_answer(&SessionDescription::parse(&offer_text).unwrap(), &remote_local)
///     .unwrap();
/// let media = answer.remote_media(&MediaKind::Audio).unwrap();
/// assert_eq!(media.rtp.to_string(), "198.51.100.5:5004");
/// assert_eq!(media.primary_codec().map(|c| c.name.as_str()), Some("PCMU"));
/// ```
#[derive(Debug, Clone)]
pub struct SdpSession {
    username: String,
    session_id: String,
    version: u64,
    origin_address: Option<(String, String)>,
    last_local: Option<SessionDescription>,
    hold: Option<HoldState>,
}

impl SdpSession {
    /// A session with the given id; the first description has version 1.
    pub fn new(session_id: u64) -> Self {
        SdpSession {
            username: "-".into(),
            session_id: session_id.to_string(),
            version: 1,
            origin_address: None,
            last_local: None,
            hold: None,
        }
    }

    /// A session with a random id (below 2^62, as some peers parse it as a signed number).
    pub fn with_random_id() -> Self {
        SdpSession::new(crate::rng::with(|rng| rng.gen_range(1..(1u64 << 62))))
    }

    /// Continues a session from the last description we sent (e.g. stored in a dialog record
    /// and loaded by the node that took the dialog over): same origin, versions go on from it.
    pub fn from_previous(last_local: SessionDescription) -> Self {
        let o = &last_local.origin;
        SdpSession {
            username: o.username.clone(),
            session_id: o.session_id.clone(),
            version: o.session_version,
            origin_address: Some((o.addr_type.clone(), o.address.clone())),
            hold: None,
            last_local: Some(last_local),
        }
    }

    /// The session id of `o=`.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// The version of the last description (or of the next one, before any was made).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The last description we sent (offer or answer).
    pub fn last_local(&self) -> Option<&SessionDescription> {
        self.last_local.as_ref()
    }

    /// Whether we hold the call: from [`SdpSession::create_hold_offer`] until
    /// [`SdpSession::create_resume_offer`]. Meanwhile, offers and answers built from
    /// [`LocalMedia`] (a re-offer after a takeover, an answer to the remote's re-offer) keep
    /// the hold directions.
    pub fn is_holding(&self) -> bool {
        self.hold.is_some()
    }

    /// Builds an offer (initial or re-offer) from the local capabilities. In a re-offer the
    /// m-lines keep the positions of the previous description; streams no longer offered
    /// stay as port 0.
    pub fn create_offer(
        &mut self,
        local: &LocalMedia,
    ) -> Result<SessionDescription, NegotiationError> {
        let mut media = Vec::new();
        for (kind, config) in [
            (MediaKind::Audio, &local.audio),
            (MediaKind::Video, &local.video),
            (MediaKind::Application, &local.application),
        ] {
            let Some(config) = config.as_ref().filter(|c| !c.codecs.is_empty()) else {
                continue;
            };
            check_unique_payload_types(&config.codecs)?;
            let ptime = local.ptime.filter(|_| kind == MediaKind::Audio);
            let secure = local.srtp == SrtpPolicy::Require && !config.crypto.is_empty();
            let protocol = if secure {
                Protocol::RtpSavp
            } else {
                Protocol::RtpAvp
            };
            let mut built = build_media(
                kind,
                config.port,
                protocol,
                &config.codecs,
                local.direction,
                ptime,
            );
            if secure {
                add_cryptos(&mut built, &config.crypto);
            }
            add_feedback(&mut built, config.feedback);
            if config.rtcp_mux {
                add_rtcp_mux(&mut built);
            }
            media.push(built);
        }
        if media.is_empty() {
            return Err(NegotiationError::NoLocalMedia);
        }
        let mut media = match &self.last_local {
            Some(previous) => align_with_previous(&previous.media, media),
            None => media,
        };
        if let Some(hold) = &mut self.hold {
            hold.resume_directions = vec![local.direction; media.len()];
            for m in media.iter_mut().filter(|m| !m.is_rejected()) {
                m.set_direction(hold.mode.apply(local.direction));
            }
        }
        Ok(self.finish(local.address, media))
    }

    /// Builds the answer to an offer: for each offered stream, the common codecs in the
    /// offerer's order with the offerer's payload types, our port and the answering direction;
    /// port 0 for streams we cannot take. Fails with [`NegotiationError::NoCommonCodec`] when
    /// no stream can be taken (answer 488 Not Acceptable Here).
    pub fn create_answer(
        &mut self,
        offer: &SessionDescription,
        local: &LocalMedia,
    ) -> Result<SessionDescription, NegotiationError> {
        if offer.media.is_empty() {
            return Err(NegotiationError::NoMedia);
        }
        // Whether an audio, a video and an application stream were taken already.
        let mut taken = [false; 3];
        let slot = |kind: &MediaKind| match kind {
            MediaKind::Audio => Some(0),
            MediaKind::Video => Some(1),
            MediaKind::Application => Some(2),
            _ => None,
        };
        let mut media = Vec::with_capacity(offer.media.len());
        let mut resume_directions = Vec::with_capacity(offer.media.len());
        let hold_mode = self.hold.as_ref().map(|h| h.mode);
        for (index, offered) in offer.media.iter().enumerate() {
            let kind_slot = slot(&offered.kind).filter(|&i| !taken[i]);
            let config = match kind_slot {
                Some(0) => local.audio.as_ref(),
                Some(1) => local.video.as_ref(),
                Some(2) => local.application.as_ref(),
                _ => None,
            };
            let accepted = config
                .filter(|_| !offered.is_rejected())
                .and_then(|config| {
                    let keys = answer_keys(offered, config, local.srtp)?;
                    let chosen = intersect_codecs(
                        &offered.codecs(),
                        &config.codecs,
                        local.single_codec_answer,
                    );
                    let feedback = config.feedback.both(offered.rtcp_feedback());
                    let mux = config.rtcp_mux && offered.rtcp_mux();
                    (!chosen.is_empty()).then_some((config.port, chosen, keys, feedback, mux))
                });
            match accepted {
                Some((port, chosen, keys, feedback, mux)) => {
                    if let Some(i) = kind_slot {
                        taken[i] = true;
                    }
                    let offered_direction =
                        offer.media_direction(index).unwrap_or(Direction::SendRecv);
                    let ptime = local.ptime.filter(|_| offered.kind == MediaKind::Audio);
                    let unheld = offered_direction.answer_to(local.direction);
                    let direction = hold_mode.map_or(unheld, |mode| mode.apply(unheld));
                    resume_directions.push(unheld);
                    let mut built = build_media(
                        offered.kind.clone(),
                        port,
                        offered.protocol.clone(),
                        &chosen,
                        direction,
                        ptime,
                    );
                    if let Some(key) = keys {
                        add_cryptos(&mut built, std::slice::from_ref(&key));
                    }
                    add_feedback(&mut built, feedback);
                    if mux {
                        add_rtcp_mux(&mut built);
                    }
                    media.push(built);
                }
                None => {
                    resume_directions.push(Direction::SendRecv);
                    media.push(rejected_copy(offered));
                }
            }
        }
        if !taken.contains(&true) {
            return Err(NegotiationError::NoCommonCodec);
        }
        if let Some(hold) = &mut self.hold {
            hold.resume_directions = resume_directions;
        }
        Ok(self.finish(local.address, media))
    }

    /// Re-offers the last description with hold directions (RFC 3264 section 8.4). Holding
    /// again (e.g. switching from sendonly to inactive) keeps the directions to resume to.
    pub fn create_hold_offer(
        &mut self,
        mode: HoldMode,
    ) -> Result<SessionDescription, NegotiationError> {
        let previous = self
            .last_local
            .clone()
            .ok_or(NegotiationError::NoPreviousDescription)?;
        let resume_directions = match self.hold.take() {
            Some(hold) => hold.resume_directions,
            None => (0..previous.media.len())
                .map(|i| previous.media_direction(i).unwrap_or(Direction::SendRecv))
                .collect(),
        };
        let held: Vec<Direction> = resume_directions.iter().map(|d| mode.apply(*d)).collect();
        self.hold = Some(HoldState {
            mode,
            resume_directions,
        });
        Ok(self.redirect(previous, &held))
    }

    /// Marks the streams of type `kind` in the last description as rejected (port 0, RFC 3264
    /// 8.2) when the negotiation left them out, so that later offers built from it (hold,
    /// resume) do not name a port whose relay is gone. Returns whether one was.
    pub fn retire(&mut self, kind: &MediaKind) -> bool {
        let Some(last) = self.last_local.as_mut() else {
            return false;
        };
        let mut retired = false;
        for media in last.media.iter_mut() {
            if media.kind == *kind && !media.is_rejected() {
                *media = rejected_copy(media);
                retired = true;
            }
        }
        if retired {
            // A changed description gets a new version (RFC 3264 8), also when it is sent
            // again as it is (a session refresh).
            self.version = self.version.saturating_add(1);
            last.origin.session_version = self.version;
        }
        retired
    }

    /// Re-offers the last description with the directions it had before the hold (sendrecv if
    /// there was no hold).
    pub fn create_resume_offer(&mut self) -> Result<SessionDescription, NegotiationError> {
        let previous = self
            .last_local
            .clone()
            .ok_or(NegotiationError::NoPreviousDescription)?;
        let directions = self
            .hold
            .take()
            .map(|h| h.resume_directions)
            .unwrap_or_else(|| vec![Direction::SendRecv; previous.media.len()]);
        Ok(self.redirect(previous, &directions))
    }

    /// `previous` with the given per-media directions on its active streams.
    fn redirect(
        &mut self,
        mut sd: SessionDescription,
        directions: &[Direction],
    ) -> SessionDescription {
        sd.attributes
            .retain(|a| !matches!(a, Attribute::Direction(_)));
        for (media, direction) in sd.media.iter_mut().zip(directions) {
            if !media.is_rejected() {
                media.set_direction(*direction);
            }
        }
        self.commit(sd)
    }

    /// Wraps media into a full description with our origin and connection, and commits it.
    fn finish(&mut self, address: IpAddr, media: Vec<MediaDescription>) -> SessionDescription {
        let connection = Connection::from_ip(address);
        let (addr_type, origin_address) = self
            .origin_address
            .get_or_insert_with(|| (connection.addr_type.clone(), connection.address.clone()))
            .clone();
        let sd = SessionDescription {
            origin: Origin {
                username: self.username.clone(),
                session_id: self.session_id.clone(),
                session_version: self.version,
                net_type: "IN".into(),
                addr_type,
                address: origin_address,
            },
            session_name: "-".into(),
            session_info: None,
            uri: None,
            emails: Vec::new(),
            phones: Vec::new(),
            connection: Some(connection),
            bandwidths: Vec::new(),
            timings: vec![Timing {
                start: 0,
                stop: 0,
                repeats: Vec::new(),
            }],
            time_zones: None,
            encryption_key: None,
            attributes: Vec::new(),
            media,
        };
        self.commit(sd)
    }

    /// Sets the version (bumped if the description changed) and remembers the description.
    fn commit(&mut self, mut sd: SessionDescription) -> SessionDescription {
        sd.origin.session_version = self.version;
        if let Some(previous) = &self.last_local {
            if *previous != sd {
                self.version = self.version.saturating_add(1);
                sd.origin.session_version = self.version;
            }
        }
        self.last_local = Some(sd.clone());
        sd
    }
}

fn check_unique_payload_types(codecs: &[Codec]) -> Result<(), NegotiationError> {
    for (i, codec) in codecs.iter().enumerate() {
        if codecs
            .iter()
            .skip(i + 1)
            .any(|c| c.payload_type == codec.payload_type)
        {
            return Err(NegotiationError::DuplicatePayloadType(codec.payload_type));
        }
    }
    Ok(())
}

/// An RTP m-line with rtpmap (for every codec, static ones too), fmtp, ptime and direction.
fn build_media(
    kind: MediaKind,
    port: u16,
    protocol: Protocol,
    codecs: &[Codec],
    direction: Direction,
    ptime: Option<u32>,
) -> MediaDescription {
    let formats = codecs.iter().map(|c| c.payload_type.to_string()).collect();
    let mut media = MediaDescription::new(kind, port, protocol, formats);
    for codec in codecs {
        media.attributes.push(Attribute::RtpMap(codec.rtpmap()));
        if let Some(fmtp) = &codec.fmtp {
            media
                .attributes
                .push(Attribute::Fmtp(super::attribute::Fmtp {
                    format: codec.payload_type.to_string(),
                    params: fmtp.clone(),
                }));
        }
    }
    if let Some(ptime) = ptime {
        media.attributes.push(Attribute::Ptime(ptime));
    }
    media.attributes.push(Attribute::Direction(direction));
    media
}

/// Adds the `a=rtcp-fb` lines of `feedback` (before the direction, which stays last).
fn add_feedback(media: &mut MediaDescription, feedback: RtcpFeedback) {
    let at = before_direction(media);
    for (i, value) in feedback.values().enumerate() {
        media
            .attributes
            .insert(at + i, Attribute::other("rtcp-fb", value));
    }
}

/// Adds an `a=crypto` line per key (before the direction, which stays last).
/// Adds `a=rtcp-mux` (before the direction, which stays last).
fn add_rtcp_mux(media: &mut MediaDescription) {
    let at = before_direction(media);
    media.attributes.insert(at, Attribute::flag("rtcp-mux"));
}

/// Where an attribute goes so that the direction stays last.
fn before_direction(media: &MediaDescription) -> usize {
    media
        .attributes
        .iter()
        .position(|a| matches!(a, Attribute::Direction(_)))
        .unwrap_or(media.attributes.len())
}

fn add_cryptos(media: &mut MediaDescription, keys: &[Crypto]) {
    let at = media
        .attributes
        .iter()
        .position(|a| matches!(a, Attribute::Direction(_)))
        .unwrap_or(media.attributes.len());
    for (i, key) in keys.iter().enumerate() {
        media
            .attributes
            .insert(at + i, Attribute::other("crypto", key.to_string()));
    }
}

/// Whether an offered RTP stream can be taken under `policy`, and with which key: `Some(None)`
/// plain RTP, `Some(Some(key))` SRTP with our key under the offered tag, `None` not at all (a
/// protocol that is not RTP, SRTP refused or without a usable common suite, or plain RTP when
/// SRTP is required).
fn answer_keys(
    offered: &MediaDescription,
    config: &MediaConfig,
    policy: SrtpPolicy,
) -> Option<Option<Crypto>> {
    match (&offered.protocol, policy) {
        (Protocol::RtpAvp | Protocol::RtpAvpf, SrtpPolicy::Off | SrtpPolicy::Accept) => Some(None),
        (Protocol::RtpSavp | Protocol::RtpSavpf, SrtpPolicy::Accept | SrtpPolicy::Require) => {
            choose(&offered.cryptos(), &config.crypto).map(|(ours, _)| Some(ours))
        }
        _ => None,
    }
}

/// A rejected stream answering (or keeping the slot of) `media`: port 0, same type, protocol
/// and formats, nothing else.
fn rejected_copy(media: &MediaDescription) -> MediaDescription {
    let formats = if media.formats.is_empty() {
        vec!["0".to_string()]
    } else {
        media.formats.clone()
    };
    MediaDescription::new(media.kind.clone(), 0, media.protocol.clone(), formats)
}

/// Places new streams in the slots of the previous description (same media type, first
/// free), keeps unused slots as rejected, and appends the rest.
fn align_with_previous(
    previous: &[MediaDescription],
    mut new: Vec<MediaDescription>,
) -> Vec<MediaDescription> {
    let mut out = Vec::with_capacity(previous.len().max(new.len()));
    for slot in previous {
        match new.iter().position(|m| m.kind == slot.kind) {
            Some(pos) => out.push(new.remove(pos)),
            None => out.push(rejected_copy(slot)),
        }
    }
    out.extend(new);
    out
}

/// Common codecs in the offerer's order, with the offerer's payload types; empty if no codec
/// carrying media (not telephone-event, not comfort noise) is common.
fn intersect_codecs(offered: &[Codec], local: &[Codec], single: bool) -> Vec<Codec> {
    let common: Vec<Codec> = offered
        .iter()
        .filter_map(|o| {
            let l = local.iter().find(|l| l.same_format(o))?;
            Some(Codec {
                fmtp: l.fmtp.clone().or_else(|| o.fmtp.clone()),
                ..o.clone()
            })
        })
        .collect();
    let is_auxiliary = |c: &Codec| c.is_telephone_event() || c.is_comfort_noise();
    let Some(first) = common.iter().find(|c| !is_auxiliary(c)).cloned() else {
        return Vec::new();
    };
    if !single {
        return common;
    }
    let mut chosen = vec![first.clone()];
    let events: Vec<&Codec> = common.iter().filter(|c| c.is_telephone_event()).collect();
    if let Some(event) = events
        .iter()
        .find(|e| e.clock_rate == first.clock_rate)
        .or(events.first())
    {
        chosen.push((*event).clone());
    }
    if let Some(cn) = common
        .iter()
        .find(|c| c.is_comfort_noise() && c.clock_rate == first.clock_rate)
    {
        chosen.push(cn.clone());
    }
    chosen
}

/// What a media relay needs about one remote stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMedia {
    /// The media type.
    pub kind: MediaKind,
    /// Index of the m-line in the description.
    pub index: usize,
    /// Where to send RTP (`0.0.0.0:port` for an RFC 2543-style hold).
    pub rtp: SocketAddr,
    /// Where to send RTCP when it is not multiplexed (`a=rtcp`, else the RTP port + 1).
    pub rtcp: SocketAddr,
    /// The stream has `a=rtcp-mux` (RFC 5761): RTCP goes to the RTP address when our side
    /// multiplexes too.
    pub rtcp_mux: bool,
    /// The stream's direction as the remote side wrote it.
    pub direction: Direction,
    /// The codecs carrying media, in the remote's order of preference.
    pub codecs: Vec<Codec>,
    /// The telephone-event format, if any (the first one offered).
    pub telephone_event: Option<Codec>,
    /// `a=ptime`, if given.
    pub ptime: Option<u32>,
    /// The stream's `a=crypto` attributes (RFC 4568) when it is SRTP (`RTP/SAVP`); empty for
    /// plain RTP.
    pub crypto: Vec<Crypto>,
    /// The stream's `a=rtcp-fb` attributes: which key frame requests the remote side takes.
    pub feedback: RtcpFeedback,
}

impl RemoteMedia {
    /// The codec to send with: the remote's first, skipping comfort noise.
    pub fn primary_codec(&self) -> Option<&Codec> {
        self.codecs.iter().find(|c| !c.is_comfort_noise())
    }

    /// Whether the remote side does not want to receive media now (it holds us).
    pub fn is_hold(&self) -> bool {
        !self.direction.receives() || self.rtp.ip().is_unspecified()
    }
}

impl SessionDescription {
    /// The first active (port non-zero) stream of `kind`, with its address resolved from the
    /// media or session `c=` line. `None` if there is none or its address is not an IP address.
    pub fn remote_media(&self, kind: &MediaKind) -> Option<RemoteMedia> {
        self.remote_media_at(self.first_active(kind)?)
    }

    /// The stream of the m-line at `index` (see [`SessionDescription::remote_media`]); `None`
    /// if there is no such line, it is rejected (port 0) or its address is not an IP address.
    pub fn remote_media_at(&self, index: usize) -> Option<RemoteMedia> {
        let media = self.media.get(index).filter(|m| !m.is_rejected())?;
        let kind = &media.kind;
        let ip = self.media_connection(index)?.ip()?;
        let rtp = SocketAddr::new(ip, media.port);
        let rtcp = match media.rtcp() {
            Some(rtcp) => {
                let rtcp_ip = rtcp
                    .connection
                    .as_ref()
                    .and_then(Connection::ip)
                    .unwrap_or(ip);
                SocketAddr::new(rtcp_ip, rtcp.port)
            }
            None => SocketAddr::new(ip, media.port.checked_add(1).unwrap_or(media.port)),
        };
        let all = media.codecs();
        let telephone_event = all.iter().find(|c| c.is_telephone_event()).cloned();
        let codecs = all
            .into_iter()
            .filter(|c| !c.is_telephone_event())
            .collect();
        Some(RemoteMedia {
            kind: kind.clone(),
            index,
            rtp,
            rtcp,
            rtcp_mux: media.rtcp_mux(),
            direction: self.media_direction(index).unwrap_or(Direction::SendRecv),
            codecs,
            telephone_event,
            ptime: media.ptime(),
            crypto: if media.is_secure() {
                media.cryptos()
            } else {
                Vec::new()
            },
            feedback: media.rtcp_feedback(),
        })
    }

    /// The RTP address of the first active stream of `kind` (see
    /// [`SessionDescription::remote_media`]).
    pub fn rtp_address(&self, kind: &MediaKind) -> Option<SocketAddr> {
        self.remote_media(kind).map(|m| m.rtp)
    }

    /// Whether this description (a remote offer) puts us on hold: it has active streams and
    /// each is sendonly or inactive, or has the address `0.0.0.0` (RFC 2543 style).
    pub fn is_hold(&self) -> bool {
        let mut active = self
            .media
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.is_rejected())
            .peekable();
        if active.peek().is_none() {
            return false;
        }
        active.all(|(i, _)| {
            let direction = self.media_direction(i).unwrap_or(Direction::SendRecv);
            let null_address = self
                .media_connection(i)
                .is_some_and(Connection::is_unspecified);
            !direction.receives() || null_address
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn gateway() -> LocalMedia {
        LocalMedia::audio(
            ip("192.0.2.10"),
            40000,
            vec![
                Codec::opus(111),
                Codec::pcma(),
                Codec::pcmu(),
                Codec::telephone_event(101, 8000),
            ],
        )
    }

    #[test]
    fn key_frame_feedback_is_offered_and_answered_with_what_both_list() {
        let mut local = gateway().with_video(40002, vec![Codec::vp8(97)]);
        if let Some(video) = local.video.as_mut() {
            video.feedback = RtcpFeedback::KEY_FRAMES;
        }
        let offer = SdpSession::new(1).create_offer(&local).unwrap().to_string();
        assert!(
            offer.contains("a=rtpmap:97 VP8/90000\r\na=rtcp-fb:* nack pli\r\na=rtcp-fb:* ccm fir\r\na=sendrecv"),
            "{offer}"
        );
        // Audio gets none.
        assert_eq!(offer.matches("rtcp-fb").count(), 2, "{offer}");
        let peer = |feedback: &str| {
            SessionDescription::parse(&format!(
                "v=0\r\no=- 1 1 IN IP4 192.0.2.5\r\ns=-\r\nc=IN IP4 192.0.2.5\r\nt=0 0\r\n\
                 m=audio 30000 RTP/AVP 0\r\nm=video 30002 RTP/AVP 100\r\n\
                 a=rtpmap:100 VP8/90000\r\n{feedback}"
            ))
            .unwrap()
        };
        // A peer that takes FIR only is answered with FIR only, and read as such.
        let fir_only = peer("a=rtcp-fb:100 ccm fir\r\na=rtcp-fb:100 goog-remb\r\n");
        let answer = SdpSession::new(2).create_answer(&fir_only, &local).unwrap();
        let text = answer.to_string();
        assert!(text.contains("a=rtcp-fb:* ccm fir"), "{text}");
        assert!(!text.contains("nack pli"), "{text}");
        let remote = fir_only.remote_media(&MediaKind::Video).unwrap();
        assert_eq!(
            remote.feedback,
            RtcpFeedback {
                listed: true,
                pli: false,
                fir: true
            }
        );
        // A peer that lists none gets none.
        let none = peer("");
        let text = SdpSession::new(3)
            .create_answer(&none, &local)
            .unwrap()
            .to_string();
        assert!(!text.contains("rtcp-fb"), "{text}");
        assert!(
            !none
                .remote_media(&MediaKind::Video)
                .unwrap()
                .feedback
                .listed
        );
    }

    #[test]
    fn offer_lists_codecs_with_rtpmap_fmtp_ptime_and_direction() {
        let mut session = SdpSession::new(99);
        let mut local = gateway();
        local.ptime = Some(20);
        let offer = session.create_offer(&local).unwrap();
        let text = offer.to_string();
        assert!(text.starts_with(
            "v=0\r\no=- 99 1 IN IP4 192.0.2.10\r\ns=-\r\nc=IN IP4 192.0.2.10\r\nt=0 0\r\n"
        ));
        assert!(text.contains("m=audio 40000 RTP/AVP 111 8 0 101\r\n"));
        assert!(text.contains("a=rtpmap:111 opus/48000/2\r\n"));
        assert!(text.contains("a=rtpmap:8 PCMA/8000\r\n"));
        assert!(text.contains("a=fmtp:101 0-16\r\n"));
        assert!(text.contains("a=ptime:20\r\na=sendrecv\r\n"));
        assert_eq!(SessionDescription::parse(&text).unwrap(), offer);
    }

    #[test]
    fn an_application_stream_over_rtp_is_offered_and_answered_beside_audio() {
        let data = || vec![Codec::new("x-data", 1000, 1, 98)];
        let mut offerer = SdpSession::new(1);
        let offer = offerer
            .create_offer(&gateway().with_application(40004, data()))
            .unwrap();
        let text = offer.to_string();
        assert!(text.contains("m=application 40004 RTP/AVP 98\r\na=rtpmap:98 x-data/1000\r\n"));
        let offer = SessionDescription::parse(&text).unwrap();

        // A peer with the same format takes both streams, with the offerer's payload type.
        let mut answerer = SdpSession::new(2);
        let peer = LocalMedia::audio(ip("198.51.100.5"), 5004, vec![Codec::pcmu()])
            .with_application(5008, vec![Codec::new("X-DATA", 1000, 1, 120)]);
        let answer = answerer.create_answer(&offer, &peer).unwrap();
        let data_stream = answer.remote_media(&MediaKind::Application).unwrap();
        assert_eq!(data_stream.rtp.to_string(), "198.51.100.5:5008");
        assert_eq!(data_stream.codecs[0].payload_type, 98);
        assert_eq!(answer.media[1].kind, MediaKind::Application);

        // A peer without it rejects the stream (port 0) and keeps the audio; a second
        // application stream is rejected even by a peer that has the format.
        let mut plain = SdpSession::new(3);
        let answer = plain.create_answer(&offer, &gateway()).unwrap();
        assert!(answer.media[1].is_rejected());
        assert!(answer.remote_media(&MediaKind::Audio).is_some());
        let mut twice = offer.clone();
        twice.media.push(offer.media[1].clone());
        let answer = SdpSession::new(4).create_answer(&twice, &peer).unwrap();
        assert!(!answer.media[1].is_rejected());
        assert!(answer.media[2].is_rejected());

        // An offer of only a stream we lack fails as having nothing in common.
        let mut alone = offer.clone();
        alone.media.remove(0);
        assert_eq!(
            SdpSession::new(5).create_answer(&alone, &gateway()),
            Err(NegotiationError::NoCommonCodec)
        );
    }

    #[test]
    fn srtp_is_offered_answered_by_tag_and_refused_by_policy() {
        use crate::sdp::{Crypto, CryptoSuite, SrtpPolicy};
        let keyed = |policy: SrtpPolicy, byte: u8| {
            let mut local = gateway();
            local.srtp = policy;
            if let Some(audio) = local.audio.as_mut() {
                audio.crypto = vec![
                    Crypto::new(1, CryptoSuite::AeadAes128Gcm, vec![byte; 28]),
                    Crypto::new(2, CryptoSuite::AesCm128HmacSha1_80, vec![byte; 30]),
                ];
            }
            local
        };
        // Required: the offer is RTP/SAVP with both keys.
        let offer = SdpSession::new(1)
            .create_offer(&keyed(SrtpPolicy::Require, 1))
            .unwrap();
        let text = offer.to_string();
        assert!(text.contains("m=audio 40000 RTP/SAVP "), "{text}");
        assert!(
            text.contains("a=crypto:1 AEAD_AES_128_GCM inline:"),
            "{text}"
        );
        assert!(
            text.contains("a=crypto:2 AES_CM_128_HMAC_SHA1_80 inline:"),
            "{text}"
        );
        let offer = SessionDescription::parse(&text).unwrap();

        // A peer with only the 80-bit suite answers it under tag 2 with its own key.
        let mut peer = keyed(SrtpPolicy::Accept, 7);
        if let Some(audio) = peer.audio.as_mut() {
            audio.crypto.remove(0);
        }
        let answer = SdpSession::new(2).create_answer(&offer, &peer).unwrap();
        let remote = answer.remote_media(&MediaKind::Audio).unwrap();
        assert_eq!(remote.crypto.len(), 1);
        assert_eq!(remote.crypto[0].tag, 2);
        assert_eq!(remote.crypto[0].key_salt, vec![7; 30]);
        assert!(answer.media[0].is_secure());

        // Off: the SAVP offer is refused; Accept without keys of a common suite too.
        assert_eq!(
            SdpSession::new(3).create_answer(&offer, &keyed(SrtpPolicy::Off, 7)),
            Err(NegotiationError::NoCommonCodec)
        );
        let mut keyless = keyed(SrtpPolicy::Accept, 7);
        keyless.audio.as_mut().unwrap().crypto.clear();
        assert!(SdpSession::new(4).create_answer(&offer, &keyless).is_err());

        // Accept offers plain RTP and answers plain offers plainly; Require refuses them.
        let plain = SdpSession::new(5)
            .create_offer(&keyed(SrtpPolicy::Accept, 1))
            .unwrap();
        assert!(!plain.to_string().contains("crypto"));
        assert!(SdpSession::new(6)
            .create_answer(&plain, &keyed(SrtpPolicy::Accept, 7))
            .unwrap()
            .remote_media(&MediaKind::Audio)
            .is_some_and(|m| m.crypto.is_empty()));
        assert_eq!(
            SdpSession::new(7).create_answer(&plain, &keyed(SrtpPolicy::Require, 7)),
            Err(NegotiationError::NoCommonCodec)
        );
    }

    #[test]
    fn offer_errors() {
        let mut session = SdpSession::new(1);
        let mut local = gateway();
        local.audio = Some(MediaConfig::new(1, vec![]));
        assert_eq!(
            session.create_offer(&local),
            Err(NegotiationError::NoLocalMedia)
        );
        local.audio = Some(MediaConfig::new(1, vec![Codec::opus(96), Codec::vp8(96)]));
        assert_eq!(
            session.create_offer(&local),
            Err(NegotiationError::DuplicatePayloadType(96))
        );
        assert_eq!(
            session.create_hold_offer(HoldMode::SendOnly),
            Err(NegotiationError::NoPreviousDescription)
        );
    }

    #[test]
    fn version_increments_only_on_change() {
        let mut session = SdpSession::new(5);
        let first = session.create_offer(&gateway()).unwrap();
        assert_eq!(first.origin.session_version, 1);
        let same = session.create_offer(&gateway()).unwrap();
        assert_eq!(same.origin.session_version, 1);
        assert_eq!(same, first);
        let mut moved = gateway();
        moved.address = ip("203.0.113.9");
        let second = session.create_offer(&moved).unwrap();
        assert_eq!(second.origin.session_version, 2);
        // The origin line keeps its address; c= follows the media.
        assert_eq!(second.origin.address, "192.0.2.10");
        assert_eq!(second.connection.as_ref().unwrap().address, "203.0.113.9");
        let held = session.create_hold_offer(HoldMode::SendOnly).unwrap();
        assert_eq!(held.origin.session_version, 3);
        let resumed = session.create_resume_offer().unwrap();
        assert_eq!(resumed.origin.session_version, 4);
        assert_eq!(resumed.media, second.media);
    }

    #[test]
    fn takeover_continues_the_session() {
        let mut first_node = SdpSession::new(77);
        let sent = first_node.create_offer(&gateway()).unwrap();
        let stored = sent.to_string();
        let mut second_node =
            SdpSession::from_previous(SessionDescription::parse(&stored).unwrap());
        let mut moved = gateway();
        moved.address = ip("192.0.2.20");
        let reoffer = second_node.create_offer(&moved).unwrap();
        assert_eq!(reoffer.origin.session_id, "77");
        assert_eq!(reoffer.origin.session_version, 2);
        assert_eq!(reoffer.origin.address, "192.0.2.10");
        assert_eq!(
            reoffer.rtp_address(&MediaKind::Audio),
            Some("192.0.2.20:40000".parse().unwrap())
        );
    }

    #[test]
    fn reoffer_keeps_previous_m_line_positions() {
        // We answered an offer with video first and audio second; our re-offer keeps that.
        let offer = SessionDescription::parse(
            "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=video 6000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\nm=audio 5000 RTP/AVP 0\r\n",
        )
        .unwrap();
        let mut session = SdpSession::new(3);
        let answer = session.create_answer(&offer, &gateway()).unwrap();
        assert_eq!(answer.media[0].port, 0);
        assert_eq!(answer.media[1].port, 40000);
        let reoffer = session.create_offer(&gateway()).unwrap();
        assert_eq!(reoffer.media.len(), 2);
        assert_eq!(reoffer.media[0].kind, MediaKind::Video);
        assert_eq!(reoffer.media[0].port, 0);
        assert_eq!(reoffer.media[1].kind, MediaKind::Audio);
        assert_eq!(reoffer.media[1].port, 40000);
    }

    #[test]
    fn hold_directions_follow_rfc3264_section_8_4() {
        let mut session = SdpSession::new(1);
        let local = gateway().with_video(40002, vec![Codec::vp8(100)]);
        session.create_offer(&local).unwrap();
        let held = session.create_hold_offer(HoldMode::SendOnly).unwrap();
        assert_eq!(held.media_direction(0), Some(Direction::SendOnly));
        assert_eq!(held.media_direction(1), Some(Direction::SendOnly));
        assert!(session.is_holding());
        // Holding again while held does not lose the original directions.
        let inactive = session.create_hold_offer(HoldMode::Inactive).unwrap();
        assert_eq!(inactive.media_direction(0), Some(Direction::Inactive));
        let resumed = session.create_resume_offer().unwrap();
        assert_eq!(resumed.media_direction(0), Some(Direction::SendRecv));
        assert_eq!(resumed.media_direction(1), Some(Direction::SendRecv));
        assert!(!session.is_holding());

        // A recvonly stream goes inactive with sendonly hold.
        let mut session = SdpSession::new(2);
        session
            .create_offer(&gateway().with_direction(Direction::RecvOnly))
            .unwrap();
        let held = session.create_hold_offer(HoldMode::SendOnly).unwrap();
        assert_eq!(held.media_direction(0), Some(Direction::Inactive));
        let resumed = session.create_resume_offer().unwrap();
        assert_eq!(resumed.media_direction(0), Some(Direction::RecvOnly));
    }

    #[test]
    fn hold_survives_reoffers_until_resume() {
        let mut session = SdpSession::new(1);
        session.create_offer(&gateway()).unwrap();
        session.create_hold_offer(HoldMode::SendOnly).unwrap();
        // The remote re-offers sendrecv (e.g. a session refresh): we stay on hold.
        let remote_offer = SessionDescription::parse(
            "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=audio 5000 RTP/AVP 0\r\na=sendrecv\r\n",
        )
        .unwrap();
        let answer = session.create_answer(&remote_offer, &gateway()).unwrap();
        assert_eq!(answer.media_direction(0), Some(Direction::SendOnly));
        // After a takeover the new address is re-offered, still on hold.
        let mut moved = gateway();
        moved.address = ip("192.0.2.99");
        let reoffer = session.create_offer(&moved).unwrap();
        assert_eq!(reoffer.media_direction(0), Some(Direction::SendOnly));
        // Switching to inactive and then resuming goes back to sendrecv.
        let inactive = session.create_hold_offer(HoldMode::Inactive).unwrap();
        assert_eq!(inactive.media_direction(0), Some(Direction::Inactive));
        let resumed = session.create_resume_offer().unwrap();
        assert_eq!(resumed.media_direction(0), Some(Direction::SendRecv));
        assert!(!session.is_holding());
        // Not holding: answers follow the offer again.
        let answer = session.create_answer(&remote_offer, &gateway()).unwrap();
        assert_eq!(answer.media_direction(0), Some(Direction::SendRecv));
    }

    #[test]
    fn intersect_single_codec_picks_matching_event_rate() {
        let offered = vec![
            Codec::opus(96),
            Codec::pcmu(),
            Codec::telephone_event(97, 8000),
            Codec::telephone_event(98, 48000),
            Codec::new("CN", 8000, 1, 13),
        ];
        let local = vec![
            Codec::pcmu(),
            Codec::opus(111),
            Codec::telephone_event(101, 48000),
            Codec::telephone_event(100, 8000),
            Codec::new("CN", 8000, 1, 13),
        ];
        let all = intersect_codecs(&offered, &local, false);
        assert_eq!(
            all.iter().map(|c| c.payload_type).collect::<Vec<_>>(),
            vec![96, 0, 97, 98, 13]
        );
        let single = intersect_codecs(&offered, &local, true);
        assert_eq!(
            single.iter().map(|c| c.payload_type).collect::<Vec<_>>(),
            vec![96, 98]
        );
        assert!(intersect_codecs(&offered[2..], &local, false).is_empty());
    }

    #[test]
    fn remote_media_reads_rtcp_and_fallbacks() {
        let sd = SessionDescription::parse(
            "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=audio 0 RTP/AVP 0\r\nm=audio 5000 RTP/AVP 0 101\r\na=rtpmap:101 telephone-event/8000\r\n\
a=rtcp:5005 IN IP4 198.51.100.2\r\na=ptime:30\r\nm=video 6000 RTP/AVP 96\r\nc=IN IP4 example.com\r\n",
        )
        .unwrap();
        let audio = sd.remote_media(&MediaKind::Audio).unwrap();
        assert_eq!(audio.index, 1);
        assert_eq!(audio.rtp, "198.51.100.1:5000".parse().unwrap());
        assert_eq!(audio.rtcp, "198.51.100.2:5005".parse().unwrap());
        assert_eq!(audio.codecs, vec![Codec::pcmu()]);
        assert_eq!(
            audio.telephone_event.as_ref().map(|c| c.payload_type),
            Some(101)
        );
        assert_eq!(audio.ptime, Some(30));
        assert!(!audio.is_hold());
        assert_eq!(sd.remote_media(&MediaKind::Video), None, "host name");
        assert_eq!(sd.remote_media(&MediaKind::Text), None);
        assert!(!audio.rtcp_mux);
    }

    /// RFC 5761 section 5.1: `a=rtcp-mux` is answered only by a side that multiplexes and only
    /// to an offer that has it; a multiplexing side offers it.
    #[test]
    fn rtcp_mux_is_answered_when_offered_and_supported() {
        let offer_text =
            |mux: bool| {
                format!(
                "v=0\r\no=- 1 1 IN IP4 198.51.100.1\r\ns=-\r\nc=IN IP4 198.51.100.1\r\nt=0 0\r\n\
m=audio 5000 RTP/AVP 0\r\n{}a=sendrecv\r\n",
                if mux { "a=rtcp:5000\r\na=rtcp-mux\r\n" } else { "" }
            )
            };
        let muxing = || {
            let mut local = gateway();
            if let Some(audio) = local.audio.as_mut() {
                audio.rtcp_mux = true;
            }
            local
        };
        let answer = |offer: &str, local: &LocalMedia| {
            SdpSession::new(1)
                .create_answer(&SessionDescription::parse(offer).unwrap(), local)
                .unwrap()
        };
        let offered = SessionDescription::parse(&offer_text(true)).unwrap();
        let remote = offered.remote_media(&MediaKind::Audio).unwrap();
        assert!(remote.rtcp_mux);
        assert_eq!(remote.rtcp, "198.51.100.1:5000".parse().unwrap());

        let both = answer(&offer_text(true), &muxing());
        let text = both.to_string();
        assert!(text.contains("a=rtcp-mux\r\na=sendrecv"), "{text}");
        assert!(both.media[0].rtcp_mux());
        // Not offered, or not ours to give: no mux.
        assert!(!answer(&offer_text(false), &muxing()).media[0].rtcp_mux());
        assert!(!answer(&offer_text(true), &gateway()).media[0].rtcp_mux());
        // A multiplexing side offers it; the other does not.
        let offer = SdpSession::new(2).create_offer(&muxing()).unwrap();
        assert!(offer.media[0].rtcp_mux(), "{offer}");
        assert!(!SdpSession::new(3).create_offer(&gateway()).unwrap().media[0].rtcp_mux());
    }
}
