//! Dead-lettering: what a queue's leader does with the messages its state
//! machine dead-lettered ([`QueueSm::dead_letters`]).
//!
//! A message leaves its queue for the dead-letter exchange in two logged
//! steps, so that after any crash it is in exactly one of the two queues:
//! 1. the source queue's state machine moves it from ready/held to its
//!    dead-letter list (same log entry as the reject, expiry or overflow
//!    that caused it); it stays live there, body kept;
//! 2. the source's leader rewrites it ([`rewrite`]: `x-death` and
//!    `x-first-death-*` headers, as RabbitMQ does), publishes it through
//!    the dead-letter exchange with a [`PublishId`] made of the source
//!    queue and the dead letter's id, and once every target queue has it
//!    (committed there) proposes [`Command::DeadLettered`] in the source,
//!    which removes it.
//!
//! A crash or a failover between the two repeats step 2 from the new
//! leader; the targets' deduplication of publish ids drops the second
//! copy. A dead-letter exchange that does not exist, or that routes the
//! message nowhere, drops it (as RabbitMQ does).
//!
//! [`QueueSm::dead_letters`]: crate::replica::queue_sm::QueueSm::dead_letters
//! [`Command::DeadLettered`]: crate::replica::queue_sm::Command::DeadLettered

use sluice_codecs::amqp::value::{FieldTable, FieldValue};
use sluice_codecs::command::Message;

use crate::backend::Reply;
use crate::replica::queue_sm::{DeathReason, PublishId};

/// Publishes dead letters (the node host implements it: routing over its
/// copy of the metadata, then a publish to each target queue's leader).
pub trait DeadLetters: Send + Sync {
    /// Routes `message` through its `exchange` (the dead-letter exchange)
    /// in `vhost` with its `routing_key`, and publishes it to every queue
    /// reached with `publish_id`. Resolves once each has it; `Ok` too when
    /// the exchange does not exist or reaches no queue (the message is
    /// dropped).
    fn publish(&self, vhost: &str, message: Message, publish_id: PublishId) -> Reply<()>;
}

/// The publisher name of a queue's dead letters ([`PublishId::publisher`]).
pub fn publisher(queue_id: u64) -> String {
    format!("dlx:{queue_id:016x}")
}

/// Where a queue sends its dead letters (its `x-dead-letter-exchange` and
/// `x-dead-letter-routing-key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub exchange: String,
    pub routing_key: Option<String>,
}

impl Target {
    /// From the queue's arguments; `None` without `x-dead-letter-exchange`.
    pub fn of(arguments: &sluice_codecs::command::Arguments) -> Option<Target> {
        let exchange = arguments.get("x-dead-letter-exchange")?.as_str()?.to_owned();
        let routing_key = arguments.get("x-dead-letter-routing-key").and_then(|v| v.as_str()).map(str::to_owned);
        Some(Target { exchange, routing_key })
    }
}

fn text(s: &str) -> FieldValue {
    FieldValue::LongString(bytes::Bytes::copy_from_slice(s.as_bytes()))
}

/// The message as it goes to the dead-letter exchange, as RabbitMQ's
/// `rabbit_dead_letter` makes it: an `x-death` entry for (queue, reason)
/// at the head of the `x-death` array (its `count` one up if there was
/// one, else a new entry with count 1, `time`, the original `exchange`
/// and `routing-keys`, and `original-expiration` when the message had a
/// per-message TTL, which is removed so it cannot expire again);
/// `x-first-death-queue`, `-reason` and `-exchange` set if absent; the
/// routing key replaced by the queue's `x-dead-letter-routing-key` if it
/// has one.
pub fn rewrite(mut message: Message, queue: &str, reason: DeathReason, now_secs: u64, target: &Target) -> Message {
    let mut headers = message.properties.headers.take().unwrap_or_default();
    let mut deaths: Vec<FieldValue> = match headers.get("x-death") {
        Some(FieldValue::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let same = |v: &FieldValue| match v {
        FieldValue::Table(t) => {
            t.get("queue").and_then(|q| q.as_str()) == Some(queue)
                && t.get("reason").and_then(|r| r.as_str()) == Some(reason.as_str())
        }
        _ => false,
    };
    let entry = match deaths.iter().position(same) {
        Some(i) => {
            let mut entry = match deaths.remove(i) {
                FieldValue::Table(t) => t,
                _ => FieldTable::new(),
            };
            let count = entry.get("count").and_then(|c| c.as_i64()).unwrap_or(0);
            entry.insert("count", FieldValue::I64(count.saturating_add(1)));
            entry.insert("time", FieldValue::Timestamp(now_secs));
            entry
        }
        None => {
            let mut entry = FieldTable::new();
            entry.insert("count", FieldValue::I64(1));
            entry.insert("reason", text(reason.as_str()));
            entry.insert("queue", text(queue));
            entry.insert("time", FieldValue::Timestamp(now_secs));
            entry.insert("exchange", text(&message.exchange));
            entry.insert("routing-keys", FieldValue::Array(vec![text(&message.routing_key)]));
            if let Some(expiration) = message.properties.expiration.take() {
                entry.insert("original-expiration", text(&expiration));
            }
            entry
        }
    };
    // A message dead-lettered before keeps no expiration either.
    message.properties.expiration = None;
    deaths.insert(0, FieldValue::Table(entry));
    if headers.get("x-first-death-queue").is_none() {
        headers.insert("x-first-death-queue", text(queue));
        headers.insert("x-first-death-reason", text(reason.as_str()));
        headers.insert("x-first-death-exchange", text(&message.exchange));
    }
    headers.insert("x-death", FieldValue::Array(deaths));
    message.properties.headers = Some(headers);
    if let Some(key) = &target.routing_key {
        message.routing_key = key.clone();
    }
    message.exchange = target.exchange.clone();
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use sluice_codecs::command::Properties;

    fn msg() -> Message {
        Message {
            exchange: "orders".into(),
            routing_key: "new".into(),
            properties: Box::new(Properties { expiration: Some("5000".into()), ..Default::default() }),
            body: Bytes::from_static(b"x"),
        }
    }

    fn death(m: &Message, i: usize) -> FieldTable {
        match m.properties.headers.as_ref().and_then(|h| h.get("x-death")) {
            Some(FieldValue::Array(a)) => match a.get(i) {
                Some(FieldValue::Table(t)) => t.clone(),
                other => panic!("no x-death entry {i}: {other:?}"),
            },
            other => panic!("no x-death: {other:?}"),
        }
    }

    #[test]
    fn first_death_records_origin_and_drops_expiration() {
        let target = Target { exchange: "dlx".into(), routing_key: None };
        let m = rewrite(msg(), "q1", DeathReason::Rejected, 1_700_000_000, &target);
        assert_eq!(m.exchange, "dlx");
        assert_eq!(m.routing_key, "new");
        assert_eq!(m.properties.expiration, None);
        let d = death(&m, 0);
        assert_eq!(d.get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(d.get("reason").and_then(|v| v.as_str()), Some("rejected"));
        assert_eq!(d.get("queue").and_then(|v| v.as_str()), Some("q1"));
        assert_eq!(d.get("exchange").and_then(|v| v.as_str()), Some("orders"));
        assert_eq!(d.get("original-expiration").and_then(|v| v.as_str()), Some("5000"));
        assert_eq!(d.get("time"), Some(&FieldValue::Timestamp(1_700_000_000)));
        assert_eq!(d.get("routing-keys"), Some(&FieldValue::Array(vec![text("new")])));
        let h = m.properties.headers.as_ref().map(|h| h.get("x-first-death-queue").and_then(|v| v.as_str()));
        assert_eq!(h, Some(Some("q1")));
    }

    #[test]
    fn second_death_in_same_queue_counts_up_and_moves_to_front() {
        let to_q2 = Target { exchange: "".into(), routing_key: Some("q2".into()) };
        let to_q1 = Target { exchange: "".into(), routing_key: Some("q1".into()) };
        let m = rewrite(msg(), "q1", DeathReason::Expired, 1, &to_q2);
        assert_eq!(m.routing_key, "q2");
        let m = rewrite(m, "q2", DeathReason::Rejected, 2, &to_q1);
        let m = rewrite(m, "q1", DeathReason::Expired, 3, &to_q2);
        let first = death(&m, 0);
        assert_eq!(first.get("queue").and_then(|v| v.as_str()), Some("q1"));
        assert_eq!(first.get("count"), Some(&FieldValue::I64(2)));
        assert_eq!(first.get("time"), Some(&FieldValue::Timestamp(3)));
        assert_eq!(death(&m, 1).get("queue").and_then(|v| v.as_str()), Some("q2"));
        let first_reason = m.properties.headers.as_ref().and_then(|h| h.get("x-first-death-reason")).and_then(|v| v.as_str());
        assert_eq!(first_reason, Some("expired"));
    }
}
