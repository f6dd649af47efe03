//! The Kafka bus against a real Kafka-API broker (tansu) on loopback.

use braid_bus::topics::{
    Delivery, From, Incoming, MessageBus, Outgoing, Subscription, TopicError, TopicSpec,
    partition_of,
};
use braid_bus_kafka::{KafkaBus, KafkaConfig};
use braid_testkit::Broker;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

fn spec(name: &str, partitions: u16, compacted: bool) -> TopicSpec {
    TopicSpec {
        name: name.into(),
        partitions,
        compacted,
    }
}

fn config(b: &Broker) -> KafkaConfig {
    let mut c = KafkaConfig::parse(&b.url()).unwrap();
    c.session_timeout = Duration::from_secs(6);
    c
}

async fn bus(b: &Broker, specs: Vec<TopicSpec>) -> KafkaBus {
    KafkaBus::connect(config(b), specs).await.unwrap()
}

/// Reads until `want` records arrived (or 60 s passed), answering
/// assignment changes; returns them, and the partitions assigned at the end.
async fn read(s: &mut Box<dyn Subscription>, want: usize) -> (Vec<Incoming>, BTreeSet<u16>) {
    let mut got = Vec::new();
    let mut parts = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        let d = tokio::time::timeout_at(deadline, s.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "only {} of {want} records within 60 s (assigned: {parts:?})",
                    got.len()
                )
            })
            .unwrap();
        match d {
            Delivery::Assigned(a) => parts.extend(a.iter().map(|tp| tp.partition)),
            Delivery::Revoked(r) => {
                for tp in r {
                    parts.remove(&tp.partition);
                }
            }
            Delivery::Records(r) => got.extend(r),
        }
    }
    (got, parts)
}

fn records(prefix: &str, n: usize, keys: usize) -> Vec<Outgoing> {
    (0..n)
        .map(|i| Outgoing::new(format!("k{}", i % keys), format!("{prefix}{i}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn records_arrive_on_their_keys_partition_in_order() {
    let b = Broker::start();
    let bus = bus(&b, vec![spec("t", 4, false)]).await;
    let mut s = bus.subscribe("g", &["t"]).await.unwrap();
    bus.publish("t", records("v", 200, 7)).await.unwrap();
    let (got, parts) = read(&mut s, 200).await;
    assert_eq!(parts.len(), 4, "a lone member holds every partition");
    let mut per_key: BTreeMap<Vec<u8>, Vec<usize>> = BTreeMap::new();
    for r in &got {
        assert_eq!(
            r.partition,
            partition_of(&r.key, 4),
            "braid chooses the partition"
        );
        let i: usize = std::str::from_utf8(&r.value[1..]).unwrap().parse().unwrap();
        per_key.entry(r.key.clone()).or_default().push(i);
    }
    assert_eq!(per_key.len(), 7);
    for (k, v) in per_key {
        let mut sorted = v.clone();
        sorted.sort();
        assert_eq!(v, sorted, "key {k:?} out of order");
    }
    assert!(matches!(
        bus.publish("nope", records("v", 1, 1)).await,
        Err(TopicError::UnknownTopic(_))
    ));
}

#[tokio::test(flavor = "multi_thread")]
async fn topics_are_created_once_and_a_different_layout_is_refused() {
    let b = Broker::start();
    drop(bus(&b, vec![spec("a", 3, false), spec("c", 2, true)]).await);
    // Again: nothing to create, everything matches.
    drop(bus(&b, vec![spec("a", 3, false), spec("c", 2, true)]).await);
    let e = KafkaBus::connect(config(&b), vec![spec("a", 5, false)])
        .await
        .err()
        .expect("a partition count other than the topic's is refused");
    let msg = e.to_string();
    assert!(
        matches!(e, TopicError::Mismatch { .. }) && msg.contains("3 partitions"),
        "{msg}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_that_leaves_hands_over_after_its_last_commit() {
    let b = Broker::start();
    let bus = bus(&b, vec![spec("t", 2, false)]).await;
    let mut a = bus.subscribe("g", &["t"]).await.unwrap();
    bus.publish("t", records("v", 40, 40)).await.unwrap();
    let (got, parts) = read(&mut a, 40).await;
    assert_eq!(parts.len(), 2);
    // Commit only the first half of each partition.
    let mut committed = BTreeMap::new();
    for p in 0..2u16 {
        let offs: Vec<i64> = got
            .iter()
            .filter(|r| r.partition == p)
            .map(|r| r.offset)
            .collect();
        let mid = offs[offs.len() / 2 - 1];
        a.commit("t", p, mid).unwrap();
        committed.insert(p, mid);
    }
    drop(a);
    let mut c = bus.subscribe("g", &["t"]).await.unwrap();
    let want: usize = got
        .iter()
        .filter(|r| r.offset > committed[&r.partition])
        .count();
    let (again, _) = read(&mut c, want).await;
    for r in &again {
        assert!(
            r.offset > committed[&r.partition],
            "record {}@{} was committed and came back",
            r.offset,
            r.partition
        );
    }
    assert_eq!(again.len(), want, "every uncommitted record comes back");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_members_share_the_partitions_and_one_takes_over_the_others() {
    let b = Broker::start();
    let bus = bus(&b, vec![spec("t", 4, false)]).await;
    let mut a = bus.subscribe("g", &["t"]).await.unwrap();
    let mut first = BTreeSet::new();
    while first.len() < 4 {
        if let Delivery::Assigned(p) = a.next().await.unwrap() {
            first.extend(p.into_iter().map(|tp| tp.partition));
        }
    }
    let mut c = bus.subscribe("g", &["t"]).await.unwrap();
    // Both must settle on two partitions each; a learns of its revocation.
    let (mut pa, mut pc) = (first, BTreeSet::new());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !(pa.len() == 2 && pc.len() == 2) {
        tokio::select! {
            d = a.next() => apply(&mut pa, d.unwrap()),
            d = c.next() => apply(&mut pc, d.unwrap()),
            _ = tokio::time::sleep_until(deadline) => panic!("no 2+2 split: a {pa:?}, c {pc:?}"),
        }
    }
    assert!(
        pa.is_disjoint(&pc),
        "a partition with two owners: {pa:?} {pc:?}"
    );
    drop(c);
    while pa.len() < 4 {
        tokio::select! {
            d = a.next() => apply(&mut pa, d.unwrap()),
            _ = tokio::time::sleep_until(deadline + Duration::from_secs(30)) => panic!("a did not take over: {pa:?}"),
        }
    }
}

fn apply(parts: &mut BTreeSet<u16>, d: Delivery) {
    match d {
        Delivery::Assigned(a) => parts.extend(a.into_iter().map(|tp| tp.partition)),
        Delivery::Revoked(r) => {
            for tp in r {
                parts.remove(&tp.partition);
            }
        }
        Delivery::Records(_) => {}
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_watch_from_the_end_sees_only_what_is_published_after_it() {
    let b = Broker::start();
    let bus = bus(&b, vec![spec("t", 3, false)]).await;
    bus.publish("t", records("old", 10, 3)).await.unwrap();
    let mut w = bus.watch(&["t"], From::End).await.unwrap();
    let mut from_start = bus.watch(&["t"], From::Beginning).await.unwrap();
    // Publish new records until the watch sees one: everything it sees is
    // new, never one of the ten old ones.
    let mut seen = Vec::new();
    let mut published = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while seen.is_empty() {
        bus.publish("t", records("new", 1, 1)).await.unwrap();
        published += 1;
        match tokio::time::timeout(Duration::from_millis(300), w.next()).await {
            Ok(Ok(Delivery::Records(r))) => seen.extend(r),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("{e}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch saw nothing"
        );
    }
    assert!(seen.iter().all(|r| r.value.starts_with(b"new")), "{seen:?}");
    let (all, _) = read(&mut from_start, 10 + published).await;
    assert_eq!(
        all.iter().filter(|r| r.value.starts_with(b"old")).count(),
        10
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn publishing_and_consuming_carry_on_across_a_broker_restart() {
    let mut b = Broker::start();
    let bus = bus(&b, vec![spec("t", 2, false)]).await;
    let mut s = bus.subscribe("g", &["t"]).await.unwrap();
    bus.publish("t", records("a", 50, 10)).await.unwrap();
    let (got, _) = read(&mut s, 50).await;
    for r in &got {
        s.commit("t", r.partition, r.offset).unwrap();
    }
    b.restart();
    // The producer reconnects by itself; the consumer too, and it may see
    // some of the first records again (at-least-once), never lose one.
    bus.publish("t", records("b", 50, 10)).await.unwrap();
    let mut b_values = BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while b_values.len() < 50 {
        let d = tokio::time::timeout_at(deadline, s.next())
            .await
            .unwrap_or_else(|_| panic!("{} of 50 records after the restart", b_values.len()))
            .unwrap();
        if let Delivery::Records(r) = d {
            b_values.extend(
                r.into_iter()
                    .filter(|r| r.value.starts_with(b"b"))
                    .map(|r| r.value),
            );
        }
    }
}
