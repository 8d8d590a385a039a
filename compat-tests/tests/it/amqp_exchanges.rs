//! Exchange types, exchange-to-exchange bindings, internal and auto-delete.

use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

use crate::common::*;

async fn bind(ch: &lapin::Channel, q: &str, x: &str, key: &str, args: FieldTable) {
    ch.queue_bind(q.into(), x.into(), key.into(), QueueBindOptions::default(), args).await.unwrap();
}

#[tokio::test]
async fn direct_fanout_and_topic_routing() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    for q in ["a", "b", "c"] {
        declare(&ch, q).await;
    }
    bind(&ch, "a", "amq.direct", "k1", FieldTable::default()).await;
    bind(&ch, "b", "amq.direct", "k2", FieldTable::default()).await;
    publish(&ch, "amq.direct", "k1", b"d1").await;
    publish(&ch, "amq.direct", "k2", b"d2").await;
    publish(&ch, "amq.direct", "k3", b"none").await;
    wait_ready(&ch, "a", 1).await;
    wait_ready(&ch, "b", 1).await;
    assert_eq!(get_body(&ch, "a").await.unwrap(), b"d1");
    assert_eq!(get_body(&ch, "b").await.unwrap(), b"d2");

    ch.exchange_declare("fan".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    for q in ["a", "b", "c"] {
        bind(&ch, q, "fan", "ignored", FieldTable::default()).await;
    }
    publish(&ch, "fan", "whatever", b"f").await;
    for q in ["a", "b", "c"] {
        wait_ready(&ch, q, 1).await;
        assert_eq!(get_body(&ch, q).await.unwrap(), b"f");
    }

    bind(&ch, "a", "amq.topic", "stock.*.nyse", FieldTable::default()).await;
    bind(&ch, "b", "amq.topic", "stock.#", FieldTable::default()).await;
    bind(&ch, "c", "amq.topic", "#.eur", FieldTable::default()).await;
    publish(&ch, "amq.topic", "stock.ibm.nyse", b"t1").await; // a, b
    publish(&ch, "amq.topic", "stock.sap.xetra.eur", b"t2").await; // b, c
    publish(&ch, "amq.topic", "fx.eur", b"t3").await; // c
    wait_ready(&ch, "a", 1).await;
    wait_ready(&ch, "b", 2).await;
    wait_ready(&ch, "c", 2).await;
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    declare(&ch, "all").await;
    declare(&ch, "any").await;
    let mut all = FieldTable::default();
    all.insert("x-match".into(), AMQPValue::LongString("all".into()));
    all.insert("format".into(), AMQPValue::LongString("pdf".into()));
    all.insert("type".into(), AMQPValue::LongString("report".into()));
    let mut any = all.clone();
    any.insert("x-match".into(), AMQPValue::LongString("any".into()));
    bind(&ch, "all", "amq.headers", "", all).await;
    bind(&ch, "any", "amq.match", "", any).await;
    let headers = |pairs: &[(&str, &str)]| {
        let mut t = FieldTable::default();
        for (k, v) in pairs {
            t.insert((*k).into(), AMQPValue::LongString((*v).into()));
        }
        BasicProperties::default().with_headers(t)
    };
    for (h, _) in [(headers(&[("format", "pdf"), ("type", "report")]), "both"), (headers(&[("format", "pdf")]), "one")] {
        ch.basic_publish("amq.headers".into(), "".into(), BasicPublishOptions::default(), b"h", h.clone()).await.unwrap();
        ch.basic_publish("amq.match".into(), "".into(), BasicPublishOptions::default(), b"h", h).await.unwrap();
    }
    wait_ready(&ch, "all", 1).await;
    wait_ready(&ch, "any", 2).await;
}

#[tokio::test]
async fn exchange_to_exchange_bindings_route_through() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    ch.exchange_declare("src".into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.exchange_declare("dst".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.exchange_bind("dst".into(), "src".into(), "a.*".into(), ExchangeBindOptions::default(), FieldTable::default()).await.unwrap();
    // A cycle must not loop forever.
    ch.exchange_bind("src".into(), "dst".into(), "".into(), ExchangeBindOptions::default(), FieldTable::default()).await.unwrap();
    declare(&ch, "q").await;
    bind(&ch, "q", "dst", "", FieldTable::default()).await;
    publish(&ch, "src", "a.b", b"yes").await;
    publish(&ch, "src", "b.b", b"no").await;
    wait_ready(&ch, "q", 1).await;
    ch.exchange_unbind("dst".into(), "src".into(), "a.*".into(), ExchangeUnbindOptions::default(), FieldTable::default()).await.unwrap();
    publish(&ch, "src", "a.b", b"yes").await;
    publish(&ch, "", "q", b"marker").await;
    wait_ready(&ch, "q", 2).await;
}

#[tokio::test]
async fn internal_exchange_refuses_publishes_with_403() {
    let s = Server::start();
    let (c, ch) = open(&s).await;
    ch.exchange_declare("int".into(), ExchangeKind::Fanout, ExchangeDeclareOptions { internal: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    assert_eq!(publish_close_code(&ch, "int", "", BasicPublishOptions::default(), BasicProperties::default()).await, 403);
    drop(c);
}

#[tokio::test]
async fn auto_delete_exchange_goes_with_its_last_binding() {
    let s = Server::start();
    let (c, ch) = open(&s).await;
    ch.exchange_declare("ad".into(), ExchangeKind::Direct, ExchangeDeclareOptions { auto_delete: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    declare(&ch, "q").await;
    bind(&ch, "q", "ad", "k", FieldTable::default()).await;
    ch.queue_unbind("q".into(), "ad".into(), "k".into(), FieldTable::default()).await.unwrap();
    let err = ch
        .exchange_declare("ad".into(), ExchangeKind::Direct, ExchangeDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 404);
    drop(c);
}

#[tokio::test]
async fn exchange_delete_removes_bindings() {
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    ch.exchange_declare("x".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    declare(&ch, "q").await;
    bind(&ch, "q", "x", "", FieldTable::default()).await;
    ch.exchange_delete("x".into(), ExchangeDeleteOptions::default()).await.unwrap();
    ch.exchange_declare("x".into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default()).await.unwrap();
    publish(&ch, "x", "", b"nobody").await;
    publish(&ch, "", "q", b"marker").await;
    wait_ready(&ch, "q", 1).await;
    assert_eq!(get_body(&ch, "q").await.unwrap(), b"marker");
}
