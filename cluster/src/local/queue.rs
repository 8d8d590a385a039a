//! One queue of the local node: the ready list, the unacknowledged set and
//! the consumers, behind one mutex.
//!
//! RAM per queued message is one `Entry` in a `BTreeMap` (about 60 bytes
//! with the map's overhead) plus the body only while the node's body budget
//! allows; otherwise the body is on disk and is read back on delivery.
//!
//! Invariants:
//! - `next_seq` only grows; every message has a unique seq within the queue.
//! - A message is in exactly one of `ready` and `unacked`, or settled.
//! - A requeued message goes back to its original position (ordered by seq),
//!   as RabbitMQ's classic queues do.
//! - Storage writes are issued while holding the lock, so a message's put
//!   always reaches the writer before its remove.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use sluice_codecs::command::Message;
use sluice_storage::{Applied, MessageRecord, Op, Store};

use super::BodyBudget;
use crate::backend::{ready, Consumer, Delivery, Durable, Outcome, Queue, QueueId, QueueSpec, Reply};
use crate::{record, Error};

/// Messages read per storage scan while recovering a queue.
const RECOVERY_PAGE: usize = 4096;

/// How far the in-memory ack floor may run ahead of the persisted one
/// before it is written again.
const FLOOR_STRIDE: u64 = 1024;

struct Entry {
    /// Bytes of the body (for the body budget).
    size: u64,
    /// The record is in storage (or on its way) and must be removed when
    /// settled.
    on_disk: bool,
    redelivered: bool,
    /// The message, when its body is in RAM: either charged to the body
    /// budget (`budgeted`), or only until storage has applied its write
    /// (see `State::unwritten`).
    message: Option<Arc<Message>>,
    budgeted: bool,
}

struct State {
    next_seq: u64,
    ready: BTreeMap<u64, Entry>,
    unacked: BTreeMap<u64, Entry>,
    consumers: Vec<Arc<Consumer>>,
    /// Round-robin position in `consumers`.
    cursor: usize,
    floor_persisted: u64,
    /// Highest seq handed to a consumer or basic.get (for the delivered
    /// mark written at clean shutdown).
    max_delivered: Option<u64>,
    /// Messages paged out to storage whose write may not be applied yet,
    /// in publish order. Until it is, their RAM copy is the only readable
    /// one, so it is kept; `trim_unwritten` drops it afterwards.
    unwritten: VecDeque<(u64, Applied)>,
    /// Set by `delete` under the lock: no publish or consume may follow.
    deleted: bool,
}

/// A queue held by this process.
pub struct LocalQueue {
    spec: QueueSpec,
    store: Store,
    budget: Arc<BodyBudget>,
    // std Mutex: never held across .await; every critical section is short
    // except reading a paged-out body back from storage during dispatch.
    state: Mutex<State>,
    me: Weak<LocalQueue>,
}

impl LocalQueue {
    /// Creates the queue, recovering the persistent messages of a durable
    /// queue from storage.
    pub(crate) fn open(spec: QueueSpec, store: Store, budget: Arc<BodyBudget>, clean_start: bool) -> Result<Arc<Self>, Error> {
        let mut ready = BTreeMap::new();
        let mut floor = 0;
        let mut drop_ops = Vec::new();
        // A (queue, seq) key may be written only once for the life of the
        // database (weak removes, see storage), so numbering continues from
        // the highest seq ever stored, never from the last live message.
        // Never below the ack floor either: seqs of messages that lived only
        // in RAM count towards the floor but not towards storage's next seq.
        let next_seq = store.next_seq(spec.id.0)?.max(store.ack_floor(spec.id.0)?);
        let mark_key = super::node_keys::delivered_mark(spec.id.0);
        // Messages at or below this seq may have been delivered before the
        // restart. Exact after a clean shutdown; after a crash, everything.
        let delivered_mark = if clean_start {
            store
                .list_meta(&mark_key)?
                .first()
                .and_then(|(_, v)| v.as_slice().try_into().ok())
                .map(u64::from_be_bytes)
        } else {
            Some(u64::MAX)
        };
        if spec.durable {
            floor = store.ack_floor(spec.id.0)?;
            // Page through the log so recovery never holds more than one
            // page of bodies; only the index stays in RAM.
            let mut from = floor;
            loop {
                let page = store.scan_queue_page(spec.id.0, from, RECOVERY_PAGE)?;
                let Some(&(last, _)) = page.last() else { break };
                for (seq, rec) in page {
                    if !rec.persistent {
                        // A transient message paged to disk before a crash.
                        drop_ops.push(Op::RemoveMessage { queue: spec.id.0, seq });
                        continue;
                    }
                    let size = rec.data.len() as u64;
                    let redelivered = delivered_mark.is_some_and(|m| seq <= m);
                    ready.insert(seq, Entry { size, on_disk: true, redelivered, message: None, budgeted: false });
                }
                from = last + 1;
            }
        } else {
            // A non-durable queue starts empty; clear leftovers from a crash.
            drop_ops.push(Op::DeleteQueue { queue: spec.id.0 });
        }
        if !drop_ops.is_empty() {
            store.write_nowait(drop_ops);
        }
        // Keep the flags across the next clean restart too.
        let max_flagged = ready.iter().rev().find(|(_, e)| e.redelivered).map(|(seq, _)| *seq);
        Ok(Arc::new_cyclic(|me| LocalQueue {
            spec,
            store,
            budget,
            state: Mutex::new(State {
                next_seq,
                ready,
                unacked: BTreeMap::new(),
                consumers: Vec::new(),
                cursor: 0,
                floor_persisted: floor,
                max_delivered: max_flagged,
                unwritten: VecDeque::new(),
                deleted: false,
            }),
            me: me.clone(),
        }))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn qid(&self) -> u64 {
        self.spec.id.0
    }

    /// Loads the message of an entry, from RAM or from storage.
    fn load(&self, seq: u64, entry: &Entry) -> Result<Message, Error> {
        if let Some(m) = &entry.message {
            return Ok(Message::clone(m));
        }
        let data = self
            .store
            .get_message(self.qid(), seq)?
            .ok_or_else(|| Error::Corrupt(format!("queue {} message {seq} missing from storage", self.spec.name)))?;
        record::decode(&data)
    }

    /// Forgets a settled entry: frees its RAM and removes it from disk.
    fn forget(&self, seq: u64, entry: Entry, ops: &mut Vec<Op>) {
        if entry.budgeted {
            self.budget.give_back(entry.size);
        }
        if entry.on_disk {
            ops.push(Op::RemoveMessage { queue: self.qid(), seq });
        }
    }

    /// Persists the ack floor if it moved far enough (or `force`).
    fn advance_floor(&self, st: &mut State, ops: &mut Vec<Op>, force: bool) {
        let low = [st.ready.keys().next(), st.unacked.keys().next()]
            .into_iter()
            .flatten()
            .min()
            .copied()
            .unwrap_or(st.next_seq);
        if self.spec.durable && low > st.floor_persisted && (force || low - st.floor_persisted >= FLOOR_STRIDE) {
            ops.push(Op::SetAckFloor { queue: self.qid(), floor: low });
            st.floor_persisted = low;
        }
    }

    /// Drops the RAM copy of paged-out messages whose write storage has
    /// applied (they are readable from disk now).
    fn trim_unwritten(st: &mut State) {
        while let Some((seq, applied)) = st.unwritten.front() {
            if !applied.is_settled() {
                return;
            }
            // A failed write keeps its RAM copy: storage is poisoned then.
            if applied.is_applied() {
                let seq = *seq;
                if let Some(e) = st.ready.get_mut(&seq).or_else(|| st.unacked.get_mut(&seq)) {
                    if !e.budgeted {
                        e.message = None;
                    }
                }
            }
            st.unwritten.pop_front();
        }
    }

    fn flush_ops(&self, ops: Vec<Op>) {
        if !ops.is_empty() {
            self.store.write_nowait(ops);
        }
    }

    /// Writes the ack floor and the delivered mark now (clean shutdown).
    pub(crate) fn persist_marks(&self) {
        let mut st = self.lock();
        let mut ops = Vec::new();
        self.advance_floor(&mut st, &mut ops, true);
        let key = super::node_keys::delivered_mark(self.qid());
        match st.max_delivered {
            Some(m) if self.spec.durable => ops.push(Op::PutMeta { key, value: m.to_be_bytes().to_vec() }),
            _ => ops.push(Op::DeleteMeta { key }),
        }
        drop(st);
        self.flush_ops(ops);
    }

    /// Hands ready messages to consumers with credit, round robin.
    fn dispatch(&self, st: &mut State, ops: &mut Vec<Op>) {
        Self::trim_unwritten(st);
        while !st.ready.is_empty() && !st.consumers.is_empty() {
            let n = st.consumers.len();
            let mut chosen = None;
            for i in 0..n {
                let idx = (st.cursor + i) % n;
                if let Some(c) = st.consumers.get(idx) {
                    if c.try_acquire() {
                        chosen = Some(idx);
                        break;
                    }
                }
            }
            let Some(idx) = chosen else { return };
            st.cursor = (idx + 1) % n;
            let Some(consumer) = st.consumers.get(idx).cloned() else { return };
            let Some((seq, entry)) = st.ready.pop_first() else { return };
            let message = match self.load(seq, &entry) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(queue = %self.spec.name, seq, error = %e, "cannot read message; dropping it");
                    consumer.undo_acquire();
                    self.forget(seq, entry, ops);
                    continue;
                }
            };
            let delivery = Delivery { msg_id: seq, redelivered: entry.redelivered, message };
            st.max_delivered = st.max_delivered.max(Some(seq));
            if !consumer.sink.deliver(&consumer, delivery) {
                // The consumer's connection is gone: detach it and keep the message.
                consumer.undo_acquire();
                st.ready.insert(seq, entry);
                st.consumers.retain(|c| !Arc::ptr_eq(c, &consumer));
                continue;
            }
            if consumer.no_ack {
                self.forget(seq, entry, ops);
            } else {
                st.unacked.insert(seq, entry);
            }
        }
    }

    /// Deletes the queue: cancels consumers and drops every message.
    pub(crate) fn delete(&self) -> u32 {
        let mut st = self.lock();
        st.deleted = true;
        let count = st.ready.len() as u32;
        let consumers = std::mem::take(&mut st.consumers);
        for (_, e) in std::mem::take(&mut st.ready).into_iter().chain(std::mem::take(&mut st.unacked)) {
            if e.budgeted {
                self.budget.give_back(e.size);
            }
        }
        st.unwritten.clear();
        // Issued under the lock: no put of this queue can follow it.
        self.store.write_nowait(vec![Op::DeleteQueue { queue: self.qid() }]);
        drop(st);
        for c in consumers {
            c.sink.cancelled(&c);
        }
        count
    }
}

impl Queue for LocalQueue {
    fn id(&self) -> QueueId {
        self.spec.id
    }

    fn publish(&self, message: Message) -> Result<Option<Durable>, Error> {
        let size = message.body.len() as u64;
        let persistent = self.spec.durable && message.is_persistent();
        let budgeted = self.budget.try_take(size);
        let mut st = self.lock();
        if st.deleted {
            drop(st);
            if budgeted {
                self.budget.give_back(size);
            }
            return Err(Error::QueueDeleted);
        }
        let seq = st.next_seq;
        st.next_seq += 1;
        let message = Arc::new(message);
        let mut wait = None;
        let on_disk = persistent || !budgeted;
        if on_disk {
            let rec = MessageRecord { persistent, data: record::encode(&message) };
            let ops = vec![Op::PutMessage { queue: self.qid(), seq, record: rec }];
            let (completion, applied) = self.store.write_tracked(ops, persistent);
            if persistent {
                wait = Some(Box::pin(async move { completion.await.map_err(Error::from) }) as Durable);
            }
            if !budgeted {
                st.unwritten.push_back((seq, applied));
            }
        }
        // The RAM copy is always kept at first; an unbudgeted one goes once
        // storage has applied the write (trim_unwritten).
        st.ready.insert(seq, Entry { size, on_disk, redelivered: false, message: Some(message), budgeted });
        let mut ops = Vec::new();
        self.dispatch(&mut st, &mut ops);
        drop(st);
        self.flush_ops(ops);
        Ok(wait)
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
        let mut st = self.lock();
        let before = st.consumers.len();
        st.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
        st.cursor = 0;
        before != st.consumers.len()
    }

    fn settle(&self, msg_ids: &[u64], outcome: Outcome) {
        let mut st = self.lock();
        let mut ops = Vec::new();
        for &seq in msg_ids {
            let Some(mut entry) = st.unacked.remove(&seq) else { continue };
            match outcome {
                Outcome::Ack | Outcome::Discard => self.forget(seq, entry, &mut ops),
                Outcome::Requeue => {
                    entry.redelivered = true;
                    st.ready.insert(seq, entry);
                }
            }
        }
        if outcome == Outcome::Requeue {
            self.dispatch(&mut st, &mut ops);
        }
        self.advance_floor(&mut st, &mut ops, false);
        drop(st);
        self.flush_ops(ops);
    }

    fn kick(&self) {
        let mut st = self.lock();
        let mut ops = Vec::new();
        self.dispatch(&mut st, &mut ops);
        drop(st);
        self.flush_ops(ops);
    }
}

impl LocalQueue {
    fn consume_now(&self, consumer: Arc<Consumer>) -> Result<(), Error> {
        let mut st = self.lock();
        if st.deleted {
            return Err(Error::QueueDeleted);
        }
        if st.consumers.iter().any(|c| c.exclusive) || (consumer.exclusive && !st.consumers.is_empty()) {
            return Err(Error::ExclusiveConsumer);
        }
        let me: Weak<dyn Queue> = self.me.clone();
        consumer.attach(me);
        st.consumers.push(consumer);
        let mut ops = Vec::new();
        self.dispatch(&mut st, &mut ops);
        drop(st);
        self.flush_ops(ops);
        Ok(())
    }

    fn get_now(&self, no_ack: bool) -> Result<Option<(Delivery, u32)>, Error> {
        let mut st = self.lock();
        let mut ops = Vec::new();
        let result = loop {
            let Some((seq, entry)) = st.ready.pop_first() else { break None };
            match self.load(seq, &entry) {
                Ok(message) => {
                    let delivery = Delivery { msg_id: seq, redelivered: entry.redelivered, message };
                    st.max_delivered = st.max_delivered.max(Some(seq));
                    if no_ack {
                        self.forget(seq, entry, &mut ops);
                    } else {
                        st.unacked.insert(seq, entry);
                    }
                    break Some((delivery, st.ready.len() as u32));
                }
                Err(e) => {
                    tracing::error!(queue = %self.spec.name, seq, error = %e, "cannot read message; dropping it");
                    self.forget(seq, entry, &mut ops);
                }
            }
        };
        self.advance_floor(&mut st, &mut ops, false);
        drop(st);
        self.flush_ops(ops);
        Ok(result)
    }

    fn purge_now(&self) -> Result<u32, Error> {
        let mut st = self.lock();
        let ready = std::mem::take(&mut st.ready);
        let count = ready.len() as u32;
        let mut ops = Vec::new();
        for (seq, entry) in ready {
            self.forget(seq, entry, &mut ops);
        }
        self.advance_floor(&mut st, &mut ops, true);
        drop(st);
        self.flush_ops(ops);
        Ok(count)
    }

    fn counts_now(&self) -> (u32, u32) {
        let st = self.lock();
        (st.ready.len() as u32, st.consumers.len() as u32)
    }

}
