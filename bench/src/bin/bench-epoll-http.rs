//! The HTTP ceiling: the minimal level-triggered epoll server of
//! `asyncore_bench::epoll_server`, answering every request head with one
//! fixed response as long as the `http` plugin's answer to `GET /`. Usage:
//! `bench-epoll-http [ADDR]` (default `127.0.0.1:0`); prints `listening
//! ADDR` once bound.

#![deny(unsafe_code)]

use std::io::Write as _;

use anyhow::Context as _;
use asyncore_bench::epoll_server::{self, FixedResponse};

fn main() -> anyhow::Result<()> {
    let address = std::env::args().nth(1).unwrap_or_else(|| "127.0.0.1:0".to_string());
    let listener = epoll_server::bind(address.parse().context("address")?).context("bind")?;
    println!("listening {}", listener.local_addr()?);
    std::io::stdout().flush()?;
    epoll_server::serve(listener, FixedResponse::new(asyncore_bench::fixed_http_response()))?;
    Ok(())
}
