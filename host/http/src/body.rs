//! Request bodies with a deadline, and response bodies that tell the
//! connection when they are done.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use tokio::time::Sleep;

use crate::conn::Watch;

/// Why reading a request body failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The whole body did not arrive within the body timeout; the client
    /// is answered `408` and disconnected.
    #[error("the request body did not arrive within {0:?}")]
    TimedOut(Duration),
    /// The connection failed while the body was read (closed early,
    /// malformed chunked encoding, …).
    #[error("reading the request body: {0}")]
    Read(#[from] hyper::Error),
}

impl BodyError {
    /// Whether this is [`BodyError::TimedOut`].
    pub fn is_timeout(&self) -> bool {
        matches!(self, BodyError::TimedOut(_))
    }
}

/// The body of a request: hyper's, failing with [`BodyError::TimedOut`]
/// once the body timeout has passed since it was first read.
pub struct RequestBody {
    inner: Incoming,
    timeout: Duration,
    // Started at the first read, so time the handler spends before it
    // reads (checking credentials, say) is not charged to the client.
    deadline: Option<Pin<Box<Sleep>>>,
    timed_out: Arc<AtomicBool>,
}

impl RequestBody {
    pub(crate) fn new(inner: Incoming, timeout: Duration, timed_out: Arc<AtomicBool>) -> Self {
        RequestBody {
            inner,
            timeout,
            deadline: None,
            timed_out,
        }
    }

    fn expire(&mut self) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.timed_out.store(true, Ordering::Relaxed);
        Poll::Ready(Some(Err(BodyError::TimedOut(self.timeout))))
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestBody")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        if this.timed_out.load(Ordering::Relaxed) {
            return this.expire();
        }
        let timeout = this.timeout;
        let deadline = this
            .deadline
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        // Checked before reading too: a client that always has one more
        // byte ready would otherwise never see the timer polled.
        if deadline.is_elapsed() {
            return this.expire();
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(BodyError::Read(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match deadline.as_mut().poll(cx) {
                Poll::Ready(()) => this.expire(),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that marks its connection idle when hyper is done with
/// it (has sent it, or dropped it).
pub(crate) struct ResponseBody {
    inner: axum::body::Body,
    watch: Arc<Watch>,
}

impl ResponseBody {
    pub(crate) fn new(inner: axum::body::Body, watch: Arc<Watch>) -> Self {
        ResponseBody { inner, watch }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        self.watch.response_done();
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
