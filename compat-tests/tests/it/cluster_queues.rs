//! The storage cluster end to end, with real processes on 127.0.0.1: three
//! `sluice node`s and two `sluice gateway`s, driven with lapin.
//!
//! - a queue declared through one gateway is used through the other;
//! - kill -9 of the node leading a queue under confirmed publishing and a
//!   consumer acking: every confirmed message is delivered, service resumes
//!   (the longest pause between two confirms is printed), and the killed
//!   node catches up after its restart;
//! - dead letters between queues led by different nodes, exactly once,
//!   also across a kill -9 of the source's leader; deduplication of a
//!   message id published through two gateways.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_compat_tests::{ctl_status, start_gateway, start_node, GatewayProcess, NodeProcess};

/// The value of `key: ...` in `sluice ctl status` output.
fn status_field(home: &Path, addr: &str, key: &str) -> Option<Vec<String>> {
    let text = ctl_status(home, addr)?;
    let line = text.lines().find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_owned))?;
    Some(line.split(", ").filter(|s| !s.is_empty()).map(str::to_owned).collect())
}

/// Three nodes (n1 founds the cluster, n2 and n3 join through it), once
/// every node lists all three as members.
pub(crate) fn three_nodes(home: &Path) -> Vec<NodeProcess> {
    let n1 = start_node(home, "n1", "n1", "127.0.0.1:0", &[]);
    let seed = n1.addr.clone();
    let n2 = start_node(home, "n2", "n2", "127.0.0.1:0", &["--seeds", &seed]);
    let n3 = start_node(home, "n3", "n3", "127.0.0.1:0", &["--seeds", &seed]);
    let nodes = vec![n1, n2, n3];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = nodes.iter().all(|n| status_field(home, &n.addr, "cluster members").is_some_and(|m| m.len() == 3));
        if all {
            return nodes;
        }
        assert!(Instant::now() < deadline, "the three nodes did not form a cluster");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn open(gw: &GatewayProcess) -> (Connection, Channel) {
    let conn = Connection::connect(&gw.url(), ConnectionProperties::default()).await.expect("connect to gateway");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions { durable: true, ..Default::default() }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_through_one_gateway_use_through_the_other() {
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let g1 = start_gateway(home.path(), &addrs[..1], &[]);
    let g2 = start_gateway(home.path(), &addrs[1..2], &[]);
    let (_c1, ch1) = open(&g1).await;
    let (_c2, ch2) = open(&g2).await;

    ch1.queue_declare("orders".into(), durable(), FieldTable::default()).await.unwrap();
    ch1.exchange_declare("ex".into(), lapin::ExchangeKind::Direct, ExchangeDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    ch1.queue_bind("orders".into(), "ex".into(), "new".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    // Visible at once through the other gateway: a passive declare.
    let ok = ch2
        .queue_declare("orders".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(ok.message_count(), 0);
    // A different definition through the other gateway is refused (406),
    // as RabbitMQ refuses it: both gateways see one metadata.
    let (_c3, ch3) = open(&g2).await;
    let err = ch3.queue_declare("orders".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");

    ch2.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..50u32 {
        let c = ch2.basic_publish("ex".into(), "new".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    let ok = ch1
        .queue_declare("orders".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(ok.message_count(), 50);

    ch1.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch1.basic_consume("orders".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    for i in 0..50u32 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("delivery").unwrap().unwrap();
        assert_eq!(d.data, i.to_be_bytes(), "in order");
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    // basic.get and purge through the other gateway.
    for i in 0..5u32 {
        let c = ch2.basic_publish("".into(), "orders2".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack(), "unroutable publishes are confirmed too");
    }
    ch2.queue_declare("q2".into(), durable(), FieldTable::default()).await.unwrap();
    for i in 0..5u32 {
        let c = ch2.basic_publish("".into(), "q2".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    let got = ch1.basic_get("q2".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("a message");
    assert_eq!(got.delivery.data, 0u32.to_be_bytes());
    assert_eq!(got.message_count, 4);
    assert_eq!(ch2.queue_purge("q2".into(), QueuePurgeOptions::default()).await.unwrap(), 4);
    assert_eq!(ch1.queue_delete("q2".into(), QueueDeleteOptions::default()).await.unwrap(), 0);
    let err = ch2
        .queue_declare("q2".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("NOT_FOUND"), "{err}");
    drop(nodes);
}

/// Publishes `total` numbered persistent messages with confirms, one at a
/// time, retrying a nacked or failed one on a new connection; returns the
/// confirmed numbers and the longest pause between two confirms.
async fn publish_confirmed(gw: String, queue: &'static str, total: u32, started: tokio::sync::watch::Sender<u32>) -> (BTreeSet<u32>, Duration) {
    publish_confirmed_from(gw, queue, 0, total, started).await
}

/// [`publish_confirmed`] of the numbers `from..total`.
async fn publish_confirmed_from(
    gw: String,
    queue: &'static str,
    from: u32,
    total: u32,
    started: tokio::sync::watch::Sender<u32>,
) -> (BTreeSet<u32>, Duration) {
    let mut confirmed = BTreeSet::new();
    let mut longest = Duration::ZERO;
    let mut last = Instant::now();
    let mut i = from;
    while i < total {
        let Ok(conn) = Connection::connect(&gw, ConnectionProperties::default()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else { continue };
        if ch.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
            continue;
        }
        while i < total {
            let sent = ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await;
            let Ok(confirm) = sent else { break };
            match confirm.await {
                Ok(c) if c.is_ack() => {
                    confirmed.insert(i);
                    let now = Instant::now();
                    longest = longest.max(now - last);
                    last = now;
                    i += 1;
                    started.send_replace(i);
                }
                Ok(_) => {} // nacked: publish it again
                Err(_) => break,
            }
        }
    }
    (confirmed, longest)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_the_leader_under_confirmed_load_loses_nothing() {
    let home = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(home.path());
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let g1 = start_gateway(home.path(), &all, &[]);
    let g2 = start_gateway(home.path(), &all, &[]);
    let (_c, ch) = open(&g1).await;
    ch.queue_declare("work".into(), durable(), FieldTable::default()).await.unwrap();

    // A consumer through the other gateway, acking everything.
    let (_cc, cch) = open(&g2).await;
    cch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch.basic_consume("work".into(), "w".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let received = tokio::spawn(async move {
        let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
        let mut dup_without_flag = 0u32;
        let mut times = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(8), consumer.next()).await {
            times.push(Instant::now());
            let n = u32::from_be_bytes(d.data[..4].try_into().unwrap());
            let count = seen.entry(n).or_default();
            *count += 1;
            if *count > 1 && !d.redelivered {
                dup_without_flag += 1;
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
        (seen, dup_without_flag, times)
    });

    const TOTAL: u32 = 1500;
    let (progress, mut watch) = tokio::sync::watch::channel(0u32);
    let publisher = tokio::spawn(publish_confirmed(g1.url(), "work", TOTAL, progress));
    watch.wait_for(|n| *n >= TOTAL / 3).await.unwrap();

    // Kill -9 the node leading the queue.
    let leader = (0..3)
        .find(|i| status_field(home.path(), &addrs[*i], "leading").is_some_and(|l| l.iter().any(|q| q == "work")))
        .expect("some node leads the queue");
    let killed_at = Instant::now();
    nodes[leader].child.kill().unwrap();
    nodes[leader].child.wait().unwrap();
    let at_kill = *watch.borrow();
    watch.wait_for(|n| *n > at_kill + 10).await.unwrap();
    let resumed = killed_at.elapsed();

    let (confirmed, longest) = tokio::time::timeout(Duration::from_secs(120), publisher).await.expect("publisher finished").unwrap();
    let phase_one_done = Instant::now();
    assert_eq!(confirmed.len() as u32, TOTAL);
    println!("kill -9 of the leader: 10 more confirms {resumed:?} after the kill; longest pause between confirms {longest:?}");

    // Restart the killed node, then kill another one: the queue can only
    // go on with the restarted node in its majority, so confirms now prove
    // that it caught up.
    let restarted = start_node(home.path(), &format!("n{}", leader + 1), &format!("n{}", leader + 1), &addrs[leader], &[]);
    nodes[leader] = restarted;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let other = (leader + 1) % 3;
    nodes[other].child.kill().unwrap();
    nodes[other].child.wait().unwrap();
    let (progress, _watch) = tokio::sync::watch::channel(0u32);
    let more = tokio::time::timeout(Duration::from_secs(60), publish_confirmed_from(g1.url(), "work", TOTAL, TOTAL + 100, progress))
        .await
        .expect("confirms resume with the restarted node in the majority");
    assert_eq!(more.0.len(), 100);

    let (seen, dup_without_flag, times) = received.await.unwrap();
    // How long the consumer (on the other gateway) went without a delivery
    // around the kill.
    let around: Vec<&Instant> = times.iter().filter(|t| **t + Duration::from_secs(1) > killed_at && **t < phase_one_done).collect();
    let delivery_pause = around.windows(2).map(|w| *w[1] - *w[0]).max().unwrap_or_default();
    println!("kill -9 of the leader: longest pause between two deliveries to the consumer {delivery_pause:?}");
    let missing: Vec<u32> = confirmed.iter().chain(&more.0).filter(|n| !seen.contains_key(n)).copied().collect();
    assert!(missing.is_empty(), "confirmed but never delivered: {} of them, first {:?}", missing.len(), &missing[..missing.len().min(10)]);
    assert_eq!(dup_without_flag, 0, "a message was delivered twice without redelivered=true");
    let extra: Vec<u32> = seen.keys().filter(|n| **n >= TOTAL + 100).copied().collect();
    assert!(extra.is_empty(), "messages from nowhere: {extra:?}");
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_gateway_loses_its_exclusive_queues_and_its_held_messages_return() {
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let mut g1 = start_gateway(home.path(), &addrs, &[]);
    let g2 = start_gateway(home.path(), &addrs, &[]);
    let (_c1, ch1) = open(&g1).await;
    let (_c2, ch2) = open(&g2).await;
    ch1.queue_declare("mine".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    ch1.queue_declare("shared".into(), durable(), FieldTable::default()).await.unwrap();
    ch1.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..10u32 {
        let c = ch1.basic_publish("".into(), "shared".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    ch1.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut held = ch1.basic_consume("shared".into(), "holder".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    for _ in 0..5 {
        tokio::time::timeout(Duration::from_secs(10), held.next()).await.expect("delivery").unwrap().unwrap();
    }
    // The exclusive queue is someone else's while its owner lives.
    let err = ch2
        .queue_declare("mine".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("RESOURCE_LOCKED"), "{err}");

    g1.child.kill().unwrap();
    g1.child.wait().unwrap();
    let killed = Instant::now();

    // Every message comes back to a consumer on the other gateway; the
    // five that were held are flagged redelivered.
    let (_c3, ch3) = open(&g2).await;
    let mut consumer = ch3.basic_consume("shared".into(), "taker".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let mut redelivered = 0;
    let mut got = BTreeSet::new();
    while got.len() < 10 {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next()).await.expect("all messages back").unwrap().unwrap();
        got.insert(u32::from_be_bytes(d.data[..4].try_into().unwrap()));
        redelivered += u32::from(d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(redelivered, 5);
    println!("held messages of a killed gateway back {:?} after the kill", killed.elapsed());
    // And its exclusive queue is gone.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_c, ch) = open(&g2).await;
        let r = ch
            .queue_declare("mine".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await;
        match r {
            Err(e) if e.to_string().contains("NOT_FOUND") => break,
            _ => assert!(Instant::now() < deadline, "the vanished gateway's exclusive queue is still there"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_queue_spreads_over_the_nodes_and_keeps_key_order() {
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let g1 = start_gateway(home.path(), &addrs, &[]);
    let (_c, ch) = open(&g1).await;
    let mut args = FieldTable::default();
    args.insert("x-partitions".into(), lapin::types::AMQPValue::LongInt(9));
    ch.queue_declare("hot".into(), durable(), args.clone()).await.unwrap();
    ch.queue_bind("hot".into(), "amq.topic".into(), "#".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..300u32 {
        let key = format!("k{}", i % 10);
        let body = format!("{key}:{i}");
        let c = ch.basic_publish("amq.topic".into(), key.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    // Each partition is its own Raft group, placed on its own: more than
    // one node leads some of them.
    let leaders: Vec<usize> = addrs
        .iter()
        .map(|a| status_field(home.path(), a, "leading").unwrap_or_default().iter().filter(|q| q.starts_with("hot#")).count())
        .collect();
    assert_eq!(leaders.iter().sum::<usize>(), 9, "{leaders:?}");
    assert!(leaders.iter().filter(|n| **n > 0).count() >= 2, "partitions all led by one node: {leaders:?}");
    println!("partitions led per node: {leaders:?}");

    let ok = ch.queue_declare("hot".into(), durable(), args).await.unwrap();
    assert_eq!(ok.message_count(), 300);
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch.basic_consume("hot".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let mut last: BTreeMap<String, u32> = BTreeMap::new();
    for _ in 0..300 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("delivery").unwrap().unwrap();
        let text = String::from_utf8(d.data.clone()).unwrap();
        let (key, i) = text.split_once(':').unwrap();
        let i: u32 = i.parse().unwrap();
        if let Some(prev) = last.insert(key.to_owned(), i) {
            assert!(i > prev, "{key}: {i} after {prev}");
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(last.len(), 10);
    drop(nodes);
}

/// A free port on 127.0.0.1 (bound, then released for the process to take).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stomp_through_one_gateway_amqp_through_the_other() {
    use crate::stomp::{frame, Client};
    use sluice_codecs::stomp::Command as Stomp;
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let stomp_addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let g1 = start_gateway(home.path(), &addrs, &["--stomp", &stomp_addr.to_string()]);
    let g2 = start_gateway(home.path(), &addrs, &[]);

    // STOMP SEND through g1 (the receipt comes once it is replicated),
    // AMQP consume through g2.
    let mut st = tokio::task::spawn_blocking(move || {
        let mut c = Client::open_at(stomp_addr, "1.2");
        c.send(&frame(Stomp::Send, &[("destination", "/queue/bridge"), ("receipt", "r1"), ("content-type", "text/plain")]).with_body("over stomp"));
        let receipt = c.recv();
        assert_eq!(receipt.command, Stomp::Receipt, "{receipt:?}");
        c
    })
    .await
    .unwrap();
    let (_c, ch) = open(&g2).await;
    let got = ch.basic_get("bridge".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("the STOMP message");
    assert_eq!(got.delivery.data, b"over stomp");
    assert_eq!(got.delivery.properties.content_type().as_ref().map(|s| s.as_str()), Some("text/plain"));

    // STOMP SUBSCRIBE through g1, AMQP publish through g2.
    st = tokio::task::spawn_blocking(move || {
        st.send(&frame(Stomp::Subscribe, &[("destination", "/queue/bridge"), ("id", "s1"), ("ack", "auto"), ("receipt", "r2")]));
        let receipt = st.recv();
        assert_eq!(receipt.command, Stomp::Receipt, "{receipt:?}");
        st
    })
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let c = ch.basic_publish("".into(), "bridge".into(), BasicPublishOptions::default(), b"over amqp", persistent()).await.unwrap();
    assert!(c.await.unwrap().is_ack());
    let msg = tokio::task::spawn_blocking(move || st.recv()).await.unwrap();
    assert_eq!(msg.command, Stomp::Message, "{msg:?}");
    assert_eq!(&msg.body[..], b"over amqp");
    drop((g1, g2, nodes));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limits_and_ttl_hold_in_a_cluster() {
    use lapin::types::AMQPValue;
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let gw = start_gateway(home.path(), &addrs, &[]);
    let (_c, ch) = open(&gw).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();

    // reject-publish: the leader's refusal reaches the publisher as a nack.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(2));
    args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
    ch.queue_declare("full".into(), durable(), args).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..4u32 {
        let c = ch.basic_publish("".into(), "full".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await.unwrap();
        acks.push(c.await.unwrap().is_ack());
    }
    assert_eq!(acks, [true, true, false, false]);

    // drop-head keeps the newest, and a message TTL expires messages.
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongInt(3));
    ch.queue_declare("newest".into(), durable(), args).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(200));
    ch.queue_declare("short".into(), durable(), args).await.unwrap();
    for i in 0..6u32 {
        for q in ["newest", "short"] {
            let c = ch.basic_publish("".into(), q.into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent()).await.unwrap();
            assert!(c.await.unwrap().is_ack());
        }
    }
    let mut kept = Vec::new();
    while let Some(m) = ch.basic_get("newest".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        kept.push(u32::from_be_bytes(m.delivery.data[..4].try_into().unwrap()));
    }
    assert_eq!(kept, [3, 4, 5]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = ch
            .queue_declare("short".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        if ok.message_count() == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "messages did not expire: {} left", ok.message_count());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ch.basic_get("short".into(), BasicGetOptions { no_ack: true }).await.unwrap().is_none());
    drop(nodes);
}

/// A field table from pairs.
fn args_table(pairs: &[(&str, lapin::types::AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn long_str(v: &str) -> lapin::types::AMQPValue {
    lapin::types::AMQPValue::LongString(v.into())
}

fn amqp_text(v: Option<&lapin::types::AMQPValue>) -> Option<String> {
    match v? {
        lapin::types::AMQPValue::LongString(s) => Some(s.to_string()),
        lapin::types::AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// `reason` and `queue` of the first `x-death` entry of a dead letter.
fn first_death_of(props: &BasicProperties) -> (Option<String>, Option<String>) {
    use lapin::types::AMQPValue;
    let headers = props.headers().as_ref().expect("a dead letter has headers");
    match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => match a.as_slice().first() {
            Some(AMQPValue::FieldTable(t)) => (amqp_text(t.inner().get("reason")), amqp_text(t.inner().get("queue"))),
            other => panic!("x-death entry {other:?}"),
        },
        other => panic!("no x-death header: {other:?}"),
    }
}

/// The index of the node whose `sluice ctl status` lists `queue` as led
/// (waits up to 20 s for one).
pub(crate) fn leader_of(home: &Path, addrs: &[String], queue: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let found = (0..addrs.len())
            .find(|i| status_field(home, &addrs[*i], "leading").is_some_and(|l| l.iter().any(|q| q == queue)));
        if let Some(i) = found {
            return i;
        }
        assert!(Instant::now() < deadline, "no node leads {queue}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Ready messages of `queue` (passive declare).
async fn ready_count(ch: &Channel, queue: &str) -> u32 {
    ch.queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("passive declare")
        .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_messages_are_dead_lettered_across_nodes_exactly_once() {
    const PAIRS: usize = 8;
    const PER_QUEUE: u32 = 10;
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let gw = start_gateway(home.path(), &all, &[]);
    let (_c, ch) = open(&gw).await;
    for i in 0..PAIRS {
        ch.queue_declare(format!("dlq-{i}").as_str().into(), durable(), FieldTable::default()).await.unwrap();
        let args = args_table(&[("x-dead-letter-exchange", long_str("")), ("x-dead-letter-routing-key", long_str(&format!("dlq-{i}")))]);
        ch.queue_declare(format!("src-{i}").as_str().into(), durable(), args).await.unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..PAIRS {
        for j in 0..PER_QUEUE {
            let body = format!("{i}:{j}");
            let c = ch
                .basic_publish("".into(), format!("src-{i}").as_str().into(), BasicPublishOptions::default(), body.as_bytes(), persistent())
                .await
                .unwrap();
            assert!(c.await.unwrap().is_ack(), "publish {body} confirmed");
        }
    }
    // Where each pair lives: some dead letters must take the remote path.
    let placement: Vec<(usize, usize)> =
        (0..PAIRS).map(|i| (leader_of(home.path(), &addrs, &format!("src-{i}")), leader_of(home.path(), &addrs, &format!("dlq-{i}")))).collect();
    let crossed = placement.iter().filter(|(s, d)| s != d).count();
    println!("(source leader, dead-letter queue leader) per pair: {placement:?}; {crossed} pairs cross nodes");
    assert!(crossed >= 1, "every source is led where its dead-letter queue is: {placement:?}");

    // A consumer rejects everything (requeue=false).
    let (_cc, cch) = open(&gw).await;
    cch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    for i in 0..PAIRS {
        let mut consumer = cch
            .basic_consume(format!("src-{i}").as_str().into(), format!("r{i}").as_str().into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        for _ in 0..PER_QUEUE {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("delivery").unwrap().unwrap();
            assert!(String::from_utf8_lossy(&d.data).starts_with(&format!("{i}:")), "src-{i} got {:?}", d.data);
            d.reject(BasicRejectOptions { requeue: false }).await.unwrap();
        }
        cch.basic_cancel(format!("r{i}").as_str().into(), BasicCancelOptions::default()).await.unwrap();
    }

    // Every message once in its dead-letter queue, with x-death reason rejected.
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..PAIRS {
        let dlq = format!("dlq-{i}");
        let mut got = 0;
        while got < PER_QUEUE {
            match ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap() {
                Some(m) => {
                    let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                    assert!(body.starts_with(&format!("{i}:")), "{dlq} got {body}");
                    let (reason, queue) = first_death_of(&m.delivery.properties);
                    assert_eq!(reason.as_deref(), Some("rejected"), "{body}");
                    assert_eq!(queue, Some(format!("src-{i}")), "{body}");
                    assert_eq!(m.delivery.routing_key.as_str(), dlq);
                    *seen.entry(body).or_default() += 1;
                    got += 1;
                }
                None => {
                    assert!(Instant::now() < deadline, "{dlq}: only {got} of {PER_QUEUE} dead letters arrived");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    // No late duplicates, and the sources are empty.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..PAIRS {
        assert_eq!(ready_count(&ch, &format!("dlq-{i}")).await, 0, "dlq-{i}: a duplicate dead letter");
        assert_eq!(ready_count(&ch, &format!("src-{i}")).await, 0, "src-{i} not empty");
    }
    let dups: Vec<(&String, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "dead-lettered twice: {dups:?}");
    let want: BTreeSet<String> = (0..PAIRS).flat_map(|i| (0..PER_QUEUE).map(move |j| format!("{i}:{j}"))).collect();
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want);
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deduplication_holds_across_two_gateways() {
    use lapin::types::{AMQPValue, ShortString};
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let ga = start_gateway(home.path(), &addrs, &[]);
    let gb = start_gateway(home.path(), &addrs, &[]);
    let (_ca, cha) = open(&ga).await;
    let (_cb, chb) = open(&gb).await;
    let args = args_table(&[
        ("x-message-deduplication", AMQPValue::Boolean(true)),
        ("x-deduplication-window-ms", AMQPValue::LongInt(60_000)),
    ]);
    cha.queue_declare("once".into(), durable(), args).await.unwrap();
    cha.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    chb.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let by_id = |id: &str| persistent().with_message_id(ShortString::from(id.to_owned()));
    for (ch, body, id) in [(&cha, "from-a", "same"), (&chb, "from-b", "same"), (&chb, "other-b", "other")] {
        let c = ch.basic_publish("".into(), "once".into(), BasicPublishOptions::default(), body.as_bytes(), by_id(id)).await.unwrap();
        assert!(c.await.unwrap().is_ack(), "{body} confirmed (a duplicate is acked too)");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready_count(&cha, "once").await < 2 {
        assert!(Instant::now() < deadline, "the distinct message did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(ready_count(&chb, "once").await, 2, "one copy of the duplicated id plus the other one");
    let mut bodies = Vec::new();
    while let Some(m) = chb.basic_get("once".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
        bodies.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    assert_eq!(bodies, ["from-a", "other-b"]);
    drop(nodes);
}

/// One basic.get on a fresh connection through `url` (`None` when the
/// queue is empty, `Err` when the cluster is not answering yet).
async fn get_once(url: &str, queue: &str, no_ack: bool) -> Result<Option<lapin::message::BasicGetMessage>, String> {
    let conn = Connection::connect(url, ConnectionProperties::default()).await.map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    let got = ch.basic_get(queue.into(), BasicGetOptions { no_ack }).await.map_err(|e| e.to_string())?;
    if !no_ack {
        if let Some(m) = &got {
            m.delivery.reject(BasicRejectOptions { requeue: false }).await.map_err(|e| e.to_string())?;
            // Give the reject a moment before the connection goes.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(got)
}

/// The rejects still in flight when the source's leader dies are lost with
/// it; lapin cancels the consumer (basic.cancel on drop) before closing
/// the channel, and the channel's close must still return what the
/// cancelled consumer holds on the new leader (it once did not, and the
/// messages stayed unacked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_moves_survive_killing_the_source_leader() {
    const TOTAL: u32 = 50;
    let home = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(home.path());
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let gw = start_gateway(home.path(), &all, &[]);
    let (c, ch) = open(&gw).await;
    // A pair whose leaders differ (the remote path), if placement gives one.
    let mut pair = None;
    for i in 0..8 {
        let (src, dlq) = (format!("ksrc-{i}"), format!("kdlq-{i}"));
        ch.queue_declare(dlq.as_str().into(), durable(), FieldTable::default()).await.unwrap();
        let args = args_table(&[("x-dead-letter-exchange", long_str("")), ("x-dead-letter-routing-key", long_str(&dlq))]);
        ch.queue_declare(src.as_str().into(), durable(), args).await.unwrap();
        let (ls, ld) = (leader_of(home.path(), &addrs, &src), leader_of(home.path(), &addrs, &dlq));
        pair = Some((src, dlq, ls, ld));
        if ls != ld {
            break;
        }
    }
    let (src, dlq, src_leader, dlq_leader) = pair.unwrap();
    println!("{src} led by n{}, {dlq} by n{}", src_leader + 1, dlq_leader + 1);
    assert_ne!(src_leader, dlq_leader, "placement put all 8 pairs on one leader each");

    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..TOTAL {
        let c = ch.basic_publish("".into(), src.as_str().into(), BasicPublishOptions::default(), format!("m{i}").as_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    // Found before the rejects, so that the kill follows them at once.
    let leader_now = leader_of(home.path(), &addrs, &src);
    ch.basic_qos(TOTAL as u16, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch.basic_consume(src.as_str().into(), "rejecter".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    for _ in 0..TOTAL {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("delivery").unwrap().unwrap();
        d.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    }
    // Kill -9 the source's leader as soon as the rejects are out: some dead
    // letters are between the two queues.
    nodes[leader_now].child.kill().unwrap();
    nodes[leader_now].child.wait().unwrap();
    let killed_at = Instant::now();
    drop(consumer);
    let _ = tokio::time::timeout(Duration::from_secs(5), c.close(200, "bye".into())).await;
    drop(ch);

    // After failover every message is in the dead-letter queue exactly once
    // (what was not rejected before the kill is back in the source: reject
    // it again).
    let url = gw.url();
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let mut rejected_again = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < TOTAL as usize {
        if Instant::now() >= deadline {
            let (_c, ch) = open(&gw).await;
            let (in_src, in_dlq) = (ready_count(&ch, &src).await, ready_count(&ch, &dlq).await);
            let missing: Vec<String> = (0..TOTAL).map(|i| format!("m{i}")).filter(|m| !seen.contains_key(m)).collect();
            // Where the missing ones are: held (unacked) or waiting to be
            // dead-lettered, as the source's leader reports them.
            let figures = match gw.metrics {
                Some(addr) => crate::metrics::scrape(addr)
                    .await
                    .lines()
                    .filter(|l| l.contains(&format!("queue=\"{src}\"")) && (l.contains("unacked") || l.contains("dead_letter")))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
                    .join("; "),
                None => String::new(),
            };
            panic!(
                "only {} of {TOTAL} dead letters {:?} after the kill (missing {missing:?}; ready now: {in_src} in {src}, {in_dlq} in {dlq}; {rejected_again} rejected again after failover; source figures: {figures})",
                seen.len(),
                killed_at.elapsed()
            );
        }
        match get_once(&url, &dlq, true).await {
            Ok(Some(m)) => {
                let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                let (reason, queue) = first_death_of(&m.delivery.properties);
                assert_eq!(reason.as_deref(), Some("rejected"), "{body}");
                assert_eq!(queue.as_deref(), Some(src.as_str()), "{body}");
                *seen.entry(body).or_default() += 1;
            }
            Ok(None) => {
                if let Ok(Some(_)) = get_once(&url, &src, false).await {
                    rejected_again += 1;
                } else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    println!("all {TOTAL} dead letters in {dlq} {:?} after the kill; {rejected_again} rejected again after failover", killed_at.elapsed());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_c, ch) = open(&gw).await;
    let extra = ch.basic_get(dlq.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert!(extra.is_none(), "a duplicate dead letter: {:?}", extra.map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned()));
    let dups: Vec<(&String, &u32)> = seen.iter().filter(|(_, n)| **n > 1).collect();
    assert!(dups.is_empty(), "dead-lettered twice: {dups:?}");
    let want: BTreeSet<String> = (0..TOTAL).map(|i| format!("m{i}")).collect();
    assert_eq!(seen.keys().cloned().collect::<BTreeSet<_>>(), want);
    assert_eq!(ready_count(&ch, &src).await, 0, "{src} not empty");
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_on_delete_through_a_gateway_moves_every_message_once() {
    use lapin::types::AMQPValue;
    const QUEUES: usize = 4;
    const PER_QUEUE: u32 = 10;
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let gw = start_gateway(home.path(), &addrs, &[]);
    let (_c, ch) = open(&gw).await;
    ch.queue_declare("graveyard".into(), durable(), FieldTable::default()).await.unwrap();
    let args = args_table(&[
        ("x-dead-letter-exchange", long_str("")),
        ("x-dead-letter-routing-key", long_str("graveyard")),
        ("x-dead-letter-on-delete", AMQPValue::Boolean(true)),
    ]);
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..QUEUES {
        let q = format!("doomed-{i}");
        ch.queue_declare(q.as_str().into(), durable(), args.clone()).await.unwrap();
        for j in 0..PER_QUEUE {
            let body = format!("{i}:{j}");
            let c = ch.basic_publish("".into(), q.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), persistent()).await.unwrap();
            assert!(c.await.unwrap().is_ack());
        }
    }
    for i in 0..QUEUES {
        let n = ch.queue_delete(format!("doomed-{i}").as_str().into(), QueueDeleteOptions::default()).await.unwrap();
        assert_eq!(n, PER_QUEUE, "delete-ok of doomed-{i}");
    }
    let mut seen: BTreeMap<String, u32> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.values().sum::<u32>() < QUEUES as u32 * PER_QUEUE {
        match ch.basic_get("graveyard".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            Some(m) => {
                let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                let (reason, queue) = first_death_of(&m.delivery.properties);
                assert_eq!(reason.as_deref(), Some("queue_deleted"), "{body}");
                assert!(queue.is_some_and(|q| q.starts_with("doomed-")), "{body}");
                *seen.entry(body).or_default() += 1;
            }
            None => {
                assert!(Instant::now() < deadline, "only {} dead letters arrived", seen.len());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(ready_count(&ch, "graveyard").await, 0, "a duplicate dead letter");
    assert!(seen.values().all(|n| *n == 1), "{seen:?}");
    assert_eq!(seen.len(), QUEUES * PER_QUEUE as usize);
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_get_holdings_come_back_when_the_channel_closes_around_a_leader_kill() {
    const TOTAL: u32 = 30;
    let home = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(home.path());
    let addrs: Vec<String> = nodes.iter().map(|n| n.addr.clone()).collect();
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let gw = start_gateway(home.path(), &all, &[]);
    let (c, ch) = open(&gw).await;
    ch.queue_declare("got".into(), durable(), FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..TOTAL {
        let c = ch.basic_publish("".into(), "got".into(), BasicPublishOptions::default(), format!("g{i}").as_bytes(), persistent()).await.unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    let leader = leader_of(home.path(), &addrs, "got");
    let getter = c.create_channel().await.unwrap();
    for _ in 0..TOTAL {
        assert!(getter.basic_get("got".into(), BasicGetOptions { no_ack: false }).await.unwrap().is_some());
    }
    // The channel closes (its requeues go to the leader) and the leader
    // dies right after: whatever it did not commit is released again to
    // the new leader.
    getter.close(200, "bye".into()).await.unwrap();
    eprintln!("killing n{} (leader of got)", leader + 1);
    nodes[leader].child.kill().unwrap();
    nodes[leader].child.wait().unwrap();
    let url = gw.url();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut seen: BTreeMap<String, bool> = BTreeMap::new();
    let mut last_err = None;
    while seen.len() < TOTAL as usize {
        assert!(Instant::now() < deadline, "only {} of {TOTAL} came back: {seen:?}; last error {last_err:?}", seen.len());
        match get_once(&url, "got", true).await {
            Ok(Some(m)) => {
                let body = String::from_utf8_lossy(&m.delivery.data).into_owned();
                assert!(seen.insert(body.clone(), m.delivery.redelivered).is_none(), "{body} twice");
            }
            Ok(None) => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => {
                last_err = Some(e);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(seen.values().all(|r| *r), "every message comes back flagged redelivered: {seen:?}");
    drop(nodes);
}

/// Users and permissions live in the replicated metadata: a user made
/// through one gateway's admin API logs in through the other gateway,
/// with the permissions set there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_made_through_one_gateway_log_in_through_the_other() {
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let ga = start_gateway(home.path(), &addrs, &[]);
    let gb = start_gateway(home.path(), &addrs, &[]);
    let admin = format!("http://{}", ga.admin.clone().expect("admin line"));
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", "--admin", &admin];
        all.extend_from_slice(args);
        let (code, out, err) = sluice_compat_tests::run_sluice(&all);
        assert_eq!(code, 0, "ctl {args:?}: {err}");
        out
    };
    ctl(&["add-user", "carol", "carol-pw"]);
    ctl(&["set-permissions", "carol", "^carol-", "^carol-|^amq\\.default$", "^carol-"]);
    let url = gb.url().replace("guest:guest", "carol:carol-pw");
    let mut conn = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while conn.is_none() {
        // Gateway B applies the change from the metadata stream.
        match lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await {
            Ok(c) => conn = Some(c),
            Err(e) => {
                assert!(Instant::now() < deadline, "carol cannot log in through gateway B: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let conn = conn.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("carol-q".into(), durable(), FieldTable::default()).await.unwrap();
    let err = ch.queue_declare("dave-q".into(), durable(), FieldTable::default()).await.unwrap_err();
    assert!(format!("{err:?}").contains("ACCESS_REFUSED"), "{err:?}");
    assert!(ctl(&["list-queues"]).contains("carol-q"));
    drop(nodes);
}

/// A 16 MiB persistent message, confirmed, through a gateway: replicated
/// and delivered whole (the node protocol carries it in one frame).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_16_mib_message_goes_through_a_gateway() {
    let home = tempfile::tempdir().unwrap();
    let nodes = three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let gw = start_gateway(home.path(), &addrs, &[]);
    let (_conn, ch) = open(&gw).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch.queue_declare("big".into(), durable(), FieldTable::default()).await.unwrap();
    let body: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let started = Instant::now();
    let confirm = ch
        .basic_publish("".into(), "big".into(), BasicPublishOptions::default(), &body, persistent())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack(), "{confirm:?}");
    eprintln!("16 MiB confirmed in {:?}", started.elapsed());
    let got = ch.basic_get("big".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("the message");
    assert_eq!(got.delivery.data.len(), body.len());
    assert!(got.delivery.data == body, "the body came back changed");
    drop(nodes);
}
