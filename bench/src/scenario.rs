//! The scenarios: what each one loads the servers with, and which servers
//! it compares. Their names are what `--scenario` takes.

use crate::servers::ServerKind::{self, AsyncoredEcho, AsyncoredHttp, EpollEcho, EpollHttp, PythonAsyncore, TokioEcho};

/// What a scenario does to each server.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Workload {
    /// Busy echo connections, each with `depth` messages of `message` bytes
    /// in flight; with `idle` other connections open and silent, the same
    /// load is first measured without them, on the same server process.
    Echo { connections: usize, message: usize, depth: usize, idle: usize },
    /// Keep-alive `GET /` on `connections`, `pipeline` requests in flight
    /// on each.
    Http { connections: usize, pipeline: usize },
    /// Connections opened as fast as the server takes them, and held: the
    /// rate, and the server's resident memory per connection.
    Hold,
    /// 50 busy echo connections beside `channels` idle ones, without and
    /// with control clients (`clients`) at work.
    Storm { channels: usize, clients: StormClients },
}

/// The control clients of a storm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StormClients {
    /// `ListChannels` paging through every channel back to back, and a
    /// `WatchStats` stream of every channel's figures at 100 ms.
    ListAndWatch,
    /// This many `WatchStats` streams of every channel at 100 ms, each
    /// asking for what changed (`changed_only`): a monitoring setup.
    Watchers(usize),
}

/// One scenario.
#[derive(Debug)]
pub(crate) struct Scenario {
    pub(crate) name: &'static str,
    pub(crate) description: &'static str,
    pub(crate) workload: Workload,
}

const fn echo(connections: usize, message: usize, depth: usize, idle: usize) -> Workload {
    Workload::Echo { connections, message, depth, idle }
}

/// Every scenario, in the order they run.
pub(crate) const SCENARIOS: &[Scenario] = &[
    Scenario { name: "echo-1x64", description: "echo, 1 connection, 64 B messages", workload: echo(1, 64, 1, 0) },
    Scenario { name: "echo-50x64", description: "echo, 50 connections, 64 B", workload: echo(50, 64, 1, 0) },
    Scenario { name: "echo-50x4k", description: "echo, 50 connections, 4 KiB", workload: echo(50, 4096, 1, 0) },
    Scenario { name: "echo-500x64", description: "echo, 500 connections, 64 B", workload: echo(500, 64, 1, 0) },
    Scenario { name: "echo-1x64k", description: "echo, 1 connection, 64 KiB", workload: echo(1, 65536, 1, 0) },
    Scenario {
        name: "echo-50x64-depth16",
        description: "echo, 50 connections, 64 B, 16 messages in flight on each",
        workload: echo(50, 64, 16, 0),
    },
    Scenario {
        name: "echo-50x64-idle5000",
        description: "echo, 50 connections, 64 B, beside 5,000 idle connections (and the same without)",
        workload: echo(50, 64, 1, 5000),
    },
    Scenario {
        name: "http-1",
        description: "HTTP keep-alive GET /, 1 connection",
        workload: Workload::Http { connections: 1, pipeline: 1 },
    },
    Scenario {
        name: "http-50",
        description: "HTTP keep-alive GET /, 50 connections",
        workload: Workload::Http { connections: 50, pipeline: 1 },
    },
    Scenario {
        name: "http-500",
        description: "HTTP keep-alive GET /, 500 connections",
        workload: Workload::Http { connections: 500, pipeline: 1 },
    },
    Scenario {
        name: "http-50-pipeline16",
        description: "HTTP keep-alive GET /, 50 connections, 16 pipelined requests in flight on each",
        workload: Workload::Http { connections: 50, pipeline: 16 },
    },
    Scenario {
        name: "hold",
        description: "connections opened (128 connects in flight) and held, up to 19,000",
        workload: Workload::Hold,
    },
    Scenario {
        name: "storm",
        description: "echo, 50 connections, 64 B, beside 10,000 idle channels, without and with a control-plane storm",
        workload: Workload::Storm { channels: 10_000, clients: StormClients::ListAndWatch },
    },
    Scenario {
        name: "watchers",
        description: "echo, 50 connections, 64 B, beside 19,000 idle channels, without and with 10 WatchStats \
                      streams of what changed at 100 ms",
        workload: Workload::Storm { channels: 19_000, clients: StormClients::Watchers(10) },
    },
];

impl Workload {
    /// The servers compared, ceiling first. Python's asyncore is left out
    /// where it would take minutes rather than seconds: it rebuilds its poll
    /// set on every pass and accepts one connection per pass, so opening
    /// 19,000 connections costs it time quadratic in their number (and
    /// 5,000 idle ones are left to full runs).
    pub(crate) fn servers(&self, smoke: bool) -> &'static [ServerKind] {
        match *self {
            Workload::Echo { idle: 0, .. } => &[EpollEcho, AsyncoredEcho, TokioEcho, PythonAsyncore],
            Workload::Echo { .. } if !smoke => &[EpollEcho, AsyncoredEcho, TokioEcho, PythonAsyncore],
            Workload::Echo { .. } | Workload::Hold => &[EpollEcho, AsyncoredEcho, TokioEcho],
            Workload::Http { .. } => &[EpollHttp, AsyncoredHttp],
            Workload::Storm { .. } => &[AsyncoredEcho],
        }
    }

    /// What one completed answer is called in the table.
    pub(crate) fn unit(&self) -> &'static str {
        match self {
            Workload::Echo { .. } | Workload::Storm { .. } => "msg",
            Workload::Http { .. } => "req",
            Workload::Hold => "conn",
        }
    }
}

/// The scenario called `name`.
pub(crate) fn find(name: &str) -> Option<&'static Scenario> {
    SCENARIOS.iter().find(|scenario| scenario.name == name)
}
