//! Producers: output made lazily, as the peer drains it (asynchat's
//! `simple_producer` and friends).
//!
//! A producer queued with
//! [`Chat::push_with_producer`](crate::Chat::push_with_producer) is asked for
//! more only while the channel's output queue is below its high-water mark,
//! so a response of any size (a 100 MiB file) goes out in bounded memory.

use std::{fmt, fs::File, io, io::Read, path::Path};

/// A source of output, pulled in chunks as the socket drains.
pub trait Producer {
    /// Called from `handle_write` while the channel's output queue is below
    /// the high-water mark: write the next bytes into `buf`, which the SDK
    /// owns and reuses, and return how many were written.
    ///
    /// Returning `Ok(0)` means the producer is exhausted: it is dropped and
    /// the next queued output follows. A producer is never called again
    /// after that.
    ///
    /// This runs on the poll loop: it must not block. Reading a regular
    /// file, as [`FileProducer`] does, is fine.
    ///
    /// # Errors
    ///
    /// An error stops the output: the handler's
    /// [`handle_error`](crate::ChatHandler::handle_error) is called with it
    /// and the channel is closed, so the peer sees a short response rather
    /// than a corrupt one.
    fn more(&mut self, buf: &mut [u8]) -> io::Result<usize>;
}

/// Produces bytes held in memory, asynchat's `simple_producer`.
///
/// Build it from a `Vec<u8>` or a `Box<[u8]>` without copying.
pub struct SimpleProducer {
    data: Vec<u8>,
    /// How much of `data` was produced.
    at: usize,
}

impl SimpleProducer {
    /// A producer of `data`.
    pub fn new(data: impl Into<Vec<u8>>) -> SimpleProducer {
        SimpleProducer { data: data.into(), at: 0 }
    }

    /// Bytes not produced yet.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.at
    }
}

impl Producer for SimpleProducer {
    fn more(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let rest = &self.data[self.at..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.at += n;
        Ok(n)
    }
}

impl fmt::Debug for SimpleProducer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimpleProducer").field("len", &self.data.len()).field("remaining", &self.remaining()).finish()
    }
}

/// Produces the contents of a file, from its current position to its end,
/// in bounded memory whatever its size: each call reads one buffer.
///
/// It reads synchronously, on the poll loop. That is fine for a regular
/// file on a local disk, served mostly from the page cache; do not give it
/// a pipe, a FIFO or a file on a slow network filesystem, whose reads can
/// block the whole loop.
#[derive(Debug)]
pub struct FileProducer {
    file: File,
}

impl FileProducer {
    /// A producer of `file`, from its current position to its end.
    pub fn new(file: File) -> FileProducer {
        FileProducer { file }
    }

    /// Opens the file at `path` for reading.
    ///
    /// # Errors
    ///
    /// The error of opening the file.
    pub fn open(path: impl AsRef<Path>) -> io::Result<FileProducer> {
        File::open(path).map(FileProducer::new)
    }
}

impl Producer for FileProducer {
    fn more(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            match self.file.read(buf) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, path::PathBuf};

    use super::*;

    /// Pulls `producer` dry with a buffer of `buf_len` bytes.
    fn drain(producer: &mut dyn Producer, buf_len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; buf_len];
        loop {
            let n = producer.more(&mut buf).unwrap();
            assert!(n <= buf_len);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// A file in the temp directory, removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let path = std::env::temp_dir().join(format!("asyncore-sdk-{}-{name}", std::process::id()));
            File::create(&path).unwrap().write_all(contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Bytes that are not all alike, so that a misplaced chunk shows.
    fn pattern(len: usize) -> Vec<u8> {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn simple_producer_yields_every_byte_then_zero() {
        let data = pattern(10_000);
        for buf_len in [1, 7, 4096, 64 * 1024] {
            let mut producer = SimpleProducer::new(data.clone());
            assert_eq!(drain(&mut producer, buf_len), data);
            assert_eq!(producer.remaining(), 0);
            assert_eq!(producer.more(&mut [0u8; 16]).unwrap(), 0);
        }
    }

    #[test]
    fn simple_producer_takes_boxed_and_empty_bytes() {
        let boxed: Box<[u8]> = b"boxed".to_vec().into_boxed_slice();
        assert_eq!(drain(&mut SimpleProducer::new(boxed), 2), b"boxed");
        assert_eq!(drain(&mut SimpleProducer::new(Vec::new()), 8), b"");
    }

    #[test]
    fn file_producer_streams_a_file_in_bounded_chunks() {
        let data = pattern(3 * 64 * 1024 + 12_345);
        let file = TempFile::new("file-producer-stream", &data);
        for buf_len in [64 * 1024, 7_000] {
            let mut producer = FileProducer::open(&file.0).unwrap();
            assert_eq!(drain(&mut producer, buf_len), data);
            assert_eq!(producer.more(&mut [0u8; 16]).unwrap(), 0);
        }
    }

    #[test]
    fn file_producer_starts_at_the_current_position() {
        use std::io::{Seek, SeekFrom};
        let file = TempFile::new("file-producer-position", b"headerbody");
        let mut handle = File::open(&file.0).unwrap();
        handle.seek(SeekFrom::Start(6)).unwrap();
        assert_eq!(drain(&mut FileProducer::new(handle), 3), b"body");
    }

    #[test]
    fn file_producer_of_a_missing_file_is_an_error() {
        let path = std::env::temp_dir().join(format!("asyncore-sdk-{}-missing", std::process::id()));
        let error = FileProducer::open(path).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
