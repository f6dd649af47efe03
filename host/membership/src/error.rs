//! The one error type of this crate.

use std::path::PathBuf;

/// Everything that can go wrong with member records, the network map, the
/// map server, the map client and the development-network bootstrap.
///
/// Each variant names the member, file or field concerned and says what to
/// do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MembershipError {
    /// The map server's state changed since this server read it (another
    /// map server of the same cluster wrote it): read it again and retry.
    #[error("the network-map server's state changed since it was read")]
    StateChanged,
    /// Bytes from a peer or a file are not a valid postcard encoding of the
    /// expected record. The sender is broken or hostile; nothing was changed.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which record was being decoded (e.g. "signed member info").
        what: &'static str,
        /// The decoder's complaint.
        reason: String,
    },
    /// A certificate, key or CRL could not be parsed. Check the file or
    /// regenerate it with `braid network bootstrap`.
    #[error("invalid {what}: {reason}")]
    InvalidCredential {
        /// Which credential (e.g. "network CA certificate").
        what: &'static str,
        /// Why it was rejected.
        reason: String,
    },
    /// A member's TLS certificate chain does not lead to the network CA (or
    /// is expired, or lacks the TLS client/server usage). The member must use
    /// a certificate issued for this network.
    #[error("member {member}: TLS certificate not issued by the network CA: {reason}")]
    UntrustedCertificate {
        /// The member's X.500 name (as claimed by the record).
        member: String,
        /// The path validation error.
        reason: String,
    },
    /// A member-info record's signature does not verify with its own leaf
    /// TLS certificate's key: the record was altered or signed with another key.
    #[error("member {member}: member-info signature does not verify with its TLS certificate key")]
    BadMemberSignature {
        /// The member's X.500 name (as claimed by the record).
        member: String,
    },
    /// The network map's signature does not verify with the operator key
    /// this node trusts: the map was altered or not signed by the operator.
    #[error("network map (version {version}) is not signed by the network operator's key")]
    BadMapSignature {
        /// The version the (unverified) map claims.
        version: u64,
    },
    /// The network map is for another application network than this node's
    /// (a misconfigured map URL).
    #[error("the network map is for group {got:?}, this node belongs to {expected:?}")]
    WrongGroup {
        /// This node's group.
        expected: String,
        /// The map's group.
        got: String,
    },
    /// A record's content is unacceptable (wrong group, empty chain, ...).
    #[error("member {member}: invalid record: {reason}")]
    InvalidRecord {
        /// The member's X.500 name (as claimed by the record).
        member: String,
        /// What is wrong.
        reason: String,
    },
    /// A re-registration carried a lower serial than the record the operator
    /// holds; republish with a serial above `current`.
    #[error("member {member}: serial {offered} is older than the registered serial {current}")]
    StaleSerial {
        /// The member.
        member: String,
        /// The serial offered.
        offered: u64,
        /// The serial currently registered.
        current: u64,
    },
    /// A re-registration with the same serial but different content: bump
    /// the serial when the record changes.
    #[error(
        "member {member}: serial {serial} is already registered with different content; increase the serial"
    )]
    SerialReused {
        /// The member.
        member: String,
        /// The serial.
        serial: u64,
    },
    /// The name, session key or TLS certificate is already used by another
    /// member. Pick another key/name, or have the operator remove the old one.
    #[error("member {member}: {field} already used by member {other}")]
    Conflict {
        /// The member registering.
        member: String,
        /// What collides: "name", "session key" or "TLS certificate".
        field: &'static str,
        /// The member that already holds it.
        other: String,
    },
    /// No such member (registered, pending or approved) is known.
    #[error("no member named {member}")]
    UnknownMember {
        /// The name looked up.
        member: String,
    },
    /// `approve` was called for a member that is not pending.
    #[error("member {member} is not pending approval")]
    NotPending {
        /// The member.
        member: String,
    },
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("read", "write", "create directory", ...).
        action: &'static str,
        /// The file.
        path: PathBuf,
        /// The operating-system error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration file is invalid JSON or lacks a field.
    #[error("configuration {path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// `bootstrap` found an existing network directory and was not told to
    /// overwrite it: pass `force`, or choose another directory.
    #[error("{path} already holds a network (ca/ exists); pass force to overwrite it")]
    AlreadyExists {
        /// The output directory.
        path: PathBuf,
    },
    /// Invalid bootstrap input (node names, ports).
    #[error("bootstrap: {0}")]
    Bootstrap(String),
    /// Generating or signing with a key or certificate failed.
    #[error("crypto failure while {context}: {reason}")]
    Crypto {
        /// What was being done.
        context: &'static str,
        /// The library's message.
        reason: String,
    },
    /// The map server could not be reached, or answered with an HTTP error.
    #[error("map server {url}: {reason}")]
    Http {
        /// The URL requested.
        url: String,
        /// The transport error or the server's status and text.
        reason: String,
    },
    /// The map server refused a registration: 409 (conflict with another
    /// member, or a serial rule) or 400 (the record is invalid). Retrying
    /// the same record will not help; fix the record.
    #[error("map server {url} refused the registration ({status}): {reason}")]
    Refused {
        /// The URL requested.
        url: String,
        /// The HTTP status (409 or 400).
        status: u16,
        /// The server's reason text.
        reason: String,
    },
}

impl MembershipError {
    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        source: std::io::Error,
    ) -> Self {
        Self::Io {
            action,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn crypto(context: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::Crypto {
            context,
            reason: reason.to_string(),
        }
    }

    pub(crate) fn credential(what: &'static str, reason: impl std::fmt::Display) -> Self {
        Self::InvalidCredential {
            what,
            reason: reason.to_string(),
        }
    }

    /// True when the error is a conflict with another member (HTTP 409).
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            Self::Conflict { .. } | Self::Refused { status: 409, .. }
        )
    }
}
