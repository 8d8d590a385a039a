//! A small AMQP client for tests that run inside network namespaces (where
//! the test process itself cannot connect): `ip netns exec NS
//! cluster_client MODE ...`. Prints one line per event on stdout, flushed.
//!
//! - `declare URL QUEUE`: declares a durable queue, prints `declared`.
//! - `publish URL QUEUE FROM TO`: publishes the numbers FROM..TO (u32 big
//!   endian bodies, persistent) one at a time with confirms, reconnecting
//!   after errors; prints `confirmed N` for each ack and `done` at the end.
//! - `consume URL QUEUE IDLE_MS`: consumes with manual acks; prints `got N
//!   R` (R = 1 if redelivered) per message; exits after IDLE_MS without one.

use std::io::Write;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).cloned().ok_or_else(|| anyhow::anyhow!("missing argument {i}: see the module docs"));
    let (mode, url, queue) = (arg(1)?, arg(2)?, arg(3)?);
    match mode.as_str() {
        "declare" => {
            let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
                .await?;
            say("declared".into());
        }
        "publish" => {
            let (from, to): (u32, u32) = (arg(4)?.parse()?, arg(5)?.parse()?);
            let mut i = from;
            while i < to {
                let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let Ok(ch) = conn.create_channel().await else { continue };
                if ch.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
                    continue;
                }
                while i < to {
                    let props = BasicProperties::default().with_delivery_mode(2);
                    let Ok(confirm) =
                        ch.basic_publish("".into(), queue.as_str().into(), BasicPublishOptions::default(), &i.to_be_bytes(), props).await
                    else {
                        break;
                    };
                    match confirm.await {
                        Ok(c) if c.is_ack() => {
                            say(format!("confirmed {i}"));
                            i += 1;
                        }
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
            say("done".into());
        }
        "consume" => {
            let idle = Duration::from_millis(arg(4)?.parse()?);
            let conn = Connection::connect(&url, ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            ch.basic_qos(100, BasicQosOptions::default()).await?;
            let mut consumer =
                ch.basic_consume(queue.as_str().into(), "drain".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
            while let Ok(Some(Ok(d))) = tokio::time::timeout(idle, consumer.next()).await {
                let n = d.data.get(..4).and_then(|b| <[u8; 4]>::try_from(b).ok()).map_or(u32::MAX, u32::from_be_bytes);
                say(format!("got {n} {}", u8::from(d.redelivered)));
                d.ack(BasicAckOptions::default()).await?;
            }
        }
        other => anyhow::bail!("unknown mode {other}"),
    }
    Ok(())
}
