//! The `ping-v2` example package: an upgrade of `ping` with the same flows
//! and protocol ("ping" v1), whose initiator also reads the clock first.
//!
//! Because `ping` here calls `now` before initiating, replaying a journal
//! written by `ping` v1 with this code diverges at the first host call: the
//! host must fail such a flow with a non-determinism error.
//!
//! Result of `ping`: `{"n": 2, "responder": "<X.500>", "version": 2,
//! "startedAtMs": <millis>}`.

use braid_sdk::prelude::*;
use ping_common::{PingArgs, exchange, ping_responder};

/// Pings `counterparty` with `n` and returns its answer and the start time.
#[braid_sdk::initiating_flow(protocol = ping_common::PROTOCOL, version = 1)]
fn ping(args: PingArgs) -> braid_sdk::Result<serde_json::Value> {
    let started_at_ms = now_millis();
    let pong = exchange(&args)?;
    Ok(serde_json::json!({
        "n": pong.n,
        "responder": pong.responder,
        "version": 2,
        "startedAtMs": started_at_ms,
    }))
}

braid_sdk::export_flows!(ping, ping_responder);
