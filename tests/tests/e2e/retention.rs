//! A node that runs for months: finished flows are deleted after the
//! retention (record, journal, inbox, indexes) while unfinished ones stay
//! however old; within the retention a finished flow's status is answered
//! from the store, also after a restart; and resident memory does not
//! grow with the number of flows that finished.

use std::path::Path;
use std::time::{Duration, Instant};

use braid_e2e::{Api, Node, Pkg, wait_until};
use braid_storage::{Store as _, StoreStats};

use crate::{ALICE, BOB, assert_ping_ok, assert_pings_ok, ping_body, start_pings};

/// Row counts of the store in `data_dir`, read with the store itself (the
/// node must be stopped).
fn store_stats(data_dir: &Path) -> StoreStats {
    let path = data_dir.join("braid.redb");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let store = braid_storage::embedded::EmbeddedStore::open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        let stats = store.stats().await.expect("store stats");
        store.close().await;
        stats
    })
}

/// Whether `GET` of the flow says `404`.
fn gone(api: &Api, holding: &str, id: &str) -> Result<(), String> {
    match api.try_status(holding, id) {
        Ok(None) => Ok(()),
        Ok(Some(st)) => Err(format!("still there: {}", st.describe())),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn finished_flows_are_deleted_after_the_retention_and_unfinished_ones_kept() {
    const RETENTION_SECS: u64 = 2;
    const N: usize = 20;
    let mut node = Node::options()
        .arg("--flow-retention-secs")
        .arg(RETENTION_SECS.to_string())
        .start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    // Unfinished for far longer than the retention: its responder sleeps.
    let t0 = Instant::now();
    api.start_flow(&alice, "old", "ping", &ping_body(BOB, 7, 15_000));
    let ids = start_pings(&api, &alice, BOB, "done", N, 0);
    let flows = api.wait_all_terminal(&alice, &ids, Duration::from_secs(60));
    assert_pings_ok(&flows, &ids, BOB);

    // Past the retention they go: 404, not listed, on both vnodes.
    for id in &ids {
        wait_until(
            &format!("{id} to be deleted"),
            Duration::from_secs(30),
            || gone(&api, &alice, id),
        );
    }
    let listed: Vec<_> = api.list_flows(&alice);
    assert!(
        listed
            .iter()
            .all(|f| f.client_request_id.as_deref() == Some("old")),
        "finished flows still listed: {:?}",
        listed.iter().map(|f| f.describe()).collect::<Vec<_>>()
    );
    wait_until(
        "Bob's finished responders to be deleted",
        Duration::from_secs(30),
        || {
            let left = api.list_flows(&bob);
            match left.as_slice() {
                [one] if !one.is_terminal() => Ok(()),
                other => Err(format!("{} responders left", other.len())),
            }
        },
    );
    // Once the unfinished flow is older than the retention, a flow that
    // ends is still deleted (sweeps go on) while the old one is untouched.
    let old_enough = Duration::from_secs(RETENTION_SECS + 1);
    wait_until("the unfinished flow to be old", old_enough * 2, || {
        (t0.elapsed() > old_enough)
            .then_some(())
            .ok_or_else(|| format!("{:?} old", t0.elapsed()))
    });
    api.start_flow(&alice, "later", "ping", &ping_body(BOB, 3, 0));
    assert_ping_ok(&api.wait_terminal(&alice, "later"), 3, BOB);
    wait_until(
        "the later flow to be deleted",
        Duration::from_secs(30),
        || gone(&api, &alice, "later"),
    );
    let old = api.status(&alice, "old");
    assert_eq!(old.status, "RUNNING", "{}", old.describe());
    let listed = api.list_flows(&alice);
    assert_eq!(
        listed.iter().map(|f| f.describe()).collect::<Vec<_>>(),
        vec![old.describe()],
        "the unfinished flow, and only it, is listed"
    );
    let st = api.wait_terminal(&alice, "old");
    assert_ping_ok(&st, 7, BOB);
    wait_until(
        "the last flow to be deleted",
        Duration::from_secs(30),
        || gone(&api, &alice, "old"),
    );
    wait_until(
        "Bob's last responder to be deleted",
        Duration::from_secs(30),
        || match api.list_flows(&bob).len() {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        },
    );

    // The store holds nothing of them: records, journals, inboxes, kills
    // and index entries are gone.
    node.kill();
    let stats = store_stats(node.data_dir());
    assert_eq!(
        stats,
        StoreStats::default(),
        "rows of deleted flows are left in the store"
    );
}

/// Runs `n` pings `prefix-*` on 8 threads and waits for their ends.
fn run_pings(api: &Api, alice: &str, prefix: &str, n: usize) -> Vec<String> {
    std::thread::scope(|s| {
        for t in 0..8 {
            s.spawn(move || {
                for i in (t..n).step_by(8) {
                    api.start_flow(
                        alice,
                        &format!("{prefix}-{i}"),
                        "ping",
                        &ping_body(BOB, i as i64, 0),
                    );
                }
            });
        }
    });
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    wait_until(
        &format!("{n} pings {prefix}-* to finish"),
        Duration::from_secs(240),
        || {
            let m = api.get("/metrics").map_err(|e| e.to_string())?;
            let unfinished = m
                .text
                .lines()
                .find_map(|l| l.strip_prefix("braid_flows_unfinished "))
                .map(str::to_owned);
            match unfinished.as_deref() {
                Some("0") => Ok(()),
                other => Err(format!("unfinished: {other:?}")),
            }
        },
    );
    ids
}

/// Resident memory after N and after 5N finished pings differs by no more
/// than the node's fixed-size caches can hold, and once they are full (by
/// 3N) it stays put; after a restart, nothing of the finished flows is
/// loaded, yet their statuses are answered.
#[test]
fn resident_memory_does_not_grow_with_finished_flows() {
    const N: usize = 2000;
    // The most the node may grow between N and 5N pings: what its
    // fixed-size caches can still take in (they fill up over the first few
    // thousand pings, then stop growing): the store's page cache (8 MiB),
    // the status-event log (16,384 changes of about 300 bytes: 5 MiB), the
    // ids of recently finished flows (65,536, about 3 MiB), plus 4 MiB of
    // allocator slack.
    const BOUND_KIB: u64 = 20 << 10;
    // Once they are full, between 3N and 5N: allocator slack only. Memory
    // held per finished flow (3.4 KiB per ping before) would add 13 MiB.
    const FULL_BOUND_KIB: u64 = 4 << 10;
    let mut node = Node::start();
    let alice = node.vnode(ALICE, Pkg::Ping);
    let _bob = node.vnode(BOB, Pkg::Ping);
    let api = node.api().clone();

    // Warm up: instances, pools and buffers reach their working size.
    run_pings(&api, &alice, "warm", 500);
    let first = run_pings(&api, &alice, "a", N);
    let after_n = node.rss_kib();
    run_pings(&api, &alice, "b", 2 * N);
    let after_3n = node.rss_kib();
    run_pings(&api, &alice, "c", 2 * N);
    let after_5n = node.rss_kib();
    eprintln!(
        "[retention] RSS after {N} pings: {after_n} KiB; after {}: {after_3n} KiB; after {}: \
         {after_5n} KiB",
        3 * N,
        5 * N
    );
    assert!(
        after_5n <= after_n + BOUND_KIB,
        "resident memory grew by {} KiB over {} finished pings (bound {BOUND_KIB} KiB): \
         {after_n} KiB after {N}, {after_5n} KiB after {}",
        after_5n.saturating_sub(after_n),
        4 * N,
        5 * N
    );
    assert!(
        after_5n <= after_3n + FULL_BOUND_KIB,
        "resident memory grew by {} KiB between {} and {} finished pings (bound \
         {FULL_BOUND_KIB} KiB): it grows with finished flows",
        after_5n.saturating_sub(after_3n),
        3 * N,
        5 * N
    );

    // A restart loads none of them, and they are still answered.
    node.restart();
    let api = node.api().clone();
    run_pings(&api, &alice, "d", 200);
    let restarted = node.rss_kib();
    eprintln!("[retention] RSS after a restart and 200 pings: {restarted} KiB");
    assert!(
        restarted <= after_n + BOUND_KIB,
        "after a restart the node holds {restarted} KiB, more than after {N} pings \
         ({after_n} KiB) plus {BOUND_KIB} KiB: it loads finished flows"
    );
    for (i, id) in first.iter().enumerate().step_by(97) {
        assert_ping_ok(&api.status(&alice, id), i as i64, BOB);
    }
    let listed = api.list_flows(&alice);
    assert_eq!(
        listed.len(),
        500 + 5 * N + 200,
        "flows listed after the restart"
    );
    assert!(listed.iter().all(|f| f.status == "COMPLETED"));
}
