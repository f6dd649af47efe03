//! Versioned schema migrations: numbered SQL files under `migrations/`,
//! compiled in, applied in order at start, each in its own transaction
//! together with its row in `schema_migrations`. An advisory lock makes
//! processes that start at once take turns, so the second finds the work
//! done.

use crate::pg_err;
use braid_storage::StoreError;
use tokio_postgres::Client;

/// The migrations, oldest first: (version, name, SQL).
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (1, "initial", include_str!("../migrations/0001_initial.sql")),
    (2, "meta_if", include_str!("../migrations/0002_meta_if.sql")),
];

/// The advisory lock key of braid's migrations (an arbitrary constant:
/// "braid" in ASCII).
const LOCK_KEY: i64 = 0x0062_7261_6964;

pub(crate) async fn migrate(client: &mut Client) -> Result<(), StoreError> {
    client
        .execute("SELECT pg_advisory_lock($1)", &[&LOCK_KEY])
        .await
        .map_err(pg_err)?;
    let r = apply(client).await;
    // Ending the session frees the lock too; unlock so that a pooled
    // connection would not keep it.
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&LOCK_KEY])
        .await
        .map_err(pg_err);
    r?;
    unlocked.map(|_| ())
}

async fn apply(client: &mut Client) -> Result<(), StoreError> {
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                 version    integer     PRIMARY KEY,
                 name       text        NOT NULL,
                 applied_at timestamptz NOT NULL DEFAULT now()
             )",
        )
        .await
        .map_err(pg_err)?;
    let applied: Vec<i32> = client
        .query(
            "SELECT version FROM schema_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(pg_err)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let latest = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(&newest) = applied.last()
        && newest > latest
    {
        return Err(StoreError::Config(format!(
            "the database's schema is at version {newest}, newer than this braid knows \
             ({latest}); run a braid at least as new as the one that migrated it"
        )));
    }
    for &(version, name, sql) in MIGRATIONS {
        if applied.contains(&version) {
            continue;
        }
        let tx = client.transaction().await.map_err(pg_err)?;
        tx.batch_execute(sql).await.map_err(|e| {
            StoreError::Database(format!(
                "schema migration {version} ({name}) failed: {}",
                crate::describe(&e)
            ))
        })?;
        tx.execute(
            "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
            &[&version, &name],
        )
        .await
        .map_err(pg_err)?;
        tx.commit().await.map_err(pg_err)?;
        tracing::info!(version, name, "applied a schema migration");
    }
    Ok(())
}
