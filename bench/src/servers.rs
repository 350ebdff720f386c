//! The servers under test, each started as its own process on loopback,
//! pinned to the server core, and stopped (killed) when dropped: asyncored
//! with a config written for the run, the baselines built from this crate,
//! and Python's asyncore echo server from a script written for the run.

use std::fmt;
use std::fs::File;
use std::io::{BufRead as _, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use asyncore_proto::v1::ListListenersRequest;
use asyncore_proto::v1::listeners_client::ListenersClient;

use crate::sys;

/// How long a server may take to say it is ready.
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// The asyncore documentation's echo server
/// (<https://docs.python.org/3.11/library/asyncore.html#asyncore-example-basic-echo-server>).
const PYTHON_ECHO: &str = r#"# The echo server of the asyncore documentation
# (https://docs.python.org/3.11/library/asyncore.html), changed only where a
# benchmark needs it: the port comes from the command line and is printed,
# no line is printed per connection, listen(1024) instead of listen(5) so
# that a burst of connects is not met with dropped SYNs, and
# loop(use_poll=True) because select() stops at descriptor 1024.
import asyncore
import sys


class EchoHandler(asyncore.dispatcher_with_send):

    def handle_read(self):
        data = self.recv(8192)
        if data:
            self.send(data)


class EchoServer(asyncore.dispatcher):

    def __init__(self, host, port):
        asyncore.dispatcher.__init__(self)
        self.create_socket()
        self.set_reuse_addr()
        self.bind((host, port))
        self.listen(1024)

    def handle_accepted(self, sock, addr):
        handler = EchoHandler(sock)


server = EchoServer('127.0.0.1', int(sys.argv[1]) if len(sys.argv) > 1 else 0)
print('listening 127.0.0.1:%d' % server.socket.getsockname()[1], flush=True)
asyncore.loop(use_poll=True)
"#;

/// A server implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ServerKind {
    /// The echo ceiling (`bench-epoll-echo`).
    EpollEcho,
    /// asyncored with its `echo` plugin.
    AsyncoredEcho,
    /// `bench-tokio-echo`.
    TokioEcho,
    /// Python's asyncore, the documentation's echo server.
    PythonAsyncore,
    /// The HTTP ceiling (`bench-epoll-http`).
    EpollHttp,
    /// asyncored with its `http` plugin.
    AsyncoredHttp,
}

impl ServerKind {
    /// Whether this is the scenario's ceiling, the figure the others are
    /// divided by.
    pub(crate) fn is_ceiling(self) -> bool {
        matches!(self, ServerKind::EpollEcho | ServerKind::EpollHttp)
    }

    pub(crate) fn is_asyncored(self) -> bool {
        matches!(self, ServerKind::AsyncoredEcho | ServerKind::AsyncoredHttp)
    }
}

impl fmt::Display for ServerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServerKind::EpollEcho => "epoll echo (ceiling)",
            ServerKind::AsyncoredEcho => "asyncored echo",
            ServerKind::TokioEcho => "tokio echo",
            ServerKind::PythonAsyncore => "python asyncore",
            ServerKind::EpollHttp => "epoll http (ceiling)",
            ServerKind::AsyncoredHttp => "asyncored http",
        })
    }
}

/// What starting servers needs, found once per run.
#[derive(Debug)]
pub(crate) struct Launcher {
    /// Where asyncored, its plugins and the baselines were built.
    pub(crate) bin_dir: PathBuf,
    /// A directory of this run's own (configs, scripts, logs).
    pub(crate) work_dir: PathBuf,
    /// The core servers are pinned to, when there is one to spare.
    pub(crate) server_cpu: Option<usize>,
    /// The Python asyncore script, when `python3` has asyncore.
    pub(crate) python_script: Option<PathBuf>,
    pub(crate) runtime: tokio::runtime::Handle,
    started: std::cell::Cell<u32>,
}

impl Launcher {
    /// A launcher; writes the Python script if `python3` can run it.
    ///
    /// # Errors
    ///
    /// If the work directory cannot be written.
    pub(crate) fn new(
        bin_dir: PathBuf,
        work_dir: PathBuf,
        server_cpu: Option<usize>,
        runtime: tokio::runtime::Handle,
    ) -> anyhow::Result<Launcher> {
        let python_script = if python_has_asyncore() {
            let path = work_dir.join("asyncore_echo.py");
            std::fs::write(&path, PYTHON_ECHO).with_context(|| format!("writing {}", path.display()))?;
            Some(path)
        } else {
            None
        };
        Ok(Launcher { bin_dir, work_dir, server_cpu, python_script, runtime, started: std::cell::Cell::new(0) })
    }

    /// Whether `kind` can run here (Python's asyncore may be missing).
    pub(crate) fn available(&self, kind: ServerKind) -> bool {
        kind != ServerKind::PythonAsyncore || self.python_script.is_some()
    }

    /// Starts `kind` on an ephemeral loopback port and waits until it is
    /// ready.
    ///
    /// # Errors
    ///
    /// If it does not start, or does not say it is ready within 15 s; the
    /// error carries the end of its log.
    pub(crate) fn start(&self, kind: ServerKind) -> anyhow::Result<Server> {
        let serial = self.started.get() + 1;
        self.started.set(serial);
        let log = self.work_dir.join(format!("server-{serial}.log"));
        let mut command = match kind {
            ServerKind::EpollEcho => Command::new(self.bin_dir.join("bench-epoll-echo")),
            ServerKind::EpollHttp => Command::new(self.bin_dir.join("bench-epoll-http")),
            ServerKind::TokioEcho => Command::new(self.bin_dir.join("bench-tokio-echo")),
            ServerKind::PythonAsyncore => {
                let script = self.python_script.as_ref().ok_or_else(|| anyhow!("python3 has no asyncore"))?;
                let mut command = Command::new("python3");
                command.arg("-W").arg("ignore::DeprecationWarning").arg(script).arg("0");
                command
            }
            ServerKind::AsyncoredEcho | ServerKind::AsyncoredHttp => {
                let config = self.work_dir.join(format!("asyncored-{serial}.toml"));
                std::fs::write(&config, self.asyncored_config(kind))
                    .with_context(|| format!("writing {}", config.display()))?;
                let mut command = Command::new(self.bin_dir.join("asyncored"));
                command.arg("--config").arg(&config).arg("--plugin-dir").arg(&self.bin_dir).env("RUST_LOG", "warn");
                command
            }
        };
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?);
        if let Some(cpu) = self.server_cpu {
            sys::pin_command(&mut command, cpu);
        }
        let mut child = command.spawn().with_context(|| format!("starting {kind} ({command:?})"))?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout is piped");
        let (lines, first_lines) = mpsc::channel();
        // Reads the server's stdout for as long as it lives, so that it can
        // never block on a full pipe.
        std::thread::Builder::new().name(format!("server-{serial}-stdout")).spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        })?;
        let mut server = Server { child, pid, address: unspecified(), control: None, log };
        let ready = |prefix: &str| -> anyhow::Result<SocketAddr> {
            loop {
                match first_lines.recv_timeout(START_TIMEOUT) {
                    Ok(line) => {
                        if let Some(address) = line.strip_prefix(prefix) {
                            return address.trim().parse().with_context(|| format!("{kind} said {line:?}"));
                        }
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => bail!("{kind} not ready after {START_TIMEOUT:?}"),
                    Err(mpsc::RecvTimeoutError::Disconnected) => bail!("{kind} exited before it was ready"),
                }
            }
        };
        if kind.is_asyncored() {
            let control = ready("asyncored ready: control ").map_err(|e| server.failure(e))?;
            server.control = Some(control);
            server.address = self.runtime.block_on(listener_address(control)).map_err(|e| server.failure(e))?;
        } else {
            server.address = ready("listening ").map_err(|e| server.failure(e))?;
        }
        Ok(server)
    }

    fn asyncored_config(&self, kind: ServerKind) -> String {
        let plugin_config = match kind {
            ServerKind::AsyncoredHttp => format!("{{ root = {:?} }}", self.work_dir.display().to_string()),
            _ => "{}".to_string(),
        };
        let plugin = if kind == ServerKind::AsyncoredHttp { "http" } else { "echo" };
        format!(
            "# Written by asyncore-bench for one run; plugins come from --plugin-dir.\n\
             control = \"127.0.0.1:0\"\n\
             http = \"127.0.0.1:0\"\n\n\
             [[listener]]\n\
             address = \"127.0.0.1:0\"\n\
             plugin = \"{plugin}\"\n\
             config = {plugin_config}\n"
        )
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 0))
}

/// The address of the daemon's one listener.
async fn listener_address(control: SocketAddr) -> anyhow::Result<SocketAddr> {
    let mut client = ListenersClient::connect(format!("http://{control}")).await.context("control API")?;
    let listeners = client.list_listeners(ListListenersRequest::default()).await?.into_inner().listeners;
    let listener = listeners.first().ok_or_else(|| anyhow!("asyncored has no listener"))?;
    listener.address.parse().with_context(|| format!("listener address {:?}", listener.address))
}

fn python_has_asyncore() -> bool {
    Command::new("python3")
        .args(["-W", "ignore::DeprecationWarning", "-c", "import asyncore"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// A running server process, killed when dropped.
#[derive(Debug)]
pub(crate) struct Server {
    child: Child,
    pub(crate) pid: u32,
    /// Where it serves.
    pub(crate) address: SocketAddr,
    /// asyncored's control API.
    pub(crate) control: Option<SocketAddr>,
    log: PathBuf,
}

impl Server {
    /// `error`, with whether the server still runs and the end of its log.
    pub(crate) fn failure(&mut self, error: impl Into<anyhow::Error>) -> anyhow::Error {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("; it exited ({status})"),
            _ => String::new(),
        };
        let tail = log_tail(&self.log);
        let error = error.into();
        if tail.is_empty() { anyhow!("{error:#}{status}") } else { anyhow!("{error:#}{status}; its log ends:\n{tail}") }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}
