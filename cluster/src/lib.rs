//! sluice-cluster: where queues live, and the storage cluster.
//!
//! - `backend.rs`: the [`Backend`] and [`Queue`] traits the gateway calls,
//!   consumer credit.
//! - `local/`: [`LocalBackend`], the in-process node `sluice serve` runs.
//! - `record.rs`: a message as an opaque storage record.
//! - `meta/`: the metadata (vhosts, exchanges, bindings, queues) as a pure,
//!   deterministic state machine with RabbitMQ's declare rules.
//! - `replica/`: the pure queue state machine every replica applies;
//!   `replicated.rs`: `ReplicatedQueue`, that state machine on a Raft group
//!   behind the `Queue` trait (first cut: single voter).
//! - `consensus/`: the raft-rs driver for one group (persist-before-send,
//!   async persistence) and its deterministic simulation (`sim`).
//! - `placement.rs`: rendezvous hashing of queues onto nodes.
//! - `rpc/`: the node protocol (handshake with the cluster secret, frames,
//!   pipelined calls); `node/`: `sluice node`.
//! - `error.rs`: [`Error`].
//!
//! Invariant: the gateway only uses the traits in `backend.rs` (plus the
//! pure `meta` rules); storage never sees AMQP (records are opaque bytes).

pub mod backend;
pub mod consensus;
pub mod embedded;
pub mod error;
pub mod local;
pub mod meta;
pub mod node;
pub mod placement;
pub mod record;
pub mod replica;
pub mod remote;
pub mod remote_meta;
pub mod replicated;
pub mod rpc;

pub use backend::{
    ready, Reply,
    Backend, ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Durable, Outcome, Queue, QueueId,
    QueueSpec,
};
pub use error::Error;
pub use local::{LocalBackend, LocalOptions};
