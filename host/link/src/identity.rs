//! Who is on each end of a link, their session keys, and the membership view
//! that says which key belongs to whom.

use std::collections::HashMap;
use std::fmt;

/// Noise parameters of every link session.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";

/// An identity: a vnode's X.500 name as bytes (the driver encodes it, e.g.
/// `X500Name::to_string().into_bytes()`). Compared bytewise; it is bound into
/// every handshake, so both sides must encode a name the same way.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity(Vec<u8>);

impl Identity {
    /// The name's bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl From<&str> for Identity {
    fn from(name: &str) -> Self {
        Self(name.as_bytes().to_vec())
    }
}

impl From<Vec<u8>> for Identity {
    fn from(name: Vec<u8>) -> Self {
        Self(name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", String::from_utf8_lossy(&self.0))
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Identity({self})")
    }
}

/// An X25519 session public key, as the membership lists it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…")
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A vnode's X25519 session key pair: the Noise static key of its links.
#[derive(Clone)]
pub struct StaticKeypair {
    private: [u8; 32],
    public: PublicKey,
}

impl StaticKeypair {
    /// A fresh key pair from the operating system's random source.
    pub fn generate() -> Result<Self, snow::Error> {
        let kp = snow::Builder::new(noise_params()?).generate_keypair()?;
        Self::from_parts(&kp.private, &kp.public).ok_or(snow::Error::Input)
    }

    /// A key pair from stored bytes (e.g. the vnode's key store).
    pub fn from_parts(private: &[u8], public: &[u8]) -> Option<Self> {
        Some(Self {
            private: private.try_into().ok()?,
            public: PublicKey(public.try_into().ok()?),
        })
    }

    /// The public half, to publish in the membership.
    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// The private half, to store in the node's key store.
    pub fn private_bytes(&self) -> &[u8; 32] {
        &self.private
    }

    pub(crate) fn private(&self) -> &[u8; 32] {
        &self.private
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StaticKeypair")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

pub(crate) fn noise_params() -> Result<snow::params::NoiseParams, snow::Error> {
    NOISE_PARAMS.parse()
}

/// The caller's view of the network map: which session key each member has.
/// A link accepts a peer only when the key it proved it holds is the one
/// listed here for the identity the link was opened for.
pub trait Membership: Send + Sync {
    /// The session key listed for `identity`, if it is a member.
    fn session_key(&self, identity: &Identity) -> Option<PublicKey>;
    /// The member whose session key is `key`, if any (to name a mismatch).
    fn identity_of(&self, key: &PublicKey) -> Option<Identity>;
}

/// A fixed membership view (tests, and a snapshot of the network map).
#[derive(Debug, Clone, Default)]
pub struct StaticMembership {
    keys: HashMap<Identity, PublicKey>,
    owners: HashMap<PublicKey, Identity>,
}

impl StaticMembership {
    /// An empty view.
    pub fn new() -> Self {
        Self::default()
    }

    /// List `identity` with `key` (replacing any earlier key).
    pub fn insert(&mut self, identity: Identity, key: PublicKey) -> &mut Self {
        if let Some(old) = self.keys.insert(identity.clone(), key) {
            self.owners.remove(&old);
        }
        self.owners.insert(key, identity);
        self
    }
}

impl Membership for StaticMembership {
    fn session_key(&self, identity: &Identity) -> Option<PublicKey> {
        self.keys.get(identity).copied()
    }

    fn identity_of(&self, key: &PublicKey) -> Option<Identity> {
        self.owners.get(key).cloned()
    }
}
