//! Node-local durable storage of Sluice, on fjall 3. Stores opaque byte
//! records; knows nothing about AMQP. Design and measurements: docs/storage.md.
//!
//! - `store.rs`: [`Store`], [`Op`], [`StoreOptions`]: reads run on the caller's thread, writes go to the writer.
//! - `writer.rs`: the single writer thread; group commit (one fjall batch + one fdatasync per group).
//! - `completion.rs`: [`Completion`], the future/blocking answer to a write.
//! - `maintenance.rs`: background major compaction that evicts ack tombstones.
//! - `keys.rs`: key layout of the three keyspaces `msgs`, `state`, `meta`.
//! - `format.rs`: on-disk value formats ([`MessageRecord`], floors, counters).
//! - `stats.rs`: [`Stats`] counters; `error.rs`: [`Error`].

mod completion;
mod error;
mod format;
mod keys;
mod maintenance;
mod stats;
mod store;
mod writer;

pub use completion::{Applied, Completion};
pub use error::{Error, Result};
pub use format::MessageRecord;
pub use stats::{Stats, BATCH_HISTOGRAM_BUCKETS};
pub use store::{Op, Store, StoreOptions, RUNNING_MARKER};
