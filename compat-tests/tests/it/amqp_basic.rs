//! Publish, consume, ack, confirms, qos, get, transactions.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;

use crate::common::*;

#[tokio::test]
async fn publish_then_get_round_trips_body_and_properties() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q1").await;
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_correlation_id("corr".into())
        .with_priority(3)
        .with_headers(FieldTable::from(std::collections::BTreeMap::from([(
            "x-custom".into(),
            lapin::types::AMQPValue::LongString("v".into()),
        )])));
    ch.basic_publish("".into(), "q1".into(), BasicPublishOptions::default(), b"hello", props.clone()).await.unwrap();
    wait_ready(&ch, "q1", 1).await;
    let m = ch.basic_get("q1".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("a message");
    assert_eq!(m.delivery.data, b"hello");
    assert_eq!(m.delivery.properties.content_type(), props.content_type());
    assert_eq!(m.delivery.properties.correlation_id(), props.correlation_id());
    assert_eq!(m.delivery.properties.priority(), &Some(3));
    assert_eq!(m.delivery.properties.headers(), props.headers());
    assert!(ch.basic_get("q1".into(), BasicGetOptions { no_ack: true }).await.unwrap().is_none(), "get-empty");
}

#[tokio::test]
async fn consume_with_manual_ack_delivers_in_order() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    for i in 0..100 {
        publish(&ch, "", "q", format!("m{i}").as_bytes()).await;
    }
    let mut consumer =
        ch.basic_consume("q".into(), "c1".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    for i in 0..100 {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
        assert_eq!(d.data, format!("m{i}").as_bytes());
        assert!(!d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    wait_ready(&ch, "q", 0).await;
}

#[tokio::test]
async fn unacked_messages_are_requeued_redelivered_when_channel_closes() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    publish(&ch, "", "q", b"one").await;
    publish(&ch, "", "q", b"two").await;
    let ch2 = channel(&c).await;
    let mut consumer =
        ch2.basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let d1 = consumer.next().await.unwrap().unwrap();
    let _d2 = consumer.next().await.unwrap().unwrap();
    d1.ack(BasicAckOptions::default()).await.unwrap();
    ch2.close(200, "bye".into()).await.unwrap();
    wait_ready(&ch, "q", 1).await;
    let m = ch.basic_get("q".into(), BasicGetOptions { no_ack: false }).await.unwrap().unwrap();
    assert_eq!(m.delivery.data, b"two");
    assert!(m.delivery.redelivered, "requeued message must be flagged redelivered");
}

#[tokio::test]
async fn nack_and_reject_requeue_or_drop() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    publish(&ch, "", "q", b"a").await;
    publish(&ch, "", "q", b"b").await;
    wait_ready(&ch, "q", 2).await;
    let a = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    a.delivery.nack(BasicNackOptions { requeue: true, multiple: false }).await.unwrap();
    let a2 = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(a2.delivery.data, b"a", "requeued message goes back to its place at the head");
    assert!(a2.delivery.redelivered);
    a2.delivery.reject(BasicRejectOptions { requeue: false }).await.unwrap();
    let b = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(b.delivery.data, b"b");
    b.delivery.nack(BasicNackOptions { requeue: false, multiple: false }).await.unwrap();
    wait_ready(&ch, "q", 0).await;
}

#[tokio::test]
async fn ack_multiple_settles_everything_up_to_the_tag() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    for i in 0..10u8 {
        publish(&ch, "", "q", &[i]).await;
    }
    wait_ready(&ch, "q", 10).await;
    let mut last = None;
    for _ in 0..10 {
        last = Some(ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap());
    }
    let last = last.unwrap();
    last.delivery.ack(BasicAckOptions { multiple: true }).await.unwrap();
    // Nothing comes back even after the channel closes.
    ch.close(200, "".into()).await.unwrap();
    let ch = channel(&_c).await;
    wait_ready(&ch, "q", 0).await;
}

#[tokio::test]
async fn publisher_confirms_ack_every_publish() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_durable(&ch, "dq").await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..500u32 {
        confirms.push(
            ch.basic_publish("".into(), "dq".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent())
                .await
                .unwrap(),
        );
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    // Unroutable messages are confirmed too.
    let c = ch.basic_publish("".into(), "nowhere".into(), BasicPublishOptions::default(), b"x", persistent()).await.unwrap();
    assert!(c.await.unwrap().is_ack());
    wait_ready(&ch, "dq", 500).await;
}

#[tokio::test]
async fn mandatory_unroutable_message_is_returned_with_312() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let confirm = ch
        .basic_publish(
            "amq.direct".into(),
            "no-binding".into(),
            BasicPublishOptions { mandatory: true, ..Default::default() },
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let ret = confirm.take_message().expect("the message must be returned");
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.delivery.data, b"lost");
}

#[tokio::test]
async fn prefetch_limits_unacked_deliveries_per_consumer() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    for i in 0..20u8 {
        publish(&ch, "", "q", &[i]).await;
    }
    wait_ready(&ch, "q", 20).await;
    ch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut consumer =
        ch.basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(consumer.next().await.unwrap().unwrap());
    }
    // A fourth delivery must not arrive while three are unacked.
    assert!(tokio::time::timeout(Duration::from_millis(300), consumer.next()).await.is_err());
    let ch2 = channel(&_c).await;
    wait_ready(&ch2, "q", 17).await;
    got.remove(0).ack(BasicAckOptions::default()).await.unwrap();
    let next = tokio::time::timeout(Duration::from_secs(5), consumer.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(next.data, vec![3u8]);
}

#[tokio::test]
async fn global_prefetch_is_shared_by_the_channel() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q1").await;
    declare(&ch, "q2").await;
    for i in 0..5u8 {
        publish(&ch, "", "q1", &[i]).await;
        publish(&ch, "", "q2", &[i]).await;
    }
    ch.basic_qos(4, BasicQosOptions { global: true }).await.unwrap();
    let mut c1 = ch.basic_consume("q1".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let mut c2 = ch.basic_consume("q2".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let mut n = 0;
    loop {
        tokio::select! {
            d = c1.next() => { d.unwrap().unwrap(); n += 1; }
            d = c2.next() => { d.unwrap().unwrap(); n += 1; }
            _ = tokio::time::sleep(Duration::from_millis(400)) => break,
        }
    }
    assert_eq!(n, 4, "a channel-wide prefetch of 4 allows exactly 4 unacked deliveries");
}

#[tokio::test]
async fn transactions_commit_and_rollback_publishes_and_acks() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    ch.tx_select().await.unwrap();
    publish(&ch, "", "q", b"rolled-back").await;
    ch.tx_rollback().await.unwrap();
    publish(&ch, "", "q", b"committed").await;
    let probe = channel(&_c).await;
    wait_ready(&probe, "q", 0).await;
    ch.tx_commit().await.unwrap();
    wait_ready(&probe, "q", 1).await;
    // Acks in a transaction take effect at commit.
    let m = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    assert_eq!(m.delivery.data, b"committed");
    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    ch.tx_rollback().await.unwrap();
    // Rolled-back ack: the message is still unacked; closing the channel requeues it.
    ch.close(200, "".into()).await.unwrap();
    wait_ready(&probe, "q", 1).await;
}

#[tokio::test]
async fn recover_requeues_unacked_deliveries() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    publish(&ch, "", "q", b"x").await;
    wait_ready(&ch, "q", 1).await;
    let _m = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    wait_ready(&ch, "q", 0).await;
    ch.basic_recover(BasicRecoverOptions { requeue: true }).await.unwrap();
    wait_ready(&ch, "q", 1).await;
}

#[tokio::test]
async fn cancel_stops_deliveries_and_server_cancels_when_queue_deleted() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    let mut consumer =
        ch.basic_consume("q".into(), "tag1".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
    publish(&ch, "", "q", b"1").await;
    assert_eq!(consumer.next().await.unwrap().unwrap().data, b"1");
    ch.basic_cancel("tag1".into(), BasicCancelOptions::default()).await.unwrap();
    publish(&ch, "", "q", b"2").await;
    wait_ready(&ch, "q", 1).await;

    let mut consumer2 =
        ch.basic_consume("q".into(), "tag2".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
    assert_eq!(consumer2.next().await.unwrap().unwrap().data, b"2");
    let other = channel(&_c).await;
    other.queue_delete("q".into(), QueueDeleteOptions::default()).await.unwrap();
    // The server-sent basic.cancel ends lapin's consumer stream.
    let end = tokio::time::timeout(Duration::from_secs(5), consumer2.next()).await.expect("cancel must arrive");
    assert!(end.is_none(), "consumer stream must end after server cancel, got {end:?}");
}

#[tokio::test]
async fn large_message_spans_many_frames() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "big").await;
    let body: Vec<u8> = (0..16 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch.basic_publish("".into(), "big".into(), BasicPublishOptions::default(), &body, BasicProperties::default())
        .await
        .unwrap()
        .await
        .unwrap();
    let got = consume_n(&ch, "big", 1).await;
    assert_eq!(got[0].len(), body.len());
    assert!(got[0] == body);
}

#[tokio::test]
async fn round_robin_between_two_consumers() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    let ch_a = channel(&_c).await;
    let ch_b = channel(&_c).await;
    let mut a = ch_a.basic_consume("q".into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    let mut b = ch_b.basic_consume("q".into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    for i in 0..10u8 {
        publish(&ch, "", "q", &[i]).await;
    }
    let (mut na, mut nb) = (0, 0);
    for _ in 0..10 {
        tokio::select! {
            d = a.next() => { d.unwrap().unwrap(); na += 1; }
            d = b.next() => { d.unwrap().unwrap(); nb += 1; }
        }
    }
    assert_eq!((na, nb), (5, 5));
}

#[tokio::test]
async fn nack_multiple_requeues_everything_up_to_the_tag() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    for i in 0..5u8 {
        publish(&ch, "", "q", &[i]).await;
    }
    wait_ready(&ch, "q", 5).await;
    let mut tags = Vec::new();
    for _ in 0..5 {
        tags.push(ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap().delivery.delivery_tag);
    }
    ch.basic_nack(tags[2], BasicNackOptions { multiple: true, requeue: true }).await.unwrap();
    wait_ready(&ch, "q", 3).await;
    let m = ch.basic_get("q".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(m.delivery.data, vec![0u8]);
    assert!(m.delivery.redelivered);
}

#[tokio::test]
async fn three_hundred_concurrent_connections() {
    let s = Server::start();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let url = s.url();
        tasks.push(tokio::spawn(async move {
            let c = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
            let ch = c.create_channel().await.unwrap();
            let q = format!("conn-{i}");
            ch.queue_declare(q.as_str().into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
                .await
                .unwrap();
            ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            for k in 0..5u8 {
                ch.basic_publish("".into(), q.as_str().into(), BasicPublishOptions::default(), &[k], BasicProperties::default())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
            for k in 0..5u8 {
                let m = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("message");
                assert_eq!(m.delivery.data, vec![k]);
            }
            c
        }));
    }
    let mut conns = Vec::new();
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    assert_eq!(conns.len(), 300);
    for c in conns {
        c.close(200, "".into()).await.unwrap();
    }
}
