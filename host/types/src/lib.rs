//! Identifiers, wire formats and statuses shared by every braid worker.
//!
//! Everything here is plain data. Newtypes are built only through `FromStr`
//! or `TryFrom`, so holding one means it is valid ("parse, don't validate").
//! [`log_limit`] is the one piece of behaviour: rate-limited log lines for
//! the servers that face the network.

pub mod journal;
pub mod log_limit;
pub mod retry;
pub mod settings;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fmt;
use std::str::FromStr;

/// A value failed to parse; the message says which value and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

fn hex_of_len(s: &str, len: usize, what: &str) -> Result<(), ParseError> {
    if s.len() != len
        || !s
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    {
        return Err(ParseError(format!(
            "{what} must be {len} lower-case hex characters, got {s:?}"
        )));
    }
    Ok(())
}

/// An X.500 name such as `O=Alice, L=London, C=GB`.
///
/// Parsing requires `O`, `L` and `C`; the stored form puts one space after
/// each comma so equal names compare equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct X500Name(String);

impl X500Name {
    /// The canonical text form.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for X500Name {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.len() > 512 {
            return Err(ParseError("X.500 name longer than 512 characters".into()));
        }
        let mut parts = Vec::new();
        let mut seen = Vec::new();
        for raw in s.split(',') {
            let part = raw.trim();
            let (k, v) = part.split_once('=').ok_or_else(|| {
                ParseError(format!(
                    "X.500 name {s:?}: attribute {part:?} is not KEY=VALUE"
                ))
            })?;
            let (k, v) = (k.trim(), v.trim());
            if !matches!(k, "CN" | "OU" | "O" | "L" | "ST" | "C") {
                return Err(ParseError(format!(
                    "X.500 name {s:?}: unknown attribute {k:?} (allowed: CN, OU, O, L, ST, C)"
                )));
            }
            if v.is_empty() || v.chars().any(|c| c.is_control() || c == '=') {
                return Err(ParseError(format!(
                    "X.500 name {s:?}: attribute {k} has an empty or invalid value"
                )));
            }
            if seen.contains(&k) {
                return Err(ParseError(format!("X.500 name {s:?}: {k} appears twice")));
            }
            seen.push(k);
            parts.push(format!("{k}={v}"));
        }
        for required in ["O", "L", "C"] {
            if !seen.contains(&required) {
                return Err(ParseError(format!(
                    "X.500 name {s:?} lacks the required attribute {required}"
                )));
            }
        }
        Ok(X500Name(parts.join(", ")))
    }
}

impl TryFrom<String> for X500Name {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<X500Name> for String {
    fn from(n: X500Name) -> String {
        n.0
    }
}

impl fmt::Display for X500Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

macro_rules! hex_id {
    ($(#[$doc:meta])* $name:ident, $len:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name([u8; $len / 2]);

        impl $name {
            /// The raw bytes.
            pub fn bytes(&self) -> &[u8; $len / 2] {
                &self.0
            }
            /// Builds the id from raw bytes.
            pub fn from_bytes(b: [u8; $len / 2]) -> Self {
                $name(b)
            }
        }

        impl FromStr for $name {
            type Err = ParseError;
            fn from_str(s: &str) -> Result<Self, ParseError> {
                hex_of_len(s, $len, stringify!($name))?;
                let mut b = [0u8; $len / 2];
                hex::decode_to_slice(s, &mut b).map_err(|e| ParseError(e.to_string()))?;
                Ok($name(b))
            }
        }

        impl TryFrom<String> for $name {
            type Error = ParseError;
            fn try_from(s: String) -> Result<Self, ParseError> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(v: $name) -> String {
                v.to_string()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&hex::encode(self.0))
            }
        }
    };
}

hex_id!(
    /// A virtual node's short id: the first 6 bytes of SHA-256 over its
    /// X.500 name and group, shown as 12 hex characters.
    HoldingId,
    12
);
hex_id!(
    /// A flow's id: 16 bytes, shown as 32 hex characters.
    FlowId,
    32
);
hex_id!(
    /// A package's id: the SHA-256 of its bytes, 64 hex characters.
    Checksum,
    64
);

impl HoldingId {
    /// The holding id of `name` in application network `group`.
    pub fn derive(name: &X500Name, group: &str) -> HoldingId {
        let d = Sha256::new()
            .chain_update(name.as_str())
            .chain_update([0])
            .chain_update(group)
            .finalize();
        let mut b = [0u8; 6];
        b.copy_from_slice(&d[..6]);
        HoldingId(b)
    }
}

impl Checksum {
    /// The checksum of `bytes`.
    pub fn of(bytes: &[u8]) -> Checksum {
        Checksum(Sha256::digest(bytes).into())
    }
}

impl FlowId {
    /// A fresh random flow id.
    pub fn random() -> FlowId {
        FlowId(rand::random())
    }

    /// The id of the responder flow that a session-init for `session` at
    /// vnode `holding` starts. Derived, so a duplicated init finds the same
    /// flow instead of starting a second one.
    pub fn responder(holding: &HoldingId, session: &SessionId) -> FlowId {
        let d = Sha256::new()
            .chain_update(b"responder")
            .chain_update(holding.0)
            .chain_update(session.initiator_flow.0)
            .chain_update(session.index.to_be_bytes())
            .finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        FlowId(b)
    }
}

/// A client's id for a flow start, unique per vnode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClientRequestId(String);

impl ClientRequestId {
    /// The id as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ClientRequestId {
    type Err = ParseError;
    fn from_str(s: &str) -> Result<Self, ParseError> {
        if s.is_empty() || s.len() > 256 {
            return Err(ParseError(
                "clientRequestId must be 1 to 256 characters".into(),
            ));
        }
        if !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.:@".contains(c))
        {
            return Err(ParseError(format!(
                "clientRequestId {s:?} may contain only letters, digits and - _ . : @"
            )));
        }
        Ok(ClientRequestId(s.to_owned()))
    }
}

impl TryFrom<String> for ClientRequestId {
    type Error = ParseError;
    fn try_from(s: String) -> Result<Self, ParseError> {
        s.parse()
    }
}

impl From<ClientRequestId> for String {
    fn from(v: ClientRequestId) -> String {
        v.0
    }
}

impl fmt::Display for ClientRequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A session's id: the initiating flow and the session's index within it.
/// The initiator's end is found from the id alone; the responder's flow id
/// is derived from it ([`FlowId::responder`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct SessionId {
    /// The flow that opened the session.
    pub initiator_flow: FlowId,
    /// The session's handle in that flow (1, 2, ...).
    pub index: u64,
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.initiator_flow, self.index)
    }
}

/// Which end of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Side {
    /// The end of the flow that opened the session.
    Initiator,
    /// The end of the flow the session-init started.
    Responder,
}

impl Side {
    /// The other end.
    pub fn other(self) -> Side {
        match self {
            Side::Initiator => Side::Responder,
            Side::Responder => Side::Initiator,
        }
    }
}

/// One end of a session: which vnode, and which side.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    /// The vnode hosting this end.
    pub holding: HoldingId,
    /// Its X.500 name.
    pub name: X500Name,
    /// Which side.
    pub side: Side,
}

/// Carried by the first message of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInit {
    /// Protocol the initiator speaks.
    pub protocol: String,
    /// Versions offered.
    pub versions: Vec<u32>,
}

/// Why a session ended badly, as told to the counterparty.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SessionFault {
    /// No responder for the protocol and versions.
    ProtocolUnsupported(String),
    /// The counterparty's flow failed or was killed.
    CounterpartyFailed(String),
    /// The link manager gave up on a message to the counterparty (not
    /// acknowledged within its time-to-live, or too large for the peer).
    /// Carried with sequence number 0: it ends the session at once, ahead
    /// of any message still expected.
    Undeliverable(String),
}

/// What a session message carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Body {
    /// Application payload (postcard-encoded by the SDK).
    Data(Vec<u8>),
    /// The sender closed its end.
    Close,
    /// The sender's end failed.
    Error(SessionFault),
}

/// One message on a session, as carried by the bus and stored in outbox and
/// inbox. `(to, session, seq)` identifies it; receivers drop duplicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionMessage {
    /// The session.
    pub session: SessionId,
    /// Sending end.
    pub from: Endpoint,
    /// Receiving end.
    pub to: Endpoint,
    /// Per-direction sequence number, from 1.
    pub seq: u64,
    /// Present on the first message the initiator sends.
    pub init: Option<SessionInit>,
    /// The content.
    pub body: Body,
}

impl SessionMessage {
    /// The flow that owns the receiving end.
    pub fn destination_flow(&self) -> FlowId {
        match self.to.side {
            Side::Initiator => self.session.initiator_flow,
            Side::Responder => FlowId::responder(&self.to.holding, &self.session),
        }
    }

    /// The answer to this message (a session-init) when its receiver
    /// cannot take the session: `fault` on the session, back to its sender.
    pub fn fault_reply(&self, fault: SessionFault) -> SessionMessage {
        SessionMessage {
            session: self.session,
            from: self.to.clone(),
            to: self.from.clone(),
            seq: 1,
            init: None,
            body: Body::Error(fault),
        }
    }

    /// A stable key naming this message: receiving flow, session,
    /// direction, seq, and the sending vnode (so a message claiming to be
    /// from someone else cannot overwrite the genuine one in an inbox).
    pub fn key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(16 + 16 + 8 + 1 + 8 + 6);
        k.extend_from_slice(self.destination_flow().bytes());
        k.extend_from_slice(self.session.initiator_flow.bytes());
        k.extend_from_slice(&self.session.index.to_be_bytes());
        k.push(self.to.side as u8);
        k.extend_from_slice(&self.seq.to_be_bytes());
        k.extend_from_slice(self.from.holding.bytes());
        k
    }
}

/// A flow's lifecycle state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FlowStatus {
    /// Accepted, not yet run.
    StartRequested,
    /// Running or suspended.
    Running,
    /// Finished with a result.
    Completed,
    /// Finished with an error.
    Failed,
    /// Stopped by an operator.
    Killed,
}

impl FlowStatus {
    /// Whether the flow has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FlowStatus::Completed | FlowStatus::Failed | FlowStatus::Killed
        )
    }
}

/// The class of a flow failure: a stable code for clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum FailureKind {
    /// The flow returned an error.
    FlowFailed,
    /// The flow exceeded its memory cap.
    MemoryLimit,
    /// The flow exceeded its CPU budget.
    CpuLimit,
    /// The flow exceeded its stack limit.
    StackLimit,
    /// The flow sent more messages than allowed between checkpoints.
    OutboundLimit,
    /// Replay diverged from the journal.
    NonDeterminism,
    /// A session failed (counterparty failed, unsupported protocol...).
    SessionError,
    /// The flow trapped (panic, unreachable, bad memory access).
    Trap,
    /// An operator killed the flow.
    Killed,
    /// The flow's package could not be loaded or is not a braid package.
    InvalidPackage,
    /// The flow made more host calls than allowed between two suspensions.
    HostCallLimit,
    /// The flow's journal grew beyond its size limit.
    JournalLimit,
    /// The flow returned a result larger than allowed.
    ResultLimit,
}

/// Why a flow failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowFailure {
    /// The class, a stable code.
    #[serde(rename = "type")]
    pub kind: FailureKind,
    /// What happened, for people.
    pub message: String,
}

impl fmt::Display for FlowFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// How a flow was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FlowStart {
    /// By a client, with a JSON request body (as text).
    Client {
        /// The client's id for the request.
        client_request_id: ClientRequestId,
        /// The JSON request body.
        request_body: String,
    },
    /// By a session-init.
    Responder {
        /// The session.
        session: SessionId,
        /// The initiator's end.
        initiator: Endpoint,
        /// The protocol.
        protocol: String,
        /// The version agreed.
        version: u32,
    },
}

/// What a package offers: one flow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FlowInfo {
    /// Flow name.
    pub name: String,
    /// Startable by clients.
    pub startable: bool,
    /// Protocol this flow initiates.
    pub initiates: Option<Protocol>,
    /// Protocol this flow answers.
    pub responds_to: Option<Protocol>,
}

/// A protocol name and versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Protocol {
    /// Name.
    pub name: String,
    /// Versions.
    pub versions: Vec<u32>,
}

/// The key of a pair of vnodes (one of this node's, by holding id, and a
/// remote one, by name): messages between them are keyed by it on the
/// bus, so a pair's messages keep their order and a cluster's link
/// managers share the pairs by its partition.
pub fn pair_key(local: &HoldingId, remote: &str) -> Vec<u8> {
    let mut key = local.bytes().to_vec();
    key.extend_from_slice(remote.as_bytes());
    key
}

/// Milliseconds since the Unix epoch, now.
pub fn now_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x500_is_canonicalised_and_validated() {
        let a: X500Name = "O=Alice,L=London ,  C=GB".parse().unwrap();
        assert_eq!(a.as_str(), "O=Alice, L=London, C=GB");
        assert!("O=Alice, C=GB".parse::<X500Name>().is_err());
        assert!("O=Alice, L=London, C=GB, X=1".parse::<X500Name>().is_err());
        assert!("garbage".parse::<X500Name>().is_err());
    }

    #[test]
    fn ids_round_trip_and_reject_bad_text() {
        let n: X500Name = "O=Bob, L=Paris, C=FR".parse().unwrap();
        let h = HoldingId::derive(&n, "g");
        assert_eq!(h.to_string().len(), 12);
        assert_eq!(h.to_string().parse::<HoldingId>().unwrap(), h);
        assert!("ABCDEF012345".parse::<HoldingId>().is_err());
        assert!("abc".parse::<HoldingId>().is_err());
        let f = FlowId::random();
        assert_eq!(f.to_string().parse::<FlowId>().unwrap(), f);
    }

    #[test]
    fn responder_flow_id_is_stable_per_session() {
        let n: X500Name = "O=Bob, L=Paris, C=FR".parse().unwrap();
        let h = HoldingId::derive(&n, "g");
        let s = SessionId {
            initiator_flow: FlowId::random(),
            index: 1,
        };
        assert_eq!(FlowId::responder(&h, &s), FlowId::responder(&h, &s));
        let s2 = SessionId { index: 2, ..s };
        assert_ne!(FlowId::responder(&h, &s), FlowId::responder(&h, &s2));
    }
}
