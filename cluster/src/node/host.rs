//! The replicas a node hosts and the node-protocol requests about them.
//!
//! - **Transport.** [`PeerLinks`] is the node's [`Transport`]: one sender
//!   task per peer node (by raft id) that owns a connection to it,
//!   reconnects, and sends Raft messages in order, dropping them while the
//!   peer is unreachable (Raft retries). Addresses come from membership.
//! - **Metadata.** One [`MetaReplica`] per node. A node started without
//!   seeds and without a metadata log founds the group (single voter, then
//!   `AddMember` itself); one started with seeds joins: it asks the seeds
//!   (and the leader they name) to add it, as a member and a voter.
//! - **Queues.** The host follows the metadata's applied stream: when a
//!   queue is created, every node in its replica set (rendezvous placement
//!   over the members at that point of the log, R from
//!   `x-quorum-initial-group-size`) opens a [`ReplicatedQueue`] with that set
//!   as voters; when it is deleted, every replica closes and removes its
//!   data. At start the host reopens every queue it has a log for.
//! - **Rebalancing.** When the members change (and every
//!   [`REBALANCE_INTERVAL`]), the leader of each queue moves its group to
//!   the placement over the current members (`change_voters`), a node the
//!   placement now includes opens a joining replica, and a replica no
//!   longer placed here is removed once its group no longer has it.
//!   `Decommission` removes a member (docs/cluster.md, "Membership
//!   change").
//! - **Gateways.** Requests from gateways go to the queue replica; only a
//!   leader serves them (others answer `NotLeader` with the leader's node
//!   id). A consumer attached by a gateway is a local [`Consumer`] whose
//!   sink pushes `Deliver` messages on that gateway's connection. When a
//!   gateway's connection closes and it does not come back within
//!   [`GATEWAY_GRACE`], its consumers are detached and their messages
//!   requeued (`gateway_down`) on every queue this node leads.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::Message as RaftMessage;
use serde_bytes::ByteBuf;
use sluice_storage::Store;
use tokio::sync::mpsc;

use super::{Membership, NodeRequest, NodeResponse, QueueResult, ReplicaInfo, WireDelivery};
use crate::backend::{ready, ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Queue, QueueId, QueueSpec};
use sluice_codecs::command::Message;
use crate::consensus::{raft_id, FjallLogStore, GroupId, Transport, META_GROUP};
use crate::meta::replica::{Applied, MetaCommand, MetaOptions, MetaReplica, MetaResult, MetaState};
use crate::placement::{replication_factor, NodeId, Placement, PlacementKey};
use crate::replica::queue_sm::{ConsumerId, PublishId};
use crate::replicated::{ReplicaOptions, ReplicatedQueue};
use crate::rpc::{self, PeerInfo, Role, Secret};
use crate::{record, Error};

type Client = rpc::Client<NodeRequest, NodeResponse>;

/// The Raft clock of queue groups in a cluster of one (`sluice serve`).
const SINGLE_NODE_TICK: Duration = Duration::from_secs(1);

/// How long a gateway may be disconnected before its consumers are
/// detached and their messages requeued.
pub const GATEWAY_GRACE: Duration = Duration::from_secs(5);

/// How often the host checks every queue's replica set against the
/// placement over the current members (besides after each member change).
pub const REBALANCE_INTERVAL: Duration = Duration::from_secs(2);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- transport -------------------------------------------------------------

/// The queue of one peer's sender task: (group, encoded raft messages).
type RaftSender = mpsc::UnboundedSender<(GroupId, Vec<ByteBuf>)>;

/// A connection's push queue of one-way messages (a delivery stays
/// pending for its consumer until the gateway reports it written).
type PushQueue = mpsc::UnboundedSender<NodeRequest>;

/// Outgoing Raft messages of this node, one sender task per peer.
#[derive(Clone)]
pub struct PeerLinks {
    shared: Arc<LinksShared>,
}

struct LinksShared {
    me: String,
    secret: Secret,
    membership: Arc<Membership>,
    peers: Mutex<HashMap<u64, RaftSender>>,
    /// raft id -> node id, from membership and the metadata.
    ids: RwLock<HashMap<u64, String>>,
}

impl PeerLinks {
    pub fn new(me: String, secret: Secret, membership: Arc<Membership>) -> Self {
        PeerLinks {
            shared: Arc::new(LinksShared {
                me,
                secret,
                membership,
                peers: Mutex::new(HashMap::new()),
                ids: RwLock::new(HashMap::new()),
            }),
        }
    }

    /// The node id behind a raft id, if known.
    pub fn node_of(&self, raft: u64) -> Option<String> {
        self.shared.node_of(raft)
    }

    /// Records a node id (from the metadata's members).
    pub fn learn(&self, node_id: &str) {
        self.shared.ids.write().unwrap_or_else(|p| p.into_inner()).insert(raft_id(node_id), node_id.to_owned());
    }

    /// The address membership knows for `node_id`.
    pub fn addr_of(&self, node_id: &str) -> Option<String> {
        self.shared.addr_of(node_id)
    }

    fn sender(&self, to: u64) -> RaftSender {
        let mut peers = lock(&self.shared.peers);
        if let Some(tx) = peers.get(&to) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::unbounded_channel();
        peers.insert(to, tx.clone());
        tokio::spawn(peer_sender(Arc::downgrade(&self.shared), to, rx));
        tx
    }
}

impl LinksShared {
    fn node_of(&self, raft: u64) -> Option<String> {
        if let Some(id) = self.ids.read().unwrap_or_else(|p| p.into_inner()).get(&raft) {
            return Some(id.clone());
        }
        let view = self.membership.view();
        let mut ids = self.ids.write().unwrap_or_else(|p| p.into_inner());
        for m in view {
            ids.insert(raft_id(&m.id), m.id);
        }
        ids.get(&raft).cloned()
    }

    fn addr_of(&self, node_id: &str) -> Option<String> {
        self.membership.view().into_iter().find(|m| m.id == node_id).map(|m| m.addr)
    }
}

/// Sends one peer's Raft messages, connecting as needed; while the peer is
/// unreachable its messages are dropped.
async fn peer_sender(
    links: std::sync::Weak<LinksShared>,
    to: u64,
    mut rx: mpsc::UnboundedReceiver<(GroupId, Vec<ByteBuf>)>,
) {
    let mut client: Option<Client> = None;
    let mut retry_at = tokio::time::Instant::now();
    while let Some((group, msgs)) = rx.recv().await {
        let Some(links) = links.upgrade() else { return };
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = None;
            if tokio::time::Instant::now() < retry_at {
                continue;
            }
            let Some(addr) = links.node_of(to).and_then(|id| links.addr_of(&id)) else { continue };
            let me = PeerInfo::node(links.me.clone());
            let connect = rpc::connect::<NodeRequest, NodeResponse>(addr.as_str(), &links.secret, me);
            match tokio::time::timeout(Duration::from_secs(1), connect).await {
                Ok(Ok((c, _incoming))) => client = Some(c),
                _ => {
                    retry_at = tokio::time::Instant::now() + Duration::from_millis(100);
                    continue;
                }
            }
        }
        if let Some(c) = &client {
            if c.send(NodeRequest::Raft { group, msgs }).await.is_err() {
                client = None;
            }
        }
    }
}

impl Transport for PeerLinks {
    fn send(&self, group: GroupId, msgs: Vec<RaftMessage>) {
        let mut by_peer: BTreeMap<u64, Vec<ByteBuf>> = BTreeMap::new();
        for m in msgs {
            match m.write_to_bytes() {
                Ok(bytes) => by_peer.entry(m.to).or_default().push(ByteBuf::from(bytes)),
                Err(e) => tracing::error!(error = %e, "cannot encode a raft message"),
            }
        }
        for (to, msgs) in by_peer {
            let _ = self.sender(to).send((group, msgs));
        }
    }
}

// ---- the host ----------------------------------------------------------------

/// A consumer attached by a gateway.
struct RemoteConsumer {
    consumer: Arc<Consumer>,
    gateway: String,
}

/// Bytes of message bodies the body caches of all the queues of a node
/// hold together at most (each queue also has its own limit,
/// `body_cache_bytes`, 16 MiB by default): 100 busy queues would
/// otherwise cache 1.6 GiB.
pub const BODY_CACHE_TOTAL_BYTES: usize = 128 << 20;

/// How often a lagging queue's leader checks whether it still lags, to
/// tell the gateways it told (publishers held there wait this long at
/// most after the lag ends).
const LAG_WATCH: Duration = Duration::from_millis(5);

/// The replicas of one node and what gateways asked of them.
pub struct Host {
    /// This host, for callbacks handed to its replicas.
    me: std::sync::Weak<Host>,
    node_id: String,
    raft: u64,
    store: Store,
    runtime: tokio::runtime::Handle,
    links: PeerLinks,
    meta: Arc<MetaReplica>,
    queues: RwLock<HashMap<u64, Arc<ReplicatedQueue>>>,
    /// Queue id -> name (for `sluice ctl status`).
    names: Mutex<HashMap<u64, String>>,
    consumers: Mutex<HashMap<(u64, ConsumerId), RemoteConsumer>>,
    /// Queue id -> the gateway connections told that it lags (see
    /// [`Host::tell_lagging`]).
    lag_told: Mutex<HashMap<u64, Vec<Client>>>,
    /// Gateway id -> live connections from it.
    gateways: Mutex<HashMap<String, u32>>,
    /// `sluice serve`: see [`Host::start_with`].
    single_node: bool,
    /// Serialises replica opens.
    opening: Mutex<()>,
    /// Per-queue cache of recent bodies on the leader; 0: the default.
    body_cache_bytes: std::sync::atomic::AtomicUsize,
    /// What all the queues' body caches on this node may hold together.
    body_cache_budget: Arc<crate::replicated::CacheBudget>,
    /// Queues with a `change_voters` (led here) or a membership check
    /// (hosted here, not placed here) in progress.
    changing: Mutex<HashSet<u64>>,
    checking: Mutex<HashSet<u64>>,
    /// Publishes the dead letters of the replicas led here.
    dead_letters: Arc<HostDeadLetters>,
}

/// How long a dead letter may take to reach one target queue's leader
/// before the source queue tries again later.
const DEAD_LETTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes dead letters of the replicas this host leads: routes them on
/// the host's copy of the metadata, publishes to target queues led here
/// directly and to the others' leaders with [`NodeRequest::DeadLetter`].
struct HostDeadLetters {
    host: std::sync::Weak<Host>,
    /// Connections to other nodes, by address.
    clients: Mutex<HashMap<String, Client>>,
}

impl crate::dead_letter::DeadLetters for HostDeadLetters {
    fn publish(&self, vhost: &str, message: Message, publish_id: PublishId) -> crate::backend::Reply<()> {
        let Some(host) = self.host.upgrade() else { return ready(Err(Error::ShuttingDown)) };
        let targets: Vec<u64> = host.meta.with_state(|st| {
            match st.topology.route(vhost, &message.exchange, &message.routing_key, &message.properties) {
                Ok(targets) => targets.iter().map(|t| t.id).collect(),
                Err(e) => {
                    tracing::debug!(exchange = message.exchange, error = %e, "dead letter not routable: dropped");
                    Vec::new()
                }
            }
        });
        let mut sends: Vec<crate::backend::Reply<()>> = Vec::new();
        for queue in targets {
            // A target led here gets it now, so that dead letters of one
            // source reach it in order.
            if let Ok(q) = host.leading(queue) {
                match q.publish_as(message.clone(), Some(publish_id.clone())) {
                    Ok(Some(durable)) => {
                        sends.push(durable);
                        continue;
                    }
                    Ok(None) => continue,
                    Err(_) => {}
                }
            }
            let me = host.dead_letters.clone();
            let (message, publish_id) = (message.clone(), publish_id.clone());
            sends.push(Box::pin(async move { me.publish_remote(queue, message, publish_id).await }));
        }
        Box::pin(async move {
            for send in sends {
                match send.await {
                    // A full target (reject-publish) drops the dead letter,
                    // as RabbitMQ does.
                    Ok(()) | Err(Error::QueueFull) => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        })
    }
}

impl HostDeadLetters {
    /// Publishes to `queue`'s leader wherever it is: asks the node this
    /// host believes leads it, else every member, following `NotLeader`
    /// hints, until one commits it or [`DEAD_LETTER_TIMEOUT`] passes.
    async fn publish_remote(&self, queue: u64, message: Message, publish_id: PublishId) -> Result<(), Error> {
        let record = record::encode(&message);
        let deadline = tokio::time::Instant::now() + DEAD_LETTER_TIMEOUT;
        let mut hint: Option<String> = None;
        let mut delay = Duration::from_millis(20);
        loop {
            let Some(host) = self.host.upgrade() else { return Err(Error::ShuttingDown) };
            if let Ok(q) = host.leading(queue) {
                if let Ok(Some(durable)) = q.publish_as(message.clone(), Some(publish_id.clone())) {
                    return durable.await;
                }
            }
            let mut candidates: Vec<String> = Vec::new();
            if let Some(h) = hint.take() {
                candidates.push(h);
            }
            if let Some(leader) = host.queue(queue).and_then(|q| host.node_of(q.leader())) {
                candidates.push(leader);
            }
            candidates.extend(host.members());
            let mut seen = HashSet::new();
            candidates.retain(|n| *n != host.node_id && seen.insert(n.clone()));
            drop(host);
            for node in candidates {
                let req = NodeRequest::DeadLetter {
                    queue,
                    publisher: publish_id.publisher.clone(),
                    id: publish_id.id,
                    message: serde_bytes::ByteBuf::from(record.to_vec()),
                };
                match self.call(&node, req).await {
                    Ok(NodeResponse::Queue(QueueResult::Ok)) => return Ok(()),
                    Ok(NodeResponse::Queue(QueueResult::QueueFull)) => return Err(Error::QueueFull),
                    Ok(NodeResponse::Queue(QueueResult::NotLeader { leader: Some(l) })) => {
                        hint = Some(l);
                        break;
                    }
                    _ => continue,
                }
            }
            if tokio::time::Instant::now() + delay > deadline {
                return Err(Error::Unavailable(format!("no leader of queue {queue:016x} took a dead letter")));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
    }

    async fn call(&self, node: &str, req: NodeRequest) -> Result<NodeResponse, Error> {
        let host = self.host.upgrade().ok_or(Error::ShuttingDown)?;
        let addr = host.links.addr_of(node).ok_or_else(|| Error::Unavailable(format!("no address for node {node}")))?;
        let me = PeerInfo::node(host.node_id.clone());
        let secret = host.links.shared.secret.clone();
        drop(host);
        let cached = lock(&self.clients).get(&addr).filter(|c| !c.is_closed()).cloned();
        let client = match cached {
            Some(c) => c,
            None => {
                let connect = rpc::connect::<NodeRequest, NodeResponse>(addr.as_str(), &secret, me);
                let (client, _incoming) = tokio::time::timeout(Duration::from_secs(1), connect)
                    .await
                    .map_err(|_| Error::Unavailable(format!("connecting to {addr} timed out")))?
                    .map_err(|e| Error::Unavailable(e.to_string()))?;
                lock(&self.clients).insert(addr.clone(), client.clone());
                client
            }
        };
        client.call_timeout(req, Duration::from_secs(5)).await.map_err(|e| Error::Unavailable(e.to_string()))
    }
}

/// Pushes a consumer's deliveries on its gateway's connection.
struct GatewaySink {
    queue: u64,
    consumer: ConsumerId,
    /// The epoch of the `Attach` that made this sink: the gateway drops
    /// deliveries of an attach it has since replaced.
    epoch: u64,
    tx: PushQueue,
}

impl DeliverySink for GatewaySink {
    fn deliver(&self, _consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        let msg = NodeRequest::Deliver {
            queue: self.queue,
            consumer: self.consumer.clone(),
            epoch: self.epoch,
            seq: delivery.msg_id,
            redelivered: delivery.redelivered,
            delivery_count: delivery.delivery_count,
            enqueued_ms: delivery.enqueued_ms,
            message: ByteBuf::from(record::encode(&delivery.message).to_vec()),
        };
        // Pending (towards MAX_PENDING) until the gateway reports it
        // written to its client's socket (`NodeRequest::Written`).
        self.tx.send(msg).is_ok()
    }

    fn cancelled(&self, _consumer: &Arc<Consumer>) {
        let msg = NodeRequest::Cancelled { queue: self.queue, consumer: self.consumer.clone() };
        let _ = self.tx.send(msg);
    }
}

impl Host {
    /// Opens the metadata replica (founding or joining the group) and every
    /// queue replica this node has a log for, and starts following the
    /// metadata. With `single_node` (`sluice serve`, a cluster of one)
    /// queues drop their transient messages when they reopen, as a
    /// restarted RabbitMQ does, and tick slowly.
    pub fn start_with(
        node_id: String,
        addr: String,
        store: Store,
        secret: Secret,
        membership: Arc<Membership>,
        seeds: Vec<String>,
        single_node: bool,
    ) -> Result<Arc<Host>, Error> {
        let runtime = tokio::runtime::Handle::current();
        let raft = raft_id(&node_id);
        let links = PeerLinks::new(node_id.clone(), secret.clone(), membership);
        links.learn(&node_id);
        let has_meta = FjallLogStore::exists(&store, META_GROUP).map_err(|e| Error::Corrupt(e.to_string()))?;
        let founding = !has_meta && seeds.is_empty();
        let voters = if founding { vec![raft] } else { Vec::new() };
        let transport: Arc<dyn Transport> = Arc::new(links.clone());
        let meta = MetaReplica::open(store.clone(), MetaOptions::new(raft, voters, transport), &runtime)?;
        let host = Arc::new_cyclic(|me| Host {
            me: me.clone(),
            node_id: node_id.clone(),
            raft,
            store,
            runtime,
            links,
            meta,
            queues: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
            lag_told: Mutex::new(HashMap::new()),
            gateways: Mutex::new(HashMap::new()),
            single_node,
            opening: Mutex::new(()),
            body_cache_bytes: std::sync::atomic::AtomicUsize::new(0),
            body_cache_budget: crate::replicated::CacheBudget::new(BODY_CACHE_TOTAL_BYTES),
            changing: Mutex::new(HashSet::new()),
            checking: Mutex::new(HashSet::new()),
            dead_letters: Arc::new(HostDeadLetters { host: me.clone(), clients: Mutex::new(HashMap::new()) }),
        });
        // Queues with a local log, from the metadata as applied so far.
        let (index, state, rx) = host.meta.subscribe_with_state();
        for m in state.members.keys() {
            host.links.learn(m);
        }
        for (spec, key) in queue_specs(&state.topology) {
            let _ = key;
            if FjallLogStore::exists(&host.store, spec.id.0).map_err(|e| Error::Corrupt(e.to_string()))? {
                host.open_queue(spec, Vec::new());
            }
        }
        tokio::spawn(follow_meta(Arc::downgrade(&host), index, state, rx));
        if founding || !seeds.is_empty() {
            tokio::spawn(join(Arc::downgrade(&host), addr, seeds));
        }
        Ok(host)
    }

    /// The committed members of the cluster (metadata), sorted.
    pub fn members(&self) -> Vec<String> {
        self.meta.state().1.members.keys().cloned().collect()
    }

    /// Names of the queues this node leads, sorted; `meta` first if it
    /// leads the metadata group.
    pub fn led(&self) -> Vec<String> {
        let queues = self.queues.read().unwrap_or_else(|p| p.into_inner());
        let names = lock(&self.names);
        let mut out: Vec<String> =
            queues.iter().filter(|(_, q)| q.is_leader()).filter_map(|(id, _)| names.get(id).cloned()).collect();
        out.sort();
        if self.meta.is_leader() {
            out.insert(0, "meta".to_owned());
        }
        out
    }

    /// Replicas led and followed, replication lag and member states
    /// (metrics).
    pub fn replication(&self) -> super::ReplicationFigures {
        let queues: Vec<Arc<ReplicatedQueue>> =
            self.queues.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let mut f = super::ReplicationFigures { leads_meta: self.meta.is_leader(), ..Default::default() };
        for q in queues {
            match q.replication() {
                (true, lag) => {
                    f.leading += 1;
                    f.max_lag = f.max_lag.max(lag);
                }
                (false, _) => f.following += 1,
            }
        }
        let view = self.links.shared.membership.view();
        for id in self.members() {
            let up = view.iter().any(|v| v.id == id && v.state == super::MemberState::Up);
            if up {
                f.members_up += 1;
            } else {
                f.members_down += 1;
            }
        }
        f
    }

    /// Queue replicas hosted here.
    pub fn replica_count(&self) -> usize {
        self.queues.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn queue(&self, id: u64) -> Option<Arc<ReplicatedQueue>> {
        self.queues.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    /// `x-expires`: the queue `id` (or a partition of it) went unused for
    /// its time: delete it through the metadata group, as if a client had
    /// (at the leader, or forwarded to it).
    async fn delete_expired(self: Arc<Self>, id: u64) {
        let (_, state) = self.meta.state();
        let found = state.topology.vhosts().find_map(|vh| {
            vh.queues.values().find(|q| q.ids.contains(&id)).map(|q| (vh.name.clone(), q.name.clone(), q.exclusive_owner))
        });
        let Some((vhost, name, owner)) = found else { return };
        // x-dead-letter-on-delete: this replica leads (it reported the
        // expiry): its messages go to the dead-letter exchange first.
        if let Some(q) = self.queue(id).filter(|q| q.spec().dead_letter_on_delete()) {
            if let Err(e) = ReplicatedQueue::retire(&q).await {
                tracing::warn!(queue = name, error = %e, "expired queue not deleted: messages not dead-lettered");
                q.touch();
                return;
            }
        }
        let cmd = MetaCommand::Topology(crate::meta::Command::DeleteQueue {
            vhost,
            name: name.clone(),
            if_unused: false,
            if_empty: false,
            conn: owner.unwrap_or(crate::meta::Owner(0)),
            counts: (0, 0),
        });
        if self.meta.is_leader() {
            if let Err(e) = self.meta.propose(cmd).await {
                tracing::warn!(queue = name, error = %e, "expired queue not deleted");
            }
            return;
        }
        let Some(addr) = self.node_of(self.meta.leader()).and_then(|l| self.links.addr_of(&l)) else {
            tracing::warn!(queue = name, "expired queue not deleted: no metadata leader known");
            return;
        };
        let me = PeerInfo::node(self.node_id.clone());
        let asked = tokio::time::timeout(Duration::from_secs(10), super::ask(&addr, &self.links.shared.secret, me, NodeRequest::Meta { cmd }));
        if !matches!(asked.await, Ok(Ok(NodeResponse::MetaDone { .. }))) {
            tracing::warn!(queue = name, "expired queue not deleted by the metadata leader");
        }
    }

    /// Tells the consumers attached to queue `id` here that it is gone.
    pub fn cancel_consumers(&self, id: u64) {
        if let Some(q) = self.queue(id) {
            q.cancel_consumers();
        }
    }

    /// Sets the per-queue cache of recent message bodies for queues opened
    /// from now on (`sluice serve --body-cache-bytes`).
    pub fn set_body_cache_bytes(&self, bytes: usize) {
        self.body_cache_bytes.store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// The metadata replica of this node.
    pub fn meta(&self) -> Arc<MetaReplica> {
        self.meta.clone()
    }

    /// The replica of queue `spec` on this node, opening it (as a group
    /// of this node alone) if it is not open yet: the in-process gateway
    /// of a cluster of one asks for it as soon as its copy of the metadata
    /// has the queue, which may be before this host's own follower.
    pub fn local_queue(&self, spec: QueueSpec) -> Result<Arc<ReplicatedQueue>, Error> {
        let id = spec.id.0;
        self.open_queue(spec, vec![self.raft]);
        self.queue(id).ok_or_else(|| Error::Unavailable(format!("queue {id} could not be opened")))
    }

    fn open_queue(&self, spec: QueueSpec, voters: Vec<u64>) {
        self.open_replica(spec, voters, false);
    }

    /// Opens a replica; `join`: of a group that exists on other nodes (an
    /// empty log, no bootstrap: the leader adds it and sends a snapshot).
    fn open_replica(&self, spec: QueueSpec, voters: Vec<u64>, join: bool) {
        let id = spec.id.0;
        // One open at a time: two opens of one group would share its log.
        let _opening = lock(&self.opening);
        if self.queue(id).is_some() {
            return;
        }
        let mut opts = ReplicaOptions::new(self.raft, voters, Arc::new(self.links.clone()), format!("node:{}", self.node_id));
        opts.drop_transient_on_open = self.single_node;
        // A non-durable queue of a single node is gone after a restart:
        // its log never needs the disk.
        opts.volatile = self.single_node && !spec.durable && !join;
        let host = self.me.clone();
        opts.on_expired = Some(Arc::new(move |queue: QueueId| {
            if let Some(h) = host.upgrade() {
                tokio::spawn(async move { h.delete_expired(queue.0).await });
            }
        }));
        opts.dead_letters = Some(self.dead_letters.clone());
        let host = self.me.clone();
        opts.delayed_exchange = Some(Arc::new(move |vhost: &str, exchange: &str| {
            host.upgrade().is_some_and(|h| h.meta.with_state(|st| st.topology.is_delayed_exchange(vhost, exchange)))
        }));
        if self.single_node {
            // A lone voter needs no elections or heartbeats: a slow clock
            // keeps thousands of idle queues cheap.
            opts.tick = SINGLE_NODE_TICK;
        }
        let cache = self.body_cache_bytes.load(std::sync::atomic::Ordering::Relaxed);
        if cache > 0 {
            opts.body_cache_bytes = cache;
        }
        opts.body_cache_budget = Some(self.body_cache_budget.clone());
        opts.join = join;
        match ReplicatedQueue::open(spec.clone(), self.store.clone(), opts, &self.runtime) {
            Ok(q) => {
                self.queues.write().unwrap_or_else(|p| p.into_inner()).insert(id, q);
                lock(&self.names).insert(id, spec.name.clone());
            }
            Err(e) => tracing::error!(queue = %spec.name, error = %e, "cannot open queue replica"),
        }
    }

    fn drop_queue(&self, id: u64) {
        let q = self.queues.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        lock(&self.names).remove(&id);
        lock(&self.consumers).retain(|(qid, _), _| *qid != id);
        if let Some(q) = q {
            // The queue is gone: its consumers hear it (basic.cancel), in
            // whichever order this and the in-process router apply it.
            q.cancel_consumers();
            tokio::spawn(async move {
                q.destroy().await;
            });
        }
    }

    /// Forgets a replica that stopped by itself (it applied its own removal
    /// from the group and removed its records).
    fn forget_queue(&self, id: u64) {
        self.queues.write().unwrap_or_else(|p| p.into_inner()).remove(&id);
        lock(&self.names).remove(&id);
        lock(&self.consumers).retain(|(qid, _), _| *qid != id);
    }

    /// A replica as this node sees it (for `sluice ctl queues` and
    /// `QueueConfig`).
    fn replica_info(&self, id: u64, q: &ReplicatedQueue) -> ReplicaInfo {
        let name = |raft: u64| self.links.node_of(raft).unwrap_or_else(|| format!("#{raft}"));
        let (voters, learners) = q.voters();
        ReplicaInfo {
            queue: id,
            name: lock(&self.names).get(&id).cloned().unwrap_or_default(),
            node: self.node_id.clone(),
            leader: q.leader().map(name),
            voters: voters.into_iter().map(name).collect(),
            learners: learners.into_iter().map(name).collect(),
        }
    }

    /// The node id of the leader `raft` (a raft id), for `NotLeader` hints.
    fn node_of(&self, raft: Option<u64>) -> Option<String> {
        raft.and_then(|r| self.links.node_of(r))
    }

    fn not_leader(&self, leader: Option<u64>) -> QueueResult {
        QueueResult::NotLeader { leader: self.node_of(leader) }
    }

    fn queue_error(&self, e: Error) -> QueueResult {
        match e {
            Error::NotLeader { leader } => self.not_leader(leader),
            Error::ExclusiveConsumer => QueueResult::Exclusive,
            Error::QueueFull => QueueResult::QueueFull,
            other => QueueResult::Failed(other.to_string()),
        }
    }

    /// Tells `conn` (a gateway publishing to `q`) that `q` lags, once;
    /// the first such gateway starts a watch that tells every gateway told
    /// when it no longer does (or no longer leads here).
    fn tell_lagging(self: &Arc<Self>, q: &Arc<ReplicatedQueue>, conn: &Client, pushes: &Pushes) {
        let queue = q.queue_id().0;
        let first = {
            let mut told = lock(&self.lag_told);
            let conns = told.entry(queue).or_default();
            if conns.iter().any(|c| c.id() == conn.id()) {
                return;
            }
            conns.push(conn.clone());
            conns.len() == 1
        };
        pushes.push(conn, NodeRequest::Lagging { queue, lagging: true });
        if !first {
            return;
        }
        let (host, q, pushes) = (self.clone(), q.clone(), pushes.clone());
        tokio::spawn(async move {
            while q.lagging() && q.is_leader() {
                tokio::time::sleep(LAG_WATCH).await;
            }
            let told = lock(&host.lag_told).remove(&queue).unwrap_or_default();
            for conn in told {
                pushes.push(&conn, NodeRequest::Lagging { queue, lagging: false });
            }
        });
    }

    /// A leader replica of `queue`, or why not.
    fn leading(&self, queue: u64) -> Result<Arc<ReplicatedQueue>, QueueResult> {
        let q = self.queue(queue).ok_or(QueueResult::NoSuchQueue)?;
        if !q.is_leader() {
            return Err(self.not_leader(q.leader()));
        }
        Ok(q)
    }

    /// A gateway connected (or reconnected).
    pub fn gateway_connected(self: &Arc<Self>, conn: &Client) {
        if conn.peer().role != Role::Gateway {
            return;
        }
        let gateway = conn.peer().node_id.clone();
        *lock(&self.gateways).entry(gateway.clone()).or_default() += 1;
        let host = Arc::downgrade(self);
        let conn = conn.clone();
        tokio::spawn(async move {
            conn.closed().await;
            {
                let Some(h) = host.upgrade() else { return };
                let mut g = lock(&h.gateways);
                if let Some(n) = g.get_mut(&gateway) {
                    *n = n.saturating_sub(1);
                }
            }
            tokio::time::sleep(GATEWAY_GRACE).await;
            let Some(h) = host.upgrade() else { return };
            let back = lock(&h.gateways).get(&gateway).copied().unwrap_or(0) > 0;
            if back {
                return;
            }
            tracing::info!(gateway, "gateway gone: requeueing what its consumers held");
            lock(&h.consumers).retain(|_, c| c.gateway != gateway);
            let queues: Vec<Arc<ReplicatedQueue>> =
                h.queues.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
            for q in queues {
                if q.is_leader() {
                    q.gateway_down(&gateway);
                }
            }
            h.drop_exclusive_queues_of(&gateway).await;
        });
    }

    /// The exclusive queues owned by connections of a vanished gateway
    /// are deleted, as RabbitMQ deletes them when their connection's node
    /// goes down. Done by the metadata leader (every gateway that declares
    /// has a link to it); connection ids carry their gateway's
    /// [`crate::remote::owner_tag`] in the high 32 bits.
    async fn drop_exclusive_queues_of(&self, gateway: &str) {
        if !self.meta.is_leader() {
            return;
        }
        let tag = u64::from(crate::remote::owner_tag(gateway));
        let (_, state) = self.meta.state();
        let mut owners: Vec<crate::meta::Owner> = state
            .topology
            .vhosts()
            .flat_map(|vh| vh.queues.values().filter_map(|q| q.exclusive_owner))
            .filter(|o| o.0 >> 32 == tag)
            .collect();
        owners.sort();
        owners.dedup();
        for owner in owners {
            let cmd = MetaCommand::Topology(crate::meta::Command::ConnectionClosed { owner });
            if let Err(e) = self.meta.propose(cmd).await {
                tracing::warn!(gateway, error = %e, "cannot delete a vanished gateway's exclusive queues");
            }
        }
    }

    /// One-way messages: Raft traffic, publishes, settles, detaches.
    pub async fn message(self: &Arc<Self>, conn: &Client, msg: NodeRequest, pushes: &Pushes) {
        match msg {
            NodeRequest::Raft { group, msgs } => {
                let target = if group == META_GROUP { None } else { self.queue(group) };
                for m in msgs {
                    let Ok(m) = RaftMessage::parse_from_bytes(&m) else {
                        tracing::warn!(peer = %conn.peer().node_id, "undecodable raft message dropped");
                        continue;
                    };
                    match &target {
                        Some(q) => q.step(m),
                        None if group == META_GROUP => self.meta.step(m),
                        None => {}
                    }
                }
            }
            NodeRequest::Publish { queue, publisher, id, message } => {
                let confirm = |result| NodeRequest::Confirm { queue, publisher: publisher.clone(), id, result };
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return pushes.push(conn, confirm(r)),
                };
                let message = match record::decode(&Bytes::from(message.into_vec())) {
                    Ok(m) => m,
                    Err(e) => return pushes.push(conn, confirm(QueueResult::Failed(e.to_string()))),
                };
                let pid = PublishId { publisher: publisher.clone(), id };
                if q.lagging() {
                    self.tell_lagging(&q, conn, pushes);
                }
                match q.publish_as(message, Some(pid)) {
                    Ok(None) => pushes.push(conn, confirm(QueueResult::Ok)),
                    Ok(Some(durable)) => {
                        let host = self.clone();
                        let conn = conn.clone();
                        let pushes = pushes.clone();
                        tokio::spawn(async move {
                            let result = match durable.await {
                                Ok(()) => QueueResult::Ok,
                                Err(e) => host.queue_error(e),
                            };
                            pushes.push(&conn, NodeRequest::Confirm { queue, publisher, id, result });
                        });
                    }
                    Err(e) => {
                        let r = self.queue_error(e);
                        pushes.push(conn, confirm(r));
                    }
                }
            }
            NodeRequest::Settle { queue, consumer, seqs, outcome } => {
                let Some(q) = self.queue(queue) else { return };
                let proxy = lock(&self.consumers).get(&(queue, consumer.clone())).map(|c| c.consumer.clone());
                let n = seqs.len();
                q.settle_as(&consumer, seqs, outcome.into());
                if let Some(c) = proxy {
                    for _ in 0..n {
                        c.release_unacked();
                    }
                    q.kick();
                }
            }
            NodeRequest::Written { queue, consumer, n } => {
                let proxy = lock(&self.consumers).get(&(queue, consumer)).map(|c| c.consumer.clone());
                if let Some(c) = proxy {
                    c.release_pending_many(n);
                }
            }
            NodeRequest::Detach { queue, consumer } => self.detach_remote(queue, &consumer, false),
            NodeRequest::Release { queue, consumer } => self.detach_remote(queue, &consumer, true),
            other => {
                tracing::debug!(peer = %conn.peer().node_id, "unexpected one-way message: {other:?}");
            }
        }
    }

    /// A gateway's consumer is cancelled (basic.cancel: what it holds stays
    /// held) or, `release`, its channel is gone (what it holds is requeued).
    fn detach_remote(&self, queue: u64, consumer: &ConsumerId, release: bool) {
        tracing::debug!(queue, ?consumer, release, "remote consumer detached");
        let gone = lock(&self.consumers).remove(&(queue, consumer.clone()));
        let Some(q) = self.queue(queue) else { return };
        if let Some(c) = gone {
            Queue::cancel(q.as_ref(), &c.consumer);
        }
        if release {
            q.return_all(consumer);
        } else {
            q.detach(consumer);
        }
    }

    /// Requests from gateways about queues.
    pub async fn request(self: &Arc<Self>, conn: &Client, req: NodeRequest, pushes: &Pushes) -> NodeResponse {
        match req {
            NodeRequest::DeadLetter { queue, publisher, id, message } => {
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return NodeResponse::Queue(r),
                };
                let message = match record::decode(&Bytes::from(message.into_vec())) {
                    Ok(m) => m,
                    Err(e) => return NodeResponse::Queue(QueueResult::Failed(e.to_string())),
                };
                let result = match q.publish_as(message, Some(PublishId { publisher, id })) {
                    Ok(Some(durable)) => durable.await,
                    Ok(None) => Ok(()),
                    Err(e) => Err(e),
                };
                NodeResponse::Queue(result.map_or_else(|e| self.queue_error(e), |()| QueueResult::Ok))
            }
            NodeRequest::Stats { queue } => match self.leading(queue) {
                Ok(q) => NodeResponse::Stats(q.stats_now()),
                Err(r) => NodeResponse::Queue(r),
            },
            NodeRequest::Counts { queue } => match self.leading(queue) {
                // After what this gateway sent before it (handled in order).
                Ok(q) => match q.counts_synced().await {
                    Ok((m, c)) => NodeResponse::Counts(m, c),
                    Err(e) => NodeResponse::Queue(self.queue_error(e)),
                },
                Err(r) => NodeResponse::Queue(r),
            },
            NodeRequest::Attach { queue, consumer, epoch, no_ack, exclusive, prefetch, held } => {
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return NodeResponse::Queue(r),
                };
                let sink = Arc::new(GatewaySink { queue, consumer: consumer.clone(), epoch, tx: pushes.deliveries(conn) });
                let proxy = Consumer::new(
                    consumer.tag.clone(),
                    no_ack,
                    exclusive,
                    Credit::new(prefetch),
                    Arc::new(ChannelFlow::default()),
                    sink,
                );
                let previous = lock(&self.consumers).insert(
                    (queue, consumer.clone()),
                    RemoteConsumer { consumer: proxy.clone(), gateway: conn.peer().node_id.clone() },
                );
                if let Some(p) = previous {
                    Queue::cancel(q.as_ref(), &p.consumer);
                }
                // The held messages count against the new window.
                for _ in &held {
                    proxy.force_acquire();
                    proxy.release_pending();
                }
                match q.attach(consumer.clone(), proxy, held).await {
                    Ok(()) => NodeResponse::Queue(QueueResult::Ok),
                    Err(e) => {
                        lock(&self.consumers).remove(&(queue, consumer));
                        NodeResponse::Queue(self.queue_error(e))
                    }
                }
            }
            NodeRequest::Get { queue, holder, no_ack } => {
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return NodeResponse::Queue(r),
                };
                match q.get_as(holder, no_ack).await {
                    Ok(None) => NodeResponse::Got { delivery: None, left: 0 },
                    Ok(Some((d, left))) => NodeResponse::Got {
                        delivery: Some(WireDelivery {
                            seq: d.msg_id,
                            redelivered: d.redelivered,
                            delivery_count: d.delivery_count,
                            enqueued_ms: d.enqueued_ms,
                            message: ByteBuf::from(record::encode(&d.message).to_vec()),
                        }),
                        left,
                    },
                    Err(e) => NodeResponse::Queue(self.queue_error(e)),
                }
            }
            NodeRequest::Purge { queue } => {
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return NodeResponse::Queue(r),
                };
                match Queue::purge(q.as_ref()).await {
                    Ok(n) => NodeResponse::Count(n),
                    Err(e) => NodeResponse::Queue(self.queue_error(e)),
                }
            }
            NodeRequest::Retire { queue } => {
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return NodeResponse::Queue(r),
                };
                match ReplicatedQueue::retire(&q).await {
                    Ok(n) => NodeResponse::Count(n),
                    Err(e) => NodeResponse::Queue(self.queue_error(e)),
                }
            }
            NodeRequest::Meta { cmd } => match self.meta.propose(cmd).await {
                Ok((index, result)) => NodeResponse::MetaDone { index, result },
                Err(Error::NotLeader { leader }) => NodeResponse::Queue(self.not_leader(leader)),
                Err(e) => NodeResponse::Queue(QueueResult::Failed(e.to_string())),
            },
            NodeRequest::MetaSubscribe => {
                let (index, state, mut rx) = self.meta.subscribe_with_state();
                // A node that is not (or no longer) a member does not
                // follow the group: its copy would go stale.
                if !state.members.contains_key(&self.node_id) {
                    return NodeResponse::Refused { reason: format!("{} is not a member of the cluster", self.node_id) };
                }
                let conn = conn.clone();
                tokio::spawn(async move {
                    loop {
                        match rx.recv().await {
                            Ok(applied) => {
                                if applied.index() <= index {
                                    continue;
                                }
                                if conn.send(NodeRequest::MetaApplied(Box::new(applied))).await.is_err() {
                                    return;
                                }
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                                // The subscriber must start over.
                                conn.close();
                                return;
                            }
                            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                        }
                    }
                });
                NodeResponse::MetaState { index, state: Box::new(state) }
            }
            NodeRequest::Join { id, addr } => {
                if !self.meta.is_leader() {
                    return NodeResponse::Queue(self.not_leader(self.meta.leader()));
                }
                self.links.learn(&id);
                if let Err(e) = self.meta.propose(MetaCommand::AddMember { id: id.clone(), addr }).await {
                    return NodeResponse::Queue(self.queue_error(e));
                }
                match self.meta.add_voter(raft_id(&id)).await {
                    Ok(()) => NodeResponse::Queue(QueueResult::Ok),
                    Err(e) => NodeResponse::Queue(self.queue_error(e)),
                }
            }
            NodeRequest::Replicas => {
                let queues: Vec<(u64, Arc<ReplicatedQueue>)> =
                    self.queues.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, q)| (*id, q.clone())).collect();
                let mut rows: Vec<ReplicaInfo> = queues.iter().map(|(id, q)| self.replica_info(*id, q)).collect();
                rows.sort_by(|a, b| a.name.cmp(&b.name));
                NodeResponse::Replicas(rows)
            }
            NodeRequest::QueueConfig { queue } => match self.leading(queue) {
                Ok(q) => NodeResponse::Replicas(vec![self.replica_info(queue, &q)]),
                Err(r) => NodeResponse::Queue(r),
            },
            NodeRequest::Decommission { id } => self.decommission(conn, id).await,
            other => NodeResponse::Refused { reason: format!("not a request: {other:?}") },
        }
    }

    /// `sluice ctl decommission`: at the metadata leader (a request from
    /// `ctl` to another node is forwarded once), removes `id` from the
    /// members; every node then moves the queue replicas placed on it
    /// elsewhere ([`Host::rebalance`]), and the leader removes it from the
    /// metadata group ([`Host::retire_meta_voters`]).
    async fn decommission(self: &Arc<Self>, conn: &Client, id: String) -> NodeResponse {
        if !self.meta.is_leader() {
            let leader = self.node_of(self.meta.leader());
            let addr = leader.as_ref().filter(|l| **l != self.node_id).and_then(|l| self.links.addr_of(l));
            return match addr {
                // Forwarded once: a request from a node is not forwarded again.
                Some(addr) if conn.peer().role != Role::Node => {
                    let me = PeerInfo::node(self.node_id.clone());
                    let req = NodeRequest::Decommission { id };
                    match tokio::time::timeout(
                        Duration::from_secs(10),
                        super::ask(&addr, &self.links.shared.secret, me, req),
                    )
                    .await
                    {
                        Ok(Ok(resp)) => resp,
                        Ok(Err(rpc::Error::Refused { reason })) => NodeResponse::Refused { reason },
                        Ok(Err(e)) => NodeResponse::Queue(QueueResult::Failed(format!("metadata leader {addr}: {e}"))),
                        Err(_) => NodeResponse::Queue(QueueResult::Failed(format!("metadata leader {addr}: no answer"))),
                    }
                }
                _ => NodeResponse::Queue(QueueResult::NotLeader { leader }),
            };
        }
        let (_, state) = self.meta.state();
        if !state.members.contains_key(&id) {
            let members: Vec<&str> = state.members.keys().map(String::as_str).collect();
            return NodeResponse::Refused {
                reason: format!("{id} is not a member of the cluster (members: {})", members.join(", ")),
            };
        }
        let left = state.members.len() - 1;
        if left < 2 {
            return NodeResponse::Refused {
                reason: format!(
                    "decommissioning {id} would leave {left} member{}: a cluster keeps at least 2",
                    if left == 1 { "" } else { "s" }
                ),
            };
        }
        tracing::info!(node = %id, "decommissioning");
        if let Err(e) = self.meta.propose(MetaCommand::RemoveMember { id: id.clone() }).await {
            return NodeResponse::Queue(self.queue_error(e));
        }
        // The node leaves the metadata group a little later (so that it
        // applies its own removal from the members first); the periodic
        // check does it too, at whichever node leads then.
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(REBALANCE_INTERVAL).await;
            if let Some(h) = host.upgrade() {
                let (_, state) = h.meta.state();
                h.retire_meta_voters(&state).await;
            }
        });
        NodeResponse::Queue(QueueResult::Ok)
    }

    /// Stops every replica (flushing their writes).
    pub async fn close(&self) {
        let queues: Vec<Arc<ReplicatedQueue>> =
            self.queues.write().unwrap_or_else(|p| p.into_inner()).drain().map(|(_, q)| q).collect();
        for q in queues {
            q.close().await;
        }
        self.meta.close().await;
    }
}

/// Every queue (and partition) of a topology, with its placement key.
fn queue_specs(topo: &crate::meta::Topology) -> Vec<(QueueSpec, PlacementKey)> {
    topo.vhosts()
        .flat_map(|vh| vh.queues.values().flat_map(|q| partition_specs(&vh.name, &q.name, &q.ids, q.durable, &q.arguments)))
        .collect()
}

/// The backend spec and placement key of each partition of queue `name`
/// (one for a queue that is not partitioned).
fn partition_specs(
    vhost: &str,
    name: &str,
    ids: &[u64],
    durable: bool,
    arguments: &sluice_codecs::command::Arguments,
) -> Vec<(QueueSpec, PlacementKey)> {
    let n = ids.len();
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let key = if n == 1 {
                PlacementKey::queue(vhost, name)
            } else {
                PlacementKey::partition(vhost, name, i as u32)
            };
            let spec = QueueSpec {
                id: QueueId(*id),
                vhost: vhost.to_owned(),
                name: crate::meta::partition_name(name, i, n),
                durable,
                arguments: arguments.clone(),
            };
            (spec, key)
        })
        .collect()
}

/// The replica set of a queue: its placement over `members`.
fn replica_set(members: &BTreeMap<String, String>, key: &PlacementKey, spec: &QueueSpec) -> Vec<String> {
    let placement = Placement::new(members.keys().map(|m| NodeId::new(m.clone())));
    let r = replication_factor(spec.arguments.get("x-quorum-initial-group-size").and_then(|v| v.as_i64()));
    placement.replicas(key, r).into_iter().map(|n| n.as_str().to_owned()).collect()
}

/// Follows the metadata as it is applied, on a copy of the state (so the
/// members at each entry are known): opens the replicas of created queues
/// this node is placed on, removes those of deleted queues, and moves
/// replicas when the members change ([`Host::rebalance`], also every
/// [`REBALANCE_INTERVAL`], on this same copy: it never runs ahead of the
/// creations handled here).
async fn follow_meta(
    host: std::sync::Weak<Host>,
    mut index: u64,
    mut state: MetaState,
    mut rx: tokio::sync::broadcast::Receiver<Applied>,
) {
    let mut every = tokio::time::interval(REBALANCE_INTERVAL);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let received = tokio::select! {
            r = rx.recv() => r,
            _ = every.tick() => {
                let Some(h) = host.upgrade() else { return };
                h.rebalance(&state);
                let host = host.clone();
                let members = state.clone();
                tokio::spawn(async move {
                    if let Some(h) = host.upgrade() {
                        h.retire_meta_voters(&members).await;
                    }
                });
                continue;
            }
        };
        let applied = match received {
            Ok(a) => a,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::warn!(missed = n, "metadata follower lagged; starting over from the state");
                let Some(h) = host.upgrade() else { return };
                let (i, s, r) = h.meta.subscribe_with_state();
                (index, state, rx) = (i, s, r);
                h.reconcile(&state);
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if applied.index() <= index {
            continue;
        }
        index = applied.index();
        applied.apply_to(&mut state);
        let Some(h) = host.upgrade() else { return };
        h.on_applied(&applied, &state);
    }
}

impl Host {
    fn on_applied(self: &Arc<Self>, applied: &Applied, state: &MetaState) {
        match applied {
            Applied::Command { cmd: MetaCommand::Topology(cmd), result: MetaResult::Topology(Ok(outcome)), .. } => {
                // A redeclare of an existing queue is a use (`x-expires`).
                if let crate::meta::Command::DeclareQueue { vhost, name, .. } = cmd {
                    if outcome.created.is_empty() {
                        let ids = state.topology.vhost(vhost).and_then(|vh| vh.queues.get(name)).map(|q| q.ids.clone());
                        for id in ids.unwrap_or_default() {
                            if let Some(q) = self.queue(id) {
                                q.touch();
                            }
                        }
                    }
                }
                for q in &outcome.created {
                    for (spec, key) in partition_specs(&q.vhost, &q.name, &q.ids, q.durable, &q.arguments) {
                        let set = replica_set(&state.members, &key, &spec);
                        if set.contains(&self.node_id) {
                            let voters = set.iter().map(|m| raft_id(m)).collect();
                            self.open_queue(spec, voters);
                        }
                    }
                }
                for q in &outcome.removed {
                    for id in &q.ids {
                        self.drop_queue(*id);
                    }
                }
            }
            Applied::Command { cmd: MetaCommand::AddMember { id, .. }, .. } => {
                self.links.learn(id);
                self.rebalance(state);
            }
            Applied::Command { cmd: MetaCommand::RemoveMember { .. }, .. } => self.rebalance(state),
            Applied::Reset { .. } => {
                self.reconcile(state);
                self.rebalance(state);
            }
            _ => {}
        }
    }

    /// Brings the replicas in line with the placement over the current
    /// members (docs/cluster.md, "Membership change"):
    /// - a queue this node leads whose voters are not its placement gets
    ///   [`ReplicatedQueue::change_voters`] (one at a time per queue);
    /// - a queue placed on this node that it does not host gets a joining
    ///   replica (the leader adds it);
    /// - a replica hosted here but not placed here asks the queue's leader
    ///   whether it is still in the group, and is removed once it is not
    ///   (normally it applies its own removal first);
    /// - replicas that applied their own removal are dropped.
    fn rebalance(self: &Arc<Self>, state: &MetaState) {
        let hosted: Vec<(u64, Arc<ReplicatedQueue>)> =
            self.queues.read().unwrap_or_else(|p| p.into_inner()).iter().map(|(id, q)| (*id, q.clone())).collect();
        for (id, q) in &hosted {
            if q.is_removed() {
                tracing::info!(queue = %self.name_of(*id), "replica removed from its group");
                self.forget_queue(*id);
            }
        }
        if state.members.is_empty() {
            return;
        }
        for (spec, key) in queue_specs(&state.topology) {
            let id = spec.id.0;
            let set = replica_set(&state.members, &key, &spec);
            let placed_here = set.contains(&self.node_id);
            match self.queue(id) {
                Some(q) if q.is_removed() => {}
                Some(q) if q.is_leader() => {
                    let mut target: Vec<u64> = set.iter().map(|m| raft_id(m)).collect();
                    target.sort_unstable();
                    let (voters, learners) = q.voters();
                    if voters != target || !learners.is_empty() || q.is_joint() {
                        self.spawn_change(id, q, target);
                    }
                }
                Some(q) if !placed_here => self.spawn_membership_check(id, q, set),
                Some(_) => {}
                None if placed_here => {
                    tracing::info!(queue = %spec.name, "joining the queue's group");
                    self.open_replica(spec, Vec::new(), true);
                }
                None => {}
            }
        }
    }

    fn name_of(&self, id: u64) -> String {
        lock(&self.names).get(&id).cloned().unwrap_or_else(|| id.to_string())
    }

    /// Runs `change_voters(target)` on a queue led here, unless one runs.
    fn spawn_change(self: &Arc<Self>, id: u64, q: Arc<ReplicatedQueue>, target: Vec<u64>) {
        if !lock(&self.changing).insert(id) {
            return;
        }
        let host = Arc::downgrade(self);
        let name = self.name_of(id);
        tokio::spawn(async move {
            let started = Instant::now();
            match q.change_voters(target.clone()).await {
                Ok(()) => {
                    let nodes: Vec<String> = match host.upgrade() {
                        Some(h) => target.iter().map(|r| h.links.node_of(*r).unwrap_or_else(|| format!("#{r}"))).collect(),
                        None => Vec::new(),
                    };
                    tracing::info!(queue = %name, voters = ?nodes, ms = started.elapsed().as_millis() as u64, "queue replicas moved");
                }
                Err(Error::NotLeader { .. }) => {
                    tracing::debug!(queue = %name, "leadership moved during a replica change; the new leader goes on");
                }
                Err(e) => tracing::warn!(queue = %name, error = %e, "queue replica change failed; retried later"),
            }
            if let Some(h) = host.upgrade() {
                lock(&h.changing).remove(&id);
            }
        });
    }

    /// A replica hosted here that the placement no longer puts here: asks
    /// the queue's leader (the one this replica knows, else the placed
    /// nodes) for the group's configuration and removes the replica once
    /// the group no longer has it.
    fn spawn_membership_check(self: &Arc<Self>, id: u64, q: Arc<ReplicatedQueue>, set: Vec<String>) {
        if !lock(&self.checking).insert(id) {
            return;
        }
        let host = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(h) = host.upgrade() else { return };
            let mut candidates: Vec<String> = h.node_of(q.leader()).into_iter().collect();
            candidates.extend(set);
            candidates.retain(|c| *c != h.node_id);
            candidates.dedup();
            let mut asked = 0;
            let mut verdict = None;
            while let Some(node) = (asked < 4).then(|| candidates.get(asked).cloned()).flatten() {
                asked += 1;
                let Some(addr) = h.links.addr_of(&node) else { continue };
                let me = PeerInfo::node(h.node_id.clone());
                let req = NodeRequest::QueueConfig { queue: id };
                let answer = tokio::time::timeout(Duration::from_secs(2), super::ask(&addr, &h.links.shared.secret, me, req)).await;
                match answer {
                    Ok(Ok(NodeResponse::Replicas(rows))) => {
                        verdict = rows
                            .first()
                            .map(|r| r.voters.contains(&h.node_id) || r.learners.contains(&h.node_id));
                        break;
                    }
                    Ok(Ok(NodeResponse::Queue(QueueResult::NotLeader { leader: Some(l) }))) if !candidates.contains(&l) => {
                        candidates.insert(asked, l);
                    }
                    _ => {}
                }
            }
            if verdict == Some(false) && h.queue(id).is_some_and(|cur| Arc::ptr_eq(&cur, &q)) {
                tracing::info!(queue = %h.name_of(id), "replica no longer in its group: removing it");
                h.drop_queue(id);
            }
            lock(&h.checking).remove(&id);
        });
    }

    /// At the metadata leader: removes from the metadata group the voters
    /// and learners that are no longer members (decommissioned), itself
    /// last (by handing leadership over first).
    async fn retire_meta_voters(&self, state: &MetaState) {
        if state.members.is_empty() || !self.meta.is_leader() {
            return;
        }
        let members: HashSet<u64> = state.members.keys().map(|m| raft_id(m)).collect();
        let (voters, learners) = self.meta.config();
        for id in voters.iter().chain(learners.iter()) {
            if members.contains(id) || *id == self.raft {
                continue;
            }
            tracing::info!(raft = id, "removing a decommissioned node from the metadata group");
            if let Err(e) = self.meta.remove_voter(*id).await {
                tracing::warn!(raft = id, error = %e, "cannot remove a decommissioned node from the metadata group");
                return;
            }
        }
        if !members.contains(&self.raft) && voters.contains(&self.raft) {
            tracing::info!("decommissioned: handing the metadata leadership over");
            let _ = self.meta.remove_voter(self.raft).await;
        }
    }

    /// After a snapshot (or a lagging stream): drops the replicas of queues
    /// that no longer exist, and opens those of queues placed on this node
    /// that it does not host yet (created while it was away) as joining
    /// replicas: the group exists, and its leader adds this node (or, if
    /// the group has it already, sends it a snapshot).
    fn reconcile(&self, state: &MetaState) {
        let specs = queue_specs(&state.topology);
        let live: std::collections::HashSet<u64> = specs.iter().map(|(s, _)| s.id.0).collect();
        let ours: Vec<u64> = self.queues.read().unwrap_or_else(|p| p.into_inner()).keys().copied().collect();
        for id in &ours {
            if !live.contains(id) {
                self.drop_queue(*id);
            }
        }
        for m in state.members.keys() {
            self.links.learn(m);
        }
        for (spec, key) in specs {
            if ours.contains(&spec.id.0) {
                continue;
            }
            let set = replica_set(&state.members, &key, &spec);
            if set.contains(&self.node_id) {
                self.open_replica(spec, Vec::new(), true);
            }
        }
    }
}

/// Asks the seeds (and the leaders they name) to admit this node, until
/// one does. A founding node adds itself.
async fn join(host: std::sync::Weak<Host>, addr: String, seeds: Vec<String>) {
    let mut delay = Duration::from_millis(50);
    loop {
        let Some(h) = host.upgrade() else { return };
        if h.meta.state().1.members.contains_key(&h.node_id) {
            return;
        }
        if h.meta.is_leader() {
            let cmd = MetaCommand::AddMember { id: h.node_id.clone(), addr: addr.clone() };
            if h.meta.propose(cmd).await.is_ok() {
                return;
            }
        } else {
            let mut targets = seeds.clone();
            if let Some(leader) = h.node_of(h.meta.leader()).and_then(|id| h.links.addr_of(&id)) {
                targets.insert(0, leader);
            }
            for target in targets {
                let me = PeerInfo::node(h.node_id.clone());
                let req = NodeRequest::Join { id: h.node_id.clone(), addr: addr.clone() };
                let Ok(Ok((client, _incoming))) =
                    tokio::time::timeout(Duration::from_secs(1), rpc::connect::<NodeRequest, NodeResponse>(target.as_str(), &h.links.shared.secret, me)).await
                else {
                    continue;
                };
                let answer = client.call_timeout(req, Duration::from_secs(5)).await;
                client.close();
                if let Ok(NodeResponse::Queue(QueueResult::Ok)) = answer {
                    tracing::info!(via = target, "joined the cluster");
                    return;
                }
            }
        }
        drop(h);
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// Per-connection push queues (confirms, deliveries), each drained by one
/// task so that the message handler never waits on a slow peer.
#[derive(Clone, Default)]
pub struct Pushes {
    inner: Arc<Mutex<HashMap<usize, PushQueue>>>,
}

impl Pushes {
    fn key(conn: &Client) -> usize {
        conn.id()
    }

    fn queue(&self, conn: &Client) -> PushQueue {
        let mut map = lock(&self.inner);
        let key = Self::key(conn);
        if let Some(tx) = map.get(&key) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<NodeRequest>();
        map.insert(key, tx.clone());
        let conn = conn.clone();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if conn.send(msg).await.is_err() {
                    break;
                }
            }
            lock(&inner).remove(&key);
        });
        tx
    }

    /// Queues a one-way message to `conn`.
    pub fn push(&self, conn: &Client, msg: NodeRequest) {
        let _ = self.queue(conn).send(msg);
    }

    /// The push queue of `conn`, for a consumer's sink.
    fn deliveries(&self, conn: &Client) -> PushQueue {
        self.queue(conn)
    }
}
