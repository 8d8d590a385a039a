//! The interface between the router (in the gateway) and wherever queues
//! live: `sluice serve` plugs in [`crate::embedded::Embedded`] (a cluster of
//! one in-process node), `sluice gateway` [`crate::remote::RemoteBackend`]
//! (nodes over the network); the router and the sessions do not change.
//!
//! Invariant: nothing here mentions a wire protocol; messages are the
//! protocol-neutral [`Message`] of the command model.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use sluice_codecs::command::{Arguments, Message};

use crate::Error;

/// Resolves once a write is durable (or failed).
pub type Durable = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'static>>;

/// The answer of a queue operation that may need a round trip (a remote
/// queue, or a replicated one that must commit first).
pub type Reply<T> = Pin<Box<dyn Future<Output = Result<T, Error>> + Send + 'static>>;

/// A [`Reply`] that is already there.
pub fn ready<T: Send + 'static>(value: Result<T, Error>) -> Reply<T> {
    Box::pin(std::future::ready(value))
}

/// Stable identity of a queue, chosen at creation and stored with its
/// definition. A queue re-created under the same name gets a new id, so old
/// messages can never reappear in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(pub u64);

/// The channel a basic.get delivery is held by (until it is settled, or
/// the channel closes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Getter {
    /// The gateway's connection id.
    pub connection: u64,
    /// The channel number.
    pub channel: u16,
}

impl Getter {
    /// The holder id a queue keeps for it.
    pub fn holder(self, gateway: &str) -> crate::replica::queue_sm::ConsumerId {
        crate::replica::queue_sm::ConsumerId {
            gateway: gateway.to_owned(),
            connection: self.connection,
            channel: self.channel,
            tag: "basic.get".to_owned(),
        }
    }
}

/// What the backend needs to know to create or open a queue.
#[derive(Clone, Debug)]
pub struct QueueSpec {
    pub id: QueueId,
    /// The queue's vhost (dead letters are routed in it).
    pub vhost: String,
    /// The queue's name (a partition's name for a partitioned queue): in
    /// logs, metrics and `x-death` headers.
    pub name: String,
    /// Durable queues keep persistent messages across restarts.
    pub durable: bool,
    /// The x-arguments given at declare time.
    pub arguments: Arguments,
}

impl QueueSpec {
    fn arg_u64(&self, name: &str) -> Option<u64> {
        self.arguments.get(name).and_then(|v| v.as_i64()).and_then(|n| u64::try_from(n).ok())
    }

    /// The queue state machine's limits from the declare arguments
    /// (`x-max-length`, `x-max-length-bytes`, `x-overflow`,
    /// `x-message-ttl`, `x-max-priority`, `x-delivery-limit`). The metadata validated them at declare time;
    /// anything else is ignored here.
    pub fn limits(&self) -> crate::replica::queue_sm::Limits {
        use crate::replica::queue_sm::{Limits, Overflow};
        let overflow = match self.arguments.get("x-overflow").and_then(|v| v.as_str()) {
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDlx,
            _ => Overflow::DropHead,
        };
        Limits {
            max_length: self.arg_u64("x-max-length"),
            max_length_bytes: self.arg_u64("x-max-length-bytes"),
            overflow,
            message_ttl: self.arg_u64("x-message-ttl"),
            max_priority: self.arg_u64("x-max-priority").map(|n| u8::try_from(n).unwrap_or(u8::MAX)),
            delivery_limit: self.arg_u64("x-delivery-limit").map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            dead_letter: crate::dead_letter::Target::of(&self.arguments).is_some(),
            visibility_timeout: self.arg_u64("x-visibility-timeout"),
            dedup_window: self
                .arguments
                .get("x-message-deduplication")
                .and_then(|v| v.as_bool())
                .filter(|on| *on)
                .map(|_| self.arg_u64("x-deduplication-window-ms").unwrap_or(DEFAULT_DEDUP_WINDOW_MS)),
            strict_window: (self.arguments.get("x-ordering").and_then(|v| v.as_str()) == Some("strict"))
                .then(|| self.arg_u64("x-ordering-window-ms").unwrap_or(DEFAULT_ORDERING_WINDOW_MS)),
        }
    }

    /// `x-max-message-size`: larger publishes are refused (406).
    pub fn max_message_size(&self) -> Option<u64> {
        self.arg_u64("x-max-message-size")
    }

    /// `x-consumer-timeout` (ms): a delivery unacknowledged this long
    /// closes its channel (406), as in RabbitMQ.
    pub fn consumer_timeout(&self) -> Option<u64> {
        self.arg_u64("x-consumer-timeout")
    }

    /// `x-dead-letter-on-delete: true` with a dead-letter exchange: the
    /// messages left when the queue is deleted or expires are
    /// dead-lettered (reason `queue_deleted`) instead of dropped.
    pub fn dead_letter_on_delete(&self) -> bool {
        dead_letter_on_delete(&self.arguments)
    }

    /// `x-expires` (ms): the queue is deleted after being unused this long.
    pub fn expires(&self) -> Option<u64> {
        self.arg_u64("x-expires")
    }
}

/// Whether a queue declared with `arguments` dead-letters the messages
/// left when it is deleted (`x-dead-letter-on-delete: true` and a
/// dead-letter exchange).
pub fn dead_letter_on_delete(arguments: &Arguments) -> bool {
    arguments.get("x-dead-letter-on-delete").and_then(|v| v.as_bool()) == Some(true)
        && crate::dead_letter::Target::of(arguments).is_some()
}

/// The deduplication window of a queue with `x-message-deduplication`
/// but no `x-deduplication-window-ms`: five minutes, as SQS's.
pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 300_000;

/// The ordering window of an `x-ordering: strict` queue without
/// `x-ordering-window-ms`.
pub const DEFAULT_ORDERING_WINDOW_MS: u64 = 100;

/// A message's own TTL: its `expiration` property, a string of
/// milliseconds as RabbitMQ reads it. `Err` carries RabbitMQ's reason
/// (`no_integer`, `{value_negative,N}`) for the 406 the channel sends.
pub fn message_ttl(message: &Message) -> Result<Option<u64>, String> {
    let Some(text) = message.properties.expiration.as_deref() else { return Ok(None) };
    match text.parse::<i64>() {
        Ok(n) if n < 0 => Err(format!("{{value_negative,{n}}}")),
        Ok(n) => Ok(u64::try_from(n).ok()),
        Err(_) => Err("no_integer".to_owned()),
    }
}

/// One message handed to a consumer or to basic.get.
#[derive(Clone, Debug)]
pub struct Delivery {
    /// Queue-local message id, used to settle the delivery.
    pub msg_id: u64,
    /// True if the message was delivered before.
    pub redelivered: bool,
    /// How often the message was returned to its queue before (requeued,
    /// or its consumer's channel gone): the `x-delivery-count` header.
    pub delivery_count: u32,
    /// When the queue's leader proposed the message's enqueue (its wall
    /// clock, ms since the epoch; 0: unknown, e.g. enqueued before a
    /// restart): the start of the publish-to-deliver latency.
    pub enqueued_ms: u64,
    pub message: Message,
}

/// How a delivered message is settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Processed: remove it.
    Ack,
    /// Put it back where it was, flagged redelivered.
    Requeue,
    /// Rejected without requeue: drop it (dead-lettering comes with the
    /// queue-semantics issue).
    Discard,
}

/// Where a queue pushes deliveries. The gateway implements it per consumer;
/// a `false` return means the receiver is gone.
pub trait DeliverySink: Send + Sync {
    fn deliver(&self, consumer: &Arc<Consumer>, delivery: Delivery) -> bool;
    /// The queue cancelled the consumer (for instance the queue was deleted).
    fn cancelled(&self, consumer: &Arc<Consumer>);
}

/// Most deliveries a consumer may have queued towards its socket but not
/// yet written. This bounds memory for no-ack consumers and for prefetch 0.
pub const MAX_PENDING: u32 = 512;

/// Flow state shared by all consumers of one channel: the channel-wide
/// (`global`) prefetch and channel.flow.
#[derive(Debug, Default)]
pub struct ChannelFlow {
    /// Channel-wide prefetch limit; 0 means none.
    pub prefetch: AtomicU32,
    /// Unacknowledged deliveries on the channel counted against `prefetch`.
    pub unacked: AtomicU32,
    /// channel.flow(active=false) pauses deliveries.
    pub paused: AtomicBool,
}

/// The prefetch window of one AMQP consumer (basic.qos global=false). It is
/// shared by the per-partition consumers of a partitioned queue, so the
/// client's window means the same whatever the number of partitions.
#[derive(Debug, Default)]
pub struct Credit {
    /// Limit; 0 means none.
    pub prefetch: u32,
    unacked: AtomicU32,
}

impl Credit {
    pub fn new(prefetch: u32) -> Arc<Self> {
        Arc::new(Credit { prefetch, unacked: AtomicU32::new(0) })
    }
}

/// A consumer as the queue sees it: identity, credit and sink.
pub struct Consumer {
    pub tag: String,
    pub no_ack: bool,
    pub exclusive: bool,
    /// The consumer's own prefetch window.
    pub credit: Arc<Credit>,
    pub channel: Arc<ChannelFlow>,
    pub sink: Arc<dyn DeliverySink>,
    pending: AtomicU32,
    queue: OnceLock<Weak<dyn Queue>>,
    /// Set by a queue that wants [`Queue::written`] for every delivery
    /// that reached the socket (a remote queue: its leader counts them).
    reports_written: AtomicBool,
    /// Writes not yet reported to the remote leader (kept here for the
    /// queue that asked, see [`Consumer::count_written`]).
    written: AtomicU32,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer").field("tag", &self.tag).finish()
    }
}

impl Consumer {
    pub fn new(
        tag: String,
        no_ack: bool,
        exclusive: bool,
        credit: Arc<Credit>,
        channel: Arc<ChannelFlow>,
        sink: Arc<dyn DeliverySink>,
    ) -> Arc<Self> {
        Arc::new(Consumer {
            tag,
            no_ack,
            exclusive,
            credit,
            channel,
            sink,
            pending: AtomicU32::new(0),
            queue: OnceLock::new(),
            reports_written: AtomicBool::new(false),
            written: AtomicU32::new(0),
        })
    }

    /// Called by the queue when the consumer is attached, so that releasing
    /// credit can wake the queue up.
    pub fn attach(&self, queue: Weak<dyn Queue>) {
        let _ = self.queue.set(queue);
    }

    /// Takes one unit of credit if the consumer may receive a message now.
    /// Called by the queue with its lock held.
    pub fn try_acquire(&self) -> bool {
        if self.channel.paused.load(Ordering::Acquire) {
            return false;
        }
        if self.pending.load(Ordering::Acquire) >= MAX_PENDING {
            return false;
        }
        if !self.no_ack {
            // Own window first (shared by a partitioned queue's partitions,
            // so it is taken atomically), then the channel's.
            let own = self.credit.prefetch;
            let took = self.credit.unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (own == 0 || n < own).then_some(n + 1)
            });
            if took.is_err() {
                return false;
            }
            let limit = self.channel.prefetch.load(Ordering::Acquire);
            let took = self.channel.unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (limit == 0 || n < limit).then_some(n + 1)
            });
            if took.is_err() {
                let _ = self.credit.unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
                return false;
            }
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
        true
    }

    /// Takes one unit of credit whatever the limits: for a delivery another
    /// process already decided (a remote queue's leader, which enforces the
    /// consumer's own prefetch), so that the usual releases balance.
    pub fn force_acquire(&self) {
        if !self.no_ack {
            self.credit.unacked.fetch_add(1, Ordering::AcqRel);
            self.channel.unacked.fetch_add(1, Ordering::AcqRel);
        }
        self.pending.fetch_add(1, Ordering::AcqRel);
    }

    /// Returns the credit taken by `try_acquire` when the delivery did not
    /// happen. Never wakes the queue: the caller holds the queue's lock.
    pub fn undo_acquire(&self) {
        let _ = self.pending.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if !self.no_ack {
            let _ = self.credit.unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
            let _ = self.channel.unacked.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        }
    }

    /// As many deliveries queued towards the socket as allowed: the
    /// consumer would take more, its connection is behind.
    pub fn socket_full(&self) -> bool {
        self.pending.load(Ordering::Acquire) >= MAX_PENDING
    }

    /// Gives back a pending slot once the delivery reached the socket (or
    /// was dropped). Wakes the queue if that unblocked the consumer, and
    /// tells a queue that asked ([`Consumer::report_written`]).
    pub fn release_pending(&self) {
        let before = self.pending.fetch_sub(1, Ordering::AcqRel);
        if self.reports_written.load(Ordering::Relaxed) {
            if let Some(queue) = self.queue() {
                queue.written(self);
            }
        } else if before >= MAX_PENDING {
            self.kick();
        }
    }

    /// Gives back `n` pending slots at once, never below zero: deliveries
    /// a remote gateway reports written to its client's socket (a report
    /// may count deliveries of an attach this consumer replaced). Wakes
    /// the queue if that unblocked the consumer.
    pub fn release_pending_many(&self, n: u32) {
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| Some(p.saturating_sub(n)))
            .unwrap_or(0);
        if before >= MAX_PENDING && before.saturating_sub(n) < MAX_PENDING {
            self.kick();
        }
    }

    /// Asks for [`Queue::written`] on every [`Consumer::release_pending`].
    pub fn report_written(&self) {
        self.reports_written.store(true, Ordering::Relaxed);
    }

    /// Counts one delivery written; returns the count to report (and
    /// starts again from zero) once `batch` were.
    pub fn count_written(&self, batch: u32) -> Option<u32> {
        let n = self.written.fetch_add(1, Ordering::AcqRel) + 1;
        if n < batch {
            return None;
        }
        let took = self.written.fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| w.checked_sub(n)).is_ok();
        took.then_some(n)
    }

    /// Gives back the prefetch credit of one settled delivery. Returns true
    /// if the consumer or its channel may have been blocked on it.
    pub fn release_unacked(&self) -> bool {
        let mine = self
            .credit
            .unacked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        let chan = self
            .channel
            .unacked
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .unwrap_or(0);
        let limit = self.channel.prefetch.load(Ordering::Acquire);
        (self.credit.prefetch != 0 && mine >= self.credit.prefetch) || (limit != 0 && chan >= limit)
    }

    /// The queue the consumer is attached to, if it still exists.
    pub fn queue(&self) -> Option<Arc<dyn Queue>> {
        self.queue.get().and_then(Weak::upgrade)
    }

    /// Asks the consumer's queue to try delivering again.
    pub fn kick(&self) {
        if let Some(queue) = self.queue.get().and_then(Weak::upgrade) {
            queue.kick();
        }
    }
}

/// Per-queue counters the gateway bumps for metrics (atomics, relaxed):
/// a handle's own counts since it was opened.
#[derive(Debug, Default)]
pub struct QueueMeter {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub redelivered: AtomicU64,
    pub acked: AtomicU64,
}

impl QueueMeter {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// A queue's figures for metrics, read without a log round trip.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueStats {
    pub ready: u32,
    pub unacked: u32,
    pub consumers: u32,
    /// Body bytes of the ready messages.
    pub ready_bytes: u64,
    /// Messages dead-lettered out of the queue since its leader's replica
    /// opened (a counter; it may restart after a failover or restart).
    pub dead_lettered: u64,
}

/// One queue, wherever it lives.
pub trait Queue: Send + Sync {
    fn id(&self) -> QueueId;
    /// A delivery to `consumer` reached its socket; called only for
    /// consumers that asked ([`Consumer::report_written`]).
    fn written(&self, _consumer: &Consumer) {}
    /// Counters for metrics.
    fn meter(&self) -> &QueueMeter;
    /// Figures for metrics (ready, unacknowledged, consumers, bytes).
    fn stats(&self) -> Reply<QueueStats> {
        let counts = self.counts();
        Box::pin(async move {
            let (ready, consumers) = counts.await?;
            Ok(QueueStats { ready, consumers, ..QueueStats::default() })
        })
    }
    /// Enqueues a message. `Some(durable)` when the publisher must wait for
    /// it before confirming (persistent message on a durable queue).
    fn publish(&self, message: Message) -> Result<Option<Durable>, Error>;
    /// Attaches a consumer; deliveries start once the reply is `Ok`.
    fn consume(&self, consumer: Arc<Consumer>) -> Reply<()>;
    /// Detaches a consumer. Its unacknowledged deliveries stay unacknowledged.
    fn cancel(&self, consumer: &Arc<Consumer>) -> bool;
    /// The consumer's channel is gone: detaches it and returns everything
    /// the queue has it holding, including what the gateway believes it
    /// settled (a settle lost with a failed leader) rather than only the
    /// deliveries the gateway requeues itself.
    fn close_consumer(&self, consumer: &Arc<Consumer>) -> bool {
        self.cancel(consumer)
    }
    /// Takes the first ready message for `getter`, with the number of
    /// messages left.
    fn get(&self, no_ack: bool, getter: Getter) -> Reply<Option<(Delivery, u32)>>;
    /// The channel `getter` is gone: every message it holds from
    /// basic.get is requeued (also ones whose settle was lost with a
    /// failed leader).
    fn close_getter(&self, getter: Getter);
    /// Settles delivered messages.
    fn settle(&self, msg_ids: &[u64], outcome: Outcome);
    /// Drops every ready message and returns how many.
    fn purge(&self) -> Reply<u32>;
    /// `x-dead-letter-on-delete`, just before the queue is deleted: every
    /// message it holds is dead-lettered (reason `queue_deleted`);
    /// resolves with their number once they are all in their dead-letter
    /// queues.
    fn retire(self: Arc<Self>) -> Reply<u32>;
    /// Ready messages and attached consumers.
    fn counts(&self) -> Reply<(u32, u32)>;
    /// Tries to deliver to consumers that have credit again.
    fn kick(&self);

    /// Publisher flow control: true while the queue's deliveries fall
    /// behind its publishes (a backlog waits for consumers whose
    /// connections are behind). A connection that published here stops
    /// reading until it is false again (RabbitMQ's credit flow).
    fn lagging(&self) -> bool {
        false
    }
    /// The queue's `x-max-message-size`: a larger publish is refused with
    /// a 406 channel error, as RabbitMQ refuses one above `max_message_size`.
    fn max_message_size(&self) -> Option<u64> {
        None
    }
    /// The queue's `x-consumer-timeout` (ms).
    fn consumer_timeout(&self) -> Option<u64> {
        None
    }
}

/// Everything the router needs from the storage side.
pub trait Backend: Send + Sync {
    /// Creates a queue, or returns it if it exists (recovering its messages
    /// after a restart).
    fn open_queue(&self, spec: QueueSpec) -> Result<Arc<dyn Queue>, Error>;
    /// Deletes a queue and its messages; cancels its consumers. Returns the
    /// number of ready messages it held.
    fn delete_queue(&self, id: QueueId) -> Reply<u32>;
    /// Bytes of writes waiting for storage. Sessions stop reading from
    /// their sockets while it is above their limit (backpressure).
    fn backlog_bytes(&self) -> u64;
    /// Makes everything written so far durable and stops accepting writes.
    fn shutdown(&self) -> Result<(), Error>;
}
