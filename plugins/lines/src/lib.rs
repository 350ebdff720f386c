//! `lines`: an asynchat line echo. Every complete line comes back followed
//! by the terminator, whatever reads it arrived in.
//!
//! Config: `terminator` (default `\r\n`; the escapes `\r`, `\n`, `\t` and
//! `\\` are understood, so `-c terminator='\n'` works; any non-empty byte
//! string), `max_line` (bytes, default 65536: a longer line closes its
//! channel, with a logged reason), `high_water` (bytes of output waiting
//! for a slow reader before the channel stops reading; default the SDK's,
//! 262144).

#![forbid(unsafe_code)]

use asyncore_sdk::prelude::*;

/// A line buffer that grew past this is shrunk back after its line, so that
/// one long line does not pin its memory for the life of the connection.
const KEEP_LINE_CAPACITY: usize = 16 * 1024;

/// The listening dispatcher: one per listener, holding its configuration.
struct LinesServer {
    terminator: Vec<u8>,
    max_line: usize,
    high_water: Option<usize>,
}

impl Dispatcher for LinesServer {
    fn handle_accepted(&mut self, _channel: &mut Channel<'_>) -> Option<Box<dyn Dispatcher>> {
        let handler = LineEcho { line: Vec::new(), terminator: self.terminator.clone() };
        let mut chat =
            AsyncChat::new(handler).with_terminator(self.terminator.as_slice()).with_max_input(self.max_line);
        if let Some(high_water) = self.high_water {
            chat = chat.with_output_high_water(high_water);
        }
        Some(Box::new(chat))
    }
}

/// One per connection.
struct LineEcho {
    /// The current line, terminator appended once found, so that each line
    /// goes out in one send.
    line: Vec<u8>,
    terminator: Vec<u8>,
}

impl ChatHandler for LineEcho {
    // Our own buffer rather than the chat's incoming one: pushing from the
    // handler's field while `chat` is borrowed mutably needs no copy.
    fn collect_incoming_data(&mut self, _chat: &mut Chat<'_>, data: &[u8]) {
        self.line.extend_from_slice(data);
    }

    fn found_terminator(&mut self, chat: &mut Chat<'_>) {
        self.line.extend_from_slice(&self.terminator);
        chat.push(&self.line);
        self.line.clear();
        if self.line.capacity() > KEEP_LINE_CAPACITY {
            self.line.shrink_to(KEEP_LINE_CAPACITY);
        }
    }

    fn input_overflow(&mut self, chat: &mut Chat<'_>) {
        log!(
            warn,
            "channel {}: line too long: more than max_line {} bytes without the terminator {}; closing",
            chat.channel().id(),
            chat.max_input(),
            chat.get_terminator(),
        );
        self.line = Vec::new();
        chat.close();
    }
}

/// Turns a config value into bytes, understanding `\r`, `\n`, `\t` and
/// `\\`, so that a terminator can be typed on a command line.
fn unescape(value: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(value.len());
    let mut bytes = value.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        out.push(match bytes.next() {
            Some(b'r') => b'\r',
            Some(b'n') => b'\n',
            Some(b't') => b'\t',
            Some(b'\\') => b'\\',
            Some(other) => {
                return Err(format!("unknown escape \\{} (use \\r, \\n, \\t or \\\\)", char::from(other)));
            }
            None => return Err("ends with a lone backslash (write \\\\ for a backslash)".to_string()),
        });
    }
    Ok(out)
}

/// The `lines` plugin: export it with `export_plugin!`, or run it in tests
/// with `asyncore_testing::TestServer::start::<Lines>`.
pub struct Lines;

impl Plugin for Lines {
    const NAME: &'static str = "lines";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");

    fn listen(config: &Config) -> Result<Box<dyn Dispatcher>, String> {
        let terminator = match config.get("terminator") {
            None => b"\r\n".to_vec(),
            Some(value) => unescape(value).map_err(|e| format!("config terminator: {value:?} {e}"))?,
        };
        if terminator.is_empty() {
            return Err("config terminator: must not be empty".to_string());
        }
        let max_line = config.parse_or("max_line", 64 * 1024)?;
        if max_line == 0 {
            return Err("config max_line: must be at least 1".to_string());
        }
        // Unset keeps the SDK's default mark.
        let high_water: Option<usize> =
            config.get("high_water").map(|_| config.parse_or("high_water", 0)).transpose()?;
        if high_water == Some(0) {
            return Err("config high_water: must be at least 1".to_string());
        }
        Ok(Box::new(LinesServer { terminator, max_line, high_water }))
    }
}

export_plugin!(Lines);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_understands_the_four_escapes() {
        assert_eq!(unescape(r"\r\n").unwrap(), b"\r\n");
        assert_eq!(unescape(r"\n").unwrap(), b"\n");
        assert_eq!(unescape(r"a\tb\\c").unwrap(), b"a\tb\\c");
        assert_eq!(unescape("END").unwrap(), b"END");
        assert_eq!(unescape("\r\n").unwrap(), b"\r\n");
        assert_eq!(unescape("").unwrap(), b"");
    }

    #[test]
    fn unescape_refuses_unknown_escapes_and_a_lone_backslash() {
        assert!(unescape(r"\x").unwrap_err().contains(r"\x"));
        assert!(unescape("abc\\").unwrap_err().contains("lone backslash"));
    }
}
