//! The STOMP frame: a command, headers in the order received, and a body.

use std::fmt;
use std::str::FromStr;

use bytes::Bytes;

/// Header names with a meaning to the protocol (STOMP 1.2 "Frames and
/// Headers"), plus the RabbitMQ extensions the session will read.
pub mod header {
    /// CONNECT/STOMP: versions the client accepts, e.g. `1.0,1.1,1.2`.
    pub const ACCEPT_VERSION: &str = "accept-version";
    /// SUBSCRIBE: `auto`, `client` or `client-individual`; MESSAGE (1.2):
    /// the id to put in ACK/NACK.
    pub const ACK: &str = "ack";
    /// Octet count of the body.
    pub const CONTENT_LENGTH: &str = "content-length";
    /// MIME type of the body.
    pub const CONTENT_TYPE: &str = "content-type";
    /// SEND, SUBSCRIBE, MESSAGE: where to.
    pub const DESTINATION: &str = "destination";
    /// CONNECT/CONNECTED: `<outgoing ms>,<incoming ms>`.
    pub const HEART_BEAT: &str = "heart-beat";
    /// CONNECT/STOMP: the virtual host.
    pub const HOST: &str = "host";
    /// SUBSCRIBE/UNSUBSCRIBE: subscription id; ACK/NACK (1.2): ack id.
    pub const ID: &str = "id";
    /// CONNECT/STOMP: user name.
    pub const LOGIN: &str = "login";
    /// ERROR: short description.
    pub const MESSAGE: &str = "message";
    /// MESSAGE: message id; ACK/NACK (1.0, 1.1): which message.
    pub const MESSAGE_ID: &str = "message-id";
    /// CONNECT/STOMP: password.
    pub const PASSCODE: &str = "passcode";
    /// Any client frame but CONNECT: asks for a RECEIPT.
    pub const RECEIPT: &str = "receipt";
    /// RECEIPT, ERROR: the `receipt` value answered.
    pub const RECEIPT_ID: &str = "receipt-id";
    /// CONNECTED: server name and version.
    pub const SERVER: &str = "server";
    /// CONNECTED: session id.
    pub const SESSION: &str = "session";
    /// MESSAGE, ACK/NACK (1.1): the subscription id.
    pub const SUBSCRIPTION: &str = "subscription";
    /// SEND, ACK, NACK, BEGIN, COMMIT, ABORT: transaction id.
    pub const TRANSACTION: &str = "transaction";
    /// CONNECTED: the negotiated version.
    pub const VERSION: &str = "version";
    /// MESSAGE (RabbitMQ): whether the message was delivered before.
    pub const REDELIVERED: &str = "redelivered";
    /// SUBSCRIBE (RabbitMQ): consumer prefetch.
    pub const PREFETCH_COUNT: &str = "prefetch-count";
    /// NACK (RabbitMQ): whether to requeue, default true.
    pub const REQUEUE: &str = "requeue";
    /// SEND (RabbitMQ): delivery mode 2 when true.
    pub const PERSISTENT: &str = "persistent";
    /// SUBSCRIBE (RabbitMQ): durable topic subscription.
    pub const DURABLE: &str = "durable";
    /// SUBSCRIBE (RabbitMQ): auto-delete the subscription queue.
    pub const AUTO_DELETE: &str = "auto-delete";
    /// SEND/MESSAGE: AMQP reply-to.
    pub const REPLY_TO: &str = "reply-to";
}

/// A STOMP protocol version. The decoder and encoder need it to know the
/// header escaping rules; the session sets it once CONNECT is negotiated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Version {
    /// STOMP 1.0: no header escaping. The version used before negotiation
    /// (and the one a CONNECT without `accept-version` asks for).
    #[default]
    V1_0,
    /// STOMP 1.1: escapes `\n`, `\c`, `\\`.
    V1_1,
    /// STOMP 1.2: escapes `\r`, `\n`, `\c`, `\\`.
    V1_2,
}

impl Version {
    /// Every version, oldest first.
    pub const ALL: [Version; 3] = [Version::V1_0, Version::V1_1, Version::V1_2];

    /// The version as written in `accept-version` and `version` headers.
    pub fn as_str(self) -> &'static str {
        match self {
            Version::V1_0 => "1.0",
            Version::V1_1 => "1.1",
            Version::V1_2 => "1.2",
        }
    }

    /// Whether header names and values are backslash-escaped in this
    /// version (for frames other than CONNECT, STOMP and CONNECTED).
    pub fn escapes_headers(self) -> bool {
        self >= Version::V1_1
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Version {
    type Err = ();

    /// Parses `1.0`, `1.1` or `1.2`.
    fn from_str(s: &str) -> Result<Self, ()> {
        match s {
            "1.0" => Ok(Version::V1_0),
            "1.1" => Ok(Version::V1_1),
            "1.2" => Ok(Version::V1_2),
            _ => Err(()),
        }
    }
}

/// Defines [`Command`] with its wire names in one place.
macro_rules! commands {
    ($( $(#[$doc:meta])* $variant:ident = $wire:literal, client: $client:literal; )*) => {
        /// The command of a frame: the 11 client and 4 server commands of
        /// STOMP 1.0–1.2 (NACK and STOMP exist from 1.1 on; the codec
        /// accepts them in every version and leaves that check to the session).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum Command {
            $( $(#[$doc])* $variant, )*
        }

        impl Command {
            /// Every command, client commands first.
            pub const ALL: [Command; 15] = [$( Command::$variant, )*];

            /// The command as written on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $( Command::$variant => $wire, )*
                }
            }

            /// The command named by `line` (case sensitive, no padding).
            pub fn from_bytes(line: &[u8]) -> Option<Command> {
                match line {
                    $( l if l == $wire.as_bytes() => Some(Command::$variant), )*
                    _ => None,
                }
            }

            /// True for frames a client sends, false for server frames.
            pub fn is_client(self) -> bool {
                match self {
                    $( Command::$variant => $client, )*
                }
            }
        }
    };
}

commands! {
    /// Opens a session (STOMP 1.0 name).
    Connect = "CONNECT", client: true;
    /// Opens a session (STOMP 1.1+ name, same meaning as CONNECT).
    Stomp = "STOMP", client: true;
    /// Sends a message to a destination.
    Send = "SEND", client: true;
    /// Starts a subscription.
    Subscribe = "SUBSCRIBE", client: true;
    /// Ends a subscription.
    Unsubscribe = "UNSUBSCRIBE", client: true;
    /// Acknowledges a message.
    Ack = "ACK", client: true;
    /// Rejects a message (1.1+).
    Nack = "NACK", client: true;
    /// Starts a transaction.
    Begin = "BEGIN", client: true;
    /// Commits a transaction.
    Commit = "COMMIT", client: true;
    /// Rolls a transaction back.
    Abort = "ABORT", client: true;
    /// Ends the session gracefully.
    Disconnect = "DISCONNECT", client: true;
    /// Accepts a session.
    Connected = "CONNECTED", client: false;
    /// Delivers a message to a subscription.
    Message = "MESSAGE", client: false;
    /// Confirms that a frame with a `receipt` header was processed.
    Receipt = "RECEIPT", client: false;
    /// Reports an error; the connection closes after it.
    Error = "ERROR", client: false;
}

impl Command {
    /// Whether this frame's headers are escaped (in 1.1+). CONNECT and
    /// CONNECTED never are, for compatibility with 1.0 (spec 1.2 "Value
    /// Encoding"); STOMP is treated like CONNECT, since it is decoded before
    /// a version is negotiated.
    pub fn escapes_headers(self) -> bool {
        !matches!(self, Command::Connect | Command::Stomp | Command::Connected)
    }

    /// Whether the specification allows a body (SEND, MESSAGE, ERROR). The
    /// codec does not enforce it; the session may.
    pub fn may_have_body(self) -> bool {
        matches!(self, Command::Send | Command::Message | Command::Error)
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A header value that a typed accessor could not interpret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid value \"{value}\" for header {name}: expected {expected}")]
pub struct HeaderError {
    /// The header name.
    pub name: &'static str,
    /// The value received.
    pub value: String,
    /// What the value should have looked like.
    pub expected: &'static str,
}

/// The two numbers of a `heart-beat` header, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HeartBeat {
    /// The smallest interval at which the sender of the frame can send
    /// heart-beats (0 = it cannot).
    pub outgoing: u32,
    /// The interval at which the sender of the frame would like to receive
    /// them (0 = it does not want any).
    pub incoming: u32,
}

impl fmt::Display for HeartBeat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{},{}", self.outgoing, self.incoming)
    }
}

/// The `ack` header of SUBSCRIBE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AckMode {
    /// No ACK frames; a message counts as consumed once sent.
    #[default]
    Auto,
    /// ACK is cumulative: it covers every earlier message of the subscription.
    Client,
    /// ACK and NACK cover one message.
    ClientIndividual,
}

impl AckMode {
    /// The mode as written in the header.
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::Auto => "auto",
            AckMode::Client => "client",
            AckMode::ClientIndividual => "client-individual",
        }
    }
}

/// One STOMP frame.
///
/// Headers keep the order in which they were received or added. A decoded
/// frame holds each header name once: a repeated header is dropped and the
/// first value wins (spec 1.2 "Repeated Header Entries"). The body shares
/// the read buffer's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The command.
    pub command: Command,
    /// Header names and values, unescaped, in order.
    pub headers: Vec<(String, String)>,
    /// The body (empty for most frames).
    pub body: Bytes,
}

impl Frame {
    /// A frame with no headers and no body.
    pub fn new(command: Command) -> Frame {
        Frame {
            command,
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    /// Appends a header (builder style).
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Frame {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sets the body (builder style). The encoder writes `content-length`.
    pub fn with_body(mut self, body: impl Into<Bytes>) -> Frame {
        self.body = body.into();
        self
    }

    /// A RECEIPT frame answering `receipt`.
    pub fn receipt(receipt_id: impl Into<String>) -> Frame {
        Frame::new(Command::Receipt).with_header(header::RECEIPT_ID, receipt_id)
    }

    /// An ERROR frame with a short `message` header and a plain-text body
    /// that explains.
    pub fn error(message: impl Into<String>, detail: impl Into<String>) -> Frame {
        let detail: String = detail.into();
        let frame = Frame::new(Command::Error).with_header(header::MESSAGE, message);
        if detail.is_empty() {
            frame
        } else {
            frame
                .with_header(header::CONTENT_TYPE, "text/plain")
                .with_body(detail)
        }
    }

    /// The value of the first header called `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets header `name`: replaces the first one with that name, or
    /// appends it.
    pub fn set_header(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.headers.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => slot.1 = value,
            None => self.headers.push((name.to_owned(), value)),
        }
    }

    /// Removes every header called `name`; returns the first value.
    pub fn remove_header(&mut self, name: &str) -> Option<String> {
        let first = self.header(name).map(str::to_owned);
        self.headers.retain(|(k, _)| k != name);
        first
    }

    /// A header read as a decimal integer (surrounding spaces tolerated,
    /// as RabbitMQ does).
    pub fn u64_header(&self, name: &'static str) -> Result<Option<u64>, HeaderError> {
        self.header(name)
            .map(|v| {
                v.trim().parse::<u64>().map_err(|_| HeaderError {
                    name,
                    value: v.to_owned(),
                    expected: "a non-negative integer",
                })
            })
            .transpose()
    }

    /// A header read as a boolean: `true`/`false`, and `True`/`False` as
    /// some Python clients write them (RabbitMQ accepts both).
    pub fn bool_header(&self, name: &'static str) -> Result<Option<bool>, HeaderError> {
        self.header(name)
            .map(|v| match v {
                "true" | "True" => Ok(true),
                "false" | "False" => Ok(false),
                _ => Err(HeaderError {
                    name,
                    value: v.to_owned(),
                    expected: "true or false",
                }),
            })
            .transpose()
    }

    /// `content-length`, as declared (the decoder has already used it to
    /// delimit the body).
    pub fn content_length(&self) -> Result<Option<u64>, HeaderError> {
        self.u64_header(header::CONTENT_LENGTH)
    }

    /// `content-type`.
    pub fn content_type(&self) -> Option<&str> {
        self.header(header::CONTENT_TYPE)
    }

    /// `destination` (SEND, SUBSCRIBE, MESSAGE).
    pub fn destination(&self) -> Option<&str> {
        self.header(header::DESTINATION)
    }

    /// `id` (SUBSCRIBE, UNSUBSCRIBE; ACK/NACK in 1.2).
    pub fn id(&self) -> Option<&str> {
        self.header(header::ID)
    }

    /// `receipt` (any client frame but CONNECT).
    pub fn receipt_request(&self) -> Option<&str> {
        self.header(header::RECEIPT)
    }

    /// `receipt-id` (RECEIPT, ERROR).
    pub fn receipt_id(&self) -> Option<&str> {
        self.header(header::RECEIPT_ID)
    }

    /// `transaction` (SEND, ACK, NACK, BEGIN, COMMIT, ABORT).
    pub fn transaction(&self) -> Option<&str> {
        self.header(header::TRANSACTION)
    }

    /// `subscription` (MESSAGE; ACK/NACK in 1.1).
    pub fn subscription(&self) -> Option<&str> {
        self.header(header::SUBSCRIPTION)
    }

    /// `message-id` (MESSAGE; ACK/NACK in 1.0 and 1.1).
    pub fn message_id(&self) -> Option<&str> {
        self.header(header::MESSAGE_ID)
    }

    /// The id an ACK or NACK refers to in `version`: `id` in 1.2,
    /// `message-id` before.
    pub fn ack_id(&self, version: Version) -> Option<&str> {
        match version {
            Version::V1_2 => self.id(),
            Version::V1_0 | Version::V1_1 => self.message_id(),
        }
    }

    /// `host` (CONNECT/STOMP).
    pub fn host(&self) -> Option<&str> {
        self.header(header::HOST)
    }

    /// `login` (CONNECT/STOMP).
    pub fn login(&self) -> Option<&str> {
        self.header(header::LOGIN)
    }

    /// `passcode` (CONNECT/STOMP).
    pub fn passcode(&self) -> Option<&str> {
        self.header(header::PASSCODE)
    }

    /// `message` (ERROR).
    pub fn error_message(&self) -> Option<&str> {
        self.header(header::MESSAGE)
    }

    /// The versions listed in `accept-version` (CONNECT/STOMP), in the
    /// order given, skipping versions this codec does not know (a client
    /// may list `2.0`). `None` when the header is absent, which means the
    /// client speaks only 1.0.
    pub fn accept_version(&self) -> Option<Vec<Version>> {
        self.header(header::ACCEPT_VERSION)
            .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
    }

    /// `version` (CONNECTED).
    pub fn version(&self) -> Result<Option<Version>, HeaderError> {
        self.header(header::VERSION)
            .map(|v| {
                v.parse().map_err(|()| HeaderError {
                    name: header::VERSION,
                    value: v.to_owned(),
                    expected: "1.0, 1.1 or 1.2",
                })
            })
            .transpose()
    }

    /// `heart-beat` (CONNECT/STOMP/CONNECTED); `None` when absent, which the
    /// specification treats as `0,0`.
    pub fn heart_beat(&self) -> Result<Option<HeartBeat>, HeaderError> {
        self.header(header::HEART_BEAT)
            .map(|v| {
                let bad = || HeaderError {
                    name: header::HEART_BEAT,
                    value: v.to_owned(),
                    expected: "two integers separated by a comma",
                };
                let (outgoing, incoming) = v.split_once(',').ok_or_else(bad)?;
                Ok(HeartBeat {
                    outgoing: outgoing.trim().parse().map_err(|_| bad())?,
                    incoming: incoming.trim().parse().map_err(|_| bad())?,
                })
            })
            .transpose()
    }

    /// `ack` of a SUBSCRIBE: the acknowledgement mode, `auto` when absent.
    pub fn ack_mode(&self) -> Result<AckMode, HeaderError> {
        match self.header(header::ACK) {
            None | Some("auto") => Ok(AckMode::Auto),
            Some("client") => Ok(AckMode::Client),
            Some("client-individual") => Ok(AckMode::ClientIndividual),
            Some(other) => Err(HeaderError {
                name: header::ACK,
                value: other.to_owned(),
                expected: "auto, client or client-individual",
            }),
        }
    }
}
