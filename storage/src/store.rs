//! `Store`: the handle the cluster crate uses.
//!
//! Reads go straight to fjall from the calling thread (fjall reads are
//! lock-free snapshots). Every write goes through one channel to the writer
//! thread (`writer.rs`), which is what gives total write order and group
//! commit.

use crate::completion::{Applied, Completion, Responder};
use crate::error::{Error, Result};
use crate::format::{self, MessageRecord};
use crate::keys;
use crate::maintenance::Compactor;
use crate::stats::{Counters, Stats};
use crate::writer::{Request, Writer};
use bytes::Bytes;
use fjall::{Database, Keyspace, KeyspaceCreateOptions};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{mpsc, Arc, Mutex, RwLock};
use std::thread::JoinHandle;

/// A file that exists in the data directory while a [`Store`] has it open
/// and is removed once a close made everything durable. Found at open, it
/// says the last process did not close the store: it crashed, was killed
/// or lost power ([`Store::opened_after_crash`]).
pub const RUNNING_MARKER: &str = "sluice.running";

/// Tuning knobs of [`Store::open`]. `StoreOptions::default()` is the
/// production setting.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// `true` (default): durable writes wait for `fdatasync`. `false`: they
    /// only reach the OS page cache (survive a process crash, not a power
    /// loss); for tests and benchmarks.
    pub sync: bool,
    /// Block cache size in bytes (default 64 MiB).
    pub cache_bytes: u64,
    /// Upper bound on operations per group commit (default 4096). A single
    /// `write` larger than this still goes into one batch.
    pub max_batch_ops: usize,
    /// Upper bound on payload bytes per group commit (default 4 MiB).
    pub max_batch_bytes: usize,
    /// Memtable size of the `msgs` keyspace (default 64 MiB). fjall stores
    /// it when the keyspace is created, so it only applies to a new database.
    pub memtable_bytes: u64,
    /// Journal size at which fjall forces memtable flushes (default 512 MiB,
    /// minimum 64 MiB; smaller values are raised).
    pub max_journal_bytes: u64,
    /// Run major compactions automatically (default true). See `maintenance.rs`.
    pub auto_compact: bool,
    /// Compact once this many removes happened since the last compaction
    /// (and dead entries outnumber live ones 4:1). Default 200 000.
    pub compact_after_removes: u64,
    /// When a queue drains (its ack floor passes every seq written since
    /// open, or it is deleted), compact if at least this many removes
    /// happened (and the 4:1 rule holds). Default 50 000.
    pub compact_drained_min_removes: u64,
}

/// Memtable size of the `logs` keyspace (new databases).
pub const LOGS_MEMTABLE_BYTES: u64 = 32 << 20;

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            sync: true,
            cache_bytes: 64 << 20,
            max_batch_ops: 4096,
            max_batch_bytes: 4 << 20,
            memtable_bytes: 64 << 20,
            max_journal_bytes: 512 << 20,
            auto_compact: true,
            compact_after_removes: 200_000,
            compact_drained_min_removes: 50_000,
        }
    }
}

/// One storage operation. A `Vec<Op>` given to [`Store::write`] is applied
/// atomically.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Stores message `seq` of `queue`.
    ///
    /// Contract (write-once rule, see `keys.rs`): a `(queue, seq)` pair is
    /// put at most once in the life of the database, also across acks,
    /// `DeleteQueue` and restarts. Acks are weak tombstones; putting a key
    /// again can make an acked message reappear after a compaction. Take new
    /// seqs from [`Store::next_seq`] after a restart or queue deletion.
    PutMessage {
        /// Queue id.
        queue: u64,
        /// Sequence number inside the queue.
        seq: u64,
        /// The record to store.
        record: MessageRecord,
    },
    /// Acks/deletes one message (a weak tombstone, see `PutMessage`).
    RemoveMessage {
        /// Queue id.
        queue: u64,
        /// Sequence number inside the queue.
        seq: u64,
    },
    /// Records that every message of `queue` with seq < `floor` is gone;
    /// scans start here, so they never walk the tombstones of acked
    /// messages. Contract: the caller removed every such message (in this
    /// write or before). The store never deletes below the floor by itself,
    /// so a message left there would stay on disk for good (`DeleteQueue`
    /// starts at the floor too).
    SetAckFloor {
        /// Queue id.
        queue: u64,
        /// First seq that may still be live.
        floor: u64,
    },
    /// Appends (or overwrites) entry `index` of replicated log `log`.
    LogAppend {
        /// Log id (a Raft group).
        log: u64,
        /// Entry index.
        index: u64,
        /// The entry, opaque.
        data: Bytes,
    },
    /// Removes every entry of `log` with index >= `from` (a conflicting
    /// tail).
    LogTruncate {
        /// Log id.
        log: u64,
        /// First index removed.
        from: u64,
    },
    /// Removes every entry of `log` with index < `below` (after a
    /// snapshot); the log's first index becomes `below`, and later
    /// compactions start their scan there.
    LogCompact {
        /// Log id.
        log: u64,
        /// First index kept.
        below: u64,
    },
    /// Sets (or with `None` removes) a small record of `log` (hard state,
    /// snapshot metadata), identified by `tag`.
    LogMeta {
        /// Log id.
        log: u64,
        /// Which record.
        tag: u8,
        /// Its value (shared: a queue's checkpoint can be tens of MB, and
        /// the caller usually keeps it too).
        value: Option<Bytes>,
    },
    /// Removes every message of `queue` at or above its floor, and the
    /// floor. Cost: one tombstone per message, in one atomic batch. The
    /// queue's next seq survives, so a reused id keeps the write-once rule
    /// by numbering from `Store::next_seq`.
    DeleteQueue {
        /// Queue id.
        queue: u64,
    },
    /// Stores an opaque definition (exchange, queue, binding, user...).
    /// Key: 1..=65535 bytes.
    PutMeta {
        /// Opaque key.
        key: Vec<u8>,
        /// Opaque value.
        value: Vec<u8>,
    },
    /// Deletes an opaque definition.
    DeleteMeta {
        /// Opaque key.
        key: Vec<u8>,
    },
}

impl Op {
    /// Rejects what fjall would panic on, so that the writer thread never can.
    fn validate(&self) -> Result<()> {
        const MAX_KEY: usize = u16::MAX as usize;
        const MAX_VALUE: usize = u32::MAX as usize;
        let bad = |m: String| Err(Error::InvalidOp(m));
        match self {
            Op::PutMessage { record, .. } if record.data.len() > MAX_VALUE - format::RECORD_HEADER_LEN => {
                bad(format!("message of {} bytes is too large", record.data.len()))
            }
            Op::PutMeta { key, .. } | Op::DeleteMeta { key } if key.is_empty() || key.len() > MAX_KEY => {
                bad(format!("meta key must be 1..={MAX_KEY} bytes, got {}", key.len()))
            }
            Op::PutMeta { value, .. } if value.len() > MAX_VALUE => {
                bad(format!("meta value of {} bytes is too large", value.len()))
            }
            Op::LogAppend { data, .. } if data.len() > MAX_VALUE => {
                bad(format!("log entry of {} bytes is too large", data.len()))
            }
            _ => Ok(()),
        }
    }

    /// Payload bytes, for the group size cap.
    /// Bytes a queued op is charged against [`Store::queued_bytes`]: its
    /// payload plus a fixed cost for the op itself.
    pub(crate) fn queued_len(ops: &[Op]) -> u64 {
        ops.iter().map(|o| (o.payload_len() + 64) as u64).sum()
    }

    pub(crate) fn payload_len(&self) -> usize {
        match self {
            Op::PutMessage { record, .. } => record.data.len(),
            Op::PutMeta { key, value } => key.len() + value.len(),
            Op::LogAppend { data, .. } => data.len(),
            Op::LogMeta { value, .. } => value.as_ref().map_or(0, Bytes::len),
            Op::DeleteMeta { key } => key.len(),
            _ => 0,
        }
    }
}

/// The three keyspaces (see `keys.rs`).
#[derive(Clone)]
pub(crate) struct Keyspaces {
    pub msgs: Keyspace,
    pub state: Keyspace,
    pub meta: Keyspace,
    pub logs: Keyspace,
}

/// Handle to the node-local database. Cheap to clone; all clones share one
/// writer thread. The data directory stays locked until the last clone is
/// dropped.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    db: Database,
    ks: Keyspaces,
    /// `None` once closed: taking the write lock in `close` orders every
    /// concurrent `write` either before the close request or after it.
    tx: RwLock<Option<mpsc::Sender<Request>>>,
    writer: Mutex<Option<JoinHandle<Result<()>>>>,
    counters: Arc<Counters>,
    compactor: Compactor,
    /// [`RUNNING_MARKER`] was there when this store opened.
    after_crash: bool,
}

impl Store {
    /// Opens (creating) the database in `dir` and starts the writer thread.
    ///
    /// Fails with `Error::Unusable` if the directory cannot be created or
    /// written, and `Error::Locked` if another process (or another open
    /// `Store`) holds it. Recovery (journal replay) happens here.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<Store> {
        let unusable = |e: std::io::Error| Error::Unusable { path: dir.to_path_buf(), source: Arc::new(e) };
        std::fs::create_dir_all(dir).map_err(unusable)?;
        if !std::fs::metadata(dir).map_err(unusable)?.is_dir() {
            return Err(unusable(std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory")));
        }

        let db = Database::builder(dir)
            // Group commit: nothing is flushed implicitly; the writer decides
            // per batch (SyncData for durable groups, Buffer otherwise).
            .manual_journal_persist(true)
            .cache_size(opts.cache_bytes)
            .max_journaling_size(opts.max_journal_bytes.max(64 << 20))
            .open()
            .map_err(|e| match e {
                fjall::Error::Locked => Error::Locked { path: dir.to_path_buf() },
                fjall::Error::Io(io) => unusable(io),
                other => Error::from(other),
            })?;

        let memtable = opts.memtable_bytes;
        let ks = Keyspaces {
            msgs: db.keyspace(keys::MSGS, || {
                KeyspaceCreateOptions::default().manual_journal_persist(true).max_memtable_size(memtable)
            })?,
            // Floors and counters are overwritten by nearly every batch and
            // old versions only go away on flush: a small memtable bounds
            // the RAM they take and lets fjall retire journals sooner.
            state: db.keyspace(keys::STATE, || {
                KeyspaceCreateOptions::default().manual_journal_persist(true).max_memtable_size(8 << 20)
            })?,
            meta: db.keyspace(keys::META, || KeyspaceCreateOptions::default().manual_journal_persist(true))?,
            // Raft logs carry the message bodies: fjall's default 64 MiB
            // memtable (plus a sealed one being flushed) was most of a
            // single node's fixed RAM (heaptrack, docs/performance.md).
            // 16 MiB cost large messages a fifth of their throughput (more
            // flushes and compactions). fjall's key-value separation would
            // avoid rewriting bodies in compactions, but its blob files
            // were not reclaimed after a queue drained (314 MB left of
            // 320 MB): not used.
            logs: db.keyspace(keys::LOGS, || {
                KeyspaceCreateOptions::default().manual_journal_persist(true).max_memtable_size(LOGS_MEMTABLE_BYTES)
            })?,
        };

        // After fjall's lock: a second process never touches the marker.
        let after_crash = mark_running(dir).map_err(unusable)?;
        if after_crash {
            tracing::warn!(dir = %dir.display(), "the storage was not closed cleanly last time");
        }

        let counters = Arc::new(Counters::default());
        let persisted = match ks.state.get(keys::COUNTERS_KEY)? {
            Some(v) => format::decode_counters(keys::COUNTERS_KEY, &v)?,
            // First open of this database (or one written before counters
            // existed): every entry may be live, which errs on the side of
            // compacting later rather than too often.
            None => format::Counters { live_estimate: ks.msgs.approximate_len() as u64, removes_since_compaction: 0 },
        };
        counters.live_estimate.store(persisted.live_estimate, Relaxed);
        counters.removes_since_compaction.store(persisted.removes_since_compaction, Relaxed);

        let (tx, rx) = mpsc::channel();
        let compactor = Compactor::new(ks.clone(), counters.clone(), tx.clone());
        let writer = Writer::new(db.clone(), ks.clone(), rx, counters.clone(), compactor.clone(), &opts, persisted);
        let handle = std::thread::Builder::new().name("sluice-storage-writer".into()).spawn(move || writer.run())?;

        tracing::info!(dir = %dir.display(), live_estimate = persisted.live_estimate, "storage opened");
        Ok(Store {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                db,
                ks,
                tx: RwLock::new(Some(tx)),
                writer: Mutex::new(Some(handle)),
                counters,
                compactor,
                after_crash,
            }),
        })
    }

    /// Whether the process that had this directory open before did not
    /// close it (a crash, `kill -9`, a power loss): what it handed to the
    /// writer but had not fsynced may be lost.
    pub fn opened_after_crash(&self) -> bool {
        self.inner.after_crash
    }

    /// Queues a group of operations. They are applied atomically (one fjall
    /// batch may hold many such groups) and in submission order relative to
    /// every other `write` call.
    ///
    /// `durable = true`: the Completion resolves only after the batch holding
    /// the group was fsynced (`fdatasync`). `durable = false`: it resolves
    /// once applied (visible to reads, handed to the OS, no fsync wait).
    /// Invalid ops fail the whole group with `Error::InvalidOp` and apply nothing.
    pub fn write(&self, ops: Vec<Op>, durable: bool) -> Completion {
        if let Err(e) = ops.iter().try_for_each(Op::validate) {
            return Completion::ready(Err(e));
        }
        if self.inner.counters.poisoned.load(Relaxed) {
            return Completion::ready(Err(Error::Poisoned));
        }
        let (completion, responder) = Completion::pending();
        match self.submit(Request::Write { ops, durable, done: Some(Responder::Async(responder)) }) {
            Ok(()) => completion,
            Err(e) => Completion::ready(Err(e)),
        }
    }

    /// Like [`Store::write`], plus an [`Applied`] flag that says, without
    /// waiting, when the ops have been applied (readable).
    pub fn write_tracked(&self, ops: Vec<Op>, durable: bool) -> (Completion, Applied) {
        let applied = Applied::default();
        if let Err(e) = ops.iter().try_for_each(Op::validate) {
            applied.set(false);
            return (Completion::ready(Err(e)), applied);
        }
        if self.inner.counters.poisoned.load(Relaxed) {
            applied.set(false);
            return (Completion::ready(Err(Error::Poisoned)), applied);
        }
        let (completion, responder) = Completion::pending();
        match self.submit(Request::Write { ops, durable, done: Some(Responder::Tracked(responder, applied.clone())) }) {
            Ok(()) => (completion, applied),
            Err(e) => {
                applied.set(false);
                (Completion::ready(Err(e)), applied)
            }
        }
    }

    /// Fire-and-forget `write(ops, false)`. Since nobody can be told about a
    /// failure, any error (including an invalid op) is logged and poisons
    /// the store, so that later writes fail loudly instead of data silently
    /// going missing. After `close()` the ops are dropped with an error log.
    pub fn write_nowait(&self, ops: Vec<Op>) {
        if let Err(e) = ops.iter().try_for_each(Op::validate) {
            tracing::error!(error = %e, "write_nowait with an invalid op; poisoning the store");
            self.inner.counters.poisoned.store(true, Relaxed);
            return;
        }
        if let Err(e) = self.submit(Request::Write { ops, durable: false, done: None }) {
            tracing::error!(error = %e, "write_nowait after close; ops dropped");
        }
    }

    fn submit(&self, req: Request) -> Result<()> {
        let charge = match &req {
            Request::Write { ops, .. } => Op::queued_len(ops),
            Request::Close => 0,
        };
        let tx = self.inner.tx.read().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(tx) = tx.as_ref() else { return Err(Error::Closed) };
        self.inner.counters.queued_bytes.fetch_add(charge, Relaxed);
        tx.send(req).map_err(|_| {
            self.inner.counters.queued_bytes.fetch_sub(charge, Relaxed);
            Error::Closed
        })
    }

    /// Fault injection for tests: while `hold` is set the writer thread
    /// commits nothing (as a disk that stalls): writes stay submitted,
    /// unapplied and not durable, until it is cleared.
    #[doc(hidden)]
    pub fn hold_writes(&self, hold: bool) {
        self.inner.counters.held.store(hold, Relaxed);
    }

    /// Bytes of writes submitted but not yet taken by the writer thread.
    /// Callers use it for backpressure: the channel to the writer is
    /// unbounded, so producers must slow down when this grows.
    pub fn queued_bytes(&self) -> u64 {
        self.inner.counters.queued_bytes.load(Relaxed)
    }

    /// Entries `lo..hi` of `log` that exist, in index order, zero-copy.
    pub fn log_entries(&self, log: u64, lo: u64, hi: u64) -> Result<Vec<(u64, Bytes)>> {
        let mut out = Vec::new();
        if lo >= hi {
            return Ok(out);
        }
        for guard in self.inner.ks.logs.range(keys::log_key(log, lo)..keys::log_key(log, hi)) {
            let (k, v) = guard.into_inner()?;
            let (_, index) = keys::decode_msg_key(&k).ok_or_else(|| Error::Corrupt {
                what: "log key",
                key: k.to_vec(),
                detail: "not 16 bytes".into(),
            })?;
            out.push((index, Bytes::from(v)));
        }
        Ok(out)
    }

    /// The highest index present in `log`, if any.
    pub fn log_last_index(&self, log: u64) -> Result<Option<u64>> {
        let first = self.log_first_index(log)?;
        match self.inner.ks.logs.range(keys::log_key(log, first)..=keys::log_key(log, u64::MAX)).next_back() {
            None => Ok(None),
            Some(guard) => {
                let k = guard.key()?;
                Ok(keys::decode_msg_key(&k).map(|(_, i)| i))
            }
        }
    }

    /// The first index `log` may hold (set by `LogCompact`; 0 before).
    pub fn log_first_index(&self, log: u64) -> Result<u64> {
        let key = keys::log_first_key(log);
        match self.inner.ks.state.get(key)? {
            Some(v) => format::decode_u64("log first index", &key, &v),
            None => Ok(0),
        }
    }

    /// A small record of `log` written with `Op::LogMeta`.
    pub fn log_meta(&self, log: u64, tag: u8) -> Result<Option<Bytes>> {
        Ok(self.inner.ks.state.get(keys::log_meta_key(log, tag))?.map(Bytes::from))
    }

    /// Payload of message `seq` of `queue`, zero-copy. Does not look at the
    /// ack floor (callers never ask for acked seqs).
    pub fn get_message(&self, queue: u64, seq: u64) -> Result<Option<Bytes>> {
        let key = keys::msg_key(queue, seq);
        match self.inner.ks.msgs.get(key)? {
            Some(v) => Ok(Some(format::decode_record(&key, Bytes::from(v))?.data)),
            None => Ok(None),
        }
    }

    /// All live messages of `queue` with seq >= max(`from`, ack floor), in
    /// seq order, for recovery. Holds the whole result in memory (payloads
    /// are zero-copy slices of fjall blocks); use [`Store::scan_queue_page`]
    /// for queues that may not fit.
    pub fn scan_queue(&self, queue: u64, from: u64) -> Result<Vec<(u64, MessageRecord)>> {
        self.scan_queue_page(queue, from, usize::MAX)
    }

    /// Like [`Store::scan_queue`] but returns at most `limit` messages; call
    /// again with `from = last seq + 1` for the next page.
    pub fn scan_queue_page(&self, queue: u64, from: u64, limit: usize) -> Result<Vec<(u64, MessageRecord)>> {
        // Never scan from seq 0: acked messages leave tombstones below the
        // floor, and walking them is what makes a drained queue slow.
        let start = from.max(self.ack_floor(queue)?);
        let mut out = Vec::new();
        for guard in self.inner.ks.msgs.range(keys::queue_range(queue, start)).take(limit) {
            let (k, v) = guard.into_inner()?;
            let Some((_, seq)) = keys::decode_msg_key(&k) else {
                return Err(Error::Corrupt { what: "message key", key: k.to_vec(), detail: "not 16 bytes".into() });
            };
            out.push((seq, format::decode_record(&k, Bytes::from(v))?));
        }
        Ok(out)
    }

    /// The persisted ack floor of `queue` (0 if none was set).
    pub fn ack_floor(&self, queue: u64) -> Result<u64> {
        self.read_u64("ack floor", &keys::floor_key(queue))
    }

    /// 1 + the highest seq ever put into `queue` (0 if none), as of the
    /// writes applied so far. Survives acks, `DeleteQueue` and restarts:
    /// numbering new messages from here keeps the write-once rule.
    pub fn next_seq(&self, queue: u64) -> Result<u64> {
        self.read_u64("next seq", &keys::next_seq_key(queue))
    }

    fn read_u64(&self, what: &'static str, key: &[u8]) -> Result<u64> {
        match self.inner.ks.state.get(key)? {
            Some(v) => format::decode_u64(what, key, &v),
            None => Ok(0),
        }
    }

    /// Every meta entry whose key starts with `prefix` (all entries for an
    /// empty prefix), in key order.
    pub fn list_meta(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let meta = &self.inner.ks.meta;
        let iter = if prefix.is_empty() { meta.iter() } else { meta.prefix(prefix) };
        iter.map(|g| {
            let (k, v) = g.into_inner()?;
            Ok((k.to_vec(), v.to_vec()))
        })
        .collect()
    }

    /// Blocks until everything written so far is durable (one fsync). Call
    /// it from a plain thread (or `spawn_blocking`), not from an async task.
    pub fn flush(&self) -> Result<()> {
        if self.inner.counters.poisoned.load(Relaxed) {
            return Err(Error::Poisoned);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Request::Write { ops: Vec::new(), durable: true, done: Some(Responder::Blocking(tx)) })?;
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// Runs a maintenance pass (memtable flush + major compaction of `msgs`)
    /// now, on the calling thread; waits if one is already running.
    /// Automatic passes make this unnecessary in normal operation.
    pub fn compact(&self) -> Result<()> {
        self.inner.compactor.run_now()
    }

    /// Counters and disk usage.
    pub fn stats(&self) -> Stats {
        let mut s = self.inner.counters.snapshot();
        // Disk sizes are for metrics; an error reading them is not worth failing for.
        s.disk_bytes = self.inner.db.disk_space().unwrap_or_default();
        s.journal_bytes = self.inner.db.journal_disk_space().unwrap_or_default();
        s
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Flushes and stops the writer thread (and waits for a running
    /// compaction). Further writes get `Error::Closed`; reads keep working.
    /// Returns the result of the final fsync. Idempotent.
    pub fn close(&self) -> Result<()> {
        self.inner.shutdown()
    }
}

impl Inner {
    fn shutdown(&self) -> Result<()> {
        let tx = self.tx.write().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let Some(tx) = tx else { return Ok(()) };
        // The writer commits and fsyncs everything queued before `Close`,
        // then returns the result of that as its thread result.
        let sent = tx.send(Request::Close);
        drop(tx);
        let handle = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        let result = match handle.map(JoinHandle::join) {
            Some(Ok(r)) if sent.is_ok() => r,
            Some(Ok(_)) | None => Err(Error::Closed),
            Some(Err(_)) => {
                tracing::error!("storage writer thread panicked");
                Err(Error::Closed)
            }
        };
        self.compactor.join();
        if result.is_ok() {
            // Everything handed to the writer is durable: a clean close.
            if let Err(e) = clear_running(&self.dir) {
                tracing::warn!(error = %e, dir = %self.dir.display(), "cannot remove the running marker");
            }
        }
        result
    }
}

/// Creates [`RUNNING_MARKER`] (durably) unless it is there; returns
/// whether it was.
fn mark_running(dir: &Path) -> std::io::Result<bool> {
    let path = dir.join(RUNNING_MARKER);
    if path.try_exists()? {
        return Ok(true);
    }
    std::fs::File::create(&path)?.sync_all()?;
    sync_dir(dir)?;
    Ok(false)
}

fn clear_running(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(dir.join(RUNNING_MARKER)) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, dir = %self.dir.display(), "storage shutdown on drop failed");
        }
    }
}
