//! `asyncorectl`, the command-line client of asyncored's gRPC control API:
//! one subcommand per RPC, human tables by default and JSON for scripts.
//!
//! Exit codes: 0 on success, 1 when the daemon answers with an error, 2 for
//! usage errors (clap's own code), 3 when the daemon cannot be reached.

#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use asyncore_proto::v1;
use asyncore_proto::v1::channels_client::ChannelsClient;
use asyncore_proto::v1::daemon_client::DaemonClient;
use asyncore_proto::v1::listeners_client::ListenersClient;
use asyncore_proto::v1::plugins_client::PluginsClient;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use serde_json::{Value, json};
use tonic::transport::{Channel, Endpoint};

const DEFAULT_CONTROL: &str = "127.0.0.1:50051";
const CONTROL_ENV: &str = "ASYNCORED_CONTROL";

/// Bounds the TCP connect, and separately the whole connect including the
/// HTTP/2 handshake: a wrong port that accepts but never speaks HTTP/2 would
/// otherwise hang the CLI forever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long to wait for the response headers of a call. tonic only sends
/// the HTTP/2 preface while connecting, so a peer that accepts and then says
/// nothing is only noticed here. Streaming calls are bounded until their
/// first headers only, so `stats` can run for as long as the user wants.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The daemon refuses shorter intervals (see `WatchStatsRequest`); rejecting
/// them here gives a usage error instead of a surprise from the server.
const MIN_INTERVAL_MS: u64 = 10;

/// How often `plugins reload --watch` looks at the library's metadata.
const WATCH_INTERVAL: Duration = Duration::from_millis(500);

/// Hex digits of a SHA-256 shown in tables; `-o json` has all of them.
const SHA256_SHOWN: usize = 12;

const EXIT_SERVER_ERROR: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;

/// Control a running asyncored through its gRPC API.
#[derive(Debug, Parser)]
#[command(name = "asyncorectl", version)]
struct Cli {
    /// Control API of the daemon, host:port or http://host:port
    /// [env: ASYNCORED_CONTROL] [default: 127.0.0.1:50051]
    #[arg(long, value_name = "ADDR", global = true)]
    control: Option<String>,

    /// Output format: aligned tables for people, JSON for scripts.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = OutputFormat::Table, global = true)]
    output: OutputFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Listening sockets.
    #[command(subcommand)]
    Listeners(ListenersCommand),
    /// Channels in the daemon's channel map.
    #[command(subcommand)]
    Channels(ChannelsCommand),
    /// Dispatcher plugins.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// Stream per-channel counters until Ctrl-C or the daemon ends the stream.
    Stats(StatsArgs),
    /// Counters of the daemon's poll loop.
    LoopStats,
}

#[derive(Debug, Subcommand)]
enum ListenersCommand {
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
    /// Stop accepting on a listener.
    Stop {
        id: u64,
        /// Also close, gracefully, every channel the listener accepted.
        #[arg(long)]
        close_channels: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ChannelsCommand {
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
enum PluginsCommand {
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
}

#[derive(Debug, clap::Args)]
struct ReloadArgs {
    name: String,
    /// Library to load [default: the file the current generation came from]
    #[arg(long, value_name = "PATH")]
    path: Option<PathBuf>,
    /// Close channels of older generations gracefully after this long:
    /// 500ms, 30s, 2m, or a bare number of milliseconds.
    /// [default: never, they live on until they close]
    #[arg(long, value_name = "DURATION", value_parser = parse_drain_timeout_ms)]
    drain_timeout: Option<u64>,
    /// Keep watching the library and reload whenever its content differs from
    /// the current generation's, until Ctrl-C. The file is read on this
    /// machine, so run it where the daemon runs.
    #[arg(long)]
    watch: bool,
}

#[derive(Debug, clap::Args)]
struct StatsArgs {
    /// Time between updates: 500ms, 1s, 2m, or a bare number of milliseconds.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = parse_interval_ms)]
    interval: u32,
    /// Only channels of this listener.
    #[arg(long, value_name = "ID")]
    listener: Option<u64>,
    /// Only this channel; repeat for more.
    #[arg(long = "channel", value_name = "ID")]
    channels: Vec<u64>,
}

/// The daemon's address as the user wrote it (for messages) and as a URI
/// (for tonic).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ControlTarget {
    shown: String,
    uri: String,
}

/// The daemon did not answer: the connect failed, or the connection broke or
/// timed out before a reply. As opposed to the daemon answering with an
/// error, it gets its own exit code so scripts can tell "down" from "no".
#[derive(Debug)]
struct Unreachable {
    address: String,
    reason: String,
}

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot reach the daemon at {}: {}", self.address, self.reason)
    }
}

impl StdError for Unreachable {}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let control = cli
        .control
        .clone()
        // An empty variable counts as unset, as `ASYNCORED_CONTROL= cmd` means.
        .or_else(|| std::env::var(CONTROL_ENV).ok().filter(|value| !value.is_empty()))
        .unwrap_or_else(|| DEFAULT_CONTROL.to_owned());
    // The address is checked after parsing rather than by a clap value
    // parser because it may come from the environment, which clap only reads
    // with its `env` feature; going through `Cli::command().error` keeps the
    // usage-error format and exit code 2 either way.
    let target = match control_target(&control) {
        Ok(target) => target,
        Err(message) => Cli::command().error(clap::error::ErrorKind::InvalidValue, message).exit(),
    };

    match run(cli, &target).await.map_err(|error| transport_failure_as_unreachable(error, &target)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if is_broken_pipe(&error) => {
            // `asyncorectl stats -o json | head` closes our stdout; that is
            // the reader being done, not a failure.
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("asyncorectl: {}", describe_error(&error));
            ExitCode::from(exit_code(&error))
        }
    }
}

async fn run(cli: Cli, target: &ControlTarget) -> anyhow::Result<()> {
    let format = cli.output;
    // Resolve plugin paths before connecting so that a bad path is reported
    // even when the daemon is down.
    let command = match cli.command {
        Command::Plugins(PluginsCommand::Load { path, activate }) => {
            Command::Plugins(PluginsCommand::Load { path: absolute_path(&path)?, activate })
        }
        Command::Plugins(PluginsCommand::Reload(mut args)) => {
            args.path = args.path.as_deref().map(absolute_path).transpose()?;
            Command::Plugins(PluginsCommand::Reload(args))
        }
        command => command,
    };
    let channel = connect(target).await?;

    match command {
        Command::Listeners(command) => listeners(channel, command, format).await,
        Command::Channels(command) => channels(channel, command, format).await,
        Command::Plugins(command) => plugins(channel, command, format, target).await,
        Command::Stats(args) => stats(channel, args, format).await,
        Command::LoopStats => {
            let stats = DaemonClient::new(channel).get_loop_stats(v1::GetLoopStatsRequest {}).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&loop_stats_json(&stats)),
                OutputFormat::Table => print_text(&loop_stats_table(&stats)),
            }
        }
    }
}

async fn listeners(channel: Channel, command: ListenersCommand, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = ListenersClient::new(channel);
    let listeners = match command {
        ListenersCommand::Ls => {
            let response = client.list_listeners(v1::ListListenersRequest {}).await?.into_inner();
            if format == OutputFormat::Json {
                let items: Vec<Value> = response.listeners.iter().map(listener_json).collect();
                return print_json(&json!({ "listeners": items }));
            }
            response.listeners
        }
        ListenersCommand::Start { address, plugin, config } => {
            let request =
                v1::StartListenerRequest { address, plugin, config: config.into_iter().collect::<HashMap<_, _>>() };
            vec![client.start_listener(request).await?.into_inner()]
        }
        ListenersCommand::Stop { id, close_channels } => {
            let request = v1::StopListenerRequest { id, close_channels };
            vec![client.stop_listener(request).await?.into_inner()]
        }
    };
    match format {
        // Only `ls` answers with a list; start and stop answer with the one
        // listener they changed, printed as an object.
        OutputFormat::Json => print_json(&listener_json(&listeners[0])),
        OutputFormat::Table => print_text(&listeners_table(&listeners)),
    }
}

async fn channels(channel: Channel, command: ChannelsCommand, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = ChannelsClient::new(channel);
    match command {
        ChannelsCommand::Ls { listener } => {
            let channels = list_all_channels(&mut client, listener).await?;
            match format {
                OutputFormat::Json => {
                    let items: Vec<Value> = channels.iter().map(channel_json).collect();
                    print_json(&json!({ "channels": items }))
                }
                OutputFormat::Table => print_text(&channels_table(&channels)),
            }
        }
        ChannelsCommand::Get { id } => {
            let found = client.get_channel(v1::GetChannelRequest { id }).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&channel_json(&found)),
                OutputFormat::Table => print_text(&channel_detail(&found)),
            }
        }
        ChannelsCommand::Close { id } => {
            let closed = client.close_channel(v1::CloseChannelRequest { id }).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&channel_json(&closed)),
                OutputFormat::Table => print_text(&channels_table(&[closed])),
            }
        }
    }
}

/// Follows `next_page_token` until the last page, so that `ls` shows every
/// channel whatever page size the daemon picks.
async fn list_all_channels(
    client: &mut ChannelsClient<Channel>,
    listener_id: Option<u64>,
) -> anyhow::Result<Vec<v1::Channel>> {
    let mut channels = Vec::new();
    let mut page_token = String::new();
    loop {
        let request = v1::ListChannelsRequest {
            listener_id,
            // Zero lets the daemon use its default page size.
            page_size: 0,
            page_token: page_token.clone(),
        };
        let page = client.list_channels(request).await?.into_inner();
        channels.extend(page.channels);
        if page.next_page_token.is_empty() {
            return Ok(channels);
        }
        // A daemon that hands back the token it was given would keep us
        // looping forever; stop with a message instead.
        if page.next_page_token == page_token {
            anyhow::bail!("the daemon repeated page token {:?} while listing channels", page_token);
        }
        page_token = page.next_page_token;
    }
}

async fn plugins(
    channel: Channel,
    command: PluginsCommand,
    format: OutputFormat,
    target: &ControlTarget,
) -> anyhow::Result<()> {
    let mut client = PluginsClient::new(channel);
    let (plugin, summary) = match command {
        PluginsCommand::Ls => {
            let response = client.list_plugins(v1::ListPluginsRequest {}).await?.into_inner();
            return match format {
                OutputFormat::Json => {
                    let items: Vec<Value> = response.plugins.iter().map(plugin_json).collect();
                    print_json(&json!({ "plugins": items }))
                }
                OutputFormat::Table => print_text(&plugins_table(&response.plugins)),
            };
        }
        PluginsCommand::Load { path, activate } => {
            // The name is only known once the daemon has opened the library,
            // so remember every plugin's current generation for the summary.
            let before = client.list_plugins(v1::ListPluginsRequest {}).await?.into_inner().plugins;
            // The daemon resolves paths against its own working directory,
            // which is not ours; `run` has already made the path absolute.
            let request = v1::LoadPluginRequest { path: path_text(&path)?, activate };
            let plugin = client.load_plugin(request).await?.into_inner();
            let previous = before.iter().find(|known| known.name == plugin.name).map(|known| known.current_generation);
            let summary = load_summary(&plugin, previous.unwrap_or(0));
            (plugin, summary)
        }
        PluginsCommand::Reload(args) if args.watch => return watch_and_reload(&mut client, args, format, target).await,
        PluginsCommand::Reload(args) => {
            let previous = current_generation(&mut client, &args.name).await?;
            let request = v1::ReloadPluginRequest {
                name: args.name,
                path: args.path.as_deref().map(path_text).transpose()?.unwrap_or_default(),
                drain_timeout_ms: args.drain_timeout.unwrap_or(0),
            };
            let plugin = client.reload_plugin(request).await?.into_inner();
            let summary = switch_summary(&plugin.name, plugin.current_generation, generation_number(previous.as_ref()));
            (plugin, summary)
        }
        PluginsCommand::Activate { name, generation, drain_timeout } => {
            let previous = current_generation(&mut client, &name).await?;
            let request = v1::ActivatePluginRequest { name, generation, drain_timeout_ms: drain_timeout.unwrap_or(0) };
            let plugin = client.activate_plugin(request).await?.into_inner();
            let summary = switch_summary(&plugin.name, plugin.current_generation, generation_number(previous.as_ref()));
            (plugin, summary)
        }
        PluginsCommand::Unload { name, generation, force } => {
            let plugin = client.unload_plugin(v1::UnloadPluginRequest { name, generation, force }).await?.into_inner();
            let summary = match generation {
                Some(generation) => format!("{}@{generation} is retired", plugin.name),
                None => format!("{} is unloaded: every generation is retired", plugin.name),
            };
            (plugin, summary)
        }
    };
    match format {
        OutputFormat::Json => print_json(&plugin_json(&plugin)),
        OutputFormat::Table => print_text(&format!("{summary}\n")),
    }
}

/// `plugins reload NAME --watch`: the edit-build-reload loop. Polls the
/// library's metadata and, once a change has settled, hashes the file and
/// reloads if the content differs from the current generation's. A failed
/// reload is reported and the watch goes on; only an unreachable daemon or
/// Ctrl-C ends it.
async fn watch_and_reload(
    client: &mut PluginsClient<Channel>,
    args: ReloadArgs,
    format: OutputFormat,
    target: &ControlTarget,
) -> anyhow::Result<()> {
    let path = match args.path {
        Some(path) => path,
        None => {
            let plugin = find_plugin(client, &args.name).await?;
            let current = current_of(&plugin).with_context(|| {
                format!("plugin {:?} has no current generation; activate one or pass --path", args.name)
            })?;
            PathBuf::from(&current.path)
        }
    };
    // Naming the file in every request, rather than letting the daemon take
    // the current generation's, keeps reloading the file being watched even
    // after someone activates a generation loaded from elsewhere.
    let path_in_request = path_text(&path)?;
    let drain_timeout_ms = args.drain_timeout.unwrap_or(0);
    eprintln!("watching {} for changes to {}; Ctrl-C to stop", path.display(), args.name);

    let watch = async {
        let mut ticks = tokio::time::interval(WATCH_INTERVAL);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut file_watch = FileWatch::default();
        let mut unreadable_reported = false;
        loop {
            ticks.tick().await;
            let stamp = match FileStamp::of(&path) {
                Ok(stamp) => {
                    unreadable_reported = false;
                    Some(stamp)
                }
                Err(error) => {
                    // Builds delete and recreate their output; say so once,
                    // not twice a second.
                    if !unreadable_reported {
                        eprintln!(
                            "asyncorectl: cannot read {}: {}; still watching",
                            path.display(),
                            io_error_text(&error)
                        );
                        unreadable_reported = true;
                    }
                    None
                }
            };
            if !file_watch.should_hash(stamp) {
                continue;
            }
            let sha256 = match file_sha256(&path) {
                Ok(sha256) => sha256,
                Err(error) => {
                    eprintln!("asyncorectl: cannot read {}: {}; still watching", path.display(), io_error_text(&error));
                    continue;
                }
            };
            let reloaded = reload_if_changed(client, &args.name, &path_in_request, &sha256, drain_timeout_ms).await;
            match reloaded.map_err(|error| transport_failure_as_unreachable(error, target)) {
                Ok(None) => {}
                Ok(Some((plugin, previous))) => match format {
                    OutputFormat::Json => print_json_line(&plugin_json(&plugin))?,
                    OutputFormat::Table => {
                        print_text(&format!("{}\n", switch_summary(&plugin.name, plugin.current_generation, previous)))?
                    }
                },
                Err(error) if exit_code(&error) == EXIT_UNREACHABLE => return Err(error),
                Err(error) => eprintln!("asyncorectl: {}", describe_error(&error)),
            }
        }
    };

    // Ctrl-C is the normal way to stop watching, so it ends with success.
    tokio::select! {
        signal = tokio::signal::ctrl_c() => signal.context("cannot listen for Ctrl-C"),
        result = watch => result,
    }
}

/// Reloads plugin `name` from `path` unless its current generation already
/// has content `sha256`. Returns the plugin after the reload and the
/// generation that was current before it (0 for none).
///
/// The current generation is asked for each time rather than remembered, so
/// that a reload or rollback by someone else is taken into account.
async fn reload_if_changed(
    client: &mut PluginsClient<Channel>,
    name: &str,
    path: &str,
    sha256: &str,
    drain_timeout_ms: u64,
) -> anyhow::Result<Option<(v1::Plugin, u32)>> {
    let current = current_generation(client, name).await?;
    if current.as_ref().is_some_and(|current| current.sha256 == sha256) {
        return Ok(None);
    }
    let request = v1::ReloadPluginRequest { name: name.to_owned(), path: path.to_owned(), drain_timeout_ms };
    let plugin = client.reload_plugin(request).await?.into_inner();
    Ok(Some((plugin, generation_number(current.as_ref()))))
}

/// Plugin `name` from `ListPlugins`, or NOT_FOUND in the words the daemon
/// uses when asked about a plugin it does not have.
async fn find_plugin(client: &mut PluginsClient<Channel>, name: &str) -> anyhow::Result<v1::Plugin> {
    let plugins = client.list_plugins(v1::ListPluginsRequest {}).await?.into_inner().plugins;
    plugins
        .into_iter()
        .find(|plugin| plugin.name == name)
        .ok_or_else(|| tonic::Status::not_found(format!("no plugin named {name:?} is loaded")).into())
}

/// The current generation of plugin `name`; `None` when it is not loaded or
/// has none, which the call that follows reports in the daemon's words.
async fn current_generation(
    client: &mut PluginsClient<Channel>,
    name: &str,
) -> anyhow::Result<Option<v1::PluginGeneration>> {
    let plugins = client.list_plugins(v1::ListPluginsRequest {}).await?.into_inner().plugins;
    Ok(plugins.iter().find(|plugin| plugin.name == name).and_then(current_of).cloned())
}

fn current_of(plugin: &v1::Plugin) -> Option<&v1::PluginGeneration> {
    if plugin.current_generation == 0 {
        return None;
    }
    plugin.generations.iter().find(|generation| generation.generation == plugin.current_generation)
}

fn generation_number(generation: Option<&v1::PluginGeneration>) -> u32 {
    generation.map_or(0, |generation| generation.generation)
}

/// `echo@3 is current (was echo@2)`; `previous` is 0 when nothing was.
fn switch_summary(name: &str, current: u32, previous: u32) -> String {
    if previous == 0 {
        format!("{name}@{current} is current")
    } else if previous == current {
        format!("{name}@{current} was already current")
    } else {
        format!("{name}@{current} is current (was {name}@{previous})")
    }
}

/// What `plugins load` did: the new generation is the highest, since the
/// daemon numbers each load of a name one above the last.
fn load_summary(plugin: &v1::Plugin, previous: u32) -> String {
    let loaded = plugin.generations.iter().map(|generation| generation.generation).max().unwrap_or(0);
    if loaded == plugin.current_generation {
        switch_summary(&plugin.name, loaded, previous)
    } else {
        format!(
            "{}@{loaded} is loaded on standby ({}@{} is current; activate it with `plugins activate {} {loaded}`)",
            plugin.name, plugin.name, plugin.current_generation, plugin.name
        )
    }
}

/// What identifies one version of the watched file without reading it.
/// Besides mtime and size, the inode catches a same-size replacement by
/// rename within the file system's mtime granularity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    device: u64,
    inode: u64,
}

impl FileStamp {
    fn of(path: &Path) -> io::Result<FileStamp> {
        let metadata = std::fs::metadata(path)?;
        Ok(FileStamp {
            modified: metadata.modified().ok(),
            len: metadata.len(),
            device: metadata.dev(),
            inode: metadata.ino(),
        })
    }
}

/// Decides when the watched file is worth hashing: once it has changed and
/// then stayed the same for a whole poll. A linker writes its output in
/// place over many writes, and a half-written library must never reach the
/// daemon's `dlopen`.
#[derive(Debug, Default)]
struct FileWatch {
    /// The stamp at the previous poll (`None`: missing or not polled yet).
    seen: Option<FileStamp>,
    /// The stamp of the last version hashed.
    hashed: Option<FileStamp>,
}

impl FileWatch {
    fn should_hash(&mut self, stamp: Option<FileStamp>) -> bool {
        let settled = stamp.is_some() && stamp == self.seen;
        self.seen = stamp;
        if settled && stamp != self.hashed {
            self.hashed = stamp;
            return true;
        }
        false
    }
}

async fn stats(channel: Channel, args: StatsArgs, format: OutputFormat) -> anyhow::Result<()> {
    let request =
        v1::WatchStatsRequest { interval_ms: args.interval, listener_id: args.listener, channel_ids: args.channels };
    let mut stream = ChannelsClient::new(channel).watch_stats(request).await?.into_inner();

    // Ctrl-C is the normal way to stop watching, so it ends with success
    // rather than the default signal death.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    loop {
        tokio::select! {
            signal = &mut ctrl_c => {
                signal.context("cannot listen for Ctrl-C")?;
                return Ok(());
            }
            message = stream.message() => {
                let Some(update) = message? else {
                    return Ok(());
                };
                match format {
                    OutputFormat::Json => print_json_line(&stats_update_json(&update))?,
                    OutputFormat::Table => print_text(&stats_update_block(&update))?,
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Connecting and errors
// ---------------------------------------------------------------------------

/// Turns `host:port` or `http://host:port` into the URI tonic wants.
///
/// Only plain `http://` is accepted: the daemon's control API has no TLS, and
/// tonic here is built without it.
fn control_target(address: &str) -> Result<ControlTarget, String> {
    let uri = match address.split_once("://") {
        Some(("http", _)) => address.to_owned(),
        Some((scheme, _)) => {
            return Err(format!(
                "control address {address:?}: scheme {scheme}:// is not supported, use host:port or http://host:port"
            ));
        }
        None => format!("http://{address}"),
    };
    Endpoint::from_shared(uri.clone())
        .map_err(|_| format!("control address {address:?} is not valid, expected host:port or http://host:port"))?;
    Ok(ControlTarget { shown: address.to_owned(), uri })
}

async fn connect(target: &ControlTarget) -> anyhow::Result<Channel> {
    let unreachable = |reason: String| Unreachable { address: target.shown.clone(), reason };
    let endpoint = Endpoint::from_shared(target.uri.clone())
        .map_err(|error| unreachable(root_cause_text(&error)))?
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT);
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(error)) => Err(unreachable(root_cause_text(&error)).into()),
        Err(_elapsed) => Err(unreachable("timed out".to_owned()).into()),
    }
}

/// A call that failed in the transport (connection reset, peer closed, timed
/// out) yields a `Status` that tonic made up on our side; unlike a status
/// the daemon sent, it carries the transport error as its source. Either way
/// the daemon did not answer, so it is reported like a failed connect.
fn transport_failure_as_unreachable(error: anyhow::Error, target: &ControlTarget) -> anyhow::Error {
    match error.downcast::<tonic::Status>() {
        Ok(status) if status.source().is_some() => {
            Unreachable { address: target.shown.clone(), reason: root_cause_text(&status) }.into()
        }
        Ok(status) => status.into(),
        Err(error) => error,
    }
}

/// The innermost cause of a transport error, which is the useful part:
/// tonic's own layers only say "transport error".
fn root_cause_text(error: &(dyn StdError + 'static)) -> String {
    let mut cause = error;
    while let Some(source) = cause.source() {
        cause = source;
    }
    match cause.downcast_ref::<io::Error>() {
        Some(io_error) => io_error_text(io_error),
        None => cause.to_string(),
    }
}

/// "Connection refused (os error 111)" becomes "connection refused", to
/// match the lowercase style of every other message we print.
fn io_error_text(error: &io::Error) -> String {
    let text = error.to_string();
    let text = match text.rfind(" (os error ") {
        Some(index) if text.ends_with(')') => &text[..index],
        _ => &text,
    };
    lowercase_first(text)
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

fn describe_error(error: &anyhow::Error) -> String {
    match error.downcast_ref::<tonic::Status>() {
        Some(status) if status.message().is_empty() => code_name(status.code()).to_owned(),
        Some(status) => format!("{}: {}", code_name(status.code()), status.message()),
        None => format!("{error:#}"),
    }
}

fn exit_code(error: &anyhow::Error) -> u8 {
    if error.downcast_ref::<Unreachable>().is_some() { EXIT_UNREACHABLE } else { EXIT_SERVER_ERROR }
}

fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.downcast_ref::<io::Error>().is_some_and(|io_error| io_error.kind() == io::ErrorKind::BrokenPipe)
}

/// The gRPC code as lowercase words, as in `not found: no channel 42`.
/// tonic's `Display` for `Code` is a sentence, and its `Debug` is CamelCase.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code;
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid argument",
        Code::DeadlineExceeded => "deadline exceeded",
        Code::NotFound => "not found",
        Code::AlreadyExists => "already exists",
        Code::PermissionDenied => "permission denied",
        Code::ResourceExhausted => "resource exhausted",
        Code::FailedPrecondition => "failed precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out of range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

// ---------------------------------------------------------------------------
// Argument parsers
// ---------------------------------------------------------------------------

/// Plugin paths go to the daemon absolute: it resolves relative ones
/// against its own working directory, which is not ours.
fn absolute_path(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("cannot make {} absolute", path.display()))
}

fn path_text(path: &Path) -> anyhow::Result<String> {
    Ok(path.to_str().with_context(|| format!("plugin path {} is not valid UTF-8", path.display()))?.to_owned())
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

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

fn print_text(text: &str) -> anyhow::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_all(text.as_bytes())?;
    // `stats` prints a block per message; flushing makes each appear at once
    // even when stdout is a pipe.
    stdout.flush()?;
    Ok(())
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    print_text(&text)
}

/// One compact object per line (NDJSON), so `jq` or a line reader can follow
/// `stats` as it streams.
fn print_json_line(value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string(value)?;
    text.push('\n');
    print_text(&text)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// A table of aligned columns separated by two spaces, with an optional
/// header row. Widths count `char`s, which is right for the ASCII we print
/// and close enough for the odd non-ASCII plugin name.
#[derive(Debug)]
struct Table {
    headers: Option<Vec<&'static str>>,
    aligns: Vec<Align>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Table {
            headers: Some(columns.iter().map(|(name, _)| *name).collect()),
            aligns: columns.iter().map(|(_, align)| *align).collect(),
            rows: Vec::new(),
        }
    }

    /// Two columns, field name and value, without a header: the layout for
    /// showing one object.
    fn key_value(pairs: Vec<(&str, String)>) -> Self {
        Table {
            headers: None,
            aligns: vec![Align::Left, Align::Left],
            rows: pairs.into_iter().map(|(key, value)| vec![key.to_owned(), value]).collect(),
        }
    }

    fn push(&mut self, row: Vec<String>) {
        debug_assert_eq!(row.len(), self.aligns.len(), "row width");
        self.rows.push(row);
    }

    /// Renders every line with a trailing newline and without trailing
    /// spaces, so that a last column that is often empty costs nothing.
    fn render(&self) -> String {
        let header_row: Option<Vec<String>> =
            self.headers.as_ref().map(|headers| headers.iter().map(|name| (*name).to_owned()).collect());
        let all_rows: Vec<&Vec<String>> = header_row.iter().chain(self.rows.iter()).collect();

        let mut widths = vec![0; self.aligns.len()];
        for row in &all_rows {
            for (width, cell) in widths.iter_mut().zip(row.iter()) {
                *width = (*width).max(cell.chars().count());
            }
        }

        let mut out = String::new();
        for row in all_rows {
            let mut line = String::new();
            for (index, cell) in row.iter().enumerate() {
                if index > 0 {
                    line.push_str("  ");
                }
                let padding = widths[index] - cell.chars().count();
                match self.aligns[index] {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', padding));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', padding));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

fn dash_if_empty(text: &str) -> String {
    if text.is_empty() { "-".to_owned() } else { text.to_owned() }
}

/// Ids where 0 means "none" (no listener, no parent).
fn dash_if_zero(id: u64) -> String {
    if id == 0 { "-".to_owned() } else { id.to_string() }
}

fn listeners_table(listeners: &[v1::Listener]) -> String {
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("ADDRESS", Align::Left),
        ("PLUGIN", Align::Left),
        ("STATE", Align::Left),
        ("CHANNELS", Align::Right),
        ("CREATED", Align::Left),
        ("CONFIG", Align::Left),
    ]);
    for listener in listeners {
        table.push(vec![
            listener.id.to_string(),
            listener.address.clone(),
            plugin_ref(&listener.plugin, listener.plugin_generation),
            listener_state_name(listener.state),
            listener.channel_count.to_string(),
            timestamp_text(listener.created_at.as_ref()),
            config_text(&listener.config),
        ]);
    }
    table.render()
}

/// `key=value,key=value` sorted by key, because the map's order is random.
fn config_text(config: &HashMap<String, String>) -> String {
    let mut entries: Vec<_> = config.iter().collect();
    entries.sort();
    let text: Vec<String> = entries.into_iter().map(|(key, value)| format!("{key}={value}")).collect();
    dash_if_empty(&text.join(","))
}

fn channels_table(channels: &[v1::Channel]) -> String {
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("LISTENER", Align::Right),
        ("PLUGIN", Align::Left),
        ("KIND", Align::Left),
        ("STATE", Align::Left),
        ("PEER", Align::Left),
        ("LOCAL", Align::Left),
        ("BYTES_IN", Align::Right),
        ("BYTES_OUT", Align::Right),
        ("PENDING", Align::Right),
        ("CREATED", Align::Left),
    ]);
    for channel in channels {
        table.push(vec![
            channel.id.to_string(),
            dash_if_zero(channel.listener_id),
            plugin_ref(&channel.plugin, channel.plugin_generation),
            channel_kind_name(channel.kind),
            channel_state_name(channel.state),
            dash_if_empty(&channel.peer_address),
            dash_if_empty(&channel.local_address),
            channel.bytes_in.to_string(),
            channel.bytes_out.to_string(),
            channel.pending_output.to_string(),
            timestamp_text(channel.created_at.as_ref()),
        ]);
    }
    table.render()
}

fn channel_detail(channel: &v1::Channel) -> String {
    Table::key_value(vec![
        ("id", channel.id.to_string()),
        ("listener_id", dash_if_zero(channel.listener_id)),
        ("plugin", plugin_ref(&channel.plugin, channel.plugin_generation)),
        ("kind", channel_kind_name(channel.kind)),
        ("state", channel_state_name(channel.state)),
        ("peer_address", dash_if_empty(&channel.peer_address)),
        ("local_address", dash_if_empty(&channel.local_address)),
        ("created_at", timestamp_text(channel.created_at.as_ref())),
        ("bytes_in", channel.bytes_in.to_string()),
        ("bytes_out", channel.bytes_out.to_string()),
        ("reads", channel.reads.to_string()),
        ("writes", channel.writes.to_string()),
        ("pending_output", channel.pending_output.to_string()),
        ("parent_id", dash_if_zero(channel.parent_id)),
    ])
    .render()
}

/// `echo@2`: a plugin and the generation serving something; the bare name
/// when the daemon sent no generation, `-` when it sent no plugin.
fn plugin_ref(name: &str, generation: u32) -> String {
    match (name, generation) {
        ("", _) => "-".to_owned(),
        (name, 0) => name.to_owned(),
        (name, generation) => format!("{name}@{generation}"),
    }
}

/// One row per generation: for each plugin its current generation first,
/// then the others newest first, which is the order rollbacks go in.
fn plugins_table(plugins: &[v1::Plugin]) -> String {
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("GEN", Align::Right),
        ("STATE", Align::Left),
        ("VERSION", Align::Left),
        ("ABI", Align::Left),
        ("CHANNELS", Align::Right),
        ("PANICS", Align::Right),
        ("LISTENERS", Align::Left),
        ("SHA256", Align::Left),
        ("LOADED", Align::Left),
    ]);
    for plugin in plugins {
        let mut generations: Vec<&v1::PluginGeneration> = plugin.generations.iter().collect();
        generations.sort_by_key(|generation| {
            (generation.generation != plugin.current_generation, std::cmp::Reverse(generation.generation))
        });
        for generation in generations {
            let listener_ids: Vec<String> = generation.listener_ids.iter().map(u64::to_string).collect();
            table.push(vec![
                plugin.name.clone(),
                generation.generation.to_string(),
                generation_state_name(generation.state),
                dash_if_empty(&generation.version),
                dash_if_empty(&generation.abi_version),
                generation.live_channels.to_string(),
                generation.panics.to_string(),
                dash_if_empty(&listener_ids.join(",")),
                dash_if_empty(generation.sha256.get(..SHA256_SHOWN).unwrap_or(&generation.sha256)),
                timestamp_text(generation.loaded_at.as_ref()),
            ]);
        }
    }
    table.render()
}

fn loop_stats_table(stats: &v1::LoopStats) -> String {
    Table::key_value(vec![
        ("passes", stats.passes.to_string()),
        ("events", stats.events.to_string()),
        ("handler_calls", stats.handler_calls.to_string()),
        ("interest_queries", stats.interest_queries.to_string()),
        ("interest_changes", stats.interest_changes.to_string()),
        ("channels", stats.channels.to_string()),
        ("panics", stats.panics.to_string()),
        ("accepts", stats.accepts.to_string()),
        ("commands", stats.commands.to_string()),
    ])
    .render()
}

/// One `stats` message: a header line, a row per channel, a blank line to
/// separate it from the next.
fn stats_update_block(update: &v1::StatsUpdate) -> String {
    let mut table = Table::new(&[
        ("CHANNEL", Align::Right),
        ("LISTENER", Align::Right),
        ("BYTES_IN", Align::Right),
        ("BYTES_OUT", Align::Right),
        ("IN/S", Align::Right),
        ("OUT/S", Align::Right),
        ("PENDING", Align::Right),
        ("", Align::Left),
    ]);
    for stats in &update.channels {
        table.push(vec![
            stats.channel_id.to_string(),
            dash_if_zero(stats.listener_id),
            stats.bytes_in.to_string(),
            stats.bytes_out.to_string(),
            rate_text(stats.bytes_in_rate),
            rate_text(stats.bytes_out_rate),
            stats.pending_output.to_string(),
            if stats.closed { "closed" } else { "" }.to_owned(),
        ]);
    }
    format!("seq {} at {}\n{}\n", update.seq, timestamp_text(update.at.as_ref()), table.render())
}

/// Whole bytes per second: fractions of a byte are noise at a glance, and
/// scripts get the exact figure from `-o json`.
fn rate_text(rate: f64) -> String {
    if rate.is_finite() { format!("{rate:.0}") } else { "-".to_owned() }
}

/// Enum names without their type prefix, in lowercase:
/// `CHANNEL_STATE_OPEN` becomes `open`. Values this build does not know (a
/// newer daemon) show as `unknown(N)` rather than being hidden.
fn short_enum_name(full_name: &str, prefix: &str) -> String {
    full_name.strip_prefix(prefix).unwrap_or(full_name).to_ascii_lowercase()
}

fn listener_state_name(raw: i32) -> String {
    match v1::ListenerState::try_from(raw) {
        Ok(state) => short_enum_name(state.as_str_name(), "LISTENER_STATE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

fn channel_kind_name(raw: i32) -> String {
    match v1::ChannelKind::try_from(raw) {
        Ok(kind) => short_enum_name(kind.as_str_name(), "CHANNEL_KIND_"),
        Err(_) => format!("unknown({raw})"),
    }
}

fn generation_state_name(raw: i32) -> String {
    match v1::GenerationState::try_from(raw) {
        Ok(state) => short_enum_name(state.as_str_name(), "GENERATION_STATE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

fn channel_state_name(raw: i32) -> String {
    match v1::ChannelState::try_from(raw) {
        Ok(state) => short_enum_name(state.as_str_name(), "CHANNEL_STATE_"),
        Err(_) => format!("unknown({raw})"),
    }
}

// ---------------------------------------------------------------------------
// Timestamps
// ---------------------------------------------------------------------------

/// Whole-second RFC 3339 in UTC for tables, `-` when the daemon sent none.
fn timestamp_text(timestamp: Option<&prost_types::Timestamp>) -> String {
    match timestamp {
        Some(timestamp) => rfc3339(timestamp, false),
        None => "-".to_owned(),
    }
}

/// RFC 3339 with the fraction protobuf's JSON mapping uses (0, 3, 6 or 9
/// digits), or null, for `-o json`.
fn timestamp_json(timestamp: Option<&prost_types::Timestamp>) -> Value {
    match timestamp {
        Some(timestamp) => Value::String(rfc3339(timestamp, true)),
        None => Value::Null,
    }
}

fn rfc3339(timestamp: &prost_types::Timestamp, with_fraction: bool) -> String {
    // A sender may put out-of-range nanos in the message; normalising folds
    // them into seconds instead of printing nonsense.
    let mut timestamp = *timestamp;
    timestamp.normalize();
    let days = timestamp.seconds.div_euclid(86_400);
    let second_of_day = timestamp.seconds.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let mut text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        second_of_day / 3_600,
        second_of_day / 60 % 60,
        second_of_day % 60
    );
    if with_fraction && timestamp.nanos != 0 {
        let nanos = timestamp.nanos;
        if nanos % 1_000_000 == 0 {
            text.push_str(&format!(".{:03}", nanos / 1_000_000));
        } else if nanos % 1_000 == 0 {
            text.push_str(&format!(".{:06}", nanos / 1_000));
        } else {
            text.push_str(&format!(".{nanos:09}"));
        }
    }
    text.push('Z');
    text
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day).
/// Howard Hinnant's `civil_from_days`,
/// <https://howardhinnant.github.io/date_algorithms.html#civil_from_days>.
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    // Months counted from March, so that February's leap day comes last.
    let march_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * march_month + 2) / 5 + 1;
    let month = if march_month < 10 { march_month + 3 } else { march_month - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------
// JSON
// ---------------------------------------------------------------------------

// Field names are the proto's. Unlike protobuf's canonical JSON mapping,
// uint64 values are JSON numbers (scripts compare them) and enums use the
// same short words as the tables.

fn listener_json(listener: &v1::Listener) -> Value {
    json!({
        "id": listener.id,
        "address": listener.address,
        "plugin": listener.plugin,
        "plugin_generation": listener.plugin_generation,
        "state": listener_state_name(listener.state),
        "channel_count": listener.channel_count,
        "config": listener.config,
        "channel_id": listener.channel_id,
        "created_at": timestamp_json(listener.created_at.as_ref()),
    })
}

fn channel_json(channel: &v1::Channel) -> Value {
    json!({
        "id": channel.id,
        "listener_id": channel.listener_id,
        "plugin": channel.plugin,
        "plugin_generation": channel.plugin_generation,
        "kind": channel_kind_name(channel.kind),
        "peer_address": channel.peer_address,
        "local_address": channel.local_address,
        "state": channel_state_name(channel.state),
        "created_at": timestamp_json(channel.created_at.as_ref()),
        "bytes_in": channel.bytes_in,
        "bytes_out": channel.bytes_out,
        "reads": channel.reads,
        "writes": channel.writes,
        "pending_output": channel.pending_output,
        "parent_id": channel.parent_id,
    })
}

fn plugin_json(plugin: &v1::Plugin) -> Value {
    json!({
        "name": plugin.name,
        "version": plugin.version,
        "abi_version": plugin.abi_version,
        "path": plugin.path,
        "listener_ids": plugin.listener_ids,
        "live_channels": plugin.live_channels,
        "panics": plugin.panics,
        "sdk_version": plugin.sdk_version,
        "loaded_at": timestamp_json(plugin.loaded_at.as_ref()),
        "current_generation": plugin.current_generation,
        "generations": plugin.generations.iter().map(generation_json).collect::<Vec<_>>(),
    })
}

fn generation_json(generation: &v1::PluginGeneration) -> Value {
    json!({
        "generation": generation.generation,
        "version": generation.version,
        "abi_version": generation.abi_version,
        "sdk_version": generation.sdk_version,
        "path": generation.path,
        "sha256": generation.sha256,
        "loaded_at": timestamp_json(generation.loaded_at.as_ref()),
        "state": generation_state_name(generation.state),
        "listener_ids": generation.listener_ids,
        "live_channels": generation.live_channels,
        "panics": generation.panics,
    })
}

fn loop_stats_json(stats: &v1::LoopStats) -> Value {
    json!({
        "passes": stats.passes,
        "events": stats.events,
        "handler_calls": stats.handler_calls,
        "interest_queries": stats.interest_queries,
        "interest_changes": stats.interest_changes,
        "channels": stats.channels,
        "panics": stats.panics,
        "accepts": stats.accepts,
        "commands": stats.commands,
    })
}

fn stats_update_json(update: &v1::StatsUpdate) -> Value {
    let channels: Vec<Value> = update
        .channels
        .iter()
        .map(|stats| {
            json!({
                "channel_id": stats.channel_id,
                "listener_id": stats.listener_id,
                "bytes_in": stats.bytes_in,
                "bytes_out": stats.bytes_out,
                "reads": stats.reads,
                "writes": stats.writes,
                "pending_output": stats.pending_output,
                "bytes_in_rate": stats.bytes_in_rate,
                "bytes_out_rate": stats.bytes_out_rate,
                "closed": stats.closed,
            })
        })
        .collect();
    json!({
        "seq": update.seq,
        "at": timestamp_json(update.at.as_ref()),
        "interval_seconds": update.interval_seconds,
        "channels": channels,
    })
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

    fn generation(number: u32, state: v1::GenerationState, sha256: &str) -> v1::PluginGeneration {
        v1::PluginGeneration {
            generation: number,
            version: "0.1.0".into(),
            abi_version: "1.0".into(),
            sha256: sha256.into(),
            state: state as i32,
            ..Default::default()
        }
    }

    #[test]
    fn plugins_table_lists_current_generation_first() {
        let plugin = v1::Plugin {
            name: "echo".into(),
            current_generation: 2,
            generations: vec![
                generation(1, v1::GenerationState::Draining, "0123456789abcdef"),
                generation(2, v1::GenerationState::Current, "fedcba9876543210"),
                generation(3, v1::GenerationState::Standby, ""),
            ],
            ..Default::default()
        };
        let table = plugins_table(&[plugin]);
        let rows: Vec<Vec<&str>> = table.lines().map(|line| line.split_whitespace().collect()).collect();
        assert_eq!(rows[0][..3], ["NAME", "GEN", "STATE"]);
        assert_eq!(rows[1][..3], ["echo", "2", "current"]);
        assert_eq!(rows[2][..3], ["echo", "3", "standby"]);
        assert_eq!(rows[3][..3], ["echo", "1", "draining"]);
        assert_eq!(rows[1][8], "fedcba987654");
        assert_eq!(rows[2][8], "-");
    }

    #[test]
    fn plugin_refs_name_the_generation() {
        assert_eq!(plugin_ref("echo", 2), "echo@2");
        assert_eq!(plugin_ref("echo", 0), "echo");
        assert_eq!(plugin_ref("", 0), "-");
        assert_eq!(switch_summary("echo", 3, 2), "echo@3 is current (was echo@2)");
        assert_eq!(switch_summary("echo", 1, 0), "echo@1 is current");
        assert_eq!(switch_summary("echo", 1, 1), "echo@1 was already current");
    }

    #[test]
    fn load_summary_tells_standby_from_current() {
        let mut plugin = v1::Plugin {
            name: "echo".into(),
            current_generation: 1,
            generations: vec![
                generation(1, v1::GenerationState::Current, ""),
                generation(2, v1::GenerationState::Standby, ""),
            ],
            ..Default::default()
        };
        assert_eq!(
            load_summary(&plugin, 1),
            "echo@2 is loaded on standby (echo@1 is current; activate it with `plugins activate echo 2`)"
        );
        plugin.current_generation = 2;
        assert_eq!(load_summary(&plugin, 1), "echo@2 is current (was echo@1)");
    }

    #[test]
    fn file_watch_hashes_once_per_settled_change() {
        let stamp = |len| Some(FileStamp { modified: None, len, device: 1, inode: 7 });
        let mut watch = FileWatch::default();
        // The first sighting only starts the clock; the next poll hashes.
        assert!(!watch.should_hash(stamp(10)));
        assert!(watch.should_hash(stamp(10)));
        assert!(!watch.should_hash(stamp(10)));
        // A file still being written is left alone until it stops changing.
        assert!(!watch.should_hash(stamp(20)));
        assert!(!watch.should_hash(stamp(30)));
        assert!(watch.should_hash(stamp(30)));
        // Gone, then back as it was: nothing new to hash.
        assert!(!watch.should_hash(None));
        assert!(!watch.should_hash(stamp(30)));
        assert!(!watch.should_hash(stamp(30)));
        // Back different.
        assert!(!watch.should_hash(None));
        assert!(!watch.should_hash(stamp(40)));
        assert!(watch.should_hash(stamp(40)));
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

    #[test]
    fn table_aligns_columns() {
        let mut table = Table::new(&[("ID", Align::Right), ("NAME", Align::Left), ("NOTE", Align::Left)]);
        table.push(vec!["7".into(), "echo".into(), "".into()]);
        table.push(vec!["1234".into(), "x".into(), "closed".into()]);
        assert_eq!(table.render(), "  ID  NAME  NOTE\n   7  echo\n1234  x     closed\n");
    }

    #[test]
    fn table_without_rows_prints_header() {
        let table = Table::new(&[("ID", Align::Right), ("NAME", Align::Left)]);
        assert_eq!(table.render(), "ID  NAME\n");
    }

    #[test]
    fn key_value_table_has_no_header() {
        let table = Table::key_value(vec![("passes", "3".into()), ("handler_calls", "12".into())]);
        assert_eq!(table.render(), "passes         3\nhandler_calls  12\n");
    }

    #[test]
    fn table_counts_chars_not_bytes() {
        let mut table = Table::new(&[("NAME", Align::Left), ("N", Align::Right)]);
        table.push(vec!["héllo".into(), "1".into()]);
        assert_eq!(table.render(), "NAME   N\nhéllo  1\n");
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        let at = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
        assert_eq!(rfc3339(&at(0, 0), false), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(&at(951_782_400, 0), false), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(&at(1_700_000_000, 0), false), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(&at(-1, 0), false), "1969-12-31T23:59:59Z");
        assert_eq!(rfc3339(&at(253_402_300_799, 0), false), "9999-12-31T23:59:59Z");
        assert_eq!(rfc3339(&at(0, 500_000_000), false), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(&at(0, 500_000_000), true), "1970-01-01T00:00:00.500Z");
        assert_eq!(rfc3339(&at(0, 1_000), true), "1970-01-01T00:00:00.000001Z");
        assert_eq!(rfc3339(&at(0, 1), true), "1970-01-01T00:00:00.000000001Z");
    }

    #[test]
    fn control_addresses() {
        assert_eq!(control_target("127.0.0.1:50051").map(|target| target.uri), Ok("http://127.0.0.1:50051".to_owned()));
        assert_eq!(control_target("http://[::1]:7000").map(|target| target.uri), Ok("http://[::1]:7000".to_owned()));
        assert!(control_target("https://example:1").is_err());
        assert!(control_target("not a host").is_err());
    }

    #[test]
    fn enum_names_are_short() {
        assert_eq!(listener_state_name(v1::ListenerState::Listening as i32), "listening");
        assert_eq!(channel_kind_name(v1::ChannelKind::Outbound as i32), "outbound");
        assert_eq!(channel_state_name(v1::ChannelState::Closing as i32), "closing");
        assert_eq!(channel_state_name(99), "unknown(99)");
    }

    #[test]
    fn status_errors_name_their_code() {
        let error = anyhow::Error::from(tonic::Status::not_found("no channel 42"));
        assert_eq!(describe_error(&error), "not found: no channel 42");
        assert_eq!(exit_code(&error), EXIT_SERVER_ERROR);
    }

    #[test]
    fn transport_statuses_are_unreachable() {
        let target = control_target("127.0.0.1:1").unwrap();
        let mut status = tonic::Status::from_error(Box::new(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "Connection reset by peer (os error 104)",
        )));
        let error = transport_failure_as_unreachable(status.into(), &target);
        assert_eq!(exit_code(&error), EXIT_UNREACHABLE);
        assert_eq!(describe_error(&error), "cannot reach the daemon at 127.0.0.1:1: connection reset by peer");

        status = tonic::Status::unavailable("daemon draining");
        let error = transport_failure_as_unreachable(status.into(), &target);
        assert_eq!(exit_code(&error), EXIT_SERVER_ERROR);
        assert_eq!(describe_error(&error), "unavailable: daemon draining");
    }

    #[test]
    fn io_errors_lose_the_os_error_suffix() {
        let error = io::Error::other("Connection refused (os error 111)");
        assert_eq!(io_error_text(&error), "connection refused");
    }
}

/// SHA-256 of a file, lower-case hex: what `ListPlugins` reports for the
/// library a generation was loaded from.
fn file_sha256(path: &Path) -> io::Result<String> {
    use sha2::{Digest as _, Sha256};
    let digest = Sha256::digest(std::fs::read(path)?);
    Ok(digest.iter().map(|b| format!("{b:02x}")).collect())
}
