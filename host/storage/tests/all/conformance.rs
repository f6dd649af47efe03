//! The Store conformance suite on [`EmbeddedStore`], each case in a fresh
//! directory.

use braid_storage::Store;
use braid_storage::conformance::Cleanup;
use braid_storage::embedded::EmbeddedStore;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

async fn fresh() -> (Arc<dyn Store>, Cleanup) {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "braid-conformance-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a temporary directory");
    let store = EmbeddedStore::open(&dir.join("braid.redb")).expect("open the store");
    let cleanup: Cleanup = Box::pin(async move {
        let _ = std::fs::remove_dir_all(&dir);
    });
    (Arc::new(store), cleanup)
}

braid_storage::conformance_tests!(fresh);
