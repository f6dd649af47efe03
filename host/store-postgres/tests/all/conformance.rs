//! The Store conformance suite on [`PostgresStore`], each case on a fresh
//! database.

use crate::support::fresh_store;
use braid_storage::Store;
use braid_storage::conformance::Cleanup;
use std::sync::Arc;

async fn fresh() -> (Arc<dyn Store>, Cleanup) {
    let (store, _, cleanup) = fresh_store().await;
    (Arc::new(store), cleanup)
}

braid_storage::conformance_tests!(fresh);
