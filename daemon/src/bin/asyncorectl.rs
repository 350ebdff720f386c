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
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

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
    /// List loaded plugins.
    Ls,
    /// Load a plugin library (.so).
    Load {
        /// Path of the library, relative to the current directory or absolute.
        path: PathBuf,
    },
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
    // Resolve the plugin path before connecting so that a bad path is
    // reported even when the daemon is down.
    let command = match cli.command {
        Command::Plugins(PluginsCommand::Load { path }) => {
            let absolute =
                std::path::absolute(&path).with_context(|| format!("cannot make {} absolute", path.display()))?;
            Command::Plugins(PluginsCommand::Load { path: absolute })
        }
        command => command,
    };
    let channel = connect(target).await?;

    match command {
        Command::Listeners(command) => listeners(channel, command, format).await,
        Command::Channels(command) => channels(channel, command, format).await,
        Command::Plugins(command) => plugins(channel, command, format).await,
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

async fn plugins(channel: Channel, command: PluginsCommand, format: OutputFormat) -> anyhow::Result<()> {
    let mut client = PluginsClient::new(channel);
    match command {
        PluginsCommand::Ls => {
            let response = client.list_plugins(v1::ListPluginsRequest {}).await?.into_inner();
            match format {
                OutputFormat::Json => {
                    let items: Vec<Value> = response.plugins.iter().map(plugin_json).collect();
                    print_json(&json!({ "plugins": items }))
                }
                OutputFormat::Table => print_text(&plugins_table(&response.plugins)),
            }
        }
        PluginsCommand::Load { path } => {
            // The daemon resolves paths against its own working directory,
            // which is not ours; `run` has already made the path absolute.
            let path =
                path.to_str().with_context(|| format!("plugin path {} is not valid UTF-8", path.display()))?.to_owned();
            let plugin = client.load_plugin(v1::LoadPluginRequest { path, activate: false }).await?.into_inner();
            match format {
                OutputFormat::Json => print_json(&plugin_json(&plugin)),
                OutputFormat::Table => print_text(&plugins_table(&[plugin])),
            }
        }
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

/// Parses `-c key=value`. The value may be empty and may contain `=`; only
/// the first `=` separates.
fn parse_key_value(text: &str) -> Result<(String, String), String> {
    let (key, value) = text.split_once('=').ok_or_else(|| "expected KEY=VALUE, found no '='".to_owned())?;
    if key.is_empty() {
        return Err("expected KEY=VALUE, the key is empty".to_owned());
    }
    Ok((key.to_owned(), value.to_owned()))
}

/// Parses `500ms`, `1s`, `2m` or a bare number of milliseconds into the
/// milliseconds `WatchStatsRequest` carries.
fn parse_interval_ms(text: &str) -> Result<u32, String> {
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
    let too_long = || format!("the interval may be at most {}ms", u32::MAX);
    let count: u64 = digits.parse().map_err(|_| too_long())?;
    let milliseconds = count.checked_mul(unit_ms).and_then(|ms| u32::try_from(ms).ok()).ok_or_else(too_long)?;
    if u64::from(milliseconds) < MIN_INTERVAL_MS {
        return Err(format!("the interval must be at least {MIN_INTERVAL_MS}ms"));
    }
    Ok(milliseconds)
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
            listener.plugin.clone(),
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
        ("plugin", dash_if_empty(&channel.plugin)),
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

fn plugins_table(plugins: &[v1::Plugin]) -> String {
    let mut table = Table::new(&[
        ("NAME", Align::Left),
        ("VERSION", Align::Left),
        ("ABI", Align::Left),
        ("SDK", Align::Left),
        ("LISTENERS", Align::Left),
        ("CHANNELS", Align::Right),
        ("PANICS", Align::Right),
        ("LOADED", Align::Left),
        ("PATH", Align::Left),
    ]);
    for plugin in plugins {
        let listener_ids: Vec<String> = plugin.listener_ids.iter().map(u64::to_string).collect();
        table.push(vec![
            plugin.name.clone(),
            dash_if_empty(&plugin.version),
            dash_if_empty(&plugin.abi_version),
            dash_if_empty(&plugin.sdk_version),
            dash_if_empty(&listener_ids.join(",")),
            plugin.live_channels.to_string(),
            plugin.panics.to_string(),
            timestamp_text(plugin.loaded_at.as_ref()),
            plugin.path.clone(),
        ]);
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
