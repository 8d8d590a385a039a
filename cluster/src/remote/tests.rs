//! Attach epochs against a real node over loopback: the node stamps its
//! deliveries with the epoch of the attach they are made under, and a
//! gateway's queue handle drops a delivery of an attach it has replaced.

use std::time::{Duration, Instant};

use sluice_codecs::command::Arguments;

use super::*;
use crate::meta::replica::MetaCommand;
use crate::meta::{Command, Owner};
use crate::node::{MembershipOptions, Node, NodeOptions};
use crate::replica::queue_sm::ConsumerId;

const QUEUE: u64 = 100;

fn secret() -> Secret {
    Secret::new(vec![42; 32]).unwrap()
}

fn message(body: &'static str) -> Message {
    Message {
        exchange: String::new(),
        routing_key: "q".into(),
        properties: Box::default(),
        body: Bytes::from_static(body.as_bytes()),
    }
}

/// A node of its own cluster with queue `q` (id [`QUEUE`]) declared.
async fn node_with_queue(dir: &std::path::Path) -> Node {
    let node = Node::start(NodeOptions {
        id: "n1".into(),
        data_dir: dir.join("n1"),
        listen: "127.0.0.1:0".into(),
        advertise: None,
        seeds: Vec::new(),
        secret: secret(),
        membership: MembershipOptions::default(),
        alarms: Default::default(),
    })
    .await
    .unwrap();
    let (client, _incoming) =
        rpc::connect::<NodeRequest, NodeResponse>(&node.addr.to_string(), &secret(), PeerInfo::gateway("setup"))
            .await
            .unwrap();
    let declare = [
        Command::AddVhost { name: "/".into() },
        Command::DeclareQueue {
            vhost: "/".into(),
            name: "q".into(),
            generated: false,
            passive: false,
            durable: true,
            conn: Owner(1),
            exclusive: false,
            auto_delete: false,
            arguments: Arguments::default(),
            new_ids: vec![QUEUE],
        },
    ];
    for cmd in declare {
        // The node founds the metadata group first.
        let t0 = Instant::now();
        loop {
            let cmd = MetaCommand::Topology(cmd.clone());
            match client.call(NodeRequest::Meta { cmd }).await.unwrap() {
                NodeResponse::MetaDone { .. } => break,
                other => assert!(t0.elapsed() < Duration::from_secs(20), "declare not done: {other:?}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    client.close();
    node
}

fn consumer_id(tag: &str) -> ConsumerId {
    ConsumerId { gateway: "gw-raw".into(), connection: 1, channel: 1, tag: tag.into() }
}

/// The next `Deliver` pushed on `incoming` within `wait` (skipping
/// confirms).
async fn next_delivery(incoming: &mut rpc::Incoming<NodeRequest, NodeResponse>, wait: Duration) -> Option<NodeRequest> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(Inbound::Message(msg @ NodeRequest::Deliver { .. }))) => return Some(msg),
            Ok(Some(_)) => {}
            Ok(None) => panic!("the link closed"),
            Err(_) => return None,
        }
    }
}

/// (ready, unacked) of the queue, as its leader applied them.
async fn stats(client: &Client) -> (u32, u32) {
    match client.call(NodeRequest::Stats { queue: QUEUE }).await.unwrap() {
        NodeResponse::Stats(s) => (s.ready, s.unacked),
        other => panic!("unexpected answer to Stats: {other:?}"),
    }
}

const WAIT: Duration = Duration::from_secs(10);

fn attach(epoch: u64, held: Vec<u64>) -> NodeRequest {
    NodeRequest::Attach { queue: QUEUE, consumer: consumer_id("c"), epoch, no_ack: false, exclusive: false, prefetch: 10, held }
}

/// The node side: a re-attach's epoch is on the deliveries made under it,
/// and a delivery of the earlier attach that is not in the new held list
/// (what a gateway drops as stale) comes back under the new epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reattach_stamps_its_epoch_and_requeues_what_its_held_list_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_queue(dir.path()).await;
    let (client, mut incoming) =
        rpc::connect::<NodeRequest, NodeResponse>(&node.addr.to_string(), &secret(), PeerInfo::gateway("gw-raw"))
            .await
            .unwrap();
    let t0 = Instant::now();
    // The queue's replica opens and elects itself after the declare.
    while client.call(attach(7, Vec::new())).await.unwrap() != NodeResponse::Queue(QueueResult::Ok) {
        assert!(t0.elapsed() < Duration::from_secs(20), "the queue never led");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = record::encode(&message("one"));
    client
        .send(NodeRequest::Publish { queue: QUEUE, publisher: "p".into(), id: 1, message: ByteBuf::from(record.to_vec()) })
        .await
        .unwrap();
    let Some(NodeRequest::Deliver { epoch, seq, redelivered, .. }) = next_delivery(&mut incoming, WAIT).await else {
        panic!("no delivery")
    };
    assert_eq!((epoch, redelivered), (7, false));

    // Re-attached without it: the node gives it back under epoch 8.
    assert_eq!(client.call(attach(8, Vec::new())).await.unwrap(), NodeResponse::Queue(QueueResult::Ok));
    let Some(NodeRequest::Deliver { epoch, seq: again, redelivered, .. }) = next_delivery(&mut incoming, WAIT).await else {
        panic!("not delivered again")
    };
    assert_eq!((epoch, again, redelivered), (8, seq, true));

    // Re-attached with it held: it stays with the consumer.
    assert_eq!(client.call(attach(9, vec![seq])).await.unwrap(), NodeResponse::Queue(QueueResult::Ok));
    assert_eq!(next_delivery(&mut incoming, Duration::from_millis(300)).await, None);
    assert_eq!(stats(&client).await, (0, 1));
    let ack = NodeRequest::Settle { queue: QUEUE, consumer: consumer_id("c"), seqs: vec![seq], outcome: WireOutcome::Ack };
    client.send(ack).await.unwrap();
    let t0 = Instant::now();
    while stats(&client).await != (0, 0) {
        assert!(t0.elapsed() < WAIT, "the acked message is still in the queue");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    client.close();
    node.stop().await.unwrap();
}

/// A gateway's backend on `node`, with queue `q` open: the backend, the
/// queue as sessions see it and the handle behind it.
fn gateway_on(node: &Node) -> (Arc<RemoteBackend>, Arc<dyn Queue>, Arc<RemoteQueue>) {
    let backend = RemoteBackend::new(RemoteOptions::new("gw-test/1".into(), vec![node.addr.to_string()], secret()));
    let spec = QueueSpec { id: QueueId(QUEUE), vhost: "/".into(), name: "q".into(), durable: true, arguments: Arguments::default() };
    let queue = backend.open_queue(spec).unwrap();
    let handle = backend.cluster.queue(QUEUE).unwrap();
    (backend, queue, handle)
}

/// Records what reaches the session.
#[derive(Default)]
struct Recorder {
    seqs: Mutex<Vec<u64>>,
}

impl crate::backend::DeliverySink for Recorder {
    fn deliver(&self, _consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        lock(&self.seqs).push(delivery.msg_id);
        true
    }

    fn cancelled(&self, _consumer: &Arc<Consumer>) {}
}

async fn wait_until(what: &str, pred: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !pred() {
        assert!(t0.elapsed() < Duration::from_secs(20), "not within 20 s: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The gateway side, the race of docs/cluster.md's known problem: the
/// handle drops its leader while the link stays open and re-attaches on
/// it; a delivery the node made under the earlier attach that arrives
/// after that is neither taken nor held (the node requeues it), while
/// deliveries of the new attach are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_of_a_replaced_attach_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_queue(dir.path()).await;
    let (backend, queue, handle) = gateway_on(&node);
    let sink = Arc::new(Recorder::default());
    let consumer = Consumer::new(
        "c".into(),
        false,
        false,
        crate::backend::Credit::new(10),
        Arc::new(crate::backend::ChannelFlow::default()),
        sink.clone(),
    );
    queue.consume(consumer.clone()).await.unwrap();
    let id = handle.lock().consumers.keys().next().cloned().unwrap();
    let epoch_of = |h: &RemoteQueue| h.lock().consumers.get(&id).map(|a| a.epoch);

    queue.publish(message("one")).unwrap().unwrap().await.unwrap();
    wait_until("the first delivery", || lock(&sink.seqs).len() == 1).await;
    let first = lock(&sink.seqs)[0];
    let before = epoch_of(&handle).unwrap();

    // The handle drops its leader (as after a call that timed out) and
    // finds it again on the same link: a new epoch, the first message held.
    let link = handle.leader.borrow().clone().unwrap();
    handle.out.send(Out::LeaderLost(Some(link.clone()), None)).unwrap();
    wait_until("the re-attach", || epoch_of(&handle) > Some(before)).await;
    wait_until("the leader found again", || handle.leader.borrow().as_ref().is_some_and(|l| same(l, &link))).await;

    // A delivery the node pushed under the replaced attach, arriving now.
    let stale = first + 1000;
    let record = ByteBuf::from(record::encode(&message("stale")).to_vec());
    handle.on_deliver(&link, id.clone(), before, stale, (false, 0, 0), record);
    assert_eq!(*lock(&sink.seqs), vec![first], "a delivery of a replaced attach reached the session");
    assert!(!handle.lock().held.contains_key(&stale), "a delivery of a replaced attach is held");

    // The new attach delivers, and the first message is still held by the
    // consumer (it was in the held list), not redelivered.
    queue.publish(message("two")).unwrap().unwrap().await.unwrap();
    wait_until("the second delivery", || lock(&sink.seqs).len() == 2).await;
    let seqs = lock(&sink.seqs).clone();
    assert_eq!(seqs[0], first);
    assert_ne!(seqs[1], first, "the held message was delivered again");
    queue.settle(&seqs, crate::Outcome::Ack);
    let t0 = Instant::now();
    loop {
        let s = queue.stats().await.unwrap();
        if (s.ready, s.unacked) == (0, 0) {
            break;
        }
        assert!(t0.elapsed() < WAIT, "acked messages still in the queue: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(lock(&sink.seqs).len(), 2, "a message was delivered again");
    backend.shutdown().unwrap();
    node.stop().await.unwrap();
}

/// A delivery that arrives on a link the handle does not take deliveries
/// from (a deposed leader's, or one pushed before a failover was noticed)
/// is dropped, for no-ack consumers too: the leader holds every delivery
/// until the handle acks it, and requeues those the next attach lacks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_from_another_link_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_queue(dir.path()).await;
    let (backend, queue, handle) = gateway_on(&node);
    let consumer = |tag: &str, no_ack: bool, sink: Arc<Recorder>| {
        Consumer::new(
            tag.into(),
            no_ack,
            false,
            crate::backend::Credit::new(10),
            Arc::new(crate::backend::ChannelFlow::default()),
            sink,
        )
    };
    let (auto_sink, acks_sink) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
    queue.consume(consumer("auto", true, auto_sink.clone())).await.unwrap();
    queue.consume(consumer("acks", false, acks_sink.clone())).await.unwrap();
    let id_of = |tag: &str| handle.lock().consumers.keys().find(|c| c.tag == tag).cloned().unwrap();
    let (auto, acks) = (id_of("auto"), id_of("acks"));
    let leader = handle.leader.borrow().clone().unwrap();
    let (other, _incoming) =
        rpc::connect::<NodeRequest, NodeResponse>(&node.addr.to_string(), &secret(), PeerInfo::gateway("other"))
            .await
            .unwrap();
    assert!(!same(&other, &leader));
    let record = || ByteBuf::from(record::encode(&message("elsewhere")).to_vec());
    handle.on_deliver(&other, auto.clone(), 1, 5000, (false, 0, 0), record());
    handle.on_deliver(&other, acks.clone(), 1, 5001, (false, 0, 0), record());
    assert!(lock(&auto_sink.seqs).is_empty(), "a no-ack delivery from a link that does not lead was taken");
    assert!(lock(&acks_sink.seqs).is_empty(), "a delivery with acks from a link that does not lead was taken");
    assert!(!handle.lock().held.contains_key(&5001));
    other.close();
    backend.shutdown().unwrap();
    node.stop().await.unwrap();
}

/// `NotLeader` answers to publishes sent before the handle last found its
/// leader are old news: they start no resync (CI once saw thousands of
/// them, each starting a resync that re-sent every publish in flight and
/// re-attached the consumers, so deliveries stalled). An answer to a
/// publish sent since does start one, and the publish goes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_leader_answers_to_publishes_of_an_earlier_leader_start_no_resync() {
    const N: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_queue(dir.path()).await;
    let (backend, queue, handle) = gateway_on(&node);
    queue.publish(message("first")).unwrap().unwrap().await.unwrap();
    let link = handle.leader.borrow().clone().unwrap();
    let generation = || handle.lock().generation;
    let found = generation();
    assert!(found >= 1);

    // Publishes the handle sent to an earlier leader (generation found - 1)
    // and that are in flight still, then their NotLeader answers, late.
    let record = record::encode(&message("late"));
    let ids: Vec<u64> = {
        let mut st = handle.lock();
        (0..N)
            .map(|_| {
                let id = st.next_id;
                st.next_id += 1;
                backend.cluster.inflight_bytes.fetch_add(record.len() as u64, Ordering::AcqRel);
                st.inflight.insert(id, InFlight { record: record.clone(), done: None, sent_in: found - 1 });
                id
            })
            .collect()
    };
    for &id in &ids {
        handle.on_confirm(&link, &handle.publisher, id, QueueResult::NotLeader { leader: None });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(generation(), found, "old NotLeader answers made the handle look for its leader again");
    assert!(handle.leader.borrow().as_ref().is_some_and(|l| same(l, &link)));

    // One answer to a publish sent in the current generation: one resync,
    // which sends every publish in flight again; the node takes them all.
    handle.lock().inflight.get_mut(&ids[0]).unwrap().sent_in = found;
    handle.on_confirm(&link, &handle.publisher, ids[0], QueueResult::NotLeader { leader: None });
    wait_until("the resync", || generation() > found).await;
    wait_until("every publish in flight confirmed", || handle.lock().inflight.is_empty()).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(generation(), found + 1, "more than one resync");
    let s = queue.stats().await.unwrap();
    assert_eq!(s.ready, 1 + N as u32, "the publishes sent again were not all enqueued once");
    backend.shutdown().unwrap();
    node.stop().await.unwrap();
}

/// Records the bodies that reach the session, and gives back their
/// pending slots as a connection's writer does.
#[derive(Default)]
struct BodyRecorder {
    bodies: Mutex<Vec<Bytes>>,
}

impl crate::backend::DeliverySink for BodyRecorder {
    fn deliver(&self, consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        lock(&self.bodies).push(delivery.message.body);
        consumer.release_pending();
        true
    }

    fn cancelled(&self, _consumer: &Arc<Consumer>) {}
}

/// A no-ack consumer's deliveries still on their way when its link closes
/// (pushed by the node after the close) are not lost: the leader held
/// them (the handle acks each one as it reaches the session), and the
/// re-attach's held list lacks them, so they come back. The ones acked
/// just before the close are not delivered twice: each attach lists them
/// as held, and their acks are sent again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_no_ack_consumer_loses_nothing_when_its_link_closes() {
    const N: usize = 2000;
    let dir = tempfile::tempdir().unwrap();
    let node = node_with_queue(dir.path()).await;
    let (backend, queue, handle) = gateway_on(&node);
    let mut confirms = Vec::new();
    for i in 0..N {
        let m = Message { body: Bytes::from(format!("m{i}")), ..message("") };
        confirms.push(queue.publish(m).unwrap().unwrap());
    }
    for c in confirms {
        c.await.unwrap();
    }
    let sink = Arc::new(BodyRecorder::default());
    let consumer = Consumer::new(
        "auto".into(),
        true,
        false,
        crate::backend::Credit::new(0),
        Arc::new(crate::backend::ChannelFlow::default()),
        sink.clone(),
    );
    queue.consume(consumer).await.unwrap();
    // The node is checking out and pushing the first deliveries now.
    let link = handle.leader.borrow().clone().unwrap();
    link.close();
    wait_until("every message", || lock(&sink.bodies).len() >= N).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut got: Vec<Bytes> = lock(&sink.bodies).clone();
    let delivered = got.len();
    got.sort();
    got.dedup();
    assert_eq!(got.len(), N, "messages lost");
    assert_eq!(delivered, N, "messages delivered twice");
    let t0 = Instant::now();
    loop {
        let s = queue.stats().await.unwrap();
        if (s.ready, s.unacked) == (0, 0) {
            break;
        }
        assert!(t0.elapsed() < WAIT, "delivered no-ack messages still in the queue: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    backend.shutdown().unwrap();
    node.stop().await.unwrap();
}

/// The ordering inside the handle: an attach takes its epoch and held
/// list at once, so a delivery is either held before it (and in the list)
/// or of an older epoch (and dropped), for no-ack consumers too, whose
/// acked deliveries stay listed as held (their acks are sent again).
#[test]
fn an_attach_takes_its_epoch_and_held_list_together() {
    let consumer = |no_ack| {
        Consumer::new(
            "c".into(),
            no_ack,
            false,
            crate::backend::Credit::new(0),
            Arc::new(crate::backend::ChannelFlow::default()),
            Arc::new(Recorder::default()),
        )
    };
    let (acks, auto) = (consumer_id("acks"), consumer_id("auto"));
    let mut st = QState::default();
    st.consumers.insert(acks.clone(), Attached::new(consumer(false)));
    st.consumers.insert(auto.clone(), Attached::new(consumer(true)));
    let epoch_and_held = |req: Option<NodeRequest>| match req {
        Some(NodeRequest::Attach { epoch, held, .. }) => (epoch, held),
        other => panic!("not an attach: {other:?}"),
    };
    assert_eq!(epoch_and_held(st.attach_request(QUEUE, &acks)), (1, vec![]));
    assert!(matches!(st.accept(&acks, 1, 10), Accept::Take(_)));
    assert!(matches!(st.accept(&acks, 1, 11), Accept::Take(_)));
    // Re-attached: both held, epoch 2.
    assert_eq!(epoch_and_held(st.attach_request(QUEUE, &acks)), (2, vec![10, 11]));
    // Epoch 1's next delivery, still in flight: dropped, not held.
    assert!(matches!(st.accept(&acks, 1, 12), Accept::Stale));
    assert!(!st.held.contains_key(&12));
    assert!(matches!(st.accept(&acks, 2, 12), Accept::Take(_)));
    assert_eq!(st.held.get(&12), Some(&acks));
    // No-ack: the same epochs; what the handle acked stays listed.
    assert_eq!(epoch_and_held(st.attach_request(QUEUE, &auto)), (1, vec![]));
    assert!(matches!(st.accept(&auto, 0, 13), Accept::Stale));
    assert!(matches!(st.accept(&auto, 1, 13), Accept::Take(_)));
    assert_eq!(st.held.get(&13), Some(&auto));
    st.held.remove(&13);
    st.consumers.get_mut(&auto).unwrap().acked(13);
    assert_eq!(epoch_and_held(st.attach_request(QUEUE, &auto)), (2, vec![13]));
    // Unknown consumer: given back.
    assert!(matches!(st.accept(&consumer_id("gone"), 1, 14), Accept::Unknown));
    assert!(st.attach_request(QUEUE, &consumer_id("gone")).is_none());
}
