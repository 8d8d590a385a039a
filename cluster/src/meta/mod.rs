//! Metadata: vhosts, exchanges, bindings and queue definitions, as a pure,
//! deterministic state machine that a Raft metadata group applies on every
//! node in log order, so RabbitMQ's declare rules are decided once for the
//! whole cluster (docs/cluster.md, "Metadata").
//!
//! - `topology.rs`: [`Topology`]: [`Topology::apply`] a [`Command`] →
//!   [`Outcome`] or [`MetaError`]; [`Topology::route`] and
//!   [`Topology::queue`] for the read side; [`Topology::load`] from stored
//!   definitions.
//! - `matching.rs`: topic and headers binding matching.
//! - `persist.rs`: the key/value layout of stored definitions.
//! - `client.rs`: [`client::MetaClient`], how a router reaches the group
//!   (over the network from a gateway, or in process).
//! - `replica.rs`: [`MetaReplica`], the replicated metadata group: one Raft
//!   group whose state machine is [`MetaState`] (the topology plus the
//!   committed member list), with checkpoints, compaction and a change
//!   stream.
//!
//! The gateway's router holds a `Topology`, turns AMQP methods into
//! commands (choosing generated names and queue ids itself, since the state
//! machine has no randomness), and carries out the outcomes on the backend.

mod args_serde;
pub mod auth;
pub mod client;
pub mod matching;
pub mod persist;
pub mod replica;
pub mod topology;

#[cfg(test)]
mod tests;

pub use matching::{headers_match, topic_matches};
pub use topology::{
    EVENT_EXCHANGE,
    partition_count, partition_hash, partition_name, Binding, Command, CreatedQueue, DefChange, Dest, Exchange, ExchangeKind,
    MetaError, Outcome, Owner, QueueDef, RemovedQueue, Target, Topology, Vhost, MAX_PARTITIONS,
};
pub use replica::{Applied, MetaCommand, MetaOptions, MetaReplica, MetaResult, MetaState};
