//! Queue limits and TTL (issue 5, items 1 and 2): x-max-length,
//! x-max-length-bytes, x-overflow, x-max-message-size, x-message-ttl and
//! the per-message expiration, x-max-priority and x-delivery-limit
//! (items 3 and 5), against the real binary.

use std::time::Duration;

use futures_util::StreamExt;

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};

use crate::common::*;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn declare_with(ch: &Channel, name: &str, args: &[(&str, AMQPValue)]) -> Result<u32, lapin::Error> {
    ch.queue_declare(name.into(), QueueDeclareOptions::default(), table(args)).await.map(|q| q.message_count())
}

/// Ready messages, by a passive declare.
async fn ready(ch: &Channel, name: &str) -> u32 {
    ch.queue_declare(name.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .expect("passive declare")
        .message_count()
}

/// Waits (up to 10 s) until the queue's ready count is `n`.
async fn eventually_ready(ch: &Channel, name: &str, n: u32) {
    for _ in 0..200 {
        if ready(ch, name).await == n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("queue {name} never had {n} ready messages (has {})", ready(ch, name).await);
}

/// Publishes on a confirm channel and returns the error the broker closed
/// the channel with.
async fn publish_closing(ch: &Channel, key: &str, body: &[u8], props: BasicProperties) -> lapin::Error {
    ch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirm_select");
    let res = match ch.basic_publish("".into(), key.into(), BasicPublishOptions::default(), body, props).await {
        Ok(confirm) => confirm.await.map(|_| ()),
        Err(e) => Err(e),
    };
    res.expect_err("the server must close the channel")
}

async fn drain(ch: &Channel, name: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    while let Some(body) = get_body(ch, name).await {
        out.push(body);
    }
    out
}

#[tokio::test]
async fn max_length_drop_head_keeps_the_newest() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_with(&ch, "ml", &[("x-max-length", AMQPValue::LongInt(3))]).await.unwrap();
    for i in 0..10 {
        publish(&ch, "", "ml", format!("m{i}").as_bytes()).await;
    }
    eventually_ready(&ch, "ml", 3).await;
    assert_eq!(drain(&ch, "ml").await, vec![b"m7".to_vec(), b"m8".to_vec(), b"m9".to_vec()]);
}

#[tokio::test]
async fn reject_publish_nacks_when_full() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    let args = [("x-max-length", AMQPValue::LongInt(2)), ("x-overflow", AMQPValue::LongString("reject-publish".into()))];
    declare_with(&ch, "rp", &args).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut acks = Vec::new();
    for i in 0..4 {
        let confirm = ch
            .basic_publish("".into(), "rp".into(), BasicPublishOptions::default(), format!("m{i}").as_bytes(), BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
        acks.push(confirm.is_ack());
    }
    assert_eq!(acks, vec![true, true, false, false]);
    assert_eq!(drain(&ch, "rp").await, vec![b"m0".to_vec(), b"m1".to_vec()]);
    // Room again: accepted.
    let confirm = ch
        .basic_publish("".into(), "rp".into(), BasicPublishOptions::default(), b"m4", BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(confirm.is_ack());
    // Without confirms the refused message is just dropped.
    let ch2 = channel(&_c).await;
    for i in 5..8 {
        publish(&ch2, "", "rp", format!("m{i}").as_bytes()).await;
    }
    eventually_ready(&ch2, "rp", 2).await;
    assert_eq!(drain(&ch2, "rp").await, vec![b"m4".to_vec(), b"m5".to_vec()]);
}

#[tokio::test]
async fn max_length_bytes_drops_from_the_head() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_with(&ch, "mlb", &[("x-max-length-bytes", AMQPValue::LongInt(10))]).await.unwrap();
    for i in 0..5 {
        publish(&ch, "", "mlb", format!("abcd{i}").as_bytes()).await; // 5 bytes each
    }
    eventually_ready(&ch, "mlb", 2).await;
    assert_eq!(drain(&ch, "mlb").await, vec![b"abcd3".to_vec(), b"abcd4".to_vec()]);
}

#[tokio::test]
async fn max_message_size_is_a_406() {
    let s = Server::start();
    let (c, ch) = open(&s).await;
    declare_with(&ch, "mms", &[("x-max-message-size", AMQPValue::LongInt(8))]).await.unwrap();
    publish(&ch, "", "mms", b"12345678").await;
    let err = publish_closing(&ch, "mms", b"123456789", BasicProperties::default()).await;
    assert_eq!(code(&err), 406, "{err}");
    assert!(text(&err).contains("message size 9 is larger than configured max size 8"), "{err}");
    let ch = channel(&c).await;
    assert_eq!(drain(&ch, "mms").await, vec![b"12345678".to_vec()]);
}

#[tokio::test]
async fn message_ttl_expires_messages() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_with(&ch, "ttl", &[("x-message-ttl", AMQPValue::LongInt(150))]).await.unwrap();
    publish(&ch, "", "ttl", b"old").await;
    eventually_ready(&ch, "ttl", 0).await;
    assert_eq!(get_body(&ch, "ttl").await, None);
    // A fresh one is delivered if taken in time.
    publish(&ch, "", "ttl", b"new").await;
    assert_eq!(consume_n(&ch, "ttl", 1).await, vec![b"new".to_vec()]);
}

#[tokio::test]
async fn per_message_expiration() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "pm").await;
    let short = BasicProperties::default().with_expiration("100".into());
    ch.basic_publish("".into(), "pm".into(), BasicPublishOptions::default(), b"short", short).await.unwrap();
    publish(&ch, "", "pm", b"keep").await;
    // The expired head goes; the other stays.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get_body(&ch, "pm").await, Some(b"keep".to_vec()));
    assert_eq!(get_body(&ch, "pm").await, None);
    // An invalid expiration is a 406, as in RabbitMQ.
    let bad = BasicProperties::default().with_expiration("soon".into());
    let err = publish_closing(&ch, "pm", b"x", bad).await;
    assert_eq!(code(&err), 406, "{err}");
    assert!(text(&err).contains("invalid expiration 'soon': no_integer"), "{err}");
}

#[tokio::test]
async fn invalid_arguments_are_406_with_rabbitmq_texts() {
    let s = Server::start();
    let c = connect(&s).await;
    let cases: Vec<(&str, AMQPValue, &str)> = vec![
        ("x-max-length", AMQPValue::LongInt(-1), "invalid arg 'x-max-length' for queue 'bad' in vhost '/': {value_negative,-1}"),
        ("x-max-length-bytes", AMQPValue::LongString("big".into()), "invalid arg 'x-max-length-bytes'"),
        ("x-overflow", AMQPValue::LongString("drop-tail".into()), "invalid arg 'x-overflow' for queue 'bad' in vhost '/': invalid_overflow"),
        ("x-message-ttl", AMQPValue::LongInt(-5), "invalid arg 'x-message-ttl' for queue 'bad' in vhost '/': {value_negative,-5}"),
        ("x-expires", AMQPValue::LongInt(0), "invalid arg 'x-expires' for queue 'bad' in vhost '/': {value_zero,0}"),
        ("x-max-priority", AMQPValue::LongInt(256), "invalid arg 'x-max-priority' for queue 'bad' in vhost '/': {max_value_exceeded,256}"),
        ("x-max-priority", AMQPValue::LongInt(-1), "invalid arg 'x-max-priority' for queue 'bad' in vhost '/': {value_negative,-1}"),
        ("x-delivery-limit", AMQPValue::LongInt(-2), "invalid arg 'x-delivery-limit' for queue 'bad' in vhost '/': {value_negative,-2}"),
        ("x-delivery-limit", AMQPValue::LongString("3".into()), "invalid arg 'x-delivery-limit'"),
    ];
    for (arg, value, want) in cases {
        let ch = channel(&c).await;
        let err = declare_with(&ch, "bad", &[(arg, value)]).await.expect_err(arg);
        assert_eq!(code(&err), 406, "{arg}: {err}");
        assert!(text(&err).contains(want), "{arg}: {err}");
    }
    // Redeclare with another limit: 406 inequivalent arg.
    let ch = channel(&c).await;
    declare_with(&ch, "eq", &[("x-max-length", AMQPValue::LongInt(1))]).await.unwrap();
    let err = declare_with(&ch, "eq", &[("x-max-length", AMQPValue::LongInt(2))]).await.expect_err("inequivalent");
    assert_eq!(code(&err), 406, "{err}");
    assert!(text(&err).contains("inequivalent arg 'x-max-length'"), "{err}");
}

/// True once a passive declare of `name` answers 404. A declare is a use
/// that renews the lease (as in RabbitMQ), so it looks only every 3 s, up
/// to `tries` times.
async fn gone_within(s: &Server, name: &str, tries: u32) -> bool {
    for _ in 0..tries {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (_c, ch) = open(s).await;
        let r = ch.queue_declare(name.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await;
        if let Err(e) = r {
            assert!(e.to_string().contains("NOT_FOUND"), "{e}");
            return true;
        }
    }
    false
}

#[tokio::test]
async fn x_expires_deletes_an_unused_queue_but_not_one_in_use() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    let expires = [("x-expires", AMQPValue::LongInt(600))];
    declare_with(&ch, "idle", &expires).await.unwrap();
    declare_with(&ch, "used", &expires).await.unwrap();
    publish(&ch, "", "idle", b"publishing is not a use").await;
    let consumer = ch
        .basic_consume("used".into(), "keeper".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    assert!(gone_within(&s, "idle", 4).await, "an unused queue with x-expires must go");
    // The one with a consumer stayed meanwhile...
    assert_eq!(ready(&ch, "used").await, 0, "a queue with a consumer does not expire");
    // ...and goes once it is unused.
    ch.basic_cancel(consumer.tag().as_str().into(), BasicCancelOptions::default()).await.unwrap();
    assert!(gone_within(&s, "used", 4).await, "x-expires counts from the last consumer");
}

async fn publish_priority(ch: &Channel, key: &str, body: &[u8], priority: Option<u8>) {
    let mut props = BasicProperties::default();
    if let Some(p) = priority {
        props = props.with_priority(p);
    }
    ch.basic_publish("".into(), key.into(), BasicPublishOptions::default(), body, props).await.expect("publish");
}

#[tokio::test]
async fn max_priority_delivers_highest_first_fifo_within() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_with(&ch, "prio", &[("x-max-priority", AMQPValue::ShortShortUInt(5))]).await.unwrap();
    // 9 is capped at 5; no priority is 0.
    let msgs = [("a1", Some(1)), ("b5", Some(5)), ("c0", None), ("d9", Some(9)), ("e1", Some(1)), ("f5", Some(5))];
    for (body, p) in msgs {
        publish_priority(&ch, "prio", body.as_bytes(), p).await;
    }
    eventually_ready(&ch, "prio", 6).await;
    // basic.get takes the highest first; a requeued message goes back to
    // its place within its priority.
    let got = ch.basic_get("prio".into(), BasicGetOptions::default()).await.unwrap().expect("a message");
    assert_eq!(got.delivery.data, b"b5");
    got.delivery.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
    let want: Vec<Vec<u8>> = ["b5", "d9", "f5", "a1", "e1", "c0"].iter().map(|b| b.as_bytes().to_vec()).collect();
    assert_eq!(consume_n(&ch, "prio", 6).await, want);
    // Without x-max-priority the priority property is ignored: FIFO.
    declare(&ch, "noprio").await;
    publish_priority(&ch, "noprio", b"low", Some(0)).await;
    publish_priority(&ch, "noprio", b"high", Some(9)).await;
    eventually_ready(&ch, "noprio", 2).await;
    assert_eq!(drain(&ch, "noprio").await, vec![b"low".to_vec(), b"high".to_vec()]);
}

fn delivery_count(props: &BasicProperties) -> Option<i64> {
    let headers = props.headers().as_ref()?;
    match headers.inner().get("x-delivery-count")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        other => panic!("x-delivery-count of type {other:?}"),
    }
}

#[tokio::test]
async fn delivery_limit_drops_after_n_returns_with_a_growing_delivery_count() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_with(&ch, "poison", &[("x-delivery-limit", AMQPValue::LongInt(2))]).await.unwrap();
    publish(&ch, "", "poison", b"bad").await;
    publish(&ch, "", "poison", b"good").await;
    let mut consumer = ch
        .basic_consume("poison".into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .unwrap();
    let mut seen = Vec::new();
    // "bad" is nacked with requeue every time; "good" is acked.
    while seen.iter().filter(|(b, _, _)| b == b"bad").count() < 3 || !seen.iter().any(|(b, _, _)| b == b"good") {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.expect("a delivery").unwrap().unwrap();
        seen.push((d.data.clone(), d.redelivered, delivery_count(&d.properties)));
        if d.data == b"bad" {
            d.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    let bad: Vec<(bool, Option<i64>)> = seen.iter().filter(|(b, _, _)| b == b"bad").map(|(_, r, c)| (*r, *c)).collect();
    // As a quorum queue: no header on the first delivery, then 1, 2; the
    // third return is over the limit and the message is dropped.
    assert_eq!(bad, vec![(false, None), (true, Some(1)), (true, Some(2))]);
    eventually_ready(&ch, "poison", 0).await;
    assert!(tokio::time::timeout(Duration::from_millis(500), consumer.next()).await.is_err(), "dropped for good");
}
