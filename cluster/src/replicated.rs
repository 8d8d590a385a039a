//! [`ReplicatedQueue`]: a queue behind the [`Queue`] trait whose every
//! change is an entry of its own Raft group, applied by the pure
//! [`QueueSm`] (first cut: a group with a single voter, this node: the
//! "cluster of one" `sluice serve` will run).
//!
//! How it works:
//! - **Publish** proposes a [`Command::Enqueue`] whose log entry also holds
//!   the message (as a [`crate::record`] encoding). The returned
//!   [`Durable`] resolves when the entry is committed and applied; with a
//!   single voter that is when the local log write is durable. A publish
//!   that needs no confirm returns `None` at once and the message becomes
//!   visible when its entry applies.
//! - **Consumers** are mapped to [`ConsumerId`]s (gateway [`GATEWAY`],
//!   connection = a counter of this handle, channel 0, the consumer's tag);
//!   `consume` proposes [`Command::Attach`]. Acting as leader, the queue
//!   takes credit from consumers ([`Consumer::try_acquire`], round robin,
//!   one message at a time as `LocalQueue` does) for ready seqs that are not
//!   already in a pending checkout, and proposes one [`Command::Checkout`]
//!   per consumer. When it applies, the moved messages go to the consumer's
//!   sink (under the queue's lock, as `LocalQueue` does; sinks never call
//!   back); credit of seqs the checkout did not move is given back with
//!   [`Consumer::undo_acquire`].
//! - `settle` proposes one [`Command::Settle`] per holder (this handle
//!   remembers who holds which seq); `cancel` proposes [`Command::Detach`];
//!   `get` and `purge` propose [`Command::Get`] / [`Command::Purge`] and wait
//!   for their result; `counts` reads the applied state machine.
//! - **Effects** of each applied entry are carried out in the order the
//!   state machine emits them.
//! - **Driving.** A tokio task owns the clock: it ticks the group, and
//!   while raft writes are in flight it awaits an empty marker write on the
//!   storage (the writer answers in submission order, so when the marker is
//!   answered every earlier raft write is settled), then reports durability
//!   to the group, applies what committed and proposes new checkouts. Every
//!   public method also pumps the group under the lock, so writes reach the
//!   storage without waiting for the task.
//! - **Restart.** [`ReplicatedQueue::open`] on an existing log re-applies it
//!   from the start (no checkpoint yet), then proposes
//!   [`Command::GatewayDown`] for [`GATEWAY`]: consumers of the previous
//!   process are detached and what they held is ready again with
//!   `redelivered = true`.
//!
//! Not done yet (see docs/cluster.md, "Replicated queue, single voter"):
//! - one voter only: no peers, no transport, `Output::send` is ignored;
//!   leadership loss is handled only as a failed proposal;
//! - no checkpoints, snapshots or log compaction: the log grows forever and
//!   `open` replays all of it; a received snapshot is refused;
//! - **message bodies live in RAM** (rebuilt from the log on open), not in
//!   the `msgs` keyspace: writing them there on apply needs the checkpoint
//!   first (a (queue, seq) key may be written only once, so a replay from
//!   the start must not write it again);
//! - every publish is its own log entry (no batching beyond the storage's
//!   group commit across entries);
//! - `get` and `purge` block the calling thread until their entry commits
//!   (about one fsync), polling the storage: the trait is synchronous there;
//! - transient messages and non-durable queues survive a restart (the log
//!   keeps them), unlike `LocalQueue`; no `delete` yet;
//! - the group id is the queue id, in the same `logs` id space as any other
//!   group of the store;
//! - consensus and log-store failures surface as [`Error::Corrupt`] (or
//!   [`Error::Storage`]), and after one the queue refuses everything.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sluice_codecs::command::Message;
use sluice_storage::{Completion, Store};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::replica::queue_sm::{
    Command, ConsumerId, ConsumerOpts, Effect, NewMsg, QueueSm, Rejection, Seq,
};
use crate::backend::{ready, Consumer, Delivery, Durable, Outcome, Queue, QueueId, QueueSpec, Reply};
use crate::consensus::{
    Committed, FjallLogStore, FjallLogStoreError, Group, GroupConfig, Payload, ProposalId,
    ProposalOutcome, Role,
};
use crate::{record, Error};

/// The gateway id of every consumer of this process (see the module docs).
pub const GATEWAY: &str = "local";

/// This node's raft id in its single-voter groups.
const NODE: u64 = 1;

/// Tick of the group's logical clock.
const TICK: Duration = Duration::from_millis(50);

/// How long a blocking wait (open, get, purge) may take before it fails.
const BLOCKING_TIMEOUT: Duration = Duration::from_secs(30);

/// Poll interval of blocking waits.
const BLOCKING_POLL: Duration = Duration::from_micros(50);

/// Version byte in front of every log entry.
const ENTRY_VERSION: u8 = 1;

/// One log entry: a command plus, for an enqueue, the messages' records
/// (one per message of the command, in order).
#[derive(Serialize, Deserialize)]
struct LogEntry {
    cmd: Command,
    bodies: Vec<serde_bytes::ByteBuf>,
}

fn encode_entry(entry: &LogEntry) -> Result<Vec<u8>, Error> {
    let mut out = vec![ENTRY_VERSION];
    let body = postcard::to_stdvec(entry).map_err(|e| Error::Corrupt(format!("encoding a log entry: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

fn decode_entry(index: u64, data: &[u8]) -> Result<LogEntry, Error> {
    match data.split_first() {
        Some((&ENTRY_VERSION, rest)) => postcard::from_bytes(rest)
            .map_err(|e| Error::Corrupt(format!("queue log entry {index}: {e}"))),
        _ => Err(Error::Corrupt(format!("queue log entry {index}: unknown version"))),
    }
}

fn consensus_error(e: crate::consensus::Error) -> Error {
    Error::Corrupt(format!("queue raft group: {e}"))
}

fn log_error(e: FjallLogStoreError) -> Error {
    match e {
        FjallLogStoreError::Storage(e) | FjallLogStoreError::WriteFailed { cause: Some(e), .. } => Error::Storage(e),
        other => Error::Corrupt(format!("queue raft log: {other}")),
    }
}

fn rejection_error(reason: Rejection) -> Error {
    match reason {
        Rejection::QueueDeleted => Error::QueueDeleted,
        Rejection::ExclusiveConflict => Error::ExclusiveConsumer,
        Rejection::NotAttached => Error::Corrupt("consumer not attached".to_owned()),
        Rejection::SeqsExhausted => Error::Corrupt("the queue ran out of seqs".to_owned()),
    }
}

/// The holder of basic.get deliveries of this process.
fn get_holder() -> ConsumerId {
    ConsumerId { gateway: GATEWAY.to_owned(), connection: 0, channel: 0, tag: "basic.get".to_owned() }
}

/// Who waits for a proposal of this handle.
enum Waiter {
    /// A confirmed publish.
    Publish(oneshot::Sender<Result<(), Error>>),
    /// A checkout: credit was taken from `consumer` for each of `seqs`.
    Checkout { consumer: Arc<Consumer>, seqs: Vec<Seq> },
    /// A blocking caller (get, purge, open) polls `Inner::answers`.
    Answer,
}

/// The result of a proposal someone blocks on.
enum Answer {
    Got(Option<(Delivery, u32)>),
    Purged(u32),
    Done,
    Failed(Error),
}

struct Inner {
    group: Group<FjallLogStore>,
    sm: QueueSm,
    /// Bodies of live messages (ready or held), by seq.
    bodies: HashMap<Seq, Message>,
    /// Consumers attached through this handle.
    consumers: BTreeMap<ConsumerId, Arc<Consumer>>,
    /// Who holds each held seq (for `settle`, which only names seqs).
    holder_of: HashMap<Seq, ConsumerId>,
    /// Seqs in a checkout proposed but not applied yet.
    in_checkout: BTreeSet<Seq>,
    waiters: HashMap<ProposalId, Waiter>,
    answers: HashMap<ProposalId, Answer>,
    next_connection: u64,
    /// Round-robin position among `consumers`.
    cursor: usize,
    /// Set after a failure of the group or its store: everything fails.
    failed: Option<String>,
    /// `close` was called.
    closed: bool,
}

impl Inner {
    fn check(&self) -> Result<(), Error> {
        if let Some(why) = &self.failed {
            return Err(Error::Corrupt(why.clone()));
        }
        if self.closed {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    fn propose(&mut self, entry: &LogEntry) -> Result<ProposalId, Error> {
        let data = encode_entry(entry)?;
        self.group.propose(data).map_err(consensus_error)
    }

    /// Fails every waiter (the group or its store failed).
    fn fail_all(&mut self, why: &str) {
        self.failed.get_or_insert_with(|| why.to_owned());
        for (id, waiter) in std::mem::take(&mut self.waiters) {
            self.finish_failed(id, waiter, Error::Corrupt(why.to_owned()));
        }
    }

    fn finish_failed(&mut self, id: ProposalId, waiter: Waiter, error: Error) {
        match waiter {
            Waiter::Publish(tx) => {
                let _ = tx.send(Err(error));
            }
            Waiter::Checkout { consumer, seqs } => {
                for seq in seqs {
                    self.in_checkout.remove(&seq);
                    consumer.undo_acquire();
                }
            }
            Waiter::Answer => {
                self.answers.insert(id, Answer::Failed(error));
            }
        }
    }
}

/// A queue replicated by one Raft group with a single voter. See the
/// module docs.
pub struct ReplicatedQueue {
    spec: QueueSpec,
    store: Store,
    // std Mutex: never held across .await.
    inner: Mutex<Inner>,
    wake: Arc<Notify>,
    driver: Mutex<Option<JoinHandle<()>>>,
    me: Weak<ReplicatedQueue>,
}

impl std::fmt::Debug for ReplicatedQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicatedQueue").field("name", &self.spec.name).field("id", &self.spec.id).finish()
    }
}

impl ReplicatedQueue {
    /// Opens the queue's group on `store` (creating it with this node as
    /// its only voter if the store holds none), re-applies its log, returns
    /// what the previous process's consumers held, and starts the driver
    /// task on `runtime`. Blocks until that is done (replay plus one
    /// commit). A previous handle of the same queue must be dropped first.
    pub fn open(spec: QueueSpec, store: Store, runtime: &tokio::runtime::Handle) -> Result<Arc<Self>, Error> {
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
        let log = if FjallLogStore::exists(&store, group_id).map_err(log_error)? {
            FjallLogStore::open(store.clone(), group_id).map_err(log_error)?
        } else {
            FjallLogStore::bootstrap(store.clone(), group_id, &[NODE], &[], Bytes::new()).map_err(log_error)?
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let group = Group::open(&GroupConfig::new(NODE), log, &logger).map_err(consensus_error)?;
        let queue = Arc::new_cyclic(|me| ReplicatedQueue {
            spec,
            store,
            inner: Mutex::new(Inner {
                group,
                sm: QueueSm::new(),
                bodies: HashMap::new(),
                consumers: BTreeMap::new(),
                holder_of: HashMap::new(),
                in_checkout: BTreeSet::new(),
                waiters: HashMap::new(),
                answers: HashMap::new(),
                next_connection: 1,
                cursor: 0,
                failed: None,
                closed: false,
            }),
            wake: Arc::new(Notify::new()),
            driver: Mutex::new(None),
            me: me.clone(),
        });
        queue.wait_until(|inner| inner.group.is_leader())?;
        // Proposed as leader, so after every entry of the old log: once it
        // applies, the replay is complete.
        let id = {
            let mut inner = queue.lock();
            let entry = LogEntry { cmd: Command::GatewayDown { gateway: GATEWAY.to_owned() }, bodies: Vec::new() };
            let id = inner.propose(&entry)?;
            inner.waiters.insert(id, Waiter::Answer);
            id
        };
        match queue.wait_answer(id)? {
            Answer::Failed(e) => return Err(e),
            Answer::Got(_) | Answer::Purged(_) | Answer::Done => {}
        }
        let handle = runtime.spawn(drive(Arc::downgrade(&queue), queue.wake.clone()));
        *queue.driver.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(queue)
    }

    /// Stops accepting work, waits until every raft write submitted so
    /// far is settled and stops the driver. Dropping the queue without it
    /// is safe too (`open` waits for the storage), but in-flight publishes
    /// then fail with [`Error::ShuttingDown`] even if they commit.
    pub async fn close(&self) {
        loop {
            let marker = {
                let mut inner = self.lock();
                inner.closed = true;
                self.pump(&mut inner);
                if inner.failed.is_some() || inner.group.store().in_flight() == 0 {
                    break;
                }
                self.store.write(Vec::new(), false)
            };
            let _ = marker.await;
        }
        if let Some(handle) = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }

    /// The applied state's held (delivered, unsettled) messages.
    pub fn unacked_count(&self) -> u32 {
        self.lock().sm.unacked_count()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Pumps until `done` holds, blocking the thread between polls.
    fn wait_until(&self, done: impl Fn(&Inner) -> bool) -> Result<(), Error> {
        let deadline = Instant::now() + BLOCKING_TIMEOUT;
        loop {
            {
                let mut inner = self.lock();
                self.pump(&mut inner);
                if let Some(why) = &inner.failed {
                    return Err(Error::Corrupt(why.clone()));
                }
                if done(&inner) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Corrupt(format!("queue {}: raft group made no progress", self.spec.name)));
            }
            std::thread::sleep(BLOCKING_POLL);
        }
    }

    /// Pumps until proposal `id` has an answer and returns it.
    fn wait_answer(&self, id: ProposalId) -> Result<Answer, Error> {
        self.wait_until(|inner| inner.answers.contains_key(&id) || !inner.waiters.contains_key(&id))?;
        let answer = self.lock().answers.remove(&id);
        answer.ok_or_else(|| Error::Corrupt("proposal finished without an answer".to_owned()))
    }

    /// One tick of the logical clock.
    fn tick(&self) {
        let mut inner = self.lock();
        inner.group.tick();
        self.pump(&mut inner);
    }

    /// Pumps, and (if `want_marker`) returns a marker write to await when
    /// raft writes are in flight (the driver's next wake-up).
    fn drive_once(&self, want_marker: bool) -> Option<Completion> {
        let mut inner = self.lock();
        self.pump(&mut inner);
        let in_flight = inner.failed.is_none() && inner.group.store().in_flight() > 0;
        (want_marker && in_flight).then(|| self.store.write(Vec::new(), false))
    }

    /// Reports durable writes, campaigns if needed, proposes checkouts and
    /// applies whatever the group hands out, until it has nothing more.
    /// A failure poisons the queue (see `Inner::failed`).
    fn pump(&self, inner: &mut Inner) {
        if inner.failed.is_some() {
            return;
        }
        if let Err(e) = self.try_pump(inner) {
            tracing::error!(queue = %self.spec.name, error = %e, "replicated queue failed");
            inner.fail_all(&e.to_string());
        }
    }

    fn try_pump(&self, inner: &mut Inner) -> Result<(), Error> {
        loop {
            if let Some(n) = inner.group.store_mut().poll_persisted().map_err(log_error)? {
                inner.group.on_persisted(n).map_err(consensus_error)?;
            }
            if inner.group.role() == Role::Follower {
                inner.group.campaign().map_err(consensus_error)?;
            }
            if inner.group.is_leader() && !inner.closed {
                self.schedule(inner);
            }
            if !inner.group.has_ready() {
                return Ok(());
            }
            let out = inner.group.ready().map_err(consensus_error)?;
            // `persist`: the writes are with the storage already; the
            // marker writes of the driver wait for them. `send`: no peers.
            if out.restore.is_some() {
                return Err(Error::Corrupt("snapshots are not supported by the replicated queue yet".to_owned()));
            }
            let mut gone = Vec::new();
            for committed in out.committed {
                self.apply(inner, committed, &mut gone)?;
            }
            for (id, outcome) in out.proposals {
                if outcome == ProposalOutcome::Committed {
                    continue;
                }
                if let Some(waiter) = inner.waiters.remove(&id) {
                    inner.finish_failed(id, waiter, Error::Corrupt(format!("proposal ended: {outcome:?}")));
                }
            }
            self.drop_gone_consumers(inner, gone);
        }
    }

    /// Consumers whose sink refused a delivery: detach them, requeue what
    /// they were refused.
    fn drop_gone_consumers(&self, inner: &mut Inner, gone: Vec<(ConsumerId, Vec<Seq>)>) {
        for (id, seqs) in gone {
            inner.consumers.remove(&id);
            let settle = LogEntry {
                cmd: Command::Settle { consumer: id.clone(), seqs, outcome: Outcome::Requeue.into() },
                bodies: Vec::new(),
            };
            let detach = LogEntry { cmd: Command::Detach { consumer: id }, bodies: Vec::new() };
            for entry in [settle, detach] {
                if let Err(e) = inner.propose(&entry) {
                    tracing::warn!(queue = %self.spec.name, error = %e, "cannot detach a gone consumer");
                }
            }
        }
    }

    /// The leader's delivery decision: credit of consumers, round robin,
    /// against ready seqs not already being checked out.
    fn schedule(&self, inner: &mut Inner) {
        if inner.consumers.is_empty() {
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
                let acquired = ids
                    .get(idx)
                    .and_then(|id| inner.consumers.get(id))
                    .is_some_and(|consumer| consumer.try_acquire());
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
            let entry = LogEntry { cmd: Command::Checkout { consumer: id, seqs: seqs.clone() }, bodies: Vec::new() };
            match inner.propose(&entry) {
                Ok(pid) => {
                    inner.in_checkout.extend(seqs.iter().copied());
                    inner.waiters.insert(pid, Waiter::Checkout { consumer, seqs });
                }
                Err(e) => {
                    tracing::warn!(queue = %self.spec.name, error = %e, "checkout not proposed");
                    for _ in &seqs {
                        consumer.undo_acquire();
                    }
                }
            }
        }
    }

    /// Applies one committed entry and carries out its effects in order.
    fn apply(
        &self,
        inner: &mut Inner,
        committed: Committed,
        gone: &mut Vec<(ConsumerId, Vec<Seq>)>,
    ) -> Result<(), Error> {
        let pid = ProposalId { index: committed.index, term: committed.term };
        let waiter = inner.waiters.remove(&pid);
        let Payload::Data(data) = committed.payload else {
            if let Some(waiter) = waiter {
                inner.finish_failed(pid, waiter, Error::Corrupt("superseded by a non-data entry".to_owned()));
            }
            return Ok(());
        };
        let LogEntry { cmd, bodies } = decode_entry(committed.index, &data)?;
        let get_no_ack = match &cmd {
            Command::Get { no_ack, .. } => *no_ack,
            _ => false,
        };
        let checkout_no_ack = match (&cmd, &waiter) {
            (Command::Checkout { .. }, Some(Waiter::Checkout { consumer, .. })) => consumer.no_ack,
            _ => false,
        };
        let effects = inner.sm.apply(cmd);
        let mut delivered = 0usize;
        let mut answer = Answer::Done;
        let mut error = None;
        for effect in effects {
            match effect {
                Effect::Enqueued { seqs } => {
                    for (seq, body) in seqs.into_iter().zip(bodies.iter()) {
                        if let Some(seq) = seq {
                            let message = record::decode(&Bytes::copy_from_slice(body))?;
                            inner.bodies.insert(seq, message);
                        }
                    }
                }
                Effect::Attached { .. } | Effect::Detached { .. } => {}
                Effect::Delivered { consumer: id, msgs } => {
                    // Our own checkout: deliver to the consumer it was
                    // decided for, even if it was cancelled since (it holds
                    // the messages now). Replayed checkouts of an earlier
                    // process have nobody to go to.
                    let Some(Waiter::Checkout { consumer, .. }) = &waiter else { continue };
                    let mut refused = Vec::new();
                    for (seq, meta) in msgs {
                        if !checkout_no_ack {
                            inner.holder_of.insert(seq, id.clone());
                        }
                        if !refused.is_empty() {
                            consumer.undo_acquire();
                            refused.push(seq);
                            continue;
                        }
                        let Some(message) = inner.bodies.get(&seq).cloned() else {
                            tracing::error!(queue = %self.spec.name, seq, "no body for a delivered message");
                            consumer.undo_acquire();
                            delivered += 1;
                            continue;
                        };
                        delivered += 1;
                        let delivery = Delivery { msg_id: seq, redelivered: meta.redelivered, message };
                        if !consumer.sink.deliver(consumer, delivery) {
                            consumer.undo_acquire();
                            refused.push(seq);
                        }
                    }
                    delivered += refused.len();
                    if !refused.is_empty() && !checkout_no_ack {
                        gone.push((id, refused));
                    }
                }
                Effect::Got { holder, msg, remaining } => {
                    let got = match msg {
                        Some((seq, meta)) => {
                            if !get_no_ack {
                                inner.holder_of.insert(seq, holder);
                            }
                            match inner.bodies.get(&seq).cloned() {
                                Some(message) => {
                                    Some((Delivery { msg_id: seq, redelivered: meta.redelivered, message }, remaining))
                                }
                                None => {
                                    tracing::error!(queue = %self.spec.name, seq, "no body for a got message");
                                    None
                                }
                            }
                        }
                        None => None,
                    };
                    answer = Answer::Got(got);
                }
                Effect::Requeued { seqs } => {
                    for seq in seqs {
                        inner.holder_of.remove(&seq);
                    }
                }
                Effect::Removed { seqs } => {
                    for seq in seqs {
                        inner.holder_of.remove(&seq);
                        inner.bodies.remove(&seq);
                    }
                }
                Effect::Purged { count } => answer = Answer::Purged(count),
                Effect::Cancelled { consumer } => {
                    inner.consumers.remove(&consumer);
                }
                Effect::Deleted { .. } => {
                    inner.bodies.clear();
                    inner.holder_of.clear();
                }
                Effect::Rejected { reason } => {
                    if reason == Rejection::ExclusiveConflict {
                        tracing::warn!(queue = %self.spec.name, "attach refused by the state machine");
                    }
                    error = Some(rejection_error(reason));
                }
            }
        }
        match waiter {
            None => {}
            Some(Waiter::Publish(tx)) => {
                let _ = tx.send(error.map_or(Ok(()), Err));
            }
            Some(Waiter::Checkout { consumer, seqs }) => {
                for seq in &seqs {
                    inner.in_checkout.remove(seq);
                }
                for _ in delivered..seqs.len() {
                    consumer.undo_acquire();
                }
            }
            Some(Waiter::Answer) => {
                let answer = match error {
                    Some(e) => Answer::Failed(e),
                    None => answer,
                };
                inner.answers.insert(pid, answer);
            }
        }
        Ok(())
    }

    /// Proposes `cmd` and wakes the driver (fire and forget).
    fn propose_and_wake(&self, inner: &mut Inner, cmd: Command) -> Result<ProposalId, Error> {
        inner.check()?;
        let id = inner.propose(&LogEntry { cmd, bodies: Vec::new() })?;
        self.pump(inner);
        self.wake.notify_one();
        Ok(id)
    }

    /// Proposes `cmd`, then blocks until it is applied.
    fn propose_and_wait(&self, cmd: Command) -> Result<Answer, Error> {
        let id = {
            let mut inner = self.lock();
            inner.check()?;
            let id = inner.propose(&LogEntry { cmd, bodies: Vec::new() })?;
            inner.waiters.insert(id, Waiter::Answer);
            id
        };
        self.wake.notify_one();
        self.wait_answer(id)
    }
}

impl Drop for ReplicatedQueue {
    fn drop(&mut self) {
        if let Some(handle) = self.driver.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }
}

/// The driver task: ticks, and wakes up when raft writes settle or when a
/// method asks for it (`kick`, proposals). Holds the queue only weakly.
async fn drive(queue: Weak<ReplicatedQueue>, wake: Arc<Notify>) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut marker: Option<Pin<Box<Completion>>> = None;
    loop {
        {
            let Some(q) = queue.upgrade() else { return };
            if let Some(next) = q.drive_once(marker.is_none()) {
                marker = Some(Box::pin(next));
            }
        }
        tokio::select! {
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

    fn publish(&self, message: Message) -> Result<Option<Durable>, Error> {
        let confirm = self.spec.durable && message.is_persistent();
        let size = u32::try_from(message.body.len()).unwrap_or(u32::MAX);
        let entry = LogEntry {
            cmd: Command::Enqueue { msgs: vec![NewMsg { size, persistent: message.is_persistent(), publish_id: None }] },
            bodies: vec![serde_bytes::ByteBuf::from(record::encode(&message).to_vec())],
        };
        let mut inner = self.lock();
        inner.check()?;
        let id = inner.propose(&entry)?;
        let durable = if confirm {
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(id, Waiter::Publish(tx));
            Some(Box::pin(async move { rx.await.unwrap_or(Err(Error::ShuttingDown)) }) as Durable)
        } else {
            None
        };
        self.pump(&mut inner);
        drop(inner);
        self.wake.notify_one();
        Ok(durable)
    }

    fn consume(&self, consumer: Arc<Consumer>) -> Reply<()> {
        ready(self.consume_now(consumer))
    }

    fn get(&self, no_ack: bool) -> Reply<Option<(Delivery, u32)>> {
        ready(self.get_now(no_ack))
    }

    fn purge(&self) -> Reply<u32> {
        ready(self.purge_now())
    }

    fn counts(&self) -> Reply<(u32, u32)> {
        ready(Ok(self.counts_now()))
    }

    fn cancel(&self, consumer: &Arc<Consumer>) -> bool {
        let mut inner = self.lock();
        let id = inner.consumers.iter().find(|(_, c)| Arc::ptr_eq(c, consumer)).map(|(id, _)| id.clone());
        let Some(id) = id else { return false };
        inner.consumers.remove(&id);
        inner.cursor = 0;
        if let Err(e) = self.propose_and_wake(&mut inner, Command::Detach { consumer: id }) {
            tracing::warn!(queue = %self.spec.name, error = %e, "detach not proposed");
        }
        true
    }

    fn settle(&self, msg_ids: &[u64], outcome: Outcome) {
        let mut inner = self.lock();
        let mut by_holder: BTreeMap<ConsumerId, Vec<Seq>> = BTreeMap::new();
        for seq in msg_ids {
            if let Some(holder) = inner.holder_of.get(seq) {
                by_holder.entry(holder.clone()).or_default().push(*seq);
            }
        }
        for (consumer, seqs) in by_holder {
            let cmd = Command::Settle { consumer, seqs, outcome: outcome.into() };
            if let Err(e) = self.propose_and_wake(&mut inner, cmd) {
                tracing::warn!(queue = %self.spec.name, error = %e, "settle not proposed");
            }
        }
    }

    fn kick(&self) {
        self.wake.notify_one();
    }
}

impl ReplicatedQueue {
    fn consume_now(&self, consumer: Arc<Consumer>) -> Result<(), Error> {
        let mut inner = self.lock();
        inner.check()?;
        if inner.consumers.values().any(|c| c.exclusive) || (consumer.exclusive && !inner.consumers.is_empty()) {
            return Err(Error::ExclusiveConsumer);
        }
        let id = ConsumerId {
            gateway: GATEWAY.to_owned(),
            connection: inner.next_connection,
            channel: 0,
            tag: consumer.tag.clone(),
        };
        inner.next_connection += 1;
        let opts = ConsumerOpts { exclusive: consumer.exclusive, no_ack: consumer.no_ack };
        // Checkouts are proposed after this entry, so they apply after it.
        self.propose_and_wake(&mut inner, Command::Attach { consumer: id.clone(), opts })?;
        let me: Weak<dyn Queue> = self.me.clone();
        consumer.attach(me);
        inner.consumers.insert(id, consumer);
        drop(inner);
        self.wake.notify_one();
        Ok(())
    }

    fn get_now(&self, no_ack: bool) -> Result<Option<(Delivery, u32)>, Error> {
        match self.propose_and_wait(Command::Get { holder: get_holder(), no_ack })? {
            Answer::Got(got) => Ok(got),
            Answer::Failed(e) => Err(e),
            Answer::Purged(_) | Answer::Done => Ok(None),
        }
    }

    fn purge_now(&self) -> Result<u32, Error> {
        match self.propose_and_wait(Command::Purge)? {
            Answer::Purged(n) => Ok(n),
            Answer::Failed(e) => Err(e),
            Answer::Got(_) | Answer::Done => Ok(0),
        }
    }

    /// Ready messages and consumers of the applied state.
    pub fn counts_now(&self) -> (u32, u32) {
        let inner = self.lock();
        (inner.sm.ready_count(), inner.sm.consumer_count())
    }

}
