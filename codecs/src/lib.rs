//! Sluice wire codecs.
//!
//! * [`amqp`] – AMQP 0-9-1 framing, method table, content properties,
//!   field tables, tokio-util codec and per-channel command assembly.
//! * [`stomp`] – STOMP 1.0/1.1/1.2 frames: streaming decoder with limits,
//!   encoder with per-version header escaping, tokio-util codec.
//! * [`ws`] – WebSocket (RFC 6455) framing and upgrade handshake, for
//!   STOMP over WebSocket.
//! * [`command`] – the protocol-neutral command model the codecs map to.
//! * `fuzzing` – the decoders as the fuzz targets and the corpus replay
//!   test drive them.

pub mod amqp;
pub mod command;
#[doc(hidden)]
pub mod fuzzing;
pub mod stomp;
pub mod ws;
