//! The log of flow status changes that status streams read.
//!
//! Every committed change gets the next sequence number and goes into a
//! bounded ring (by count and by bytes). A reader keeps the number of the
//! last event it saw and asks for what came after: it gets the events, or,
//! when it fell so far behind that the ring no longer holds what it missed,
//! an explicit gap, never a silent skip. Resuming a stream after a
//! reconnect (`Last-Event-ID`) is the same read.

use braid_storage::FlowRecord;
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

/// Events the ring keeps at most (a ping between two vnodes makes six;
/// at ~1,500 pings/s this is a few seconds of history for a reader to
/// fall behind before it is told to re-sync). The ring's memory is the
/// one thing about finished flows a node keeps, so it stays small.
const MAX_EVENTS: usize = 32_768;
/// Bytes the ring keeps at most (each event counted with its result and
/// error text).
const MAX_BYTES: usize = 16 << 20;

/// One status change.
#[derive(Debug, Clone)]
pub struct StatusEvent {
    /// Its number: increasing by one per change, node-wide.
    pub seq: u64,
    /// The flow as it was committed (without its request body).
    pub record: Arc<FlowRecord>,
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

fn record_bytes(r: &FlowRecord) -> usize {
    256 + r.result.as_ref().map_or(0, String::len) + r.error.as_ref().map_or(0, |e| e.message.len())
}

/// The node's status-change log.
pub struct EventLog {
    ring: Mutex<Ring>,
    latest: watch::Sender<u64>,
    run: u64,
}

impl Default for EventLog {
    fn default() -> Self {
        EventLog {
            ring: Mutex::new(Ring::default()),
            latest: watch::channel(0).0,
            run: rand::random::<u64>() >> 16,
        }
    }
}

impl EventLog {
    /// A number that differs between runs of the node: event numbers start
    /// again at each start, so a stream id names the run too.
    pub fn run(&self) -> u64 {
        self.run
    }

    /// Appends a change; returns its number.
    pub fn publish(&self, rec: &FlowRecord) -> u64 {
        let mut record = rec.clone();
        if let braid_types::FlowStart::Client { request_body, .. } = &mut record.start {
            // Streams never show it; do not keep it.
            *request_body = String::new();
        }
        let seq = {
            let mut r = self.ring.lock().unwrap_or_else(|e| e.into_inner());
            r.last += 1;
            let seq = r.last;
            r.bytes += record_bytes(&record);
            r.events.push_back(StatusEvent {
                seq,
                record: Arc::new(record),
            });
            while r.events.len() > MAX_EVENTS || (r.bytes > MAX_BYTES && r.events.len() > 1) {
                let old = r.events.pop_front().expect("non-empty");
                r.bytes -= record_bytes(&old.record);
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
    pub fn read(&self, cursor: u64, max: usize, keep: impl Fn(&FlowRecord) -> bool) -> Read {
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
            if keep(&e.record) {
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
        let log = EventLog::default();
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
        // Request bodies are not kept.
        assert!(matches!(
            &r.events[0].record.start,
            FlowStart::Client { request_body, .. } if request_body.is_empty()
        ));
        // A filter advances the cursor past what it skips.
        let r = log.read(4, 100, |f| f.id.bytes()[0] == 8);
        assert_eq!(r.events.len(), 1);
        assert_eq!(r.cursor, 10);
        let r = log.read(10, 100, |_| true);
        assert!(r.events.is_empty() && !r.gap && r.cursor == 10);
        // A cursor from a previous run of the node is a gap.
        assert!(log.read(50, 10, |_| true).gap);
    }

    #[test]
    fn a_reader_that_falls_behind_the_ring_is_told() {
        let log = EventLog::default();
        for i in 0..(MAX_EVENTS + 10) {
            log.publish(&rec((i % 250) as u8));
        }
        let r = log.read(3, 10, |_| true);
        assert!(r.gap);
        assert_eq!(r.cursor, (MAX_EVENTS + 10) as u64);
        // Just inside the ring: no gap.
        let r = log.read(10, 10, |_| true);
        assert!(!r.gap);
        assert_eq!(r.events[0].seq, 11);
    }
}
