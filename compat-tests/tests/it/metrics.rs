//! Prometheus metrics on `--metrics`: values scraped over HTTP while lapin
//! clients connect, publish and consume; output checked with promtool.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

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
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let text = scrape(addr).await;
        if f(&text) {
            return text;
        }
        if Instant::now() > deadline {
            panic!("{what} not seen within 8 s:\n{text}");
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
