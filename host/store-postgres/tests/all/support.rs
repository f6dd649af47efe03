//! The PostgreSQL server for the tests: `scripts/postgres.sh up`, run once
//! per test binary, and a fresh database per test. A server that cannot
//! be started fails the tests with the script's error; nothing is skipped.

use braid_storage::conformance::Cleanup;
use braid_store_postgres::{PostgresOptions, PostgresStore};
use std::process::Command;
use std::sync::OnceLock;
use tokio_postgres::NoTls;

/// The URL of the test server's `postgres` database.
pub fn server_url() -> &'static str {
    static URL: OnceLock<Result<String, String>> = OnceLock::new();
    let url = URL.get_or_init(|| {
        let script = braid_testkit::repo_root().join("scripts/postgres.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("up")
            .output()
            .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "{} up failed ({}):\n{}{}",
                script.display(),
                out.status,
                stdout,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        stdout
            .lines()
            .rev()
            .find(|l| l.starts_with("postgres://"))
            .map(str::to_owned)
            .ok_or_else(|| format!("{} up printed no URL: {stdout}", script.display()))
    });
    match url {
        Ok(u) => u,
        Err(e) => panic!("PostgreSQL for the tests could not be started: {e}"),
    }
}

/// An admin connection to the server (its `postgres` database).
pub async fn admin() -> tokio_postgres::Client {
    connect(server_url()).await
}

/// A plain connection to `url`.
pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, NoTls)
        .await
        .unwrap_or_else(|e| panic!("connect to the test server: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

/// A new, empty database: its URL and what drops it.
pub async fn fresh_database() -> (String, Cleanup) {
    let name = format!("braid_t_{:016x}", rand::random::<u64>());
    admin()
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    let base = server_url()
        .rsplit_once('/')
        .map(|(b, _)| b)
        .expect("a URL with a database");
    let url = format!("{base}/{name}");
    let cleanup: Cleanup = Box::pin(async move {
        let _ = admin()
            .await
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await;
    });
    (url, cleanup)
}

/// A store on a fresh database.
pub async fn fresh_store() -> (PostgresStore, String, Cleanup) {
    let (url, cleanup) = fresh_database().await;
    let store = PostgresStore::connect(&url, PostgresOptions::default())
        .await
        .unwrap_or_else(|e| panic!("connect the store: {e}"));
    (store, url, cleanup)
}
