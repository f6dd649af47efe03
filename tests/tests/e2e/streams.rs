//! Status streams never lose events silently: under load every client
//! gets every terminal event of its vnode, or an explicit `resync` after
//! which a re-listing finds the rest; every event has an id, and
//! `Last-Event-ID` resumes exactly after it (or says `resync` when the id
//! is from another run of the node).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use braid_e2e::{Api, FlowStatus, Node, Pkg};
use serde_json::{Value, json};

use crate::{ALICE, BOB, assert_ping_ok, ping_body};

/// Carol runs the hostile package (its `big_result` flow).
const CAROL: &str = "O=Carol, L=Paris, C=FR";

/// One event of a stream, as a client saw it.
#[derive(Debug, Clone)]
pub struct SseEvent {
    /// The `id:` field (`None`: the event had none).
    pub id: Option<String>,
    /// The `event:` field.
    pub event: String,
    /// The `data:` field, as JSON.
    pub data: Value,
    /// When the client read it, ms since the epoch (the node's clock is
    /// the same machine's).
    pub at_ms: u64,
}

impl SseEvent {
    /// The flow status a `status` event carries.
    pub fn status(&self) -> FlowStatus {
        assert_eq!(self.event, "status", "not a status event: {self:?}");
        serde_json::from_value(self.data.clone())
            .unwrap_or_else(|e| panic!("status event data is not a Flow ({e}): {self:?}"))
    }

    /// The `<run>-<seq>` parts of the id; panics when it has none or
    /// another shape.
    pub fn run_seq(&self) -> (String, u64) {
        let id = self
            .id
            .as_deref()
            .unwrap_or_else(|| panic!("an event without an id: {self:?}"));
        let (run, seq) = id
            .split_once('-')
            .unwrap_or_else(|| panic!("event id {id:?} is not <run>-<seq>"));
        let seq = seq
            .parse()
            .unwrap_or_else(|e| panic!("event id {id:?}: sequence number ({e})"));
        (run.to_string(), seq)
    }
}

/// What a stream's reader thread hands over.
#[derive(Debug)]
pub enum Item {
    /// An event.
    Event(SseEvent),
    /// The stream ended (the server closed it, or the read failed).
    End(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How a client reads.
#[derive(Clone, Default)]
pub struct Reading {
    /// While set, the client reads nothing (the server's writes back up).
    pub paused: Option<Arc<AtomicBool>>,
    /// Time spent on each event before reading the next one.
    pub per_event: Option<Duration>,
}

/// Opens `path` as an event stream (sending `Last-Event-ID: last_id` when
/// given) and reads it on a thread as `reading` says. Returns the HTTP
/// status and, on `200`, the events.
pub fn open_stream(
    api: &Api,
    path: &str,
    last_id: Option<&str>,
    reading: Reading,
) -> Result<mpsc::Receiver<Item>, (u16, String)> {
    let mut req = api
        .client()
        .get(api.url(path))
        .basic_auth(braid_e2e::ADMIN_USER, Some(braid_e2e::ADMIN_PASSWORD))
        .header(reqwest::header::ACCEPT, "text/event-stream")
        // Streams run as long as the test; the client's default request
        // timeout would cut them.
        .timeout(Duration::from_secs(600));
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    let resp = req.send().expect("open event stream");
    let status = resp.status().as_u16();
    if status != 200 {
        return Err((status, resp.text().unwrap_or_default()));
    }
    let ctype = resp
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        ctype.starts_with("text/event-stream"),
        "GET {path}: content type {ctype:?}"
    );
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || read_events(resp, reading, tx));
    Ok(rx)
}

fn read_events(body: reqwest::blocking::Response, reading: Reading, tx: mpsc::Sender<Item>) {
    // A small buffer, so that a paused client really stops taking bytes.
    let mut reader = BufReader::with_capacity(1024, body);
    let (mut id, mut event, mut data) = (None, String::new(), String::new());
    let mut line = String::new();
    loop {
        if let Some(p) = &reading.paused {
            while p.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                let _ = tx.send(Item::End("the server closed the stream".into()));
                return;
            }
            Err(e) => {
                let _ = tx.send(Item::End(format!("read failed: {e}")));
                return;
            }
            Ok(_) => {}
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            if data.is_empty() && event.is_empty() {
                continue;
            }
            let parsed = serde_json::from_str(&data)
                .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {data:?}"));
            let ev = SseEvent {
                id: id.take(),
                event: std::mem::take(&mut event),
                data: parsed,
                at_ms: now_ms(),
            };
            data.clear();
            if tx.send(Item::Event(ev)).is_err() {
                return;
            }
            if let Some(d) = reading.per_event {
                std::thread::sleep(d);
            }
        } else if l.starts_with(':') {
            // A keep-alive comment.
        } else if let Some(v) = l.strip_prefix("id:") {
            id = Some(v.trim_start().to_string());
        } else if let Some(v) = l.strip_prefix("event:") {
            event = v.trim_start().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            if !data.is_empty() {
                data.push('\n');
            }
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
}

/// The next item within `timeout`; panics (with `what`) on a timeout.
pub fn next_item(rx: &mpsc::Receiver<Item>, timeout: Duration, what: &str) -> Item {
    rx.recv_timeout(timeout)
        .unwrap_or_else(|e| panic!("{what}: nothing within {timeout:?} ({e})"))
}

/// The next event; panics when the stream ends or nothing comes in time.
pub fn next_event(rx: &mpsc::Receiver<Item>, timeout: Duration, what: &str) -> SseEvent {
    match next_item(rx, timeout, what) {
        Item::Event(e) => e,
        Item::End(why) => panic!("{what}: the stream ended ({why})"),
    }
}

/// Every event until the stream ends.
pub fn until_end(rx: &mpsc::Receiver<Item>, what: &str) -> Vec<SseEvent> {
    let mut got = Vec::new();
    while let Item::Event(e) = next_item(rx, Duration::from_secs(60), what) {
        got.push(e);
    }
    got
}

/// What one client of a vnode stream ended up knowing.
#[derive(Debug, Default)]
struct Client {
    name: &'static str,
    /// Terminal statuses by client request id, from `status` events.
    from_events: HashMap<String, FlowStatus>,
    /// Terminal statuses by client request id, from the listings made
    /// after each `resync`, with when the `resync` was read.
    from_listings: HashMap<String, (FlowStatus, u64)>,
    resyncs: usize,
    /// Times the stream ended and the client reconnected with
    /// `Last-Event-ID`.
    reconnects: usize,
    events: usize,
    without_id: usize,
}

/// Follows a vnode's stream as a careful client does: on `resync`, it
/// lists the vnode's flows again; when the stream ends, it reconnects with
/// the last id. Returns once it knows the end of `sentinel`.
fn follow_vnode(
    name: &'static str,
    api: Api,
    holding: String,
    rx: mpsc::Receiver<Item>,
    reading: Reading,
    sentinel: &'static str,
) -> Client {
    let path = format!("/api/v1/flow/{holding}/events");
    let mut c = Client {
        name,
        ..Client::default()
    };
    let mut rx = rx;
    let mut last: Option<(String, u64)> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let done = c.from_events.contains_key(sentinel) || c.from_listings.contains_key(sentinel);
        if done {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: the sentinel's end never came ({c:?})"
        );
        let left = deadline.saturating_duration_since(Instant::now());
        match next_item(&rx, left.max(Duration::from_secs(1)), name) {
            Item::End(why) => {
                // The node may cut a client that reads nothing for its
                // write timeout: that is a sign too; resume after it.
                c.reconnects += 1;
                assert!(c.reconnects < 20, "{name}: the stream keeps ending: {why}");
                let id = last.as_ref().map(|(run, seq)| format!("{run}-{seq}"));
                rx = open_stream(&api, &path, id.as_deref(), reading.clone())
                    .unwrap_or_else(|e| panic!("{name}: reconnecting: {e:?}"));
            }
            Item::Event(ev) => {
                c.events += 1;
                if ev.id.is_none() {
                    // Checked after the ends, which matter more.
                    c.without_id += 1;
                } else {
                    let (run, seq) = ev.run_seq();
                    if let Some((prev_run, prev_seq)) = &last {
                        assert_eq!(&run, prev_run, "{name}: the run changed: {ev:?}");
                        assert!(
                            seq > *prev_seq || (ev.event == "resync" && seq >= *prev_seq),
                            "{name}: event ids go back or repeat: {prev_seq} then {ev:?}"
                        );
                    }
                    last = Some((run, seq));
                }
                match ev.event.as_str() {
                    "status" => {
                        let st = ev.status();
                        assert_eq!(
                            st.holding_id, holding,
                            "{name}: another vnode's flow: {ev:?}"
                        );
                        if st.is_terminal()
                            && let Some(id) = st.client_request_id.clone()
                        {
                            c.from_events.insert(id, st);
                        }
                    }
                    "resync" => {
                        c.resyncs += 1;
                        for st in api.list_flows(&holding) {
                            if st.is_terminal()
                                && let Some(id) = st.client_request_id.clone()
                            {
                                c.from_listings.entry(id).or_insert((st, ev.at_ms));
                            }
                        }
                    }
                    other => panic!("{name}: unexpected event {other:?}: {ev:?}"),
                }
            }
        }
    }
}

impl Client {
    /// Every flow `ids` ended as `check` expects, and the client knows
    /// it: from its terminal event, or (only for flows that ended before a
    /// `resync` it got) from the listing it made after that `resync`.
    #[track_caller]
    fn assert_knows_every_end(&self, ids: &[String], check: impl Fn(usize, &FlowStatus)) {
        let name = self.name;
        let mut missing = Vec::new();
        for (i, id) in ids.iter().enumerate() {
            if let Some(st) = self.from_events.get(id) {
                check(i, st);
                continue;
            }
            match self.from_listings.get(id) {
                Some((st, resync_at)) => {
                    check(i, st);
                    // A flow's end was missed only if it came before the
                    // resync that said so: nothing is skipped after one.
                    let ended = end_ms(st);
                    assert!(
                        ended <= *resync_at,
                        "{name}: {id} ended at {ended}, after the resync read at {resync_at}, \
                         yet its end never came on the stream"
                    );
                }
                None => missing.push(id.as_str()),
            }
        }
        assert!(
            missing.is_empty(),
            "{name} never learnt how {} of {} flows ended, with {} resyncs and {} reconnects \
             (e.g. {:?}): events were lost silently",
            missing.len(),
            ids.len(),
            self.resyncs,
            self.reconnects,
            &missing[..missing.len().min(5)]
        );
    }
}

/// A flow's `timestamp` (RFC 3339, ms) as ms since the epoch.
fn end_ms(st: &FlowStatus) -> u64 {
    let ts = st
        .timestamp
        .as_str()
        .unwrap_or_else(|| panic!("{}", st.describe()));
    let t = time::OffsetDateTime::parse(ts, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("timestamp {ts:?} is not RFC 3339: {e}"));
    (t.unix_timestamp_nanos() / 1_000_000) as u64
}

/// Starts pings `prefix-0..n` on `threads` threads.
fn start_many(api: &Api, alice: &str, prefix: &str, n: usize, threads: usize) -> Vec<String> {
    std::thread::scope(|s| {
        for t in 0..threads {
            let api = api.clone();
            s.spawn(move || {
                for i in (t..n).step_by(threads) {
                    api.start_flow(
                        alice,
                        &format!("{prefix}-{i}"),
                        "ping",
                        &ping_body(BOB, i as i64, 0),
                    );
                }
            });
        }
    });
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Thousands of pings with three clients on status streams: on Alice's,
/// one that reads as fast as it can and one that reads slowly; on Carol's,
/// one that stops reading while her flows' large results and everyone's
/// changes pile up. None may miss a flow's end without being told.
#[test]
fn vnode_streams_under_load_deliver_every_end_or_say_resync() {
    // About six changes per ping on the node: far more than a node keeps
    // for a client that reads nothing meanwhile, yet quick here.
    const N: usize = 4000;
    // Carol's flows each end with a result this large: enough of them to
    // fill the socket buffers of a client that reads nothing.
    const BIG: usize = 150;
    const BIG_BYTES: u32 = 64 << 10;
    let node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let _bob = node.vnode(BOB, Pkg::Ping);
    let carol = node.vnode(CAROL, Pkg::Hostile);
    let api = node.api().clone();

    let paused = Arc::new(AtomicBool::new(true));
    let slow = Reading {
        per_event: Some(Duration::from_millis(1)),
        ..Reading::default()
    };
    let stopped = Reading {
        paused: Some(paused.clone()),
        ..Reading::default()
    };
    let clients: Vec<_> = [
        ("fast client", &alice, Reading::default()),
        ("slow client", &alice, slow),
        ("stopped client", &carol, stopped),
    ]
    .into_iter()
    .map(|(name, holding, reading)| {
        let path = format!("/api/v1/flow/{holding}/events");
        let rx = open_stream(&api, &path, None, reading.clone()).expect("open the stream");
        let (api, holding) = (api.clone(), holding.clone());
        std::thread::spawn(move || follow_vnode(name, api, holding, rx, reading, "sentinel"))
    })
    .collect();

    let big: Vec<String> = (0..BIG)
        .map(|i| {
            let id = format!("big-{i}");
            api.start_flow(&carol, &id, "big_result", &json!({"bytes": BIG_BYTES}));
            id
        })
        .collect();
    api.wait_all_terminal(&carol, &big, Duration::from_secs(120));
    let ids = start_many(&api, &alice, "load", N, 8);
    api.wait_all_terminal(&alice, &ids, Duration::from_secs(240));
    paused.store(false, Ordering::Relaxed);
    // The last changes: a client that has their ends has had (or been told
    // it missed) everything before them.
    api.start_flow(&alice, "sentinel", "ping", &ping_body(BOB, 0, 0));
    api.start_flow(&carol, "sentinel", "big_result", &json!({"bytes": 1}));
    api.wait_terminal(&alice, "sentinel");
    api.wait_terminal(&carol, "sentinel");

    let clients: Vec<Client> = clients
        .into_iter()
        .map(|h| h.join().expect("a client failed"))
        .collect();
    for c in &clients {
        eprintln!(
            "[streams] {}: {} events, {} ends from events, {} from listings, {} resyncs, {} \
             reconnects",
            c.name,
            c.events,
            c.from_events.len(),
            c.from_listings.len(),
            c.resyncs,
            c.reconnects
        );
    }
    clients[2].assert_knows_every_end(&big, |_, st| {
        assert_eq!(st.status, "COMPLETED", "{}", st.describe());
        assert_eq!(
            st.result.as_str().map(str::len),
            Some(BIG_BYTES as usize),
            "{}",
            st.flow_id.as_deref().unwrap_or_default()
        );
    });
    for c in &clients[..2] {
        c.assert_knows_every_end(&ids, |i, st| assert_ping_ok(st, i as i64, BOB));
    }
    for c in &clients {
        assert_eq!(c.without_id, 0, "{}: events without an id", c.name);
    }
}

/// Every event has an id; `Last-Event-ID` resumes with exactly the events
/// after it, on the vnode stream and on a flow's; an id of an earlier run
/// of the node, or one that is no id at all, gets `resync`.
#[test]
fn last_event_id_resumes_exactly_after_it() {
    const N: usize = 12;
    let mut node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let _bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();
    let path = format!("/api/v1/flow/{alice}/events");

    let rx = open_stream(&api, &path, None, Reading::default()).expect("open the stream");
    for i in 0..N {
        api.start_flow(
            &alice,
            &format!("r-{i}"),
            "ping",
            &ping_body(BOB, i as i64, 0),
        );
    }
    // Everything up to the last ping's end.
    let mut all: Vec<SseEvent> = Vec::new();
    let mut ended = 0;
    while ended < N {
        let ev = next_event(&rx, Duration::from_secs(60), "the first stream");
        assert_eq!(ev.event, "status", "a resync on a quiet node: {ev:?}");
        let (_, seq) = ev.run_seq();
        if let Some(prev) = all.last() {
            assert!(
                seq > prev.run_seq().1,
                "ids not increasing: {prev:?} then {ev:?}"
            );
        }
        if ev.status().is_terminal() {
            ended += 1;
        }
        all.push(ev);
    }
    assert!(all.len() >= 2 * N, "too few events: {all:?}");
    let run = all[0].run_seq().0;

    // Resuming after each of a few events gives exactly those after it:
    // same ids, same data, no duplicates, no gaps; and then nothing else
    // before the next change.
    let mut resumed = Vec::new();
    for k in [0, all.len() / 3, all.len() / 2, all.len() - 2] {
        let from = all[k].id.clone().unwrap();
        let rx = open_stream(&api, &path, Some(&from), Reading::default()).expect("resume");
        for want in &all[k + 1..] {
            let got = next_event(
                &rx,
                Duration::from_secs(30),
                &format!("resuming after {from}"),
            );
            assert_eq!(
                (got.id.as_deref(), &got.event, &got.data),
                (want.id.as_deref(), &want.event, &want.data),
                "resuming after {from}: expected the next event of the first stream"
            );
        }
        resumed.push((from, rx));
    }
    api.start_flow(&alice, "after", "ping", &ping_body(BOB, 1, 0));
    for (from, rx) in &resumed {
        let ev = next_event(rx, Duration::from_secs(30), "the change after resuming");
        assert_eq!(
            ev.data["clientRequestId"], "after",
            "resumed after {from}: an event that is not the next change: {ev:?}"
        );
    }
    api.wait_terminal(&alice, "after");
    drop(resumed);
    // Resuming after the newest event: nothing until the next change.
    let newest = {
        let rx = open_stream(&api, &path, None, Reading::default()).expect("open");
        api.start_flow(&alice, "newest", "ping", &ping_body(BOB, 1, 0));
        loop {
            let ev = next_event(&rx, Duration::from_secs(30), "newest");
            if ev.status().is_terminal() && ev.data["clientRequestId"] == "newest" {
                break ev.id.expect("an id");
            }
        }
    };
    let rx = open_stream(&api, &path, Some(&newest), Reading::default()).expect("resume");
    api.start_flow(&alice, "next", "ping", &ping_body(BOB, 1, 0));
    let ev = next_event(&rx, Duration::from_secs(30), "after the newest");
    assert_eq!(ev.data["clientRequestId"], "next", "{ev:?}");
    api.wait_terminal(&alice, "next");

    // One flow's stream: resuming after its first event gives the rest of
    // its events and ends at its end.
    let flow_path = |id: &str| format!("/api/v1/flow/{alice}/{id}/events");
    api.start_flow(&alice, "slow", "ping", &ping_body(BOB, 5, 1500));
    let rx = open_stream(&api, &flow_path("slow"), None, Reading::default()).expect("open");
    let first = next_event(&rx, Duration::from_secs(30), "the flow's first event");
    assert!(!first.status().is_terminal(), "{first:?}");
    first.run_seq();
    let resumed = open_stream(
        &api,
        &flow_path("slow"),
        first.id.as_deref(),
        Reading::default(),
    )
    .expect("resume the flow's stream");
    let rest = until_end(&rx, "the flow's stream");
    let resumed_rest = until_end(&resumed, "the resumed flow stream");
    let summary = |v: &[SseEvent]| {
        v.iter()
            .map(|e| (e.id.clone(), e.event.clone(), e.data.clone()))
            .collect::<Vec<_>>()
    };
    assert!(
        rest.last().is_some_and(|e| e.status().is_terminal()),
        "the flow's stream did not end with its end: {rest:?}"
    );
    assert_eq!(
        summary(&resumed_rest),
        summary(&rest),
        "resuming a flow's stream after its first event"
    );
    assert_ping_ok(&rest.last().unwrap().status(), 5, BOB);
    // Now that it has ended: after its first event, the same rest; after
    // its end, nothing (the client has seen it) and the stream ends.
    let read_all = |from: &str| {
        let rx = open_stream(&api, &flow_path("slow"), Some(from), Reading::default())
            .expect("resume an ended flow's stream");
        until_end(&rx, "an ended flow's stream")
    };
    assert_eq!(
        summary(&read_all(first.id.as_deref().unwrap())),
        summary(&rest),
        "resuming an ended flow's stream after its first event"
    );
    let end_id = rest.last().unwrap().id.clone().unwrap();
    assert_eq!(
        summary(&read_all(&end_id)),
        vec![],
        "resuming an ended flow's stream after its end repeats it"
    );

    // Ids that are not this run's: `resync` first, whatever they look like.
    let far = format!("{run}-99999999");
    for bad in ["garbage", "17", "ffff-1", far.as_str()] {
        let rx = open_stream(&api, &path, Some(bad), Reading::default()).expect("open");
        let ev = next_event(
            &rx,
            Duration::from_secs(30),
            &format!("resuming after {bad:?}"),
        );
        assert_eq!(ev.event, "resync", "resuming after {bad:?}: {ev:?}");
        ev.run_seq();
    }

    // After a restart, an id of the previous run gets `resync`, on both
    // kinds of stream; a flow's stream then says its current status.
    let old = all.last().unwrap().id.clone().unwrap();
    node.restart();
    let api = node.api().clone();
    let rx = open_stream(&api, &path, Some(&old), Reading::default()).expect("open");
    let ev = next_event(&rx, Duration::from_secs(30), "resuming across a restart");
    assert_eq!(ev.event, "resync", "an id from before the restart: {ev:?}");
    assert_ne!(ev.run_seq().0, run, "a new run must have new ids: {ev:?}");
    let rx = open_stream(&api, &flow_path("r-0"), Some(&old), Reading::default()).expect("open");
    let ev = next_event(
        &rx,
        Duration::from_secs(30),
        "a flow's stream across a restart",
    );
    assert_eq!(ev.event, "resync", "{ev:?}");
    let ev = next_event(&rx, Duration::from_secs(30), "the flow's current status");
    assert_ping_ok(&ev.status(), 0, BOB);
    assert!(
        matches!(
            next_item(&rx, Duration::from_secs(30), "the end"),
            Item::End(_)
        ),
        "the stream of an ended flow did not end"
    );
}

/// A node that keeps only 100 changes: a client that resumes from an id
/// the node no longer holds gets `resync` first (then, on a flow's stream,
/// the flow's current status), and the stream goes on from there.
#[test]
fn resuming_from_further_back_than_the_node_keeps_gets_resync() {
    let node = Node::options().arg("--status-events").arg("100").start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let _bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();
    let path = format!("/api/v1/flow/{alice}/events");
    let flow_path = format!("/api/v1/flow/{alice}/first/events");

    let rx = open_stream(&api, &path, None, Reading::default()).expect("open");
    api.start_flow(&alice, "first", "ping", &ping_body(BOB, 0, 0));
    let first = next_event(&rx, Duration::from_secs(30), "the first change");
    let old = first.id.clone().expect("an id");
    drop(rx);
    api.wait_terminal(&alice, "first");
    // Far more than 100 changes (about six per ping).
    let ids = crate::start_pings(&api, &alice, BOB, "later", 40, 0);
    api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));

    let rx = open_stream(&api, &path, Some(&old), Reading::default()).expect("resume");
    let ev = next_event(&rx, Duration::from_secs(30), "resuming from long ago");
    assert_eq!(ev.event, "resync", "{ev:?}");
    let (run, seq) = ev.run_seq();
    assert_eq!(run, first.run_seq().0, "same run: {ev:?}");
    assert!(
        seq > first.run_seq().1 + 100,
        "the resync names the newest change: {ev:?}"
    );
    // Everything the resync says to re-read is there; then the stream
    // carries on with the next change.
    let listed = api.list_flows(&alice);
    assert_eq!(listed.len(), 41);
    assert!(listed.iter().all(|f| f.status == "COMPLETED"));
    api.start_flow(&alice, "next", "ping", &ping_body(BOB, 1, 0));
    let ev = next_event(&rx, Duration::from_secs(30), "after the resync");
    assert_eq!(ev.event, "status", "{ev:?}");
    assert_eq!(ev.data["clientRequestId"], "next", "{ev:?}");
    assert!(ev.run_seq().1 > seq, "{ev:?}");

    // A flow's stream: resync, its current status, the end.
    let rx = open_stream(&api, &flow_path, Some(&old), Reading::default()).expect("resume");
    let got = until_end(&rx, "a flow's stream resumed from long ago");
    assert_eq!(
        got.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        ["resync", "status"],
        "{got:?}"
    );
    assert_ping_ok(&got[1].status(), 0, BOB);
}
