//! Logging from plugin code, forwarded to the daemon's log.
//!
//! A plugin library carries its own copy of std and of any logging crate, so
//! a `tracing` or `log` call inside a plugin would go nowhere. These macros
//! hand the formatted record to the host, which logs it with the plugin's
//! name.

use crate::{export::host_log, ffi::level};

/// Logs an error.
pub fn error(message: &str) {
    host_log(level::ERROR, message);
}

/// Logs a warning.
pub fn warn(message: &str) {
    host_log(level::WARN, message);
}

/// Logs information.
pub fn info(message: &str) {
    host_log(level::INFO, message);
}

/// Logs a debugging message.
pub fn debug(message: &str) {
    host_log(level::DEBUG, message);
}

/// Logs with `format!` syntax at the given level: `log!(info, "x = {x}")`.
#[macro_export]
macro_rules! log {
    ($level:ident, $($arg:tt)+) => {
        $crate::log::$level(&::std::format!($($arg)+))
    };
}
