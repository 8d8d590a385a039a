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
    QueueSpec { id: QueueId(7), name: "rq".into(), durable: true, arguments: Default::default() }
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
        properties: Properties { delivery_mode: Some(2), ..Default::default() },
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
    let (first, left) = q.get(false).await.unwrap().unwrap();
    assert_eq!((body(&first).as_str(), left, first.redelivered), ("m0", 4, false));
    let (second, left) = q.get(false).await.unwrap().unwrap();
    assert_eq!((body(&second).as_str(), left), ("m1", 3));
    q.settle(&[first.msg_id], Outcome::Requeue);
    eventually("requeued", || q.counts_now().0 == 4).await;
    let (again, _) = q.get(true).await.unwrap().unwrap();
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
    assert!(q.get(false).await.unwrap().is_none());
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
    while let Some((d, _)) = q.get(true).await.unwrap() {
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
        let (d, _) = q.get(false).await.unwrap().unwrap();
        assert_eq!(body(&d), "m0");
    }
    let q = open(&store);
    assert_eq!(q.counts_now(), (3, 0));
    let (d, _) = q.get(false).await.unwrap().unwrap();
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
    assert!(matches!(q.get(true).await, Err(sluice_cluster::Error::QueueDeleted)));
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
