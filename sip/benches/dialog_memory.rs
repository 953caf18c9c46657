//! Memory per confirmed dialog, measured with dhat's heap statistics (bytes requested from the
//! allocator and still held; allocator overhead not included, so the block count is printed
//! too).
//!
//! Stages, each the heap growth divided by the number of calls N (10,000 under `cargo bench`,
//! 1,000 when run as a test):
//!
//! 1. UAS endpoint after N INVITE/200 (no ACK yet): dialogs, the 2xx retransmission state and
//!    the live INVITE server transactions.
//! 2. The same after the N ACKs: the 2xx retransmission state is gone, the transactions still
//!    live (timer L).
//! 3. The same after the fake clock passed every timer (L, H, I, J, the 2xx timers): only the
//!    confirmed dialogs remain. The headline figure, against the aim of 2 KiB per dialog.
//! 4. A fresh endpoint that imported the N records of stage 3 (what a node that took the dialogs
//!    over holds): the dialog table without the capacity the transactions left behind.
//! 5. A bare `Dialogs` table that imported the same records, and 6. a `Vec<Dialog>` of exact
//!    capacity (the dialogs alone: `size_of::<Dialog>()` plus their own heap), to split the
//!    figure between the dialogs, the table and the endpoint.
//! 7. A UAC endpoint after N INVITE/180/200/ACK with every timer passed (the UAC keeps its ACK
//!    to re-send on a retransmitted 2xx).
//!
//! Also printed: `size_of` of the dialog types, `Dialog::estimated_heap_bytes` against the
//! measured figure, and the size of the JSON `DialogRecord` of each side.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{header_line, SippPeer, OUR_SDP};
use thalamus_sip::dialog::{Dialog, DialogId, DialogRecord, DialogState, Dialogs, DialogsConfig};
use thalamus_sip::endpoint::{Endpoint, EndpointConfig, EndpointEvent, Peer};
use thalamus_sip::message::{CSeq, HeaderName, Host, MediaType, Message, Method, Request, Uri};
use thalamus_sip::transaction::TransactionKey;

#[global_allocator]
static ALLOC: dhat::Alloc = dhat::Alloc;

/// The aim for the heap of one confirmed dialog.
const AIM_BYTES: f64 = 2048.0;

/// Heap bytes and blocks currently held.
#[derive(Debug, Clone, Copy)]
struct Heap {
    bytes: i64,
    blocks: i64,
}

impl Heap {
    fn now() -> Self {
        let stats = dhat::HeapStats::get();
        Self {
            bytes: i64::try_from(stats.curr_bytes).unwrap(),
            blocks: i64::try_from(stats.curr_blocks).unwrap(),
        }
    }

    /// Growth since `base`, per item.
    fn per(self, base: Heap, n: usize) -> (f64, f64) {
        let n = n as f64;
        (
            (self.bytes - base.bytes) as f64 / n,
            (self.blocks - base.blocks) as f64 / n,
        )
    }
}

fn row(stage: &str, (bytes, blocks): (f64, f64)) {
    let verdict = if bytes <= AIM_BYTES {
        "under the aim"
    } else {
        "ABOVE the aim"
    };
    println!("| {stage} | {bytes:.0} | {blocks:.1} | {verdict} |");
}

fn endpoint() -> Endpoint {
    let mut e = Endpoint::new(EndpointConfig::default());
    e.set_sent_by(
        thalamus_sip::message::Transport::Udp,
        Host::Ipv4([127, 0, 0, 1].into()),
        5080,
    );
    e
}

fn sipp_addr() -> Peer {
    Peer::udp(SocketAddr::from(([127, 0, 0, 1], 5061)))
}

fn receive(e: &mut Endpoint, now: Instant, bytes: Bytes) {
    let message = Message::parse(bytes).unwrap();
    e.handle_message(now, message, sipp_addr());
}

fn drain(e: &mut Endpoint) -> Vec<EndpointEvent> {
    while e.poll_transmit().is_some() {}
    std::iter::from_fn(|| e.poll_event()).collect()
}

/// Runs every timer: the clock passes 64*T1 (and T4) several times over.
fn pass_all_timers(e: &mut Endpoint, now: &mut Instant) {
    for _ in 0..4 {
        *now += Duration::from_secs(40);
        e.handle_timeout(*now);
        drain(e);
    }
}

/// Where the To lines of our 200s are kept between the INVITE and the ACK stage: one buffer
/// of fixed capacity, so the bench's own bookkeeping does not grow while the endpoint is
/// measured.
struct ToLines {
    text: Vec<u8>,
    ends: Vec<usize>,
}

impl ToLines {
    fn with_capacity(n: usize) -> Self {
        Self {
            text: Vec::with_capacity(n * 128),
            ends: Vec::with_capacity(n),
        }
    }

    fn push(&mut self, line: &[u8]) {
        assert!(self.text.len() + line.len() <= self.text.capacity());
        self.text.extend_from_slice(line);
        self.ends.push(self.text.len());
    }

    fn get(&self, i: usize) -> &[u8] {
        let start = if i == 0 { 0 } else { self.ends[i - 1] };
        &self.text[start..self.ends[i]]
    }
}

struct UasRun {
    records: Vec<DialogRecord>,
    estimated: usize,
}

fn uas_stages(n: usize, sites: Option<dhat::Profiler>) -> Option<UasRun> {
    let mut sipp = SippPeer::new("UDP");
    let mut to_lines = ToLines::with_capacity(n);
    let mut now = Instant::now();
    let base = Heap::now();
    let mut e = endpoint();
    for call in 0..n {
        now += Duration::from_micros(100);
        receive(&mut e, now, sipp.invite(call as u64));
        let key: TransactionKey = drain(&mut e)
            .into_iter()
            .find_map(|ev| match ev {
                EndpointEvent::Request { key, .. } => Some(key),
                _ => None,
            })
            .unwrap();
        let answer = (Bytes::from_static(OUR_SDP.as_bytes()), MediaType::sdp());
        e.respond(now, key, 200, None, Some(answer)).unwrap();
        let ok = e.poll_transmit().unwrap().payload;
        to_lines.push(header_line(&ok, "To"));
        drain(&mut e);
    }
    assert_eq!(e.dialogs().len(), n);
    row(
        "1. UAS endpoint after INVITE/200, before ACK (dialog + 2xx retransmission + transaction)",
        Heap::now().per(base, n),
    );

    for call in 0..n {
        let ack = sipp.in_dialog(call as u64, "ACK", 1, to_lines.get(call));
        receive(&mut e, now, ack);
        let events = drain(&mut e);
        assert!(events
            .iter()
            .any(|ev| matches!(ev, EndpointEvent::Ack { .. })));
    }
    row(
        "2. after the ACKs (2xx retransmission state gone, transactions live)",
        Heap::now().per(base, n),
    );

    pass_all_timers(&mut e, &mut now);
    assert_eq!(e.transaction_count(), 0, "every transaction ended");
    assert_eq!(e.dialogs().len(), n);
    assert!(e
        .dialogs()
        .iter()
        .all(|d| d.state() == DialogState::Confirmed));
    let stats = e.stats();
    assert_eq!(stats.invalid_requests + stats.refused_requests, 0);
    row(
        "3. after every timer: confirmed UAS dialogs only",
        Heap::now().per(base, n),
    );
    if let Some(profiler) = sites {
        // Writes the allocation sites of what is held now ("eb" in the file).
        drop(profiler);
        drop(e);
        return None;
    }

    let records = {
        let estimated = e.dialogs().iter().map(Dialog::estimated_heap_bytes).sum();
        let ids: Vec<DialogId> = e.dialogs().iter().map(|d| d.id().clone()).collect();
        let records = ids
            .iter()
            .map(|id| e.export_dialog(id).unwrap())
            .collect::<Vec<_>>();
        UasRun { records, estimated }
    };
    drop(e);
    Some(records)
}

/// UAS calls at 100 per fake second, timers run as they fall due (the steady state of a
/// server: about 32 s of transactions live at any time, 3,200 calls' worth), then every timer
/// passed.
fn uas_paced(n: usize) {
    let mut sipp = SippPeer::new("UDP");
    let mut now = Instant::now();
    let base = Heap::now();
    let mut e = endpoint();
    for call in 0..n {
        now += Duration::from_millis(10);
        if e.poll_timeout().is_some_and(|t| t <= now) {
            e.handle_timeout(now);
        }
        receive(&mut e, now, sipp.invite(call as u64));
        let key: TransactionKey = drain(&mut e)
            .into_iter()
            .find_map(|ev| match ev {
                EndpointEvent::Request { key, .. } => Some(key),
                _ => None,
            })
            .unwrap();
        let answer = (Bytes::from_static(OUR_SDP.as_bytes()), MediaType::sdp());
        e.respond(now, key, 200, None, Some(answer)).unwrap();
        let ok = e.poll_transmit().unwrap().payload;
        let ack = sipp.in_dialog(call as u64, "ACK", 1, header_line(&ok, "To"));
        drop(ok);
        receive(&mut e, now, ack);
        drain(&mut e);
    }
    pass_all_timers(&mut e, &mut now);
    assert_eq!(e.transaction_count(), 0);
    assert_eq!(e.dialogs().len(), n);
    row(
        "3'. paced at 100 calls/s with timers run when due, then every timer: confirmed UAS dialogs only (headline)",
        Heap::now().per(base, n),
    );
}

fn import_stages(run: &UasRun) {
    let n = run.records.len();
    let base = Heap::now();
    let mut e = endpoint();
    for record in &run.records {
        e.import_dialog(record).unwrap();
    }
    assert_eq!(e.dialogs().len(), n);
    row(
        "4. fresh UAS endpoint after importing the records",
        Heap::now().per(base, n),
    );
    drop(e);

    let base = Heap::now();
    let mut table = Dialogs::new(DialogsConfig::default());
    for record in &run.records {
        table.import(record).unwrap();
    }
    row(
        "5. bare Dialogs table after importing the records",
        Heap::now().per(base, n),
    );
    drop(table);

    // The table's layout (dialogs grouped by a hash of their Call-ID) with buckets of capacity
    // one: what the table would hold if it created each bucket with `Vec::with_capacity(1)`
    // instead of letting the first push allocate Rust's minimum of four slots.
    let base = Heap::now();
    let hasher = RandomState::new();
    let mut buckets: HashMap<u64, Vec<Dialog>> = HashMap::new();
    for record in &run.records {
        buckets
            .entry(hasher.hash_one(&record.call_id))
            .or_insert_with(|| Vec::with_capacity(1))
            .push(Dialog::import(record).unwrap());
    }
    row(
        "5b. projection: the same layout with buckets of capacity 1",
        Heap::now().per(base, n),
    );
    drop(buckets);

    let base = Heap::now();
    let mut dialogs = Vec::with_capacity(n);
    for record in &run.records {
        dialogs.push(Dialog::import(record).unwrap());
    }
    let measured = Heap::now().per(base, n);
    row("6. Vec<Dialog> of exact capacity (dialogs alone)", measured);
    let own_heap = measured.0 - std::mem::size_of::<Dialog>() as f64;
    println!();
    println!(
        "Dialog's own heap (6. minus size_of::<Dialog>()): {own_heap:.0} bytes in {:.1} blocks; \
         Dialog::estimated_heap_bytes of the stage-3 dialogs: {:.0} bytes on average",
        measured.1,
        run.estimated as f64 / n as f64
    );
    drop(dialogs);
}

fn uac_stage(n: usize, sites: Option<dhat::Profiler>) -> Option<Vec<DialogRecord>> {
    let mut sipp = SippPeer::new("UDP");
    let target = Uri::parse("sip:service@127.0.0.1:5070").unwrap();
    let mut now = Instant::now();
    let base = Heap::now();
    let mut e = endpoint();
    for call in 0..n {
        now += Duration::from_millis(10);
        let mut invite = Request::new(Method::Invite, target.clone());
        invite.headers.push(
            HeaderName::From,
            format!("\"Device 42\" <sip:dev42@gw.example.com>;tag=gw{call}"),
        );
        invite
            .headers
            .push(HeaderName::To, "<sip:service@127.0.0.1:5070>");
        invite.headers.set_call_id(&format!("gw{call}@127.0.0.1"));
        invite.headers.set_cseq(&CSeq::new(1, Method::Invite));
        invite
            .headers
            .push(HeaderName::Contact, "<sip:dev42@127.0.0.1:5080>");
        invite.set_body(
            Bytes::from_static(OUR_SDP.as_bytes()),
            Some(&MediaType::sdp()),
        );
        e.send_request(now, invite, sipp_addr()).unwrap();
        let sent = e.poll_transmit().unwrap().payload;
        drain(&mut e);
        let ringing = sipp.response(&sent, "180 Ringing", call as u64, false);
        let ok = sipp.response(&sent, "200 OK", call as u64, true);
        drop(sent);
        receive(&mut e, now, ringing);
        receive(&mut e, now, ok);
        let dialog = drain(&mut e)
            .into_iter()
            .find_map(|ev| match ev {
                EndpointEvent::Response {
                    response,
                    dialog: Some(d),
                    ..
                } if response.status == 200 => Some(d),
                _ => None,
            })
            .unwrap();
        e.send_ack(&dialog, sipp_addr(), None).unwrap();
        drain(&mut e);
        if e.poll_timeout().is_some_and(|t| t <= now) {
            e.handle_timeout(now);
            drain(&mut e);
        }
    }
    pass_all_timers(&mut e, &mut now);
    assert_eq!(e.transaction_count(), 0);
    assert_eq!(e.dialogs().len(), n);
    row(
        "7. UAC endpoint, paced at 100 calls/s, after INVITE/180/200/ACK and every timer (kept ACK included)",
        Heap::now().per(base, n),
    );
    if let Some(profiler) = sites {
        drop(profiler);
        drop(e);
        return None;
    }
    let records: Vec<DialogRecord> = e.dialogs().iter().map(Dialog::export).collect();
    drop(e);

    let base = Heap::now();
    let mut e = endpoint();
    for record in &records {
        e.import_dialog(record).unwrap();
    }
    row(
        "8. fresh endpoint after importing the UAC records (no kept ACK)",
        Heap::now().per(base, n),
    );
    drop(e);
    Some(records)
}

fn json_sizes(side: &str, records: &[DialogRecord]) {
    let sizes: Vec<usize> = records
        .iter()
        .map(|r| serde_json::to_vec(r).unwrap().len())
        .collect();
    let min = sizes.iter().min().unwrap();
    let max = sizes.iter().max().unwrap();
    let mean = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64;
    println!("| {side} | {mean:.0} | {min} | {max} |");
}

fn main() {
    let n = if std::env::args().any(|a| a == "--bench") {
        10_000
    } else {
        1_000
    };
    // DIALOG_MEMORY_SITES=uas|uac: write dhat's per-allocation-site profile of the endpoint
    // holding N confirmed dialogs (stage 3 or 7) to dhat-heap.json ("eb" = bytes held then),
    // for dh_view.html or a script.
    if let Ok(side) = std::env::var("DIALOG_MEMORY_SITES") {
        let profiler = dhat::Profiler::builder()
            .file_name("dhat-heap.json")
            .trim_backtraces(Some(24))
            .build();
        match side.as_str() {
            "uac" => {
                uac_stage(n, Some(profiler));
            }
            _ => {
                uas_stages(n, Some(profiler));
            }
        }
        return;
    }
    let _profiler = dhat::Profiler::builder().testing().build();
    println!("Memory per confirmed dialog, N = {n} calls (dhat: bytes requested and still held)");
    println!();
    println!(
        "size_of: Dialog {} B, DialogId {} B, DialogRecord {} B, Request {} B, Uri {} B, \
         EndpointEvent {} B",
        std::mem::size_of::<Dialog>(),
        std::mem::size_of::<DialogId>(),
        std::mem::size_of::<DialogRecord>(),
        std::mem::size_of::<Request>(),
        std::mem::size_of::<Uri>(),
        std::mem::size_of::<EndpointEvent>(),
    );
    println!();
    println!("| stage | heap bytes per dialog | blocks per dialog | vs 2 KiB |");
    println!("| --- | --- | --- | --- |");
    let uas = uas_stages(n, None).unwrap();
    uas_paced(n);
    import_stages(&uas);
    println!();
    println!("| stage | heap bytes per dialog | blocks per dialog | vs 2 KiB |");
    println!("| --- | --- | --- | --- |");
    let uac = uac_stage(n, None).unwrap();
    println!();
    println!("| DialogRecord as JSON | mean bytes | min | max |");
    println!("| --- | --- | --- | --- |");
    json_sizes("UAS (SIPp uac calling us)", &uas.records);
    json_sizes("UAC (we call SIPp uas)", &uac);
}
