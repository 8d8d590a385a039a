//! What every replica of a queue's Raft group runs: pure state machines
//! applied in log order (see docs/cluster.md, "The queue state machine").
//!
//! Nothing here does I/O, reads the clock or draws random numbers, so
//! replicas that apply the same log reach the same state and emit the same
//! effects; the node around them turns effects into storage writes and
//! messages.

pub mod queue_sm;
mod ready;
