//! [`RemoteBackend`]: the gateway's side of the cluster. It implements the
//! same [`Backend`]/[`Queue`] traits as the in-process backend by talking
//! to the nodes over the node protocol, so the router and the AMQP session
//! code do not change.
//!
//! - **Links.** One authenticated connection per node address (role
//!   gateway), opened on first use and again after it drops. A task per
//!   link reads what the node pushes (confirms, deliveries, cancellations)
//!   and hands it to the queue it names.
//! - **Leaders.** Each [`RemoteQueue`] sends to its queue's leader. It
//!   finds it by asking nodes for the queue's counts (a follower answers
//!   `NotLeader` with a hint, a node without the queue `NoSuchQueue`) and
//!   looks again when the leader's link drops or a node says it no longer
//!   leads.
//! - **Publishes** are one-way messages with a per-queue-handle publisher id
//!   and a growing number; the leader answers each with a `Confirm` once it
//!   is committed (durable on a majority). Until then the message stays in
//!   the handle's in-flight table; after a failover every in-flight publish
//!   is sent again, in order, to the new leader, whose state machine drops
//!   the ones it already has (same publisher and number). Nothing is
//!   confirmed that a majority does not hold, and nothing confirmed is lost.
//! - **Consumers** stay in the gateway (their credit, channel and sink);
//!   the leader gets an `Attach` with the consumer's prefetch and enforces
//!   it, pushing `Deliver`s. After a failover the handle re-attaches every
//!   consumer with the seqs it holds (delivered, not settled); the new
//!   leader requeues whatever else the old one had checked out to it.
//!   Settles made while no leader is known wait and go to the new one.
//! - **Attach epochs.** Every (re-)attach of a consumer gets a new epoch,
//!   taken together with its held list; the leader stamps it on the
//!   consumer's deliveries, and the handle drops (neither takes nor
//!   settles) a delivery of an older epoch: pushed before the leader saw
//!   the re-attach, it is not in the held list sent, so the leader
//!   requeues it, and taking it too would deliver it twice.
//! - **Order.** One task per queue handle (the driver) sends everything
//!   one-way to the leader, in the order the session produced it, and
//!   re-synchronises after a failover before sending anything new.
//!
//! Limits (see docs/cluster.md): a channel-wide prefetch (`basic.qos`
//! global) is not enforced across queues (RabbitMQ's quorum queues ignore
//! it too); deliveries to consumers without a prefetch are bounded only by
//! the leader's per-consumer pending window and TCP.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::Bytes;
use serde_bytes::ByteBuf;
use sluice_codecs::command::Message;
use tokio::sync::{mpsc, oneshot, watch};

use crate::backend::{ready, Backend, Consumer, Delivery, Durable, Outcome, Queue, QueueId, QueueSpec, Reply};
use crate::node::{NodeRequest, NodeResponse, QueueResult, WireOutcome};
use crate::replica::queue_sm::ConsumerId;
use crate::rpc::{self, Inbound, Incoming, PeerInfo, Secret};
use crate::{record, Error};

type Client = rpc::Client<NodeRequest, NodeResponse>;

/// How a gateway reaches the cluster.
#[derive(Clone, Debug)]
pub struct RemoteOptions {
    /// This gateway's id in the cluster: unique per process (include an
    /// incarnation), since nodes requeue a vanished gateway's messages.
    pub gateway_id: String,
    /// Node addresses to start from (`--nodes`).
    pub nodes: Vec<String>,
    pub secret: Secret,
    /// How long an operation waits for a queue's leader before failing.
    pub leader_timeout: Duration,
    /// Deadline of one request to a node.
    pub call_timeout: Duration,
}

impl RemoteOptions {
    pub fn new(gateway_id: String, nodes: Vec<String>, secret: Secret) -> Self {
        RemoteOptions {
            gateway_id,
            nodes,
            secret,
            leader_timeout: Duration::from_secs(15),
            call_timeout: Duration::from_secs(5),
        }
    }
}

/// The tag of a gateway's connection ids (their high 32 bits): the nodes
/// find a vanished gateway's exclusive queues by it. Never 0, so `sluice
/// serve`'s small connection ids never match a gateway.
pub fn owner_tag(gateway_id: &str) -> u32 {
    use std::hash::Hasher;
    let mut h = siphasher::sip::SipHasher13::new_with_keys(0x736c_7569_6365_2d6f, 0x776e_6572_2d74_6167);
    h.write(gateway_id.as_bytes());
    (h.finish() as u32).max(1)
}

/// The connection to one node address, opened lazily.
type LinkSlot = Arc<tokio::sync::Mutex<Option<Client>>>;

struct Cluster {
    opts: RemoteOptions,
    links: Mutex<HashMap<String, LinkSlot>>,
    /// Node id -> address, from the nodes' answers and the metadata.
    addrs: Mutex<BTreeMap<String, String>>,
    queues: Mutex<HashMap<u64, Weak<RemoteQueue>>>,
    /// Bytes of publishes not yet confirmed (backpressure).
    inflight_bytes: AtomicU64,
    /// Distinguishes consumers and publishers of this gateway.
    next_handle: AtomicU64,
    /// Pushes that are not about a queue (the metadata stream) go here.
    other: Mutex<Option<mpsc::UnboundedSender<NodeRequest>>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Cluster {
    /// Every address worth asking: the seeds and the nodes learned since.
    fn addresses(&self) -> Vec<String> {
        let mut all: Vec<String> = self.opts.nodes.clone();
        for addr in lock(&self.addrs).values() {
            if !all.contains(addr) {
                all.push(addr.clone());
            }
        }
        all
    }

    fn addr_of(&self, node_id: &str) -> Option<String> {
        lock(&self.addrs).get(node_id).cloned()
    }

    /// Records where a node is (from the metadata's member list).
    fn learn(&self, node_id: &str, addr: &str) {
        lock(&self.addrs).insert(node_id.to_owned(), addr.to_owned());
    }

    /// The link to `addr`, connecting if needed.
    async fn link(self: &Arc<Self>, addr: &str) -> Result<Client, Error> {
        let slot = lock(&self.links).entry(addr.to_owned()).or_default().clone();
        let mut guard = slot.lock().await;
        if let Some(c) = guard.as_ref() {
            if !c.is_closed() {
                return Ok(c.clone());
            }
        }
        let me = PeerInfo::gateway(self.opts.gateway_id.clone());
        let (client, incoming) = rpc::connect::<NodeRequest, NodeResponse>(addr, &self.opts.secret, me)
            .await
            .map_err(|e| Error::Unavailable(format!("node {addr}: {e}")))?;
        self.learn(&client.peer().node_id, addr);
        tokio::spawn(read_pushes(Arc::downgrade(self), client.clone(), incoming));
        tokio::spawn(watchdog(client.clone()));
        *guard = Some(client.clone());
        Ok(client)
    }

    fn queue(&self, id: u64) -> Option<Arc<RemoteQueue>> {
        lock(&self.queues).get(&id).and_then(Weak::upgrade)
    }
}

/// How long leader discovery waits for one node (connect, then answer).
const DISCOVERY_TIMEOUT: Duration = Duration::from_millis(500);

/// How often a link is checked, how long its node may take to answer, and
/// how many pings in a row it may leave unanswered before the link closes.
const PING_EVERY: Duration = Duration::from_millis(200);
const PING_TIMEOUT: Duration = Duration::from_millis(600);
const PING_MISSES: u32 = 2;

/// Closes a link whose node stops answering (a partition leaves the TCP
/// connection open but silent), so the queues led through it look for
/// their leader elsewhere: the gateway notices within about
/// `PING_MISSES * (PING_EVERY + PING_TIMEOUT)`. One slow answer is not
/// silence: a node busy with a 16 MiB message can take longer than one
/// timeout, and closing its link would send that message again.
async fn watchdog(client: Client) {
    let mut misses = 0;
    loop {
        tokio::time::sleep(PING_EVERY).await;
        if client.is_closed() {
            return;
        }
        match client.call_timeout(NodeRequest::Status, PING_TIMEOUT).await {
            Ok(_) => misses = 0,
            Err(rpc::Error::Timeout) => {
                misses += 1;
                if misses < PING_MISSES {
                    tracing::debug!(node = %client.peer().node_id, "node slow to answer a ping");
                    continue;
                }
                tracing::warn!(node = %client.peer().node_id, addr = %client.peer_addr(), "node stopped answering; link closed");
                client.close();
                return;
            }
            Err(_) => return,
        }
    }
}

/// Reads one link's pushes until it closes, then tells the queues led
/// through it to look for their leader again.
async fn read_pushes(cluster: Weak<Cluster>, client: Client, mut incoming: Incoming<NodeRequest, NodeResponse>) {
    while let Some(inbound) = incoming.recv().await {
        let Some(cluster) = cluster.upgrade() else { return };
        match inbound {
            Inbound::Message(msg) => on_push(&cluster, &client, msg),
            Inbound::Request { responder, .. } => {
                let _ = responder.respond(NodeResponse::Refused { reason: "gateways answer no requests".to_owned() }).await;
            }
        }
    }
    let Some(cluster) = cluster.upgrade() else { return };
    let queues: Vec<Arc<RemoteQueue>> = lock(&cluster.queues).values().filter_map(Weak::upgrade).collect();
    for q in queues {
        q.link_lost(&client);
    }
}

fn on_push(cluster: &Arc<Cluster>, from: &Client, msg: NodeRequest) {
    match msg {
        NodeRequest::Confirm { queue, publisher, id, result } => {
            if let Some(q) = cluster.queue(queue) {
                q.on_confirm(from, &publisher, id, result);
            }
        }
        NodeRequest::Deliver { queue, consumer, epoch, seq, redelivered, delivery_count, enqueued_ms, message } => match cluster.queue(queue) {
            Some(q) => q.on_deliver(from, consumer, epoch, seq, (redelivered, delivery_count, enqueued_ms), message),
            None => {
                // The handle is gone (queue deleted or gateway shutting
                // down): give the message back.
                let client = from.clone();
                tokio::spawn(async move {
                    let msg = NodeRequest::Settle { queue, consumer, seqs: vec![seq], outcome: WireOutcome::Requeue };
                    let _ = client.send(msg).await;
                });
            }
        },
        NodeRequest::Cancelled { queue, consumer } => {
            if let Some(q) = cluster.queue(queue) {
                q.on_cancelled(&consumer);
            }
        }
        NodeRequest::Lagging { queue, lagging } => {
            if let Some(q) = cluster.queue(queue) {
                // Only the leader's word counts: a deposed one's "lagging"
                // must not hold publishers the new leader would take.
                if q.leader.borrow().as_ref().is_some_and(|l| same(l, from)) {
                    q.lagging.store(lagging, Ordering::Release);
                }
            }
        }
        other => {
            if let Some(tx) = lock(&cluster.other).as_ref() {
                let _ = tx.send(other);
            }
        }
    }
}

/// The gateway's [`Backend`] on a cluster of nodes.
pub struct RemoteBackend {
    cluster: Arc<Cluster>,
}

impl RemoteBackend {
    pub fn new(opts: RemoteOptions) -> Arc<Self> {
        Arc::new(RemoteBackend {
            cluster: Arc::new(Cluster {
                opts,
                links: Mutex::new(HashMap::new()),
                addrs: Mutex::new(BTreeMap::new()),
                queues: Mutex::new(HashMap::new()),
                inflight_bytes: AtomicU64::new(0),
                next_handle: AtomicU64::new(1),
                other: Mutex::new(None),
            }),
        })
    }

    /// Where pushes that are not about a queue go (the metadata stream).
    pub fn set_push_handler(&self, tx: mpsc::UnboundedSender<NodeRequest>) {
        *lock(&self.cluster.other) = Some(tx);
    }

    /// Records a node's address (from the metadata's member list).
    pub fn learn_node(&self, node_id: &str, addr: &str) {
        self.cluster.learn(node_id, addr);
    }

    /// Forgets a node that left the cluster (decommissioned): it is no
    /// longer asked for leaders or the metadata.
    pub fn forget_node(&self, node_id: &str) {
        lock(&self.cluster.addrs).remove(node_id);
    }

    /// Every node address known.
    pub fn node_addresses(&self) -> Vec<String> {
        self.cluster.addresses()
    }

    /// The address of node `node_id`, if known.
    pub fn node_address(&self, node_id: &str) -> Option<String> {
        self.cluster.addr_of(node_id)
    }

    /// A request to the node at `addr`.
    pub async fn call(&self, addr: &str, req: NodeRequest) -> Result<NodeResponse, Error> {
        // A node cut off by a partition would hold the caller for the whole
        // connect timeout; callers try the next node instead.
        let client = tokio::time::timeout(Duration::from_secs(1), self.cluster.link(addr))
            .await
            .map_err(|_| Error::Unavailable(format!("node {addr}: no connection within 1 s")))??;
        client
            .call_timeout(req, self.cluster.opts.call_timeout)
            .await
            .map_err(|e| Error::Unavailable(format!("node {addr}: {e}")))
    }

    /// Resolves when the link to `addr` is closed (at once if there is
    /// none).
    pub async fn link_closed(&self, addr: &str) {
        let slot = lock(&self.cluster.links).get(addr).cloned();
        let client = match slot {
            Some(slot) => slot.lock().await.clone(),
            None => None,
        };
        if let Some(c) = client {
            c.closed().await;
        }
    }

    /// This gateway's id.
    pub fn gateway_id(&self) -> &str {
        &self.cluster.opts.gateway_id
    }
}

impl Backend for RemoteBackend {
    fn open_queue(&self, spec: QueueSpec) -> Result<Arc<dyn Queue>, Error> {
        if let Some(q) = self.cluster.queue(spec.id.0) {
            return Ok(q);
        }
        let q = RemoteQueue::start(self.cluster.clone(), spec);
        lock(&self.cluster.queues).insert(q.id.0, Arc::downgrade(&q));
        Ok(q)
    }

    /// The nodes delete a queue's replicas when they apply its deletion
    /// from the metadata log; the gateway only forgets its handle.
    fn delete_queue(&self, id: QueueId) -> Reply<u32> {
        // Its consumers on this gateway are told here (basic.cancel), as
        // the router applies the deletion.
        if let Some(q) = lock(&self.cluster.queues).remove(&id.0).and_then(|q| q.upgrade()) {
            let consumers: Vec<Attached> = std::mem::take(&mut q.lock().consumers).into_values().collect();
            for a in consumers {
                a.consumer.sink.cancelled(&a.consumer);
            }
        }
        ready(Ok(0))
    }

    fn backlog_bytes(&self) -> u64 {
        self.cluster.inflight_bytes.load(Ordering::Acquire)
    }

    fn shutdown(&self) -> Result<(), Error> {
        for slot in lock(&self.cluster.links).values() {
            if let Ok(guard) = slot.try_lock() {
                if let Some(c) = guard.as_ref() {
                    c.close();
                }
            }
        }
        Ok(())
    }
}

/// A publish waiting for its confirm.
struct InFlight {
    record: Bytes,
    done: Option<oneshot::Sender<Result<(), Error>>>,
    /// The leader generation ([`QState::generation`]) it was last sent in.
    sent_in: u64,
}

/// A consumer attached through this handle.
struct Attached {
    consumer: Arc<Consumer>,
    /// The epoch of the last `Attach` sent for it (0: none sent yet).
    epoch: u64,
    /// A no-ack consumer's latest deliveries, acked by this handle as they
    /// reached the session (the newest [`ACKED_MEMORY`]). An ack lost with
    /// its link would leave one held at the leader, which would requeue it
    /// at the next attach and deliver it twice: so each attach lists these
    /// as held, and the resync sends their acks again (the leader ignores
    /// what the consumer no longer holds).
    acked: VecDeque<u64>,
}

impl Attached {
    fn new(consumer: Arc<Consumer>) -> Self {
        Attached { consumer, epoch: 0, acked: VecDeque::new() }
    }

    /// An `Attach` for this consumer under a new epoch.
    fn attach_request(&mut self, queue: u64, id: &ConsumerId, held: Vec<u64>) -> NodeRequest {
        self.epoch += 1;
        // Always with acks at the leader: a no-ack consumer's delivery is
        // held there until this handle acks it, once it reached the
        // session. A delivery lost between the leader and this handle (a
        // link closed with it in a buffer) is then requeued by the next
        // attach instead of lost.
        let prefetch = if self.consumer.no_ack { 0 } else { self.consumer.credit.prefetch };
        NodeRequest::Attach {
            queue,
            consumer: id.clone(),
            epoch: self.epoch,
            no_ack: false,
            exclusive: self.consumer.exclusive,
            prefetch,
            held,
        }
    }

    /// Remembers a no-ack delivery acked by this handle.
    fn acked(&mut self, seq: u64) {
        if self.acked.len() == ACKED_MEMORY {
            self.acked.pop_front();
        }
        self.acked.push_back(seq);
    }
}

/// What becomes of a delivery the leader pushed.
#[derive(Debug)]
enum Accept {
    /// Goes to this consumer (and is held by it).
    Take(Arc<Consumer>),
    /// Made under an attach since replaced: dropped, not settled (the
    /// leader requeues it, as the held list of the new attach lacks it).
    Stale,
    /// The consumer is gone from this handle: given back to the queue.
    Unknown,
}

/// What the driver sends to the leader, in order.
enum Out {
    Publish(u64),
    Settle { consumer: ConsumerId, seqs: Vec<u64>, outcome: WireOutcome },
    Detach(ConsumerId),
    /// The consumer's channel is gone ([`NodeRequest::Release`]).
    Release(ConsumerId),
    /// Deliveries written to the consumer's socket ([`NodeRequest::Written`]).
    Written { consumer: ConsumerId, n: u32 },
    /// The leader (this link) is gone or no longer leads: find it again.
    /// With a generation when the news is a `NotLeader` answer to a
    /// publish sent in it: an answer to a publish sent before the driver
    /// last found a leader is old news (the publish went again to the
    /// leader found), and acting on it would start another resync, whose
    /// re-sent publishes may again meet old answers: with thousands of
    /// publishes in flight, a livelock of resyncs (seen in CI).
    LeaderLost(Option<Client>, Option<u64>),
    /// A request, answered in order with the one-way messages.
    Call { req: NodeRequest, deadline: tokio::time::Instant, done: oneshot::Sender<Result<NodeResponse, Error>> },
}

#[derive(Default)]
struct QState {
    next_id: u64,
    /// Counts the leaders the driver found (one per resync): a publish
    /// records the one it was sent in ([`InFlight::sent_in`]).
    generation: u64,
    inflight: BTreeMap<u64, InFlight>,
    consumers: BTreeMap<ConsumerId, Attached>,
    /// Seq -> the consumer holding it (delivered, not settled).
    held: HashMap<u64, ConsumerId>,
    /// Consumers whose channel closed lately: their release is sent again
    /// to every new leader for [`RELEASE_MEMORY`], since a one-way message
    /// to a leader that dies may be lost.
    released: std::collections::VecDeque<(std::time::Instant, ConsumerId)>,
    /// Channels that took messages by basic.get (with acks) through this
    /// handle: released when they close.
    got: HashSet<crate::backend::Getter>,
    /// Consumers cancelled lately whose channel is still open: a settle
    /// of theirs lost with a failed leader leaves messages held by them,
    /// returned when the channel closes (`close_consumer`). The newest
    /// [`CANCELLED_MEMORY`].
    cancelled: std::collections::VecDeque<(Weak<Consumer>, ConsumerId)>,
}

impl QState {
    /// A new `Attach` for consumer `id` (`None` if it is gone): a fresh
    /// epoch and the seqs it holds, under one lock with [`QState::accept`],
    /// so every delivery of an earlier attach is either in the held list
    /// sent (taken before) or of an older epoch (dropped from now on).
    fn attach_request(&mut self, queue: u64, id: &ConsumerId) -> Option<NodeRequest> {
        let mut held: Vec<u64> = self.held.iter().filter(|(_, h)| *h == id).map(|(s, _)| *s).collect();
        let a = self.consumers.get_mut(id)?;
        held.extend(a.acked.iter().copied());
        held.sort_unstable();
        Some(a.attach_request(queue, id, held))
    }

    /// Whether delivery `seq`, made under `epoch`, goes to `consumer`;
    /// if so it is held by it from now on (a no-ack consumer's until the
    /// session took it, see [`RemoteQueue::on_deliver`]).
    fn accept(&mut self, consumer: &ConsumerId, epoch: u64, seq: u64) -> Accept {
        let Some(a) = self.consumers.get(consumer) else { return Accept::Unknown };
        let target = a.consumer.clone();
        if a.epoch != epoch {
            return Accept::Stale;
        }
        self.held.insert(seq, consumer.clone());
        Accept::Take(target)
    }
}

/// How many cancelled consumers a handle remembers for `close_consumer`.
const CANCELLED_MEMORY: usize = 256;

/// Deliveries a consumer's writes are reported to its leader in
/// ([`NodeRequest::Written`]): well under [`crate::backend::MAX_PENDING`],
/// so what is left unreported never stalls the consumer.
pub const WRITTEN_BATCH: u32 = 64;

/// How many acks of no-ack deliveries a consumer's handle repeats to a
/// new leader ([`Attached::acked`]): more than a link's buffers can lose.
const ACKED_MEMORY: usize = 4096;

/// Most seqs the driver puts in one `Settle` when it joins consecutive
/// settles of one consumer.
const SETTLE_BATCH: usize = 1024;

/// How long a closed consumer's release is repeated to new leaders.
const RELEASE_MEMORY: Duration = Duration::from_secs(60);

/// One queue (or partition) of the cluster, as a gateway sees it.
pub struct RemoteQueue {
    id: QueueId,
    /// `x-max-message-size` of the queue.
    max_message_size: Option<u64>,
    consumer_timeout: Option<u64>,
    name: String,
    cluster: Arc<Cluster>,
    publisher: String,
    st: Mutex<QState>,
    out: mpsc::UnboundedSender<Out>,
    /// The leader's link, once known.
    leader: watch::Sender<Option<Client>>,
    /// The leader said the queue lags ([`NodeRequest::Lagging`]); cleared
    /// when it says otherwise or the leader changes.
    lagging: AtomicBool,
    meter: crate::QueueMeter,
}

impl std::fmt::Debug for RemoteQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteQueue").field("name", &self.name).field("id", &self.id).finish()
    }
}

impl Drop for RemoteQueue {
    fn drop(&mut self) {
        let st = self.st.get_mut().unwrap_or_else(|p| p.into_inner());
        for (_, f) in std::mem::take(&mut st.inflight) {
            self.cluster.inflight_bytes.fetch_sub(f.record.len() as u64, Ordering::AcqRel);
            if let Some(tx) = f.done {
                let _ = tx.send(Err(Error::QueueDeleted));
            }
        }
    }
}

impl RemoteQueue {
    /// Deliveries are taken from `leader` from now on (see `on_deliver`);
    /// whatever the previous one said about lagging no longer holds.
    fn set_leader(&self, leader: Option<Client>) {
        self.lagging.store(false, Ordering::Release);
        self.leader.send_replace(leader);
    }

    fn start(cluster: Arc<Cluster>, spec: QueueSpec) -> Arc<Self> {
        let handle = cluster.next_handle.fetch_add(1, Ordering::Relaxed);
        let (out, rx) = mpsc::unbounded_channel();
        let max_message_size = spec.max_message_size();
        let consumer_timeout = spec.consumer_timeout();
        let q = Arc::new(RemoteQueue {
            max_message_size,
            consumer_timeout,
            id: spec.id,
            name: spec.name,
            publisher: format!("{}/{handle}", cluster.opts.gateway_id),
            cluster,
            st: Mutex::new(QState { next_id: 1, ..QState::default() }),
            out,
            leader: watch::channel(None).0,
            lagging: AtomicBool::new(false),
            meter: crate::QueueMeter::default(),
        });
        tokio::spawn(drive(Arc::downgrade(&q), rx));
        q
    }

    fn lock(&self) -> MutexGuard<'_, QState> {
        lock(&self.st)
    }

    fn consumer_id(&self, tag: &str) -> ConsumerId {
        ConsumerId {
            gateway: self.cluster.opts.gateway_id.clone(),
            connection: self.cluster.next_handle.fetch_add(1, Ordering::Relaxed),
            channel: 0,
            tag: tag.to_owned(),
        }
    }

    /// Forgets an attached consumer and tells the leader: a detach
    /// (basic.cancel), or a release (its channel is gone, also repeated to
    /// later leaders for a while).
    fn detach_handle(&self, consumer: &Arc<Consumer>, release: bool) -> bool {
        let id = {
            let mut st = self.lock();
            let mut id = st.consumers.iter().find(|(_, a)| Arc::ptr_eq(&a.consumer, consumer)).map(|(id, _)| id.clone());
            if let Some(id) = &id {
                st.consumers.remove(id);
                if !release {
                    if st.cancelled.len() >= CANCELLED_MEMORY {
                        st.cancelled.pop_front();
                    }
                    st.cancelled.push_back((Arc::downgrade(consumer), id.clone()));
                }
            } else if release {
                // Cancelled earlier, its channel closing now.
                let at = st.cancelled.iter().position(|(c, _)| std::ptr::eq(c.as_ptr(), Arc::as_ptr(consumer)));
                id = at.and_then(|i| st.cancelled.remove(i)).map(|(_, id)| id);
            }
            if let (Some(id), true) = (&id, release) {
                st.released.push_back((std::time::Instant::now(), id.clone()));
            }
            id
        };
        let Some(id) = id else { return false };
        let _ = self.out.send(if release { Out::Release(id) } else { Out::Detach(id) });
        true
    }


    fn link_lost(&self, client: &Client) {
        let ours = self.leader.borrow().as_ref().is_some_and(|c| same(c, client));
        if ours {
            let _ = self.out.send(Out::LeaderLost(Some(client.clone()), None));
        }
    }

    fn on_confirm(&self, from: &Client, publisher: &str, id: u64, result: QueueResult) {
        if publisher != self.publisher {
            return;
        }
        let outcome = match result {
            QueueResult::Ok => Ok(()),
            QueueResult::NotLeader { .. } | QueueResult::NoSuchQueue => {
                // Sent again to the leader once found (already, if it was
                // sent in an earlier generation than the driver's).
                let sent_in = self.lock().inflight.get(&id).map(|f| f.sent_in);
                if let Some(generation) = sent_in {
                    let _ = self.out.send(Out::LeaderLost(Some(from.clone()), Some(generation)));
                }
                return;
            }
            QueueResult::Exclusive => Err(Error::ExclusiveConsumer),
            QueueResult::QueueFull => Err(Error::QueueFull),
            QueueResult::Failed(why) => Err(Error::Unavailable(why)),
        };
        let done = self.lock().inflight.remove(&id);
        if let Some(f) = done {
            self.cluster.inflight_bytes.fetch_sub(f.record.len() as u64, Ordering::AcqRel);
            if let Some(tx) = f.done {
                let _ = tx.send(outcome);
            }
        }
    }

    fn on_deliver(&self, from: &Client, consumer: ConsumerId, epoch: u64, seq: u64, flags: (bool, u32, u64), message: ByteBuf) {
        let (redelivered, delivery_count, enqueued_ms) = flags;
        // Only from the leader the consumers are attached at: a delivery
        // still in flight from a deposed leader (or sent before our
        // re-attach reached the new one) is not counted, so the held list
        // the new leader got stays the truth and the message cannot be
        // with two consumers at once. The new leader requeues it (no-ack
        // consumers' too: the leader holds their deliveries until acked).
        let from_leader = self.leader.borrow().as_ref().is_some_and(|l| same(l, from));
        if !from_leader {
            tracing::debug!(queue = %self.name, seq, node = %from.peer().node_id, link = from.id(), "delivery from a node that is not the leader dropped");
            return;
        }
        let accepted = self.lock().accept(&consumer, epoch, seq);
        let message = record::decode(&Bytes::from(message.into_vec()));
        // From the leader, but perhaps pushed before it handled our latest
        // re-attach on this same link: see `QState::accept`.
        let target = match accepted {
            Accept::Take(c) => Some(c),
            Accept::Stale => {
                tracing::debug!(queue = %self.name, seq, epoch, "delivery of a replaced attach dropped");
                return;
            }
            Accept::Unknown => None,
        };
        let (delivered, no_ack) = match (target, message) {
            (Some(c), Ok(message)) => {
                c.force_acquire();
                let d = Delivery { msg_id: seq, redelivered, delivery_count, enqueued_ms, message };
                (c.sink.deliver(&c, d), c.no_ack)
            }
            (_, Err(e)) => {
                tracing::error!(queue = %self.name, seq, error = %e, "undecodable delivery; requeued");
                (false, false)
            }
            (None, _) => (false, false),
        };
        if !delivered {
            self.lock().held.remove(&seq);
            let _ = self.out.send(Out::Settle { consumer, seqs: vec![seq], outcome: WireOutcome::Requeue });
        } else if no_ack {
            // With the session now (what becomes of it is the client's
            // no-ack bargain): acked at the leader, and remembered in case
            // the ack is lost with the link. Under the lock an attach takes
            // its held list with, so the seq is in one list or the other.
            let mut st = self.lock();
            if st.held.remove(&seq).is_some() {
                if let Some(a) = st.consumers.get_mut(&consumer) {
                    a.acked(seq);
                }
                let _ = self.out.send(Out::Settle { consumer, seqs: vec![seq], outcome: WireOutcome::Ack });
            }
        }
    }

    fn on_cancelled(&self, consumer: &ConsumerId) {
        let gone = self.lock().consumers.remove(consumer);
        if let Some(a) = gone {
            a.consumer.sink.cancelled(&a.consumer);
        }
    }

    /// A request to the leader, sent by the driver after everything the
    /// session sent before it (so a basic.get sees the channel's earlier
    /// publishes), and retried at the next leader when the one asked no
    /// longer leads.
    async fn call_leader(&self, req: NodeRequest) -> Result<NodeResponse, Error> {
        let (tx, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + self.cluster.opts.leader_timeout;
        self.out
            .send(Out::Call { req, deadline, done: tx })
            .map_err(|_| Error::ShuttingDown)?;
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }
}

/// The same connection (not merely the same node: a delivery still
/// arriving on a link the watchdog closed is not from the link the
/// consumers were re-attached on, even if both lead to one node).
fn same(a: &Client, b: &Client) -> bool {
    a.id() == b.id()
}

fn queue_error(r: QueueResult) -> Error {
    match r {
        QueueResult::Exclusive => Error::ExclusiveConsumer,
        QueueResult::Failed(why) => Error::Unavailable(why),
        other => Error::Unavailable(format!("{other:?}")),
    }
}

/// A request waiting in a driver: what, until when, who waits.
type PendingCall = (NodeRequest, tokio::time::Instant, oneshot::Sender<Result<NodeResponse, Error>>);

/// The driver of one queue handle: finds the leader, re-synchronises after
/// a failover, and sends one-way messages in order.
async fn drive(q: Weak<RemoteQueue>, mut rx: mpsc::UnboundedReceiver<Out>) {
    // Settles and detaches that could not be sent: sent after the resync.
    let mut backlog: Vec<NodeRequest> = Vec::new();
    let mut leader: Option<Client> = None;
    let mut hint: Option<String> = None;
    // A request waiting for a leader (it blocks everything behind it).
    let mut call: Option<PendingCall> = None;
    // A message taken from `rx` early (while joining settles), next to send.
    let mut next: Option<Out> = None;
    loop {
        if let Some((req, deadline, done)) = call.take() {
            if tokio::time::Instant::now() > deadline {
                let _ = done.send(Err(Error::Unavailable("no leader answered in time".to_owned())));
                continue;
            }
            if done.is_closed() {
                continue;
            }
            let Some(client) = leader.clone() else {
                call = Some((req, deadline, done));
                let Some(queue) = q.upgrade() else { return };
                leader = find_and_resync(&queue, hint.take(), &mut backlog).await;
                continue;
            };
            // An attach takes its epoch and held list as it is sent (each
            // time): a resync may have re-attached the consumer since the
            // session asked, and deliveries may be held under that one.
            let req = match (&req, q.upgrade()) {
                (NodeRequest::Attach { consumer, .. }, Some(queue)) => {
                    queue.lock().attach_request(queue.id.0, consumer).unwrap_or(req)
                }
                _ => req,
            };
            let timeout = deadline.saturating_duration_since(tokio::time::Instant::now()).min(Duration::from_secs(5));
            match client.call_timeout(req.clone(), timeout).await {
                Ok(NodeResponse::Queue(QueueResult::NotLeader { leader: l })) => {
                    hint = l;
                    leader = None;
                    call = Some((req, deadline, done));
                }
                Ok(NodeResponse::Queue(QueueResult::NoSuchQueue)) | Err(_) => {
                    tracing::debug!(link = client.id(), "call to the leader failed or timed out; looking again");
                    leader = None;
                    call = Some((req, deadline, done));
                    tokio::time::sleep(Duration::from_millis(25)).await;
                }
                Ok(resp) => {
                    let _ = done.send(Ok(resp));
                }
            }
            continue;
        }
        if leader.is_none() {
            let Some(queue) = q.upgrade() else { return };
            leader = find_and_resync(&queue, hint.take(), &mut backlog).await;
            if leader.is_none() {
                continue;
            }
        }
        let out = match next.take() {
            Some(out) => out,
            None => match rx.recv().await {
                Some(out) => out,
                None => return,
            },
        };
        let Some(queue) = q.upgrade() else { return };
        let Some(client) = leader.clone() else {
            next = Some(out);
            continue;
        };
        let msg = match out {
            Out::LeaderLost(who, generation) => {
                let current = generation.is_none_or(|g| g == queue.lock().generation);
                if current && who.as_ref().is_none_or(|w| same(w, &client)) {
                    tracing::debug!(queue = %queue.name, node = %client.peer().node_id, link = client.id(), "leader lost");
                    leader = None;
                    queue.set_leader(None);
                }
                continue;
            }
            Out::Publish(id) => {
                let record = {
                    let mut st = queue.lock();
                    let generation = st.generation;
                    st.inflight.get_mut(&id).map(|f| {
                        f.sent_in = generation;
                        f.record.clone()
                    })
                };
                let Some(record) = record else { continue };
                NodeRequest::Publish {
                    queue: queue.id.0,
                    publisher: queue.publisher.clone(),
                    id,
                    message: ByteBuf::from(record.to_vec()),
                }
            }
            Out::Settle { consumer, mut seqs, outcome } => {
                // Consecutive settles of one consumer (a no-ack consumer's
                // acks, one per delivery) go as one message.
                while seqs.len() < SETTLE_BATCH {
                    match rx.try_recv() {
                        Ok(Out::Settle { consumer: c, seqs: more, outcome: o }) if c == consumer && o == outcome => {
                            seqs.extend(more)
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                NodeRequest::Settle { queue: queue.id.0, consumer, seqs, outcome }
            }
            Out::Detach(consumer) => NodeRequest::Detach { queue: queue.id.0, consumer },
            Out::Release(consumer) => NodeRequest::Release { queue: queue.id.0, consumer },
            Out::Written { consumer, n } => {
                // Not kept for a later leader: a re-attach starts its
                // count afresh there.
                let _ = client.send(NodeRequest::Written { queue: queue.id.0, consumer, n }).await;
                continue;
            }
            Out::Call { req, deadline, done } => {
                call = Some((req, deadline, done));
                continue;
            }
        };
        if client.send(msg.clone()).await.is_err() {
            tracing::debug!(queue = %queue.name, link = client.id(), "send to the leader failed");
            if !matches!(msg, NodeRequest::Publish { .. }) {
                backlog.push(msg);
            }
            leader = None;
            queue.set_leader(None);
        }
    }
}

/// Finds the queue's leader (trying `hint` first), re-attaches the
/// consumers, sends the backlog and every in-flight publish, and leaves the
/// handle's leader watch on the link found (or empty). `None`, after a
/// short pause, if no leader answered this round.
async fn find_and_resync(queue: &Arc<RemoteQueue>, hint: Option<String>, backlog: &mut Vec<NodeRequest>) -> Option<Client> {
    let found = resync(queue, hint, backlog).await;
    if found.is_none() {
        // Deliveries are taken from nobody until a leader is found again.
        queue.set_leader(None);
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    found
}

async fn resync(queue: &Arc<RemoteQueue>, hint: Option<String>, backlog: &mut Vec<NodeRequest>) -> Option<Client> {
    let cluster = &queue.cluster;
    let started = std::time::Instant::now();
    let mut candidates = cluster.addresses();
    if let Some(addr) = hint.and_then(|h| cluster.addr_of(&h)) {
        candidates.retain(|a| a != &addr);
        candidates.insert(0, addr);
    }
    let mut found = None;
    let mut i = 0;
    while let Some(addr) = candidates.get(i).cloned() {
        i += 1;
        // A node cut off by a partition would hold the search for the whole
        // connect timeout: ask the next one instead.
        let Ok(Ok(client)) = tokio::time::timeout(DISCOVERY_TIMEOUT, cluster.link(&addr)).await else { continue };
        match client.call_timeout(NodeRequest::Counts { queue: queue.id.0 }, DISCOVERY_TIMEOUT).await {
            Ok(NodeResponse::Counts(..)) => {
                found = Some(client);
                break;
            }
            Ok(NodeResponse::Queue(QueueResult::NotLeader { leader: Some(id) })) => {
                if let Some(addr) = cluster.addr_of(&id) {
                    if !candidates[i..].contains(&addr) {
                        candidates.insert(i, addr);
                    }
                }
            }
            _ => {}
        }
    }
    let Some(client) = found else {
        tracing::trace!(queue = %queue.name, asked = i, "no leader found");
        return None;
    };
    let took = started.elapsed();
    tracing::debug!(queue = %queue.name, node = %client.peer().node_id, link = client.id(), took_ms = took.as_millis() as u64, "leader found");
    // Deliveries are taken from this leader from now on (see on_deliver),
    // and a publish's `NotLeader` counts only if sent from now on.
    queue.lock().generation += 1;
    queue.set_leader(Some(client.clone()));
    // Re-attach every consumer with what it holds, each under a new epoch
    // (a delivery still in flight from before is dropped, and requeued by
    // the leader, even on this same link).
    let attached: Vec<(ConsumerId, NodeRequest, Vec<u64>)> = {
        let mut st = queue.lock();
        let ids: Vec<ConsumerId> = st.consumers.keys().cloned().collect();
        ids.into_iter()
            .filter_map(|id| {
                let req = st.attach_request(queue.id.0, &id)?;
                let acked = st.consumers.get(&id).map(|a| a.acked.iter().copied().collect()).unwrap_or_default();
                Some((id, req, acked))
            })
            .collect()
    };
    for (id, req, acked) in attached {
        match client.call_timeout(req, cluster.opts.call_timeout).await {
            Ok(NodeResponse::Queue(QueueResult::Ok)) => {}
            Ok(NodeResponse::Queue(QueueResult::Exclusive)) => queue.on_cancelled(&id),
            _ => return None,
        }
        // A no-ack consumer's acks again (listed as held just now).
        if !acked.is_empty() {
            let ack = NodeRequest::Settle { queue: queue.id.0, consumer: id, seqs: acked, outcome: WireOutcome::Ack };
            if client.send(ack).await.is_err() {
                return None;
            }
        }
    }
    // What could not be sent, in the order the session produced it: a
    // closed consumer's acks before its release below, or the acked
    // messages would come back.
    for (sent, msg) in backlog.iter().enumerate() {
        if client.send(msg.clone()).await.is_err() {
            backlog.drain(..sent);
            return None;
        }
    }
    backlog.clear();
    // Closed consumers again: what the old leader did not apply of their
    // settles and release comes back to the queue.
    let released: Vec<ConsumerId> = {
        let mut st = queue.lock();
        while st.released.front().is_some_and(|(at, _)| at.elapsed() > RELEASE_MEMORY) {
            st.released.pop_front();
        }
        st.released.iter().map(|(_, id)| id.clone()).collect()
    };
    if !released.is_empty() {
        tracing::debug!(queue = queue.id.0, n = released.len(), "new leader: releasing closed consumers again");
    }
    for consumer in released {
        if client.send(NodeRequest::Release { queue: queue.id.0, consumer }).await.is_err() {
            return None;
        }
    }
    let inflight: Vec<(u64, Bytes)> = {
        let mut st = queue.lock();
        let generation = st.generation;
        st.inflight
            .iter_mut()
            .map(|(id, f)| {
                f.sent_in = generation;
                (*id, f.record.clone())
            })
            .collect()
    };
    for (id, record) in inflight {
        let msg = NodeRequest::Publish {
            queue: queue.id.0,
            publisher: queue.publisher.clone(),
            id,
            message: ByteBuf::from(record.to_vec()),
        };
        if client.send(msg).await.is_err() {
            return None;
        }
    }
    Some(client)
}

impl Queue for RemoteQueue {
    fn id(&self) -> QueueId {
        self.id
    }

    fn written(&self, consumer: &Consumer) {
        let Some(n) = consumer.count_written(WRITTEN_BATCH) else { return };
        let id = self
            .lock()
            .consumers
            .iter()
            .find(|(_, a)| std::ptr::eq(Arc::as_ptr(&a.consumer), consumer))
            .map(|(id, _)| id.clone());
        if let Some(consumer) = id {
            let _ = self.out.send(Out::Written { consumer, n });
        }
    }

    fn lagging(&self) -> bool {
        self.lagging.load(Ordering::Acquire)
    }

    fn meter(&self) -> &crate::QueueMeter {
        &self.meter
    }

    fn stats(&self) -> Reply<crate::QueueStats> {
        let Some(me) = self.cluster.queue(self.id.0) else {
            return ready(Err(Error::QueueDeleted));
        };
        Box::pin(async move {
            let queue = me.id.0;
            match me.call_leader(NodeRequest::Stats { queue }).await? {
                NodeResponse::Stats(s) => Ok(s),
                NodeResponse::Queue(r) => Err(queue_error(r)),
                other => Err(Error::Unavailable(format!("unexpected answer to Stats: {other:?}"))),
            }
        })
    }

    /// Always confirmable: the returned future resolves when a majority of
    /// the queue's replicas hold the message.
    fn max_message_size(&self) -> Option<u64> {
        self.max_message_size
    }

    fn consumer_timeout(&self) -> Option<u64> {
        self.consumer_timeout
    }

    fn publish(&self, message: Message) -> Result<Option<Durable>, Error> {
        let record = record::encode(&message);
        let (tx, rx) = oneshot::channel();
        let id = {
            let mut st = self.lock();
            let id = st.next_id;
            st.next_id += 1;
            self.cluster.inflight_bytes.fetch_add(record.len() as u64, Ordering::AcqRel);
            st.inflight.insert(id, InFlight { record, done: Some(tx), sent_in: 0 });
            id
        };
        let _ = self.out.send(Out::Publish(id));
        Ok(Some(Box::pin(async move { rx.await.unwrap_or(Err(Error::ShuttingDown)) })))
    }

    fn consume(&self, consumer: Arc<Consumer>) -> Reply<()> {
        let id = self.consumer_id(&consumer.tag);
        let Some(me) = self.cluster.queue(self.id.0) else {
            return ready(Err(Error::QueueDeleted));
        };
        // Stamped again by the driver as it is sent.
        let mut attached = Attached::new(consumer.clone());
        let attach = attached.attach_request(self.id.0, &id, Vec::new());
        self.lock().consumers.insert(id.clone(), attached);
        let as_queue: Arc<dyn Queue> = me.clone();
        consumer.attach(Arc::downgrade(&as_queue));
        consumer.report_written();
        Box::pin(async move {
            let answer = me.call_leader(attach).await;
            match answer {
                Ok(NodeResponse::Queue(QueueResult::Ok)) => Ok(()),
                other => {
                    me.lock().consumers.remove(&id);
                    Err(match other {
                        Ok(NodeResponse::Queue(r)) => queue_error(r),
                        Ok(r) => Error::Unavailable(format!("unexpected answer to Attach: {r:?}")),
                        Err(e) => e,
                    })
                }
            }
        })
    }

    fn cancel(&self, consumer: &Arc<Consumer>) -> bool {
        self.detach_handle(consumer, false)
    }

    fn close_consumer(&self, consumer: &Arc<Consumer>) -> bool {
        self.detach_handle(consumer, true)
    }

    fn close_getter(&self, getter: crate::backend::Getter) {
        let holder = getter.holder(&self.cluster.opts.gateway_id);
        {
            let mut st = self.lock();
            let took = st.got.remove(&getter);
            tracing::debug!(queue = self.id.0, ?getter, took, "basic.get channel closed");
            if !took {
                return;
            }
            st.released.push_back((std::time::Instant::now(), holder.clone()));
        }
        let _ = self.out.send(Out::Release(holder));
    }

    fn get(&self, no_ack: bool, getter: crate::backend::Getter) -> Reply<Option<(Delivery, u32)>> {
        let Some(me) = self.cluster.queue(self.id.0) else {
            return ready(Err(Error::QueueDeleted));
        };
        Box::pin(async move {
            let holder = getter.holder(&me.cluster.opts.gateway_id);
            let queue = me.id.0;
            // A Get whose answer is lost (link closed, timeout) is sent
            // again, and the first one may have been applied: so every
            // Get holds what it takes (`no_ack` ones are acked below,
            // once the message is here), and the channel's close releases
            // the holder whatever it took. An auto-ack Get retried that
            // way cannot lose a message.
            me.lock().got.insert(getter);
            let answer = me.call_leader(NodeRequest::Get { queue, holder: holder.clone(), no_ack: false }).await?;
            match answer {
                NodeResponse::Got { delivery: None, .. } => Ok(None),
                NodeResponse::Got { delivery: Some(d), left } => {
                    let message = record::decode(&Bytes::from(d.message.into_vec()));
                    if no_ack {
                        let _ = me.out.send(Out::Settle { consumer: holder, seqs: vec![d.seq], outcome: WireOutcome::Ack });
                    } else {
                        me.lock().held.insert(d.seq, holder);
                    }
                    let message = message?;
                    Ok(Some((
                        Delivery {
                            msg_id: d.seq,
                            redelivered: d.redelivered,
                            delivery_count: d.delivery_count,
                            enqueued_ms: d.enqueued_ms,
                            message,
                        },
                        left,
                    )))
                }
                NodeResponse::Queue(r) => Err(queue_error(r)),
                other => Err(Error::Unavailable(format!("unexpected answer to Get: {other:?}"))),
            }
        })
    }

    fn settle(&self, msg_ids: &[u64], outcome: Outcome) {
        let mut by_holder: BTreeMap<ConsumerId, Vec<u64>> = BTreeMap::new();
        {
            let mut st = self.lock();
            for seq in msg_ids {
                if let Some(holder) = st.held.remove(seq) {
                    by_holder.entry(holder).or_default().push(*seq);
                }
            }
        }
        for (consumer, seqs) in by_holder {
            let _ = self.out.send(Out::Settle { consumer, seqs, outcome: outcome.into() });
        }
    }

    fn purge(&self) -> Reply<u32> {
        let Some(me) = self.cluster.queue(self.id.0) else {
            return ready(Err(Error::QueueDeleted));
        };
        Box::pin(async move {
            let queue = me.id.0;
            match me.call_leader(NodeRequest::Purge { queue }).await? {
                NodeResponse::Count(n) => Ok(n),
                NodeResponse::Queue(r) => Err(queue_error(r)),
                other => Err(Error::Unavailable(format!("unexpected answer to Purge: {other:?}"))),
            }
        })
    }

    fn retire(self: Arc<Self>) -> Reply<u32> {
        let Some(me) = self.cluster.queue(self.id.0) else {
            return ready(Err(Error::QueueDeleted));
        };
        Box::pin(async move {
            let queue = me.id.0;
            match me.call_leader(NodeRequest::Retire { queue }).await? {
                NodeResponse::Count(n) => Ok(n),
                NodeResponse::Queue(r) => Err(queue_error(r)),
                other => Err(Error::Unavailable(format!("unexpected answer to Retire: {other:?}"))),
            }
        })
    }

    fn counts(&self) -> Reply<(u32, u32)> {
        let Some(me) = self.cluster.queue(self.id.0) else {
            return ready(Err(Error::QueueDeleted));
        };
        Box::pin(async move {
            let queue = me.id.0;
            match me.call_leader(NodeRequest::Counts { queue }).await? {
                NodeResponse::Counts(m, c) => Ok((m, c)),
                NodeResponse::Queue(r) => Err(queue_error(r)),
                other => Err(Error::Unavailable(format!("unexpected answer to Counts: {other:?}"))),
            }
        })
    }

    /// The leader schedules deliveries against the prefetch it was given;
    /// credit freed here reaches it with the settle.
    fn kick(&self) {}
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests may panic
mod tests;
