//! `sluice node`: a storage node of the cluster.
//!
//! Today it opens (and locks) its data directory, loads the cluster secret
//! and serves the node protocol with the status messages below; replicas
//! of queues and the metadata group are added on this skeleton (see
//! docs/cluster.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sluice_storage::{Store, StoreOptions};
use tokio::net::TcpListener;

use crate::rpc::{self, Client, Handler, PeerInfo, Secret, Versioned};

/// Requests a node answers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeRequest {
    /// Who are you? (`sluice ctl status`, gateways checking their nodes.)
    Status,
}

impl Versioned for NodeRequest {}

/// Answers of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum NodeResponse {
    Status(NodeStatus),
}

impl Versioned for NodeResponse {}

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
}

/// How to run a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    pub id: String,
    pub data_dir: PathBuf,
    pub listen: String,
    pub seeds: Vec<String>,
    pub secret: Secret,
}

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot listen on {addr} for the node protocol: {source}")]
    Listen { addr: String, source: std::io::Error },
    #[error("cannot open data dir {}: {source}", .dir.display())]
    DataDir { dir: PathBuf, source: sluice_storage::Error },
}

struct StatusHandler {
    status: NodeStatus,
    started: Instant,
}

impl Handler<NodeRequest, NodeResponse> for StatusHandler {
    async fn handle(&self, _conn: &Client<NodeRequest, NodeResponse>, req: NodeRequest) -> NodeResponse {
        match req {
            NodeRequest::Status => {
                let mut status = self.status.clone();
                status.uptime_ms = self.started.elapsed().as_millis() as u64;
                NodeResponse::Status(status)
            }
        }
    }
}

/// A node that is listening.
pub struct Node {
    /// The address actually bound (port 0 picks a free one).
    pub addr: SocketAddr,
    store: Store,
    serve: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Opens the data directory, binds the listener and starts serving.
    pub async fn start(options: NodeOptions) -> Result<Node, NodeError> {
        let listener = TcpListener::bind(&options.listen)
            .await
            .map_err(|source| NodeError::Listen { addr: options.listen.clone(), source })?;
        let addr = listener.local_addr().map_err(|source| NodeError::Listen { addr: options.listen.clone(), source })?;
        let dir = options.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || Store::open(&dir, StoreOptions::default()))
            .await
            .map_err(|e| NodeError::DataDir {
                dir: options.data_dir.clone(),
                source: sluice_storage::Error::InvalidOp(e.to_string()),
            })?
            .map_err(|source| NodeError::DataDir { dir: options.data_dir.clone(), source })?;
        let started_at_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
        let handler = StatusHandler {
            status: NodeStatus {
                node_id: options.id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                listen: addr.to_string(),
                seeds: options.seeds.clone(),
                uptime_ms: 0,
                started_at_ms,
            },
            started: Instant::now(),
        };
        let me = PeerInfo::node(options.id.clone());
        let serve = tokio::spawn(rpc::serve(listener, options.secret.clone(), me, handler));
        Ok(Node { addr, store, serve })
    }

    /// Stops serving and closes storage (flushing it).
    pub async fn stop(self) -> Result<(), sluice_storage::Error> {
        self.serve.abort();
        let store = self.store;
        tokio::task::spawn_blocking(move || store.close())
            .await
            .map_err(|e| sluice_storage::Error::InvalidOp(e.to_string()))?
    }
}

/// Asks the node at `addr` for its status (used by `sluice ctl status`).
pub async fn status(addr: &str, secret: &Secret, me: PeerInfo) -> Result<NodeStatus, rpc::Error> {
    let (client, _incoming) = rpc::connect::<NodeRequest, NodeResponse>(addr, secret, me).await?;
    let NodeResponse::Status(status) = client.call(NodeRequest::Status).await?;
    client.close();
    Ok(status)
}
