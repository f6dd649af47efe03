//! The `ping` example package: one round trip under protocol "ping" v1.
//!
//! Flows: `ping` (startable; body `{"counterparty": "<X.500>", "n": 1,
//! "delayMs": 0}`, result `{"n": 2, "responder": "<X.500>"}`) and
//! `ping_responder`.

use ping_common::{PingArgs, exchange, ping_responder};

/// Pings `counterparty` with `n` and returns its answer.
#[braid_sdk::initiating_flow(protocol = ping_common::PROTOCOL, version = 1)]
fn ping(args: PingArgs) -> braid_sdk::Result<serde_json::Value> {
    let pong = exchange(&args)?;
    Ok(serde_json::json!({ "n": pong.n, "responder": pong.responder }))
}

braid_sdk::export_flows!(ping, ping_responder);
