//! The STOMP 1.0/1.1/1.2 session over TCP, on the protocol-neutral
//! [`crate::channel::Channel`] (one channel per connection, as RabbitMQ's
//! STOMP plugin). Frames come from `sluice_codecs::stomp`.
//!
//! * [`connection`]: socket, CONNECT negotiation, heart-beats, the frame
//!   loop, subscriptions, receipts, transactions, errors;
//! * `map`: SEND headers → message properties and queue arguments,
//!   deliveries → MESSAGE frames;
//! * `destination`: RabbitMQ's destination syntax;
//! * [`websocket`]: the same session over WebSocket (Web-STOMP), framing
//!   from `sluice_codecs::ws`.
//!
//! docs/stomp.md describes what is covered and how it differs from RabbitMQ.

pub mod connection;
mod destination;
mod map;
pub mod websocket;

pub use connection::serve;
