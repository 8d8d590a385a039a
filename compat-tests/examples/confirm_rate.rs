//! Measures confirmed publish throughput of persistent messages to a
//! durable queue: `cargo run --release -p sluice-compat-tests --example
//! confirm_rate -- AMQP_URL [publishers] [seconds] [window] [size]`.
//!
//! `KEEP=1` keeps the queue (and its messages) at the end; `TRANSIENT=1`
//! publishes non-persistent messages. Works against any AMQP 0-9-1 broker (used side by side with RabbitMQ
//! for docs/storage.md). The full load tool is `sluice bench` (issue #8).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let publishers: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(8);
    let seconds: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(10);
    let window: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(100);
    let size: usize = args.get(5).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let queue = format!("confirm-rate-{}", std::process::id());

    let conn = Connection::connect(&url, ConnectionProperties::default()).await.expect("connect");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();

    let confirmed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for _ in 0..publishers {
        let url = url.clone();
        let queue = queue.clone();
        let confirmed = confirmed.clone();
        tasks.push(tokio::spawn(async move {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            let body = vec![b'x'; size];
            let mode = if std::env::var("TRANSIENT").is_ok() { 1 } else { 2 };
            let props = BasicProperties::default().with_delivery_mode(mode);
            let mut pending = VecDeque::new();
            while Instant::now() < deadline {
                let c = ch
                    .basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, props.clone())
                    .await
                    .unwrap();
                pending.push_back(c);
                if pending.len() >= window {
                    assert!(pending.pop_front().unwrap().await.unwrap().is_ack());
                    confirmed.fetch_add(1, Ordering::Relaxed);
                }
            }
            for c in pending {
                assert!(c.await.unwrap().is_ack());
                confirmed.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let start = Instant::now();
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = start.elapsed().as_secs_f64();
    let n = confirmed.load(Ordering::Relaxed);
    println!(
        "{n} confirmed {size}-byte messages in {elapsed:.1} s = {:.0} msgs/s ({publishers} publishers, window {window})",
        n as f64 / elapsed
    );
    if std::env::var("KEEP").is_err() {
        ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    }
}
