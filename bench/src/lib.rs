//! asyncore-bench: the benchmark harness. One command starts each server as
//! its own process on loopback (asyncored with its `echo` and `http`
//! plugins, and the baselines built from this crate), drives it with the
//! load generator of [`load`](crate::load), which checks every byte that
//! comes back, and prints one table: absolute figures, messages per second
//! of *server* CPU time, latency percentiles, and ratios to the ceilings
//! (the minimal epoll servers of [`epoll_server`]) measured in the same run.
//!
//! The baselines are binaries of this crate: `bench-epoll-echo` and
//! `bench-epoll-http` (the ceilings), `bench-tokio-echo`; Python's asyncore
//! echo server is a script the harness writes. See `PERFORMANCE.md`.

#![deny(unsafe_code)]

pub mod epoll_server;
pub mod sys;

mod harness;
mod load;
mod procfs;
mod report;
mod scenario;
mod servers;
mod storm;

pub use harness::{Options, run};

/// Length of the body the `http` plugin answers `GET /` with (its index
/// page), so that the HTTP ceiling moves as many bytes per response.
const HTTP_PLUGIN_INDEX_BODY: usize = 339;

/// The HTTP ceiling's answer to every request: the head the `http` plugin
/// writes (status, `Server`, `Date`, `Content-Type`, `Content-Length`) and
/// a body as long as its index page, 486 bytes in all.
pub fn fixed_http_response() -> Vec<u8> {
    let mut response = format!(
        "HTTP/1.1 200 OK\r\nServer: asyncored-http/0.1.0\r\nDate: Thu, 01 Jan 2026 00:00:00 GMT\r\n\
         Content-Type: text/html; charset=utf-8\r\nContent-Length: {HTTP_PLUGIN_INDEX_BODY}\r\n\r\n"
    )
    .into_bytes();
    response.extend((0..HTTP_PLUGIN_INDEX_BODY).map(|i| if i % 64 == 63 { b'\n' } else { b'a' + (i % 26) as u8 }));
    response
}
