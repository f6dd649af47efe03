//! Password hashing on a small fixed pool.
//!
//! Argon2id at braid's parameters needs 19 MiB of memory per hash. Left
//! to itself (a blocking task per login), a flood of logins runs hundreds
//! of hashes at once: gigabytes of memory, which the allocator then keeps.
//! Here at most [`HashPool::workers`] hashes run at once, each in an
//! Argon2 memory area that is allocated once and reused
//! (`hash_password_into_with_memory`); at most `queue` more wait, and one
//! source address may hold only part of the places, so one client cannot
//! take them all. Past that the caller is told to come back later
//! ([`HashError::Busy`], a `503` with `Retry-After`).

use super::throttle::Source;
use argon2::password_hash::{Output, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Semaphore;

/// The largest Argon2 memory a stored hash may ask for, in KiB (braid
/// writes 19 MiB hashes; this leaves room for stronger ones).
const MAX_M_COST: u32 = 64 * 1024;

/// Why a hash could not be computed or checked.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub(crate) enum HashError {
    /// Every place in the pool and its queue is taken (or this source's
    /// share is): retry in a moment.
    #[error("password hashing is busy")]
    Busy,
    /// The stored hash cannot be checked (unreadable, another algorithm,
    /// or parameters beyond what braid accepts): reset the password.
    #[error("the stored password hash cannot be checked: {0}")]
    Unusable(String),
    /// The hashing task failed (a bug): retry.
    #[error("the password hashing task failed: {0}")]
    Task(String),
}

impl From<argon2::password_hash::Error> for HashError {
    fn from(e: argon2::password_hash::Error) -> Self {
        HashError::Unusable(e.to_string())
    }
}

impl From<argon2::Error> for HashError {
    fn from(e: argon2::Error) -> Self {
        HashError::Unusable(e.to_string())
    }
}

#[derive(Debug, Default)]
struct Admitted {
    total: usize,
    by_source: HashMap<Source, usize>,
}

struct Inner {
    workers: Arc<Semaphore>,
    /// Argon2 memory not in use; at most one area per worker ever exists.
    memory: Mutex<Vec<Vec<Block>>>,
    admitted: Mutex<Admitted>,
    /// Running plus waiting.
    capacity: usize,
    /// Running plus waiting, per source address.
    per_source: usize,
}

/// The pool; cheap to clone.
#[derive(Clone)]
pub(crate) struct HashPool {
    inner: Arc<Inner>,
    worker_count: usize,
}

/// A place in the pool, given back on drop (also when the request that
/// holds it is dropped, or its hash panics).
struct Ticket {
    inner: Arc<Inner>,
    source: Option<Source>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut a = lock(&self.inner.admitted);
        a.total -= 1;
        if let Some(s) = self.source
            && let Some(n) = a.by_source.get_mut(&s)
        {
            *n -= 1;
            if *n == 0 {
                a.by_source.remove(&s);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl HashPool {
    /// `workers` hashes at once (at least 1), `queue` more waiting.
    pub(crate) fn new(workers: usize, queue: usize) -> HashPool {
        let workers = workers.max(1);
        let capacity = workers + queue;
        HashPool {
            inner: Arc::new(Inner {
                workers: Arc::new(Semaphore::new(workers)),
                memory: Mutex::new(Vec::new()),
                admitted: Mutex::new(Admitted::default()),
                capacity,
                per_source: capacity.div_ceil(2),
            }),
            worker_count: workers,
        }
    }

    /// One worker per CPU, at most 4 (each holds 19 MiB), and a queue of
    /// four per worker: a login waits at most a few hash times.
    pub(crate) fn for_this_machine() -> HashPool {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let workers = cpus.clamp(1, 4);
        HashPool::new(workers, 4 * workers)
    }

    /// How many hashes run at once.
    pub(crate) fn workers(&self) -> usize {
        self.worker_count
    }

    fn admit(&self, source: Option<Source>) -> Result<Ticket, HashError> {
        let mut a = lock(&self.inner.admitted);
        if a.total >= self.inner.capacity {
            return Err(HashError::Busy);
        }
        if let Some(s) = source {
            let n = a.by_source.entry(s).or_default();
            if *n >= self.inner.per_source {
                return Err(HashError::Busy);
            }
            *n += 1;
        }
        a.total += 1;
        Ok(Ticket {
            inner: self.inner.clone(),
            source,
        })
    }

    /// Runs `job` on a worker with its Argon2 memory.
    async fn run<T: Send + 'static>(
        &self,
        source: Option<Source>,
        job: impl FnOnce(&mut Vec<Block>) -> Result<T, HashError> + Send + 'static,
    ) -> Result<T, HashError> {
        let ticket = self.admit(source)?;
        let permit = self
            .inner
            .workers
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| HashError::Task(e.to_string()))?;
        let inner = self.inner.clone();
        // The ticket and permit move into the task: if the request goes
        // away, the hash still finishes before its place is free again.
        tokio::task::spawn_blocking(move || {
            let _held = (ticket, permit);
            let mut memory = lock(&inner.memory).pop().unwrap_or_default();
            let out = job(&mut memory);
            lock(&inner.memory).push(memory);
            out
        })
        .await
        .map_err(|e| HashError::Task(e.to_string()))?
    }

    /// Whether `password` matches the PHC string `phc`, compared in
    /// constant time.
    pub(crate) async fn verify(
        &self,
        source: Option<Source>,
        password: String,
        phc: String,
    ) -> Result<bool, HashError> {
        self.run(source, move |memory| {
            verify_with(memory, password.as_bytes(), &phc)
        })
        .await
    }

    /// A new Argon2id PHC string for `password`.
    pub(crate) async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(None, move |memory| hash_with(memory, password.as_bytes()))
            .await
    }
}

/// Grows `memory` to `blocks` (never shrinks: it is reused).
fn memory_for(memory: &mut Vec<Block>, blocks: usize) -> &mut [Block] {
    if memory.len() < blocks {
        memory.resize(blocks, Block::default());
    }
    &mut memory[..blocks]
}

/// Hashes `password` with Argon2id (m = 19 MiB, t = 2, p = 1: OWASP's
/// recommendation, the argon2 crate's default) into a PHC string.
pub(crate) fn hash_with(memory: &mut Vec<Block>, password: &[u8]) -> Result<String, HashError> {
    let params = Params::default();
    let salt = SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf)?;
    let mut out = [0u8; Params::DEFAULT_OUTPUT_LEN];
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    argon.hash_password_into_with_memory(
        password,
        salt_bytes,
        &mut out,
        memory_for(memory, params.block_count()),
    )?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: (&params).try_into()?,
        salt: Some(salt.as_salt()),
        hash: Some(Output::new(&out)?),
    };
    Ok(hash.to_string())
}

/// Checks `password` against the PHC string `phc` in `memory`.
pub(crate) fn verify_with(
    memory: &mut Vec<Block>,
    password: &[u8],
    phc: &str,
) -> Result<bool, HashError> {
    let hash = PasswordHash::new(phc)?;
    let algorithm = Algorithm::try_from(hash.algorithm)?;
    let version = hash
        .version
        .map(Version::try_from)
        .transpose()?
        .unwrap_or_default();
    let expected = hash
        .hash
        .ok_or_else(|| HashError::Unusable("it holds no hash".into()))?;
    let params = Params::try_from(&hash)?;
    if params.m_cost() > MAX_M_COST {
        return Err(HashError::Unusable(format!(
            "it needs {} KiB of memory, more than the {MAX_M_COST} KiB braid allows",
            params.m_cost()
        )));
    }
    let salt = hash
        .salt
        .ok_or_else(|| HashError::Unusable("it holds no salt".into()))?;
    let mut salt_buf = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_buf)?;
    let mut out = vec![0u8; expected.len()];
    let blocks = params.block_count();
    Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password,
        salt_bytes,
        &mut out,
        memory_for(memory, blocks),
    )?;
    // Output's equality is constant-time.
    Ok(Output::new(&out)? == expected)
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::{PasswordHasher, PasswordVerifier};

    #[test]
    fn hashes_agree_with_the_argon2_crate_both_ways() {
        let mut memory = Vec::new();
        let ours = hash_with(&mut memory, b"correct horse").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            Argon2::default()
                .verify_password(b"correct horse", &parsed)
                .is_ok()
        );
        assert!(
            Argon2::default()
                .verify_password(b"wrong horse", &parsed)
                .is_err()
        );
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        let theirs = Argon2::default()
            .hash_password(b"battery staple", &salt)
            .unwrap()
            .to_string();
        assert!(verify_with(&mut memory, b"battery staple", &theirs).unwrap());
        assert!(!verify_with(&mut memory, b"battery stapler", &theirs).unwrap());
        // The memory is one area of the default size, reused.
        assert_eq!(memory.len(), Params::DEFAULT_M_COST as usize);
        assert!(verify_with(&mut memory, b"x", "not a phc string").is_err());
        let greedy = "$argon2id$v=19$m=1048576,t=2,p=1$MDEyMzQ1Njc4OWFiY2RlZg$\
                      AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
        assert!(matches!(
            verify_with(&mut memory, b"x", greedy),
            Err(HashError::Unusable(_))
        ));
        assert_eq!(memory.len(), Params::DEFAULT_M_COST as usize);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_pool_is_bounded_overall_and_per_source() {
        let pool = HashPool::new(1, 3);
        let gate = Arc::new(std::sync::Barrier::new(2));
        // One job holds the only worker until the gate opens.
        let g = gate.clone();
        let running = tokio::spawn({
            let pool = pool.clone();
            async move {
                pool.run(Some(Source::V4(1)), move |_| {
                    g.wait();
                    Ok(())
                })
                .await
            }
        });
        // Places: 4 in all, 2 per source.
        let a = Source::V4(1);
        let b = Source::V4(2);
        let wait_admitted = |n: usize| {
            let pool = pool.clone();
            async move {
                while lock(&pool.inner.admitted).total < n {
                    tokio::task::yield_now().await;
                }
            }
        };
        wait_admitted(1).await;
        let queued_a = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(Some(a), |_| Ok(())).await }
        });
        wait_admitted(2).await;
        assert!(matches!(pool.admit(Some(a)), Err(HashError::Busy)));
        let b1 = pool.admit(Some(b)).unwrap();
        let none = pool.admit(None).unwrap();
        assert!(matches!(pool.admit(Some(b)), Err(HashError::Busy)));
        assert!(matches!(pool.admit(None), Err(HashError::Busy)));
        drop((b1, none));
        assert!(pool.admit(Some(b)).is_ok());
        gate.wait();
        running.await.unwrap().unwrap();
        queued_a.await.unwrap().unwrap();
        assert_eq!(lock(&pool.inner.admitted).total, 0);
        assert!(lock(&pool.inner.admitted).by_source.is_empty());
    }

    #[tokio::test]
    async fn the_pool_hashes_and_verifies() {
        let pool = HashPool::new(2, 2);
        let h = pool.hash("a password".into()).await.unwrap();
        assert!(
            pool.verify(Some(Source::Unknown), "a password".into(), h.clone())
                .await
                .unwrap()
        );
        assert!(!pool.verify(None, "another".into(), h).await.unwrap());
        // At most one memory area per worker.
        assert!(lock(&pool.inner.memory).len() <= 2);
    }
}
