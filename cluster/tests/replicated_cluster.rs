//! Three replicas of one `ReplicatedQueue`, each on its own fjall `Store`
//! in its own temporary directory, connected by `consensus::MemNet`:
//! election and replication, leader isolation and leader kill under a
//! stream of confirmed publishes (retried at the new leader with the same
//! `PublishId`), consumer failover with re-attach, restart and catch-up, a
//! cut-off leader that cannot confirm, and delete. A "kill" unregisters the
//! replica from the network and drops it and its `Store`; a restart opens
//! a new `Store` on the same directory.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use sluice_cluster::consensus::{raft_id, FjallLogStore, MemNet};
use sluice_cluster::replicated::{ConsumerId, PublishId, ReplicaOptions, ReplicatedQueue};
use sluice_cluster::{
    ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Error, Outcome, Queue, QueueId, QueueSpec,
};
use sluice_codecs::command::{Message, Properties};
use sluice_storage::{Store, StoreOptions};
use tempfile::TempDir;
use tokio::sync::mpsc;

const QUEUE: u64 = 42;
const WAIT: Duration = Duration::from_secs(8);

fn spec() -> QueueSpec {
    QueueSpec { vhost: "/".into(), id: QueueId(QUEUE), name: "rc".into(), durable: true, arguments: Default::default() }
}

fn msg(i: u64) -> Message {
    Message {
        exchange: String::new(),
        routing_key: "rc".into(),
        properties: Box::new(Properties { delivery_mode: Some(2), ..Default::default() }),
        body: Bytes::from(format!("m{i}")),
    }
}

fn pid(i: u64) -> Option<PublishId> {
    Some(PublishId { publisher: "p".into(), id: i })
}

fn id_of(d: &Delivery) -> u64 {
    let body = std::str::from_utf8(&d.message.body).unwrap();
    body.strip_prefix('m').unwrap().parse().unwrap()
}

type Replicas = Arc<Mutex<Vec<Option<Arc<ReplicatedQueue>>>>>;

struct Cluster {
    net: MemNet,
    ids: Vec<u64>,
    dirs: Vec<TempDir>,
    replicas: Replicas,
    grace: Duration,
}

impl Cluster {
    async fn start(n: usize, grace: Duration) -> Cluster {
        let ids: Vec<u64> = (1..=n).map(|i| raft_id(&format!("n{i}"))).collect();
        let dirs = (0..n).map(|_| tempfile::tempdir().unwrap()).collect();
        let cluster = Cluster { net: MemNet::new(), ids, dirs, replicas: Arc::new(Mutex::new(vec![None; n])), grace };
        for i in 0..n {
            cluster.restart(i).await;
        }
        cluster
    }

    /// Opens replica `i` from its directory (a new `Store`) and connects it.
    async fn restart(&self, i: usize) {
        let store = open_store(self.dirs[i].path()).await;
        let mut opts = ReplicaOptions::new(self.ids[i], self.ids.clone(), self.net.transport(self.ids[i]), "local");
        opts.reattach_grace = self.grace;
        // Small intervals: every test also runs checkpoints and compactions.
        opts.checkpoint_entries = 32;
        opts.checkpoint_bytes = 16 << 10;
        let replica = ReplicatedQueue::open(spec(), store, opts, &tokio::runtime::Handle::current()).unwrap();
        let weak = Arc::downgrade(&replica);
        self.net.register(self.ids[i], move |group, m| {
            if group == QUEUE {
                if let Some(r) = weak.upgrade() {
                    r.step(m);
                }
            }
        });
        self.replicas.lock().unwrap()[i] = Some(replica);
    }

    /// Starts one more replica, `n{len+1}`, that joins the group (empty
    /// log, no bootstrap): the leader must add it.
    async fn add_joiner(&mut self) -> usize {
        let i = self.ids.len();
        self.ids.push(raft_id(&format!("n{}", i + 1)));
        self.dirs.push(tempfile::tempdir().unwrap());
        self.replicas.lock().unwrap().push(None);
        let store = open_store(self.dirs[i].path()).await;
        let mut opts = ReplicaOptions::new(self.ids[i], Vec::new(), self.net.transport(self.ids[i]), "local");
        opts.reattach_grace = self.grace;
        opts.checkpoint_entries = 32;
        opts.checkpoint_bytes = 16 << 10;
        opts.join = true;
        let replica = ReplicatedQueue::open(spec(), store, opts, &tokio::runtime::Handle::current()).unwrap();
        let weak = Arc::downgrade(&replica);
        self.net.register(self.ids[i], move |group, m| {
            if group == QUEUE {
                if let Some(r) = weak.upgrade() {
                    r.step(m);
                }
            }
        });
        self.replicas.lock().unwrap()[i] = Some(replica);
        i
    }

    /// Kills replica `i`: off the network, dropped with its store (the
    /// test must hold no handle of it; the network and the publisher only
    /// hold one for a moment).
    async fn kill(&self, i: usize) {
        self.net.unregister(self.ids[i]);
        let mut replica = self.replicas.lock().unwrap()[i].take().expect("replica running");
        let deadline = Instant::now() + WAIT;
        loop {
            match Arc::try_unwrap(replica) {
                Ok(r) => return drop(r),
                Err(r) => replica = r,
            }
            assert!(Instant::now() < deadline, "replica {i} still referenced");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn isolate(&self, i: usize, cut: bool) {
        self.net.isolate(self.ids[i], cut);
    }

    fn get(&self, i: usize) -> Arc<ReplicatedQueue> {
        self.replicas.lock().unwrap()[i].clone().expect("replica running")
    }

    fn live(&self) -> Vec<usize> {
        let replicas = self.replicas.lock().unwrap();
        (0..replicas.len()).filter(|i| replicas[*i].is_some()).collect()
    }

    /// Waits for a leader among the running replicas other than `not`
    /// (the one with the highest term, if an old one still believes).
    async fn leader(&self, not: Option<usize>) -> usize {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(i) = leader_of(&self.replicas, not) {
                return i;
            }
            assert!(Instant::now() < deadline, "no leader elected");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn close_all(&self) {
        for i in self.live() {
            self.get(i).close().await;
        }
    }
}

fn leader_of(replicas: &Replicas, not: Option<usize>) -> Option<usize> {
    let replicas = replicas.lock().unwrap();
    replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != not)
        .filter_map(|(i, r)| r.as_ref().filter(|r| r.is_leader()).map(|r| (r.term(), i)))
        .max()
        .map(|(_, i)| i)
}

async fn open_store(dir: &Path) -> Store {
    // The previous `Store` of this directory may still be shutting down.
    let deadline = Instant::now() + WAIT;
    loop {
        match Store::open(dir, StoreOptions { sync: false, ..StoreOptions::default() }) {
            Ok(store) => return store,
            Err(e) => {
                assert!(Instant::now() < deadline, "store did not reopen: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until every running replica has applied the same state.
async fn converged(c: &Cluster) -> (u32, u32) {
    let mut last = Vec::new();
    eventually("replicas converge", || {
        last = c
            .live()
            .into_iter()
            .map(|i| (c.get(i).counts_now(), c.get(i).unacked_count(), c.get(i).applied_index()))
            .collect();
        last.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    last[0].0
}

/// What a publisher saw.
#[derive(Default)]
struct Published {
    confirmed: BTreeSet<u64>,
    confirm_times: Vec<Instant>,
    retries: usize,
}

impl Published {
    fn longest_gap(&self) -> Duration {
        let mut times = self.confirm_times.clone();
        times.sort();
        times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or_default()
    }
}

/// Publishes ids `0..total` with up to `window` in flight, each to the
/// current leader; a publish that fails (not leader, leader gone) or is not
/// confirmed within a second is retried at the leader of the moment with
/// the same publish id.
async fn publish_stream(replicas: Replicas, total: u64, window: usize, progress: Arc<AtomicUsize>) -> Published {
    publish_range(replicas, 0, total, window, progress).await
}

/// [`publish_stream`] of ids `from..total`.
async fn publish_range(replicas: Replicas, from: u64, total: u64, window: usize, progress: Arc<AtomicUsize>) -> Published {
    let mut out = Published::default();
    let mut next = from;
    let mut retry: VecDeque<u64> = VecDeque::new();
    let mut inflight = FuturesUnordered::new();
    loop {
        while inflight.len() < window && (!retry.is_empty() || next < total) {
            let id = match retry.pop_front() {
                Some(id) => id,
                None => {
                    next += 1;
                    next - 1
                }
            };
            let attempt = leader_of(&replicas, None)
                .and_then(|i| replicas.lock().unwrap()[i].clone())
                .ok_or(Error::NotLeader { leader: None })
                .and_then(|r| r.publish_as(msg(id), pid(id)));
            match attempt {
                Ok(durable) => {
                    let durable = durable.expect("publish_as always confirms");
                    inflight.push(async move {
                        let result = tokio::time::timeout(Duration::from_secs(1), durable).await;
                        (id, matches!(result, Ok(Ok(()))))
                    });
                }
                Err(_) => {
                    retry.push_front(id);
                    out.retries += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    break;
                }
            }
        }
        if inflight.is_empty() {
            if retry.is_empty() && next >= total {
                return out;
            }
            continue;
        }
        let Some((id, ok)) = inflight.next().await else { continue };
        if ok {
            out.confirmed.insert(id);
            out.confirm_times.push(Instant::now());
            progress.fetch_add(1, Ordering::Relaxed);
        } else {
            out.retries += 1;
            retry.push_back(id);
        }
    }
}

fn holder() -> ConsumerId {
    ConsumerId { gateway: "test".into(), connection: 0, channel: 0, tag: "drain".into() }
}

/// Takes every ready message at the leader (basic.get, no ack) and
/// returns their publish ids, in order.
async fn drain(q: &ReplicatedQueue) -> Vec<u64> {
    let mut ids = Vec::new();
    while let Some((d, _)) = tokio::time::timeout(WAIT, q.get_as(holder(), true)).await.unwrap().unwrap() {
        ids.push(id_of(&d));
    }
    ids
}

/// Every confirmed id is in the queue exactly once; nothing is there twice.
fn check_exactly_once(drained: &[u64], confirmed: &BTreeSet<u64>) {
    let mut count: BTreeMap<u64, usize> = BTreeMap::new();
    for id in drained {
        *count.entry(*id).or_default() += 1;
    }
    let dups: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "duplicates: {dups:?}");
    let lost: Vec<_> = confirmed.iter().filter(|id| !count.contains_key(id)).collect();
    assert!(lost.is_empty(), "confirmed but lost: {lost:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_is_elected_and_followers_apply() {
    let started = Instant::now();
    let c = Cluster::start(3, Duration::from_secs(3)).await;
    let l = c.leader(None).await;
    println!("leader elected after {:?}", started.elapsed());
    let q = c.get(l);
    // Followers refuse and name the leader.
    let follower = c.get((l + 1) % 3);
    // A follower learns the leader from its first heartbeat.
    let deadline = Instant::now() + Duration::from_secs(5);
    while follower.leader().is_none() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    match follower.publish_as(msg(0), pid(0)) {
        Err(Error::NotLeader { leader }) => assert_eq!(leader, Some(c.ids[l])),
        other => panic!("follower accepted a publish: {:?}", other.map(|d| d.is_some())),
    }
    let t = Instant::now();
    let durables: Vec<_> = (0..200).map(|i| q.publish_as(msg(i), pid(i)).unwrap().unwrap()).collect();
    for d in durables {
        tokio::time::timeout(WAIT, d).await.unwrap().unwrap();
    }
    println!("200 confirmed publishes in {:?}", t.elapsed());
    // A retried publish (same id) is confirmed but not enqueued again.
    q.publish_as(msg(7), pid(7)).unwrap().unwrap().await.unwrap();
    assert_eq!(converged(&c).await, (200, 0));
    let ids = drain(&q).await;
    assert_eq!(ids, (0..200).collect::<Vec<_>>());
    assert_eq!(converged(&c).await, (0, 0));
    // Exclusivity is decided by the state machine.
    let (tx, _rx) = mpsc::unbounded_channel();
    q.attach(cid("x"), consumer("x", 1, &tx), Vec::new()).await.unwrap();
    let exclusive = Consumer::new(
        "y".into(),
        false,
        true,
        Credit::new(1),
        Arc::new(ChannelFlow::default()),
        Arc::new(Sink(tx.clone())),
    );
    assert!(matches!(q.attach(cid("y"), exclusive, Vec::new()).await, Err(Error::ExclusiveConsumer)));
    assert_eq!(converged(&c).await, (0, 1));
    c.close_all().await;
}

async fn failover_under_publishes(kill: bool) {
    let c = Cluster::start(3, Duration::from_secs(3)).await;
    let l = c.leader(None).await;
    let progress = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_stream(c.replicas.clone(), 1500, 16, progress.clone()));
    eventually("publishes flowing", || progress.load(Ordering::Relaxed) >= 300).await;
    let cut_at = Instant::now();
    if kill {
        c.kill(l).await;
    } else {
        c.isolate(l, true);
    }
    let new = c.leader(Some(l)).await;
    let elected = cut_at.elapsed();
    let before = progress.load(Ordering::Relaxed);
    eventually("publishes at the new leader", || progress.load(Ordering::Relaxed) >= before + 200).await;
    let resumed = cut_at.elapsed();
    let published = tokio::time::timeout(Duration::from_secs(20), publisher).await.unwrap().unwrap();
    if kill {
        c.restart(l).await;
    } else {
        c.isolate(l, false);
    }
    let (ready, _) = converged(&c).await;
    let ids = drain(&c.get(c.leader(None).await)).await;
    check_exactly_once(&ids, &published.confirmed);
    assert_eq!(published.confirmed.len(), 1500);
    assert_eq!(ids.len(), ready as usize);
    let last_before = published.confirm_times.iter().filter(|t| **t <= cut_at).max().map(|t| cut_at - *t);
    let first_after = published.confirm_times.iter().filter(|t| **t > cut_at).min().map(|t| *t - cut_at);
    println!("last confirm {last_before:?} before the cut, first {first_after:?} after");
    println!(
        "{}: new leader {new} after {elected:?}, 200 more confirms {resumed:?} after the cut; \
         longest gap between two confirms {:?}; {} retries; {} messages in the queue",
        if kill { "leader killed" } else { "leader isolated" },
        published.longest_gap(),
        published.retries,
        ids.len()
    );
    c.close_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_under_publishes_loses_nothing() {
    failover_under_publishes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_under_publishes_loses_nothing() {
    failover_under_publishes(true).await;
}

struct Sink(mpsc::UnboundedSender<Delivery>);

impl DeliverySink for Sink {
    fn deliver(&self, _consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        self.0.send(delivery).is_ok()
    }
    fn cancelled(&self, _consumer: &Arc<Consumer>) {}
}

fn consumer(tag: &str, prefetch: u32, tx: &mpsc::UnboundedSender<Delivery>) -> Arc<Consumer> {
    Consumer::new(
        tag.into(),
        false,
        false,
        Credit::new(prefetch),
        Arc::new(ChannelFlow::default()),
        Arc::new(Sink(tx.clone())),
    )
}

fn cid(tag: &str) -> ConsumerId {
    ConsumerId { gateway: "g1".into(), connection: 1, channel: 1, tag: tag.into() }
}

async fn recv(rx: &mut mpsc::UnboundedReceiver<Delivery>, c: &Arc<Consumer>) -> Delivery {
    let d = tokio::time::timeout(WAIT, rx.recv()).await.expect("a delivery").expect("open channel");
    c.release_pending();
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_fail_over_to_the_new_leader() {
    let c = Cluster::start(3, Duration::from_millis(800)).await;
    let l = c.leader(None).await;
    let q = c.get(l);
    let total = 60u64;
    let durables: Vec<_> = (0..total).map(|i| q.publish_as(msg(i), pid(i)).unwrap().unwrap()).collect();
    for d in durables {
        d.await.unwrap();
    }
    // `a` takes 10, acks 4, takes 4 more: it holds 10. `b` takes 5 and
    // never comes back after the failover (its gateway is slow): after the
    // grace its messages go to `a`.
    let (tx_a, mut rx_a) = mpsc::unbounded_channel();
    let (tx_b, mut rx_b) = mpsc::unbounded_channel();
    let a = consumer("a", 10, &tx_a);
    let b = consumer("b", 5, &tx_b);
    q.attach(cid("a"), a.clone(), Vec::new()).await.unwrap();
    q.attach(cid("b"), b.clone(), Vec::new()).await.unwrap();
    // Every delivery: (seq, publish id, redelivered).
    let mut seen: Vec<(u64, u64, bool)> = Vec::new();
    let mut held: BTreeSet<u64> = BTreeSet::new();
    let mut acked: BTreeSet<u64> = BTreeSet::new();
    for _ in 0..10 {
        let d = recv(&mut rx_a, &a).await;
        seen.push((d.msg_id, id_of(&d), d.redelivered));
        held.insert(d.msg_id);
    }
    for _ in 0..5 {
        let d = recv(&mut rx_b, &b).await;
        seen.push((d.msg_id, id_of(&d), d.redelivered));
    }
    let first4: Vec<u64> = held.iter().take(4).copied().collect();
    for seq in &first4 {
        a.release_unacked();
        held.remove(seq);
        acked.insert(*seq);
    }
    q.settle_as(&cid("a"), first4, Outcome::Ack);
    q.kick();
    for _ in 0..4 {
        let d = recv(&mut rx_a, &a).await;
        seen.push((d.msg_id, id_of(&d), d.redelivered));
        held.insert(d.msg_id);
    }
    assert_eq!(held.len(), 10);
    // The acks committed before the kill (an ack still in flight may be
    // lost with the leader, and the message then comes back flagged
    // redelivered: at least once, like RabbitMQ's quorum queues; this
    // test is about what was acked for sure).
    let t0 = std::time::Instant::now();
    while q.stats_now().ready + q.stats_now().unacked != total as u32 - 4 {
        assert!(t0.elapsed() < WAIT, "the acks never applied: {:?}", q.stats_now());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The leader dies (with whatever it had in flight).
    drop(q);
    c.kill(l).await;
    let n = c.leader(Some(l)).await;
    let q = c.get(n);
    // The gateway re-attaches `a` with what it holds, charging its new
    // consumer's window with them.
    let (tx_a2, mut rx_a2) = mpsc::unbounded_channel();
    let a2 = consumer("a", 10, &tx_a2);
    for _ in &held {
        assert!(a2.try_acquire());
        a2.release_pending();
    }
    tokio::time::timeout(WAIT, q.attach(cid("a"), a2.clone(), held.iter().copied().collect())).await.unwrap().unwrap();
    // Acking what it held works at the new leader; nothing held arrives again.
    let held_now: Vec<u64> = held.iter().copied().collect();
    for seq in &held_now {
        a2.release_unacked();
        acked.insert(*seq);
    }
    q.settle_as(&cid("a"), held_now.clone(), Outcome::Ack);
    q.kick();
    let mut after: Vec<(u64, u64, bool)> = Vec::new();
    while acked.len() < total as usize {
        let d = recv(&mut rx_a2, &a2).await;
        assert!(!held_now.contains(&d.msg_id), "held seq {} delivered again", d.msg_id);
        after.push((d.msg_id, id_of(&d), d.redelivered));
        assert!(acked.insert(d.msg_id), "acked seq {} delivered again", d.msg_id);
        a2.release_unacked();
        q.settle_as(&cid("a"), vec![d.msg_id], Outcome::Ack);
        q.kick();
    }
    // Nothing is delivered twice without `redelivered`, and what `b` held
    // came back flagged.
    let mut fresh: BTreeSet<u64> = BTreeSet::new();
    for (seq, _, redelivered) in seen.iter().chain(after.iter()) {
        if !redelivered {
            assert!(fresh.insert(*seq), "seq {seq} delivered twice without redelivered");
        }
    }
    let b_seqs: BTreeSet<u64> = seen[10..15].iter().map(|s| s.0).collect();
    for (seq, _, redelivered) in &after {
        if b_seqs.contains(seq) {
            assert!(redelivered, "b's seq {seq} came back without redelivered");
        }
    }
    assert!(after.iter().filter(|s| b_seqs.contains(&s.0)).count() == 5, "b's messages went to a");
    let ids: BTreeSet<u64> = seen.iter().chain(after.iter()).map(|s| s.1).collect();
    assert_eq!(ids.len(), total as usize, "every message was delivered");
    assert!(rx_a2.try_recv().is_err());
    eventually("everything acked everywhere", || {
        c.live().into_iter().all(|i| c.get(i).unacked_count() == 0 && c.get(i).counts_now() == (0, 1))
    })
    .await;
    assert!(rx_b.try_recv().is_err());
    c.close_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replicas_catch_up() {
    let c = Cluster::start(3, Duration::from_secs(3)).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    c.kill(f).await;
    // Two of three still commit.
    let q = c.get(l);
    let durables: Vec<_> = (0..300).map(|i| q.publish_as(msg(i), pid(i)).unwrap().unwrap()).collect();
    for d in durables {
        tokio::time::timeout(WAIT, d).await.unwrap().unwrap();
    }
    let t = Instant::now();
    c.restart(f).await;
    eventually("the restarted follower catches up", || c.get(f).counts_now() == (300, 0)).await;
    println!("follower caught up with 300 entries in {:?}", t.elapsed());
    assert_eq!(converged(&c).await, (300, 0));
    // The whole cluster restarts: the log is replayed, a leader elected.
    drop(q);
    for i in 0..3 {
        c.kill(i).await;
    }
    for i in 0..3 {
        c.restart(i).await;
    }
    let l = c.leader(None).await;
    assert_eq!(converged(&c).await, (300, 0));
    assert_eq!(drain(&c.get(l)).await, (0..300).collect::<Vec<_>>());
    c.close_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_confirms_nothing() {
    let c = Cluster::start(3, Duration::from_secs(3)).await;
    let l = c.leader(None).await;
    let old = c.get(l);
    old.publish_as(msg(0), pid(0)).unwrap().unwrap().await.unwrap();
    c.isolate(l, true);
    // Publishes at the cut-off leader: refused, or accepted and never confirmed.
    let mut pending = Vec::new();
    for i in 1000..1020 {
        match old.publish_as(msg(i), pid(i)) {
            Ok(d) => pending.push(tokio::spawn(d.unwrap())),
            Err(e) => assert!(matches!(e, Error::NotLeader { .. }), "{e}"),
        }
    }
    let n = c.leader(Some(l)).await;
    let new = c.get(n);
    for i in 1..50 {
        new.publish_as(msg(i), pid(i)).unwrap().unwrap().await.unwrap();
    }
    eventually("the old leader steps down", || !old.is_leader()).await;
    for p in pending {
        let result = tokio::time::timeout(WAIT, p).await.expect("resolved once deposed").unwrap();
        assert!(matches!(result, Err(Error::NotLeader { .. })), "{result:?}");
    }
    assert!(matches!(old.publish_as(msg(2000), pid(2000)), Err(Error::NotLeader { .. })));
    c.isolate(l, false);
    assert_eq!(converged(&c).await, (50, 0));
    let ids = drain(&c.get(c.leader(None).await)).await;
    assert_eq!(ids, (0..50).collect::<Vec<_>>(), "nothing of the cut-off leader's");
    c.close_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_removes_every_replica() {
    let c = Cluster::start(3, Duration::from_secs(3)).await;
    let l = c.leader(None).await;
    let q = c.get(l);
    for i in 0..20 {
        q.publish_as(msg(i), pid(i)).unwrap().unwrap().await.unwrap();
    }
    assert_eq!(tokio::time::timeout(WAIT, q.delete()).await.unwrap().unwrap(), 20);
    assert!(matches!(q.publish_as(msg(99), pid(99)), Err(Error::QueueDeleted | Error::NotLeader { .. })));
    eventually("every replica deleted", || (0..3).all(|i| c.get(i).is_deleted())).await;
    drop(q);
    for i in 0..3 {
        c.kill(i).await;
    }
    for dir in &c.dirs {
        let store = open_store(dir.path()).await;
        assert!(!FjallLogStore::exists(&store, QUEUE).unwrap(), "log removed");
        store.close().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattach_requeues_what_never_reached_the_client() {
    let c = Cluster::start(3, Duration::from_secs(3)).await;
    let q = c.get(c.leader(None).await);
    for i in 0..8 {
        q.publish_as(msg(i), pid(i)).unwrap().unwrap().await.unwrap();
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let a = consumer("a", 5, &tx);
    q.attach(cid("a"), a.clone(), Vec::new()).await.unwrap();
    let mut first = Vec::new();
    for _ in 0..5 {
        first.push(recv(&mut rx, &a).await.msg_id);
    }
    assert_eq!(q.unacked_count(), 5);
    // Only three reached the client (say the connection dropped the rest):
    // the other two come back, flagged, to the re-attached consumer.
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    let a2 = consumer("a", 5, &tx2);
    for _ in 0..3 {
        assert!(a2.try_acquire());
        a2.release_pending();
    }
    q.attach(cid("a"), a2.clone(), first[..3].to_vec()).await.unwrap();
    let mut again = Vec::new();
    for _ in 0..2 {
        let d = recv(&mut rx2, &a2).await;
        assert!(d.redelivered, "seq {} came back unflagged", d.msg_id);
        again.push(d.msg_id);
    }
    assert_eq!(again, first[3..].to_vec());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(rx2.try_recv().is_err(), "credit respected: 3 held + 2 redelivered");
    assert!(rx.try_recv().is_err(), "nothing to the old handle");
    c.close_all().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_behind_the_compaction_catches_up_by_snapshot_and_serves_everything() {
    let mut c = Cluster::start(3, Duration::from_millis(300)).await;
    let l = c.leader(None).await;
    let f = (l + 1) % 3;
    let g = (l + 2) % 3;
    let f_last = c.get(f).stats().last_index;
    c.kill(f).await;
    // 600 confirmed publishes, then the first 400 consumed: the oldest live
    // message is far beyond everything `f` has, so the others compact past it.
    let published = publish_stream(c.replicas.clone(), 600, 32, Arc::new(AtomicUsize::new(0))).await;
    assert_eq!(published.confirmed.len(), 600);
    let l = c.leader(None).await;
    let q = c.get(l);
    for i in 0..400u64 {
        let (d, _) = tokio::time::timeout(WAIT, q.get_as(holder(), true)).await.unwrap().unwrap().unwrap();
        assert_eq!(id_of(&d), i);
    }
    drop(q);
    eventually("the running replicas compacted past the stopped one", || {
        [l, g].iter().all(|i| c.get(*i).stats().first_index > f_last + 1)
    })
    .await;
    let compacted = c.get(l).stats();
    c.restart(f).await;
    eventually("the stopped replica catches up", || c.get(f).counts_now() == (200, 0)).await;
    assert_eq!(converged(&c).await, (200, 0));
    let fs = c.get(f).stats();
    println!("leader {compacted:?}; follower after catching up {fs:?}");
    assert!(fs.first_index > f_last + 1, "the follower did not get a snapshot: {fs:?}");
    // Only `f` keeps the data: the others go, one comes back with an
    // empty disk (so it votes for `f`, which then leads and serves).
    let other = (f + 1) % 3;
    for i in 0..3 {
        if i != f {
            c.kill(i).await;
        }
    }
    c.dirs[other] = tempfile::tempdir().unwrap();
    c.restart(other).await;
    let leader = c.leader(None).await;
    assert_eq!(leader, f, "only the caught-up replica has the log");
    let q = c.get(f);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let cons = consumer("after-snapshot", 50, &tx);
    tokio::time::timeout(WAIT, q.attach(cid("after-snapshot"), cons.clone(), Vec::new())).await.unwrap().unwrap();
    let mut got = Vec::new();
    while got.len() < 200 {
        let d = recv(&mut rx, &cons).await;
        cons.release_unacked();
        q.settle_as(&cid("after-snapshot"), vec![d.msg_id], Outcome::Ack);
        q.kick();
        got.push(id_of(&d));
    }
    assert_eq!(got, (400..600).collect::<Vec<_>>());
    eventually("acks applied", || q.unacked_count() == 0).await;
    drop(q);
    assert_eq!(converged(&c).await, (0, 1));
    c.close_all().await;
}

/// Reconfiguration under publishes: a fourth replica joins (empty log),
/// catches up by snapshot (the log is compacted and pinned by old live
/// messages), is promoted while the leader is removed (it hands leadership
/// over first); the removed replica stops; nothing confirmed is lost, and
/// the log keeps compacting after the configuration changes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_change_under_publishes_and_compaction_goes_on() {
    let mut c = Cluster::start(3, Duration::from_millis(300)).await;
    let first = publish_stream(c.replicas.clone(), 300, 32, Arc::new(AtomicUsize::new(0))).await;
    assert_eq!(first.confirmed.len(), 300);
    let l = c.leader(None).await;
    // The first 100 consumed: the oldest live message pins the log.
    for i in 0..100u64 {
        let (d, _) = tokio::time::timeout(WAIT, c.get(l).get_as(holder(), true)).await.unwrap().unwrap().unwrap();
        assert_eq!(id_of(&d), i);
    }
    let n4 = c.add_joiner().await;
    let target: Vec<u64> = {
        let mut t: Vec<u64> = (0..3).filter(|i| *i != l).map(|i| c.ids[i]).chain([c.ids[n4]]).collect();
        t.sort();
        t
    };
    // Publishing goes on during the change.
    let replicas = c.replicas.clone();
    let more = tokio::spawn(async move { publish_range(replicas, 1000, 1700, 16, Arc::new(AtomicUsize::new(0))).await });
    let started = Instant::now();
    // The leader is not in the target: it promotes n4, then hands over.
    let err = tokio::time::timeout(Duration::from_secs(30), c.get(l).change_voters(target.clone())).await.unwrap();
    assert!(matches!(err, Err(Error::NotLeader { .. })), "{err:?}");
    let l2 = c.leader(Some(l)).await;
    assert_ne!(l2, l);
    tokio::time::timeout(Duration::from_secs(30), c.get(l2).change_voters(target.clone())).await.unwrap().unwrap();
    println!("voters changed in {:?}", started.elapsed());
    assert_eq!(c.get(l2).voters(), (target.clone(), Vec::new()));
    // Idempotent.
    tokio::time::timeout(WAIT, c.get(l2).change_voters(target.clone())).await.unwrap().unwrap();
    eventually("the old leader applied its removal", || c.get(l).is_removed()).await;
    assert!(!c.get(l).is_deleted());
    let more = more.await.unwrap();
    assert_eq!(more.confirmed.len(), 700);
    let members: Vec<usize> = (0..4).filter(|i| *i != l).collect();
    eventually("members converge", || {
        let states: Vec<_> = members.iter().map(|i| (c.get(*i).counts_now(), c.get(*i).applied_index())).collect();
        states.windows(2).all(|w| w[0] == w[1])
    })
    .await;
    assert!(c.get(n4).stats().first_index > 2, "n4 caught up by snapshot: {:?}", c.get(n4).stats());
    let changed_at = c.get(l2).stats().last_index;
    let l2 = c.leader(Some(l)).await;
    let drained = drain(&c.get(l2)).await;
    let mut confirmed: BTreeSet<u64> = first.confirmed.into_iter().filter(|i| *i >= 100).collect();
    confirmed.extend(more.confirmed.iter().copied());
    check_exactly_once(&drained, &confirmed);
    assert_eq!(drained.len(), 900);
    // Compaction goes on across the configuration changes.
    let p = publish_range(c.replicas.clone(), 2000, 2400, 8, Arc::new(AtomicUsize::new(0))).await;
    assert_eq!(p.confirmed.len(), 400);
    assert_eq!(drain(&c.get(l2)).await.len(), 400);
    let _ = publish_range(c.replicas.clone(), 3000, 3010, 1, Arc::new(AtomicUsize::new(0))).await;
    eventually("compaction passed the configuration changes", || {
        members.iter().all(|i| c.get(*i).stats().first_index > changed_at)
    })
    .await;
    // A replica restarted after the changes resumes with the new voters.
    let f = members.iter().copied().find(|i| *i != l2).unwrap();
    c.kill(f).await;
    c.restart(f).await;
    eventually("the restarted replica has the new voters", || c.get(f).voters() == (target.clone(), Vec::new())).await;
    for i in &members {
        c.get(*i).close().await;
    }
}
