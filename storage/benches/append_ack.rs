//! Criterion microbenchmarks of the storage append/ack path against a real
//! [`Store`] in a temporary directory under the target dir (a real disk,
//! so fsyncs cost what they cost there; not /tmp, which may be tmpfs).
//!
//! Every message is 1 KiB. Two variants, on one store opened with the
//! production options (`sync: true`):
//! - `transient`: `persistent: false` records written with
//!   `durable: false` (applied and handed to the OS, no fsync wait);
//! - `persistent`: `persistent: true` records written with `durable: true`
//!   (the Completion resolves after the group's fdatasync).
//!
//! Automatic compaction is off so that a background major compaction does
//! not land in one sample; memtable flushes still happen as in production.
//! Run: `cargo bench -p sluice-storage` (docs/performance.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use sluice_storage::{Completion, MessageRecord, Op, Store, StoreOptions};

/// Messages per write in the batched benches (one publisher-confirm window
/// or one page of acks).
const BATCH: u64 = 100;
/// Message payload size.
const SIZE: usize = 1024;
/// The append benches ack their backlog (untimed) once it reaches this many
/// messages, so the queue stays bounded however many iterations run.
const MAX_BACKLOG: u64 = 10_000;

#[derive(Clone, Copy, PartialEq)]
enum Variant {
    Transient,
    Persistent,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Transient => "transient",
            Variant::Persistent => "persistent",
        }
    }

    fn durable(self) -> bool {
        self == Variant::Persistent
    }
}

/// One queue of the store and the bench's view of it: seqs in
/// `floor..next` are stored and not acked. Seqs only ever grow (the
/// store's write-once rule).
struct Queue {
    id: u64,
    variant: Variant,
    next: u64,
    floor: u64,
    payload: Bytes,
}

impl Queue {
    fn new(id: u64, variant: Variant) -> Queue {
        let payload = Bytes::from((0..SIZE).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        Queue {
            id,
            variant,
            next: 0,
            floor: 0,
            payload,
        }
    }

    /// `n` new messages.
    fn puts(&mut self, n: u64) -> Vec<Op> {
        let persistent = self.variant == Variant::Persistent;
        let ops = (self.next..self.next + n)
            .map(|seq| Op::PutMessage {
                queue: self.id,
                seq,
                record: MessageRecord {
                    persistent,
                    data: self.payload.clone(),
                },
            })
            .collect();
        self.next += n;
        ops
    }

    /// Acks of the `n` oldest messages and the new ack floor, as a
    /// consumer's page of acks is written.
    fn acks(&mut self, n: u64) -> Vec<Op> {
        let end = (self.floor + n).min(self.next);
        let mut ops: Vec<Op> = (self.floor..end)
            .map(|seq| Op::RemoveMessage {
                queue: self.id,
                seq,
            })
            .collect();
        ops.push(Op::SetAckFloor {
            queue: self.id,
            floor: end,
        });
        self.floor = end;
        ops
    }

    fn backlog(&self) -> u64 {
        self.next - self.floor
    }

    /// Acks the whole backlog once it is large (untimed housekeeping).
    fn trim(&mut self, store: &Store) {
        if self.backlog() >= MAX_BACKLOG {
            while self.backlog() > 0 {
                let ops = self.acks(1000);
                wait(store.write(ops, self.variant.durable()));
            }
        }
    }
}

fn wait(c: Completion) {
    c.wait_blocking().expect("storage write");
}

/// One write of [`BATCH`] messages, waited for.
fn bench_append(c: &mut Criterion, store: &Store) {
    let mut g = c.benchmark_group("storage/append_batch100");
    g.throughput(Throughput::Elements(BATCH));
    for (id, variant) in [(1, Variant::Transient), (2, Variant::Persistent)] {
        let mut q = Queue::new(id, variant);
        g.bench_function(BenchmarkId::from_parameter(variant.name()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let ops = q.puts(BATCH);
                    let t = Instant::now();
                    wait(store.write(ops, variant.durable()));
                    total += t.elapsed();
                    q.trim(store);
                }
                total
            });
        });
    }
    g.finish();
}

/// One message per write: `single` waits for each write before the next
/// (a lone publisher waiting for every confirm: one fsync per message);
/// `pipelined100` submits 100 one-message writes, then waits for all (many
/// publishers at once: the writer's group commit shares fsyncs).
fn bench_append_single(c: &mut Criterion, store: &Store) {
    let mut g = c.benchmark_group("storage/append_one_per_write");
    let variant = Variant::Persistent;
    let mut q = Queue::new(3, variant);
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("single", variant.name()), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let ops = q.puts(1);
                let t = Instant::now();
                wait(store.write(ops, variant.durable()));
                total += t.elapsed();
                q.trim(store);
            }
            total
        });
    });
    let mut q = Queue::new(4, variant);
    g.throughput(Throughput::Elements(BATCH));
    g.bench_function(BenchmarkId::new("pipelined100", variant.name()), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let writes: Vec<Vec<Op>> = (0..BATCH).map(|_| q.puts(1)).collect();
                let t = Instant::now();
                let pending: Vec<Completion> = writes
                    .into_iter()
                    .map(|ops| store.write(ops, variant.durable()))
                    .collect();
                pending.into_iter().for_each(wait);
                total += t.elapsed();
                q.trim(store);
            }
            total
        });
    });
    g.finish();
}

/// Acking [`BATCH`] messages (100 removes + the new ack floor in one
/// write); the messages are appended beforehand, untimed.
fn bench_ack(c: &mut Criterion, store: &Store) {
    let mut g = c.benchmark_group("storage/ack_batch100");
    g.throughput(Throughput::Elements(BATCH));
    for (id, variant) in [(5, Variant::Transient), (6, Variant::Persistent)] {
        let mut q = Queue::new(id, variant);
        g.bench_function(BenchmarkId::from_parameter(variant.name()), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    wait(store.write(q.puts(BATCH), variant.durable()));
                    let ops = q.acks(BATCH);
                    let t = Instant::now();
                    wait(store.write(ops, variant.durable()));
                    total += t.elapsed();
                }
                total
            });
        });
    }
    g.finish();
}

/// A full round: append [`BATCH`] messages (waited for), then ack them
/// (waited for); the queue is empty between iterations.
fn bench_append_ack(c: &mut Criterion, store: &Store) {
    let mut g = c.benchmark_group("storage/append_ack_batch100");
    g.throughput(Throughput::Elements(BATCH));
    for (id, variant) in [(7, Variant::Transient), (8, Variant::Persistent)] {
        let mut q = Queue::new(id, variant);
        g.bench_function(BenchmarkId::from_parameter(variant.name()), |b| {
            b.iter(|| {
                wait(store.write(q.puts(BATCH), variant.durable()));
                wait(store.write(q.acks(BATCH), variant.durable()));
            });
        });
    }
    g.finish();
}

fn benches(c: &mut Criterion) {
    let dir = tempfile::Builder::new()
        .prefix("sluice-bench-append-ack-")
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("temporary directory");
    let opts = StoreOptions {
        auto_compact: false,
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), opts).expect("open store");
    bench_append(c, &store);
    bench_append_single(c, &store);
    bench_ack(c, &store);
    bench_append_ack(c, &store);
    store.close().expect("close store");
    drop(store);
    drop(dir);
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
}

criterion_group! {
    name = storage;
    config = config();
    targets = benches
}
criterion_main!(storage);
