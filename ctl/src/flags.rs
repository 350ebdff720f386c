//! The command line as clap types: every subcommand and flag of
//! `asyncorectl`, and the parsers of the values that need more than clap's
//! own (`KEY=VALUE`, durations).

use std::{path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};

/// The daemon refuses shorter intervals (see `WatchStatsRequest`); rejecting
/// them here gives a usage error instead of a surprise from the server.
const MIN_INTERVAL_MS: u64 = 10;

/// Control a running asyncored through its gRPC API.
#[derive(Debug, Parser)]
#[command(name = "asyncorectl", version)]
pub(crate) struct Cli {
    /// Control API of the daemon, host:port, http://host:port,
    /// https://host:port (a daemon started with --tls-cert; with --ca) or
    /// unix:PATH [env: ASYNCORED_CONTROL] [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR", global = true)]
    pub(crate) control: Option<String>,

    /// How long to wait for the daemon: to connect, and for each answer to
    /// begin (`stats` then streams for as long as you like): 500ms, 10s, 2m,
    /// or a bare number of milliseconds. A daemon that does not answer in
    /// time is unreachable (exit code 3).
    #[arg(long, value_name = "DURATION", global = true, default_value = "10s", value_parser = parse_timeout)]
    pub(crate) timeout: Duration,

    /// Bearer token for a daemon started with --token-file: a file holding
    /// the secret alone, or the daemon's token file (its first token's
    /// secret is used) [env: ASYNCORED_TOKEN, the secret itself].
    #[arg(long, value_name = "FILE", global = true)]
    pub(crate) token_file: Option<PathBuf>,

    /// TLS: trust this PEM CA for the daemon's certificate (the daemon's
    /// --tls-cert, or the CA that signed it). A host:port address is then
    /// reached over TLS, as https://host:port.
    #[arg(long, value_name = "FILE", global = true)]
    pub(crate) ca: Option<PathBuf>,

    /// Mutual TLS: present this PEM client certificate (with
    /// --client-key) to a daemon started with --client-ca.
    #[arg(long, value_name = "FILE", global = true, requires = "client_key")]
    pub(crate) client_cert: Option<PathBuf>,

    /// The PEM private key of --client-cert.
    #[arg(long, value_name = "FILE", global = true, requires = "client_cert")]
    pub(crate) client_key: Option<PathBuf>,

    /// Output format: aligned tables for people, JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, global = true)]
    pub(crate) output: OutputFormat,

    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub(crate) enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Listening sockets.
    #[command(subcommand)]
    Listeners(ListenersCommand),
    /// Channels in the daemon's channel map.
    #[command(subcommand)]
    Channels(ChannelsCommand),
    /// Dispatcher plugins.
    // `plugin new NAME` reads better in the singular, and one alias keeps a
    // single command group rather than two that users would have to tell
    // apart.
    #[command(subcommand, visible_alias = "plugin")]
    Plugins(PluginsCommand),
    /// Stream per-channel counters until Ctrl-C or the daemon ends the stream.
    Stats(StatsArgs),
    /// A live view of the busiest channels, refreshed every second, with the
    /// poll loop's figures on top; `q` quits. Needs a terminal: scripts use
    /// `stats`.
    Top(TopArgs),
    /// Counters of the daemon's poll loop.
    LoopStats,
    /// The daemon's version, uptime, phase, loop counters (slow callbacks
    /// included) and how many plugins and listeners it has.
    Info,
    /// The daemon's config file.
    #[command(subcommand)]
    Config(ConfigCommand),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ConfigCommand {
    /// Re-read the config file the daemon was started with, as SIGHUP does,
    /// and apply the difference in listeners; an invalid file changes
    /// nothing and is reported.
    Reload,
}

#[derive(Debug, Subcommand)]
pub(crate) enum ListenersCommand {
    /// List every listener, running or stopped.
    Ls,
    /// Bind ADDR and serve each accepted connection with PLUGIN.
    Start {
        /// host:port to bind; port 0 picks a free one.
        address: String,
        /// Name of a loaded plugin.
        plugin: String,
        /// Plugin configuration entry; repeat for more. A repeated key keeps
        /// its last value.
        #[arg(short = 'c', long = "config", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        config: Vec<(String, String)>,
    },
    /// Stop accepting on a listener (its listening socket closes).
    Stop {
        id: u64,
        /// Also close, gracefully, every channel the listener accepted.
        #[arg(long, conflicts_with = "drain_timeout")]
        close_channels: bool,
        /// Then wait until the listener's channels have all finished, and
        /// close those left after this long, gracefully: 500ms, 30s, 2m, or a
        /// bare number of milliseconds. The command returns once they are
        /// gone (`--timeout` counts from the drain timeout on).
        #[arg(long, value_name = "DURATION", value_parser = parse_listener_drain_ms)]
        drain_timeout: Option<u64>,
    },
    /// Stop accepting but keep the listening socket bound: new connections
    /// wait in the kernel's backlog, unserved, until `resume`; channels
    /// already open keep running.
    Suspend { id: u64 },
    /// Accept again after `suspend`, starting with the backlog.
    Resume { id: u64 },
    /// Change a running listener's limits, or with `--daemon` the limit
    /// over every listener.
    Limit {
        #[arg(required_unless_present = "daemon")]
        id: Option<u64>,
        /// The daemon's limit, all listeners together, instead of one
        /// listener's (it lasts until the daemon stops).
        #[arg(long, conflicts_with = "id")]
        daemon: bool,
        /// The most connections kept open at once; past it, new ones are
        /// closed at once and counted. 0 lifts the limit.
        #[arg(long, value_name = "N")]
        max_connections: u64,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum ChannelsCommand {
    /// List channels in id order.
    Ls {
        /// Only channels of this listener.
        #[arg(long, value_name = "ID")]
        listener: Option<u64>,
    },
    /// Show one channel.
    Get { id: u64 },
    /// Close a channel gracefully: queued output is flushed first.
    Close { id: u64 },
}

#[derive(Debug, Subcommand)]
pub(crate) enum PluginsCommand {
    /// List plugins, one row per generation, the current one first.
    Ls,
    /// Load a plugin library (.so): a new plugin, or a new generation of a
    /// loaded one, kept on standby unless --activate.
    Load {
        /// Path of the library, relative to the current directory or absolute.
        path: PathBuf,
        /// Make the new generation current at once (the first generation of a
        /// plugin always is).
        #[arg(long)]
        activate: bool,
    },
    /// Load a plugin's library again as a new generation and make it current.
    Reload(ReloadArgs),
    /// Make a loaded generation current again (rollback).
    Activate {
        name: String,
        #[arg(value_parser = clap::value_parser!(u32).range(1..))]
        generation: u32,
        /// Close channels of the other generations gracefully after this
        /// long: 500ms, 30s, 2m, or a bare number of milliseconds.
        /// [default: never, they live on until they close]
        #[arg(long, value_name = "DURATION", value_parser = parse_drain_timeout_ms)]
        drain_timeout: Option<u64>,
    },
    /// Retire one generation, or every generation of the plugin: its code is
    /// never called again.
    Unload {
        name: String,
        /// Only this generation.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        generation: Option<u32>,
        /// Stop the listeners and gracefully close the channels that use it,
        /// instead of refusing.
        #[arg(long)]
        force: bool,
    },
    /// Create a new plugin crate, ready to build, test and load; needs no
    /// daemon.
    New(NewArgs),
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReloadArgs {
    pub(crate) name: String,
    /// Library to load [default: the file the current generation came from]
    #[arg(long, value_name = "PATH")]
    pub(crate) path: Option<PathBuf>,
    /// Close channels of older generations gracefully after this long:
    /// 500ms, 30s, 2m, or a bare number of milliseconds.
    /// [default: never, they live on until they close]
    #[arg(long, value_name = "DURATION", value_parser = parse_drain_timeout_ms)]
    pub(crate) drain_timeout: Option<u64>,
    /// Keep watching the library and reload whenever its content differs from
    /// the current generation's, until Ctrl-C. The file is read on this
    /// machine, so run it where the daemon runs.
    #[arg(long)]
    pub(crate) watch: bool,
}

/// `plugin new`. The long help is the reference for what gets written.
#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
The crate is standalone (its own [workspace] table), so it can live anywhere,
also inside another workspace. It contains Cargo.toml, src/lib.rs, a test in
tests/plugin.rs that runs the plugin on the real engine with asyncore-testing,
a README.md and a .gitignore.

Names: with NAME my-proto, the package is my-proto, the daemon knows the plugin
as my-proto (`listeners start 127.0.0.1:7007 my-proto`), and the library is
target/debug/libmy_proto.so: Rust library names cannot contain '-'.

Then: cd DIR && cargo test && cargo build
      asyncorectl plugins load target/debug/libNAME.so   ('-' in NAME as '_')
      asyncorectl listeners start 127.0.0.1:0 NAME")]
pub(crate) struct NewArgs {
    /// Name of the plugin and of its package: lowercase ASCII letters, digits,
    /// '_' and '-', starting with a letter.
    pub(crate) name: String,
    /// A line-based asynchat plugin (AsyncChat, terminator "\n") that answers
    /// each line uppercased, instead of an echo plugin.
    #[arg(long)]
    pub(crate) chat: bool,
    /// Directory to create the crate in; it must be missing or empty.
    /// [default: ./NAME]
    #[arg(long, value_name = "DIR")]
    pub(crate) dir: Option<PathBuf>,
    /// Where asyncore-sdk and asyncore-testing come from: a checkout of the
    /// asyncored repository (path dependencies on its sdk/ and testing/), or
    /// the repository's git URL (git dependencies).
    /// [default: the checkout this asyncorectl was built from]
    #[arg(long, value_name = "PATH_OR_GIT")]
    pub(crate) sdk: Option<String>,
}

#[derive(Debug, clap::Args)]
pub(crate) struct StatsArgs {
    /// Time between updates: 500ms, 1s, 2m, or a bare number of milliseconds.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval_ms)]
    pub(crate) interval: u32,
    /// Only channels of this listener.
    #[arg(long, value_name = "ID")]
    pub(crate) listener: Option<u64>,
    /// Only this channel; repeat for more.
    #[arg(long = "channel", value_name = "ID")]
    pub(crate) channels: Vec<u64>,
    /// Each update lists only the channels whose figures changed since the
    /// previous one (the first lists all).
    #[arg(long)]
    pub(crate) changed_only: bool,
}

#[derive(Debug, clap::Args)]
#[command(after_long_help = "\
Keys: s, > or Right sorts by the next column (Left or < the previous one),
r reverses the order, q, Esc or Ctrl-C quits.

Columns: the channel, its listener, the plugin generation serving it, the
peer, bytes per second in and out, output queued in the daemon (not yet
written to the socket) and the channel's age. The header has the daemon's
version, phase and uptime, and the poll loop's passes, events and handler
calls per second, slow callbacks and panics.")]
pub(crate) struct TopArgs {
    /// Time between refreshes: 500ms, 1s, 2m, or a bare number of
    /// milliseconds.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval_ms)]
    pub(crate) interval: u32,
    /// Only channels of this listener.
    #[arg(long, value_name = "ID")]
    pub(crate) listener: Option<u64>,
}

/// Parses `-c key=value`. The value may be empty and may contain `=`; only
/// the first `=` separates.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| "expected KEY=VALUE, found no '='".to_owned())?;
    if key.is_empty() {
        return Err("expected KEY=VALUE, the key is empty".to_owned());
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses `--interval`: a duration of at least [`MIN_INTERVAL_MS`] and at
/// most `u32::MAX` milliseconds, as `WatchStatsRequest` carries it.
fn parse_interval_ms(text: &str) -> Result<u32, String> {
    let milliseconds = parse_milliseconds(text, "interval", u64::from(u32::MAX))?;
    if milliseconds < MIN_INTERVAL_MS {
        return Err(format!("the interval must be at least {MIN_INTERVAL_MS}ms"));
    }
    u32::try_from(milliseconds).map_err(|_| format!("the interval may be at most {}ms", u32::MAX))
}

/// Parses `--timeout`: from 1 ms to an hour.
fn parse_timeout(text: &str) -> Result<Duration, String> {
    let milliseconds = parse_milliseconds(text, "timeout", 3_600_000)?;
    if milliseconds == 0 {
        return Err("the timeout must be at least 1ms".to_owned());
    }
    Ok(Duration::from_millis(milliseconds))
}

/// Parses `listeners stop --drain-timeout`: at least 1 ms (a stop that
/// does not wait is a plain `stop`), at most 7 days, as the daemon allows.
fn parse_listener_drain_ms(text: &str) -> Result<u64, String> {
    match parse_milliseconds(text, "drain timeout", 604_800_000)? {
        0 => Err("the drain timeout must be at least 1ms".to_owned()),
        milliseconds => Ok(milliseconds),
    }
}

/// Parses `--drain-timeout`; 0 means never, as in `ReloadPluginRequest`.
fn parse_drain_timeout_ms(text: &str) -> Result<u64, String> {
    parse_milliseconds(text, "drain timeout", u64::MAX)
}

/// Parses `500ms`, `1s`, `2m` or a bare number of milliseconds, the
/// grammar of every duration flag, into milliseconds up to `max`. `what`
/// names the flag in the message when the value is too large.
///
/// Not `asyncored::config::parse_duration`: the config file reads a bare
/// number as seconds and accepts fractions and hours, and `--interval 250`
/// has always meant 250 milliseconds.
fn parse_milliseconds(text: &str, what: &str, max: u64) -> Result<u64, String> {
    const EXPECTED: &str = "expected milliseconds or a number with unit ms, s or m, such as 500ms, 1s, 2m";
    // "ms" must be tried before "m" and "s", which are its suffix and prefix.
    let (digits, unit_ms) = if let Some(digits) = text.strip_suffix("ms") {
        (digits, 1)
    } else if let Some(digits) = text.strip_suffix('s') {
        (digits, 1_000)
    } else if let Some(digits) = text.strip_suffix('m') {
        (digits, 60_000)
    } else {
        (text, 1)
    };
    // `u64::from_str` would also take a leading '+'; we only want digits.
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(EXPECTED.to_owned());
    }
    let too_long = || format!("the {what} may be at most {max}ms");
    let count: u64 = digits.parse().map_err(|_| too_long())?;
    count.checked_mul(unit_ms).filter(|&milliseconds| milliseconds <= max).ok_or_else(too_long)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_units() {
        assert_eq!(parse_interval_ms("500ms"), Ok(500));
        assert_eq!(parse_interval_ms("1s"), Ok(1_000));
        assert_eq!(parse_interval_ms("2m"), Ok(120_000));
        assert_eq!(parse_interval_ms("250"), Ok(250));
        assert_eq!(parse_interval_ms("10"), Ok(10));
    }

    #[test]
    fn interval_rejects_malformed() {
        for text in ["", "ms", "s", "1h", "1.5s", "-1s", "+5s", " 1s", "1 s", "1sm", "abc", "1S"] {
            assert!(parse_interval_ms(text).is_err(), "{text:?} was accepted");
        }
    }

    #[test]
    fn interval_bounds() {
        assert!(parse_interval_ms("0").is_err());
        assert!(parse_interval_ms("9ms").is_err());
        assert!(parse_interval_ms("0s").is_err());
        assert_eq!(parse_interval_ms("4294967295"), Ok(u32::MAX));
        assert!(parse_interval_ms("4294967296").is_err());
        assert!(parse_interval_ms("71583m").is_err());
        assert!(parse_interval_ms("99999999999999999999999s").is_err());
    }

    #[test]
    fn timeouts() {
        assert_eq!(parse_timeout("1s"), Ok(Duration::from_secs(1)));
        assert_eq!(parse_timeout("250"), Ok(Duration::from_millis(250)));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("2h").is_err());
        assert!(parse_timeout("61m").is_err());
        let cli = Cli::try_parse_from(["asyncorectl", "loop-stats"]).unwrap();
        assert_eq!(cli.timeout, Duration::from_secs(10));
        let cli = Cli::try_parse_from(["asyncorectl", "loop-stats", "--timeout", "500ms"]).unwrap();
        assert_eq!(cli.timeout, Duration::from_millis(500));
    }

    #[test]
    fn drain_timeout_shares_the_interval_grammar() {
        assert_eq!(parse_drain_timeout_ms("0"), Ok(0));
        assert_eq!(parse_drain_timeout_ms("250"), Ok(250));
        assert_eq!(parse_drain_timeout_ms("30s"), Ok(30_000));
        assert_eq!(parse_drain_timeout_ms("2m"), Ok(120_000));
        assert_eq!(parse_drain_timeout_ms("71583m"), Ok(4_294_980_000));
        for text in ["", "1.5s", "1h", "-1s", " 1s", "soon"] {
            assert!(parse_drain_timeout_ms(text).is_err(), "{text:?} was accepted");
        }
        assert_eq!(
            parse_drain_timeout_ms("99999999999999999999999s"),
            Err(format!("the drain timeout may be at most {}ms", u64::MAX))
        );
        assert_eq!(parse_interval_ms("71583m"), Err(format!("the interval may be at most {}ms", u32::MAX)));
    }

    #[test]
    fn plugin_commands_parse() {
        let cli =
            Cli::try_parse_from(["asyncorectl", "plugins", "unload", "echo", "--generation", "2", "--force"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Plugins(PluginsCommand::Unload { generation: Some(2), force: true, .. })
        ));
        let cli = Cli::try_parse_from(["asyncorectl", "plugins", "reload", "echo", "--drain-timeout", "5s", "--watch"])
            .unwrap();
        assert!(matches!(
            cli.command,
            Command::Plugins(PluginsCommand::Reload(ReloadArgs { drain_timeout: Some(5_000), watch: true, .. }))
        ));
        for args in [
            &["asyncorectl", "plugins", "activate", "echo", "0"][..],
            &["asyncorectl", "plugins", "activate", "echo", "1", "--drain-timeout", "soon"],
            &["asyncorectl", "plugins", "unload", "echo", "--generation", "x"],
        ] {
            let error = Cli::try_parse_from(args).unwrap_err();
            assert_eq!(error.exit_code(), 2, "{args:?}");
        }
    }

    #[test]
    fn plugin_new_parses_in_the_singular_and_the_plural() {
        for group in ["plugin", "plugins"] {
            let cli = Cli::try_parse_from(["asyncorectl", group, "new", "shout", "--chat", "--dir", "/tmp/x"]).unwrap();
            let Command::Plugins(PluginsCommand::New(args)) = cli.command else {
                panic!("{group} new parsed as {:?}", cli.command);
            };
            assert_eq!(args.name, "shout");
            assert!(args.chat);
            assert_eq!(args.dir, Some(PathBuf::from("/tmp/x")));
            assert_eq!(args.sdk, None);
        }
    }

    #[test]
    fn top_and_info_parse() {
        let cli = Cli::try_parse_from(["asyncorectl", "top", "--interval", "500ms", "--listener", "3"]).unwrap();
        assert!(matches!(cli.command, Command::Top(TopArgs { interval: 500, listener: Some(3) })));
        let cli = Cli::try_parse_from(["asyncorectl", "top"]).unwrap();
        assert!(matches!(cli.command, Command::Top(TopArgs { interval: 1_000, listener: None })));
        assert!(matches!(Cli::try_parse_from(["asyncorectl", "info"]).unwrap().command, Command::Info));
        assert_eq!(Cli::try_parse_from(["asyncorectl", "top", "--interval", "5ms"]).unwrap_err().exit_code(), 2);
    }

    #[test]
    fn key_value_splits_at_first_equals() {
        assert_eq!(parse_key_value("greeting=hello"), Ok(("greeting".to_owned(), "hello".to_owned())));
        assert_eq!(parse_key_value("expr=a=b"), Ok(("expr".to_owned(), "a=b".to_owned())));
        assert_eq!(parse_key_value("empty="), Ok(("empty".to_owned(), String::new())));
    }

    #[test]
    fn key_value_rejects_missing_key_or_equals() {
        assert!(parse_key_value("novalue").is_err());
        assert!(parse_key_value("").is_err());
        assert!(parse_key_value("=value").is_err());
    }

    #[test]
    fn bad_config_is_a_usage_error() {
        let error = Cli::try_parse_from(["asyncorectl", "listeners", "start", "a:1", "echo", "-c", "x"]).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        assert_eq!(error.exit_code(), 2);
    }
}
