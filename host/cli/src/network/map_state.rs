//! The map server's state, kept in the node's store.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The map server's state in the node's store (meta key
/// [`MAP_STATE_KEY`]), so that it lives with everything else the node keeps
/// (in PostgreSQL, in cluster mode), where the map servers of a cluster's
/// gateways share it: a change is written only on the state its writer
/// read ([`braid_membership::MapStateStore::save_if`]). A state file left by an older version
/// (`map_state_path` of node.json) is imported on first use and left in
/// place.
pub struct StoreMapState {
    store: Arc<dyn braid_storage::Store>,
    legacy_file: PathBuf,
}

impl std::fmt::Debug for StoreMapState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreMapState")
            .field("key", &MAP_STATE_KEY)
            .field("legacy_file", &self.legacy_file)
            .finish()
    }
}

/// The store's meta key for the map server's state.
pub const MAP_STATE_KEY: &str = "membership/map-server";

impl StoreMapState {
    /// State in `store`, importing `legacy_file` when the store has none.
    pub fn new(store: Arc<dyn braid_storage::Store>, legacy_file: &Path) -> StoreMapState {
        StoreMapState {
            store,
            legacy_file: legacy_file.to_path_buf(),
        }
    }

    /// Runs a store call from the map server's synchronous code (it runs
    /// on the node's multi-threaded runtime, in handlers and blocking
    /// tasks).
    fn block_on<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
    }

    fn store_error(&self, e: braid_storage::StoreError) -> braid_membership::MembershipError {
        braid_membership::MembershipError::Config {
            path: braid_membership::MapStateStore::location(self),
            reason: format!("the store failed: {e}"),
        }
    }
}

impl braid_membership::MapStateStore for StoreMapState {
    fn load(&self) -> Result<Option<Vec<u8>>, braid_membership::MembershipError> {
        if let Some(b) = self
            .block_on(self.store.meta(MAP_STATE_KEY))
            .map_err(|e| self.store_error(e))?
        {
            return Ok(Some(b));
        }
        let Some(b) = braid_membership::FileState::new(&self.legacy_file).load()? else {
            return Ok(None);
        };
        self.save(&b)?;
        tracing::info!(file = %self.legacy_file.display(),
            "imported the network-map server's state file into the store (the file is no longer used)");
        Ok(Some(b))
    }

    fn save(&self, bytes: &[u8]) -> Result<(), braid_membership::MembershipError> {
        self.block_on(self.store.write(vec![braid_storage::Op::PutMeta(
            MAP_STATE_KEY.into(),
            bytes.to_vec(),
        )]))
        .map_err(|e| self.store_error(e))
    }

    fn save_if(
        &self,
        expected: Option<&[u8]>,
        bytes: &[u8],
    ) -> Result<(), braid_membership::MembershipError> {
        let put = braid_storage::Op::PutMetaIf {
            key: MAP_STATE_KEY.into(),
            expected: expected.map(<[u8]>::to_vec),
            value: bytes.to_vec(),
        };
        match self.block_on(self.store.write(vec![put])) {
            Ok(()) => Ok(()),
            // Another gateway's map server wrote it.
            Err(braid_storage::StoreError::Changed { .. }) => {
                Err(braid_membership::MembershipError::StateChanged)
            }
            Err(e) => Err(self.store_error(e)),
        }
    }

    fn location(&self) -> PathBuf {
        PathBuf::from(format!("store meta {MAP_STATE_KEY}"))
    }
}
