//! The `hostile` example package: flows that misbehave on purpose, for the
//! host's sandbox tests. Each must be stopped by the host (CPU budget,
//! memory cap, stack limit, message limits) and marked failed; none may harm
//! the host or other flows.
//!
//! Flows (all startable with body `{}` unless noted): `loop_forever`,
//! `grow_memory`, `recurse`, `panic`, `send_flood` (body `{"counterparty":
//! "<X.500>"}`, protocol "flood" v1) and its responder `flood_responder`;
//! `std_sleep` (`{"secs"}`: Rust std's sleep, a WASI clock wait), `burn`
//! (`{"iterations"}`: CPU work with a result), `deep_frames` (overflows the
//! shadow stack in linear memory), `fail_wide` (`{"counterparty",
//! "sessions", "errorBytes"}`: opens sessions, then fails with a huge
//! reason), `random_flood` (`{"bytes", "calls"}`), `random_exact`
//! (`{"bytes"}`: returns how many bytes random-bytes gave), `send_big`
//! (`{"counterparty", "bytes", "count"}`), `send_oversized`
//! (`{"counterparty", "bytes"}`: returns what `too-large` carried),
//! `many_versions` (`{"counterparty", "versions"}`), `host_call_spin`,
//! `log_flood` (`{"lines", "bytes"}`), `big_result` (`{"bytes"}`).

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

/// Body `{"secs": N}`.
#[derive(Debug, Deserialize)]
struct Secs {
    secs: u64,
}

/// Sleeps with Rust std (a WASI monotonic-clock wait), then says how long
/// its clock says it slept.
#[braid_sdk::flow]
fn std_sleep(args: Secs) -> braid_sdk::Result<u64> {
    let t = std::time::Instant::now();
    std::thread::sleep(std::time::Duration::from_secs(args.secs));
    Ok(t.elapsed().as_secs())
}

/// Body `{"iterations": N}`.
#[derive(Debug, Deserialize)]
struct Iterations {
    iterations: u64,
}

/// A fixed amount of CPU work, returning a value that depends on all of it.
#[braid_sdk::flow]
fn burn(args: Iterations) -> braid_sdk::Result<u64> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..args.iterations {
        x = black_box(x.rotate_left(5) ^ i).wrapping_mul(0x2545_f491_4f6c_dd1d);
    }
    Ok(x)
}

/// Recursion with a 64 KiB frame each: overflows Rust's 1 MiB shadow
/// stack (in linear memory) long before the wasm stack.
#[braid_sdk::flow]
fn deep_frames() -> braid_sdk::Result<u64> {
    Ok(big_frame(0))
}

#[inline(never)]
fn big_frame(depth: u64) -> u64 {
    let mut buf = [0u8; 64 << 10];
    buf[(depth as usize) % buf.len()] = depth as u8;
    let buf = black_box(buf);
    if depth == black_box(u64::MAX) {
        return buf[0] as u64;
    }
    big_frame(depth + 1).wrapping_add(buf[(depth as usize * 7) % buf.len()] as u64)
}

/// Body of `fail_wide`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct FailWide {
    counterparty: String,
    sessions: u32,
    error_bytes: usize,
}

/// Opens `sessions` sessions (one message each), then fails with a reason
/// of `errorBytes` bytes, which the host would copy to every session.
#[braid_sdk::initiating_flow(protocol = "flood", version = 1)]
fn fail_wide(args: FailWide) -> braid_sdk::Result<()> {
    let mut open = Vec::new();
    for _ in 0..args.sessions {
        let s = Session::initiate(&args.counterparty)?;
        s.send(&vec![1u8])?;
        open.push(s);
    }
    Err(FlowError::msg("x".repeat(args.error_bytes)))
}

/// Body of `random_flood`.
#[derive(Debug, Deserialize)]
struct RandomFlood {
    bytes: u32,
    calls: u32,
}

/// Asks for `bytes` random bytes `calls` times without suspending (each
/// answer is journaled until the next checkpoint).
#[braid_sdk::flow]
fn random_flood(args: RandomFlood) -> braid_sdk::Result<u64> {
    let mut sum = 0u64;
    for _ in 0..args.calls {
        let b = random_bytes(args.bytes);
        sum += b.len() as u64;
    }
    Ok(sum)
}

/// Body `{"bytes": N}`.
#[derive(Debug, Deserialize)]
struct Bytes {
    bytes: u32,
}

/// How many bytes `random-bytes(bytes)` returned.
#[braid_sdk::flow]
fn random_exact(args: Bytes) -> braid_sdk::Result<usize> {
    Ok(random_bytes(args.bytes).len())
}

/// Body of `send_big`.
#[derive(Debug, Deserialize)]
struct SendBig {
    counterparty: String,
    bytes: usize,
    count: u32,
}

/// Sends `count` messages of `bytes` bytes without suspending.
#[braid_sdk::initiating_flow(protocol = "flood", version = 1)]
fn send_big(args: SendBig) -> braid_sdk::Result<()> {
    let s = Session::initiate(&args.counterparty)?;
    let payload = vec![7u8; args.bytes];
    for _ in 0..args.count {
        s.send(&payload)?;
    }
    Ok(())
}

/// Body of `send_oversized`.
#[derive(Debug, Deserialize)]
struct SendOversized {
    counterparty: String,
    bytes: usize,
}

/// Sends one message larger than the host allows; returns the size the
/// `too-large` error carried.
#[braid_sdk::initiating_flow(protocol = "flood", version = 1)]
fn send_oversized(args: SendOversized) -> braid_sdk::Result<u64> {
    let s = Session::initiate(&args.counterparty)?;
    match s.send(&vec![1u8; args.bytes]) {
        Err(FlowError::Session(SessionError::TooLarge(n))) => Ok(n),
        Err(e) => Err(e),
        Ok(()) => Err(FlowError::msg("the oversized send was accepted")),
    }
}

/// Body of `many_versions`.
#[derive(Debug, Deserialize)]
struct ManyVersions {
    counterparty: String,
    versions: u32,
}

/// Initiates sessions offering a huge version list, again and again;
/// returns the first refusal.
#[braid_sdk::flow]
fn many_versions(args: ManyVersions) -> braid_sdk::Result<String> {
    let versions: Vec<u32> = (0..args.versions).collect();
    for _ in 0..1000 {
        if let Err(e) = Session::initiate_with(&args.counterparty, "flood", &versions) {
            return Ok(e.to_string());
        }
    }
    Err(FlowError::msg("every initiate was accepted"))
}

/// Calls the host (cheap calls that allocate nothing lasting) forever.
#[braid_sdk::flow]
fn host_call_spin() -> braid_sdk::Result<()> {
    loop {
        black_box(whoami());
    }
}

/// Body of `log_flood`.
#[derive(Debug, Deserialize)]
struct LogFlood {
    lines: u32,
    bytes: usize,
}

/// Writes `lines` log lines of `bytes` bytes each.
#[braid_sdk::flow]
fn log_flood(args: LogFlood) -> braid_sdk::Result<u32> {
    let line = format!("log-flood-marker {}", "y".repeat(args.bytes));
    for _ in 0..args.lines {
        braid_sdk::log::info(&line);
    }
    Ok(args.lines)
}

/// Returns a JSON string of `bytes` characters.
#[braid_sdk::flow]
fn big_result(args: Bytes) -> braid_sdk::Result<String> {
    Ok("r".repeat(args.bytes as usize))
}

braid_sdk::export_flows!(
    loop_forever,
    grow_memory,
    recurse,
    panic,
    send_flood,
    flood_responder,
    std_sleep,
    burn,
    deep_frames,
    fail_wide,
    random_flood,
    random_exact,
    send_big,
    send_oversized,
    many_versions,
    host_call_spin,
    log_flood,
    big_result
);
