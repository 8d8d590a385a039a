//! Fills a queue, then drains it: `cargo run --release -p sluice-compat-tests
//! --example drain -- URL [messages] [size] [consumers] [prefetch] [ack_every]`.
//! Reports the fill and drain rates. Works against any AMQP broker.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let url = a.get(1).cloned().unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let n: u64 = a.get(2).and_then(|s| s.parse().ok()).unwrap_or(200_000);
    let size: usize = a.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let consumers: u64 = a.get(4).and_then(|s| s.parse().ok()).unwrap_or(1);
    let prefetch: u16 = a.get(5).and_then(|s| s.parse().ok()).unwrap_or(200);
    let ack_every: u64 = a.get(6).and_then(|s| s.parse().ok()).unwrap_or(1);
    let queue = format!("drain-{}", std::process::id());

    let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(queue.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let body = vec![b'x'; size];
    let start = Instant::now();
    let mut window = VecDeque::new();
    for _ in 0..n {
        window.push_back(
            ch.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &body, BasicProperties::default())
                .await
                .unwrap(),
        );
        if window.len() >= 500 {
            window.pop_front().unwrap().await.unwrap();
        }
    }
    for c in window {
        c.await.unwrap();
    }
    let fill = start.elapsed().as_secs_f64();

    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let url = url.clone();
        let queue = queue.clone();
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.basic_qos(prefetch, BasicQosOptions::default()).await.unwrap();
            let mut c = ch.basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
            let mut k = 0u64;
            while done.load(Ordering::Relaxed) < n {
                let Ok(Some(Ok(d))) = tokio::time::timeout(std::time::Duration::from_secs(2), c.next()).await else { break };
                k += 1;
                if k.is_multiple_of(ack_every) {
                    d.ack(BasicAckOptions { multiple: ack_every > 1 }).await.unwrap();
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let drain = start.elapsed().as_secs_f64();
    println!(
        "{n} × {size} B: fill {:.0} msgs/s, drain {:.0} msgs/s ({consumers} consumers, prefetch {prefetch}, ack every {ack_every})",
        n as f64 / fill,
        done.load(Ordering::Relaxed) as f64 / drain
    );
    ch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await.ok();
}
