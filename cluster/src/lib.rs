//! sluice-cluster: the backend the router calls.
//!
//! - `backend.rs`: the [`Backend`] and [`Queue`] traits, consumer credit.
//! - `local/`: [`LocalBackend`], an in-process node on node-local storage;
//!   `sluice serve` runs it as a cluster of one.
//! - `record.rs`: how a message is laid out as an opaque storage record.
//! - `error.rs`: [`Error`].
//!
//! Invariant: the gateway only uses the traits in `backend.rs`; storage
//! never sees AMQP (records are opaque bytes to it).

pub mod backend;
pub mod consensus;
pub mod error;
pub mod local;
pub mod meta;
pub mod node;
pub mod placement;
pub mod record;
pub mod replica;
pub mod rpc;

pub use backend::{
    Backend, ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Durable, Outcome, Queue, QueueId,
    QueueSpec,
};
pub use error::Error;
pub use local::{LocalBackend, LocalOptions};
