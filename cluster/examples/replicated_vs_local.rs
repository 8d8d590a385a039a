//! `ReplicatedQueue` (a single voter, the "cluster of one" `sluice serve`
//! will run) against today's `LocalQueue`, on the same kind of store
//! (fjall, fsync on): publish N persistent 1 KiB messages with W confirms
//! outstanding, then consume them all with a consumer of prefetch W that
//! acks each one. The two run alternately in one process, ROUNDS times.
//!
//! `cargo run --release -p sluice-cluster --example replicated_vs_local`
//! (env: N, W, ROUNDS; figures in docs/cluster.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_cluster::backend::Backend;
use sluice_cluster::replicated::{ReplicaOptions, ReplicatedQueue};
use sluice_cluster::{
    ChannelFlow, Consumer, Credit, Delivery, DeliverySink, LocalBackend, LocalOptions, Outcome, Queue, QueueId,
    QueueSpec,
};
use sluice_codecs::command::{Message, Properties};
use sluice_storage::{Store, StoreOptions};
use tokio::sync::mpsc;

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, _consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        self.0.send(delivery).is_ok()
    }
    fn cancelled(&self, _consumer: &Arc<Consumer>) {}
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn spec() -> QueueSpec {
    QueueSpec { id: QueueId(1), name: "bench".into(), durable: true, arguments: Default::default() }
}

/// Publish rate, consume rate (msgs/s).
async fn run(q: Arc<dyn Queue>, n: usize, w: usize) -> (f64, f64) {
    let body = Bytes::from(vec![b'x'; 1024]);
    let message = Message {
        exchange: String::new(),
        routing_key: "bench".into(),
        properties: Properties { delivery_mode: Some(2), ..Default::default() },
        body,
    };
    let start = Instant::now();
    let mut inflight = VecDeque::with_capacity(w);
    for _ in 0..n {
        inflight.push_back(q.publish(message.clone()).unwrap().expect("persistent"));
        if inflight.len() >= w {
            inflight.pop_front().unwrap().await.unwrap();
        }
    }
    for d in inflight {
        d.await.unwrap();
    }
    let publish = n as f64 / start.elapsed().as_secs_f64();

    let (tx, mut rx) = mpsc::unbounded_channel();
    let consumer = Consumer::new(
        "bench".into(),
        false,
        false,
        Credit::new(u32::try_from(w).unwrap()),
        Arc::new(ChannelFlow::default()),
        Arc::new(Sink(tx)),
    );
    let start = Instant::now();
    q.consume(consumer.clone()).await.unwrap();
    for _ in 0..n {
        let d = tokio::time::timeout(Duration::from_secs(30), rx.recv()).await.expect("a delivery").unwrap();
        consumer.release_pending();
        consumer.release_unacked();
        q.settle(&[d.msg_id], Outcome::Ack);
        q.kick();
    }
    let consume = n as f64 / start.elapsed().as_secs_f64();
    assert!(q.cancel(&consumer));
    (publish, consume)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let n = env("N", 100_000);
    let w = env("W", 256);
    let rounds = env("ROUNDS", 2);
    println!("N = {n} persistent 1 KiB messages, W = {w} in flight / prefetch, {rounds} rounds, fsync on");
    let mut local = Vec::new();
    let mut replicated = Vec::new();
    for round in 0..rounds {
        {
            let dir = tempfile::tempdir().unwrap();
            let backend = LocalBackend::open(dir.path(), LocalOptions::default()).unwrap();
            let q = backend.open_queue(spec()).unwrap();
            let (p, c) = rt.block_on(run(q, n, w));
            backend.shutdown().unwrap();
            println!("round {round} local:      publish {p:>9.0} msgs/s, consume+ack {c:>9.0} msgs/s, RSS {:.0} MiB", rss_mib());
            local.push((p, c));
        }
        {
            let dir = tempfile::tempdir().unwrap();
            let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
            let q = ReplicatedQueue::open(
                spec(),
                store.clone(),
                ReplicaOptions::single_voter(1, "local"),
                rt.handle(),
            )
            .unwrap();
            let (p, c) = rt.block_on(run(q.clone(), n, w));
            let stats = q.stats();
            rt.block_on(q.close());
            drop(q);
            println!(
                "round {round} replicated: publish {p:>9.0} msgs/s, consume+ack {c:>9.0} msgs/s, RSS {:.0} MiB ({} log entries, {} fsyncs)",
                rss_mib(),
                stats.last_index,
                store.stats().syncs
            );
            store.close().unwrap();
            replicated.push((p, c));
        }
    }
    let mean = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| v.iter().map(f).sum::<f64>() / v.len() as f64;
    let (lp, lc) = (mean(&local, |x| x.0), mean(&local, |x| x.1));
    let (rp, rc) = (mean(&replicated, |x| x.0), mean(&replicated, |x| x.1));
    println!("mean publish:     local {lp:.0}, replicated {rp:.0} msgs/s: local/replicated = {:.2}", lp / rp);
    println!("mean consume+ack: local {lc:.0}, replicated {rc:.0} msgs/s: local/replicated = {:.2}", lc / rc);
    println!("final RSS {:.0} MiB", rss_mib());
}
