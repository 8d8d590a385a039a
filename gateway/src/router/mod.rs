//! The router: the gateway's side of the metadata.
//!
//! RabbitMQ's rules for declaring, binding, deleting and routing live in the
//! pure state machine [`sluice_cluster::meta::Topology`], applied in log
//! order by the metadata Raft group. The router turns AMQP methods into its
//! commands, choosing what the state machine may not (generated names, new
//! queue ids, live counts), proposes them through a [`MetaClient`] (over the
//! network from a gateway, in process in `sluice serve`) and answers once
//! its own copy of the metadata, fed by the group's change stream, has
//! applied them. Applying an entry to the copy opens the queue handles of
//! created queues on the [`Backend`] and drops those of deleted ones. It
//! never sees a wire frame or a storage type.
//!
//! Concurrency: one std `RwLock` over the copy and the handles, never held
//! across `.await`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use futures_util::future::join_all;
use sluice_cluster::meta::{self, Command, MetaError, Owner, Topology};
use sluice_cluster::meta::client::MetaClient;
use sluice_cluster::meta::auth::{Auth, AuthCommand, Matcher};
use sluice_cluster::meta::replica::{Applied, MetaCommand, MetaResult, MetaState};
use sluice_cluster::remote::RemoteBackend;
use sluice_cluster::remote_meta::RemoteMeta;
use sluice_cluster::backend::dead_letter_on_delete;
use sluice_cluster::{Backend, Queue, QueueId, QueueSpec};
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

/// `x-dead-letter-on-delete`: dead-letters every message of the
/// partitions, waiting until they are in their dead-letter queues.
async fn retire_all(partitions: &[Arc<dyn Queue>]) -> Result<u32, BrokerError> {
    let mut n = 0u32;
    for r in join_all(partitions.iter().map(|p| p.clone().retire())).await {
        n = n.saturating_add(r?);
    }
    Ok(n)
}

/// A queue's vhost, name and partition handles (metrics).
pub type QueueHandles = (String, String, Vec<Arc<dyn Queue>>);

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
    /// No declare-ok wanted: the counts are not fetched (answered 0).
    pub nowait: bool,
}

/// What the router's lock guards.
struct State {
    topo: Topology,
    /// The backend queue of every partition the topology knows.
    queues: HashMap<u64, Arc<dyn Queue>>,
    /// Users and permissions.
    auth: Auth,
    /// Compiled permissions by (vhost, user), built when first asked for
    /// after a change.
    matchers: HashMap<(String, String), Option<Arc<Matcher>>>,
}

impl State {
    fn handles(&self, ids: &[u64]) -> Vec<Arc<dyn Queue>> {
        ids.iter().filter_map(|id| self.queues.get(id).cloned()).collect()
    }

    /// Whether queue `name` dead-letters its messages when it is deleted.
    fn retires(&self, vhost: &str, name: &str) -> bool {
        self.topo.vhost(vhost).and_then(|vh| vh.queues.get(name)).is_some_and(|q| dead_letter_on_delete(&q.arguments))
    }

    /// The backend queues of `name`, if it exists.
    fn partitions(&self, vhost: &str, name: &str) -> Vec<Arc<dyn Queue>> {
        let q = self.topo.vhost(vhost).and_then(|vh| vh.queues.get(name));
        q.map(|q| self.handles(&q.ids)).unwrap_or_default()
    }
}

/// The router shared by every connection.
pub struct Router {
    backend: Arc<dyn Backend>,
    /// A copy of the metadata and the queue handles.
    state: RwLock<State>,
    /// Where commands go.
    meta: Arc<dyn MetaClient>,
    /// The metadata log index the copy has applied.
    applied: watch::Sender<u64>,
    /// Bumped whenever users or permissions change: sessions re-read
    /// their permissions when it moved.
    auth_generation: AtomicU64,
    /// One turn per thing being declared or bound: identical declares at
    /// once (500 clients starting together) wait for the first one's
    /// proposal and then find nothing left to change.
    declaring: std::sync::Mutex<HashMap<String, Arc<Slot>>>,
}

/// After this long without the copy reaching a committed write, the router
/// asks its metadata client to follow the group from another node.
const LAGGING_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a command waits for the copy to reach it.
const APPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// What a declare or bind changes, for [`Router::turn`]; `None` for
/// commands that are not retried as a whole by many clients at once.
fn declare_key(cmd: &Command) -> Option<String> {
    match cmd {
        Command::DeclareQueue { vhost, name, generated: false, .. } => Some(format!("q\0{vhost}\0{name}")),
        Command::DeclareExchange { vhost, name, .. } => Some(format!("x\0{vhost}\0{name}")),
        Command::Bind { vhost, source, .. } => Some(format!("b\0{vhost}\0{source}")),
        _ => None,
    }
}

/// The turns of one key: whose turn it is, and how many changes of it
/// succeeded.
#[derive(Default)]
struct Slot {
    turn: Arc<tokio::sync::Mutex<()>>,
    done: AtomicU64,
}

/// A held turn of [`Router::turn`]; the last one out removes the slot.
struct Turn<'a> {
    router: &'a Router,
    key: String,
    slot: Arc<Slot>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Turn<'_> {
    /// The change was committed: those waiting may answer from the copy.
    fn succeeded(&self) {
        self.slot.done.fetch_add(1, Ordering::AcqRel);
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut slots = self.router.declaring.lock().unwrap_or_else(|p| p.into_inner());
        // Only the map and this turn hold the slot: nobody waits for it.
        if slots.get(&self.key).is_some_and(|s| Arc::strong_count(s) <= 2) {
            slots.remove(&self.key);
        }
    }
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
            state: RwLock::new(State {
                topo: Topology::default(),
                queues: HashMap::new(),
                auth: Auth::default(),
                matchers: HashMap::new(),
            }),
            meta: meta.clone(),
            applied,
            auth_generation: AtomicU64::new(0),
            declaring: std::sync::Mutex::new(HashMap::new()),
        });
        let (on_reset, on_applied) = (Arc::downgrade(&router), Arc::downgrade(&router));
        tokio::spawn(meta.follow(
            Box::new(move |index, state| {
                if let Some(r) = on_reset.upgrade() {
                    r.reset(index, state);
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
    fn reset(&self, index: u64, state: MetaState) {
        let MetaState { topology: topo, auth, .. } = state;
        let mut st = self.write();
        st.auth = auth;
        st.matchers.clear();
        self.auth_generation.fetch_add(1, Ordering::AcqRel);
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
                                vhost: vh.name.clone(),
                                name: meta::partition_name(&q.name, i, n),
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
        self.applied.send_replace(index);
    }

    /// Applies one entry of the metadata stream to the local copy.
    fn apply_remote(&self, entry: Applied) {
        let index = entry.index();
        match entry {
            Applied::Command { cmd: MetaCommand::Topology(cmd), .. } => self.apply(cmd),
            Applied::Command { cmd: MetaCommand::Auth(cmd), result: MetaResult::Auth(Ok(())), .. } => {
                let mut st = self.write();
                let State { topo, auth, matchers, .. } = &mut *st;
                if let Err(e) = auth.apply(&cmd, |v| topo.vhost(v).is_some()) {
                    tracing::error!(error = %e, "users and permissions: the copy refused what the group applied");
                }
                matchers.clear();
                self.auth_generation.fetch_add(1, Ordering::AcqRel);
            }
            Applied::Reset { index, state } => return self.reset(index, *state),
            _ => {}
        }
        self.applied.send_replace(index);
    }

    /// Commits `cmd` in the metadata group and returns once the copy has
    /// applied it, with the group's verdict.
    async fn execute(&self, cmd: Command) -> Result<(), BrokerError> {
        // Identical declares at once (500 clients starting together) take
        // turns; one that waited while another's proposal succeeded finds
        // the copy as fresh as that proposal, and answers from it when the
        // declare changes nothing. The copy alone is not trusted: another
        // gateway may have deleted the queue a moment ago.
        let turn = match declare_key(&cmd) {
            Some(key) => {
                let (turn, someone_else_done) = self.turn(key).await;
                if someone_else_done && self.read().topo.changes_nothing(&cmd) {
                    return Ok(());
                }
                Some(turn)
            }
            None => None,
        };
        let new_vhost = match &cmd {
            Command::AddVhost { name } => self.read().topo.vhost(name).is_none(),
            _ => false,
        };
        let audit = cmd.clone();
        match self.propose(MetaCommand::Topology(cmd)).await? {
            MetaResult::Topology(Err(e)) => Err(e.into()),
            MetaResult::Topology(Ok(outcome)) => {
                if let Some(t) = &turn {
                    t.succeeded();
                }
                self.audit_topology(&audit, &outcome, new_vhost);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// Waits for the turn to change `key` (see `declaring`); true if an
    /// identical change succeeded meanwhile.
    async fn turn(&self, key: String) -> (Turn<'_>, bool) {
        let slot = self.declaring.lock().unwrap_or_else(|p| p.into_inner()).entry(key.clone()).or_default().clone();
        let before = slot.done.load(Ordering::Acquire);
        let guard = slot.turn.clone().lock_owned().await;
        let done = slot.done.load(Ordering::Acquire) != before;
        (Turn { router: self, key, slot, guard: Some(guard) }, done)
    }

    /// Commits `cmd` in the metadata group and returns the group's verdict
    /// once this copy has applied it.
    async fn propose(&self, cmd: MetaCommand) -> Result<MetaResult, BrokerError> {
        let (index, result) = self.meta.propose(cmd).await?;
        let caught_up = |timeout| {
            let mut seen = self.applied.subscribe();
            async move { tokio::time::timeout(timeout, seen.wait_for(|i| *i >= index)).await.is_ok_and(|r| r.is_ok()) }
        };
        if !caught_up(LAGGING_AFTER).await {
            // The node this copy follows may be cut off from the group.
            self.meta.lagging();
            if !caught_up(APPLY_TIMEOUT).await {
                return Err(BrokerError::internal("the metadata change did not reach this gateway in time"));
            }
        }
        Ok(result)
    }

    /// The audit events of a topology change this gateway made.
    fn audit_topology(&self, cmd: &Command, outcome: &meta::Outcome, new_vhost: bool) {
        use crate::audit::{emit, Event};
        match cmd {
            Command::AddVhost { name } if new_vhost => emit(self, Event { name: "vhost.created", object: Some(name), ..Event::default() }),
            Command::DeleteVhost { name } => emit(self, Event { name: "vhost.deleted", object: Some(name), ..Event::default() }),
            Command::Bind { vhost, source, dest, routing_key, .. } | Command::Unbind { vhost, source, dest, routing_key, .. } => {
                let (kind, to) = match dest {
                    meta::Dest::Queue(q) => ("queue", q),
                    meta::Dest::Exchange(x) => ("exchange", x),
                };
                let name = if matches!(cmd, Command::Bind { .. }) { "binding.created" } else { "binding.deleted" };
                let object = format!("{source} -> {kind} {to} ({routing_key})");
                emit(self, Event { name, vhost: Some(vhost), object: Some(&object), ..Event::default() });
            }
            _ => {}
        }
        for (vhost, name) in &outcome.exchanges_created {
            emit(self, Event { name: "exchange.created", vhost: Some(vhost), object: Some(name), ..Event::default() });
        }
        for q in &outcome.created {
            emit(self, Event { name: "queue.created", vhost: Some(&q.vhost), object: Some(&q.name), ..Event::default() });
        }
        for q in &outcome.removed {
            emit(self, Event { name: "queue.deleted", vhost: Some(&q.vhost), object: Some(&q.name), ..Event::default() });
        }
        for (vhost, name) in &outcome.exchanges_removed {
            emit(self, Event { name: "exchange.deleted", vhost: Some(vhost), object: Some(name), ..Event::default() });
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

    // ---- administration ---------------------------------------------------

    /// Copies of the topology and of the users (the admin API's reads).
    pub fn snapshot(&self) -> (Topology, Auth) {
        let st = self.read();
        (st.topo.clone(), st.auth.clone())
    }

    /// Creates a vhost (no-op if it exists).
    pub async fn add_vhost(&self, name: &str) -> Result<(), BrokerError> {
        self.execute(Command::AddVhost { name: name.to_owned() }).await
    }

    /// Deletes a vhost with its queues, exchanges and permissions.
    pub async fn delete_vhost(&self, name: &str) -> Result<(), BrokerError> {
        self.execute(Command::DeleteVhost { name: name.to_owned() }).await
    }

    // ---- users and permissions --------------------------------------------

    /// Whether `user` exists and `password` is its password.
    pub fn check_password(&self, user: &str, password: &str) -> bool {
        self.read().auth.check_password(user, password)
    }

    /// Whether `user` exists (EXTERNAL logins, by certificate).
    pub fn user_exists(&self, user: &str) -> bool {
        self.read().auth.users.contains_key(user)
    }

    /// A counter that moves whenever users or permissions change.
    pub fn auth_generation(&self) -> u64 {
        self.auth_generation.load(Ordering::Acquire)
    }

    /// `user`'s compiled permissions in `vhost`; `None`: no access to the
    /// vhost.
    pub fn permissions(&self, vhost: &str, user: &str) -> Option<Arc<Matcher>> {
        let key = (vhost.to_owned(), user.to_owned());
        if let Some(m) = self.read().matchers.get(&key) {
            return m.clone();
        }
        let mut st = self.write();
        let m = st.auth.permission(vhost, user).map(|p| Arc::new(Matcher::new(p)));
        st.matchers.insert(key, m.clone());
        m
    }

    /// Proposes a change to users or permissions and waits until this
    /// copy has it.
    pub async fn execute_auth(&self, cmd: AuthCommand) -> Result<(), BrokerError> {
        let existed = match &cmd {
            AuthCommand::PutUser { name, .. } => self.user_exists(name),
            _ => true,
        };
        let audit = cmd.clone();
        match self.propose(MetaCommand::Auth(cmd)).await? {
            MetaResult::Auth(Err(e)) => Err(BrokerError::precondition(e.to_string())),
            _ => {
                self.audit_auth(&audit, existed);
                Ok(())
            }
        }
    }

    /// The audit events of a user or permission change.
    fn audit_auth(&self, cmd: &AuthCommand, existed: bool) {
        use crate::audit::{emit, Event};
        match cmd {
            // Seeding a user that exists changes nothing.
            AuthCommand::PutUser { if_absent: true, .. } if existed => {}
            AuthCommand::PutUser { name, password_hash, tags, .. } => {
                if !existed {
                    emit(self, Event { name: "user.created", user: Some(name), object: Some(name), ..Event::default() });
                    return;
                }
                if password_hash.is_some() {
                    emit(self, Event { name: "user.password.changed", user: Some(name), object: Some(name), ..Event::default() });
                }
                if tags.is_some() {
                    emit(self, Event { name: "user.tags.set", user: Some(name), object: Some(name), ..Event::default() });
                }
            }
            AuthCommand::DeleteUser { name } => {
                emit(self, Event { name: "user.deleted", user: Some(name), object: Some(name), ..Event::default() })
            }
            AuthCommand::SetPermissions { vhost, user, .. } => {
                emit(self, Event { name: "permission.created", vhost: Some(vhost), user: Some(user), ..Event::default() })
            }
            AuthCommand::ClearPermissions { vhost, user } => {
                emit(self, Event { name: "permission.deleted", vhost: Some(vhost), user: Some(user), ..Event::default() })
            }
        }
    }

    /// Every queue: (vhost, name, partition handles), for metrics.
    pub fn queue_handles(&self) -> Vec<QueueHandles> {
        let st = self.read();
        let mut out = Vec::new();
        for vh in st.topo.vhosts() {
            for (name, q) in &vh.queues {
                out.push((vh.name.clone(), name.clone(), st.handles(&q.ids)));
            }
        }
        out
    }

    /// The backend (for shutdown).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    /// Applies a committed command to the copy: the same command on the
    /// same state gives the same outcome as on the nodes (a refusal changes
    /// nothing). Opens the handles of created queues; drops those of
    /// removed ones, whose consumers the backend tells (the nodes delete
    /// the queues' data themselves).
    fn apply(&self, cmd: Command) {
        let mut st = self.write();
        let deleted_vhost = match &cmd {
            Command::DeleteVhost { name } => Some(name.clone()),
            _ => None,
        };
        let Ok(outcome) = st.topo.apply(cmd) else { return };
        if let Some(name) = deleted_vhost {
            st.auth.vhost_deleted(&name);
            st.matchers.clear();
            self.auth_generation.fetch_add(1, Ordering::AcqRel);
        }
        for q in &outcome.created {
            let n = q.ids.len();
            for (i, id) in q.ids.iter().enumerate() {
                let spec = QueueSpec {
                    id: QueueId(*id),
                    vhost: q.vhost.clone(),
                    name: meta::partition_name(&q.name, i, n),
                    durable: q.durable,
                    arguments: q.arguments.clone(),
                };
                match self.backend.open_queue(spec) {
                    Ok(handle) => {
                        st.queues.insert(*id, handle);
                    }
                    Err(e) => tracing::error!(queue = q.name, error = %e, "cannot open a queue handle"),
                }
            }
        }
        for q in &outcome.removed {
            for id in &q.ids {
                st.queues.remove(id);
                drop(self.backend.delete_queue(QueueId(*id)));
            }
        }
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
        self.execute(cmd).await
    }

    pub async fn delete_exchange(&self, vh: &VHost, name: &str, if_unused: bool) -> Result<(), BrokerError> {
        let cmd = Command::DeleteExchange { vhost: vh.name.clone(), name: name.to_string(), if_unused };
        self.execute(cmd).await
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
        self.execute(cmd).await
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
        self.execute(cmd).await
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
        if d.nowait {
            return Ok((name, 0, 0));
        }
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
        let (partitions, retire) = {
            let st = self.read();
            // Whether it exists and the connection may delete it is the
            // metadata's to answer (below); only a queue it may delete
            // is retired.
            let retire = st.topo.queue(&vh.name, name, Owner(conn)).is_ok_and(|q| dead_letter_on_delete(&q.arguments));
            (st.partitions(&vh.name, name), retire)
        };
        let counts = counts(&partitions).await?;
        // x-dead-letter-on-delete: the messages go to the dead-letter
        // exchange first (unless the delete is going to be refused).
        if retire && !(if_unused && counts.1 > 0) && !(if_empty && counts.0 > 0) {
            retire_all(&partitions).await?;
        }
        let cmd = Command::DeleteQueue {
            vhost: vh.name.clone(),
            name: name.to_string(),
            if_unused,
            if_empty,
            conn: Owner(conn),
            counts,
        };
        self.execute(cmd).await?;
        // The nodes drop the messages: report the count measured just
        // before.
        Ok(counts.0)
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
        if consumers == 0 && self.read().retires(&vh.name, name) {
            if let Err(e) = retire_all(&handles).await {
                tracing::warn!(queue = name, error = %e, "auto-delete: messages not dead-lettered");
                return;
            }
        }
        let cmd = Command::ConsumerGone { vhost: vh.name.clone(), name: name.to_string(), consumers };
        if let Err(err) = self.execute(cmd).await {
            tracing::warn!(queue = name, error = %err, "auto-delete failed");
        }
    }

    /// Deletes the exclusive queues of a closed connection.
    pub async fn connection_closed(&self, conn: ConnId) {
        // Nothing to do (and no round trip) if the connection owns no
        // exclusive queue.
        let (owns, retiring) = {
            let st = self.read();
            let mut owns = false;
            let mut retiring = Vec::new();
            for q in st.topo.vhosts().flat_map(|vh| vh.queues.values()) {
                if q.exclusive_owner == Some(Owner(conn)) {
                    owns = true;
                    if dead_letter_on_delete(&q.arguments) {
                        retiring.extend(st.handles(&q.ids));
                    }
                }
            }
            (owns, retiring)
        };
        if !owns {
            return;
        }
        if let Err(e) = retire_all(&retiring).await {
            tracing::warn!(error = %e, "exclusive queue delete: messages not dead-lettered");
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

    /// [`Self::route`] for the broker's own messages (audit events to the
    /// internal `amq.rabbitmq.event`).
    pub fn route_internal(&self, vhost: &str, exchange: &str, routing_key: &str, properties: &Properties) -> Vec<Arc<dyn Queue>> {
        let st = self.read();
        let Ok(targets) = st.topo.route_internal(vhost, exchange, routing_key, properties) else { return Vec::new() };
        targets.iter().filter_map(|t| st.queues.get(&t.id).cloned()).collect()
    }
}
