//! STOMP 1.0, 1.1 and 1.2 wire codec.
//!
//! * [`frame`] – [`Frame`], [`Command`], [`Version`], header names and
//!   typed accessors,
//! * [`decode`](mod@decode) – the streaming [`Decoder`] with its [`Limits`], yielding
//!   [`Item`]s (frames and heart-beat EOLs),
//! * [`encode`] – [`encode_frame`] and [`encode_heartbeat`],
//! * [`codec`] – tokio-util [`StompCodec`],
//! * [`error`] – [`DecodeError`] (with an ERROR-frame summary) and
//!   [`EncodeError`],
//! * `escape` – header value encoding per version.
//!
//! # Grammar
//!
//! ```text
//! stream  = *( noise | frame )
//! noise   = NUL | EOL                  ; each EOL is surfaced as Item::Heartbeat
//! frame   = command EOL *( header EOL ) EOL body NUL
//! EOL     = [CR] LF                    ; accepted in every version
//! header  = name ":" value             ; split at the first colon
//! body    = content-length octets      ; when content-length is given (NULs allowed)
//!         | *(OCTET except NUL)        ; otherwise
//! ```
//!
//! Header escapes: none in 1.0; `\n` `\c` `\\` in 1.1; `\r` `\n` `\c` `\\`
//! in 1.2; never in CONNECT, STOMP or CONNECTED frames. An undefined escape
//! is an error in 1.1 and 1.2. Repeated headers: the first wins and later
//! ones are dropped by the decoder (and do not count against
//! [`Limits::max_headers`]).
//!
//! # Deviations, all on the lenient side, after RabbitMQ's `rabbit_stomp_frame`
//!
//! * CR LF ends a line in 1.0 and 1.1 too; a CR anywhere else in the head
//!   (or between frames) is an error, in every version.
//! * NUL octets between frames are skipped silently.
//! * Header values may hold unescaped colons; header names may be empty;
//!   nothing is trimmed (except blanks around `content-length`'s digits).
//! * `content-length` is honoured on every command (RabbitMQ only reads it
//!   on SEND), and bodies are accepted on every command: the session may
//!   reject a body on frames that must not have one.
//! * A NUL where a header line should start ends the frame with no body
//!   (the spec's own DISCONNECT/RECEIPT examples omit the blank line).
//! * The STOMP frame is not escaped, like CONNECT: it is decoded before
//!   any version is negotiated.
//! * Commands are checked against the 15 known ones (case sensitive) but
//!   not against the direction or the version (NACK and STOMP are 1.1+):
//!   the session decides.
//! * Header names and values must be UTF-8 (the spec's encoding); RabbitMQ
//!   accepts any octets.
//!
//! # How frames map onto the command model ([`crate::command`])
//!
//! The gateway's STOMP session (`gateway/src/stomp/`, docs/stomp.md) carries
//! this mapping out; it needs session state (subscriptions, transactions,
//! temporary queues), so it lives there rather than in this crate.
//! Following RabbitMQ's STOMP plugin:
//!
//! | frame | becomes |
//! |---|---|
//! | CONNECT, STOMP | session only: `accept-version` negotiation, `host` as vhost, `login`/`passcode` checked like AMQP credentials, `heart-beat`; answered with CONNECTED (`version`, `session`, `server`, `heart-beat`) or ERROR |
//! | SEND | `Command::Publish { mandatory: false, immediate: false, message }`; the destination gives `message.exchange`/`routing_key` (`/queue/N` → `""`/`N`, preceded by a `QueueDeclare { durable: true }` of `N` as RabbitMQ does; `/amq/queue/N` → `""`/`N` without declare; `/topic/K` → `amq.topic`/`K`; `/exchange/X/K` → `X`/`K`; `/temp-queue/N` → the session's temporary queue); `content-type`, `content-encoding`, `correlation-id`, `reply-to`, `expiration`, `priority`, `persistent` (→ `delivery_mode` 2), `message-id`, `timestamp`, `type`, `user-id`, `app-id` → `Properties`; other non-protocol headers → `properties.headers` as long strings; `x-*` queue arguments → the declare's `Arguments`; the body as is. A `receipt` waits for `Reply::Confirm` (publisher-confirm durability). |
//! | SUBSCRIBE | `QueueDeclare` (for `/queue/N`: `N`, durable; for `/topic/K` and `/exchange/X/K`: a server-named exclusive auto-delete queue, or `x-queue-name`/durable when `durable:true` with `id`) + `QueueBind` (topic/exchange) + `Qos { prefetch_count: prefetch-count }` + `Consume { queue, consumer_tag: "T_" + id, no_ack: ack == auto, arguments: x-* headers }` |
//! | UNSUBSCRIBE | `Cancel { consumer_tag: "T_" + id }` (plus `QueueDelete` of a durable topic subscription when `durable:true`/`persistent:true`) |
//! | ACK | `Ack { delivery_tag, multiple: ack mode == client }`; the tag comes from the `id` (1.2) or `message-id` (1.0/1.1) the session put in MESSAGE ([`Frame::ack_id`]) |
//! | NACK | `Nack { delivery_tag, multiple: ack mode == client, requeue: requeue header, default true }` |
//! | BEGIN, COMMIT, ABORT | session only: SEND/ACK/NACK frames with `transaction` are buffered per transaction and replayed as the commands above on COMMIT, dropped on ABORT (as RabbitMQ does) |
//! | DISCONNECT | session only: RECEIPT once every earlier frame is processed, then close |
//! | `Reply::Deliver` | MESSAGE: `subscription` (the id behind the consumer tag), `message-id`, `destination` (rebuilt from exchange and routing key), `redelivered`, `ack` (1.2, client modes), properties and headers back into headers, the body |
//! | `Reply::Confirm` | RECEIPT for the SEND that asked for one (`ack: false` → ERROR) |
//! | `Reply::ConsumerCancelled` | ERROR (RabbitMQ: the subscription's queue was deleted) |
//! | a broker error, a [`DecodeError`] | ERROR with `message` (e.g. [`DecodeError::summary`]), `receipt-id` when the frame had `receipt`, and a text body; then close |
//!
//! `Reply::Return`, `GetOk`/`GetEmpty` and the `*Ok` replies of declares
//! are consumed by the session and never reach a STOMP client.

pub mod codec;
pub mod decode;
pub mod encode;
pub mod error;
mod escape;
pub mod frame;

pub use codec::StompCodec;
pub use decode::{decode, Decoder, Item, Limits};
pub use encode::{encode_frame, encode_heartbeat};
pub use error::{DecodeError, EncodeError};
pub use frame::{header, AckMode, Command, Frame, HeaderError, HeartBeat, Version};
