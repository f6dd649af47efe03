//! Authentication and authorization: HTTP basic auth against Argon2id
//! password hashes, a per-user failed-login throttle, a per-user cache of
//! verified credentials, and the guard layer that checks every request's
//! `"<METHOD> <path>"` operation against the caller's roles (see
//! [`crate::rbac`]).

use crate::ApiError;
use crate::rbac::{self, RbacState, Throttle, now_ms};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use braid_storage::{Op, Store};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Where versions before RBAC kept the admin's hash; migrated on start.
const LEGACY_ADMIN_HASH_KEY: &str = "user/admin/argon2";

/// Paths anyone may call without credentials.
pub(crate) const OPEN_PATHS: [&str; 4] = [
    "/api/v1/health",
    "/api/v1/health/ready",
    "/metrics",
    "/api/v1/openapi.json",
];

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

/// The authenticated caller, put in the request's extensions by the guard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Login name.
    pub login: String,
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

/// Hashes `password` with Argon2id (m = 19 MiB, t = 2, p = 1: OWASP).
fn hash_now(password: &str) -> Result<String, argon2::password_hash::Error> {
    use argon2::PasswordHasher;
    let salt = argon2::password_hash::SaltString::encode_b64(&rand::random::<[u8; 16]>())?;
    Ok(argon2::Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Hashes on a blocking thread.
pub(crate) async fn hash_password(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || hash_now(&password))
        .await
        .ok()
        .and_then(Result::ok)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "could not hash the password; retry",
            )
        })
}

fn verify(password: &str, hash: &str) -> bool {
    use argon2::PasswordVerifier;
    argon2::PasswordHash::new(hash).is_ok_and(|h| {
        argon2::Argon2::default()
            .verify_password(password.as_bytes(), &h)
            .is_ok()
    })
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
        let now = now_ms();
        let state = match store.get().meta(rbac::STATE_KEY).await? {
            Some(bytes) => {
                let mut s: RbacState = serde_json::from_slice(&bytes).map_err(|e| {
                    anyhow::anyhow!("store meta {}: unreadable RBAC state: {e}", rbac::STATE_KEY)
                })?;
                if s.ensure_builtins(now) {
                    persist(store.get(), &s).await?;
                }
                s
            }
            None => {
                let admin_hash = match store.get().meta(LEGACY_ADMIN_HASH_KEY).await? {
                    Some(h) => String::from_utf8(h)?,
                    None => {
                        let password = match password {
                            Some(p) if !p.is_empty() => p,
                            _ => {
                                use base64::Engine as _;
                                let p = base64::engine::general_purpose::URL_SAFE_NO_PAD
                                    .encode(rand::random::<[u8; 18]>());
                                write_secret(generated_to, &p)?;
                                p
                            }
                        };
                        hash_now(&password).map_err(|e| anyhow::anyhow!("hashing password: {e}"))?
                    }
                };
                let s = RbacState::bootstrap(admin_hash, now);
                persist(store.get(), &s).await?;
                s
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
        Ok(Auth {
            live: Mutex::new(Live {
                rbac: Arc::new(state),
                verified: HashMap::new(),
                throttle: Throttle::default(),
            }),
            writer: tokio::sync::Mutex::new(()),
            store,
            cache_key: rand::random(),
            dummy_hash: hash_now("not a password of anyone")
                .map_err(|e| anyhow::anyhow!("hashing: {e}"))?,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current users and roles.
    pub(crate) fn snapshot(&self) -> Arc<RbacState> {
        self.lock().rbac.clone()
    }

    /// Applies `change` to a copy of the state, persists it, then makes it
    /// current (dropping cached credentials of users whose hash changed or
    /// who were deleted). Nothing changes when `change` fails.
    pub(crate) async fn update<T>(
        &self,
        change: impl FnOnce(&mut RbacState) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        let _w = self.writer.lock().await;
        let mut next = (*self.snapshot()).clone();
        let out = change(&mut next)?;
        if let Some(store) = &self.store {
            persist(store.as_ref(), &next).await.map_err(|e| {
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "STORE_UNAVAILABLE",
                    format!("could not save users and roles: {e}; retry later"),
                )
            })?;
        }
        let mut live = self.lock();
        live.verified
            .retain(|login, v| next.users.get(login).is_some_and(|u| u.hash == v.hash));
        live.rbac = Arc::new(next);
        Ok(out)
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

    /// Parses the credentials and answers from the cache when it can.
    fn lookup(&self, authorization: Option<&HeaderValue>) -> Result<Step, ApiError> {
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
        let digest = self.digest(login, password);
        let now = now_ms();
        let mut live = self.lock();
        if let Err(wait_ms) = live.throttle.check(login, now) {
            return Err(throttled(login, wait_ms));
        }
        let Some(user) = live.rbac.users.get(login) else {
            return Ok(Step::Verify {
                login: login.to_owned(),
                password: password.to_owned(),
                digest,
                hash: self.dummy_hash.clone(),
                known: false,
            });
        };
        if live
            .verified
            .get(login)
            .is_some_and(|v| v.digest == digest && v.hash == user.hash)
        {
            check_expiry(user, now)?;
            // A good login forgets earlier failures, cached or not.
            live.throttle.success(login);
            return Ok(Step::Done(Principal {
                login: login.to_owned(),
            }));
        }
        Ok(Step::Verify {
            login: login.to_owned(),
            password: password.to_owned(),
            digest,
            hash: user.hash.clone(),
            known: true,
        })
    }

    /// Records the outcome of an Argon2 verification.
    fn finish(
        &self,
        login: String,
        digest: [u8; 32],
        hash: String,
        known: bool,
        ok: bool,
    ) -> Result<Principal, ApiError> {
        let now = now_ms();
        let mut live = self.lock();
        if !known {
            return Err(unauthorized("wrong user name or password"));
        }
        let current = live.rbac.users.get(&login).cloned();
        let Some(user) = current.filter(|u| u.hash == hash) else {
            // Deleted or password changed meanwhile.
            return Err(unauthorized("wrong user name or password"));
        };
        if !ok {
            live.throttle.failure(&login, now);
            return Err(unauthorized("wrong user name or password"));
        }
        live.throttle.success(&login);
        live.verified
            .insert(login.clone(), Verified { digest, hash });
        drop(live);
        check_expiry(&user, now)?;
        Ok(Principal { login })
    }

    /// Authenticates, running Argon2 (when the cache cannot answer) on the
    /// current thread.
    fn authenticate_blocking(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        match self.lookup(headers.get(header::AUTHORIZATION))? {
            Step::Done(p) => Ok(p),
            Step::Verify {
                login,
                password,
                digest,
                hash,
                known,
            } => {
                let ok = verify(&password, &hash);
                self.finish(login, digest, hash, known, ok)
            }
        }
    }

    /// Authenticates, running Argon2 (when the cache cannot answer) on a
    /// blocking thread.
    pub async fn authenticate(
        self: &Arc<Self>,
        headers: &HeaderMap,
    ) -> Result<Principal, ApiError> {
        match self.lookup(headers.get(header::AUTHORIZATION))? {
            Step::Done(p) => Ok(p),
            Step::Verify {
                login,
                password,
                digest,
                hash,
                known,
            } => {
                let (ok, hash) =
                    tokio::task::spawn_blocking(move || (verify(&password, &hash), hash))
                        .await
                        .map_err(|_| unauthorized("could not verify the password; retry"))?;
                self.finish(login, digest, hash, known, ok)
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

    /// Checks the request's credentials (401/429 when they do not pass).
    /// Cheap after the guard layer has verified them once.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        self.authenticate_blocking(headers)
    }

    /// Checks the request's credentials and that the caller may perform
    /// `operation` (e.g. `flow:start:<holdingId>:<flowName>`).
    pub(crate) fn permit(&self, headers: &HeaderMap, operation: &str) -> Result<(), ApiError> {
        let p = self.check(headers)?;
        self.authorize(&p, operation)
    }
}

fn throttled(login: &str, wait_ms: u64) -> ApiError {
    let secs = wait_ms.div_ceil(1000).max(1);
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "TOO_MANY_FAILED_LOGINS",
        format!(
            "too many failed logins for user {login:?}; try again in {secs} s \
             (each further failure doubles the wait)"
        ),
    )
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

async fn persist(store: &dyn Store, state: &RbacState) -> anyhow::Result<()> {
    let bytes = serde_json::to_vec(state)?;
    store
        .write(vec![Op::PutMeta(rbac::STATE_KEY.into(), bytes)])
        .await?;
    Ok(())
}

/// Decodes `%XX` escapes so that an operation names what the router will
/// route to (`/api/v1/flow/%30…` is `/api/v1/flow/0…`).
fn decode_path(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The guard layer: authenticates every request except the open paths and
/// authorizes its `"<METHOD> <path>"` operation; puts the [`Principal`] in
/// the request's extensions.
pub(crate) async fn guard(State(auth): State<Arc<Auth>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if OPEN_PATHS.contains(&path) {
        return next.run(req).await;
    }
    let Some(path) = decode_path(path) else {
        return ApiError::bad("INVALID_PATH", "the request path has malformed %-escapes")
            .into_response();
    };
    // HEAD is answered by the GET handler: it needs the same permission.
    let method = match req.method() {
        &axum::http::Method::HEAD => "GET",
        m => m.as_str(),
    };
    let operation = format!("{method} {path}");
    let principal = match auth.authenticate(req.headers()).await {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = auth.authorize(&principal, &operation) {
        return e.into_response();
    }
    req.extensions_mut().insert(principal);
    next.run(req).await
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

    #[tokio::test]
    async fn users_and_roles_survive_a_restart_and_old_passwords_stop_working() {
        let dir = std::env::temp_dir().join(format!(
            "braid-auth-test-{}",
            hex::encode(rand::random::<[u8; 8]>())
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let db = dir.join("store.redb");
        let basic = |user: &str, pw: &str| {
            use base64::Engine as _;
            let mut h = HeaderMap::new();
            let enc = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
            h.insert(
                header::AUTHORIZATION,
                format!("Basic {enc}").parse().unwrap(),
            );
            h
        };
        {
            let store = Arc::new(EmbeddedStore::open(&db).unwrap());
            let auth = Auth::init(store, Some("admin-password".into()), &dir.join("pw"))
                .await
                .unwrap();
            auth.check(&basic("admin", "admin-password")).unwrap();
            let hash = hash_now("bob-password").unwrap();
            auth.update(|s| {
                s.users.insert(
                    "bob".into(),
                    rbac::User {
                        login: "bob".into(),
                        hash,
                        password_expiry_ms: None,
                        roles: [rbac::ROLE_READ_ONLY.to_string()].into(),
                        created_ms: 0,
                    },
                );
                Ok(())
            })
            .await
            .unwrap();
            auth.check(&basic("bob", "bob-password")).unwrap();
            // A new password replaces the cached old one at once.
            let hash = hash_now("bob-password-2").unwrap();
            auth.update(|s| {
                s.users.get_mut("bob").unwrap().hash = hash;
                Ok(())
            })
            .await
            .unwrap();
            let e = auth.check(&basic("bob", "bob-password")).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED);
        }
        let store = Arc::new(EmbeddedStore::open(&db).unwrap());
        let auth = Auth::init(store, None, &dir.join("pw")).await.unwrap();
        let bob = auth.check(&basic("bob", "bob-password-2")).unwrap();
        auth.authorize(&bob, "GET /api/v1/virtualnode").unwrap();
        let e = auth
            .authorize(&bob, "POST /api/v1/virtualnode")
            .unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        auth.check(&basic("admin", "admin-password")).unwrap();
        drop(auth);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn paths_are_percent_decoded() {
        assert_eq!(
            decode_path("/api/v1/flow/%30123").as_deref(),
            Some("/api/v1/flow/0123")
        );
        assert_eq!(decode_path("/a%2Fb").as_deref(), Some("/a/b"));
        assert_eq!(decode_path("/a%2"), None);
        assert_eq!(decode_path("/a%zz"), None);
        assert_eq!(decode_path("/a%ff"), None);
    }
}
