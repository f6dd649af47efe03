//! The operator's side: the map server that collects member records,
//! approves them, signs the network map and serves it.
//!
//! [`MapServer::router`] is plain HTTP routing; the gateway's HTTPS listener
//! (mutual TLS under the network CA) serves it.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use braid_types::X500Name;
use serde::{Deserialize, Serialize};

use crate::pki;
use crate::{
    ApprovedMember, MemberInfo, MembershipError, NetworkMap, SignedMemberInfo, SignedNetworkMap,
    decode_signed_member,
};

/// Path of the registration endpoint (POST, postcard [`SignedMemberInfo`]).
pub const MEMBERS_PATH: &str = "/network/v1/members";
/// Path of the map endpoint (GET, postcard [`SignedNetworkMap`]).
pub const MAP_PATH: &str = "/network/v1/map";
/// Response header carrying the served map's version.
pub const MAP_VERSION_HEADER: &str = "x-braid-map-version";
/// Largest request body the router accepts.
pub const MAX_BODY: usize = 1 << 20;

/// How new members are approved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Approval {
    /// Every valid registration is approved at once.
    #[default]
    Auto,
    /// Registrations wait in [`MapServer::pending`] for [`MapServer::approve`].
    Manual,
}

/// The outcome of a registration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Registration {
    /// The member is in the map.
    Approved,
    /// The member waits for the operator's approval.
    Pending,
}

/// Where a [`MapServer`] keeps its state (members, approvals, the map's
/// version): a file ([`FileState`]), or the node's store (so that in
/// cluster mode it lives in PostgreSQL with everything else).
pub trait MapStateStore: Send + Sync + std::fmt::Debug + 'static {
    /// The state last saved, if any.
    fn load(&self) -> Result<Option<Vec<u8>>, MembershipError>;
    /// Saves the state durably; returns once it is.
    fn save(&self, bytes: &[u8]) -> Result<(), MembershipError>;
    /// Saves the state only if it still holds `expected` (what this server
    /// last read or wrote), else [`MembershipError::StateChanged`]: for a
    /// state several map servers share (a cluster's gateways). Default:
    /// [`MapStateStore::save`], for a state one server writes.
    fn save_if(&self, expected: Option<&[u8]>, bytes: &[u8]) -> Result<(), MembershipError> {
        let _ = expected;
        self.save(bytes)
    }
    /// Where it is, for error messages.
    fn location(&self) -> PathBuf;
}

/// State in a file, replaced atomically (write, fsync, rename, fsync).
#[derive(Debug, Clone)]
pub struct FileState(PathBuf);

impl FileState {
    /// State in `path` (created on the first save).
    pub fn new(path: impl Into<PathBuf>) -> FileState {
        FileState(path.into())
    }
}

impl MapStateStore for FileState {
    fn load(&self) -> Result<Option<Vec<u8>>, MembershipError> {
        match std::fs::read(&self.0) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(MembershipError::io("read", &self.0, e)),
        }
    }

    fn save(&self, bytes: &[u8]) -> Result<(), MembershipError> {
        pki::write_atomic(&self.0, bytes)
    }

    fn location(&self) -> PathBuf {
        self.0.clone()
    }
}

/// Configuration of a [`MapServer`].
#[derive(Debug, Clone)]
pub struct MapServerConfig {
    /// Where the server's state is kept (created if missing).
    pub state: std::sync::Arc<dyn MapStateStore>,
    /// The application network (group) this map is for.
    pub group: String,
    /// The operator's ECDSA P-256 key, PKCS#8 DER (PEM accepted too).
    pub operator_key_pkcs8_der: Vec<u8>,
    /// The network CA certificate, DER (PEM accepted too).
    pub network_ca_der: Vec<u8>,
    /// Automatic or manual approval.
    pub approval: Approval,
    /// Members not heard from for longer than this are dropped.
    pub event_horizon: Duration,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PersistedEntry {
    signed: SignedMemberInfo,
    approved: bool,
    approved_ms: u64,
    last_seen_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PersistedState {
    group: String,
    version: u64,
    members: Vec<PersistedEntry>,
}

#[derive(Debug, Clone)]
struct Entry {
    persisted: PersistedEntry,
    info: MemberInfo,
    leaf_spki: Vec<u8>,
}

#[derive(Debug)]
struct Inner {
    version: u64,
    entries: Vec<Entry>,
    signed: SignedNetworkMap,
    /// The state's bytes as this server last read or wrote them.
    stored: Option<Vec<u8>>,
}

/// How many times a change is tried again on a state another map server
/// keeps changing.
const MAX_RETRIES: usize = 16;

/// The network-map server of an application network (run by the operator).
#[derive(Debug)]
pub struct MapServer {
    config: MapServerConfig,
    operator_key: Vec<u8>,
    ca_der: Vec<u8>,
    inner: Mutex<Inner>,
}

fn leaf_spki(info: &MemberInfo) -> Result<Vec<u8>, MembershipError> {
    let leaf = info
        .tls_leaf()
        .ok_or_else(|| MembershipError::InvalidRecord {
            member: info.name.to_string(),
            reason: "empty TLS certificate chain".into(),
        })?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| MembershipError::InvalidRecord {
            member: info.name.to_string(),
            reason: format!("leaf certificate does not parse: {e}"),
        })?;
    Ok(cert.tbs_certificate.subject_pki.raw.to_vec())
}

impl MapServer {
    /// Opens (or creates) the server state in `config.state`. Fails if
    /// the operator key or CA is unusable, or the state file is corrupt or
    /// belongs to another group.
    pub fn open(config: MapServerConfig) -> Result<Self, MembershipError> {
        let operator_key = pki::pkcs8_from_pem_or_der(&config.operator_key_pkcs8_der)?;
        pki::p256_spki_of(&operator_key)?;
        let ca_der = pki::cert_from_pem_or_der(&config.network_ca_der)?;
        let stored = config.state.load()?;
        let fresh = stored.is_none();
        let (version, entries) = match &stored {
            Some(bytes) => decode_state(&config, bytes)?,
            None => (1, Vec::new()),
        };
        let signed = sign_map(&config.group, version, &entries, &operator_key)?;
        let server = Self {
            config,
            operator_key,
            ca_der,
            inner: Mutex::new(Inner {
                version,
                entries,
                signed,
                stored,
            }),
        };
        if fresh {
            let mut inner = server.lock();
            match server.persist(inner.version, &inner.entries, None) {
                Ok(bytes) => inner.stored = Some(bytes),
                // Another map server made it meanwhile: use its.
                Err(MembershipError::StateChanged) => server.reload(&mut inner)?,
                Err(e) => return Err(e),
            }
        }
        Ok(server)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the state if the stored one is still `expected`; returns the
    /// bytes written.
    fn persist(
        &self,
        version: u64,
        entries: &[Entry],
        expected: Option<&[u8]>,
    ) -> Result<Vec<u8>, MembershipError> {
        let state = PersistedState {
            group: self.config.group.clone(),
            version,
            members: entries.iter().map(|e| e.persisted.clone()).collect(),
        };
        let bytes = postcard::to_allocvec(&state)
            .map_err(|e| MembershipError::crypto("encoding map server state", e))?;
        self.config.state.save_if(expected, &bytes)?;
        Ok(bytes)
    }

    /// Makes `entries` the new state: next version, signed, persisted. The
    /// in-memory state changes only if persisting succeeded.
    fn commit(&self, inner: &mut Inner, entries: Vec<Entry>) -> Result<(), MembershipError> {
        let version = inner.version + 1;
        let signed = sign_map(&self.config.group, version, &entries, &self.operator_key)?;
        let bytes = self.persist(version, &entries, inner.stored.as_deref())?;
        inner.version = version;
        inner.entries = entries;
        inner.signed = signed;
        inner.stored = Some(bytes);
        Ok(())
    }

    /// Reads the state again (another map server changed it).
    fn reload(&self, inner: &mut Inner) -> Result<(), MembershipError> {
        let stored = self.config.state.load()?;
        self.adopt(inner, stored)
    }

    fn adopt(&self, inner: &mut Inner, stored: Option<Vec<u8>>) -> Result<(), MembershipError> {
        let (version, entries) = match &stored {
            Some(bytes) => decode_state(&self.config, bytes)?,
            None => (1, Vec::new()),
        };
        inner.signed = sign_map(&self.config.group, version, &entries, &self.operator_key)?;
        inner.version = version;
        inner.entries = entries;
        inner.stored = stored;
        Ok(())
    }

    /// Applies `change` (the new entries from the current ones, and what
    /// to answer) and commits it; on a state another map server changed
    /// meanwhile, reads it again and applies `change` to that.
    fn update<T>(
        &self,
        mut change: impl FnMut(&[Entry]) -> Result<(Vec<Entry>, T), MembershipError>,
    ) -> Result<T, MembershipError> {
        let mut inner = self.lock();
        for _ in 0..MAX_RETRIES {
            let (entries, out) = match change(&inner.entries) {
                Ok(c) => c,
                Err(e) => {
                    // Refused on this copy: say so only if it is the
                    // stored state (another map server may have made the
                    // change this one refuses on).
                    let stored = self.config.state.load()?;
                    if stored == inner.stored {
                        return Err(e);
                    }
                    self.adopt(&mut inner, stored)?;
                    continue;
                }
            };
            match self.commit(&mut inner, entries) {
                Ok(()) => return Ok(out),
                Err(MembershipError::StateChanged) => self.reload(&mut inner)?,
                Err(e) => return Err(e),
            }
        }
        Err(MembershipError::StateChanged)
    }

    /// Reads the state again if another map server changed it since this
    /// one last did; true if it had.
    pub fn refresh(&self) -> Result<bool, MembershipError> {
        let mut inner = self.lock();
        let stored = self.config.state.load()?;
        if stored == inner.stored {
            return Ok(false);
        }
        self.adopt(&mut inner, stored)?;
        Ok(true)
    }

    /// Runs [`MapServer::refresh`] every `every` forever (spawn it where
    /// several map servers share the state, so that each serves the map
    /// the others changed).
    pub async fn run_refresh(self: Arc<Self>, every: Duration) {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let server = self.clone();
            match tokio::task::spawn_blocking(move || server.refresh()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::warn!(cause = %e, "reading the network map server's state failed")
                }
                Err(e) => tracing::warn!(cause = %e, "the network map refresh task failed"),
            }
        }
    }

    /// The group this server maps.
    pub fn group(&self) -> &str {
        &self.config.group
    }

    /// Verifies and records a member's registration.
    ///
    /// - A new name is approved (auto) or held pending (manual).
    /// - A higher serial replaces the record (keeping its approval) and
    ///   refreshes last-seen; an equal serial with identical bytes only
    ///   refreshes last-seen; an equal serial with other bytes
    ///   ([`MembershipError::SerialReused`]) or a lower one
    ///   ([`MembershipError::StaleSerial`]) is refused.
    /// - [`MembershipError::Conflict`] when the name is held by a record
    ///   signed with another TLS key, the session key is another member's,
    ///   or the TLS key is another member's at a different endpoint (vnodes
    ///   of one node share the node's certificate and gateway endpoint).
    pub fn register(&self, signed: SignedMemberInfo) -> Result<Registration, MembershipError> {
        let now = pki::now_ms();
        let info = signed.verify_with_ca_der(&self.ca_der, now)?;
        let member = info.name.to_string();
        if info.group != self.config.group {
            return Err(MembershipError::InvalidRecord {
                member,
                reason: format!(
                    "group {:?}, this map server serves group {:?}",
                    info.group, self.config.group
                ),
            });
        }
        let spki = leaf_spki(&info)?;
        self.update(|current| {
            Self::registered(
                current,
                &self.config,
                signed.clone(),
                info.clone(),
                spki.clone(),
                now,
            )
        })
    }

    /// `current` with `signed` registered, and the answer.
    fn registered(
        current: &[Entry],
        config: &MapServerConfig,
        signed: SignedMemberInfo,
        info: MemberInfo,
        spki: Vec<u8>,
        now: u64,
    ) -> Result<(Vec<Entry>, Registration), MembershipError> {
        let member = info.name.to_string();
        let existing = current.iter().position(|e| e.info.name == info.name);
        for e in current {
            if e.info.name == info.name {
                continue;
            }
            if e.info.session_key == info.session_key {
                return Err(MembershipError::Conflict {
                    member,
                    field: "session key",
                    other: e.info.name.to_string(),
                });
            }
            if e.leaf_spki == spki
                && e.info.endpoint.trim_end_matches('/') != info.endpoint.trim_end_matches('/')
            {
                return Err(MembershipError::Conflict {
                    member,
                    field: "TLS certificate",
                    other: e.info.name.to_string(),
                });
            }
        }
        let mut entries = current.to_vec();
        let outcome = match existing {
            Some(i) => {
                let e = &mut entries[i];
                if e.leaf_spki != spki {
                    return Err(MembershipError::Conflict {
                        member: member.clone(),
                        field: "name (registered with another TLS key)",
                        other: member,
                    });
                }
                let current = e.info.serial;
                if info.serial < current {
                    return Err(MembershipError::StaleSerial {
                        member,
                        offered: info.serial,
                        current,
                    });
                }
                if info.serial == current && e.persisted.signed.info != signed.info {
                    return Err(MembershipError::SerialReused {
                        member,
                        serial: current,
                    });
                }
                if info.serial > current {
                    tracing::info!(member = %member, serial = info.serial, "member record updated");
                }
                e.persisted.signed = signed;
                e.persisted.last_seen_ms = now;
                e.info = info;
                if e.persisted.approved {
                    Registration::Approved
                } else {
                    Registration::Pending
                }
            }
            None => {
                let approved = config.approval == Approval::Auto;
                tracing::info!(member = %member, approved, "member registered");
                entries.push(Entry {
                    persisted: PersistedEntry {
                        signed,
                        approved,
                        approved_ms: if approved { now } else { 0 },
                        last_seen_ms: now,
                    },
                    info,
                    leaf_spki: spki,
                });
                if approved {
                    Registration::Approved
                } else {
                    Registration::Pending
                }
            }
        };
        Ok((entries, outcome))
    }

    /// Approves a pending member: it enters the map.
    pub fn approve(&self, name: &X500Name) -> Result<(), MembershipError> {
        self.update(|current| {
            let mut entries = current.to_vec();
            let e = entries
                .iter_mut()
                .find(|e| &e.info.name == name)
                .ok_or_else(|| MembershipError::UnknownMember {
                    member: name.to_string(),
                })?;
            if e.persisted.approved {
                return Err(MembershipError::NotPending {
                    member: name.to_string(),
                });
            }
            e.persisted.approved = true;
            e.persisted.approved_ms = pki::now_ms();
            Ok((entries, ()))
        })?;
        tracing::info!(member = %name, "member approved");
        Ok(())
    }

    /// Removes a member, pending or approved (an approved member leaves the
    /// map). It may register again.
    pub fn reject(&self, name: &X500Name) -> Result<(), MembershipError> {
        self.update(|current| {
            let entries: Vec<Entry> = current
                .iter()
                .filter(|e| &e.info.name != name)
                .cloned()
                .collect();
            if entries.len() == current.len() {
                return Err(MembershipError::UnknownMember {
                    member: name.to_string(),
                });
            }
            Ok((entries, ()))
        })?;
        tracing::info!(member = %name, "member removed by the operator");
        Ok(())
    }

    /// Records waiting for approval.
    pub fn pending(&self) -> Vec<MemberInfo> {
        self.lock()
            .entries
            .iter()
            .filter(|e| !e.persisted.approved)
            .map(|e| e.info.clone())
            .collect()
    }

    /// Approved members' records (what the map lists).
    pub fn members(&self) -> Vec<MemberInfo> {
        self.lock()
            .entries
            .iter()
            .filter(|e| e.persisted.approved)
            .map(|e| e.info.clone())
            .collect()
    }

    /// The current signed map (re-signed on every change).
    pub fn signed_map(&self) -> SignedNetworkMap {
        self.lock().signed.clone()
    }

    /// The current map version.
    pub fn version(&self) -> u64 {
        self.lock().version
    }

    /// Drops every member (approved or pending) last heard from more than
    /// the event horizon before `now_ms`; returns their names.
    pub fn expire(&self, now_ms: u64) -> Result<Vec<X500Name>, MembershipError> {
        let horizon = self.config.event_horizon.as_millis() as u64;
        let stale = |e: &Entry| e.persisted.last_seen_ms.saturating_add(horizon) < now_ms;
        if !self.lock().entries.iter().any(stale) {
            return Ok(Vec::new());
        }
        let gone = self.update(|current| {
            let (gone, kept): (Vec<Entry>, Vec<Entry>) =
                current.iter().cloned().partition(|e| stale(e));
            Ok((kept, gone))
        })?;
        for e in &gone {
            tracing::info!(
                member = %e.info.name,
                last_seen_ms = e.persisted.last_seen_ms,
                "member dropped: not heard from within the event horizon"
            );
        }
        Ok(gone.into_iter().map(|e| e.info.name).collect())
    }

    /// Runs [`MapServer::expire`] periodically (every tenth of the horizon,
    /// between 1 s and 60 s) forever; spawn it.
    pub async fn run_expiry(self: Arc<Self>) {
        let tick =
            (self.config.event_horizon / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let server = self.clone();
            match tokio::task::spawn_blocking(move || server.expire(pki::now_ms())).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(cause = %e, "network map expiry failed"),
                Err(e) => tracing::warn!(cause = %e, "network map expiry task failed"),
            }
        }
    }

    /// HTTP routes (no TLS: the gateway's HTTPS listener serves them):
    /// `POST /network/v1/members` (postcard [`SignedMemberInfo`]; 200
    /// approved, 202 pending, 400 invalid, 409 conflict or serial refused,
    /// 413 over 1 MiB) and `GET /network/v1/map` (postcard
    /// [`SignedNetworkMap`], header `x-braid-map-version`).
    pub fn router(self: Arc<Self>) -> Router {
        Router::new()
            .route(MEMBERS_PATH, post(register_handler))
            .route(MAP_PATH, get(map_handler))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(self)
    }
}

/// The version and entries of the state `bytes` (of `config`'s group).
fn decode_state(
    config: &MapServerConfig,
    bytes: &[u8],
) -> Result<(u64, Vec<Entry>), MembershipError> {
    let state: PersistedState =
        postcard::from_bytes(bytes).map_err(|e| MembershipError::Config {
            path: config.state.location(),
            reason: format!("map server state does not decode: {e}"),
        })?;
    if state.group != config.group {
        return Err(MembershipError::Config {
            path: config.state.location(),
            reason: format!(
                "state is for group {:?}, configured group is {:?}",
                state.group, config.group
            ),
        });
    }
    let mut entries = Vec::with_capacity(state.members.len());
    for p in state.members {
        let info = p.signed.info_unverified()?;
        let leaf_spki = leaf_spki(&info)?;
        entries.push(Entry {
            persisted: p,
            info,
            leaf_spki,
        });
    }
    Ok((state.version, entries))
}

fn sign_map(
    group: &str,
    version: u64,
    entries: &[Entry],
    operator_key: &[u8],
) -> Result<SignedNetworkMap, MembershipError> {
    let map = NetworkMap {
        group: group.to_owned(),
        version,
        issued_ms: pki::now_ms(),
        members: entries
            .iter()
            .filter(|e| e.persisted.approved)
            .map(|e| ApprovedMember {
                member: e.persisted.signed.clone(),
                approved_ms: e.persisted.approved_ms,
                last_seen_ms: e.persisted.last_seen_ms,
            })
            .collect(),
    };
    SignedNetworkMap::sign(&map, operator_key)
}

async fn register_handler(State(server): State<Arc<MapServer>>, body: Bytes) -> Response {
    let signed = match decode_signed_member(&body) {
        Ok(s) => s,
        Err(e) => return (StatusCode::BAD_REQUEST, e.to_string()).into_response(),
    };
    let result = tokio::task::spawn_blocking(move || server.register(signed)).await;
    match result {
        Ok(Ok(Registration::Approved)) => (StatusCode::OK, "approved").into_response(),
        Ok(Ok(Registration::Pending)) => (StatusCode::ACCEPTED, "pending").into_response(),
        Ok(Err(e)) => {
            let status = match &e {
                MembershipError::Conflict { .. }
                | MembershipError::StaleSerial { .. }
                | MembershipError::SerialReused { .. } => StatusCode::CONFLICT,
                MembershipError::Io { .. } | MembershipError::Crypto { .. } => {
                    StatusCode::INTERNAL_SERVER_ERROR
                }
                _ => StatusCode::BAD_REQUEST,
            };
            tracing::info!(cause = %e, status = status.as_u16(), "registration refused");
            (status, e.to_string()).into_response()
        }
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn map_handler(State(server): State<Arc<MapServer>>) -> Response {
    let (version, bytes) = {
        let inner = server.lock();
        (inner.version, inner.signed.to_bytes())
    };
    (
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (
                header::HeaderName::from_static(MAP_VERSION_HEADER),
                version.to_string(),
            ),
        ],
        bytes,
    )
        .into_response()
}
