//! braid's gateway: the HTTPS transport between the gateways of braid
//! nodes (issue 4).
//!
//! The link manager seals packets end to end (Noise) and hands them here
//! with their `(from, to)` identities; the [`client`] POSTs them in batches
//! ([`wire`]) to the peer gateway's endpoint, whose [`server`] queues them
//! for its own link manager. The gateway adds the transport's guarantees:
//! TLS 1.3 with certificates from the network CA only, mutual TLS when the
//! network asks for it, revocation through CRLs that are re-read when they
//! change ([`tls`]), the server certificate checked against what the
//! membership lists for the endpoint, defined status codes for accepted,
//! malformed, too large, forbidden and overloaded (back-pressure the client
//! reports as [`client::SendError::Overloaded`]), pooled keep-alive
//! connections and bounded concurrency per peer.
//!
//! The gateway knows nothing of the bus or the membership: the worker that
//! runs it connects the [`server::Inbound`] channel to the bus and supplies
//! a [`server::PeerCheck`] backed by the membership.

#![warn(missing_docs)]

pub mod client;
pub mod server;
pub mod settings;
pub mod tls;
pub mod wire;
mod worker;

pub use client::{ClientConfig, GatewayClient, SendError};
pub use server::{GatewayServer, Inbound, PeerCheck, PeerInfo, ServerConfig};
pub use settings::GatewayArgs;
pub use tls::{RevocationMode, TlsError, TlsMaterial};
pub use wire::{Envelope, WireError, decode_batch, encode_batch};
pub use worker::{GatewayDeps, run};
