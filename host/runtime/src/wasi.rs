//! The WASI imports a flow could block or allocate through, replaced by
//! bounded, journaled versions.
//!
//! wasmtime-wasi's own `wasi:clocks/monotonic-clock` waits in real time
//! inside the host call (so `std::thread::sleep` in a flow held its
//! instance, could not be killed or evicted, and escaped the CPU budget),
//! and its `wasi:io/poll` awaits whatever a pollable says. Here:
//!
//! - the monotonic clock shows the flow's virtual time, and a clock
//!   pollable is just a deadline on it;
//! - `poll` / `pollable.block` with nothing ready and a clock deadline in
//!   the future becomes a *durable sleep* until that deadline (journaled,
//!   suspended, killable and evictable like `braid:flow/host.sleep`);
//! - a wait on anything else that is not ready (it never becomes ready in
//!   a flow: there are no files, sockets or stdin) fails the flow;
//! - `wasi:random` returns at most what fits in the flow's memory budget.
//!
//! Everything else of WASI is wasmtime-wasi's, over a context with no
//! files, environment, arguments or network.

use crate::FlowCtx;
use crate::flow::Stop;
use wasmtime::component::Resource;
use wasmtime_wasi::p2::bindings::clocks::monotonic_clock;
use wasmtime_wasi::p2::bindings::random::{insecure, insecure_seed, random};
use wasmtime_wasi_io::bindings::wasi::io::poll;
use wasmtime_wasi_io::poll::{DynPollable, Pollable};

/// Host memory charged per clock pollable until the flow drops it.
const POLLABLE_BYTES: usize = 128;

/// A deadline on the flow's virtual monotonic clock (ns). Its readiness is
/// decided by [`FlowCtx`]'s `poll`, never by awaiting it.
struct VirtualDeadline;

#[async_trait::async_trait]
impl Pollable for VirtualDeadline {
    async fn ready(&mut self) {
        // Only our `poll` looks at clock pollables, and it never awaits
        // them; anything else awaiting one would wait forever rather than
        // in real time.
        std::future::pending::<()>().await
    }
}

impl FlowCtx {
    /// Virtual monotonic time, ns since the flow was created.
    fn monotonic_now(&self) -> u64 {
        self.st
            .virtual_now_ms()
            .saturating_sub(self.st.created_ms)
            .saturating_mul(1_000_000)
    }

    fn subscribe_deadline(&mut self, at_ns: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.st.count_host_call()?;
        if let Err(why) = self.st.mem.charge(POLLABLE_BYTES, "a clock pollable") {
            return Err(self.st.halt(Stop::Memory(why)));
        }
        let parent = self.table.push(VirtualDeadline)?;
        let p = wasmtime_wasi_io::poll::subscribe(&mut self.table, parent)?;
        self.st.deadlines.insert(p.rep(), at_ns);
        Ok(p)
    }

    /// Indices of the ready pollables, and the earliest clock deadline of
    /// those not ready.
    async fn readiness(
        &mut self,
        pollables: &[Resource<DynPollable>],
    ) -> wasmtime::Result<(Vec<u32>, Option<u64>)> {
        let now = self.monotonic_now();
        let mut ready = Vec::new();
        let mut earliest: Option<u64> = None;
        for (i, p) in pollables.iter().enumerate() {
            let i = u32::try_from(i)?;
            match self.st.deadlines.get(&p.rep()) {
                Some(&at) if at <= now => ready.push(i),
                Some(&at) => earliest = Some(earliest.map_or(at, |e| e.min(at))),
                None => {
                    let borrowed = Resource::<DynPollable>::new_borrow(p.rep());
                    if poll::HostPollable::ready(&mut self.table, borrowed).await? {
                        ready.push(i);
                    }
                }
            }
        }
        Ok((ready, earliest))
    }

    /// `poll`: returns the ready indices, durably sleeping until the
    /// earliest clock deadline when nothing is ready.
    async fn poll_list(
        &mut self,
        pollables: Vec<Resource<DynPollable>>,
    ) -> wasmtime::Result<Vec<u32>> {
        self.st.count_host_call()?;
        if pollables.is_empty() {
            return Err(wasmtime::format_err!("wasi:io/poll.poll: empty poll list"));
        }
        loop {
            let (ready, earliest) = self.readiness(&pollables).await?;
            if !ready.is_empty() {
                return Ok(ready);
            }
            let Some(at_ns) = earliest else {
                let why = "the flow blocked in wasi:io/poll on something that never becomes \
                           ready in a flow (there are no files, sockets or stdin); only clock \
                           waits (std::thread::sleep) are allowed"
                    .to_string();
                return Err(self.st.halt(Stop::Refused(why)));
            };
            // Sleep for what is left until the deadline on the flow's
            // clock, from now (its clock may lag: it only moves at
            // journaled calls). Afterwards the clock shows the wake time,
            // which is at or past the deadline.
            let left_ms = at_ns
                .saturating_sub(self.monotonic_now())
                .div_ceil(1_000_000);
            let wake_ms = self
                .st
                .env
                .now_millis()
                .max(self.st.virtual_now_ms())
                .saturating_add(left_ms);
            self.st.durable_sleep_until(wake_ms).await?;
        }
    }
}

impl poll::Host for FlowCtx {
    async fn poll(&mut self, pollables: Vec<Resource<DynPollable>>) -> wasmtime::Result<Vec<u32>> {
        self.poll_list(pollables).await
    }
}

impl poll::HostPollable for FlowCtx {
    async fn ready(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<bool> {
        self.st.count_host_call()?;
        let (ready, _) = self.readiness(std::slice::from_ref(&p)).await?;
        Ok(!ready.is_empty())
    }

    async fn block(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
        let borrowed = Resource::<DynPollable>::new_borrow(p.rep());
        self.poll_list(vec![borrowed]).await?;
        Ok(())
    }

    fn drop(&mut self, p: Resource<DynPollable>) -> wasmtime::Result<()> {
        if self.st.deadlines.remove(&p.rep()).is_some() {
            self.st.mem.release(POLLABLE_BYTES);
        }
        poll::HostPollable::drop(&mut self.table, p)
    }
}

impl monotonic_clock::Host for FlowCtx {
    fn now(&mut self) -> wasmtime::Result<u64> {
        self.st.count_host_call()?;
        Ok(self.monotonic_now())
    }

    fn resolution(&mut self) -> wasmtime::Result<u64> {
        Ok(1_000_000)
    }

    fn subscribe_instant(&mut self, when: u64) -> wasmtime::Result<Resource<DynPollable>> {
        self.subscribe_deadline(when)
    }

    fn subscribe_duration(&mut self, duration: u64) -> wasmtime::Result<Resource<DynPollable>> {
        let at = self.monotonic_now().saturating_add(duration);
        self.subscribe_deadline(at)
    }
}

impl FlowCtx {
    fn random_len(&mut self, len: u64, which: &str) -> wasmtime::Result<usize> {
        self.st.count_host_call()?;
        // The bytes are copied into the flow's memory, so they must fit
        // in what is left of its budget.
        match usize::try_from(len) {
            Ok(n) if n <= self.st.mem.room() => Ok(n),
            _ => {
                let why = format!(
                    "memory limit exceeded: {which}({len}) asked for more bytes than fit in the \
                     flow's memory budget ({} bytes left of {} MiB)",
                    self.st.mem.room(),
                    self.st.mem.cap() >> 20
                );
                self.st.mem.hit = Some(why.clone());
                Err(self.st.halt(Stop::Memory(why)))
            }
        }
    }
}

impl random::Host for FlowCtx {
    fn get_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        let n = self.random_len(len, "wasi:random/random.get-random-bytes")?;
        let mut out = vec![0u8; n];
        rand::RngExt::fill(&mut self.st.wasi_rng, &mut out[..]);
        Ok(out)
    }

    fn get_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.st.count_host_call()?;
        Ok(rand::RngExt::random(&mut self.st.wasi_rng))
    }
}

impl insecure::Host for FlowCtx {
    fn get_insecure_random_bytes(&mut self, len: u64) -> wasmtime::Result<Vec<u8>> {
        let n = self.random_len(len, "wasi:random/insecure.get-insecure-random-bytes")?;
        let mut out = vec![0u8; n];
        rand::RngExt::fill(&mut self.st.wasi_insecure_rng, &mut out[..]);
        Ok(out)
    }

    fn get_insecure_random_u64(&mut self) -> wasmtime::Result<u64> {
        self.st.count_host_call()?;
        Ok(rand::RngExt::random(&mut self.st.wasi_insecure_rng))
    }
}

impl insecure_seed::Host for FlowCtx {
    fn insecure_seed(&mut self) -> wasmtime::Result<(u64, u64)> {
        let s = self.st.seed;
        Ok((s, s.rotate_left(32) ^ 0x5eed_5eed_5eed_5eed))
    }
}

/// Replaces wasmtime-wasi's clock, poll and random imports in `linker`
/// (which already holds the rest of WASI) with the ones above.
pub(crate) fn shadow_blocking_imports(
    linker: &mut wasmtime::component::Linker<FlowCtx>,
) -> wasmtime::Result<()> {
    use wasmtime::component::HasSelf;
    linker.allow_shadowing(true);
    poll::add_to_linker::<FlowCtx, HasSelf<FlowCtx>>(linker, |c| c)?;
    monotonic_clock::add_to_linker::<FlowCtx, HasSelf<FlowCtx>>(linker, |c| c)?;
    random::add_to_linker::<FlowCtx, HasSelf<FlowCtx>>(linker, |c| c)?;
    insecure::add_to_linker::<FlowCtx, HasSelf<FlowCtx>>(linker, |c| c)?;
    insecure_seed::add_to_linker::<FlowCtx, HasSelf<FlowCtx>>(linker, |c| c)?;
    linker.allow_shadowing(false);
    Ok(())
}
