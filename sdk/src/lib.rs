//! Write braid flows in Rust.
//!
//! A braid *flow package* is a WebAssembly component (target
//! `wasm32-wasip2`) that a braid host runs for a virtual node. This crate is
//! everything an application needs to write one: attributes that turn plain
//! Rust functions into flows, typed [`Session`]s to talk to the flows of
//! other identities, and the host's journaled services ([`sleep`], [`now`],
//! [`random_bytes`], [`whoami`], [`log`]). The WIT contract
//! (`braid:flow/flow-package`) is bound once, inside this crate; applications
//! never see it.
//!
//! # Example: ping
//!
//! The app crate is a `cdylib` built with
//! `cargo build --target wasm32-wasip2 --release`.
//!
//! ```no_run
//! use braid_sdk::prelude::*;
//! use serde::{Deserialize, Serialize};
//!
//! /// Request body: `{"counterparty": "O=Bob, L=Paris, C=FR", "n": 1, "delayMs": 0}`.
//! #[derive(Deserialize)]
//! #[serde(rename_all = "camelCase")]
//! struct PingArgs {
//!     counterparty: String,
//!     n: u64,
//!     #[serde(default)]
//!     delay_ms: u64,
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Ping {
//!     n: u64,
//!     delay_ms: u64,
//! }
//!
//! #[derive(Serialize, Deserialize)]
//! struct Pong {
//!     n: u64,
//!     responder: String,
//! }
//!
//! /// Startable over REST; its sessions use protocol "ping" version 1.
//! #[braid_sdk::initiating_flow(protocol = "ping", version = 1)]
//! fn ping(args: PingArgs) -> braid_sdk::Result<serde_json::Value> {
//!     let session = Session::initiate(&args.counterparty)?;
//!     session.send(&Ping { n: args.n, delay_ms: args.delay_ms })?;
//!     let pong: Pong = session.receive()?;
//!     session.close()?;
//!     Ok(serde_json::json!({ "n": pong.n, "responder": pong.responder }))
//! }
//!
//! /// Started on the counterparty by the first message of a "ping" session.
//! #[braid_sdk::responder_flow(protocol = "ping", version = 1)]
//! fn ping_responder(session: Session) -> braid_sdk::Result<()> {
//!     let ping: Ping = session.receive()?;
//!     if ping.delay_ms > 0 {
//!         sleep(std::time::Duration::from_millis(ping.delay_ms));
//!     }
//!     session.send(&Pong { n: ping.n + 1, responder: whoami() })?;
//!     match session.receive::<Ping>() {
//!         Err(e) if e.is_closed() => Ok(()),
//!         Err(e) => Err(e),
//!         Ok(_) => Err(FlowError::msg("duplicate or unexpected message after pong")),
//!     }
//! }
//!
//! braid_sdk::export_flows!(ping, ping_responder);
//! # fn main() {}
//! ```
//!
//! # Flows
//!
//! - [`#[flow]`](flow): a plain flow, startable by a client over REST.
//! - [`#[initiating_flow(protocol = "p", version = 1)]`](initiating_flow): a
//!   startable flow whose sessions use protocol `p`; `versions = [1, 2]`
//!   offers several versions.
//! - [`#[responder_flow(protocol = "p", version = 1)]`](responder_flow):
//!   started on the counterparty by a session-init for `p`; it takes the
//!   [`Session`] to answer on and is not startable by clients.
//!
//! **Protocols.** `protocol` is a string literal or the path of a `&str`
//! constant, so that both sides can name one constant from a crate they
//! share (`pub const PROTOCOL: &str = "ping";`, then `protocol =
//! ping_common::PROTOCOL`) and cannot drift apart.
//!
//! **Logging.** [`info!`], [`warn!`], [`error!`], [`debug!`] and
//! [`trace!`] format as `format!` does; the lines are attributed to the
//! flow and suppressed while it replays.
//!
//! **Names.** A flow's name (what clients pass as `flowName`, and what the
//! host lists) is the function's name, e.g. `ping_responder`, unless the
//! attribute says `name = "..."`. Names must be unique within a package.
//!
//! **Signatures.** A startable flow takes no argument or one argument of
//! any `serde::Deserialize` type, parsed from the client's JSON request body
//! (a mismatch fails the flow with `invalid request body: ...`). A responder
//! takes one [`Session`]. Every flow returns `Result<T, E>` where `T` is
//! `serde::Serialize` (the JSON result) and `E` converts into [`FlowError`];
//! `Err(e)` fails the flow with `e.to_string()` as its reason. A panic also
//! fails the flow; its message reaches the host log as `panic: ...`.
//!
//! **Exporting.** [`export_flows!`] lists the package's flows, once per app
//! crate: `braid_sdk::export_flows!(ping, ping_responder, some_mod::other);`.
//! A flow in another module must be visible from there (as its function is).
//!
//! **Sub-flows.** A flow function is still an ordinary function; calling it
//! runs it as a sub-flow, in the same flow and journal. [`Session::initiate`]
//! uses the protocol of the innermost *running* `#[initiating_flow]`: one
//! called as a sub-flow uses its own protocol while it runs, and a plain
//! helper function uses its caller's. [`Session::initiate_with`] names a
//! protocol explicitly.
//!
//! # Determinism
//!
//! A flow may be stopped at any suspension and later rebuilt by running it
//! again while the host answers each host call from the flow's journal. So a
//! flow must observe the world only through this crate: messages, [`now`],
//! [`random_bytes`], [`whoami`]. Code that behaves differently on replay
//! fails with a non-determinism error.

#![warn(missing_docs)]

extern crate self as braid_sdk;

mod error;
mod services;
mod session;

#[doc(hidden)]
#[path = "runtime.rs"]
pub mod __rt;

pub use braid_sdk_macros::{export_flows, flow, initiating_flow, responder_flow};
pub use error::{FlowError, Result, SessionError};
pub use services::{log, now, now_millis, random_bytes, sleep, whoami};
pub use session::{Session, receive_all, receive_any};

/// Re-exported so apps can name the same serde the SDK uses.
pub use serde;
/// Re-exported so apps can build JSON results with the SDK's `serde_json`.
pub use serde_json;

/// The usual imports of a flow package.
pub mod prelude {
    pub use crate::{
        FlowError, Result, Session, SessionError, debug, error, info, log, now, now_millis,
        random_bytes, receive_all, receive_any, sleep, trace, warn, whoami,
    };
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen;

/// The WIT bindings of `braid:flow/flow-package`, generated once.
#[doc(hidden)]
#[allow(missing_docs, clippy::all)]
pub mod __bindings {
    wit_bindgen::generate!({
        path: "../wit",
        world: "flow-package",
        pub_export_macro: true,
        export_macro_name: "__export_flow_package",
        default_bindings_module: "::braid_sdk::__bindings",
        runtime_path: "::braid_sdk::__wit_bindgen::rt",
    });
}
