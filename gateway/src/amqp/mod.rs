//! The AMQP 0-9-1 session: handshake, frames, channels, heartbeats.

pub mod connection;
mod writer;

pub use connection::serve;
