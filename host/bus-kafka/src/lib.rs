//! The topic bus ([`braid_bus::topics::MessageBus`]) on Kafka, through
//! rdkafka (librdkafka).
//!
//! - Topics are created at start with the admin client when missing, with
//!   the configured partition count, replication factor and cleanup
//!   policy; existing topics are checked (a partition count other than the
//!   configured one is an error: a key's partition depends on it).
//! - The producer is idempotent with `acks=all`: [`KafkaBus::publish`]
//!   returns once every record is acknowledged by all in-sync replicas.
//!   braid chooses each record's partition itself
//!   ([`braid_bus::topics::partition_of`]), so the same key lands on the same
//!   partition whichever client published it.
//! - Consumers never commit on their own: `enable.auto.offset.store=false`,
//!   and [`Subscription::commit`] stores an offset only after the caller
//!   made the record's effect durable; stored offsets are committed every
//!   `auto.commit.interval.ms` and synchronously before a revocation.
//!   Exactly-once effects come from idempotent consumers with the store as
//!   the source of truth, not from Kafka transactions.
//! - Any other librdkafka setting (`security.protocol`, `sasl.*`, `ssl.*`,
//!   timeouts) passes through [`KafkaConfig::options`].

use braid_bus::topics::{
    Delivery, From, Incoming, MessageBus, Outgoing, Subscription, TopicError, TopicPartition,
    TopicSpec, partition_of,
};
use futures_util::FutureExt as _;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Records returned by one [`Subscription::next`] at most.
const BATCH: usize = 512;

/// Lines about broker trouble that librdkafka retries through.
static BROKER_LOGS: braid_types::log_limit::LogLimiter =
    braid_types::log_limit::LogLimiter::new(10, Duration::from_secs(60));

/// How to reach the brokers and lay out topics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub bootstrap_servers: String,
    /// librdkafka settings passed through unchanged (`security.protocol`,
    /// `sasl.mechanism`, `ssl.ca.location`, ...), for every client.
    pub options: Vec<(String, String)>,
    /// Replication factor of topics braid creates (production: 3, with the
    /// brokers' `min.insync.replicas=2`).
    pub replication: i16,
    /// How long a consumer may stay silent before its group hands its
    /// partitions to others (`session.timeout.ms`).
    pub session_timeout: Duration,
}

impl KafkaConfig {
    /// Parses `kafka://HOST:PORT[,HOST:PORT...]`.
    pub fn parse(url: &str) -> Result<KafkaConfig, TopicError> {
        let rest = url.strip_prefix("kafka://").ok_or_else(|| {
            TopicError::Broker(format!(
                "bus address {url:?} must look like kafka://HOST:PORT[,HOST:PORT]"
            ))
        })?;
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() {
            return Err(TopicError::Broker(format!(
                "bus address {url:?} names no broker (kafka://HOST:PORT[,HOST:PORT])"
            )));
        }
        for hp in rest.split(',') {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                return Err(TopicError::Broker(format!(
                    "bus address {url:?}: {hp:?} is not HOST:PORT"
                )));
            }
        }
        Ok(KafkaConfig {
            bootstrap_servers: rest.to_string(),
            options: Vec::new(),
            replication: 1,
            session_timeout: Duration::from_secs(10),
        })
    }

    fn client(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.bootstrap_servers);
        for (k, v) in &self.options {
            c.set(k, v);
        }
        c
    }
}

fn broker(e: KafkaError) -> TopicError {
    TopicError::Broker(e.to_string())
}

/// The bus on Kafka.
pub struct KafkaBus {
    config: KafkaConfig,
    specs: Vec<TopicSpec>,
    producer: FutureProducer,
}

impl KafkaBus {
    /// Connects, creates the missing topics of `specs` and checks the
    /// existing ones.
    pub async fn connect(
        config: KafkaConfig,
        specs: Vec<TopicSpec>,
    ) -> Result<KafkaBus, TopicError> {
        ensure_topics(&config, &specs).await?;
        let producer: FutureProducer = config
            .client()
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "1")
            .create()
            .map_err(broker)?;
        Ok(KafkaBus {
            config,
            specs,
            producer,
        })
    }

    fn spec(&self, topic: &str) -> Result<&TopicSpec, TopicError> {
        self.specs
            .iter()
            .find(|s| s.name == topic)
            .ok_or_else(|| TopicError::UnknownTopic(topic.to_string()))
    }

    fn consumer_with(&self, group: &str, ctx: Ctx) -> Result<StreamConsumer<Ctx>, TopicError> {
        self.config
            .client()
            .set("group.id", group)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "500")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("partition.assignment.strategy", "roundrobin")
            .set(
                "session.timeout.ms",
                self.config.session_timeout.as_millis().to_string(),
            )
            .set(
                "heartbeat.interval.ms",
                (self.config.session_timeout.as_millis() / 4)
                    .max(100)
                    .to_string(),
            )
            .create_with_context(ctx)
            .map_err(broker)
    }
}

/// Creates what is missing and checks what exists.
async fn ensure_topics(config: &KafkaConfig, specs: &[TopicSpec]) -> Result<(), TopicError> {
    let admin: AdminClient<DefaultClientContext> = config.client().create().map_err(broker)?;
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(30)));
    let existing = partition_counts(&admin).await?;
    let missing: Vec<&TopicSpec> = specs
        .iter()
        .filter(|s| !existing.contains_key(&s.name))
        .collect();
    if !missing.is_empty() {
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|s| {
                NewTopic::new(
                    &s.name,
                    i32::from(s.partitions.max(1)),
                    TopicReplication::Fixed(i32::from(config.replication)),
                )
                .set(
                    "cleanup.policy",
                    if s.compacted { "compact" } else { "delete" },
                )
            })
            .collect();
        for r in admin.create_topics(&new, &opts).await.map_err(broker)? {
            match r {
                Ok(name) => tracing::info!(topic = %name, "created topic"),
                // Another worker created it first: checked below.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((name, code)) => {
                    return Err(TopicError::Broker(format!(
                        "creating topic {name:?} failed: {code}"
                    )));
                }
            }
        }
    }
    // Metadata can lag a creation: wait until every topic shows up.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let counts = loop {
        let counts = partition_counts(&admin).await?;
        if specs
            .iter()
            .all(|s| counts.get(&s.name).is_some_and(|n| *n > 0))
        {
            break counts;
        }
        if tokio::time::Instant::now() > deadline {
            let absent: Vec<&str> = specs
                .iter()
                .filter(|s| !counts.contains_key(&s.name))
                .map(|s| s.name.as_str())
                .collect();
            return Err(TopicError::Broker(format!(
                "topics {absent:?} do not appear in the broker's metadata 30 s after creation"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for s in specs {
        let n = counts[&s.name];
        if n != usize::from(s.partitions.max(1)) {
            return Err(TopicError::Mismatch {
                topic: s.name.clone(),
                detail: format!(
                    "it has {n} partitions but the configuration says {} (a key's partition \
                     depends on the count: change the configuration, or recreate the topic)",
                    s.partitions
                ),
            });
        }
    }
    check_policies(&admin, &opts, specs).await
}

/// Partition count of every topic the broker lists.
async fn partition_counts(
    admin: &AdminClient<DefaultClientContext>,
) -> Result<std::collections::HashMap<String, usize>, TopicError> {
    let md = admin
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .map_err(broker)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len()))
        .collect())
}

/// A compacted topic must be compacted, and the others must not be.
async fn check_policies(
    admin: &AdminClient<DefaultClientContext>,
    opts: &AdminOptions,
    specs: &[TopicSpec],
) -> Result<(), TopicError> {
    let res: Vec<ResourceSpecifier<'_>> = specs
        .iter()
        .map(|s| ResourceSpecifier::Topic(&s.name))
        .collect();
    let described = match admin.describe_configs(&res, opts).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(cause = %e, "the broker does not describe topic configurations; cleanup policies not checked");
            return Ok(());
        }
    };
    for (s, d) in specs.iter().zip(described) {
        let Ok(cfg) = d else { continue };
        let Some(policy) = cfg.get("cleanup.policy").and_then(|e| e.value.clone()) else {
            continue;
        };
        let compacted = policy.split(',').any(|p| p.trim() == "compact");
        if compacted != s.compacted {
            return Err(TopicError::Mismatch {
                topic: s.name.clone(),
                detail: format!(
                    "its cleanup.policy is {policy:?}, braid needs {:?}",
                    if s.compacted { "compact" } else { "delete" }
                ),
            });
        }
    }
    Ok(())
}

#[async_trait::async_trait]
impl MessageBus for KafkaBus {
    fn topics(&self) -> Vec<TopicSpec> {
        self.specs.clone()
    }

    async fn publish(&self, topic: &str, records: Vec<Outgoing>) -> Result<(), TopicError> {
        let spec = self.spec(topic)?;
        let parts = spec.partitions.max(1);
        let mut sends = Vec::with_capacity(records.len());
        for r in &records {
            let p = match r.partition {
                Some(p) if p >= parts => {
                    return Err(TopicError::NoSuchPartition {
                        topic: topic.to_string(),
                        partitions: parts,
                        partition: p,
                    });
                }
                Some(p) => p,
                None => partition_of(&r.key, parts),
            };
            let rec = FutureRecord::to(topic)
                .key(&r.key)
                .payload(&r.value)
                .partition(i32::from(p));
            sends.push(self.producer.send(rec, Duration::from_secs(30)));
        }
        for res in futures_util::future::join_all(sends).await {
            res.map_err(|(e, _)| broker(e))?;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        group: &str,
        topics: &[&str],
    ) -> Result<Box<dyn Subscription>, TopicError> {
        for t in topics {
            self.spec(t)?;
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let consumer = self.consumer_with(group, Ctx { events: tx })?;
        consumer.subscribe(topics).map_err(broker)?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            events: rx,
            stash: None,
            grouped: true,
        }))
    }

    async fn watch(
        &self,
        topics: &[&str],
        from: From,
    ) -> Result<Box<dyn Subscription>, TopicError> {
        let mut tpl = TopicPartitionList::new();
        let mut all = Vec::new();
        for t in topics {
            let spec = self.spec(t)?;
            for p in 0..spec.partitions.max(1) {
                let offset = match from {
                    From::Beginning => Offset::Beginning,
                    From::End => Offset::End,
                };
                tpl.add_partition_offset(t, i32::from(p), offset)
                    .map_err(broker)?;
                all.push(TopicPartition {
                    topic: Arc::from(*t),
                    partition: p,
                });
            }
        }
        // The consumer's context keeps the sender (and so the channel)
        // alive; with a manual assignment it never rebalances.
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(Delivery::Assigned(all))
            .map_err(|_| TopicError::Closed)?;
        // A group id librdkafka requires, never used to commit.
        let consumer = self.consumer_with(
            &format!("braid-watch-{}", std::process::id()),
            Ctx { events: tx },
        )?;
        consumer.assign(&tpl).map_err(broker)?;
        Ok(Box::new(KafkaSubscription {
            consumer: Arc::new(consumer),
            events: rx,
            stash: None,
            grouped: false,
        }))
    }
}

/// Forwards rebalances to the subscription, committing stored offsets
/// before partitions go.
struct Ctx {
    events: mpsc::UnboundedSender<Delivery>,
}

impl rdkafka::ClientContext for Ctx {}

fn partitions_of(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .filter_map(|e| {
            Some(TopicPartition {
                topic: Arc::from(e.topic()),
                partition: u16::try_from(e.partition()).ok()?,
            })
        })
        .collect()
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => {
                    tracing::warn!(cause = %e, "committing offsets before a revocation failed; the next owner may see those records again")
                }
            }
            let parts = partitions_of(tpl);
            if !parts.is_empty() {
                let _ = self.events.send(Delivery::Revoked(parts));
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                let parts = partitions_of(tpl);
                if !parts.is_empty() {
                    let _ = self.events.send(Delivery::Assigned(parts));
                }
            }
            Rebalance::Error(e) => {
                tracing::warn!(cause = %e, "consumer group rebalance failed");
            }
            Rebalance::Revoke(_) => {}
        }
    }
}

struct KafkaSubscription {
    consumer: Arc<StreamConsumer<Ctx>>,
    events: mpsc::UnboundedReceiver<Delivery>,
    /// A record that arrived just after an assignment change was queued:
    /// the change goes first.
    stash: Option<Incoming>,
    grouped: bool,
}

fn incoming(m: &rdkafka::message::BorrowedMessage<'_>) -> Option<Incoming> {
    Some(Incoming {
        topic: Arc::from(m.topic()),
        partition: u16::try_from(m.partition()).ok()?,
        offset: m.offset(),
        key: m.key().unwrap_or_default().to_vec(),
        value: m.payload().unwrap_or_default().to_vec(),
    })
}

#[async_trait::async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Delivery, TopicError> {
        loop {
            if let Ok(ev) = self.events.try_recv() {
                return Ok(ev);
            }
            if let Some(r) = self.stash.take() {
                return Ok(Delivery::Records(vec![r]));
            }
            let consumer = self.consumer.clone();
            let first = tokio::select! {
                biased;
                ev = self.events.recv() => return ev.ok_or(TopicError::Closed),
                m = consumer.recv() => m,
            };
            let first = match first {
                Ok(m) => incoming(&m),
                Err(e) => {
                    // librdkafka reconnects by itself; say so, a few times
                    // a minute, and keep going.
                    if let Some(note) = BROKER_LOGS.allow("consume") {
                        tracing::warn!(cause = %e, "consuming from the bus failed; retrying{note}");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let Some(first) = first else { continue };
            if let Ok(ev) = self.events.try_recv() {
                self.stash = Some(first);
                return Ok(ev);
            }
            let mut batch = vec![first];
            while batch.len() < BATCH {
                match consumer.recv().now_or_never() {
                    Some(Ok(m)) => {
                        if let Some(r) = incoming(&m) {
                            batch.push(r);
                        }
                    }
                    _ => break,
                }
            }
            return Ok(Delivery::Records(batch));
        }
    }

    fn commit(&mut self, topic: &str, partition: u16, offset: i64) -> Result<(), TopicError> {
        if !self.grouped {
            return Ok(());
        }
        match self
            .consumer
            .store_offset(topic, i32::from(partition), offset)
        {
            Ok(()) => Ok(()),
            // Not assigned any more: the next owner re-reads it.
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::State)) => Ok(()),
            Err(KafkaError::StoreOffset(RDKafkaErrorCode::UnknownPartition)) => Ok(()),
            Err(e) => Err(broker(e)),
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        if self.grouped {
            // Leave the group with what was processed committed, so the
            // next owner starts right after it.
            match self.consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
                Err(e) => tracing::debug!(cause = %e, "final offset commit failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_addresses_are_parsed_or_refused_with_a_reason() {
        let c = KafkaConfig::parse("kafka://127.0.0.1:9092,broker-2:9093").unwrap();
        assert_eq!(c.bootstrap_servers, "127.0.0.1:9092,broker-2:9093");
        for bad in [
            "127.0.0.1:9092",
            "kafka://",
            "kafka://host",
            "kafka://host:0",
            "kafka://:9092",
            "kafka://h:1,h",
        ] {
            let e = KafkaConfig::parse(bad).unwrap_err().to_string();
            assert!(e.contains("HOST:PORT"), "{bad}: {e}");
        }
    }
}
