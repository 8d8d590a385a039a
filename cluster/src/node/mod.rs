//! `sluice node`: a storage node of the cluster.
//!
//! Today it opens (and locks) its data directory, loads the cluster secret,
//! serves the node protocol with the messages below and runs membership
//! and failure detection (`membership.rs`: nodes started with seeds find
//! each other and heartbeat each other). Replicas of queues and the
//! metadata group are added on this skeleton (see docs/cluster.md).

pub mod host;
pub mod membership;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sluice_storage::{Op, Store, StoreOptions};
use tokio::net::TcpListener;

pub use membership::{MemberInfo, MemberState, MemberView, Membership, MembershipOptions};

use crate::meta::replica::{Applied, MetaCommand, MetaResult};
use crate::replica::queue_sm::ConsumerId;
use crate::rpc::{self, Client, Handler, PeerInfo, Secret, Versioned};

/// Requests a node answers. Postcard encodes the variant index: new
/// variants go at the end.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// Who are you? (`sluice ctl status`, gateways checking their nodes.)
    Status,
    /// Liveness and discovery between nodes, every heartbeat interval:
    /// the sender (`from.id` must be the id it authenticated with) and
    /// every member it knows besides itself. Answered with
    /// [`NodeResponse::Heartbeat`] or [`NodeResponse::Refused`].
    Heartbeat { from: MemberInfo, members: Vec<MemberInfo> },
    /// The member table as this node sees it (`sluice ctl members`).
    Members,
    /// One-way, node to node: Raft messages of group `group`, each a
    /// protobuf-encoded `eraftpb::Message`.
    Raft { group: u64, msgs: Vec<serde_bytes::ByteBuf> },
    /// One-way, gateway to the queue's leader, handled in arrival order (so
    /// a channel's publishes stay in order): enqueue `message` (a
    /// [`crate::record`]) unless (`publisher`, `id`) was enqueued before.
    /// Answered by a one-way [`NodeRequest::Confirm`].
    Publish { queue: u64, publisher: String, id: u64, message: serde_bytes::ByteBuf },
    /// One-way, node to gateway: the outcome of a [`NodeRequest::Publish`].
    Confirm { queue: u64, publisher: String, id: u64, result: QueueResult },
    /// Request, gateway to leader: attach (or re-attach after a failover)
    /// a consumer; `held` are the seqs the gateway delivered to it and has
    /// not settled. `epoch` is new for every (re-)attach of the consumer
    /// and stamped on its deliveries: the gateway takes only those of the
    /// attach it last sent, since an earlier one's may have been requeued
    /// by this attach (they are not in `held`). Answered with `Queue(Ok)`
    /// or an error.
    Attach { queue: u64, consumer: ConsumerId, epoch: u64, no_ack: bool, exclusive: bool, prefetch: u32, held: Vec<u64> },
    /// One-way, gateway to leader: basic.cancel.
    Detach { queue: u64, consumer: ConsumerId },
    /// One-way, gateway to leader: ack / requeue / discard.
    Settle { queue: u64, consumer: ConsumerId, seqs: Vec<u64>, outcome: WireOutcome },
    /// One-way, leader to gateway: a message for a consumer.
    Deliver {
        queue: u64,
        consumer: ConsumerId,
        /// The `epoch` of the `Attach` this delivery is made under.
        epoch: u64,
        seq: u64,
        redelivered: bool,
        /// Returns before this delivery (`x-delivery-count`).
        delivery_count: u32,
        /// The leader's enqueue stamp (ms since the epoch; 0: unknown).
        enqueued_ms: u64,
        message: serde_bytes::ByteBuf,
    },
    /// One-way, leader to gateway: the queue cancelled the consumer.
    Cancelled { queue: u64, consumer: ConsumerId },
    /// Request, gateway to leader: basic.get. Answered with `Got`.
    Get { queue: u64, holder: ConsumerId, no_ack: bool },
    /// Request, gateway to leader: queue.purge. Answered with `Count`.
    Purge { queue: u64 },
    /// Request, gateway to leader: (ready, consumers). Answered with
    /// `Counts`; also how a gateway finds a queue's leader.
    Counts { queue: u64 },
    /// Request, gateway to the metadata leader: commit `cmd`. Answered
    /// with `MetaDone` (or `Queue(NotLeader)`).
    Meta { cmd: MetaCommand },
    /// Request, gateway to any node: the metadata state now (`MetaState`),
    /// then every entry applied after it as one-way `MetaApplied`
    /// messages, in order, on this connection.
    MetaSubscribe,
    /// One-way, node to gateway: the next applied metadata entry.
    MetaApplied(Box<Applied>),
    /// Request, node to a member: admit node `id` at `addr` to the
    /// metadata (member and voter). Answered `Queue(Ok)` by the leader.
    Join { id: String, addr: String },
    /// Request, `sluice ctl decommission` to any node (forwarded to the
    /// metadata leader): remove node `id` from the members, so that its
    /// queue replicas are recreated on the others, and from the metadata
    /// group. Answered `Queue(Ok)` once the removal is committed, `Refused`
    /// for an unknown id or when fewer than two members would remain.
    Decommission { id: String },
    /// Request: the queue replicas this node hosts (`sluice ctl queues`).
    /// Answered with `Replicas`.
    Replicas,
    /// Request, node to a queue's leader: its replica set. Answered with
    /// `Replicas` (one entry) by the leader, else `Queue(NotLeader)` or
    /// `Queue(NoSuchQueue)`.
    QueueConfig { queue: u64 },
    /// Request, gateway to leader: the queue's figures for metrics, as
    /// applied (no log round trip). Answered with `Stats`.
    Stats { queue: u64 },
    /// Request, node to the leader of `queue`: a dead letter of another
    /// queue ([`crate::dead_letter`]), deduplicated by (`publisher`, `id`).
    /// Answered `Queue(Ok)` once committed.
    DeadLetter { queue: u64, publisher: String, id: u64, message: serde_bytes::ByteBuf },
    /// One-way, gateway to leader: the consumer's channel is gone: detach
    /// it and requeue everything the queue has it holding (also messages
    /// whose settle was lost with a failed leader).
    Release { queue: u64, consumer: ConsumerId },
    /// Request, gateway to leader: `x-dead-letter-on-delete` before a
    /// delete: dead-letter every message. Answered with `Count` once they
    /// are all published.
    Retire { queue: u64 },
    /// Request, gateway to node: this node's resource alarms. Answered
    /// with `Alarms`.
    Alarms,
    /// One-way, gateway to leader: `n` more deliveries to `consumer`
    /// reached its client's socket. The leader counts a consumer's
    /// deliveries as pending until reported here, and stops at
    /// [`crate::backend::MAX_PENDING`]: a client that does not read holds
    /// the leader back instead of filling the gateway's memory. Reported
    /// in batches ([`crate::remote::WRITTEN_BATCH`]).
    Written { queue: u64, consumer: ConsumerId, n: u32 },
    /// One-way, leader to a gateway that publishes to `queue`: the queue
    /// lags (ready messages pile up while a consumer's client is behind),
    /// or no longer does. The gateway holds back its publishing
    /// connections while it lags, as a single node does.
    Lagging { queue: u64, lagging: bool },
}

impl Versioned for NodeRequest {}

/// Why a queue request was not carried out.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueueResult {
    Ok,
    /// Ask `leader` (a node id) instead, or find the leader if `None`.
    NotLeader { leader: Option<String> },
    /// The queue is not hosted on this node (not created yet, or deleted).
    NoSuchQueue,
    /// An exclusive consumer conflict.
    Exclusive,
    /// Anything else; the text explains.
    Failed(String),
    /// A publish the queue refused (`x-overflow` reject-publish).
    QueueFull,
}

/// How a delivery is settled, on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireOutcome {
    Ack,
    Requeue,
    Discard,
}

impl From<crate::Outcome> for WireOutcome {
    fn from(o: crate::Outcome) -> Self {
        match o {
            crate::Outcome::Ack => WireOutcome::Ack,
            crate::Outcome::Requeue => WireOutcome::Requeue,
            crate::Outcome::Discard => WireOutcome::Discard,
        }
    }
}

impl From<WireOutcome> for crate::Outcome {
    fn from(o: WireOutcome) -> Self {
        match o {
            WireOutcome::Ack => crate::Outcome::Ack,
            WireOutcome::Requeue => crate::Outcome::Requeue,
            WireOutcome::Discard => crate::Outcome::Discard,
        }
    }
}

/// A message handed out by basic.get: seq, redelivered, record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireDelivery {
    pub seq: u64,
    pub redelivered: bool,
    /// Returns before this delivery (`x-delivery-count`).
    pub delivery_count: u32,
    /// The leader's enqueue stamp (ms since the epoch; 0: unknown).
    pub enqueued_ms: u64,
    pub message: serde_bytes::ByteBuf,
}

/// Answers of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeResponse {
    Status(NodeStatus),
    /// The answering node and every other member it knows.
    Heartbeat { from: MemberInfo, members: Vec<MemberInfo> },
    /// The member table, this node included, sorted by id.
    Members(Vec<MemberView>),
    /// The request was not taken (a heartbeat from a second node with
    /// this node's id, from a stale incarnation, or not from a node).
    Refused { reason: String },
    /// A queue request's outcome when it has no other answer (`Attach`), or
    /// why it was not carried out.
    Queue(QueueResult),
    /// basic.get's answer: the message, if any, and how many are left.
    Got { delivery: Option<WireDelivery>, left: u32 },
    /// A count (purge).
    Count(u32),
    /// Ready messages and consumers.
    Counts(u32, u32),
    /// A metadata command committed at `index` with `result`.
    MetaDone { index: u64, result: MetaResult },
    /// The metadata at `index`.
    MetaState { index: u64, state: Box<crate::meta::replica::MetaState> },
    /// Queue replicas (answer to `Replicas` and `QueueConfig`).
    Replicas(Vec<ReplicaInfo>),
    /// A queue's figures (answer to `Stats`).
    Stats(crate::QueueStats),
    /// The node's resource alarms (answer to `Alarms`).
    Alarms { memory: bool, disk: bool },
}

/// One queue replica as its node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// The queue (group) id.
    pub queue: u64,
    /// The queue's name (`name#i` for a partition).
    pub name: String,
    /// The node hosting this replica.
    pub node: String,
    /// The leader this replica knows of (a node id).
    pub leader: Option<String>,
    /// The group's voters and learners as applied here (node ids).
    pub voters: Vec<String>,
    pub learners: Vec<String>,
}

impl Versioned for NodeResponse {}

/// A node's replication figures, for its metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplicationFigures {
    /// Queue replicas hosted here that lead their group.
    pub leading: u64,
    /// Queue replicas hosted here that do not (followers, candidates).
    pub following: u64,
    /// Over the queues led here: the most log entries a follower lacks
    /// (leader's last index minus the follower's matched index).
    pub max_lag: u64,
    /// Committed cluster members this node hears from (itself included).
    pub members_up: u64,
    /// Committed cluster members it does not hear from.
    pub members_down: u64,
    /// Whether this node leads the metadata group.
    pub leads_meta: bool,
}

/// A node's description of itself.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node_id: String,
    pub version: String,
    pub listen: String,
    pub seeds: Vec<String>,
    /// Milliseconds since the node started.
    pub uptime_ms: u64,
    /// Wall-clock start time, milliseconds since the Unix epoch.
    pub started_at_ms: u64,
    /// The cluster's committed members (from the metadata), sorted.
    pub members: Vec<String>,
    /// What this node leads: `meta` for the metadata group, then queue
    /// names.
    pub leading: Vec<String>,
    /// Queue replicas hosted here.
    pub replicas: u64,
}

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub id: String,
    pub data_dir: PathBuf,
    pub listen: String,
    /// The address other members should use for this node, when it differs
    /// from the bound one (a wildcard listen address, NAT). `None`: the
    /// bound address.
    pub advertise: Option<String>,
    pub seeds: Vec<String>,
    pub secret: Secret,
    /// Heartbeat interval and failure timeout.
    pub membership: MembershipOptions,
    /// The node's resource alarms, set by whoever watches its memory and
    /// disk (the `sluice node` process); gateways ask for them.
    pub alarms: Arc<NodeAlarms>,
}

/// A node's resource alarms (memory, free disk).
#[derive(Debug, Default)]
pub struct NodeAlarms {
    pub memory: std::sync::atomic::AtomicBool,
    pub disk: std::sync::atomic::AtomicBool,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr} for the node protocol: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot open data dir {}: {source}", .dir.display())]
    DataDir { dir: PathBuf, source: sluice_storage::Error },
    #[error("cannot open the replicas: {0}")]
    Host(String),
}

/// The meta key holding the node's last incarnation (u64 big-endian).
const INCARNATION_KEY: &[u8] = b"\0node/incarnation";

/// Picks this start's incarnation: above the one stored, and at least the
/// wall-clock milliseconds (so a node whose data dir was replaced still
/// starts above its previous life unless the clock went back), and
/// stores it durably before the node says anything.
fn next_incarnation(store: &Store, now_ms: u64) -> Result<u64, sluice_storage::Error> {
    let previous = store
        .list_meta(INCARNATION_KEY)?
        .into_iter()
        .find(|(k, _)| k == INCARNATION_KEY)
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    let incarnation = previous.saturating_add(1).max(now_ms);
    store
        .write(vec![Op::PutMeta { key: INCARNATION_KEY.to_vec(), value: incarnation.to_be_bytes().to_vec() }], true)
        .wait_blocking()?;
    Ok(incarnation)
}

struct NodeHandler {
    status: NodeStatus,
    started: Instant,
    membership: Arc<Membership>,
    host: Arc<host::Host>,
    pushes: host::Pushes,
    alarms: Arc<NodeAlarms>,
}

impl Handler<NodeRequest, NodeResponse> for NodeHandler {
    async fn handle(&self, conn: &Client<NodeRequest, NodeResponse>, req: NodeRequest) -> NodeResponse {
        match req {
            NodeRequest::Status => {
                let mut status = self.status.clone();
                status.uptime_ms = self.started.elapsed().as_millis() as u64;
                status.members = self.host.members();
                status.leading = self.host.led();
                status.replicas = self.host.replica_count() as u64;
                NodeResponse::Status(status)
            }
            NodeRequest::Heartbeat { from, members } => {
                match self.membership.on_heartbeat(conn.peer(), conn.peer_addr().ip(), from, members) {
                    Ok((from, members)) => NodeResponse::Heartbeat { from, members },
                    Err(e) => {
                        tracing::warn!(peer = %conn.peer().node_id, addr = %conn.peer_addr(), error = %e,
                            "membership: heartbeat refused");
                        NodeResponse::Refused { reason: e.to_string() }
                    }
                }
            }
            NodeRequest::Members => NodeResponse::Members(self.membership.view()),
            NodeRequest::Alarms => {
                use std::sync::atomic::Ordering::Relaxed;
                NodeResponse::Alarms { memory: self.alarms.memory.load(Relaxed), disk: self.alarms.disk.load(Relaxed) }
            }
            other => self.host.request(conn, other, &self.pushes).await,
        }
    }

    async fn message(&self, conn: &Client<NodeRequest, NodeResponse>, msg: NodeRequest) {
        self.host.message(conn, msg, &self.pushes).await;
    }

    fn connected(&self, conn: &Client<NodeRequest, NodeResponse>) {
        self.host.gateway_connected(conn);
    }
}

/// A node that is listening.
pub struct Node {
    /// The address actually bound (port 0 picks a free one).
    pub addr: SocketAddr,
    store: Store,
    membership: Arc<Membership>,
    host: Arc<host::Host>,
    serve: tokio::task::JoinHandle<()>,
    heartbeats: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Opens the data directory, binds the listener, starts serving and
    /// starts membership (contacting `seeds`).
    pub async fn start(options: NodeOptions) -> Result<Node, NodeError> {
        let listener = TcpListener::bind(&options.listen)
            .await
            .map_err(|source| NodeError::Listen { addr: options.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: options.listen.clone(), source })?;
        let started_at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let dir = options.data_dir.clone();
        let (store, incarnation) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&dir, StoreOptions::default())?;
            let incarnation = next_incarnation(&store, started_at_ms)?;
            Ok::<_, sluice_storage::Error>((store, incarnation))
        })
        .await
        .map_err(|e| NodeError::DataDir {
            dir: options.data_dir.clone(),
            source: sluice_storage::Error::InvalidOp(e.to_string()),
        })?
        .map_err(|source| NodeError::DataDir { dir: options.data_dir.clone(), source })?;
        let advertised = options.advertise.clone().unwrap_or_else(|| addr.to_string());
        let me = MemberInfo { id: options.id.clone(), addr: advertised.clone(), incarnation };
        let membership = Membership::new(me, options.secret.clone(), options.membership.clone());
        let host = {
            let (id, addr, store, secret, membership, seeds) = (
                options.id.clone(),
                advertised.clone(),
                store.clone(),
                options.secret.clone(),
                membership.clone(),
                options.seeds.clone(),
            );
            tokio::task::spawn_blocking(move || host::Host::start_with(id, addr, store, secret, membership, seeds, false))
                .await
                .map_err(|e| NodeError::Host(e.to_string()))?
                .map_err(|e| NodeError::Host(e.to_string()))?
        };
        let handler = NodeHandler {
            status: NodeStatus {
                node_id: options.id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                listen: addr.to_string(),
                seeds: options.seeds.clone(),
                uptime_ms: 0,
                started_at_ms,
                members: Vec::new(),
                leading: Vec::new(),
                replicas: 0,
            },
            started: Instant::now(),
            membership: membership.clone(),
            host: host.clone(),
            pushes: host::Pushes::default(),
            alarms: options.alarms.clone(),
        };
        let peer = PeerInfo::node(options.id.clone());
        let serve = tokio::spawn(rpc::serve(listener, options.secret.clone(), peer, handler));
        let heartbeats = tokio::spawn(membership.clone().run(options.seeds.clone()));
        Ok(Node { addr, store, membership, host, serve, heartbeats })
    }

    /// This node as members know it (id, address, incarnation).
    pub fn member_info(&self) -> MemberInfo {
        self.membership.me()
    }

    /// The member table as this node sees it.
    pub fn members(&self) -> Vec<MemberView> {
        self.membership.view()
    }

    /// Replication figures (metrics), while the node's host lives.
    pub fn replication_source(&self) -> impl Fn() -> Option<ReplicationFigures> + Send + Sync + 'static {
        let host = Arc::downgrade(&self.host);
        move || host.upgrade().map(|h| h.replication())
    }

    /// Stops heartbeats and serving, and closes storage (flushing it).
    pub async fn stop(self) -> Result<(), sluice_storage::Error> {
        self.heartbeats.abort();
        self.serve.abort();
        let _ = self.heartbeats.await;
        let _ = self.serve.await;
        self.host.close().await;
        let store = self.store;
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| sluice_storage::Error::InvalidOp(e.to_string()))?
    }
}

pub(crate) async fn ask(addr: &str, secret: &Secret, me: PeerInfo, req: NodeRequest) -> Result<NodeResponse, rpc::Error> {
    let (client, _incoming) = rpc::connect::<NodeRequest, NodeResponse>(addr, secret, me).await?;
    let resp = client.call(req).await;
    client.close();
    match resp? {
        NodeResponse::Refused { reason } => Err(rpc::Error::Refused { reason }),
        resp => Ok(resp),
    }
}

/// A standing link to one node for asking its resource alarms again and
/// again (a gateway polls every node each second; one connection each, so
/// that the node does not see a gateway come and go every second).
pub struct AlarmProbe {
    pub addr: String,
    secret: Secret,
    me: PeerInfo,
    link: Option<(Client<NodeRequest, NodeResponse>, rpc::Incoming<NodeRequest, NodeResponse>)>,
}

impl AlarmProbe {
    pub fn new(addr: String, secret: Secret, me: PeerInfo) -> Self {
        AlarmProbe { addr, secret, me, link: None }
    }

    /// The node's (memory, disk) alarms; reconnects when the link is gone.
    pub async fn ask(&mut self, timeout: std::time::Duration) -> Result<(bool, bool), rpc::Error> {
        if self.link.as_ref().is_none_or(|(c, _)| c.is_closed()) {
            let link = tokio::time::timeout(timeout, rpc::connect::<NodeRequest, NodeResponse>(&self.addr, &self.secret, self.me.clone()))
                .await
                .map_err(|_| rpc::Error::Timeout)??;
            self.link = Some(link);
        }
        let Some((client, _)) = &self.link else { return Err(rpc::Error::Timeout) };
        match client.call_timeout(NodeRequest::Alarms, timeout).await {
            Ok(NodeResponse::Alarms { memory, disk }) => Ok((memory, disk)),
            Ok(other) => Err(rpc::Error::Protocol(format!("unexpected answer to Alarms: {other:?}"))),
            Err(e) => {
                client.close();
                self.link = None;
                Err(e)
            }
        }
    }
}

/// Asks the node at `addr` for its status (used by `sluice ctl status`).
pub async fn status(addr: &str, secret: &Secret, me: PeerInfo) -> Result<NodeStatus, rpc::Error> {
    match ask(addr, secret, me, NodeRequest::Status).await? {
        NodeResponse::Status(status) => Ok(status),
        other => Err(rpc::Error::Protocol(format!("unexpected answer to Status: {other:?}"))),
    }
}

/// Asks the node at `addr` for its member table (used by `sluice ctl
/// members`).
pub async fn members(addr: &str, secret: &Secret, me: PeerInfo) -> Result<Vec<MemberView>, rpc::Error> {
    match ask(addr, secret, me, NodeRequest::Members).await? {
        NodeResponse::Members(rows) => Ok(rows),
        other => Err(rpc::Error::Protocol(format!("unexpected answer to Members: {other:?}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;

/// Asks the node at `addr` to decommission node `id` (`sluice ctl
/// decommission`); it forwards the request to the metadata leader.
pub async fn decommission(addr: &str, secret: &Secret, me: PeerInfo, id: &str) -> Result<(), rpc::Error> {
    match ask(addr, secret, me, NodeRequest::Decommission { id: id.to_owned() }).await? {
        NodeResponse::Queue(QueueResult::Ok) => Ok(()),
        NodeResponse::Queue(QueueResult::NotLeader { leader }) => Err(rpc::Error::Refused {
            reason: format!(
                "the metadata group has no reachable leader (last known: {}); try again",
                leader.as_deref().unwrap_or("none")
            ),
        }),
        NodeResponse::Queue(QueueResult::Failed(why)) => Err(rpc::Error::Refused { reason: why }),
        other => Err(rpc::Error::Protocol(format!("unexpected answer to Decommission: {other:?}"))),
    }
}

/// Asks the node at `addr` for the queue replicas it hosts (`sluice ctl
/// queues`).
pub async fn replicas(addr: &str, secret: &Secret, me: PeerInfo) -> Result<Vec<ReplicaInfo>, rpc::Error> {
    match ask(addr, secret, me, NodeRequest::Replicas).await? {
        NodeResponse::Replicas(rows) => Ok(rows),
        other => Err(rpc::Error::Protocol(format!("unexpected answer to Replicas: {other:?}"))),
    }
}
