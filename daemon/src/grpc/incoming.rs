//! The control API's accept loop: a back-off when descriptors run out, and
//! a descriptor kept in reserve so that an operator can still get in then.
//!
//! tonic's own accept loop retries at once on every error; with no file
//! descriptor left that is a busy loop burning a core. This stream pauses
//! 100 ms after such an error instead.
//!
//! When the data plane has taken every descriptor (EMFILE, ENFILE), the
//! control API would be locked out with it, just when the operator needs it
//! most. So the stream holds one spare descriptor (`/dev/null`): on EMFILE
//! it closes the spare, accepts the waiting connection with the descriptor
//! that frees, and serves it. The spare is taken back the moment any
//! control connection closes, by the same thread, right after the close
//! (the poll loop, paused 100 ms by its own EMFILE, is not in a position to
//! take that descriptor first), and a back-off under way ends then: the
//! next operator is served at once.

use std::{
    fs::File,
    io,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

pub(crate) struct Incoming {
    listener: TcpListener,
    backoff: Option<Backoff>,
    reserve: Arc<Reserve>,
}

/// A pause after a failed accept.
struct Backoff {
    sleep: Pin<Box<Sleep>>,
    /// It began out of descriptors with no spare left: it ends early when
    /// the spare is back.
    until_spare: bool,
}

impl Incoming {
    pub(crate) fn new(listener: TcpListener) -> Incoming {
        let reserve = Arc::new(Reserve { spare: Mutex::new(None), backing_off: Mutex::new(None) });
        reserve.restore();
        if !reserve.holds_spare() {
            tracing::warn!("control api: cannot open /dev/null; no descriptor is kept in reserve");
        }
        Incoming { listener, backoff: None, reserve }
    }
}

/// The spare descriptor, when held.
#[derive(Debug)]
struct Reserve {
    spare: Mutex<Option<File>>,
    /// The accept loop, while it backs off without a spare: woken when the
    /// spare is back.
    backing_off: Mutex<Option<Waker>>,
}

impl Reserve {
    /// Closes the spare, so that an accept can have its descriptor; false
    /// if there was none to give.
    fn release(&self) -> bool {
        self.spare.lock().expect("no panics under this lock").take().is_some()
    }

    /// Takes a spare again, if none is held (and a descriptor is free),
    /// and wakes the accept loop if it waits for one.
    fn restore(&self) {
        let mut spare = self.spare.lock().expect("no panics under this lock");
        if spare.is_none() {
            *spare = File::open("/dev/null").ok();
            if spare.is_some()
                && let Some(waker) = self.backing_off.lock().expect("no panics under this lock").take()
            {
                waker.wake();
            }
        }
    }

    fn holds_spare(&self) -> bool {
        self.spare.lock().expect("no panics under this lock").is_some()
    }
}

/// Running out of descriptors, for the process (EMFILE) or the system
/// (ENFILE).
fn out_of_descriptors(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

impl Stream for Incoming {
    type Item = io::Result<ControlStream>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(backoff) = this.backoff.as_mut() {
                if backoff.until_spare {
                    *this.reserve.backing_off.lock().expect("no panics under this lock") = Some(cx.waker().clone());
                }
                let spare_back = backoff.until_spare && this.reserve.holds_spare();
                if !spare_back && backoff.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                this.backoff = None;
                this.reserve.backing_off.lock().expect("no panics under this lock").take();
                this.reserve.restore();
            }
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    let _ = stream.set_nodelay(true);
                    let restore = RestoreOnDrop(this.reserve.clone());
                    return Poll::Ready(Some(Ok(ControlStream { stream, _restore: restore })));
                }
                Poll::Ready(Err(e)) if out_of_descriptors(&e) && this.reserve.release() => {
                    // The connection waits in the backlog: accept it again
                    // at once, with the descriptor the spare gave back.
                    tracing::warn!(error = %e, "control api: out of descriptors; accepting with the reserved one");
                }
                Poll::Ready(Err(e)) => {
                    // Without a spare, accept fails with EMFILE even when no
                    // connection waits (the descriptor is taken first), so
                    // this is also where the loop waits for the spare.
                    tracing::warn!(error = %e, "control api: accept failed; pausing 100 ms");
                    this.backoff = Some(Backoff {
                        sleep: Box::pin(tokio::time::sleep(Duration::from_millis(100))),
                        until_spare: out_of_descriptors(&e),
                    });
                }
                Poll::Pending => {
                    // Out of descriptors, accept fails with EMFILE before it
                    // looks at the backlog: the spare may have been given up
                    // for nobody. Take it back before the poll loop takes
                    // that descriptor.
                    this.reserve.restore();
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Takes the spare back when dropped.
#[derive(Debug)]
struct RestoreOnDrop(Arc<Reserve>);

impl Drop for RestoreOnDrop {
    fn drop(&mut self) {
        self.0.restore();
    }
}

/// An accepted control connection. Its fields drop in order: the socket
/// closes first, then the spare is taken back with the descriptor it
/// freed.
#[derive(Debug)]
pub(crate) struct ControlStream {
    stream: TcpStream,
    _restore: RestoreOnDrop,
}

impl Connected for ControlStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

/// `AsyncRead` and `AsyncWrite` for a connection type that wraps another
/// in its field `stream`: every call goes to it.
macro_rules! forward_io_to_stream {
    ($wrapper:ty) => {
        impl tokio::io::AsyncRead for $wrapper {
            fn poll_read(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &mut tokio::io::ReadBuf<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
            }
        }

        impl tokio::io::AsyncWrite for $wrapper {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.stream).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.stream.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.stream).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
            }
        }
    };
}
pub(crate) use forward_io_to_stream;

forward_io_to_stream!(ControlStream);
