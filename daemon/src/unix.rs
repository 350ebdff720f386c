//! The control and HTTP APIs on a Unix socket (`--control unix:PATH`,
//! `--http unix:PATH`): only who may open the file may call, so the socket
//! is created with mode 0600 in a directory of mode 0700, which the daemon
//! makes if missing and refuses if group or others may enter it (a socket
//! is reachable through any directory a client can traverse, whatever the
//! mode the socket had for the moment between `bind` and `chmod`).

use std::{
    fmt,
    fs::{self, DirBuilder},
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    net::{UnixListener, UnixStream},
    time::Sleep,
};
use tokio_stream::Stream;

/// Where a management API listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket.
    Unix(PathBuf),
}

impl fmt::Display for Endpoint {
    /// `ip:port`, or `unix:PATH` (what `--control` and `asyncorectl
    /// --control` take).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp(address) => write!(f, "{address}"),
            Endpoint::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Binds a Unix socket at `path` for the `what`: its directory is made
/// (mode 0700) if missing and must not be open to group or others; a stale
/// socket file left by a daemon that is gone is replaced; the socket gets
/// mode 0600.
///
/// # Errors
///
/// One line naming the path and what to do: the directory is accessible
/// to others, the path is something else than a socket, another daemon
/// answers on it, or it cannot be bound.
pub(crate) fn bind(what: &str, path: &Path) -> anyhow::Result<UnixIncoming> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create the directory {} of the {what} socket", dir.display()))?;
    }
    let mode = fs::metadata(dir).with_context(|| format!("the directory of the {what} socket {}", path.display()))?;
    let mode = mode.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        anyhow::bail!(
            "refusing to serve the {what} on {}: its directory {} has mode {mode:03o}, open to group or others \
             (chmod 700 it, or use a directory of the daemon's own)",
            path.display(),
            dir.display()
        );
    }
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("cannot serve the {what} on {}: another process answers on it", path.display());
            }
            fs::remove_file(path).with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("cannot serve the {what} on {}: the path exists and is not a socket", path.display()),
        Err(_) => {}
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("cannot bind the {what} on unix:{}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot set the mode of {}", path.display()))?;
    Ok(UnixIncoming { listener, path: path.to_owned(), backoff: None })
}

/// Accepted connections on a Unix socket, pausing 100 ms after a failed
/// accept (out of descriptors) instead of retrying at once. Removes the
/// socket file when dropped.
#[derive(Debug)]
pub(crate) struct UnixIncoming {
    listener: UnixListener,
    path: PathBuf,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl UnixIncoming {
    /// The socket's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

impl Stream for UnixIncoming {
    type Item = io::Result<UnixStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(sleep) = this.backoff.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, socket = %this.path.display(), "accept failed; pausing 100 ms");
                    this.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for UnixIncoming {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}
