//! AMQP 0-9-1 ⇄ the command model. The only place where AMQP methods meet
//! [`Command`] and [`Reply`].
//!
//! Session-control methods (connection.*, channel.*) are not commands: they
//! come back as [`Inbound::Session`] for the AMQP session code. Methods only
//! a server may send (basic.deliver, queue.declare-ok, ...) come back as
//! [`Inbound::Unexpected`], which the session answers with 503
//! COMMAND_INVALID.

use bytes::{Bytes, BytesMut};

use super::assemble::Assembled;
use super::frame::{encode_content, encode_content_spliced, encode_deliver_frame, encode_method_frame};
use super::spec::*;
use crate::command::{Command, Message, Reply};

/// What an assembled AMQP method means to the broker.
#[derive(Debug)]
pub enum Inbound {
    /// A broker operation.
    Command(Command),
    /// connection.* and channel.* methods, handled by the session.
    Session(Method),
    /// A method a client must not send.
    Unexpected(Method),
}

/// Maps one assembled method (with its content, for basic.publish).
pub fn inbound(assembled: Assembled) -> Inbound {
    let (method, content) = match assembled {
        Assembled::Method(m) => (m, None),
        Assembled::Content { method, properties, body } => (method, Some((properties, body))),
    };
    let cmd = match method {
        Method::ExchangeDeclare(m) => Command::ExchangeDeclare {
            name: m.exchange,
            kind: m.kind,
            passive: m.passive,
            durable: m.durable,
            auto_delete: m.auto_delete,
            internal: m.internal,
            arguments: m.arguments,
        },
        Method::ExchangeDelete(m) => Command::ExchangeDelete { name: m.exchange, if_unused: m.if_unused },
        Method::ExchangeBind(m) => Command::ExchangeBind {
            destination: m.destination,
            source: m.source,
            routing_key: m.routing_key,
            arguments: m.arguments,
        },
        Method::ExchangeUnbind(m) => Command::ExchangeUnbind {
            destination: m.destination,
            source: m.source,
            routing_key: m.routing_key,
            arguments: m.arguments,
        },
        Method::QueueDeclare(m) => Command::QueueDeclare {
            name: m.queue,
            passive: m.passive,
            durable: m.durable,
            exclusive: m.exclusive,
            auto_delete: m.auto_delete,
            arguments: m.arguments,
            nowait: m.nowait,
        },
        Method::QueueBind(m) => Command::QueueBind {
            queue: m.queue,
            exchange: m.exchange,
            routing_key: m.routing_key,
            arguments: m.arguments,
        },
        Method::QueueUnbind(m) => Command::QueueUnbind {
            queue: m.queue,
            exchange: m.exchange,
            routing_key: m.routing_key,
            arguments: m.arguments,
        },
        Method::QueuePurge(m) => Command::QueuePurge { queue: m.queue },
        Method::QueueDelete(m) => Command::QueueDelete { queue: m.queue, if_unused: m.if_unused, if_empty: m.if_empty },
        Method::BasicQos(m) => Command::Qos {
            prefetch_size: m.prefetch_size,
            prefetch_count: m.prefetch_count,
            global: m.global,
        },
        Method::BasicConsume(m) => Command::Consume {
            queue: m.queue,
            consumer_tag: m.consumer_tag,
            no_local: m.no_local,
            no_ack: m.no_ack,
            exclusive: m.exclusive,
            arguments: m.arguments,
        },
        Method::BasicCancel(m) => Command::Cancel { consumer_tag: m.consumer_tag },
        Method::BasicPublish(m) => {
            let (properties, body) = content.unwrap_or_default();
            Command::Publish {
                mandatory: m.mandatory,
                immediate: m.immediate,
                message: Message { exchange: m.exchange, routing_key: m.routing_key, properties, body },
            }
        }
        Method::BasicGet(m) => Command::Get { queue: m.queue, no_ack: m.no_ack },
        Method::BasicAck(m) => Command::Ack { delivery_tag: m.delivery_tag, multiple: m.multiple },
        Method::BasicReject(m) => Command::Reject { delivery_tag: m.delivery_tag, requeue: m.requeue },
        Method::BasicNack(m) => Command::Nack { delivery_tag: m.delivery_tag, multiple: m.multiple, requeue: m.requeue },
        Method::BasicRecover(m) => Command::Recover { requeue: m.requeue },
        Method::BasicRecoverAsync(m) => Command::Recover { requeue: m.requeue },
        Method::ConfirmSelect(_) => Command::ConfirmSelect,
        Method::TxSelect(_) => Command::TxSelect,
        Method::TxCommit(_) => Command::TxCommit,
        Method::TxRollback(_) => Command::TxRollback,
        m @ (Method::ConnectionStartOk(_)
        | Method::ConnectionSecureOk(_)
        | Method::ConnectionTuneOk(_)
        | Method::ConnectionOpen(_)
        | Method::ConnectionClose(_)
        | Method::ConnectionCloseOk(_)
        | Method::ConnectionBlocked(_)
        | Method::ConnectionUnblocked(_)
        | Method::ConnectionUpdateSecret(_)
        | Method::ChannelOpen(_)
        | Method::ChannelFlow(_)
        | Method::ChannelFlowOk(_)
        | Method::ChannelClose(_)
        | Method::ChannelCloseOk(_)) => return Inbound::Session(m),
        other => return Inbound::Unexpected(other),
    };
    Inbound::Command(cmd)
}

/// Whether a command's reply may be suppressed by its no-wait bit. Returns
/// the no-wait flag of the original method, which the map above drops.
pub fn nowait(method: &Method) -> bool {
    match method {
        Method::ExchangeDeclare(m) => m.nowait,
        Method::ExchangeDelete(m) => m.nowait,
        Method::ExchangeBind(m) => m.nowait,
        Method::ExchangeUnbind(m) => m.nowait,
        Method::QueueDeclare(m) => m.nowait,
        Method::QueueBind(m) => m.nowait,
        Method::QueuePurge(m) => m.nowait,
        Method::QueueDelete(m) => m.nowait,
        Method::BasicConsume(m) => m.nowait,
        Method::BasicCancel(m) => m.nowait,
        Method::ConfirmSelect(m) => m.nowait,
        _ => false,
    }
}

fn content(
    channel: u16,
    method: Method,
    message: &Message,
    frame_max: u32,
    out: &mut BytesMut,
    spliced: Option<&mut Vec<(usize, Bytes)>>,
) {
    encode_method_frame(channel, &method, out);
    body(channel, message, frame_max, out, spliced);
}

/// The content header and body frames of `message`.
fn body(channel: u16, message: &Message, frame_max: u32, out: &mut BytesMut, spliced: Option<&mut Vec<(usize, Bytes)>>) {
    match spliced {
        Some(spliced) => encode_content_spliced(channel, 60, &message.properties, &message.body, frame_max, out, spliced),
        None => encode_content(channel, 60, &message.properties, &message.body, frame_max, out),
    }
}

/// Encodes a reply as the AMQP frames that carry it.
pub fn encode_reply(channel: u16, reply: &Reply, frame_max: u32, out: &mut BytesMut) {
    encode_reply_with(channel, reply, frame_max, out, None);
}

/// [`encode_reply`] for a vectored write: big message bodies are not
/// copied into `out` but listed in `spliced` (see
/// [`super::frame::encode_content_spliced`]).
pub fn encode_reply_spliced(
    channel: u16,
    reply: &Reply,
    frame_max: u32,
    out: &mut BytesMut,
    spliced: &mut Vec<(usize, Bytes)>,
) {
    encode_reply_with(channel, reply, frame_max, out, Some(spliced));
}

fn encode_reply_with(
    channel: u16,
    reply: &Reply,
    frame_max: u32,
    out: &mut BytesMut,
    spliced: Option<&mut Vec<(usize, Bytes)>>,
) {
    let method = match reply {
        Reply::ExchangeDeclareOk => Method::ExchangeDeclareOk(ExchangeDeclareOk {}),
        Reply::ExchangeDeleteOk => Method::ExchangeDeleteOk(ExchangeDeleteOk {}),
        Reply::ExchangeBindOk => Method::ExchangeBindOk(ExchangeBindOk {}),
        Reply::ExchangeUnbindOk => Method::ExchangeUnbindOk(ExchangeUnbindOk {}),
        Reply::QueueDeclareOk { queue, message_count, consumer_count } => Method::QueueDeclareOk(QueueDeclareOk {
            queue: queue.clone(),
            message_count: *message_count,
            consumer_count: *consumer_count,
        }),
        Reply::QueueBindOk => Method::QueueBindOk(QueueBindOk {}),
        Reply::QueueUnbindOk => Method::QueueUnbindOk(QueueUnbindOk {}),
        Reply::QueuePurgeOk { message_count } => Method::QueuePurgeOk(QueuePurgeOk { message_count: *message_count }),
        Reply::QueueDeleteOk { message_count } => Method::QueueDeleteOk(QueueDeleteOk { message_count: *message_count }),
        Reply::ConsumeOk { consumer_tag } => Method::BasicConsumeOk(BasicConsumeOk { consumer_tag: consumer_tag.clone() }),
        Reply::CancelOk { consumer_tag } => Method::BasicCancelOk(BasicCancelOk { consumer_tag: consumer_tag.clone() }),
        Reply::QosOk => Method::BasicQosOk(BasicQosOk {}),
        Reply::RecoverOk => Method::BasicRecoverOk(BasicRecoverOk {}),
        Reply::ConfirmSelectOk => Method::ConfirmSelectOk(ConfirmSelectOk {}),
        Reply::TxSelectOk => Method::TxSelectOk(TxSelectOk {}),
        Reply::TxCommitOk => Method::TxCommitOk(TxCommitOk {}),
        Reply::TxRollbackOk => Method::TxRollbackOk(TxRollbackOk {}),
        Reply::GetEmpty => Method::BasicGetEmpty(BasicGetEmpty { cluster_id: String::new() }),
        Reply::Confirm { delivery_tag, multiple, ack: true } => {
            Method::BasicAck(BasicAck { delivery_tag: *delivery_tag, multiple: *multiple })
        }
        Reply::Confirm { delivery_tag, multiple, ack: false } => {
            Method::BasicNack(BasicNack { delivery_tag: *delivery_tag, multiple: *multiple, requeue: false })
        }
        Reply::ConsumerCancelled { consumer_tag } => {
            Method::BasicCancel(BasicCancel { consumer_tag: consumer_tag.clone(), nowait: true })
        }
        Reply::Deliver { consumer_tag, delivery_tag, redelivered, message } => {
            let (exchange, key) = (&message.exchange, &message.routing_key);
            encode_deliver_frame(channel, consumer_tag, *delivery_tag, *redelivered, exchange, key, out);
            return body(channel, message, frame_max, out, spliced);
        }
        Reply::GetOk { delivery_tag, redelivered, message_count, message } => {
            let m = Method::BasicGetOk(BasicGetOk {
                delivery_tag: *delivery_tag,
                redelivered: *redelivered,
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
                message_count: *message_count,
            });
            return content(channel, m, message, frame_max, out, spliced);
        }
        Reply::Return { reply_code, reply_text, message } => {
            let m = Method::BasicReturn(BasicReturn {
                reply_code: *reply_code,
                reply_text: reply_text.clone(),
                exchange: message.exchange.clone(),
                routing_key: message.routing_key.clone(),
            });
            return content(channel, m, message, frame_max, out, spliced);
        }
    };
    encode_method_frame(channel, &method, out);
}
