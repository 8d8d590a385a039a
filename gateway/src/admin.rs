//! The admin HTTP API (`--admin`, default 127.0.0.1:15672): a subset of
//! RabbitMQ's management HTTP API, same paths and JSON, so that `curl` and
//! scripts written for RabbitMQ work, and `sluice ctl` drives it.
//!
//! Every request needs HTTP basic authentication as a user of the
//! metadata: reads need the tag `administrator`, `monitoring` or
//! `management`; changes need `administrator`. Paths (vhost names
//! percent-encoded, `/` is `%2F`):
//!
//! | method | path | |
//! |---|---|---|
//! | GET | `/api/overview` | version, counts |
//! | GET, PUT, DELETE | `/api/vhosts[/V]` | |
//! | GET, PUT, DELETE | `/api/users[/U]` | PUT body `{"password"}` or `{"password_hash"}`, `"tags"` |
//! | GET, PUT, DELETE | `/api/permissions[/V/U]` | PUT body `{"configure","write","read"}` |
//! | GET, PUT, DELETE | `/api/queues[/V[/Q]]` | PUT body `{"durable","auto_delete","arguments"}` |
//! | DELETE | `/api/queues/V/Q/contents` | purge |
//! | GET, PUT, DELETE | `/api/exchanges[/V[/E]]` | PUT body `{"type","durable","auto_delete","internal","arguments"}` |
//! | GET | `/api/bindings[/V]` | |
//! | POST | `/api/bindings/V/e/E/q/Q`, `/api/bindings/V/e/E/e/E2` | body `{"routing_key","arguments"}` |
//! | DELETE | `/api/bindings/V/e/E/q/Q/KEY` | `KEY`: the routing key (arguments must be empty) |
//! | GET, POST | `/api/definitions` | export / import (RabbitMQ's definitions format) |
//!
//! Errors answer `{"error": ..., "reason": ...}` with 400 (bad input),
//! 401 (no or wrong credentials), 403 (not an administrator), 404, 405,
//! or the broker's refusal mapped to a status (406/405 AMQP codes → 400).

use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Map, Value};
use sluice_cluster::meta::auth::{hash_password, AuthCommand, Permission, HASHING_SHA256};
use sluice_cluster::meta::{Dest, Topology};
use sluice_codecs::command::{Arguments, FieldValue};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::BrokerError;
use crate::router::{QueueDeclare, Router, VHost};

/// Largest request body read (a definitions import).
const MAX_BODY: usize = 64 * 1024 * 1024;

/// The connection id the admin API's declares and deletes use: it owns no
/// exclusive queue, so exclusive queues of clients are refused (405).
const ADMIN_CONN: u64 = 0;

/// Binds `addr` and serves the API until `shutdown`. Returns the bound
/// address.
pub async fn serve(addr: &str, router: Arc<Router>, shutdown: CancellationToken) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for the admin API: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                a = listener.accept() => a,
                _ = shutdown.cancelled() => return,
            };
            let Ok((socket, peer)) = accepted else {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            };
            let router = router.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let router = router.clone();
                    async move { Ok::<_, std::convert::Infallible>(handle(&router, req).await) }
                });
                let io = hyper_util::rt::TokioIo::new(socket);
                if let Err(e) = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await {
                    tracing::debug!(%peer, error = %e, "admin API connection ended");
                }
            });
        }
    });
    Ok(bound)
}

/// An error answer.
struct Fail(StatusCode, String);

impl Fail {
    fn bad(reason: impl Into<String>) -> Self {
        Fail(StatusCode::BAD_REQUEST, reason.into())
    }
    fn not_found(reason: impl Into<String>) -> Self {
        Fail(StatusCode::NOT_FOUND, reason.into())
    }
}

impl From<BrokerError> for Fail {
    fn from(e: BrokerError) -> Self {
        let status = match e.code {
            404 => StatusCode::NOT_FOUND,
            403 => StatusCode::FORBIDDEN,
            541 => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        Fail(status, e.text)
    }
}

type Answer = Result<(StatusCode, Value), Fail>;

async fn handle(router: &Router, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match answer(router, req).await {
        Ok((status, body)) => (status, body),
        Err(Fail(status, reason)) => {
            let error = status.canonical_reason().unwrap_or("error").to_lowercase().replace(' ', "_");
            (status, json!({ "error": error, "reason": reason }))
        }
    };
    let mut builder = Response::builder().status(status).header("content-type", "application/json");
    if status == StatusCode::UNAUTHORIZED {
        builder = builder.header("www-authenticate", "Basic realm=\"Sluice\"");
    }
    let text = if body.is_null() { String::new() } else { body.to_string() };
    builder.body(Full::new(Bytes::from(text))).unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

/// Who is asking, from the basic authentication header: the user and its
/// tags.
fn login(router: &Router, req: &Request<Incoming>) -> Result<(String, Vec<String>), Fail> {
    let unauthorized = || Fail(StatusCode::UNAUTHORIZED, "Not_Authorized".to_owned());
    let header = req.headers().get("authorization").and_then(|v| v.to_str().ok()).ok_or_else(unauthorized)?;
    let encoded = header.strip_prefix("Basic ").ok_or_else(unauthorized)?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).map_err(|_| unauthorized())?;
    let text = String::from_utf8(decoded).map_err(|_| unauthorized())?;
    let (user, password) = text.split_once(':').ok_or_else(unauthorized)?;
    if !router.check_password(user, password) {
        crate::metrics::auth_failed("http");
        tracing::info!(user, "admin API login refused");
        crate::audit::emit(router, crate::audit::Event {
            name: "user.authentication.failure",
            user: Some(user),
            reason: Some("invalid credentials"),
            protocol: Some("http"),
            ..Default::default()
        });
        return Err(unauthorized());
    }
    let (_, auth) = router.snapshot();
    Ok((user.to_owned(), auth.users.get(user).map(|u| u.tags.clone()).unwrap_or_default()))
}

async fn answer(router: &Router, req: Request<Incoming>) -> Answer {
    let (user, tags) = login(router, &req)?;
    crate::audit::as_user(user, act(router, req, tags)).await
}

async fn act(router: &Router, req: Request<Incoming>, tags: Vec<String>) -> Answer {
    let has = |t: &str| tags.iter().any(|x| x == t);
    let method = req.method().clone();
    let reading = method == Method::GET;
    if !(has("administrator") || (reading && (has("monitoring") || has("management")))) {
        return Err(Fail(StatusCode::FORBIDDEN, "Not administrator".to_owned()));
    }
    let path: Vec<String> = req
        .uri()
        .path()
        .trim_matches('/')
        .split('/')
        .map(percent_decode)
        .collect::<Result<_, _>>()
        .map_err(Fail::bad)?;
    let body = if matches!(method, Method::PUT | Method::POST) {
        let bytes = read_body(req.into_body()).await?;
        if bytes.is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(&bytes).map_err(|e| Fail::bad(format!("invalid JSON: {e}")))?
        }
    } else {
        Value::Null
    };
    let p: Vec<&str> = path.iter().map(String::as_str).collect();
    match (&method, p.as_slice()) {
        (&Method::GET, ["api", "overview"]) => overview(router),
        (&Method::GET, ["api", "vhosts"]) => {
            let (topo, _) = router.snapshot();
            Ok((StatusCode::OK, Value::Array(topo.vhosts().map(|v| json!({ "name": v.name })).collect())))
        }
        (&Method::GET, ["api", "vhosts", v]) => {
            let (topo, _) = router.snapshot();
            topo.vhost(v).map(|_| (StatusCode::OK, json!({ "name": v }))).ok_or_else(|| Fail::not_found("Object Not Found"))
        }
        (&Method::PUT, ["api", "vhosts", v]) => {
            router.add_vhost(v).await?;
            Ok((StatusCode::CREATED, Value::Null))
        }
        (&Method::DELETE, ["api", "vhosts", v]) => {
            router.delete_vhost(v).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::GET, ["api", "users"]) => {
            let (_, auth) = router.snapshot();
            Ok((StatusCode::OK, Value::Array(auth.users.iter().map(|(n, u)| user_json(n, u)).collect())))
        }
        (&Method::GET, ["api", "users", u]) => {
            let (_, auth) = router.snapshot();
            auth.users.get(*u).map(|x| (StatusCode::OK, user_json(u, x))).ok_or_else(|| Fail::not_found("Object Not Found"))
        }
        (&Method::PUT, ["api", "users", u]) => {
            router.execute_auth(put_user(u, &body)?).await?;
            Ok((StatusCode::CREATED, Value::Null))
        }
        (&Method::DELETE, ["api", "users", u]) => {
            router.execute_auth(AuthCommand::DeleteUser { name: (*u).to_owned() }).await.map_err(not_found_if_missing)?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::GET, ["api", "permissions"]) => {
            let (_, auth) = router.snapshot();
            let rows = auth.permissions.iter().flat_map(|(v, users)| users.iter().map(move |(u, p)| permission_json(v, u, p)));
            Ok((StatusCode::OK, Value::Array(rows.collect())))
        }
        (&Method::GET, ["api", "permissions", v, u]) => {
            let (_, auth) = router.snapshot();
            let p = auth.permission(v, u).ok_or_else(|| Fail::not_found("Object Not Found"))?;
            Ok((StatusCode::OK, permission_json(v, u, p)))
        }
        (&Method::PUT, ["api", "permissions", v, u]) => {
            let permission = permission_of(&body)?;
            router.execute_auth(AuthCommand::SetPermissions { vhost: (*v).to_owned(), user: (*u).to_owned(), permission }).await?;
            Ok((StatusCode::CREATED, Value::Null))
        }
        (&Method::DELETE, ["api", "permissions", v, u]) => {
            router.execute_auth(AuthCommand::ClearPermissions { vhost: (*v).to_owned(), user: (*u).to_owned() }).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::GET, ["api", "queues"]) => queues(router, None).await,
        (&Method::GET, ["api", "queues", v]) => queues(router, Some(v)).await,
        (&Method::GET, ["api", "queues", v, q]) => {
            let (_, rows) = queues(router, Some(v)).await?;
            let rows = rows.as_array().cloned().unwrap_or_default();
            let row = rows.into_iter().find(|r| r["name"] == *q).ok_or_else(|| Fail::not_found("Object Not Found"))?;
            Ok((StatusCode::OK, row))
        }
        (&Method::PUT, ["api", "queues", v, q]) => {
            let vh = vhost(router, v)?;
            let d = QueueDeclare {
                name: (*q).to_owned(),
                passive: false,
                durable: body["durable"].as_bool().unwrap_or(true),
                exclusive: false,
                auto_delete: body["auto_delete"].as_bool().unwrap_or(false),
                arguments: arguments_of(&body["arguments"])?,
                nowait: true,
            };
            router.declare_queue(&vh, ADMIN_CONN, d).await?;
            Ok((StatusCode::CREATED, Value::Null))
        }
        (&Method::DELETE, ["api", "queues", v, q]) => {
            let vh = vhost(router, v)?;
            router.delete_queue(&vh, ADMIN_CONN, q, false, false).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::DELETE, ["api", "queues", v, q, "contents"]) => {
            let vh = vhost(router, v)?;
            let entry = router.queue(&vh, ADMIN_CONN, q)?;
            for part in &entry.partitions {
                part.purge().await.map_err(BrokerError::from)?;
            }
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::GET, ["api", "exchanges"]) => Ok((StatusCode::OK, exchanges(&router.snapshot().0, None))),
        (&Method::GET, ["api", "exchanges", v]) => Ok((StatusCode::OK, exchanges(&router.snapshot().0, Some(v)))),
        (&Method::PUT, ["api", "exchanges", v, e]) => {
            let vh = vhost(router, v)?;
            let kind = body["type"].as_str().ok_or_else(|| Fail::bad("an exchange needs a \"type\""))?;
            router
                .declare_exchange(
                    &vh,
                    e,
                    kind,
                    false,
                    body["durable"].as_bool().unwrap_or(true),
                    body["auto_delete"].as_bool().unwrap_or(false),
                    body["internal"].as_bool().unwrap_or(false),
                    arguments_of(&body["arguments"])?,
                )
                .await?;
            Ok((StatusCode::CREATED, Value::Null))
        }
        (&Method::DELETE, ["api", "exchanges", v, e]) => {
            let vh = vhost(router, v)?;
            router.delete_exchange(&vh, e, false).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::GET, ["api", "bindings"]) => Ok((StatusCode::OK, bindings(&router.snapshot().0, None))),
        (&Method::GET, ["api", "bindings", v]) => Ok((StatusCode::OK, bindings(&router.snapshot().0, Some(v)))),
        (&Method::POST, ["api", "bindings", v, "e", source, kind, dest]) => {
            let vh = vhost(router, v)?;
            let dest = dest_of(kind, dest)?;
            let key = body["routing_key"].as_str().unwrap_or_default();
            router.bind(&vh, ADMIN_CONN, source, dest, key, arguments_of(&body["arguments"])?).await?;
            Ok((StatusCode::CREATED, Value::Null))
        }
        (&Method::DELETE, ["api", "bindings", v, "e", source, kind, dest, key]) => {
            let vh = vhost(router, v)?;
            let dest = dest_of(kind, dest)?;
            router.unbind(&vh, ADMIN_CONN, source, dest, key, Arguments::default()).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (&Method::GET, ["api", "definitions"]) => Ok((StatusCode::OK, export(router))),
        (&Method::POST, ["api", "definitions"]) => {
            import(router, &body).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        _ => Err(Fail(StatusCode::NOT_FOUND, format!("no such API endpoint: {method} {}", path.join("/")))),
    }
}

/// Reads a request body up to [`MAX_BODY`].
async fn read_body(body: Incoming) -> Result<Bytes, Fail> {
    match http_body_util::Limited::new(body, MAX_BODY).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) => Err(Fail(StatusCode::PAYLOAD_TOO_LARGE, format!("request body: {e}"))),
    }
}

fn not_found_if_missing(e: BrokerError) -> Fail {
    if e.text.contains("does not exist") {
        Fail::not_found(e.text)
    } else {
        e.into()
    }
}

fn percent_decode(segment: &str) -> Result<String, String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = segment.get(i + 1..i + 3).ok_or_else(|| format!("bad percent-encoding in '{segment}'"))?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| format!("bad percent-encoding in '{segment}'"))?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| format!("'{segment}' is not UTF-8"))
}

fn vhost(router: &Router, name: &str) -> Result<Arc<VHost>, Fail> {
    router.vhost(name).ok_or_else(|| Fail::not_found(format!("no vhost '{name}'")))
}

fn dest_of(kind: &str, name: &str) -> Result<Dest, Fail> {
    match kind {
        "q" => Ok(Dest::Queue(name.to_owned())),
        "e" => Ok(Dest::Exchange(name.to_owned())),
        other => Err(Fail::bad(format!("binding destination type '{other}' (q or e)"))),
    }
}

fn overview(router: &Router) -> Answer {
    let (topo, auth) = router.snapshot();
    let queues: usize = topo.vhosts().map(|v| v.queues.len()).sum();
    let exchanges: usize = topo.vhosts().map(|v| v.exchanges.len()).sum();
    Ok((
        StatusCode::OK,
        json!({
            "product_name": "Sluice",
            "product_version": env!("CARGO_PKG_VERSION"),
            "object_totals": {
                "queues": queues,
                "exchanges": exchanges,
                "vhosts": topo.vhosts().count(),
                "users": auth.users.len(),
                "connections": crate::metrics::CONNECTIONS.load(std::sync::atomic::Ordering::Relaxed),
            },
        }),
    ))
}

fn user_json(name: &str, u: &sluice_cluster::meta::auth::User) -> Value {
    json!({ "name": name, "password_hash": u.password_hash, "hashing_algorithm": HASHING_SHA256, "tags": u.tags, "limits": {} })
}

fn permission_json(vhost: &str, user: &str, p: &Permission) -> Value {
    json!({ "user": user, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read })
}

/// RabbitMQ takes tags as a comma-separated string or (definitions of 3.9
/// and later) a list.
fn tags_of(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::String(s) => Some(s.split(',').map(str::trim).filter(|t| !t.is_empty()).map(str::to_owned).collect()),
        Value::Array(a) => Some(a.iter().filter_map(|t| t.as_str().map(str::to_owned)).collect()),
        _ => None,
    }
}

fn put_user(name: &str, body: &Value) -> Result<AuthCommand, Fail> {
    let password_hash = match (body["password"].as_str(), body["password_hash"].as_str()) {
        (Some(p), _) => Some(hash_password(p)),
        (None, Some(h)) => {
            let algorithm = body["hashing_algorithm"].as_str().unwrap_or(HASHING_SHA256);
            if algorithm != HASHING_SHA256 {
                return Err(Fail::bad(format!("hashing algorithm '{algorithm}' is not supported (only {HASHING_SHA256})")));
            }
            Some(h.to_owned())
        }
        (None, None) => None,
    };
    Ok(AuthCommand::PutUser { name: name.to_owned(), password_hash, tags: tags_of(&body["tags"]), if_absent: false })
}

fn permission_of(body: &Value) -> Result<Permission, Fail> {
    let field = |k: &str| body[k].as_str().map(str::to_owned).ok_or_else(|| Fail::bad(format!("permissions need \"{k}\"")));
    Ok(Permission { configure: field("configure")?, write: field("write")?, read: field("read")? })
}

async fn queues(router: &Router, only: Option<&str>) -> Answer {
    let (topo, _) = router.snapshot();
    let mut rows = Vec::new();
    for vh in topo.vhosts().filter(|v| only.is_none_or(|o| o == v.name)) {
        let handle = router.vhost(&vh.name);
        for q in vh.queues.values() {
            let (messages, consumers) = match &handle {
                Some(h) => match router.queue(h, q.exclusive_owner.map_or(ADMIN_CONN, |o| o.0), &q.name) {
                    Ok(entry) => entry.counts().await.unwrap_or((0, 0)),
                    Err(_) => (0, 0),
                },
                None => (0, 0),
            };
            rows.push(json!({
                "name": q.name,
                "vhost": vh.name,
                "durable": q.durable,
                "auto_delete": q.auto_delete,
                "exclusive": q.exclusive_owner.is_some(),
                "arguments": arguments_json(&q.arguments),
                "messages_ready": messages,
                "consumers": consumers,
            }));
        }
    }
    if let Some(v) = only {
        if topo.vhost(v).is_none() {
            return Err(Fail::not_found(format!("no vhost '{v}'")));
        }
    }
    Ok((StatusCode::OK, Value::Array(rows)))
}

fn exchanges(topo: &Topology, only: Option<&str>) -> Value {
    let mut rows = Vec::new();
    for vh in topo.vhosts().filter(|v| only.is_none_or(|o| o == v.name)) {
        for e in vh.exchanges.values() {
            rows.push(json!({
                "name": e.name,
                "vhost": vh.name,
                "type": e.kind.as_str(),
                "durable": e.durable,
                "auto_delete": e.auto_delete,
                "internal": e.internal,
                "arguments": arguments_json(&e.arguments),
            }));
        }
    }
    Value::Array(rows)
}

fn bindings(topo: &Topology, only: Option<&str>) -> Value {
    let mut rows = Vec::new();
    for vh in topo.vhosts().filter(|v| only.is_none_or(|o| o == v.name)) {
        for e in vh.exchanges.values() {
            for b in &e.bindings {
                let (dest, kind) = match &b.dest {
                    Dest::Queue(q) => (q, "queue"),
                    Dest::Exchange(x) => (x, "exchange"),
                };
                rows.push(json!({
                    "source": e.name,
                    "vhost": vh.name,
                    "destination": dest,
                    "destination_type": kind,
                    "routing_key": b.routing_key,
                    "arguments": arguments_json(&b.arguments),
                }));
            }
        }
    }
    Value::Array(rows)
}

/// RabbitMQ's definitions export: users, vhosts, permissions, durable
/// non-exclusive queues, durable exchanges (not the standard ones) and the
/// bindings between those.
fn export(router: &Router) -> Value {
    let (topo, auth) = router.snapshot();
    let users: Vec<Value> = auth.users.iter().map(|(n, u)| user_json(n, u)).collect();
    let vhosts: Vec<Value> = topo.vhosts().map(|v| json!({ "name": v.name, "limits": [], "metadata": {} })).collect();
    let permissions: Vec<Value> =
        auth.permissions.iter().flat_map(|(v, users)| users.iter().map(move |(u, p)| permission_json(v, u, p))).collect();
    let mut queues = Vec::new();
    let mut exchanges = Vec::new();
    let mut bindings = Vec::new();
    for vh in topo.vhosts() {
        for q in vh.queues.values().filter(|q| q.durable && q.exclusive_owner.is_none()) {
            queues.push(json!({
                "name": q.name,
                "vhost": vh.name,
                "durable": true,
                "auto_delete": q.auto_delete,
                "arguments": arguments_json(&q.arguments),
            }));
        }
        for e in vh.exchanges.values() {
            let standard = e.name.is_empty() || e.name.starts_with("amq.");
            if e.durable && !standard {
                exchanges.push(json!({
                    "name": e.name,
                    "vhost": vh.name,
                    "type": e.kind.as_str(),
                    "durable": true,
                    "auto_delete": e.auto_delete,
                    "internal": e.internal,
                    "arguments": arguments_json(&e.arguments),
                }));
            }
            for b in &e.bindings {
                let (dest, kind, durable) = match &b.dest {
                    Dest::Queue(q) => (q, "queue", vh.queues.get(q).is_some_and(|d| d.durable && d.exclusive_owner.is_none())),
                    Dest::Exchange(x) => (x, "exchange", vh.exchanges.get(x).is_some_and(|d| d.durable)),
                };
                if durable && e.durable {
                    bindings.push(json!({
                        "source": e.name,
                        "vhost": vh.name,
                        "destination": dest,
                        "destination_type": kind,
                        "routing_key": b.routing_key,
                        "arguments": arguments_json(&b.arguments),
                    }));
                }
            }
        }
    }
    json!({
        "rabbit_version": "3.10.0",
        "rabbitmq_version": "3.10.0",
        "product_name": "Sluice",
        "product_version": env!("CARGO_PKG_VERSION"),
        "users": users,
        "vhosts": vhosts,
        "permissions": permissions,
        "topic_permissions": [],
        "parameters": [],
        "global_parameters": [],
        "policies": [],
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    })
}

/// Loads RabbitMQ definitions: vhosts, users, permissions, exchanges,
/// queues, bindings, in that order (what exists already is updated where
/// RabbitMQ would, or must be equivalent). Sections Sluice does not have
/// (policies, parameters, topic permissions) are refused when not empty.
async fn import(router: &Router, defs: &Value) -> Result<(), Fail> {
    let list = |k: &str| defs.get(k).and_then(Value::as_array).cloned().unwrap_or_default();
    for unsupported in ["policies", "parameters", "global_parameters", "topic_permissions"] {
        if !list(unsupported).is_empty() && unsupported != "global_parameters" {
            return Err(Fail::bad(format!("definitions: \"{unsupported}\" are not supported by Sluice")));
        }
    }
    let text = |v: &Value, k: &str, what: &str| -> Result<String, Fail> {
        v[k].as_str().map(str::to_owned).ok_or_else(|| Fail::bad(format!("definitions: a {what} without \"{k}\"")))
    };
    for v in list("vhosts") {
        router.add_vhost(&text(&v, "name", "vhost")?).await?;
    }
    for u in list("users") {
        let name = text(&u, "name", "user")?;
        router.execute_auth(put_user(&name, &u)?).await?;
    }
    for p in list("permissions") {
        let (vhost, user) = (text(&p, "vhost", "permission")?, text(&p, "user", "permission")?);
        router.execute_auth(AuthCommand::SetPermissions { vhost, user, permission: permission_of(&p)? }).await?;
    }
    for e in list("exchanges") {
        let vh = vhost(router, &text(&e, "vhost", "exchange")?)?;
        let kind = text(&e, "type", "exchange")?;
        router
            .declare_exchange(
                &vh,
                &text(&e, "name", "exchange")?,
                &kind,
                false,
                e["durable"].as_bool().unwrap_or(true),
                e["auto_delete"].as_bool().unwrap_or(false),
                e["internal"].as_bool().unwrap_or(false),
                arguments_of(&e["arguments"])?,
            )
            .await?;
    }
    for q in list("queues") {
        let vh = vhost(router, &text(&q, "vhost", "queue")?)?;
        let mut arguments = arguments_of(&q["arguments"])?;
        // RabbitMQ's exports name the queue type; Sluice has one.
        if let Some(t) = arguments.get("x-queue-type").and_then(|v| v.as_str()) {
            if !matches!(t, "classic" | "quorum") {
                return Err(Fail::bad(format!("definitions: queue type '{t}' is not supported")));
            }
        }
        arguments.0.retain(|(k, _)| k != "x-queue-type");
        let d = QueueDeclare {
            name: text(&q, "name", "queue")?,
            passive: false,
            durable: q["durable"].as_bool().unwrap_or(true),
            exclusive: false,
            auto_delete: q["auto_delete"].as_bool().unwrap_or(false),
            arguments,
            nowait: true,
        };
        router.declare_queue(&vh, ADMIN_CONN, d).await?;
    }
    for b in list("bindings") {
        let vh = vhost(router, &text(&b, "vhost", "binding")?)?;
        let kind = match b["destination_type"].as_str() {
            Some("queue") => "q",
            Some("exchange") => "e",
            _ => return Err(Fail::bad("definitions: a binding's destination_type is queue or exchange")),
        };
        let dest = dest_of(kind, &text(&b, "destination", "binding")?)?;
        let key = b["routing_key"].as_str().unwrap_or_default();
        router.bind(&vh, ADMIN_CONN, &text(&b, "source", "binding")?, dest, key, arguments_of(&b["arguments"])?).await?;
    }
    Ok(())
}

/// JSON → AMQP field table (strings, integers, floats, booleans, lists,
/// objects, null).
fn arguments_of(v: &Value) -> Result<Arguments, Fail> {
    match v {
        Value::Null => Ok(Arguments::default()),
        Value::Object(m) => {
            let mut t = Arguments::default();
            for (k, v) in m {
                t.insert(k.clone(), field_of(v));
            }
            Ok(t)
        }
        _ => Err(Fail::bad("\"arguments\" must be an object")),
    }
}

fn field_of(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => FieldValue::F64(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => FieldValue::LongString(Bytes::from(s.clone())),
        Value::Array(a) => FieldValue::Array(a.iter().map(field_of).collect()),
        Value::Object(m) => {
            let mut t = Arguments::default();
            for (k, v) in m {
                t.insert(k.clone(), field_of(v));
            }
            FieldValue::Table(t)
        }
    }
}

fn arguments_json(t: &Arguments) -> Value {
    Value::Object(t.iter().map(|(k, v)| (k.to_owned(), field_json(v))).collect())
}

fn field_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => json!(b),
        FieldValue::F32(f) => json!(f),
        FieldValue::F64(f) => json!(f),
        FieldValue::LongString(s) | FieldValue::ByteArray(s) => json!(String::from_utf8_lossy(s)),
        FieldValue::Array(a) => Value::Array(a.iter().map(field_json).collect()),
        FieldValue::Table(t) => arguments_json(t),
        FieldValue::Timestamp(t) => json!(t),
        FieldValue::Void => Value::Null,
        FieldValue::Decimal(_) => json!(format!("{v:?}")),
        other => json!(other.as_i64()),
    }
}
