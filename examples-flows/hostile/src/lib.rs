//! The `hostile` example package: flows that misbehave on purpose, for the
//! host's sandbox tests. Each must be stopped by the host (CPU budget,
//! memory cap, stack limit, message limits) and marked failed; none may harm
//! the host or other flows.
//!
//! Flows (all startable with body `{}` unless noted): `loop_forever`,
//! `grow_memory`, `recurse`, `panic`, `send_flood` (body `{"counterparty":
//! "<X.500>"}`, protocol "flood" v1) and its responder `flood_responder`.

use std::hint::black_box;

use braid_sdk::prelude::*;
use serde::Deserialize;

/// Spins forever.
#[braid_sdk::flow]
fn loop_forever() -> braid_sdk::Result<()> {
    let mut counter = 0u64;
    loop {
        counter = black_box(counter.wrapping_add(1));
    }
}

/// Allocates and touches 1 MiB chunks forever.
#[braid_sdk::flow]
fn grow_memory() -> braid_sdk::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut chunk = vec![0u8; CHUNK];
        // Touch every page so the memory is really committed.
        for byte in chunk.iter_mut().step_by(4096) {
            *byte = 1;
        }
        chunks.push(black_box(chunk));
    }
}

/// Recurses without bound (not a tail call, so the stack grows).
#[braid_sdk::flow]
fn recurse() -> braid_sdk::Result<u64> {
    Ok(descend(0))
}

/// Each frame needs the next one's result, so this cannot become a loop; the
/// opaque limit keeps the compiler from reasoning about the depth.
#[inline(never)]
fn descend(depth: u64) -> u64 {
    if depth == black_box(u64::MAX) {
        return depth;
    }
    descend(depth + 1).wrapping_mul(31).wrapping_add(depth)
}

/// Panics, so the host can show that a panic's message explains the failure
/// (`panic: deliberate panic at ...`).
#[braid_sdk::flow]
fn panic() -> braid_sdk::Result<()> {
    panic!("deliberate panic");
}

/// Body of `send_flood`.
#[derive(Debug, Deserialize)]
struct FloodArgs {
    counterparty: String,
}

/// Sends 1 KiB messages forever without reading anything.
#[braid_sdk::initiating_flow(protocol = "flood", version = 1)]
fn send_flood(args: FloodArgs) -> braid_sdk::Result<()> {
    let session = Session::initiate(&args.counterparty)?;
    let payload = vec![0x5au8; 1024];
    loop {
        session.send(&payload)?;
    }
}

/// Receives flood messages forever.
#[braid_sdk::responder_flow(protocol = "flood", version = 1)]
fn flood_responder(session: Session) -> braid_sdk::Result<()> {
    loop {
        let message: Vec<u8> = session.receive()?;
        black_box(message);
    }
}

braid_sdk::export_flows!(
    loop_forever,
    grow_memory,
    recurse,
    panic,
    send_flood,
    flood_responder
);
