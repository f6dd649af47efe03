//! The link manager's membership over the verified network map, and its
//! transport over the HTTPS gateway client: where `braid-p2p` meets
//! `braid-membership` and `braid-gateway` (none of them depends on
//! another).

use braid_gateway::{Envelope, GatewayClient, SendError};
use braid_membership::{MapView, MemberInfo};
use braid_p2p::{Counters, Packet, PeerAddr, Peers, Transport, TransportError};
use braid_types::X500Name;
use std::sync::Arc;
use std::sync::atomic::Ordering;

fn member<'a>(view: &'a MapView, name: &str) -> Option<&'a MemberInfo> {
    let name: X500Name = name.parse().ok()?;
    view.member(&name)
}

/// The verified network map as the link manager's membership.
pub struct MapPeers(pub Arc<MapView>);

impl braid_link::Membership for MapPeers {
    fn session_key(&self, identity: &braid_link::Identity) -> Option<braid_link::PublicKey> {
        self.0.session_key(identity)
    }

    fn identity_of(&self, key: &braid_link::PublicKey) -> Option<braid_link::Identity> {
        self.0.identity_of(key)
    }
}

impl Peers for MapPeers {
    fn is_member(&self, name: &str) -> bool {
        member(&self.0, name).is_some()
    }

    fn address(&self, name: &str) -> Option<PeerAddr> {
        member(&self.0, name).map(|m| PeerAddr {
            endpoint: m.endpoint.clone(),
            tls_leaf: m.tls_leaf().map(<[u8]>::to_vec),
        })
    }

    fn tls_matches(&self, name: &str, leaf: &[u8]) -> bool {
        member(&self.0, name).is_some_and(|m| m.tls_leaf() == Some(leaf))
    }
}

/// The gateway client as the link manager's transport.
pub struct GatewayTransport {
    client: GatewayClient,
    counters: Arc<Counters>,
}

impl GatewayTransport {
    /// Sends through `client`, counting into `counters`.
    pub fn new(client: GatewayClient, counters: Arc<Counters>) -> Self {
        Self { client, counters }
    }
}

#[async_trait::async_trait]
impl Transport for GatewayTransport {
    async fn send(&self, to: &PeerAddr, batch: Vec<Packet>) -> Result<(), TransportError> {
        let n = batch.len() as u64;
        let envelopes: Vec<Envelope> = batch
            .into_iter()
            .map(|p| Envelope {
                from: p.from,
                to: p.to,
                packet: p.bytes,
            })
            .collect();
        match self
            .client
            .send(&to.endpoint, to.tls_leaf.as_deref(), &envelopes)
            .await
        {
            Ok(()) => {
                self.counters.packets_sent.fetch_add(n, Ordering::Relaxed);
                self.counters.requests_sent.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(SendError::Overloaded { retry_after }) => {
                self.counters.overloaded.fetch_add(1, Ordering::Relaxed);
                Err(TransportError::Overloaded { retry_after })
            }
            Err(e) => {
                self.counters.send_failures.fetch_add(1, Ordering::Relaxed);
                match &e {
                    SendError::WrongPeer(_) | SendError::Forbidden(_) => {
                        tracing::warn!(endpoint = %to.endpoint, cause = %e, "peer gateway refused or not who the network map says");
                    }
                    _ => {
                        tracing::debug!(endpoint = %to.endpoint, cause = %e, "sending to peer gateway failed")
                    }
                }
                Err(TransportError::Failed(e.to_string()))
            }
        }
    }
}
