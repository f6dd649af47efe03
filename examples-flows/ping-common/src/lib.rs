//! What the `ping` and `ping-v2` example packages share: the request body,
//! the messages of protocol "ping" v1, the exchange itself and the responder
//! flow. Both packages export the responder from here, so it has the same
//! name (`ping_responder`) and behaviour in both.

use std::time::Duration;

use braid_sdk::prelude::*;
use serde::{Deserialize, Serialize};

/// The protocol's name, for both sides (`#[initiating_flow(protocol =
/// ping_common::PROTOCOL, ...)]`, `#[responder_flow(...)]`).
pub const PROTOCOL: &str = "ping";

/// Request body of the `ping` flow:
/// `{"counterparty": "<X.500>", "n": 1, "delayMs": 0}`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PingArgs {
    /// Who to ping.
    pub counterparty: String,
    /// The number sent; the responder answers `n + 1`.
    pub n: u64,
    /// How long the responder sleeps (durably) before answering.
    #[serde(default)]
    pub delay_ms: u64,
}

/// First message: initiator to responder.
#[derive(Debug, Serialize, Deserialize)]
pub struct Ping {
    /// The number to increment.
    pub n: u64,
    /// How long to sleep before answering.
    pub delay_ms: u64,
}

/// The answer: responder to initiator.
#[derive(Debug, Serialize, Deserialize)]
pub struct Pong {
    /// `n + 1`.
    pub n: u64,
    /// The responder's X.500 name.
    pub responder: String,
}

/// The initiator's side of a ping: sends a [`Ping`], waits for the [`Pong`]
/// and closes the session. A plain helper, so its session uses the protocol
/// of the calling `#[initiating_flow]`.
pub fn exchange(args: &PingArgs) -> braid_sdk::Result<Pong> {
    let session = Session::initiate(&args.counterparty)?;
    let pong: Pong = session.send_and_receive(&Ping {
        n: args.n,
        delay_ms: args.delay_ms,
    })?;
    session.close()?;
    Ok(pong)
}

/// Answers a ping with `n + 1` after the requested delay, then insists that
/// the initiator's close is the only thing that follows: a second message
/// would mean a message was delivered twice.
#[braid_sdk::responder_flow(protocol = PROTOCOL, version = 1)]
pub fn ping_responder(session: Session) -> braid_sdk::Result<()> {
    let ping: Ping = session.receive()?;
    if ping.delay_ms > 0 {
        sleep(Duration::from_millis(ping.delay_ms));
    }
    session.send(&Pong {
        n: ping.n + 1,
        responder: whoami(),
    })?;
    match session.receive::<Ping>() {
        Err(e) if e.is_closed() => Ok(()),
        Err(e) => Err(e),
        Ok(_) => Err(FlowError::msg("duplicate or unexpected message after pong")),
    }
}
