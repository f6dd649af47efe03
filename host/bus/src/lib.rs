//! The bus that carries session messages between workers.
//!
//! The flow worker publishes a message only after the checkpoint that
//! produced it has committed (transactional outbox); whoever consumes the
//! bus delivers it durably and then deletes the outbox entry. Delivery is
//! at-least-once: receivers drop duplicates by `(session, direction, seq)`.
//! [`InProcessBus`] serves the embedded node today.
//!
//! [`topics`] is the bus the workers move onto for cluster mode: named,
//! partitioned topics of keyed records, consumer groups, commits after the
//! effect is durable. [`memory::MemoryBus`] implements it in process and
//! the `braid-bus-kafka` crate on Kafka. Until the flow worker consumes
//! its input from it, the two live side by side.

pub mod live;
pub mod memory;
pub mod topics;

use braid_types::SessionMessage;
use tokio::sync::mpsc;

/// Publishing failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The consumer side has shut down; the node is stopping. Messages stay
    /// in the outbox and are published again on the next start.
    #[error("bus closed")]
    Closed,
}

/// A bus for session messages.
pub trait Bus: Send + Sync + 'static {
    /// Publishes messages (already durable in the sender's outbox).
    fn publish(&self, messages: Vec<SessionMessage>) -> Result<(), BusError>;
}

/// The in-process bus: an unbounded queue to the node's message router.
/// Unbounded is safe here because every message on it is also in the
/// durable outbox and producers are bounded by the flows' outbound limits.
#[derive(Clone)]
pub struct InProcessBus {
    tx: mpsc::UnboundedSender<Vec<SessionMessage>>,
}

/// The consuming end of an [`InProcessBus`].
pub type BusReceiver = mpsc::UnboundedReceiver<Vec<SessionMessage>>;

impl InProcessBus {
    /// A new bus and its consuming end.
    pub fn new() -> (InProcessBus, BusReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        (InProcessBus { tx }, rx)
    }
}

impl Bus for InProcessBus {
    fn publish(&self, messages: Vec<SessionMessage>) -> Result<(), BusError> {
        if messages.is_empty() {
            return Ok(());
        }
        self.tx.send(messages).map_err(|_| BusError::Closed)
    }
}
