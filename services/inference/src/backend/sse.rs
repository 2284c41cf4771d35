//! An incremental parser for server-sent events (the WHATWG `text/event-stream` format), as
//! OpenAI-compatible servers stream chat completions.
//!
//! Bytes are fed as they arrive from the network, in chunks that may split a line, a UTF-8
//! character or a `\r\n` pair anywhere; [`SseParser::feed`] returns the events completed so far.
//! Lines end with `\n`, `\r\n` or `\r`. A line starting with `:` is a comment (servers send them as
//! keep-alives); `data:` lines accumulate (joined by `\n`) until a blank line dispatches the event;
//! `event:` sets its type; `id:` and `retry:` are accepted and ignored. One space after the colon
//! is dropped, as the format says.
//!
//! At the end of the body, [`SseParser::finish`] dispatches an event whose lines were complete but
//! whose terminating blank line never came (some servers close right after `data: [DONE]\n`); an
//! unterminated last line is discarded, since the connection may have been cut in its middle.
//!
//! A line longer than [`MAX_LINE_BYTES`] is an error rather than unbounded buffering.

/// Longest line accepted (1 MiB): far above any chat completion chunk.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The `event:` type; empty when the server set none (the format's default, `message`).
    pub event: String,
    /// The `data:` lines, joined by `\n`.
    pub data: String,
}

/// Why the stream is not valid server-sent events.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    /// A line is not UTF-8.
    #[error("event stream line is not valid UTF-8")]
    InvalidUtf8,
    /// A line is longer than [`MAX_LINE_BYTES`].
    #[error("event stream line longer than {MAX_LINE_BYTES} bytes")]
    LineTooLong,
}

/// The parser's state between chunks.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Bytes of the line being received.
    line: Vec<u8>,
    /// The previous chunk ended with `\r`: a `\n` starting the next one belongs to it.
    after_cr: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next chunk of the body; returns the events it completed, in order.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, SseError> {
        let mut events = Vec::new();
        let mut rest = chunk;
        if self.after_cr {
            self.after_cr = false;
            if let Some(stripped) = rest.strip_prefix(b"\n") {
                rest = stripped;
            }
        }
        while let Some(end) = rest.iter().position(|b| *b == b'\n' || *b == b'\r') {
            self.append(&rest[..end])?;
            let line = std::mem::take(&mut self.line);
            if let Some(event) = self.process_line(&line)? {
                events.push(event);
            }
            let terminator = rest[end];
            rest = &rest[end + 1..];
            if terminator == b'\r' {
                match rest.first() {
                    Some(b'\n') => rest = &rest[1..],
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
        }
        self.append(rest)?;
        Ok(events)
    }

    /// Ends the stream: the pending event, if its lines were complete (see the module doc).
    pub fn finish(&mut self) -> Option<SseEvent> {
        self.line.clear();
        self.take_event()
    }

    fn append(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        if self.line.len() + bytes.len() > MAX_LINE_BYTES {
            return Err(SseError::LineTooLong);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    fn process_line(&mut self, line: &[u8]) -> Result<Option<SseEvent>, SseError> {
        if line.is_empty() {
            return Ok(self.take_event());
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::InvalidUtf8)?;
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => self.event = value.to_string(),
            // id and retry only matter for reconnecting, which a completion never does; unknown
            // fields are ignored, as the format requires.
            _ => {}
        }
        Ok(None)
    }

    fn take_event(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        Some(SseEvent {
            event,
            data: std::mem::take(&mut self.data),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn data(text: &str) -> SseEvent {
        SseEvent {
            event: String::new(),
            data: text.to_string(),
        }
    }

    fn parse_all(chunks: &[&[u8]]) -> Vec<SseEvent> {
        let mut parser = SseParser::new();
        let mut events = Vec::new();
        for chunk in chunks {
            events.extend(parser.feed(chunk).unwrap());
        }
        events.extend(parser.finish());
        events
    }

    #[test]
    fn several_events_in_one_chunk() {
        let events = parse_all(&[b"data: {\"a\":1}\n\ndata: {\"b\":2}\n\ndata: [DONE]\n\n"]);
        assert_eq!(
            events,
            [data("{\"a\":1}"), data("{\"b\":2}"), data("[DONE]")]
        );
    }

    #[test]
    fn events_split_anywhere_across_chunks() {
        let body = "data: {\"text\":\"héllo\"}\r\n\r\n: keep-alive\n\ndata: [DONE]\r\n\r\n";
        let expected = [data("{\"text\":\"héllo\"}"), data("[DONE]")];
        let bytes = body.as_bytes();
        // Every split point, including inside `\r\n` and inside the two-byte `é`.
        for split in 0..=bytes.len() {
            let (a, b) = bytes.split_at(split);
            assert_eq!(parse_all(&[a, b]), expected, "split at {split}");
        }
        // One byte at a time.
        let singles: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(parse_all(&singles), expected);
    }

    #[test]
    fn line_endings_crlf_lf_and_cr() {
        assert_eq!(parse_all(&[b"data: a\r\n\r\n"]), [data("a")]);
        assert_eq!(parse_all(&[b"data: a\n\n"]), [data("a")]);
        assert_eq!(
            parse_all(&[b"data: a\r\rdata: b\r\r"]),
            [data("a"), data("b")]
        );
        // A \r at a chunk's end and \n at the next one's start are one line ending.
        assert_eq!(parse_all(&[b"data: a\r", b"\n\r", b"\n"]), [data("a")]);
    }

    #[test]
    fn comments_fields_and_multi_line_data() {
        let events = parse_all(&[
            b": this is a comment\n",
            b"event: update\nid: 7\nretry: 100\ndata: line one\ndata:line two\ndata\nunknown: x\n\n",
        ]);
        assert_eq!(
            events,
            [SseEvent {
                event: "update".to_string(),
                data: "line one\nline two\n".to_string(),
            }]
        );
    }

    #[test]
    fn blank_lines_without_data_dispatch_nothing() {
        assert_eq!(parse_all(&[b"\n\n: ping\n\nevent: x\n\n"]), []);
        // The event type does not leak into the next event.
        assert_eq!(parse_all(&[b"event: x\n\ndata: y\n\n"]), [data("y")]);
    }

    #[test]
    fn end_of_body_dispatches_complete_lines_only() {
        assert_eq!(parse_all(&[b"data: [DONE]\n"]), [data("[DONE]")]);
        assert_eq!(
            parse_all(&[b"data: {\"a\":1}\n\ndata: {\"tru"]),
            [data("{\"a\":1}")]
        );
    }

    #[test]
    fn invalid_utf8_and_huge_lines_are_errors() {
        let mut parser = SseParser::new();
        assert_eq!(parser.feed(b"data: \xff\xfe\n"), Err(SseError::InvalidUtf8));
        let mut parser = SseParser::new();
        let chunk = vec![b'a'; MAX_LINE_BYTES / 2 + 1];
        assert!(parser.feed(&chunk).is_ok());
        assert_eq!(parser.feed(&chunk), Err(SseError::LineTooLong));
    }
}
