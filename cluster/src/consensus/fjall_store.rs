//! [`FjallLogStore`]: the durable [`LogStore`] of one Raft group, on the
//! node's shared [`sluice_storage::Store`] (docs/cluster.md, "Durable log
//! store").
//!
//! Every group of a node writes through the same `Store`, hence the same
//! storage writer thread: the appends of many groups that arrive while one
//! fsync runs share the next one.
//!
//! **Layout** (log id = group id; values are raft-rs protobuf encodings):
//!
//! | what | storage op | value |
//! |---|---|---|
//! | entry `i` | `Op::LogAppend { log, index: i }` | `eraftpb::Entry` |
//! | hard state | `Op::LogMeta { tag: TAG_HARD_STATE }` (`b'h'`) | `eraftpb::HardState` |
//! | apply state | `Op::LogMeta { tag: TAG_APPLY_STATE }` (`b'a'`) | `eraftpb::SnapshotMetadata` (index, term, conf state) |
//! | snapshot metadata | `Op::LogMeta { tag: TAG_SNAPSHOT_META }` (`b's'`) | `eraftpb::SnapshotMetadata` |
//! | snapshot data | `Op::LogMeta { tag: TAG_SNAPSHOT_DATA }` (`b'd'`) | the state machine's bytes, as is |
//!
//! The configuration (`ConfState`) is not stored on its own: it is part of
//! the snapshot metadata and of the apply state, which is where raft-rs's
//! starting configuration comes from. Invariant: the storage's first index
//! of the log (`Op::LogCompact`) is always `snapshot index + 1` (both are
//! written in one write), and the entries on disk are exactly
//! `snapshot index + 1 ..= last index`, without holes.
//!
//! **One `LogWrite` = one storage write**, so it is atomic: a received
//! snapshot (`LogCompact` + `LogTruncate` + its metadata and data), the
//! truncation of a conflicting tail (`LogTruncate` from the first new
//! index), the new entries and the hard state land together or not at all.
//! `must_sync` selects a durable (fsynced) write.
//!
//! **Reads see every submitted write at once.** The small state (hard
//! state, apply state, snapshot metadata, first and last index, and the
//! terms of the log as runs of equal terms) lives in memory and is updated
//! at submission. Entries of writes the storage writer has not applied yet
//! sit in an overlay; reads take indexes from the overlay first and the
//! rest from fjall. The overlay is always a suffix of the log (every write
//! ends the log at its last entry), and an entry leaves it when the write
//! that put it there is settled (see below). The data of a snapshot
//! written but not yet applied is kept the same way.
//!
//! **Durability is reported in submission order.** Each write is submitted
//! with `Store::write_tracked`; the store's writer thread takes requests
//! from one FIFO channel, commits them in that order (one batch per group
//! commit, fsynced when any of its writes is durable; fjall also syncs a
//! journal before rotating away from it) and answers each request after its
//! batch, in order. So when write `n` of this group is settled successfully,
//! every earlier write of this group was committed in the same or an
//! earlier batch, and if `n` was durable they all are. A failed batch
//! poisons the store, so no later write can succeed after a failed one.
//! The caller learns durability in one of three ways, all reporting the
//! highest raft-rs write number made durable, for
//! [`Group::on_persisted`](super::Group::on_persisted):
//!
//! - [`FjallLogStore::poll_persisted`]: non-blocking, for an event loop
//!   that polls its groups (reads the `Applied` flags of the writes);
//! - [`FjallLogStore::wait_persisted`]: async and cancel-safe, for a task
//!   per group (awaits the oldest write's `Completion` in place);
//! - [`FjallLogStore::wait_persisted_blocking`]: for a plain thread.
//!
//! A write with `must_sync == false` (only a new commit index, which
//! raft-rs allows to lose) is reported once applied, without waiting for
//! an fsync.
//!
//! **Checkpoints and compaction** (`save_apply_state`, `compact`) are
//! submitted as durable writes in the same FIFO stream and return without
//! waiting for the fsync (blocking a runtime thread for it would be worse,
//! and `Completion::wait_blocking` panics inside a tokio runtime). They are
//! durable no later than any write submitted after them is reported
//! durable, so nothing submitted later (including the state machine's own
//! follow-up writes to the same `Store`) can survive a crash without them;
//! a crash before their fsync leaves the previous checkpoint, which is
//! consistent because the state machine's state is written in the same
//! atomic write ([`FjallLogStore::save_apply_state_with`]). Use
//! [`FjallLogStore::wait_idle_blocking`] to wait for them explicitly.
//!
//! **Failure.** If a write fails (the store is poisoned or closed), the
//! in-memory view no longer matches the disk: every later call fails with
//! [`FjallLogStoreError::WriteFailed`]; reopen the group from the store
//! (after restarting the node, since a poisoned store refuses writes).

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{Entry, HardState, Snapshot, SnapshotMetadata};
use sluice_storage::{Applied, Completion, Op, Store};

use super::log_store::{
    bootstrap_snapshot, ApplyState, LogStore, LogStoreError, LogWrite, BOOTSTRAP_INDEX,
    BOOTSTRAP_TERM,
};

/// `Op::LogMeta` tag of the hard state (`eraftpb::HardState`).
pub const TAG_HARD_STATE: u8 = b'h';
/// `Op::LogMeta` tag of the apply state, encoded as an
/// `eraftpb::SnapshotMetadata` (index, term, configuration).
pub const TAG_APPLY_STATE: u8 = b'a';
/// `Op::LogMeta` tag of the latest snapshot's metadata
/// (`eraftpb::SnapshotMetadata`).
pub const TAG_SNAPSHOT_META: u8 = b's';
/// `Op::LogMeta` tag of the latest snapshot's data (the state machine's
/// bytes, unchanged).
pub const TAG_SNAPSHOT_DATA: u8 = b'd';

/// Entries read from fjall per range scan when serving `entries` and at
/// open.
const READ_CHUNK: u64 = 256;

/// What can go wrong with a [`FjallLogStore`] outside the [`LogStore`]
/// trait (whose methods report [`LogStoreError`]; this converts into it).
#[derive(Debug, Clone, thiserror::Error)]
pub enum FjallLogStoreError {
    /// The storage refused a read or a write.
    #[error("storage: {0}")]
    Storage(#[from] sluice_storage::Error),
    /// A submitted write of this group failed; the in-memory view no
    /// longer matches the disk, so the group must be reopened.
    #[error("a write of raft group {group} failed: {}", describe(.cause))]
    WriteFailed {
        /// The group.
        group: u64,
        /// The storage's error, when it could be read without waiting.
        cause: Option<sluice_storage::Error>,
    },
    /// A stored value cannot be decoded or the stored log has a hole.
    #[error("corrupt raft log of group {group}: {what}: {detail}")]
    Corrupt {
        /// The group.
        group: u64,
        /// Which record.
        what: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// `bootstrap` found state of this group in the store already.
    #[error("raft group {group} already has state in this store")]
    AlreadyExists {
        /// The group.
        group: u64,
    },
    /// A received snapshot is older than the one the store holds (raft-rs
    /// never asks for that: a follower only restores a snapshot beyond its
    /// commit index, and local snapshots are at most the applied index).
    #[error(
        "raft group {group}: received snapshot at {index} is older than the stored one at {stored}"
    )]
    StaleSnapshot {
        /// The group.
        group: u64,
        /// The received snapshot's index.
        index: u64,
        /// The stored snapshot's index.
        stored: u64,
    },
    /// A check of the [`LogStore`] contract failed (detached append,
    /// bad compaction...).
    #[error(transparent)]
    Log(#[from] LogStoreError),
}

fn describe(cause: &Option<sluice_storage::Error>) -> String {
    cause.as_ref().map_or_else(|| "the storage refused it".to_owned(), ToString::to_string)
}

impl From<FjallLogStoreError> for LogStoreError {
    fn from(error: FjallLogStoreError) -> Self {
        match error {
            FjallLogStoreError::Log(error) => error,
            error @ (FjallLogStoreError::Corrupt { .. }
            | FjallLogStoreError::StaleSnapshot { .. }
            | FjallLogStoreError::AlreadyExists { .. }) => {
                LogStoreError::Inconsistent(error.to_string())
            }
            error @ (FjallLogStoreError::Storage(_) | FjallLogStoreError::WriteFailed { .. }) => {
                LogStoreError::Failed(error.to_string())
            }
        }
    }
}

/// The terms of the log `first..=last` as runs: `(first index of the run,
/// term)`, ascending. Terms change rarely, so this is tiny, and `term()`
/// never touches the disk.
#[derive(Debug, Clone, Default)]
struct TermRuns {
    runs: VecDeque<(u64, u64)>,
}

impl TermRuns {
    /// The term at `index`, which the caller checked is in the log.
    fn get(&self, index: u64) -> Option<u64> {
        let position = self.runs.partition_point(|(start, _)| *start <= index);
        position.checked_sub(1).and_then(|p| self.runs.get(p)).map(|(_, term)| *term)
    }

    /// Appends entry `index` (the next after the current last) with `term`.
    fn push(&mut self, index: u64, term: u64) {
        if self.runs.back().is_none_or(|(_, last)| *last != term) {
            self.runs.push_back((index, term));
        }
    }

    /// Forgets every index `>= from`.
    fn truncate_from(&mut self, from: u64) {
        while self.runs.back().is_some_and(|(start, _)| *start >= from) {
            self.runs.pop_back();
        }
    }

    /// Forgets every index `< first`.
    fn compact(&mut self, first: u64) {
        while self.runs.get(1).is_some_and(|(start, _)| *start <= first) {
            self.runs.pop_front();
        }
        if let Some(front) = self.runs.front_mut() {
            front.0 = front.0.max(first);
        }
    }

    fn clear(&mut self) {
        self.runs.clear();
    }
}

/// One write handed to the storage and not yet settled.
#[derive(Debug)]
struct InFlight {
    /// This store's own sequence number of the write (keys the overlay).
    seq: u64,
    /// The raft-rs write number; `None` for checkpoints, compactions and
    /// the bootstrap.
    number: Option<u64>,
    /// Entries `first..=last` it put into the overlay.
    entries: Option<(u64, u64)>,
    /// Set by the storage writer once the write is applied (and, if
    /// durable, fsynced), before it resolves `completion`.
    applied: Applied,
    /// `None` once awaited (the result is then in `done`).
    completion: Option<Completion>,
    /// The awaited result.
    done: Option<Result<(), sluice_storage::Error>>,
}

impl InFlight {
    fn is_settled(&self) -> bool {
        self.done.is_some() || self.applied.is_settled()
    }

    /// The error of a settled write, if it failed.
    fn failure(&mut self) -> Option<Option<sluice_storage::Error>> {
        match &self.done {
            Some(Ok(())) => None,
            Some(Err(error)) => Some(Some(error.clone())),
            None if self.applied.is_applied() => None,
            None => Some(self.completion.as_mut().and_then(poll_now).and_then(Result::err)),
        }
    }
}

/// Polls a completion once without a real waker (it is resolved already
/// when this is used; `None` if it still looks pending).
fn poll_now(completion: &mut Completion) -> Option<Result<(), sluice_storage::Error>> {
    let mut context = Context::from_waker(Waker::noop());
    match Pin::new(completion).poll(&mut context) {
        Poll::Ready(result) => Some(result),
        Poll::Pending => None,
    }
}

/// The durable [`LogStore`] of one Raft group on the node's shared
/// [`Store`]. See the module docs for the layout, the read overlay and how
/// durability is reported.
pub struct FjallLogStore {
    store: Store,
    group: u64,
    hard_state: HardState,
    apply_state: ApplyState,
    snapshot_meta: SnapshotMetadata,
    /// The data of a snapshot whose write may not be applied yet, with
    /// that write's `seq`; otherwise the data is read from the store.
    snapshot_data: Option<(u64, Bytes)>,
    last_index: u64,
    terms: TermRuns,
    /// Entries of writes not yet settled: index → (write seq, entry).
    overlay: BTreeMap<u64, (u64, Entry)>,
    in_flight: VecDeque<InFlight>,
    next_seq: u64,
    /// Highest raft-rs number durable and not yet returned by a poll.
    unreported: Option<u64>,
    /// Highest raft-rs number known durable.
    durable: Option<u64>,
    failed: Option<FjallLogStoreError>,
    /// Writes nothing: the log lives in the overlay only, every write is
    /// durable when submitted ([`FjallLogStore::bootstrap_volatile`]).
    volatile: bool,
}

impl std::fmt::Debug for FjallLogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallLogStore")
            .field("group", &self.group)
            .field("first_index", &self.first_index())
            .field("last_index", &self.last_index)
            .field("hard_state", &self.hard_state)
            .field("in_flight", &self.in_flight.len())
            .field("overlay", &self.overlay.len())
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}

impl FjallLogStore {
    /// Opens the log of `group` as it is on disk: the store of a restarting
    /// replica, or an empty one (a replica joining an existing group,
    /// which learns its configuration from the leader's snapshot).
    ///
    /// Reads the small records and scans the log once (to learn its terms
    /// and check that it has no hole). An earlier handle of the same group
    /// on the same `Store` must have no writes in flight
    /// ([`FjallLogStore::close`] it first), or this one would not see them.
    pub fn open(store: Store, group: u64) -> Result<Self, FjallLogStoreError> {
        let corrupt = |what, error: protobuf::ProtobufError| FjallLogStoreError::Corrupt {
            group,
            what,
            detail: error.to_string(),
        };
        let hard_state = match store.log_meta(group, TAG_HARD_STATE)? {
            Some(bytes) => {
                HardState::parse_from_bytes(&bytes).map_err(|e| corrupt("hard state", e))?
            }
            None => HardState::default(),
        };
        let apply_state = match store.log_meta(group, TAG_APPLY_STATE)? {
            Some(bytes) => {
                let mut meta = SnapshotMetadata::parse_from_bytes(&bytes)
                    .map_err(|e| corrupt("apply state", e))?;
                ApplyState {
                    index: meta.index,
                    term: meta.term,
                    conf_state: meta.take_conf_state(),
                }
            }
            None => ApplyState::default(),
        };
        let snapshot_meta = match store.log_meta(group, TAG_SNAPSHOT_META)? {
            Some(bytes) => SnapshotMetadata::parse_from_bytes(&bytes)
                .map_err(|e| corrupt("snapshot metadata", e))?,
            None => SnapshotMetadata::default(),
        };
        let snapshot_index = snapshot_meta.index;
        let last_index = match store.log_last_index(group)? {
            Some(last) if last > snapshot_index => last,
            _ => snapshot_index,
        };
        let mut this = FjallLogStore {
            store,
            group,
            hard_state,
            apply_state,
            snapshot_meta,
            snapshot_data: None,
            last_index,
            terms: TermRuns::default(),
            overlay: BTreeMap::new(),
            in_flight: VecDeque::new(),
            next_seq: 0,
            unreported: None,
            durable: None,
            failed: None,
            volatile: false,
        };
        let mut next = snapshot_index + 1;
        while next <= last_index {
            let high = last_index.min(next.saturating_add(READ_CHUNK - 1));
            for (index, bytes) in this.store.log_entries(group, next, high + 1)? {
                let entry = this.decode(index, next, &bytes)?;
                this.terms.push(index, entry.term);
                next += 1;
            }
            if next <= high {
                return Err(this.corrupt_at(next, "missing entry (a hole in the log)"));
            }
        }
        Ok(this)
    }

    /// Creates the log of a founding member of a new group, starting from
    /// the bootstrap snapshot (see [`bootstrap_snapshot`]); every founding
    /// replica must be created with the same arguments. Fails with
    /// [`FjallLogStoreError::AlreadyExists`] if the store holds state of
    /// `group`.
    ///
    /// The write is durable in order with the later ones (see the module
    /// docs on checkpoints).
    pub fn bootstrap(
        store: Store,
        group: u64,
        voters: &[u64],
        learners: &[u64],
        data: Bytes,
    ) -> Result<Self, FjallLogStoreError> {
        Self::bootstrap_with(store, group, voters, learners, data, false)
    }

    /// A log kept in memory only, for a group whose state need not
    /// survive the process (a non-durable queue of a single node, which a
    /// restart deletes anyway): nothing reaches the store, not even the
    /// bootstrap, every write is durable as soon as it is submitted, and
    /// entries stay in the overlay until compacted. It must never get
    /// other voters (they would be sent a log nobody can recover).
    pub fn bootstrap_volatile(store: Store, group: u64, voters: &[u64]) -> Result<Self, FjallLogStoreError> {
        Self::bootstrap_with(store, group, voters, &[], Bytes::new(), true)
    }

    fn bootstrap_with(
        store: Store,
        group: u64,
        voters: &[u64],
        learners: &[u64],
        data: Bytes,
        volatile: bool,
    ) -> Result<Self, FjallLogStoreError> {
        if Self::exists(&store, group)? {
            return Err(FjallLogStoreError::AlreadyExists { group });
        }
        let mut this = Self::open(store, group)?;
        this.volatile = volatile;
        let snapshot = bootstrap_snapshot(voters, learners, data);
        let hard_state =
            HardState { term: BOOTSTRAP_TERM, commit: BOOTSTRAP_INDEX, ..HardState::default() };
        let apply_state = ApplyState {
            index: BOOTSTRAP_INDEX,
            term: BOOTSTRAP_TERM,
            conf_state: snapshot.get_metadata().get_conf_state().clone(),
        };
        let mut ops = this.snapshot_ops(&snapshot)?;
        ops.push(this.meta_op(TAG_HARD_STATE, &hard_state)?);
        ops.push(this.apply_state_op(&apply_state)?);
        let seq = this.send(ops, true, None, None)?;
        this.hard_state = hard_state;
        this.apply_state = apply_state;
        this.install_snapshot_view(seq, snapshot);
        Ok(this)
    }

    /// Whether the store holds any state of `group` (records or entries).
    pub fn exists(store: &Store, group: u64) -> Result<bool, FjallLogStoreError> {
        for tag in [TAG_HARD_STATE, TAG_APPLY_STATE, TAG_SNAPSHOT_META, TAG_SNAPSHOT_DATA] {
            if store.log_meta(group, tag)?.is_some() {
                return Ok(true);
            }
        }
        Ok(store.log_last_index(group)?.is_some())
    }

    /// The group (= log id).
    pub fn group(&self) -> u64 {
        self.group
    }

    /// The shared store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes handed to the storage and not yet settled.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// The completion of the oldest write in flight, for a driver to await
    /// outside the lock the store is under (then poll again): it resolves
    /// once that write is settled. `None` if nothing is in flight or it
    /// was taken already.
    pub fn take_oldest_completion(&mut self) -> Option<Completion> {
        self.in_flight.front_mut().and_then(|w| w.completion.take())
    }

    /// Writes in flight that append entries (not only a new commit index
    /// or a checkpoint).
    pub fn appends_in_flight(&self) -> usize {
        self.in_flight.iter().filter(|w| w.entries.is_some()).count()
    }

    /// The raft-rs number of the write in flight that appends entry
    /// `index` (`None` once no write in flight holds it: settled).
    pub fn write_holding(&self, index: u64) -> Option<u64> {
        self.in_flight
            .iter()
            .rev()
            .find(|w| w.entries.is_some_and(|(first, last)| (first..=last).contains(&index)))
            .and_then(|w| w.number)
    }

    /// The highest raft-rs write number known durable.
    pub fn durable_number(&self) -> Option<u64> {
        self.durable
    }

    /// Non-blocking: the highest raft-rs write number that became durable
    /// since the last report (`None` if none did). Pass it to
    /// `Group::on_persisted`. Fails once any write of this group failed.
    pub fn poll_persisted(&mut self) -> Result<Option<u64>, FjallLogStoreError> {
        self.reap()?;
        Ok(self.unreported.take())
    }

    /// Like [`FjallLogStore::poll_persisted`], but if nothing new is
    /// durable and writes are in flight, waits for the oldest one. Returns
    /// `Ok(None)` at once when nothing is in flight (guard a `select!`
    /// branch with [`FjallLogStore::in_flight`]). Cancel-safe: the write
    /// being waited for stays in flight if the future is dropped.
    pub async fn wait_persisted(&mut self) -> Result<Option<u64>, FjallLogStoreError> {
        loop {
            self.reap()?;
            if let Some(number) = self.unreported.take() {
                return Ok(Some(number));
            }
            let Some(front) = self.in_flight.front_mut() else {
                return Ok(None);
            };
            let Some(completion) = front.completion.as_mut() else {
                // Awaited already but not reaped: `reap` treats it as
                // settled, so this is not reached; do not spin.
                return Ok(None);
            };
            let result = std::future::poll_fn(|cx| Pin::new(&mut *completion).poll(cx)).await;
            front.completion = None;
            front.done = Some(result);
        }
    }

    /// Like [`FjallLogStore::wait_persisted`], blocking the thread. Must
    /// not be called on an async runtime thread.
    pub fn wait_persisted_blocking(&mut self) -> Result<Option<u64>, FjallLogStoreError> {
        loop {
            self.reap()?;
            if let Some(number) = self.unreported.take() {
                return Ok(Some(number));
            }
            let Some(front) = self.in_flight.front_mut() else {
                return Ok(None);
            };
            let Some(completion) = front.completion.take() else {
                if front.is_settled() {
                    return Ok(None);
                }
                // Taken by a driver that awaits it (`take_oldest_completion`):
                // the writer settles it soon.
                std::thread::sleep(std::time::Duration::from_millis(1));
                continue;
            };
            front.done = Some(completion.wait_blocking());
        }
    }

    /// Blocks until every write submitted so far (checkpoints and
    /// compactions included) is settled; returns the highest raft-rs
    /// number that became durable since the last report.
    pub fn wait_idle_blocking(&mut self) -> Result<Option<u64>, FjallLogStoreError> {
        let mut highest = None;
        while !self.in_flight.is_empty() || self.unreported.is_some() {
            if let Some(number) = self.wait_persisted_blocking()? {
                highest = Some(number);
            }
        }
        Ok(highest)
    }

    /// Waits for every submitted write of this group, then drops the
    /// handle (the shared `Store` stays open). Returns the highest raft-rs
    /// number known durable.
    pub fn close(mut self) -> Result<Option<u64>, FjallLogStoreError> {
        self.wait_idle_blocking()?;
        Ok(self.durable)
    }

    /// [`LogStore::save_apply_state`] plus `extra` ops of the caller (the
    /// state machine's own state) in the same atomic storage write, so the
    /// checkpoint and the state it describes survive a crash together.
    pub fn save_apply_state_with(
        &mut self,
        state: &ApplyState,
        extra: Vec<Op>,
    ) -> Result<(), FjallLogStoreError> {
        self.reap()?;
        let mut ops = vec![self.apply_state_op(state)?];
        ops.extend(extra);
        self.send(ops, true, None, None)?;
        self.apply_state = state.clone();
        Ok(())
    }

    /// [`LogStore::compact`] plus `extra` ops of the caller in the same
    /// atomic storage write. Returns whether the snapshot was installed
    /// (`false`: it is not newer than the stored one, and nothing, `extra`
    /// included, was written).
    pub fn compact_with(
        &mut self,
        snapshot: Snapshot,
        extra: Vec<Op>,
    ) -> Result<bool, FjallLogStoreError> {
        self.reap()?;
        let index = snapshot.get_metadata().index;
        let term = snapshot.get_metadata().term;
        if index <= self.snapshot_meta.index {
            return Ok(false);
        }
        let bad = |reason| LogStoreError::BadCompaction { index, term, reason };
        match self.term(index) {
            Ok(found) if found == term => {}
            Ok(_) => return Err(bad("the log has a different term at that index").into()),
            Err(_) => return Err(bad("the log does not reach that index").into()),
        }
        let mut ops = vec![Op::LogCompact { log: self.group, below: index + 1 }];
        ops.push(self.meta_op(TAG_SNAPSHOT_META, snapshot.get_metadata())?);
        ops.push(Op::LogMeta {
            log: self.group,
            tag: TAG_SNAPSHOT_DATA,
            value: Some(snapshot.data.clone()),
        });
        ops.extend(extra);
        let seq = self.send(ops, true, None, None)?;
        self.terms.compact(index + 1);
        self.overlay = self.overlay.split_off(&(index + 1));
        self.snapshot_data = Some((seq, snapshot.data.clone()));
        self.snapshot_meta = snapshot.get_metadata().clone();
        Ok(true)
    }

    /// Replaces the stored snapshot by one at the same index (and term)
    /// with other data and configuration; the log is not touched. For a
    /// state machine whose compaction point cannot move (the entries after
    /// it are still needed) but whose snapshot must carry a newer
    /// configuration (a replica added since, which refuses a snapshot
    /// without itself). Returns `false` if the index is not the stored
    /// snapshot's.
    pub fn replace_snapshot(&mut self, snapshot: Snapshot) -> Result<bool, FjallLogStoreError> {
        self.reap()?;
        let meta = snapshot.get_metadata();
        if meta.index != self.snapshot_meta.index || meta.term != self.snapshot_meta.term || meta.index == 0 {
            return Ok(false);
        }
        let ops = vec![
            self.meta_op(TAG_SNAPSHOT_META, snapshot.get_metadata())?,
            Op::LogMeta { log: self.group, tag: TAG_SNAPSHOT_DATA, value: Some(snapshot.data.clone()) },
        ];
        let seq = self.send(ops, true, None, None)?;
        self.snapshot_data = Some((seq, snapshot.data.clone()));
        self.snapshot_meta = snapshot.get_metadata().clone();
        Ok(true)
    }

    /// Settles every finished write at the front of the queue, in order.
    fn reap(&mut self) -> Result<(), FjallLogStoreError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        while self.in_flight.front().is_some_and(InFlight::is_settled) {
            let Some(mut write) = self.in_flight.pop_front() else {
                break;
            };
            if let Some(cause) = write.failure() {
                let error = FjallLogStoreError::WriteFailed { group: self.group, cause };
                self.failed = Some(error.clone());
                return Err(error);
            }
            if let Some((first, last)) = write.entries {
                let ours: Vec<u64> = self
                    .overlay
                    .range(first..=last)
                    .filter(|(_, (seq, _))| *seq == write.seq)
                    .map(|(index, _)| *index)
                    .collect();
                for index in ours {
                    self.overlay.remove(&index);
                }
            }
            if self.snapshot_data.as_ref().is_some_and(|(seq, _)| *seq == write.seq) {
                self.snapshot_data = None;
            }
            if let Some(number) = write.number {
                self.durable = Some(number);
                self.unreported = Some(number);
            }
        }
        Ok(())
    }

    /// Hands `ops` to the storage as one write and queues it; fails (and
    /// marks the store failed) if the storage refused it at once.
    fn send(
        &mut self,
        ops: Vec<Op>,
        durable: bool,
        number: Option<u64>,
        entries: Option<(u64, u64)>,
    ) -> Result<u64, FjallLogStoreError> {
        if self.volatile {
            let seq = self.next_seq;
            self.next_seq += 1;
            if let Some(number) = number {
                self.durable = Some(number);
                self.unreported = Some(number);
            }
            return Ok(seq);
        }
        let (mut completion, applied) = self.store.write_tracked(ops, durable);
        if applied.is_settled() && !applied.is_applied() {
            let cause = poll_now(&mut completion).and_then(Result::err);
            let error = FjallLogStoreError::WriteFailed { group: self.group, cause };
            self.failed = Some(error.clone());
            return Err(error);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.in_flight.push_back(InFlight {
            seq,
            number,
            entries,
            applied,
            completion: Some(completion),
            done: None,
        });
        Ok(seq)
    }

    fn meta_op(&self, tag: u8, message: &dyn protobuf::Message) -> Result<Op, FjallLogStoreError> {
        let value = message.write_to_bytes().map_err(|error| FjallLogStoreError::Corrupt {
            group: self.group,
            what: "encoding",
            detail: error.to_string(),
        })?;
        Ok(Op::LogMeta { log: self.group, tag, value: Some(value.into()) })
    }

    fn apply_state_op(&self, state: &ApplyState) -> Result<Op, FjallLogStoreError> {
        let mut meta = SnapshotMetadata {
            index: state.index,
            term: state.term,
            ..SnapshotMetadata::default()
        };
        meta.set_conf_state(state.conf_state.clone());
        self.meta_op(TAG_APPLY_STATE, &meta)
    }

    /// The ops that make `snapshot` replace the whole log: entries up to
    /// it compacted (the storage's first index becomes `index + 1`), every
    /// later entry removed, metadata and data stored.
    fn snapshot_ops(&self, snapshot: &Snapshot) -> Result<Vec<Op>, FjallLogStoreError> {
        let index = snapshot.get_metadata().index;
        Ok(vec![
            Op::LogCompact { log: self.group, below: index + 1 },
            Op::LogTruncate { log: self.group, from: index + 1 },
            self.meta_op(TAG_SNAPSHOT_META, snapshot.get_metadata())?,
            Op::LogMeta {
                log: self.group,
                tag: TAG_SNAPSHOT_DATA,
                value: Some(snapshot.data.clone()),
            },
        ])
    }

    /// The in-memory side of a snapshot replacing the log (written by
    /// write `seq`).
    fn install_snapshot_view(&mut self, seq: u64, snapshot: Snapshot) {
        let metadata = snapshot.get_metadata().clone();
        self.last_index = metadata.index;
        self.terms.clear();
        self.overlay.clear();
        self.snapshot_data = Some((seq, snapshot.data));
        self.snapshot_meta = metadata;
    }

    fn corrupt_at(&self, index: u64, detail: &str) -> FjallLogStoreError {
        FjallLogStoreError::Corrupt {
            group: self.group,
            what: "log entry",
            detail: format!("index {index}: {detail}"),
        }
    }

    /// Decodes the stored entry at key `index`, which must be `expected`.
    fn decode(
        &self,
        index: u64,
        expected: u64,
        bytes: &Bytes,
    ) -> Result<Entry, FjallLogStoreError> {
        if index != expected {
            return Err(self.corrupt_at(expected, "missing entry (a hole in the log)"));
        }
        let entry = Entry::parse_from_carllerche_bytes(bytes)
            .map_err(|error| self.corrupt_at(index, &error.to_string()))?;
        if entry.index != index {
            return Err(self.corrupt_at(index, &format!("holds entry {}", entry.index)));
        }
        Ok(entry)
    }

    /// Entries `low..high` (all in the log), stopping early once more than
    /// `max_size` bytes were gathered (the exact cut is `limit_size`'s).
    fn read(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, FjallLogStoreError> {
        let mut gathered = Gathered::new(max_size);
        // Everything from the overlay's first index on is in the overlay.
        let overlay_start = self.overlay.keys().next().copied().unwrap_or(u64::MAX);
        let disk_high = high.min(overlay_start);
        let mut next = low;
        while next < disk_high && !gathered.is_full() {
            let chunk_high = disk_high.min(next.saturating_add(READ_CHUNK));
            for (index, bytes) in self.store.log_entries(self.group, next, chunk_high)? {
                let entry = self.decode(index, next, &bytes)?;
                next += 1;
                gathered.push(entry);
                if gathered.is_full() {
                    break;
                }
            }
            if next < chunk_high && !gathered.is_full() {
                return Err(self.corrupt_at(next, "missing entry (a hole in the log)"));
            }
        }
        while next < high && !gathered.is_full() {
            let Some((_, entry)) = self.overlay.get(&next) else {
                return Err(self.corrupt_at(next, "missing from the unwritten tail"));
            };
            gathered.push(entry.clone());
            next += 1;
        }
        let mut out = gathered.entries;
        raft::util::limit_size(&mut out, max_size);
        Ok(out)
    }

    fn submit_write(&mut self, write: LogWrite) -> Result<(), FjallLogStoreError> {
        self.reap()?;
        if write.is_empty() {
            return Ok(());
        }
        // Check everything before touching anything: a refused write
        // changes neither the disk nor the view.
        let (base_first, base_last) = match &write.snapshot {
            Some(snapshot) => {
                let index = snapshot.get_metadata().index;
                if index < self.snapshot_meta.index {
                    return Err(FjallLogStoreError::StaleSnapshot {
                        group: self.group,
                        index,
                        stored: self.snapshot_meta.index,
                    });
                }
                (index + 1, index)
            }
            None => (self.first_index(), self.last_index),
        };
        let range = match (write.entries.first(), write.entries.last()) {
            (Some(first), Some(last)) => Some((first.index, last.index)),
            _ => None,
        };
        if let Some((first, _)) = range {
            if first < base_first || first > base_last + 1 {
                return Err(LogStoreError::Detached {
                    first,
                    log_first: base_first,
                    log_last: base_last,
                }
                .into());
            }
            for (offset, entry) in write.entries.iter().enumerate() {
                let expected = first + offset as u64;
                if entry.index != expected {
                    return Err(LogStoreError::NotConsecutive { index: expected }.into());
                }
            }
        }

        let mut ops = Vec::with_capacity(write.entries.len() + 6);
        let mut hard_state = self.hard_state.clone();
        let mut hard_state_changed = false;
        if let Some(snapshot) = &write.snapshot {
            ops.extend(self.snapshot_ops(snapshot)?);
            let metadata = snapshot.get_metadata();
            hard_state.commit = hard_state.commit.max(metadata.index);
            hard_state.term = hard_state.term.max(metadata.term);
            hard_state_changed = hard_state != self.hard_state;
        }
        if let Some((first, _)) = range {
            if write.snapshot.is_none() && first <= base_last {
                ops.push(Op::LogTruncate { log: self.group, from: first });
            }
            for entry in write.entries.iter().filter(|_| !self.volatile) {
                let data = entry.write_to_bytes().map_err(|error| FjallLogStoreError::Corrupt {
                    group: self.group,
                    what: "encoding",
                    detail: error.to_string(),
                })?;
                ops.push(Op::LogAppend {
                    log: self.group,
                    index: entry.index,
                    data: Bytes::from(data),
                });
            }
        }
        if let Some(new) = &write.hard_state {
            hard_state = new.clone();
            hard_state_changed = true;
        }
        if hard_state_changed {
            ops.push(self.meta_op(TAG_HARD_STATE, &hard_state)?);
        }

        let seq = self.send(ops, write.must_sync, Some(write.number), range)?;
        if let Some(snapshot) = write.snapshot {
            self.install_snapshot_view(seq, snapshot);
        }
        if let Some((first, last)) = range {
            drop(self.overlay.split_off(&first));
            self.terms.truncate_from(first);
            for entry in write.entries {
                self.terms.push(entry.index, entry.term);
                self.overlay.insert(entry.index, (seq, entry));
            }
            self.last_index = last;
        }
        self.hard_state = hard_state;
        Ok(())
    }
}

/// Entries gathered for one read, with their protobuf size (as
/// `raft::util::limit_size` counts it).
struct Gathered {
    entries: Vec<Entry>,
    size: u64,
    limit: Option<u64>,
}

impl Gathered {
    fn new(max_size: Option<u64>) -> Self {
        Gathered {
            entries: Vec::new(),
            size: 0,
            limit: max_size.filter(|max| *max != raft::NO_LIMIT),
        }
    }

    fn push(&mut self, entry: Entry) {
        self.size += u64::from(entry.compute_size());
        self.entries.push(entry);
    }

    /// Whether `limit_size` cuts before the next entry whatever it is: at
    /// least two entries and more than the limit (the first always stays).
    fn is_full(&self) -> bool {
        self.limit.is_some_and(|max| self.entries.len() > 1 && self.size > max)
    }
}

impl LogStore for FjallLogStore {
    fn hard_state(&self) -> HardState {
        self.hard_state.clone()
    }

    fn apply_state(&self) -> ApplyState {
        self.apply_state.clone()
    }

    fn snapshot_metadata(&self) -> SnapshotMetadata {
        self.snapshot_meta.clone()
    }

    fn snapshot(&self) -> Result<Snapshot, LogStoreError> {
        let mut snapshot = Snapshot::default();
        if self.snapshot_meta.index == 0 {
            return Ok(snapshot);
        }
        snapshot.set_metadata(self.snapshot_meta.clone());
        snapshot.data = match &self.snapshot_data {
            Some((_, data)) => data.clone(),
            None => self
                .store
                .log_meta(self.group, TAG_SNAPSHOT_DATA)
                .map_err(FjallLogStoreError::from)?
                .unwrap_or_default(),
        };
        Ok(snapshot)
    }

    fn first_index(&self) -> u64 {
        self.snapshot_meta.index + 1
    }

    fn last_index(&self) -> u64 {
        self.last_index
    }

    fn term(&self, index: u64) -> Result<u64, LogStoreError> {
        let snapshot_index = self.snapshot_meta.index;
        if index == snapshot_index {
            return Ok(self.snapshot_meta.term);
        }
        if index < snapshot_index {
            return Err(LogStoreError::Compacted { index, first: self.first_index() });
        }
        if index > self.last_index {
            return Err(LogStoreError::Unavailable { index, last: self.last_index });
        }
        self.terms.get(index).ok_or_else(|| {
            LogStoreError::Inconsistent(format!("group {}: no term known for {index}", self.group))
        })
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, LogStoreError> {
        let first = self.first_index();
        if low < first {
            return Err(LogStoreError::Compacted { index: low, first });
        }
        let last = self.last_index;
        if high > last + 1 {
            return Err(LogStoreError::Unavailable { index: high - 1, last });
        }
        if low >= high {
            return Ok(Vec::new());
        }
        Ok(self.read(low, high, max_size)?)
    }

    fn submit(&mut self, write: LogWrite) -> Result<(), LogStoreError> {
        Ok(self.submit_write(write)?)
    }

    fn save_apply_state(&mut self, state: &ApplyState) -> Result<(), LogStoreError> {
        Ok(self.save_apply_state_with(state, Vec::new())?)
    }

    fn compact(&mut self, snapshot: Snapshot) -> Result<(), LogStoreError> {
        self.compact_with(snapshot, Vec::new())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::TermRuns;

    #[test]
    fn term_runs_follow_appends_truncation_and_compaction() {
        let mut runs = TermRuns::default();
        for (index, term) in [(2, 1), (3, 1), (4, 2), (5, 2), (6, 3)] {
            runs.push(index, term);
        }
        assert_eq!(runs.runs.len(), 3);
        assert_eq!(runs.get(2), Some(1));
        assert_eq!(runs.get(5), Some(2));
        assert_eq!(runs.get(6), Some(3));
        runs.truncate_from(5);
        assert_eq!(runs.get(4), Some(2));
        runs.push(5, 4);
        assert_eq!(runs.get(5), Some(4));
        runs.compact(4);
        assert_eq!(runs.runs.front(), Some(&(4, 2)));
        assert_eq!(runs.get(4), Some(2));
        runs.compact(5);
        assert_eq!(runs.runs.front(), Some(&(5, 4)));
        runs.truncate_from(5);
        assert!(runs.runs.is_empty());
    }
}
