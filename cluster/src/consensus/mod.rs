//! Raft replication on raft-rs 0.7: the driver of one group and its storage
//! boundary (docs/cluster.md, "Raft driver and simulation").
//!
//! - `log_store.rs`: [`LogStore`], the persistence boundary of one group
//!   (hard state, entries, snapshot, apply state), with asynchronous
//!   durability; [`MemLogStore`]; [`RaftStore`], the `raft::Storage`
//!   adapter.
//! - `fjall_store.rs`: [`FjallLogStore`], the durable [`LogStore`] of one
//!   group on the node's shared `sluice_storage::Store` (many groups, one
//!   fsync per round).
//! - `group.rs`: [`Group`], which wraps raft-rs's `RawNode` and turns each
//!   `Ready` into an [`Output`] of plain data (what to send, what is
//!   committed, which proposals finished) while enforcing raft-rs's ordering
//!   rules itself.
//! - `sim.rs` (feature `sim`, on for `cargo test`): a seeded deterministic
//!   simulation of several replicas driving the real [`Group`] through
//!   crashes, partitions, lossy networks and membership changes.
//!
//! Invariant: apart from `fjall_store.rs` (the storage boundary), nothing
//! here does I/O, reads a clock or draws from an unseeded random source
//! (when `GroupConfig::timeout_seed` is set); the caller feeds ticks,
//! messages and durability reports, and performs the writes and sends the
//! output asks for.

pub mod fjall_store;
pub mod group;
pub mod log_store;
pub mod reconfig;
pub mod transport;
#[cfg(any(test, feature = "sim"))]
pub mod sim;
#[cfg(any(test, feature = "sim"))]
pub mod queue_sim;

pub use fjall_store::{FjallLogStore, FjallLogStoreError};
pub use group::{
    Committed, Group, GroupConfig, Output, Payload, PersistTicket, ProposalId, ProposalOutcome,
    Role, RoleChange, LEADER_CHANGES,
};
pub use transport::{raft_id, GroupId, MemNet, Transport, META_GROUP};
pub use log_store::{
    bootstrap_snapshot, ApplyState, LogStore, LogStoreError, LogWrite, MemLogStore, RaftStore,
    BOOTSTRAP_INDEX, BOOTSTRAP_TERM,
};

/// What can go wrong driving a Raft group.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Proposals go to the leader; this replica is not it. `leader` is the
    /// leader it knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader this replica follows, if known.
        leader: Option<u64>,
    },
    /// raft-rs refused the proposal: a leadership transfer is in progress,
    /// the leader was removed from the group, or the uncommitted log is at
    /// its size limit.
    #[error("proposal dropped by raft")]
    ProposalDropped,
    /// Empty data is reserved for the leader's no-op entry.
    #[error("empty proposal")]
    EmptyProposal,
    /// A configuration change is already in the log and not yet applied.
    #[error("a configuration change is pending")]
    ConfChangePending,
    /// The configuration change does not fit the current configuration
    /// (for example a change while in a joint configuration, or a change
    /// that removes or demotes the leader itself: transfer leadership
    /// first).
    #[error("configuration change refused: {0}")]
    ConfChangeRefused(&'static str),
    /// A message from the network is malformed or not meant for raft's
    /// peer protocol; it was dropped without touching raft's state.
    #[error("invalid raft message: {0}")]
    InvalidMessage(String),
    /// The store failed or holds an inconsistent state.
    #[error("raft store: {0}")]
    Store(#[from] LogStoreError),
    /// A committed entry cannot be decoded: every replica holds the same
    /// bytes, so this is a bug or corruption, not a network problem.
    #[error("corrupt committed entry at index {index}: {reason}")]
    CorruptEntry {
        /// The entry's index.
        index: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// raft-rs delivered committed entries out of order. This breaks the
    /// exactly-once apply guarantee and is reported instead of applied.
    #[error("committed entry {got} delivered out of order (expected {expected})")]
    ApplyOrder {
        /// The index that should have come next.
        expected: u64,
        /// The index that came.
        got: u64,
    },
    /// `on_persisted` named a write that was never handed out.
    #[error("persist report for unknown write {number} (last handed out: {last})")]
    UnknownPersist {
        /// The reported number.
        number: u64,
        /// The last number handed out.
        last: u64,
    },
    /// raft-rs returned an error (configuration, storage).
    #[error("raft: {0}")]
    Raft(#[source] raft::Error),
}

/// A small seeded pseudo-random generator (SplitMix64, Steele, Lea and
/// Flood 2014). Used for election-timeout jitter when a seed is configured
/// and by the simulation; not for anything security-related.
#[derive(Debug, Clone)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `[0, n)`; 0 if `n` is 0. Multiply-shift reduction: the
    /// bias is below 2^-32 for the small ranges used here.
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// A number in `[low, high)`; `low` if the range is empty.
    pub fn range(&mut self, low: u64, high: u64) -> u64 {
        low + self.below(high.saturating_sub(low))
    }

    /// True with probability `per_mille / 1000`.
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
}

#[cfg(test)]
mod tests {
    use super::SplitMix64;

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        for _ in 0..1000 {
            assert_eq!(a.next_u64(), b.next_u64());
            let r = a.range(3, 6);
            assert!((3..6).contains(&r));
            b.range(3, 6);
        }
        assert_eq!(SplitMix64::new(7).below(0), 0);
    }
}
