//! Audit events: connections, logins (failed ones too), declares and
//! deletes, user, permission and vhost changes. Each is logged (target
//! `audit`, level info) and published, as RabbitMQ's event exchange plugin
//! does, to the topic exchange `amq.rabbitmq.event` of vhost `/` with the
//! event name as routing key (`queue.created`, `user.authentication.failure`,
//! ...), an empty body and the details in headers. A client binds a queue
//! to it to follow them (it cannot publish there: the exchange is
//! internal).
//!
//! The gateway that carries out an operation emits its event (once per
//! cluster). Who acted is the session's user, passed down to the router
//! as a task-local ([`as_user`]) so the router's methods need no extra
//! parameter.

use std::future::Future;

use bytes::Bytes;
use sluice_cluster::meta::EVENT_EXCHANGE;
use sluice_codecs::command::{Arguments, FieldValue, Message, Properties};

use crate::router::Router;

tokio::task_local! {
    static ACTOR: String;
}

/// Runs `f` with `user` as the acting user of the events it causes.
pub async fn as_user<F: Future>(user: String, f: F) -> F::Output {
    ACTOR.scope(user, f).await
}

/// The acting user: the session's, else the broker itself.
fn actor() -> String {
    ACTOR.try_with(Clone::clone).unwrap_or_else(|_| "sluice".to_owned())
}

/// One event.
#[derive(Default)]
pub struct Event<'a> {
    /// `queue.created`, `connection.closed`, ...
    pub name: &'static str,
    /// The vhost it happened in.
    pub vhost: Option<&'a str>,
    /// The object: a queue, exchange, user or vhost name, a binding
    /// (`source -> destination (key)`), a connection's peer.
    pub object: Option<&'a str>,
    /// The user the event is about (logins, connections, user changes),
    /// when it is not the one who acted.
    pub user: Option<&'a str>,
    /// Why (failed logins, closed connections).
    pub reason: Option<&'a str>,
    /// The protocol (connections and logins).
    pub protocol: Option<&'a str>,
}

/// Logs the event and publishes it to `amq.rabbitmq.event` (if something
/// is bound there).
pub fn emit(router: &Router, ev: Event<'_>) {
    let by = actor();
    tracing::info!(
        target: "audit",
        event = ev.name,
        vhost = ev.vhost,
        object = ev.object,
        user = ev.user,
        reason = ev.reason,
        protocol = ev.protocol,
        by = %by,
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let mut headers = Arguments::default();
    let text = |s: &str| FieldValue::LongString(Bytes::from(s.to_owned()));
    for (k, v) in [
        ("vhost", ev.vhost),
        ("name", ev.object),
        ("user", ev.user),
        ("reason", ev.reason),
        ("protocol", ev.protocol),
        ("user_who_performed_action", Some(by.as_str())),
    ] {
        if let Some(v) = v {
            headers.insert(k, text(v));
        }
    }
    headers.insert("timestamp_in_ms", FieldValue::I64(i64::try_from(now.as_millis()).unwrap_or(i64::MAX)));
    let properties = Properties { headers: Some(headers), timestamp: Some(now.as_secs()), ..Properties::default() };
    // Nothing when vhost "/" or its event exchange is gone.
    let queues = router.route_internal("/", EVENT_EXCHANGE, ev.name, &properties);
    let message = Message { exchange: EVENT_EXCHANGE.to_owned(), routing_key: ev.name.to_owned(), properties: Box::new(properties), body: Bytes::new() };
    for q in queues {
        if let Err(e) = q.publish(message.clone()) {
            tracing::debug!(error = %e, event = ev.name, "audit event not published");
        }
    }
}
