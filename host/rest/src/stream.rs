//! Status streams (Server-Sent Events) read from the worker's event log.
//!
//! Every `status` event carries an `id` (`<run>-<seq>`: the node's run and
//! the change's number). A client that reconnects sends the last one back
//! as `Last-Event-ID` and gets what came after it. A client that falls
//! further behind than the log reaches back, or resumes from an id of
//! another run, gets a `resync` event, never a silent gap.

use crate::flows::change_view;
use axum::http::HeaderMap;
use axum::response::Sse;
use axum::response::sse::{Event, KeepAlive, KeepAliveStream};
use braid_api::{EventLog, FlowService, StatusChange};
use braid_storage::FlowRecord;
use braid_types::{FlowId, HoldingId};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;

/// The boxed event stream the handlers return.
pub(crate) type SseStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Event, Infallible>> + Send>>;

/// Events read from the log per wake-up.
const BATCH: usize = 256;

/// Where a stream starts.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Resume {
    /// A fresh stream: after the newest event now.
    Now(u64),
    /// After the client's `Last-Event-ID`.
    After(u64),
    /// The client's `Last-Event-ID` is not one this run handed out.
    Lost,
}

fn event_id(log: &EventLog, seq: u64) -> String {
    format!("{:x}-{seq}", log.run())
}

/// Reads `Last-Event-ID`.
pub(crate) fn resume_point(headers: &HeaderMap, log: &EventLog) -> Resume {
    let Some(v) = headers.get("last-event-id") else {
        return Resume::Now(log.latest());
    };
    let parsed = v
        .to_str()
        .ok()
        .and_then(|s| s.trim().split_once('-'))
        .and_then(|(run, seq)| {
            let run = u64::from_str_radix(run, 16).ok()?;
            let seq = seq.parse::<u64>().ok()?;
            (run == log.run()).then_some(seq)
        });
    match parsed {
        Some(seq) => Resume::After(seq),
        None => Resume::Lost,
    }
}

fn status_event(log: &EventLog, seq: u64, c: &StatusChange) -> Event {
    Event::default()
        .event("status")
        .id(event_id(log, seq))
        .json_data(change_view(c))
        .unwrap_or_else(|_| Event::default().event("status").id(event_id(log, seq)))
}

fn resync_event(log: &EventLog, seq: u64, what: &str) -> Event {
    Event::default()
        .event("resync")
        .id(event_id(log, seq))
        .data(format!(
            "{{\"reason\":\"events were missed: the client fell behind or resumed from an id \
             this node no longer holds\",\"do\":\"{what}\"}}"
        ))
}

/// What a stream follows.
enum Target {
    Flow(FlowId),
    Vnode(HoldingId),
}

struct Follow {
    worker: Arc<dyn FlowService>,
    target: Target,
    cursor: u64,
    pending: VecDeque<Event>,
    done: bool,
    /// The followed flow had ended when the stream resumed: the stream
    /// ends once it has sent what came after the client's id.
    ended: bool,
    watch: tokio::sync::watch::Receiver<u64>,
}

impl Follow {
    fn keep(&self, c: &StatusChange) -> bool {
        match self.target {
            Target::Flow(id) => c.flow == id,
            Target::Vnode(h) => c.holding == h,
        }
    }

    /// The followed flow's current status, after a gap.
    async fn current_flow(&mut self, id: FlowId) {
        let log = self.worker.events();
        match self.worker.flow(&id).await {
            Ok(Some(r)) => {
                self.pending
                    .push_back(status_event(log, self.cursor, &StatusChange::of(&r)));
                if r.status.is_terminal() {
                    self.done = true;
                }
            }
            Ok(None) => self.done = true,
            Err(e) => {
                tracing::warn!(cause = %e, "status stream: could not read the flow; ending it");
                self.done = true;
            }
        }
    }

    async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Some(e);
            }
            if self.done || self.worker.events().is_closed() {
                return None;
            }
            // Seen before reading, so a publish after the read wakes us.
            self.watch.borrow_and_update();
            let log = self.worker.events();
            let read = log.read(self.cursor, BATCH, |r| self.keep(r));
            self.cursor = read.cursor;
            if read.gap {
                match self.target {
                    Target::Flow(id) => {
                        self.pending.push_back(resync_event(
                            log,
                            self.cursor,
                            "the current status follows",
                        ));
                        self.current_flow(id).await;
                    }
                    Target::Vnode(h) => self.pending.push_back(resync_event(
                        log,
                        self.cursor,
                        &format!("list the flows again: GET /api/v1/flow/{h}"),
                    )),
                }
                continue;
            }
            for e in &read.events {
                self.pending.push_back(status_event(log, e.seq, &e.change));
                if matches!(self.target, Target::Flow(_)) && e.change.status.is_terminal() {
                    self.done = true;
                    break;
                }
            }
            if self.ended && read.events.len() < BATCH {
                // Read to the newest change of a flow that had ended: its
                // end came at or before the client's id (sent already), or
                // is queued now.
                self.done = true;
            }
            if self.pending.is_empty() && !self.done && self.watch.changed().await.is_err() {
                return None;
            }
        }
    }
}

impl Follow {
    fn new(worker: &Arc<dyn FlowService>, target: Target) -> Follow {
        Follow {
            target,
            cursor: 0,
            pending: VecDeque::new(),
            done: false,
            ended: false,
            watch: worker.events().watch(),
            worker: worker.clone(),
        }
    }
}

fn into_sse(f: Follow) -> Sse<KeepAliveStream<SseStream>> {
    let s = futures_util::stream::unfold(f, |mut f| async move {
        let e = f.next().await?;
        Some((Ok(e), f))
    });
    let s: SseStream = Box::pin(s);
    Sse::new(s).keep_alive(KeepAlive::default())
}

/// A stream of one flow's changes, starting with its current status
/// (unless resuming), ending when it ends.
pub(crate) fn follow_flow(
    worker: Arc<dyn FlowService>,
    current: FlowRecord,
    resume: Resume,
) -> Sse<KeepAliveStream<SseStream>> {
    let events = worker.events();
    let mut f = Follow::new(&worker, Target::Flow(current.id));
    let shown = StatusChange::of(&current);
    match resume {
        Resume::Now(seq) => {
            f.cursor = seq;
            f.pending.push_back(status_event(events, seq, &shown));
            f.done = current.status.is_terminal();
        }
        Resume::After(seq) => {
            // What came after the id; for a flow that ended, that is its
            // end if the client had not seen it, else nothing (the log
            // holds a change before the flow counts as ended, and a gap
            // gives the current status).
            f.cursor = seq;
            f.ended = current.status.is_terminal();
        }
        Resume::Lost => {
            let now = events.latest();
            f.cursor = now;
            f.pending
                .push_back(resync_event(events, now, "the current status follows"));
            f.pending.push_back(status_event(events, now, &shown));
            f.done = current.status.is_terminal();
        }
    }
    into_sse(f)
}

/// A stream of a vnode's flows' changes; it never ends.
pub(crate) fn follow_vnode(
    worker: Arc<dyn FlowService>,
    holding: HoldingId,
    resume: Resume,
) -> Sse<KeepAliveStream<SseStream>> {
    let events = worker.events();
    let mut f = Follow::new(&worker, Target::Vnode(holding));
    match resume {
        Resume::Now(seq) | Resume::After(seq) => f.cursor = seq,
        Resume::Lost => {
            let now = events.latest();
            f.cursor = now;
            f.pending.push_back(resync_event(
                events,
                now,
                &format!("list the flows again: GET /api/v1/flow/{holding}"),
            ));
        }
    }
    into_sse(f)
}
