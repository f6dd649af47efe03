//! The in-process [`MessageBus`]: partitioned topics in memory, consumer
//! groups whose members share partitions and rebalance when one joins or
//! leaves, committed offsets, compaction. It serves the embedded node (one
//! member per group, every partition assigned to it) and tests of workers
//! that take over each other's partitions, without a broker. Nothing
//! survives the process: durable state is in the store.
//!
//! Records are kept until every group reading the topic has committed
//! them and every watch has read them; a compacted topic also keeps the
//! latest record of each key for watches that start at the beginning.

use crate::topics::{
    Delivery, From, Incoming, MessageBus, Outgoing, Subscription, TopicError, TopicPartition,
    TopicSpec, partition_of,
};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Records returned by one [`Subscription::next`] at most.
const BATCH: usize = 1024;

/// The in-process bus.
#[derive(Clone)]
pub struct MemoryBus {
    shared: Arc<Shared>,
}

struct Shared {
    inner: Mutex<Inner>,
    changed: Notify,
}

#[derive(Default)]
struct Inner {
    specs: Vec<TopicSpec>,
    topics: HashMap<String, Vec<Log>>,
    groups: HashMap<String, Group>,
    /// Subscriptions that are watches (their positions are in `positions`).
    watches: HashSet<u64>,
    /// Assignment changes not yet seen by their member.
    pending: HashMap<u64, VecDeque<Delivery>>,
    /// Where each member (or watch) reads next.
    positions: HashMap<u64, HashMap<TopicPartition, i64>>,
    next_id: u64,
    closed: bool,
}

#[derive(Default)]
struct Log {
    /// Offset of `records[0]`.
    base: i64,
    records: VecDeque<Option<(Vec<u8>, Vec<u8>)>>,
    /// Compacted topics: the offset of each key's latest record.
    latest: HashMap<Vec<u8>, i64>,
}

impl Log {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }
}

#[derive(Default)]
struct Group {
    topics: Vec<String>,
    members: BTreeMap<u64, ()>,
    assignment: HashMap<u64, Vec<TopicPartition>>,
    committed: HashMap<TopicPartition, i64>,
}

impl MemoryBus {
    /// A bus with these topics.
    pub fn new(specs: Vec<TopicSpec>) -> MemoryBus {
        let topics = specs
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    (0..s.partitions.max(1)).map(|_| Log::default()).collect(),
                )
            })
            .collect();
        MemoryBus {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    specs,
                    topics,
                    ..Inner::default()
                }),
                changed: Notify::new(),
            }),
        }
    }

    /// Ends every subscription (their `next` fails with `Closed`).
    pub fn close(&self) {
        self.shared.lock().closed = true;
        self.shared.changed.notify_waiters();
    }

    /// Records held in memory (all topics), for tests of trimming.
    pub fn held(&self) -> usize {
        let inner = self.shared.lock();
        inner
            .topics
            .values()
            .flatten()
            .map(|l| l.records.iter().filter(|r| r.is_some()).count())
            .sum()
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Inner {
    /// The id of a new member or watch of `topics`, which must all exist,
    /// on a bus that is not closed.
    fn new_reader(&mut self, topics: &[&str]) -> Result<u64, TopicError> {
        if self.closed {
            return Err(TopicError::Closed);
        }
        for t in topics {
            self.spec(t)?;
        }
        self.next_id += 1;
        Ok(self.next_id)
    }

    fn spec(&self, topic: &str) -> Result<&TopicSpec, TopicError> {
        self.specs
            .iter()
            .find(|s| s.name == topic)
            .ok_or_else(|| TopicError::UnknownTopic(topic.to_string()))
    }

    fn all_partitions(&self, topics: &[String]) -> Vec<TopicPartition> {
        let mut out = Vec::new();
        for t in topics {
            if let Ok(s) = self.spec(t) {
                for p in 0..s.partitions.max(1) {
                    out.push(TopicPartition {
                        topic: Arc::from(t.as_str()),
                        partition: p,
                    });
                }
            }
        }
        out
    }

    /// Deals the group's partitions round-robin over its members (in join
    /// order) and queues each member's revocations and assignments.
    fn rebalance(&mut self, group: &str) {
        let Some(g) = self.groups.get(group) else {
            return;
        };
        let parts = self.all_partitions(&g.topics);
        let members: Vec<u64> = g.members.keys().copied().collect();
        let mut next: HashMap<u64, Vec<TopicPartition>> =
            members.iter().map(|m| (*m, Vec::new())).collect();
        if !members.is_empty() {
            for (i, tp) in parts.into_iter().enumerate() {
                next.get_mut(&members[i % members.len()])
                    .expect("member listed")
                    .push(tp);
            }
        }
        let g = self.groups.get_mut(group).expect("group exists");
        let old = std::mem::take(&mut g.assignment);
        let committed = g.committed.clone();
        for m in &members {
            let before = old.get(m).cloned().unwrap_or_default();
            let after = next.get(m).cloned().unwrap_or_default();
            let revoked: Vec<_> = before
                .iter()
                .filter(|tp| !after.contains(tp))
                .cloned()
                .collect();
            let assigned: Vec<_> = after
                .iter()
                .filter(|tp| !before.contains(tp))
                .cloned()
                .collect();
            let q = self.pending.entry(*m).or_default();
            let pos = self.positions.entry(*m).or_default();
            if !revoked.is_empty() {
                for tp in &revoked {
                    pos.remove(tp);
                }
                q.push_back(Delivery::Revoked(revoked));
            }
            if !assigned.is_empty() {
                for tp in &assigned {
                    let log = &self.topics[&*tp.topic][tp.partition as usize];
                    let start = committed
                        .get(tp)
                        .map_or(log.base, |c| (c + 1).max(log.base));
                    pos.insert(tp.clone(), start);
                }
                q.push_back(Delivery::Assigned(assigned));
            }
        }
        self.groups.get_mut(group).expect("group exists").assignment = next;
    }

    /// Drops records every reader is past.
    fn trim(&mut self) {
        let mut floor: HashMap<TopicPartition, i64> = HashMap::new();
        let mut lower = |tp: &TopicPartition, at: i64| {
            floor
                .entry(tp.clone())
                .and_modify(|f| *f = (*f).min(at))
                .or_insert(at);
        };
        let mut read: HashMap<&str, bool> = HashMap::new();
        for g in self.groups.values() {
            for t in &g.topics {
                read.insert(t, true);
            }
            for tp in self.all_partitions(&g.topics) {
                lower(&tp, g.committed.get(&tp).map_or(0, |c| c + 1));
            }
        }
        for w in &self.watches {
            if let Some(pos) = self.positions.get(w) {
                for (tp, at) in pos {
                    read.insert(&tp.topic, true);
                    lower(tp, *at);
                }
            }
        }
        for (name, logs) in self.topics.iter_mut() {
            if !read.contains_key(name.as_str()) {
                continue;
            }
            let compacted = self.specs.iter().any(|s| &s.name == name && s.compacted);
            for (p, log) in logs.iter_mut().enumerate() {
                let tp = TopicPartition {
                    topic: Arc::from(name.as_str()),
                    partition: p as u16,
                };
                let upto = floor.get(&tp).copied().unwrap_or(log.base);
                while log.base < upto {
                    let Some(front) = log.records.front() else {
                        break;
                    };
                    let keep = compacted
                        && front
                            .as_ref()
                            .is_some_and(|(k, _)| log.latest.get(k) == Some(&log.base));
                    if keep {
                        break;
                    }
                    log.records.pop_front();
                    log.base += 1;
                }
            }
        }
    }

    fn take(&mut self, id: u64) -> Result<Option<Delivery>, TopicError> {
        if self.closed {
            return Err(TopicError::Closed);
        }
        if let Some(d) = self.pending.get_mut(&id).and_then(|q| q.pop_front()) {
            return Ok(Some(d));
        }
        let Some(pos) = self.positions.get_mut(&id) else {
            return Ok(None);
        };
        let mut out = Vec::new();
        let mut tps: Vec<_> = pos.keys().cloned().collect();
        tps.sort();
        for tp in tps {
            let log = &self.topics[&*tp.topic][tp.partition as usize];
            let at = pos.get_mut(&tp).expect("position listed");
            *at = (*at).max(log.base);
            while *at < log.end() && out.len() < BATCH {
                if let Some((k, v)) = &log.records[(*at - log.base) as usize] {
                    out.push(Incoming {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        offset: *at,
                        key: k.clone(),
                        value: v.clone(),
                    });
                }
                *at += 1;
            }
        }
        if out.is_empty() {
            return Ok(None);
        }
        if self.watches.contains(&id) {
            self.trim();
        }
        Ok(Some(Delivery::Records(out)))
    }
}

#[async_trait::async_trait]
impl MessageBus for MemoryBus {
    fn topics(&self) -> Vec<TopicSpec> {
        self.shared.lock().specs.clone()
    }

    async fn publish(&self, topic: &str, records: Vec<Outgoing>) -> Result<(), TopicError> {
        if records.is_empty() {
            return Ok(());
        }
        {
            let mut inner = self.shared.lock();
            if inner.closed {
                return Err(TopicError::Closed);
            }
            let spec = inner.spec(topic)?.clone();
            for r in &records {
                if let Some(p) = r.partition
                    && p >= spec.partitions.max(1)
                {
                    return Err(TopicError::NoSuchPartition {
                        topic: topic.to_string(),
                        partitions: spec.partitions,
                        partition: p,
                    });
                }
            }
            let logs = inner.topics.get_mut(topic).expect("spec has a log");
            for r in records {
                let p = r
                    .partition
                    .unwrap_or_else(|| partition_of(&r.key, spec.partitions));
                let log = &mut logs[p as usize];
                let offset = log.end();
                // Superseded: readers past `old` lose nothing; a watch from
                // the beginning sees only the latest.
                if spec.compacted
                    && let Some(old) = log.latest.insert(r.key.clone(), offset)
                    && old >= log.base
                {
                    log.records[(old - log.base) as usize] = None;
                }
                log.records.push_back(Some((r.key, r.value)));
            }
        }
        self.shared.changed.notify_waiters();
        Ok(())
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<Box<dyn Subscription>, TopicError> {
        let id = {
            let mut inner = self.shared.lock();
            let id = inner.new_reader(topics)?;
            let g = inner.groups.entry(group.to_string()).or_default();
            for t in topics {
                if !g.topics.iter().any(|x| x == t) {
                    g.topics.push(t.to_string());
                }
            }
            g.members.insert(id, ());
            inner.positions.insert(id, HashMap::new());
            inner.rebalance(group);
            id
        };
        self.shared.changed.notify_waiters();
        Ok(Box::new(MemorySubscription {
            shared: self.shared.clone(),
            id,
            group: Some(group.to_string()),
        }))
    }

    async fn watch(
        &self,
        topics: &[&str],
        from: From,
    ) -> Result<Box<dyn Subscription>, TopicError> {
        let mut inner = self.shared.lock();
        let id = inner.new_reader(topics)?;
        let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        let parts = inner.all_partitions(&names);
        let mut pos = HashMap::new();
        for tp in &parts {
            let log = &inner.topics[&*tp.topic][tp.partition as usize];
            pos.insert(
                tp.clone(),
                match from {
                    From::Beginning => log.base,
                    From::End => log.end(),
                },
            );
        }
        inner.positions.insert(id, pos);
        inner.watches.insert(id);
        inner
            .pending
            .entry(id)
            .or_default()
            .push_back(Delivery::Assigned(parts));
        Ok(Box::new(MemorySubscription {
            shared: self.shared.clone(),
            id,
            group: None,
        }))
    }
}

struct MemorySubscription {
    shared: Arc<Shared>,
    id: u64,
    group: Option<String>,
}

#[async_trait::async_trait]
impl Subscription for MemorySubscription {
    async fn next(&mut self) -> Result<Delivery, TopicError> {
        loop {
            let changed = self.shared.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(d) = self.shared.lock().take(self.id)? {
                return Ok(d);
            }
            changed.await;
        }
    }

    fn commit(&mut self, topic: &str, partition: u16, offset: i64) -> Result<(), TopicError> {
        let Some(group) = &self.group else {
            return Ok(());
        };
        let mut inner = self.shared.lock();
        let tp = TopicPartition {
            topic: Arc::from(topic),
            partition,
        };
        let Some(g) = inner.groups.get_mut(group) else {
            return Ok(());
        };
        if !g.assignment.get(&self.id).is_some_and(|a| a.contains(&tp)) {
            return Ok(());
        }
        let c = g.committed.entry(tp).or_insert(offset);
        *c = (*c).max(offset);
        inner.trim();
        Ok(())
    }
}

impl Drop for MemorySubscription {
    fn drop(&mut self) {
        {
            let mut inner = self.shared.lock();
            inner.positions.remove(&self.id);
            inner.pending.remove(&self.id);
            inner.watches.remove(&self.id);
            if let Some(group) = &self.group {
                if let Some(g) = inner.groups.get_mut(group) {
                    g.members.remove(&self.id);
                    g.assignment.remove(&self.id);
                }
                inner.rebalance(group);
            }
            inner.trim();
        }
        self.shared.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, partitions: u16, compacted: bool) -> TopicSpec {
        TopicSpec {
            name: name.into(),
            partitions,
            compacted,
        }
    }

    async fn records(s: &mut Box<dyn Subscription>) -> Vec<Incoming> {
        match s.next().await.unwrap() {
            Delivery::Records(r) => r,
            other => panic!("expected records, got {other:?}"),
        }
    }

    async fn assigned(s: &mut Box<dyn Subscription>) -> Vec<TopicPartition> {
        match s.next().await.unwrap() {
            Delivery::Assigned(a) => a,
            other => panic!("expected an assignment, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_lone_member_gets_every_partition_and_the_records_of_each_key_in_order() {
        let bus = MemoryBus::new(vec![spec("t", 4, false)]);
        let mut s = bus.subscribe("g", &["t"]).await.unwrap();
        assert_eq!(assigned(&mut s).await.len(), 4);
        let recs: Vec<_> = (0..40u8)
            .map(|i| Outgoing::new(vec![i % 3], vec![i]))
            .collect();
        bus.publish("t", recs).await.unwrap();
        let got = records(&mut s).await;
        assert_eq!(got.len(), 40);
        for k in 0..3u8 {
            let vals: Vec<u8> = got
                .iter()
                .filter(|r| r.key == [k])
                .map(|r| r.value[0])
                .collect();
            let want: Vec<u8> = (0..40u8).filter(|i| i % 3 == k).collect();
            assert_eq!(vals, want, "key {k} out of order");
            let parts: std::collections::HashSet<_> = got
                .iter()
                .filter(|r| r.key == [k])
                .map(|r| r.partition)
                .collect();
            assert_eq!(parts.len(), 1, "one key, one partition");
        }
    }

    #[tokio::test]
    async fn a_member_that_leaves_hands_its_partitions_over_after_the_last_commit() {
        let bus = MemoryBus::new(vec![spec("t", 2, false)]);
        let mut a = bus.subscribe("g", &["t"]).await.unwrap();
        assert_eq!(assigned(&mut a).await.len(), 2);
        let mut b = bus.subscribe("g", &["t"]).await.unwrap();
        // a loses one partition to b.
        let revoked = match a.next().await.unwrap() {
            Delivery::Revoked(r) => r,
            other => panic!("{other:?}"),
        };
        assert_eq!(revoked.len(), 1);
        let b_parts = assigned(&mut b).await;
        assert_eq!(b_parts, revoked);
        let bp = b_parts[0].partition;
        bus.publish(
            "t",
            (0..10u8)
                .map(|i| Outgoing::to_partition(bp, vec![i], vec![i]))
                .collect(),
        )
        .await
        .unwrap();
        let got = records(&mut b).await;
        assert_eq!(got.len(), 10);
        b.commit("t", bp, got[3].offset).unwrap();
        drop(b);
        // a gets the partition back and resumes after offset 3.
        let back = assigned(&mut a).await;
        assert_eq!(back, revoked);
        let again = records(&mut a).await;
        let vals: Vec<u8> = again.iter().map(|r| r.value[0]).collect();
        assert_eq!(vals, (4..10).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn committed_records_are_dropped_and_compacted_topics_keep_the_latest_per_key() {
        let bus = MemoryBus::new(vec![spec("t", 1, false), spec("c", 1, true)]);
        let mut s = bus.subscribe("g", &["t", "c"]).await.unwrap();
        assigned(&mut s).await;
        bus.publish(
            "t",
            (0..100u8)
                .map(|i| Outgoing::new(vec![i], vec![i]))
                .collect(),
        )
        .await
        .unwrap();
        let got = records(&mut s).await;
        assert_eq!(bus.held(), 100);
        s.commit("t", 0, got[49].offset).unwrap();
        assert_eq!(bus.held(), 50);
        s.commit("t", 0, got[99].offset).unwrap();
        assert_eq!(bus.held(), 0);

        for v in 0..5u8 {
            bus.publish("c", vec![Outgoing::new(b"k".to_vec(), vec![v])])
                .await
                .unwrap();
        }
        bus.publish("c", vec![Outgoing::new(b"j".to_vec(), vec![9])])
            .await
            .unwrap();
        let got = records(&mut s).await;
        s.commit("c", 0, got.last().unwrap().offset).unwrap();
        let mut w = bus.watch(&["c"], From::Beginning).await.unwrap();
        assigned(&mut w).await;
        let seen: Vec<(Vec<u8>, u8)> = records(&mut w)
            .await
            .into_iter()
            .map(|r| (r.key, r.value[0]))
            .collect();
        assert_eq!(seen, vec![(b"k".to_vec(), 4), (b"j".to_vec(), 9)]);
    }

    #[tokio::test]
    async fn a_watch_from_the_end_sees_only_new_records_and_bad_names_are_refused() {
        let bus = MemoryBus::new(vec![spec("t", 3, false)]);
        bus.publish("t", vec![Outgoing::new(b"old".to_vec(), b"1".to_vec())])
            .await
            .unwrap();
        let mut w = bus.watch(&["t"], From::End).await.unwrap();
        assert_eq!(assigned(&mut w).await.len(), 3);
        bus.publish("t", vec![Outgoing::new(b"new".to_vec(), b"2".to_vec())])
            .await
            .unwrap();
        let got = records(&mut w).await;
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].key, b"new");
        assert!(matches!(
            bus.publish("nope", vec![Outgoing::new(b"k".to_vec(), b"v".to_vec())])
                .await,
            Err(TopicError::UnknownTopic(_))
        ));
        assert!(matches!(
            bus.publish(
                "t",
                vec![Outgoing::to_partition(3, b"k".to_vec(), b"v".to_vec())]
            )
            .await,
            Err(TopicError::NoSuchPartition { partition: 3, .. })
        ));
        bus.close();
        assert!(matches!(w.next().await, Err(TopicError::Closed)));
    }
}
