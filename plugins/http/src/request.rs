//! The request head: its request line and header fields, parsed one line at
//! a time as the chat's framer cuts them (RFC 9112, sections 2 to 6).
//!
//! Pure logic, no socket: the handler feeds [`HeadParser::line`] and acts on
//! the [`Step`] it answers, and the tests below feed it directly.

use crate::response::Status;

/// The protocol versions served. A request of HTTP/1.2 or later 1.x is
/// served as HTTP/1.1, as RFC 9110 section 2.5 asks; other majors are
/// refused with 505.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    Http10,
    Http11,
}

/// `method SP request-target SP HTTP-version`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RequestLine {
    pub(crate) method: String,
    pub(crate) target: String,
    pub(crate) version: Version,
}

/// Parses a request line, without its line ending.
///
/// Strict, as RFC 9112 section 3 allows: exactly one space between the
/// three parts, a token for the method, visible ASCII for the target.
#[cfg(test)]
pub(crate) fn parse_request_line(line: &[u8]) -> Result<RequestLine, Status> {
    let (method, target, version) = split_request_line(line)?;
    Ok(RequestLine { method: method.to_string(), target: target.to_string(), version })
}

/// [`parse_request_line`] without copying: the method and the target
/// borrowed from `line`.
fn split_request_line(line: &[u8]) -> Result<(&str, &str, Version), Status> {
    let space = |from: usize| line[from..].iter().position(|&b| b == b' ').map(|at| from + at);
    let method_end = space(0).ok_or(Status::BadRequest)?;
    let target_end = space(method_end + 1).ok_or(Status::BadRequest)?;
    let (method, target, version) = (&line[..method_end], &line[method_end + 1..target_end], &line[target_end + 1..]);
    if !is_token(method) || target.is_empty() || !all_bytes(target, |b| b.is_ascii_graphic()) {
        return Err(Status::BadRequest);
    }
    // Both are ASCII now, so these cannot fail.
    let ascii = |bytes| std::str::from_utf8(bytes).map_err(|_| Status::BadRequest);
    Ok((ascii(method)?, ascii(target)?, parse_version(version)?))
}

/// `HTTP/` DIGIT `.` DIGIT; the name is case-sensitive.
fn parse_version(text: &[u8]) -> Result<Version, Status> {
    match *text {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit() => {
            match (major, minor) {
                (b'1', b'0') => Ok(Version::Http10),
                (b'1', _) => Ok(Version::Http11),
                _ => Err(Status::VersionNotSupported),
            }
        }
        _ => Err(Status::BadRequest),
    }
}

/// Parses `name: value` into the name and the value without its
/// surrounding whitespace.
///
/// Rejects whitespace before the colon and obsolete line folding (a line
/// starting with whitespace), as RFC 9112 sections 5.1 and 5.2 allow, and
/// control characters in the value, a bare CR included.
pub(crate) fn parse_header_field(line: &[u8]) -> Result<(&[u8], &[u8]), Status> {
    let colon = line.iter().position(|&b| b == b':').ok_or(Status::BadRequest)?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    if !is_token(name) {
        return Err(Status::BadRequest);
    }
    let value = trim_ows(value);
    // field-vchar (VCHAR and obs-text), SP and HTAB: every byte but the
    // controls other than HTAB, and DEL.
    if !all_bytes(value, |b| (b >= b' ' && b != 0x7f) || b == b'\t') {
        return Err(Status::BadRequest);
    }
    Ok((name, value))
}

/// Strips optional whitespace (SP and HTAB only) from both ends.
fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// Whether every byte of `bytes` passes `test`: without stopping at the
/// first that fails, which lets the compiler test many bytes at a time
/// (requests are well-formed far more often than not).
fn all_bytes(bytes: &[u8], test: impl Fn(u8) -> bool) -> bool {
    bytes.iter().fold(true, |all, &b| all & test(b))
}

/// RFC 9110 section 5.6.2: `1*tchar`.
fn is_token(text: &[u8]) -> bool {
    !text.is_empty() && text.iter().all(|&b| TCHAR[usize::from(b)])
}

/// Which bytes are `tchar`: letters, digits and ``!#$%&'*+-.^_`|~``.
const TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        b += 1;
    }
    table
};

/// A request line and what its header fields say about framing and the
/// connection. Fields this server has no use for are checked for syntax
/// and dropped.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub(crate) line: RequestLine,
    content_length: Option<u64>,
    /// The last transfer coding named, lowercased; `Some` once any
    /// `Transfer-Encoding` field was seen.
    transfer_coding: Option<String>,
    n_host: usize,
    connection_close: bool,
    connection_keep_alive: bool,
    expect_continue: bool,
}

impl RequestHead {
    pub(crate) fn new(line: RequestLine) -> RequestHead {
        RequestHead {
            line,
            content_length: None,
            transfer_coding: None,
            n_host: 0,
            connection_close: false,
            connection_keep_alive: false,
            expect_continue: false,
        }
    }

    /// A head of this request line, in `spare`'s memory if there is one:
    /// a connection's requests reuse the strings of the one before.
    fn start(spare: Option<RequestHead>, method: &str, target: &str, version: Version) -> RequestHead {
        let Some(mut head) = spare else {
            return RequestHead::new(RequestLine { method: method.to_string(), target: target.to_string(), version });
        };
        head.line.method.clear();
        head.line.method.push_str(method);
        head.line.target.clear();
        head.line.target.push_str(target);
        head.line.version = version;
        RequestHead::new(head.line)
    }

    /// Takes in one header field.
    pub(crate) fn add_field(&mut self, name: &[u8], value: &[u8]) -> Result<(), Status> {
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        if is("content-length") {
            // One field of digits only. Duplicates, even equal ones, and
            // lists are refused: disagreeing lengths are how requests are
            // smuggled past a proxy (RFC 9112 section 6.3).
            if self.content_length.is_some()
                || value.is_empty()
                || value.len() > 18
                || !value.iter().all(u8::is_ascii_digit)
            {
                return Err(Status::BadRequest);
            }
            let digits = std::str::from_utf8(value).map_err(|_| Status::BadRequest)?;
            self.content_length = Some(digits.parse().map_err(|_| Status::BadRequest)?);
        } else if is("transfer-encoding") {
            let last = list_items(value).last().unwrap_or_default();
            self.transfer_coding = Some(String::from_utf8_lossy(last).to_ascii_lowercase());
        } else if is("host") {
            self.n_host += 1;
        } else if is("connection") {
            for option in list_items(value) {
                self.connection_close |= option.eq_ignore_ascii_case(b"close");
                self.connection_keep_alive |= option.eq_ignore_ascii_case(b"keep-alive");
            }
        } else if is("expect") {
            self.expect_continue |= list_items(value).any(|e| e.eq_ignore_ascii_case(b"100-continue"));
        }
        Ok(())
    }

    /// The length of the request body, once the head is complete.
    ///
    /// # Errors
    ///
    /// A request that cannot be framed: `400` for an HTTP/1.1 request
    /// without exactly one `Host` (RFC 9112 section 3.2) or an HTTP/1.0
    /// request with `Transfer-Encoding` (section 6.1); `411` for a chunked
    /// body, which this server does not decode (the client may retry with
    /// `Content-Length`); `501` for any other transfer coding.
    pub(crate) fn body_length(&self) -> Result<u64, Status> {
        if self.line.version == Version::Http11 && self.n_host != 1 {
            return Err(Status::BadRequest);
        }
        match (&self.transfer_coding, self.line.version) {
            (None, _) => Ok(self.content_length.unwrap_or(0)),
            (Some(_), Version::Http10) => Err(Status::BadRequest),
            (Some(coding), Version::Http11) if coding == "chunked" => Err(Status::LengthRequired),
            (Some(_), Version::Http11) => Err(Status::NotImplemented),
        }
    }

    /// Whether the client wants the connection kept open after this
    /// request: HTTP/1.1 unless `Connection: close`, HTTP/1.0 only with
    /// `Connection: keep-alive`.
    pub(crate) fn keep_alive(&self) -> bool {
        match self.line.version {
            Version::Http11 => !self.connection_close,
            Version::Http10 => self.connection_keep_alive && !self.connection_close,
        }
    }

    /// `Expect: 100-continue`: the client waits before sending its body.
    pub(crate) fn expects_continue(&self) -> bool {
        self.expect_continue
    }

    /// A `HEAD` request: its response has no body.
    pub(crate) fn is_head(&self) -> bool {
        self.line.method == "HEAD"
    }
}

/// The items of a comma-separated list field, trimmed, empty ones skipped.
fn list_items(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    value.split(|&b| b == b',').map(<[u8]>::trim_ascii).filter(|item| !item.is_empty())
}

/// What the handler does after a line of the head.
#[derive(Debug)]
pub(crate) enum Step {
    /// Read the next line.
    More,
    /// The head is complete.
    Done(RequestHead),
    /// Answer with this error and close: what follows cannot be framed.
    Reject(Status),
}

/// Collects the lines of one request head after another, within a budget of
/// bytes per head.
#[derive(Debug)]
pub(crate) struct HeadParser {
    max_bytes: usize,
    /// Bytes of the current head so far, line endings included.
    used: usize,
    head: Option<RequestHead>,
    /// The last head answered, given back with [`HeadParser::recycle`]:
    /// the next one is parsed into its strings.
    spare: Option<RequestHead>,
}

impl HeadParser {
    pub(crate) fn new(max_bytes: usize) -> HeadParser {
        HeadParser { max_bytes, used: 0, head: None, spare: None }
    }

    /// Gives back a head that was answered, so that the next request line
    /// is copied into its memory rather than into new strings.
    pub(crate) fn recycle(&mut self, head: RequestHead) {
        self.spare = Some(head);
    }

    /// Takes one line, without its `\n`: a `\r` before it is dropped, so
    /// that bare `\n` line endings work too (RFC 9112 section 2.2).
    pub(crate) fn line(&mut self, line: &[u8]) -> Step {
        self.used = self.used.saturating_add(line.len() + 1);
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match &mut self.head {
            // Empty lines before a request line are skipped, as section 2.2
            // asks (some clients send CRLF after a POST body).
            None if line.is_empty() => Step::More,
            None => match split_request_line(line) {
                Ok((method, target, version)) => {
                    self.head = Some(RequestHead::start(self.spare.take(), method, target, version));
                    Step::More
                }
                Err(status) => Step::Reject(status),
            },
            Some(_) if line.is_empty() => {
                self.used = 0;
                Step::Done(self.head.take().expect("a head is being parsed"))
            }
            Some(head) => match parse_header_field(line).and_then(|(name, value)| head.add_field(name, value)) {
                Ok(()) => Step::More,
                Err(status) => Step::Reject(status),
            },
        }
    }

    /// Bytes the next line may have before the head is over budget: the
    /// chat's input limit for it.
    pub(crate) fn room(&self) -> usize {
        self.max_bytes.saturating_sub(self.used)
    }

    /// The status for a head that went over budget: `414` while still in
    /// the request line, `431` in the header fields.
    pub(crate) fn overflow_status(&self) -> Status {
        if self.head.is_some() { Status::HeaderFieldsTooLarge } else { Status::UriTooLong }
    }

    /// The request line of the head being parsed, if it got that far.
    pub(crate) fn request_line(&self) -> Option<&RequestLine> {
        self.head.as_ref().map(|head| &head.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(method: &str, target: &str, version: Version) -> RequestLine {
        RequestLine { method: method.into(), target: target.into(), version }
    }

    #[test]
    fn request_lines_of_both_versions_parse() {
        assert_eq!(parse_request_line(b"GET / HTTP/1.0"), Ok(line("GET", "/", Version::Http10)));
        assert_eq!(
            parse_request_line(b"HEAD /static/a%20b.txt?x=1 HTTP/1.1"),
            Ok(line("HEAD", "/static/a%20b.txt?x=1", Version::Http11))
        );
        assert_eq!(parse_request_line(b"PURGE * HTTP/1.1"), Ok(line("PURGE", "*", Version::Http11)));
        // A later minor version of 1 is served as 1.1.
        assert_eq!(parse_request_line(b"GET / HTTP/1.7"), Ok(line("GET", "/", Version::Http11)));
    }

    #[test]
    fn malformed_request_lines_are_bad_requests() {
        for bad in [
            &b""[..],
            b"GET",
            b"GET /",
            b"GET / HTTP/1.1 extra",
            b"GET  / HTTP/1.1",
            b" GET / HTTP/1.1",
            b"GET / HTTP/1.1 ",
            b"GET\t/ HTTP/1.1",
            b"G(T / HTTP/1.1",
            b"GET /a\x00b HTTP/1.1",
            b"GET /\r HTTP/1.1",
            b"GET /\xc3\xa9 HTTP/1.1",
            b"GET / http/1.1",
            b"GET / HTTP/1",
            b"GET / HTTP/1.10",
            b"GET / HTTP/x.1",
            b"GET / HTTP/1.1\r",
        ] {
            assert_eq!(parse_request_line(bad), Err(Status::BadRequest), "{:?}", bad.escape_ascii().to_string());
        }
    }

    #[test]
    fn other_major_versions_are_not_supported() {
        for version in ["HTTP/0.9", "HTTP/2.0", "HTTP/3.0", "HTTP/9.9"] {
            let request = format!("GET / {version}");
            assert_eq!(parse_request_line(request.as_bytes()), Err(Status::VersionNotSupported), "{version}");
        }
    }

    #[test]
    fn header_fields_are_trimmed_and_checked() {
        assert_eq!(parse_header_field(b"Host: example.com"), Ok((&b"Host"[..], &b"example.com"[..])));
        assert_eq!(parse_header_field(b"X-Empty:"), Ok((&b"X-Empty"[..], &b""[..])));
        assert_eq!(parse_header_field(b"a: \t spaced  out \t "), Ok((&b"a"[..], &b"spaced  out"[..])));
        assert_eq!(parse_header_field(b"Raw: caf\xc3\xa9"), Ok((&b"Raw"[..], &b"caf\xc3\xa9"[..])));
        assert_eq!(parse_header_field(b"Url: http://x:80/"), Ok((&b"Url"[..], &b"http://x:80/"[..])));
        for bad in [
            &b"no colon"[..],
            b": no name",
            b"Host : space before colon",
            b" folded: continuation",
            b"\tfolded: continuation",
            b"Bad Name: x",
            b"Ctl: a\x01b",
            b"Nul: a\x00b",
            b"Cr: a\rb",
            b"Del: a\x7fb",
        ] {
            assert_eq!(parse_header_field(bad), Err(Status::BadRequest), "{:?}", bad.escape_ascii().to_string());
        }
    }

    /// Feeds `text` to a parser line by line, as the chat's framer cuts it
    /// at `\n`, and answers the first step that is not `More`.
    fn parse(text: &str) -> Step {
        let mut parser = HeadParser::new(16 * 1024);
        let mut lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.pop(), Some(""), "the text ends with a line ending");
        for line in lines {
            match parser.line(line.as_bytes()) {
                Step::More => {}
                step => return step,
            }
        }
        panic!("the head never ended: {text:?}");
    }

    fn head(text: &str) -> RequestHead {
        match parse(text) {
            Step::Done(head) => head,
            step => panic!("expected a complete head, got {step:?}"),
        }
    }

    fn rejected(text: &str) -> Status {
        match parse(text) {
            Step::Reject(status) => status,
            step => panic!("expected a rejection, got {step:?}"),
        }
    }

    #[test]
    fn heads_end_at_an_empty_line_with_crlf_or_bare_lf() {
        let head = head("GET / HTTP/1.0\r\nHost: example.com\r\n\r\n");
        assert_eq!(head.line, line("GET", "/", Version::Http10));
        assert_eq!(head.body_length(), Ok(0));
        assert!(!head.keep_alive());

        let head = super::tests::head("\r\n\nGET /x HTTP/1.1\nHost: a\nConnection: keep-alive\n\n");
        assert_eq!(head.line, line("GET", "/x", Version::Http11));
        assert!(head.keep_alive());
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection_options() {
        let cases = [
            ("HTTP/1.1", "", true),
            ("HTTP/1.1", "Connection: close\r\n", false),
            ("HTTP/1.1", "Connection: Upgrade, CLOSE\r\n", false),
            ("HTTP/1.1", "Connection: keep-alive\r\n", true),
            ("HTTP/1.0", "", false),
            ("HTTP/1.0", "Connection: Keep-Alive\r\n", true),
            ("HTTP/1.0", "Connection: keep-alive, close\r\n", false),
            ("HTTP/1.0", "Connection: x\r\nConnection: keep-alive\r\n", true),
        ];
        for (version, fields, keep_alive) in cases {
            let head = head(&format!("GET / {version}\r\nHost: h\r\n{fields}\r\n"));
            assert_eq!(head.keep_alive(), keep_alive, "{version} {fields:?}");
        }
    }

    #[test]
    fn content_length_must_be_one_plain_number() {
        assert_eq!(head("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 42\r\n\r\n").body_length(), Ok(42));
        assert_eq!(head("POST / HTTP/1.0\r\ncontent-length:0\r\n\r\n").body_length(), Ok(0));
        for value in ["", "-1", "+5", "5, 5", "0x10", "1 2", "99999999999999999999"] {
            let text = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(rejected(&text), Status::BadRequest, "{value:?}");
        }
        let twice = "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(rejected(twice), Status::BadRequest);
    }

    #[test]
    fn transfer_codings_are_refused() {
        let chunked = head("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, Chunked\r\n\r\n");
        assert_eq!(chunked.body_length(), Err(Status::LengthRequired));
        let gzip = head("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n");
        assert_eq!(gzip.body_length(), Err(Status::NotImplemented));
        // With a Content-Length too: the coding wins and the request is
        // still refused.
        let both = head("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(both.body_length(), Err(Status::LengthRequired));
        let old = head("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n");
        assert_eq!(old.body_length(), Err(Status::BadRequest));
    }

    #[test]
    fn http11_needs_exactly_one_host() {
        assert_eq!(head("GET / HTTP/1.1\r\n\r\n").body_length(), Err(Status::BadRequest));
        assert_eq!(head("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n").body_length(), Err(Status::BadRequest));
        assert_eq!(head("GET / HTTP/1.0\r\n\r\n").body_length(), Ok(0));
    }

    #[test]
    fn expect_continue_is_noticed() {
        let head = head("POST / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 9\r\n\r\n");
        assert!(head.expects_continue());
        assert!(!head.is_head());
    }

    #[test]
    fn a_recycled_head_keeps_nothing_of_its_request() {
        let mut parser = HeadParser::new(16 * 1024);
        let feed = |parser: &mut HeadParser, text: &str| {
            let mut step = Step::More;
            for line in text.split_inclusive('\n') {
                step = parser.line(line.strip_suffix('\n').unwrap().as_bytes());
            }
            match step {
                Step::Done(head) => head,
                step => panic!("expected a complete head, got {step:?}"),
            }
        };
        let first = feed(
            &mut parser,
            "POST /upload/a/long/path HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: gzip\r\n\
             Expect: 100-continue\r\n\r\n",
        );
        assert!(first.keep_alive() && first.expects_continue());
        parser.recycle(first);
        let second = feed(&mut parser, "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        assert_eq!(second.line, line("GET", "/", Version::Http11));
        assert_eq!(second.body_length(), Ok(0));
        assert!(!second.keep_alive() && !second.expects_continue());
    }

    #[test]
    fn malformed_lines_reject_the_request() {
        assert_eq!(rejected("GET /\r\n"), Status::BadRequest);
        assert_eq!(rejected("GET / HTTP/2.0\r\n"), Status::VersionNotSupported);
        assert_eq!(rejected("GET / HTTP/1.1\r\nHost: h\r\n folded\r\n"), Status::BadRequest);
        assert_eq!(rejected("GET / HTTP/1.1\r\nHost: h\r\nbare\r\n"), Status::BadRequest);
    }

    #[test]
    fn the_budget_covers_the_whole_head_and_restarts_per_request() {
        let mut parser = HeadParser::new(40);
        assert_eq!(parser.room(), 40);
        assert_eq!(parser.overflow_status(), Status::UriTooLong);
        assert!(matches!(parser.line(b"GET / HTTP/1.1\r"), Step::More));
        assert_eq!(parser.room(), 40 - 16);
        assert_eq!(parser.overflow_status(), Status::HeaderFieldsTooLarge);
        assert_eq!(parser.request_line().map(|l| l.method.as_str()), Some("GET"));
        assert!(matches!(parser.line(b"Host: h\r"), Step::More));
        assert_eq!(parser.room(), 40 - 16 - 9);
        assert!(matches!(parser.line(b"\r"), Step::Done(_)));
        assert_eq!(parser.room(), 40);
        assert!(parser.request_line().is_none());
    }
}
