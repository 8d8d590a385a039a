//! `ReplicatedQueue` (one Raft group, single voter) behind the `Queue`
//! trait: confirms, credit, order, requeue, get, purge, restart, and no
//! message with two consumers at once. Real fjall stores in temporary
//! directories, a multi-threaded tokio runtime (the queue's driver task
//! runs on it while `open` blocks its caller).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_cluster::replicated::{ReplicaOptions, ReplicatedQueue};
use sluice_cluster::{ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Outcome, Queue, QueueId, QueueSpec};
use sluice_codecs::command::{Message, Properties};
use sluice_storage::{Store, StoreOptions};
use tokio::sync::mpsc;

const WAIT: Duration = Duration::from_secs(10);

fn open_store(dir: &Path) -> Store {
    Store::open(dir, StoreOptions { sync: false, ..StoreOptions::default() }).unwrap()
}

fn spec() -> QueueSpec {
    QueueSpec { vhost: "/".into(), id: QueueId(7), name: "rq".into(), durable: true, arguments: Default::default() }
}

fn open(store: &Store) -> Arc<ReplicatedQueue> {
    ReplicatedQueue::open(
        spec(),
        store.clone(),
        ReplicaOptions::single_voter(1, "local"),
        &tokio::runtime::Handle::current(),
    )
    .unwrap()
}

fn msg(i: u32) -> Message {
    Message {
        exchange: String::new(),
        routing_key: "rq".into(),
        properties: Box::new(Properties { delivery_mode: Some(2), ..Default::default() }),
        body: Bytes::from(format!("m{i}")),
    }
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.message.body.to_vec()).unwrap()
}

async fn publish_all(q: &ReplicatedQueue, range: std::ops::Range<u32>) {
    let mut durables = Vec::new();
    for i in range {
        durables.push(q.publish(msg(i)).unwrap().expect("persistent on a durable queue"));
    }
    for d in durables {
        tokio::time::timeout(WAIT, d).await.unwrap().unwrap();
    }
}

struct Sink(mpsc::UnboundedSender<(usize, Delivery)>, usize);

impl DeliverySink for Sink {
    fn deliver(&self, _consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        self.0.send((self.1, delivery)).is_ok()
    }
    fn cancelled(&self, _consumer: &Arc<Consumer>) {}
}

fn consumer(tag: &str, prefetch: u32, n: usize, tx: &mpsc::UnboundedSender<(usize, Delivery)>) -> Arc<Consumer> {
    Consumer::new(
        tag.into(),
        false,
        false,
        Credit::new(prefetch),
        Arc::new(ChannelFlow::default()),
        Arc::new(Sink(tx.clone(), n)),
    )
}

/// Receives one delivery and, as the gateway's writer would, gives the
/// pending slot back.
async fn recv(rx: &mut mpsc::UnboundedReceiver<(usize, Delivery)>, consumers: &[&Arc<Consumer>]) -> (usize, Delivery) {
    let (n, d) = tokio::time::timeout(WAIT, rx.recv()).await.expect("a delivery").expect("open channel");
    consumers[n].release_pending();
    (n, d)
}

async fn nothing_more(rx: &mut mpsc::UnboundedReceiver<(usize, Delivery)>) {
    assert!(tokio::time::timeout(Duration::from_millis(300), rx.recv()).await.is_err(), "unexpected delivery");
}

/// As the gateway does on ack/reject: credit back, then settle, then kick.
fn settle(q: &ReplicatedQueue, c: &Arc<Consumer>, ids: &[u64], outcome: Outcome) {
    for _ in ids {
        c.release_unacked();
    }
    q.settle(ids, outcome);
    q.kick();
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_are_confirmed_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open(&store);
    publish_all(&q, 0..100).await;
    assert_eq!(q.counts_now(), (100, 0));
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credit_is_respected_and_order_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open(&store);
    publish_all(&q, 0..25).await;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = consumer("c", 10, 0, &tx);
    q.consume(c.clone()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..10 {
        got.push(recv(&mut rx, &[&c]).await.1);
    }
    nothing_more(&mut rx).await;
    assert_eq!(q.counts_now(), (15, 1));
    assert_eq!(q.unacked_count(), 10);
    // Settling frees credit: the rest arrives, in order.
    let ids: Vec<u64> = got.iter().map(|d| d.msg_id).collect();
    settle(&q, &c, &ids, Outcome::Ack);
    while got.len() < 25 {
        let d = recv(&mut rx, &[&c]).await.1;
        settle(&q, &c, &[d.msg_id], Outcome::Ack);
        got.push(d);
    }
    let bodies: Vec<String> = got.iter().map(body).collect();
    let want: Vec<String> = (0..25).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
    assert!(got.iter().all(|d| !d.redelivered));
    nothing_more(&mut rx).await;
    eventually("everything acked", || q.unacked_count() == 0).await;
    assert_eq!(q.counts_now(), (0, 1));
    assert!(q.cancel(&c));
    assert!(!q.cancel(&c));
    eventually("consumer detached", || q.counts_now().1 == 0).await;
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_get_and_purge() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open(&store);
    publish_all(&q, 0..5).await;
    // get takes the first; requeue puts it back at its position.
    let (first, left) = q.get(false, Default::default()).await.unwrap().unwrap();
    assert_eq!((body(&first).as_str(), left, first.redelivered), ("m0", 4, false));
    let (second, left) = q.get(false, Default::default()).await.unwrap().unwrap();
    assert_eq!((body(&second).as_str(), left), ("m1", 3));
    q.settle(&[first.msg_id], Outcome::Requeue);
    eventually("requeued", || q.counts_now().0 == 4).await;
    let (again, _) = q.get(true, Default::default()).await.unwrap().unwrap();
    assert_eq!((body(&again).as_str(), again.redelivered, again.msg_id), ("m0", true, first.msg_id));
    // A consumer sees the requeued one first too.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = consumer("c", 1, 0, &tx);
    q.settle(&[second.msg_id], Outcome::Requeue);
    eventually("requeued", || q.counts_now().0 == 4).await;
    q.consume(c.clone()).await.unwrap();
    let d = recv(&mut rx, &[&c]).await.1;
    assert_eq!((body(&d).as_str(), d.redelivered), ("m1", true));
    assert!(q.cancel(&c));
    // Purge drops the ready ones only (m2..m4), not the held m1.
    assert_eq!(q.purge().await.unwrap(), 3);
    assert_eq!(q.counts_now().0, 0);
    assert_eq!(q.unacked_count(), 1);
    assert!(q.get(false, Default::default()).await.unwrap().is_none());
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reopen_makes_unsettled_messages_ready_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let held_ids;
    {
        let q = open(&store);
        publish_all(&q, 0..10).await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let c = consumer("c", 4, 0, &tx);
        q.consume(c.clone()).await.unwrap();
        let mut held = Vec::new();
        for _ in 0..4 {
            held.push(recv(&mut rx, &[&c]).await.1);
        }
        // Ack two (m0, m1); m2 and m3 stay held.
        settle(&q, &c, &[held[0].msg_id, held[1].msg_id], Outcome::Ack);
        let more: Vec<Delivery> = vec![recv(&mut rx, &[&c]).await.1, recv(&mut rx, &[&c]).await.1];
        held_ids = [held[2].msg_id, held[3].msg_id, more[0].msg_id, more[1].msg_id];
        nothing_more(&mut rx).await;
        assert_eq!(q.unacked_count(), 4);
        q.close().await;
    }
    let q = open(&store);
    assert_eq!(q.counts_now(), (8, 0));
    assert_eq!(q.unacked_count(), 0);
    let mut seen = Vec::new();
    while let Some((d, _)) = q.get(true, Default::default()).await.unwrap() {
        seen.push((body(&d), d.redelivered, d.msg_id));
    }
    let bodies: Vec<&str> = seen.iter().map(|s| s.0.as_str()).collect();
    let want: Vec<String> = (2..10).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
    for (b, redelivered, id) in &seen {
        assert_eq!(*redelivered, held_ids.contains(id), "{b}");
    }
    assert_eq!(seen.iter().filter(|s| s.1).count(), 4, "held ones are redelivered");
    q.close().await;
    drop(q);
    // Everything was taken with no-ack: a third start finds it empty.
    let q = open(&store);
    assert_eq!(q.counts_now(), (0, 0));
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drop_without_close_reopens_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    {
        let q = open(&store);
        publish_all(&q, 0..3).await;
        let (d, _) = q.get(false, Default::default()).await.unwrap().unwrap();
        assert_eq!(body(&d), "m0");
    }
    let q = open(&store);
    assert_eq!(q.counts_now(), (3, 0));
    let (d, _) = q.get(false, Default::default()).await.unwrap().unwrap();
    assert_eq!((body(&d).as_str(), d.redelivered), ("m0", true));
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_goes_to_two_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open(&store);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = consumer("a", 0, 0, &tx);
    let b = consumer("b", 0, 1, &tx);
    q.consume(a.clone()).await.unwrap();
    q.consume(b.clone()).await.unwrap();
    publish_all(&q, 0..200).await;
    let mut seen = BTreeSet::new();
    let mut per = [0usize; 2];
    for _ in 0..200 {
        let (n, d) = recv(&mut rx, &[&a, &b]).await;
        assert!(seen.insert(d.msg_id), "seq {} delivered twice", d.msg_id);
        per[n] += 1;
    }
    nothing_more(&mut rx).await;
    assert!(per[0] > 0 && per[1] > 0, "both consumers got messages: {per:?}");
    assert_eq!(q.unacked_count(), 200);
    assert_eq!(q.counts_now(), (0, 2));
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_stops_the_queue_and_removes_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open(&store);
    publish_all(&q, 0..5).await;
    let (tx, _rx) = mpsc::unbounded_channel();
    let c = consumer("c", 1, 0, &tx);
    q.consume(c.clone()).await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, q.delete()).await.unwrap().unwrap(), 4);
    assert!(q.is_deleted());
    assert!(matches!(q.publish(msg(9)), Err(sluice_cluster::Error::QueueDeleted)));
    assert!(matches!(q.get(true, Default::default()).await, Err(sluice_cluster::Error::QueueDeleted)));
    q.close().await;
    drop(q);
    let (_done, applied) = store.write_tracked(Vec::new(), false);
    eventually("the delete write", || applied.is_settled()).await;
    assert!(!sluice_cluster::consensus::FjallLogStore::exists(&store, 7).unwrap());
    // Opening it again starts an empty queue.
    let q = open(&store);
    assert_eq!(q.counts_now(), (0, 0));
    q.close().await;
}

// ---- long-running use: checkpoints, compaction, bounded log, crashes ----

/// Small checkpoint intervals, so a few thousand messages see many
/// checkpoints and compactions.
fn open_tuned(store: &Store) -> Arc<ReplicatedQueue> {
    let mut opts = ReplicaOptions::single_voter(1, "local");
    opts.checkpoint_entries = 16;
    opts.checkpoint_bytes = 16 << 10;
    opts.body_cache_bytes = 64 << 10;
    ReplicatedQueue::open(spec(), store.clone(), opts, &tokio::runtime::Handle::current()).unwrap()
}

/// Publishes `range` with up to `window` confirms outstanding.
async fn publish_window(q: &ReplicatedQueue, range: std::ops::Range<u32>, window: usize) {
    let mut inflight = std::collections::VecDeque::new();
    for i in range {
        inflight.push_back(q.publish(msg(i)).unwrap().unwrap());
        if inflight.len() >= window {
            tokio::time::timeout(WAIT, inflight.pop_front().unwrap()).await.unwrap().unwrap();
        }
    }
    for d in inflight {
        tokio::time::timeout(WAIT, d).await.unwrap().unwrap();
    }
}

/// Consumes and acks `n` messages with a consumer of prefetch 50; returns
/// their bodies.
async fn consume_ack(q: &Arc<ReplicatedQueue>, n: usize) -> Vec<String> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = consumer("ca", 50, 0, &tx);
    q.consume(c.clone()).await.unwrap();
    let mut got = Vec::new();
    while got.len() < n {
        let d = recv(&mut rx, &[&c]).await.1;
        settle(q, &c, &[d.msg_id], Outcome::Ack);
        got.push(body(&d));
    }
    assert!(q.cancel(&c));
    // Whatever else was delivered goes back, including deliveries of
    // checkouts that applied before the cancel did (they can still be on
    // their way): requeue until the consumer holds nothing.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut rest = Vec::new();
        while let Ok((_, d)) = rx.try_recv() {
            rest.push(d.msg_id);
        }
        settle(q, &c, &rest, Outcome::Requeue);
        if rest.is_empty() && q.unacked_count() == 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "deliveries kept coming after the cancel");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    got
}

async fn drain_bodies(q: &ReplicatedQueue) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((d, _)) = tokio::time::timeout(WAIT, q.get(true, Default::default())).await.unwrap().unwrap() {
        out.push(body(&d));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_replays_only_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let before;
    {
        let q = open_tuned(&store);
        publish_window(&q, 0..2000, 64).await;
        let got = consume_ack(&q, 1500).await;
        assert_eq!(got, (0..1500).map(|i| format!("m{i}")).collect::<Vec<_>>());
        eventually("acks applied", || q.unacked_count() == 0 && q.counts_now() == (500, 0)).await;
        before = q.stats();
        // Dropped without close: no final checkpoint.
    }
    // 2000 publishes, 1500 checkouts and 1500 acks (5,000 commands) went
    // into fewer entries: a single voter applies before the fsync, and
    // this test's store does not fsync, so writes settle fast and entries
    // stay small (a light load: up to 32 appends in flight before it
    // batches; about 4,900 entries here, with fsyncs far fewer); the log
    // starts at the entry of message 1500.
    assert!(before.last_index < 5_000, "not batched: {before:?}");
    assert!(before.first_index > 10, "log not compacted: {before:?}");
    assert!(before.checkpoint_index > before.first_index, "no checkpoint: {before:?}");
    assert_eq!(store.log_first_index(7).unwrap(), before.first_index);
    let q = open_tuned(&store);
    let after = q.stats();
    println!("before restart {before:?}, after {after:?}");
    // Resumed from the checkpoint: the log before it is gone, and what
    // is left of it to replay is the tail since the checkpoint.
    assert!(after.first_index >= before.first_index);
    assert!(after.checkpoint_index >= before.checkpoint_index);
    assert_eq!(q.counts_now(), (500, 0));
    assert_eq!(drain_bodies(&q).await, (1500..2000).map(|i| format!("m{i}")).collect::<Vec<_>>());
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_stays_bounded_while_a_consumer_keeps_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open_tuned(&store);
    let total = 20_000u32;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = consumer("steady", 100, 0, &tx);
    q.consume(c.clone()).await.unwrap();
    let consumer_q = q.clone();
    let consumer_c = c.clone();
    let consuming = tokio::spawn(async move {
        let mut max_len = 0;
        let mut next = 0u32;
        while next < total {
            let d = recv(&mut rx, &[&consumer_c]).await.1;
            assert_eq!(body(&d), format!("m{next}"));
            next += 1;
            settle(&consumer_q, &consumer_c, &[d.msg_id], Outcome::Ack);
            if next > 2000 {
                let s = consumer_q.stats();
                max_len = max_len.max(s.last_index + 1 - s.first_index);
            }
        }
        max_len
    });
    publish_window(&q, 0..total, 32).await;
    let max_len = tokio::time::timeout(Duration::from_secs(60), consuming).await.unwrap().unwrap();
    let s = q.stats();
    println!("20k messages: {s:?}, longest log after warm-up {max_len} entries");
    assert!(s.last_index > 1000, "too few entries to tell: {s:?}");
    // Up to 132 messages are live at a time (prefetch 100, 32 publishes in
    // flight), each in an entry of its own with its checkout and ack in
    // others at this light load (about 2.8 entries per message): 100 to
    // 2,600 entries over runs, depending on when checkpoints fall. A log
    // that grew with the traffic would reach 56,000.
    assert!(max_len < 5_000, "the log grew to {max_len} entries");
    eventually("everything acked", || q.unacked_count() == 0).await;
    q.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_at_random_points_loses_nothing_confirmed() {
    let seeds: u64 = std::env::var("CRASH_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    for seed in 0..seeds {
        let mut rng = sluice_cluster::consensus::SplitMix64::new(seed);
        let dir = tempfile::tempdir().unwrap();
        let mut confirmed = BTreeSet::new();
        let mut acked = BTreeSet::new();
        let mut next = 0u32;
        for round in 0..3 {
            let store = reopen_store(dir.path()).await;
            let q = open_tuned(&store);
            // A publisher with confirms and a consumer acking, cut off
            // (queue and store dropped, nothing closed) at a random moment.
            let (tx, mut rx) = mpsc::unbounded_channel();
            let c = consumer("crash", 20, 0, &tx);
            q.consume(c.clone()).await.unwrap();
            let crash_after = Duration::from_millis(rng.range(5, 80));
            let work = async {
                let mut inflight = std::collections::VecDeque::new();
                loop {
                    tokio::select! {
                        Some((_, d)) = rx.recv() => {
                            c.release_pending();
                            let id: u32 = body(&d)[1..].parse().unwrap();
                            settle(&q, &c, &[d.msg_id], Outcome::Ack);
                            acked.insert(id);
                        }
                        _ = tokio::time::sleep(Duration::from_micros(200)) => {
                            for _ in 0..8 {
                                inflight.push_back((next, q.publish(msg(next)).unwrap().unwrap()));
                                next += 1;
                            }
                            while inflight.len() > 64 {
                                let (id, d) = inflight.pop_front().unwrap();
                                d.await.unwrap();
                                confirmed.insert(id);
                            }
                        }
                    }
                }
            };
            let _ = tokio::time::timeout(crash_after, work).await;
            drop(c);
            drop(q);
            drop(store);
            let _ = round;
        }
        let store = reopen_store(dir.path()).await;
        let q = open_tuned(&store);
        let left: Vec<u32> = drain_bodies(&q).await.iter().map(|b| b[1..].parse().unwrap()).collect();
        let set: BTreeSet<u32> = left.iter().copied().collect();
        assert_eq!(set.len(), left.len(), "seed {seed}: duplicates");
        let lost: Vec<_> = confirmed.iter().filter(|id| !set.contains(id) && !acked.contains(id)).collect();
        assert!(lost.is_empty(), "seed {seed}: confirmed but lost: {lost:?}");
        let mut sorted = left.clone();
        sorted.sort_unstable();
        assert_eq!(left, sorted, "seed {seed}: out of order");
        println!("seed {seed}: {} confirmed, {} acked, {} left", confirmed.len(), acked.len(), left.len());
        q.close().await;
    }
}

async fn reopen_store(dir: &Path) -> Store {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Store::open(dir, StoreOptions { sync: false, ..StoreOptions::default() }) {
            Ok(store) => return store,
            Err(e) => {
                assert!(tokio::time::Instant::now() < deadline, "store did not reopen: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// Applying before the fsync (a single voter) must not confirm early:
/// while the store commits nothing (a stalled disk, `Store::hold_writes`),
/// a published message is delivered (as RabbitMQ's classic queues deliver
/// before their fsync; after a crash every ready message comes back
/// flagged redelivered) but not confirmed; once the disk moves, the
/// confirm comes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_disk_stalls_deliveries_go_out_but_nothing_is_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let q = open(&store);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let c = consumer("c", 10, 0, &tx);
    q.consume(c.clone()).await.unwrap();

    // Released however the test ends (a held store never closes).
    struct Release(Store);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.hold_writes(false);
        }
    }
    let release = Release(store.clone());
    // The attach's writes settled first.
    eventually("the attach's writes settled", || q.stats().writes_in_flight == 0).await;
    store.hold_writes(true);
    let mut durable = q.publish(msg(1)).unwrap().expect("persistent on a durable queue");
    let (_, d) = recv(&mut rx, &[&c]).await;
    assert_eq!(body(&d), "m1");
    assert!(!d.redelivered);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        futures_util::FutureExt::now_or_never(&mut durable).is_none(),
        "confirmed while its write was held (not durable)"
    );
    drop(release);
    tokio::time::timeout(WAIT, durable).await.expect("the confirm once durable").unwrap();
    settle(&q, &c, &[d.msg_id], Outcome::Ack);
    eventually("acked", || q.unacked_count() == 0).await;
    q.close().await;

    // The message and its ack are in the log: nothing left after a reopen.
    let q = open(&store);
    assert_eq!(q.counts_now().0, 0);
    q.close().await;
}

/// A volatile queue (a single node's non-durable queue): its log lives in
/// memory, so it works with the disk's writes held, writes nothing of its
/// own, still compacts its log as messages go, and reads a backlog bigger
/// than its body cache back from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volatile_queue_never_waits_for_or_writes_to_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path());
    let mut opts = ReplicaOptions::single_voter(1, "local");
    opts.volatile = true;
    opts.checkpoint_entries = 16;
    opts.checkpoint_bytes = 16 << 10;
    opts.body_cache_bytes = 16 << 10;
    let spec = QueueSpec { durable: false, ..spec() };
    let q = ReplicatedQueue::open(spec, store.clone(), opts, &tokio::runtime::Handle::current()).unwrap();

    struct Release(Store);
    impl Drop for Release {
        fn drop(&mut self) {
            self.0.hold_writes(false);
        }
    }
    let release = Release(store.clone());
    store.hold_writes(true);
    // A backlog of 3,000 (far beyond the 16 KiB body cache), then drained:
    // every confirm and delivery comes while nothing reaches the disk.
    // (A non-durable queue confirms at once: no future to wait for.)
    for i in 0..3000 {
        assert!(q.publish(msg(i)).unwrap().is_none());
    }
    eventually("the backlog applied", || q.counts_now() == (3000, 0)).await;
    // The bodies are kept beside the log, not copied into its entries.
    assert!(q.stats().side_entries > 0, "{:?}", q.stats());
    assert!(q.stats().cached_bytes == 0, "{:?}", q.stats());
    let got = consume_ack(&q, 3000).await;
    assert_eq!(got, (0..3000).map(|i| format!("m{i}")).collect::<Vec<_>>());
    eventually("acks applied", || q.counts_now() == (0, 0)).await;
    let first_round = q.stats();
    // Another round, taken by basic.get: the first round's entries all go.
    for i in 3000..3200 {
        assert!(q.publish(msg(i)).unwrap().is_none());
    }
    eventually("the second round applied", || q.counts_now() == (200, 0)).await;
    assert_eq!(drain_bodies(&q).await, (3000..3200).map(|i| format!("m{i}")).collect::<Vec<_>>());
    eventually("the first round's log gone", || q.stats().first_index > first_round.last_index).await;
    eventually("no body kept once every message is gone", || q.stats().side_entries == 0).await;
    assert_eq!(q.stats().writes_in_flight, 0);
    drop(release);
    // Nothing of the queue's on disk: no entry, no state.
    assert_eq!(store.log_last_index(7).unwrap(), None);
    assert!(!sluice_cluster::consensus::FjallLogStore::exists(&store, 7).unwrap());
    q.close().await;
    assert!(!sluice_cluster::consensus::FjallLogStore::exists(&store, 7).unwrap());
}
