//! `sluice serve`: opens storage, binds the listeners, accepts connections
//! and shuts down cleanly on SIGTERM or ctrl-c.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sluice_cluster::remote::{RemoteBackend, RemoteOptions};
use sluice_cluster::rpc::Secret;
use sluice_cluster::embedded::{Embedded, EmbeddedOptions};
use sluice_cluster::Backend;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::config::{Config, Frontend, GatewayConfig};
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
}

/// What every connection shares.
pub struct Broker {
    pub router: Arc<Router>,
    pub users: HashMap<String, String>,
    pub limits: Limits,
    next_conn: AtomicU64,
}

impl Broker {
    fn new(router: Arc<Router>, front: &Frontend, first_conn: u64) -> Arc<Broker> {
        Arc::new(Broker {
            router,
            users: front.users.clone(),
            limits: front.limits.clone(),
            next_conn: AtomicU64::new(first_conn),
        })
    }

    pub fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }
}

/// How long connections get to close at shutdown before we stop waiting.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long storage gets to flush at shutdown; past it we exit non-zero
/// rather than hang (everything confirmed was fsynced already).
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the all-in-one broker until a shutdown signal.
pub async fn serve(config: Config) -> anyhow::Result<()> {
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
    let backend: Arc<dyn Backend> = node;
    let router = Router::open_with_meta(backend, meta)
        .await
        .map_err(|e| anyhow::anyhow!("cannot load definitions: {}", e.text))?;
    let broker = Broker::new(router, &config.front, 1);
    let metrics_addr = crate::metrics::install(&config.front.metrics)?;
    crate::metrics::spawn_collector(broker.router.clone());
    // Bound after the data dir is open, so that a data-dir error is
    // reported as such whatever holds the STOMP port.
    let (stomp, web_stomp) = bind_stomp(&config.front).await?;
    let addr = amqp.local_addr()?;
    let signal = shutdown_signal()?;
    println!("sluice {} serving; data dir {}", env!("CARGO_PKG_VERSION"), config.data_dir.display());
    println!("AMQP listening on {addr}");
    println!("STOMP listening on {}", stomp.local_addr()?);
    println!("Web-STOMP listening on {}", web_stomp.local_addr()?);
    println!("metrics listening on {metrics_addr}");
    run(amqp, stomp, web_stomp, broker, signal).await
}

/// The STOMP and Web-STOMP listeners.
async fn bind_stomp(front: &Frontend) -> anyhow::Result<(TcpListener, TcpListener)> {
    let stomp = TcpListener::bind(&front.stomp).await.with_context(|| format!("cannot listen on {} for STOMP", front.stomp))?;
    let web = TcpListener::bind(&front.web_stomp)
        .await
        .with_context(|| format!("cannot listen on {} for Web-STOMP", front.web_stomp))?;
    Ok((stomp, web))
}

/// Runs a gateway in front of storage nodes until a shutdown signal.
pub async fn gateway(config: GatewayConfig) -> anyhow::Result<()> {
    let secret = Secret::load_or_create(config.cluster_secret_file.as_deref()).context("cluster secret")?;
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
    let backend = RemoteBackend::new(RemoteOptions::new(gateway_id.clone(), config.nodes.clone(), secret));
    let router = Router::open_cluster(backend)
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach the storage nodes {}: {}", config.nodes.join(","), e.text))?;
    // Connection ids own exclusive queues across the cluster: the
    // gateway's tag in the high half lets the nodes delete a vanished
    // gateway's exclusive queues.
    let first_conn = (u64::from(sluice_cluster::remote::owner_tag(&gateway_id)) << 32) | 1;
    let broker = Broker::new(router, &config.front, first_conn);
    let metrics_addr = crate::metrics::install(&config.front.metrics)?;
    crate::metrics::spawn_collector(broker.router.clone());
    let (stomp, web_stomp) = bind_stomp(&config.front).await?;
    let addr = amqp.local_addr()?;
    let signal = shutdown_signal()?;
    println!("sluice gateway {gateway_id} ({}) in front of {}", env!("CARGO_PKG_VERSION"), config.nodes.join(","));
    println!("AMQP listening on {addr}");
    println!("STOMP listening on {}", stomp.local_addr()?);
    println!("Web-STOMP listening on {}", web_stomp.local_addr()?);
    println!("metrics listening on {metrics_addr}");
    run(amqp, stomp, web_stomp, broker, signal).await
}

/// Accepts connections until `signal`, then drains them and shuts the
/// backend down.
async fn run(amqp: TcpListener, stomp: TcpListener, web_stomp: TcpListener, broker: Arc<Broker>, signal: impl std::future::Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        signal.await;
        tracing::info!("shutdown signal received");
        on_signal.cancel();
    });
    let stomp_loop = tokio::spawn(accept_loop(stomp, Proto::Stomp, broker.clone(), shutdown.clone(), tracker.clone()));
    let web_loop = tokio::spawn(accept_loop(web_stomp, Proto::WebStomp, broker.clone(), shutdown.clone(), tracker.clone()));
    accept_loop(amqp, Proto::Amqp, broker.clone(), shutdown.clone(), tracker.clone()).await;
    let _ = stomp_loop.await;
    let _ = web_loop.await;

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
}

async fn accept_loop(listener: TcpListener, proto: Proto, broker: Arc<Broker>, shutdown: CancellationToken, tracker: TaskTracker) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => return,
        };
        match accepted {
            Ok((socket, peer)) => {
                let _ = socket.set_nodelay(true);
                spawn_connection(socket, peer, proto, &broker, &shutdown, &tracker);
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn spawn_connection(
    socket: tokio::net::TcpStream,
    peer: SocketAddr,
    proto: Proto,
    broker: &Arc<Broker>,
    shutdown: &CancellationToken,
    tracker: &TaskTracker,
) {
    let conn_id = broker.next_conn_id();
    if let Proto::WebStomp = proto {
        let span = tracing::info_span!("conn", id = conn_id, %peer, proto = "web-stomp");
        tracker.spawn(crate::metrics::tracked(crate::stomp::websocket::serve(socket, conn_id, broker.clone(), shutdown.clone())).instrument(span));
        return;
    }
    let (rd, wr) = socket.into_split();
    match proto {
        Proto::Amqp => {
            let span = tracing::info_span!("conn", id = conn_id, %peer, proto = "amqp");
            tracker.spawn(crate::metrics::tracked(crate::amqp::serve(rd, wr, conn_id, broker.clone(), shutdown.clone())).instrument(span));
        }
        Proto::Stomp => {
            let span = tracing::info_span!("conn", id = conn_id, %peer, proto = "stomp");
            tracker.spawn(crate::metrics::tracked(crate::stomp::serve(rd, wr, conn_id, broker.clone(), shutdown.clone())).instrument(span));
        }
        Proto::WebStomp => {}
    }
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
