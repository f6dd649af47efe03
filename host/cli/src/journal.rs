//! `braid flow journal`: a flow's journal as a person reads it.

use braid_rest::openapi::{FlowJournal, JournalEntry, JournalView};
use std::fmt::Write as _;

/// How much of a payload is shown inline.
const SHOWN_BYTES: usize = 64;

/// The journal of a flow and of its counterparties on this node, as text.
pub fn render(j: &FlowJournal) -> String {
    let mut out = String::new();
    view(&mut out, &j.flow, "");
    for c in &j.counterparties {
        out.push('\n');
        let _ = writeln!(out, "counterparty on this node:");
        view(&mut out, c, "  ");
    }
    out
}

fn view(out: &mut String, v: &JournalView, indent: &str) {
    let s = &v.status;
    let status = serde_json::to_value(s.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "{indent}{} on {} (flow {}), {status}",
        s.flow_name, s.holding_id, s.flow_id
    );
    let st = &v.started;
    match (&st.initiator, &st.request_body) {
        (Some(from), _) => {
            let _ = writeln!(
                out,
                "{indent}started by a session-init from {from} (protocol {} v{})",
                st.protocol.as_deref().unwrap_or("?"),
                st.version.unwrap_or(0)
            );
        }
        (None, body) => {
            let body = body.as_ref().map(|b| b.to_string()).unwrap_or_default();
            let _ = writeln!(out, "{indent}started by a client with {body}");
        }
    }
    for e in &v.entries {
        let _ = writeln!(out, "{indent}{:>4}  {}", e.step, entry(e));
    }
    match (&s.result, &s.error) {
        (Some(r), _) => {
            let _ = writeln!(out, "{indent}result: {r}");
        }
        (None, Some(e)) => {
            let step = v
                .failed_at_step
                .map_or_else(String::new, |n| format!(" at step {n}"));
            let kind = serde_json::to_value(e.kind)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default();
            let _ = writeln!(out, "{indent}failed{step} ({kind}): {}", e.message);
        }
        (None, None) => {}
    }
}

fn entry(e: &JournalEntry) -> String {
    let mut s = format!("{:<12}", e.call);
    let session = e.session.map(|h| format!("session {h}"));
    match e.call.as_str() {
        "initiate" => {
            let _ = write!(
                s,
                "{} under {} (versions {:?})",
                e.counterparty.as_deref().unwrap_or("?"),
                e.protocol.as_deref().unwrap_or("?"),
                e.versions.clone().unwrap_or_default()
            );
            if let Some(sess) = &session {
                let _ = write!(s, " -> {sess}");
            }
        }
        "send" | "receive" | "receive-any" => {
            if let Some(all) = &e.sessions {
                let _ = write!(s, "of sessions {all:?}: ");
            }
            s.push_str(session.as_deref().unwrap_or("session ?"));
            if let Some(n) = e.bytes {
                let _ = write!(s, ", {n} bytes");
            }
            match (&e.payload_text, &e.payload_hex) {
                (Some(t), _) => {
                    let shown: String = t.chars().take(SHOWN_BYTES).collect();
                    let more = if shown.len() < t.len() { "…" } else { "" };
                    let _ = write!(s, ": {shown:?}{more}");
                }
                (None, Some(h)) => {
                    let shown = &h[..h.len().min(2 * SHOWN_BYTES)];
                    let more = if shown.len() < h.len() { "…" } else { "" };
                    let _ = write!(s, ": {shown}{more}");
                }
                (None, None) => {}
            }
            if let Some(at) = &e.at {
                let _ = write!(s, " at {at}");
            }
        }
        "close" => s.push_str(session.as_deref().unwrap_or("session ?")),
        "sleep" => {
            let _ = write!(s, "until {}", e.at.as_deref().unwrap_or("?"));
        }
        "now-millis" => s.push_str(e.at.as_deref().unwrap_or("?")),
        "random-bytes" => s.push_str(e.random_hex.as_deref().unwrap_or("")),
        _ => {}
    }
    if let Some(err) = &e.error {
        let _ = write!(s, " -> error: {err}");
    }
    s
}
