//! Retrying what must happen eventually.

use std::time::Duration;

/// Failures of [`retry_until_ok`], logged at most ten a minute per kind.
static RETRY_LOGS: crate::log_limit::LogLimiter =
    crate::log_limit::LogLimiter::new(10, Duration::from_secs(60));

/// Runs `op` until it succeeds, waiting 10 ms after the first failure and
/// doubling to 5 s; each failure is logged as `what ... failed; retrying`
/// (a bounded number of lines). For store writes that must happen
/// eventually (a failing disk stalls the caller rather than losing the
/// write).
pub async fn retry_until_ok<T, E, F, Fut>(what: &str, mut op: F) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut backoff = 10u64;
    loop {
        match op().await {
            Ok(v) => return v,
            Err(e) => {
                if let Some(note) = RETRY_LOGS.allow("retry") {
                    tracing::warn!(cause = %e, "{what} failed; retrying{note}");
                }
                tokio::time::sleep(Duration::from_millis(backoff)).await;
                backoff = (backoff * 2).min(5_000);
            }
        }
    }
}
