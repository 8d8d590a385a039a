//! `sluice serve`: opens storage, binds the listeners, accepts connections
//! and shuts down cleanly on SIGTERM or ctrl-c.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_cluster::remote::{RemoteBackend, RemoteOptions};
use sluice_cluster::embedded::{Embedded, EmbeddedOptions};
use sluice_cluster::Backend;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::alarm::{AlarmLimits, Alarms};
use crate::config::{Config, Frontend, GatewayConfig};
use crate::auth::Peer;
use sluice_cluster::meta::auth::{hash_password, AuthCommand, Permission};
use crate::router::Router;

/// Negotiation limits offered to clients.
#[derive(Clone, Debug)]
pub struct Limits {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub max_message_size: u64,
    /// Server-wide consumer timeout (ms): `None` = never.
    pub consumer_timeout_ms: Option<u64>,
    /// Memory and free-disk alarm thresholds (at start; SIGHUP reloads them
    /// into [`Broker::alarms`]).
    pub alarm: crate::alarm::AlarmLimits,
    /// Most client connections at once (`None`: no limit).
    pub max_connections: Option<u64>,
    /// Most consumers per AMQP channel (`None`: no limit).
    pub consumer_max_per_channel: Option<u32>,
}

/// What every connection shares.
pub struct Broker {
    pub router: Arc<Router>,
    /// Users who may log in from loopback addresses only.
    pub loopback_users: Vec<String>,
    pub limits: Limits,
    /// Memory and disk alarms: publishers are not read while one is on.
    pub alarms: Arc<Alarms>,
    next_conn: AtomicU64,
    /// Sessions past login, for `max_connections`.
    sessions: Arc<AtomicU64>,
}

impl Broker {
    /// The broker, once the configuration file's users exist in the
    /// metadata (created if missing: hashed password, tag administrator,
    /// all permissions on `/`; an existing user is left as it is).
    async fn start(router: Arc<Router>, front: &Frontend, first_conn: u64, disk: Option<PathBuf>) -> anyhow::Result<Arc<Broker>> {
        let mut names: Vec<&String> = front.users.keys().collect();
        names.sort();
        for name in names {
            if router.user_exists(name) {
                continue;
            }
            let password = front.users.get(name).map(String::as_str).unwrap_or_default();
            let put = AuthCommand::PutUser {
                name: name.clone(),
                password_hash: Some(hash_password(password)),
                tags: Some(vec!["administrator".into()]),
                if_absent: true,
            };
            router.execute_auth(put).await.map_err(|e| anyhow::anyhow!("creating user '{name}' from the configuration: {e}"))?;
            let perm = AuthCommand::SetPermissions { vhost: "/".into(), user: name.clone(), permission: Permission::all() };
            router.execute_auth(perm).await.map_err(|e| anyhow::anyhow!("permissions of user '{name}': {e}"))?;
            tracing::info!(user = %name, "user created from the configuration file");
        }
        Ok(Self::new(router, front, first_conn, disk))
    }

    /// `disk`: the data directory whose free space is watched (`None` for
    /// a gateway, which stores nothing).
    fn new(router: Arc<Router>, front: &Frontend, first_conn: u64, disk: Option<PathBuf>) -> Arc<Broker> {
        Arc::new(Broker {
            router,
            loopback_users: front.loopback_users.clone(),
            limits: front.limits.clone(),
            alarms: Alarms::new(front.limits.alarm, disk),
            next_conn: AtomicU64::new(first_conn),
            sessions: Arc::new(AtomicU64::new(0)),
        })
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Counts a session that passed login against `max_connections`; the
    /// slot is given back when the returned guard drops. `Err` carries the
    /// text to refuse with (RabbitMQ's).
    pub fn admit(&self) -> Result<SessionSlot, String> {
        let n = self.sessions.fetch_add(1, Ordering::AcqRel);
        let slot = SessionSlot(self.sessions.clone());
        match self.limits.max_connections {
            Some(max) if n >= max => Err(format!("connection refused: node connection limit ({max}) is reached")),
            _ => Ok(slot),
        }
    }
}

/// A single-node broker on `data_dir` (no fsync) without listeners,
/// users but RabbitMQ's `guest`, or alarms: the fuzz targets (`fuzz/`)
/// hand it in-memory streams through `amqp::connection::serve` and
/// `stomp::connection::serve`. Limits are the configuration's defaults.
#[doc(hidden)]
pub async fn broker_without_listeners(data_dir: PathBuf) -> anyhow::Result<Arc<Broker>> {
    let options = EmbeddedOptions { sync: false, ..EmbeddedOptions::default() };
    let node = tokio::task::spawn_blocking(move || Embedded::open(&data_dir, options)).await??;
    node.drop_transient_definitions().await?;
    let meta = node.meta_client();
    let backend: Arc<dyn Backend> = node;
    let router = Router::open_with_meta(backend, meta).await.map_err(|e| anyhow::anyhow!("{}", e.text))?;
    let no_alarm = AlarmLimits { memory: crate::alarm::MemoryWatermark::Bytes(u64::MAX), disk_free_limit: 0 };
    let limits = Limits {
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60,
        max_message_size: 128 * 1024 * 1024,
        consumer_timeout_ms: Some(1_800_000),
        alarm: no_alarm,
        max_connections: None,
        consumer_max_per_channel: None,
    };
    Ok(Arc::new(Broker {
        router,
        loopback_users: Vec::new(),
        limits,
        alarms: Alarms::new(no_alarm, None),
        next_conn: AtomicU64::new(1),
        sessions: Arc::new(AtomicU64::new(0)),
    }))
}

/// One admitted session (see [`Broker::admit`]).
pub struct SessionSlot(Arc<AtomicU64>);

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// How long connections get to close at shutdown before we stop waiting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long storage gets to flush at shutdown; past it we exit non-zero
/// rather than hang (everything confirmed was fsynced already).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the all-in-one broker until a shutdown signal.
pub async fn serve(config: Config, reload: Reload) -> anyhow::Result<()> {
    let amqp = TcpListener::bind(&config.front.amqp)
        .await
        .with_context(|| format!("cannot listen on {} for AMQP", config.front.amqp))?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    // Opening storage blocks (journal replay, the first elections): keep
    // it off the async workers.
    let (dir, options) = (config.data_dir.clone(), EmbeddedOptions { sync: config.fsync, body_cache_bytes: usize::try_from(config.body_cache_bytes).unwrap_or(usize::MAX) });
    let node = tokio::task::spawn_blocking(move || Embedded::open(&dir, options))
        .await?
        .with_context(|| format!("cannot open data dir {}", config.data_dir.display()))?;
    node.drop_transient_definitions().await.context("dropping transient definitions")?;
    let meta = node.meta_client();
    let weak = Arc::downgrade(&node);
    let backend: Arc<dyn Backend> = node;
    let router = Router::open_with_meta(backend, meta)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load definitions: {}", e.text))?;
    let broker = Broker::start(router, &config.front, 1, Some(config.data_dir.clone())).await?;
    let metrics_addr = crate::metrics::install(&config.front.metrics)?;
    crate::metrics::spawn_collector(broker.router.clone());
    crate::metrics::spawn_node_collector(move || weak.upgrade().map(|n| n.replication()));
    broker.alarms.spawn_monitor();
    spawn_reload(broker.alarms.clone(), reload)?;
    // Bound after the data dir is open, so that a data-dir error is
    // reported as such whatever holds the STOMP port.
    let listeners = bind_others(amqp, &config.front).await?;
    let signal = shutdown_signal()?;
    let admin_addr = crate::admin::serve(&config.front.admin, broker.router.clone(), CancellationToken::new()).await?;
    println!("sluice {} serving; data dir {}", env!("CARGO_PKG_VERSION"), config.data_dir.display());
    println!("admin API listening on {admin_addr}");
    announce(&listeners)?;
    println!("metrics listening on {metrics_addr}");
    run(listeners, broker, signal).await
}

/// A bound listener and what it serves.
struct Listener {
    socket: TcpListener,
    proto: Proto,
    /// TLS listeners: the handshake runs in each connection's task.
    tls: Option<TlsAcceptor>,
}

/// The listeners besides AMQP (already bound): STOMP, Web-STOMP and the
/// TLS ones that are configured.
async fn bind_others(amqp: TcpListener, front: &Frontend) -> anyhow::Result<Vec<Listener>> {
    let plain = |socket, proto| Listener { socket, proto, tls: None };
    let mut all = vec![plain(amqp, Proto::Amqp)];
    let stomp = TcpListener::bind(&front.stomp).await.with_context(|| format!("cannot listen on {} for STOMP", front.stomp))?;
    all.push(plain(stomp, Proto::Stomp));
    let tls_listeners = [(Proto::Amqps, &front.amqps), (Proto::Stomps, &front.stomps), (Proto::WebStomps, &front.web_stomps)];
    for (proto, addr) in tls_listeners {
        let Some(addr) = addr else { continue };
        // config.rs gives a TLS config whenever a TLS listener is set.
        let Some(config) = front.tls.clone() else {
            anyhow::bail!("the {} listener has no TLS configuration", proto.name());
        };
        let socket = TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} for {}", proto.label()))?;
        all.push(Listener { socket, proto, tls: Some(TlsAcceptor::from(config)) });
    }
    let web = TcpListener::bind(&front.web_stomp)
        .await
        .with_context(|| format!("cannot listen on {} for Web-STOMP", front.web_stomp))?;
    all.push(plain(web, Proto::WebStomp));
    Ok(all)
}

/// Prints "<LABEL> listening on ADDR" for each listener, in the order
/// bound (the test harness reads these lines; Web-STOMP comes last).
fn announce(listeners: &[Listener]) -> anyhow::Result<()> {
    for l in listeners {
        println!("{} listening on {}", l.proto.label(), l.socket.local_addr()?);
    }
    Ok(())
}

/// Runs a gateway in front of storage nodes until a shutdown signal.
pub async fn gateway(config: GatewayConfig, reload: Reload) -> anyhow::Result<()> {
    let secret = crate::config::cluster_credentials(config.cluster_secret_file.as_deref(), config.cluster_tls.as_ref())?;
    let amqp = TcpListener::bind(&config.front.amqp)
        .await
        .with_context(|| format!("cannot listen on {} for AMQP", config.front.amqp))?;
    // A restarted gateway is a new one to the nodes: the incarnation makes
    // its id unique, so what the previous process's consumers held is
    // requeued rather than handed to the new one.
    let incarnation = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let gateway_id = format!("{}@{incarnation}", config.id);
    let backend = RemoteBackend::new(RemoteOptions::new(gateway_id.clone(), config.nodes.clone(), secret.clone()));
    let router = Router::open_cluster(backend)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the storage nodes {}: {}", config.nodes.join(","), e.text))?;
    // Connection ids own exclusive queues across the cluster: the
    // gateway's tag in the high half lets the nodes delete a vanished
    // gateway's exclusive queues.
    let first_conn = (u64::from(sluice_cluster::remote::owner_tag(&gateway_id)) << 32) | 1;
    let broker = Broker::start(router, &config.front, first_conn, None).await?;
    let metrics_addr = crate::metrics::install(&config.front.metrics)?;
    crate::metrics::spawn_collector(broker.router.clone());
    broker.alarms.spawn_monitor();
    spawn_reload(broker.alarms.clone(), reload)?;
    spawn_node_alarms(broker.alarms.clone(), config.nodes.clone(), secret, format!("{gateway_id}/alarms"));
    let listeners = bind_others(amqp, &config.front).await?;
    let signal = shutdown_signal()?;
    let admin_addr = crate::admin::serve(&config.front.admin, broker.router.clone(), CancellationToken::new()).await?;
    println!("sluice gateway {gateway_id} ({}) in front of {}", env!("CARGO_PKG_VERSION"), config.nodes.join(","));
    println!("admin API listening on {admin_addr}");
    // Before the listeners: the Web-STOMP line comes last.
    println!("metrics listening on {metrics_addr}");
    announce(&listeners)?;
    run(listeners, broker, signal).await
}

/// How often a gateway re-reads the member list for its alarm probes.
const MEMBERS_EVERY: u32 = 10;

/// A gateway's view of the storage nodes' resource alarms: every
/// [`crate::alarm::CHECK_EVERY`] it asks each member (over one standing
/// link per node) and blocks its publishers while any node has an alarm,
/// as RabbitMQ blocks publishers cluster-wide. A node that does not answer
/// counts as without alarm (it stores nothing meanwhile).
fn spawn_node_alarms(alarms: Arc<Alarms>, seeds: Vec<String>, secret: sluice_cluster::rpc::Secret, me: String) {
    use sluice_cluster::node::{self, AlarmProbe};
    use sluice_cluster::rpc::PeerInfo;
    tokio::spawn(async move {
        let me = PeerInfo::gateway(me);
        let timeout = crate::alarm::CHECK_EVERY;
        let mut probes: Vec<AlarmProbe> = seeds.iter().map(|a| AlarmProbe::new(a.clone(), secret.clone(), me.clone())).collect();
        let mut tick = tokio::time::interval(crate::alarm::CHECK_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round = 0u32;
        loop {
            tick.tick().await;
            if round.is_multiple_of(MEMBERS_EVERY) {
                // The members as any node knows them (seeds first).
                for addr in seeds.iter().chain(probes.iter().map(|p| &p.addr)).cloned().collect::<Vec<_>>() {
                    if let Ok(Ok(rows)) = tokio::time::timeout(timeout, node::members(&addr, &secret, me.clone())).await {
                        let known: Vec<String> = rows.into_iter().map(|m| m.addr).collect();
                        probes.retain(|p| known.contains(&p.addr));
                        for a in known {
                            if !probes.iter().any(|p| p.addr == a) {
                                probes.push(AlarmProbe::new(a, secret.clone(), me.clone()));
                            }
                        }
                        break;
                    }
                }
            }
            round = round.wrapping_add(1);
            let answers = futures_util::future::join_all(probes.iter_mut().map(|p| async move {
                let r = p.ask(timeout).await;
                (p.addr.clone(), r)
            }))
            .await;
            let mut state = crate::alarm::AlarmState::default();
            let mut who = Vec::new();
            for (addr, r) in answers {
                if let Ok((memory, disk)) = r {
                    if memory || disk {
                        who.push(addr);
                    }
                    state.memory |= memory;
                    state.disk |= disk;
                }
            }
            alarms.set_remote(state, &who.join(","));
        }
    });
}

/// Accepts connections until `signal`, then drains them and shuts the
/// backend down.
async fn run(listeners: Vec<Listener>, broker: Arc<Broker>, signal: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutdown signal received");
        on_signal.cancel();
    });
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|l| tokio::spawn(accept_loop(l, broker.clone(), shutdown.clone(), tracker.clone())))
        .collect();
    for l in loops {
        let _ = l.await;
    }

    tracker.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close in time");
    }
    let backend = broker.router.backend().clone();
    let flush = tokio::task::spawn_blocking(move || backend.shutdown());
    match tokio::time::timeout(FLUSH_TIMEOUT, flush).await {
        Ok(joined) => joined?.context("flushing storage")?,
        Err(_) => anyhow::bail!("storage did not flush within {} s", FLUSH_TIMEOUT.as_secs()),
    }
    println!("sluice stopped");
    Ok(())
}

/// Which protocol a listener speaks.
#[derive(Clone, Copy)]
enum Proto {
    Amqp,
    Stomp,
    WebStomp,
    Amqps,
    Stomps,
    WebStomps,
}

impl Proto {
    /// The name in logs and config keys.
    fn name(self) -> &'static str {
        match self {
            Proto::Amqp => "amqp",
            Proto::Stomp => "stomp",
            Proto::WebStomp => "web-stomp",
            Proto::Amqps => "amqps",
            Proto::Stomps => "stomps",
            Proto::WebStomps => "web-stomps",
        }
    }

    /// The name in the "listening on" line.
    fn label(self) -> &'static str {
        match self {
            Proto::Amqp => "AMQP",
            Proto::Stomp => "STOMP",
            Proto::WebStomp => "Web-STOMP",
            Proto::Amqps => "AMQPS",
            Proto::Stomps => "STOMPS",
            Proto::WebStomps => "Web-STOMPS",
        }
    }
}

/// How long a client gets to finish its TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

async fn accept_loop(listener: Listener, broker: Arc<Broker>, shutdown: CancellationToken, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            a = listener.socket.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                let conn_id = broker.next_conn_id();
                // user and vhost are recorded once the login succeeds. At
                // level ERROR so that no log_level filters it out: events
                // of every level inside the connection carry its fields.
                let span = tracing::error_span!(
                    "conn",
                    id = conn_id,
                    %peer,
                    proto = listener.proto.name(),
                    user = tracing::field::Empty,
                    vhost = tracing::field::Empty
                );
                let conn = connection(socket, listener.proto, listener.tls.clone(), conn_id, broker.clone(), shutdown.clone());
                tracker.spawn(crate::metrics::tracked(conn).instrument(span));
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One accepted connection, run in its own task: the TLS handshake (with a
/// deadline, so a silent client holds only its own task), then the session.
async fn connection(
    socket: TcpStream,
    proto: Proto,
    tls: Option<TlsAcceptor>,
    conn_id: u64,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
) {
    let addr = socket.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let loopback = socket.peer_addr().is_ok_and(|a| match a.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
    });
    let Some(acceptor) = tls else {
        let (rd, wr) = socket.into_split();
        return session(rd, wr, proto, conn_id, broker, shutdown, Peer { cert_user: None, loopback, addr }).await;
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(socket)) => r,
        _ = shutdown.cancelled() => return,
    };
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            return;
        }
    };
    // Only a certificate that passed verification against tls_ca is
    // there: the verifier refuses the handshake otherwise.
    let cert_user = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| sluice_cluster::tls::subject_cn(leaf));
    tracing::debug!(cert_user = ?cert_user, "TLS handshake done");
    let (rd, wr) = tokio::io::split(stream);
    session(rd, wr, proto, conn_id, broker, shutdown, Peer { cert_user, loopback, addr }).await
}

/// The protocol session over a byte stream's halves. `cert_user`: the
/// subject CN of the client's verified certificate (EXTERNAL logins).
async fn session<R, W>(
    rd: R,
    wr: W,
    proto: Proto,
    conn_id: u64,
    broker: Arc<Broker>,
    shutdown: CancellationToken,
    peer: Peer,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    match proto {
        Proto::Amqp | Proto::Amqps => crate::amqp::serve(rd, wr, conn_id, broker, shutdown, peer).await,
        Proto::Stomp | Proto::Stomps => crate::stomp::serve(rd, wr, conn_id, broker, shutdown, peer).await,
        Proto::WebStomp | Proto::WebStomps => crate::stomp::websocket::serve(rd, wr, conn_id, broker, shutdown, peer).await,
    }
}

/// Reads the alarm limits again (flags and environment as at start over
/// the config file as it is now).
pub type Reload = Box<dyn Fn() -> anyhow::Result<AlarmLimits> + Send + Sync>;

/// On SIGHUP, reloads the alarm limits (RabbitMQ changes them at run time
/// with `rabbitmqctl set_vm_memory_high_watermark` / `set_disk_free_limit`);
/// a config that does not load keeps the old limits.
pub fn spawn_reload(alarms: Arc<Alarms>, reload: Reload) -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                match reload() {
                    Ok(limits) => {
                        tracing::info!(?limits, "SIGHUP: resource limits reloaded");
                        let a = alarms.clone();
                        let _ = tokio::task::spawn_blocking(move || a.set_limits(limits)).await;
                    }
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "SIGHUP: config not reloaded; keeping the old limits"),
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop((alarms, reload));
    Ok(())
}

/// Resolves on SIGTERM or ctrl-c. The handlers are installed when this is
/// called (not when first polled), so a signal that arrives right after the
/// listening line is printed already shuts down cleanly.
pub fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
