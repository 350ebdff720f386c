//! The control API's accept loop, with a back-off when descriptors run out.
//!
//! tonic's own accept loop retries at once on every error; with no file
//! descriptor left that is a busy loop burning a core. This stream pauses
//! 100 ms after such an error instead.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    net::{TcpListener, TcpStream},
    time::Sleep,
};
use tokio_stream::Stream;

pub(crate) struct Incoming {
    listener: TcpListener,
    backoff: Option<Pin<Box<Sleep>>>,
}

impl Incoming {
    pub(crate) fn new(listener: TcpListener) -> Incoming {
        Incoming { listener, backoff: None }
    }
}

impl Stream for Incoming {
    type Item = io::Result<TcpStream>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            if let Some(sleep) = self.backoff.as_mut() {
                if sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                self.backoff = None;
            }
            match self.listener.poll_accept(cx) {
                Poll::Ready(Ok((stream, _))) => {
                    let _ = stream.set_nodelay(true);
                    return Poll::Ready(Some(Ok(stream)));
                }
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "control api: accept failed; pausing 100 ms");
                    self.backoff = Some(Box::pin(tokio::time::sleep(Duration::from_millis(100))));
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
