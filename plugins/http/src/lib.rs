//! `http`: an HTTP/1.0 and HTTP/1.1 server on asynchat. `GET` and `HEAD`
//! of `/` answer a small HTML page; `/static/...` streams the files under
//! the configured `root`.
//!
//! Config: `root` (a directory; without it `/static` is 404),
//! `max_header_bytes` (bytes of one request head, default 16384; a longer
//! head gets 431, or 414 if its request line alone is too long, and the
//! connection closes), `high_water` (bytes of output waiting for a slow
//! reader before the connection stops reading and stops pulling file data;
//! default 262144).
//!
//! The head is framed line by line (terminator `\n`, a `\r` before it is
//! dropped), with the chat's input limit set to what is left of the head's
//! budget; a request body (`Content-Length`) is framed by count and
//! dropped. Each request is answered, its response queued as one producer,
//! before the next is parsed, so pipelined requests are answered in order.
//! See the README for the status codes and why.

#![forbid(unsafe_code)]

mod request;
mod response;
mod site;

use std::{io, path::Path, rc::Rc, time::SystemTime};

use asyncore_sdk::prelude::*;

use crate::{
    request::{HeadParser, RequestHead, Step, Version},
    response::{Connection, InFlight, Response, Status, write_head},
    site::{Answer, Site},
};

/// Default of `max_header_bytes`.
const DEFAULT_MAX_HEADER_BYTES: usize = 16 * 1024;
/// Default of `high_water`: the SDK's.
const DEFAULT_HIGH_WATER: usize = 256 * 1024;
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

/// The listening dispatcher: one per listener, holding its configuration.
struct HttpServer {
    site: Rc<Site>,
    max_header_bytes: usize,
    high_water: usize,
}

impl Dispatcher for HttpServer {
    fn handle_accepted(&mut self, _channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let handler = HttpHandler {
            site: self.site.clone(),
            parser: HeadParser::new(self.max_header_bytes),
            body_of: None,
            line: Vec::new(),
            in_flight: InFlight::default(),
        };
        let chat = AsyncChat::new(handler)
            .with_terminator(b"\n")
            .with_max_input(self.max_header_bytes)
            .with_output_high_water(self.high_water);
        Some(Box::new(HttpConnection { chat }))
    }
}

/// One connection: the `AsyncChat` that runs the handler, wrapped so that
/// reading also waits for the queue of responses to shorten (see
/// [`MAX_IN_FLIGHT`]). The chat alone stops reading on queued *bytes*
/// only, and a response waiting behind a long download holds no bytes
/// yet.
struct HttpConnection {
    chat: AsyncChat<HttpHandler>,
}

impl Dispatcher for HttpConnection {
    fn readable(&mut self, channel: &Channel<'_>) -> bool {
        self.chat.handler().in_flight.count() < MAX_IN_FLIGHT && self.chat.readable(channel)
    }

    fn writable(&mut self, channel: &Channel<'_>) -> bool {
        self.chat.writable(channel)
    }

    fn handle_read(&mut self, channel: &mut Channel<'_>) {
        self.chat.handle_read(channel);
    }

    fn handle_write(&mut self, channel: &mut Channel<'_>) {
        self.chat.handle_write(channel);
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
}

/// The protocol: request heads line by line, bodies by count.
struct HttpHandler {
    site: Rc<Site>,
    parser: HeadParser,
    /// The request whose body is being read and dropped.
    body_of: Option<RequestHead>,
    /// The line being collected. Our own buffer rather than the chat's: in
    /// a body, data is dropped instead of collected, and an overridden
    /// `collect_incoming_data` cannot reach the chat's.
    line: Vec<u8>,
    in_flight: InFlight,
}

impl ChatHandler for HttpHandler {
    fn collect_incoming_data(&mut self, _chat: &mut Chat<'_>, data: &[u8]) {
        if self.body_of.is_none() {
            self.line.extend_from_slice(data);
        }
    }

    fn found_terminator(&mut self, chat: &mut Chat<'_>) {
        if let Some(head) = self.body_of.take() {
            // The body is over; the next request's head follows.
            chat.set_terminator(b"\n");
            self.respond(chat, &head, false);
        } else {
            let step = self.parser.line(&self.line);
            self.line.clear();
            match step {
                Step::More => {}
                Step::Reject(status) => {
                    let head_only = self.parser.request_line().is_some_and(|line| line.method == "HEAD");
                    self.reject(chat, status, head_only);
                }
                Step::Done(head) => self.request(chat, head),
            }
        }
        if self.body_of.is_none() {
            chat.set_max_input(self.parser.room());
        }
    }

    fn input_overflow(&mut self, chat: &mut Chat<'_>) {
        self.line = Vec::new();
        let head_only = self.parser.request_line().is_some_and(|line| line.method == "HEAD");
        self.reject(chat, self.parser.overflow_status(), head_only);
    }
}

impl HttpHandler {
    /// A complete head: answer now, or first read and drop its body.
    fn request(&mut self, chat: &mut Chat<'_>, head: RequestHead) {
        if self.line.capacity() > KEEP_LINE_CAPACITY {
            self.line = Vec::new();
        }
        match head.body_length() {
            Err(status) => self.reject(chat, status, head.is_head()),
            Ok(0) => self.respond(chat, &head, false),
            // A client waiting for `100 Continue` gets the final answer
            // instead, and the connection closes: it may or may not send
            // the body then (RFC 9110 section 10.1.1).
            Ok(length) if length <= MAX_DRAINED_BODY && !head.expects_continue() => {
                chat.set_terminator(Terminator::Count(length as usize));
                // Dropped as it comes, so not bounded by the input limit.
                chat.set_max_input(usize::MAX);
                self.body_of = Some(head);
            }
            Ok(_) => self.respond(chat, &head, true),
        }
    }

    /// Queues the answer to `head`, then closes if the connection is not
    /// to be kept.
    fn respond(&mut self, chat: &mut Chat<'_>, head: &RequestHead, force_close: bool) {
        let answer = self.site.answer(head);
        let keep_alive = !force_close && head.keep_alive() && !answer.status.closes_connection();
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

    /// Answers with an error and closes: the request could not be framed,
    /// so nothing after it can be trusted to be a request.
    fn reject(&mut self, chat: &mut Chat<'_>, status: Status, head_only: bool) {
        self.push(chat, Answer::error(status), Connection::Close, head_only);
        chat.close_when_done();
    }

    fn push(&mut self, chat: &mut Chat<'_>, answer: Answer, connection: Connection, head_only: bool) {
        let head = write_head(answer.status, answer.content_type, answer.body.len(), connection, SystemTime::now());
        let response = Response::new(head, answer.body, head_only, self.in_flight.ticket());
        chat.push_with_producer(Box::new(response));
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
        let max_header_bytes = config.parse_or("max_header_bytes", DEFAULT_MAX_HEADER_BYTES)?;
        let high_water = config.parse_or("high_water", DEFAULT_HIGH_WATER)?;
        if max_header_bytes == 0 {
            return Err("config max_header_bytes: must be at least 1".to_string());
        }
        if high_water == 0 {
            return Err("config high_water: must be at least 1".to_string());
        }
        Ok(Box::new(HttpServer { site: Rc::new(site), max_header_bytes, high_water }))
    }
}

export_plugin!(Http);
