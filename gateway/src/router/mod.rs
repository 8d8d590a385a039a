//! The router: the gateway's side of the metadata.
//!
//! RabbitMQ's rules for declaring, binding, deleting and routing live in the
//! pure state machine [`sluice_cluster::meta::Topology`]. The router turns
//! AMQP methods into its commands, choosing what the state machine may not
//! (generated names, new queue ids, live counts), and carries out their
//! outcomes on the cluster [`Backend`]: it opens and deletes queues, keeps
//! the queue id → [`Queue`] handles, and writes durable definitions. It
//! never sees a wire frame or a storage type.
//!
//! Concurrency: one std `RwLock` over the topology and the handles, never
//! held across `.await`: durable writes are started under the lock and
//! awaited after.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures_util::future::join_all;
use sluice_cluster::meta::{self, Command, DefChange, MetaError, Outcome, Owner, Topology};
use sluice_cluster::meta::client::MetaClient;
use sluice_cluster::meta::replica::{Applied, MetaCommand, MetaResult};
use sluice_cluster::remote::RemoteBackend;
use sluice_cluster::remote_meta::RemoteMeta;
use sluice_cluster::{Backend, Durable, Queue, QueueId, QueueSpec, Reply};
use tokio::sync::watch;
use sluice_codecs::command::{Arguments, Properties};

use crate::error::BrokerError;
pub use meta::Dest;

/// Identifies a client connection (owner of exclusive queues).
pub type ConnId = u64;

impl From<MetaError> for BrokerError {
    fn from(e: MetaError) -> Self {
        // The state machine already words the text as RabbitMQ does.
        BrokerError { code: e.code, text: e.text, connection: e.connection }
    }
}

/// A queue the connection may use: its backend queues, one per partition.
#[derive(Clone)]
pub struct QueueEntry {
    /// The backend queues: one, or `x-partitions` of them.
    pub partitions: Vec<Arc<dyn Queue>>,
}

impl QueueEntry {
    /// Ready messages and consumers, summed over partitions (a consumer of
    /// a partitioned queue counts once per partition it is attached to).
    pub async fn counts(&self) -> Result<(u32, u32), BrokerError> {
        counts(&self.partitions).await
    }
}

async fn counts(partitions: &[Arc<dyn Queue>]) -> Result<(u32, u32), BrokerError> {
    let (mut m, mut c) = (0u32, 0u32);
    for r in join_all(partitions.iter().map(|p| p.counts())).await {
        let (pm, pc) = r?;
        m = m.saturating_add(pm);
        c = c.max(pc);
    }
    Ok((m, c))
}

/// Name of partition `i` of queue `name`, for logs and metrics.
fn partition_name(name: &str, i: usize, n: usize) -> String {
    if n == 1 {
        name.to_string()
    } else {
        format!("{name}#{i}")
    }
}

/// One virtual host, as a session sees it.
pub struct VHost {
    pub name: String,
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

/// What the router's lock guards.
struct State {
    topo: Topology,
    /// The backend queue of every partition the topology knows.
    queues: HashMap<u64, Arc<dyn Queue>>,
}

impl State {
    fn handles(&self, ids: &[u64]) -> Vec<Arc<dyn Queue>> {
        ids.iter().filter_map(|id| self.queues.get(id).cloned()).collect()
    }

    /// The backend queues of `name`, if it exists.
    fn partitions(&self, vhost: &str, name: &str) -> Vec<Arc<dyn Queue>> {
        let q = self.topo.vhost(vhost).and_then(|vh| vh.queues.get(name));
        q.map(|q| self.handles(&q.ids)).unwrap_or_default()
    }
}

/// What carrying out an outcome left to do: definition writes and queue
/// deletions, awaited after the lock is released ([`Done::finish`]).
struct Done {
    /// Definition writes to await.
    writes: Vec<Durable>,
    /// Deletions of removed queues: (name, ready messages dropped).
    deletes: Vec<(String, Reply<u32>)>,
}

/// What a finished command dropped, and the first backend error deleting
/// a removed queue (each is logged; the other queues are deleted anyway).
struct Finished {
    dropped: u32,
    failed: Option<sluice_cluster::Error>,
}

impl Done {
    /// Awaits the deletions, then the definition writes.
    async fn finish(self) -> Result<Finished, BrokerError> {
        let mut dropped = 0u32;
        let mut failed = None;
        for (name, r) in self.deletes {
            match r.await {
                Ok(n) => dropped = dropped.saturating_add(n),
                Err(e) => {
                    tracing::warn!(queue = name, error = %e, "queue delete failed");
                    failed.get_or_insert(e);
                }
            }
        }
        wait_all(self.writes).await?;
        Ok(Finished { dropped, failed })
    }
}

/// The router shared by every connection.
pub struct Router {
    backend: Arc<dyn Backend>,
    state: RwLock<State>,
    /// In a gateway: the metadata group (commands go there; the topology
    /// above is a copy fed by its change stream). `None` in `sluice serve`.
    cluster: Option<ClusterMeta>,
}

/// A router's link to the metadata group.
struct ClusterMeta {
    meta: Arc<dyn MetaClient>,
    /// The metadata log index the local copy has applied.
    applied: watch::Sender<u64>,
}

/// How long a gateway waits for its copy to reach its own write.
const APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// Waits for durable writes. A storage failure is a 506 RESOURCE_ERROR on
/// the connection: the broker cannot keep what the client asked it to keep.
pub async fn wait_all(writes: Vec<Durable>) -> Result<(), BrokerError> {
    for r in join_all(writes).await {
        r.map_err(|e| BrokerError::connection(sluice_codecs::amqp::reply_code::RESOURCE_ERROR, format!("storage failed: {e}")))?;
    }
    Ok(())
}

/// A new queue id: random, never 0 (the metadata group's id).
fn random_id() -> u64 {
    rand::random::<u64>().max(1)
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
    /// Creates the router, loads every stored definition and opens the
    /// stored queues.
    pub fn open(backend: Arc<dyn Backend>) -> Result<Arc<Router>, BrokerError> {
        let defs = backend.definitions().map_err(|e| BrokerError::internal(e.to_string()))?;
        let (topo, skipped) = Topology::load(defs);
        for e in skipped {
            tracing::error!(error = %e, "skipping unreadable definition");
        }
        let mut queues = HashMap::new();
        for vh in topo.vhosts() {
            for q in vh.queues.values() {
                let n = q.ids.len();
                for (i, id) in q.ids.iter().enumerate() {
                    let handle = backend
                        .open_queue(QueueSpec {
                            id: QueueId(*id),
                            name: partition_name(&q.name, i, n),
                            durable: true,
                            arguments: q.arguments.clone(),
                        })
                        .map_err(|e| BrokerError::internal(format!("recovering queue {}: {e}", q.name)))?;
                    queues.insert(*id, handle);
                }
            }
        }
        Ok(Arc::new(Router { backend, state: RwLock::new(State { topo, queues }), cluster: None }))
    }

    /// The router of a gateway: metadata from the cluster's metadata group
    /// (followed on a task), queues on the nodes. Returns once the first
    /// copy of the metadata has arrived.
    pub async fn open_cluster(backend: Arc<RemoteBackend>) -> Result<Arc<Router>, BrokerError> {
        let meta = RemoteMeta::new(backend.clone());
        Self::open_with_meta(backend, meta).await
    }

    /// A router whose metadata is the group behind `meta` (a gateway's
    /// remote one, or the in-process one of a cluster of one).
    pub async fn open_with_meta(backend: Arc<dyn Backend>, meta: Arc<dyn MetaClient>) -> Result<Arc<Router>, BrokerError> {
        let (applied, mut seen) = watch::channel(0u64);
        let router = Arc::new(Router {
            backend: backend.clone(),
            state: RwLock::new(State { topo: Topology::default(), queues: HashMap::new() }),
            cluster: Some(ClusterMeta { meta: meta.clone(), applied }),
        });
        let (on_reset, on_applied) = (Arc::downgrade(&router), Arc::downgrade(&router));
        tokio::spawn(meta.follow(
            Box::new(move |index, state| {
                if let Some(r) = on_reset.upgrade() {
                    r.reset(index, state.topology);
                }
            }),
            Box::new(move |entry| {
                if let Some(r) = on_applied.upgrade() {
                    r.apply_remote(entry);
                }
            }),
        ));
        let first = async move { seen.wait_for(|i| *i > 0).await.is_ok() };
        match tokio::time::timeout(std::time::Duration::from_secs(30), first).await {
            Ok(true) => Ok(router),
            _ => Err(BrokerError::internal("no storage node answered with the metadata within 30 s")),
        }
    }

    /// Replaces the local copy of the metadata (first subscription, or a
    /// new one after a lost link): keeps the handles of queues that still
    /// exist, opens the others.
    fn reset(&self, index: u64, topo: Topology) {
        let mut st = self.write();
        let mut queues = HashMap::new();
        for vh in topo.vhosts() {
            for q in vh.queues.values() {
                let n = q.ids.len();
                for (i, id) in q.ids.iter().enumerate() {
                    let handle = match st.queues.get(id) {
                        Some(h) => Some(h.clone()),
                        None => self
                            .backend
                            .open_queue(QueueSpec {
                                id: QueueId(*id),
                                name: partition_name(&q.name, i, n),
                                durable: q.durable,
                                arguments: q.arguments.clone(),
                            })
                            .ok(),
                    };
                    if let Some(h) = handle {
                        queues.insert(*id, h);
                    }
                }
            }
        }
        st.topo = topo;
        st.queues = queues;
        drop(st);
        if let Some(c) = &self.cluster {
            c.applied.send_replace(index);
        }
    }

    /// Applies one entry of the metadata stream to the local copy.
    fn apply_remote(&self, entry: Applied) {
        let index = entry.index();
        match entry {
            Applied::Command { cmd: MetaCommand::Topology(cmd), .. } => {
                let mut st = self.write();
                // The same command on the same state: the same outcome as
                // on the nodes (refusals included, which change nothing).
                // Definition writes and queue deletions are the nodes'
                // business: the remote backend makes them no-ops.
                if let Ok(done) = self.run(&mut st, cmd) {
                    drop(done);
                }
            }
            Applied::Reset { index, state } => return self.reset(index, state.topology),
            _ => {}
        }
        if let Some(c) = &self.cluster {
            c.applied.send_replace(index);
        }
    }

    /// Carries out `cmd`: in `sluice serve` on the local topology and
    /// storage; in a gateway through the metadata group, returning once
    /// the local copy has applied it.
    async fn execute(&self, cmd: Command) -> Result<Finished, BrokerError> {
        let Some(c) = &self.cluster else {
            let done = self.run(&mut self.write(), cmd)?;
            return done.finish().await;
        };
        let (index, result) = c.meta.propose(MetaCommand::Topology(cmd)).await?;
        let mut seen = c.applied.subscribe();
        let caught_up = async move { seen.wait_for(|i| *i >= index).await.is_ok() };
        if !tokio::time::timeout(APPLY_TIMEOUT, caught_up).await.unwrap_or(false) {
            return Err(BrokerError::internal("the metadata change did not reach this gateway in time"));
        }
        match result {
            MetaResult::Topology(Err(e)) => Err(e.into()),
            _ => Ok(Finished { dropped: 0, failed: None }),
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks a vhost up.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.read().topo.vhost(name).map(|_| Arc::new(VHost { name: name.to_string() }))
    }

    /// The backend (for shutdown).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Applies `cmd` and carries out its outcome, under the lock held by
    /// the caller: opens new queues (undoing the command if that fails),
    /// starts the definition writes, deletes removed queues.
    fn run(&self, st: &mut State, cmd: Command) -> Result<Done, BrokerError> {
        let outcome = st.topo.apply(cmd)?;
        self.open_created(st, &outcome)?;
        let writes = outcome
            .definitions
            .into_iter()
            .map(|d| match d {
                DefChange::Put { key, value } => self.backend.put_definition(key, value),
                DefChange::Delete { key } => self.backend.delete_definition(key),
            })
            .collect();
        let mut deletes = Vec::new();
        for q in &outcome.removed {
            for id in &q.ids {
                st.queues.remove(id);
                deletes.push((q.name.clone(), self.backend.delete_queue(QueueId(*id))));
            }
        }
        Ok(Done { writes, deletes })
    }

    /// Opens the backend queues of the queues `outcome` created. If one
    /// fails, those opened are deleted again and the queues removed from
    /// the topology, so the command leaves no trace (its definition writes
    /// are not started).
    fn open_created(&self, st: &mut State, outcome: &Outcome) -> Result<(), BrokerError> {
        let mut opened = Vec::new();
        let mut result = Ok(());
        'all: for q in &outcome.created {
            let n = q.ids.len();
            for (i, id) in q.ids.iter().enumerate() {
                let spec = QueueSpec {
                    id: QueueId(*id),
                    name: partition_name(&q.name, i, n),
                    durable: q.durable,
                    arguments: q.arguments.clone(),
                };
                match self.backend.open_queue(spec) {
                    Ok(handle) => {
                        st.queues.insert(*id, handle);
                        opened.push(*id);
                    }
                    Err(e) => {
                        result = Err(e);
                        break 'all;
                    }
                }
            }
        }
        let Err(e) = result else { return Ok(()) };
        for id in opened {
            st.queues.remove(&id);
            // Fire and forget: the queue was never used.
            drop(tokio::spawn(self.backend.delete_queue(QueueId(id))));
        }
        for q in &outcome.created {
            let owner = st.topo.vhost(&q.vhost).and_then(|vh| vh.queues.get(&q.name)).and_then(|d| d.exclusive_owner);
            let undo = Command::DeleteQueue {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
                if_unused: false,
                if_empty: false,
                conn: owner.unwrap_or(Owner(0)),
                counts: (0, 0),
            };
            if let Err(err) = st.topo.apply(undo) {
                tracing::error!(queue = q.name, error = %err, "undoing a failed queue creation failed");
            }
        }
        Err(e.into())
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
        let cmd = Command::DeclareExchange {
            vhost: vh.name.clone(),
            name: name.to_string(),
            kind: kind.to_string(),
            passive,
            durable,
            auto_delete,
            internal,
            arguments,
        };
        self.execute(cmd).await.map(|_| ())
    }

    pub async fn delete_exchange(&self, vh: &VHost, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        let cmd = Command::DeleteExchange { vhost: vh.name.clone(), name: name.to_string(), if_unused };
        self.execute(cmd).await.map(|_| ())
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
        let cmd = Command::Bind {
            vhost: vh.name.clone(),
            source: source.to_string(),
            dest,
            routing_key: routing_key.to_string(),
            arguments,
            conn: Owner(conn),
        };
        self.execute(cmd).await.map(|_| ())
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
        let cmd = Command::Unbind {
            vhost: vh.name.clone(),
            source: source.to_string(),
            dest,
            routing_key: routing_key.to_string(),
            arguments,
            conn: Owner(conn),
        };
        self.execute(cmd).await.map(|_| ())
    }

    // ---- queues ----------------------------------------------------------

    /// queue.declare: returns (name, ready messages, consumers).
    pub async fn declare_queue(&self, vh: &VHost, conn: ConnId, d: QueueDeclare) -> Result<(String, u32, u32), BrokerError> {
        let generated = d.name.is_empty();
        let name = if generated { generated_name() } else { d.name };
        // Used only if the queue is created; the state machine cannot draw
        // random numbers, so every replica gets the same ids.
        let new_ids = (0..meta::partition_count(&d.arguments)).map(|_| random_id()).collect();
        let cmd = Command::DeclareQueue {
            vhost: vh.name.clone(),
            name: name.clone(),
            generated,
            passive: d.passive,
            durable: d.durable,
            conn: Owner(conn),
            exclusive: d.exclusive,
            auto_delete: d.auto_delete,
            arguments: d.arguments,
            new_ids,
        };
        self.execute(cmd).await?;
        let partitions = self.read().partitions(&vh.name, &name);
        let (m, c) = counts(&partitions).await?;
        Ok((name, m, c))
    }

    /// Finds a queue the connection may use.
    pub fn queue(&self, vh: &VHost, conn: ConnId, name: &str) -> Result<QueueEntry, BrokerError> {
        let st = self.read();
        let q = st.topo.queue(&vh.name, name, Owner(conn))?;
        Ok(QueueEntry { partitions: st.handles(&q.ids) })
    }

    /// queue.delete: returns the number of ready messages dropped.
    pub async fn delete_queue(&self, vh: &VHost, conn: ConnId, name: &str, if_unused: bool, if_empty: bool) -> Result<u32, BrokerError> {
        // if-unused and if-empty are decided on counts only the queue
        // knows, measured just before (a publish racing with the delete
        // may land in between, as with RabbitMQ's quorum queues).
        let partitions = self.read().partitions(&vh.name, name);
        let counts = counts(&partitions).await?;
        let cmd = Command::DeleteQueue {
            vhost: vh.name.clone(),
            name: name.to_string(),
            if_unused,
            if_empty,
            conn: Owner(conn),
            counts,
        };
        let finished = self.execute(cmd).await?;
        if let Some(e) = finished.failed {
            return Err(e.into());
        }
        // In a gateway the nodes drop the messages: report the count
        // measured just before.
        Ok(if self.cluster.is_some() { counts.0 } else { finished.dropped })
    }

    /// Auto-delete: called when a consumer of `name` went away.
    pub async fn consumer_gone(&self, vh: &VHost, name: &str) {
        let handles = {
            let st = self.read();
            let Some(q) = st.topo.vhost(&vh.name).and_then(|v| v.queues.get(name)) else { return };
            // Counting consumers asks every partition: skip it when the
            // queue cannot be auto-deleted anyway.
            if !q.auto_delete {
                return;
            }
            st.handles(&q.ids)
        };
        let consumers = match counts(&handles).await {
            Ok((_, c)) => c,
            Err(e) => {
                tracing::warn!(queue = name, error = %e, "auto-delete: cannot count consumers");
                return;
            }
        };
        let cmd = Command::ConsumerGone { vhost: vh.name.clone(), name: name.to_string(), consumers };
        if let Err(err) = self.execute(cmd).await {
            tracing::warn!(queue = name, error = %err, "auto-delete failed");
        }
    }

    /// Deletes the exclusive queues of a closed connection.
    pub async fn connection_closed(&self, conn: ConnId) {
        // Nothing to do (and no round trip) if the connection owns no
        // exclusive queue.
        let owns = self.read().topo.vhosts().any(|vh| vh.queues.values().any(|q| q.exclusive_owner == Some(Owner(conn))));
        if !owns {
            return;
        }
        if let Err(e) = self.execute(Command::ConnectionClosed { owner: Owner(conn) }).await {
            tracing::warn!(error = %e, "exclusive queue delete not persisted");
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
        let st = self.read();
        let targets = st.topo.route(&vh.name, exchange, routing_key, properties)?;
        Ok(targets.iter().filter_map(|t| st.queues.get(&t.id).cloned()).collect())
    }
}
