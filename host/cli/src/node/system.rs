//! What a node takes from its machine: open files, and the store.

use anyhow::Context as _;
use braid_storage::Store;
use braid_storage::embedded::EmbeddedStore;
use std::sync::Arc;

/// Raises the soft limit on open files to the hard limit (every connection
/// is a file descriptor, and the usual soft default of 1024 is small for a
/// server) and returns the soft limit now in force.
#[cfg(unix)]
#[allow(unsafe_code)]
pub fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(cause = %e, "cannot read the open-file limit; assuming 1024");
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit only reads the struct it is given.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        } else {
            let e = std::io::Error::last_os_error();
            tracing::info!(cause = %e, soft = lim.rlim_cur, hard = lim.rlim_max,
                "cannot raise the open-file limit to its hard limit; keeping the soft one");
        }
    }
    lim.rlim_cur
}

/// Where there is no RLIMIT_NOFILE: a conservative guess.
#[cfg(not(unix))]
pub fn raise_fd_limit() -> u64 {
    1024
}

/// Opens the store `--store` names, for flows spread over
/// `flow_partitions` partitions.
pub(super) async fn open_store(
    spec: &str,
    dir: &std::path::Path,
    flow_partitions: u16,
) -> anyhow::Result<Arc<dyn Store>> {
    if spec == "embedded" {
        let s = EmbeddedStore::open(&dir.join("braid.redb"))
            .with_context(|| format!("opening the store in {}", dir.display()))?;
        return Ok(Arc::new(s));
    }
    if spec.starts_with("postgres://") || spec.starts_with("postgresql://") {
        let mut options = braid_store_postgres::PostgresOptions::default();
        options.flow_partitions = flow_partitions;
        let s = braid_store_postgres::PostgresStore::connect(spec, options)
            .await
            .context("opening the PostgreSQL store (--store)")?;
        return Ok(Arc::new(s));
    }
    anyhow::bail!(
        "--store must be `embedded` or a PostgreSQL URL (postgres://USER:PASSWORD@HOST:PORT/DATABASE)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raising_the_file_limit_reports_a_usable_limit_and_is_idempotent() {
        let soft = raise_fd_limit();
        assert!(soft >= 64, "{soft}");
        // Raising again changes nothing.
        assert_eq!(raise_fd_limit(), soft);
    }
}
