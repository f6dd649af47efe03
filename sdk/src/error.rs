//! Errors a flow sees and returns.

use std::fmt;

use crate::__bindings::braid::flow::types::SessionError as WitSessionError;

/// The result type of flows and SDK calls.
pub type Result<T, E = FlowError> = std::result::Result<T, E>;

/// Why a session operation failed, as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError {
    /// The counterparty's X.500 name is not known to this network: check the
    /// name (`O=..., L=..., C=...`) against the network's members.
    CounterpartyUnknown(String),
    /// The counterparty has no responder for this protocol and these
    /// versions: install a package with a matching `#[responder_flow]` there.
    ProtocolUnsupported(String),
    /// The counterparty closed the session; no more messages will arrive.
    Closed,
    /// The counterparty's flow failed; the text says why.
    CounterpartyFailed(String),
    /// No message arrived within the session timeout.
    TimedOut,
    /// The handle does not name a session of this flow.
    InvalidSession,
    /// The payload (of this many bytes) exceeds the maximum message size.
    TooLarge(u64),
    /// Anything else; the text says what.
    Other(String),
}

impl fmt::Display for SessionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionError::CounterpartyUnknown(name) => write!(f, "counterparty unknown: {name}"),
            SessionError::ProtocolUnsupported(why) => {
                write!(f, "protocol not supported by the counterparty: {why}")
            }
            SessionError::Closed => f.write_str("session closed by the counterparty"),
            SessionError::CounterpartyFailed(why) => write!(f, "counterparty flow failed: {why}"),
            SessionError::TimedOut => f.write_str("timed out waiting for a message"),
            SessionError::InvalidSession => f.write_str("invalid session handle"),
            SessionError::TooLarge(len) => {
                write!(f, "message of {len} bytes exceeds the maximum message size")
            }
            SessionError::Other(why) => write!(f, "session error: {why}"),
        }
    }
}

impl std::error::Error for SessionError {}

impl From<WitSessionError> for SessionError {
    fn from(e: WitSessionError) -> Self {
        match e {
            WitSessionError::CounterpartyUnknown(s) => SessionError::CounterpartyUnknown(s),
            WitSessionError::ProtocolUnsupported(s) => SessionError::ProtocolUnsupported(s),
            WitSessionError::Closed => SessionError::Closed,
            WitSessionError::CounterpartyFailed(s) => SessionError::CounterpartyFailed(s),
            WitSessionError::TimedOut => SessionError::TimedOut,
            WitSessionError::InvalidSession => SessionError::InvalidSession,
            WitSessionError::TooLarge(n) => SessionError::TooLarge(n),
            WitSessionError::Other(s) => SessionError::Other(s),
        }
    }
}

/// Why a flow failed.
///
/// A flow that returns `Err(e)` fails with `e.to_string()` as its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FlowError {
    /// A session operation failed.
    Session(SessionError),
    /// A received message could not be decoded as the expected type: the two
    /// sides disagree on the message types of their protocol.
    Decode {
        /// The Rust type the message was decoded as.
        type_name: &'static str,
        /// What the decoder reported.
        reason: String,
    },
    /// A value could not be encoded (a message to send, or the flow result).
    Encode {
        /// The Rust type of the value.
        type_name: &'static str,
        /// What the encoder reported.
        reason: String,
    },
    /// The client's request body does not match the flow's argument type.
    InvalidArguments(String),
    /// [`Session::initiate`](crate::Session::initiate) was called outside any
    /// `#[initiating_flow]`: use
    /// [`Session::initiate_with`](crate::Session::initiate_with) to name the
    /// protocol.
    NoProtocol,
    /// A failure described by the flow itself.
    Message(String),
}

impl FlowError {
    /// A free-form failure.
    pub fn msg(message: impl fmt::Display) -> Self {
        FlowError::Message(message.to_string())
    }

    /// Whether this is the counterparty having closed the session.
    pub fn is_closed(&self) -> bool {
        matches!(self, FlowError::Session(SessionError::Closed))
    }
}

impl fmt::Display for FlowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FlowError::Session(e) => e.fmt(f),
            FlowError::Decode { type_name, reason } => {
                write!(f, "could not decode message as {type_name}: {reason}")
            }
            FlowError::Encode { type_name, reason } => {
                write!(f, "could not encode {type_name}: {reason}")
            }
            FlowError::InvalidArguments(why) => write!(f, "invalid request body: {why}"),
            FlowError::NoProtocol => f.write_str(
                "Session::initiate called outside an initiating flow; \
                 use Session::initiate_with to name a protocol",
            ),
            FlowError::Message(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for FlowError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            FlowError::Session(e) => Some(e),
            _ => None,
        }
    }
}

impl From<SessionError> for FlowError {
    fn from(e: SessionError) -> Self {
        FlowError::Session(e)
    }
}

impl From<WitSessionError> for FlowError {
    fn from(e: WitSessionError) -> Self {
        FlowError::Session(e.into())
    }
}

impl From<String> for FlowError {
    fn from(message: String) -> Self {
        FlowError::Message(message)
    }
}

impl From<&str> for FlowError {
    fn from(message: &str) -> Self {
        FlowError::Message(message.to_owned())
    }
}
