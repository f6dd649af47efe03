//! The topic bus: named topics of keyed records split into partitions, the
//! way Kafka carries them, so that workers in separate processes meet on
//! it exactly as they do in one process.
//!
//! - [`MessageBus::publish`] returns once the records are durable on the
//!   bus (Kafka: `acks=all` on an idempotent producer). A record's
//!   partition is the one its key hashes to ([`partition_of`]) unless the
//!   publisher names one, so every record of one key lands on one
//!   partition, in order.
//! - [`MessageBus::subscribe`] joins a consumer group: the group's members
//!   share the topics' partitions, and a member learns what it got and what
//!   it lost ([`Delivery::Assigned`], [`Delivery::Revoked`]) before any
//!   record of a newly assigned partition. It marks records processed with
//!   [`Subscription::commit`] only once their effect is durable in the
//!   store; a member that dies hands its partitions to the others, which
//!   start after the last committed record. Delivery is therefore
//!   at-least-once, and consumers are idempotent (the store is the source
//!   of truth; no bus transactions).
//! - [`MessageBus::watch`] reads every partition of some topics without a
//!   group: for what every worker must see (status changes, compacted
//!   state topics).
//!
//! [`crate::memory::MemoryBus`] is the in-process implementation; the
//! Kafka one is the `braid-bus-kafka` crate.

use std::sync::Arc;

/// Publishing or consuming failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TopicError {
    /// The bus is shut down.
    #[error("bus closed")]
    Closed,
    /// A topic the caller named is not one the bus was set up with.
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    /// A partition outside the topic's range.
    #[error("topic {topic:?} has {partitions} partitions; partition {partition} does not exist")]
    NoSuchPartition {
        /// The topic.
        topic: String,
        /// Its partition count.
        partitions: u16,
        /// The partition asked for.
        partition: u16,
    },
    /// The broker refused or could not be reached; retry later.
    #[error("bus: {0}")]
    Broker(String),
    /// An existing topic is laid out differently from the configuration
    /// (partition count, compaction); fix the topic or the configuration.
    #[error("topic {topic:?}: {detail}")]
    Mismatch {
        /// The topic.
        topic: String,
        /// What differs.
        detail: String,
    },
}

/// How one topic is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    /// Its name on the bus (prefix included).
    pub name: String,
    /// Partition count; a key's partition depends on it, so it cannot
    /// change once records are on the topic.
    pub partitions: u16,
    /// Keep only the latest record per key (Kafka `cleanup.policy=compact`).
    pub compacted: bool,
}

/// A record to publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    /// Its key: records of one key keep their order.
    pub key: Vec<u8>,
    /// Its payload.
    pub value: Vec<u8>,
    /// The partition, when the publisher chooses it (else the key's).
    pub partition: Option<u16>,
}

impl Outgoing {
    /// A record on its key's partition.
    pub fn new(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Outgoing {
        Outgoing {
            key: key.into(),
            value: value.into(),
            partition: None,
        }
    }

    /// A record on a chosen partition.
    pub fn to_partition(
        partition: u16,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Outgoing {
        Outgoing {
            key: key.into(),
            value: value.into(),
            partition: Some(partition),
        }
    }
}

/// A record consumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// Its topic.
    pub topic: Arc<str>,
    /// Its partition.
    pub partition: u16,
    /// Its position in the partition.
    pub offset: i64,
    /// Its key.
    pub key: Vec<u8>,
    /// Its payload.
    pub value: Vec<u8>,
}

/// One partition of one topic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: u16,
}

/// What a subscription yields next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// These partitions are now this member's: load their state before
    /// handling their records.
    Assigned(Vec<TopicPartition>),
    /// These partitions are no longer this member's: stop their work. (The
    /// store fences a member that learns this late.)
    Revoked(Vec<TopicPartition>),
    /// Records, in partition order.
    Records(Vec<Incoming>),
}

/// Where a [`MessageBus::watch`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// Every record still on the topic (compacted state topics).
    Beginning,
    /// Only records published from now on.
    End,
}

/// A member of a consumer group, or a watch.
#[async_trait::async_trait]
pub trait Subscription: Send {
    /// The next assignment change or batch of records.
    async fn next(&mut self) -> Result<Delivery, TopicError>;
    /// Records up to and including `offset` of `partition` are processed:
    /// a member that takes the partition over starts after it. Offsets of
    /// a partition no longer assigned are ignored.
    fn commit(&mut self, topic: &str, partition: u16, offset: i64) -> Result<(), TopicError>;
}

/// A bus of named, partitioned topics.
#[async_trait::async_trait]
pub trait MessageBus: Send + Sync + 'static {
    /// The topics the bus was set up with.
    fn topics(&self) -> Vec<TopicSpec>;
    /// Publishes records to `topic`; returns once they are durable on the
    /// bus. On error some may have been published (consumers de-duplicate).
    async fn publish(&self, topic: &str, records: Vec<Outgoing>) -> Result<(), TopicError>;
    /// Joins consumer group `group` on `topics`.
    async fn subscribe(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<Box<dyn Subscription>, TopicError>;
    /// Reads every partition of `topics`, from `from`, outside any group.
    async fn watch(&self, topics: &[&str], from: From)
    -> Result<Box<dyn Subscription>, TopicError>;

    /// The partition count of `topic`.
    fn partitions(&self, topic: &str) -> Result<u16, TopicError> {
        self.topics()
            .into_iter()
            .find(|t| t.name == topic)
            .map(|t| t.partitions)
            .ok_or_else(|| TopicError::UnknownTopic(topic.to_string()))
    }
}

/// The partition a key belongs to among `partitions`: FNV-1a of the key,
/// the same on every worker and both bus implementations (braid names the
/// partition when it publishes, so Kafka's own partitioner never decides).
pub fn partition_of(key: &[u8], partitions: u16) -> u16 {
    let mut h: u32 = 0x811c_9dc5;
    for b in key {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    (h % u32::from(partitions.max(1))) as u16
}

/// Tracks, per partition, the records handed out and those processed, so
/// that a consumer that processes records out of order commits only up to
/// the first record not yet processed.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    parts: std::collections::HashMap<TopicPartition, Pending>,
}

#[derive(Debug, Default)]
struct Pending {
    /// Offsets handed out and not yet processed.
    open: std::collections::BTreeSet<i64>,
    /// The highest offset handed out.
    highest: Option<i64>,
    /// The offset last reported committable.
    committed: Option<i64>,
}

impl OffsetTracker {
    /// A record was handed out for processing.
    pub fn started(&mut self, tp: &TopicPartition, offset: i64) {
        let p = self.parts.entry(tp.clone()).or_default();
        p.open.insert(offset);
        p.highest = Some(p.highest.map_or(offset, |h| h.max(offset)));
    }

    /// A record is processed; returns the offset to commit now, if the
    /// committable point moved.
    pub fn done(&mut self, tp: &TopicPartition, offset: i64) -> Option<i64> {
        let p = self.parts.get_mut(tp)?;
        p.open.remove(&offset);
        let upto = match p.open.first() {
            Some(first) => first - 1,
            None => p.highest?,
        };
        if p.committed.is_some_and(|c| c >= upto) || upto < 0 {
            return None;
        }
        p.committed = Some(upto);
        Some(upto)
    }

    /// Forgets a partition (revoked).
    pub fn forget(&mut self, tp: &TopicPartition) {
        self.parts.remove(tp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_always_lands_on_the_same_partition_and_keys_spread() {
        let mut seen = [0u32; 8];
        for i in 0..8_000u32 {
            let k = i.to_be_bytes();
            let p = partition_of(&k, 8);
            assert_eq!(p, partition_of(&k, 8));
            seen[p as usize] += 1;
        }
        for n in seen {
            assert!((700..1300).contains(&n), "uneven spread: {seen:?}");
        }
        assert_eq!(partition_of(b"x", 1), 0);
        assert_eq!(partition_of(b"x", 0), 0);
    }

    #[test]
    fn commits_stop_at_the_first_record_still_being_processed() {
        let tp = TopicPartition {
            topic: "t".into(),
            partition: 0,
        };
        let mut t = OffsetTracker::default();
        for o in 0..5 {
            t.started(&tp, o);
        }
        assert_eq!(t.done(&tp, 2), None, "0 and 1 are still open");
        assert_eq!(t.done(&tp, 0), Some(0));
        assert_eq!(t.done(&tp, 1), Some(2), "2 was done already");
        assert_eq!(t.done(&tp, 4), None, "3 is open");
        assert_eq!(t.done(&tp, 3), Some(4));
        t.started(&tp, 5);
        assert_eq!(t.done(&tp, 5), Some(5));
        t.forget(&tp);
        assert_eq!(
            t.done(&tp, 6),
            None,
            "a forgotten partition commits nothing"
        );
    }
}
