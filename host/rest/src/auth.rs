//! Authentication: HTTP basic auth against Argon2id password hashes.

use crate::ApiError;
use axum::http::{HeaderMap, StatusCode, header};
use braid_storage::{Op, Store};
use std::collections::HashSet;
use std::sync::Mutex;

const ADMIN_HASH_KEY: &str = "user/admin/argon2";

/// Checks basic-auth credentials against the stored Argon2id hash. A
/// successful (user, password) pair is remembered as a SHA-256 digest so
/// that each request does not pay for an Argon2 verification.
pub struct Auth {
    hash: String,
    verified: Mutex<HashSet<[u8; 32]>>,
}

impl Auth {
    /// Loads the admin credential, creating it on first start: the
    /// password comes from `password` or is generated and written to
    /// `generated_to` (mode 0600).
    pub async fn init(
        store: &dyn Store,
        password: Option<String>,
        generated_to: &std::path::Path,
    ) -> anyhow::Result<Auth> {
        use argon2::PasswordHasher;
        if let Some(h) = store.meta(ADMIN_HASH_KEY).await? {
            return Ok(Auth {
                hash: String::from_utf8(h)?,
                verified: Mutex::new(HashSet::new()),
            });
        }
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
        let salt = argon2::password_hash::SaltString::encode_b64(&rand::random::<[u8; 16]>())
            .map_err(|e| anyhow::anyhow!("salt: {e}"))?;
        // Argon2::default() is Argon2id, m = 19 MiB, t = 2, p = 1 (OWASP).
        let hash = argon2::Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("hashing password: {e}"))?
            .to_string();
        store
            .write(vec![Op::PutMeta(
                ADMIN_HASH_KEY.into(),
                hash.clone().into_bytes(),
            )])
            .await?;
        Ok(Auth {
            hash,
            verified: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        use argon2::PasswordVerifier;
        use base64::Engine as _;
        use sha2::Digest;
        let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", m);
        let h = headers
            .get(header::AUTHORIZATION)
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
        let (user, pass) = raw
            .split_once(':')
            .ok_or_else(|| unauthorized("malformed basic auth header"))?;
        let digest: [u8; 32] = sha2::Sha256::digest(raw.as_bytes()).into();
        if self.verified.lock().expect("auth cache").contains(&digest) {
            return Ok(());
        }
        let parsed = argon2::PasswordHash::new(&self.hash).map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "AUTH_UNAVAILABLE",
                "stored credential is unreadable",
            )
        })?;
        if user != "admin"
            || argon2::Argon2::default()
                .verify_password(pass.as_bytes(), &parsed)
                .is_err()
        {
            return Err(unauthorized("wrong user name or password"));
        }
        self.verified.lock().expect("auth cache").insert(digest);
        Ok(())
    }
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
