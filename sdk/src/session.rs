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

    /// Sends `message` and waits for the answer, decoded as `T`: the
    /// usual request and reply of a protocol.
    ///
    /// ```no_run
    /// # use braid_sdk::prelude::*;
    /// # fn f(session: Session) -> braid_sdk::Result<()> {
    /// let answer: u64 = session.send_and_receive(&41u64)?;
    /// # Ok(()) }
    /// ```
    pub fn send_and_receive<T: DeserializeOwned, M: Serialize + ?Sized>(
        &self,
        message: &M,
    ) -> Result<T> {
        self.send(message)?;
        self.receive()
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

/// Waits for the next message on any of `sessions`, taking whichever
/// comes first: returns the index (in `sessions`) of the session it came
/// on, with the message decoded as `T`, or that session's error (closed,
/// counterparty failed, timed out). Deterministic on replay: the journal
/// says which session answered.
///
/// Panics if `sessions` is empty.
pub fn receive_any<T: DeserializeOwned>(sessions: &[&Session]) -> (usize, Result<T>) {
    assert!(
        !sessions.is_empty(),
        "receive_any needs at least one session"
    );
    let handles: Vec<u64> = sessions.iter().map(|s| s.handle).collect();
    let index = |h: u64| handles.iter().position(|x| *x == h).unwrap_or(0);
    match host::receive_any(&handles) {
        Ok((h, payload)) => (
            index(h),
            postcard::from_bytes(&payload).map_err(|e| FlowError::Decode {
                type_name: std::any::type_name::<T>(),
                reason: e.to_string(),
            }),
        ),
        Err((h, e)) => (index(h), Err(e.into())),
    }
}

/// Receives one message from each of `sessions`, taking them as they
/// arrive (the flow waits for the slowest, not for each in turn):
/// results in the order of `sessions`, each the message decoded as `T` or
/// that session's error.
///
/// ```no_run
/// # use braid_sdk::prelude::*;
/// # fn f(a: Session, b: Session) -> braid_sdk::Result<()> {
/// let votes: Vec<braid_sdk::Result<bool>> = braid_sdk::receive_all(&[&a, &b]);
/// # Ok(()) }
/// ```
pub fn receive_all<T: DeserializeOwned>(sessions: &[&Session]) -> Vec<Result<T>> {
    let mut results: Vec<Option<Result<T>>> = sessions.iter().map(|_| None).collect();
    let mut waiting: Vec<usize> = (0..sessions.len()).collect();
    while !waiting.is_empty() {
        let on: Vec<&Session> = waiting.iter().map(|&i| sessions[i]).collect();
        let (k, r) = receive_any(&on);
        results[waiting[k]] = Some(r);
        waiting.remove(k);
    }
    results
        .into_iter()
        .map(|r| r.expect("every session answered"))
        .collect()
}
