//! Sluice wire codecs.
//!
//! * [`amqp`] – AMQP 0-9-1 framing, method table, content properties,
//!   field tables, tokio-util codec and per-channel command assembly.
//! * [`command`] – the protocol-neutral command model the codecs map to.

pub mod amqp;
pub mod command;
