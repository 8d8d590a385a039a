//! Per-channel command assembly: turns the frame sequence
//! `method [header body*]` of one channel into complete commands, in the
//! manner of RabbitMQ's `rabbit_command_assembler`.
//!
//! The session owns one [`Assembler`] per open channel and pushes every
//! method/header/body frame of that channel into it. Heartbeats are not
//! channel traffic: pushing one is ignored (the session validates them).

use bytes::{Bytes, BytesMut};

use super::frame::Frame;
use super::properties::BasicProperties;
use super::spec::{reply_code, Method};

/// Default limit on a message body: 128 MiB (RabbitMQ's default
/// `max_message_size`).
pub const DEFAULT_MAX_BODY_SIZE: u64 = 128 * 1024 * 1024;

/// Initial buffer for a body arriving in several frames. The buffer then
/// grows with the data actually received, so a header merely *declaring* a
/// huge body does not allocate it up front.
const INITIAL_BODY_CAPACITY: u64 = 1024 * 1024;

/// A complete command.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Assembled {
    /// A method without content.
    Method(Method),
    /// A content-bearing method with its properties and whole body.
    Content {
        /// The method (`basic.publish` etc.).
        method: Method,
        /// Properties from the content header (the header frame's box,
        /// which becomes [`crate::command::Message`]'s).
        properties: Box<BasicProperties>,
        /// The body.
        body: Bytes,
    },
}

/// Frame sequence violations. All are connection errors with reply code 505
/// UNEXPECTED_FRAME, except [`AssembleError::BodyTooLarge`] which is a
/// channel error (406 PRECONDITION_FAILED, like RabbitMQ's max message size
/// check). After any error the assembler is back in its idle state.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssembleError {
    /// A content header arrived while no content-bearing method was waiting
    /// for one.
    #[error("unexpected content header for class {class_id}")]
    UnexpectedHeader {
        /// Class id of the header.
        class_id: u16,
    },
    /// A content body frame arrived while no body was expected.
    #[error("unexpected content body frame of {len} bytes")]
    UnexpectedBody {
        /// Length of the body frame payload.
        len: usize,
    },
    /// A method frame arrived while the content of a previous method was
    /// still incomplete.
    #[error("expected content for {pending}, got method {got}")]
    UnexpectedMethod {
        /// The content-bearing method still waiting for its content.
        pending: &'static str,
        /// The method that arrived instead.
        got: &'static str,
    },
    /// The content header's class differs from the method's class.
    #[error("expected content header for class {expected}, got one for class {got}")]
    ClassMismatch {
        /// Class of the pending method.
        expected: u16,
        /// Class of the header.
        got: u16,
    },
    /// Body frames carried more bytes than the header declared.
    #[error("content body of {got} bytes exceeds declared size {expected}")]
    BodyTooLong {
        /// Declared body size.
        expected: u64,
        /// Bytes received so far including the offending frame.
        got: u64,
    },
    /// The header declared a body larger than the configured maximum.
    #[error("message size {size} is larger than configured max size {max}")]
    BodyTooLarge {
        /// Declared body size.
        size: u64,
        /// Configured maximum.
        max: u64,
    },
}

impl AssembleError {
    /// The reply code for the resulting `connection.close` /
    /// `channel.close`.
    pub fn reply_code(&self) -> u16 {
        match self {
            AssembleError::BodyTooLarge { .. } => reply_code::PRECONDITION_FAILED,
            _ => reply_code::UNEXPECTED_FRAME,
        }
    }

    /// True if only the channel must be closed (`BodyTooLarge`); every other
    /// error closes the connection.
    pub fn is_channel_error(&self) -> bool {
        matches!(self, AssembleError::BodyTooLarge { .. })
    }
}

/// Body received so far.
#[derive(Debug)]
enum Body {
    Empty,
    /// A single frame: kept as-is so the common case never copies.
    One(Bytes),
    /// Several frames concatenated.
    Many(BytesMut),
}

// One per channel and mostly in AwaitBody while busy; not worth boxing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
enum State {
    Idle,
    AwaitHeader {
        method: Method,
    },
    AwaitBody {
        method: Method,
        properties: Box<BasicProperties>,
        body_size: u64,
        received: u64,
        body: Body,
    },
}

/// Per-channel frame-to-command state machine; see the module docs.
#[derive(Debug)]
pub struct Assembler {
    state: State,
    max_body_size: u64,
}

impl Default for Assembler {
    fn default() -> Self {
        Assembler::with_max_body(DEFAULT_MAX_BODY_SIZE)
    }
}

impl Assembler {
    /// An assembler with the default body limit ([`DEFAULT_MAX_BODY_SIZE`]).
    pub fn new() -> Self {
        Assembler::default()
    }

    /// An assembler rejecting content headers that declare more than
    /// `max_body_size` bytes.
    pub fn with_max_body(max_body_size: u64) -> Self {
        Assembler {
            state: State::Idle,
            max_body_size,
        }
    }

    /// The configured body limit.
    pub fn max_body_size(&self) -> u64 {
        self.max_body_size
    }

    /// True while a content-bearing method is waiting for its header or
    /// body.
    pub fn in_progress(&self) -> bool {
        !matches!(self.state, State::Idle)
    }

    /// Feeds one frame of this channel. Returns a command once one is
    /// complete, `Ok(None)` while more frames are needed.
    pub fn push(&mut self, frame: Frame) -> Result<Option<Assembled>, AssembleError> {
        // Take the state so every error path leaves the assembler idle.
        let state = std::mem::replace(&mut self.state, State::Idle);
        match (state, frame) {
            (state, Frame::Heartbeat { .. }) => {
                self.state = state;
                Ok(None)
            }

            (State::Idle, Frame::Method { method, .. }) => {
                if method.has_content() {
                    self.state = State::AwaitHeader { method };
                    Ok(None)
                } else {
                    Ok(Some(Assembled::Method(method)))
                }
            }

            (
                State::AwaitHeader { method },
                Frame::Header {
                    class_id,
                    body_size,
                    properties,
                    ..
                },
            ) => {
                if class_id != method.class_id() {
                    return Err(AssembleError::ClassMismatch {
                        expected: method.class_id(),
                        got: class_id,
                    });
                }
                if body_size > self.max_body_size {
                    return Err(AssembleError::BodyTooLarge {
                        size: body_size,
                        max: self.max_body_size,
                    });
                }
                if body_size == 0 {
                    return Ok(Some(Assembled::Content {
                        method,
                        properties,
                        body: Bytes::new(),
                    }));
                }
                self.state = State::AwaitBody {
                    method,
                    properties,
                    body_size,
                    received: 0,
                    body: Body::Empty,
                };
                Ok(None)
            }

            (
                State::AwaitBody {
                    method,
                    properties,
                    body_size,
                    received,
                    body,
                },
                Frame::Body { payload, .. },
            ) => {
                let received = received.saturating_add(payload.len() as u64);
                if received > body_size {
                    return Err(AssembleError::BodyTooLong {
                        expected: body_size,
                        got: received,
                    });
                }
                let body = append(body, payload, body_size);
                if received == body_size {
                    let body = match body {
                        Body::Empty => Bytes::new(),
                        Body::One(b) => b,
                        Body::Many(b) => b.freeze(),
                    };
                    return Ok(Some(Assembled::Content {
                        method,
                        properties,
                        body,
                    }));
                }
                self.state = State::AwaitBody {
                    method,
                    properties,
                    body_size,
                    received,
                    body,
                };
                Ok(None)
            }

            (
                State::AwaitHeader { method } | State::AwaitBody { method, .. },
                Frame::Method { method: got, .. },
            ) => Err(AssembleError::UnexpectedMethod {
                pending: method.name(),
                got: got.name(),
            }),
            (State::Idle | State::AwaitBody { .. }, Frame::Header { class_id, .. }) => {
                Err(AssembleError::UnexpectedHeader { class_id })
            }
            (State::Idle | State::AwaitHeader { .. }, Frame::Body { payload, .. }) => {
                Err(AssembleError::UnexpectedBody { len: payload.len() })
            }
        }
    }
}

/// Appends a body frame, copying only once a second non-empty frame shows up.
fn append(body: Body, payload: Bytes, body_size: u64) -> Body {
    if payload.is_empty() {
        return body;
    }
    match body {
        Body::Empty => Body::One(payload),
        Body::One(first) => {
            let capacity = body_size.min(INITIAL_BODY_CAPACITY);
            let mut buf = BytesMut::with_capacity(usize::try_from(capacity).unwrap_or(0));
            buf.extend_from_slice(&first);
            buf.extend_from_slice(&payload);
            Body::Many(buf)
        }
        Body::Many(mut buf) => {
            buf.extend_from_slice(&payload);
            Body::Many(buf)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests {
    use super::*;
    use crate::amqp::spec::{class, BasicAck, BasicPublish};

    fn publish() -> Frame {
        Frame::Method {
            channel: 1,
            method: Method::BasicPublish(BasicPublish {
                routing_key: "q".into(),
                ..Default::default()
            }),
        }
    }

    fn header(body_size: u64) -> Frame {
        Frame::Header {
            channel: 1,
            class_id: class::BASIC,
            body_size,
            properties: Box::default(),
        }
    }

    fn body(b: &'static [u8]) -> Frame {
        Frame::Body {
            channel: 1,
            payload: Bytes::from_static(b),
        }
    }

    fn ack() -> Frame {
        Frame::Method {
            channel: 1,
            method: Method::BasicAck(BasicAck::default()),
        }
    }

    #[test]
    fn plain_method() {
        let mut a = Assembler::default();
        assert!(matches!(
            a.push(ack()),
            Ok(Some(Assembled::Method(Method::BasicAck(_))))
        ));
        assert!(!a.in_progress());
    }

    #[test]
    fn content_in_several_frames() {
        let mut a = Assembler::default();
        assert_eq!(a.push(publish()), Ok(None));
        assert!(a.in_progress());
        assert_eq!(a.push(header(5)), Ok(None));
        assert_eq!(a.push(body(b"he")), Ok(None));
        assert_eq!(a.push(body(b"")), Ok(None));
        match a.push(body(b"llo")) {
            Ok(Some(Assembled::Content { body, .. })) => assert_eq!(&body[..], b"hello"),
            other => panic!("unexpected {other:?}"),
        }
        assert!(!a.in_progress());
    }

    #[test]
    fn single_body_frame_is_not_copied() {
        let payload = Bytes::from(vec![7u8; 100]);
        let ptr = payload.as_ptr();
        let mut a = Assembler::default();
        a.push(publish()).unwrap();
        a.push(header(100)).unwrap();
        match a.push(Frame::Body {
            channel: 1,
            payload,
        }) {
            Ok(Some(Assembled::Content { body, .. })) => assert_eq!(body.as_ptr(), ptr),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn empty_body_completes_at_header() {
        let mut a = Assembler::default();
        a.push(publish()).unwrap();
        match a.push(header(0)) {
            Ok(Some(Assembled::Content { body, .. })) => assert!(body.is_empty()),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn sequence_errors() {
        let mut a = Assembler::default();
        let e = a.push(header(1)).unwrap_err();
        assert_eq!(e, AssembleError::UnexpectedHeader { class_id: 60 });
        assert_eq!(e.reply_code(), 505);
        assert!(!e.is_channel_error());

        assert_eq!(
            a.push(body(b"x")),
            Err(AssembleError::UnexpectedBody { len: 1 })
        );

        a.push(publish()).unwrap();
        assert_eq!(
            a.push(body(b"x")),
            Err(AssembleError::UnexpectedBody { len: 1 })
        );
        assert!(!a.in_progress(), "errors reset the state");

        a.push(publish()).unwrap();
        assert_eq!(
            a.push(ack()),
            Err(AssembleError::UnexpectedMethod {
                pending: "basic.publish",
                got: "basic.ack"
            })
        );

        a.push(publish()).unwrap();
        a.push(header(3)).unwrap();
        a.push(body(b"ab")).unwrap();
        assert_eq!(
            a.push(header(3)),
            Err(AssembleError::UnexpectedHeader { class_id: 60 })
        );

        a.push(publish()).unwrap();
        a.push(header(3)).unwrap();
        a.push(body(b"ab")).unwrap();
        assert_eq!(
            a.push(body(b"cd")),
            Err(AssembleError::BodyTooLong {
                expected: 3,
                got: 4
            })
        );

        a.push(publish()).unwrap();
        let wrong_class = Frame::Header {
            channel: 1,
            class_id: 61,
            body_size: 1,
            properties: Box::default(),
        };
        assert_eq!(
            a.push(wrong_class),
            Err(AssembleError::ClassMismatch {
                expected: 60,
                got: 61
            })
        );
    }

    #[test]
    fn body_too_large_is_a_channel_error() {
        let mut a = Assembler::with_max_body(10);
        a.push(publish()).unwrap();
        let e = a.push(header(11)).unwrap_err();
        assert_eq!(e, AssembleError::BodyTooLarge { size: 11, max: 10 });
        assert_eq!(e.reply_code(), 406);
        assert!(e.is_channel_error());
        assert!(!a.in_progress());
        // Exactly the limit is fine.
        a.push(publish()).unwrap();
        assert_eq!(a.push(header(10)), Ok(None));
    }

    #[test]
    fn heartbeat_is_ignored_mid_content() {
        let mut a = Assembler::default();
        a.push(publish()).unwrap();
        assert_eq!(a.push(Frame::Heartbeat { channel: 0 }), Ok(None));
        assert!(a.in_progress());
        assert_eq!(a.push(header(1)), Ok(None));
    }
}
