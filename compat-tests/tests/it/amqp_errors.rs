//! Every error code the foundation issue names, closing the right scope.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use crate::common::*;

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

#[tokio::test]
async fn bad_credentials_are_refused_with_403() {
    let s = Server::start();
    let url = format!("amqp://guest:wrong@{}/%2f", s.amqp);
    let err = Connection::connect(&url, ConnectionProperties::default()).await.expect_err("login must fail");
    assert_eq!(code(&err), 403, "{err}");
    assert!(text(&err).contains("ACCESS_REFUSED"), "{err}");
    let url = format!("amqp://nobody:guest@{}/%2f", s.amqp);
    let err = Connection::connect(&url, ConnectionProperties::default()).await.expect_err("login must fail");
    assert_eq!(code(&err), 403);
}

#[tokio::test]
async fn unknown_vhost_is_530() {
    let s = Server::start();
    let url = format!("amqp://guest:guest@{}/nope", s.amqp);
    let err = Connection::connect(&url, ConnectionProperties::default()).await.expect_err("vhost must not exist");
    assert_eq!(code(&err), 530, "{err}");
}

#[tokio::test]
async fn amq_prefixed_names_are_403_and_connection_survives() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let err = ch.queue_declare("amq.mine".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 403);
    let ch = channel(&c).await;
    let err = ch
        .exchange_declare("amq.mine".into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 403);
    // The connection stays usable after channel errors.
    let ch = channel(&c).await;
    declare(&ch, "fine").await;
}

#[tokio::test]
async fn binding_to_the_default_exchange_is_403() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    let err = ch.queue_bind("q".into(), "".into(), "q".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 403);
}

#[tokio::test]
async fn missing_queue_and_exchange_are_404() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let err = ch
        .queue_declare("ghost".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
    assert_eq!(text(&err), "NOT_FOUND - no queue 'ghost' in vhost '/'");
    let ch = channel(&c).await;
    let err = ch
        .exchange_declare("ghost".into(), ExchangeKind::Direct, ExchangeDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
    let ch = channel(&c).await;
    let err = ch.basic_consume("ghost".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 404);
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    let err = ch.queue_bind("q".into(), "ghost-x".into(), "k".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 404);
    // Publishing to a missing exchange closes the channel with 404.
    let ch = channel(&c).await;
    assert_eq!(publish_close_code(&ch, "ghost-x", "k", BasicPublishOptions::default(), BasicProperties::default()).await, 404);
}

#[tokio::test]
async fn exclusive_queue_of_another_connection_is_405() {
    let s = Server::start();
    let c1 = connect(&s).await;
    let ch1 = channel(&c1).await;
    ch1.queue_declare("mine".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let c2 = connect(&s).await;
    let ch2 = channel(&c2).await;
    let err = ch2.basic_consume("mine".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 405);
    let ch2 = channel(&c2).await;
    let err = ch2
        .queue_declare("mine".into(), QueueDeclareOptions { exclusive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 405);
    // When the owner goes away the queue goes with it.
    c1.close(200, "bye".into()).await.unwrap();
    let ch2 = channel(&c2).await;
    let mut gone = false;
    for _ in 0..100 {
        let probe = channel(&c2).await;
        match probe.queue_declare("mine".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await {
            Err(e) if code(&e) == 404 => {
                gone = true;
                break;
            }
            _ => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
    assert!(gone, "exclusive queue must be deleted with its connection");
    drop(ch2);
}

#[tokio::test]
async fn redeclare_with_other_arguments_is_406() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    let err = ch.queue_declare("q".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 406);
    assert!(text(&err).contains("inequivalent arg 'durable'"), "{}", text(&err));
    let ch = channel(&c).await;
    let err = ch
        .queue_declare("q".into(), QueueDeclareOptions::default(), table(&[("x-max-length", AMQPValue::LongInt(10))]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 406);
    let ch = channel(&c).await;
    ch.exchange_declare("x".into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let err = ch.exchange_declare("x".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 406);
    assert!(text(&err).contains("inequivalent arg 'type'"));
}

#[tokio::test]
async fn unknown_and_double_acked_delivery_tags_are_406() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    let (_, got) = tokio::join!(
        ch.basic_ack(99, BasicAckOptions::default()),
        ch.basic_get("q".into(), BasicGetOptions::default())
    );
    let err = got.unwrap_err();
    assert_eq!(code(&err), 406);
    assert_eq!(text(&err), "PRECONDITION_FAILED - unknown delivery tag 99");

    let ch = channel(&c).await;
    publish(&ch, "", "q", b"x").await;
    wait_ready(&ch, "q", 1).await;
    let m = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()).await.unwrap();
    let op = ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default());
    assert_eq!(async_close_code(&ch, op).await, 406);
}

#[tokio::test]
async fn user_id_that_is_not_the_login_is_406() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    ch.basic_publish("".into(), "q".into(), BasicPublishOptions::default(), b"x", BasicProperties::default().with_user_id("guest".into()))
        .await
        .unwrap();
    wait_ready(&ch, "q", 1).await;
    let props = BasicProperties::default().with_user_id("mallory".into());
    assert_eq!(publish_close_code(&ch, "", "q", BasicPublishOptions::default(), props).await, 406);
}

#[tokio::test]
async fn delete_if_unused_and_if_empty_are_406() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    publish(&ch, "", "q", b"x").await;
    wait_ready(&ch, "q", 1).await;
    let err = ch.queue_delete("q".into(), QueueDeleteOptions { if_empty: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(code(&err), 406);
    let ch = channel(&c).await;
    let _consumer = ch.basic_consume("q".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let ch2 = channel(&c).await;
    let err = ch2.queue_delete("q".into(), QueueDeleteOptions { if_unused: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(code(&err), 406);
    let ch3 = channel(&c).await;
    ch3.exchange_declare("x".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch3.queue_bind("q".into(), "x".into(), "".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
    let err = ch3.exchange_delete("x".into(), ExchangeDeleteOptions { if_unused: true, ..Default::default() }).await.unwrap_err();
    assert_eq!(code(&err), 406);
}

#[tokio::test]
async fn exclusive_consumer_conflicts_are_403() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    let _a = ch.basic_consume("q".into(), "a".into(), BasicConsumeOptions { exclusive: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    let ch2 = channel(&c).await;
    let err = ch2.basic_consume("q".into(), "b".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 403);
}

#[tokio::test]
async fn unknown_exchange_type_is_503_connection_error() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let err = ch
        .exchange_declare("x".into(), ExchangeKind::Custom("x-nope".into()), ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 503);
    assert!(!c.status().connected(), "503 is a hard error: the connection is closed");
}

#[tokio::test]
async fn reused_consumer_tag_is_530() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    let _a = ch.basic_consume("q".into(), "same".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    let err = ch.basic_consume("q".into(), "same".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 530);
}

#[tokio::test]
async fn immediate_flag_is_540() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let opts = BasicPublishOptions { immediate: true, ..Default::default() };
    assert_eq!(publish_close_code(&ch, "", "q", opts, BasicProperties::default()).await, 540);
}

#[tokio::test]
async fn tx_commit_without_select_is_406() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let err = ch.tx_commit().await.unwrap_err();
    assert_eq!(code(&err), 406);
    let ch = channel(&c).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let err = ch.tx_select().await.unwrap_err();
    assert_eq!(code(&err), 406);
}

#[tokio::test]
async fn invalid_queue_arguments_are_406_with_rabbitmq_wording() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let err = ch
        .queue_declare("bad".into(), QueueDeclareOptions::default(), table(&[("x-max-length", AMQPValue::LongString("abc".into()))]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 406);
    assert_eq!(
        text(&err),
        "PRECONDITION_FAILED - invalid arg 'x-max-length' for queue 'bad' in vhost '/': \"expected integer, got longstr\""
    );
    let ch = channel(&c).await;
    let err = ch
        .queue_declare("bad".into(), QueueDeclareOptions::default(), table(&[("x-expires", AMQPValue::LongInt(0))]))
        .await
        .unwrap_err();
    assert_eq!(code(&err), 406);
}

#[tokio::test]
async fn message_above_max_size_is_406_and_connection_survives() {
    let s = Server::start_with(&["--max-message-size", "1000"]);
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let big = vec![0u8; 2000];
    let res = match ch.basic_publish("".into(), "q".into(), BasicPublishOptions::default(), &big, BasicProperties::default()).await {
        Ok(confirm) => confirm.await.map(|_| ()),
        Err(e) => Err(e),
    };
    let err = res.expect_err("too large");
    assert_eq!(code(&err), 406);
    assert_eq!(text(&err), "PRECONDITION_FAILED - message size 2000 is larger than configured max size 1000");
    let ch = channel(&c).await;
    publish(&ch, "", "q", &[0u8; 1000]).await;
    wait_ready(&ch, "q", 1).await;
}

#[tokio::test]
async fn exclusive_durable_queue_is_not_recovered() {
    let mut s = Server::start();
    {
        let c = connect(&s).await;
        let ch = channel(&c).await;
        ch.queue_declare("ex".into(), QueueDeclareOptions { exclusive: true, durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        ch.queue_bind("ex".into(), "amq.fanout".into(), "".into(), QueueBindOptions::default(), FieldTable::default()).await.unwrap();
        // Re-declaring with the same flags on the owning connection is fine.
        ch.queue_declare("ex".into(), QueueDeclareOptions { exclusive: true, durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
    }
    s.restart();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    let err = ch
        .queue_declare("ex".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
}

#[tokio::test]
async fn repeated_ack_in_a_transaction_fails_at_once_and_commits_nothing() {
    let s = Server::start();
    let c = connect(&s).await;
    let ch = channel(&c).await;
    declare(&ch, "q").await;
    publish(&ch, "", "q", b"x").await;
    wait_ready(&ch, "q", 1).await;
    ch.tx_select().await.unwrap();
    let m = ch.basic_get("q".into(), BasicGetOptions::default()).await.unwrap().unwrap();
    publish(&ch, "", "q", b"in-tx").await;
    ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()).await.unwrap();
    let op = ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default());
    assert_eq!(async_close_code(&ch, op).await, 406);
    // Nothing of the transaction happened: the message is back, the publish is gone.
    let probe = channel(&c).await;
    wait_ready(&probe, "q", 1).await;
    let got = probe.basic_get("q".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
    assert_eq!(got.delivery.data, b"x");
    assert!(got.delivery.redelivered);
}
