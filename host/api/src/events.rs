//! The log of flow status changes that status streams read.
//!
//! Every committed change gets the next sequence number and goes into a
//! bounded ring (by count and by bytes). A reader keeps the number of the
//! last event it saw and asks for what came after: it gets the events, or,
//! when it fell so far behind that the ring no longer holds what it missed,
//! an explicit gap, never a silent skip. Resuming a stream after a
//! reconnect (`Last-Event-ID`) is the same read.

use braid_storage::FlowRecord;
use braid_types::{ClientRequestId, FlowFailure, FlowId, FlowStart, FlowStatus, HoldingId};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Events the log keeps by default (see [`EventLog::new`]): a ping
/// between two vnodes makes six, so this is a few seconds of history at
/// full load for a reader to fall behind before it is told to re-sync.
/// The log is the one thing about finished flows a node keeps in memory,
/// so it stays small.
pub const DEFAULT_CAPACITY: usize = 16_384;
/// Bytes the log keeps at most (results and error texts included), so
/// that large results cannot make it big whatever its capacity.
const MAX_BYTES: usize = 16 << 20;

/// What a status stream shows of a flow after one change: the client's
/// view, not the flow's checkpoint (so the log stays small).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StatusChange {
    /// The flow.
    pub flow: FlowId,
    /// The vnode it runs for.
    pub holding: HoldingId,
    /// The client's request id (`None` for responder flows).
    pub client_request_id: Option<ClientRequestId>,
    /// The flow's name in its package.
    pub flow_name: String,
    /// Its status after the change.
    pub status: FlowStatus,
    /// The JSON result once completed.
    pub result: Option<String>,
    /// The failure once failed or killed.
    pub error: Option<FlowFailure>,
    /// When the change was made, ms since the epoch.
    pub updated_ms: u64,
}

impl StatusChange {
    /// The change a committed record shows.
    pub fn of(r: &FlowRecord) -> StatusChange {
        StatusChange {
            flow: r.id,
            holding: r.holding,
            client_request_id: match &r.start {
                FlowStart::Client {
                    client_request_id, ..
                } => Some(client_request_id.clone()),
                FlowStart::Responder { .. } => None,
            },
            flow_name: r.flow_name.clone(),
            status: r.status,
            result: r.result.clone(),
            error: r.error.clone(),
            updated_ms: r.updated_ms,
        }
    }

    /// About what it costs to keep: the value, its allocations and their
    /// allocator overhead.
    fn bytes(&self) -> usize {
        const PER_ALLOCATION: usize = 16;
        let texts = [
            self.client_request_id.as_ref().map(|c| c.as_str().len()),
            Some(self.flow_name.len()),
            self.result.as_ref().map(String::len),
            self.error.as_ref().map(|e| e.message.len()),
        ];
        std::mem::size_of::<StatusChange>()
            + std::mem::size_of::<StatusEvent>()
            + PER_ALLOCATION
            + texts
                .iter()
                .flatten()
                .map(|n| n + PER_ALLOCATION)
                .sum::<usize>()
    }
}

/// One status change, numbered.
#[derive(Debug, Clone)]
pub struct StatusEvent {
    /// Its number: increasing by one per change, node-wide.
    pub seq: u64,
    /// The flow as the change left it.
    pub change: Arc<StatusChange>,
}

/// What a read returned.
#[derive(Debug, Default)]
pub struct Read {
    /// Matching events after the cursor, oldest first.
    pub events: Vec<StatusEvent>,
    /// Where to read next (the last event looked at).
    pub cursor: u64,
    /// Events after the cursor were dropped before this reader got them:
    /// it must re-read the state it follows. `cursor` is then the newest
    /// event.
    pub gap: bool,
}

#[derive(Default)]
struct Ring {
    events: VecDeque<StatusEvent>,
    bytes: usize,
    /// Number of the newest event (0: none yet).
    last: u64,
}

/// The node's status-change log.
pub struct EventLog {
    ring: Mutex<Ring>,
    capacity: usize,
    latest: watch::Sender<u64>,
    run: u64,
    closed: std::sync::atomic::AtomicBool,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog::new(DEFAULT_CAPACITY)
    }
}

impl EventLog {
    /// A log that keeps the last `capacity` changes (at least one), and
    /// never more than 16 MiB of them: how far a status stream's client
    /// may fall behind, or how old a `Last-Event-ID` it may resume from,
    /// before it is told to re-sync. A ping's change costs about 300
    /// bytes.
    pub fn new(capacity: usize) -> EventLog {
        EventLog {
            ring: Mutex::new(Ring::default()),
            capacity: capacity.max(1),
            latest: watch::channel(0).0,
            run: rand::random::<u64>() >> 16,
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Ends every stream that reads the log (at shutdown: clients
    /// reconnect to the next run and resume with `Last-Event-ID`, which
    /// then says `resync`).
    pub fn close(&self) {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        let latest = *self.latest.borrow();
        self.latest.send_replace(latest);
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A number that differs between runs of the node: event numbers start
    /// again at each start, so a stream id names the run too.
    pub fn run(&self) -> u64 {
        self.run
    }

    /// Appends the change `rec` shows; returns its number.
    pub fn publish(&self, rec: &FlowRecord) -> u64 {
        self.publish_change(StatusChange::of(rec))
    }

    /// Appends `change`; returns its number.
    pub fn publish_change(&self, change: StatusChange) -> u64 {
        let change = Arc::new(change);
        let size = change.bytes();
        let seq = {
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            r.last += 1;
            let seq = r.last;
            r.bytes += size;
            r.events.push_back(StatusEvent { seq, change });
            while r.events.len() > self.capacity || (r.bytes > MAX_BYTES && r.events.len() > 1) {
                let old = r.events.pop_front().expect("non-empty");
                r.bytes -= old.change.bytes();
            }
            seq
        };
        self.latest.send_replace(seq);
        seq
    }

    /// The number of the newest event.
    pub fn latest(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|e| e.into_inner()).last
    }

    /// Changes whenever an event is published.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.latest.subscribe()
    }

    /// Up to `max` events after `cursor` that `keep` accepts.
    pub fn read(&self, cursor: u64, max: usize, keep: impl Fn(&StatusChange) -> bool) -> Read {
        let r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if cursor > r.last {
            // A cursor from before a restart (numbers start again at 1):
            // everything since the restart may have been missed.
            return Read {
                events: Vec::new(),
                cursor: r.last,
                gap: true,
            };
        }
        let oldest = r.events.front().map_or(r.last + 1, |e| e.seq);
        if cursor + 1 < oldest {
            return Read {
                events: Vec::new(),
                cursor: r.last,
                gap: true,
            };
        }
        let skip = (cursor + 1 - oldest) as usize;
        let mut out = Read {
            events: Vec::new(),
            cursor,
            gap: false,
        };
        for e in r.events.iter().skip(skip) {
            out.cursor = e.seq;
            if keep(&e.change) {
                out.events.push(e.clone());
                if out.events.len() == max {
                    break;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_types::*;

    fn rec(n: u8) -> FlowRecord {
        let name: X500Name = "O=A, L=L, C=GB".parse().unwrap();
        FlowRecord::new(
            FlowId::from_bytes([n; 16]),
            HoldingId::derive(&name, "g"),
            "ping".into(),
            Checksum::of(b"x"),
            FlowStart::Client {
                client_request_id: format!("r{n}").parse().unwrap(),
                request_body: "big".repeat(100),
            },
            0,
            0,
        )
    }

    #[test]
    fn readers_get_every_event_in_order_or_an_explicit_gap() {
        let log = EventLog::new(100);
        for i in 0..10u8 {
            assert_eq!(log.publish(&rec(i)), i as u64 + 1);
        }
        let r = log.read(0, 4, |_| true);
        assert_eq!(
            r.events.iter().map(|e| e.seq).collect::<Vec<_>>(),
            [1, 2, 3, 4]
        );
        assert_eq!(r.cursor, 4);
        assert!(!r.gap);
        assert_eq!(
            r.events[0]
                .change
                .client_request_id
                .as_ref()
                .unwrap()
                .as_str(),
            "r0"
        );
        // A filter advances the cursor past what it skips.
        let r = log.read(4, 100, |f| f.flow.bytes()[0] == 8);
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.cursor, 10);
        let r = log.read(10, 100, |_| true);
        assert!(r.events.is_empty() && !r.gap && r.cursor == 10);
        // A cursor from a previous run of the node is a gap.
        assert!(log.read(50, 10, |_| true).gap);
    }

    #[test]
    fn a_reader_that_falls_behind_the_ring_is_told() {
        const CAP: usize = 1000;
        let log = EventLog::new(CAP);
        for i in 0..(CAP + 10) {
            log.publish(&rec((i % 250) as u8));
        }
        let r = log.read(3, 10, |_| true);
        assert!(r.gap);
        assert_eq!(r.cursor, (CAP + 10) as u64);
        // Just inside the ring: no gap.
        let r = log.read(10, 10, |_| true);
        assert!(!r.gap);
        assert_eq!(r.events[0].seq, 11);
    }

    #[test]
    fn large_results_are_bounded_by_bytes_and_pings_are_small() {
        let small = StatusChange::of(&rec(1));
        assert!(
            small.bytes() < 400,
            "a ping's change costs {} bytes",
            small.bytes()
        );
        let log = EventLog::new(1_000_000);
        let mut big = rec(1);
        big.status = FlowStatus::Completed;
        big.result = Some("x".repeat(1 << 20));
        for _ in 0..40 {
            log.publish(&big);
        }
        // 16 MiB hold 15 such changes: numbers 26 to 40.
        assert!(log.read(24, 100, |_| true).gap);
        let r = log.read(25, 100, |_| true);
        assert!(!r.gap);
        assert_eq!(r.events.len(), 15);
        assert_eq!(
            r.events[0].change.result.as_ref().map(String::len),
            Some(1 << 20)
        );
    }
}
