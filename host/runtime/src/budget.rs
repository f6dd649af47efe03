//! What one flow instance may consume: memory (its linear memory plus
//! everything the host holds on its behalf), CPU time of its own code, and
//! log volume.
//!
//! All three are checked *before* the host does the work, so a flow cannot
//! make the host allocate, spin or write without bound and then be stopped
//! too late (or never, because the host ran out first).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One flow's memory budget: linear memory and host-held bytes together
/// stay within `cap`.
///
/// Host-held bytes are what the host keeps for the flow until its next
/// checkpoint or until it ends: journal entries not yet committed, outbound
/// messages, messages delivered but not yet read, session state. Each is
/// charged before it is allocated and released once it is handed on.
#[derive(Debug)]
pub(crate) struct MemBudget {
    cap: usize,
    /// Sum of the sizes of the instance's linear memories.
    linear: usize,
    /// Bytes the host holds for the flow.
    held: usize,
    /// Set when a limit was hit: what was being allocated.
    pub hit: Option<String>,
}

impl MemBudget {
    pub(crate) fn new(cap: usize) -> MemBudget {
        MemBudget {
            cap,
            linear: 0,
            held: 0,
            hit: None,
        }
    }

    /// The cap, bytes.
    pub(crate) fn cap(&self) -> usize {
        self.cap
    }

    /// Bytes the host holds for the flow now.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.held
    }

    /// Room left, bytes.
    pub(crate) fn room(&self) -> usize {
        self.cap
            .saturating_sub(self.linear.saturating_add(self.held))
    }

    /// Charges `bytes` held for `what`; `Err` (with the reason recorded)
    /// when that would exceed the cap. Nothing is charged on error.
    pub(crate) fn charge(&mut self, bytes: usize, what: &str) -> Result<(), String> {
        if bytes > self.room() {
            let why = format!(
                "memory limit exceeded: {what} needs {bytes} bytes, but the flow already uses {} \
                 of its {} MiB ({} in linear memory, {} held by the host for it)",
                self.linear + self.held,
                self.cap >> 20,
                self.linear,
                self.held
            );
            self.hit = Some(why.clone());
            return Err(why);
        }
        self.held += bytes;
        Ok(())
    }

    /// Charges `bytes` whatever the cap (for things already in memory that
    /// the flow must be able to see, e.g. its inbox at resume); the next
    /// charge or memory growth then fails if the flow is over.
    pub(crate) fn charge_anyway(&mut self, bytes: usize) {
        self.held = self.held.saturating_add(bytes);
    }

    /// Releases `bytes` charged earlier.
    pub(crate) fn release(&mut self, bytes: usize) {
        self.held = self.held.saturating_sub(bytes);
    }
}

impl wasmtime::ResourceLimiter for MemBudget {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let grow = desired.saturating_sub(current);
        if self.linear.saturating_add(grow).saturating_add(self.held) > self.cap {
            let why = format!(
                "memory limit exceeded: the flow asked to grow its memory to {desired} bytes, \
                 beyond its cap of {} MiB ({} held by the host for it)",
                self.cap >> 20,
                self.held
            );
            self.hit = Some(why.clone());
            return Err(wasmtime::format_err!("{why}"));
        }
        self.linear += grow;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// CPU time of the calling thread, ns (`CLOCK_THREAD_CPUTIME_ID`): it
/// advances only while the thread runs, so time spent waiting for a core
/// under contention is not counted.
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a
    // constant the kernel always supports.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// CPU time one flow instance has used.
///
/// The flow's wasm (and the host calls it makes) runs only inside polls
/// of its future; [`Metered`] measures each poll with the thread's CPU
/// clock. The epoch callback, which runs inside such a poll on the same
/// thread, adds the part of the current poll used so far.
#[derive(Debug, Default)]
pub(crate) struct CpuMeter {
    used_ns: AtomicU64,
    /// Thread CPU time when the current poll began; 0 outside polls.
    poll_start_ns: AtomicU64,
}

impl CpuMeter {
    /// CPU time used so far, including the poll in progress.
    pub(crate) fn used(&self) -> Duration {
        let mut ns = self.used_ns.load(Ordering::Relaxed);
        let start = self.poll_start_ns.load(Ordering::Relaxed);
        if start != 0 {
            ns += thread_cpu_ns().saturating_sub(start);
        }
        Duration::from_nanos(ns)
    }
}

pin_project_lite::pin_project! {
    /// A future whose polls are charged to a [`CpuMeter`].
    pub(crate) struct Metered<F> {
        #[pin]
        inner: F,
        meter: Arc<CpuMeter>,
    }
}

impl<F> Metered<F> {
    pub(crate) fn new(inner: F, meter: Arc<CpuMeter>) -> Metered<F> {
        Metered { inner, meter }
    }
}

impl<F: std::future::Future> std::future::Future for Metered<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        // `max(1)`: 0 means "not in a poll".
        let start = thread_cpu_ns().max(1);
        this.meter.poll_start_ns.store(start, Ordering::Relaxed);
        let out = this.inner.poll(cx);
        let spent = thread_cpu_ns().saturating_sub(start);
        this.meter.poll_start_ns.store(0, Ordering::Relaxed);
        this.meter.used_ns.fetch_add(spent, Ordering::Relaxed);
        out
    }
}

/// A token bucket over bytes of log text: `rate` bytes per second, bursts
/// up to `burst`. Lines that do not fit are dropped and counted; the next
/// line let through reports how many were dropped.
#[derive(Debug)]
pub(crate) struct LogBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
    dropped: u64,
}

/// Bookkeeping cost of one log line beyond its text, bytes.
const LINE_OVERHEAD: usize = 64;

impl LogBucket {
    pub(crate) fn new(rate_per_sec: usize, burst: usize) -> LogBucket {
        LogBucket {
            rate: rate_per_sec as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: Instant::now(),
            dropped: 0,
        }
    }

    /// Whether a line of `len` bytes may be written now; `Some(n)` says `n`
    /// earlier lines were dropped (reported once).
    pub(crate) fn admit(&mut self, len: usize, now: Instant) -> Option<u64> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        let cost = (len + LINE_OVERHEAD) as f64;
        if cost > self.tokens {
            self.dropped += 1;
            return None;
        }
        self.tokens -= cost;
        Some(std::mem::take(&mut self.dropped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter as _;

    #[test]
    fn linear_memory_and_host_held_bytes_share_one_cap() {
        let mut b = MemBudget::new(1000);
        assert!(b.memory_growing(0, 600, None).unwrap());
        b.charge(300, "a send").unwrap();
        let e = b.charge(200, "a send").unwrap_err();
        assert!(e.contains("a send needs 200 bytes"), "{e}");
        assert_eq!(b.held(), 300, "a refused charge charges nothing");
        assert!(b.memory_growing(600, 800, None).is_err());
        b.release(300);
        assert!(b.memory_growing(600, 900, None).unwrap());
        assert_eq!(b.room(), 100);
        b.charge_anyway(500);
        assert_eq!(b.room(), 0);
        assert!(b.charge(1, "x").is_err());
    }

    #[test]
    fn thread_cpu_time_does_not_count_sleep() {
        let t0 = thread_cpu_ns();
        std::thread::sleep(Duration::from_millis(50));
        let slept = thread_cpu_ns() - t0;
        assert!(slept < 20_000_000, "sleeping used {slept} ns of CPU");
        let t1 = thread_cpu_ns();
        let mut x = 0u64;
        let until = Instant::now() + Duration::from_millis(30);
        while Instant::now() < until {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(thread_cpu_ns() - t1 >= 10_000_000, "spinning used no CPU");
    }

    #[test]
    fn log_bucket_drops_beyond_its_rate_and_reports_it() {
        let t = Instant::now();
        let mut b = LogBucket::new(1000, 2000);
        let mut admitted = 0;
        for _ in 0..100 {
            if b.admit(100, t).is_some() {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 12, "2000 bytes of burst / 164 per line");
        // One second later 1000 more bytes: 6 lines, the first reporting 88.
        let later = t + Duration::from_secs(1);
        assert_eq!(b.admit(100, later), Some(88));
        let mut more = 1;
        while b.admit(100, later).is_some() {
            more += 1;
        }
        assert_eq!(more, 6);
    }
}
