//! Queue lifecycle: server-named, exclusive, auto-delete, purge, delete counts.

use lapin::options::*;
use lapin::types::FieldTable;

use crate::common::*;

#[tokio::test]
async fn server_named_queue_gets_amq_gen_name() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    let q = ch.queue_declare("".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    let name = q.name().as_str().to_string();
    assert!(name.starts_with("amq.gen-") && name.len() == 30, "{name}");
    publish(&ch, "", &name, b"x").await;
    wait_ready(&ch, &name, 1).await;
}

#[tokio::test]
async fn declare_ok_reports_message_and_consumer_counts() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    for _ in 0..3 {
        publish(&ch, "", "q", b"x").await;
    }
    wait_ready(&ch, "q", 3).await;
    let ch2 = channel(&_c).await;
    ch2.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let _cons = ch2.basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    wait_ready(&ch, "q", 2).await;
    let q = ch.queue_declare("q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (2, 1));
}

#[tokio::test]
async fn purge_and_delete_return_message_counts() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "q").await;
    for _ in 0..7 {
        publish(&ch, "", "q", b"x").await;
    }
    wait_ready(&ch, "q", 7).await;
    assert_eq!(ch.queue_purge("q".into(), QueuePurgeOptions::default()).await.unwrap(), 7);
    for _ in 0..4 {
        publish(&ch, "", "q", b"x").await;
    }
    wait_ready(&ch, "q", 4).await;
    assert_eq!(ch.queue_delete("q".into(), QueueDeleteOptions::default()).await.unwrap(), 4);
    // Deleting a missing queue succeeds with 0, as in RabbitMQ 3.x.
    assert_eq!(ch.queue_delete("q".into(), QueueDeleteOptions::default()).await.unwrap(), 0);
}

#[tokio::test]
async fn auto_delete_queue_goes_when_last_consumer_cancels() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    ch.queue_declare("ad".into(), QueueDeclareOptions { auto_delete: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    ch.basic_consume("ad".into(), "t".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    ch.basic_cancel("t".into(), BasicCancelOptions::default()).await.unwrap();
    let err = ch
        .queue_declare("ad".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
}

#[tokio::test]
async fn durable_definitions_and_persistent_messages_survive_restart() {
    let mut s = Server::start();
    {
        let (c, ch) = open(&s).await;
        declare_durable(&ch, "dq").await;
        ch.exchange_declare("dx".into(), lapin::ExchangeKind::Topic, ExchangeDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind("dq".into(), "dx".into(), "a.#".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
        declare(&ch, "transient-q").await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        for i in 0..10u8 {
            ch.basic_publish("dx".into(), "a.b".into(), BasicPublishOptions::default(), &[i], persistent()).await.unwrap().await.unwrap();
        }
        // Transient messages in a durable queue do not survive.
        ch.basic_publish("dx".into(), "a.b".into(), BasicPublishOptions::default(), b"t", lapin::BasicProperties::default())
            .await
            .unwrap()
            .await
            .unwrap();
        c.close(200, "".into()).await.unwrap();
    }
    assert!(s.terminate().map(|st| st.success()).unwrap_or(false), "SIGTERM must exit 0");
    s.restart();
    let (_c, ch) = open(&s).await;
    wait_ready(&ch, "dq", 10).await;
    // The binding came back too.
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    ch.basic_publish("dx".into(), "a.c".into(), BasicPublishOptions::default(), &[10], persistent()).await.unwrap().await.unwrap();
    let bodies = consume_n(&ch, "dq", 11).await;
    assert_eq!(bodies, (0..11u8).map(|i| vec![i]).collect::<Vec<_>>());
    let err = ch
        .queue_declare("transient-q".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404, "non-durable queues are gone after restart");
}

#[tokio::test]
async fn bodies_paged_out_of_ram_are_delivered_intact() {
    // No RAM for bodies: every message is read back from disk on delivery.
    let mut s = Server::start_with(&["--body-cache-bytes", "0"]);
    let (_c, ch) = open(&s).await;
    declare_durable(&ch, "paged").await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let body = |i: usize| -> Vec<u8> { (0..(i * 37) % 5000).map(|j| (i + j) as u8).collect() };
    for i in 0..200usize {
        let props = if i % 2 == 0 { persistent() } else { lapin::BasicProperties::default() };
        ch.basic_publish("".into(), "paged".into(), BasicPublishOptions::default(), &body(i), props)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    for k in 0..100 {
        assert_eq!(get_body(&ch, "paged").await.unwrap(), body(k), "message {k}");
    }
    // After a clean restart only the persistent half of the rest is left.
    assert!(s.terminate().unwrap().success());
    s.restart();
    let (_c, ch) = open(&s).await;
    wait_ready(&ch, "paged", 50).await;
    let got = consume_n(&ch, "paged", 50).await;
    for (k, b) in got.iter().enumerate() {
        assert_eq!(b, &body(100 + 2 * k), "persistent message {}", 100 + 2 * k);
    }
}

#[tokio::test]
async fn large_durable_queue_recovers_in_order() {
    let mut s = Server::start();
    let n = 10_000u32; // more than one recovery page
    {
        let (c, ch) = open(&s).await;
        declare_durable(&ch, "big").await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let mut pending = Vec::new();
        for i in 0..n {
            pending.push(
                ch.basic_publish("".into(), "big".into(), BasicPublishOptions::default(), &i.to_be_bytes(), persistent())
                    .await
                    .unwrap(),
            );
        }
        for p in pending {
            assert!(p.await.unwrap().is_ack());
        }
        // Consume and ack the first 3000 so the ack floor moves.
        let mut consumer = ch.basic_consume("big".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
        ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
        let mut last = 0;
        for i in 0..3000u32 {
            let d = futures_util::StreamExt::next(&mut consumer).await.unwrap().unwrap();
            assert_eq!(u32::from_be_bytes(d.data[..].try_into().unwrap()), i);
            last = d.delivery_tag;
            if i % 100 == 99 {
                ch.basic_ack(last, BasicAckOptions { multiple: true }).await.unwrap();
            }
        }
        let _ = last;
        c.close(200, "".into()).await.unwrap();
    }
    assert!(s.terminate().unwrap().success());
    s.restart();
    let (_c, ch) = open(&s).await;
    wait_ready(&ch, "big", n - 3000).await;
    let bodies = consume_n(&ch, "big", (n - 3000) as usize).await;
    for (k, b) in bodies.iter().enumerate() {
        assert_eq!(u32::from_be_bytes(b[..].try_into().unwrap()), 3000 + k as u32);
    }
}

#[tokio::test]
async fn paged_out_messages_delivered_right_after_publish_are_intact() {
    // No RAM budget and a consumer already waiting: each message is handed
    // out while its disk write may still be in flight.
    let s = Server::start_with(&["--body-cache-bytes", "0"]);
    let (c, ch) = open(&s).await;
    declare_durable(&ch, "hot").await;
    let consumer_ch = channel(&c).await;
    let mut consumer = consumer_ch
        .basic_consume("hot".into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut confirms = Vec::new();
    for i in 0..300u32 {
        let props = if i % 2 == 0 { persistent() } else { lapin::BasicProperties::default() };
        let body: Vec<u8> = i.to_be_bytes().iter().copied().cycle().take(100 + i as usize).collect();
        confirms.push(ch.basic_publish("".into(), "hot".into(), BasicPublishOptions::default(), &body, props).await.unwrap());
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
    for i in 0..300u32 {
        let d = tokio::time::timeout(std::time::Duration::from_secs(10), futures_util::StreamExt::next(&mut consumer))
            .await
            .expect("delivery")
            .unwrap()
            .unwrap();
        let want: Vec<u8> = i.to_be_bytes().iter().copied().cycle().take(100 + i as usize).collect();
        assert_eq!(d.data, want, "message {i}");
    }
}

#[tokio::test]
async fn sequence_numbers_never_go_below_the_ack_floor_after_restart() {
    let mut s = Server::start();
    {
        let (_c, ch) = open(&s).await;
        declare_durable(&ch, "floor").await;
        // A transient message lives in RAM only; consuming it moves the floor.
        publish(&ch, "", "floor", b"transient").await;
        wait_ready(&ch, "floor", 1).await;
        assert_eq!(get_body(&ch, "floor").await.unwrap(), b"transient");
    }
    assert!(s.terminate().unwrap().success());
    s.restart();
    {
        let (_c, ch) = open(&s).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        ch.basic_publish("".into(), "floor".into(), BasicPublishOptions::default(), b"kept", persistent())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    assert!(s.terminate().unwrap().success());
    s.restart();
    let (_c, ch) = open(&s).await;
    wait_ready(&ch, "floor", 1).await;
    assert_eq!(get_body(&ch, "floor").await.unwrap(), b"kept");
}
