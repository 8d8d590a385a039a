//! The protocol-neutral channel: executes [`Command`]s for one AMQP channel
//! (and, later, one STOMP session) and produces [`Reply`]s.
//!
//! It owns the channel's delivery tags, unacknowledged deliveries,
//! consumers, prefetch, publisher confirms and transaction buffer. Replies
//! that are not direct answers (deliveries, confirms, returns) go out
//! through the [`Outbox`]; deliveries come in from queues as [`ConnEvent`]s
//! on the connection's event queue, so that all channel state is touched by
//! the connection task only.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use sluice_cluster::backend::Getter;
use sluice_cluster::meta::auth::{Access, Matcher};
use sluice_cluster::{ChannelFlow, Consumer, Credit, Delivery, DeliverySink, Durable, Outcome, Queue, QueueMeter};
use sluice_codecs::amqp::reply_code as code;
use sluice_codecs::command::{Command, Message, Reply};
use tokio::sync::mpsc;

use crate::error::BrokerError;

/// What a permission check is about (names the resource in the refusal).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Exchange,
    Queue,
}
use crate::router::{ConnId, Dest, QueueDeclare, Router, VHost};

/// Where replies that are not direct answers go (deliveries, confirms,
/// returns, server-side cancels). `consumer` is set on deliveries so the
/// writer can give back the consumer's pending credit once written.
pub trait Outbox: Send + Sync {
    fn send(&self, channel: u16, reply: Reply, consumer: Option<Arc<Consumer>>);
}

/// Events from queues (and the channel's confirm task) to a connection task.
pub enum ConnEvent {
    Deliver { channel: u16, consumer: Arc<Consumer>, delivery: Delivery },
    Cancelled { channel: u16, consumer: Arc<Consumer> },
    /// A publisher confirm, for the channel instance `instance` only: a
    /// confirm must never reach a channel that was closed (and perhaps
    /// reopened under the same number) in the meantime.
    Confirm { channel: u16, instance: u64, reply: Reply },
}

/// Distinguishes successive channels that reuse a channel number.
static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The [`DeliverySink`] of every consumer of one channel.
pub struct ChannelSink {
    pub channel: u16,
    pub events: mpsc::UnboundedSender<ConnEvent>,
}

impl DeliverySink for ChannelSink {
    fn deliver(&self, consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
        self.events
            .send(ConnEvent::Deliver { channel: self.channel, consumer: consumer.clone(), delivery })
            .is_ok()
    }
    fn cancelled(&self, consumer: &Arc<Consumer>) {
        let _ = self.events.send(ConnEvent::Cancelled { channel: self.channel, consumer: consumer.clone() });
    }
}

/// What a channel knows about its connection.
pub struct SessionCtx {
    pub router: Arc<Router>,
    pub vhost: Arc<VHost>,
    pub conn_id: ConnId,
    pub user: String,
    pub outbox: Arc<dyn Outbox>,
    pub events: mpsc::UnboundedSender<ConnEvent>,
    /// The client understands server-sent basic.cancel.
    pub cancel_notify: bool,
    /// The server-wide consumer timeout (ms); queues and consumers may
    /// set their own (`x-consumer-timeout`).
    pub consumer_timeout_ms: Option<u64>,
    /// The connection's per-user and per-vhost usage counters.
    pub usage: crate::metrics::Usage,
    /// Most consumers on one channel (`consumer_max_per_channel`).
    pub consumer_max_per_channel: Option<u32>,
    /// Publisher flow control of the connection.
    pub flow: Flow,
}

/// Publisher flow control of one connection (RabbitMQ's credit flow, in
/// effect): the queues it published to that said they were
/// [`Queue::lagging`]. The session loop stops reading the connection's
/// socket while one of them still is; nothing read is dropped.
#[derive(Default)]
pub struct Flow {
    /// Some queue is noted (so the common case takes no lock).
    noted: std::sync::atomic::AtomicBool,
    queues: std::sync::Mutex<Vec<Arc<dyn Queue>>>,
    /// Counts the connection in `sluice_flow_connections` while held.
    held: std::sync::Mutex<Option<crate::metrics::Tracked>>,
}

impl Flow {
    fn note(&self, queue: &Arc<dyn Queue>) {
        let Ok(mut queues) = self.queues.lock() else { return };
        if !queues.iter().any(|q| q.id() == queue.id()) {
            queues.push(queue.clone());
        }
        self.noted.store(true, Ordering::Release);
    }

    /// True while a queue the connection published to is lagging; forgets
    /// those that caught up.
    pub fn holding(&self) -> bool {
        if !self.noted.load(Ordering::Acquire) {
            return false;
        }
        let holding = match self.queues.lock() {
            Ok(mut queues) => {
                queues.retain(|q| q.lagging());
                !queues.is_empty()
            }
            Err(_) => false,
        };
        if !holding {
            self.noted.store(false, Ordering::Release);
        }
        if let Ok(mut held) = self.held.lock() {
            if holding && held.is_none() {
                crate::metrics::FLOW_PAUSES.fetch_add(1, Ordering::Relaxed);
                *held = Some(crate::metrics::Tracked::new(&crate::metrics::FLOW_CONNECTIONS));
            } else if !holding {
                *held = None;
            }
        }
        holding
    }
}

struct Unacked {
    queue: Arc<dyn Queue>,
    msg_id: u64,
    consumer: Option<Arc<Consumer>>,
    /// When it is due (consumer timeout), with the timeout (ms).
    due: Option<(std::time::Instant, u64)>,
}

/// When a delivery made now with a consumer timeout of `ms` is due.
fn due_in(ms: Option<u64>) -> Option<(std::time::Instant, u64)> {
    ms.map(|ms| (std::time::Instant::now() + std::time::Duration::from_millis(ms), ms))
}

/// One client consumer: one backend consumer per partition of its queue
/// (one for a plain queue), sharing one prefetch window.
struct ConsumerRec {
    queue_name: String,
    /// Consumer timeout (ms) of its deliveries: the consumer's
    /// `x-consumer-timeout` argument, else the queue's, else the server's.
    timeout_ms: Option<u64>,
    parts: Vec<(Arc<dyn Queue>, Arc<Consumer>)>,
    /// Counts the consumer in `sluice_consumers` while it lives.
    _gauge: crate::metrics::Tracked,
}

impl ConsumerRec {
    /// The partition queue `consumer` belongs to, if it is one of ours.
    fn queue_of(&self, consumer: &Arc<Consumer>) -> Option<&Arc<dyn Queue>> {
        self.parts.iter().find(|(_, c)| Arc::ptr_eq(c, consumer)).map(|(q, _)| q)
    }
    fn cancel(&self) {
        for (q, c) in &self.parts {
            q.cancel(c);
        }
    }
    /// The channel is gone: the queues return everything the consumer
    /// holds.
    fn close(&self) {
        for (q, c) in &self.parts {
            q.close_consumer(c);
        }
    }
}

/// A session's permissions, compiled, re-read when users or permissions
/// change (the router's auth generation moved).
#[derive(Default)]
struct Perms {
    generation: Option<u64>,
    matcher: Option<Arc<Matcher>>,
    /// The last exchange published to and whether writing to it is
    /// allowed: most channels publish to one exchange.
    last_write: Option<(String, bool)>,
}

struct PendingConfirm {
    seq: u64,
    /// When the publish was read (publish-to-confirm latency).
    at: std::time::Instant,
    writes: Vec<Durable>,
    ack: bool,
}

enum TxOp {
    Publish { mandatory: bool, message: Message },
    /// Deliveries taken out of `unacked` when the ack/nack/reject arrived
    /// (as RabbitMQ does, so a repeated tag fails at once); settled at
    /// commit, put back at rollback.
    Settle { taken: Vec<(u64, Unacked)>, outcome: Outcome },
}

/// How many cancelled consumers a channel remembers until it closes.
const CANCELLED_KEPT: usize = 64;

/// One channel's state.
pub struct Channel {
    pub id: u16,
    /// Unique per channel instance (see [`ConnEvent::Confirm`]).
    pub instance: u64,
    ctx: Arc<SessionCtx>,
    next_tag: u64,
    unacked: BTreeMap<u64, Unacked>,
    /// By tag. A `BTreeMap`: a channel has a consumer or a few, and every
    /// delivery looks its consumer up, which SipHash made cost more than
    /// comparing a tag or two.
    consumers: BTreeMap<String, ConsumerRec>,
    flow: Arc<ChannelFlow>,
    consumer_prefetch: u32,
    /// Where the next basic.get on a partitioned queue starts.
    get_cursor: usize,
    /// The user's permissions in the vhost, as of an auth generation.
    perms: Perms,
    /// Queues this channel took messages from by basic.get (with acks):
    /// told when it closes.
    got_from: Vec<Arc<dyn Queue>>,
    /// Consumers cancelled while the channel stays open (the newest
    /// [`CANCELLED_KEPT`]): their queues are told when it closes, so that
    /// what they still hold (a settle lost with a failed leader) returns.
    cancelled: std::collections::VecDeque<(Arc<dyn Queue>, Arc<Consumer>)>,
    confirm: Option<(u64, mpsc::UnboundedSender<PendingConfirm>)>,
    tx: Option<Vec<TxOp>>,
    /// Counts the channel in `sluice_channels` while it lives.
    _gauge: crate::metrics::Tracked,
}

impl Channel {
    pub fn new(id: u16, ctx: Arc<SessionCtx>) -> Self {
        Channel {
            id,
            instance: NEXT_INSTANCE.fetch_add(1, Ordering::Relaxed),
            ctx,
            next_tag: 1,
            unacked: BTreeMap::new(),
            consumers: BTreeMap::new(),
            flow: Arc::new(ChannelFlow::default()),
            consumer_prefetch: 0,
            get_cursor: 0,
            perms: Perms::default(),
            got_from: Vec::new(),
            cancelled: std::collections::VecDeque::new(),
            confirm: None,
            tx: None,
            _gauge: crate::metrics::Tracked::new(&crate::metrics::CHANNELS),
        }
    }

    /// Publisher flow control: a queue this connection published to lags.
    pub fn flow_holding(&self) -> bool {
        self.ctx.flow.holding()
    }

    /// Remembers a cancelled consumer for [`Self::close`].
    fn keep_cancelled(&mut self, rec: &ConsumerRec) {
        for part in &rec.parts {
            if self.cancelled.len() >= CANCELLED_KEPT {
                self.cancelled.pop_front();
            }
            self.cancelled.push_back(part.clone());
        }
    }

    /// Who holds what this channel takes by basic.get.
    fn getter(&self) -> Getter {
        Getter { connection: self.ctx.conn_id, channel: self.id }
    }

    /// channel.flow: pause or resume deliveries.
    pub fn set_flow(&mut self, active: bool) {
        self.flow.paused.store(!active, Ordering::Release);
        if active {
            self.kick_all();
        }
    }

    fn kick_all(&self) {
        for rec in self.consumers.values() {
            for (q, _) in &rec.parts {
                q.kick();
            }
        }
    }

    /// RabbitMQ's permission check: `access` to the queue or exchange
    /// `name` (`kind`), else 403 ACCESS_REFUSED (a channel error).
    fn allow(&mut self, access: Access, kind: Resource, name: &str) -> Result<(), BrokerError> {
        let generation = self.ctx.router.auth_generation();
        if self.perms.generation != Some(generation) {
            self.perms = Perms {
                generation: Some(generation),
                matcher: self.ctx.router.permissions(&self.ctx.vhost.name, &self.ctx.user),
                last_write: None,
            };
        }
        let cached = match (&self.perms.last_write, access) {
            (Some((last, ok)), Access::Write) if kind == Resource::Exchange && last == name => Some(*ok),
            _ => None,
        };
        let ok = match cached {
            Some(ok) => ok,
            None => {
                let ok = self.perms.matcher.as_ref().is_some_and(|m| m.allows(access, name));
                if access == Access::Write && kind == Resource::Exchange {
                    self.perms.last_write = Some((name.to_owned(), ok));
                }
                ok
            }
        };
        if ok {
            return Ok(());
        }
        let shown = if name.is_empty() { "amq.default" } else { name };
        let kind = match kind {
            Resource::Exchange => "exchange",
            Resource::Queue => "queue",
        };
        Err(BrokerError::access_refused(format!(
            "access to {kind} '{shown}' in vhost '{}' refused for user '{}'",
            self.ctx.vhost.name, self.ctx.user
        )))
    }

    /// The permission checks a command needs (RabbitMQ's rabbit_channel).
    fn authorize(&mut self, cmd: &Command) -> Result<(), BrokerError> {
        match cmd {
            Command::ExchangeDeclare { name, passive: false, .. } | Command::ExchangeDelete { name, .. } => {
                self.allow(Access::Configure, Resource::Exchange, name)
            }
            Command::ExchangeBind { destination, source, .. } | Command::ExchangeUnbind { destination, source, .. } => {
                self.allow(Access::Write, Resource::Exchange, destination)?;
                self.allow(Access::Read, Resource::Exchange, source)
            }
            // A server-named queue is checked by its prefix.
            Command::QueueDeclare { name, passive: false, .. } => {
                self.allow(Access::Configure, Resource::Queue, if name.is_empty() { "amq.gen-" } else { name })
            }
            Command::QueueDelete { queue, .. } => self.allow(Access::Configure, Resource::Queue, queue),
            Command::QueueBind { queue, exchange, .. } | Command::QueueUnbind { queue, exchange, .. } => {
                self.allow(Access::Write, Resource::Queue, queue)?;
                self.allow(Access::Read, Resource::Exchange, exchange)
            }
            Command::QueuePurge { queue } | Command::Consume { queue, .. } | Command::Get { queue, .. } => {
                self.allow(Access::Read, Resource::Queue, queue)
            }
            Command::Publish { message, .. } => self.allow(Access::Write, Resource::Exchange, &message.exchange),
            _ => Ok(()),
        }
    }

    /// Executes one command. `Ok(Some(reply))` is the direct answer.
    /// Commands that change definitions run with the session's user as
    /// the actor of their audit events.
    pub async fn execute(&mut self, cmd: Command) -> Result<Option<Reply>, BrokerError> {
        let changes_definitions = matches!(
            cmd,
            Command::ExchangeDeclare { .. }
                | Command::ExchangeDelete { .. }
                | Command::ExchangeBind { .. }
                | Command::ExchangeUnbind { .. }
                | Command::QueueDeclare { .. }
                | Command::QueueBind { .. }
                | Command::QueueUnbind { .. }
                | Command::QueueDelete { .. }
                | Command::Cancel { .. }
        );
        if changes_definitions {
            let user = self.ctx.user.clone();
            crate::audit::as_user(user, self.execute_now(cmd)).await
        } else {
            self.execute_now(cmd).await
        }
    }

    async fn execute_now(&mut self, cmd: Command) -> Result<Option<Reply>, BrokerError> {
        self.authorize(&cmd)?;
        let ctx = self.ctx.clone();
        let router = &ctx.router;
        let vh = &ctx.vhost;
        let conn = ctx.conn_id;
        Ok(Some(match cmd {
            Command::ExchangeDeclare { name, kind, passive, durable, auto_delete, internal, arguments } => {
                router.declare_exchange(vh, &name, &kind, passive, durable, auto_delete, internal, arguments).await?;
                Reply::ExchangeDeclareOk
            }
            Command::ExchangeDelete { name, if_unused } => {
                router.delete_exchange(vh, &name, if_unused).await?;
                Reply::ExchangeDeleteOk
            }
            Command::ExchangeBind { destination, source, routing_key, arguments } => {
                router.bind(vh, conn, &source, Dest::Exchange(destination), &routing_key, arguments).await?;
                Reply::ExchangeBindOk
            }
            Command::ExchangeUnbind { destination, source, routing_key, arguments } => {
                router.unbind(vh, conn, &source, Dest::Exchange(destination), &routing_key, arguments).await?;
                Reply::ExchangeUnbindOk
            }
            Command::QueueDeclare { name, passive, durable, exclusive, auto_delete, arguments, nowait } => {
                let (queue, message_count, consumer_count) = router
                    .declare_queue(vh, conn, QueueDeclare { name, passive, durable, exclusive, auto_delete, arguments, nowait })
                    .await?;
                Reply::QueueDeclareOk { queue, message_count, consumer_count }
            }
            Command::QueueBind { queue, exchange, routing_key, arguments } => {
                router.bind(vh, conn, &exchange, Dest::Queue(queue), &routing_key, arguments).await?;
                Reply::QueueBindOk
            }
            Command::QueueUnbind { queue, exchange, routing_key, arguments } => {
                router.unbind(vh, conn, &exchange, Dest::Queue(queue), &routing_key, arguments).await?;
                Reply::QueueUnbindOk
            }
            Command::QueuePurge { queue } => {
                let entry = router.queue(vh, conn, &queue)?;
                let mut message_count = 0u32;
                for p in &entry.partitions {
                    message_count = message_count.saturating_add(p.purge().await?);
                }
                Reply::QueuePurgeOk { message_count }
            }
            Command::QueueDelete { queue, if_unused, if_empty } => {
                let message_count = router.delete_queue(vh, conn, &queue, if_unused, if_empty).await?;
                Reply::QueueDeleteOk { message_count }
            }
            Command::Publish { mandatory, immediate, message } => {
                if immediate {
                    return Err(BrokerError::connection(code::NOT_IMPLEMENTED, "immediate=true"));
                }
                self.check_publish(&message)?;
                match &mut self.tx {
                    Some(ops) => {
                        // RabbitMQ checks the exchange at publish time even in a transaction.
                        router.route(vh, &message.exchange, &message.routing_key, &message.properties)?;
                        ops.push(TxOp::Publish { mandatory, message });
                    }
                    None => {
                        let at = self.confirm.as_ref().map(|_| std::time::Instant::now());
                        let writes = self.publish(mandatory, message)?;
                        if let Some((seq, confirms)) = &mut self.confirm {
                            *seq += 1;
                            let at = at.unwrap_or_else(std::time::Instant::now);
                            let _ = confirms.send(PendingConfirm { seq: *seq, at, writes, ack: true });
                        }
                    }
                }
                return Ok(None);
            }
            Command::Consume { queue, consumer_tag, no_local: _, no_ack, exclusive, arguments } => {
                let entry = router.queue(vh, conn, &queue)?;
                let own_timeout = match arguments.get("x-consumer-timeout") {
                    None => None,
                    Some(v) => match v.as_i64() {
                        Some(ms) if ms > 0 => u64::try_from(ms).ok(),
                        _ => {
                            return Err(BrokerError::precondition(format!(
                                "invalid arg 'x-consumer-timeout' for consumer on {queue}: expected a positive integer"
                            )))
                        }
                    },
                };
                let timeout_ms = own_timeout
                    .or_else(|| entry.partitions.first().and_then(|q| q.consumer_timeout()))
                    .or(ctx.consumer_timeout_ms);
                let tag = if consumer_tag.is_empty() {
                    format!("amq.ctag-{}", uuid_like())
                } else {
                    consumer_tag
                };
                if self.consumers.contains_key(&tag) {
                    return Err(BrokerError::connection(
                        code::NOT_ALLOWED,
                        format!("attempt to reuse consumer tag '{tag}'"),
                    ));
                }
                if let Some(max) = ctx.consumer_max_per_channel {
                    if self.consumers.len() >= max as usize {
                        return Err(BrokerError::connection(
                            code::NOT_ALLOWED,
                            format!("reached maximum ({max}) of consumers per channel"),
                        ));
                    }
                }
                let sink: Arc<dyn sluice_cluster::DeliverySink> =
                    Arc::new(ChannelSink { channel: self.id, events: ctx.events.clone() });
                let credit = Credit::new(self.consumer_prefetch);
                let mut rec = ConsumerRec {
                    queue_name: queue.clone(),
                    timeout_ms: if no_ack { None } else { timeout_ms },
                    parts: Vec::with_capacity(entry.partitions.len()),
                    _gauge: crate::metrics::Tracked::new(&crate::metrics::CONSUMERS),
                };
                for q in &entry.partitions {
                    let consumer = Consumer::new(tag.clone(), no_ack, exclusive, credit.clone(), self.flow.clone(), sink.clone());
                    if let Err(e) = q.consume(consumer.clone()).await {
                        rec.cancel();
                        return Err(match e {
                            sluice_cluster::Error::ExclusiveConsumer => BrokerError::access_refused(format!(
                                "queue '{}' in vhost '{}' in exclusive use",
                                queue, vh.name
                            )),
                            other => other.into(),
                        });
                    }
                    rec.parts.push((q.clone(), consumer));
                }
                self.consumers.insert(tag.clone(), rec);
                Reply::ConsumeOk { consumer_tag: tag }
            }
            Command::Cancel { consumer_tag } => {
                if let Some(rec) = self.consumers.remove(&consumer_tag) {
                    rec.cancel();
                    self.keep_cancelled(&rec);
                    router.consumer_gone(vh, &rec.queue_name).await;
                }
                Reply::CancelOk { consumer_tag }
            }
            Command::Get { queue, no_ack } => {
                let entry = router.queue(vh, conn, &queue)?;
                // Partitions are tried in turn, starting after the one that
                // answered last time, so no partition is starved.
                let n = entry.partitions.len().max(1);
                let mut got = None;
                for i in 0..n {
                    let idx = (self.get_cursor + i) % n;
                    let Some(q) = entry.partitions.get(idx) else { continue };
                    if let Some(found) = q.get(no_ack, self.getter()).await? {
                        self.get_cursor = idx + 1;
                        got = Some((q.clone(), found));
                        break;
                    }
                }
                match got {
                    None => Reply::GetEmpty,
                    Some((q, (d, _))) => {
                        let message_count = entry.counts().await?.0;
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        count_delivery(q.meter(), &d);
                        self.ctx.usage.delivered(d.message.body.len());
                        if !no_ack {
                            if !self.got_from.iter().any(|g| g.id() == q.id()) {
                                self.got_from.push(q.clone());
                            }
                            let due = due_in(q.consumer_timeout().or(self.ctx.consumer_timeout_ms));
                            self.unacked.insert(tag, Unacked { queue: q, msg_id: d.msg_id, consumer: None, due });
                        }
                        let message = with_delivery_count(d.message, d.delivery_count);
                        Reply::GetOk { delivery_tag: tag, redelivered: d.redelivered, message_count, message }
                    }
                }
            }
            Command::Ack { delivery_tag, multiple } => {
                self.settle_or_buffer(delivery_tag, multiple, Outcome::Ack)?;
                return Ok(None);
            }
            Command::Nack { delivery_tag, multiple, requeue } => {
                self.settle_or_buffer(delivery_tag, multiple, outcome(requeue))?;
                return Ok(None);
            }
            Command::Reject { delivery_tag, requeue } => {
                self.settle_or_buffer(delivery_tag, false, outcome(requeue))?;
                return Ok(None);
            }
            Command::Recover { requeue } => {
                if !requeue {
                    return Err(BrokerError::connection(code::NOT_IMPLEMENTED, "requeue=false"));
                }
                let all: Vec<(u64, Unacked)> = std::mem::take(&mut self.unacked).into_iter().collect();
                self.settle_now(all, Outcome::Requeue);
                Reply::RecoverOk
            }
            Command::Qos { prefetch_size, prefetch_count, global } => {
                if prefetch_size != 0 {
                    return Err(BrokerError::connection(
                        code::NOT_IMPLEMENTED,
                        format!("prefetch_size!=0 ({prefetch_size})"),
                    ));
                }
                // RabbitMQ 3.x: global=false limits each new consumer,
                // global=true the whole channel.
                if global {
                    self.flow.prefetch.store(u32::from(prefetch_count), Ordering::Release);
                    self.kick_all();
                } else {
                    self.consumer_prefetch = u32::from(prefetch_count);
                }
                Reply::QosOk
            }
            Command::ConfirmSelect => {
                if self.tx.is_some() {
                    return Err(BrokerError::precondition("cannot switch from tx to confirm mode"));
                }
                if self.confirm.is_none() {
                    let (tx, rx) = mpsc::unbounded_channel();
                    tokio::spawn(confirm_task(rx, ctx.events.clone(), self.id, self.instance));
                    self.confirm = Some((0, tx));
                }
                Reply::ConfirmSelectOk
            }
            Command::TxSelect => {
                if self.confirm.is_some() {
                    return Err(BrokerError::precondition("cannot switch from confirm to tx mode"));
                }
                self.tx.get_or_insert_with(Vec::new);
                Reply::TxSelectOk
            }
            Command::TxCommit => {
                let Some(ops) = self.tx.as_mut().map(std::mem::take) else {
                    return Err(BrokerError::precondition("channel is not transactional"));
                };
                let mut writes = Vec::new();
                for op in ops {
                    match op {
                        TxOp::Publish { mandatory, message } => writes.extend(self.publish(mandatory, message)?),
                        TxOp::Settle { taken, outcome } => self.settle_now(taken, outcome),
                    }
                }
                wait_all(writes).await?;
                Reply::TxCommitOk
            }
            Command::TxRollback => {
                let Some(ops) = self.tx.as_mut().map(std::mem::take) else {
                    return Err(BrokerError::precondition("channel is not transactional"));
                };
                for op in ops {
                    if let TxOp::Settle { taken, .. } = op {
                        self.unacked.extend(taken);
                    }
                }
                Reply::TxRollbackOk
            }
        }))
    }

    /// RabbitMQ's user_id check: the property must name the logged-in user.
    fn check_publish(&self, message: &Message) -> Result<(), BrokerError> {
        if let Some(user_id) = &message.properties.user_id {
            if user_id != &self.ctx.user {
                return Err(BrokerError::precondition(format!(
                    "user_id property set to '{user_id}' but authenticated user was '{}'",
                    self.ctx.user
                )));
            }
        }
        if let Err(why) = sluice_cluster::message_ttl(message) {
            let expiration = message.properties.expiration.as_deref().unwrap_or_default();
            return Err(BrokerError::precondition(format!("invalid expiration '{expiration}': {why}")));
        }
        Ok(())
    }

    /// Routes and enqueues; returns the writes a confirm must wait for.
    fn publish(&mut self, mandatory: bool, message: Message) -> Result<Vec<Durable>, BrokerError> {
        let ctx = &self.ctx;
        let queues = ctx.router.route(&ctx.vhost, &message.exchange, &message.routing_key, &message.properties)?;
        ctx.usage.published(message.body.len());
        if queues.is_empty() {
            if mandatory {
                ctx.outbox.send(
                    self.id,
                    Reply::Return { reply_code: code::NO_ROUTE, reply_text: "NO_ROUTE".into(), message },
                    None,
                );
            }
            return Ok(Vec::new());
        }
        // x-max-message-size, as RabbitMQ's max_message_size (406).
        let size = message.body.len() as u64;
        if let Some(max) = queues.iter().filter_map(|q| q.max_message_size()).min().filter(|max| size > *max) {
            return Err(BrokerError::precondition(format!(
                "message size {size} is larger than configured max size {max}"
            )));
        }
        let mut writes = Vec::new();
        let last = queues.len() - 1;
        let mut message = Some(message);
        for (i, q) in queues.iter().enumerate() {
            let m = if i == last { message.take() } else { message.clone() };
            let Some(m) = m else { break };
            let published = q.publish(m);
            if q.lagging() {
                ctx.flow.note(q);
            }
            match published {
                Ok(Some(w)) => {
                    QueueMeter::add(&q.meter().published, 1);
                    writes.push(w);
                }
                Ok(None) => QueueMeter::add(&q.meter().published, 1),
                Err(sluice_cluster::Error::QueueDeleted) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(writes)
    }

    fn settle_or_buffer(&mut self, tag: u64, multiple: bool, outcome: Outcome) -> Result<(), BrokerError> {
        let taken = self.take_tags(tag, multiple)?;
        if let Some(ops) = &mut self.tx {
            ops.push(TxOp::Settle { taken, outcome });
            return Ok(());
        }
        self.settle_now(taken, outcome);
        Ok(())
    }

    /// Removes the deliveries an ack/nack/reject names (406 if unknown).
    fn take_tags(&mut self, tag: u64, multiple: bool) -> Result<Vec<(u64, Unacked)>, BrokerError> {
        if multiple {
            if tag == 0 {
                return Ok(std::mem::take(&mut self.unacked).into_iter().collect());
            }
            if !self.unacked.contains_key(&tag) {
                return Err(unknown_tag(tag));
            }
            let rest = self.unacked.split_off(&tag.saturating_add(1));
            let taken = std::mem::replace(&mut self.unacked, rest);
            return Ok(taken.into_iter().collect());
        }
        self.unacked.remove(&tag).map(|u| vec![(tag, u)]).ok_or_else(|| unknown_tag(tag))
    }

    /// Settles deliveries with their queues and gives prefetch credit back.
    fn settle_now(&mut self, taken: Vec<(u64, Unacked)>, outcome: Outcome) {
        let mut by_queue: Vec<(Arc<dyn Queue>, Vec<u64>)> = Vec::new();
        let mut kick = false;
        for (_, u) in taken {
            if let Some(c) = &u.consumer {
                kick |= c.release_unacked();
            }
            match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
                Some((_, ids)) => ids.push(u.msg_id),
                None => by_queue.push((u.queue, vec![u.msg_id])),
            }
        }
        for (q, ids) in by_queue {
            if outcome == Outcome::Ack {
                QueueMeter::add(&q.meter().acked, ids.len() as u64);
            }
            q.settle(&ids, outcome);
        }
        if kick {
            self.kick_all();
        }
    }

    /// The consumer timeout (ms) of the first unacknowledged delivery past
    /// it, if any: the connection closes the channel with 406 then.
    pub fn ack_timed_out(&self, now: std::time::Instant) -> Option<u64> {
        self.unacked.values().find_map(|u| u.due.filter(|(at, _)| *at <= now).map(|(_, ms)| ms))
    }

    /// A delivery pushed by a queue: assigns its delivery tag.
    pub fn on_delivery(&mut self, consumer: Arc<Consumer>, delivery: Delivery) -> Option<Reply> {
        let rec = self.consumers.get(&consumer.tag);
        let timeout_ms = rec.and_then(|r| r.timeout_ms);
        let queue = rec.and_then(|r| r.queue_of(&consumer)).cloned();
        let Some(queue) = queue else {
            if drop_delivery(&consumer, delivery) {
                self.kick_all();
            }
            return None;
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        count_delivery(queue.meter(), &delivery);
        self.ctx.usage.delivered(delivery.message.body.len());
        if !consumer.no_ack {
            self.unacked.insert(tag, Unacked { queue, msg_id: delivery.msg_id, consumer: Some(consumer.clone()), due: due_in(timeout_ms) });
        }
        Some(Reply::Deliver {
            consumer_tag: consumer.tag.clone(),
            delivery_tag: tag,
            redelivered: delivery.redelivered,
            message: with_delivery_count(delivery.message, delivery.delivery_count),
        })
    }

    /// The queue cancelled a consumer (queue deleted).
    pub fn on_cancelled(&mut self, consumer: &Arc<Consumer>) -> Option<Reply> {
        let live = self.consumers.get(&consumer.tag).is_some_and(|r| r.queue_of(consumer).is_some());
        if !live {
            return None;
        }
        // One basic.cancel for the client, whatever the number of partitions.
        if let Some(rec) = self.consumers.remove(&consumer.tag) {
            rec.cancel();
        }
        self.ctx.cancel_notify.then(|| Reply::ConsumerCancelled { consumer_tag: consumer.tag.clone() })
    }

    /// Tears the channel down: cancels consumers and requeues every
    /// unacknowledged delivery (channel.close, connection loss).
    pub async fn close(&mut self) {
        // No more deliveries to this channel's consumers (the requeues
        // below free their credit). Then the channel's own deliveries go
        // back, while their consumers still hold them: a single node may
        // apply a consumer's release at once and hand the messages to
        // another consumer, and a requeue sent after that would be taken
        // for the new holder's (a duplicate delivery).
        self.flow.paused.store(true, Ordering::Release);
        let mut all: Vec<(u64, Unacked)> = std::mem::take(&mut self.unacked).into_iter().collect();
        // Deliveries taken by an uncommitted transaction go back too.
        for op in self.tx.take().unwrap_or_default() {
            if let TxOp::Settle { taken, .. } = op {
                all.extend(taken);
            }
        }
        self.settle_now(all, Outcome::Requeue);
        let consumers: Vec<ConsumerRec> = std::mem::take(&mut self.consumers).into_values().collect();
        for rec in &consumers {
            rec.close();
        }
        // And whatever the queues still have this channel holding from
        // basic.get (settles lost with a failed leader).
        let getter = self.getter();
        for q in std::mem::take(&mut self.got_from) {
            q.close_getter(getter);
        }
        for (q, c) in std::mem::take(&mut self.cancelled) {
            q.close_consumer(&c);
        }
        for rec in consumers {
            self.ctx.router.consumer_gone(&self.ctx.vhost, &rec.queue_name).await;
        }
        self.confirm = None;
    }
}

/// A delivery whose consumer or channel is gone: put it back. Returns true
/// if that freed channel-wide credit other queues may be waiting for.
///
/// No-ack deliveries were settled by the queue when it sent them; like
/// messages RabbitMQ had already written to a cancelled consumer's socket,
/// they are not requeued.
pub fn drop_delivery(consumer: &Arc<Consumer>, delivery: Delivery) -> bool {
    consumer.release_pending();
    if consumer.no_ack {
        return false;
    }
    let freed = consumer.release_unacked();
    if let Some(q) = consumer.queue() {
        q.settle(&[delivery.msg_id], Outcome::Requeue);
    }
    freed
}

/// Waits for durable writes (a transaction's publishes). A storage failure
/// is a 506 RESOURCE_ERROR on the connection: the broker cannot keep what
/// the client asked it to keep.
async fn wait_all(writes: Vec<sluice_cluster::Durable>) -> Result<(), BrokerError> {
    for r in futures_util::future::join_all(writes).await {
        // x-overflow reject-publish: the message is dropped, as without
        // confirms.
        if matches!(r, Err(sluice_cluster::Error::QueueFull)) {
            continue;
        }
        r.map_err(|e| BrokerError::connection(code::RESOURCE_ERROR, format!("storage failed: {e}")))?;
    }
    Ok(())
}

fn outcome(requeue: bool) -> Outcome {
    if requeue {
        Outcome::Requeue
    } else {
        Outcome::Discard
    }
}

fn unknown_tag(tag: u64) -> BrokerError {
    BrokerError::precondition(format!("unknown delivery tag {tag}"))
}

/// Counts a delivery in its queue's meter.
/// Adds the `x-delivery-count` header (a long, as RabbitMQ's quorum
/// queues) to a message returned to its queue before: absent on a first
/// delivery, as there. STOMP maps it to a frame header like any other.
fn with_delivery_count(mut message: Message, count: u32) -> Message {
    if count > 0 {
        message
            .properties
            .headers
            .get_or_insert_with(Default::default)
            .insert("x-delivery-count", sluice_codecs::amqp::value::FieldValue::I64(i64::from(count)));
    }
    message
}

/// Counts a delivery in its queue's meter; a first delivery also in the
/// publish-to-deliver latency.
fn count_delivery(meter: &QueueMeter, delivery: &Delivery) {
    QueueMeter::add(&meter.delivered, 1);
    if delivery.redelivered {
        QueueMeter::add(&meter.redelivered, 1);
    } else {
        crate::metrics::record_deliver(delivery.enqueued_ms);
    }
}

fn uuid_like() -> String {
    format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

/// Sends publisher confirms in publish order, coalescing runs of ready
/// acks into one `multiple` ack. Only confirms already settled when their
/// turn comes join a run: before waiting for a publish that is not
/// durable yet, the run so far is sent (under a steady stream of publishes
/// there is always a next one, and waiting for it held every earlier
/// confirm back). They go through the connection task, which drops them if
/// the channel is gone by then.
async fn confirm_task(
    mut rx: mpsc::UnboundedReceiver<PendingConfirm>,
    events: mpsc::UnboundedSender<ConnEvent>,
    channel: u16,
    instance: u64,
) {
    let send = |reply: Reply| {
        let _ = events.send(ConnEvent::Confirm { channel, instance, reply });
    };
    async fn settled(p: PendingConfirm) -> (u64, bool) {
        let mut ok = p.ack;
        for r in futures_util::future::join_all(p.writes).await {
            match r {
                Ok(()) => {}
                // x-overflow reject-publish: a nack, nothing went wrong.
                Err(sluice_cluster::Error::QueueFull) => ok = false,
                Err(e) => {
                    tracing::error!(error = %e, "publish not durable; sending nack");
                    ok = false;
                }
            }
        }
        crate::metrics::record_confirm(p.at);
        (p.seq, ok)
    }
    // The run not sent yet: (last delivery tag, ack or nack, length).
    let mut run: Option<(u64, bool, u64)> = None;
    let flush = |run: &mut Option<(u64, bool, u64)>| {
        if let Some((last, ok, n)) = run.take() {
            send(Reply::Confirm { delivery_tag: last, multiple: n > 1, ack: ok });
        }
    };
    loop {
        let next = match rx.try_recv() {
            Ok(next) => next,
            Err(mpsc::error::TryRecvError::Empty) => {
                flush(&mut run);
                match rx.recv().await {
                    Some(next) => next,
                    None => return,
                }
            }
            Err(mpsc::error::TryRecvError::Disconnected) => return flush(&mut run),
        };
        let mut waiting = Box::pin(settled(next));
        let (seq, ok) = match futures_util::FutureExt::now_or_never(&mut waiting) {
            Some(done) => done,
            None => {
                flush(&mut run);
                waiting.await
            }
        };
        run = match run {
            Some((_, was, n)) if was == ok => Some((seq, ok, n + 1)),
            mut other => {
                flush(&mut other);
                Some((seq, ok, 1))
            }
        };
    }
}
