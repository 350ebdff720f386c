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

/// Logs a channel's socket error: a peer that reset or went away is
/// ordinary (and may happen at traffic rate), so it is a debug line; any
/// other error a warning.
pub(crate) fn socket_error(channel: crate::ChannelId, error: &std::io::Error) {
    use std::io::ErrorKind;
    let message = format!("channel {channel}: {error}");
    match error.kind() {
        ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe => debug(&message),
        _ => warn(&message),
    }
}
