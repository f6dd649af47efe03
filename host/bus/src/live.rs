//! A consumer-group member that does not wait on a dead member.
//!
//! Kafka hands a member's partitions to the others once it misses its
//! session timeout. Some brokers keep a member that died without leaving
//! (SIGKILL, a lost host) in the group, with its partitions, until the
//! next rebalance (tansu does). [`LiveMember`] makes up for it through
//! the store every worker shares:
//!
//! - it says there, every sixth of the liveness period, that it is alive
//!   (`bus/GROUP/alive/ID`), and which partitions it holds
//!   (`bus/GROUP/owner/TOPIC/PARTITION`, written on assignment);
//! - when no record or assignment change came for a third of the period,
//!   it checks the owners; if one has not been alive for the whole
//!   period, it leaves the group and joins again, which makes the group
//!   hand every partition out among the members that answer.
//!
//! It is for workers whose partitions fence nothing in the store (the
//! gateways, the link managers); the flow workers do the same against
//! their fence table.

use crate::topics::{Delivery, MessageBus, Subscription, TopicError, TopicPartition};
use braid_storage::{Op, Store, StoreError};
use braid_types::now_millis;
use braid_types::retry::retry_until_ok;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

/// What a [`LiveMember`] joins, and as whom.
#[derive(Clone)]
pub struct LiveGroup {
    /// The bus.
    pub bus: Arc<dyn MessageBus>,
    /// The store the members share.
    pub store: Arc<dyn Store>,
    /// The consumer group.
    pub group: String,
    /// Its topics.
    pub topics: Vec<String>,
    /// This member, unique among the group's (e.g. role, pid and host).
    pub id: String,
    /// How long a member may go without saying it is alive before the
    /// others take its partitions.
    pub liveness: Duration,
}

/// A member of a [`LiveGroup`]; dropping it leaves the group.
pub struct LiveMember {
    group: LiveGroup,
    sub: Box<dyn Subscription>,
    held: BTreeSet<TopicPartition>,
    /// Deliveries to hand out before reading the subscription again (the
    /// revocation a rejoin implies).
    queued: VecDeque<Delivery>,
    watchdog: tokio::time::Interval,
    rejoined: tokio::time::Instant,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Drop for LiveMember {
    fn drop(&mut self) {
        self.heartbeat.abort();
    }
}

impl LiveGroup {
    fn alive_key(&self, id: &str) -> String {
        format!("bus/{}/alive/{id}", self.group)
    }

    fn owner_key(&self, tp: &TopicPartition) -> String {
        format!("bus/{}/owner/{}/{}", self.group, tp.topic, tp.partition)
    }

    async fn say_alive(&self) -> Result<(), StoreError> {
        let op = Op::PutMeta(
            self.alive_key(&self.id),
            now_millis().to_be_bytes().to_vec(),
        );
        self.store.write(vec![op]).await
    }

    async fn subscribe(&self) -> Box<dyn Subscription> {
        let topics: Vec<&str> = self.topics.iter().map(String::as_str).collect();
        retry_until_ok(&format!("joining consumer group {:?}", self.group), || {
            self.bus.subscribe(&self.group, &topics)
        })
        .await
    }

    /// Joins the group: says this member is alive first, so that the
    /// others never take it for dead while it joins.
    pub async fn join(self) -> Result<LiveMember, StoreError> {
        self.say_alive().await?;
        let heartbeat = {
            let g = self.clone();
            let every = (g.liveness / 6).max(Duration::from_millis(200));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    if let Err(e) = g.say_alive().await {
                        tracing::warn!(group = %g.group, cause = %e,
                            "could not record that this group member is alive");
                    }
                }
            })
        };
        let sub = self.subscribe().await;
        let mut watchdog =
            tokio::time::interval((self.liveness / 3).max(Duration::from_millis(200)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ok(LiveMember {
            group: self,
            sub,
            held: BTreeSet::new(),
            queued: VecDeque::new(),
            watchdog,
            rejoined: tokio::time::Instant::now(),
            heartbeat,
        })
    }
    /// A partition whose recorded owner is another member that has not
    /// said it is alive for the liveness period.
    async fn orphaned(&self) -> Result<Option<(TopicPartition, String)>, TopicError> {
        let g = self;
        let store = |e: StoreError| TopicError::Broker(format!("the store: {e}"));
        let now = now_millis();
        let mut alive: HashMap<String, bool> = HashMap::new();
        for topic in &g.topics {
            for partition in 0..g.bus.partitions(topic)? {
                let tp = TopicPartition {
                    topic: topic.as_str().into(),
                    partition,
                };
                let Some(owner) = g.store.meta(&g.owner_key(&tp)).await.map_err(store)? else {
                    continue;
                };
                let owner = String::from_utf8_lossy(&owner).into_owned();
                if owner == g.id {
                    continue;
                }
                let is_alive = match alive.get(&owner) {
                    Some(a) => *a,
                    None => {
                        let seen = g
                            .store
                            .meta(&g.alive_key(&owner))
                            .await
                            .map_err(store)?
                            .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                            .map(u64::from_be_bytes);
                        let a = seen
                            .is_some_and(|t| now.saturating_sub(t) < g.liveness.as_millis() as u64);
                        alive.insert(owner.clone(), a);
                        a
                    }
                };
                if !is_alive {
                    return Ok(Some((tp, owner)));
                }
            }
        }
        Ok(None)
    }
}

impl LiveMember {
    /// The partitions this member holds.
    pub fn held(&self) -> &BTreeSet<TopicPartition> {
        &self.held
    }

    /// The next assignment change or batch of records (as
    /// [`Subscription::next`]); a rejoin shows as the revocation of
    /// everything held, then the new assignment.
    pub async fn next(&mut self) -> Result<Delivery, TopicError> {
        loop {
            if let Some(d) = self.queued.pop_front() {
                return Ok(d);
            }
            let next = tokio::select! {
                d = self.sub.next() => Some(d),
                _ = self.watchdog.tick() => None,
            };
            match next {
                Some(Ok(Delivery::Assigned(tps))) => {
                    let ops: Vec<Op> = tps
                        .iter()
                        .map(|tp| {
                            Op::PutMeta(self.group.owner_key(tp), self.group.id.as_bytes().to_vec())
                        })
                        .collect();
                    let store = &self.group.store;
                    retry_until_ok("recording the partitions this member holds", || {
                        store.write(ops.clone())
                    })
                    .await;
                    self.held.extend(tps.iter().cloned());
                    return Ok(Delivery::Assigned(tps));
                }
                Some(Ok(Delivery::Revoked(tps))) => {
                    for tp in &tps {
                        self.held.remove(tp);
                    }
                    return Ok(Delivery::Revoked(tps));
                }
                Some(other) => return other,
                None => {}
            }
            if self.rejoined.elapsed() < self.group.liveness {
                continue;
            }
            match self.group.orphaned().await {
                Ok(Some((tp, owner))) => {
                    tracing::warn!(group = %self.group.group, topic = %tp.topic,
                        partition = tp.partition, %owner,
                        "a partition's owner has not been alive for {:?}; rejoining the group \
                         so that its partitions are handed out", self.group.liveness);
                    let held: Vec<TopicPartition> =
                        std::mem::take(&mut self.held).into_iter().collect();
                    if !held.is_empty() {
                        self.queued.push_back(Delivery::Revoked(held));
                    }
                    // Leave before joining again.
                    self.sub = Box::new(Left);
                    self.sub = self.group.subscribe().await;
                    self.rejoined = tokio::time::Instant::now();
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(group = %self.group.group, cause = %e,
                    "could not check the group's partition owners"),
            }
        }
    }

    /// As [`Subscription::commit`].
    pub fn commit(&mut self, topic: &str, partition: u16, offset: i64) -> Result<(), TopicError> {
        self.sub.commit(topic, partition, offset)
    }
}

/// The subscription of a member between leaving and joining again.
struct Left;

#[async_trait::async_trait]
impl Subscription for Left {
    async fn next(&mut self) -> Result<Delivery, TopicError> {
        Err(TopicError::Closed)
    }

    fn commit(&mut self, _: &str, _: u16, _: i64) -> Result<(), TopicError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::MemoryBus;
    use crate::topics::TopicSpec;
    use braid_storage::embedded::EmbeddedStore;

    /// The member's next deliveries within `within`, as (revoked, assigned)
    /// partition counts.
    async fn changes(m: &mut LiveMember, within: Duration) -> (usize, usize) {
        let (mut revoked, mut assigned) = (0, 0);
        let _ = tokio::time::timeout(within, async {
            loop {
                match m.next().await.unwrap() {
                    Delivery::Assigned(t) => assigned += t.len(),
                    Delivery::Revoked(t) => revoked += t.len(),
                    Delivery::Records(_) => {}
                }
            }
        })
        .await;
        (revoked, assigned)
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_member_rejoins_when_an_owner_is_dead_and_not_while_it_lives() {
        let dir = braid_testkit::TempDir::new("braid-bus-live");
        let store: Arc<dyn Store> =
            Arc::new(EmbeddedStore::open(&dir.path().join("s.redb")).unwrap());
        let bus: Arc<dyn MessageBus> = Arc::new(MemoryBus::new(vec![TopicSpec {
            name: "t".into(),
            partitions: 4,
            compacted: false,
        }]));
        let liveness = Duration::from_millis(600);
        let group = |id: &str| LiveGroup {
            bus: bus.clone(),
            store: store.clone(),
            group: "g".into(),
            topics: vec!["t".into()],
            id: id.into(),
            liveness,
        };
        // Another member holds half the partitions, and says it is alive.
        let other = group("other").join().await.unwrap();
        let mut me = group("me").join().await.unwrap();
        let (_, assigned) = changes(&mut me, Duration::from_millis(300)).await;
        assert_eq!(assigned, 2, "half the partitions");
        let mine: Vec<u16> = me.held().iter().map(|t| t.partition).collect();
        for p in &mine {
            let owner = store.meta(&format!("bus/g/owner/t/{p}")).await.unwrap();
            assert_eq!(owner.as_deref(), Some(&b"me"[..]), "partition {p}");
        }
        // The other member has not read its assignment yet: record its
        // partitions for it.
        for p in 0..4u16 {
            if !mine.contains(&p) {
                store
                    .write(vec![Op::PutMeta(
                        format!("bus/g/owner/t/{p}"),
                        b"other".to_vec(),
                    )])
                    .await
                    .unwrap();
            }
        }
        // Alive: no rejoin over several liveness periods.
        assert_eq!(changes(&mut me, 3 * liveness).await, (0, 0));
        // It stops saying so (hangs, or died where the broker keeps it in
        // the group): the member rejoins, giving up all and taking again.
        other.heartbeat.abort();
        let (revoked, assigned) = changes(&mut me, 4 * liveness).await;
        assert!(
            revoked >= 2 && assigned >= 2,
            "revoked {revoked}, assigned {assigned}"
        );
        drop(other);
    }
}
