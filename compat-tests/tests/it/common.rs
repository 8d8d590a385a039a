//! Helpers shared by the lapin tests.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

pub use sluice_compat_tests::Server;

pub async fn connect(server: &Server) -> Connection {
    Connection::connect(&server.url(), ConnectionProperties::default()).await.expect("connect")
}

pub async fn channel(conn: &Connection) -> Channel {
    conn.create_channel().await.expect("create_channel")
}

/// Connection + channel in one go.
pub async fn open(server: &Server) -> (Connection, Channel) {
    let c = connect(server).await;
    let ch = channel(&c).await;
    (c, ch)
}

pub async fn declare(ch: &Channel, name: &str) {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("queue_declare");
}

pub async fn declare_durable(ch: &Channel, name: &str) {
    ch.queue_declare(name.into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("queue_declare");
}

pub async fn publish(ch: &Channel, exchange: &str, key: &str, body: &[u8]) {
    ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body, BasicProperties::default())
        .await
        .expect("basic_publish");
}

pub fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Gets one message body (no-ack), or None when the queue is empty.
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.expect("basic_get").map(|m| m.delivery.data.clone())
}

/// Collects `n` deliveries from a consumer (auto-ack) within a timeout.
pub async fn consume_n(ch: &Channel, queue: &str, n: usize) -> Vec<Vec<u8>> {
    let mut consumer = ch
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("basic_consume");
    let mut out = Vec::new();
    while out.len() < n {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("timed out waiting for a delivery")
            .expect("consumer ended")
            .expect("delivery error");
        out.push(d.data.clone());
    }
    out
}

/// The AMQP reply code carried by a lapin error (channel or connection close).
pub fn code(err: &lapin::Error) -> u16 {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => e.get_id(),
        other => panic!("expected an AMQP protocol error, got {other:?}"),
    }
}

/// The message of an AMQP error.
pub fn text(err: &lapin::Error) -> String {
    match err.kind() {
        lapin::ErrorKind::ProtocolError(e) => e.get_message().to_string(),
        other => panic!("expected an AMQP protocol error, got {other:?}"),
    }
}

/// Waits until the queue holds `n` ready messages (passive declare).
pub async fn wait_ready(ch: &Channel, queue: &str, n: u32) {
    let mut last = 0;
    for _ in 0..200 {
        let q = ch
            .queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await
            .expect("passive declare");
        last = q.message_count();
        if last == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("queue {queue} never reached {n} ready messages (last seen {last})");
}

/// For operations after which the server closes the channel asynchronously
/// (ack of an unknown tag, publish to a missing exchange...): pipelines a
/// basic.get right behind `op`, so the server's channel.close is the answer
/// to that get, and returns the close's reply code.
pub async fn async_close_code<F, T>(ch: &Channel, op: F) -> u16
where
    F: std::future::Future<Output = lapin::Result<T>>,
{
    let (_, got) = tokio::join!(op, ch.basic_get("sluice-probe".into(), BasicGetOptions::default()));
    let err = got.expect_err("the server must close the channel");
    code(&err)
}

/// Publishes on a confirm channel and returns the reply code of the
/// channel.close the publish provokes (lapin fails the pending confirm
/// with the close's error).
pub async fn publish_close_code(ch: &Channel, exchange: &str, key: &str, opts: BasicPublishOptions, props: BasicProperties) -> u16 {
    ch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm_select");
    let res = match ch.basic_publish(exchange.into(), key.into(), opts, b"x", props).await {
        Ok(confirm) => confirm.await.map(|_| ()),
        Err(e) => Err(e),
    };
    code(&res.expect_err("the server must close the channel"))
}
