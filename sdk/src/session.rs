//! Typed sessions with other flows.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::__bindings::braid::flow::host;
use crate::{__rt as runtime, FlowError, Result};

/// An ordered, reliable two-party message channel to a flow of another
/// identity.
///
/// Messages are any serde type, encoded with postcard; both sides must agree
/// on the type of each message of their protocol.
#[derive(Debug, PartialEq, Eq)]
pub struct Session {
    handle: u64,
}

impl Session {
    pub(crate) fn from_handle(handle: u64) -> Self {
        Session { handle }
    }

    /// Opens a session with `counterparty` (an X.500 name) under the protocol
    /// of the innermost running `#[initiating_flow]`.
    ///
    /// Nothing travels until the first [`send`](Self::send). Fails with
    /// [`FlowError::NoProtocol`] when no initiating flow is running (for
    /// example in a responder flow): use [`initiate_with`](Self::initiate_with)
    /// there.
    pub fn initiate(counterparty: &str) -> Result<Session> {
        let (protocol, versions) = runtime::current_protocol().ok_or(FlowError::NoProtocol)?;
        Session::initiate_with(counterparty, protocol, versions)
    }

    /// Opens a session with `counterparty` under an explicit protocol name,
    /// offering `versions`.
    pub fn initiate_with(counterparty: &str, protocol: &str, versions: &[u32]) -> Result<Session> {
        let handle = host::initiate(counterparty, protocol, versions)?;
        Ok(Session { handle })
    }

    /// Sends one message.
    pub fn send<T: Serialize + ?Sized>(&self, message: &T) -> Result<()> {
        let payload = postcard::to_allocvec(message).map_err(|e| FlowError::Encode {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })?;
        host::send(self.handle, &payload)?;
        Ok(())
    }

    /// Waits for the next message and decodes it as `T`.
    ///
    /// The flow is suspended (and may be evicted and replayed) until the
    /// message arrives. Returns `Err` with [`FlowError::is_closed`] true once
    /// the counterparty has closed the session.
    pub fn receive<T: DeserializeOwned>(&self) -> Result<T> {
        let payload = host::receive(self.handle)?;
        postcard::from_bytes(&payload).map_err(|e| FlowError::Decode {
            type_name: std::any::type_name::<T>(),
            reason: e.to_string(),
        })
    }

    /// Closes the session; the counterparty's next `receive` sees
    /// [`SessionError::Closed`](crate::SessionError::Closed).
    pub fn close(&self) -> Result<()> {
        host::close(self.handle)?;
        Ok(())
    }

    /// The X.500 name of the counterparty.
    pub fn counterparty(&self) -> Result<String> {
        Ok(host::counterparty(self.handle)?)
    }

    /// The protocol version agreed for this session.
    pub fn protocol_version(&self) -> Result<u32> {
        Ok(host::protocol_version(self.handle)?)
    }
}
