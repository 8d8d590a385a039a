//! Publisher flow control: a queue whose consumer's connection falls
//! behind stops its publishers' connections from being read (AMQP and
//! STOMP alike), so the backlog stays bounded; nothing is lost, and
//! publishing resumes once the consumer reads again.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::BasicPublishOptions;
use lapin::BasicProperties;

use crate::metrics::{scrape, value};
use sluice_compat_tests::Server;

/// Messages each publisher sends.
const PER_PUBLISHER: usize = 40_000;
const BODY: usize = 1024;

/// A raw STOMP 1.2 session: CONNECT, then read up to the CONNECTED frame.
fn stomp(addr: SocketAddr) -> TcpStream {
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.write_all(b"CONNECT\naccept-version:1.2\nlogin:guest\npasscode:guest\n\n\0").unwrap();
    let mut byte = [0u8; 1];
    let mut head = Vec::new();
    while byte[0] != 0 || head.is_empty() {
        sock.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    assert!(head.starts_with(b"CONNECTED"), "{}", String::from_utf8_lossy(&head));
    sock
}

/// Where the broker under test listens (a single node, or a gateway of a
/// cluster).
struct Target {
    amqp_url: String,
    stomp: SocketAddr,
    metrics: SocketAddr,
    /// Most ready messages allowed while the publishers are held: the
    /// lag threshold (2,048) plus what was on its way. Through a gateway
    /// more is on its way: publishes the gateway read and sent on to the
    /// leader before the leader's word arrived, up to its 32 MiB of
    /// publishes in flight (about 31,000 of these; 17,700 were seen once
    /// in CI under load).
    most_ready: f64,
}

#[tokio::test]
async fn publishers_wait_for_a_consumer_whose_connection_is_behind() {
    let s = Server::start();
    publishers_wait(Target { amqp_url: s.url(), stomp: s.stomp_addr(), metrics: s.metrics_addr(), most_ready: 12_000.0 }).await;
}

/// The same through a gateway of a 3-node cluster: the queue's leader
/// counts the deliveries the gateway has not written to the consumer's
/// socket yet (so it stops pushing when the client does not read, and the
/// gateway's memory stays bounded), sees the backlog grow, and tells the
/// gateway, which holds its publishers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_for_a_consumer_behind_through_a_gateway() {
    let home = tempfile::tempdir().unwrap();
    let nodes = crate::cluster_queues::three_nodes(home.path());
    let addrs: Vec<&str> = nodes.iter().map(|n| n.addr.as_str()).collect();
    let gw = sluice_compat_tests::start_gateway(home.path(), &addrs, &[]);
    let _logs = sluice_compat_tests::LogsOnPanic(home.path().to_path_buf());
    let target = Target {
        amqp_url: gw.url(),
        stomp: gw.stomp.as_deref().and_then(|a| a.parse().ok()).expect("a STOMP listener"),
        metrics: gw.metrics.expect("a metrics listener"),
        most_ready: 36_000.0,
    };
    publishers_wait(target).await;
    drop(gw);
    drop(nodes);
}

async fn publishers_wait(target: Target) {
    let metrics = target.metrics;
    // The consumer subscribes (auto ack) and then does not read its socket.
    let mut consumer = stomp(target.stomp);
    consumer.write_all(b"SUBSCRIBE\nid:0\ndestination:/queue/flow\nack:auto\nreceipt:sub\n\n\0").unwrap();
    let mut receipt = [0u8; 64];
    let n = consumer.read(&mut receipt).unwrap();
    assert!(receipt[..n].starts_with(b"RECEIPT"), "{}", String::from_utf8_lossy(&receipt[..n]));

    // Two publishers without confirms: raw STOMP and lapin.
    let sent_stomp = Arc::new(AtomicUsize::new(0));
    let mut stomp_pub = stomp(target.stomp);
    let stomp_thread = {
        let sent = sent_stomp.clone();
        std::thread::spawn(move || {
            let frame = format!("SEND\ndestination:/queue/flow\n\n{}\0", "x".repeat(BODY));
            for _ in 0..PER_PUBLISHER {
                stomp_pub.write_all(frame.as_bytes()).unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
            }
            stomp_pub
        })
    };
    let sent_amqp = Arc::new(AtomicUsize::new(0));
    let conn = lapin::Connection::connect(&target.amqp_url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let amqp_task = {
        let sent = sent_amqp.clone();
        tokio::spawn(async move {
            let body = vec![b'y'; BODY];
            for _ in 0..PER_PUBLISHER {
                ch.basic_publish("".into(), "flow".into(), BasicPublishOptions::default(), &body, BasicProperties::default())
                    .await
                    .unwrap();
                sent.fetch_add(1, Ordering::Relaxed);
            }
            (conn, ch)
        })
    };

    // Both publishing connections are held.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut text = scrape(metrics).await;
    while value(&text, "sluice_flow_connections") != Some(2.0) {
        assert!(Instant::now() < deadline, "both publishers never held by flow control:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(metrics).await;
    }
    assert!(value(&text, "sluice_flow_pauses_total").unwrap_or(0.0) >= 2.0, "{text}");
    // While held, the backlog stays bounded: nowhere near what was offered.
    let ready = "sluice_queue_messages_ready{vhost=\"/\",queue=\"flow\"}";
    let mut most = 0.0f64;
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let text = scrape(metrics).await;
        most = most.max(value(&text, ready).unwrap_or(0.0));
    }
    let offered = sent_stomp.load(Ordering::Relaxed) + sent_amqp.load(Ordering::Relaxed);
    assert!(most <= target.most_ready, "{most} ready while held ({offered} written by the publishers)");
    assert!(offered < 2 * PER_PUBLISHER, "the publishers were never held: all {offered} written");

    // The consumer reads again: every message arrives, the publishers finish.
    let reader = std::thread::spawn(move || {
        let mut frames = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        let until = Instant::now() + Duration::from_secs(120);
        consumer.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        while frames < 2 * PER_PUBLISHER && Instant::now() < until {
            let n = match consumer.read(&mut buf) {
                Ok(0) => return Err(format!("consumer socket closed after {frames} messages")),
                Ok(n) => n,
                Err(e) => return Err(format!("nothing for 10 s after {frames} messages: {e}")),
            };
            frames += buf[..n].iter().filter(|&&b| b == 0).count();
        }
        Ok(frames)
    });
    let _stomp_pub = tokio::task::spawn_blocking(move || stomp_thread.join().unwrap()).await.unwrap();
    let _amqp = amqp_task.await.unwrap();
    let frames = tokio::task::spawn_blocking(move || reader.join().unwrap()).await.unwrap();
    let frames = match frames {
        Ok(n) => n,
        Err(e) => panic!("{e}; the broker's metrics:\n{}", scrape(metrics).await),
    };
    assert_eq!(frames, 2 * PER_PUBLISHER, "every published message is delivered once");
    // No connection stays held (through a gateway the leader's "no longer
    // lagging" may arrive just after the last delivery).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = scrape(metrics).await;
    while value(&text, "sluice_flow_connections") != Some(0.0) {
        assert!(Instant::now() < deadline, "connections still held after the backlog drained:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
        text = scrape(metrics).await;
    }
}
