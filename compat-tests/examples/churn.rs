//! End-to-end queue churn: publishers with confirms (persistent messages,
//! durable queue) and consumers with manual acks run together, phase after
//! phase, to show that a queue which has carried millions of messages does
//! not get slower and gives its disk space back.
//!
//! `cargo run --release -p sluice-compat-tests --example churn -- URL
//! [messages_per_phase] [phases] [size] [DATA_DIR]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

const PUBLISHERS: u64 = 4;
const CONSUMERS: usize = 2;

fn du(dir: &str) -> String {
    std::process::Command::new("du")
        .args(["-sh", dir])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("?").to_string())
        .unwrap_or_else(|_| "?".into())
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args.get(1).cloned().unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let per_phase: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1_000_000);
    let phases: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(2);
    let size: usize = args.get(4).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let data_dir = args.get(5).cloned();

    let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("churn".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    ch.queue_purge("churn".into(), QueuePurgeOptions::default()).await.unwrap();

    let consumed = Arc::new(AtomicU64::new(0));
    for _ in 0..CONSUMERS {
        let url = url.clone();
        let consumed = consumed.clone();
        tokio::spawn(async move {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.basic_qos(200, BasicQosOptions::default()).await.unwrap();
            let mut c = ch.basic_consume("churn".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
            while let Some(Ok(d)) = c.next().await {
                d.ack(BasicAckOptions::default()).await.unwrap();
                consumed.fetch_add(1, Ordering::Relaxed);
            }
            drop(conn);
        });
    }

    for phase in 1..=phases {
        let start = Instant::now();
        let target = phase * per_phase;
        let mut tasks = Vec::new();
        for _ in 0..PUBLISHERS {
            let url = url.clone();
            tasks.push(tokio::spawn(async move {
                let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
                let ch = conn.create_channel().await.unwrap();
                ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
                let body = vec![b'x'; size];
                let props = BasicProperties::default().with_delivery_mode(2);
                let mut window = VecDeque::new();
                for _ in 0..per_phase / PUBLISHERS {
                    let c = ch
                        .basic_publish("".into(), "churn".into(), BasicPublishOptions::default(), &body, props.clone())
                        .await
                        .unwrap();
                    window.push_back(c);
                    if window.len() >= 100 {
                        assert!(window.pop_front().unwrap().await.unwrap().is_ack());
                    }
                }
                for c in window {
                    assert!(c.await.unwrap().is_ack());
                }
                conn.close(200, "".into()).await.ok();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let published_at = start.elapsed().as_secs_f64();
        while consumed.load(Ordering::Relaxed) < target - (per_phase % PUBLISHERS) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "phase {phase}: {per_phase} persistent {size}-byte messages published+confirmed in {published_at:.1} s, consumed+acked in {elapsed:.1} s = {:.0} msgs/s end to end{}",
            per_phase as f64 / elapsed,
            data_dir.as_deref().map(|d| format!("; data dir {}", du(d))).unwrap_or_default()
        );
    }
    if let Some(d) = &data_dir {
        tokio::time::sleep(std::time::Duration::from_secs(10)).await;
        println!("10 s after the last phase: data dir {}", du(d));
    }
}
