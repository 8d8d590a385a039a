//! Pushes 2 × 1,000,000 × 1 KiB messages through one queue and prints
//! throughput, disk usage and head-scan time around compaction.
//!
//! cargo run --release -p sluice-storage --example queue_churn [-- DIR]
//!
//! Per phase: APPEND_THREADS threads append durable groups of GROUP messages
//! (each thread waits for its fsync before the next group, like publishers
//! waiting for confirms); then one consumer reads pages from its cursor and
//! acks them (RemoveMessage + SetAckFloor, durable, up to ACKS_IN_FLIGHT
//! groups pipelined). Default StoreOptions (fsync on, auto compaction on).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use bytes::Bytes;
use sluice_storage::{MessageRecord, Op, Store, StoreOptions};
use std::collections::VecDeque;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const MESSAGES: u64 = 1_000_000;
const SIZE: usize = 1024;
const GROUP: u64 = 100;
const APPEND_THREADS: u64 = 4;
const PAGE: usize = 1000;
const ACKS_IN_FLIGHT: usize = 8;
const QUEUE: u64 = 7;

fn main() {
    let arg = std::env::args().nth(1);
    let tmp = tempfile::tempdir().unwrap();
    let dir = arg.as_deref().map_or(tmp.path(), Path::new);
    let store = Store::open(dir, StoreOptions::default()).unwrap();
    let pool = random_pool();
    println!("queue_churn: {MESSAGES} x {SIZE} B per phase, groups of {GROUP} from {APPEND_THREADS} threads, dir {}", dir.display());

    for phase in 0..2u64 {
        let first = phase * MESSAGES;
        let end = first + MESSAGES;
        println!("\n== phase {} (seq {first}..{end}) ==", phase + 1);

        let s0 = store.stats();
        let t = Instant::now();
        let next = AtomicU64::new(first);
        std::thread::scope(|s| {
            for _ in 0..APPEND_THREADS {
                s.spawn(|| loop {
                    let base = next.fetch_add(GROUP, Ordering::Relaxed);
                    if base >= end {
                        break;
                    }
                    let ops = (base..(base + GROUP).min(end))
                        .map(|seq| Op::PutMessage { queue: QUEUE, seq, record: record(&pool, seq) })
                        .collect();
                    store.write(ops, true).wait_blocking().unwrap();
                });
            }
        });
        let append = t.elapsed();
        let s1 = store.stats();
        println!(
            "append: {:>9.0} msgs/s  ({:.2} s, {} fsyncs, {:.1} writes/fsync)",
            MESSAGES as f64 / append.as_secs_f64(),
            append.as_secs_f64(),
            s1.syncs - s0.syncs,
            (s1.writes - s0.writes) as f64 / (s1.syncs - s0.syncs).max(1) as f64
        );
        report_disk("after append", &store, dir);

        let t = Instant::now();
        let mut cursor = store.ack_floor(QUEUE).unwrap();
        let mut in_flight = VecDeque::new();
        let mut drained = 0u64;
        loop {
            let page = store.scan_queue_page(QUEUE, cursor, PAGE).unwrap();
            let Some(&(last, _)) = page.last() else { break };
            drained += page.len() as u64;
            let mut ops: Vec<Op> = page.iter().map(|(seq, _)| Op::RemoveMessage { queue: QUEUE, seq: *seq }).collect();
            cursor = last + 1;
            ops.push(Op::SetAckFloor { queue: QUEUE, floor: cursor });
            in_flight.push_back(store.write(ops, true));
            if in_flight.len() > ACKS_IN_FLIGHT {
                in_flight.pop_front().unwrap().wait_blocking().unwrap();
            }
        }
        for c in in_flight {
            c.wait_blocking().unwrap();
        }
        let drain = t.elapsed();
        assert_eq!(drained, MESSAGES);
        println!("drain:  {:>9.0} msgs/s  ({:.2} s)", MESSAGES as f64 / drain.as_secs_f64(), drain.as_secs_f64());
        let s2 = store.stats();
        println!("compactions during drain: {} (running now: {})", s2.compactions - s1.compactions, s2.compaction_running);
        report_disk("after drain", &store, dir);
        println!("head scan of the emptied queue (from its floor): {:?}", head_scan(&store));

        // The final automatic pass is requested when the floor passes the
        // last seq; wait for it.
        let t = Instant::now();
        while store.stats().compaction_running {
            std::thread::sleep(Duration::from_millis(10));
        }
        let s3 = store.stats();
        println!(
            "waited {:.2} s for compaction; compactions this phase {}, last took {:.2} s",
            t.elapsed().as_secs_f64(),
            s3.compactions - s1.compactions,
            s3.last_compaction.as_secs_f64()
        );
        report_disk("after compaction", &store, dir);
        println!("head scan of the emptied queue (from its floor): {:?}", head_scan(&store));
        let t = Instant::now();
        let head = store.get_message(QUEUE, first).unwrap();
        println!("point read of an acked seq: {:?} -> {:?}", t.elapsed(), head.map(|b| b.len()));
    }
    let s = store.stats();
    println!("\ntotal: {} writes, {} fsyncs, {} batches, {} compactions; writes/batch histogram {:?}", s.writes, s.syncs, s.batches, s.compactions, s.writes_per_batch);
    store.close().unwrap();
}

/// 1 MiB of xorshift noise, so lz4 cannot shrink the payloads.
fn random_pool() -> Bytes {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut v = Vec::with_capacity(1 << 20);
    while v.len() < (1 << 20) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(v)
}

fn record(pool: &Bytes, seq: u64) -> MessageRecord {
    let off = (seq as usize * 4099) % (pool.len() - SIZE);
    MessageRecord { persistent: true, data: pool.slice(off..off + SIZE) }
}

fn head_scan(store: &Store) -> Duration {
    let t = Instant::now();
    let page = store.scan_queue_page(QUEUE, 0, 1).unwrap();
    let took = t.elapsed();
    assert!(page.is_empty());
    took
}

fn report_disk(label: &str, store: &Store, dir: &Path) {
    let s = store.stats();
    println!(
        "disk {label:<17} fjall {:>7.1} MiB (journal {:>6.1} MiB, preallocated), du {:>7.1} MiB",
        mib(s.disk_bytes),
        mib(s.journal_bytes),
        mib(du(dir))
    );
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// Allocated bytes under `dir` (like `du`), since fjall reports the
/// journal's preallocated length.
fn du(dir: &Path) -> u64 {
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
