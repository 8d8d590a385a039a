//! Partitioned queues (`x-partitions`, issue #3): one queue spread over N
//! sub-queues; equal keys stay in order; consumers get every partition.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;

use crate::common::*;

fn partitions(n: i32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-partitions".into(), AMQPValue::LongInt(n));
    t
}

async fn declare_partitioned(ch: &lapin::Channel, name: &str, n: i32, durable: bool) {
    ch.queue_declare(name.into(), QueueDeclareOptions { durable, ..Default::default() }, partitions(n)).await.unwrap();
}

#[tokio::test]
async fn equal_keys_keep_their_order_and_consumers_get_every_partition() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_partitioned(&ch, "pq", 4, false).await;
    ch.queue_bind("pq".into(), "amq.topic".into(), "#".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..400u32 {
        let key = format!("key{}", i % 8);
        let body = format!("{key}:{i}");
        ch.basic_publish("amq.topic".into(), key.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let q = ch.queue_declare("pq".into(), QueueDeclareOptions::default(), partitions(4)).await.unwrap();
    assert_eq!(q.message_count(), 400, "declare-ok counts every partition");
    let bodies = consume_n(&ch, "pq", 400).await;
    let mut last: HashMap<String, u32> = HashMap::new();
    for b in bodies {
        let text = String::from_utf8(b).unwrap();
        let (key, i) = text.split_once(':').unwrap();
        let i: u32 = i.parse().unwrap();
        if let Some(prev) = last.insert(key.to_string(), i) {
            assert!(i > prev, "{key}: {i} after {prev}");
        }
    }
    assert_eq!(last.len(), 8);
}

#[tokio::test]
async fn partition_key_header_overrides_the_routing_key() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_partitioned(&ch, "hq", 8, false).await;
    // Through the default exchange the routing key is always the queue
    // name; the header spreads the messages and keeps per-key order.
    for i in 0..200u32 {
        let mut h = FieldTable::default();
        h.insert("x-partition-key".into(), AMQPValue::LongString(format!("user-{}", i % 5).into()));
        let props = BasicProperties::default().with_headers(h);
        ch.basic_publish("".into(), "hq".into(), BasicPublishOptions::default(), &i.to_be_bytes(), props).await.unwrap();
    }
    wait_ready(&ch, "hq", 200).await;
    let mut consumer = ch
        .basic_consume("hq".into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let mut last: HashMap<u32, u32> = HashMap::new();
    for _ in 0..200 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
        let i = u32::from_be_bytes(d.data[..].try_into().unwrap());
        if let Some(prev) = last.insert(i % 5, i) {
            assert!(i > prev);
        }
    }
}

#[tokio::test]
async fn prefetch_is_one_window_across_partitions() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_partitioned(&ch, "wq", 4, false).await;
    ch.queue_bind("wq".into(), "amq.direct".into(), "a".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    ch.queue_bind("wq".into(), "amq.direct".into(), "b".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    for i in 0..40u8 {
        publish(&ch, "amq.direct", if i % 2 == 0 { "a" } else { "b" }, &[i]).await;
    }
    for i in 0..40u8 {
        let mut h = FieldTable::default();
        h.insert("x-partition-key".into(), AMQPValue::LongInt(i32::from(i)));
        ch.basic_publish("".into(), "wq".into(), BasicPublishOptions::default(), &[i], BasicProperties::default().with_headers(h))
            .await
            .unwrap();
    }
    wait_ready(&ch, "wq", 80).await;
    ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch.basic_consume("wq".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let mut n = 0;
    while tokio::time::timeout(Duration::from_millis(500), consumer.next()).await.is_ok() {
        n += 1;
    }
    assert_eq!(n, 5, "prefetch 5 over 4 partitions still means 5 unacked");
}

#[tokio::test]
async fn get_purge_and_delete_cover_every_partition() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_partitioned(&ch, "gq", 3, false).await;
    for i in 0..30u32 {
        let mut h = FieldTable::default();
        h.insert("x-partition-key".into(), AMQPValue::LongInt(i as i32));
        ch.basic_publish("".into(), "gq".into(), BasicPublishOptions::default(), &i.to_be_bytes(), BasicProperties::default().with_headers(h))
            .await
            .unwrap();
    }
    wait_ready(&ch, "gq", 30).await;
    let mut seen = Vec::new();
    for _ in 0..10 {
        let m = ch.basic_get("gq".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        seen.push(u32::from_be_bytes(m.delivery.data[..].try_into().unwrap()));
        assert_eq!(m.message_count as usize, 30 - seen.len(), "get-ok counts every partition");
    }
    assert_eq!(ch.queue_purge("gq".into(), QueuePurgeOptions::default()).await.unwrap(), 20);
    for i in 0..7u32 {
        let mut h = FieldTable::default();
        h.insert("x-partition-key".into(), AMQPValue::LongInt(i as i32));
        ch.basic_publish("".into(), "gq".into(), BasicPublishOptions::default(), b"x", BasicProperties::default().with_headers(h))
            .await
            .unwrap();
    }
    wait_ready(&ch, "gq", 7).await;
    assert_eq!(ch.queue_delete("gq".into(), QueueDeleteOptions::default()).await.unwrap(), 7);
}

#[tokio::test]
async fn durable_partitioned_queue_survives_restart() {
    let mut s = Server::start();
    {
        let (_c, ch) = open(&s).await;
        declare_partitioned(&ch, "dpq", 4, true).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        for i in 0..100u32 {
            let mut h = FieldTable::default();
            h.insert("x-partition-key".into(), AMQPValue::LongInt((i % 10) as i32));
            ch.basic_publish("".into(), "dpq".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent().with_headers(h))
                .await
                .unwrap()
                .await
                .unwrap();
        }
    }
    s.kill9();
    s.restart();
    let (_c, ch) = open(&s).await;
    wait_ready(&ch, "dpq", 100).await;
    let mut got: Vec<u32> = consume_n(&ch, "dpq", 100).await.iter().map(|b| u32::from_be_bytes(b[..].try_into().unwrap())).collect();
    got.sort();
    assert_eq!(got, (0..100).collect::<Vec<_>>());
}

#[tokio::test]
async fn invalid_or_changed_partition_counts_are_406() {
    let s = Server::start();
    let c = connect(&s).await;
    for bad in [AMQPValue::LongInt(0), AMQPValue::LongInt(5000), AMQPValue::LongString("four".into())] {
        let ch = channel(&c).await;
        let mut t = FieldTable::default();
        t.insert("x-partitions".into(), bad.clone());
        let err = ch.queue_declare("bad".into(), QueueDeclareOptions::default(), t).await.unwrap_err();
        assert_eq!(code(&err), 406, "{bad:?}");
    }
    let ch = channel(&c).await;
    declare_partitioned(&ch, "p", 2, false).await;
    let err = ch.queue_declare("p".into(), QueueDeclareOptions::default(), partitions(3)).await.unwrap_err();
    assert_eq!(code(&err), 406);
}
