//! Host services: durable time, randomness, identity and logging.

use std::time::{Duration, SystemTime};

use crate::__bindings::braid::flow::host;

/// Durable sleep: the flow is suspended for `duration` (rounded down to
/// milliseconds) and the sleep survives restarts of the host.
pub fn sleep(duration: Duration) {
    host::sleep(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX));
}

/// Wall-clock time, journaled: a replay sees the same value.
pub fn now() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(now_millis())
}

/// Wall-clock time in milliseconds since the Unix epoch, journaled.
pub fn now_millis() -> u64 {
    host::now_millis()
}

/// `len` random bytes, journaled.
pub fn random_bytes(len: u32) -> Vec<u8> {
    host::random_bytes(len)
}

/// The X.500 name of the identity (virtual node) this flow runs for.
pub fn whoami() -> String {
    host::whoami()
}

/// Log lines attributed to the running flow; suppressed while the host
/// replays a flow's journal. The macros [`info!`](crate::info) and its
/// siblings format their arguments as `format!` does:
///
/// ```no_run
/// use braid_sdk::prelude::*;
/// # fn f() {
/// info!("sent {} messages", 3);
/// braid_sdk::log::info(format_args!("sent {} messages", 3));
/// # }
/// ```
pub mod log {
    use std::fmt::Display;

    use crate::__bindings::braid::flow::host;
    use crate::__bindings::braid::flow::types::Level;

    fn emit(level: Level, message: impl Display) {
        host::log(level, &message.to_string());
    }

    /// Logs at `trace` level.
    pub fn trace(message: impl Display) {
        emit(Level::Trace, message);
    }

    /// Logs at `debug` level.
    pub fn debug(message: impl Display) {
        emit(Level::Debug, message);
    }

    /// Logs at `info` level.
    pub fn info(message: impl Display) {
        emit(Level::Info, message);
    }

    /// Logs at `warn` level.
    pub fn warn(message: impl Display) {
        emit(Level::Warn, message);
    }

    /// Logs at `error` level.
    pub fn error(message: impl Display) {
        emit(Level::Error, message);
    }
}

/// Logs at `trace` level, formatting as `format!` does.
#[macro_export]
macro_rules! trace {
    ($($arg:tt)*) => { $crate::log::trace(::core::format_args!($($arg)*)) };
}

/// Logs at `debug` level, formatting as `format!` does.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => { $crate::log::debug(::core::format_args!($($arg)*)) };
}

/// Logs at `info` level, formatting as `format!` does.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => { $crate::log::info(::core::format_args!($($arg)*)) };
}

/// Logs at `warn` level, formatting as `format!` does.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => { $crate::log::warn(::core::format_args!($($arg)*)) };
}

/// Logs at `error` level, formatting as `format!` does.
#[macro_export]
macro_rules! error {
    ($($arg:tt)*) => { $crate::log::error(::core::format_args!($($arg)*)) };
}
