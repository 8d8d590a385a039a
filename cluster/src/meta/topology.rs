//! The metadata state machine: vhosts, exchanges, bindings and queue
//! definitions, with RabbitMQ's rules for declaring, binding and deleting.
//!
//! [`Topology::apply`] takes one [`Command`] and either refuses it with the
//! [`MetaError`] RabbitMQ would give, or changes the state and returns an
//! [`Outcome`] saying what the caller must carry out: open storage for new
//! queues, delete the storage of removed ones, write or delete durable
//! definitions. It is pure (no I/O, clock, randomness or locks, and only
//! ordered maps, so iteration order never depends on a hasher): every
//! replica that applies the same commands in the same order holds the same
//! state and returns the same outcomes. What only the caller can know is in
//! the command: generated queue names, new queue ids, and the live message
//! and consumer counts that `if-unused`/`if-empty`/auto-delete depend on.
//!
//! [`Topology::route`] and [`Topology::queue`] are the read side.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use sluice_codecs::amqp::reply_code as code;
use sluice_codecs::command::{Arguments, FieldValue, Properties};

use super::args_serde;
use super::matching::{headers_match, topic_matches};
use super::persist::{self, Stored, StoredQueue};

/// Who owns an exclusive queue: the connection that declared it. (A plain
/// connection id today; in a cluster it will also name the gateway.)
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Owner(pub u64);

/// The four exchange types, and RabbitMQ's delayed-message exchange
/// (`x-delayed-message`, routing as its `x-delayed-type`; messages with an
/// `x-delay` header published to it wait that long in their queues).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
    DelayedDirect,
    DelayedFanout,
    DelayedTopic,
    DelayedHeaders,
}

impl ExchangeKind {
    /// The kind named by `type` with the declare's arguments (for
    /// `x-delayed-message`, its `x-delayed-type`).
    pub fn parse_with(s: &str, arguments: &Arguments) -> Option<Self> {
        if s != "x-delayed-message" {
            return Self::parse(s);
        }
        match arguments.get("x-delayed-type").and_then(|v| v.as_str()).and_then(Self::parse)? {
            Self::Direct => Some(Self::DelayedDirect),
            Self::Fanout => Some(Self::DelayedFanout),
            Self::Topic => Some(Self::DelayedTopic),
            Self::Headers => Some(Self::DelayedHeaders),
            _ => None,
        }
    }

    /// How it routes (the delayed kinds as their `x-delayed-type`).
    pub fn routing(self) -> Self {
        match self {
            Self::DelayedDirect => Self::Direct,
            Self::DelayedFanout => Self::Fanout,
            Self::DelayedTopic => Self::Topic,
            Self::DelayedHeaders => Self::Headers,
            other => other,
        }
    }

    /// An `x-delayed-message` exchange.
    pub fn is_delayed(self) -> bool {
        self.routing() != self
    }

    /// The kind named by exchange.declare's `type`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
        }
    }
    /// The AMQP name of the kind.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::DelayedDirect | Self::DelayedFanout | Self::DelayedTopic | Self::DelayedHeaders => "x-delayed-message",
        }
    }
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dest {
    Queue(String),
    Exchange(String),
}

/// One binding of an exchange.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Binding {
    pub dest: Dest,
    pub routing_key: String,
    #[serde(with = "args_serde")]
    pub arguments: Arguments,
}

/// An exchange and its outgoing bindings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    /// Deleted when its last binding goes (never before it had one).
    pub auto_delete: bool,
    /// Only reachable through exchange-to-exchange bindings.
    pub internal: bool,
    #[serde(with = "args_serde")]
    pub arguments: Arguments,
    /// In the order they were made (routing visits them in this order).
    pub bindings: Vec<Binding>,
}

/// A queue's definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct QueueDef {
    pub name: String,
    /// One id per partition (one for a plain queue); never empty.
    pub ids: Vec<u64>,
    /// As declared (for equivalence checks).
    pub durable: bool,
    /// Whether its definition is stored: durable and not exclusive.
    pub persisted: bool,
    pub exclusive_owner: Option<Owner>,
    pub auto_delete: bool,
    #[serde(with = "args_serde")]
    pub arguments: Arguments,
}

impl QueueDef {
    /// The partition a message goes to: by its `x-partition-key` header if
    /// it has one, else by routing key, so equal keys keep their order.
    pub fn partition_for(&self, routing_key: &str, properties: &Properties) -> usize {
        let n = self.ids.len() as u64;
        if n <= 1 {
            return 0;
        }
        let header = properties.headers.as_ref().and_then(|h| h.get("x-partition-key"));
        let hash = match header {
            Some(v) => match (v.as_str(), v.as_i64()) {
                (Some(s), _) => partition_hash(s.as_bytes()),
                (None, Some(n)) => partition_hash(n.to_string().as_bytes()),
                _ => partition_hash(routing_key.as_bytes()),
            },
            None => partition_hash(routing_key.as_bytes()),
        };
        (hash % n) as usize
    }
}

/// FNV-1a, 64 bit: fixed forever, so every gateway picks the same
/// partition for a key.
pub fn partition_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Most partitions a queue may have.
pub const MAX_PARTITIONS: i64 = 1024;

/// The number of partitions `x-partitions` asks for (1 when absent). The
/// caller of [`Command::DeclareQueue`] passes this many new ids.
pub fn partition_count(args: &Arguments) -> usize {
    args.get("x-partitions").and_then(|v| v.as_i64()).map(|n| n.clamp(1, MAX_PARTITIONS) as usize).unwrap_or(1)
}

/// The exchanges every vhost has from its creation. They are never stored:
/// adding the vhost makes them again.
const STANDARD_EXCHANGES: [(&str, ExchangeKind); 6] = [
    ("amq.direct", ExchangeKind::Direct),
    ("amq.fanout", ExchangeKind::Fanout),
    ("amq.topic", ExchangeKind::Topic),
    ("amq.headers", ExchangeKind::Headers),
    ("amq.match", ExchangeKind::Headers),
    // RabbitMQ's event exchange plugin: audit events (connections,
    // logins, declares, user changes) are published here.
    (EVENT_EXCHANGE, ExchangeKind::Topic),
];

/// Where audit events are published (topic; internal: clients may bind
/// to it, not publish to it).
pub const EVENT_EXCHANGE: &str = "amq.rabbitmq.event";

/// Queue arguments that must match on re-declare (RabbitMQ's list).
const EQUIVALENT_QUEUE_ARGS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-delivery-limit",
    "x-single-active-consumer",
    "x-partitions",
    "x-max-message-size",
    "x-dead-letter-on-delete",
    "x-visibility-timeout",
    "x-consumer-timeout",
    "x-message-deduplication",
    "x-deduplication-window-ms",
    "x-deduplication-header",
    "x-ordering",
    "x-ordering-window-ms",
];

/// One virtual host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Vhost {
    pub name: String,
    pub exchanges: BTreeMap<String, Exchange>,
    pub queues: BTreeMap<String, QueueDef>,
}

impl Vhost {
    fn new(name: &str) -> Self {
        let mut exchanges = BTreeMap::new();
        for (n, kind) in STANDARD_EXCHANGES {
            exchanges.insert(
                n.to_string(),
                Exchange {
                    name: n.to_string(),
                    kind,
                    durable: true,
                    auto_delete: false,
                    internal: n == EVENT_EXCHANGE,
                    arguments: Arguments::default(),
                    bindings: Vec::new(),
                },
            );
        }
        Vhost { name: name.to_string(), exchanges, queues: BTreeMap::new() }
    }
}

/// Every vhost, with its exchanges, bindings and queues.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    vhosts: BTreeMap<String, Vhost>,
}

/// A change to the metadata, as it would be written to the metadata log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Creates a vhost with its standard exchanges (no-op if it exists).
    AddVhost { name: String },
    /// Deletes a vhost with everything in it (its queues' messages go);
    /// 404 if it does not exist.
    DeleteVhost { name: String },
    /// exchange.declare.
    DeclareExchange {
        vhost: String,
        name: String,
        /// As received: an unknown type is an error only when it matters.
        kind: String,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        #[serde(with = "args_serde")]
        arguments: Arguments,
    },
    /// exchange.delete.
    DeleteExchange { vhost: String, name: String, if_unused: bool },
    /// queue.bind and exchange.bind. `conn` is checked against the owner of
    /// an exclusive destination queue.
    Bind {
        vhost: String,
        source: String,
        dest: Dest,
        routing_key: String,
        #[serde(with = "args_serde")]
        arguments: Arguments,
        conn: Owner,
    },
    /// queue.unbind and exchange.unbind.
    Unbind {
        vhost: String,
        source: String,
        dest: Dest,
        routing_key: String,
        #[serde(with = "args_serde")]
        arguments: Arguments,
        conn: Owner,
    },
    /// queue.declare.
    DeclareQueue {
        vhost: String,
        /// The client's name, or the one the caller generated for it.
        name: String,
        /// The client sent an empty name (so `amq.` is allowed and passive
        /// is refused).
        generated: bool,
        passive: bool,
        durable: bool,
        /// The declaring connection: owner if `exclusive`, and checked
        /// against the owner of an existing exclusive queue either way.
        conn: Owner,
        exclusive: bool,
        auto_delete: bool,
        #[serde(with = "args_serde")]
        arguments: Arguments,
        /// Ids for the queue if it is created: exactly
        /// [`partition_count`]`(arguments)` of them, chosen by the caller.
        new_ids: Vec<u64>,
    },
    /// queue.delete. `counts` are the queue's (ready messages, consumers)
    /// measured by the caller just before (only the queue knows them).
    DeleteQueue { vhost: String, name: String, if_unused: bool, if_empty: bool, conn: Owner, counts: (u32, u32) },
    /// A consumer of `name` went away and `consumers` remain: an auto-delete
    /// queue with none left is deleted.
    ConsumerGone { vhost: String, name: String, consumers: u32 },
    /// A connection closed: its exclusive queues are deleted.
    ConnectionClosed { owner: Owner },
}

/// The name of partition `i` of the `n` of queue `name`, for logs, metrics
/// and `sluice ctl`: the queue's own name when it is not partitioned.
pub fn partition_name(name: &str, i: usize, n: usize) -> String {
    if n == 1 {
        name.to_owned()
    } else {
        format!("{name}#{i}")
    }
}

/// A queue [`Topology::apply`] created: the caller creates its storage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CreatedQueue {
    pub vhost: String,
    pub name: String,
    pub ids: Vec<u64>,
    /// Whether its messages survive a restart (its definition is stored).
    pub durable: bool,
    #[serde(with = "args_serde")]
    pub arguments: Arguments,
}

/// A queue [`Topology::apply`] removed: the caller deletes its storage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedQueue {
    pub vhost: String,
    pub name: String,
    pub ids: Vec<u64>,
}

/// A change to the stored definitions (keys and values of [`persist`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DefChange {
    Put { key: Vec<u8>, value: Vec<u8> },
    /// Deleting a key that was never written is harmless: bindings are
    /// deleted whether or not they were stored.
    Delete { key: Vec<u8> },
}

/// What a command changed, in the order the caller should carry it out.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub created: Vec<CreatedQueue>,
    pub removed: Vec<RemovedQueue>,
    /// (vhost, name) of exchanges removed, auto-deleted ones included.
    pub exchanges_removed: Vec<(String, String)>,
    /// (vhost, name) of exchanges created.
    pub exchanges_created: Vec<(String, String)>,
    pub definitions: Vec<DefChange>,
}

/// A refused command: the AMQP reply code, the text RabbitMQ would send
/// (with the code's name in front, as in "NOT_FOUND - no queue 'q' in vhost
/// '/'"), and whether it closes the connection rather than the channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code} {text}")]
pub struct MetaError {
    pub code: u16,
    pub text: String,
    pub connection: bool,
}

impl MetaError {
    fn channel(code: u16, name: &str, detail: impl AsRef<str>) -> Self {
        MetaError { code, text: format!("{name} - {}", detail.as_ref()), connection: false }
    }
    fn access_refused(detail: impl AsRef<str>) -> Self {
        Self::channel(code::ACCESS_REFUSED, "ACCESS_REFUSED", detail)
    }
    fn not_found(detail: impl AsRef<str>) -> Self {
        Self::channel(code::NOT_FOUND, "NOT_FOUND", detail)
    }
    fn precondition(detail: impl AsRef<str>) -> Self {
        Self::channel(code::PRECONDITION_FAILED, "PRECONDITION_FAILED", detail)
    }
    fn locked(detail: impl AsRef<str>) -> Self {
        Self::channel(code::RESOURCE_LOCKED, "RESOURCE_LOCKED", detail)
    }
    fn command_invalid(detail: impl AsRef<str>) -> Self {
        MetaError { code: code::COMMAND_INVALID, text: format!("COMMAND_INVALID - {}", detail.as_ref()), connection: true }
    }
    fn internal(detail: impl AsRef<str>) -> Self {
        MetaError { code: code::INTERNAL_ERROR, text: format!("INTERNAL_ERROR - {}", detail.as_ref()), connection: true }
    }
    fn default_exchange() -> Self {
        Self::access_refused("operation not permitted on the default exchange")
    }
}

/// One queue partition a message reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Target<'a> {
    pub queue: &'a str,
    /// Index into the queue's `ids`.
    pub partition: usize,
    /// The partition's queue id.
    pub id: u64,
}

fn qmsg(name: &str, vhost: &str) -> String {
    format!("queue '{name}' in vhost '{vhost}'")
}
fn xmsg(name: &str, vhost: &str) -> String {
    format!("exchange '{name}' in vhost '{vhost}'")
}

fn bool_text(b: bool) -> &'static str {
    if b {
        "true"
    } else {
        "false"
    }
}

impl Topology {
    /// Builds the state from stored definitions (vhost "/" always exists).
    /// Returns the reasons for definitions it could not read and skipped.
    pub fn load(defs: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>) -> (Topology, Vec<String>) {
        let mut t = Topology::default();
        t.add_vhost("/");
        let mut skipped = Vec::new();
        // Bindings last: their source exchange may come later in key order.
        let mut bindings = Vec::new();
        for (k, v) in defs {
            match persist::decode(&k, &v) {
                Ok(Stored::Exchange { vhost, exchange }) => {
                    t.add_vhost(&vhost).exchanges.insert(exchange.name.clone(), exchange);
                }
                Ok(Stored::Queue(def)) => {
                    t.add_vhost(&def.vhost).queues.insert(
                        def.name.clone(),
                        QueueDef {
                            name: def.name,
                            ids: def.ids,
                            durable: true,
                            persisted: true,
                            exclusive_owner: None,
                            auto_delete: def.auto_delete,
                            arguments: def.arguments,
                        },
                    );
                }
                Ok(Stored::Binding { vhost, source, binding }) => bindings.push((vhost, source, binding)),
                Err(e) => skipped.push(e),
            }
        }
        for (vhost, source, binding) in bindings {
            if let Some(x) = t.add_vhost(&vhost).exchanges.get_mut(&source) {
                x.bindings.push(binding);
            }
        }
        (t, skipped)
    }

    fn add_vhost(&mut self, name: &str) -> &mut Vhost {
        self.vhosts.entry(name.to_string()).or_insert_with(|| Vhost::new(name))
    }

    /// A vhost, if it exists.
    pub fn vhost(&self, name: &str) -> Option<&Vhost> {
        self.vhosts.get(name)
    }

    /// Every vhost, by name.
    pub fn vhosts(&self) -> impl Iterator<Item = &Vhost> {
        self.vhosts.values()
    }

    fn vhost_mut(&mut self, name: &str) -> Result<&mut Vhost, MetaError> {
        self.vhosts.get_mut(name).ok_or_else(|| MetaError::not_found(format!("no vhost '{name}'")))
    }

    /// Finds a queue that connection `conn` may use (404, 405).
    pub fn queue(&self, vhost: &str, name: &str, conn: Owner) -> Result<&QueueDef, MetaError> {
        let q = self.vhost(vhost).and_then(|vh| vh.queues.get(name));
        let q = q.ok_or_else(|| MetaError::not_found(format!("no {}", qmsg(name, vhost))))?;
        check_owner(q, conn, vhost)?;
        Ok(q)
    }

    /// Applies one command: refuses it (and changes nothing), or changes the
    /// state and says what the caller must carry out.
    pub fn apply(&mut self, cmd: Command) -> Result<Outcome, MetaError> {
        let mut out = Outcome::default();
        match cmd {
            Command::AddVhost { name } => {
                if name.is_empty() || name.len() > 255 {
                    return Err(MetaError::precondition(format!("invalid vhost name '{name}' (1 to 255 bytes)")));
                }
                self.add_vhost(&name);
            }
            Command::DeleteVhost { name } => {
                let vh = self.vhosts.remove(&name).ok_or_else(|| MetaError::not_found(format!("no vhost '{name}'")))?;
                for (qname, q) in vh.queues {
                    if q.durable {
                        out.definitions.push(DefChange::Delete { key: persist::queue_key(&name, &qname) });
                    }
                    out.removed.push(RemovedQueue { vhost: name.clone(), name: qname, ids: q.ids });
                }
                for (ename, e) in vh.exchanges {
                    out.definitions.push(DefChange::Delete { key: persist::exchange_key(&name, &ename) });
                    for b in &e.bindings {
                        out.definitions.push(DefChange::Delete { key: persist::binding_key(&name, &ename, b) });
                    }
                    out.exchanges_removed.push((name.clone(), ename));
                }
            }
            Command::DeclareExchange { vhost, name, kind, passive, durable, auto_delete, internal, arguments } => {
                let vh = self.vhost_mut(&vhost)?;
                vh.declare_exchange(name, &kind, passive, durable, auto_delete, internal, arguments, &mut out)?;
            }
            Command::DeleteExchange { vhost, name, if_unused } => {
                self.vhost_mut(&vhost)?.delete_exchange(&name, if_unused, &mut out)?;
            }
            Command::Bind { vhost, source, dest, routing_key, arguments, conn } => {
                self.vhost_mut(&vhost)?.bind(&source, Binding { dest, routing_key, arguments }, conn, &mut out)?;
            }
            Command::Unbind { vhost, source, dest, routing_key, arguments, conn } => {
                self.vhost_mut(&vhost)?.unbind(&source, Binding { dest, routing_key, arguments }, conn, &mut out)?;
            }
            Command::DeclareQueue {
                vhost,
                name,
                generated,
                passive,
                durable,
                conn,
                exclusive,
                auto_delete,
                arguments,
                new_ids,
            } => {
                if generated && passive {
                    // The client asked for a queue named "" to exist.
                    return Err(MetaError::not_found(format!("no {}", qmsg("", &vhost))));
                }
                let d = QueueDeclare { name, generated, passive, durable, conn, exclusive, auto_delete, arguments };
                self.vhost_mut(&vhost)?.declare_queue(d, new_ids, &mut out)?;
            }
            Command::DeleteQueue { vhost, name, if_unused, if_empty, conn, counts: (messages, consumers) } => {
                let vh = self.vhost_mut(&vhost)?;
                let Some(q) = vh.queues.get(&name) else {
                    // RabbitMQ 3.x: deleting a missing queue succeeds.
                    return Ok(out);
                };
                check_owner(q, conn, &vhost)?;
                if if_unused && consumers > 0 {
                    return Err(MetaError::precondition(format!("{} in use", qmsg(&name, &vhost))));
                }
                if if_empty && messages > 0 {
                    return Err(MetaError::precondition(format!("{} not empty", qmsg(&name, &vhost))));
                }
                vh.remove_queue(&name, &mut out);
            }
            Command::ConsumerGone { vhost, name, consumers } => {
                let vh = self.vhost_mut(&vhost)?;
                if vh.queues.get(&name).is_some_and(|q| q.auto_delete && consumers == 0) {
                    vh.remove_queue(&name, &mut out);
                }
            }
            Command::ConnectionClosed { owner } => {
                for vh in self.vhosts.values_mut() {
                    let owned: Vec<String> =
                        vh.queues.values().filter(|q| q.exclusive_owner == Some(owner)).map(|q| q.name.clone()).collect();
                    for name in owned {
                        vh.remove_queue(&name, &mut out);
                    }
                }
            }
        }
        Ok(out)
    }

    /// Whether `cmd` would change nothing here and succeed: a declare of a
    /// queue (owned by the declaring connection, if exclusive) or an
    /// exchange that exists as declared, or a binding that exists. A
    /// gateway answers those from its copy without a round trip to the
    /// metadata group (clients redeclare their topology on every
    /// connection); anything else, refusals included, is the group's to
    /// decide.
    pub fn changes_nothing(&self, cmd: &Command) -> bool {
        match cmd {
            Command::DeclareQueue {
                vhost,
                name,
                generated: false,
                passive,
                durable,
                conn,
                exclusive,
                auto_delete,
                arguments,
                ..
            } => {
                let Some(e) = self.vhost(vhost).and_then(|v| v.queues.get(name)) else { return false };
                if check_owner(e, *conn, vhost).is_err() {
                    return false;
                }
                let d = DeclaredAs { durable: *durable, exclusive: *exclusive, auto_delete: *auto_delete, arguments };
                *passive || check_equivalent(e, d, "").is_ok()
            }
            Command::DeclareExchange { vhost, name, kind, passive, durable, auto_delete, internal, arguments } => {
                if name.is_empty() {
                    return false;
                }
                let Some(x) = self.vhost(vhost).and_then(|v| v.exchanges.get(name)) else { return false };
                *passive
                    || (ExchangeKind::parse_with(kind, arguments) == Some(x.kind)
                        && (x.durable, x.auto_delete, x.internal) == (*durable, *auto_delete, *internal))
            }
            Command::Bind { vhost, source, dest, routing_key, arguments, conn } => {
                let Some(v) = self.vhost(vhost) else { return false };
                v.check_bind(source, dest, *conn).is_ok()
                    && v.exchanges.get(source).is_some_and(|x| {
                        x.bindings.iter().any(|b| b.dest == *dest && b.routing_key == *routing_key && b.arguments == *arguments)
                    })
            }
            _ => false,
        }
    }

    /// Resolves the queue partitions a message published to `exchange`
    /// reaches, each once, following exchange-to-exchange bindings (each
    /// exchange visited once, so cycles end).
    pub fn route(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
    ) -> Result<Vec<Target<'_>>, MetaError> {
        self.route_as(vhost, exchange, routing_key, properties, false)
    }

    /// [`Self::route`] for the broker's own messages (audit events), which
    /// may be published to internal exchanges.
    pub fn route_internal(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
    ) -> Result<Vec<Target<'_>>, MetaError> {
        self.route_as(vhost, exchange, routing_key, properties, true)
    }

    fn route_as(
        &self,
        vhost: &str,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
        broker: bool,
    ) -> Result<Vec<Target<'_>>, MetaError> {
        let Some(vh) = self.vhost(vhost) else {
            return Err(MetaError::not_found(format!("no vhost '{vhost}'")));
        };
        let target = |name: &str| {
            vh.queues.get(name).and_then(|q| {
                let partition = q.partition_for(routing_key, properties);
                q.ids.get(partition).map(|id| Target { queue: q.name.as_str(), partition, id: *id })
            })
        };
        if exchange.is_empty() {
            return Ok(target(routing_key).into_iter().collect());
        }
        let Some(x) = vh.exchanges.get(exchange) else {
            return Err(MetaError::not_found(format!("no {}", xmsg(exchange, vhost))));
        };
        if x.internal && !broker {
            return Err(MetaError::access_refused(format!("cannot publish to internal {}", xmsg(exchange, vhost))));
        }
        let mut targets = Vec::new();
        let mut seen_queues: HashSet<&str> = HashSet::new();
        let mut seen_exchanges: HashSet<&str> = HashSet::new();
        let mut stack = vec![x];
        seen_exchanges.insert(exchange);
        while let Some(x) = stack.pop() {
            for b in &x.bindings {
                let hit = match x.kind.routing() {
                    ExchangeKind::Direct => b.routing_key == routing_key,
                    ExchangeKind::Fanout => true,
                    ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
                    ExchangeKind::Headers => headers_match(&b.arguments, properties.headers.as_ref()),
                    _ => false,
                };
                if !hit {
                    continue;
                }
                match &b.dest {
                    Dest::Queue(q) => {
                        if seen_queues.insert(q.as_str()) {
                            targets.extend(target(q));
                        }
                    }
                    Dest::Exchange(d) => {
                        if seen_exchanges.insert(d.as_str()) {
                            if let Some(next) = vh.exchanges.get(d) {
                                stack.push(next);
                            }
                        }
                    }
                }
            }
        }
        Ok(targets)
    }

    /// Whether `exchange` of `vhost` is an `x-delayed-message` exchange.
    pub fn is_delayed_exchange(&self, vhost: &str, exchange: &str) -> bool {
        self.vhost(vhost).and_then(|vh| vh.exchanges.get(exchange)).is_some_and(|x| x.kind.is_delayed())
    }

    /// The definitions the state implies should be stored, sorted by key:
    /// what the [`Outcome::definitions`] of every command so far have
    /// written, and what [`Topology::load`] rebuilds the durable part from.
    pub fn definitions(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        let mut defs = BTreeMap::new();
        for vh in self.vhosts.values() {
            let v = vh.name.as_str();
            for x in vh.exchanges.values() {
                let standard = STANDARD_EXCHANGES.iter().any(|(n, _)| *n == x.name);
                if x.durable && !standard {
                    defs.insert(persist::exchange_key(v, &x.name), persist::exchange_value(v, x));
                }
                if !x.durable {
                    continue;
                }
                for b in &x.bindings {
                    // A binding whose destination is missing (only possible
                    // after loading) was stored, since it was read back.
                    if vh.dest_durable(&b.dest).unwrap_or(true) {
                        defs.insert(persist::binding_key(v, &x.name, b), persist::binding_value(v, &x.name, b));
                    }
                }
            }
            for q in vh.queues.values().filter(|q| q.persisted) {
                defs.insert(persist::queue_key(v, &q.name), persist::queue_value(&stored_queue(v, q)));
            }
        }
        defs
    }
}

fn stored_queue(vhost: &str, q: &QueueDef) -> StoredQueue {
    StoredQueue {
        vhost: vhost.to_string(),
        name: q.name.clone(),
        ids: q.ids.clone(),
        auto_delete: q.auto_delete,
        arguments: q.arguments.clone(),
    }
}

/// The fields of [`Command::DeclareQueue`] the rules look at.
/// What a queue.declare asks of an existing queue (see `check_equivalent`).
#[derive(Clone, Copy)]
struct DeclaredAs<'a> {
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
    arguments: &'a Arguments,
}

struct QueueDeclare {
    name: String,
    generated: bool,
    passive: bool,
    durable: bool,
    conn: Owner,
    exclusive: bool,
    auto_delete: bool,
    arguments: Arguments,
}

impl Vhost {
    #[allow(clippy::too_many_arguments)]
    fn declare_exchange(
        &mut self,
        name: String,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: Arguments,
        out: &mut Outcome,
    ) -> Result<(), MetaError> {
        if name.is_empty() {
            return Err(MetaError::default_exchange());
        }
        let what = xmsg(&name, &self.name);
        if passive {
            return match self.exchanges.contains_key(&name) {
                true => Ok(()),
                false => Err(MetaError::not_found(format!("no {what}"))),
            };
        }
        let Some(kind) = ExchangeKind::parse_with(kind, &arguments) else {
            if kind == "x-delayed-message" {
                // The delayed-message plugin's check.
                return Err(MetaError::precondition("Invalid argument, 'x-delayed-type' must be an existing exchange type"));
            }
            return Err(MetaError::command_invalid(format!("invalid exchange type '{kind}'")));
        };
        if let Some(x) = self.exchanges.get(&name) {
            if x.kind != kind {
                return Err(MetaError::precondition(format!(
                    "inequivalent arg 'type' for {what}: received '{}' but current is '{}'",
                    kind.as_str(),
                    x.kind.as_str()
                )));
            }
            for (arg, got, cur) in [
                ("durable", durable, x.durable),
                ("auto_delete", auto_delete, x.auto_delete),
                ("internal", internal, x.internal),
            ] {
                if got != cur {
                    return Err(MetaError::precondition(format!(
                        "inequivalent arg '{arg}' for {what}: received '{}' but current is '{}'",
                        bool_text(got),
                        bool_text(cur)
                    )));
                }
            }
            return Ok(());
        }
        if name.starts_with("amq.") {
            return Err(MetaError::access_refused(format!("{what} uses reserved prefix 'amq.'")));
        }
        let x = Exchange { name: name.clone(), kind, durable, auto_delete, internal, arguments, bindings: Vec::new() };
        if durable {
            out.definitions.push(DefChange::Put {
                key: persist::exchange_key(&self.name, &name),
                value: persist::exchange_value(&self.name, &x),
            });
        }
        out.exchanges_created.push((self.name.clone(), name.clone()));
        self.exchanges.insert(name, x);
        Ok(())
    }

    fn delete_exchange(&mut self, name: &str, if_unused: bool, out: &mut Outcome) -> Result<(), MetaError> {
        if name.is_empty() {
            return Err(MetaError::default_exchange());
        }
        if name.starts_with("amq.") {
            return Err(MetaError::access_refused(format!(
                "deletion of system {} not allowed",
                xmsg(name, &self.name)
            )));
        }
        let Some(x) = self.exchanges.get(name) else {
            // RabbitMQ 3.x: deleting a missing exchange succeeds.
            return Ok(());
        };
        let dest = Dest::Exchange(name.to_string());
        let in_use =
            !x.bindings.is_empty() || self.exchanges.values().any(|o| o.bindings.iter().any(|b| b.dest == dest));
        if if_unused && in_use {
            return Err(MetaError::precondition(format!("{} in use", xmsg(name, &self.name))));
        }
        self.remove_exchange(name, out);
        Ok(())
    }

    /// Removes an exchange, its bindings and the bindings to it.
    fn remove_exchange(&mut self, name: &str, out: &mut Outcome) {
        let Some(x) = self.exchanges.remove(name) else { return };
        if x.durable {
            out.definitions.push(DefChange::Delete { key: persist::exchange_key(&self.name, name) });
            for b in &x.bindings {
                out.definitions.push(DefChange::Delete { key: persist::binding_key(&self.name, name, b) });
            }
        }
        out.exchanges_removed.push((self.name.clone(), name.to_string()));
        self.remove_bindings_to(&Dest::Exchange(name.to_string()), out);
    }

    /// Removes every binding whose destination is `dest`; auto-deletes the
    /// exchanges that lost their last binding.
    fn remove_bindings_to(&mut self, dest: &Dest, out: &mut Outcome) {
        let mut emptied = Vec::new();
        for x in self.exchanges.values_mut() {
            let before = x.bindings.len();
            let (gone, kept): (Vec<Binding>, Vec<Binding>) =
                std::mem::take(&mut x.bindings).into_iter().partition(|b| &b.dest == dest);
            x.bindings = kept;
            for b in &gone {
                out.definitions.push(DefChange::Delete { key: persist::binding_key(&self.name, &x.name, b) });
            }
            if before > 0 && x.bindings.is_empty() && x.auto_delete {
                emptied.push(x.name.clone());
            }
        }
        for name in emptied {
            self.remove_exchange(&name, out);
        }
    }

    /// Checks both ends of a binding exist and may be used; returns whether
    /// the destination is durable.
    fn check_bind(&self, source: &str, dest: &Dest, conn: Owner) -> Result<bool, MetaError> {
        if source.is_empty() {
            return Err(MetaError::default_exchange());
        }
        let dest_durable = match dest {
            Dest::Queue(q) => {
                let e = self.queues.get(q).ok_or_else(|| MetaError::not_found(format!("no {}", qmsg(q, &self.name))))?;
                check_owner(e, conn, &self.name)?;
                e.persisted
            }
            Dest::Exchange(d) => {
                if d.is_empty() {
                    return Err(MetaError::default_exchange());
                }
                let x = self.exchanges.get(d);
                x.ok_or_else(|| MetaError::not_found(format!("no {}", xmsg(d, &self.name))))?.durable
            }
        };
        if !self.exchanges.contains_key(source) {
            return Err(MetaError::not_found(format!("no {}", xmsg(source, &self.name))));
        }
        Ok(dest_durable)
    }

    /// Whether a destination survives restarts; `None` if it is missing.
    fn dest_durable(&self, dest: &Dest) -> Option<bool> {
        match dest {
            Dest::Queue(q) => self.queues.get(q).map(|q| q.persisted),
            Dest::Exchange(x) => self.exchanges.get(x).map(|x| x.durable),
        }
    }

    fn bind(&mut self, source: &str, binding: Binding, conn: Owner, out: &mut Outcome) -> Result<(), MetaError> {
        let dest_durable = self.check_bind(source, &binding.dest, conn)?;
        let Some(x) = self.exchanges.get_mut(source) else {
            return Err(MetaError::not_found(format!("no {}", xmsg(source, &self.name))));
        };
        if x.bindings.contains(&binding) {
            return Ok(());
        }
        // Stored only if both ends are: a restart must not bring back a
        // binding to something that is gone.
        if x.durable && dest_durable {
            out.definitions.push(DefChange::Put {
                key: persist::binding_key(&self.name, source, &binding),
                value: persist::binding_value(&self.name, source, &binding),
            });
        }
        x.bindings.push(binding);
        Ok(())
    }

    fn unbind(&mut self, source: &str, binding: Binding, conn: Owner, out: &mut Outcome) -> Result<(), MetaError> {
        self.check_bind(source, &binding.dest, conn)?;
        let mut auto_delete = false;
        if let Some(x) = self.exchanges.get_mut(source) {
            let before = x.bindings.len();
            x.bindings.retain(|b| b != &binding);
            if x.bindings.len() != before {
                out.definitions.push(DefChange::Delete { key: persist::binding_key(&self.name, source, &binding) });
                auto_delete = x.auto_delete && x.bindings.is_empty();
            }
        }
        if auto_delete {
            self.remove_exchange(source, out);
        }
        Ok(())
    }

    fn declare_queue(&mut self, d: QueueDeclare, new_ids: Vec<u64>, out: &mut Outcome) -> Result<(), MetaError> {
        let what = qmsg(&d.name, &self.name);
        if let Some(e) = self.queues.get(&d.name) {
            check_owner(e, d.conn, &self.name)?;
            if !d.passive {
                let as_declared = DeclaredAs {
                    durable: d.durable,
                    exclusive: d.exclusive,
                    auto_delete: d.auto_delete,
                    arguments: &d.arguments,
                };
                check_equivalent(e, as_declared, &what)?;
            }
            return Ok(());
        }
        if d.passive {
            return Err(MetaError::not_found(format!("no {what}")));
        }
        if !d.generated && d.name.starts_with("amq.") {
            return Err(MetaError::access_refused(format!("{what} uses reserved prefix 'amq.'")));
        }
        validate_queue_args(&d.arguments, &what)?;
        let n = partition_count(&d.arguments);
        if new_ids.len() != n {
            return Err(MetaError::internal(format!("{} ids given for {n} partitions of {what}", new_ids.len())));
        }
        // Exclusive queues die with their connection, so they are never
        // recovered after a restart (RabbitMQ does the same).
        let persisted = d.durable && !d.exclusive;
        let q = QueueDef {
            name: d.name.clone(),
            ids: new_ids,
            durable: d.durable,
            persisted,
            exclusive_owner: d.exclusive.then_some(d.conn),
            auto_delete: d.auto_delete,
            arguments: d.arguments,
        };
        out.created.push(CreatedQueue {
            vhost: self.name.clone(),
            name: d.name.clone(),
            ids: q.ids.clone(),
            durable: persisted,
            arguments: q.arguments.clone(),
        });
        if persisted {
            out.definitions.push(DefChange::Put {
                key: persist::queue_key(&self.name, &d.name),
                value: persist::queue_value(&stored_queue(&self.name, &q)),
            });
        }
        self.queues.insert(d.name, q);
        Ok(())
    }

    /// Removes a queue and the bindings to it.
    fn remove_queue(&mut self, name: &str, out: &mut Outcome) {
        let Some(q) = self.queues.remove(name) else { return };
        if q.persisted {
            out.definitions.push(DefChange::Delete { key: persist::queue_key(&self.name, name) });
        }
        self.remove_bindings_to(&Dest::Queue(name.to_string()), out);
        out.removed.push(RemovedQueue { vhost: self.name.clone(), name: q.name, ids: q.ids });
    }
}

fn check_owner(q: &QueueDef, conn: Owner, vhost: &str) -> Result<(), MetaError> {
    match q.exclusive_owner {
        Some(owner) if owner != conn => Err(MetaError::locked(format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            qmsg(&q.name, vhost)
        ))),
        _ => Ok(()),
    }
}

fn check_equivalent(e: &QueueDef, d: DeclaredAs<'_>, what: &str) -> Result<(), MetaError> {
    for (arg, got, cur) in [
        ("durable", d.durable, e.durable),
        ("exclusive", d.exclusive, e.exclusive_owner.is_some()),
        ("auto_delete", d.auto_delete, e.auto_delete),
    ] {
        if got != cur {
            return Err(MetaError::precondition(format!(
                "inequivalent arg '{arg}' for {what}: received '{}' but current is '{}'",
                bool_text(got),
                bool_text(cur)
            )));
        }
    }
    for arg in EQUIVALENT_QUEUE_ARGS {
        let got = d.arguments.get(arg);
        let cur = e.arguments.get(arg);
        let same = match (got, cur) {
            (Some(a), Some(b)) => match (a.as_i64(), b.as_i64()) {
                (Some(x), Some(y)) => x == y,
                _ => a == b,
            },
            (None, None) => true,
            _ => false,
        };
        if !same {
            return Err(MetaError::precondition(format!(
                "inequivalent arg '{arg}' for {what}: received {} but current is {}",
                describe(got),
                describe(cur)
            )));
        }
    }
    Ok(())
}

fn describe(v: Option<&FieldValue>) -> String {
    match v {
        None => "none".into(),
        Some(v) => match (v.as_i64(), v.as_str()) {
            (Some(n), _) => format!("the value '{n}'"),
            (_, Some(s)) => format!("the value '{s}'"),
            _ => format!("the value '{v:?}'"),
        },
    }
}

/// Rejects queue arguments of the wrong type or range, as RabbitMQ does
/// (406, with RabbitMQ's wording).
fn validate_queue_args(args: &Arguments, what: &str) -> Result<(), MetaError> {
    let invalid = |k: &str, problem: String| MetaError::precondition(format!("invalid arg '{k}' for {what}: {problem}"));
    // RabbitMQ's check_dlxrk_arg.
    if args.get("x-dead-letter-routing-key").is_some() && args.get("x-dead-letter-exchange").is_none() {
        return Err(invalid("x-dead-letter-routing-key", "routing_key_but_no_dlx_defined".to_owned()));
    }
    for (k, v) in args.iter() {
        let string = matches!(k, "x-dead-letter-exchange" | "x-dead-letter-routing-key" | "x-deduplication-header");
        if string && v.as_str().is_none() {
            return Err(invalid(k, format!("{{unacceptable_type,{}}}", type_name(v))));
        }
        if k == "x-ordering" && !matches!(v.as_str(), Some("strict" | "best-effort")) {
            return Err(invalid(k, "expected \"strict\" or \"best-effort\"".to_owned()));
        }
        if matches!(k, "x-message-deduplication" | "x-dead-letter-on-delete") && v.as_bool().is_none() {
            return Err(invalid(k, format!("{{unacceptable_type,{}}}", type_name(v))));
        }
        if k == "x-overflow" {
            // RabbitMQ's check_overflow.
            let problem = match v.as_str() {
                Some("drop-head" | "reject-publish" | "reject-publish-dlx") => continue,
                Some(_) => "invalid_overflow".to_string(),
                None => format!("{{unacceptable_type,{}}}", type_name(v)),
            };
            return Err(MetaError::precondition(format!("invalid arg '{k}' for {what}: {problem}")));
        }
        let numeric = matches!(
            k,
            "x-expires"
                | "x-message-ttl"
                | "x-max-length"
                | "x-max-length-bytes"
                | "x-max-priority"
                | "x-delivery-limit"
                | "x-partitions"
                | "x-max-message-size"
                | "x-visibility-timeout"
                | "x-consumer-timeout"
                | "x-deduplication-window-ms"
                | "x-ordering-window-ms"
        );
        if !numeric {
            continue;
        }
        let problem = match v.as_i64() {
            None => format!("\"expected integer, got {}\"", type_name(v)),
            Some(0) if matches!(k, "x-expires" | "x-partitions" | "x-visibility-timeout" | "x-consumer-timeout") => {
                "{value_zero,0}".to_string()
            }
            Some(n) if k == "x-partitions" && n > MAX_PARTITIONS => format!("{{value_too_large,{n},{MAX_PARTITIONS}}}"),
            Some(n) if n < 0 => format!("{{value_negative,{n}}}"),
            // RabbitMQ's check_max_priority_arg (?MAX_SUPPORTED_PRIORITY).
            Some(n) if k == "x-max-priority" && n > 255 => format!("{{max_value_exceeded,{n}}}"),
            // RabbitMQ's ?MAX_EXPIRY_TIMER.
            Some(n) if (k == "x-message-ttl" || k == "x-expires") && n > 4_294_967_295 => {
                format!("{{value_too_big,{n}}}")
            }
            Some(_) => continue,
        };
        return Err(MetaError::precondition(format!("invalid arg '{k}' for {what}: {problem}")));
    }
    Ok(())
}

/// RabbitMQ's names for field types, used in error texts.
fn type_name(v: &FieldValue) -> &'static str {
    match v {
        FieldValue::LongString(_) => "longstr",
        FieldValue::Bool(_) => "bool",
        FieldValue::Table(_) => "table",
        FieldValue::Array(_) => "array",
        FieldValue::F32(_) => "float",
        FieldValue::F64(_) => "double",
        FieldValue::Decimal(_) => "decimal",
        FieldValue::Timestamp(_) => "timestamp",
        FieldValue::Void => "void",
        FieldValue::ByteArray(_) => "bytes",
        _ => "integer",
    }
}
