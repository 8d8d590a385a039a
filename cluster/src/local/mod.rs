//! The in-process node: queues kept in this process, messages and
//! definitions on node-local storage. `sluice serve` runs exactly this.

mod queue;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use sluice_storage::{Op, Store, StoreOptions};

use crate::backend::{ready, Backend, Durable, Queue, QueueId, QueueSpec, Reply};
use crate::Error;
pub use queue::LocalQueue;

/// Tuning of the local node.
#[derive(Clone, Debug)]
pub struct LocalOptions {
    /// fsync on durable writes (turn off only for tests and benchmarks).
    pub sync: bool,
    /// Bytes of message bodies kept in RAM across all queues; beyond it,
    /// bodies live only on disk and are read back on delivery.
    pub body_cache_bytes: u64,
}

impl Default for LocalOptions {
    fn default() -> Self {
        LocalOptions { sync: true, body_cache_bytes: 256 * 1024 * 1024 }
    }
}

/// RAM budget for message bodies, shared by every queue of the node.
#[derive(Debug)]
pub(crate) struct BodyBudget {
    limit: u64,
    used: AtomicU64,
}

impl BodyBudget {
    pub(crate) fn try_take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                (u + n <= self.limit).then_some(u + n)
            })
            .is_ok()
    }
    pub(crate) fn give_back(&self, n: u64) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| Some(u.saturating_sub(n)));
    }
}

/// Keys this node keeps in storage's meta keyspace. They start with a NUL
/// byte, which no router definition key does, and are hidden from
/// [`Backend::definitions`].
pub(crate) mod node_keys {
    /// Present only while the node is stopped after a clean shutdown.
    pub const CLEAN_SHUTDOWN: &[u8] = b"\0node/clean-shutdown";
    /// Highest seq ever delivered from a queue, written at clean shutdown.
    pub fn delivered_mark(queue: u64) -> Vec<u8> {
        let mut k = b"\0node/delivered/".to_vec();
        k.extend_from_slice(&queue.to_be_bytes());
        k
    }
}

/// A single in-process storage node.
pub struct LocalBackend {
    store: Store,
    /// The previous run ended with a clean shutdown, so per-queue delivered
    /// marks are exact; after a crash every recovered message is flagged
    /// redelivered (it may have been delivered before).
    clean_start: bool,
    budget: Arc<BodyBudget>,
    // std Mutex: held only to look up or insert a queue, never across .await.
    queues: Mutex<HashMap<QueueId, Arc<LocalQueue>>>,
}

impl LocalBackend {
    /// Opens the node's storage in `dir`.
    pub fn open(dir: &Path, options: LocalOptions) -> Result<Arc<Self>, Error> {
        let store = Store::open(dir, StoreOptions { sync: options.sync, ..StoreOptions::default() })?;
        let clean_start = !store.list_meta(node_keys::CLEAN_SHUTDOWN)?.is_empty();
        // From now on a crash must not look like a clean shutdown.
        futures_lite_block(store.write(vec![Op::DeleteMeta { key: node_keys::CLEAN_SHUTDOWN.to_vec() }], true))?;
        Ok(Arc::new(LocalBackend {
            store,
            clean_start,
            budget: Arc::new(BodyBudget { limit: options.body_cache_bytes, used: AtomicU64::new(0) }),
            queues: Mutex::new(HashMap::new()),
        }))
    }

    fn queues(&self) -> std::sync::MutexGuard<'_, HashMap<QueueId, Arc<LocalQueue>>> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The underlying store (for statistics).
    pub fn store(&self) -> &Store {
        &self.store
    }
}

/// Waits for a completion from a non-async context (startup).
fn futures_lite_block(completion: sluice_storage::Completion) -> Result<(), Error> {
    completion.wait_blocking().map_err(Error::from)
}

fn durable(completion: sluice_storage::Completion) -> Durable {
    Box::pin(async move { completion.await.map_err(Error::from) })
}

impl Backend for LocalBackend {
    fn definitions(&self) -> Result<crate::backend::Definitions, Error> {
        let mut all = self.store.list_meta(b"")?;
        all.retain(|(k, _)| k.first() != Some(&0));
        Ok(all)
    }

    fn put_definition(&self, key: Vec<u8>, value: Vec<u8>) -> Durable {
        durable(self.store.write(vec![Op::PutMeta { key, value }], true))
    }

    fn delete_definition(&self, key: Vec<u8>) -> Durable {
        durable(self.store.write(vec![Op::DeleteMeta { key }], true))
    }

    fn open_queue(&self, spec: QueueSpec) -> Result<Arc<dyn Queue>, Error> {
        let mut queues = self.queues();
        if let Some(q) = queues.get(&spec.id) {
            return Ok(q.clone());
        }
        let q = LocalQueue::open(spec, self.store.clone(), self.budget.clone(), self.clean_start)?;
        queues.insert(q.id(), q.clone());
        Ok(q)
    }

    fn delete_queue(&self, id: QueueId) -> Reply<u32> {
        let q = self.queues().remove(&id);
        ready(Ok(match q {
            Some(q) => q.delete(),
            None => {
                self.store.write_nowait(vec![Op::DeleteQueue { queue: id.0 }]);
                0
            }
        }))
    }

    fn backlog_bytes(&self) -> u64 {
        self.store.queued_bytes()
    }

    fn shutdown(&self) -> Result<(), Error> {
        for q in self.queues().values() {
            q.persist_marks();
        }
        self.store.flush()?;
        self.store.write(vec![Op::PutMeta { key: node_keys::CLEAN_SHUTDOWN.to_vec(), value: Vec::new() }], true).wait_blocking()?;
        self.store.close()?;
        Ok(())
    }
}
