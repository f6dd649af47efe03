//! Authentication and authorization.
//!
//! - HTTP basic auth against Argon2id password hashes, computed on a
//!   bounded pool with reused memory ([`hashing`]);
//! - a cache of verified credentials: a correct password checked once is
//!   answered without hashing, and never throttled;
//! - a throttle of failed logins per (login, source address) and per
//!   address, with growing locks and bounded memory ([`throttle`]);
//! - the two layers every request passes ([`guard`]): authentication
//!   first, then routing, then authorization of the matched operation.

mod guard;
pub(crate) mod hashing;
pub(crate) mod throttle;

pub(crate) use guard::{authenticate, authorize};

use crate::ApiError;
use crate::rbac::handlers::{is_valid_name, now_ms};
use crate::rbac::{self, RbacState, policy};
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use braid_storage::{Op, Store};
use hashing::{HashError, HashPool};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use throttle::{Locked, Source, Throttle};

/// Where versions before RBAC kept the admin's hash; migrated on start.
const LEGACY_ADMIN_HASH_KEY: &str = "user/admin/argon2";

/// Paths anyone may call without credentials.
pub(crate) const OPEN_PATHS: [&str; 4] = [
    "/api/v1/health",
    "/api/v1/health/ready",
    "/metrics",
    "/api/v1/openapi.json",
];

/// Seconds a client is asked to wait when password hashing is busy.
const BUSY_RETRY_SECS: u64 = 1;

/// The store [`Auth::init`] reads from and, when it is shared, writes
/// user and role changes to.
pub enum AuthStore<'a> {
    /// Shared: every change is durable before the API answers.
    Shared(Arc<dyn Store>),
    /// Borrowed for start-up only: changes made through the API are kept in
    /// memory and lost on restart. Pass an `Arc` instead.
    Borrowed(&'a dyn Store),
}

impl<'a, S: Store> From<&'a S> for AuthStore<'a> {
    fn from(s: &'a S) -> Self {
        AuthStore::Borrowed(s)
    }
}
impl<'a> From<&'a dyn Store> for AuthStore<'a> {
    fn from(s: &'a dyn Store) -> Self {
        AuthStore::Borrowed(s)
    }
}
impl<S: Store> From<Arc<S>> for AuthStore<'static> {
    fn from(s: Arc<S>) -> Self {
        AuthStore::Shared(s)
    }
}
impl From<Arc<dyn Store>> for AuthStore<'static> {
    fn from(s: Arc<dyn Store>) -> Self {
        AuthStore::Shared(s)
    }
}

impl AuthStore<'_> {
    fn get(&self) -> &dyn Store {
        match self {
            AuthStore::Shared(s) => s.as_ref(),
            AuthStore::Borrowed(s) => *s,
        }
    }
}

/// The authenticated caller, put in the request's extensions by
/// [`authenticate`]; handlers take it as an extractor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Login name.
    pub login: String,
}

impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        // Only reachable for a route outside the authentication layer.
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(|| unauthorized("credentials required: use HTTP basic auth"))
    }
}

/// A credential that passed Argon2 verification: a keyed digest of the
/// `user:password` pair and the hash it was checked against (so a password
/// change invalidates it).
struct Verified {
    digest: [u8; 32],
    hash: String,
}

struct Live {
    rbac: Arc<RbacState>,
    /// The stored bytes `rbac` was read from or written as (what a
    /// conditional write expects, and what a reload compares with).
    persisted: Option<Vec<u8>>,
    verified: HashMap<String, Verified>,
    throttle: Throttle,
}

/// Users, roles and credentials; checks requests.
pub struct Auth {
    live: Mutex<Live>,
    /// Serialises changes so each is persisted before the next starts.
    writer: tokio::sync::Mutex<()>,
    store: Option<Arc<dyn Store>>,
    /// Key for the credential-cache digests (never leaves the process).
    cache_key: [u8; 32],
    /// Verified against for unknown users, so they cost the same time.
    dummy_hash: String,
    hashing: HashPool,
    /// Verifications running, by credential digest and hash.
    inflight: Inflight,
}

/// The outcome of a verification once it is known.
type Verdict = Option<Result<bool, HashError>>;
/// Running verifications, by (credential digest, hash), with the channel
/// their outcome arrives on.
type InflightMap = HashMap<([u8; 32], String), tokio::sync::watch::Receiver<Verdict>>;
type Inflight = Arc<Mutex<InflightMap>>;

fn lock_inflight(m: &Inflight) -> std::sync::MutexGuard<'_, InflightMap> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What authentication needs next.
enum Step {
    Done(Principal),
    /// Run Argon2 on `password` against `hash`, then call [`Auth::finish`].
    Verify {
        login: String,
        password: String,
        digest: [u8; 32],
        hash: String,
        known: bool,
    },
}

fn unauthorized(m: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m)
}

fn wrong_credentials() -> ApiError {
    unauthorized("wrong user name or password")
}

fn hash_error(e: HashError) -> ApiError {
    match e {
        HashError::Busy => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "AUTH_BUSY",
            "too many logins are being checked right now; retry in a moment",
        )
        .retry_after(BUSY_RETRY_SECS),
        other => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "UNAVAILABLE",
            format!("could not hash the password ({other}); retry"),
        ),
    }
}

impl Auth {
    /// Loads users and roles, creating them on first start: the built-in
    /// roles and `admin`, whose password comes from `password` or is
    /// generated and written to `generated_to` (mode 0600).
    ///
    /// Pass the store as an `Arc` so that changes made through the API are
    /// persisted; with a plain reference they are kept in memory only.
    pub async fn init<'a>(
        store: impl Into<AuthStore<'a>>,
        password: Option<String>,
        generated_to: &std::path::Path,
    ) -> anyhow::Result<Auth> {
        let store = store.into();
        let hashing = HashPool::for_this_machine();
        let hash = async |password: String| {
            hashing
                .hash(password)
                .await
                .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
        };
        let now = now_ms();
        // Another process of the cluster may be starting on the same store:
        // each write is conditional on what was read, and re-read if not.
        let mut attempt = 0;
        let (state, persisted) = loop {
            attempt += 1;
            let read = store.get().meta(rbac::STATE_KEY).await?;
            let (state, changed) = match &read {
                Some(bytes) => {
                    let mut s: RbacState = parse_state(bytes)?;
                    let changed = s.ensure_builtins(now);
                    (s, changed)
                }
                None => {
                    let admin_hash = match store.get().meta(LEGACY_ADMIN_HASH_KEY).await? {
                        Some(h) => String::from_utf8(h)?,
                        None => {
                            let password = match password.clone() {
                                Some(p) if !p.is_empty() => p,
                                _ => {
                                    use base64::Engine as _;
                                    let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
                                        .encode(rand::random::<[u8; 18]>());
                                    write_secret(generated_to, &p)?;
                                    p
                                }
                            };
                            hash(password).await?
                        }
                    };
                    (RbacState::bootstrap(admin_hash, now), true)
                }
            };
            if !changed {
                break (state, read);
            }
            match persist(store.get(), &state, read).await {
                Ok(bytes) => break (state, Some(bytes)),
                Err(e) if attempt < 10 && is_changed(&e) => continue,
                Err(e) => return Err(e),
            }
        };
        let store = match store {
            AuthStore::Shared(s) => Some(s),
            AuthStore::Borrowed(_) => {
                tracing::warn!(
                    "RBAC: no shared store handle; user and role changes will not survive a restart"
                );
                None
            }
        };
        let dummy_hash = hash("not a password of anyone".into()).await?;
        tracing::info!(workers = hashing.workers(), "password hashing pool ready");
        Ok(Auth {
            live: Mutex::new(Live {
                rbac: Arc::new(state),
                persisted,
                verified: HashMap::new(),
                throttle: Throttle::default(),
            }),
            writer: tokio::sync::Mutex::new(()),
            store,
            cache_key: rand::random(),
            dummy_hash,
            hashing,
            inflight: Arc::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current users and roles.
    pub(crate) fn snapshot(&self) -> Arc<RbacState> {
        self.lock().rbac.clone()
    }

    /// Hashes a new password on the pool (`503 AUTH_BUSY` when it is full).
    pub(crate) async fn hash_password(&self, password: String) -> Result<String, ApiError> {
        self.hashing.hash(password).await.map_err(hash_error)
    }

    /// Applies `change` to a copy of the state, persists it, then makes it
    /// current (dropping cached credentials of users whose hash changed or
    /// who were deleted). Nothing changes when `change` fails, or when it
    /// would leave nobody holding the `Admin` role (`409 LAST_ADMIN`).
    ///
    /// The change is made to the state as stored now (another REST worker
    /// of a cluster may have changed it) and written only if it is still
    /// that; otherwise it is made again on the newer state.
    pub(crate) async fn update<T>(
        &self,
        mut change: impl FnMut(&mut RbacState) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "STORE_UNAVAILABLE",
                format!("could not save users and roles: {e}; retry later"),
            )
        };
        let _w = self.writer.lock().await;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (current, read) = match &self.store {
                Some(store) => {
                    let read = store
                        .meta(rbac::STATE_KEY)
                        .await
                        .map_err(|e| unavailable(&e))?;
                    if read == self.lock().persisted {
                        (self.snapshot(), read)
                    } else {
                        let state = match &read {
                            Some(b) => parse_state(b).map_err(|e| unavailable(&e))?,
                            None => (*self.snapshot()).clone(),
                        };
                        (Arc::new(state), read)
                    }
                }
                None => (self.snapshot(), None),
            };
            let mut next = (*current).clone();
            let out = change(&mut next)?;
            policy::an_admin_remains(&current, &next)?;
            let persisted = match &self.store {
                Some(store) => match persist(store.as_ref(), &next, read).await {
                    Ok(bytes) => Some(bytes),
                    Err(e) if attempt < 20 && is_changed(&e) => continue,
                    Err(e) => return Err(unavailable(&e)),
                },
                None => None,
            };
            self.install(next, persisted);
            return Ok(out);
        }
    }

    /// Makes `next` current, dropping cached credentials of users whose
    /// hash changed or who were deleted.
    fn install(&self, next: RbacState, persisted: Option<Vec<u8>>) {
        let mut live = self.lock();
        live.verified
            .retain(|login, v| next.users.get(login).is_some_and(|u| u.hash == v.hash));
        live.rbac = Arc::new(next);
        live.persisted = persisted;
    }

    /// Reads users and roles from the store again and makes them current
    /// if another process changed them; returns whether they changed.
    pub async fn reload(&self) -> anyhow::Result<bool> {
        let Some(store) = &self.store else {
            return Ok(false);
        };
        let _w = self.writer.lock().await;
        let read = store.meta(rbac::STATE_KEY).await?;
        if read == self.lock().persisted {
            return Ok(false);
        }
        let Some(bytes) = read else {
            anyhow::bail!("the stored users and roles are gone; keeping the ones in memory");
        };
        let state = parse_state(&bytes)?;
        self.install(state, Some(bytes));
        Ok(true)
    }

    /// Reloads users and roles every `every` (REST workers of a cluster,
    /// which others change them beside): a change made through any of
    /// them is enforced by all within that time. Ends when `auth` is the
    /// last reference.
    pub fn follow_store(auth: &Arc<Auth>, every: std::time::Duration) {
        let weak = Arc::downgrade(auth);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(auth) = weak.upgrade() else {
                    return;
                };
                match auth.reload().await {
                    Ok(true) => tracing::info!("users and roles changed elsewhere; reloaded"),
                    Ok(false) => {}
                    Err(e) => tracing::warn!(cause = %e, "could not reload users and roles"),
                }
            }
        });
    }

    fn digest(&self, login: &str, password: &str) -> [u8; 32] {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(self.cache_key);
        h.update(login.as_bytes());
        h.update([0]);
        h.update(password.as_bytes());
        h.finalize().into()
    }

    /// Parses the credentials, answers from the cache when it can, and
    /// otherwise consults the throttle before any hashing.
    fn lookup(
        &self,
        authorization: Option<&HeaderValue>,
        source: Source,
    ) -> Result<Step, ApiError> {
        use base64::Engine as _;
        let h = authorization
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| unauthorized("credentials required: use HTTP basic auth"))?;
        let enc = h
            .strip_prefix("Basic ")
            .ok_or_else(|| unauthorized("only HTTP basic auth is supported"))?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(enc.trim())
            .map_err(|_| unauthorized("malformed basic auth header"))?;
        let raw =
            String::from_utf8(raw).map_err(|_| unauthorized("malformed basic auth header"))?;
        let (login, password) = raw
            .split_once(':')
            .ok_or_else(|| unauthorized("malformed basic auth header"))?;
        // No user can have such a name: nothing to hash, nothing to count
        // (and the throttle's keys stay small).
        if !is_valid_name(login) {
            return Err(wrong_credentials());
        }
        let digest = self.digest(login, password);
        let now = now_ms();
        let live = self.lock();
        let user = live.rbac.users.get(login);
        if let Some(user) = user
            && live
                .verified
                .get(login)
                .is_some_and(|v| v.digest == digest && v.hash == user.hash)
        {
            // Already verified: never throttled, whatever others send (and
            // it does not lift a lock others earned from its address).
            check_expiry(user, now)?;
            return Ok(Step::Done(Principal {
                login: login.to_owned(),
            }));
        }
        if let Err(locked) = live.throttle.check(login, source, now) {
            return Err(throttled(login, locked));
        }
        let (hash, known) = match user {
            Some(u) => (u.hash.clone(), true),
            None => (self.dummy_hash.clone(), false),
        };
        Ok(Step::Verify {
            login: login.to_owned(),
            password: password.to_owned(),
            digest,
            hash,
            known,
        })
    }

    /// Records the outcome of an Argon2 verification.
    fn finish(
        &self,
        login: String,
        source: Source,
        digest: [u8; 32],
        hash: String,
        known: bool,
        ok: bool,
    ) -> Result<Principal, ApiError> {
        let now = now_ms();
        let mut live = self.lock();
        if !known || !ok {
            // Unknown users count like known ones: the throttle tells
            // nobody who exists.
            live.throttle.failure(&login, source, now);
            return Err(wrong_credentials());
        }
        let current = live.rbac.users.get(&login).cloned();
        let Some(user) = current.filter(|u| u.hash == hash) else {
            // Deleted or password changed meanwhile.
            return Err(wrong_credentials());
        };
        live.throttle.success(&login, source);
        live.verified
            .insert(login.clone(), Verified { digest, hash });
        drop(live);
        check_expiry(&user, now)?;
        Ok(Principal { login })
    }

    /// Verifies `password` against `hash` on the pool; concurrent requests
    /// with the same credentials (a client's first burst) share one
    /// verification. It runs as a task of its own, so that it completes
    /// (and leaves [`Auth::inflight`]) even when every request waiting for
    /// it goes away.
    async fn verify_once(
        &self,
        source: Source,
        digest: [u8; 32],
        password: String,
        hash: String,
    ) -> Result<bool, HashError> {
        let key = (digest, hash.clone());
        let mut rx = {
            let mut inflight = lock_inflight(&self.inflight);
            match inflight.get(&key) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = tokio::sync::watch::channel(None);
                    inflight.insert(key.clone(), rx.clone());
                    let pool = self.hashing.clone();
                    let map = self.inflight.clone();
                    tokio::spawn(async move {
                        let verdict = pool.verify(Some(source), password, hash).await;
                        lock_inflight(&map).remove(&key);
                        let _ = tx.send(Some(verdict));
                    });
                    rx
                }
            }
        };
        let verdict = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| HashError::Task("the verification task ended early".into()))?;
        verdict
            .clone()
            .unwrap_or_else(|| Err(HashError::Task("no verdict".into())))
    }

    /// Authenticates a request from `peer` (its source address, when
    /// known): `401`, `429` (throttled) or `503` (hashing busy) when it
    /// does not pass.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        peer: Option<IpAddr>,
    ) -> Result<Principal, ApiError> {
        let source = Source::of(peer);
        match self.lookup(headers.get(header::AUTHORIZATION), source)? {
            Step::Done(p) => Ok(p),
            Step::Verify {
                login,
                password,
                digest,
                hash,
                known,
            } => {
                let ok = match self
                    .verify_once(source, digest, password, hash.clone())
                    .await
                {
                    Ok(ok) => ok,
                    Err(HashError::Unusable(why)) => {
                        tracing::error!(
                            login = %login,
                            cause = %why,
                            "a stored password hash cannot be checked; reset the user's password"
                        );
                        false
                    }
                    Err(e) => return Err(hash_error(e)),
                };
                self.finish(login, source, digest, hash, known, ok)
            }
        }
    }

    /// `403` unless `principal` may perform `operation`.
    pub fn authorize(&self, principal: &Principal, operation: &str) -> Result<(), ApiError> {
        if self.snapshot().allows(&principal.login, operation) {
            Ok(())
        } else {
            Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "FORBIDDEN",
                format!(
                    "user {:?} is not allowed to do this: needs permission for {operation}; \
                     ask a user admin to grant a role that allows it",
                    principal.login
                ),
            ))
        }
    }
}

fn throttled(login: &str, locked: Locked) -> ApiError {
    let (wait_ms, what) = match locked {
        Locked::Login { wait_ms } => (
            wait_ms,
            format!("too many failed logins for user {login:?} from your address"),
        ),
        Locked::Source { wait_ms } => (wait_ms, "too many failed logins from your address".into()),
    };
    let secs = wait_ms.div_ceil(1000).max(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_FAILED_LOGINS",
        format!(
            "{what}; try again in {secs} s (each further failure doubles the wait; a \
             password already accepted keeps working)"
        ),
    )
    .retry_after(secs)
}

fn check_expiry(user: &rbac::User, now: u64) -> Result<(), ApiError> {
    match user.password_expiry_ms {
        Some(at) if now >= at => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "PASSWORD_EXPIRED",
            format!(
                "the password of user {:?} expired at {}; ask an administrator to reset it \
                 (PUT /api/v1/user/{}/password)",
                user.login,
                crate::timestamp(at),
                user.login
            ),
        )),
        _ => Ok(()),
    }
}

/// Writes `state` if the stored one is still `expected`; returns the bytes
/// written.
async fn persist(
    store: &dyn Store,
    state: &RbacState,
    expected: Option<Vec<u8>>,
) -> anyhow::Result<Vec<u8>> {
    let bytes = serde_json::to_vec(state)?;
    store
        .write(vec![Op::PutMetaIf {
            key: rbac::STATE_KEY.into(),
            expected,
            value: bytes.clone(),
        }])
        .await?;
    Ok(bytes)
}

/// Whether `e` says the stored state changed since it was read.
fn is_changed(e: &anyhow::Error) -> bool {
    matches!(
        e.downcast_ref::<braid_storage::StoreError>(),
        Some(braid_storage::StoreError::Changed { .. })
    )
}

fn parse_state(bytes: &[u8]) -> anyhow::Result<RbacState> {
    serde_json::from_slice(bytes)
        .map_err(|e| anyhow::anyhow!("store meta {}: unreadable RBAC state: {e}", rbac::STATE_KEY))
}

fn write_secret(path: &std::path::Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(secret.as_bytes())?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use braid_storage::embedded::EmbeddedStore;

    fn basic(user: &str, pw: &str) -> HeaderMap {
        use base64::Engine as _;
        let mut h = HeaderMap::new();
        let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
        h.insert(
            header::AUTHORIZATION,
            format!("Basic {enc}").parse().unwrap(),
        );
        h
    }

    fn temp_dir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "braid-auth-test-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn users_and_roles_survive_a_restart_and_old_passwords_stop_working() {
        let dir = temp_dir();
        let db = dir.join("store.redb");
        let here = Some(IpAddr::from([127, 0, 0, 1]));
        {
            let store = Arc::new(EmbeddedStore::open(&db).unwrap());
            let auth = Auth::init(store, Some("admin-password".into()), &dir.join("pw"))
                .await
                .unwrap();
            auth.authenticate(&basic("admin", "admin-password"), here)
                .await
                .unwrap();
            let hash = auth.hash_password("bob-password".into()).await.unwrap();
            auth.update(|s| {
                s.users.insert(
                    "bob".into(),
                    rbac::User {
                        login: "bob".into(),
                        hash: hash.clone(),
                        password_expiry_ms: None,
                        roles: [rbac::ROLE_READ_ONLY.to_string()].into(),
                        created_ms: 0,
                    },
                );
                Ok(())
            })
            .await
            .unwrap();
            auth.authenticate(&basic("bob", "bob-password"), here)
                .await
                .unwrap();
            // A new password replaces the cached old one at once.
            let hash = auth.hash_password("bob-password-2".into()).await.unwrap();
            auth.update(|s| {
                s.users.get_mut("bob").unwrap().hash = hash.clone();
                Ok(())
            })
            .await
            .unwrap();
            let e = auth
                .authenticate(&basic("bob", "bob-password"), here)
                .await
                .unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        }
        let store = Arc::new(EmbeddedStore::open(&db).unwrap());
        let auth = Auth::init(store, None, &dir.join("pw")).await.unwrap();
        let bob = auth
            .authenticate(&basic("bob", "bob-password-2"), here)
            .await
            .unwrap();
        auth.authorize(&bob, "GET /api/v1/virtualnode").unwrap();
        let e = auth
            .authorize(&bob, "POST /api/v1/virtualnode")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        auth.authenticate(&basic("admin", "admin-password"), here)
            .await
            .unwrap();
        drop(auth);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_one_credential_costs_one_verification_and_others_are_bounded() {
        let dir = temp_dir();
        let store = EmbeddedStore::open(&dir.join("store.redb")).unwrap();
        let auth = Auth::init(&store, Some("admin-password".into()), &dir.join("pw"))
            .await
            .unwrap();
        let here = Some(IpAddr::from([127, 0, 0, 1]));
        let burst = 4 * auth.hashing.workers() * 5;
        let good = basic("admin", "admin-password");
        let all =
            futures_util::future::join_all((0..burst).map(|_| auth.authenticate(&good, here)));
        for r in all.await {
            r.unwrap();
        }
        assert!(lock_inflight(&auth.inflight).is_empty());
        // Distinct wrong passwords cannot share: past the pool's places
        // (and this address's share of them) they are told to come back.
        let guesses: Vec<HeaderMap> = (0..burst)
            .map(|i| basic(&format!("ghost{i}"), "guess"))
            .collect();
        let all =
            futures_util::future::join_all(guesses.iter().map(|h| auth.authenticate(h, here)));
        let codes: Vec<u16> = all
            .await
            .into_iter()
            .map(|r| r.unwrap_err().status.as_u16())
            .collect();
        assert!(codes.iter().all(|c| [401, 503].contains(c)), "{codes:?}");
        assert!(codes.contains(&503), "{codes:?}");
        assert!(lock_inflight(&auth.inflight).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_verified_password_is_never_throttled_and_other_addresses_are_not_locked() {
        let dir = temp_dir();
        let store = EmbeddedStore::open(&dir.join("store.redb")).unwrap();
        let auth = Auth::init(&store, Some("admin-password".into()), &dir.join("pw"))
            .await
            .unwrap();
        let (home, away, third) = (
            Some(IpAddr::from([127, 0, 0, 1])),
            Some(IpAddr::from([127, 0, 0, 2])),
            Some(IpAddr::from([127, 0, 0, 3])),
        );
        let good = basic("admin", "admin-password");
        auth.authenticate(&good, home).await.unwrap();
        let mut codes = Vec::new();
        for _ in 0..7 {
            let e = auth
                .authenticate(&basic("admin", "guess"), away)
                .await
                .unwrap_err();
            codes.push(e.status.as_u16());
        }
        assert_eq!(codes, [401, 401, 401, 401, 401, 429, 429]);
        // The cached credential passes from anywhere, the locked address
        // included; a fresh verification from elsewhere passes too.
        auth.authenticate(&good, away).await.unwrap();
        auth.authenticate(&good, home).await.unwrap();
        auth.lock().verified.clear();
        auth.authenticate(&good, third).await.unwrap();
        // Unknown users are throttled the same way.
        let mut codes = Vec::new();
        for _ in 0..6 {
            let e = auth
                .authenticate(&basic("ghost", "guess"), third)
                .await
                .unwrap_err();
            codes.push(e.status.as_u16());
        }
        assert_eq!(codes, [401, 401, 401, 401, 401, 429]);
        // Logins no user can have are refused without hashing.
        let e = auth
            .authenticate(&basic(&"x".repeat(10_000), "guess"), third)
            .await
            .unwrap_err();
        assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
