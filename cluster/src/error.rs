//! Errors of the cluster layer.

/// What can go wrong between the router and the queues.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Storage refused or failed the operation.
    #[error("storage: {0}")]
    Storage(#[from] sluice_storage::Error),
    /// A stored record could not be decoded.
    #[error("corrupt record: {0}")]
    Corrupt(String),
    /// The queue was deleted while the operation ran.
    #[error("queue deleted")]
    QueueDeleted,
    /// The queue has an exclusive consumer, or an exclusive consumer was
    /// asked for on a queue that has consumers.
    #[error("queue in exclusive use")]
    ExclusiveConsumer,
    /// The backend is shutting down.
    #[error("shutting down")]
    ShuttingDown,
    /// The storage under a Raft log failed (it is poisoned: the node must
    /// restart once the cause, for example a full disk, is fixed).
    #[error("storage failed: {0}")]
    StorageFailed(String),
    /// The cluster could not be reached or has no leader for the queue or
    /// the metadata right now; the text says what was tried.
    #[error("cluster unavailable: {0}")]
    Unavailable(String),
    /// The queue refused the message: it is at its `x-max-length` or
    /// `x-max-length-bytes` and its `x-overflow` is `reject-publish` (or
    /// `reject-publish-dlx`). A confirming publisher gets basic.nack.
    #[error("queue full (x-overflow reject-publish)")]
    QueueFull,
    /// Only the leader of the Raft group accepts this; this replica is
    /// not it. `leader` is the raft id of the leader it knows of, if any.
    #[error("not the leader (leader: {leader:?})")]
    NotLeader {
        /// The leader's raft id, if known.
        leader: Option<u64>,
    },
}
