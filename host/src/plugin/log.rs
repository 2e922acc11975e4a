//! The step log: `host.log` lines and the guest's stdout and stderr, split
//! into lines, bounded by the step's `max_log`, masked by its secrets'
//! redactor, and sent live to whoever follows the attempt ([`StepEvents`]).
//! Used by the sandbox (host imports, WASI output) and by outbound HTTP (its
//! denials are logged).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

use crate::record::{LogLevel, LogLine, LogStream, Progress};
use crate::secrets::Redactor;

/// A config key or log message longer than this is cut.
pub(super) const MAX_LINE: usize = 64 * 1024;
/// Bytes a guest may write to stdout/stderr past its log limit before the
/// attempt is stopped: each write is host work that fuel does not count.
const FLOOD_FACTOR: u64 = 64;
const MIN_FLOOD: u64 = 64 * 1024 * 1024;
/// How much of stderr is kept aside to find a panic message, even when the log
/// itself is full.
const STDERR_TAIL: usize = 8 * 1024;

/// Live notifications from a running attempt (progress bars, event streams).
pub trait StepEvents: Send + Sync {
    fn log(&self, _line: &LogLine) {}
    fn progress(&self, _progress: &Progress) {}
}

/// The step log: `host.log` lines and the guest's stdout/stderr split into
/// lines, bounded by `limits.max_log`. Shared by the store and its streams.
#[derive(Clone)]
pub(super) struct LogSink {
    inner: Arc<Mutex<LogBuf>>,
}

struct LogBuf {
    started: Instant,
    lines: Vec<LogLine>,
    bytes: u64,
    max: u64,
    dropped: u64,
    /// Set when the guest wrote past the flood bound: the stream it wrote to.
    flooded: Option<LogStream>,
    stdout_partial: Vec<u8>,
    stderr_partial: Vec<u8>,
    stderr_tail: Vec<u8>,
    events: Option<Arc<dyn StepEvents>>,
    redactor: Option<Arc<Redactor>>,
}

impl LogSink {
    pub(super) fn new(
        max: u64,
        events: Option<Arc<dyn StepEvents>>,
        redactor: Option<Arc<Redactor>>,
    ) -> LogSink {
        LogSink {
            inner: Arc::new(Mutex::new(LogBuf {
                started: Instant::now(),
                lines: Vec::new(),
                bytes: 0,
                max,
                dropped: 0,
                flooded: None,
                stdout_partial: Vec::new(),
                stderr_partial: Vec::new(),
                stderr_tail: Vec::new(),
                events,
                redactor,
            })),
        }
    }

    pub(super) fn line(&self, stream: LogStream, level: LogLevel, message: String) {
        self.inner.lock().unwrap().push(stream, level, message);
    }

    /// Appends guest output; `false` once the guest has flooded.
    pub(super) fn write(&self, stream: LogStream, bytes: &[u8]) -> bool {
        let mut buf = self.inner.lock().unwrap();
        if buf.dropped > (buf.max * FLOOD_FACTOR).max(MIN_FLOOD) {
            buf.flooded.get_or_insert(stream);
            return false;
        }
        if stream == LogStream::Stderr {
            buf.stderr_tail.extend_from_slice(bytes);
            let excess = buf.stderr_tail.len().saturating_sub(STDERR_TAIL);
            buf.stderr_tail.drain(..excess);
        }
        let level = if stream == LogStream::Stderr {
            LogLevel::Warn
        } else {
            LogLevel::Info
        };
        let mut rest = bytes;
        while let Some(newline) = rest.iter().position(|&b| b == b'\n') {
            let mut line = std::mem::take(buf.partial(stream));
            line.extend_from_slice(&rest[..newline]);
            buf.push(stream, level, String::from_utf8_lossy(&line).into_owned());
            rest = &rest[newline + 1..];
        }
        if buf.bytes >= buf.max {
            // Nothing more will be kept: count, don't buffer.
            buf.dropped += rest.len() as u64;
            return true;
        }
        buf.partial(stream).extend_from_slice(rest);
        if buf.partial(stream).len() >= MAX_LINE {
            let line = std::mem::take(buf.partial(stream));
            buf.push(stream, level, String::from_utf8_lossy(&line).into_owned());
        }
        true
    }

    pub(super) fn flooded(&self) -> Option<(LogStream, u64)> {
        let buf = self.inner.lock().unwrap();
        buf.flooded.map(|stream| (stream, buf.max))
    }

    /// `panicked at FILE:LINE:COL: MESSAGE`, from what the guest wrote to stderr.
    pub(super) fn panic_message(&self) -> Option<String> {
        let buf = self.inner.lock().unwrap();
        let text = String::from_utf8_lossy(&buf.stderr_tail);
        let at = text.rfind("panicked at ")?;
        let rest = &text[at..];
        let end = rest.find("\nnote:").unwrap_or(rest.len());
        let message = rest[..end].trim().replace(":\n", ": ").replace('\n', " ");
        Some(message)
    }

    pub(super) fn finish(&self) -> (Vec<LogLine>, u64) {
        let mut buf = self.inner.lock().unwrap();
        for stream in [LogStream::Stdout, LogStream::Stderr] {
            let line = std::mem::take(buf.partial(stream));
            if !line.is_empty() {
                let level = if stream == LogStream::Stderr {
                    LogLevel::Warn
                } else {
                    LogLevel::Info
                };
                buf.push(stream, level, String::from_utf8_lossy(&line).into_owned());
            }
        }
        if buf.dropped > 0 {
            let note = format!(
                "log truncated: {} dropped past limits.max_log",
                bytesize::ByteSize(buf.dropped)
            );
            let at_ms = buf.started.elapsed().as_secs_f64() * 1000.0;
            buf.lines.push(LogLine {
                at_ms,
                stream: LogStream::Host,
                level: LogLevel::Warn,
                message: note,
            });
        }
        (std::mem::take(&mut buf.lines), buf.dropped)
    }
}

impl LogBuf {
    fn partial(&mut self, stream: LogStream) -> &mut Vec<u8> {
        match stream {
            LogStream::Stderr => &mut self.stderr_partial,
            _ => &mut self.stdout_partial,
        }
    }

    fn push(&mut self, stream: LogStream, level: LogLevel, mut message: String) {
        if let Some(redactor) = &self.redactor {
            redactor.string(&mut message);
        }
        let len = message.len() as u64;
        if self.bytes + len > self.max {
            self.dropped += len;
            return;
        }
        message.truncate(message.floor_char_boundary(MAX_LINE));
        self.bytes += len;
        let line = LogLine {
            at_ms: self.started.elapsed().as_secs_f64() * 1000.0,
            stream,
            level,
            message,
        };
        if let Some(events) = &self.events {
            events.log(&line);
        }
        self.lines.push(line);
    }
}

/// The guest's stdout or stderr: every byte is accepted, what fits in the log
/// is kept, the rest is counted. A flood cannot grow host memory.
#[derive(Clone)]
pub(super) struct GuestOutput {
    sink: LogSink,
    stream: LogStream,
}

impl GuestOutput {
    pub(super) fn new(sink: LogSink, stream: LogStream) -> GuestOutput {
        GuestOutput { sink, stream }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        if self.sink.write(self.stream, &bytes) {
            Ok(())
        } else {
            Err(StreamError::Trap(wasmtime::Error::msg("log flood")))
        }
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.sink.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(lines: &[LogLine]) -> Vec<(LogStream, &str)> {
        lines
            .iter()
            .map(|l| (l.stream, l.message.as_str()))
            .collect()
    }

    #[test]
    fn guest_output_is_split_into_lines_across_writes() {
        let sink = LogSink::new(1024, None, None);
        sink.write(LogStream::Stdout, b"hel");
        sink.write(LogStream::Stdout, b"lo\nwor");
        sink.write(LogStream::Stderr, b"oops\n");
        sink.line(LogStream::Log, LogLevel::Info, "from host.log".into());
        sink.write(LogStream::Stdout, b"ld");
        let (lines, dropped) = sink.finish();
        assert_eq!(dropped, 0);
        assert_eq!(
            messages(&lines),
            vec![
                (LogStream::Stdout, "hello"),
                (LogStream::Stderr, "oops"),
                (LogStream::Log, "from host.log"),
                (LogStream::Stdout, "world"),
            ]
        );
        assert_eq!(lines[1].level, LogLevel::Warn);
    }

    #[test]
    fn the_log_keeps_what_fits_and_counts_the_rest() {
        let sink = LogSink::new(10, None, None);
        sink.write(LogStream::Stdout, b"12345\n67890\nabcdef\n");
        let (lines, dropped) = sink.finish();
        assert_eq!(dropped, 6);
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[2].stream, LogStream::Host);
        assert!(
            lines[2].message.starts_with("log truncated: 6 B dropped"),
            "{}",
            lines[2].message
        );
    }

    #[test]
    fn a_flood_far_past_the_limit_is_refused() {
        let sink = LogSink::new(10, None, None);
        let chunk = vec![b'x'; 1024 * 1024];
        let mut accepted = 0;
        while sink.write(LogStream::Stderr, &chunk) {
            accepted += 1;
            assert!(accepted < 1000, "never refused");
        }
        assert_eq!(sink.flooded(), Some((LogStream::Stderr, 10)));
    }

    #[test]
    fn the_panic_message_is_found_on_stderr() {
        let sink = LogSink::new(1024, None, None);
        sink.write(
            LogStream::Stderr,
            b"\nthread '<unnamed>' panicked at src/lib.rs:10:5:\nit broke\nnote: run with `RUST_BACKTRACE=1`\n",
        );
        assert_eq!(
            sink.panic_message().as_deref(),
            Some("panicked at src/lib.rs:10:5: it broke")
        );
        assert_eq!(LogSink::new(10, None, None).panic_message(), None);
    }
}
