//! sluice-cluster: where queues live, and the storage cluster.
//!
//! - `backend.rs`: the [`Backend`] and [`Queue`] traits the gateway calls,
//!   consumer credit.
//! - `embedded.rs`: `sluice serve`, a cluster of one in-process node;
//!   `remote.rs` + `remote_meta.rs`: a gateway's view of a cluster of
//!   nodes. Both implement [`Backend`] and reach the metadata through
//!   `meta::client::MetaClient`.
//! - `record.rs`: a message as an opaque storage record.
//! - `meta/`: the metadata (vhosts, exchanges, bindings, queues) as a pure,
//!   deterministic state machine with RabbitMQ's declare rules, and its
//!   Raft group (`meta/replica.rs`).
//! - `replica/`: the pure queue state machine every replica applies;
//!   `replicated/`: `ReplicatedQueue`, one replica of a queue's Raft group
//!   (bodies in the log, checkpoints, compaction, batching).
//! - `consensus/`: the raft-rs driver for one group (persist-before-send,
//!   async persistence) and its deterministic simulation (`sim`).
//! - `placement.rs`: rendezvous hashing of queues onto nodes.
//! - `rpc/`: the node protocol (handshake with the cluster secret, frames,
//!   pipelined calls); `node/`: `sluice node` (`host.rs`: the replicas it
//!   hosts and the requests of gateways).
//! - `tls.rs`: PEM files to rustls configs (ring), the node protocol's
//!   mutual TLS, the subject CN of a certificate (docs/tls.md).
//! - `error.rs`: [`Error`].
//!
//! Invariant: the gateway only uses the traits in `backend.rs` (plus the
//! pure `meta` rules); storage never sees AMQP (records are opaque bytes).

pub mod backend;
pub mod consensus;
pub mod dead_letter;
pub mod embedded;
pub mod error;
pub mod meta;
pub mod node;
pub mod placement;
pub mod record;
pub mod replica;
pub mod remote;
pub mod remote_meta;
pub mod replicated;
pub mod rpc;
pub mod tls;

pub use backend::{
    message_ttl, ready, Backend, ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Durable, Outcome, Queue,
    QueueId, QueueMeter, QueueStats, QueueSpec, Reply,
};
pub use error::Error;
