//! `asyncore-bench`: the benchmark harness's command line. Run it with
//! `cargo run --release -p asyncore-bench -- [--smoke] [--scenario NAME]...`;
//! see `PERFORMANCE.md`.

#![deny(unsafe_code)]

use clap::Parser as _;

fn main() -> anyhow::Result<()> {
    asyncore_bench::run(asyncore_bench::Options::parse())
}
