//! [`MapView`]: an immutable, verified snapshot of the network map.

use braid_link::{Identity, PublicKey};
use braid_types::X500Name;

use crate::MemberInfo;

/// A verified network map: the members' records, looked up by name,
/// endpoint, TLS certificate or session key. Only built by verification
/// ([`crate::SignedNetworkMap::verify`]) or as [`MapView::empty`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MapView {
    group: String,
    version: u64,
    issued_ms: u64,
    members: Vec<MemberInfo>,
}

fn trim_endpoint(e: &str) -> &str {
    e.trim_end_matches('/')
}

impl MapView {
    pub(crate) fn new(
        group: String,
        version: u64,
        issued_ms: u64,
        members: Vec<MemberInfo>,
    ) -> Self {
        Self {
            group,
            version,
            issued_ms,
            members,
        }
    }

    /// No members, version 0 (before any map was fetched).
    pub fn empty() -> Self {
        Self::default()
    }

    /// The application network (group) the map is for ("" when empty).
    pub fn group(&self) -> &str {
        &self.group
    }

    /// The map's version (0 when empty).
    pub fn version(&self) -> u64 {
        self.version
    }

    /// When the operator signed this version (ms since the Unix epoch).
    pub fn issued_ms(&self) -> u64 {
        self.issued_ms
    }

    /// Every member's record.
    pub fn members(&self) -> &[MemberInfo] {
        &self.members
    }

    /// The record of the member named `name`.
    pub fn member(&self, name: &X500Name) -> Option<&MemberInfo> {
        self.members.iter().find(|m| &m.name == name)
    }

    /// The first member whose gateway endpoint is `endpoint` (a trailing `/`
    /// is ignored). Several vnodes of one node share an endpoint: see
    /// [`MapView::members_by_endpoint`].
    pub fn member_by_endpoint(&self, endpoint: &str) -> Option<&MemberInfo> {
        let endpoint = trim_endpoint(endpoint);
        self.members
            .iter()
            .find(|m| trim_endpoint(&m.endpoint) == endpoint)
    }

    /// Every member whose gateway endpoint is `endpoint`.
    pub fn members_by_endpoint<'a>(
        &'a self,
        endpoint: &'a str,
    ) -> impl Iterator<Item = &'a MemberInfo> + 'a {
        let endpoint = trim_endpoint(endpoint);
        self.members
            .iter()
            .filter(move |m| trim_endpoint(&m.endpoint) == endpoint)
    }

    /// The (first) member whose leaf TLS certificate is exactly `leaf_der`:
    /// how a gateway decides whether a TLS peer is a current member.
    pub fn is_member_tls_cert(&self, leaf_der: &[u8]) -> Option<&MemberInfo> {
        self.members.iter().find(|m| m.tls_leaf() == Some(leaf_der))
    }

    /// The member whose session key is `key`.
    pub fn member_by_session_key(&self, key: &[u8; 32]) -> Option<&MemberInfo> {
        self.members.iter().find(|m| &m.session_key == key)
    }
}

impl braid_link::Membership for MapView {
    fn session_key(&self, identity: &Identity) -> Option<PublicKey> {
        self.members
            .iter()
            .find(|m| m.name.as_str().as_bytes() == identity.as_bytes())
            .map(|m| PublicKey(m.session_key))
    }

    fn identity_of(&self, key: &PublicKey) -> Option<Identity> {
        self.member_by_session_key(&key.0)
            .map(|m| Identity::from(m.name.as_str()))
    }
}
