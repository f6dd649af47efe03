//! The network map (membership) of a braid application network.
//!
//! An application network has an operator. Members describe themselves in
//! a [`MemberInfo`] (X.500 name, gateway endpoint, Noise session key, TLS
//! certificate chain) signed with their TLS key ([`SignedMemberInfo`]); the
//! operator's [`MapServer`] verifies and approves records and serves the
//! operator-signed [`SignedNetworkMap`] over the gateway's HTTPS listener.
//! Each node's [`MapClient`] fetches the map, verifies both signatures,
//! persists it, publishes a [`MapView`] on a watch channel and republishes
//! the node's own records. [`MapView`] implements [`braid_link::Membership`],
//! the view the link manager authenticates peers against.
//!
//! [`bootstrap()`] creates a development network (CA, CRL, operator key,
//! per-node certificates and configuration) in one step.

#![warn(missing_docs)]

pub mod bootstrap;
pub mod client;
mod error;
pub mod pki;
pub mod record;
pub mod server;
pub mod view;
pub mod worker;

pub use bootstrap::{
    BootstrapNode, BootstrapOptions, Network, NodeNetworkConfig, Revocation, bootstrap, revoke,
};
pub use client::{MapClient, MapClientConfig};
pub use error::MembershipError;
pub use record::{
    ApprovedMember, MemberInfo, NetworkMap, SignedMemberInfo, SignedNetworkMap, decode_signed_map,
    decode_signed_member,
};
pub use server::{Approval, FileState, MapServer, MapServerConfig, MapStateStore, Registration};
pub use view::MapView;
pub use worker::{MembershipArgs, MembershipDeps, OwnRecords, run};
