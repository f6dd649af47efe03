//! How the embedded store meets a damaged file and a failing disk.
//!
//! - Opening: a new database is built under a temporary name and renamed
//!   into place once complete, so an existing `braid.redb` of any length
//!   is always a database this store wrote; whatever redb makes of a file
//!   that is not (an error or a panic) is [`StoreError::Damaged`], naming
//!   the file and what to do.
//! - redb panics on some damage (it asserts on what it reads). Every call
//!   into it runs under [`guarded`], which turns such a panic into
//!   `Damaged` without printing a panic message or a backtrace.
//! - A full disk: [`probe_space`] tells whether the file's filesystem
//!   takes new data again before the store says it works.

use crate::StoreError;
use redb::Database;
use std::cell::Cell;
use std::io::Write as _;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

/// How much new data [`probe_space`] writes: a store that cannot take
/// this much would fail again at once.
pub(super) const SPACE_PROBE_BYTES: usize = 1 << 20;

/// Why the database is being opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opening {
    /// At start: a missing file is created; a repair means the node was
    /// not stopped cleanly, and is logged.
    Start,
    /// Again after a fault: the file must be there; a repair is expected.
    Recovery,
}

thread_local! {
    /// Set while this thread runs a [`guarded`] call.
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Installs (once) a panic hook that stays silent for panics inside
/// [`guarded`] calls and hands every other panic to the hook it replaces.
fn install_quiet_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(Cell::get) {
                previous(info);
            }
        }));
    });
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "no message".into())
}

/// Runs `f` (which calls into redb on the file at `path`); a panic in it is
/// the file's damage speaking: it becomes [`StoreError::Damaged`], quietly.
pub(super) fn guarded<T>(
    path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    install_quiet_hook();
    let was = QUIET.with(|q| q.replace(true));
    let outcome = catch_unwind(AssertUnwindSafe(f));
    QUIET.with(|q| q.set(was));
    match outcome {
        Ok(r) => r.map_err(|e| damaged_if_corrupt(path, e)),
        Err(panic) => Err(damaged(
            path,
            format!(
                "the database library could not make sense of it: {}",
                panic_text(panic.as_ref())
            ),
        )),
    }
}

fn damaged(path: &Path, detail: impl Into<String>) -> StoreError {
    StoreError::Damaged {
        path: path.to_path_buf(),
        detail: detail.into(),
    }
}

/// A record that does not decode, or a page redb calls corrupted, means
/// the file is damaged: say which file.
fn damaged_if_corrupt(path: &Path, e: StoreError) -> StoreError {
    match e {
        StoreError::Corrupt { table, detail } => damaged(
            path,
            format!("a record in {table} does not decode: {detail}"),
        ),
        other => other,
    }
}

/// A redb error as a store error: I/O failures are [`StoreError::Unavailable`]
/// (the writer reopens the file), damage is [`StoreError::Corrupt`] (made
/// [`StoreError::Damaged`] with the path by [`guarded`]).
pub(super) fn db_err(e: impl Into<redb::Error>) -> StoreError {
    match e.into() {
        redb::Error::Io(e) => StoreError::Unavailable(format!("I/O error: {e}")),
        redb::Error::PreviousIo => {
            StoreError::Unavailable("an earlier I/O error; the store is reopening".into())
        }
        redb::Error::Corrupted(detail) => StoreError::Corrupt {
            table: "the database",
            detail,
        },
        e @ (redb::Error::TableTypeMismatch { .. }
        | redb::Error::TableIsMultimap(_)
        | redb::Error::TableIsNotMultimap(_)) => StoreError::Corrupt {
            table: "the table list",
            detail: e.to_string(),
        },
        other => StoreError::Database(other.to_string()),
    }
}

/// Opens the database at `path`, creating it first if there is none.
pub(super) fn open_db(path: &Path, why: Opening) -> Result<Database, StoreError> {
    match std::fs::symlink_metadata(path) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && why == Opening::Start => {
            create(path)?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(StoreError::Database(format!(
                "the database file {} has disappeared; restore it from a backup and restart \
                 the node",
                path.display()
            )));
        }
        Err(e) => {
            return Err(StoreError::Database(format!(
                "cannot read {}: {e}",
                path.display()
            )));
        }
    }
    guarded(path, || {
        Database::builder()
            .set_cache_size(super::CACHE_BYTES)
            .set_repair_callback(move |s| {
                if s.progress() == 0.0 {
                    match why {
                        Opening::Start => {
                            tracing::warn!("the store was not closed cleanly; repairing it")
                        }
                        Opening::Recovery => tracing::debug!("repairing the store after a fault"),
                    }
                }
            })
            .open(path)
            .map_err(|e| open_error(path, e))
    })
}

/// Builds a new, empty database under a temporary name and renames it to
/// `path` once complete: a crash meanwhile leaves no half-made database
/// that would later look damaged.
fn create(path: &Path) -> Result<(), StoreError> {
    let tmp = temp_path(path);
    let fail = |what: &str, e: &dyn std::fmt::Display| {
        StoreError::Database(format!(
            "creating the store {}: {what}: {e}",
            path.display()
        ))
    };
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail("removing a stale temporary file", &e)),
    }
    let db = guarded(&tmp, || {
        let db = Database::create(&tmp).map_err(db_err)?;
        super::prepare(&db)?;
        Ok(db)
    })
    .map_err(|e| fail("building it", &e))?;
    // Dropping closes it cleanly.
    drop(db);
    std::fs::rename(&tmp, path).map_err(|e| fail("renaming it into place", &e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("syncing its directory", &e))?;
    }
    Ok(())
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".new");
    path.with_file_name(name)
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StoreError {
    use redb::{DatabaseError, StorageError};
    match e {
        DatabaseError::Storage(StorageError::Corrupted(detail)) => damaged(path, detail),
        DatabaseError::UpgradeRequired(v) => damaged(
            path,
            format!("it is in file format {v}, which this version cannot read"),
        ),
        // redb answers InvalidData when the file does not start with its
        // magic number, UnexpectedEof when it is shorter than its header.
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::InvalidData =>
        {
            damaged(
                path,
                "it does not start with a database header (empty, overwritten, or not a \
                 database file)",
            )
        }
        DatabaseError::Storage(StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::UnexpectedEof =>
        {
            damaged(path, "it is cut short")
        }
        DatabaseError::DatabaseAlreadyOpen => StoreError::InUse {
            path: path.to_path_buf(),
        },
        other => StoreError::Database(format!("opening {}: {other}", path.display())),
    }
}

/// Whether the filesystem holding `db_path` takes new data: writes
/// [`SPACE_PROBE_BYTES`] (incompressible, so no filesystem can store them
/// for free) to a file next to it, syncs and removes it.
///
/// A full disk often still accepts small commits (redb reuses pages it
/// already owns), so only this says that space has come back.
pub(super) fn probe_space(db_path: &Path) -> std::io::Result<()> {
    let probe = probe_path(db_path);
    let written = (|| {
        let mut f = std::fs::File::create(&probe)?;
        let mut chunk = vec![0u8; 64 << 10];
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for _ in 0..SPACE_PROBE_BYTES / chunk.len() {
            for b in chunk.chunks_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
            }
            f.write_all(&chunk)?;
        }
        f.sync_all()
    })();
    let removed = std::fs::remove_file(&probe);
    written?;
    removed
}

/// The space probe's file (removed after each probe, and at open).
pub(super) fn probe_path(db_path: &Path) -> PathBuf {
    let mut name = db_path.file_name().unwrap_or_default().to_os_string();
    name.push(".space-probe");
    db_path.with_file_name(name)
}
