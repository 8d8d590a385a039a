//! The streaming STOMP decoder.
//!
//! Bytes are taken in two steps:
//!
//! 1. A scan for the end of the *head* (command line, header lines and the
//!    blank line). The scan remembers how far it got, so a head that
//!    arrives in many small reads is scanned once, not once per read, and
//!    the line-length and frame-size limits are enforced on partial input,
//!    before anything oversized is buffered.
//! 2. Once the head is complete it is parsed with nom (complete parsers:
//!    all its bytes are there), the escapes of the negotiated version are
//!    undone and `content-length` is checked against the frame limit. The
//!    body is then awaited: exactly `content-length` octets and a NUL, or
//!    everything up to the first NUL (again scanned only once).
//!
//! The decoder is therefore stateful: use one [`Decoder`] per byte stream,
//! and only ever append to the buffer it is given.

use std::collections::HashSet;

use bytes::{Buf, BytesMut};
use nom::bytes::complete::{tag, take_till};
use nom::combinator::rest;
use nom::multi::many0;
use nom::sequence::terminated;
use nom::{IResult, Parser};

use super::error::{excerpt, DecodeError};
use super::escape::{unescape, Escaping};
use super::frame::{header, Command, Frame, Version};

/// Limits on what one frame may hold. The session sends an ERROR frame and
/// closes when one is exceeded (spec 1.2 "Size Limits").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame, from the first octet of the command to the NUL.
    /// Default 4 MiB, RabbitMQ's `stomp.max_frame_size` default.
    pub max_frame_size: usize,
    /// Most distinct headers in one frame (repeated names do not count).
    /// Default 1000: far above what real clients send. (Not checked against
    /// RabbitMQ's source, whose stored copies bound only the whole frame.)
    pub max_headers: usize,
    /// Longest command or header line, escapes included, line end
    /// excluded. Default 100 KiB (same caveat as `max_headers`).
    pub max_header_line_length: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_size: 4 * 1024 * 1024,
            max_headers: 1000,
            max_header_line_length: 100 * 1024,
        }
    }
}

/// What the decoder took off the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A complete frame.
    Frame(Frame),
    /// One EOL (`\n` or `\r\n`) between frames: a heart-beat, or the
    /// optional EOLs after a frame's NUL. Surfaced so the session can
    /// count it; any data received proves the peer alive.
    Heartbeat,
}

/// The decoder's progress on the frame at the front of the buffer.
#[derive(Debug, Default)]
enum State {
    /// Between frames.
    #[default]
    Idle,
    /// Scanning for the end of the head.
    Head {
        /// Bytes scanned so far (no LF before this that is not accounted for).
        scanned: usize,
        /// Where the current (incomplete) line starts.
        line_start: usize,
        /// Complete lines seen (the command line included).
        lines: usize,
    },
    /// Head parsed, waiting for the body.
    Body {
        /// The command and headers.
        head: Head,
        /// Offset of the body's first octet.
        body_start: usize,
        /// Bytes searched for the NUL so far (no `content-length`).
        scanned: usize,
    },
}

/// A parsed head.
#[derive(Debug)]
struct Head {
    command: Command,
    headers: Vec<(String, String)>,
    /// `content-length`, or `None` when the body ends at the first NUL.
    content_length: Option<usize>,
}

/// Where the head ended.
struct HeadEnd {
    /// Length of the command and header lines (the blank line excluded).
    lines_len: usize,
    /// Offset of the body's first octet.
    body_start: usize,
    /// True when the frame ended with a NUL where the blank line belonged
    /// (no body at all).
    nul_terminated: bool,
}

/// Decodes a STOMP byte stream into frames and heart-beats.
///
/// Returns `Ok(None)` while the next item is incomplete (nothing is
/// consumed, except NUL octets between frames, which are skipped), and
/// `Err` when the stream cannot be a STOMP stream any more (the session
/// answers with an ERROR frame and closes).
#[derive(Debug, Default)]
pub struct Decoder {
    /// Header escaping rules in force. Set it to the negotiated version
    /// right after decoding CONNECT/STOMP, before decoding the next frame;
    /// until then 1.0 (CONNECT and STOMP are never escaped anyway).
    pub version: Version,
    /// Frame limits.
    pub limits: Limits,
    state: State,
}

impl Decoder {
    /// A decoder for `version` with `limits`.
    pub fn new(version: Version, limits: Limits) -> Decoder {
        Decoder {
            version,
            limits,
            state: State::Idle,
        }
    }

    /// Takes the next frame or heart-beat off the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, DecodeError> {
        let result = self.step(buf);
        if result.is_err() {
            self.state = State::Idle;
        }
        result
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<Item>, DecodeError> {
        loop {
            match std::mem::take(&mut self.state) {
                State::Idle => {
                    // RabbitMQ skips NUL octets between frames; so do we.
                    let nuls = buf.iter().take_while(|&&b| b == 0).count();
                    buf.advance(nuls);
                    match (buf.first(), buf.get(1)) {
                        (None, _) | (Some(b'\r'), None) => return Ok(None),
                        (Some(b'\n'), _) => {
                            buf.advance(1);
                            return Ok(Some(Item::Heartbeat));
                        }
                        (Some(b'\r'), Some(b'\n')) => {
                            buf.advance(2);
                            return Ok(Some(Item::Heartbeat));
                        }
                        (Some(b'\r'), Some(_)) => {
                            return Err(DecodeError::BareCarriageReturn {
                                context: "between frames",
                            })
                        }
                        (Some(_), _) => {
                            self.state = State::Head {
                                scanned: 0,
                                line_start: 0,
                                lines: 0,
                            };
                        }
                    }
                }
                State::Head {
                    scanned,
                    line_start,
                    lines,
                } => {
                    let Some(end) = self.scan_head(buf, scanned, line_start, lines)? else {
                        return Ok(None);
                    };
                    let lines_bytes = buf.get(..end.lines_len).unwrap_or_default();
                    let mut head = parse_head(lines_bytes, self.version, &self.limits)?;
                    if end.nul_terminated {
                        // No blank line, so no body, whatever content-length says.
                        head.content_length = None;
                    } else if let Some(len) = head.content_length {
                        let size = end.body_start.saturating_add(len).saturating_add(1);
                        if size > self.limits.max_frame_size {
                            return Err(DecodeError::FrameTooLarge {
                                size,
                                max: self.limits.max_frame_size,
                            });
                        }
                    }
                    self.state = State::Body {
                        head,
                        body_start: end.body_start,
                        scanned: end.body_start,
                    };
                }
                State::Body {
                    head,
                    body_start,
                    scanned,
                } => {
                    let body_end = match head.content_length {
                        Some(len) => {
                            let body_end = body_start + len;
                            let Some(&found) = buf.get(body_end) else {
                                buf.reserve(body_end + 1 - buf.len());
                                self.state = State::Body {
                                    head,
                                    body_start,
                                    scanned,
                                };
                                return Ok(None);
                            };
                            if found != 0 {
                                return Err(DecodeError::MissingNul {
                                    content_length: len,
                                    found,
                                });
                            }
                            body_end
                        }
                        None => {
                            let tail = buf.get(scanned..).unwrap_or_default();
                            match tail.iter().position(|&b| b == 0) {
                                Some(at) => scanned + at,
                                None => {
                                    if buf.len() >= self.limits.max_frame_size {
                                        return Err(DecodeError::FrameTooLarge {
                                            size: buf.len() + 1,
                                            max: self.limits.max_frame_size,
                                        });
                                    }
                                    let scanned = buf.len();
                                    self.state = State::Body {
                                        head,
                                        body_start,
                                        scanned,
                                    };
                                    return Ok(None);
                                }
                            }
                        }
                    };
                    if body_end + 1 > self.limits.max_frame_size {
                        return Err(DecodeError::FrameTooLarge {
                            size: body_end + 1,
                            max: self.limits.max_frame_size,
                        });
                    }
                    let bytes = buf.split_to(body_end + 1).freeze();
                    let body = bytes.slice(body_start..body_end);
                    let frame = Frame {
                        command: head.command,
                        headers: head.headers,
                        body,
                    };
                    return Ok(Some(Item::Frame(frame)));
                }
            }
        }
    }

    /// Looks for the end of the head, from where the last call stopped.
    /// Saves its progress in `self.state` and returns `None` when the head
    /// is incomplete.
    fn scan_head(
        &mut self,
        buf: &mut BytesMut,
        mut pos: usize,
        mut line_start: usize,
        mut lines: usize,
    ) -> Result<Option<HeadEnd>, DecodeError> {
        let max_line = self.limits.max_header_line_length;
        let max_frame = self.limits.max_frame_size;
        loop {
            // Leniency: the spec's own DISCONNECT and RECEIPT examples end
            // with a NUL right after the last header, without the blank line.
            if lines > 0 && pos == line_start && buf.get(pos) == Some(&0) {
                return Ok(Some(HeadEnd {
                    lines_len: pos,
                    body_start: pos,
                    nul_terminated: true,
                }));
            }
            let tail = buf.get(pos..).unwrap_or_default();
            let Some(at) = tail.iter().position(|&b| b == b'\n') else {
                // +1: the line may end in the CR of a CR LF not yet complete.
                let length = buf.len() - line_start;
                if length > max_line + 1 {
                    return Err(DecodeError::HeaderLineTooLong {
                        length,
                        max: max_line,
                    });
                }
                if buf.len() >= max_frame {
                    return Err(DecodeError::FrameTooLarge {
                        size: buf.len() + 1,
                        max: max_frame,
                    });
                }
                self.state = State::Head {
                    scanned: buf.len(),
                    line_start,
                    lines,
                };
                buf.reserve(1);
                return Ok(None);
            };
            let lf = pos + at;
            let cr = lf > line_start && buf.get(lf - 1) == Some(&b'\r');
            let length = lf - line_start - usize::from(cr);
            if length > max_line {
                return Err(DecodeError::HeaderLineTooLong {
                    length,
                    max: max_line,
                });
            }
            if lf + 1 >= max_frame {
                return Err(DecodeError::FrameTooLarge {
                    size: lf + 2,
                    max: max_frame,
                });
            }
            if length == 0 && lines > 0 {
                return Ok(Some(HeadEnd {
                    lines_len: line_start,
                    body_start: lf + 1,
                    nul_terminated: false,
                }));
            }
            lines += 1;
            line_start = lf + 1;
            pos = lf + 1;
        }
    }
}

/// Decodes one item from `buf` with a fresh decoder: for tests and one-off
/// use. A session keeps one [`Decoder`] instead, so that partial frames are
/// not rescanned on every read.
pub fn decode(
    buf: &mut BytesMut,
    version: Version,
    limits: &Limits,
) -> Result<Option<Item>, DecodeError> {
    Decoder::new(version, *limits).decode(buf)
}

/// One line up to and including its LF; returns it without the LF.
fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    terminated(take_till(|b| b == b'\n'), tag(&b"\n"[..])).parse(input)
}

/// A command line and its header lines.
type Lines<'a> = (&'a [u8], Vec<&'a [u8]>);

/// The command line and the header lines, each LF-terminated.
fn lines(input: &[u8]) -> IResult<&[u8], Lines<'_>> {
    (line, many0(line)).parse(input)
}

/// `name:value`, split at the first colon (later colons belong to the value,
/// as RabbitMQ accepts).
fn header_line(input: &[u8]) -> IResult<&[u8], (&[u8], &[u8])> {
    (terminated(take_till(|b| b == b':'), tag(&b":"[..])), rest).parse(input)
}

/// A line without its optional CR, rejecting any other CR and any NUL.
fn clean_line<'a>(raw: &'a [u8], context: &'static str) -> Result<&'a [u8], DecodeError> {
    let line = raw.strip_suffix(b"\r").unwrap_or(raw);
    if line.contains(&b'\r') {
        return Err(DecodeError::BareCarriageReturn { context });
    }
    if line.contains(&0) {
        return Err(DecodeError::NulInHeaders { context });
    }
    Ok(line)
}

/// Header names seen so far, for dropping repeats. A linear scan for the
/// usual handful of headers, a hash set beyond, so a frame full of
/// repeated headers costs linear time.
#[derive(Default)]
struct Seen {
    set: Option<HashSet<String>>,
}

impl Seen {
    const LINEAR: usize = 16;

    /// Whether `name` is in `headers`, which holds every name seen so far.
    fn contains(&mut self, headers: &[(String, String)], name: &str) -> bool {
        if headers.len() <= Self::LINEAR {
            return headers.iter().any(|(k, _)| k == name);
        }
        let set = self
            .set
            .get_or_insert_with(|| headers.iter().map(|(k, _)| k.clone()).collect());
        set.contains(name)
    }

    fn insert(&mut self, name: &str) {
        if let Some(set) = &mut self.set {
            set.insert(name.to_owned());
        }
    }
}

/// Parses a complete head (command and header lines, no blank line).
fn parse_head(input: &[u8], version: Version, limits: &Limits) -> Result<Head, DecodeError> {
    let (leftover, (command_line, header_lines)) =
        lines(input).map_err(|_| DecodeError::UnknownCommand {
            command: excerpt(input),
        })?;
    debug_assert!(leftover.is_empty(), "the scanner ends heads after an LF");

    let command_line = clean_line(command_line, "command")?;
    let command = Command::from_bytes(command_line).ok_or_else(|| DecodeError::UnknownCommand {
        command: excerpt(command_line),
    })?;
    let escaping = Escaping::for_frame(command, version);

    let mut headers: Vec<(String, String)> = Vec::new();
    let mut seen = Seen::default();
    for raw in header_lines {
        let line = clean_line(raw, "header")?;
        let (_, (raw_name, raw_value)) =
            header_line(line).map_err(|_: nom::Err<nom::error::Error<&[u8]>>| {
                DecodeError::MissingColon {
                    line: excerpt(line),
                }
            })?;
        let name = text(raw_name, raw_name, escaping, version)?;
        if seen.contains(&headers, &name) {
            continue; // The first value wins (spec 1.2 "Repeated Header Entries").
        }
        if headers.len() == limits.max_headers {
            return Err(DecodeError::TooManyHeaders {
                max: limits.max_headers,
            });
        }
        let value = text(raw_value, raw_name, escaping, version)?;
        seen.insert(&name);
        headers.push((name, value));
    }

    let content_length = headers
        .iter()
        .find(|(k, _)| k == header::CONTENT_LENGTH)
        .map(|(_, v)| parse_content_length(v))
        .transpose()?;
    Ok(Head {
        command,
        headers,
        content_length,
    })
}

/// Unescapes a header name or value and checks it is UTF-8.
fn text(
    raw: &[u8],
    name: &[u8],
    escaping: Escaping,
    version: Version,
) -> Result<String, DecodeError> {
    let bytes = unescape(raw, escaping).map_err(|e| DecodeError::BadEscape {
        sequence: e.sequence(),
        header: excerpt(name),
        version,
    })?;
    String::from_utf8(bytes).map_err(|_| DecodeError::InvalidUtf8 {
        header: excerpt(name),
    })
}

/// A `content-length` value: decimal digits, surrounding blanks tolerated
/// (RabbitMQ strips them).
fn parse_content_length(value: &str) -> Result<usize, DecodeError> {
    let digits = value.trim_matches(|c| c == ' ' || c == '\t');
    let bad = || DecodeError::BadContentLength {
        value: excerpt(value.as_bytes()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    digits.parse().map_err(|_| bad())
}
