//! Maintenance: evicting ack tombstones with a major compaction.
//!
//! Why: an LSM tree drops a tombstone only when compaction carries it to the
//! last level, and fjall has no tombstone-density trigger. When a queue is
//! drained after its values were flushed to tables, the tombstones sit in a
//! separate table forever: the disk stays full and any scan from the head
//! walks them (deps.md §2: 1M acked messages = 1.09 GiB and a 1.6–2.2 s head
//! seek, until `major_compact` fixes both in under a second).
//!
//! A pass: flush the `msgs` memtable (weak tombstones cancel against their
//! values right there), major-compact `msgs` (rewrites the live data, drops
//! every tombstone), the same for the Raft `logs`, have the writer commit one batch, then flush the small
//! `state`/`meta` memtables: the rotation lets fjall delete the replaced
//! table files, and old journal files these memtables would otherwise pin
//! (fjall #288).
//!
//! Passes run on their own short-lived thread, never on the writer, and at
//! most one at a time. When to run one is decided by the writer
//! (`Writer::maybe_compact`).

use crate::completion::Responder;
use crate::error::Result;
use crate::stats::Counters;
use crate::store::Keyspaces;
use crate::writer::Request;
use std::sync::atomic::Ordering::{AcqRel, Relaxed, Release};
use std::sync::{mpsc, Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;


/// Longest wait for a running compaction when the store closes.
const JOIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Runs maintenance passes; cheap to clone.
#[derive(Clone)]
pub(crate) struct Compactor {
    inner: Arc<Inner>,
}

struct Inner {
    ks: Keyspaces,
    counters: Arc<Counters>,
    /// To the writer thread, to get one batch committed after a compaction.
    writer: mpsc::Sender<Request>,
    /// Held for the duration of a pass: at most one at a time, whether
    /// automatic or from `Store::compact`.
    one_at_a_time: Mutex<()>,
    schedule: Mutex<Schedule>,
}

/// State of the background thread.
#[derive(Default)]
struct Schedule {
    running: bool,
    /// Requested while a pass was running: run one more pass afterwards
    /// (e.g. the queue drained while a pass started mid-drain was running).
    wanted: bool,
    thread: Option<JoinHandle<()>>,
}

impl Compactor {
    pub(crate) fn new(ks: Keyspaces, counters: Arc<Counters>, writer: mpsc::Sender<Request>) -> Compactor {
        let inner = Inner { ks, counters, writer, one_at_a_time: Mutex::new(()), schedule: Mutex::default() };
        Compactor { inner: Arc::new(inner) }
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        self.inner.schedule.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a background pass, or asks the running one for another pass.
    pub(crate) fn request(&self) {
        let mut s = self.schedule();
        if s.running {
            s.wanted = true;
            return;
        }
        if let Some(old) = s.thread.take() {
            // It already cleared `running`, so it is exiting: no wait.
            let _ = old.join();
        }
        let me = self.clone();
        let spawned = std::thread::Builder::new().name("sluice-storage-maint".into()).spawn(move || loop {
            if let Err(e) = me.pass() {
                tracing::error!(error = %e, "storage compaction failed");
            }
            let mut s = me.schedule();
            if std::mem::take(&mut s.wanted) {
                continue;
            }
            s.running = false;
            me.inner.counters.compaction_running.store(false, Release);
            return;
        });
        match spawned {
            Ok(handle) => {
                s.running = true;
                s.thread = Some(handle);
                self.inner.counters.compaction_running.store(true, Release);
            }
            Err(e) => tracing::error!(error = %e, "cannot spawn the storage compaction thread"),
        }
    }

    /// Runs a pass on the calling thread (waits for a running one first).
    pub(crate) fn run_now(&self) -> Result<()> {
        let was_running = self.inner.counters.compaction_running.swap(true, AcqRel);
        let result = self.pass();
        if !was_running {
            self.inner.counters.compaction_running.store(false, Release);
        }
        result
    }

    /// Waits for the background thread to finish, without further passes
    /// (used at close). A pass can block for good inside fjall when the
    /// disk fails under it (a memtable flush that never succeeds), so the
    /// wait is bounded: after `JOIN_TIMEOUT` the thread is left behind and
    /// close goes on. Nothing it does is needed for durability.
    pub(crate) fn join(&self) {
        let handle = {
            let mut s = self.schedule();
            s.wanted = false;
            s.thread.take()
        };
        let Some(handle) = handle else { return };
        let deadline = Instant::now() + JOIN_TIMEOUT;
        while !handle.is_finished() {
            if Instant::now() >= deadline {
                tracing::warn!("storage compaction still running at close; not waiting for it");
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = handle.join();
    }

    fn pass(&self) -> Result<()> {
        let _one_at_a_time = self.inner.one_at_a_time.lock().unwrap_or_else(PoisonError::into_inner);
        let c = &self.inner.counters;
        let ks = &self.inner.ks;
        let start = Instant::now();
        // Everything removed up to now is garbage this pass will collect.
        let removes = c.removes_since_compaction.load(Relaxed);
        c.compacted_removes.fetch_add(removes, Relaxed);

        ks.msgs.rotate_memtable_and_wait()?;
        ks.msgs.major_compact()?;
        // The Raft logs: compacted and truncated entries are tombstones too.
        ks.logs.rotate_memtable_and_wait()?;
        ks.logs.major_compact()?;
        // fjall deletes the replaced table files only when a memtable
        // rotation finds a batch newer than the compaction; on an idle store
        // that could take forever. The writer commits one (the counters
        // changed), then the rotations below free the files.
        let (tx, rx) = mpsc::sync_channel(1);
        let nudge = Request::Write { ops: Vec::new(), durable: false, done: Some(Responder::Blocking(tx)) };
        if self.inner.writer.send(nudge).is_ok() {
            let _ = rx.recv(); // an error here is the writer's to report
        }
        ks.state.rotate_memtable_and_wait()?;
        ks.meta.rotate_memtable_and_wait()?;

        let took = start.elapsed();
        c.compactions.fetch_add(1, Relaxed);
        c.last_compaction_us.store(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
        tracing::info!(removes, took_ms = took.as_millis() as u64, "storage major compaction done");
        Ok(())
    }
}
