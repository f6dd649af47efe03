//! The journal: every host-call outcome a flow observed, in order.
//!
//! Replay answers each call from the journal; a call that does not match
//! the entry at its position is a divergence and fails the flow. The
//! entries are [`braid_types::journal`]'s, so that the REST API can show a
//! journal without the runtime.

pub use braid_types::journal::{Entry, SessErr, digest};
