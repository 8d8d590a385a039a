//! The router: vhosts, exchanges, bindings and the queue registry.
//!
//! It decides *where* a message goes and enforces RabbitMQ's rules for
//! declaring, binding and deleting; the queues themselves live behind the
//! cluster [`Backend`]. It never sees a wire frame or a storage type.
//!
//! Concurrency: one std `RwLock` per vhost topology, never held across
//! `.await`: durable writes are started under the lock and awaited after.

mod matching;
mod persist;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures_util::future::join_all;
use sluice_cluster::{Backend, Durable, Queue, QueueId, QueueSpec};
use sluice_codecs::command::{Arguments, FieldValue, Properties};

use crate::error::BrokerError;
pub use matching::{headers_match, topic_matches};
use persist::{QueueDef, Stored};

/// Identifies a client connection (owner of exclusive queues).
pub type ConnId = u64;

/// The four exchange types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(Self::Direct),
            "fanout" => Some(Self::Fanout),
            "topic" => Some(Self::Topic),
            "headers" => Some(Self::Headers),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
        }
    }
}

/// Where a binding leads.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Dest {
    Queue(String),
    Exchange(String),
}

/// One binding of an exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct Binding {
    pub dest: Dest,
    pub routing_key: String,
    pub arguments: Arguments,
}

/// An exchange and its outgoing bindings.
#[derive(Clone, Debug)]
pub struct Exchange {
    pub name: String,
    pub kind: ExchangeKind,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: Arguments,
    pub bindings: Vec<Binding>,
    /// Auto-delete only fires once the exchange had a binding.
    pub ever_bound: bool,
}

/// A queue known to the router.
#[derive(Clone)]
pub struct QueueEntry {
    pub name: String,
    /// One id per partition (one for a plain queue).
    pub ids: Vec<QueueId>,
    /// As declared (for equivalence checks).
    pub durable: bool,
    /// Whether its definition is stored: durable and not exclusive.
    pub persisted: bool,
    pub exclusive_owner: Option<ConnId>,
    pub auto_delete: bool,
    pub arguments: Arguments,
    /// The backend queues: one, or `x-partitions` of them.
    pub partitions: Vec<Arc<dyn Queue>>,
}

impl QueueEntry {
    /// Ready messages and consumers, summed over partitions (a consumer of
    /// a partitioned queue counts once per partition it is attached to).
    pub fn counts(&self) -> (u32, u32) {
        let (mut m, mut c) = (0u32, 0u32);
        for p in &self.partitions {
            let (pm, pc) = p.counts();
            m = m.saturating_add(pm);
            c = c.max(pc);
        }
        (m, c)
    }

    /// The partition a message goes to: by its `x-partition-key` header if
    /// it has one, else by routing key, so equal keys keep their order.
    fn partition_for(&self, routing_key: &str, properties: &Properties) -> Option<&Arc<dyn Queue>> {
        if self.partitions.len() <= 1 {
            return self.partitions.first();
        }
        let header = properties.headers.as_ref().and_then(|h| h.get("x-partition-key"));
        let key: Vec<u8> = match header {
            Some(v) => match (v.as_str(), v.as_i64()) {
                (Some(s), _) => s.as_bytes().to_vec(),
                (None, Some(n)) => n.to_string().into_bytes(),
                _ => routing_key.as_bytes().to_vec(),
            },
            None => routing_key.as_bytes().to_vec(),
        };
        let n = self.partitions.len() as u64;
        self.partitions.get((partition_hash(&key) % n) as usize)
    }
}

/// FNV-1a, 64 bit: fixed forever, so every gateway picks the same
/// partition for a key.
fn partition_hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Most partitions a queue may have.
pub const MAX_PARTITIONS: i64 = 1024;

/// `x-partitions`, validated by `validate_queue_args`.
fn partition_count(args: &Arguments) -> usize {
    args.get("x-partitions").and_then(|v| v.as_i64()).map(|n| n.clamp(1, MAX_PARTITIONS) as usize).unwrap_or(1)
}

/// Name of partition `i` of queue `name`, for logs and metrics.
fn partition_name(name: &str, i: usize, n: usize) -> String {
    if n == 1 {
        name.to_string()
    } else {
        format!("{name}#{i}")
    }
}

#[derive(Default)]
struct Topology {
    exchanges: HashMap<String, Exchange>,
    queues: HashMap<String, QueueEntry>,
}

/// One virtual host.
pub struct VHost {
    pub name: String,
    topo: RwLock<Topology>,
}

impl VHost {
    fn read(&self) -> RwLockReadGuard<'_, Topology> {
        self.topo.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, Topology> {
        self.topo.write().unwrap_or_else(|p| p.into_inner())
    }
}

/// Arguments of a queue declaration.
pub struct QueueDeclare {
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: Arguments,
}

/// The router shared by every connection.
pub struct Router {
    backend: Arc<dyn Backend>,
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
}

/// Waits for durable writes. A storage failure is a 506 RESOURCE_ERROR on
/// the connection: the broker cannot keep what the client asked it to keep.
pub async fn wait_all(writes: Vec<Durable>) -> Result<(), BrokerError> {
    for r in join_all(writes).await {
        r.map_err(|e| BrokerError::connection(sluice_codecs::amqp::reply_code::RESOURCE_ERROR, format!("storage failed: {e}")))?;
    }
    Ok(())
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
];

fn random_id() -> u64 {
    rand::random::<u64>()
}

/// `amq.gen-` + 22 URL-safe characters, like RabbitMQ's generated names.
fn generated_name() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::from("amq.gen-");
    for _ in 0..22 {
        let i = rand::random::<u32>() as usize % ALPHABET.len();
        s.push(ALPHABET.get(i).copied().unwrap_or(b'A') as char);
    }
    s
}

impl Router {
    /// Creates the router and loads every stored definition.
    pub fn open(backend: Arc<dyn Backend>) -> Result<Arc<Router>, BrokerError> {
        let router = Router { backend, vhosts: RwLock::new(HashMap::new()) };
        router.add_vhost("/");
        let mut bindings = Vec::new();
        let defs = router.backend.definitions().map_err(|e| BrokerError::internal(e.to_string()))?;
        for (k, v) in defs {
            match persist::decode(&k, &v) {
                Ok(Stored::Exchange { vhost, exchange }) => {
                    let vh = router.add_vhost(&vhost);
                    vh.write().exchanges.insert(exchange.name.clone(), exchange);
                }
                Ok(Stored::Queue(def)) => {
                    let vh = router.add_vhost(&def.vhost);
                    let n = def.ids.len();
                    let mut partitions = Vec::with_capacity(n);
                    for (i, id) in def.ids.iter().enumerate() {
                        partitions.push(
                            router
                                .backend
                                .open_queue(QueueSpec {
                                    id: QueueId(*id),
                                    name: partition_name(&def.name, i, n),
                                    durable: true,
                                    arguments: def.arguments.clone(),
                                })
                                .map_err(|e| BrokerError::internal(format!("recovering queue {}: {e}", def.name)))?,
                        );
                    }
                    vh.write().queues.insert(
                        def.name.clone(),
                        QueueEntry {
                            name: def.name,
                            ids: def.ids.iter().map(|id| QueueId(*id)).collect(),
                            durable: true,
                            persisted: true,
                            exclusive_owner: None,
                            auto_delete: def.auto_delete,
                            arguments: def.arguments,
                            partitions,
                        },
                    );
                }
                Ok(Stored::Binding { vhost, source, binding }) => bindings.push((vhost, source, binding)),
                Err(e) => tracing::error!(error = %e, "skipping unreadable definition"),
            }
        }
        for (vhost, source, binding) in bindings {
            let vh = router.add_vhost(&vhost);
            let mut topo = vh.write();
            if let Some(x) = topo.exchanges.get_mut(&source) {
                x.ever_bound = true;
                x.bindings.push(binding);
            }
        }
        Ok(Arc::new(router))
    }

    /// Creates a vhost with its standard exchanges (if missing).
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut vhosts = self.vhosts.write().unwrap_or_else(|p| p.into_inner());
        vhosts
            .entry(name.to_string())
            .or_insert_with(|| {
                let mut topo = Topology::default();
                for (n, k) in [
                    ("amq.direct", ExchangeKind::Direct),
                    ("amq.fanout", ExchangeKind::Fanout),
                    ("amq.topic", ExchangeKind::Topic),
                    ("amq.headers", ExchangeKind::Headers),
                    ("amq.match", ExchangeKind::Headers),
                ] {
                    topo.exchanges.insert(
                        n.to_string(),
                        Exchange {
                            name: n.to_string(),
                            kind: k,
                            durable: true,
                            auto_delete: false,
                            internal: false,
                            arguments: Arguments::default(),
                            bindings: Vec::new(),
                            ever_bound: false,
                        },
                    );
                }
                Arc::new(VHost { name: name.to_string(), topo: RwLock::new(topo) })
            })
            .clone()
    }

    /// Looks a vhost up.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().unwrap_or_else(|p| p.into_inner()).get(name).cloned()
    }

    /// The backend (for shutdown).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    // ---- exchanges -------------------------------------------------------

    #[allow(clippy::too_many_arguments)]
    pub async fn declare_exchange(
        &self,
        vh: &VHost,
        name: &str,
        kind: &str,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: Arguments,
    ) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::access_refused("operation not permitted on the default exchange"));
        }
        let write = {
            let mut topo = vh.write();
            if passive {
                return match topo.exchanges.get(name) {
                    Some(_) => Ok(()),
                    None => Err(BrokerError::not_found(format!("no {}", xmsg(name, &vh.name)))),
                };
            }
            let Some(kind) = ExchangeKind::parse(kind) else {
                return Err(BrokerError::connection(
                    sluice_codecs::amqp::reply_code::COMMAND_INVALID,
                    format!("invalid exchange type '{kind}'"),
                ));
            };
            if let Some(x) = topo.exchanges.get(name) {
                let what = xmsg(name, &vh.name);
                if x.kind != kind {
                    return Err(BrokerError::precondition(format!(
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
                        return Err(BrokerError::precondition(format!(
                            "inequivalent arg '{arg}' for {what}: received '{}' but current is '{}'",
                            bool_text(got),
                            bool_text(cur)
                        )));
                    }
                }
                return Ok(());
            }
            if name.starts_with("amq.") {
                return Err(BrokerError::access_refused(format!(
                    "{} uses reserved prefix 'amq.'",
                    xmsg(name, &vh.name)
                )));
            }
            let x = Exchange {
                name: name.to_string(),
                kind,
                durable,
                auto_delete,
                internal,
                arguments,
                bindings: Vec::new(),
                ever_bound: false,
            };
            let write = durable.then(|| {
                self.backend.put_definition(persist::exchange_key(&vh.name, name), persist::exchange_value(&vh.name, &x))
            });
            topo.exchanges.insert(name.to_string(), x);
            write
        };
        wait_all(write.into_iter().collect()).await
    }

    pub async fn delete_exchange(&self, vh: &VHost, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        if name.is_empty() {
            return Err(BrokerError::access_refused("operation not permitted on the default exchange"));
        }
        if name.starts_with("amq.") {
            return Err(BrokerError::access_refused(format!(
                "deletion of system {} not allowed",
                xmsg(name, &vh.name)
            )));
        }
        let writes = {
            let mut topo = vh.write();
            let Some(x) = topo.exchanges.get(name) else {
                // RabbitMQ 3.x: deleting a missing exchange succeeds.
                return Ok(());
            };
            let in_use = !x.bindings.is_empty()
                || topo.exchanges.values().any(|o| o.bindings.iter().any(|b| b.dest == Dest::Exchange(name.into())));
            if if_unused && in_use {
                return Err(BrokerError::precondition(format!("{} in use", xmsg(name, &vh.name))));
            }
            self.remove_exchange(&vh.name, &mut topo, name)
        };
        wait_all(writes).await
    }

    /// Removes an exchange, its bindings and bindings to it (under the lock).
    fn remove_exchange(&self, vhost: &str, topo: &mut Topology, name: &str) -> Vec<Durable> {
        let mut writes = Vec::new();
        let Some(x) = topo.exchanges.remove(name) else { return writes };
        if x.durable {
            writes.push(self.backend.delete_definition(persist::exchange_key(vhost, name)));
            for b in &x.bindings {
                writes.push(self.backend.delete_definition(persist::binding_key(vhost, name, b)));
            }
        }
        let dest = Dest::Exchange(name.to_string());
        writes.extend(self.remove_bindings_to(vhost, topo, &dest));
        writes
    }

    /// Removes every binding whose destination is `dest`; auto-deletes
    /// exchanges that lost their last binding.
    fn remove_bindings_to(&self, vhost: &str, topo: &mut Topology, dest: &Dest) -> Vec<Durable> {
        let mut writes = Vec::new();
        let mut emptied = Vec::new();
        for x in topo.exchanges.values_mut() {
            let before = x.bindings.len();
            let mut removed = Vec::new();
            x.bindings.retain(|b| {
                let keep = &b.dest != dest;
                if !keep {
                    removed.push(b.clone());
                }
                keep
            });
            for b in removed {
                writes.push(self.backend.delete_definition(persist::binding_key(vhost, &x.name, &b)));
            }
            if before > 0 && x.bindings.is_empty() && x.auto_delete {
                emptied.push(x.name.clone());
            }
        }
        for name in emptied {
            writes.extend(self.remove_exchange(vhost, topo, &name));
        }
        writes
    }

    // ---- bindings --------------------------------------------------------

    /// Binds `dest` to exchange `source` (queue.bind and exchange.bind).
    pub async fn bind(
        &self,
        vh: &VHost,
        conn: ConnId,
        source: &str,
        dest: Dest,
        routing_key: &str,
        arguments: Arguments,
    ) -> Result<(), BrokerError> {
        let write = {
            let mut topo = vh.write();
            let dest_durable = self.check_bind(vh, &topo, conn, source, &dest)?;
            let Some(x) = topo.exchanges.get_mut(source) else {
                return Err(BrokerError::not_found(format!("no {}", xmsg(source, &vh.name))));
            };
            let binding = Binding { dest, routing_key: routing_key.to_string(), arguments };
            if x.bindings.contains(&binding) {
                return Ok(());
            }
            let write = (x.durable && dest_durable).then(|| {
                self.backend.put_definition(
                    persist::binding_key(&vh.name, source, &binding),
                    persist::binding_value(&vh.name, source, &binding),
                )
            });
            x.ever_bound = true;
            x.bindings.push(binding);
            write
        };
        wait_all(write.into_iter().collect()).await
    }

    /// Checks both ends of a binding exist and may be used; returns whether
    /// the destination is durable.
    fn check_bind(&self, vh: &VHost, topo: &Topology, conn: ConnId, source: &str, dest: &Dest) -> Result<bool, BrokerError> {
        if source.is_empty() {
            return Err(BrokerError::access_refused("operation not permitted on the default exchange"));
        }
        let dest_durable = match dest {
            Dest::Queue(q) => {
                let e = topo.queues.get(q).ok_or_else(|| BrokerError::not_found(format!("no {}", qmsg(q, &vh.name))))?;
                check_owner(e, conn, &vh.name)?;
                e.persisted
            }
            Dest::Exchange(d) => {
                if d.is_empty() {
                    return Err(BrokerError::access_refused("operation not permitted on the default exchange"));
                }
                topo.exchanges.get(d).ok_or_else(|| BrokerError::not_found(format!("no {}", xmsg(d, &vh.name))))?.durable
            }
        };
        if !topo.exchanges.contains_key(source) {
            return Err(BrokerError::not_found(format!("no {}", xmsg(source, &vh.name))));
        }
        Ok(dest_durable)
    }

    pub async fn unbind(
        &self,
        vh: &VHost,
        conn: ConnId,
        source: &str,
        dest: Dest,
        routing_key: &str,
        arguments: Arguments,
    ) -> Result<(), BrokerError> {
        let writes = {
            let mut topo = vh.write();
            self.check_bind(vh, &topo, conn, source, &dest)?;
            let binding = Binding { dest, routing_key: routing_key.to_string(), arguments };
            let mut writes = Vec::new();
            let mut auto_delete = false;
            if let Some(x) = topo.exchanges.get_mut(source) {
                let before = x.bindings.len();
                x.bindings.retain(|b| b != &binding);
                if x.bindings.len() != before {
                    writes.push(self.backend.delete_definition(persist::binding_key(&vh.name, source, &binding)));
                    auto_delete = x.auto_delete && x.bindings.is_empty();
                }
            }
            if auto_delete {
                writes.extend(self.remove_exchange(&vh.name, &mut topo, source));
            }
            writes
        };
        wait_all(writes).await
    }

    // ---- queues ----------------------------------------------------------

    /// queue.declare: returns (name, ready messages, consumers).
    pub async fn declare_queue(&self, vh: &VHost, conn: ConnId, d: QueueDeclare) -> Result<(String, u32, u32), BrokerError> {
        let generated = d.name.is_empty();
        if generated && d.passive {
            return Err(BrokerError::not_found(format!("no {}", qmsg("", &vh.name))));
        }
        let name = if generated { generated_name() } else { d.name.clone() };
        let (entry, write) = {
            let mut topo = vh.write();
            if let Some(e) = topo.queues.get(&name) {
                check_owner(e, conn, &vh.name)?;
                if !d.passive {
                    check_equivalent(e, &d, &vh.name)?;
                }
                let (m, c) = e.counts();
                return Ok((name, m, c));
            }
            if d.passive {
                return Err(BrokerError::not_found(format!("no {}", qmsg(&name, &vh.name))));
            }
            if !generated && name.starts_with("amq.") {
                return Err(BrokerError::access_refused(format!(
                    "{} uses reserved prefix 'amq.'",
                    qmsg(&name, &vh.name)
                )));
            }
            validate_queue_args(&d.arguments, &qmsg(&name, &vh.name))?;
            // Exclusive queues die with their connection, so they are never
            // recovered after a restart (RabbitMQ does the same).
            let durable = d.durable && !d.exclusive;
            let n = partition_count(&d.arguments);
            let ids: Vec<QueueId> = (0..n).map(|_| QueueId(random_id())).collect();
            let mut partitions = Vec::with_capacity(n);
            for (i, id) in ids.iter().enumerate() {
                partitions.push(self.backend.open_queue(QueueSpec {
                    id: *id,
                    name: partition_name(&name, i, n),
                    durable,
                    arguments: d.arguments.clone(),
                })?);
            }
            let entry = QueueEntry {
                name: name.clone(),
                ids: ids.clone(),
                durable: d.durable,
                persisted: durable,
                exclusive_owner: d.exclusive.then_some(conn),
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
                partitions,
            };
            let write = durable.then(|| {
                self.backend.put_definition(
                    persist::queue_key(&vh.name, &name),
                    persist::queue_value(&QueueDef {
                        vhost: vh.name.clone(),
                        name: name.clone(),
                        ids: ids.iter().map(|id| id.0).collect(),
                        auto_delete: d.auto_delete,
                        arguments: d.arguments.clone(),
                    }),
                )
            });
            topo.queues.insert(name.clone(), entry.clone());
            (entry, write)
        };
        wait_all(write.into_iter().collect()).await?;
        let (m, c) = entry.counts();
        Ok((name, m, c))
    }

    /// Finds a queue the connection may use.
    pub fn queue(&self, vh: &VHost, conn: ConnId, name: &str) -> Result<QueueEntry, BrokerError> {
        let topo = vh.read();
        let e = topo.queues.get(name).ok_or_else(|| BrokerError::not_found(format!("no {}", qmsg(name, &vh.name))))?;
        check_owner(e, conn, &vh.name)?;
        Ok(e.clone())
    }

    /// queue.delete: returns the number of ready messages dropped.
    pub async fn delete_queue(&self, vh: &VHost, conn: ConnId, name: &str, if_unused: bool, if_empty: bool) -> Result<u32, BrokerError> {
        let (count, writes) = {
            let mut topo = vh.write();
            let Some(e) = topo.queues.get(name) else {
                // RabbitMQ 3.x: deleting a missing queue succeeds with 0.
                return Ok(0);
            };
            check_owner(e, conn, &vh.name)?;
            let (messages, consumers) = e.counts();
            if if_unused && consumers > 0 {
                return Err(BrokerError::precondition(format!("{} in use", qmsg(name, &vh.name))));
            }
            if if_empty && messages > 0 {
                return Err(BrokerError::precondition(format!("{} not empty", qmsg(name, &vh.name))));
            }
            self.remove_queue(&vh.name, &mut topo, name)?
        };
        wait_all(writes).await?;
        Ok(count)
    }

    fn remove_queue(&self, vhost: &str, topo: &mut Topology, name: &str) -> Result<(u32, Vec<Durable>), BrokerError> {
        let Some(e) = topo.queues.remove(name) else { return Ok((0, Vec::new())) };
        let mut writes = Vec::new();
        if e.persisted {
            writes.push(self.backend.delete_definition(persist::queue_key(vhost, name)));
        }
        writes.extend(self.remove_bindings_to(vhost, topo, &Dest::Queue(name.to_string())));
        let mut count = 0u32;
        for id in &e.ids {
            count = count.saturating_add(self.backend.delete_queue(*id)?);
        }
        Ok((count, writes))
    }

    /// Auto-delete: called when a consumer of `name` went away.
    pub async fn consumer_gone(&self, vh: &VHost, name: &str) {
        let writes = {
            let mut topo = vh.write();
            let Some(e) = topo.queues.get(name) else { return };
            if !e.auto_delete || e.counts().1 > 0 {
                return;
            }
            match self.remove_queue(&vh.name, &mut topo, name) {
                Ok((_, w)) => w,
                Err(err) => {
                    tracing::warn!(queue = name, error = %err, "auto-delete failed");
                    return;
                }
            }
        };
        if let Err(e) = wait_all(writes).await {
            tracing::warn!(queue = name, error = %e, "auto-delete not persisted");
        }
    }

    /// Deletes the exclusive queues of a closed connection.
    pub async fn connection_closed(&self, conn: ConnId) {
        let vhosts: Vec<Arc<VHost>> = self.vhosts.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        for vh in vhosts {
            let writes = {
                let mut topo = vh.write();
                let owned: Vec<String> =
                    topo.queues.values().filter(|e| e.exclusive_owner == Some(conn)).map(|e| e.name.clone()).collect();
                let mut writes = Vec::new();
                for name in owned {
                    match self.remove_queue(&vh.name, &mut topo, &name) {
                        Ok((_, w)) => writes.extend(w),
                        Err(e) => tracing::warn!(queue = name, error = %e, "exclusive queue delete failed"),
                    }
                }
                writes
            };
            if let Err(e) = wait_all(writes).await {
                tracing::warn!(error = %e, "exclusive queue delete not persisted");
            }
        }
    }

    // ---- routing ---------------------------------------------------------

    /// Resolves the queues a message published to `exchange` reaches.
    pub fn route(
        &self,
        vh: &VHost,
        exchange: &str,
        routing_key: &str,
        properties: &Properties,
    ) -> Result<Vec<Arc<dyn Queue>>, BrokerError> {
        let topo = vh.read();
        if exchange.is_empty() {
            return Ok(topo
                .queues
                .get(routing_key)
                .and_then(|e| e.partition_for(routing_key, properties).cloned())
                .into_iter()
                .collect());
        }
        let Some(x) = topo.exchanges.get(exchange) else {
            return Err(BrokerError::not_found(format!("no {}", xmsg(exchange, &vh.name))));
        };
        if x.internal {
            return Err(BrokerError::access_refused(format!(
                "cannot publish to internal {}",
                xmsg(exchange, &vh.name)
            )));
        }
        let mut queues: Vec<Arc<dyn Queue>> = Vec::new();
        let mut seen_queues: HashSet<&str> = HashSet::new();
        let mut seen_exchanges: HashSet<&str> = HashSet::new();
        let mut stack = vec![x];
        seen_exchanges.insert(exchange);
        while let Some(x) = stack.pop() {
            for b in &x.bindings {
                let hit = match x.kind {
                    ExchangeKind::Direct => b.routing_key == routing_key,
                    ExchangeKind::Fanout => true,
                    ExchangeKind::Topic => topic_matches(&b.routing_key, routing_key),
                    ExchangeKind::Headers => headers_match(&b.arguments, properties.headers.as_ref()),
                };
                if !hit {
                    continue;
                }
                match &b.dest {
                    Dest::Queue(q) => {
                        if seen_queues.insert(q.as_str()) {
                            if let Some(q) = topo.queues.get(q).and_then(|e| e.partition_for(routing_key, properties)) {
                                queues.push(q.clone());
                            }
                        }
                    }
                    Dest::Exchange(d) => {
                        if seen_exchanges.insert(d.as_str()) {
                            if let Some(next) = topo.exchanges.get(d) {
                                stack.push(next);
                            }
                        }
                    }
                }
            }
        }
        Ok(queues)
    }
}

fn check_owner(e: &QueueEntry, conn: ConnId, vhost: &str) -> Result<(), BrokerError> {
    match e.exclusive_owner {
        Some(owner) if owner != conn => Err(BrokerError::locked(format!(
            "cannot obtain exclusive access to locked {}. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.",
            qmsg(&e.name, vhost)
        ))),
        _ => Ok(()),
    }
}

fn check_equivalent(e: &QueueEntry, d: &QueueDeclare, vhost: &str) -> Result<(), BrokerError> {
    let what = qmsg(&e.name, vhost);
    for (arg, got, cur) in [
        ("durable", d.durable, e.durable),
        ("exclusive", d.exclusive, e.exclusive_owner.is_some()),
        ("auto_delete", d.auto_delete, e.auto_delete),
    ] {
        if got != cur {
            return Err(BrokerError::precondition(format!(
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
            return Err(BrokerError::precondition(format!(
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
fn validate_queue_args(args: &Arguments, what: &str) -> Result<(), BrokerError> {
    for (k, v) in args.iter() {
        let numeric = matches!(
            k,
            "x-expires"
                | "x-message-ttl"
                | "x-max-length"
                | "x-max-length-bytes"
                | "x-max-priority"
                | "x-delivery-limit"
                | "x-partitions"
        );
        if !numeric {
            continue;
        }
        let problem = match v.as_i64() {
            None => format!("\"expected integer, got {}\"", type_name(v)),
            Some(0) if k == "x-expires" || k == "x-partitions" => "{value_zero,0}".to_string(),
            Some(n) if k == "x-partitions" && n > MAX_PARTITIONS => format!("{{value_too_large,{n},{MAX_PARTITIONS}}}"),
            Some(n) if n < 0 => format!("{{value_negative,{n}}}"),
            Some(_) => continue,
        };
        return Err(BrokerError::precondition(format!("invalid arg '{k}' for {what}: {problem}")));
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
