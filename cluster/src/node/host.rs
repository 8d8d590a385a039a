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
//! - **Gateways.** Requests from gateways go to the queue replica; only a
//!   leader serves them (others answer `NotLeader` with the leader's node
//!   id). A consumer attached by a gateway is a local [`Consumer`] whose
//!   sink pushes `Deliver` messages on that gateway's connection. When a
//!   gateway's connection closes and it does not come back within
//!   [`GATEWAY_GRACE`], its consumers are detached and their messages
//!   requeued (`gateway_down`) on every queue this node leads.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::Message as RaftMessage;
use serde_bytes::ByteBuf;
use sluice_storage::Store;
use tokio::sync::mpsc;

use super::{Membership, NodeRequest, NodeResponse, QueueResult, WireDelivery};
use crate::backend::{ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Queue, QueueId, QueueSpec};
use crate::consensus::{raft_id, FjallLogStore, GroupId, Transport, META_GROUP};
use crate::meta::replica::{Applied, MetaCommand, MetaOptions, MetaReplica, MetaResult, MetaState};
use crate::placement::{replication_factor, NodeId, Placement, PlacementKey};
use crate::replica::queue_sm::{ConsumerId, PublishId};
use crate::replicated::{ReplicaOptions, ReplicatedQueue};
use crate::rpc::{self, PeerInfo, Role, Secret};
use crate::{record, Error};

type Client = rpc::Client<NodeRequest, NodeResponse>;

/// How long a gateway may be disconnected before its consumers are
/// detached and their messages requeued.
pub const GATEWAY_GRACE: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---- transport -------------------------------------------------------------

/// Outgoing Raft messages of this node, one sender task per peer.
#[derive(Clone)]
pub struct PeerLinks {
    shared: Arc<LinksShared>,
}

struct LinksShared {
    me: String,
    secret: Secret,
    membership: Arc<Membership>,
    peers: Mutex<HashMap<u64, mpsc::UnboundedSender<(GroupId, Vec<ByteBuf>)>>>,
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

    fn sender(&self, to: u64) -> mpsc::UnboundedSender<(GroupId, Vec<ByteBuf>)> {
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

/// The replicas of one node and what gateways asked of them.
pub struct Host {
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
    /// Gateway id -> live connections from it.
    gateways: Mutex<HashMap<String, u32>>,
}

/// Pushes a consumer's deliveries on its gateway's connection.
struct GatewaySink {
    queue: u64,
    consumer: ConsumerId,
    tx: mpsc::UnboundedSender<(Option<Arc<Consumer>>, NodeRequest)>,
}

impl DeliverySink for GatewaySink {
    fn deliver(&self, consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        let msg = NodeRequest::Deliver {
            queue: self.queue,
            consumer: self.consumer.clone(),
            seq: delivery.msg_id,
            redelivered: delivery.redelivered,
            message: ByteBuf::from(record::encode(&delivery.message).to_vec()),
        };
        self.tx.send((Some(consumer.clone()), msg)).is_ok()
    }

    fn cancelled(&self, _consumer: &Arc<Consumer>) {
        let msg = NodeRequest::Cancelled { queue: self.queue, consumer: self.consumer.clone() };
        let _ = self.tx.send((None, msg));
    }
}

impl Host {
    /// Opens the metadata replica (founding or joining the group) and every
    /// queue replica this node has a log for, and starts following the
    /// metadata.
    pub fn start(
        node_id: String,
        addr: String,
        store: Store,
        secret: Secret,
        membership: Arc<Membership>,
        seeds: Vec<String>,
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
        let host = Arc::new(Host {
            node_id: node_id.clone(),
            raft,
            store,
            runtime,
            links,
            meta,
            queues: RwLock::new(HashMap::new()),
            names: Mutex::new(HashMap::new()),
            consumers: Mutex::new(HashMap::new()),
            gateways: Mutex::new(HashMap::new()),
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

    /// Queue replicas hosted here.
    pub fn replica_count(&self) -> usize {
        self.queues.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    fn queue(&self, id: u64) -> Option<Arc<ReplicatedQueue>> {
        self.queues.read().unwrap_or_else(|p| p.into_inner()).get(&id).cloned()
    }

    fn open_queue(&self, spec: QueueSpec, voters: Vec<u64>) {
        let id = spec.id.0;
        if self.queue(id).is_some() {
            return;
        }
        let opts = ReplicaOptions::new(self.raft, voters, Arc::new(self.links.clone()), format!("node:{}", self.node_id));
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
            tokio::spawn(async move {
                q.destroy().await;
            });
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
            other => QueueResult::Failed(other.to_string()),
        }
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
            NodeRequest::Detach { queue, consumer } => {
                let gone = lock(&self.consumers).remove(&(queue, consumer.clone()));
                if let Some(q) = self.queue(queue) {
                    if let Some(c) = gone {
                        Queue::cancel(q.as_ref(), &c.consumer);
                    }
                    q.detach(&consumer);
                }
            }
            other => {
                tracing::debug!(peer = %conn.peer().node_id, "unexpected one-way message: {other:?}");
            }
        }
    }

    /// Requests from gateways about queues.
    pub async fn request(self: &Arc<Self>, conn: &Client, req: NodeRequest, pushes: &Pushes) -> NodeResponse {
        match req {
            NodeRequest::Counts { queue } => match self.leading(queue) {
                Ok(q) => {
                    let (m, c) = q.counts_now();
                    NodeResponse::Counts(m, c)
                }
                Err(r) => NodeResponse::Queue(r),
            },
            NodeRequest::Attach { queue, consumer, no_ack, exclusive, prefetch, held } => {
                let q = match self.leading(queue) {
                    Ok(q) => q,
                    Err(r) => return NodeResponse::Queue(r),
                };
                let sink = Arc::new(GatewaySink { queue, consumer: consumer.clone(), tx: pushes.deliveries(conn) });
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
            NodeRequest::Meta { cmd } => match self.meta.propose(cmd).await {
                Ok((index, result)) => NodeResponse::MetaDone { index, result },
                Err(Error::NotLeader { leader }) => NodeResponse::Queue(self.not_leader(leader)),
                Err(e) => NodeResponse::Queue(QueueResult::Failed(e.to_string())),
            },
            NodeRequest::MetaSubscribe => {
                let (index, state, mut rx) = self.meta.subscribe_with_state();
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
            other => NodeResponse::Refused { reason: format!("not a request: {other:?}") },
        }
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
    let mut out = Vec::new();
    for vh in topo.vhosts() {
        for q in vh.queues.values() {
            let n = q.ids.len();
            for (i, id) in q.ids.iter().enumerate() {
                let key = if n == 1 {
                    PlacementKey::queue(vh.name.clone(), q.name.clone())
                } else {
                    PlacementKey::partition(vh.name.clone(), q.name.clone(), i as u32)
                };
                let name = if n == 1 { q.name.clone() } else { format!("{}#{i}", q.name) };
                out.push((QueueSpec { id: QueueId(*id), name, durable: q.durable, arguments: q.arguments.clone() }, key));
            }
        }
    }
    out
}

/// The replica set of a queue: its placement over `members`.
fn replica_set(members: &BTreeMap<String, String>, key: &PlacementKey, spec: &QueueSpec) -> Vec<String> {
    let placement = Placement::new(members.keys().map(|m| NodeId::new(m.clone())));
    let r = replication_factor(spec.arguments.get("x-quorum-initial-group-size").and_then(|v| v.as_i64()));
    placement.replicas(key, r).into_iter().map(|n| n.as_str().to_owned()).collect()
}

/// Follows the metadata as it is applied, on a copy of the state (so the
/// members at each entry are known): opens the replicas of created queues
/// this node is placed on, removes those of deleted queues.
async fn follow_meta(
    host: std::sync::Weak<Host>,
    mut index: u64,
    mut state: MetaState,
    mut rx: tokio::sync::broadcast::Receiver<Applied>,
) {
    loop {
        let applied = match rx.recv().await {
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
    fn on_applied(&self, applied: &Applied, state: &MetaState) {
        match applied {
            Applied::Command { cmd: MetaCommand::Topology(_), result: MetaResult::Topology(Ok(outcome)), .. } => {
                for q in &outcome.created {
                    let n = q.ids.len();
                    for (i, id) in q.ids.iter().enumerate() {
                        let key = if n == 1 {
                            PlacementKey::queue(q.vhost.clone(), q.name.clone())
                        } else {
                            PlacementKey::partition(q.vhost.clone(), q.name.clone(), i as u32)
                        };
                        let spec = QueueSpec {
                            id: QueueId(*id),
                            name: if n == 1 { q.name.clone() } else { format!("{}#{i}", q.name) },
                            durable: q.durable,
                            arguments: q.arguments.clone(),
                        };
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
            Applied::Command { cmd: MetaCommand::AddMember { id, .. }, .. } => self.links.learn(id),
            Applied::Reset { .. } => self.reconcile(state),
            _ => {}
        }
    }

    /// After a snapshot (or a lagging stream): drops the replicas of queues
    /// that no longer exist, and opens those of queues placed on this node
    /// that it does not host yet (created while it was away; with the
    /// placement over today's members, which is the creation-time one
    /// unless the members changed since).
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
                let voters = set.iter().map(|m| raft_id(m)).collect();
                self.open_queue(spec, voters);
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
    inner: Arc<Mutex<HashMap<usize, mpsc::UnboundedSender<(Option<Arc<Consumer>>, NodeRequest)>>>>,
}

impl Pushes {
    fn key(conn: &Client) -> usize {
        conn.id()
    }

    fn queue(&self, conn: &Client) -> mpsc::UnboundedSender<(Option<Arc<Consumer>>, NodeRequest)> {
        let mut map = lock(&self.inner);
        let key = Self::key(conn);
        if let Some(tx) = map.get(&key) {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, mut rx) = mpsc::unbounded_channel::<(Option<Arc<Consumer>>, NodeRequest)>();
        map.insert(key, tx.clone());
        let conn = conn.clone();
        let inner = self.inner.clone();
        tokio::spawn(async move {
            while let Some((consumer, msg)) = rx.recv().await {
                let sent = conn.send(msg).await.is_ok();
                if let Some(c) = consumer {
                    c.release_pending();
                }
                if !sent {
                    break;
                }
            }
            lock(&inner).remove(&key);
        });
        tx
    }

    /// Queues a one-way message to `conn`.
    pub fn push(&self, conn: &Client, msg: NodeRequest) {
        let _ = self.queue(conn).send((None, msg));
    }

    /// The push queue of `conn`, for a consumer's sink: a delivery
    /// releases its consumer's pending slot once handed to the connection.
    fn deliveries(&self, conn: &Client) -> mpsc::UnboundedSender<(Option<Arc<Consumer>>, NodeRequest)> {
        self.queue(conn)
    }
}
