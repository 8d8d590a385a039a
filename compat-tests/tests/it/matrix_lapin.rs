//! The lapin row of the compatibility matrix (see `matrix.rs`): the same
//! scenarios as the other clients' scripts, in Rust, reported the same way.
//! (The amqp_*.rs tests cover lapin in more depth.)

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use serde_json::{json, Value};
use sluice_compat_tests::Server;

const CLIENT: &str = "lapin";

async fn connect(url: &str) -> Result<(Connection, Channel)> {
    let c = Connection::connect(url, ConnectionProperties::default()).await?;
    let ch = c.create_channel().await?;
    Ok((c, ch))
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn declare(ch: &Channel, q: &str, args: &[(&str, AMQPValue)]) -> Result<u32> {
    Ok(ch.queue_declare(q.into(), QueueDeclareOptions::default(), table(args)).await?.message_count())
}

async fn count(ch: &Channel, q: &str) -> Result<u32> {
    let opts = QueueDeclareOptions { passive: true, ..Default::default() };
    Ok(ch.queue_declare(q.into(), opts, FieldTable::default()).await?.message_count())
}

async fn publish(ch: &Channel, x: &str, key: &str, body: &[u8], props: BasicProperties) -> Result<()> {
    ch.basic_publish(x.into(), key.into(), BasicPublishOptions::default(), body, props).await?;
    Ok(())
}

async fn drain(ch: &Channel, q: &str) -> Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while let Some(m) = ch.basic_get(q.into(), BasicGetOptions { no_ack: true }).await? {
        out.push(m.delivery.data.clone());
    }
    Ok(out)
}

fn bodies(v: &[&str]) -> Vec<Vec<u8>> {
    v.iter().map(|s| s.as_bytes().to_vec()).collect()
}

async fn declare_bind(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    let mut qs = Vec::new();
    for (kind, key, args) in [
        (lapin::ExchangeKind::Direct, "k1", vec![]),
        (lapin::ExchangeKind::Fanout, "", vec![]),
        (lapin::ExchangeKind::Topic, "a.#.z", vec![]),
        (lapin::ExchangeKind::Headers, "", vec![("x-match", text("all")), ("h", text("1"))]),
    ] {
        let x = format!("lp.{kind:?}").to_lowercase();
        ch.exchange_declare(x.as_str().into(), kind, ExchangeDeclareOptions::default(), FieldTable::default()).await?;
        let q = ch
            .queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
            .await?;
        ch.queue_bind(q.name().clone(), x.as_str().into(), key.into(), QueueBindOptions::default(), table(&args)).await?;
        qs.push((x, q.name().to_string()));
    }
    let hdr = |v: &str| BasicProperties::default().with_headers(table(&[("h", text(v))]));
    publish(&ch, "lp.direct", "k1", b"d", BasicProperties::default()).await?;
    publish(&ch, "lp.direct", "k2", b"d-miss", BasicProperties::default()).await?;
    publish(&ch, "lp.fanout", "x", b"f", BasicProperties::default()).await?;
    publish(&ch, "lp.topic", "a.b.c.z", b"t", BasicProperties::default()).await?;
    publish(&ch, "lp.topic", "a.b.c", b"t-miss", BasicProperties::default()).await?;
    publish(&ch, "lp.headers", "", b"h", hdr("1")).await?;
    publish(&ch, "lp.headers", "", b"h-miss", hdr("2")).await?;
    for ((x, q), want) in qs.iter().zip(["d", "f", "t", "h"]) {
        let got = drain(&ch, q).await?;
        ensure!(got == bodies(&[want]), "{x}: {got:?}");
    }
    Ok(String::new())
}

async fn publish_consume_ack(url: &str) -> Result<String> {
    let (c, ch) = connect(url).await?;
    declare(&ch, "lp.ack", &[]).await?;
    for i in 0..20 {
        publish(&ch, "", "lp.ack", format!("m{i}").as_bytes(), BasicProperties::default()).await?;
    }
    let mut consumer =
        ch.basic_consume("lp.ack".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    for i in 0..20 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await?.context("consumer ended")??;
        ensure!(d.data == format!("m{i}").as_bytes(), "order at {i}");
        if i < 10 {
            d.ack(BasicAckOptions::default()).await?;
        }
    }
    ch.close(200, "bye".into()).await?;
    let ch = c.create_channel().await?;
    let mut consumer =
        ch.basic_consume("lp.ack".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    for i in 10..20 {
        let d = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await?.context("consumer ended")??;
        ensure!(d.redelivered && d.data == format!("m{i}").as_bytes(), "redelivery {i}");
        d.ack(BasicAckOptions::default()).await?;
    }
    ensure!(count(&ch, "lp.ack").await? == 0, "queue not empty after acks");
    Ok(String::new())
}

async fn prefetch(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    declare(&ch, "lp.prefetch", &[]).await?;
    for i in 0..10 {
        publish(&ch, "", "lp.prefetch", format!("{i}").as_bytes(), BasicProperties::default()).await?;
    }
    ch.basic_qos(3, BasicQosOptions::default()).await?;
    let mut consumer =
        ch.basic_consume("lp.prefetch".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let mut got = Vec::new();
    // Waits for `want` deliveries (5 s at most), then 300 ms for any extra one.
    let collect = async |consumer: &mut lapin::Consumer, got: &mut Vec<lapin::message::Delivery>, want: usize| {
        let start = tokio::time::Instant::now();
        let mut deadline = start + Duration::from_secs(5);
        loop {
            if got.len() >= want && deadline > tokio::time::Instant::now() + Duration::from_millis(300) {
                deadline = tokio::time::Instant::now() + Duration::from_millis(300);
            }
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                d = consumer.next() => if let Some(Ok(d)) = d { got.push(d) } else { break },
            }
        }
    };
    collect(&mut consumer, &mut got, 3).await;
    ensure!(got.len() == 3, "{} unacked deliveries, prefetch 3 allows 3", got.len());
    got[0].ack(BasicAckOptions::default()).await?;
    collect(&mut consumer, &mut got, 4).await;
    ensure!(got.len() == 4, "{} unacked deliveries, prefetch 3 allows 4", got.len());
    Ok(String::new())
}

async fn confirms(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    declare(&ch, "lp.confirm", &[]).await?;
    declare(&ch, "lp.full", &[("x-max-length", AMQPValue::LongInt(1)), ("x-overflow", text("reject-publish"))]).await?;
    let mut pending = Vec::new();
    for i in 0..50u32 {
        let p = BasicProperties::default();
        pending.push(ch.basic_publish("".into(), "lp.confirm".into(), BasicPublishOptions::default(), &i.to_be_bytes(), p).await?);
    }
    for c in pending {
        ensure!(c.await?.is_ack(), "a publish was nacked");
    }
    let p = || BasicProperties::default();
    let first = ch.basic_publish("".into(), "lp.full".into(), BasicPublishOptions::default(), b"1", p()).await?.await?;
    let second = ch.basic_publish("".into(), "lp.full".into(), BasicPublishOptions::default(), b"2", p()).await?.await?;
    ensure!(first.is_ack() && second.is_nack(), "full queue: {first:?} {second:?}");
    ensure!(count(&ch, "lp.confirm").await? == 50, "50 confirmed messages");
    Ok(String::new())
}

async fn mandatory_return(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm =
        ch.basic_publish("amq.direct".into(), "nowhere".into(), opts, b"r", BasicProperties::default()).await?.await?;
    let ret = confirm.take_message().context("the message was not returned")?;
    ensure!(ret.reply_code == 312 && ret.reply_text.as_str() == "NO_ROUTE" && ret.delivery.data == b"r", "{ret:?}");
    Ok(String::new())
}

async fn dead_letter(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    declare(&ch, "lp.dlq", &[]).await?;
    declare(&ch, "lp.src", &[("x-dead-letter-exchange", text("")), ("x-dead-letter-routing-key", text("lp.dlq"))]).await?;
    publish(&ch, "", "lp.src", b"dead", BasicProperties::default()).await?;
    let m = ch.basic_get("lp.src".into(), BasicGetOptions::default()).await?.context("no message")?;
    m.delivery.reject(BasicRejectOptions { requeue: false }).await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    let d = loop {
        if let Some(d) = ch.basic_get("lp.dlq".into(), BasicGetOptions { no_ack: true }).await? {
            break d;
        }
        ensure!(Instant::now() < deadline, "no dead letter");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let headers = d.delivery.properties.headers().clone().context("no headers")?;
    let death = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().first().cloned(),
        _ => None,
    };
    let Some(AMQPValue::FieldTable(death)) = death else { anyhow::bail!("no x-death: {headers:?}") };
    let reason = death.inner().get("reason").cloned();
    ensure!(d.delivery.data == b"dead" && reason == Some(text("rejected")), "{reason:?}");
    Ok(String::new())
}

async fn ttl(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    declare(&ch, "lp.ttl", &[("x-message-ttl", AMQPValue::LongInt(200))]).await?;
    declare(&ch, "lp.exp", &[]).await?;
    publish(&ch, "", "lp.ttl", b"gone", BasicProperties::default()).await?;
    publish(&ch, "", "lp.exp", b"short", BasicProperties::default().with_expiration("100".into())).await?;
    publish(&ch, "", "lp.exp", b"keep", BasicProperties::default()).await?;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    ensure!(drain(&ch, "lp.ttl").await?.is_empty(), "x-message-ttl did not expire");
    let left = drain(&ch, "lp.exp").await?;
    ensure!(left == bodies(&["keep"]), "per-message expiration {left:?}");
    Ok(String::new())
}

async fn priority(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    declare(&ch, "lp.prio", &[("x-max-priority", AMQPValue::ShortShortUInt(10))]).await?;
    for (i, p) in [1u8, 5, 9, 0, 5].into_iter().enumerate() {
        publish(&ch, "", "lp.prio", format!("p{p}-{i}").as_bytes(), BasicProperties::default().with_priority(p)).await?;
    }
    let got = drain(&ch, "lp.prio").await?;
    ensure!(got == bodies(&["p9-2", "p5-1", "p5-4", "p1-0", "p0-3"]), "order {got:?}");
    Ok(String::new())
}

async fn transactions(url: &str) -> Result<String> {
    let (_c, ch) = connect(url).await?;
    declare(&ch, "lp.tx", &[]).await?;
    ch.tx_select().await?;
    publish(&ch, "", "lp.tx", b"rolled-back", BasicProperties::default()).await?;
    ch.tx_rollback().await?;
    publish(&ch, "", "lp.tx", b"committed", BasicProperties::default()).await?;
    ensure!(count(&ch, "lp.tx").await? == 0, "publish visible before commit");
    ch.tx_commit().await?;
    ensure!(drain(&ch, "lp.tx").await? == bodies(&["committed"]), "commit");
    Ok(String::new())
}

async fn reconnect(s: &mut Server) -> Result<String> {
    let (c, ch) = connect(&s.url()).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let opts = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare("lp.durable".into(), opts, FieldTable::default()).await?;
    for i in 0..3 {
        let p = BasicProperties::default().with_delivery_mode(2);
        let body = format!("s{i}");
        let confirm = ch.basic_publish("".into(), "lp.durable".into(), BasicPublishOptions::default(), body.as_bytes(), p);
        ensure!(confirm.await?.await?.is_ack(), "nack");
    }
    s.restart_same_ports();
    ensure!(count(&ch, "lp.durable").await.is_err(), "the old connection still works after the restart");
    drop(c);
    let (_c, ch) = connect(&s.url()).await?;
    let got = drain(&ch, "lp.durable").await?;
    ensure!(got == bodies(&["s0", "s1", "s2"]), "after restart {got:?}");
    Ok(String::new())
}

async fn large(url: &str) -> Result<String> {
    let body: Vec<u8> = (0..16 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let (_c, ch) = connect(url).await?;
    declare(&ch, "lp.large", &[]).await?;
    publish(&ch, "", "lp.large", &body, BasicProperties::default()).await?;
    let mut consumer =
        ch.basic_consume("lp.large".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await?;
    let d = tokio::time::timeout(Duration::from_secs(20), consumer.next()).await?.context("consumer ended")??;
    ensure!(d.data == body, "{} bytes, content differs", d.data.len());
    d.ack(BasicAckOptions::default()).await?;
    Ok(String::new())
}

async fn connections_500(url: &str) -> Result<String> {
    let t = Instant::now();
    // One task drives all 500 handshakes (lapin in a debug build needs ~25 ms
    // of client CPU per connection: with 500 tasks at once some clients did
    // not finish within the broker's 10 s handshake timeout, as RabbitMQ's).
    let conns = futures_util::future::try_join_all((0..500).map(|_| connect(url))).await?;
    let opened = t.elapsed().as_secs_f64();
    declare(&conns[0].1, "lp.c500", &[]).await?;
    for (i, (_, ch)) in conns.iter().enumerate() {
        publish(ch, "", "lp.c500", format!("{i}").as_bytes(), BasicProperties::default()).await?;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&conns[0].1, "lp.c500").await? != 500 {
        ensure!(Instant::now() < deadline, "500 messages from 500 connections");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (c, _) in &conns {
        c.close(200, "bye".into()).await?;
    }
    Ok(format!("500 open at once, opened in {opened:.1}s"))
}

async fn row(name: &str, f: impl Future<Output = Result<String>>) -> Value {
    let t = Instant::now();
    let (ok, detail) = match tokio::time::timeout(Duration::from_secs(60), f).await {
        Ok(Ok(d)) => (true, d),
        Ok(Err(e)) => (false, format!("{e:#}")),
        Err(_) => (false, "timed out".into()),
    };
    let v = json!({"client": CLIENT, "scenario": name, "ok": ok, "detail": detail,
        "secs": (t.elapsed().as_secs_f64() * 100.0).round() / 100.0});
    eprintln!("[matrix] {v}");
    v
}

/// All scenarios against `s`, in the matrix's order.
pub async fn run_all(s: &mut Server) -> Vec<Value> {
    let url = s.url();
    let mut rows = vec![
        row("declare_bind", declare_bind(&url)).await,
        row("publish_consume_ack", publish_consume_ack(&url)).await,
        row("prefetch", prefetch(&url)).await,
        row("confirms", confirms(&url)).await,
        row("mandatory_return", mandatory_return(&url)).await,
        row("dead_letter", dead_letter(&url)).await,
        row("ttl", ttl(&url)).await,
        row("priority", priority(&url)).await,
        row("transactions", transactions(&url)).await,
    ];
    rows.push(row("reconnect", reconnect(s)).await);
    let url = s.url();
    rows.push(row("large_16mib", large(&url)).await);
    rows.push(row("connections_500", connections_500(&url)).await);
    rows
}
