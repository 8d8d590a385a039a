//! [`ReplicatedQueue`]: one replica of a queue whose every change is an
//! entry of the queue's Raft group (group id = queue id), applied by the
//! pure [`QueueSm`] on every replica. The group's voters are on several
//! nodes; a group with a single voter (this node) is the "cluster of one"
//! `sluice serve` will run.
//!
//! How it works:
//! - **Raft.** Each replica drives its own [`crate::consensus::Group`] on the node's shared
//!   [`FjallLogStore`] (one storage writer thread, group commit across
//!   groups). Outgoing raft messages go to [`ReplicaOptions::transport`]
//!   (snapshot messages are reported delivered as soon as they are handed
//!   over); incoming ones arrive through [`ReplicatedQueue::step`].
//!   Elections are left to raft-rs's clock (a tokio task ticks every
//!   [`ReplicaOptions::tick`]); only a group whose only voter is this
//!   replica campaigns by itself.
//! - **Every replica applies everything**: the state machine and where
//!   each live message's body is in the log (below). Only the leader holds
//!   consumer handles (`Arc<Consumer>`), decides checkouts and pushes
//!   deliveries; followers never talk to consumers.
//! - **Publish** ([`ReplicatedQueue::publish_as`], leader only) adds the
//!   message to the next [`Command::Enqueue`]; its log entry also holds the
//!   message (as a [`crate::record`] encoding). Its [`Durable`] resolves when the entry
//!   is committed (durable on a majority) and applied here, or fails with
//!   [`Error::NotLeader`] if this replica stopped leading first: the entry
//!   may still commit under the next leader, so the gateway retries there
//!   with the same [`PublishId`] and the state machine drops the duplicate.
//! - **Consumers.** [`ReplicatedQueue::attach`] proposes
//!   [`Command::Attach`] with the gateway's [`ConsumerId`]; once it
//!   applies, the handle is kept and deliveries start. On a re-attach after
//!   a failover the gateway passes the seqs it delivered and still holds;
//!   seqs the state machine says that consumer holds but which are not in
//!   that list never reached the client and are requeued (redelivered);
//!   the attach answers, and deliveries start, once that requeue applied,
//!   so those go out before newer messages. The gateway charges the new
//!   [`Consumer`]'s window with what it still holds.
//!   The leader takes credit ([`Consumer::try_acquire`], round robin, one
//!   message at a time as `LocalQueue` does) for ready seqs that are not
//!   already in a pending checkout and proposes one [`Command::Checkout`]
//!   per consumer (batched like everything else). When it applies, the moved messages go to the sink
//!   (under the replica's lock; sinks never call back), and credit of
//!   seqs the checkout did not move is given back
//!   ([`Consumer::undo_acquire`]).
//! - **Leadership lost**: every waiting proposal fails with
//!   [`Error::NotLeader`] (publishes, gets, attaches...), the credit of
//!   pending checkouts is given back and the consumer handles are dropped
//!   *without* calling `DeliverySink::cancelled`: a consumer did not go
//!   away, its queue moved, and the gateway notices through
//!   [`ReplicatedQueue::leader`] / `NotLeader` answers and re-attaches at
//!   the new leader.
//! - **Leadership gained**: no consumer handles until gateways re-attach.
//!   Consumers of the state machine not re-attached within
//!   [`ReplicaOptions::reattach_grace`] get [`Command::Detach`] +
//!   [`Command::ReturnAll`], so their messages go to other consumers.
//! - **Delete** ([`ReplicatedQueue::delete`]) proposes [`Command::Delete`];
//!   every replica that applies it stops and removes its log and raft
//!   records from the store. The leader lingers a few ticks first (or until
//!   it loses its quorum) so that followers learn that the entry committed.
//!   [`ReplicatedQueue::destroy`] does the same for one replica, without a
//!   log entry (the node host's cleanup of replicas it no longer hosts).
//! - **Driving.** The tick task also waits, while raft writes are in flight,
//!   for an empty marker write on the storage (the writer answers in
//!   submission order, so when the marker is answered every earlier raft
//!   write is settled), then reports durability to the group, sends what
//!   became sendable, applies what committed and proposes new checkouts.
//!   Every public method pumps the group under the lock too, so writes and
//!   messages leave without waiting for the task.
//! - **Apply before the fsync, confirm after it** (single voter only). A
//!   group whose only voter is this replica reports each ready's writes
//!   persisted as soon as they are handed to the store (reads already see
//!   them: the log store's overlay), so entries commit and apply without
//!   waiting for the fsync: the checkout of a message just enqueued is
//!   proposed at once, and deliveries and basic.get answers go out as
//!   their checkout applies, as RabbitMQ's classic queues deliver before
//!   their fsync. A publish confirm waits in `Inner::unsynced` (in order)
//!   until the write holding its entry is durable, so a confirmed message
//!   is on disk. A delivery may thus leave before its checkout is durable:
//!   after a crash ([`Store::opened_after_crash`]) `open` flags every
//!   ready message redelivered ([`Command::MarkRedelivered`]), as RabbitMQ
//!   does after an unclean shutdown, so a message that went out never
//!   comes back unflagged. The storage writer commits in submission
//!   order, so a crash loses a suffix of the log, never a hole. While one
//!   append is in flight the leader proposes the next entry at once and
//!   batches behind two. A group with several voters applies (and
//!   delivers) only what a majority has durable, as Raft says; a single
//!   voter stops applying early once it has a learner (the first step
//!   towards more voters).
//! - **Restart.** [`ReplicatedQueue::open`] loads the last checkpoint
//!   (see below) and re-applies only the entries after it as raft-rs hands
//!   the committed ones out. With a single voter, `open` blocks until that
//!   is done and [`Command::GatewayDown`] for [`ReplicaOptions::gateway`]
//!   has committed (consumers of the previous process are detached, what
//!   they held is ready again with `redelivered = true`). With several
//!   voters `open` returns at once; the replica catches up from the leader.
//!
//! **Bodies live in the log** (as in RabbitMQ's quorum queues: the log is
//! the message store). An `Enqueue` entry carries the messages' records
//! after its commands, with a table of offsets, so a body is a zero-copy
//! slice of the entry (`log.rs`). Per live message a replica keeps only
//! the state machine's few bytes (seq → size, flags); where its body is
//! comes from [`log::Batches`]: one record (log index, body position,
//! live count) per `Enqueue` that still has a live message, not per
//! message. The leader keeps recently applied entries in a small cache
//! ([`ReplicaOptions::body_cache_bytes`], oldest out first, and dropped
//! once no live message is in them), so a consumer that keeps up never
//! reads the disk; a consumer behind reads its entry back from the log
//! (one read per entry, kept in a slot of its own). Followers cache
//! nothing. Why not the `msgs` keyspace: writing bodies there on apply
//! writes each body twice (log, then `msgs`) and removes it twice, needs
//! the write-once rule to hold across replays (a replay after the last
//! checkpoint would put the same (queue, seq) again), and a follower that
//! catches up by snapshot would have no bodies for the messages the
//! snapshot covers, so the snapshot would have to carry them (a 1 GiB
//! snapshot for 1M queued 1 KiB messages). With bodies in the log, a body
//! is written once (by the raft append that must happen anyway) and the
//! snapshot stays small (it carries no body; the log keeps them).
//!
//! **Checkpoints and compaction.** After [`ReplicaOptions::
//! checkpoint_entries`] entries or [`ReplicaOptions::checkpoint_bytes`]
//! bytes applied (but never before twice the checkpoint's own size of log
//! went by, so a big backlog is not rewritten too often), and on
//! [`ReplicatedQueue::close`], a replica writes a [`log::Checkpoint`]
//! (the state machine's snapshot, the batches and the log index the state
//! reflects) under `LogMeta` tag [`TAG_QUEUE_CHECKPOINT`] in the same
//! atomic write as its apply state (`save_apply_state_with`), so a restart
//! resumes after it. It then compacts the log up to the entry before the
//! oldest one holding a live message (`Group::compact_to`), never beyond:
//! the raft snapshot is placed there, with the same checkpoint as its
//! data, although the state it holds is newer. Whoever loads it (a
//! follower that was behind the compaction point and gets it from the
//! leader, or a replica whose snapshot is newer than its own checkpoint)
//! skips the entries up to the checkpoint's index and applies the rest;
//! the entries it skips still arrive, so it has every live body and can
//! serve consumers as soon as it leads. `Output::snapshot_wanted` forces a
//! checkpoint and compaction. The snapshot's configuration is the one
//! applied when it was made (at the checkpoint's index, which may be
//! beyond the snapshot's own): whoever restores it also skips the
//! configuration changes up to that index
//! (`Group::skip_conf_changes_through`), so compaction goes on across
//! configuration changes. When the compaction point cannot move (a live
//! message holds it) but a replica added since needs a snapshot with
//! itself in it, the stored snapshot is replaced at the same index
//! (`FjallLogStore::replace_snapshot`).
//!
//! **Membership changes.** [`ReplicatedQueue::change_voters`] (leader only)
//! moves the group to a target set of voters: learners first, promoted
//! once each acknowledged the commit index, one joint change that also
//! removes the others (`consensus::reconfig`); a leader not in the target
//! hands leadership over first. A replica opened with
//! [`ReplicaOptions::join`] starts from an empty log and waits for the
//! leader's snapshot. A replica that applies its own removal stops and
//! removes its records ([`ReplicatedQueue::is_removed`]).
//!
//! **Batching.** Commands are not proposed one by one: while a raft write
//! of the group is in flight, publishes, settles, checkouts and the rest
//! wait in a pending list, and go out as *one* entry when the write
//! settles (or when the entry reaches [`ReplicaOptions::max_entry_bytes`]).
//! Publishes merge into one `Enqueue`, settles of one consumer and outcome
//! into one `Settle`, checkouts of one consumer into one `Checkout`, where
//! moving the later command in front of those between changes nothing
//! (`*_may_pass`); otherwise commands keep their order inside the entry.
//! So the per-entry raft cost (a proposal, a ready, a log write, an
//! apply) is paid once per batch, like the storage writer's group commit.
//!
//! - The [`Queue`] trait (in-process use) maps to the methods above, with
//!   consumer ids under [`ReplicaOptions::gateway`]. None of its methods
//!   blocks: `consume`, `get` and `purge` answer with futures that resolve
//!   when their entry applies.
//!
//! Not done yet (see docs/cluster.md, "Replicated queue"):
//! - **a long-lived unconsumed message pins the log**: compaction never
//!   passes the entry holding the oldest live message, so one message
//!   nobody consumes (or a consumer holding one unacked forever) keeps
//!   every later entry on disk, and the log grows with the traffic behind
//!   it. The fix is to re-append old live bodies (a "move to the tail"
//!   entry once the oldest live entry is far behind), or snapshots that
//!   carry the few old live bodies; neither is built. RAM is not affected
//!   (bodies are read back from the log, never kept);
//! - the body cache is per queue, not a node-wide budget like
//!   `LocalQueue`'s; the checkpoint is written twice when the log is
//!   compacted (apply-state record and snapshot data), both in the small
//!   `state` keyspace, which is fine for up to a few million live messages
//!   (about 16 bytes each) but not beyond;
//! - a replica removed from its group learns it only if it sees the
//!   configuration change commit (normally the leader's next append tells
//!   it); otherwise it waits, and the node host asks the leader
//!   (`node/host.rs`) and removes it;
//! - a replica that was down while its queue was deleted keeps its log
//!   (nobody is left to tell it the delete committed): the node host must
//!   remove replicas of queues the metadata no longer has;
//! - `settle_as`, `detach`, `return_all` and `gateway_down` on a replica
//!   that is not the leader are dropped (logged): the gateway re-sends them
//!   to the new leader;
//! - a `get_as` that fails with `NotLeader` may still commit later: the
//!   message is then held by `holder` until the gateway settles it or calls
//!   `return_all(holder)` / `gateway_down`;
//! - transient messages and non-durable queues survive a restart (the log
//!   keeps them), unlike `LocalQueue`;
//! - a re-attach while the same consumer is still attached here with
//!   checkouts in flight: those deliveries go to the old handle;
//! - consensus and log-store failures surface as [`Error::Corrupt`] (or
//!   [`Error::Storage`]), and after one the replica refuses everything.

mod log;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::MessageType;
use sluice_codecs::command::Message;
use sluice_storage::{Completion, Op, Store};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

pub use self::log::CacheBudget;
use self::log::{decode_commands, encode_entry, entry_body, Batches, BodyCache, Checkpoint, CheckpointRef};
use crate::backend::{ready, Consumer, Delivery, Durable, Outcome, Queue, QueueId, QueueSpec, Reply};
use crate::consensus::fjall_store::{TAG_APPLY_STATE, TAG_HARD_STATE, TAG_SNAPSHOT_DATA, TAG_SNAPSHOT_META};
use crate::consensus::reconfig::{self, Step};
use crate::consensus::{
    Committed, FjallLogStore, FjallLogStoreError, GroupConfig, GroupId, LogStore, Output, Payload, ProposalId,
    ProposalOutcome, Role, Transport, BOOTSTRAP_INDEX,
};
use crate::dead_letter::{self, DeadLetters};
use crate::replica::queue_sm::{Command, ConsumerOpts, Effect, Limits, NewMsg, Overflow, QueueSm, Rejection};
pub use crate::replica::queue_sm::{ConsumerId, PublishId, Seq};
use crate::{record, Error};

type Group = crate::consensus::Group<FjallLogStore>;

/// The gateway id `sluice serve`'s in-process gateway uses.
pub const GATEWAY: &str = "local";

/// A single voter (applying before the fsync) proposes while fewer than
/// this many appends wait for the disk, and batches behind them, when many
/// commands come while one fsync runs (a busy queue: batching saves CPU
/// per message)...
const EARLY_APPENDS_BUSY: usize = 2;
/// ... and while fewer than this many wait when at most
/// [`LIGHT_COMMANDS_PER_FSYNC`] came during the last one (a light load:
/// waiting for an fsync would batch little and only delay the checkout,
/// and so the delivery, of what came).
const EARLY_APPENDS_LIGHT: usize = 32;
const LIGHT_COMMANDS_PER_FSYNC: usize = 8;

/// Default tick of the group's logical clock.
pub const DEFAULT_TICK: Duration = Duration::from_millis(50);

/// Default time a new leader gives gateways to re-attach their consumers.
pub const DEFAULT_REATTACH_GRACE: Duration = Duration::from_secs(3);

/// Entries after which a queue with no live message checkpoints (and so
/// compacts its whole log).
const DRAINED_CHECKPOINT_ENTRIES: u64 = 64;

/// Default [`ReplicaOptions::checkpoint_entries`].
pub const DEFAULT_CHECKPOINT_ENTRIES: u64 = 4096;

/// Default [`ReplicaOptions::checkpoint_bytes`].
pub const DEFAULT_CHECKPOINT_BYTES: u64 = 64 << 20;

/// The most [`ReplicaOptions::checkpoint_entries`] and `checkpoint_bytes`
/// of a volatile log (whose log, consumed or not, is in memory).
const VOLATILE_CHECKPOINT_ENTRIES: u64 = 256;
const VOLATILE_CHECKPOINT_BYTES: u64 = 1 << 20;

/// Default [`ReplicaOptions::body_cache_bytes`].
pub const DEFAULT_BODY_CACHE_BYTES: usize = 16 << 20;

/// Ready messages beyond which a queue whose consumer's deliveries back
/// up towards its socket reports [`Queue::lagging`], so that its
/// publishers' connections wait (docs/performance.md, "Flow control").
pub const FLOW_BACKLOG: usize = 2048;

/// The same in body bytes (half the default body cache).
pub const FLOW_BACKLOG_BYTES: u64 = 8 << 20;

/// Default [`ReplicaOptions::max_entry_bytes`].
pub const DEFAULT_MAX_ENTRY_BYTES: usize = 1 << 20;

/// `Op::LogMeta` tag of a replica's checkpoint ([`log::Checkpoint`]),
/// written in the same storage write as the apply state.
pub const TAG_QUEUE_CHECKPOINT: u8 = b'q';

/// Dead letters published per batch.
const DEAD_LETTER_BATCH: usize = 256;

/// How long one dead-letter publish may take before it is tried again.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(3);

/// Wait before publishing dead letters again after a failure.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// How long dead letters may stay sent without their `DeadLettered`
/// applying before they are sent again.
const DEAD_LETTER_STUCK: Duration = Duration::from_secs(10);

/// How long [`ReplicatedQueue::retire`] waits for the dead letters to be
/// published.
const RETIRE_TIMEOUT: Duration = Duration::from_secs(10);

/// Ticks a leader keeps running after applying `Delete`, so that its
/// heartbeats tell the followers the entry committed.
const DELETE_LINGER_TICKS: u32 = 10;

/// How long a blocking wait (single-voter open) may take before it fails.
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`ReplicatedQueue::change_voters`] may take.
pub const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);

/// Poll interval of blocking waits.
const BLOCKING_POLL: Duration = Duration::from_micros(50);

/// Checkpoint bytes estimated per live message and per batch (for the
/// rule that a checkpoint is written only after twice its size of log).
const CHECKPOINT_BYTES_PER_MSG: u64 = 16;
const CHECKPOINT_BYTES_PER_BATCH: u64 = 24;

/// A transport for groups without peers (a single voter): drops
/// everything (a single voter sends nothing).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPeers;

impl Transport for NoPeers {
    fn send(&self, group: GroupId, msgs: Vec<raft::eraftpb::Message>) {
        if !msgs.is_empty() {
            tracing::debug!(group, count = msgs.len(), "raft messages for a group without peers dropped");
        }
    }
}

/// Tells whether exchange (vhost, name) is an `x-delayed-message` exchange.
pub type DelayedExchange = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// How a replica runs.
#[derive(Clone)]
pub struct ReplicaOptions {
    /// This node's raft id ([`crate::consensus::raft_id`] of the node id).
    pub me: u64,
    /// The group's voters when it is created here (bootstrap); ignored when
    /// the store already holds the group's log. Empty means `[me]`.
    pub voters: Vec<u64>,
    /// Where outgoing raft messages go.
    pub transport: Arc<dyn Transport>,
    /// Gateway id of consumers attached through the [`Queue`] trait (the
    /// in-process gateway; `sluice serve` uses [`GATEWAY`]).
    pub gateway: String,
    /// Tick of the group's logical clock (election timeouts are 3..6 ticks).
    pub tick: Duration,
    /// How long a new leader waits for gateways to re-attach the consumers
    /// of the state machine before returning their messages.
    pub reattach_grace: Duration,
    /// A checkpoint (and a log compaction) is due after this many applied
    /// entries...
    pub checkpoint_entries: u64,
    /// ...or this many bytes of applied entries, whichever comes first;
    /// but never before twice the checkpoint's own size of log went by.
    pub checkpoint_bytes: u64,
    /// Bytes of recent log entries (hence bodies) the leader keeps in RAM.
    pub body_cache_bytes: usize,
    /// The node's budget over all its queues' body caches (none: only
    /// `body_cache_bytes` bounds this queue's).
    pub body_cache_budget: Option<Arc<CacheBudget>>,
    /// Commands waiting for the previous raft write go out without waiting
    /// any longer once their entry reaches this size.
    pub max_entry_bytes: usize,
    /// A single voter drops its non-persistent ready messages when it
    /// opens (after returning what the previous process's consumers
    /// held): `sluice serve`'s restart semantics, as RabbitMQ's.
    pub drop_transient_on_open: bool,
    /// The log is kept in memory only and nothing of the queue reaches the
    /// disk ([`FjallLogStore::bootstrap_volatile`]): for a non-durable
    /// queue of a single node, which a restart deletes anyway (as
    /// RabbitMQ's transient queues). Never with other voters.
    pub volatile: bool,
    /// The group exists on other nodes and this replica joins it: when the
    /// store holds no log of the group, open an empty one (no bootstrap)
    /// and wait for the leader, which adds this replica as a learner and
    /// sends it a snapshot ([`ReplicatedQueue::change_voters`]).
    pub join: bool,
    /// Called once when the queue has been unused for its `x-expires`
    /// (leader only): no consumer, no basic.get, no redeclare
    /// ([`ReplicatedQueue::touch`]) for that long. The node deletes the
    /// queue through the metadata group.
    pub on_expired: Option<Arc<dyn Fn(QueueId) + Send + Sync>>,
    /// Where the leader publishes the queue's dead letters
    /// ([`crate::dead_letter`]); `None`: they wait.
    pub dead_letters: Option<Arc<dyn DeadLetters>>,
    /// Whether an exchange (vhost, name) is an `x-delayed-message`
    /// exchange: the `x-delay` header of messages published through one
    /// delays them. `None`: never.
    pub delayed_exchange: Option<DelayedExchange>,
}

impl std::fmt::Debug for ReplicaOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaOptions")
            .field("me", &self.me)
            .field("voters", &self.voters)
            .field("gateway", &self.gateway)
            .field("tick", &self.tick)
            .field("reattach_grace", &self.reattach_grace)
            .field("checkpoint_entries", &self.checkpoint_entries)
            .field("checkpoint_bytes", &self.checkpoint_bytes)
            .field("body_cache_bytes", &self.body_cache_bytes)
            .field("max_entry_bytes", &self.max_entry_bytes)
            .field("join", &self.join)
            .finish_non_exhaustive()
    }
}

impl ReplicaOptions {
    /// A replica `me` of a group of `voters`, with the default tick and grace.
    pub fn new(me: u64, voters: Vec<u64>, transport: Arc<dyn Transport>, gateway: impl Into<String>) -> Self {
        ReplicaOptions {
            me,
            voters,
            transport,
            gateway: gateway.into(),
            tick: DEFAULT_TICK,
            reattach_grace: DEFAULT_REATTACH_GRACE,
            checkpoint_entries: DEFAULT_CHECKPOINT_ENTRIES,
            checkpoint_bytes: DEFAULT_CHECKPOINT_BYTES,
            body_cache_bytes: DEFAULT_BODY_CACHE_BYTES,
            body_cache_budget: None,
            max_entry_bytes: DEFAULT_MAX_ENTRY_BYTES,
            drop_transient_on_open: false,
            volatile: false,
            join: false,
            on_expired: None,
            dead_letters: None,
            delayed_exchange: None,
        }
    }

    /// The only voter of its group (`sluice serve`), without peers.
    pub fn single_voter(me: u64, gateway: impl Into<String>) -> Self {
        Self::new(me, vec![me], Arc::new(NoPeers), gateway)
    }
}

fn consensus_error(e: crate::consensus::Error) -> Error {
    match e {
        crate::consensus::Error::NotLeader { leader } => Error::NotLeader { leader },
        crate::consensus::Error::Store(crate::consensus::LogStoreError::Failed(why)) => Error::StorageFailed(why),
        other => Error::Corrupt(format!("queue raft group: {other}")),
    }
}

fn log_error(e: FjallLogStoreError) -> Error {
    match e {
        FjallLogStoreError::Storage(e) | FjallLogStoreError::WriteFailed { cause: Some(e), .. } => Error::Storage(e),
        other => Error::Corrupt(format!("queue raft log: {other}")),
    }
}

/// A copy of `e` for one more waiter (`Error` is not `Clone`).
fn dup(e: &Error) -> Error {
    match e {
        Error::Storage(e) => Error::Storage(e.clone()),
        Error::Corrupt(s) => Error::Corrupt(s.clone()),
        Error::QueueDeleted => Error::QueueDeleted,
        Error::ExclusiveConsumer => Error::ExclusiveConsumer,
        Error::ShuttingDown => Error::ShuttingDown,
        Error::Unavailable(s) => Error::Unavailable(s.clone()),
        Error::StorageFailed(s) => Error::StorageFailed(s.clone()),
        Error::NotLeader { leader } => Error::NotLeader { leader: *leader },
        Error::QueueFull => Error::QueueFull,
    }
}

/// The leader's wall clock, in ms since the epoch: the time commands carry
/// (the state machine has no clock).
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn rejection_error(reason: Rejection) -> Error {
    match reason {
        Rejection::QueueDeleted => Error::QueueDeleted,
        Rejection::ExclusiveConflict => Error::ExclusiveConsumer,
        Rejection::NotAttached => Error::Corrupt("consumer not attached".to_owned()),
        Rejection::SeqsExhausted => Error::Corrupt("the queue ran out of seqs".to_owned()),
    }
}

/// The storage ops that remove every raft record of `group` and the
/// queue's messages (a deleted queue's replica).
fn destroy_ops(group: u64) -> Vec<Op> {
    let mut ops = vec![Op::LogTruncate { log: group, from: 0 }];
    for tag in [TAG_HARD_STATE, TAG_APPLY_STATE, TAG_SNAPSHOT_META, TAG_SNAPSHOT_DATA, TAG_QUEUE_CHECKPOINT] {
        ops.push(Op::LogMeta { log: group, tag, value: None });
    }
    ops.push(Op::DeleteQueue { queue: group });
    ops
}

type Tx<T> = oneshot::Sender<Result<T, Error>>;

fn reply<T: Send + 'static>(rx: oneshot::Receiver<Result<T, Error>>) -> Reply<T> {
    Box::pin(async move { rx.await.unwrap_or(Err(Error::ShuttingDown)) })
}

/// Who waits for one command of a proposal of this replica (always
/// proposed as leader).
enum Waiter {
    /// The publishes of an `Enqueue`, one per message (`None`: nobody
    /// waits for that one's confirm).
    Enqueue(Vec<Option<Tx<()>>>),
    /// A checkout: credit was taken from `consumer` for each of `seqs`.
    Checkout {
        consumer: Arc<Consumer>,
        seqs: Vec<Seq>,
    },
    /// An attach; `held` is what the gateway still holds (a re-attach) or
    /// `None` (a new in-process consumer).
    Attach {
        id: ConsumerId,
        consumer: Arc<Consumer>,
        held: Option<Vec<Seq>>,
        tx: Tx<()>,
    },
    /// The requeue of what a re-attached consumer never received; the
    /// attach answers when it applies.
    Requeued {
        id: ConsumerId,
        consumer: Arc<Consumer>,
        tx: Tx<()>,
    },
    Get(Tx<Option<(Delivery, u32)>>),
    Purge(Tx<u32>),
    Delete(Tx<u32>),
    /// Anything else someone waits for.
    Done(Tx<()>),
}

/// A command waiting for the next entry (leader only).
struct Pending {
    cmd: Command,
    /// The records of an `Enqueue`'s messages, in order.
    /// Message records in parts ([`record::encode_parts`]).
    bodies: Vec<[Bytes; 2]>,
    waiter: Option<Waiter>,
}

/// Whether a later command may be moved in front of `cmd` (merged into an
/// earlier command of its kind) without changing what either does.
fn enqueue_may_pass(cmd: &Command) -> bool {
    // New messages are ready only after every held or ready one and are
    // no one's yet: only commands that look at "the first ready message"
    // or at all ready ones see the difference.
    !matches!(cmd, Command::Get { .. } | Command::Purge | Command::Delete | Command::Retire)
}

fn settle_may_pass(cmd: &Command) -> bool {
    // A settle names seqs its consumer holds in the applied state; an
    // enqueue, a checkout (of ready seqs) or another settle (of other
    // seqs, or the same ones: the second is a no-op either way) cannot
    // change that. Returns, detaches and the like can.
    matches!(cmd, Command::Enqueue { .. } | Command::Checkout { .. } | Command::Settle { .. })
}

fn checkout_may_pass(cmd: &Command) -> bool {
    // A checkout names seqs ready in the applied state and not in another
    // pending checkout: an enqueue, another checkout or a settle (of held
    // seqs) does not touch them.
    matches!(cmd, Command::Enqueue { .. } | Command::Checkout { .. } | Command::Settle { .. })
}

struct Inner {
    group: Group,
    sm: QueueSm,
    /// The queue's limits (from its definition; not in checkpoints).
    limits: Limits,
    /// Where the body of every live message is (log index, position).
    batches: Batches,
    /// Leader only: recent entries carrying bodies.
    cache: BodyCache,
    /// The applied state reflects the log up to here: entries up to it are
    /// not applied again (after a snapshot placed below the state it holds).
    state_at: u64,
    /// The last applied configuration change.
    conf_changed_at: u64,
    /// Applied index of the last checkpoint, and what was applied since.
    checkpoint_at: u64,
    bytes_since_checkpoint: u64,
    /// A follower needs a snapshot: checkpoint and compact now.
    snapshot_wanted: bool,
    /// [`ReplicaOptions::max_entry_bytes`].
    max_entry_bytes: usize,
    /// [`ReplicaOptions::volatile`]: no write is ever in flight to batch
    /// behind, so commands wait for the driver's turn instead.
    volatile: bool,
    /// Volatile only: the bodies (records as [`record::encode_parts`]
    /// made them) of the applied entries from the oldest one with a live
    /// message on, by entry index (those of entries not applied yet are in
    /// `waiters`). A volatile entry carries only its commands, so a body
    /// is never copied into it (the log is in memory anyway).
    side_bodies: BTreeMap<u64, Vec<[Bytes; 2]>>,
    /// The driver task is pumping (not a caller's method).
    driving: bool,
    /// Leader only: consumers attached here, with their handles.
    consumers: BTreeMap<ConsumerId, Arc<Consumer>>,
    /// Leader only: consumers whose attach is proposed, not applied.
    attaching: BTreeSet<ConsumerId>,
    /// Leader only: seqs in a checkout pending or proposed, not applied yet.
    in_checkout: BTreeSet<Seq>,
    /// Leader only: commands for the next entry.
    pending: Vec<Pending>,
    pending_bytes: usize,
    /// Commands pushed into `pending` (before merging) since the durable
    /// write number last moved, and how many came before that
    /// (`early_appends`).
    pushed_since_durable: usize,
    pushed_per_fsync: usize,
    durable_seen: u64,
    /// Per proposal, the waiter of each of its commands (and, volatile
    /// only, the bodies its entry does not carry).
    waiters: HashMap<ProposalId, Proposed>,
    /// Whether this replica acted as leader at the last pump.
    leading: bool,
    /// Single voter: confirms of applied entries whose writes are not
    /// durable yet, in order, each with the write number to wait for (see
    /// "Apply before the fsync, confirm after it" in the module docs).
    unsynced: VecDeque<(u64, Tx<()>)>,
    /// `x-expires`: when the queue was last used, as this leader saw it
    /// (in memory: a new leader starts counting afresh, so a failover only
    /// ever delays the expiry), and whether the expiry was reported.
    last_used: Instant,
    expiry_reported: bool,
    /// Set when this replica became leader, until the re-attach grace ran.
    leader_since: Option<Instant>,
    next_connection: u64,
    /// Round-robin position among `consumers`.
    cursor: usize,
    /// Set after a failure of the group or its store: everything fails.
    failed: Option<String>,
    /// `close` was called.
    closed: bool,
    /// `Delete` applied: everything is refused.
    deleted: bool,
    /// Ticks the leader still runs after `Delete` before it stops.
    linger: u32,
    /// Deleted and removed from the store: the group is never touched again.
    stopped: bool,
    /// This replica applied its own removal from the group: it stops and
    /// its records are removed (`stopped` is set too).
    removed: bool,
    /// Leader: highest log index each peer acknowledged (successful append
    /// responses), for [`ReplicatedQueue::change_voters`].
    acked: HashMap<u64, u64>,
    /// Leader: an `Expire` is proposed and has not applied yet.
    expire_inflight: bool,
    /// Leader: dead letters being published (ids).
    dl_in_flight: BTreeSet<u64>,
    /// Leader: no dead-letter publishing before this (after a failure).
    dl_retry_at: Option<Instant>,
    /// When the oldest dead letter of `dl_in_flight` was sent: past
    /// [`DEAD_LETTER_STUCK`] without its `DeadLettered` applying, the set
    /// is cleared and the dead letters are sent again (the target drops
    /// copies), so a lost answer or entry cannot hold them for ever.
    dl_sent_at: Option<Instant>,
    /// Dead letters removed from the queue (published to their target)
    /// since this replica opened: every replica applies the same
    /// `DeadLettered`s (metrics).
    dead_lettered: u64,
}

impl Inner {
    fn check(&self) -> Result<(), Error> {
        if let Some(why) = &self.failed {
            return Err(Error::Corrupt(why.clone()));
        }
        if self.removed {
            return Err(self.not_leader());
        }
        if self.deleted || self.stopped {
            return Err(Error::QueueDeleted);
        }
        if self.closed {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    fn inert(&self) -> bool {
        self.failed.is_some() || self.stopped
    }

    fn single_voter(&self) -> bool {
        let voters = &self.group.conf_state().voters;
        voters.len() == 1 && voters.first() == Some(&self.group.id())
    }

    fn not_leader(&self) -> Error {
        Error::NotLeader { leader: self.group.leader() }
    }

    /// Applies before the fsync ("Apply before the fsync, confirm after
    /// it"): a single voter with no learner. Adding a learner is the first
    /// step of a change to more voters, which must count only fsynced
    /// writes of the leader towards a majority; it stops here first.
    fn applies_early(&self) -> bool {
        self.single_voter() && self.group.conf_state().learners.is_empty()
    }

    /// Queues a command for the next entry, merging it into an earlier one
    /// of its kind where that changes nothing (see `*_may_pass`).
    fn push(&mut self, cmd: Command, bodies: Vec<[Bytes; 2]>, waiter: Option<Waiter>) {
        self.pending_bytes += bodies.iter().flatten().map(Bytes::len).sum::<usize>() + 32;
        self.pushed_since_durable += 1;
        let target = match &cmd {
            Command::Enqueue { .. } => self.merge_target(enqueue_may_pass, |c| matches!(c, Command::Enqueue { .. })),
            Command::Settle { consumer, outcome, .. } => self.merge_target(settle_may_pass, |c| {
                matches!(c, Command::Settle { consumer: c2, outcome: o2, .. } if c2 == consumer && o2 == outcome)
            }),
            Command::Checkout { consumer, .. } => self.merge_target(checkout_may_pass, |c| {
                matches!(c, Command::Checkout { consumer: c2, .. } if c2 == consumer)
            }),
            _ => None,
        };
        let Some(at) = target else {
            self.pending.push(Pending { cmd, bodies, waiter });
            return;
        };
        let Some(into) = self.pending.get_mut(at) else { return };
        match (&mut into.cmd, cmd) {
            (Command::Enqueue { msgs, .. }, Command::Enqueue { msgs: more, .. }) => {
                let n = more.len();
                msgs.extend(more);
                into.bodies.extend(bodies);
                let txs = match waiter {
                    Some(Waiter::Enqueue(txs)) => txs,
                    _ => (0..n).map(|_| None).collect(),
                };
                match &mut into.waiter {
                    Some(Waiter::Enqueue(all)) => all.extend(txs),
                    other => {
                        let mut all: Vec<Option<Tx<()>>> = Vec::new();
                        all.resize_with(msgs.len() - n, || None);
                        all.extend(txs);
                        *other = Some(Waiter::Enqueue(all));
                    }
                }
            }
            (Command::Settle { seqs, .. }, Command::Settle { seqs: more, .. }) => seqs.extend(more),
            (Command::Checkout { seqs, .. }, Command::Checkout { seqs: more, .. }) => {
                seqs.extend(more.iter().copied());
                match (&mut into.waiter, waiter) {
                    (Some(Waiter::Checkout { seqs: taken, .. }), Some(Waiter::Checkout { seqs: more_taken, .. })) => {
                        taken.extend(more_taken);
                    }
                    (_, Some(other)) => self.finish_failed(other, Error::Corrupt("checkout merge".to_owned())),
                    _ => {}
                }
            }
            (_, cmd) => self.pending.push(Pending { cmd, bodies, waiter }),
        }
    }

    /// The pending command a new one may be merged into: the last one
    /// matching `target`, with only commands that `may_pass` after it.
    fn merge_target(&self, may_pass: fn(&Command) -> bool, target: impl Fn(&Command) -> bool) -> Option<usize> {
        for (i, p) in self.pending.iter().enumerate().rev() {
            if target(&p.cmd) {
                return Some(i);
            }
            if !may_pass(&p.cmd) {
                return None;
            }
        }
        None
    }

    /// Whether the pending commands should go out now: nothing of this
    /// group is being written (everything that arrived meanwhile goes in
    /// one entry), or the entry is big enough.
    fn flush_due(&self) -> bool {
        if self.volatile {
            // Everything a caller queued until the driver runs (woken by
            // the first) goes in one entry: one entry per message would
            // cost more than the disk writes the volatile log saves.
            return !self.pending.is_empty() && (self.driving || self.pending_bytes >= self.max_entry_bytes());
        }
        !self.pending.is_empty()
            && (self.group.store().in_flight() == 0
                || self.pending_bytes >= self.max_entry_bytes()
                // A single voter applies (and delivers) before the fsync:
                // waiting for one would hold the checkout of what it
                // applied back again.
                || (self.applies_early() && self.group.store().appends_in_flight() < self.early_appends()))
    }

    /// How many appends a single voter lets wait for the disk before it
    /// batches (`EARLY_APPENDS_*`).
    fn early_appends(&self) -> usize {
        if self.pushed_per_fsync <= LIGHT_COMMANDS_PER_FSYNC {
            EARLY_APPENDS_LIGHT
        } else {
            EARLY_APPENDS_BUSY
        }
    }

    fn max_entry_bytes(&self) -> usize {
        self.max_entry_bytes
    }

    /// Proposes the pending commands as one entry.
    fn flush(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        self.pending_bytes = 0;
        if pending.is_empty() {
            return;
        }
        let mut cmds = Vec::with_capacity(pending.len());
        let mut bodies = Vec::new();
        let mut waiters = Vec::with_capacity(pending.len());
        for p in pending {
            cmds.push(p.cmd);
            bodies.extend(p.bodies);
            waiters.push(p.waiter);
        }
        let in_entry: &[[Bytes; 2]] = if self.volatile { &[] } else { &bodies };
        let result = if self.group.is_leader() {
            encode_entry(&cmds, in_entry).and_then(|data| match self.group.propose(data) {
                Ok(id) => Ok(id),
                // A leadership transfer, or the uncommitted log at its
                // limit: try again (there or at the next leader).
                Err(crate::consensus::Error::ProposalDropped) => Err(self.not_leader()),
                Err(e) => Err(consensus_error(e)),
            })
        } else {
            Err(self.not_leader())
        };
        match result {
            Ok(id) => {
                let bodies = if self.volatile { bodies } else { Vec::new() };
                self.waiters.insert(id, Proposed { waiters, bodies });
            }
            Err(e) => {
                tracing::debug!(error = %e, "queue entry not proposed");
                for waiter in waiters.into_iter().flatten() {
                    self.finish_failed(waiter, dup(&e));
                }
            }
        }
    }

    /// Sends the confirms whose writes became durable, in order.
    fn release_synced(&mut self) {
        let durable = self.group.store().durable_number().unwrap_or(0);
        if durable > self.durable_seen {
            self.durable_seen = durable;
            self.pushed_per_fsync = std::mem::take(&mut self.pushed_since_durable);
        }
        while self.unsynced.front().is_some_and(|(n, _)| *n <= durable) {
            let Some((_, tx)) = self.unsynced.pop_front() else { break };
            let _ = tx.send(Ok(()));
        }
    }

    /// Where a publish confirm of entry `index` must wait (single voter, its
    /// write not durable yet, or something before it waits): the write
    /// number to wait for. Also once a learner came (no longer applying
    /// early): the entry may have been reported persisted before.
    fn hold_for(&self, index: u64) -> Option<u64> {
        if !self.single_voter() {
            return None;
        }
        self.group.store().write_holding(index).or_else(|| (!self.unsynced.is_empty()).then_some(0))
    }

    /// Fails every waiter (proposed and pending) with `error()`.
    fn fail_waiters(&mut self, error: impl Fn() -> Error) {
        for (_, proposed) in std::mem::take(&mut self.waiters) {
            for waiter in proposed.waiters.into_iter().flatten() {
                self.finish_failed(waiter, error());
            }
        }
        self.fail_pending(error);
    }

    fn fail_pending(&mut self, error: impl Fn() -> Error) {
        self.pending_bytes = 0;
        for p in std::mem::take(&mut self.pending) {
            if let Some(waiter) = p.waiter {
                self.finish_failed(waiter, error());
            }
        }
    }

    fn finish_failed(&mut self, waiter: Waiter, error: Error) {
        match waiter {
            Waiter::Enqueue(txs) => {
                for tx in txs.into_iter().flatten() {
                    let _ = tx.send(Err(dup(&error)));
                }
            }
            Waiter::Done(tx) => {
                let _ = tx.send(Err(error));
            }
            Waiter::Checkout { consumer, seqs } => {
                for seq in seqs {
                    self.in_checkout.remove(&seq);
                    consumer.undo_acquire();
                }
            }
            Waiter::Attach { id, tx, .. } | Waiter::Requeued { id, tx, .. } => {
                self.attaching.remove(&id);
                let _ = tx.send(Err(error));
            }
            Waiter::Get(tx) => {
                let _ = tx.send(Err(error));
            }
            Waiter::Purge(tx) | Waiter::Delete(tx) => {
                let _ = tx.send(Err(error));
            }
        }
    }

    /// Forgets everything only a leader keeps.
    fn drop_leader_state(&mut self) {
        let leader = self.group.leader();
        self.fail_waiters(move || Error::NotLeader { leader });
        self.consumers.clear();
        self.attaching.clear();
        self.in_checkout.clear();
        self.cache.clear();
        self.cursor = 0;
        self.leader_since = None;
        self.dl_in_flight.clear();
        self.dl_retry_at = None;
        self.dl_sent_at = None;
        self.expire_inflight = false;
    }

    /// Replaces the state with a checkpoint's (or, for `None`, the empty
    /// queue of the bootstrap snapshot).
    fn load(&mut self, checkpoint: Option<Checkpoint>) -> Result<(), Error> {
        self.cache.clear();
        match checkpoint {
            None => {
                self.sm = QueueSm::with_limits(self.limits);
                self.batches.clear();
                self.state_at = 0;
            }
            Some(cp) => {
                self.sm = QueueSm::restore(cp.sm).map_err(|e| Error::Corrupt(format!("queue snapshot: {e:?}")))?;
                self.sm.set_limits(self.limits);
                self.batches = Batches::from_vec(cp.batches);
                self.state_at = cp.state_at;
                // The snapshot's configuration is the one applied at
                // `state_at` (see `try_checkpoint`).
                self.group.skip_conf_changes_through(cp.state_at);
                self.conf_changed_at = self.conf_changed_at.max(cp.conf_changed_at);
            }
        }
        self.deleted = self.sm.is_deleted();
        Ok(())
    }

    /// The message `seq`, read from the cache or back from its log entry.
    fn message(&mut self, seq: Seq) -> Result<Message, Error> {
        let (index, position) =
            self.batches.locate(seq).ok_or_else(|| Error::Corrupt(format!("no log entry known for seq {seq}")))?;
        if self.volatile {
            let [head, body] = self
                .side_bodies
                .get(&index)
                .and_then(|bodies| bodies.get(position as usize))
                .ok_or_else(|| Error::Corrupt(format!("no body {position} kept for entry {index}")))?;
            return record::decode_parts(head, body);
        }
        let data = match self.cache.get(index) {
            Some(data) => data,
            None => {
                let entries = self
                    .group
                    .store()
                    .entries(index, index + 1, None)
                    .map_err(|e| Error::Corrupt(format!("reading log entry {index}: {e}")))?;
                let data = entries
                    .into_iter()
                    .next()
                    .map(|entry| entry.data)
                    .ok_or_else(|| Error::Corrupt(format!("log entry {index} missing")))?;
                self.cache.read_back(index, data.clone());
                data
            }
        };
        record::decode(&entry_body(index, &data, position)?)
    }
}

/// One replica of a replicated queue. See the module docs.
pub struct ReplicatedQueue {
    spec: QueueSpec,
    store: Store,
    opts: ReplicaOptions,
    // std Mutex: never held across .await.
    inner: Mutex<Inner>,
    wake: Arc<Notify>,
    driver: Mutex<Option<JoinHandle<()>>>,
    me: Weak<ReplicatedQueue>,
    meter: crate::QueueMeter,
    /// The queue's limits (from its definition, as the state machine's).
    limits: Limits,
    /// Leader: deliveries fall behind publishes ([`Queue::lagging`]).
    lagging: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ReplicatedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedQueue")
            .field("name", &self.spec.name)
            .field("id", &self.spec.id)
            .field("me", &self.opts.me)
            .finish()
    }
}

/// What the driver does next.
enum Drive {
    /// Await this marker write (raft writes are in flight).
    Marker(Completion),
    Idle,
    /// The replica is closed, deleted or failed.
    Stop,
}

/// What the leader keeps of one proposed entry until it applies.
#[derive(Default)]
struct Proposed {
    /// The waiter of each of its commands.
    waiters: Vec<Option<Waiter>>,
    /// Volatile only: its bodies, kept beside the entry.
    bodies: Vec<[Bytes; 2]>,
}

/// Figures of a replica, for tests and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicaStats {
    /// First index still in the log (entries below are compacted).
    pub first_index: u64,
    /// Last index of the log.
    pub last_index: u64,
    /// Applied index of the last checkpoint (where a restart resumes).
    pub checkpoint_index: u64,
    /// Log index up to which the state machine reflects the log.
    pub applied_index: u64,
    /// Batches of live messages (one per enqueue entry still needed).
    pub batches: usize,
    /// Bytes of log entries held in the body cache.
    pub cached_bytes: usize,
    /// Volatile only: applied entries whose bodies are kept beside the
    /// log (from the oldest one with a live message on).
    pub side_entries: usize,
    /// Raft writes handed to the store and not yet settled.
    pub writes_in_flight: usize,
}

impl ReplicatedQueue {
    /// Opens this node's replica of the queue's group on `store` (creating
    /// the group with `opts.voters` if the store holds none) and starts its
    /// driver task on `runtime`. A previous handle of the same replica must
    /// be dropped first.
    ///
    /// A group whose only voter is this replica is made ready here: `open`
    /// blocks until the log after the last checkpoint is re-applied and
    /// `GatewayDown` for `opts.gateway` has committed (consumers of the
    /// previous process give back what they held). With several voters it
    /// returns at once; the replica follows or leads once raft-rs has
    /// elected someone.
    pub fn open(
        spec: QueueSpec,
        store: Store,
        mut opts: ReplicaOptions,
        runtime: &tokio::runtime::Handle,
    ) -> Result<Arc<Self>, Error> {
        if opts.volatile {
            // Compacting a volatile log writes nothing: do it often, so
            // consumed messages leave memory soon.
            opts.checkpoint_entries = opts.checkpoint_entries.min(VOLATILE_CHECKPOINT_ENTRIES);
            opts.checkpoint_bytes = opts.checkpoint_bytes.min(VOLATILE_CHECKPOINT_BYTES);
        }
        // Every write of an earlier handle was submitted before it was
        // dropped; wait until the storage has applied them all, so that
        // opening the log sees them.
        let (_barrier, applied) = store.write_tracked(Vec::new(), false);
        let deadline = Instant::now() + BLOCKING_TIMEOUT;
        while !applied.is_settled() {
            if Instant::now() > deadline {
                return Err(Error::Corrupt("storage did not answer".to_owned()));
            }
            std::thread::sleep(BLOCKING_POLL);
        }
        let group_id = spec.id.0;
        let log = if opts.join || FjallLogStore::exists(&store, group_id).map_err(log_error)? {
            FjallLogStore::open(store.clone(), group_id).map_err(log_error)?
        } else if opts.volatile {
            FjallLogStore::bootstrap_volatile(store.clone(), group_id, &[opts.me]).map_err(log_error)?
        } else {
            let voters = if opts.voters.is_empty() { vec![opts.me] } else { opts.voters.clone() };
            FjallLogStore::bootstrap(store.clone(), group_id, &voters, &[], Bytes::new()).map_err(log_error)?
        };
        // The checkpoint written with the apply state, unless a newer
        // snapshot replaces it (the group then hands that out first).
        let restoring = log.snapshot_metadata().index > log.apply_state().index;
        let resume_at = log.apply_state().index;
        let checkpoint = if restoring {
            None
        } else {
            match store.log_meta(group_id, TAG_QUEUE_CHECKPOINT).map_err(Error::Storage)? {
                Some(data) => {
                    let cp = Checkpoint::decode(&data)?;
                    if cp.state_at != resume_at {
                        return Err(Error::Corrupt(format!(
                            "queue {}: checkpoint at {} but apply state at {resume_at}",
                            spec.name, cp.state_at
                        )));
                    }
                    Some(cp)
                }
                None if resume_at > BOOTSTRAP_INDEX => {
                    return Err(Error::Corrupt(format!("queue {}: apply state without checkpoint", spec.name)));
                }
                None => None,
            }
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let group = Group::open(&GroupConfig::new(opts.me), log, &logger).map_err(consensus_error)?;
        let tick = opts.tick;
        let limits = spec.limits();
        let mut inner = Inner {
            group,
            sm: QueueSm::with_limits(limits),
            limits,
            batches: Batches::default(),
            cache: BodyCache::new(opts.body_cache_bytes, opts.body_cache_budget.clone()),
            state_at: 0,
            conf_changed_at: 0,
            checkpoint_at: resume_at,
            bytes_since_checkpoint: 0,
            snapshot_wanted: false,
            max_entry_bytes: opts.max_entry_bytes,
            volatile: opts.volatile,
            side_bodies: BTreeMap::new(),
            driving: false,
            consumers: BTreeMap::new(),
            attaching: BTreeSet::new(),
            in_checkout: BTreeSet::new(),
            pending: Vec::new(),
            pending_bytes: 0,
            pushed_since_durable: 0,
            pushed_per_fsync: 0,
            durable_seen: 0,
            waiters: HashMap::new(),
            leading: false,
            last_used: Instant::now(),
            expiry_reported: false,
            leader_since: None,
            // Ids of in-process consumers must not collide with those
            // of an earlier leadership of this replica.
            next_connection: rand::random::<u64>() >> 16,
            cursor: 0,
            failed: None,
            closed: false,
            deleted: false,
            linger: 0,
            stopped: false,
            removed: false,
            acked: HashMap::new(),
            dl_in_flight: BTreeSet::new(),
            dl_retry_at: None,
            dl_sent_at: None,
            dead_lettered: 0,
            unsynced: VecDeque::new(),
            expire_inflight: false,
        };
        if checkpoint.is_some() {
            inner.load(checkpoint)?;
        }
        let queue = Arc::new_cyclic(|me| ReplicatedQueue {
            limits,
            spec,
            store,
            opts,
            inner: Mutex::new(inner),
            wake: Arc::new(Notify::new()),
            driver: Mutex::new(None),
            me: me.clone(),
            meter: crate::QueueMeter::default(),
            lagging: std::sync::atomic::AtomicBool::new(false),
        });
        let single = queue.lock().single_voter();
        if single {
            // The driver task is not running yet: this thread drives.
            queue.lock().driving = true;
            queue.open_single_voter()?;
            queue.lock().driving = false;
        }
        let handle = runtime.spawn(drive(Arc::downgrade(&queue), queue.wake.clone(), tick));
        *queue.driver.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(queue)
    }

    /// Single voter: replay, become leader, commit `GatewayDown` for our
    /// gateway, blocking the thread meanwhile.
    fn open_single_voter(&self) -> Result<(), Error> {
        self.wait_blocking(|inner| Ok(inner.group.is_leader().then_some(())))?;
        // Proposed as leader, so after every entry of the old log: once it
        // applies, the replay is complete.
        self.commit_blocking(Command::GatewayDown { gateway: self.opts.gateway.clone() })?;
        if self.opts.drop_transient_on_open {
            self.commit_blocking(Command::DropTransient)?;
        }
        // A single voter delivers before the checkout is durable: after a
        // crash any ready message may have gone out (and its checkout been
        // lost), so each comes back flagged, as RabbitMQ's classic queues
        // do after an unclean shutdown.
        if self.store.opened_after_crash() {
            self.commit_blocking(Command::MarkRedelivered)?;
        }
        Ok(())
    }

    /// Proposes `cmd` alone and blocks the thread until it applied.
    fn commit_blocking(&self, cmd: Command) -> Result<(), Error> {
        let mut rx = {
            let mut inner = self.lock();
            let (tx, rx) = oneshot::channel();
            self.propose_entry(&mut inner, cmd, Vec::new(), Some(Waiter::Done(tx)))?;
            rx
        };
        self.wait_blocking(|_| match rx.try_recv() {
            Ok(result) => result.map(Some),
            Err(oneshot::error::TryRecvError::Empty) => Ok(None),
            Err(oneshot::error::TryRecvError::Closed) => Err(Error::ShuttingDown),
        })
    }

    /// Stops accepting work, proposes what is pending, writes a checkpoint,
    /// waits until every raft write submitted so far is settled and stops
    /// the driver; waiters still pending fail with [`Error::ShuttingDown`].
    /// Dropping the replica without it is safe too (`open` waits for the
    /// storage, and replays the log after the last checkpoint).
    pub async fn close(&self) {
        {
            let mut inner = self.lock();
            if !inner.inert() && !inner.closed && inner.leading {
                inner.flush();
                self.pump(&mut inner);
            }
            inner.closed = true;
            self.pump(&mut inner);
        }
        let mut checkpointed = false;
        loop {
            let marker = {
                let mut inner = self.lock();
                self.pump(&mut inner);
                if inner.inert() {
                    break;
                }
                if inner.group.store().in_flight() == 0 {
                    if checkpointed || inner.deleted {
                        break;
                    }
                    // Once everything applied: the next open replays nothing.
                    checkpointed = true;
                    self.checkpoint(&mut inner, true);
                    continue;
                }
                self.store.write(Vec::new(), false)
            };
            let _ = marker.await;
        }
        {
            let mut inner = self.lock();
            if inner.deleted {
                self.stop_deleted(&mut inner);
            }
            inner.fail_waiters(|| Error::ShuttingDown);
            inner.consumers.clear();
            inner.attaching.clear();
            inner.in_checkout.clear();
            inner.cache.clear();
        }
        if let Some(handle) = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }

    /// Removes this replica from the node: [`Self::close`], then deletes
    /// its raft log and records (and the queue's messages) from the store,
    /// waiting for that write. For a replica whose queue the metadata no
    /// longer has (deleted while this replica was down, or moved away).
    /// The handle refuses everything afterwards.
    pub async fn destroy(&self) {
        self.close().await;
        {
            let mut inner = self.lock();
            inner.stopped = true;
        }
        if let Err(e) = self.store.write(destroy_ops(self.spec.id.0), true).await {
            tracing::warn!(queue = %self.spec.name, error = %e, "replica records not removed");
        }
    }

    /// (ready, consumers) once everything proposed here before the call has
    /// applied (a `Barrier` entry rides with the next batch): a publish or
    /// a cancel made just before is counted. Leader only.
    pub fn counts_synced(&self) -> Reply<(u32, u32)> {
        let rx = {
            let mut inner = self.lock();
            let (tx, rx) = oneshot::channel();
            // Also drops the expired head, so the count leaves it out.
            let cmd = Command::Expire { now_ms: now_ms() };
            if let Err(e) = self.propose_entry(&mut inner, cmd, Vec::new(), Some(Waiter::Done(tx))) {
                return ready(Err(e));
            }
            self.pump(&mut inner);
            rx
        };
        self.wake.notify_one();
        let me = self.me.clone();
        Box::pin(async move {
            rx.await.unwrap_or(Err(Error::ShuttingDown))?;
            me.upgrade().map(|q| q.counts_now()).ok_or(Error::ShuttingDown)
        })
    }

    /// Tells every consumer attached here that the queue is gone (their
    /// sinks get `cancelled`; AMQP consumers receive basic.cancel) and
    /// forgets them. For a queue the metadata deleted.
    pub fn cancel_consumers(&self) {
        let consumers = std::mem::take(&mut self.lock().consumers);
        for c in consumers.into_values() {
            c.sink.cancelled(&c);
        }
    }

    /// Feeds a raft message from a peer. Messages that are not valid peer
    /// messages are dropped (logged); so is everything after `close`.
    pub fn step(&self, msg: raft::eraftpb::Message) {
        let mut inner = self.lock();
        if inner.inert() || inner.closed {
            return;
        }
        if msg.get_msg_type() == MessageType::MsgAppendResponse && !msg.reject {
            let acked = inner.acked.entry(msg.from).or_insert(0);
            *acked = (*acked).max(msg.index);
        }
        if let Err(e) = inner.group.step(msg) {
            tracing::debug!(queue = %self.spec.name, error = %e, "raft message dropped");
            return;
        }
        self.pump(&mut inner);
        let writing = inner.group.store().in_flight() > 0;
        drop(inner);
        if writing {
            self.wake.notify_one();
        }
    }

    /// The leader this replica knows of (itself when leading).
    pub fn leader(&self) -> Option<u64> {
        self.lock().group.leader()
    }

    /// Whether this replica is the group's leader (as far as it knows: an
    /// isolated old leader believes it is until its election timeout).
    pub fn is_leader(&self) -> bool {
        self.lock().group.is_leader()
    }

    /// This replica's raft id.
    pub fn raft_id(&self) -> u64 {
        self.opts.me
    }

    /// The queue (= group) id.
    pub fn queue_id(&self) -> QueueId {
        self.spec.id
    }

    /// The current raft term.
    pub fn term(&self) -> u64 {
        self.lock().group.term()
    }

    /// The index of the last entry applied here.
    pub fn applied_index(&self) -> u64 {
        self.lock().group.applied().index
    }

    /// Log, checkpoint and cache figures.
    pub fn stats(&self) -> ReplicaStats {
        let inner = self.lock();
        let store = inner.group.store();
        ReplicaStats {
            first_index: store.first_index(),
            last_index: store.last_index(),
            checkpoint_index: inner.checkpoint_at,
            applied_index: inner.group.applied().index.max(inner.state_at),
            batches: inner.batches.len(),
            cached_bytes: inner.cache.bytes(),
            side_entries: inner.side_bodies.len(),
            writes_in_flight: store.in_flight(),
        }
    }

    /// Whether `Delete` has been applied here (the replica stops, or has
    /// stopped, and its log is, or is being, removed).
    pub fn is_deleted(&self) -> bool {
        let inner = self.lock();
        inner.deleted || (inner.stopped && !inner.removed)
    }

    /// Whether this replica applied its own removal from the group (it has
    /// stopped and its records are, or are being, removed): the host drops
    /// it.
    pub fn is_removed(&self) -> bool {
        self.lock().removed
    }

    /// The applied configuration: (voters, learners), sorted. During a
    /// joint change, the incoming voters.
    pub fn voters(&self) -> (Vec<u64>, Vec<u64>) {
        let inner = self.lock();
        let conf = inner.group.conf_state();
        let (mut voters, mut learners) = (conf.voters.clone(), conf.learners.clone());
        voters.sort_unstable();
        learners.sort_unstable();
        (voters, learners)
    }

    /// Whether the applied configuration is a joint one (a change between
    /// its two steps).
    pub fn is_joint(&self) -> bool {
        !self.lock().group.conf_state().voters_outgoing.is_empty()
    }

    /// Changes the group's voters to `target` (leader only, else
    /// [`Error::NotLeader`]): adds the missing ones as learners, waits until
    /// each has acknowledged the commit index, then promotes them and
    /// removes the voters and learners not in `target` in one
    /// joint-consensus change (raft-rs leaves the joint configuration by
    /// itself). Every step is decided from the applied configuration
    /// ([`reconfig::next_step`]), so a call after a failure or a leader
    /// change resumes where the group is. If this replica is not in
    /// `target`, it stays a voter until the others are in, then hands
    /// leadership to the most caught-up target voter and answers
    /// `NotLeader` (the new leader's call removes it). Fails with
    /// [`Error::Unavailable`] if it does not finish within
    /// [`CHANGE_TIMEOUT`].
    pub fn change_voters(&self, target: Vec<u64>) -> Reply<()> {
        let Some(me) = self.me.upgrade() else { return ready(Err(Error::ShuttingDown)) };
        Box::pin(async move { me.reconfigure(target).await })
    }

    async fn reconfigure(&self, target: Vec<u64>) -> Result<(), Error> {
        if target.is_empty() {
            return Err(Error::Unavailable("a queue group needs at least one voter".to_owned()));
        }
        let deadline = Instant::now() + CHANGE_TIMEOUT;
        // The commit index each learner must acknowledge, as it was when
        // the wait for it started.
        let mut catch_up: HashMap<u64, u64> = HashMap::new();
        loop {
            {
                let mut inner = self.lock();
                inner.check()?;
                if !inner.group.is_leader() {
                    return Err(inner.not_leader());
                }
                let commit = inner.group.commit_index();
                let conf = inner.group.conf_state().clone();
                let step = {
                    let acked = &inner.acked;
                    reconfig::next_step(&conf, &target, self.opts.me, |id| {
                        let want = *catch_up.entry(id).or_insert(commit);
                        acked.get(&id).is_some_and(|a| *a >= want)
                    })
                };
                let cc = match step {
                    Step::Done => return Ok(()),
                    Step::CatchUp(_) => None,
                    Step::LeaveJoint => Some(raft::eraftpb::ConfChangeV2::default()),
                    Step::AddLearner(id) => {
                        inner.acked.remove(&id);
                        catch_up.remove(&id);
                        Some(reconfig::single_change(raft::eraftpb::ConfChangeType::AddLearnerNode, id))
                    }
                    Step::Change(cc) => Some(cc),
                    Step::TransferTo(ids) => {
                        let to = ids
                            .iter()
                            .filter(|id| **id != self.opts.me && conf.voters.contains(id))
                            .map(|id| (inner.acked.get(id).copied().unwrap_or(0), *id))
                            .max()
                            .map(|(_, id)| id);
                        if let Some(to) = to {
                            tracing::debug!(queue = %self.spec.name, to, "leaving the group: transferring leadership");
                            inner.group.transfer_leader(to);
                            self.pump(&mut inner);
                        }
                        None
                    }
                };
                if let Some(cc) = cc {
                    match inner.group.propose_conf_change(cc) {
                        Ok(_) => self.pump(&mut inner),
                        Err(
                            crate::consensus::Error::ConfChangePending | crate::consensus::Error::ProposalDropped,
                        ) => {}
                        Err(crate::consensus::Error::ConfChangeRefused(why)) => {
                            return Err(Error::Unavailable(format!("queue configuration change refused: {why}")));
                        }
                        Err(e) => return Err(consensus_error(e)),
                    }
                }
            }
            self.wake.notify_one();
            if Instant::now() > deadline {
                return Err(Error::Unavailable(format!(
                    "queue {}: the configuration change did not finish in {} s",
                    self.spec.name,
                    CHANGE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(self.opts.tick).await;
        }
    }

    /// Proposes a publish (leader only: otherwise [`Error::NotLeader`]).
    /// Always returns `Some`: the [`Durable`] resolves `Ok` once the entry
    /// is committed and applied, and fails with `NotLeader` if this
    /// replica stopped leading first (the entry may still commit: retry at
    /// the new leader with the same `publish_id`).
    pub fn publish_as(&self, message: Message, publish_id: Option<PublishId>) -> Result<Option<Durable>, Error> {
        let (tx, rx) = oneshot::channel();
        self.propose_publish(&message, publish_id, Some(tx))?;
        Ok(Some(reply(rx)))
    }

    fn propose_publish(
        &self,
        message: &Message,
        publish_id: Option<PublishId>,
        tx: Option<Tx<()>>,
    ) -> Result<(), Error> {
        let msg = self.new_msg(message, publish_id);
        let cmd = Command::Enqueue { now_ms: now_ms(), msgs: vec![msg] };
        let body = record::encode_parts(message);
        let mut inner = self.lock();
        self.propose_entry(&mut inner, cmd, vec![body], Some(Waiter::Enqueue(vec![tx])))?;
        Ok(())
    }

    /// What the state machine needs to know of a message it enqueues.
    fn new_msg(&self, message: &Message, publish_id: Option<PublishId>) -> NewMsg {
        let headers = message.properties.headers.as_ref();
        // A number, or (STOMP headers are strings) a string of one.
        let number = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse().ok())))
        };
        let delay_ms = number("x-delay")
            .filter(|_| {
                !message.exchange.is_empty()
                    && self.opts.delayed_exchange.as_ref().is_some_and(|f| f(&self.spec.vhost, &message.exchange))
            })
            .map(|d| u64::try_from(d).unwrap_or(0));
        let dedup_key = match self.limits.dedup_window {
            None => None,
            Some(_) => match headers.and_then(|h| h.get("x-deduplication-header")) {
                Some(v) => Some(match (v.as_str(), v.as_i64()) {
                    (Some(s), _) => s.to_owned(),
                    (None, Some(n)) => n.to_string(),
                    _ => format!("{v:?}"),
                }),
                None => message.properties.message_id.clone(),
            },
        };
        // Strict ordering: the producer's stamp (RabbitMQ's message
        // timestamp plugin writes `timestamp_in_ms`).
        let timestamp_ms = self.limits.strict_window.and(number("timestamp_in_ms")).and_then(|n| u64::try_from(n).ok());
        NewMsg {
            size: u32::try_from(message.body.len()).unwrap_or(u32::MAX),
            persistent: message.is_persistent(),
            publish_id,
            // An invalid expiration is refused by the gateway (406) before.
            ttl_ms: crate::backend::message_ttl(message).ok().flatten(),
            priority: message.properties.priority.unwrap_or(0),
            delay_ms,
            dedup_key,
            timestamp_ms,
        }
    }

    /// (Re)attaches a consumer with the gateway's id (leader only). Resolves
    /// once the attach is applied; deliveries start then. `held`: the seqs
    /// the gateway delivered to it and still holds (empty for a new
    /// consumer); whatever else the state machine shows it holding never
    /// reached the client and is requeued. An exclusivity conflict fails
    /// with [`Error::ExclusiveConsumer`].
    pub fn attach(&self, id: ConsumerId, consumer: Arc<Consumer>, held: Vec<Seq>) -> Reply<()> {
        self.propose_attach(id, consumer, Some(held))
    }

    fn propose_attach(&self, id: ConsumerId, consumer: Arc<Consumer>, held: Option<Vec<Seq>>) -> Reply<()> {
        let (tx, rx) = oneshot::channel();
        let opts = ConsumerOpts { exclusive: consumer.exclusive, no_ack: consumer.no_ack };
        let cmd = Command::Attach { consumer: id.clone(), opts };
        let mut inner = self.lock();
        let waiter = Waiter::Attach { id: id.clone(), consumer, held, tx };
        match self.propose_entry(&mut inner, cmd, Vec::new(), Some(waiter)) {
            Ok(()) => {
                inner.attaching.insert(id);
                reply(rx)
            }
            Err(e) => ready(Err(e)),
        }
    }

    /// basic.cancel: no more deliveries to `id`; what it holds stays held.
    pub fn detach(&self, id: &ConsumerId) {
        let mut inner = self.lock();
        inner.consumers.remove(id);
        inner.cursor = 0;
        self.propose_logged(&mut inner, Command::Detach { consumer: id.clone() }, "detach");
    }

    /// Settles seqs `id` holds (stale ones are ignored by the state machine).
    pub fn settle_as(&self, id: &ConsumerId, seqs: Vec<Seq>, outcome: Outcome) {
        if seqs.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let cmd = Command::Settle { consumer: id.clone(), seqs, outcome: outcome.into() };
        self.propose_logged(&mut inner, cmd, "settle");
    }

    /// The consumer's channel is closed: detach it and requeue everything
    /// it holds.
    pub fn return_all(&self, id: &ConsumerId) {
        let mut inner = self.lock();
        inner.consumers.remove(id);
        inner.cursor = 0;
        self.propose_logged(&mut inner, Command::Detach { consumer: id.clone() }, "detach");
        self.propose_logged(&mut inner, Command::ReturnAll { consumer: id.clone() }, "return");
    }

    /// The id under which `consumer` is attached here, if it is.
    fn consumer_id(&self, consumer: &Arc<Consumer>) -> Option<ConsumerId> {
        let inner = self.lock();
        inner.consumers.iter().find(|(_, c)| Arc::ptr_eq(c, consumer)).map(|(id, _)| id.clone())
    }

    /// The gateway is gone: detach its consumers, requeue what they hold.
    pub fn gateway_down(&self, gateway: &str) {
        let mut inner = self.lock();
        inner.consumers.retain(|id, _| id.gateway != gateway);
        inner.cursor = 0;
        self.propose_logged(&mut inner, Command::GatewayDown { gateway: gateway.to_owned() }, "gateway down");
    }

    /// basic.get for `holder` (leader only).
    pub fn get_as(&self, holder: ConsumerId, no_ack: bool) -> Reply<Option<(Delivery, u32)>> {
        self.touch();
        let (tx, rx) = oneshot::channel();
        self.propose_reply(Command::Get { holder, no_ack, now_ms: now_ms() }, Waiter::Get(tx), rx)
    }

    /// Deletes the queue (leader only). Every replica that applies it stops
    /// and removes its log and data from the store. Resolves with the
    /// number of ready messages dropped.
    pub fn delete(&self) -> Reply<u32> {
        let (tx, rx) = oneshot::channel();
        self.propose_reply(Command::Delete, Waiter::Delete(tx), rx)
    }

    /// `x-dead-letter-on-delete`, before the queue is deleted (leader
    /// only): every message becomes a dead letter (reason
    /// `queue_deleted`); resolves with their number once all of them
    /// are published to the dead-letter exchange (and gone from here),
    /// or fails after [`RETIRE_TIMEOUT`].
    pub fn retire(self: &Arc<Self>) -> Reply<u32> {
        let (tx, rx) = oneshot::channel();
        let moved = self.propose_reply(Command::Retire, Waiter::Purge(tx), rx);
        let me = self.clone();
        Box::pin(async move {
            let n = moved.await?;
            let deadline = Instant::now() + RETIRE_TIMEOUT;
            loop {
                let left = {
                    let inner = me.lock();
                    if inner.deleted || inner.closed {
                        return Err(Error::QueueDeleted);
                    }
                    inner.sm.dead_letter_count()
                };
                if left == 0 {
                    return Ok(n);
                }
                if Instant::now() >= deadline {
                    return Err(Error::Unavailable(format!("{left} dead letters not published yet")));
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    }

    fn purge_reply(&self) -> Reply<u32> {
        let (tx, rx) = oneshot::channel();
        self.propose_reply(Command::Purge, Waiter::Purge(tx), rx)
    }

    fn propose_reply<T: Send + 'static>(
        &self,
        cmd: Command,
        waiter: Waiter,
        rx: oneshot::Receiver<Result<T, Error>>,
    ) -> Reply<T> {
        let mut inner = self.lock();
        match self.propose_entry(&mut inner, cmd, Vec::new(), Some(waiter)) {
            Ok(()) => reply(rx),
            Err(e) => ready(Err(e)),
        }
    }

    /// Ready messages and attached consumers of the applied state.
    pub fn counts_now(&self) -> (u32, u32) {
        let inner = self.lock();
        (inner.sm.ready_count(), inner.sm.consumer_count())
    }

    /// The applied state's figures, without a log round trip (metrics).
    pub fn stats_now(&self) -> crate::QueueStats {
        let inner = self.lock();
        crate::QueueStats {
            ready: inner.sm.ready_count(),
            unacked: inner.sm.unacked_count(),
            consumers: inner.sm.consumer_count(),
            ready_bytes: inner.sm.ready_bytes(),
            dead_lettered: inner.dead_lettered,
        }
    }

    /// Replication figures of this replica (metrics): whether it leads,
    /// and as leader the entries the furthest behind follower lacks.
    pub fn replication(&self) -> (bool, u64) {
        let inner = self.lock();
        match inner.group.max_follower_lag() {
            Some(lag) => (true, lag),
            None => (false, 0),
        }
    }

    /// The applied state's held (delivered, unsettled) messages.
    pub fn unacked_count(&self) -> u32 {
        self.lock().sm.unacked_count()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues `cmd` (with its bodies and waiter) for the next entry (leader
    /// only), and proposes it now if nothing is being written.
    fn propose_entry(
        &self,
        inner: &mut Inner,
        cmd: Command,
        bodies: Vec<[Bytes; 2]>,
        waiter: Option<Waiter>,
    ) -> Result<(), Error> {
        inner.check()?;
        if !inner.group.is_leader() {
            return Err(inner.not_leader());
        }
        inner.push(cmd, bodies, waiter);
        if inner.flush_due() {
            inner.flush();
            self.pump(inner);
            self.wake.notify_one();
        } else if inner.volatile {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Proposes `cmd` without a waiter; a failure is only logged.
    fn propose_logged(&self, inner: &mut Inner, cmd: Command, what: &str) {
        if let Err(e) = self.propose_entry(inner, cmd, Vec::new(), None) {
            tracing::debug!(queue = %self.spec.name, error = %e, "{what} not proposed");
        }
    }

    /// Pumps until `done` answers, blocking the thread between polls.
    fn wait_blocking<T>(&self, mut done: impl FnMut(&mut Inner) -> Result<Option<T>, Error>) -> Result<T, Error> {
        let deadline = Instant::now() + BLOCKING_TIMEOUT;
        loop {
            {
                let mut inner = self.lock();
                self.pump(&mut inner);
                if let Some(why) = &inner.failed {
                    return Err(Error::Corrupt(why.clone()));
                }
                if inner.stopped {
                    return Err(Error::QueueDeleted);
                }
                if let Some(value) = done(&mut inner)? {
                    return Ok(value);
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Corrupt(format!("queue {}: raft group made no progress", self.spec.name)));
            }
            std::thread::sleep(BLOCKING_POLL);
        }
    }

    /// One tick of the logical clock.
    fn tick(&self) {
        let mut inner = self.lock();
        if inner.inert() || inner.closed {
            return;
        }
        inner.group.tick();
        inner.linger = inner.linger.saturating_sub(1);
        if inner.leading && !inner.deleted {
            self.propose_timers(&mut inner);
            self.check_unused(&mut inner);
        }
        self.pump(&mut inner);
    }

    /// Leader: proposes [`Command::Expire`] when a timer of the state
    /// machine is due (TTL, delays, visibility timeouts: the state machine
    /// has no clock, the time is in the command).
    fn propose_timers(&self, inner: &mut Inner) {
        let now = now_ms();
        let due = inner.sm.next_timer().is_some_and(|at| at <= now);
        if due && !inner.expire_inflight {
            inner.expire_inflight = true;
            self.propose_logged(inner, Command::Expire { now_ms: now }, "expire");
        }
    }

    /// Leader: how long until the next timer of the state machine is due
    /// (the driver wakes up then rather than at its next tick).
    fn next_timer_in(inner: &Inner) -> Option<Duration> {
        if !inner.leading || inner.deleted || inner.closed {
            return None;
        }
        // An `Expire` on its way: the tick looks again if it never applies.
        if inner.expire_inflight {
            return None;
        }
        let at = inner.sm.next_timer()?;
        Some(Duration::from_millis(at.saturating_sub(now_ms())))
    }

    /// The driver's timer fired.
    fn fire_timers(&self) {
        let mut inner = self.lock();
        if inner.inert() || inner.closed || !inner.leading || inner.deleted {
            return;
        }
        self.propose_timers(&mut inner);
        self.pump(&mut inner);
    }

    /// `x-expires`: consumers count as use while attached; once the queue
    /// has gone unused for the time given, the node is told (once).
    fn check_unused(&self, inner: &mut Inner) {
        let Some(expires) = self.spec.expires() else { return };
        if inner.sm.consumer_count() > 0 || !inner.consumers.is_empty() {
            inner.last_used = Instant::now();
            return;
        }
        if inner.expiry_reported || inner.last_used.elapsed() < Duration::from_millis(expires) {
            return;
        }
        inner.expiry_reported = true;
        if let Some(report) = &self.opts.on_expired {
            tracing::info!(queue = %self.spec.name, expires_ms = expires, "queue unused: expired");
            report(self.spec.id);
        }
    }

    /// What the queue was opened with.
    pub fn spec(&self) -> &QueueSpec {
        &self.spec
    }

    /// The queue was used (redeclared): restarts its `x-expires` clock.
    pub fn touch(&self) {
        let mut inner = self.lock();
        inner.last_used = Instant::now();
        inner.expiry_reported = false;
    }

    /// Pumps and says what the driver should wait for (a marker write only
    /// if `want_marker` and raft writes are in flight), and how long until
    /// the next timer of the state machine is due.
    fn drive_once(&self, want_marker: bool) -> (Drive, Option<Duration>) {
        let mut inner = self.lock();
        if inner.inert() || inner.closed {
            return (Drive::Stop, None);
        }
        inner.driving = true;
        self.pump(&mut inner);
        inner.driving = false;
        if inner.inert() {
            return (Drive::Stop, None);
        }
        let timer = Self::next_timer_in(&inner);
        if want_marker && inner.group.store().in_flight() > 0 {
            // The oldest write itself, else a marker behind every write
            // (which may wait for a later write's fsync too).
            let next = inner.group.store_mut().take_oldest_completion().unwrap_or_else(|| self.store.write(Vec::new(), false));
            (Drive::Marker(next), timer)
        } else {
            (Drive::Idle, timer)
        }
    }

    /// Reports durable writes, campaigns (single voter), proposes
    /// checkouts and pending commands, sends and applies whatever the group
    /// hands out, until it has nothing more; then checkpoints if due. A
    /// failure poisons the replica (`Inner::failed`).
    fn pump(&self, inner: &mut Inner) {
        if inner.inert() {
            return;
        }
        if let Err(e) = self.try_pump(inner) {
            tracing::error!(queue = %self.spec.name, error = %e, "replicated queue failed");
            let why = e.to_string();
            inner.failed.get_or_insert_with(|| why.clone());
            inner.fail_waiters(|| Error::Corrupt(why.clone()));
            // Applied, but their writes may never be durable: no confirm.
            for (_, tx) in std::mem::take(&mut inner.unsynced) {
                let _ = tx.send(Err(Error::Corrupt(why.clone())));
            }
            inner.consumers.clear();
        }
    }

    fn try_pump(&self, inner: &mut Inner) -> Result<(), Error> {
        loop {
            if let Some(n) = inner.group.store_mut().poll_persisted().map_err(log_error)? {
                inner.group.on_persisted(n).map_err(consensus_error)?;
            }
            inner.release_synced();
            if inner.single_voter() && inner.group.role() == Role::Follower {
                inner.group.campaign().map_err(consensus_error)?;
            }
            self.note_role(inner);
            if inner.leading && !inner.closed && !inner.deleted {
                self.expire_unattached(inner);
                self.schedule(inner);
                self.dead_letter(inner);
                if inner.flush_due() {
                    inner.flush();
                }
            } else {
                self.lagging.store(false, std::sync::atomic::Ordering::Relaxed);
            }
            if !inner.group.has_ready() {
                break;
            }
            let Output { send, restore, committed, proposals, snapshot_wanted, removed, .. } =
                inner.group.ready().map_err(consensus_error)?;
            if removed {
                inner.removed = true;
            }
            if inner.applies_early() {
                // Apply before the fsync: a single voter commits and
                // applies what it handed to the store without waiting for
                // it to be durable; confirms wait (`unsynced`).
                let submitted = inner.group.last_ready();
                inner.group.on_persisted(submitted).map_err(consensus_error)?;
            }
            // `persist`: the writes are with the storage already; the
            // driver's marker writes wait for them.
            if !send.is_empty() {
                let snapshots: Vec<u64> =
                    send.iter().filter(|m| m.get_msg_type() == MessageType::MsgSnapshot).map(|m| m.to).collect();
                self.opts.transport.send(self.spec.id.0, send);
                for to in snapshots {
                    inner.group.report_snapshot(to, true);
                }
            }
            inner.snapshot_wanted |= snapshot_wanted;
            if let Some(snapshot) = restore {
                let data = snapshot.get_data();
                let checkpoint = if data.is_empty() { None } else { Some(Checkpoint::decode(data)?) };
                inner.load(checkpoint)?;
            }
            let mut gone = Vec::new();
            for committed in committed {
                self.apply(inner, committed, &mut gone)?;
            }
            for (id, outcome) in proposals {
                if outcome == ProposalOutcome::Committed {
                    continue;
                }
                if let Some(Proposed { waiters, .. }) = inner.waiters.remove(&id) {
                    let error = match outcome {
                        ProposalOutcome::Rejected => Error::Corrupt("proposal rejected".to_owned()),
                        ProposalOutcome::LeadershipLost | ProposalOutcome::Superseded | ProposalOutcome::Committed => {
                            inner.not_leader()
                        }
                    };
                    for waiter in waiters.into_iter().flatten() {
                        inner.finish_failed(waiter, dup(&error));
                    }
                }
            }
            self.drop_gone_consumers(inner, gone);
            self.note_role(inner);
        }
        if inner.removed {
            self.stop_removed(inner);
        } else if inner.deleted && (!inner.leading || inner.linger == 0 || inner.single_voter()) {
            self.stop_deleted(inner);
        } else if !inner.stopped {
            if let Some(oldest) = inner.batches.oldest_index() {
                inner.cache.trim_below(oldest);
                if inner.side_bodies.first_key_value().is_some_and(|(first, _)| *first < oldest) {
                    inner.side_bodies = inner.side_bodies.split_off(&oldest);
                }
            } else {
                inner.cache.clear();
                inner.side_bodies.clear();
            }
            let force = std::mem::take(&mut inner.snapshot_wanted);
            self.checkpoint(inner, force);
        }
        Ok(())
    }

    /// Writes a checkpoint if one is due (or `force`), and compacts the log
    /// up to the entry before the oldest one still holding a live message.
    fn checkpoint(&self, inner: &mut Inner, force: bool) {
        if let Err(e) = self.try_checkpoint(inner, force) {
            tracing::error!(queue = %self.spec.name, error = %e, "checkpoint failed");
            let why = e.to_string();
            inner.failed.get_or_insert_with(|| why.clone());
            inner.fail_waiters(|| Error::Corrupt(why.clone()));
            inner.consumers.clear();
        }
    }

    fn try_checkpoint(&self, inner: &mut Inner, force: bool) -> Result<(), Error> {
        if inner.inert() || inner.deleted {
            return Ok(());
        }
        let applied = inner.group.applied().clone();
        // A restored state ahead of the log: wait until the log caught up.
        if inner.state_at > applied.index || applied.index <= inner.checkpoint_at {
            return Ok(());
        }
        let entries = applied.index - inner.checkpoint_at;
        let size = CHECKPOINT_BYTES_PER_MSG * inner.sm.live_count() as u64
            + CHECKPOINT_BYTES_PER_BATCH * inner.batches.len() as u64;
        let bytes = inner.bytes_since_checkpoint;
        // A drained queue's checkpoint is tiny and lets the whole log go:
        // take it soon, so the disk space comes back when a queue empties.
        let drained = inner.sm.live_count() == 0 && entries >= DRAINED_CHECKPOINT_ENTRIES;
        let due = drained
            || ((entries >= self.opts.checkpoint_entries || bytes >= self.opts.checkpoint_bytes) && bytes >= 2 * size);
        if !force && !due {
            return Ok(());
        }
        // A volatile log has nobody to restore or catch up from a
        // checkpoint: it only compacts (to free the memory).
        let data = if self.opts.volatile {
            Bytes::new()
        } else {
            let checkpoint = CheckpointRef {
                state_at: applied.index,
                conf_changed_at: inner.conf_changed_at,
                sm: inner.sm.snapshot_ref(),
                batches: &inner.batches,
            };
            // One allocation of the checkpoint's size, shared by the two
            // records that store it and the log's snapshot.
            let data = checkpoint.encode()?;
            let op = Op::LogMeta { log: self.spec.id.0, tag: TAG_QUEUE_CHECKPOINT, value: Some(data.clone()) };
            inner.group.store_mut().save_apply_state_with(&applied, vec![op]).map_err(log_error)?;
            data
        };
        inner.checkpoint_at = applied.index;
        inner.bytes_since_checkpoint = 0;
        // Entries from the oldest one holding a live body on stay.
        let upto = inner.batches.oldest_index().map_or(applied.index, |i| i.saturating_sub(1)).min(applied.index);
        let compacted = inner.group.store().first_index().saturating_sub(1);
        // The snapshot's configuration is the applied one, possibly newer
        // than `upto`: a replica restoring it skips the configuration
        // changes up to `state_at` (`Inner::load`).
        if upto > compacted {
            inner.group.compact_to(upto, data).map_err(consensus_error)?;
            tracing::debug!(queue = %self.spec.name, upto, "log compacted");
        } else if upto == compacted && inner.group.store().snapshot_metadata().get_conf_state() != &applied.conf_state {
            // The compaction point cannot move (a live message holds it),
            // but a replica added since needs a snapshot that has it.
            let mut snapshot = raft::eraftpb::Snapshot { data, ..Default::default() };
            let meta = snapshot.mut_metadata();
            meta.index = compacted;
            meta.term = inner.group.store().snapshot_metadata().term;
            meta.set_conf_state(applied.conf_state.clone());
            if inner.group.store_mut().replace_snapshot(snapshot).map_err(log_error)? {
                tracing::debug!(queue = %self.spec.name, at = compacted, "snapshot replaced (new configuration)");
            }
        }
        Ok(())
    }

    /// Notices a change of leadership (see the module docs).
    fn note_role(&self, inner: &mut Inner) {
        let leading = inner.group.is_leader();
        if leading == inner.leading {
            return;
        }
        inner.leading = leading;
        if leading {
            tracing::debug!(queue = %self.spec.name, me = self.opts.me, term = inner.group.term(), "leading");
            inner.leader_since = Some(Instant::now());
            inner.last_used = Instant::now();
        } else {
            tracing::debug!(queue = %self.spec.name, me = self.opts.me, leader = ?inner.group.leader(), "not leading");
            inner.drop_leader_state();
        }
    }

    /// After the re-attach grace of a new leadership: consumers of the
    /// state machine that nobody re-attached are detached and what they
    /// hold is returned.
    fn expire_unattached(&self, inner: &mut Inner) {
        let Some(since) = inner.leader_since else { return };
        if since.elapsed() < self.opts.reattach_grace {
            return;
        }
        inner.leader_since = None;
        let stale: Vec<ConsumerId> = inner
            .sm
            .consumers()
            .map(|(id, _)| id)
            .filter(|id| !inner.consumers.contains_key(*id) && !inner.attaching.contains(*id))
            .cloned()
            .collect();
        for id in stale {
            tracing::debug!(queue = %self.spec.name, consumer = ?id, "not re-attached: returning its messages");
            inner.push(Command::Detach { consumer: id.clone() }, Vec::new(), None);
            inner.push(Command::ReturnAll { consumer: id }, Vec::new(), None);
        }
    }

    /// Leader: publishes the dead letters of the state machine that are
    /// not already on their way, on a task (a publish may go to this very
    /// queue, so never under the lock); [`Self::dead_lettered`] follows.
    fn dead_letter(&self, inner: &mut Inner) {
        let Some(sink) = self.opts.dead_letters.clone() else { return };
        if inner.sm.dead_letter_count() == 0 || inner.dl_retry_at.is_some_and(|at| Instant::now() < at) {
            return;
        }
        let Some(target) = dead_letter::Target::of(&self.spec.arguments) else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        if inner.dl_in_flight.is_empty() {
            inner.dl_sent_at = None;
        } else if inner.dl_sent_at.is_some_and(|at| at.elapsed() > DEAD_LETTER_STUCK) {
            tracing::warn!(queue = %self.spec.name, count = inner.dl_in_flight.len(), "dead letters unanswered: sending them again");
            inner.dl_in_flight.clear();
            inner.dl_sent_at = None;
        }
        let todo: Vec<(u64, crate::replica::queue_sm::DeadLetter)> = inner
            .sm
            .dead_letters()
            .filter(|(id, _)| !inner.dl_in_flight.contains(id))
            .take(DEAD_LETTER_BATCH)
            .map(|(id, dl)| (id, *dl))
            .collect();
        if todo.is_empty() {
            return;
        }
        let now_secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut sends = Vec::with_capacity(todo.len());
        let mut lost = Vec::new();
        inner.dl_sent_at.get_or_insert_with(Instant::now);
        for (id, dl) in todo {
            inner.dl_in_flight.insert(id);
            match inner.message(dl.seq) {
                Ok(message) => {
                    let message = dead_letter::rewrite(message, &self.spec.name, dl.reason, now_secs, &target);
                    sends.push((id, message));
                }
                Err(e) => {
                    tracing::error!(queue = %self.spec.name, seq = dl.seq, error = %e, "no body for a dead letter: dropped");
                    lost.push(id);
                }
            }
        }
        if !lost.is_empty() {
            inner.push(Command::DeadLettered { ids: lost }, Vec::new(), None);
        }
        let me = self.me.clone();
        let vhost = self.spec.vhost.clone();
        let publisher = dead_letter::publisher(self.spec.id.0);
        runtime.spawn(async move {
            // Started in order (so they reach each target in order), then
            // awaited.
            let started: Vec<(u64, Reply<()>)> = sends
                .into_iter()
                .map(|(id, message)| {
                    let pid = PublishId { publisher: publisher.clone(), id };
                    (id, sink.publish(&vhost, message, pid))
                })
                .collect();
            let mut done = Vec::new();
            let mut failed = Vec::new();
            for (id, reply) in started {
                // Bounded: a publish that never answers (a target replica
                // that changed under it) is tried again; the target's
                // deduplication drops a second copy.
                match tokio::time::timeout(DEAD_LETTER_TIMEOUT, reply).await {
                    Ok(Ok(())) => done.push(id),
                    Ok(Err(e)) => failed.push((id, e)),
                    Err(_) => failed.push((id, Error::Unavailable("dead letter publish timed out".to_owned()))),
                }
            }
            if let Some(q) = me.upgrade() {
                q.dead_lettered(done, failed);
            }
        });
    }

    /// Dead letters published (`done`: remove them from the queue) or not
    /// (`failed`: tried again after [`DEAD_LETTER_RETRY`]).
    fn dead_lettered(&self, done: Vec<u64>, failed: Vec<(u64, Error)>) {
        let mut inner = self.lock();
        if let Some((_, e)) = failed.first() {
            tracing::warn!(queue = %self.spec.name, count = failed.len(), error = %e, "dead letters not published; retrying");
            for (id, _) in &failed {
                inner.dl_in_flight.remove(id);
            }
            inner.dl_retry_at = Some(Instant::now() + DEAD_LETTER_RETRY);
        }
        if !done.is_empty() && inner.leading {
            // Through `propose_entry`, which wakes the driver to see the
            // write through (a bare push and pump would leave it, and
            // everything proposed behind it, waiting for the next tick).
            self.propose_logged(&mut inner, Command::DeadLettered { ids: done }, "dead-lettered");
        }
    }

    /// The replica applied `Delete`: stop for good and remove its records
    /// from the store (after every raft write already submitted: the
    /// storage writer applies writes in order).
    fn stop_deleted(&self, inner: &mut Inner) {
        self.stop_and_erase(inner, || Error::QueueDeleted, "replica deleted");
    }

    /// The replica applied its own removal from the group (the committed
    /// configuration no longer has it): stop for good and remove its
    /// records, as for a delete; waiters are pointed at the leader.
    fn stop_removed(&self, inner: &mut Inner) {
        let leader = inner.group.leader();
        self.stop_and_erase(inner, move || Error::NotLeader { leader }, "replica removed from the group");
    }

    fn stop_and_erase(&self, inner: &mut Inner, error: impl Fn() -> Error, what: &str) {
        if inner.stopped {
            return;
        }
        inner.stopped = true;
        inner.fail_waiters(error);
        inner.consumers.clear();
        inner.attaching.clear();
        inner.in_checkout.clear();
        inner.batches.clear();
        inner.cache.clear();
        inner.side_bodies.clear();
        // Dropping the completion does not cancel the write.
        drop(self.store.write(destroy_ops(self.spec.id.0), true));
        tracing::debug!(queue = %self.spec.name, me = self.opts.me, "{what}");
    }

    /// Consumers whose sink refused a delivery: detach them, requeue what
    /// they were refused.
    fn drop_gone_consumers(&self, inner: &mut Inner, gone: Vec<(ConsumerId, Vec<Seq>)>) {
        for (id, seqs) in gone {
            inner.consumers.remove(&id);
            inner.cursor = 0;
            inner.push(Command::Settle { consumer: id.clone(), seqs, outcome: Outcome::Requeue.into() }, Vec::new(), None);
            inner.push(Command::Detach { consumer: id }, Vec::new(), None);
        }
    }

    /// The leader's delivery decision: credit of consumers, round robin,
    /// against ready seqs not already being checked out.
    fn schedule(&self, inner: &mut Inner) {
        if inner.consumers.is_empty() {
            self.lagging.store(false, std::sync::atomic::Ordering::Relaxed);
            return;
        }
        let ids: Vec<ConsumerId> = inner.consumers.keys().cloned().collect();
        let n = ids.len();
        let mut plan: Vec<Vec<Seq>> = vec![Vec::new(); n];
        let mut cursor = inner.cursor;
        {
            let in_checkout = &inner.in_checkout;
            let mut ready =
                inner.sm.next_ready(usize::MAX).map(|(seq, _)| seq).filter(|seq| !in_checkout.contains(seq)).peekable();
            let mut misses = 0;
            while ready.peek().is_some() && misses < n {
                let idx = cursor % n;
                cursor = cursor.wrapping_add(1);
                let acquired =
                    ids.get(idx).and_then(|id| inner.consumers.get(id)).is_some_and(|consumer| consumer.try_acquire());
                if !acquired {
                    misses += 1;
                    continue;
                }
                misses = 0;
                if let (Some(seq), Some(slot)) = (ready.next(), plan.get_mut(idx)) {
                    slot.push(seq);
                }
            }
        }
        inner.cursor = cursor % n;
        for (id, seqs) in ids.into_iter().zip(plan) {
            if seqs.is_empty() {
                continue;
            }
            let Some(consumer) = inner.consumers.get(&id).cloned() else { continue };
            inner.in_checkout.extend(seqs.iter().copied());
            let cmd = Command::Checkout { consumer: id, seqs: seqs.clone(), now_ms: now_ms() };
            inner.push(cmd, Vec::new(), Some(Waiter::Checkout { consumer, seqs }));
        }
        // Publisher flow control: messages wait although a consumer could
        // take them, because its deliveries are not reaching its socket
        // fast enough (not because it is at its prefetch limit).
        // Bytes too: a backlog beyond the body cache is read back from disk.
        let waiting = (inner.sm.ready_count() as usize).saturating_sub(inner.in_checkout.len());
        let behind = waiting > FLOW_BACKLOG || (waiting > 0 && inner.sm.ready_bytes() > FLOW_BACKLOG_BYTES);
        let lagging = behind && inner.consumers.values().any(|c| c.socket_full());
        self.lagging.store(lagging, std::sync::atomic::Ordering::Relaxed);
    }

    /// Applies one committed entry, command by command, and carries out
    /// their effects in order. Every replica keeps the state machine and
    /// the batches; only the proposer of an entry (the leader that waits
    /// for it) pushes deliveries and answers.
    fn apply(
        &self,
        inner: &mut Inner,
        committed: Committed,
        gone: &mut Vec<(ConsumerId, Vec<Seq>)>,
    ) -> Result<(), Error> {
        let index = committed.index;
        let pid = ProposalId { index, term: committed.term };
        let Proposed { waiters, bodies } = inner.waiters.remove(&pid).unwrap_or_default();
        if !bodies.is_empty() {
            inner.side_bodies.insert(index, bodies);
        }
        let data = match committed.payload {
            Payload::Data(data) if index > inner.state_at => data,
            payload => {
                if matches!(payload, Payload::ConfChange { .. }) {
                    inner.conf_changed_at = index;
                }
                for waiter in waiters.into_iter().flatten() {
                    inner.finish_failed(waiter, Error::Corrupt("superseded by a non-data entry".to_owned()));
                }
                return Ok(());
            }
        };
        inner.bytes_since_checkpoint += data.len() as u64;
        let cmds = decode_commands(index, &data)?;
        let mut cached = false;
        let mut waiters = waiters.into_iter();
        let mut first_body = 0u32;
        for cmd in cmds {
            let waiter = waiters.next().flatten();
            let bodies = match &cmd {
                Command::Enqueue { msgs, .. } => u32::try_from(msgs.len()).unwrap_or(u32::MAX),
                _ => 0,
            };
            if bodies > 0 && inner.leading && !cached && !inner.volatile {
                inner.cache.insert(index, data.clone());
                cached = true;
            }
            self.apply_command(inner, index, first_body, cmd, waiter, gone)?;
            first_body = first_body.saturating_add(bodies);
        }
        for waiter in waiters.flatten() {
            inner.finish_failed(waiter, Error::Corrupt("no command for this waiter".to_owned()));
        }
        Ok(())
    }

    fn apply_command(
        &self,
        inner: &mut Inner,
        index: u64,
        first_body: u32,
        cmd: Command,
        waiter: Option<Waiter>,
        gone: &mut Vec<(ConsumerId, Vec<Seq>)>,
    ) -> Result<(), Error> {
        let checkout = match &waiter {
            Some(Waiter::Checkout { consumer, .. }) => Some(consumer.clone()),
            _ => None,
        };
        let dead_lettered = matches!(cmd, Command::DeadLettered { .. });
        let enqueue_ms = match &cmd {
            Command::Enqueue { now_ms, .. } => *now_ms,
            _ => 0,
        };
        if matches!(cmd, Command::Expire { .. }) {
            inner.expire_inflight = false;
        }
        // Where what clients see of this entry waits (one lookup for its
        // deliveries, confirms and get).
        let hold = inner.hold_for(index);
        let effects = inner.sm.apply(cmd);
        if dead_lettered && !inner.dl_in_flight.is_empty() {
            let Inner { sm, dl_in_flight, .. } = &mut *inner;
            dl_in_flight.retain(|id| sm.is_dead_letter(*id));
        }
        let mut delivered = 0usize;
        let mut got = None;
        let mut count = 0;
        let mut attached = false;
        let mut error = None;
        let mut full_positions: Vec<u32> = Vec::new();
        for effect in effects {
            match effect {
                Effect::Enqueued { seqs } => inner.batches.enqueued(index, first_body, &seqs, enqueue_ms),
                Effect::Attached { .. } => attached = true,
                Effect::Detached { consumer } => {
                    // Also covers a detach proposed while its attach was
                    // still pending (the handle is inserted when the attach
                    // applies, before this).
                    inner.consumers.remove(&consumer);
                }
                Effect::Delivered { consumer: id, msgs } => {
                    // Our own checkout: deliver to the consumer it was
                    // decided for, even if it was cancelled since (it holds
                    // the messages now). Other replicas, and checkouts of
                    // an earlier leadership, have nobody to deliver to.
                    let Some(consumer) = &checkout else { continue };
                    let mut refused = Vec::new();
                    for (seq, meta) in msgs {
                        if !refused.is_empty() {
                            consumer.undo_acquire();
                            refused.push(seq);
                            continue;
                        }
                        let message = match inner.message(seq) {
                            Ok(message) => message,
                            Err(e) => {
                                tracing::error!(queue = %self.spec.name, seq, error = %e, "no body for a delivered message");
                                consumer.undo_acquire();
                                delivered += 1;
                                continue;
                            }
                        };
                        delivered += 1;
                        let delivery = Delivery {
                            msg_id: seq,
                            redelivered: meta.redelivered,
                            delivery_count: meta.delivery_count,
                            enqueued_ms: inner.batches.enqueued_ms(seq),
                            message,
                        };
                        // Out at once, even before its checkout is durable
                        // (single voter): after a crash every ready message
                        // comes back flagged redelivered (`open_single_voter`).
                        if !consumer.sink.deliver(consumer, delivery) {
                            consumer.undo_acquire();
                            refused.push(seq);
                        }
                    }
                    delivered += refused.len();
                    if !refused.is_empty() && !consumer.no_ack {
                        gone.push((id, refused));
                    }
                }
                Effect::Got { msg, remaining, .. } => {
                    // Only the proposer answers; others need no body.
                    got = match (&waiter, msg) {
                        (Some(Waiter::Get(_)), Some((seq, meta))) => match inner.message(seq) {
                            Ok(message) => {
                                Some(Some((
                                Delivery {
                                    msg_id: seq,
                                    redelivered: meta.redelivered,
                                    delivery_count: meta.delivery_count,
                                    enqueued_ms: inner.batches.enqueued_ms(seq),
                                    message,
                                },
                                remaining,
                            )))
                            }
                            Err(e) => {
                                tracing::error!(queue = %self.spec.name, seq, error = %e, "no body for a got message");
                                Some(None)
                            }
                        },
                        _ => Some(None),
                    };
                }
                Effect::Requeued { .. } => {}
                Effect::Refused { positions } => full_positions = positions,
                Effect::Removed { seqs } => {
                    if dead_lettered {
                        inner.dead_lettered = inner.dead_lettered.saturating_add(seqs.len() as u64);
                    }
                    for seq in seqs {
                        inner.batches.removed(seq);
                    }
                }
                Effect::Purged { count: n } => count = n,
                Effect::Cancelled { consumer } => {
                    if let Some(c) = inner.consumers.remove(&consumer) {
                        c.sink.cancelled(&c);
                    }
                }
                Effect::Deleted { count: n } => {
                    count = n;
                    inner.batches.clear();
                    inner.cache.clear();
                    inner.side_bodies.clear();
                    inner.deleted = true;
                    inner.linger = DELETE_LINGER_TICKS;
                }
                Effect::Rejected { reason } => {
                    if reason == Rejection::ExclusiveConflict {
                        tracing::debug!(queue = %self.spec.name, "attach refused by the state machine");
                    }
                    error = Some(rejection_error(reason));
                }
            }
        }
        fn result<T>(error: Option<Error>, value: T) -> Result<T, Error> {
            error.map_or(Ok(value), Err)
        }
        match waiter {
            None => {}
            Some(Waiter::Enqueue(txs)) => {
                // Applied before its write is durable (single voter): the
                // confirm waits for it. Refusals need not.
                for (i, tx) in txs.into_iter().enumerate() {
                    let Some(tx) = tx else { continue };
                    let full = u32::try_from(i).is_ok_and(|i| full_positions.contains(&i));
                    let answer = if full { Err(Error::QueueFull) } else { result(error.as_ref().map(dup), ()) };
                    if let (Some(write), true) = (hold, answer.is_ok()) {
                        inner.unsynced.push_back((write, tx));
                    } else {
                        let _ = tx.send(answer);
                    }
                }
            }
            Some(Waiter::Done(tx)) => {
                let _ = tx.send(result(error, ()));
            }
            Some(Waiter::Checkout { consumer, seqs }) => {
                for seq in &seqs {
                    inner.in_checkout.remove(seq);
                }
                for _ in delivered..seqs.len() {
                    consumer.undo_acquire();
                }
            }
            Some(Waiter::Attach { id, consumer, held, tx }) => {
                if !attached {
                    inner.attaching.remove(&id);
                    let _ = tx.send(Err(error.unwrap_or_else(|| Error::Corrupt("attach not applied".to_owned()))));
                    return Ok(());
                }
                // Proposed after every entry of earlier terms, so the state
                // machine knows every checkout to this consumer: what it
                // shows held that the gateway does not hold never reached
                // the client. Requeue it first, and start delivering once
                // that applied, so it goes out before newer messages.
                let held: Option<HashSet<Seq>> = held.map(|held| held.into_iter().collect());
                let lost: Vec<Seq> = match &held {
                    Some(held) => inner.sm.held_by(&id).map(|(seq, _)| seq).filter(|seq| !held.contains(seq)).collect(),
                    None => Vec::new(),
                };
                if lost.is_empty() {
                    self.attached(inner, id, consumer, tx);
                } else {
                    let cmd = Command::Settle { consumer: id.clone(), seqs: lost, outcome: Outcome::Requeue.into() };
                    // Not merged into another settle: its waiter must
                    // answer when this one applies.
                    inner.pending.push(Pending { cmd, bodies: Vec::new(), waiter: Some(Waiter::Requeued { id, consumer, tx }) });
                }
            }
            Some(Waiter::Requeued { id, consumer, tx }) => {
                if inner.sm.is_attached(&id) {
                    self.attached(inner, id, consumer, tx);
                } else {
                    inner.attaching.remove(&id);
                    let _ = tx.send(Err(error.unwrap_or(Error::QueueDeleted)));
                }
            }
            Some(Waiter::Get(tx)) => {
                // At once, as deliveries.
                let _ = tx.send(result(error, got.flatten()));
            }
            Some(Waiter::Purge(tx) | Waiter::Delete(tx)) => {
                let _ = tx.send(result(error, count));
            }
        }
        Ok(())
    }

    /// An attach (and the requeue of what never reached the client) applied:
    /// deliveries to the consumer start.
    fn attached(&self, inner: &mut Inner, id: ConsumerId, consumer: Arc<Consumer>, tx: Tx<()>) {
        inner.attaching.remove(&id);
        let me: Weak<dyn Queue> = self.me.clone();
        consumer.attach(me);
        inner.consumers.insert(id, consumer);
        let _ = tx.send(Ok(()));
    }
}

impl Drop for ReplicatedQueue {
    fn drop(&mut self) {
        // A leader dropped while it lingers after `Delete` removes its
        // records now.
        let inner = self.inner.get_mut().unwrap_or_else(|p| p.into_inner());
        if inner.deleted && !inner.stopped && inner.failed.is_none() {
            inner.stopped = true;
            drop(self.store.write(destroy_ops(self.spec.id.0), true));
        }
        if let Some(handle) = self.driver.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }
}

/// The driver task: ticks, and wakes up when raft writes settle or when a
/// method asks for it. Holds the replica only weakly.
async fn drive(queue: Weak<ReplicatedQueue>, wake: Arc<Notify>, tick: Duration) {
    let mut tick = tokio::time::interval(tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut marker: Option<Pin<Box<Completion>>> = None;
    loop {
        let timer = {
            let Some(q) = queue.upgrade() else { return };
            let (drive, timer) = q.drive_once(marker.is_none());
            match drive {
                Drive::Stop => return,
                Drive::Marker(next) => marker = Some(Box::pin(next)),
                Drive::Idle => {}
            }
            // Not before 1 ms: a due timer must not spin.
            timer.map(|d| d.max(Duration::from_millis(1)))
        };
        tokio::select! {
            _ = tokio::time::sleep(timer.unwrap_or_default()), if timer.is_some() => {
                let Some(q) = queue.upgrade() else { return };
                q.fire_timers();
            }
            _ = async { if let Some(m) = marker.as_mut() { let _ = m.as_mut().await; } }, if marker.is_some() => {
                marker = None;
            }
            _ = wake.notified() => {}
            _ = tick.tick() => {
                let Some(q) = queue.upgrade() else { return };
                q.tick();
            }
        }
    }
}

impl Queue for ReplicatedQueue {
    fn id(&self) -> QueueId {
        self.spec.id
    }

    fn meter(&self) -> &crate::QueueMeter {
        &self.meter
    }

    fn stats(&self) -> Reply<crate::QueueStats> {
        ready(Ok(self.stats_now()))
    }

    fn publish(&self, message: Message) -> Result<Option<Durable>, Error> {
        // A queue that may refuse the message answers every publish, so a
        // confirming publisher can be nacked.
        let limits = self.lock().limits;
        let may_refuse = limits.overflow != Overflow::DropHead
            && (limits.max_length.is_some() || limits.max_length_bytes.is_some());
        if (self.spec.durable && message.is_persistent()) || may_refuse {
            self.publish_as(message, None)
        } else {
            self.propose_publish(&message, None, None)?;
            Ok(None)
        }
    }

    fn consume(&self, consumer: Arc<Consumer>) -> Reply<()> {
        let id = {
            let mut inner = self.lock();
            let connection = inner.next_connection;
            inner.next_connection = connection.wrapping_add(1);
            ConsumerId { gateway: self.opts.gateway.clone(), connection, channel: 0, tag: consumer.tag.clone() }
        };
        self.propose_attach(id, consumer, None)
    }

    fn get(&self, no_ack: bool, getter: crate::backend::Getter) -> Reply<Option<(Delivery, u32)>> {
        self.get_as(getter.holder(&self.opts.gateway), no_ack)
    }

    fn close_getter(&self, getter: crate::backend::Getter) {
        let holder = getter.holder(&self.opts.gateway);
        let mut inner = self.lock();
        if inner.sm.held_by(&holder).next().is_some() {
            self.propose_logged(&mut inner, Command::ReturnAll { consumer: holder }, "return");
        }
    }

    fn purge(&self) -> Reply<u32> {
        self.purge_reply()
    }

    fn retire(self: Arc<Self>) -> Reply<u32> {
        ReplicatedQueue::retire(&self)
    }

    fn counts(&self) -> Reply<(u32, u32)> {
        self.counts_synced()
    }

    fn cancel(&self, consumer: &Arc<Consumer>) -> bool {
        let Some(id) = self.consumer_id(consumer) else { return false };
        self.detach(&id);
        true
    }

    fn close_consumer(&self, consumer: &Arc<Consumer>) -> bool {
        let Some(id) = self.consumer_id(consumer) else { return false };
        self.return_all(&id);
        true
    }

    fn settle(&self, msg_ids: &[u64], outcome: Outcome) {
        let mut by_holder: BTreeMap<ConsumerId, Vec<Seq>> = BTreeMap::new();
        {
            let inner = self.lock();
            for seq in msg_ids {
                if let Some(holder) = inner.sm.holder_of(*seq) {
                    by_holder.entry(holder.clone()).or_default().push(*seq);
                }
            }
        }
        for (holder, seqs) in by_holder {
            self.settle_as(&holder, seqs, outcome);
        }
    }

    fn kick(&self) {
        self.wake.notify_one();
    }

    fn lagging(&self) -> bool {
        self.lagging.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn max_message_size(&self) -> Option<u64> {
        self.spec.max_message_size()
    }

    fn consumer_timeout(&self) -> Option<u64> {
        self.spec.consumer_timeout()
    }
}
