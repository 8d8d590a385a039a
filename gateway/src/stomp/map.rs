//! STOMP headers ⇄ the command model, as RabbitMQ's STOMP plugin maps them
//! (`rabbit_stomp_util`): SEND headers → AMQP properties and headers,
//! SUBSCRIBE/SEND headers → queue arguments, deliveries → MESSAGE frames.

use bytes::Bytes;
use sluice_codecs::command::{Arguments, FieldValue, Message, Properties};
use sluice_codecs::stomp::{header, Command as StompCommand, Frame, Version};

use super::destination;

/// Headers that become AMQP properties (and not AMQP headers).
const PROPERTY_HEADERS: [&str; 12] = [
    "content-type",
    "content-encoding",
    "persistent",
    "priority",
    "correlation-id",
    "reply-to",
    "expiration",
    "amqp-message-id",
    "timestamp",
    "type",
    "user-id",
    "app-id",
];

/// Headers of a SEND that steer the protocol and are not copied into the
/// message (RabbitMQ copies `receipt`, `transaction` and `content-length`
/// into the AMQP headers too; Sluice does not).
const PROTOCOL_HEADERS: [&str; 4] = ["destination", "receipt", "transaction", "content-length"];

/// The AMQP type a queue-argument header's value is given.
#[derive(Clone, Copy)]
enum ArgType {
    Long,
    Str,
    Bool,
}

/// Queue arguments that SUBSCRIBE and SEND headers may carry, with the
/// type of their value.
const ARGUMENT_HEADERS: [(&str, ArgType); 20] = [
    ("x-dead-letter-exchange", ArgType::Str),
    ("x-delivery-limit", ArgType::Long),
    ("x-dead-letter-routing-key", ArgType::Str),
    ("x-expires", ArgType::Long),
    ("x-dead-letter-on-delete", ArgType::Bool),
    ("x-max-length", ArgType::Long),
    ("x-max-length-bytes", ArgType::Long),
    ("x-max-priority", ArgType::Long),
    ("x-message-ttl", ArgType::Long),
    ("x-max-age", ArgType::Str),
    ("x-queue-type", ArgType::Str),
    ("x-overflow", ArgType::Str),
    ("x-partitions", ArgType::Long),
    ("x-max-message-size", ArgType::Long),
    ("x-visibility-timeout", ArgType::Long),
    ("x-consumer-timeout", ArgType::Long),
    ("x-message-deduplication", ArgType::Bool),
    ("x-deduplication-window-ms", ArgType::Long),
    ("x-ordering", ArgType::Str),
    ("x-ordering-window-ms", ArgType::Long),
];

fn long_string(v: &str) -> FieldValue {
    FieldValue::LongString(Bytes::copy_from_slice(v.as_bytes()))
}

/// The message a SEND publishes to `exchange`/`routing_key`.
pub fn message(frame: &Frame, exchange: String, routing_key: String, reply_to: Option<String>) -> Result<Message, String> {
    let text = |k: &str| frame.header(k).map(str::to_string);
    let int = |k: &'static str| -> Result<Option<u64>, String> { frame.u64_header(k).map_err(|e| e.to_string()) };
    let persistent = frame.bool_header(header::PERSISTENT).map_err(|e| e.to_string())?.unwrap_or(false);
    let priority = match int("priority")? {
        None => None,
        Some(p) => Some(u8::try_from(p).map_err(|_| format!("invalid value \"{p}\" for header priority"))?),
    };
    let mut headers = Arguments::default();
    for (k, v) in &frame.headers {
        if PROPERTY_HEADERS.contains(&k.as_str()) || PROTOCOL_HEADERS.contains(&k.as_str()) {
            continue;
        }
        headers.insert(k.clone(), long_string(v));
    }
    let properties = Properties {
        content_type: text("content-type"),
        content_encoding: text("content-encoding"),
        headers: (!headers.is_empty()).then_some(headers),
        delivery_mode: persistent.then_some(2),
        priority,
        correlation_id: text("correlation-id"),
        reply_to: reply_to.or_else(|| text("reply-to")),
        expiration: text("expiration"),
        message_id: text("amqp-message-id"),
        timestamp: int("timestamp")?,
        kind: text("type"),
        user_id: text("user-id"),
        app_id: text("app-id"),
        cluster_id: None,
    };
    Ok(Message { exchange, routing_key, properties: Box::new(properties), body: frame.body.clone() })
}

/// Queue arguments from `x-…` headers (RabbitMQ's `build_arguments`).
pub fn queue_arguments(frame: &Frame) -> Result<Arguments, String> {
    let mut args = Arguments::default();
    for (name, kind) in ARGUMENT_HEADERS {
        let Some(v) = frame.header(name) else { continue };
        let v = v.trim();
        let value = match kind {
            ArgType::Long => FieldValue::I64(
                v.parse::<i64>().map_err(|_| format!("invalid value \"{v}\" for header {name}: expected an integer"))?,
            ),
            ArgType::Bool => match v {
                "true" | "True" => FieldValue::Bool(true),
                "false" | "False" => FieldValue::Bool(false),
                _ => return Err(format!("invalid value \"{v}\" for header {name}: expected true or false")),
            },
            ArgType::Str => long_string(v),
        };
        args.insert(name, value);
    }
    Ok(args)
}

/// A boolean header (`true`/`false`, `True`/`False`), `None` when absent.
pub fn flag(frame: &Frame, name: &'static str) -> Result<Option<bool>, String> {
    frame.bool_header(name).map_err(|e| e.to_string())
}

/// What a MESSAGE frame needs besides the message.
pub struct Delivery<'a> {
    /// The subscription id (absent for 1.0 subscriptions without `id`).
    pub subscription: Option<&'a str>,
    /// `message-id` (and, in 1.2 client modes, `ack`).
    pub ack_id: String,
    /// Whether the subscription wants ACKs.
    pub client_ack: bool,
    pub redelivered: bool,
    /// Destination shown instead of the one rebuilt from the message
    /// (temporary queues).
    pub destination: Option<String>,
}

/// A delivery as a MESSAGE frame for `version` (RabbitMQ's `headers/5`):
/// protocol headers, then properties, then AMQP headers (long strings and
/// integers; other field types are dropped, as RabbitMQ does), leaving out
/// any header this version cannot carry.
pub fn message_frame(d: Delivery<'_>, message: Message, version: Version) -> Frame {
    let mut f = Frame::new(StompCommand::Message);
    if let Some(s) = d.subscription {
        push(&mut f, version, header::SUBSCRIPTION, s.to_string());
    }
    let dest = d.destination.unwrap_or_else(|| destination::format(&message.exchange, &message.routing_key));
    push(&mut f, version, header::DESTINATION, dest);
    push(&mut f, version, header::MESSAGE_ID, d.ack_id.clone());
    push(&mut f, version, header::REDELIVERED, d.redelivered.to_string());
    if d.client_ack && version == Version::V1_2 {
        push(&mut f, version, header::ACK, d.ack_id);
    }
    let p = message.properties;
    let text = |f: &mut Frame, k: &str, v: Option<String>| {
        if let Some(v) = v {
            push(f, version, k, v);
        }
    };
    text(&mut f, "content-type", p.content_type);
    text(&mut f, "content-encoding", p.content_encoding);
    if p.delivery_mode == Some(2) {
        push(&mut f, version, "persistent", "true".into());
    }
    text(&mut f, "priority", p.priority.map(|v| v.to_string()));
    text(&mut f, "correlation-id", p.correlation_id);
    text(
        &mut f,
        "reply-to",
        p.reply_to.map(|v| if destination::has_prefix(&v) { v } else { format!("/reply-queue/{v}") }),
    );
    text(&mut f, "expiration", p.expiration);
    text(&mut f, "amqp-message-id", p.message_id);
    text(&mut f, "timestamp", p.timestamp.map(|v| v.to_string()));
    text(&mut f, "type", p.kind);
    text(&mut f, "user-id", p.user_id);
    text(&mut f, "app-id", p.app_id);
    if let Some(headers) = p.headers {
        for (k, v) in headers.iter() {
            let value = match v {
                FieldValue::LongString(b) => String::from_utf8_lossy(b).into_owned(),
                other => match other.as_i64() {
                    Some(n) => n.to_string(),
                    None => continue,
                },
            };
            push(&mut f, version, k, value);
        }
    }
    f.body = message.body;
    f
}

/// Appends a header unless a header of that name is already there (the
/// first wins, as on the wire) or this version cannot encode it.
fn push(f: &mut Frame, version: Version, name: &str, value: String) {
    if f.header(name).is_some() || name == header::CONTENT_LENGTH || !encodable(name, &value, version, true) {
        return;
    }
    if !encodable(value.as_str(), "", version, false) {
        return;
    }
    f.headers.push((name.to_string(), value));
}

/// Whether `name` (and `value`) can be written in a MESSAGE of `version`.
fn encodable(name: &str, value: &str, version: Version, is_name: bool) -> bool {
    let bad = |s: &str, colon: bool| {
        s.contains('\0')
            || match version {
                Version::V1_0 => s.contains('\n') || s.contains('\r') || (colon && s.contains(':')),
                Version::V1_1 => s.contains('\r'),
                Version::V1_2 => false,
            }
    };
    !(bad(name, is_name) || bad(value, false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_headers_become_properties_and_headers() {
        let f = Frame::new(StompCommand::Send)
            .with_header("destination", "/queue/q")
            .with_header("receipt", "r1")
            .with_header("content-type", "text/plain")
            .with_header("persistent", "true")
            .with_header("priority", "5")
            .with_header("amqp-message-id", "m-1")
            .with_header("timestamp", "1700000000")
            .with_header("x-custom", "v");
        let m = message(&f, String::new(), "q".into(), None).unwrap();
        assert_eq!(m.properties.content_type.as_deref(), Some("text/plain"));
        assert_eq!(m.properties.delivery_mode, Some(2));
        assert_eq!(m.properties.priority, Some(5));
        assert_eq!(m.properties.message_id.as_deref(), Some("m-1"));
        assert_eq!(m.properties.timestamp, Some(1_700_000_000));
        let h = m.properties.headers.unwrap();
        assert_eq!(h.get("x-custom").and_then(|v| v.as_str()), Some("v"));
        assert!(h.get("receipt").is_none() && h.get("destination").is_none());
        assert!(message(&Frame::new(StompCommand::Send).with_header("priority", "300"), String::new(), String::new(), None).is_err());
    }

    #[test]
    fn message_frame_drops_what_1_0_cannot_carry() {
        let mut headers = Arguments::default();
        headers.insert("ok", FieldValue::LongString(Bytes::from_static(b"1")));
        headers.insert("bad", FieldValue::LongString(Bytes::from_static(b"a\nb")));
        headers.insert("n", FieldValue::I32(-4));
        let m = Message {
            exchange: String::new(),
            routing_key: "q".into(),
            properties: Box::new(Properties { headers: Some(headers), reply_to: Some("r".into()), ..Default::default() }),
            body: Bytes::from_static(b"x"),
        };
        let d = Delivery { subscription: Some("s"), ack_id: "T_s@@x@@1".into(), client_ack: true, redelivered: false, destination: None };
        let f = message_frame(d, m, Version::V1_0);
        assert_eq!(f.header("ok"), Some("1"));
        assert_eq!(f.header("bad"), None);
        assert_eq!(f.header("n"), Some("-4"));
        assert_eq!(f.header("reply-to"), Some("/reply-queue/r"));
        assert_eq!(f.header("destination"), Some("/queue/q"));
        assert_eq!(f.header("ack"), None);
    }
}
