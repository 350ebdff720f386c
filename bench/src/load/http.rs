//! The HTTP exchange: keep-alive `GET /` requests (pipelined when the run's
//! depth is above one), and answers parsed as they arrive: each must be a
//! `200` with a `Content-Length`, must not close the connection, and must
//! carry the same body as the first answer on its connection.

use super::Exchange;

const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: asyncore-bench\r\n\r\n";
const HEAD_END: &[u8] = b"\r\n\r\n";

/// One connection's side of an HTTP run.
#[derive(Debug, Default)]
pub(crate) struct HttpExchange {
    /// Bytes of answers not complete yet.
    input: Vec<u8>,
    /// The first answer's body, which every later one must repeat.
    body: Option<Vec<u8>>,
}

impl Exchange for HttpExchange {
    fn write_request(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(REQUEST);
    }

    fn read_response(&mut self, input: &[u8]) -> Result<usize, String> {
        self.input.extend_from_slice(input);
        let mut answers = 0;
        let mut at = 0;
        while let Some(head_len) = find(&self.input[at..], HEAD_END).map(|end| end + HEAD_END.len()) {
            let head = &self.input[at..at + head_len];
            let status_line = head.split(|&byte| byte == b'\r').next().unwrap_or_default();
            if !status_line.starts_with(b"HTTP/1.1 200 ") {
                return Err(format!("expected HTTP/1.1 200, got {:?}", String::from_utf8_lossy(status_line)));
            }
            let mut content_length = None;
            for line in head.split(|&byte| byte == b'\n').skip(1) {
                if let Some(value) = header_value(line, b"content-length:") {
                    content_length =
                        std::str::from_utf8(value).ok().and_then(|value| value.trim().parse::<usize>().ok());
                } else if header_value(line, b"connection:")
                    .is_some_and(|value| value.windows(5).any(|word| word.eq_ignore_ascii_case(b"close")))
                {
                    return Err("the server closes a keep-alive connection".to_string());
                }
            }
            let body_len = content_length.ok_or("an answer without Content-Length")?;
            if self.input.len() - at < head_len + body_len {
                break;
            }
            let body = &self.input[at + head_len..at + head_len + body_len];
            match &self.body {
                None => self.body = Some(body.to_vec()),
                Some(first) if first != body => return Err("a body differs from the first one".to_string()),
                Some(_) => {}
            }
            at += head_len + body_len;
            answers += 1;
        }
        self.input.drain(..at);
        Ok(answers)
    }
}

/// The value of `line` if it is the header `name` (lowercase, with its colon).
fn header_value<'a>(line: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    (line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name)).then(|| &line[name.len()..])
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|window| window == needle)
}

#[cfg(test)]
mod tests {
    use super::{Exchange as _, HttpExchange};

    const OK: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\nhello";

    #[test]
    fn pipelined_answers_split_anywhere_are_counted_once() {
        let stream: Vec<u8> = [OK, OK, OK].concat();
        for cut in 0..stream.len() {
            let mut exchange = HttpExchange::default();
            let first = exchange.read_response(&stream[..cut]).unwrap();
            let second = exchange.read_response(&stream[cut..]).unwrap();
            assert_eq!(first + second, 3, "cut at {cut}");
        }
    }

    #[test]
    fn errors_closes_and_changed_bodies_fail() {
        let mut exchange = HttpExchange::default();
        assert!(exchange.read_response(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n").is_err());
        let mut exchange = HttpExchange::default();
        assert!(exchange.read_response(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").is_err());
        let mut exchange = HttpExchange::default();
        assert_eq!(exchange.read_response(OK), Ok(1));
        assert!(exchange.read_response(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhellO").is_err());
    }
}
