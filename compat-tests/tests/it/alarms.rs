//! Resource alarms and limits against the real binary: the memory and
//! free-disk alarms are switched on and off by rewriting the config file
//! and sending SIGHUP (limits that are on or off whatever the machine:
//! a free-disk limit of 1 EB, a memory watermark of 1 byte), and the
//! connection and consumer limits.

use std::path::PathBuf;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sluice_codecs::amqp::{
    BasicAck, BasicPublish, ChannelOpen, ConfirmSelect, FieldValue, Frame, Method, QueueDeclare,
};
use sluice_codecs::stomp::Command;

use crate::common::*;
use crate::metrics::{until, value};
use crate::raw::Raw;
use crate::stomp::{frame, Client};

/// Free disk below 1 EB: on for any disk.
const DISK_ALARM: &str = "disk_free_limit = 1000000000000000000\nmemory_high_watermark = 1.0\n";
/// Resident memory above 1 byte: always on.
const MEMORY_ALARM: &str = "memory_high_watermark_bytes = 1\ndisk_free_limit = 0\n";
/// Neither can go off.
const NO_ALARM: &str = "memory_high_watermark = 1.0\ndisk_free_limit = 0\n";

const MEMORY: &str = r#"sluice_alarm{resource="memory"}"#;
const DISK: &str = r#"sluice_alarm{resource="disk"}"#;
const BLOCKED: &str = "sluice_blocked_connections";

/// A config file the test rewrites.
struct Conf {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Conf {
    fn new(body: &str) -> Conf {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sluice.toml");
        std::fs::write(&path, body).unwrap();
        Conf { _dir: dir, path }
    }

    fn start(&self) -> Server {
        Server::start_with(&["--config", self.path.to_str().unwrap()])
    }

    /// Rewrites the file and asks the server to reload it (SIGHUP).
    fn reload(&self, s: &Server, body: &str) {
        self.reload_pid(s.pid(), body);
    }

    fn reload_pid(&self, pid: u32, body: &str) {
        std::fs::write(&self.path, body).unwrap();
        // SAFETY: plain syscall on a child we started.
        let r = unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
        assert_eq!(r, 0, "kill -HUP: {}", std::io::Error::last_os_error());
    }
}

/// Scrapes until the series have the values (the collector copies the
/// alarm state once a second).
async fn metrics_show(s: &Server, want: &[(&str, f64)]) -> String {
    let what = format!("{want:?}");
    until(s.metrics_addr(), &what, |t| want.iter().all(|(series, v)| value(t, series) == Some(*v))).await
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
}

async fn next_event(events: &mut (impl futures_util::Stream<Item = lapin::Event> + Unpin)) -> lapin::Event {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.next())
            .await
            .expect("no connection event within 10 s")
            .expect("event stream ended");
        if !matches!(ev, lapin::Event::Connected) {
            return ev;
        }
    }
}

async fn publish_confirmed(ch: &lapin::Channel, queue: &str, body: &[u8]) -> lapin::PublisherConfirm {
    ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), body, BasicProperties::default().with_delivery_mode(2))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_is_blocked_while_the_disk_alarm_is_on_and_consumers_keep_going() {
    let conf = Conf::new(NO_ALARM);
    let s = conf.start();
    let publisher = connect(&s).await;
    let mut events = Box::pin(publisher.events_listener());
    let pch = channel(&publisher).await;
    pch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    declare_durable(&pch, "alarm-q").await;
    for i in 0..10 {
        let c = publish_confirmed(&pch, "alarm-q", format!("a{i}").as_bytes()).await;
        assert!(c.await.unwrap().is_ack());
    }

    conf.reload(&s, DISK_ALARM);
    // The connection has published: it is blocked at once, and told so.
    match next_event(&mut events).await {
        lapin::Event::ConnectionBlocked(reason) => assert_eq!(reason, "low on disk"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    metrics_show(&s, &[(DISK, 1.0), (MEMORY, 0.0), (BLOCKED, 1.0)]).await;

    // A connection that never published consumes the queue meanwhile.
    let (_cconn, cch) = open(&s).await;
    let mut consumer = cch
        .basic_consume("alarm-q".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for i in 0..10 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("delivery while alarm is on").unwrap().unwrap();
        assert_eq!(d.data, format!("a{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }

    // Publishes made now are neither stored nor confirmed until the alarm clears.
    let (tx, mut confirmed) = tokio::sync::mpsc::unbounded_channel();
    let ch = pch.clone();
    let publishing = tokio::spawn(async move {
        let mut pending = Vec::new();
        for i in 0..20 {
            pending.push(publish_confirmed(&ch, "alarm-q", format!("b{i}").as_bytes()).await);
        }
        for c in pending {
            tx.send(c.await.unwrap().is_ack()).unwrap();
        }
    });
    assert!(
        tokio::time::timeout(Duration::from_millis(1500), confirmed.recv()).await.is_err(),
        "a confirm arrived while the publisher was blocked"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(300), consumer.next()).await.is_err(),
        "a message published while blocked was delivered"
    );

    conf.reload(&s, NO_ALARM);
    assert!(matches!(next_event(&mut events).await, lapin::Event::ConnectionUnblocked));
    for i in 0..20 {
        let ok = tokio::time::timeout(Duration::from_secs(10), confirmed.recv()).await.expect("confirm after unblock").unwrap();
        assert!(ok, "publish {i} was nacked");
    }
    publishing.await.unwrap();
    for i in 0..20 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("delivery after unblock").unwrap().unwrap();
        assert_eq!(d.data, format!("b{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    metrics_show(&s, &[(DISK, 0.0), (BLOCKED, 0.0)]).await;
}

fn caps_blocked() -> sluice_codecs::amqp::FieldTable {
    let caps: sluice_codecs::amqp::FieldTable = [("connection.blocked", FieldValue::Bool(true))].into_iter().collect();
    [("capabilities", FieldValue::Table(caps))].into_iter().collect()
}

/// Channel 1 open, `queue` declared durable, confirms on.
fn raw_publisher(s: &Server, props: sluice_codecs::amqp::FieldTable, queue: &str) -> Raw {
    let mut r = Raw::open_with(s, 0, props);
    r.method(1, Method::ChannelOpen(ChannelOpen::default()));
    assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
    r.method(1, Method::QueueDeclare(QueueDeclare { queue: queue.into(), durable: true, ..Default::default() }));
    assert!(matches!(r.read_method(), Method::QueueDeclareOk(_)));
    r.method(1, Method::ConfirmSelect(ConfirmSelect { nowait: false }));
    assert!(matches!(r.read_method(), Method::ConfirmSelectOk(_)));
    r
}

fn raw_publish(r: &mut Raw, queue: &str, body: &'static [u8]) {
    r.method(1, Method::BasicPublish(BasicPublish { routing_key: queue.into(), ..Default::default() }));
    r.send(&Frame::Header {
        channel: 1,
        class_id: 60,
        body_size: body.len() as u64,
        properties: Box::default(),
    });
    r.send(&Frame::Body { channel: 1, payload: bytes::Bytes::from_static(body) });
}

/// Nothing at all from the server for `wait`.
fn silent(r: &mut Raw, wait: Duration) {
    r.sock.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 1];
    match std::io::Read::read(&mut r.sock, &mut b) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("expected silence, got {other:?}"),
    }
    r.sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
}

#[test]
fn raw_publishers_are_not_read_while_the_memory_alarm_is_on() {
    let conf = Conf::new(MEMORY_ALARM);
    let s = conf.start();
    block_on(metrics_show(&s, &[(MEMORY, 1.0), (DISK, 0.0)]));
    // Declaring and opening channels is not publishing: nothing blocks them.
    let mut notified = raw_publisher(&s, caps_blocked(), "raw-alarm");
    let mut plain = raw_publisher(&s, sluice_codecs::amqp::FieldTable::default(), "raw-alarm");
    raw_publish(&mut notified, "raw-alarm", b"one");
    raw_publish(&mut plain, "raw-alarm", b"two");
    // The client that announced the capability hears why; neither gets a confirm.
    match notified.read_method() {
        Method::ConnectionBlocked(b) => assert_eq!(b.reason, "low on memory"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    silent(&mut notified, Duration::from_millis(1500));
    silent(&mut plain, Duration::from_millis(200));
    block_on(metrics_show(&s, &[(BLOCKED, 2.0)]));

    conf.reload(&s, NO_ALARM);
    assert!(matches!(notified.read_method(), Method::ConnectionUnblocked(_)));
    assert!(matches!(notified.read_method(), Method::BasicAck(BasicAck { delivery_tag: 1, .. })));
    assert!(matches!(plain.read_method(), Method::BasicAck(BasicAck { delivery_tag: 1, .. })));
    // Both messages were stored.
    notified.method(1, Method::QueueDeclare(QueueDeclare { queue: "raw-alarm".into(), passive: true, ..Default::default() }));
    match notified.read_method() {
        Method::QueueDeclareOk(ok) => assert_eq!(ok.message_count, 2),
        other => panic!("expected declare-ok, got {other:?}"),
    }
    block_on(metrics_show(&s, &[(MEMORY, 0.0), (BLOCKED, 0.0)]));
}

#[test]
fn stomp_send_is_not_read_while_an_alarm_is_on() {
    let conf = Conf::new(DISK_ALARM);
    let s = conf.start();
    block_on(metrics_show(&s, &[(DISK, 1.0)]));
    // A session that only subscribes is not blocked.
    let mut sub = Client::open_at(s.stomp_addr(), "1.2");
    sub.send(&frame(Command::Subscribe, &[("destination", "/queue/stomp-alarm"), ("id", "0"), ("receipt", "s")]));
    let r = sub.recv();
    assert_eq!((r.command, r.header("receipt-id")), (Command::Receipt, Some("s")), "{r:?}");

    let mut sender = Client::open_at(s.stomp_addr(), "1.2");
    sender.send(&frame(Command::Send, &[("destination", "/queue/stomp-alarm"), ("receipt", "r1")]).with_body(b"hello".to_vec()));
    assert!(sender.try_recv(Duration::from_millis(1500)).is_none(), "a RECEIPT came while the alarm was on");
    assert!(sub.try_recv(Duration::from_millis(200)).is_none(), "a MESSAGE came while the alarm was on");
    block_on(metrics_show(&s, &[(BLOCKED, 1.0)]));

    conf.reload(&s, NO_ALARM);
    let r = sender.recv();
    assert_eq!((r.command, r.header("receipt-id")), (Command::Receipt, Some("r1")), "{r:?}");
    let m = sub.recv();
    assert_eq!((m.command, &m.body[..]), (Command::Message, &b"hello"[..]), "{m:?}");
    block_on(metrics_show(&s, &[(DISK, 0.0), (BLOCKED, 0.0)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_the_extra_amqp_and_stomp_connection() {
    let s = Server::start_with(&["--max-connections", "2"]);
    let first = connect(&s).await;
    let _stomp = Client::open_at(s.stomp_addr(), "1.2");
    let err = Connection::connect(&s.url(), ConnectionProperties::default()).await.expect_err("third connection refused");
    assert_eq!(code(&err), 530, "{err:?}");
    assert!(text(&err).contains("node connection limit (2) is reached"), "{err:?}");
    let (_c, reply) = Client::connect_at(s.stomp_addr(), &[("accept-version", "1.2"), ("host", "/"), ("login", "guest"), ("passcode", "guest")]);
    assert_eq!(reply.command, Command::Error, "{reply:?}");
    assert!(String::from_utf8_lossy(&reply.body).contains("node connection limit (2) is reached"), "{reply:?}");

    // A closed connection frees its place.
    first.close(200, "bye".into()).await.unwrap();
    let mut again = None;
    for _ in 0..50 {
        if let Ok(c) = Connection::connect(&s.url(), ConnectionProperties::default()).await {
            again = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = again.expect("a connection after one closed");
    let ch = channel(&again).await;
    declare(&ch, "after-limit").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_max_per_channel_is_a_530() {
    let s = Server::start_with(&["--consumer-max-per-channel", "2"]);
    let (conn, ch) = open(&s).await;
    declare(&ch, "cmax").await;
    let consume = |ch: lapin::Channel, tag: &'static str| async move {
        ch.basic_consume("cmax".into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default()).await
    };
    // (Kept: lapin cancels a consumer when it is dropped.)
    let _a = consume(ch.clone(), "a").await.unwrap();
    let _b = consume(ch.clone(), "b").await.unwrap();
    // The limit is per channel.
    let other = channel(&conn).await;
    let _oa = consume(other.clone(), "a").await.unwrap();
    let _ob = consume(other.clone(), "b").await.unwrap();
    let err = consume(ch.clone(), "c").await.expect_err("third consumer refused");
    assert_eq!(code(&err), 530, "{err:?}");
    assert!(text(&err).contains("reached maximum (2) of consumers per channel"), "{err:?}");
}

/// Resident memory of a process (from /proc/PID/statm).
fn rss_of(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_never_reads_does_not_make_the_broker_buffer_the_queue() {
    const N: usize = 2048;
    const SIZE: usize = 64 * 1024;
    let s = Server::start();
    let (_conn, ch) = open(&s).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    declare_durable(&ch, "slow").await;
    let body = vec![7u8; SIZE];
    let mut pending = Vec::new();
    for _ in 0..N {
        pending.push(publish_confirmed(&ch, "slow", &body).await);
    }
    for c in pending {
        assert!(c.await.unwrap().is_ack());
    }
    // A fresh process (the messages are on disk), so that memory freed
    // after the publishes cannot hide what the consumer costs.
    drop(ch);
    drop(_conn);
    let mut s = s;
    s.restart();
    let (_conn, ch) = open(&s).await;
    wait_ready(&ch, "slow", N as u32).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_of(s.pid());

    // Unlimited prefetch, manual acks, and a socket nobody reads.
    let server = &s;
    let r = tokio::task::block_in_place(|| {
        let mut r = Raw::open_with(server, 0, sluice_codecs::amqp::FieldTable::default());
        r.method(1, Method::ChannelOpen(ChannelOpen::default()));
        assert!(matches!(r.read_method(), Method::ChannelOpenOk(_)));
        r.method(1, Method::BasicConsume(sluice_codecs::amqp::BasicConsume { queue: "slow".into(), ..Default::default() }));
        assert!(matches!(r.read_method(), Method::BasicConsumeOk(_)));
        r
    });
    let mut peak = before;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        peak = peak.max(rss_of(s.pid()));
    }
    let total = (N * SIZE) as u64;
    let grew = peak.saturating_sub(before);
    eprintln!(
        "queue {} MiB; server RSS before {} MiB, peak with the stuck consumer {} MiB (+{} MiB)",
        total >> 20,
        before >> 20,
        peak >> 20,
        grew >> 20
    );
    // The RSS figure is reported, not asserted: bodies already in memory
    // are shared with the deliveries waiting for the socket, so RSS alone
    // would not show a broker that queued everything for this consumer.
    // What the broker took from the queue for the stuck consumer is bounded
    // (at most 512 deliveries waiting for its socket, plus what the kernel
    // buffers): most of the queue is still ready.
    let ready = ch
        .queue_declare("slow".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap()
        .message_count();
    eprintln!("{ready} of {N} messages still ready");
    assert!(ready as usize >= N / 2, "only {ready} of {N} messages left ready: the broker took the queue for a consumer that reads nothing");

    // Nothing was lost: once the consumer is gone, every message is ready again.
    drop(r.sock.shutdown(std::net::Shutdown::Both));
    drop(r);
    wait_ready(&ch, "slow", N as u32).await;
}

#[test]
fn bad_alarm_settings_are_clear_errors_and_a_bad_reload_keeps_the_old_limits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    for bad in ["1.5", "-0.1", "nan"] {
        let flag = format!("--memory-high-watermark={bad}");
        let (code, _, err) = sluice_compat_tests::run_sluice(&["serve", "--data-dir", data, &flag]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("memory_high_watermark must be a fraction of RAM from 0 to 1"), "{err}");
    }

    let conf = Conf::new(DISK_ALARM);
    let s = conf.start();
    block_on(metrics_show(&s, &[(DISK, 1.0)]));
    conf.reload(&s, "disk_free_limit = \"lots\"\n");
    std::thread::sleep(Duration::from_millis(1500));
    let logged = s.stderr.lock().unwrap().iter().any(|l| l.contains("SIGHUP: config not reloaded"));
    assert!(logged, "the failed reload is not logged");
    // Still running, the alarm still on.
    block_on(metrics_show(&s, &[(DISK, 1.0)]));
    conf.reload(&s, NO_ALARM);
    block_on(metrics_show(&s, &[(DISK, 0.0)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_disk_alarm_blocks_the_gateways_publishers() {
    use sluice_compat_tests::{start_gateway, start_node};
    let home = tempfile::tempdir().unwrap();
    let conf = Conf::new(NO_ALARM);
    let n1 = start_node(home.path(), "n1", "n1", "127.0.0.1:0", &[]);
    let seed = n1.addr.clone();
    let n2 = start_node(home.path(), "n2", "n2", "127.0.0.1:0", &["--seeds", &seed, "--config", conf.path.to_str().unwrap()]);
    let n3 = start_node(home.path(), "n3", "n3", "127.0.0.1:0", &["--seeds", &seed]);
    let gw = start_gateway(home.path(), &[&n1.addr, &n2.addr, &n3.addr], &[]);

    let conn = Connection::connect(&gw.url(), ConnectionProperties::default()).await.unwrap();
    let mut events = Box::pin(conn.events_listener());
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    declare_durable(&ch, "cluster-alarm").await;
    assert!(publish_confirmed(&ch, "cluster-alarm", b"before").await.await.unwrap().is_ack());

    // One node runs short of disk: the gateway blocks its publishers.
    conf.reload_pid(n2.child.id(), DISK_ALARM);
    match next_event(&mut events).await {
        lapin::Event::ConnectionBlocked(reason) => assert_eq!(reason, "low on disk"),
        other => panic!("expected connection.blocked, got {other:?}"),
    }
    let publisher = ch.clone();
    let confirm = tokio::spawn(async move { publish_confirmed(&publisher, "cluster-alarm", b"during").await.await.unwrap().is_ack() });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(!confirm.is_finished(), "a publish was confirmed while a node had a disk alarm");

    conf.reload_pid(n2.child.id(), NO_ALARM);
    assert!(matches!(next_event(&mut events).await, lapin::Event::ConnectionUnblocked));
    assert!(tokio::time::timeout(Duration::from_secs(10), confirm).await.expect("confirm after the alarm cleared").unwrap());
    wait_ready(&ch, "cluster-alarm", 2).await;
}
