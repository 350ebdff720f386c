//! `http`: an HTTP/1.0 and HTTP/1.1 server on asynchat. `GET` and `HEAD`
//! of `/` answer a small HTML page; `/static/...` streams the files under
//! the configured `root`.
//!
//! Config (see `config.rs` and the README): `root`, `max_header_bytes`,
//! `high_water`, `head_timeout`, `keepalive_timeout`,
//! `max_connections_per_ip` and `status_path`.
//!
//! The head is framed line by line (terminator `\n`, a `\r` before it is
//! dropped), with the chat's input limit set to what is left of the head's
//! budget; a request body (`Content-Length`) is framed by count and
//! dropped. Each request is answered, its response queued as one producer,
//! before the next is parsed, so pipelined requests are answered in order.
//!
//! Time is bounded with one deadline per connection, moved once per
//! request, never per byte, and one timer that is armed again only when it
//! comes due before the deadline: a request must arrive within `head_timeout`
//! (else 408), and a kept-alive connection that sent everything it was
//! asked for is closed after `keepalive_timeout` without a new request.
//! Refusals are logged and counted per listener. See the README for the
//! status codes and why.

#![forbid(unsafe_code)]

mod config;
mod listener;
mod request;
mod response;
mod site;

use std::{cell::RefCell, io, path::Path, rc::Rc, time::Instant};

use asyncore_sdk::prelude::*;

use crate::{
    config::Settings,
    listener::{Admission, Listener, left_out_note},
    request::{HeadParser, RequestHead, Step, Version},
    response::{Body, Connection, InFlight, Response, Status, append_head, with_date, write_head},
    site::{Answer, Site},
};

/// A connection stops reading requests while this many responses are
/// queued and not yet produced. Requests that came in one read are all
/// answered (the framer does not stop inside a read), so this bounds the
/// queue to what one 64 KiB read can hold plus this.
const MAX_IN_FLIGHT: usize = 32;
/// A request body up to this size is read and dropped, keeping the
/// connection; a larger one is not read: the response closes the
/// connection instead, so that a refused upload is not received in full.
const MAX_DRAINED_BODY: u64 = 1024 * 1024;
/// The line buffer is shrunk back after a head that grew it past this.
const KEEP_LINE_CAPACITY: usize = 4 * 1024;
/// The response buffer is shrunk back after a response (a large status
/// page, say) grew it past this.
const KEEP_RESPONSE_CAPACITY: usize = 64 * 1024;

thread_local! {
    /// Where a response in memory is put together before it is pushed: one
    /// for the loop's thread, not one per connection.
    static RESPONSE: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The listening dispatcher: one per listener, owning what its
/// connections share (settings, counters, connections per address).
struct HttpServer {
    listener: Rc<Listener>,
}

impl Dispatcher for HttpServer {
    fn handle_accepted(&mut self, channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let admission = match self.listener.admit(channel.peer_addr()) {
            Ok(admission) => admission,
            Err(refused) => {
                if let Some(left_out) = self.listener.refusal_lines.take(Instant::now()) {
                    log!(
                        info,
                        "channel {}: connection refused: {} already has {} open (max_connections_per_ip); \
                         {} refused so far on this listener{}",
                        channel.id(),
                        refused.ip,
                        refused.open,
                        refused.refused_so_far,
                        left_out_note(left_out),
                    );
                }
                return None;
            }
        };
        let settings = &self.listener.settings;
        let handler = HttpHandler {
            listener: self.listener.clone(),
            parser: HeadParser::new(settings.max_header_bytes),
            body_of: None,
            line: Vec::new(),
            in_flight: InFlight::default(),
            wait: Wait::Head,
            timer: None,
            deadline: None,
            next_token: 0,
            now: Instant::now(),
        };
        let mut chat = AsyncChat::new(handler)
            .with_terminator(b"\n")
            .with_max_input(settings.max_header_bytes)
            .with_output_high_water(settings.high_water);
        // The first request's clock starts at accept: a connection that
        // never sends a byte holds a slot as surely as one that sends a
        // byte a minute.
        chat.handler_mut().arm(channel, Wait::Head);
        Some(Box::new(HttpConnection { chat, _admission: admission }))
    }
}

/// One connection: the `AsyncChat` that runs the handler, wrapped so that
/// reading also waits for the queue of responses to shorten (see
/// [`MAX_IN_FLIGHT`]), and so that the keep-alive clock starts when the
/// last queued response has been produced. The chat alone stops reading
/// on queued *bytes* only, and a response waiting behind a long download
/// holds no bytes yet.
struct HttpConnection {
    chat: AsyncChat<HttpHandler>,
    /// Counts this connection as open, against its address's limit, until
    /// the daemon drops this dispatcher.
    _admission: Admission,
}

impl HttpConnection {
    fn idle_if_answered(&mut self, channel: &mut Channel<'_>) {
        if !self.chat.chat(channel).is_closing() {
            self.chat.handler_mut().idle_once_answered(channel);
        }
    }
}

impl Dispatcher for HttpConnection {
    fn readable(&mut self, channel: &Channel<'_>) -> bool {
        self.chat.handler().in_flight.count() < MAX_IN_FLIGHT && self.chat.readable(channel)
    }

    fn writable(&mut self, channel: &Channel<'_>) -> bool {
        self.chat.writable(channel)
    }

    /// The responses queued while reading start at the end of the read
    /// (`AsyncChat::handle_read`): a connection they all finished in starts
    /// to idle now.
    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        self.chat.handler_mut().now = Instant::now();
        self.chat.handle_read(channel);
        self.idle_if_answered(channel);
    }

    /// Producers are pulled (and finished) here and at the end of a read,
    /// so these are where a connection that answered everything starts to
    /// idle.
    fn handle_write(&mut self, channel: &mut Channel<'_>) {
        self.chat.handler_mut().now = Instant::now();
        self.chat.handle_write(channel);
        self.idle_if_answered(channel);
    }

    fn handle_connect(&mut self, channel: &mut Channel<'_>) {
        self.chat.handle_connect(channel);
    }

    fn handle_close(&mut self, channel: &mut Channel<'_>) {
        self.chat.handle_close(channel);
    }

    fn handle_error(&mut self, channel: &mut Channel<'_>, error: io::Error) {
        self.chat.handle_error(channel, error);
    }

    fn handle_expt(&mut self, channel: &mut Channel<'_>) {
        self.chat.handle_expt(channel);
    }

    fn handle_timer(&mut self, channel: &mut Channel<'_>, token: u64) {
        self.chat.handle_timer(channel, token);
    }

    /// The daemon closes the connection (SIGTERM, the operator, a reload's
    /// drain): the chat lets the responses already queued finish, a file
    /// being streamed included, then closes.
    fn handle_shutdown(&mut self, channel: &mut Channel<'_>, reason: CloseReason) {
        self.chat.handle_shutdown(channel, reason);
    }

    fn describe(&mut self, channel: &Channel<'_>) -> Vec<(String, String)> {
        self.chat.describe(channel)
    }
}

/// What a connection waits for, which says what its one timer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wait {
    /// The next request, the last one answered: `keepalive_timeout`, armed
    /// once every queued response has been produced.
    Idle,
    /// The rest of a request head: `head_timeout` from its first byte (from
    /// accept for the first request).
    Head,
    /// The rest of a body being read and dropped: `head_timeout` again,
    /// from the end of its head.
    Body,
}

/// The timer a connection armed last. Its token tells it from a timer
/// cancelled after it came due.
#[derive(Debug)]
struct Armed {
    id: TimerId,
    token: u64,
    /// When it comes due.
    due: Instant,
}

/// The protocol: request heads line by line, bodies by count.
struct HttpHandler {
    listener: Rc<Listener>,
    parser: HeadParser,
    /// The request whose body is being read and dropped.
    body_of: Option<RequestHead>,
    /// The line being collected. Our own buffer rather than the chat's: in
    /// a body, data is dropped instead of collected, and an overridden
    /// `collect_incoming_data` cannot reach the chat's.
    line: Vec<u8>,
    in_flight: InFlight,
    wait: Wait,
    /// The one timer armed, which may come due before `deadline` (it is
    /// then armed again for the rest) or when there is none (it is then
    /// let go): a request moves the deadline without touching the timer.
    timer: Option<Armed>,
    /// When what the connection waits for is late, if it is timed.
    deadline: Option<Instant>,
    next_token: u64,
    /// The time read when the current callback began: the requests of one
    /// read share it rather than each reading the clock.
    now: Instant,
}

impl ChatHandler for HttpHandler {
    /// What the connection waits for, and the responses still queued.
    fn describe(&self) -> Vec<(String, String)> {
        let waiting = match self.wait {
            Wait::Idle => "the next request",
            Wait::Head => "the rest of a request head",
            Wait::Body => "the rest of a request body",
        };
        vec![
            ("waiting_for".to_string(), waiting.to_string()),
            ("responses_in_flight".to_string(), self.in_flight.count().to_string()),
        ]
    }

    fn collect_incoming_data(&mut self, chat: &mut Chat<'_>, data: &[u8]) {
        if self.body_of.is_none() {
            // A request starts at its first byte. Line endings alone do not
            // start one (they are skipped before a request line), so a peer
            // sending only those idles into the keep-alive timeout.
            if self.wait == Wait::Idle && data.iter().any(|&b| b != b'\r') {
                self.arm(chat.channel(), Wait::Head);
            }
            self.line.extend_from_slice(data);
        }
    }

    fn found_terminator(&mut self, chat: &mut Chat<'_>) {
        if let Some(head) = self.body_of.take() {
            // The body is over; the next request's head follows.
            chat.set_terminator(b"\n");
            self.respond(chat, &head, false);
            self.parser.recycle(head);
        } else {
            let step = self.parser.line(&self.line);
            self.line.clear();
            match step {
                Step::More => {}
                Step::Reject(status) => {
                    let why = match (status, self.parser.request_line()) {
                        (Status::VersionNotSupported, _) => "HTTP version not supported",
                        (_, None) => "malformed request line",
                        (_, Some(_)) => "malformed header field",
                    };
                    self.refuse(chat, status, self.head_only(), why);
                }
                Step::Done(head) => {
                    if let Some(head) = self.request(chat, head) {
                        self.parser.recycle(head);
                    }
                }
            }
        }
        if self.body_of.is_none() {
            chat.set_max_input(self.parser.room());
        }
    }

    fn input_overflow(&mut self, chat: &mut Chat<'_>) {
        self.line = Vec::new();
        let status = self.parser.overflow_status();
        let what = if status == Status::UriTooLong { "request line" } else { "request head" };
        let why = format!("{what} over {} bytes (max_header_bytes)", self.listener.settings.max_header_bytes);
        self.refuse(chat, status, self.head_only(), &why);
    }

    fn handle_timer(&mut self, chat: &mut Chat<'_>, token: u64) {
        if self.timer.as_ref().is_none_or(|armed| armed.token != token) {
            return;
        }
        self.timer = None;
        let Some(deadline) = self.deadline else { return };
        if chat.is_closing() {
            return;
        }
        self.now = Instant::now();
        if self.now < deadline {
            // The deadline moved on since this timer was armed.
            self.set_timer(chat.channel(), deadline);
            return;
        }
        self.deadline = None;
        // Earlier responses are still going out: the connection may have
        // stopped reading meanwhile (backpressure), so the time was not
        // the client's to use. Start the clock again.
        if self.in_flight.count() > 0 || chat.channel().pending_output() > 0 {
            self.arm(chat.channel(), self.wait);
            return;
        }
        let settings = &self.listener.settings;
        match self.wait {
            Wait::Idle => {
                self.listener.counters.keepalive_closed();
                let timeout = settings.keepalive_timeout.unwrap_or_default();
                log!(
                    debug,
                    "channel {}: no new request within {timeout:?} (keepalive_timeout); closing",
                    chat.channel().id()
                );
                chat.close();
            }
            Wait::Head | Wait::Body => {
                let timeout = settings.head_timeout.unwrap_or_default();
                let what = if self.wait == Wait::Head { "head" } else { "body" };
                let why = format!("no complete request {what} within {timeout:?} (head_timeout)");
                self.refuse(chat, Status::RequestTimeout, self.head_only(), &why);
            }
        }
    }
}

impl HttpHandler {
    /// A complete head: answer now, or first read and drop its body. Gives
    /// the head back once it is answered.
    fn request(&mut self, chat: &mut Chat<'_>, head: RequestHead) -> Option<RequestHead> {
        if self.line.capacity() > KEEP_LINE_CAPACITY {
            self.line = Vec::new();
        }
        match head.body_length() {
            Err(status) => {
                let why = match status {
                    Status::LengthRequired => "chunked request body",
                    Status::NotImplemented => "unsupported transfer coding",
                    _ => "no single Host in HTTP/1.1, or Transfer-Encoding in HTTP/1.0",
                };
                self.refuse(chat, status, head.is_head(), why);
            }
            Ok(0) => self.respond(chat, &head, false),
            // A client waiting for `100 Continue` gets the final answer
            // instead, and the connection closes: it may or may not send
            // the body then (RFC 9110 section 10.1.1).
            Ok(length) if length <= MAX_DRAINED_BODY && !head.expects_continue() => {
                chat.set_terminator(Terminator::Count(length as usize));
                // Dropped as it comes, so not bounded by the input limit.
                chat.set_max_input(usize::MAX);
                self.body_of = Some(head);
                self.arm(chat.channel(), Wait::Body);
                return None;
            }
            Ok(_) => self.respond(chat, &head, true),
        }
        Some(head)
    }

    /// Queues the answer to `head`, then closes if the connection is not
    /// to be kept.
    fn respond(&mut self, chat: &mut Chat<'_>, head: &RequestHead, force_close: bool) {
        let answer = self.listener.answer(head);
        if answer.status.closes_connection() {
            return self.refuse(chat, answer.status, head.is_head(), "bad request target or path");
        }
        // The request is in: the keep-alive clock starts once its response
        // went out (`idle_once_answered`).
        self.disarm();
        self.wait = Wait::Idle;
        let keep_alive = !force_close && head.keep_alive();
        let connection = match (keep_alive, head.line.version) {
            (false, _) => Connection::Close,
            (true, Version::Http10) => Connection::KeepAlive,
            (true, Version::Http11) => Connection::Default,
        };
        self.push(chat, answer, connection, head.is_head());
        if !keep_alive {
            chat.close_when_done();
        }
    }

    /// Answers with an error and closes: the request could not be framed
    /// (or did not come in time), so nothing after it can be trusted to be
    /// a request. Logged and counted, since a client refused is something
    /// an operator wants to see.
    fn refuse(&mut self, chat: &mut Chat<'_>, status: Status, head_only: bool, why: &str) {
        let n = self.listener.counters.refused(status);
        if let Some(left_out) = self.listener.refusal_lines.take(Instant::now()) {
            let channel = chat.channel();
            let peer = channel.peer_addr().map_or_else(|| "unknown".to_string(), |peer| peer.to_string());
            log!(
                info,
                "channel {}: refused with {} {} (peer {peer}): {why}; closing ({n} so far on this listener){}",
                channel.id(),
                status.code(),
                status.reason(),
                left_out_note(left_out),
            );
        }
        self.disarm();
        self.push(chat, Answer::error(status), Connection::Close, head_only);
        chat.close_when_done();
    }

    fn push(&mut self, chat: &mut Chat<'_>, answer: Answer, connection: Connection, head_only: bool) {
        self.listener.counters.responded(answer.status);
        let (status, content_type, length) = (answer.status, answer.content_type, answer.body.len());
        let body = match answer.body {
            Body::File { path, len } if !head_only => {
                // A file is read as the peer drains it, and counts as in
                // flight until it has been.
                let head = with_date(self.now, |date| write_head(status, content_type, length, connection, date));
                let response = Response::file(head, path, len, self.in_flight.ticket());
                chat.push_with_producer(Box::new(response));
                return;
            }
            body => body,
        };
        // Head and body in one push: straight into the channel's output
        // unless producers wait before it (then queued behind them), so a
        // pipelined burst is answered without a producer per request.
        let body = if head_only { &[][..] } else { body.in_memory() };
        RESPONSE.with_borrow_mut(|response| {
            response.clear();
            with_date(self.now, |date| append_head(response, status, content_type, length, connection, date));
            response.extend_from_slice(body);
            chat.push(response);
            if response.capacity() > KEEP_RESPONSE_CAPACITY {
                *response = Vec::new();
            }
        });
    }

    /// Whether the request being read is a `HEAD`, whose error answer has
    /// no body.
    fn head_only(&self) -> bool {
        match &self.body_of {
            Some(head) => head.is_head(),
            None => self.parser.request_line().is_some_and(|line| line.method == "HEAD"),
        }
    }

    /// Starts the clock for `wait`. Called once per request phase, never
    /// per byte, and cheap then: the timer armed already is kept if it
    /// comes due before the new deadline (it is armed again for the rest
    /// when it does), which with the defaults (`head_timeout` under
    /// `keepalive_timeout`) is every request but the first.
    fn arm(&mut self, channel: &mut Channel<'_>, wait: Wait) {
        self.wait = wait;
        let settings = &self.listener.settings;
        let timeout = match wait {
            Wait::Idle => settings.keepalive_timeout,
            Wait::Head | Wait::Body => settings.head_timeout,
        };
        // Both timeouts are bounded by the config, so this is some.
        self.deadline = timeout.and_then(|timeout| self.now.checked_add(timeout));
        match (self.deadline, &self.timer) {
            (Some(deadline), Some(armed)) if armed.due > deadline => self.set_timer(channel, deadline),
            (Some(deadline), None) => self.set_timer(channel, deadline),
            _ => {}
        }
    }

    /// Stops the clock. The timer is left armed: it finds no deadline when
    /// it comes due, unless a later `arm` needs it.
    fn disarm(&mut self) {
        self.deadline = None;
    }

    /// Arms the one timer for `deadline`, cancelling the one armed before.
    fn set_timer(&mut self, channel: &mut Channel<'_>, deadline: Instant) {
        if let Some(armed) = self.timer.take() {
            channel.cancel_timer(armed.id);
        }
        self.next_token += 1;
        let id = channel.call_later(deadline.saturating_duration_since(self.now), self.next_token);
        self.timer = Some(Armed { id, token: self.next_token, due: deadline });
    }

    /// Starts the keep-alive clock if the last request was answered and
    /// every response produced.
    fn idle_once_answered(&mut self, channel: &mut Channel<'_>) {
        if self.wait == Wait::Idle && self.deadline.is_none() && self.in_flight.count() == 0 {
            self.arm(channel, Wait::Idle);
        }
    }
}

/// The `http` plugin: export it with `export_plugin!`, or run it in tests
/// with `asyncore_testing::TestServer::start::<Http>`.
pub struct Http;

impl Plugin for Http {
    const NAME: &'static str = "http";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        let site = Site::new(config.get("root").map(Path::new))?;
        let settings = Settings::from_config(config)?;
        Ok(Box::new(HttpServer { listener: Rc::new(Listener::new(site, settings)) }))
    }
}

export_plugin!(Http);
