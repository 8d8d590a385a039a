//! The queue state machine: what every replica of a queue applies, in log
//! order, in the manner of RabbitMQ's `rabbit_fifo`.
//!
//! [`QueueSm::apply`] takes one [`Command`] and returns the [`Effect`]s the
//! node must carry out (answer the requester, push deliveries, delete
//! bodies). It is pure: no I/O, no clock, no randomness, no locks, so every
//! replica that applies the same log holds the same state and emits the
//! same effects. The leader decides *what* to deliver (credit, round robin)
//! and logs the decision as a [`Command::Checkout`]; the state machine only
//! checks that the decision is still possible when it is applied.
//!
//! The semantics are those of the single-node queue Sluice had before the
//! cluster (and of RabbitMQ's classic queues): the ready list is ordered by
//! priority (highest first; all 0 without `x-max-priority`) then seq; a
//! requeued message goes back to its original position within its priority
//! with `redelivered = true` and its delivery count one higher, unless that
//! count is then above `x-delivery-limit` (the message is dropped, as a
//! quorum queue drops it without a dead-letter exchange); purge
//! drops ready messages only; a consumer that is detached keeps its
//! unacknowledged messages (AMQP's basic.cancel), they return only when its
//! channel or gateway goes away.
//!
//! Commands may be stale, duplicated or refer to things that no longer
//! exist (the leader decided on a state that a failover or a concurrent
//! command has changed since). They never panic and never break an
//! invariant: whatever no longer applies is ignored.
//!
//! Invariants (checked by `cluster/tests/queue_sm.rs` against a naive
//! model):
//! - every seq is assigned once, in increasing order;
//! - a message is in exactly one of: ready, held by one consumer, gone;
//! - the ready list is in (priority descending, seq) order; a requeued
//!   message returns to its position there, flagged redelivered, its
//!   delivery count one up, or is removed once that count exceeds the
//!   delivery limit;
//! - [`QueueSm::ack_floor`] never decreases;
//! - only a ready message can be checked out, so no message is ever held by
//!   two consumers; only the consumer holding a message can settle it;
//! - after [`Command::Delete`] every command is rejected;
//! - [`QueueSm::snapshot`] then [`QueueSm::restore`] gives back the same
//!   machine, so compaction never changes what happens next.
//!
//! Message bodies are not here: they stay in storage keyed by (queue, seq);
//! the state machine keeps a few bytes of metadata per message.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::ready::ReadyList;

/// Position of a message in its queue's history: assigned once, increasing.
pub type Seq = u64;

/// Publisher ids remembered per publisher for deduplication: at most this
/// many disjoint ranges (a publisher whose ids are contiguous needs one).
/// When a publisher leaves more gaps than this, its oldest range is
/// forgotten; a retry of an id in it would be enqueued again, a duplicate
/// rather than a loss.
pub const DEDUP_MAX_RANGES: usize = 64;

/// Publishers remembered per queue for deduplication. Beyond it the one
/// that enqueued least recently is forgotten (as above, its later retries
/// may then duplicate).
pub const DEDUP_MAX_PUBLISHERS: usize = 1024;

/// Consumer identity across the cluster: gateway id, connection id,
/// channel number, consumer tag.
///
/// The derived order (gateway first) keeps every consumer of one gateway
/// together, which [`Command::GatewayDown`] relies on.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ConsumerId {
    /// The gateway the consumer's connection is on.
    pub gateway: String,
    /// Connection id, unique within the gateway.
    pub connection: u64,
    /// Channel number within the connection.
    pub channel: u16,
    /// Consumer tag (for basic.get, whatever tag the gateway reserves for
    /// the channel's gets: holders need not be attached consumers).
    pub tag: String,
}

/// What the state machine keeps per message (the body is in storage).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsgMeta {
    /// Bytes of the body.
    pub size: u32,
    /// Published with delivery mode 2.
    pub persistent: bool,
    /// The message was handed to a consumer before and came back.
    pub redelivered: bool,
    /// When the message expires (the leader's wall clock, ms since the
    /// epoch), from the queue's `x-message-ttl` and the message's
    /// `expiration`; `None`: never.
    pub expires_at: Option<u64>,
    /// Priority, already capped at the queue's `x-max-priority` (0 when
    /// the queue has none): higher is delivered first.
    pub priority: u8,
    /// How often the message was returned (requeued by a settle, its
    /// holder's channel or gateway gone): the `x-delivery-count` header.
    pub delivery_count: u32,
    /// Strict ordering (`x-ordering: strict`): the message's timestamp
    /// (ms), which orders the ready list before seq. 0 otherwise.
    pub order_ts: u64,
    /// Strict ordering: who published it (a stable hash of the publish
    /// id's publisher: the gateway's queue handle), which breaks ties of
    /// `order_ts` before seq. 0 otherwise.
    pub order_pub: u64,
}

impl MsgMeta {
    /// Where strict ordering puts it before its seq: (timestamp,
    /// publisher).
    fn order_key(&self) -> (u64, u64) {
        (self.order_ts, self.order_pub)
    }
}

/// FNV-1a: a hash that is the same on every replica and Rust version
/// (unlike std's `DefaultHasher`).
fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// What happens when a publish would take the queue over its length
/// limits (`x-overflow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum Overflow {
    /// Drop (and later dead-letter) messages from the head.
    #[default]
    DropHead,
    /// Refuse the new message (basic.nack to a confirming publisher).
    RejectPublish,
    /// As `RejectPublish`, and the refused message is dead-lettered
    /// (reason `maxlen`) when the queue has a dead-letter exchange.
    RejectPublishDlx,
}

/// A queue's limits from its declare arguments. They never change for a
/// queue (a redeclare with other values is refused), so every replica
/// builds the same ones from the queue definition; they are not part of
/// the [`Snapshot`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Limits {
    /// `x-max-length`: ready messages at most.
    pub max_length: Option<u64>,
    /// `x-max-length-bytes`: body bytes of ready messages at most.
    pub max_length_bytes: Option<u64>,
    /// `x-overflow`.
    pub overflow: Overflow,
    /// `x-message-ttl` (ms).
    pub message_ttl: Option<u64>,
    /// `x-max-priority`: message priorities are capped at it; `None`: every
    /// message has priority 0.
    pub max_priority: Option<u8>,
    /// `x-delivery-limit`: a message returned more often than this is
    /// dropped (or dead-lettered) instead of requeued.
    pub delivery_limit: Option<u32>,
    /// The queue has a dead-letter exchange (`x-dead-letter-exchange`):
    /// messages it drops (rejected, expired, over a limit) are kept as
    /// [`DeadLetter`]s until the leader has published them there, instead
    /// of being removed at once.
    pub dead_letter: bool,
    /// `x-visibility-timeout` (ms): a message held this long without being
    /// settled is ready again (redelivered), as in SQS.
    pub visibility_timeout: Option<u64>,
    /// `x-message-deduplication` with its window (ms): a message whose
    /// deduplication key was enqueued within the window is confirmed but
    /// not enqueued again.
    pub dedup_window: Option<u64>,
    /// `x-ordering: strict` with its window (`x-ordering-window-ms`): a
    /// message is held until its timestamp plus the window has passed,
    /// then released in (timestamp, seq) order; one stamped before a
    /// message already released is late (dead-lettered, reason `late`).
    pub strict_window: Option<u64>,
}

/// Identifies one publish for deduplication of gateway retries.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PublishId {
    /// The publisher (for instance gateway, connection and channel),
    /// unique for as long as it may retry.
    pub publisher: String,
    /// The publisher's id for this message. Expected to grow, which keeps
    /// the remembered set small; out-of-order ids are handled.
    pub id: u64,
}

/// One message of an [`Command::Enqueue`].
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMsg {
    /// Bytes of the body.
    pub size: u32,
    /// Published with delivery mode 2.
    pub persistent: bool,
    /// Set when the gateway may retry this publish: a second enqueue with
    /// the same id is not enqueued again.
    pub publish_id: Option<PublishId>,
    /// The message's own TTL (ms, its `expiration` property).
    pub ttl_ms: Option<u64>,
    /// The message's `priority` property (0 when absent), capped by the
    /// state machine at the queue's `x-max-priority`.
    pub priority: u8,
    /// Not ready before this many ms (`x-delay` through an
    /// `x-delayed-message` exchange). Its TTL counts from then.
    pub delay_ms: Option<u64>,
    /// Its deduplication key (`x-deduplication-header` or `message-id`)
    /// when the queue deduplicates.
    pub dedup_key: Option<String>,
    /// The producer's timestamp (ms; the `timestamp_in_ms` header), for
    /// strict ordering; `None`: the command's `now_ms`.
    pub timestamp_ms: Option<u64>,
}

/// Why a message was dead-lettered: the `reason` of its `x-death` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeathReason {
    /// basic.reject / basic.nack without requeue.
    Rejected,
    /// Its TTL passed.
    Expired,
    /// Dropped from the head (or refused, `reject-publish-dlx`) by a
    /// length limit.
    Maxlen,
    /// Returned more often than `x-delivery-limit`.
    DeliveryLimit,
    /// Strict ordering: stamped before a message already released.
    Late,
    /// The queue was deleted (or expired) with `x-dead-letter-on-delete`.
    QueueDeleted,
}

impl DeathReason {
    /// RabbitMQ's name for it.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::Maxlen => "maxlen",
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::Late => "late",
            DeathReason::QueueDeleted => "queue_deleted",
        }
    }
}

/// A message waiting to be published to the dead-letter exchange. It stays
/// live (its body is kept) until [`Command::DeadLettered`] names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Its seq in this queue (where its body is).
    pub seq: Seq,
    /// Its metadata when it left.
    pub meta: MsgMeta,
    /// Why.
    pub reason: DeathReason,
}

/// How a held message is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Processed: remove it.
    Ack,
    /// Put it back where it was, flagged redelivered.
    Requeue,
    /// Rejected without requeue: remove it, or dead-letter it (reason
    /// `rejected`) when the queue has a dead-letter exchange.
    Discard,
}

impl From<crate::backend::Outcome> for Outcome {
    fn from(o: crate::backend::Outcome) -> Self {
        match o {
            crate::backend::Outcome::Ack => Outcome::Ack,
            crate::backend::Outcome::Requeue => Outcome::Requeue,
            crate::backend::Outcome::Discard => Outcome::Discard,
        }
    }
}

/// How an attached consumer takes its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsumerOpts {
    /// No other consumer may be attached while this one is.
    pub exclusive: bool,
    /// Messages checked out to it are settled at once (removed), never
    /// held.
    pub no_ack: bool,
}

/// One entry of a queue's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Appends messages to the ready list, in order (after dropping the
    /// expired head), applying the queue's [`Limits`].
    Enqueue {
        /// The leader's wall clock (ms since the epoch): the messages'
        /// TTLs count from it.
        now_ms: u64,
        /// The messages, in publish order.
        msgs: Vec<NewMsg>,
    },
    /// Registers a consumer (or changes the options of an attached one).
    /// Refused when exclusivity conflicts with the other attached
    /// consumers.
    Attach {
        /// Who.
        consumer: ConsumerId,
        /// Options.
        opts: ConsumerOpts,
    },
    /// basic.cancel: no new checkouts to the consumer. What it holds stays
    /// held, it may still be settled.
    Detach {
        /// Who.
        consumer: ConsumerId,
    },
    /// The consumer's channel is gone: requeue everything it holds.
    ReturnAll {
        /// Whose messages.
        consumer: ConsumerId,
    },
    /// The leader's delivery decision: these ready messages go to this
    /// attached consumer. Seqs that are no longer ready are skipped;
    /// expired ones are removed instead of delivered.
    Checkout {
        /// Who receives them.
        consumer: ConsumerId,
        /// In delivery order.
        seqs: Vec<Seq>,
        /// The leader's wall clock (ms).
        now_ms: u64,
    },
    /// basic.get: the first ready message that has not expired, if any,
    /// goes to `holder` (which need not be an attached consumer).
    Get {
        /// Who holds the message until it is settled.
        holder: ConsumerId,
        /// Remove the message at once instead of holding it.
        no_ack: bool,
        /// The leader's wall clock (ms).
        now_ms: u64,
    },
    /// Ack, requeue or discard messages the consumer holds; other seqs are
    /// skipped.
    Settle {
        /// Who settles.
        consumer: ConsumerId,
        /// The messages.
        seqs: Vec<Seq>,
        /// How.
        outcome: Outcome,
    },
    /// A gateway is gone: its consumers are detached and everything they
    /// hold is requeued.
    GatewayDown {
        /// The gateway id ([`ConsumerId::gateway`]).
        gateway: String,
    },
    /// Drops every ready message (held ones stay).
    Purge,
    /// Deletes the queue: every message goes, consumers are cancelled,
    /// every later command is rejected.
    Delete,
    /// Drops every ready message that is not persistent (a single node's
    /// restart: RabbitMQ loses transient messages when it restarts).
    /// Answered like [`Command::Purge`].
    DropTransient,
    /// Changes nothing: proposed so that its application tells the
    /// proposer that everything it proposed before has applied (a read
    /// barrier for counts).
    Barrier,
    /// Time passed (the leader proposes it when [`QueueSm::next_timer`] is
    /// due, and as the read barrier of counts): removes (or dead-letters)
    /// the expired messages at the head of the ready list, makes delayed
    /// messages that are due ready, and takes back held messages whose
    /// visibility timeout passed (ready again, redelivered).
    Expire {
        /// The leader's wall clock (ms).
        now_ms: u64,
    },
    /// The leader published these dead letters (ids of
    /// [`QueueSm::dead_letters`]) to the dead-letter exchange: they are
    /// gone from this queue. Unknown ids are skipped.
    DeadLettered {
        /// Dead-letter ids.
        ids: Vec<u64>,
    },
    /// The queue is about to be deleted (`x-dead-letter-on-delete`): every
    /// message it holds (ready, held by consumers, delayed, waiting for its
    /// ordering window) becomes a dead letter with reason `queue_deleted`
    /// (or is removed when the queue has no dead-letter exchange). Answered
    /// like [`Command::Purge`], with the number of messages. The queue
    /// stays usable: the metadata deletes it once the dead letters are out.
    Retire,
    /// Flags every ready message redelivered (a single voter's open after
    /// a crash: it delivers before the checkout is durable, so any ready
    /// message may have gone out). Messages delayed or held back for
    /// strict ordering never went out and keep their flag.
    MarkRedelivered,
}

/// Why a command changed nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// The queue was deleted.
    QueueDeleted,
    /// An exclusive consumer is attached, or an exclusive one was asked for
    /// while others are (AMQP 403 access-refused).
    ExclusiveConflict,
    /// A checkout for a consumer that is not attached (any more).
    NotAttached,
    /// The queue ran out of seqs (2^64 messages).
    SeqsExhausted,
}

/// What the node must do after applying a command. Effects are listed in
/// the order they must be carried out: in particular a body is read for a
/// delivery ([`Effect::Delivered`], [`Effect::Got`]) before the same
/// command's [`Effect::Removed`] deletes it (no-ack). Effects that carry a
/// list of messages are never emitted with an empty one: a command that
/// turned out to change nothing (a stale settle, say) emits nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Effect {
    /// The seq of each message of an enqueue, in order; `None` for a
    /// duplicate that was enqueued before (confirm it, do not store its
    /// body again).
    Enqueued {
        /// One per message of the command.
        seqs: Vec<Option<Seq>>,
    },
    /// The consumer is attached with the options it asked for.
    Attached {
        /// Who.
        consumer: ConsumerId,
    },
    /// The consumer is not attached (any more). Also emitted for a consumer
    /// that was not attached, so a retried detach is answered alike.
    Detached {
        /// Who.
        consumer: ConsumerId,
    },
    /// Messages that moved to the consumer, in the order of the checkout.
    /// `redelivered` in the metadata is the flag to deliver with.
    Delivered {
        /// Who receives them.
        consumer: ConsumerId,
        /// Seq and metadata of each message.
        msgs: Vec<(Seq, MsgMeta)>,
    },
    /// The answer to a [`Command::Get`].
    Got {
        /// Who asked.
        holder: ConsumerId,
        /// The message, or `None` when nothing was ready.
        msg: Option<(Seq, MsgMeta)>,
        /// Ready messages left (basic.get-ok's message count).
        remaining: u32,
    },
    /// Messages of the [`Command::Enqueue`] just applied that the queue's
    /// limits refused (`x-overflow` reject-publish): nack them.
    Refused {
        /// Positions in the command's `msgs`.
        positions: Vec<u32>,
    },
    /// Messages back in the ready list (the leader may deliver again).
    Requeued {
        /// In increasing order for returns; in command order for a settle.
        seqs: Vec<Seq>,
    },
    /// Messages gone for good: delete their bodies.
    Removed {
        /// The messages.
        seqs: Vec<Seq>,
    },
    /// The answer to a [`Command::Purge`].
    Purged {
        /// Ready messages dropped.
        count: u32,
    },
    /// The queue was deleted under this attached consumer (basic.cancel to
    /// the client).
    Cancelled {
        /// Who.
        consumer: ConsumerId,
    },
    /// The answer to a [`Command::Delete`]: delete every body of the queue.
    Deleted {
        /// Ready messages it held.
        count: u32,
    },
    /// The command changed nothing.
    Rejected {
        /// Why.
        reason: Rejection,
    },
}

/// Ids seen from one publisher, as disjoint inclusive ranges.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Publisher {
    /// start → end, inclusive; never overlapping nor adjacent.
    ranges: BTreeMap<u64, u64>,
    /// Enqueue commands applied when it was last seen (for eviction).
    last_used: u64,
}

impl Publisher {
    fn contains(&self, id: u64) -> bool {
        self.ranges.range(..=id).next_back().is_some_and(|(_, &end)| id <= end)
    }

    /// Records `id` (not yet contained), merging with its neighbours.
    fn insert(&mut self, id: u64) {
        let below = self
            .ranges
            .range(..id)
            .next_back()
            .filter(|(_, &end)| end.checked_add(1) == Some(id))
            .map(|(&start, _)| start);
        let above = id.checked_add(1).and_then(|next| self.ranges.remove(&next));
        self.ranges.insert(below.unwrap_or(id), above.unwrap_or(id));
        while self.ranges.len() > DEDUP_MAX_RANGES {
            self.ranges.pop_first();
        }
    }
}

/// The state of one queue, identical on every replica that applied the
/// same log prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueSm {
    /// The seq the next enqueued message gets.
    next_seq: Seq,
    /// Ready messages by seq.
    ready: ReadyList,
    /// Only when [`Self::ordered`] (otherwise delivery order is seq order,
    /// and `ready` alone gives it: this saves a third of the RAM per queued
    /// message). The keys of `ready` in delivery order: highest priority first, then
    /// seq. Derived from `ready` (not in the snapshot).
    order: BTreeSet<(Reverse<u8>, (u64, u64), Seq)>,
    /// Strict ordering: messages held for their window, by seq.
    holding: BTreeMap<Seq, MsgMeta>,
    /// (timestamp, seq) of `holding`. Derived.
    holding_order: BTreeSet<((u64, u64), Seq)>,
    /// Strict ordering: the highest timestamp released so far.
    released_ts: u64,
    /// Held messages of every consumer (for counts and the ack floor).
    unacked: BTreeMap<Seq, MsgMeta>,
    /// Which consumer holds what; no empty sets. The sets partition the
    /// keys of `unacked`.
    held: BTreeMap<ConsumerId, BTreeSet<Seq>>,
    /// Attached consumers. An exclusive one is always alone.
    consumers: BTreeMap<ConsumerId, ConsumerOpts>,
    /// Deduplication of publisher retries.
    publishers: BTreeMap<String, Publisher>,
    /// Enqueue commands applied: the deterministic clock of publisher
    /// eviction.
    enqueues: u64,
    deleted: bool,
    /// Body bytes of the ready messages.
    ready_bytes: u64,
    /// Messages whose delay has not passed: seq → (ready at, metadata).
    delayed: BTreeMap<Seq, (u64, MsgMeta)>,
    /// (ready at, seq) of `delayed`. Derived.
    delay_order: BTreeSet<(u64, Seq)>,
    /// Visibility deadlines of held messages (`x-visibility-timeout`):
    /// seq → deadline (ms).
    deadlines: BTreeMap<Seq, u64>,
    /// (deadline, seq) of `deadlines`. Derived.
    deadline_order: BTreeSet<(u64, Seq)>,
    /// Dead letters the leader has not published yet, by id.
    dead: BTreeMap<u64, DeadLetter>,
    /// The seqs of `dead`. Derived.
    dead_seqs: BTreeSet<Seq>,
    /// The id the next dead letter gets.
    next_dead: u64,
    /// Deduplication keys → when they stop counting (ms).
    dedup_keys: BTreeMap<String, u64>,
    /// (until, key) of `dedup_keys`. Derived.
    dedup_order: BTreeSet<(u64, String)>,
    /// From the queue definition, not the log.
    limits: Limits,
}

/// Deduplication keys a queue remembers at most; beyond it the one whose
/// window ends first is forgotten.
pub const DEDUP_MAX_KEYS: usize = 100_000;

/// Reports messages given back (`Requeued`) then messages gone
/// (`Removed`), each only when there are some.
fn push_back_and_removed(fx: &mut Vec<Effect>, back: Vec<Seq>, removed: Vec<Seq>) {
    if !back.is_empty() {
        fx.push(Effect::Requeued { seqs: back });
    }
    if !removed.is_empty() {
        fx.push(Effect::Removed { seqs: removed });
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl QueueSm {
    /// An empty queue whose first message gets seq 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty queue with these limits.
    pub fn with_limits(limits: Limits) -> Self {
        QueueSm { limits, ..Self::default() }
    }

    /// Sets the limits (after [`Self::restore`]: they are not in the
    /// snapshot).
    pub fn set_limits(&mut self, limits: Limits) {
        let was = self.ordered();
        self.limits = limits;
        if self.ordered() != was {
            self.order = if self.ordered() {
                self.ready.iter().map(|(seq, meta)| (Reverse(meta.priority), meta.order_key(), seq)).collect()
            } else {
                BTreeSet::new()
            };
        }
    }

    /// Delivery order is not seq order: the queue has priorities or strict
    /// ordering, and `order` is kept. Otherwise every message has priority
    /// 0 and no order key.
    fn ordered(&self) -> bool {
        self.limits.max_priority.is_some() || self.limits.strict_window.is_some()
    }

    /// The queue's limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// When the head of the ready list expires, if it does: the leader
    /// proposes [`Command::Expire`] then. Like RabbitMQ's classic queues,
    /// only the head is looked at; an expired message behind one that has
    /// not expired is dropped when it reaches the head or is checked out.
    pub fn next_expiry(&self) -> Option<u64> {
        self.ready_head().and_then(|(_, m)| m.expires_at)
    }

    /// When [`Command::Expire`] has something to do next: the head's
    /// expiry, the first delayed message's release, the first visibility
    /// deadline.
    pub fn next_timer(&self) -> Option<u64> {
        let delay = self.delay_order.first().map(|(at, _)| *at);
        let deadline = self.deadline_order.first().map(|(at, _)| *at);
        let window = self.limits.strict_window.unwrap_or(0);
        let release = self.holding_order.first().map(|((ts, _), _)| ts.saturating_add(window));
        [self.next_expiry(), delay, deadline, release].into_iter().flatten().min()
    }

    /// The first ready message in delivery order.
    fn ready_head(&self) -> Option<(Seq, MsgMeta)> {
        if !self.ordered() {
            return self.ready.first();
        }
        let &(_, _, seq) = self.order.first()?;
        self.ready.get(seq).map(|meta| (seq, meta))
    }

    fn ready_insert(&mut self, seq: Seq, meta: MsgMeta) {
        self.ready_bytes = self.ready_bytes.saturating_add(u64::from(meta.size));
        let ordered = self.ordered();
        if let Some(old) = self.ready.insert(seq, meta) {
            self.ready_bytes = self.ready_bytes.saturating_sub(u64::from(old.size));
            if ordered {
                self.order.remove(&(Reverse(old.priority), old.order_key(), seq));
            }
        }
        if ordered {
            self.order.insert((Reverse(meta.priority), meta.order_key(), seq));
        }
    }

    fn ready_remove(&mut self, seq: Seq) -> Option<MsgMeta> {
        let meta = self.ready.remove(seq)?;
        self.ready_bytes = self.ready_bytes.saturating_sub(u64::from(meta.size));
        if self.ordered() {
            self.order.remove(&(Reverse(meta.priority), meta.order_key(), seq));
        }
        Some(meta)
    }

    /// Removes the first ready message in delivery order.
    fn ready_pop_first(&mut self) -> Option<(Seq, MsgMeta)> {
        let (seq, _) = self.ready_head()?;
        self.ready_remove(seq).map(|meta| (seq, meta))
    }

    fn ready_clear(&mut self) -> BTreeMap<Seq, MsgMeta> {
        self.ready_bytes = 0;
        self.order.clear();
        self.ready.take().into_iter().collect()
    }

    /// Removes (or dead-letters) the expired messages at the head of the
    /// ready list (in delivery order).
    fn expire_head(&mut self, now_ms: u64, removed: &mut Vec<Seq>) {
        while let Some((seq, meta)) = self.ready_head() {
            if meta.expires_at.is_none_or(|at| at > now_ms) {
                break;
            }
            self.ready_remove(seq);
            self.drop_msg(seq, meta, DeathReason::Expired, removed);
        }
    }

    /// A message leaves the queue for `reason`: a dead letter when the
    /// queue has a dead-letter exchange, else gone (added to `removed`).
    fn drop_msg(&mut self, seq: Seq, meta: MsgMeta, reason: DeathReason, removed: &mut Vec<Seq>) {
        if !self.limits.dead_letter {
            removed.push(seq);
            return;
        }
        let id = self.next_dead;
        self.next_dead = id.saturating_add(1);
        self.dead.insert(id, DeadLetter { seq, meta, reason });
        self.dead_seqs.insert(seq);
    }

    /// Takes a held message out of `unacked` (and its visibility deadline).
    fn take_unacked(&mut self, seq: Seq) -> Option<MsgMeta> {
        if let Some(at) = self.deadlines.remove(&seq) {
            self.deadline_order.remove(&(at, seq));
        }
        self.unacked.remove(&seq)
    }

    /// Holds a message for `holder`, with a visibility deadline if the
    /// queue has a visibility timeout.
    fn hold(&mut self, holder: &ConsumerId, seq: Seq, meta: MsgMeta, now_ms: u64) {
        self.held.entry(holder.clone()).or_default().insert(seq);
        self.unacked.insert(seq, meta);
        if let Some(timeout) = self.limits.visibility_timeout {
            let at = now_ms.saturating_add(timeout);
            self.deadlines.insert(seq, at);
            self.deadline_order.insert((at, seq));
        }
    }

    /// A message back from a consumer: ready again, redelivered, its
    /// delivery count one up; or, when that is above the delivery limit,
    /// dropped or dead-lettered (added to `removed`). Returns whether it
    /// is ready again.
    fn give_back(&mut self, seq: Seq, mut meta: MsgMeta, removed: &mut Vec<Seq>) -> bool {
        meta.redelivered = true;
        meta.delivery_count = meta.delivery_count.saturating_add(1);
        if self.limits.delivery_limit.is_some_and(|limit| meta.delivery_count > limit) {
            self.drop_msg(seq, meta, DeathReason::DeliveryLimit, removed);
            return false;
        }
        self.ready_insert(seq, meta);
        true
    }

    /// What [`Command::Expire`] does: due delayed messages become ready,
    /// held messages past their visibility deadline come back, then the
    /// expired head goes.
    fn timers(&mut self, now_ms: u64, fx: &mut Vec<Effect>) {
        let mut back = Vec::new();
        let mut removed = Vec::new();
        let window = self.limits.strict_window.unwrap_or(0);
        while let Some(&((ts, _), seq)) = self.holding_order.first() {
            if ts.saturating_add(window) > now_ms {
                break;
            }
            self.holding_order.pop_first();
            if let Some(meta) = self.holding.remove(&seq) {
                self.released_ts = self.released_ts.max(ts);
                self.ready_insert(seq, meta);
                back.push(seq);
            }
        }
        while let Some(&(at, seq)) = self.delay_order.first() {
            if at > now_ms {
                break;
            }
            self.delay_order.pop_first();
            if let Some((_, meta)) = self.delayed.remove(&seq) {
                self.ready_insert(seq, meta);
                back.push(seq);
            }
        }
        while let Some(&(at, seq)) = self.deadline_order.first() {
            if at > now_ms {
                break;
            }
            let holder = self.holder_of(seq).cloned();
            let Some(meta) = self.take_unacked(seq) else { continue };
            if let Some(holder) = holder {
                if let Some(set) = self.held.get_mut(&holder) {
                    set.remove(&seq);
                    if set.is_empty() {
                        self.held.remove(&holder);
                    }
                }
            }
            if self.give_back(seq, meta, &mut removed) {
                back.push(seq);
            }
        }
        self.expire_head(now_ms, &mut removed);
        push_back_and_removed(fx, back, removed);
    }

    fn over_limit(&self) -> bool {
        self.limits.max_length.is_some_and(|max| self.ready.len() as u64 > max)
            || self.limits.max_length_bytes.is_some_and(|max| self.ready_bytes > max)
    }

    /// Whether one more ready message of `size` bytes would break a limit.
    fn would_overflow(&self, size: u32) -> bool {
        self.limits.max_length.is_some_and(|max| self.ready.len() as u64 >= max)
            || self.limits.max_length_bytes.is_some_and(|max| self.ready_bytes.saturating_add(u64::from(size)) > max)
    }

    /// Applies one command and returns what the node must do about it.
    /// Deterministic: the result depends only on the state and `cmd`.
    pub fn apply(&mut self, cmd: Command) -> Vec<Effect> {
        if self.deleted {
            return vec![Effect::Rejected { reason: Rejection::QueueDeleted }];
        }
        let mut fx = Vec::new();
        match cmd {
            Command::Enqueue { now_ms, msgs } => self.enqueue(now_ms, msgs, &mut fx),
            Command::Attach { consumer, opts } => self.attach(consumer, opts, &mut fx),
            Command::Detach { consumer } => {
                self.consumers.remove(&consumer);
                fx.push(Effect::Detached { consumer });
            }
            Command::ReturnAll { consumer } => {
                let mut dropped = Vec::new();
                let seqs = self.return_all(&consumer, &mut dropped);
                push_back_and_removed(&mut fx, seqs, dropped);
            }
            Command::Checkout { consumer, seqs, now_ms } => self.checkout(consumer, seqs, now_ms, &mut fx),
            Command::Get { holder, no_ack, now_ms } => self.get(holder, no_ack, now_ms, &mut fx),
            Command::Expire { now_ms } => self.timers(now_ms, &mut fx),
            Command::DeadLettered { ids } => {
                let mut seqs = Vec::new();
                for id in ids {
                    if let Some(dl) = self.dead.remove(&id) {
                        self.dead_seqs.remove(&dl.seq);
                        seqs.push(dl.seq);
                    }
                }
                if !seqs.is_empty() {
                    fx.push(Effect::Removed { seqs });
                }
            }
            Command::Settle { consumer, seqs, outcome } => self.settle(&consumer, seqs, outcome, &mut fx),
            Command::GatewayDown { gateway } => self.gateway_down(gateway, &mut fx),
            Command::Purge => {
                let ready = self.ready_clear();
                let mut seqs: Vec<Seq> = ready.into_keys().collect();
                seqs.extend(std::mem::take(&mut self.holding).into_keys());
                self.holding_order.clear();
                let n = count(seqs.len());
                if !seqs.is_empty() {
                    fx.push(Effect::Removed { seqs });
                }
                fx.push(Effect::Purged { count: n });
            }
            Command::Retire => self.retire(&mut fx),
            Command::MarkRedelivered => self.ready.mark_all_redelivered(),
            Command::Barrier => {}
            Command::DropTransient => {
                let mut seqs: Vec<Seq> = self.ready.iter().filter(|(_, m)| !m.persistent).map(|(s, _)| s).collect();
                for seq in &seqs {
                    self.ready_remove(*seq);
                }
                let held_back: Vec<(Seq, (u64, u64))> =
                    self.holding.iter().filter(|(_, m)| !m.persistent).map(|(s, m)| (*s, m.order_key())).collect();
                for (seq, key) in held_back {
                    self.holding.remove(&seq);
                    self.holding_order.remove(&(key, seq));
                    seqs.push(seq);
                }
                let delayed: Vec<(Seq, u64)> =
                    self.delayed.iter().filter(|(_, (_, m))| !m.persistent).map(|(s, (at, _))| (*s, *at)).collect();
                for (seq, at) in delayed {
                    self.delayed.remove(&seq);
                    self.delay_order.remove(&(at, seq));
                    seqs.push(seq);
                }
                let n = count(seqs.len());
                if !seqs.is_empty() {
                    fx.push(Effect::Removed { seqs });
                }
                fx.push(Effect::Purged { count: n });
            }
            Command::Delete => {
                let n = self.ready_count();
                for consumer in std::mem::take(&mut self.consumers).into_keys() {
                    fx.push(Effect::Cancelled { consumer });
                }
                self.ready_clear();
                self.unacked.clear();
                self.held.clear();
                self.publishers.clear();
                self.delayed.clear();
                self.delay_order.clear();
                self.deadlines.clear();
                self.deadline_order.clear();
                self.dead.clear();
                self.dead_seqs.clear();
                self.dedup_keys.clear();
                self.dedup_order.clear();
                self.holding.clear();
                self.holding_order.clear();
                self.deleted = true;
                fx.push(Effect::Deleted { count: n });
            }
        }
        fx
    }

    /// [`Command::Retire`]: every message becomes a dead letter, in seq
    /// order (held ones keep their redelivered flag and delivery count).
    fn retire(&mut self, fx: &mut Vec<Effect>) {
        let mut all: BTreeMap<Seq, MsgMeta> = self.ready_clear();
        all.extend(std::mem::take(&mut self.unacked));
        self.held.clear();
        self.deadlines.clear();
        self.deadline_order.clear();
        all.extend(std::mem::take(&mut self.delayed).into_iter().map(|(s, (_, m))| (s, m)));
        self.delay_order.clear();
        all.extend(std::mem::take(&mut self.holding));
        self.holding_order.clear();
        let n = count(all.len());
        let mut removed = Vec::new();
        for (seq, meta) in all {
            self.drop_msg(seq, meta, DeathReason::QueueDeleted, &mut removed);
        }
        if !removed.is_empty() {
            fx.push(Effect::Removed { seqs: removed });
        }
        fx.push(Effect::Purged { count: n });
    }

    fn enqueue(&mut self, now_ms: u64, msgs: Vec<NewMsg>, fx: &mut Vec<Effect>) {
        // Checked up front so that a batch is taken whole or not at all.
        let fits = u64::try_from(msgs.len()).ok().and_then(|n| self.next_seq.checked_add(n)).is_some();
        if !fits {
            fx.push(Effect::Rejected { reason: Rejection::SeqsExhausted });
            return;
        }
        self.enqueues = self.enqueues.saturating_add(1);
        let mut removed = Vec::new();
        self.expire_head(now_ms, &mut removed);
        self.forget_dedup_keys(now_ms);
        let mut seqs = Vec::with_capacity(msgs.len());
        let mut refused = Vec::new();
        let reject = self.limits.overflow != Overflow::DropHead;
        for (position, msg) in msgs.into_iter().enumerate() {
            if let Some(pid) = &msg.publish_id {
                if self.known(pid) {
                    seqs.push(None);
                    continue;
                }
            }
            let dedup_key = msg.dedup_key.filter(|_| self.limits.dedup_window.is_some());
            if dedup_key.as_ref().is_some_and(|k| self.dedup_keys.contains_key(k)) {
                // A duplicate within the window: confirmed, not enqueued.
                if let Some(pid) = msg.publish_id {
                    self.remember(pid);
                }
                seqs.push(None);
                continue;
            }
            let ttl = match (self.limits.message_ttl, msg.ttl_ms) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let ready_at = msg.delay_ms.filter(|d| *d > 0).map(|d| now_ms.saturating_add(d));
            let expires_at = ttl.map(|ttl| ready_at.unwrap_or(now_ms).saturating_add(ttl));
            let priority = self.limits.max_priority.map_or(0, |max| msg.priority.min(max));
            // Strict ordering: the producer's stamp, never later than now
            // (a clock ahead would hold the message for ever).
            let order_ts = match self.limits.strict_window {
                Some(_) => msg.timestamp_ms.unwrap_or(now_ms).min(now_ms),
                None => 0,
            };
            let order_pub = match (self.limits.strict_window, &msg.publish_id) {
                (Some(_), Some(pid)) => stable_hash(&pid.publisher),
                _ => 0,
            };
            let meta = MsgMeta {
                size: msg.size,
                persistent: msg.persistent,
                redelivered: false,
                expires_at,
                priority,
                delivery_count: 0,
                order_ts,
                order_pub,
            };
            if self.limits.strict_window.is_some() && ready_at.is_none() && order_ts < self.released_ts {
                // Late: a message stamped after it was released already.
                if let Some(pid) = msg.publish_id {
                    self.remember(pid);
                }
                let seq = self.next_seq;
                self.next_seq = seq.saturating_add(1);
                seqs.push(Some(seq));
                self.drop_msg(seq, meta, DeathReason::Late, &mut removed);
                continue;
            }
            if reject && ready_at.is_none() && self.would_overflow(msg.size) {
                // Not remembered for dedup: a retry is judged again.
                refused.push(u32::try_from(position).unwrap_or(u32::MAX));
                if self.limits.overflow == Overflow::RejectPublishDlx && self.limits.dead_letter {
                    // Nacked, and dead-lettered: it gets a seq so that its
                    // body (in this entry) is kept until then.
                    let seq = self.next_seq;
                    self.next_seq = seq.saturating_add(1);
                    self.drop_msg(seq, meta, DeathReason::Maxlen, &mut removed);
                    seqs.push(Some(seq));
                } else {
                    seqs.push(None);
                }
                continue;
            }
            if let Some(pid) = msg.publish_id {
                self.remember(pid);
            }
            if let (Some(key), Some(window)) = (dedup_key, self.limits.dedup_window) {
                self.remember_dedup_key(key, now_ms.saturating_add(window));
            }
            let seq = self.next_seq;
            // Cannot overflow: the batch fitted above.
            self.next_seq = seq.saturating_add(1);
            seqs.push(Some(seq));
            if let Some(at) = ready_at {
                self.delayed.insert(seq, (at, meta));
                self.delay_order.insert((at, seq));
                continue;
            }
            if self.limits.strict_window.is_some() {
                self.holding.insert(seq, meta);
                self.holding_order.insert((meta.order_key(), seq));
                continue;
            }
            self.ready_insert(seq, meta);
            // drop-head: the ready messages at the head (in delivery order)
            // make room.
            while self.over_limit() {
                let Some((old, meta)) = self.ready_pop_first() else { break };
                self.drop_msg(old, meta, DeathReason::Maxlen, &mut removed);
            }
        }
        fx.push(Effect::Enqueued { seqs });
        if !removed.is_empty() {
            fx.push(Effect::Removed { seqs: removed });
        }
        if !refused.is_empty() {
            fx.push(Effect::Refused { positions: refused });
        }
    }

    /// Forgets the deduplication keys whose window has ended.
    fn forget_dedup_keys(&mut self, now_ms: u64) {
        while let Some((until, _)) = self.dedup_order.first() {
            if *until > now_ms {
                break;
            }
            if let Some((_, key)) = self.dedup_order.pop_first() {
                self.dedup_keys.remove(&key);
            }
        }
    }

    fn remember_dedup_key(&mut self, key: String, until: u64) {
        if self.dedup_keys.len() >= DEDUP_MAX_KEYS {
            if let Some((_, oldest)) = self.dedup_order.pop_first() {
                self.dedup_keys.remove(&oldest);
            }
        }
        self.dedup_order.insert((until, key.clone()));
        self.dedup_keys.insert(key, until);
    }

    /// True if `pid` was enqueued before (and marks its publisher used).
    fn known(&mut self, pid: &PublishId) -> bool {
        let now = self.enqueues;
        match self.publishers.get_mut(&pid.publisher) {
            Some(publisher) => {
                publisher.last_used = now;
                publisher.contains(pid.id)
            }
            None => false,
        }
    }

    /// Remembers `pid` (not [`Self::known`]).
    fn remember(&mut self, pid: PublishId) {
        let _ = self.seen_before(pid);
    }

    /// True if `pid` was enqueued before; otherwise remembers it.
    fn seen_before(&mut self, pid: PublishId) -> bool {
        let now = self.enqueues;
        if let Some(publisher) = self.publishers.get_mut(&pid.publisher) {
            publisher.last_used = now;
            if publisher.contains(pid.id) {
                return true;
            }
            publisher.insert(pid.id);
            return false;
        }
        if self.publishers.len() >= DEDUP_MAX_PUBLISHERS {
            // Least recently used first, ties by name: deterministic.
            let oldest = self
                .publishers
                .iter()
                .min_by(|a, b| a.1.last_used.cmp(&b.1.last_used).then_with(|| a.0.cmp(b.0)))
                .map(|(name, _)| name.clone());
            if let Some(name) = oldest {
                self.publishers.remove(&name);
            }
        }
        let mut publisher = Publisher { ranges: BTreeMap::new(), last_used: now };
        publisher.insert(pid.id);
        self.publishers.insert(pid.publisher, publisher);
        false
    }

    fn attach(&mut self, consumer: ConsumerId, opts: ConsumerOpts, fx: &mut Vec<Effect>) {
        // Judged against the *other* consumers, so that a retried attach is
        // answered the same way and may change the consumer's own options.
        let others = self.consumers.len() - usize::from(self.consumers.contains_key(&consumer));
        // An exclusive consumer is always alone, so one can only be among
        // the others when there is exactly one other.
        let other_exclusive = others == 1 && self.consumers.iter().any(|(id, o)| o.exclusive && *id != consumer);
        if others > 0 && (opts.exclusive || other_exclusive) {
            fx.push(Effect::Rejected { reason: Rejection::ExclusiveConflict });
            return;
        }
        self.consumers.insert(consumer.clone(), opts);
        fx.push(Effect::Attached { consumer });
    }

    fn checkout(&mut self, consumer: ConsumerId, seqs: Vec<Seq>, now_ms: u64, fx: &mut Vec<Effect>) {
        let Some(opts) = self.consumers.get(&consumer).copied() else {
            fx.push(Effect::Rejected { reason: Rejection::NotAttached });
            return;
        };
        let mut expired = Vec::new();
        self.expire_head(now_ms, &mut expired);
        let mut msgs = Vec::new();
        for seq in seqs {
            // Only a ready message moves: a seq checked out, settled or
            // purged since the leader decided is skipped, and a seq listed
            // twice moves once. An expired one is never delivered.
            if let Some(meta) = self.ready_remove(seq) {
                if meta.expires_at.is_some_and(|at| at <= now_ms) {
                    self.drop_msg(seq, meta, DeathReason::Expired, &mut expired);
                } else {
                    msgs.push((seq, meta));
                }
            }
        }
        if !expired.is_empty() {
            fx.push(Effect::Removed { seqs: expired });
        }
        if msgs.is_empty() {
            return;
        }
        if opts.no_ack {
            let seqs = msgs.iter().map(|(seq, _)| *seq).collect();
            fx.push(Effect::Delivered { consumer, msgs });
            fx.push(Effect::Removed { seqs });
        } else {
            for &(seq, meta) in &msgs {
                self.hold(&consumer, seq, meta, now_ms);
            }
            fx.push(Effect::Delivered { consumer, msgs });
        }
    }

    fn get(&mut self, holder: ConsumerId, no_ack: bool, now_ms: u64, fx: &mut Vec<Effect>) {
        let mut expired = Vec::new();
        self.expire_head(now_ms, &mut expired);
        if !expired.is_empty() {
            fx.push(Effect::Removed { seqs: expired });
        }
        let Some((seq, meta)) = self.ready_pop_first() else {
            fx.push(Effect::Got { holder, msg: None, remaining: 0 });
            return;
        };
        let remaining = self.ready_count();
        if no_ack {
            fx.push(Effect::Got { holder, msg: Some((seq, meta)), remaining });
            fx.push(Effect::Removed { seqs: vec![seq] });
        } else {
            self.hold(&holder, seq, meta, now_ms);
            fx.push(Effect::Got { holder, msg: Some((seq, meta)), remaining });
        }
    }

    fn settle(&mut self, consumer: &ConsumerId, seqs: Vec<Seq>, outcome: Outcome, fx: &mut Vec<Effect>) {
        let Some(held) = self.held.get_mut(consumer) else { return };
        let mut taken = Vec::new();
        for seq in seqs {
            // Only what this consumer holds: a stale or duplicated settle,
            // or one for a message returned and redelivered elsewhere since,
            // changes nothing.
            if held.remove(&seq) {
                taken.push(seq);
            }
        }
        if held.is_empty() {
            self.held.remove(consumer);
        }
        let mut done = Vec::new();
        let mut back = Vec::new();
        for seq in taken {
            let Some(meta) = self.take_unacked(seq) else { continue };
            match outcome {
                Outcome::Requeue => {
                    if self.give_back(seq, meta, &mut done) {
                        back.push(seq);
                    }
                }
                Outcome::Discard => self.drop_msg(seq, meta, DeathReason::Rejected, &mut done),
                Outcome::Ack => done.push(seq),
            }
        }
        push_back_and_removed(fx, back, done);
    }

    /// Returns everything `consumer` holds; gives the seqs requeued in
    /// order, and adds those over the delivery limit to `dropped`.
    fn return_all(&mut self, consumer: &ConsumerId, dropped: &mut Vec<Seq>) -> Vec<Seq> {
        let Some(held) = self.held.remove(consumer) else { return Vec::new() };
        let mut seqs = Vec::with_capacity(held.len());
        for seq in held {
            if let Some(meta) = self.take_unacked(seq) {
                if self.give_back(seq, meta, dropped) {
                    seqs.push(seq);
                }
            }
        }
        seqs
    }

    fn gateway_down(&mut self, gateway: String, fx: &mut Vec<Effect>) {
        let first = ConsumerId { gateway, connection: 0, channel: 0, tag: String::new() };
        let gateway = &first.gateway;
        // Every id of the gateway sorts at or after `first` and before any
        // id of another gateway.
        let detached: Vec<ConsumerId> =
            self.consumers.range(&first..).map(|(id, _)| id).take_while(|id| id.gateway == *gateway).cloned().collect();
        let holders: Vec<ConsumerId> =
            self.held.range(&first..).map(|(id, _)| id).take_while(|id| id.gateway == *gateway).cloned().collect();
        for consumer in detached {
            self.consumers.remove(&consumer);
            fx.push(Effect::Detached { consumer });
        }
        let mut seqs = Vec::new();
        let mut dropped = Vec::new();
        for holder in &holders {
            seqs.extend(self.return_all(holder, &mut dropped));
        }
        seqs.sort_unstable();
        dropped.sort_unstable();
        push_back_and_removed(fx, seqs, dropped);
    }

    /// Ready messages.
    pub fn ready_count(&self) -> u32 {
        count(self.ready.len())
    }

    /// Body bytes of the ready messages.
    pub fn ready_bytes(&self) -> u64 {
        self.ready_bytes
    }

    /// Attached consumers.
    pub fn consumer_count(&self) -> u32 {
        count(self.consumers.len())
    }

    /// Messages held by consumers (delivered, not settled).
    pub fn unacked_count(&self) -> u32 {
        count(self.unacked.len())
    }

    /// The seq the next enqueued message gets.
    pub fn next_seq(&self) -> Seq {
        self.next_seq
    }

    /// True once [`Command::Delete`] was applied.
    pub fn is_deleted(&self) -> bool {
        self.deleted
    }

    /// The first `n` ready messages, in delivery order: what the leader may
    /// check out next.
    pub fn next_ready(&self, n: usize) -> impl Iterator<Item = (Seq, MsgMeta)> + '_ {
        let ordered = self.ordered();
        let by_order = ordered
            .then(|| self.order.iter().take(n).filter_map(|(_, _, seq)| self.ready.get(*seq).map(|meta| (*seq, meta))))
            .into_iter()
            .flatten();
        let by_seq = (!ordered).then(|| self.ready.iter().take(n)).into_iter().flatten();
        by_order.chain(by_seq)
    }

    /// Attached consumers, in [`ConsumerId`] order.
    pub fn consumers(&self) -> impl Iterator<Item = (&ConsumerId, ConsumerOpts)> + '_ {
        self.consumers.iter().map(|(id, opts)| (id, *opts))
    }

    /// True if `consumer` is attached.
    pub fn is_attached(&self, consumer: &ConsumerId) -> bool {
        self.consumers.contains_key(consumer)
    }

    /// Everyone holding at least one message (attached or not), in
    /// [`ConsumerId`] order.
    pub fn holders(&self) -> impl Iterator<Item = &ConsumerId> + '_ {
        self.held.keys()
    }

    /// The messages `consumer` holds, by seq.
    pub fn held_by<'a>(&'a self, consumer: &ConsumerId) -> impl Iterator<Item = (Seq, &'a MsgMeta)> + 'a {
        self.held.get(consumer).into_iter().flatten().filter_map(|seq| self.unacked.get(seq).map(|meta| (*seq, meta)))
    }

    /// Who holds `seq`, if anyone (a scan of the holders: few per queue).
    pub fn holder_of(&self, seq: Seq) -> Option<&ConsumerId> {
        self.held.iter().find(|(_, seqs)| seqs.contains(&seq)).map(|(id, _)| id)
    }

    /// Whether `seq` is live (ready, held, delayed or a dead letter not
    /// yet published).
    pub fn is_live(&self, seq: Seq) -> bool {
        self.ready.contains_key(seq)
            || self.unacked.contains_key(&seq)
            || self.delayed.contains_key(&seq)
            || self.holding.contains_key(&seq)
            || self.dead_seqs.contains(&seq)
    }

    /// Live messages (ready, held, delayed, dead letters not yet published).
    pub fn live_count(&self) -> usize {
        self.ready.len() + self.unacked.len() + self.delayed.len() + self.holding.len() + self.dead.len()
    }

    /// Messages whose delay has not passed.
    pub fn delayed_count(&self) -> u32 {
        count(self.delayed.len())
    }

    /// Dead letters waiting to be published, oldest first: what the
    /// leader publishes to the dead-letter exchange (then proposes
    /// [`Command::DeadLettered`]).
    pub fn dead_letters(&self) -> impl Iterator<Item = (u64, &DeadLetter)> + '_ {
        self.dead.iter().map(|(id, dl)| (*id, dl))
    }

    /// Whether dead letter `id` still waits to be published.
    pub fn is_dead_letter(&self, id: u64) -> bool {
        self.dead.contains_key(&id)
    }

    /// Dead letters waiting to be published.
    pub fn dead_letter_count(&self) -> u32 {
        count(self.dead.len())
    }

    /// The lowest seq still live, or [`Self::next_seq`] when there is
    /// none: every message below it is gone, so storage may forget
    /// everything under it. Never decreases.
    pub fn ack_floor(&self) -> Seq {
        let ready = self.ready.first().map(|(seq, _)| seq);
        let held = self.unacked.keys().next();
        let delayed = self.delayed.keys().next();
        let dead = self.dead_seqs.first();
        let holding = self.holding.keys().next();
        [ready, held.copied(), delayed.copied(), dead.copied(), holding.copied()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(self.next_seq)
    }

    /// The whole state, for Raft log compaction. Bodies are not in it;
    /// it refers to them by seq.
    pub fn snapshot(&self) -> Snapshot {
        let r = self.snapshot_ref();
        Snapshot {
            next_seq: r.next_seq,
            deleted: r.deleted,
            enqueues: r.enqueues,
            ready: r.ready.0.iter().collect(),
            consumers: r.consumers,
            held: r.held,
            publishers: r.publishers,
            delayed: r.delayed,
            deadlines: r.deadlines,
            dead: r.dead,
            next_dead: r.next_dead,
            dedup_keys: r.dedup_keys,
            holding: r.holding,
            released_ts: r.released_ts,
        }
    }

    /// [`Self::snapshot`] borrowing the ready list, for encoding: the
    /// same bytes, without a copy of the (possibly million-entry) list.
    pub fn snapshot_ref(&self) -> SnapshotRef<'_> {
        SnapshotRef {
            next_seq: self.next_seq,
            deleted: self.deleted,
            enqueues: self.enqueues,
            ready: ReadyView(&self.ready),
            consumers: self.consumers.iter().map(|(id, opts)| (id.clone(), *opts)).collect(),
            held: self.held.keys().map(|id| (id.clone(), self.held_by(id).map(|(s, m)| (s, *m)).collect())).collect(),
            publishers: self
                .publishers
                .iter()
                .map(|(name, p)| PublisherSnapshot {
                    publisher: name.clone(),
                    last_used: p.last_used,
                    ranges: p.ranges.iter().map(|(s, e)| (*s, *e)).collect(),
                })
                .collect(),
            delayed: self.delayed.iter().map(|(seq, (at, meta))| (*seq, *at, *meta)).collect(),
            deadlines: self.deadlines.iter().map(|(seq, at)| (*seq, *at)).collect(),
            dead: self.dead.iter().map(|(id, dl)| (*id, *dl)).collect(),
            next_dead: self.next_dead,
            dedup_keys: self.dedup_keys.iter().map(|(k, until)| (k.clone(), *until)).collect(),
            holding: self.holding.iter().map(|(seq, meta)| (*seq, *meta)).collect(),
            released_ts: self.released_ts,
        }
    }

    /// Rebuilds the machine from [`Self::snapshot`]. A snapshot comes from
    /// another node, so it is checked: one that would break an invariant
    /// (a seq in two places, at or above `next_seq`, an exclusive consumer
    /// that is not alone, ...) is refused.
    pub fn restore(snap: Snapshot) -> Result<Self, SnapshotError> {
        let Snapshot {
            next_seq,
            deleted,
            enqueues,
            ready,
            consumers,
            held,
            publishers,
            delayed,
            deadlines,
            dead,
            next_dead,
            dedup_keys,
            holding,
            released_ts,
        } = snap;
        let mut sm = QueueSm { next_seq, deleted, enqueues, next_dead, released_ts, ..QueueSm::default() };
        for (seq, meta) in ready {
            if seq >= next_seq {
                return Err(SnapshotError("ready seq at or above next_seq"));
            }
            if sm.ready.contains_key(seq) {
                return Err(SnapshotError("ready seq listed twice"));
            }
            sm.ready_insert(seq, meta);
        }
        for (id, msgs) in held {
            if msgs.is_empty() {
                return Err(SnapshotError("holder without messages"));
            }
            let mut set = BTreeSet::new();
            for (seq, meta) in msgs {
                if seq >= next_seq {
                    return Err(SnapshotError("held seq at or above next_seq"));
                }
                if sm.ready.contains_key(seq) || sm.unacked.insert(seq, meta).is_some() {
                    return Err(SnapshotError("seq in more than one place"));
                }
                set.insert(seq);
            }
            if sm.held.insert(id, set).is_some() {
                return Err(SnapshotError("holder listed twice"));
            }
        }
        let attached = consumers.len();
        for (id, opts) in consumers {
            if opts.exclusive && attached > 1 {
                return Err(SnapshotError("exclusive consumer not alone"));
            }
            if sm.consumers.insert(id, opts).is_some() {
                return Err(SnapshotError("consumer listed twice"));
            }
        }
        if publishers.len() > DEDUP_MAX_PUBLISHERS {
            return Err(SnapshotError("too many publishers"));
        }
        for p in publishers {
            if p.ranges.is_empty() || p.ranges.len() > DEDUP_MAX_RANGES {
                return Err(SnapshotError("publisher range count out of bounds"));
            }
            let mut prev_end: Option<u64> = None;
            let mut ranges = BTreeMap::new();
            for (start, end) in p.ranges {
                let after_prev = prev_end.is_none_or(|e| e.checked_add(1).is_some_and(|n| n < start));
                if start > end || !after_prev {
                    return Err(SnapshotError("publisher ranges not sorted and disjoint"));
                }
                ranges.insert(start, end);
                prev_end = Some(end);
            }
            if sm.publishers.insert(p.publisher, Publisher { ranges, last_used: p.last_used }).is_some() {
                return Err(SnapshotError("publisher listed twice"));
            }
        }
        for (seq, at, meta) in delayed {
            if seq >= next_seq {
                return Err(SnapshotError("delayed seq at or above next_seq"));
            }
            if sm.is_live(seq) {
                return Err(SnapshotError("seq in more than one place"));
            }
            sm.delayed.insert(seq, (at, meta));
            sm.delay_order.insert((at, seq));
        }
        for (seq, meta) in holding {
            if seq >= next_seq {
                return Err(SnapshotError("held-back seq at or above next_seq"));
            }
            if sm.is_live(seq) {
                return Err(SnapshotError("seq in more than one place"));
            }
            sm.holding.insert(seq, meta);
            sm.holding_order.insert((meta.order_key(), seq));
        }
        for (seq, at) in deadlines {
            if !sm.unacked.contains_key(&seq) || sm.deadlines.insert(seq, at).is_some() {
                return Err(SnapshotError("visibility deadline of a message not held"));
            }
            sm.deadline_order.insert((at, seq));
        }
        for (id, dl) in dead {
            if dl.seq >= next_seq || id >= next_dead {
                return Err(SnapshotError("dead letter beyond the counters"));
            }
            if sm.is_live(dl.seq) || sm.dead.insert(id, dl).is_some() {
                return Err(SnapshotError("seq in more than one place"));
            }
            sm.dead_seqs.insert(dl.seq);
        }
        for (key, until) in dedup_keys {
            if sm.dedup_keys.len() >= DEDUP_MAX_KEYS {
                return Err(SnapshotError("too many deduplication keys"));
            }
            sm.dedup_order.insert((until, key.clone()));
            if sm.dedup_keys.insert(key, until).is_some() {
                return Err(SnapshotError("deduplication key listed twice"));
            }
        }
        if deleted && sm.live_count() + sm.consumers.len() + sm.publishers.len() + sm.dedup_keys.len() > 0 {
            return Err(SnapshotError("deleted queue with state"));
        }
        Ok(sm)
    }
}

/// The serialisable state of a [`QueueSm`] (serde). Produced by
/// [`QueueSm::snapshot`], consumed by [`QueueSm::restore`]; round-trips
/// exactly. It carries no version of its own: its layout changes when, say,
/// [`MsgMeta`] gains a field, so whoever stores or sends it must wrap it in
/// a versioned envelope.
/// [`Snapshot`] as it is encoded, with the ready list borrowed
/// ([`QueueSm::snapshot_ref`]). Its fields are `Snapshot`'s, in the same
/// order, so that serde gives the same bytes (a test checks it).
#[derive(Serialize)]
pub struct SnapshotRef<'a> {
    next_seq: Seq,
    deleted: bool,
    enqueues: u64,
    ready: ReadyView<'a>,
    consumers: Vec<(ConsumerId, ConsumerOpts)>,
    held: Vec<(ConsumerId, Vec<(Seq, MsgMeta)>)>,
    publishers: Vec<PublisherSnapshot>,
    delayed: Vec<(Seq, u64, MsgMeta)>,
    deadlines: Vec<(Seq, u64)>,
    dead: Vec<(u64, DeadLetter)>,
    next_dead: u64,
    dedup_keys: Vec<(String, u64)>,
    holding: Vec<(Seq, MsgMeta)>,
    released_ts: u64,
}

/// Serializes as `Vec<(Seq, MsgMeta)>` does.
pub struct ReadyView<'a>(&'a ReadyList);

impl Serialize for ReadyView<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = serializer.serialize_seq(Some(self.0.len()))?;
        for entry in self.0.iter() {
            seq.serialize_element(&entry)?;
        }
        seq.end()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    next_seq: Seq,
    deleted: bool,
    enqueues: u64,
    /// Increasing seq.
    ready: Vec<(Seq, MsgMeta)>,
    /// Attached consumers, increasing id.
    consumers: Vec<(ConsumerId, ConsumerOpts)>,
    /// Holders (increasing id) with what they hold (increasing seq).
    held: Vec<(ConsumerId, Vec<(Seq, MsgMeta)>)>,
    /// Increasing publisher name.
    publishers: Vec<PublisherSnapshot>,
    /// Delayed messages: (seq, ready at, metadata), increasing seq.
    delayed: Vec<(Seq, u64, MsgMeta)>,
    /// Visibility deadlines of held messages: (seq, deadline).
    deadlines: Vec<(Seq, u64)>,
    /// Dead letters not yet published, increasing id.
    dead: Vec<(u64, DeadLetter)>,
    next_dead: u64,
    /// Deduplication keys with the end of their window.
    dedup_keys: Vec<(String, u64)>,
    /// Strict ordering: messages held for their window, increasing seq.
    holding: Vec<(Seq, MsgMeta)>,
    released_ts: u64,
}

/// Dedup state of one publisher in a [`Snapshot`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct PublisherSnapshot {
    publisher: String,
    last_used: u64,
    /// Inclusive, increasing, neither overlapping nor adjacent.
    ranges: Vec<(u64, u64)>,
}

/// A [`Snapshot`] that would break an invariant of [`QueueSm`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid queue snapshot: {0}")]
pub struct SnapshotError(&'static str);

#[cfg(test)]
mod tests {
    use super::*;

    fn pid(publisher: &str, id: u64) -> Option<PublishId> {
        Some(PublishId { publisher: publisher.to_owned(), id })
    }

    fn enqueue_ids(sm: &mut QueueSm, publisher: &str, ids: &[u64]) -> Vec<Option<Seq>> {
        let msgs =
            ids.iter().map(|&id| NewMsg { size: 1, persistent: false, publish_id: pid(publisher, id), ttl_ms: None, priority: 0, ..Default::default() }).collect();
        match sm.apply(Command::Enqueue { now_ms: 0, msgs }).as_slice() {
            [Effect::Enqueued { seqs }] => seqs.clone(),
            other => panic!("unexpected {other:?}"),
        }
    }

    fn consumer(tag: &str) -> ConsumerId {
        ConsumerId { gateway: "g".into(), connection: 1, channel: 1, tag: tag.into() }
    }

    #[test]
    fn mark_redelivered_flags_every_ready_message_and_survives_a_snapshot() {
        let mut sm = QueueSm::new();
        let seqs: Vec<Seq> = enqueue_ids(&mut sm, "p", &[1, 2, 3, 4]).into_iter().flatten().collect();
        assert_eq!(seqs.len(), 4);
        let c = consumer("a");
        sm.apply(Command::Attach { consumer: c.clone(), opts: ConsumerOpts { exclusive: false, no_ack: false } });
        sm.apply(Command::Checkout { consumer: c.clone(), seqs: vec![seqs[0]], now_ms: 0 });
        assert!(sm.next_ready(usize::MAX).all(|(_, m)| !m.redelivered));
        assert_eq!(sm.apply(Command::MarkRedelivered), vec![]);
        let ready: Vec<(Seq, bool)> = sm.next_ready(usize::MAX).map(|(s, m)| (s, m.redelivered)).collect();
        assert_eq!(ready, vec![(seqs[1], true), (seqs[2], true), (seqs[3], true)]);
        let back = QueueSm::restore(sm.snapshot()).unwrap();
        assert_eq!(back, sm);
        // The held message is flagged when it comes back, as always.
        sm.apply(Command::Settle { consumer: c, seqs: vec![seqs[0]], outcome: Outcome::Requeue });
        assert!(sm.next_ready(usize::MAX).all(|(_, m)| m.redelivered));
        assert_eq!(sm.ready_count(), 4);
    }

    #[test]
    fn publisher_ranges_merge() {
        let mut p = Publisher::default();
        for id in [5, 7, 6, 1, 3, 2, 0, 4, u64::MAX, u64::MAX - 1] {
            assert!(!p.contains(id));
            p.insert(id);
            assert!(p.contains(id));
        }
        let ranges: Vec<_> = p.ranges.iter().map(|(s, e)| (*s, *e)).collect();
        assert_eq!(ranges, vec![(0, 7), (u64::MAX - 1, u64::MAX)]);
        assert!(!p.contains(8));
        assert!(!p.contains(u64::MAX - 2));
    }

    #[test]
    fn publisher_window_forgets_oldest_range() {
        let mut p = Publisher::default();
        // Every even id: one range each.
        let ids: Vec<u64> = (0..=DEDUP_MAX_RANGES as u64).map(|i| i * 2).collect();
        for &id in &ids {
            p.insert(id);
        }
        assert_eq!(p.ranges.len(), DEDUP_MAX_RANGES);
        assert!(!p.contains(0), "the oldest range is forgotten");
        assert!(ids[1..].iter().all(|&id| p.contains(id)));
    }

    #[test]
    fn dedup_window_bound_enqueues_forgotten_ids_again() {
        let mut sm = QueueSm::new();
        let ids: Vec<u64> = (0..=DEDUP_MAX_RANGES as u64).map(|i| i * 2).collect();
        let first = enqueue_ids(&mut sm, "p", &ids);
        assert!(first.iter().all(Option::is_some));
        // id 0 fell out of the window: a duplicate rather than a loss.
        let again = enqueue_ids(&mut sm, "p", &[0, 2]);
        assert!(again[0].is_some());
        assert_eq!(again[1], None);
    }

    #[test]
    fn least_recently_used_publisher_is_forgotten() {
        let mut sm = QueueSm::new();
        for i in 0..DEDUP_MAX_PUBLISHERS {
            enqueue_ids(&mut sm, &format!("p{i}"), &[7]);
        }
        // p0 used again: p1 is now the least recently used.
        assert_eq!(enqueue_ids(&mut sm, "p0", &[7]), vec![None]);
        enqueue_ids(&mut sm, "new", &[7]);
        assert_eq!(sm.publishers.len(), DEDUP_MAX_PUBLISHERS);
        assert!(!sm.publishers.contains_key("p1"));
        assert_eq!(enqueue_ids(&mut sm, "p0", &[7]), vec![None]);
        assert_eq!(enqueue_ids(&mut sm, "p2", &[7]), vec![None]);
        assert!(enqueue_ids(&mut sm, "p1", &[7])[0].is_some(), "forgotten: enqueued again");
        let back = QueueSm::restore(sm.snapshot());
        assert_eq!(back, Ok(sm));
    }

    #[test]
    fn seqs_exhausted_rejects_the_whole_batch() {
        let mut snap = QueueSm::new().snapshot();
        snap.next_seq = u64::MAX - 1;
        let mut sm = QueueSm::restore(snap).unwrap();
        let two = vec![NewMsg { size: 1, persistent: false, publish_id: None, ttl_ms: None, priority: 0, ..Default::default() }; 2];
        assert_eq!(
            sm.apply(Command::Enqueue { now_ms: 0, msgs: two.clone() }),
            vec![Effect::Rejected { reason: Rejection::SeqsExhausted }]
        );
        assert_eq!(sm.ready_count(), 0);
        let one = two[..1].to_vec();
        assert_eq!(
            sm.apply(Command::Enqueue { now_ms: 0, msgs: one.clone() }),
            vec![Effect::Enqueued { seqs: vec![Some(u64::MAX - 1)] }]
        );
        assert_eq!(sm.next_seq(), u64::MAX);
        assert_eq!(
            sm.apply(Command::Enqueue { now_ms: 0, msgs: one }),
            vec![Effect::Rejected { reason: Rejection::SeqsExhausted }]
        );
        assert_eq!(sm.apply(Command::Enqueue { now_ms: 0, msgs: vec![] }), vec![Effect::Enqueued { seqs: vec![] }]);
        assert_eq!(sm.ack_floor(), u64::MAX - 1);
    }

    #[test]
    fn exclusive_shortcut_agrees_with_a_full_scan() {
        // The attach check only scans when exactly one other consumer is
        // attached; compare with the obvious rule on every small case.
        let ids = [consumer("a"), consumer("b"), consumer("c")];
        let all_opts =
            [ConsumerOpts { exclusive: false, no_ack: false }, ConsumerOpts { exclusive: true, no_ack: false }];
        for first in 0..3 {
            for o1 in all_opts {
                for second in 0..3 {
                    for o2 in all_opts {
                        for third in 0..3 {
                            for o3 in all_opts {
                                let mut sm = QueueSm::new();
                                for (i, o) in [(first, o1), (second, o2), (third, o3)] {
                                    let id = ids[i].clone();
                                    let others: Vec<_> =
                                        sm.consumers.iter().filter(|(c, _)| **c != id).map(|(_, o)| *o).collect();
                                    let conflict =
                                        !others.is_empty() && (o.exclusive || others.iter().any(|x| x.exclusive));
                                    let fx = sm.apply(Command::Attach { consumer: id.clone(), opts: o });
                                    if conflict {
                                        assert_eq!(fx, vec![Effect::Rejected { reason: Rejection::ExclusiveConflict }]);
                                    } else {
                                        assert_eq!(fx, vec![Effect::Attached { consumer: id }]);
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn valid() -> Snapshot {
        let mut sm = QueueSm::new();
        let msg = NewMsg { size: 3, persistent: true, publish_id: None, ttl_ms: None, priority: 0, ..Default::default() };
        sm.apply(Command::Enqueue { now_ms: 0, msgs: vec![msg; 4] });
        sm.apply(Command::Attach { consumer: consumer("a"), opts: ConsumerOpts::default() });
        sm.apply(Command::Checkout { consumer: consumer("a"), seqs: vec![1], now_ms: 0 });
        enqueue_ids(&mut sm, "p", &[1, 3]);
        sm.snapshot()
    }

    #[test]
    fn restore_refuses_broken_snapshots() {
        let ok = valid();
        assert!(QueueSm::restore(ok.clone()).is_ok());
        let meta = MsgMeta { size: 0, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 };
        let excl = ConsumerOpts { exclusive: true, no_ack: false };
        type Corruption<'a> = Box<dyn Fn(&mut Snapshot) + 'a>;
        let cases: Vec<Corruption> = vec![
            Box::new(|s| s.ready.push((s.next_seq, meta))),
            Box::new(|s| s.ready.push((0, meta))),
            Box::new(|s| s.held[0].1.push((0, meta))),
            Box::new(|s| s.held[0].1.push((s.next_seq + 1, meta))),
            Box::new(|s| s.held.push((consumer("b"), vec![]))),
            Box::new(|s| s.held.push((consumer("a"), vec![(2, meta)]))),
            Box::new(|s| s.held.push((consumer("b"), vec![(1, meta)]))),
            Box::new(|s| s.consumers.push((consumer("a"), ConsumerOpts::default()))),
            Box::new(|s| s.consumers.push((consumer("b"), excl))),
            Box::new(|s| s.publishers[0].ranges = vec![]),
            Box::new(|s| s.publishers[0].ranges = vec![(1, 1), (2, 2)]),
            Box::new(|s| s.publishers[0].ranges = vec![(3, 3), (1, 1)]),
            Box::new(|s| s.publishers[0].ranges = vec![(3, 1)]),
            Box::new(|s| s.publishers[0].ranges = (0..=DEDUP_MAX_RANGES as u64).map(|i| (i * 2, i * 2)).collect()),
            Box::new(|s| {
                let p = s.publishers[0].clone();
                s.publishers.push(p);
            }),
            Box::new(|s| s.deleted = true),
        ];
        for (i, break_it) in cases.iter().enumerate() {
            let mut s = ok.clone();
            break_it(&mut s);
            assert!(QueueSm::restore(s).is_err(), "case {i} restored");
        }
    }
}
