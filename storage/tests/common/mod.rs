//! Helpers shared by the integration tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use sluice_storage::{MessageRecord, Op, Store, StoreOptions};
use std::path::Path;

/// Options for tests that do not measure durability: no fsync.
pub fn fast() -> StoreOptions {
    StoreOptions { sync: false, ..StoreOptions::default() }
}

/// Deterministic payload of message `seq` of `queue`, `len` bytes long.
pub fn payload(queue: u64, seq: u64, len: usize) -> Bytes {
    let seed = format!("q{queue}s{seq}|");
    Bytes::from(seed.bytes().cycle().take(len.max(seed.len())).collect::<Vec<u8>>())
}

pub fn rec(queue: u64, seq: u64) -> MessageRecord {
    MessageRecord { persistent: true, data: payload(queue, seq, 32) }
}

pub fn put(queue: u64, seq: u64) -> Op {
    Op::PutMessage { queue, seq, record: rec(queue, seq) }
}

pub fn open(dir: &Path, opts: StoreOptions) -> Store {
    Store::open(dir, opts).expect("open store")
}

/// Seqs returned by a full scan of `queue`.
pub fn seqs(store: &Store, queue: u64) -> Vec<u64> {
    store.scan_queue(queue, 0).expect("scan").into_iter().map(|(s, _)| s).collect()
}

/// Bytes allocated under `dir`, like `du` (fjall's own figure counts the
/// journal's preallocated length and only tables of the current version).
pub fn du(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => du(&e.path()),
            Ok(m) => m.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}
