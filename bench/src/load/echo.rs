//! The echo exchange: messages cut from one pseudo-random byte stream per
//! connection (each connection starts at its own offset, so bytes that went
//! to the wrong connection are caught too), and every byte that comes back
//! compared with the byte sent at that position.

use std::sync::OnceLock;

use super::Exchange;

/// The stream repeats with this prime period, so a connection's messages
/// do not line up with it.
const PERIOD: usize = 65_521;
/// The longest slice ever taken: a message (at most 64 KiB) or one read.
const LONGEST: usize = 64 * 1024;

fn pattern() -> &'static [u8] {
    static PATTERN: OnceLock<Vec<u8>> = OnceLock::new();
    PATTERN.get_or_init(|| {
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let period: Vec<u8> = (0..PERIOD)
            .map(|_| {
                // xorshift64: cheap, and no byte value is favoured.
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 32) as u8
            })
            .collect();
        // Any slice of at most LONGEST bytes from an offset below PERIOD is
        // contiguous: the stream continues past the period's end.
        (0..PERIOD + LONGEST).map(|i| period[i % PERIOD]).collect()
    })
}

/// One connection's side of an echo run.
#[derive(Debug)]
pub(crate) struct EchoExchange {
    message: usize,
    /// Where this connection's stream starts in the pattern.
    seed: usize,
    sent: u64,
    received: u64,
}

impl EchoExchange {
    /// Messages of `message` bytes (at most 64 KiB) for connection `index`.
    pub(crate) fn new(message: usize, index: usize) -> EchoExchange {
        assert!((1..=LONGEST).contains(&message), "message size {message}");
        EchoExchange { message, seed: index.wrapping_mul(7_919) % PERIOD, sent: 0, received: 0 }
    }

    fn stream(&self, offset: u64, len: usize) -> &'static [u8] {
        let start = ((offset + self.seed as u64) % PERIOD as u64) as usize;
        &pattern()[start..start + len]
    }
}

impl Exchange for EchoExchange {
    fn write_request(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.stream(self.sent, self.message));
        self.sent += self.message as u64;
    }

    fn read_response(&mut self, input: &[u8]) -> Result<usize, String> {
        if self.received + input.len() as u64 > self.sent {
            return Err(format!("{} bytes came back, {} were sent", self.received + input.len() as u64, self.sent));
        }
        let expected = self.stream(self.received, input.len());
        if let Some(at) = expected.iter().zip(input).position(|(expected, got)| expected != got) {
            return Err(format!(
                "byte {} of the stream: sent {:#04x}, got {:#04x} back",
                self.received + at as u64,
                expected[at],
                input[at]
            ));
        }
        let before = self.received / self.message as u64;
        self.received += input.len() as u64;
        Ok((self.received / self.message as u64 - before) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::{EchoExchange, Exchange as _};

    #[test]
    fn an_echo_in_pieces_completes_each_message_once() {
        let mut exchange = EchoExchange::new(64, 3);
        let mut sent = Vec::new();
        exchange.write_request(&mut sent);
        exchange.write_request(&mut sent);
        assert_eq!(exchange.read_response(&sent[..10]), Ok(0));
        assert_eq!(exchange.read_response(&sent[10..100]), Ok(1));
        assert_eq!(exchange.read_response(&sent[100..]), Ok(1));
    }

    #[test]
    fn a_wrong_byte_or_an_extra_byte_is_an_error() {
        let mut exchange = EchoExchange::new(64, 0);
        let mut sent = Vec::new();
        exchange.write_request(&mut sent);
        let mut wrong = sent.clone();
        wrong[5] ^= 1;
        assert!(exchange.read_response(&wrong).unwrap_err().starts_with("byte 5 "));
        let mut exchange = EchoExchange::new(64, 0);
        exchange.write_request(&mut Vec::new());
        sent.push(0);
        assert!(exchange.read_response(&sent).is_err());
    }

    #[test]
    fn connections_send_different_bytes() {
        let (mut first, mut second) = (Vec::new(), Vec::new());
        EchoExchange::new(64, 0).write_request(&mut first);
        EchoExchange::new(64, 1).write_request(&mut second);
        assert_ne!(first, second);
    }
}
