//! The protocol-neutral command model.
//!
//! Every protocol codec (AMQP 0-9-1 today, STOMP next) maps its frames into
//! [`Command`] (client → broker) and renders [`Reply`] (broker → client).
//! The router, the cluster backend and storage only ever see these types,
//! never wire frames.
//!
//! Session control (AMQP connection.tune, channel.open, heartbeats; STOMP
//! CONNECT, RECEIPT) is deliberately *not* part of the model: its meaning is
//! per protocol, so it stays in the protocol's session code.
//!
//! Message properties and argument tables reuse the AMQP property and field
//! table types as plain data: they are the broker's canonical message
//! metadata, exactly as RabbitMQ maps STOMP headers onto AMQP properties.

use bytes::Bytes;

pub use crate::amqp::properties::BasicProperties as Properties;
pub use crate::amqp::value::{FieldTable as Arguments, FieldValue};

/// A message as the broker stores and routes it: where it was published,
/// its properties and its body. The body is reference-counted, never copied.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    /// Exchange the message was published to ("" is the default exchange).
    pub exchange: String,
    /// Routing key given at publish time.
    pub routing_key: String,
    /// The 14 basic properties (content type, headers, delivery mode, ...),
    /// boxed: a message is moved several times on its way through the
    /// broker, and the properties are most of its size.
    pub properties: Box<Properties>,
    /// The payload.
    pub body: Bytes,
}

impl Message {
    /// True when the publisher asked for the message to survive a restart.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(2)
    }
}

/// A broker operation requested by a client, independent of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Declare (or check, when `passive`) an exchange.
    ExchangeDeclare {
        name: String,
        kind: String,
        passive: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: Arguments,
    },
    /// Delete an exchange.
    ExchangeDelete { name: String, if_unused: bool },
    /// Bind exchange `destination` to exchange `source`.
    ExchangeBind {
        destination: String,
        source: String,
        routing_key: String,
        arguments: Arguments,
    },
    /// Remove an exchange-to-exchange binding.
    ExchangeUnbind {
        destination: String,
        source: String,
        routing_key: String,
        arguments: Arguments,
    },
    /// Declare (or check, when `passive`) a queue; an empty name asks the
    /// server to generate one. `nowait`: the client wants no
    /// declare-ok, so the queue's counts are not fetched.
    QueueDeclare {
        name: String,
        passive: bool,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: Arguments,
        nowait: bool,
    },
    /// Bind a queue to an exchange.
    QueueBind {
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: Arguments,
    },
    /// Remove a queue binding.
    QueueUnbind {
        queue: String,
        exchange: String,
        routing_key: String,
        arguments: Arguments,
    },
    /// Drop every ready message of a queue.
    QueuePurge { queue: String },
    /// Delete a queue.
    QueueDelete {
        queue: String,
        if_unused: bool,
        if_empty: bool,
    },
    /// Publish a message to an exchange.
    Publish {
        mandatory: bool,
        immediate: bool,
        message: Message,
    },
    /// Start a consumer on a queue; an empty tag asks the server for one.
    Consume {
        queue: String,
        consumer_tag: String,
        no_local: bool,
        no_ack: bool,
        exclusive: bool,
        arguments: Arguments,
    },
    /// Stop a consumer.
    Cancel { consumer_tag: String },
    /// Fetch one message synchronously.
    Get { queue: String, no_ack: bool },
    /// Acknowledge one delivery (or all up to it, when `multiple`).
    Ack { delivery_tag: u64, multiple: bool },
    /// Negatively acknowledge; `requeue` puts the message(s) back.
    Nack {
        delivery_tag: u64,
        multiple: bool,
        requeue: bool,
    },
    /// Reject one delivery.
    Reject { delivery_tag: u64, requeue: bool },
    /// Redeliver every unacknowledged delivery of the channel.
    Recover { requeue: bool },
    /// Set the prefetch window.
    Qos {
        prefetch_size: u32,
        prefetch_count: u16,
        global: bool,
    },
    /// Put the channel in publisher-confirm mode.
    ConfirmSelect,
    /// Start a transaction on the channel.
    TxSelect,
    /// Commit the current transaction.
    TxCommit,
    /// Roll back the current transaction.
    TxRollback,
}

/// What the broker sends back, independent of the protocol.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    ExchangeDeclareOk,
    ExchangeDeleteOk,
    ExchangeBindOk,
    ExchangeUnbindOk,
    QueueDeclareOk {
        queue: String,
        message_count: u32,
        consumer_count: u32,
    },
    QueueBindOk,
    QueueUnbindOk,
    QueuePurgeOk { message_count: u32 },
    QueueDeleteOk { message_count: u32 },
    ConsumeOk { consumer_tag: String },
    CancelOk { consumer_tag: String },
    QosOk,
    RecoverOk,
    ConfirmSelectOk,
    TxSelectOk,
    TxCommitOk,
    TxRollbackOk,
    /// A message pushed to a consumer.
    Deliver {
        consumer_tag: String,
        delivery_tag: u64,
        redelivered: bool,
        message: Message,
    },
    /// The answer to a successful [`Command::Get`].
    GetOk {
        delivery_tag: u64,
        redelivered: bool,
        message_count: u32,
        message: Message,
    },
    /// The answer to a [`Command::Get`] on an empty queue.
    GetEmpty,
    /// An unroutable mandatory message handed back to its publisher.
    Return {
        reply_code: u16,
        reply_text: String,
        message: Message,
    },
    /// Publisher confirm: `ack` false means the broker could not take it.
    Confirm {
        delivery_tag: u64,
        multiple: bool,
        ack: bool,
    },
    /// The server cancelled a consumer (its queue was deleted).
    ConsumerCancelled { consumer_tag: String },
}
