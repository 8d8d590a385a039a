//! Prometheus metrics on `--metrics`: values scraped over HTTP while lapin
//! clients connect, publish and consume; output checked with promtool.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use sluice_compat_tests::{ctl_status, start_gateway, start_node, NodeProcess};

/// `GET /metrics` over a plain TCP connection.
pub(crate) async fn scrape(addr: SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect to metrics");
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let (head, body) = text.split_once("\r\n\r\n").expect("http response");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        dechunk(body)
    } else {
        body.to_string()
    }
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// The value of the series whose name-and-labels text is exactly `series`.
pub(crate) fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok()).flatten()
    })
}

/// Scrapes until `f` holds (up to 8 s), returning the last scrape.
pub(crate) async fn until(addr: SocketAddr, what: &str, f: impl Fn(&str) -> bool) -> String {
    until_for(addr, 8, what, f).await
}

/// Scrapes until `f` holds (up to `secs`), returning the last scrape.
async fn until_for(addr: SocketAddr, secs: u64, what: &str, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let text = scrape(addr).await;
        if f(&text) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("{what} not seen within {secs} s:\n{text}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn q(name: &str) -> String {
    format!("{{vhost=\"/\",queue=\"{name}\"}}")
}

fn has(text: &str, metric: &str, labels: &str, want: f64) -> bool {
    value(text, &format!("{metric}{labels}")) == Some(want)
}

#[tokio::test]
async fn metrics_track_connections_queues_and_pass_promtool() {
    let server = Server::start();
    let addr = server.metrics_addr();

    // 3 connections, 2 channels on the first.
    let (c1, ch1) = open(&server).await;
    let ch1b = channel(&c1).await;
    let (c2, ch2) = open(&server).await;
    let c3 = connect(&server).await;
    until(addr, "3 connections", |t| value(t, "sluice_connections") == Some(3.0)).await;
    until(addr, "3 channels", |t| value(t, "sluice_channels") == Some(3.0)).await;

    declare(&ch1, "m.q1").await;
    declare(&ch1, "m.gone").await;
    ch1.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..5u8 {
        ch1.basic_publish("".into(), "m.q1".into(), BasicPublishOptions::default(), &[i; 10], BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    publish(&ch1b, "", "m.gone", b"x").await;
    let text = until(addr, "5 ready in m.q1", |t| has(t, "sluice_queue_messages_ready", &q("m.q1"), 5.0)).await;
    assert!(has(&text, "sluice_queue_messages_unacked", &q("m.q1"), 0.0), "{text}");
    assert!(has(&text, "sluice_queue_messages_ready_bytes", &q("m.q1"), 50.0), "{text}");
    assert!(has(&text, "sluice_queue_messages_published_total", &q("m.q1"), 5.0), "{text}");
    assert!(text.contains("sluice_publish_confirm_seconds_count 5"), "{text}");

    // A consumer with prefetch 2, not acking: 2 unacked, 3 ready.
    ch2.basic_qos(2, BasicQosOptions::default()).await.unwrap();
    let mut consumer =
        ch2.basic_consume("m.q1".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let text = until(addr, "2 unacked", |t| {
        has(t, "sluice_queue_messages_unacked", &q("m.q1"), 2.0) && has(t, "sluice_queue_messages_ready", &q("m.q1"), 3.0)
    })
    .await;
    assert_eq!(value(&text, "sluice_consumers"), Some(1.0), "{text}");
    // Ack everything as it comes.
    let mut acked = 0;
    while acked < 5 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        acked += 1;
    }
    let text = until(addr, "drained and acked", |t| {
        has(t, "sluice_queue_messages_ready", &q("m.q1"), 0.0)
            && has(t, "sluice_queue_messages_unacked", &q("m.q1"), 0.0)
            && has(t, "sluice_queue_messages_acked_total", &q("m.q1"), 5.0)
    })
    .await;
    assert!(has(&text, "sluice_queue_messages_delivered_total", &q("m.q1"), 5.0), "{text}");
    assert!(has(&text, "sluice_queue_consumers", &q("m.q1"), 1.0), "{text}");
    assert!(has(&text, "sluice_queue_messages_ready", &q("m.gone"), 1.0), "{text}");
    assert!(text.contains("sluice_storage_batch_writes_count"), "{text}");

    // A refused login is counted.
    let bad = format!("amqp://guest:wrong@{}/%2f", server.amqp);
    assert!(lapin::Connection::connect(&bad, lapin::ConnectionProperties::default()).await.is_err());
    until(addr, "auth failure", |t| value(t, "sluice_auth_failures_total{protocol=\"amqp\"}") == Some(1.0)).await;

    // A deleted queue's series go away; closed connections are uncounted.
    ch1b.queue_delete("m.gone".into(), QueueDeleteOptions::default()).await.unwrap();
    c3.close(200, "bye".into()).await.unwrap();
    let text = until(addr, "m.gone removed", |t| !t.contains("queue=\"m.gone\"")).await;
    assert!(has(&text, "sluice_queue_messages_ready", &q("m.q1"), 0.0), "{text}");
    until(addr, "2 connections", |t| value(t, "sluice_connections") == Some(2.0)).await;

    promtool(&scrape(addr).await);
    drop((c1, c2));
}

fn dead_letter_args(target: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(target.into()));
    args
}

/// basic.get (with acks) then basic.reject without requeue, `n` times:
/// every message is dead-lettered.
async fn get_and_reject(ch: &lapin::Channel, queue: &str, n: usize) {
    for _ in 0..n {
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(m) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await.unwrap() {
                    return m;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("a message to reject");
        got.delivery.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    }
}

#[tokio::test]
async fn metrics_count_dead_letters_usage_deliver_latency_and_node_figures() {
    let server = Server::start();
    let addr = server.metrics_addr();
    let (c, ch) = open(&server).await;
    declare(&ch, "m.dlq").await;
    ch.queue_declare("m.src".into(), QueueDeclareOptions::default(), dead_letter_args("m.dlq")).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    // 3 messages of 7 bytes, rejected: 3 dead letters.
    for i in 0..3u8 {
        let body = [i; 7];
        let c = ch.basic_publish("".into(), "m.src".into(), BasicPublishOptions::default(), &body, BasicProperties::default());
        assert!(c.await.unwrap().await.unwrap().is_ack());
    }
    get_and_reject(&ch, "m.src", 3).await;
    let text = until(addr, "3 dead letters", |t| {
        has(t, "sluice_queue_messages_dead_lettered_total", &q("m.src"), 3.0) && has(t, "sluice_queue_messages_ready", &q("m.dlq"), 3.0)
    })
    .await;
    assert!(has(&text, "sluice_queue_messages_dead_lettered_total", &q("m.dlq"), 0.0), "{text}");
    // Then the 3 dead letters are fetched: 6 deliveries, all first ones.
    for _ in 0..3 {
        let m = ch.basic_get("m.dlq".into(), BasicGetOptions { no_ack: true }).await.unwrap();
        assert!(m.is_some(), "a dead letter to get");
    }
    // Dead letters are not publishes of the user; deliveries count bodies.
    let text = until(addr, "usage of guest", |t| {
        value(t, "sluice_user_messages_published_total{user=\"guest\"}") == Some(3.0)
            && value(t, "sluice_user_messages_delivered_total{user=\"guest\"}") == Some(6.0)
    })
    .await;
    assert_eq!(value(&text, "sluice_user_published_bytes_total{user=\"guest\"}"), Some(21.0), "{text}");
    assert_eq!(value(&text, "sluice_user_delivered_bytes_total{user=\"guest\"}"), Some(42.0), "{text}");
    assert_eq!(value(&text, "sluice_vhost_messages_published_total{vhost=\"/\"}"), Some(3.0), "{text}");
    assert_eq!(value(&text, "sluice_vhost_published_bytes_total{vhost=\"/\"}"), Some(21.0), "{text}");
    assert_eq!(value(&text, "sluice_vhost_messages_delivered_total{vhost=\"/\"}"), Some(6.0), "{text}");
    assert_eq!(value(&text, "sluice_vhost_delivered_bytes_total{vhost=\"/\"}"), Some(42.0), "{text}");
    assert_eq!(value(&text, "sluice_publish_deliver_seconds_count"), Some(6.0), "{text}");
    // Stamped by this machine's clock a moment ago.
    let sum = value(&text, "sluice_publish_deliver_seconds_sum").expect("latency sum");
    assert!((0.0..60.0).contains(&sum), "publish-to-deliver sum {sum}:\n{text}");

    // A redelivery is not a first delivery: the latency count stays.
    publish(&ch, "", "m.dlq", b"again").await;
    let m = ch.basic_get("m.dlq".into(), BasicGetOptions { no_ack: false }).await.unwrap().expect("a message");
    m.delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    let m = ch.basic_get("m.dlq".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("the requeued message");
    assert!(m.delivery.redelivered);
    let text = until(addr, "8 deliveries", |t| value(t, "sluice_user_messages_delivered_total{user=\"guest\"}") == Some(8.0)).await;
    assert_eq!(value(&text, "sluice_publish_deliver_seconds_count"), Some(7.0), "{text}");

    // The usage of a closed connection is kept.
    c.close(200, "bye".into()).await.unwrap();
    until(addr, "0 connections", |t| value(t, "sluice_connections") == Some(0.0)).await;
    let (_c2, ch2) = open(&server).await;
    publish(&ch2, "", "m.dlq", b"12345").await;
    let text = until(addr, "usage after a reconnect", |t| {
        value(t, "sluice_user_messages_published_total{user=\"guest\"}") == Some(5.0)
    })
    .await;
    assert_eq!(value(&text, "sluice_user_published_bytes_total{user=\"guest\"}"), Some(31.0), "{text}");

    // `sluice serve` is a cluster of one node: its replication figures.
    assert_eq!(value(&text, "sluice_queue_replicas{role=\"leader\"}"), Some(2.0), "{text}");
    assert_eq!(value(&text, "sluice_queue_replicas{role=\"follower\"}"), Some(0.0), "{text}");
    assert_eq!(value(&text, "sluice_cluster_members{state=\"up\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "sluice_cluster_members{state=\"down\"}"), Some(0.0), "{text}");
    assert_eq!(value(&text, "sluice_replication_lag_entries"), Some(0.0), "{text}");
    assert_eq!(value(&text, "sluice_meta_leader"), Some(1.0), "{text}");
    // The metadata group and the two queues each elected a leader.
    let changes = value(&text, "sluice_raft_leader_changes_total").expect("leader changes");
    assert!(changes >= 3.0, "{text}");
    promtool(&text);
}

/// Whether the node at `addr` leads `queue` (`sluice ctl status`).
fn leads(home: &std::path::Path, addr: &str, queue: &str) -> bool {
    ctl_status(home, addr).is_some_and(|s| {
        s.lines().any(|l| l.strip_prefix("leading: ").is_some_and(|names| names.split(", ").any(|n| n == queue)))
    })
}

/// Sum of one series over the nodes' metrics (absent counts 0).
async fn sum_over(addrs: &[SocketAddr], series: &str) -> f64 {
    let mut sum = 0.0;
    for a in addrs {
        sum += value(&scrape(*a).await, series).unwrap_or(0.0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_metrics_show_membership_failover_and_replication_lag() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let m = ["--metrics", "127.0.0.1:0"];
    let n1 = start_node(h, "n1", "n1", "127.0.0.1:0", &m);
    let seed = n1.addr.clone();
    let n2 = start_node(h, "n2", "n2", "127.0.0.1:0", &["--seeds", &seed, "--metrics", "127.0.0.1:0"]);
    let n3 = start_node(h, "n3", "n3", "127.0.0.1:0", &["--seeds", &seed, "--metrics", "127.0.0.1:0"]);
    let mut nodes: Vec<Option<NodeProcess>> = vec![Some(n1), Some(n2), Some(n3)];
    let addrs: Vec<String> = nodes.iter().flatten().map(|n| n.addr.clone()).collect();
    let metrics: Vec<SocketAddr> = nodes.iter().flatten().map(|n| n.metrics.expect("a node metrics line")).collect();
    for a in &metrics {
        until_for(*a, 30, "3 members up", |t| {
            value(t, "sluice_cluster_members{state=\"up\"}") == Some(3.0)
                && value(t, "sluice_cluster_members{state=\"down\"}") == Some(0.0)
        })
        .await;
    }

    // Dead letters through a gateway: counted by the source's leader and
    // read by the gateway; the enqueue stamp crosses the node protocol.
    let all: Vec<&str> = addrs.iter().map(String::as_str).collect();
    let gw = start_gateway(h, &all, &[]);
    let gw_metrics = gw.metrics.expect("a gateway metrics line");
    let conn = lapin::Connection::connect(&gw.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("m.dlq".into(), durable, FieldTable::default()).await.unwrap();
    ch.queue_declare("m.src".into(), durable, dead_letter_args("m.dlq")).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..3u8 {
        let body = [i; 4];
        let c = ch.basic_publish("".into(), "m.src".into(), BasicPublishOptions::default(), &body, persistent());
        assert!(c.await.unwrap().await.unwrap().is_ack());
    }
    get_and_reject(&ch, "m.src", 3).await;
    let text = until(gw_metrics, "3 dead letters at the gateway", |t| {
        has(t, "sluice_queue_messages_dead_lettered_total", &q("m.src"), 3.0) && has(t, "sluice_queue_messages_ready", &q("m.dlq"), 3.0)
    })
    .await;
    assert_eq!(value(&text, "sluice_publish_deliver_seconds_count"), Some(3.0), "{text}");
    let sum = value(&text, "sluice_publish_deliver_seconds_sum").expect("latency sum");
    assert!((0.0..60.0).contains(&sum), "publish-to-deliver sum {sum}:\n{text}");
    assert_eq!(value(&text, "sluice_user_messages_published_total{user=\"guest\"}"), Some(3.0), "{text}");
    promtool(&text);

    // Two queues, three replicas each: 2 leaders and 4 followers in all.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let leaders = sum_over(&metrics, "sluice_queue_replicas{role=\"leader\"}").await;
        let followers = sum_over(&metrics, "sluice_queue_replicas{role=\"follower\"}").await;
        if (leaders, followers) == (2.0, 4.0) {
            break;
        }
        assert!(Instant::now() < deadline, "replicas: {leaders} leading, {followers} following");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Kill the leader of m.src: the survivors see a leader change.
    let leader = (0..3).find(|i| leads(h, &addrs[*i], "m.src")).expect("a leader of m.src");
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();
    let survivor_metrics: Vec<SocketAddr> = survivors.iter().map(|i| metrics[*i]).collect();
    let before = sum_over(&survivor_metrics, "sluice_raft_leader_changes_total").await;
    assert!(before >= 1.0, "no leader change counted yet");
    drop(nodes[leader].take());
    let deadline = Instant::now() + Duration::from_secs(30);
    let new_leader = loop {
        if let Some(i) = survivors.iter().copied().find(|i| leads(h, &addrs[*i], "m.src")) {
            break i;
        }
        assert!(Instant::now() < deadline, "no new leader of m.src");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    // Exported within the collector's second.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let after = sum_over(&survivor_metrics, "sluice_raft_leader_changes_total").await;
        if after > before {
            break;
        }
        assert!(Instant::now() < deadline, "leader changes on the survivors: {before} before the kill, {after} after");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for a in &survivor_metrics {
        until_for(*a, 20, "2 members up, 1 down", |t| {
            value(t, "sluice_cluster_members{state=\"up\"}") == Some(2.0)
                && value(t, "sluice_cluster_members{state=\"down\"}") == Some(1.0)
        })
        .await;
    }

    // 20 confirmed publishes the dead node does not get: the new leader's
    // followers lag by at least 20 entries.
    let conn2 = lapin::Connection::connect(&gw.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let ch2 = conn2.create_channel().await.unwrap();
    ch2.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..20u8 {
        let body = [i; 4];
        let c = ch2.basic_publish("".into(), "m.src".into(), BasicPublishOptions::default(), &body, persistent());
        let confirm = tokio::time::timeout(Duration::from_secs(20), async { c.await.unwrap().await.unwrap() }).await;
        assert!(confirm.expect("a confirm").is_ack());
    }
    let text = until_for(metrics[new_leader], 10, "lag of 20 entries", |t| {
        value(t, "sluice_replication_lag_entries").is_some_and(|lag| lag >= 20.0)
    })
    .await;
    promtool(&text);
    drop((conn, conn2));
}

#[tokio::test]
async fn node_metrics_are_off_unless_configured() {
    let home = tempfile::tempdir().unwrap();
    let h = home.path();
    let plain = start_node(h, "a", "a", "127.0.0.1:0", &[]);
    assert!(plain.metrics.is_none(), "a node without --metrics printed a metrics line");
    // The `metrics` key of the node's config file.
    let cfg = h.join("node.toml");
    std::fs::write(&cfg, "metrics = \"127.0.0.1:0\"\n").unwrap();
    let node = start_node(h, "b", "b", "127.0.0.1:0", &["--config", cfg.to_str().unwrap()]);
    let addr = node.metrics.expect("a metrics line from the config file");
    let text = until_for(addr, 20, "this node up", |t| value(t, "sluice_cluster_members{state=\"up\"}") == Some(1.0)).await;
    assert_eq!(value(&text, "sluice_meta_leader"), Some(1.0), "{text}");
    promtool(&text);
    let dir = h.join("c");
    let (code, _out, err) =
        sluice_compat_tests::run_sluice(&["node", "--id", "c", "--listen", "127.0.0.1:0", "--data-dir", dir.to_str().unwrap(), "--metrics", "nope"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("metrics address 'nope'"), "{err}");
    drop((plain, node));
}

/// `promtool check metrics` on the scrape; installs the Debian package
/// `prometheus` when missing and possible, else says why it is skipped.
fn promtool(text: &str) {
    let have = || std::process::Command::new("promtool").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have() && unsafe { libc::geteuid() } == 0 {
        let _ = std::process::Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "prometheus"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output();
    }
    if !have() {
        eprintln!("SKIPPED: promtool (Debian package prometheus) is not installed and could not be installed; output not checked");
        return;
    }
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
