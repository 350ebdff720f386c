//! Responses: status codes, the response head, and the producer that sends
//! a file's head and the file as the peer drains them.

use std::{
    cell::{Cell, RefCell},
    fs::File,
    io,
    path::PathBuf,
    rc::Rc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use asyncore_sdk::{FileProducer, Producer, SimpleProducer};

/// The statuses this server answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Ok,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    LengthRequired,
    UriTooLong,
    HeaderFieldsTooLarge,
    NotImplemented,
    VersionNotSupported,
}

impl Status {
    pub(crate) fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::LengthRequired => 411,
            Status::UriTooLong => 414,
            Status::HeaderFieldsTooLarge => 431,
            Status::NotImplemented => 501,
            Status::VersionNotSupported => 505,
        }
    }

    pub(crate) fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::LengthRequired => "Length Required",
            Status::UriTooLong => "URI Too Long",
            Status::HeaderFieldsTooLarge => "Request Header Fields Too Large",
            Status::NotImplemented => "Not Implemented",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }

    /// The body of an error response: the status line's words, one line of
    /// plain text.
    pub(crate) fn error_body(self) -> &'static [u8] {
        match self {
            Status::Ok => b"200 OK\n",
            Status::BadRequest => b"400 Bad Request\n",
            Status::NotFound => b"404 Not Found\n",
            Status::MethodNotAllowed => b"405 Method Not Allowed\n",
            Status::RequestTimeout => b"408 Request Timeout\n",
            Status::LengthRequired => b"411 Length Required\n",
            Status::UriTooLong => b"414 URI Too Long\n",
            Status::HeaderFieldsTooLarge => b"431 Request Header Fields Too Large\n",
            Status::NotImplemented => b"501 Not Implemented\n",
            Status::VersionNotSupported => b"505 HTTP Version Not Supported\n",
        }
    }

    /// Whether the connection closes after this response whatever the
    /// client asked: the request it answers could not be framed (or did not
    /// arrive in time), so the bytes after it cannot be trusted to start
    /// the next request.
    pub(crate) fn closes_connection(self) -> bool {
        matches!(
            self,
            Status::BadRequest
                | Status::RequestTimeout
                | Status::LengthRequired
                | Status::UriTooLong
                | Status::HeaderFieldsTooLarge
                | Status::NotImplemented
                | Status::VersionNotSupported
        )
    }
}

/// What the `Connection` header of a response says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Connection {
    /// Nothing: HTTP/1.1 keeps the connection by default.
    Default,
    /// `Connection: keep-alive`, for an HTTP/1.0 client that asked for it.
    KeepAlive,
    /// `Connection: close`: the server closes after this response.
    Close,
}

/// The head of a response, every line with its `\r\n`, and the empty line.
/// Responses are HTTP/1.1 whatever the request's version, as RFC 9110
/// section 2.5 asks.
pub(crate) fn write_head(
    status: Status,
    content_type: &str,
    content_length: u64,
    connection: Connection,
    date: &str,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(192);
    append_head(&mut head, status, content_type, content_length, connection, date);
    head
}

/// [`write_head`] appended to `out`: pieces copied in, no formatting
/// machinery, as this runs once per response.
pub(crate) fn append_head(
    out: &mut Vec<u8>,
    status: Status,
    content_type: &str,
    content_length: u64,
    connection: Connection,
    date: &str,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    append_decimal(out, u64::from(status.code()));
    out.push(b' ');
    out.extend_from_slice(status.reason().as_bytes());
    out.extend_from_slice(concat!("\r\nServer: asyncored-http/", env!("CARGO_PKG_VERSION"), "\r\nDate: ").as_bytes());
    out.extend_from_slice(date.as_bytes());
    out.extend_from_slice(b"\r\nContent-Type: ");
    out.extend_from_slice(content_type.as_bytes());
    out.extend_from_slice(b"\r\nContent-Length: ");
    append_decimal(out, content_length);
    out.extend_from_slice(b"\r\n");
    if status == Status::MethodNotAllowed {
        out.extend_from_slice(b"Allow: GET, HEAD\r\n");
    }
    match connection {
        Connection::Default => {}
        Connection::KeepAlive => out.extend_from_slice(b"Connection: keep-alive\r\n"),
        Connection::Close => out.extend_from_slice(b"Connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// `n` in decimal digits.
fn append_decimal(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

thread_local! {
    /// The `Date` header of the current second: formatted once a second,
    /// not once a response.
    static DATE: RefCell<DateCache> = const { RefCell::new(DateCache { valid_until: None, text: String::new() }) };
}

/// Runs `f` with the `Date` header's value at `now`, a time the caller
/// already read: the wall clock is read once a second, not per response.
pub(crate) fn with_date<R>(now: Instant, f: impl FnOnce(&str) -> R) -> R {
    DATE.with_borrow_mut(|date| f(date.at(now, SystemTime::now)))
}

/// [`http_date`] of the current second, and until when it is current.
struct DateCache {
    valid_until: Option<Instant>,
    text: String,
}

impl DateCache {
    /// The date at `now`, asking `wall` for the wall clock only once the
    /// second of the last answer is over.
    fn at(&mut self, now: Instant, wall: impl FnOnce() -> SystemTime) -> &str {
        if self.valid_until.is_none_or(|until| now >= until) {
            let wall = wall();
            let into_second = wall.duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
            self.valid_until = now.checked_add(Duration::from_nanos(u64::from(1_000_000_000 - into_second)));
            self.text = http_date(wall);
        }
        &self.text
    }
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` (RFC 9110 section 5.6.7, IMF-fixdate).
pub(crate) fn http_date(time: SystemTime) -> String {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
    let secs = time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, secs_of_day) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{}, {day:02} {} {year} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        MONTHS[(month - 1) as usize],
        secs_of_day / 3600,
        secs_of_day / 60 % 60,
        secs_of_day % 60,
    )
}

/// Year, month (1 to 12) and day (1 to 31) of a day counted from
/// 1970-01-01: Howard Hinnant's `civil_from_days`
/// (<https://howardhinnant.github.io/date_algorithms.html#civil_from_days>),
/// for days on or after the epoch.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The body of a response.
#[derive(Debug)]
pub(crate) enum Body {
    /// Bytes compiled into the plugin: the index page, error texts.
    Static(&'static [u8]),
    /// Bytes made for this response: the status page.
    Owned(Vec<u8>),
    /// `len` bytes of the regular file at `path`, opened only when the
    /// response's turn comes.
    File { path: PathBuf, len: u64 },
}

impl Body {
    /// The body's bytes in memory: none for a file, which is read as it
    /// is sent.
    pub(crate) fn in_memory(&self) -> &[u8] {
        match self {
            Body::Static(bytes) => bytes,
            Body::Owned(bytes) => bytes,
            Body::File { .. } => &[],
        }
    }

    pub(crate) fn len(&self) -> u64 {
        match self {
            Body::Static(bytes) => bytes.len() as u64,
            Body::Owned(bytes) => bytes.len() as u64,
            Body::File { len, .. } => *len,
        }
    }
}

/// Counts a connection's responses that are queued and not yet fully
/// produced. The connection stops reading requests while too many are, so
/// that a client pipelining requests faster than it reads the answers
/// cannot make the queue grow without bound.
#[derive(Debug, Clone, Default)]
pub(crate) struct InFlight(Rc<Cell<usize>>);

impl InFlight {
    pub(crate) fn count(&self) -> usize {
        self.0.get()
    }

    /// Counts one more response, until the ticket is dropped.
    pub(crate) fn ticket(&self) -> Ticket {
        self.0.set(self.0.get() + 1);
        Ticket(self.0.clone())
    }
}

/// One response counted in its connection's [`InFlight`].
#[derive(Debug)]
pub(crate) struct Ticket(Rc<Cell<usize>>);

impl Drop for Ticket {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A file's response as one producer: its head, then the file, pulled as
/// the peer drains the output. (Responses in memory are pushed whole.)
///
/// The file is opened at its first pull, not when the request is parsed,
/// so that responses queued behind a long download hold a path rather than
/// a file descriptor. Exactly the announced `Content-Length` is sent: a
/// file that grew is cut, a file that shrank is an error, which closes the
/// connection so that the client sees a short response rather than a
/// corrupt stream.
#[derive(Debug)]
pub(crate) struct Response {
    head: SimpleProducer,
    path: PathBuf,
    remaining: u64,
    file: Option<FileProducer>,
    _ticket: Ticket,
}

impl Response {
    /// A response of `head`, then the first `len` bytes of the file at `path`.
    pub(crate) fn file(head: Vec<u8>, path: PathBuf, len: u64, ticket: Ticket) -> Response {
        Response { head: SimpleProducer::new(head), path, remaining: len, file: None, _ticket: ticket }
    }

    /// Fills `buf` (not empty) with the next bytes of the file.
    fn more_of_the_file(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.remaining == 0 {
            return Ok(0);
        }
        let producer = match &mut self.file {
            Some(producer) => producer,
            None => self.file.insert(open_regular_file(&self.path)?),
        };
        let want = buf.len().min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = producer.more(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: file shrank while being served ({} bytes short)", self.path.display(), self.remaining),
            ));
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            // Done with the descriptor: let it go now rather than when the
            // response is dropped.
            self.file = None;
        }
        Ok(n)
    }
}

impl Producer for Response {
    fn more(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.head.more(buf)?;
        if n == buf.len() {
            return Ok(n);
        }
        Ok(n + self.more_of_the_file(&mut buf[n..])?)
    }
}

/// Opens `path`, refusing anything but a regular file: a FIFO swapped in
/// since the request was checked would block the loop on every read.
fn open_regular_file(path: &PathBuf) -> io::Result<FileProducer> {
    let file = File::open(path)?;
    if !file.metadata()?.is_file() {
        return Err(io::Error::other(format!("{}: no longer a regular file", path.display())));
    }
    Ok(FileProducer::new(file))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn dates_are_imf_fixdates() {
        assert_eq!(http_date(at(0)), "Thu, 01 Jan 1970 00:00:00 GMT");
        // RFC 9110's example.
        assert_eq!(http_date(at(784_111_777)), "Sun, 06 Nov 1994 08:49:37 GMT");
        // A leap day and the turn of a century that is a leap year.
        assert_eq!(http_date(at(951_782_400)), "Tue, 29 Feb 2000 00:00:00 GMT");
        assert_eq!(http_date(at(1_709_251_199)), "Thu, 29 Feb 2024 23:59:59 GMT");
        assert_eq!(http_date(at(4_102_444_800)), "Fri, 01 Jan 2100 00:00:00 GMT");
        assert_eq!(http_date(UNIX_EPOCH - Duration::from_secs(5)), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn heads_carry_length_server_and_connection() {
        let head = write_head(Status::NotFound, "text/plain", 14, Connection::Close, &http_date(at(0)));
        let head = String::from_utf8(head).unwrap();
        assert_eq!(
            head,
            format!(
                "HTTP/1.1 404 Not Found\r\nServer: asyncored-http/{}\r\nDate: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
                 Content-Type: text/plain\r\nContent-Length: 14\r\nConnection: close\r\n\r\n",
                env!("CARGO_PKG_VERSION")
            )
        );
        let head = String::from_utf8(write_head(Status::MethodNotAllowed, "t", 0, Connection::KeepAlive, "d")).unwrap();
        assert!(head.contains("\r\nAllow: GET, HEAD\r\n"), "{head}");
        assert!(head.ends_with("\r\nConnection: keep-alive\r\n\r\n"), "{head}");
        let head = String::from_utf8(write_head(Status::Ok, "t", 0, Connection::Default, "d")).unwrap();
        assert!(!head.contains("Connection"), "{head}");
    }

    #[test]
    fn the_date_is_read_from_the_wall_clock_once_a_second() {
        let mut cache = DateCache { valid_until: None, text: String::new() };
        let start = Instant::now();
        let half_past = at(100) + Duration::from_millis(500);
        assert_eq!(cache.at(start, || half_past), "Thu, 01 Jan 1970 00:01:40 GMT");
        let later = start + Duration::from_millis(499);
        assert_eq!(cache.at(later, || panic!("the second is not over")), "Thu, 01 Jan 1970 00:01:40 GMT");
        let next = start + Duration::from_millis(500);
        assert_eq!(cache.at(next, || at(101)), "Thu, 01 Jan 1970 00:01:41 GMT");
    }

    #[test]
    fn decimals_are_written_without_leading_zeros() {
        for n in [0, 7, 10, 339, 1_000_000, u64::MAX] {
            let mut out = b"x".to_vec();
            append_decimal(&mut out, n);
            assert_eq!(out, format!("x{n}").as_bytes());
        }
    }

    #[test]
    fn error_bodies_match_their_status() {
        for status in [
            Status::Ok,
            Status::BadRequest,
            Status::NotFound,
            Status::MethodNotAllowed,
            Status::RequestTimeout,
            Status::LengthRequired,
            Status::UriTooLong,
            Status::HeaderFieldsTooLarge,
            Status::NotImplemented,
            Status::VersionNotSupported,
        ] {
            assert_eq!(status.error_body(), format!("{} {}\n", status.code(), status.reason()).as_bytes());
        }
    }

    fn drain(producer: &mut dyn Producer, buf_len: usize) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; buf_len];
        loop {
            match producer.more(&mut buf)? {
                0 => return Ok(out),
                n => out.extend_from_slice(&buf[..n]),
            }
        }
    }

    #[test]
    fn a_file_response_is_its_head_then_its_length_and_counts_while_alive() {
        let path = std::env::temp_dir().join(format!("asyncore-http-response-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let in_flight = InFlight::default();
        for buf_len in [1, 3, 64] {
            let mut response = Response::file(b"H:".to_vec(), path.clone(), 4, in_flight.ticket());
            assert_eq!(in_flight.count(), 1);
            assert_eq!(drain(&mut response, buf_len).unwrap(), b"H:0123");
            drop(response);
            assert_eq!(in_flight.count(), 0);
        }

        let mut response = Response::file(b"H:".to_vec(), path.clone(), 12, in_flight.ticket());
        let error = drain(&mut response, 5).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        // An empty file is never opened.
        let mut empty = Response::file(b"H:".to_vec(), path.with_extension("missing"), 0, in_flight.ticket());
        assert_eq!(drain(&mut empty, 5).unwrap(), b"H:");
        std::fs::remove_file(&path).unwrap();

        let mut gone = Response::file(b"H:".to_vec(), path.clone(), 1, in_flight.ticket());
        assert_eq!(drain(&mut gone, 5).unwrap_err().kind(), io::ErrorKind::NotFound);
        assert_eq!(in_flight.count(), 3);
        drop((response, empty, gone));
        assert_eq!(in_flight.count(), 0);
    }
}
