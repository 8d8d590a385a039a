//! How durable definitions are laid out as opaque key/value pairs (the
//! backend stores them; [`super::Topology::load`] reads them back).
//!
//! Keys: one tag byte (`x` exchange, `q` queue, `b` binding) followed by
//! length-prefixed components (vhost, names, routing key, arguments), so no
//! name character can make two keys collide. Values are AMQP field tables:
//! self-describing, and the codec for them already exists.

use bytes::BytesMut;
use sluice_codecs::command::{Arguments, FieldValue};

use super::topology::{Binding, Dest, Exchange, ExchangeKind};

fn put(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

fn table_bytes(t: &Arguments) -> Vec<u8> {
    let mut b = BytesMut::new();
    t.encode(&mut b);
    b.to_vec()
}

/// Key of an exchange definition.
pub fn exchange_key(vhost: &str, name: &str) -> Vec<u8> {
    let mut k = vec![b'x'];
    put(&mut k, vhost.as_bytes());
    put(&mut k, name.as_bytes());
    k
}

/// Key of a queue definition.
pub fn queue_key(vhost: &str, name: &str) -> Vec<u8> {
    let mut k = vec![b'q'];
    put(&mut k, vhost.as_bytes());
    put(&mut k, name.as_bytes());
    k
}

/// Key of a binding definition: every part of the binding, arguments
/// included, since two bindings differing only there are distinct.
pub fn binding_key(vhost: &str, source: &str, b: &Binding) -> Vec<u8> {
    let mut k = vec![b'b'];
    put(&mut k, vhost.as_bytes());
    put(&mut k, source.as_bytes());
    let (tag, dest) = match &b.dest {
        Dest::Queue(q) => (b'q', q),
        Dest::Exchange(e) => (b'x', e),
    };
    k.push(tag);
    put(&mut k, dest.as_bytes());
    put(&mut k, b.routing_key.as_bytes());
    put(&mut k, &table_bytes(&b.arguments));
    k
}

fn s(v: &str) -> FieldValue {
    FieldValue::LongString(v.to_string().into_bytes().into())
}

/// Value of an exchange definition (its bindings are stored separately).
pub fn exchange_value(vhost: &str, e: &Exchange) -> Vec<u8> {
    let t: Arguments = [
        ("vhost", s(vhost)),
        ("name", s(&e.name)),
        ("type", s(e.kind.as_str())),
        ("durable", FieldValue::Bool(e.durable)),
        ("auto_delete", FieldValue::Bool(e.auto_delete)),
        ("internal", FieldValue::Bool(e.internal)),
        ("arguments", FieldValue::Table(e.arguments.clone())),
    ]
    .into_iter()
    .collect();
    table_bytes(&t)
}

/// A stored queue definition.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredQueue {
    pub vhost: String,
    pub name: String,
    /// One queue id per partition (one for a plain queue).
    pub ids: Vec<u64>,
    pub auto_delete: bool,
    pub arguments: Arguments,
}

/// Value of a queue definition.
pub fn queue_value(d: &StoredQueue) -> Vec<u8> {
    let t: Arguments = [
        ("vhost", s(&d.vhost)),
        ("name", s(&d.name)),
        ("id", FieldValue::I64(d.ids.first().copied().unwrap_or(0) as i64)),
        ("partition_ids", FieldValue::Array(d.ids.iter().map(|id| FieldValue::I64(*id as i64)).collect())),
        ("auto_delete", FieldValue::Bool(d.auto_delete)),
        ("arguments", FieldValue::Table(d.arguments.clone())),
    ]
    .into_iter()
    .collect();
    table_bytes(&t)
}

/// Value of a binding definition.
pub fn binding_value(vhost: &str, source: &str, b: &Binding) -> Vec<u8> {
    let (kind, dest) = match &b.dest {
        Dest::Queue(q) => ("queue", q),
        Dest::Exchange(e) => ("exchange", e),
    };
    let t: Arguments = [
        ("vhost", s(vhost)),
        ("source", s(source)),
        ("dest_kind", s(kind)),
        ("dest", s(dest)),
        ("routing_key", s(&b.routing_key)),
        ("arguments", FieldValue::Table(b.arguments.clone())),
    ]
    .into_iter()
    .collect();
    table_bytes(&t)
}

/// A definition read back at startup.
#[derive(Clone, Debug, PartialEq)]
pub enum Stored {
    /// An exchange, without its bindings.
    Exchange { vhost: String, exchange: Exchange },
    /// A queue.
    Queue(StoredQueue),
    /// A binding of exchange `source`.
    Binding { vhost: String, source: String, binding: Binding },
}

fn get_str(t: &Arguments, k: &str) -> Result<String, String> {
    t.get(k).and_then(|v| v.as_str()).map(str::to_string).ok_or_else(|| format!("missing field {k}"))
}
fn get_bool(t: &Arguments, k: &str) -> Result<bool, String> {
    t.get(k).and_then(|v| v.as_bool()).ok_or_else(|| format!("missing field {k}"))
}
fn get_table(t: &Arguments, k: &str) -> Result<Arguments, String> {
    t.get(k).and_then(|v| v.as_table()).cloned().ok_or_else(|| format!("missing field {k}"))
}

/// Decodes one stored definition.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Stored, String> {
    let t = Arguments::decode(value).map_err(|e| e.to_string())?;
    match key.first() {
        Some(b'x') => {
            let kind = get_str(&t, "type")?;
            let arguments = get_table(&t, "arguments")?;
            Ok(Stored::Exchange {
                vhost: get_str(&t, "vhost")?,
                exchange: Exchange {
                    name: get_str(&t, "name")?,
                    kind: ExchangeKind::parse_with(&kind, &arguments).ok_or_else(|| format!("unknown exchange type {kind}"))?,
                    durable: get_bool(&t, "durable")?,
                    auto_delete: get_bool(&t, "auto_delete")?,
                    internal: get_bool(&t, "internal")?,
                    arguments,
                    bindings: Vec::new(),
                },
            })
        }
        Some(b'q') => Ok(Stored::Queue(queue_def(&t)?)),
        Some(b'b') => {
            let dest = get_str(&t, "dest")?;
            let dest = match get_str(&t, "dest_kind")?.as_str() {
                "queue" => Dest::Queue(dest),
                _ => Dest::Exchange(dest),
            };
            Ok(Stored::Binding {
                vhost: get_str(&t, "vhost")?,
                source: get_str(&t, "source")?,
                binding: Binding {
                    dest,
                    routing_key: get_str(&t, "routing_key")?,
                    arguments: get_table(&t, "arguments")?,
                },
            })
        }
        _ => Err("unknown definition kind".into()),
    }
}

fn queue_def(t: &Arguments) -> Result<StoredQueue, String> {
    let ids: Vec<u64> = match t.get("partition_ids") {
        Some(FieldValue::Array(ids)) => {
            ids.iter().map(|v| v.as_i64().map(|n| n as u64).ok_or("bad partition id")).collect::<Result<_, _>>()?
        }
        _ => vec![t.get("id").and_then(|v| v.as_i64()).ok_or("missing field id")? as u64],
    };
    if ids.is_empty() {
        return Err("queue definition without an id".into());
    }
    Ok(StoredQueue {
        vhost: get_str(t, "vhost")?,
        name: get_str(t, "name")?,
        ids,
        auto_delete: get_bool(t, "auto_delete")?,
        arguments: get_table(t, "arguments")?,
    })
}
