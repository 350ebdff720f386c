//! `asyncorectl`, the command-line client of asyncored's gRPC control API:
//! one subcommand per RPC, human tables by default and JSON for scripts,
//! plus `top`, a live view in the terminal, and `plugin new`, which writes
//! a plugin crate and needs no daemon.
//!
//! Exit codes: 0 on success, 1 when the daemon answers with an error (or a
//! local step such as writing a file fails), 2 for usage errors (clap's own
//! code, and requests refused before doing anything), 3 when the daemon
//! cannot be reached.

#![forbid(unsafe_code)]

mod channels;
mod config;
mod connection;
mod flags;
mod listeners;
mod pages;
mod plugins;
mod render;
mod stats;
mod top;

use std::process::ExitCode;

use clap::{CommandFactory as _, Parser as _};

use crate::connection::ControlTarget;
use crate::flags::{Cli, Command, OutputFormat, PluginsCommand};

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // Before the control address is looked at: a plugin crate is written
        // the same whether or not a daemon is configured.
        Command::Plugins(PluginsCommand::New(args)) => plugins::new_crate(&args, cli.output),
        command => {
            let target = control_target_or_exit(cli.control).with_timeout(cli.timeout);
            let tls = connection::TlsFiles { ca: cli.ca, client_cert: cli.client_cert, client_key: cli.client_key };
            match connection::bearer(cli.token_file.as_deref())
                .and_then(|bearer| target.with_bearer(bearer).with_tls(tls))
            {
                Ok(target) => run(command, cli.output, &target)
                    .await
                    .map_err(|error| connection::transport_failure_as_unreachable(error, &target)),
                Err(refused) => Err(refused.into()),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if connection::is_broken_pipe(&error) => {
            // `asyncorectl stats -o json | head` closes our stdout; that is
            // the reader being done, not a failure.
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("asyncorectl: {}", connection::describe_error(&error));
            ExitCode::from(connection::exit_code(&error))
        }
    }
}

/// The daemon's address from `--control`, the environment or the default,
/// or a usage error.
fn control_target_or_exit(flag: Option<String>) -> ControlTarget {
    let control = connection::control_address(flag);
    // The address is checked after parsing rather than by a clap value
    // parser because it may come from the environment, which clap only reads
    // with its `env` feature; going through `Cli::command().error` keeps the
    // usage-error format and exit code 2 either way.
    match connection::control_target(&control) {
        Ok(target) => target,
        Err(message) => Cli::command().error(clap::error::ErrorKind::InvalidValue, message).exit(),
    }
}

async fn run(command: Command, format: OutputFormat, target: &ControlTarget) -> anyhow::Result<()> {
    let command = match command {
        Command::Plugins(command) => Command::Plugins(plugins::resolve_paths(command)?),
        command => command,
    };
    let channel = connection::connect(target).await?;

    match command {
        Command::Listeners(command) => listeners::run(channel, command, format, target).await,
        Command::Channels(command) => channels::run(channel, command, format).await,
        Command::Plugins(command) => plugins::run(channel, command, format, target).await,
        Command::Stats(args) => stats::watch(channel, args, format).await,
        Command::Top(args) => top::run(channel, args).await,
        Command::LoopStats => stats::loop_stats(channel, format).await,
        Command::Info => stats::info(channel, format).await,
        Command::Config(command) => config::run(channel, command, format).await,
    }
}
