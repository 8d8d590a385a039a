//! [`Embedded`]: `sluice serve` as a cluster of one in-process node.
//!
//! The same code as a cluster, without the network: a [`Host`] (the node:
//! a metadata Raft group and one Raft group per queue, each with this node
//! as its only voter, on one fjall store) and, in the same process, the
//! gateway's router following the metadata through [`LocalMeta`] and using
//! the queue replicas directly through the [`Queue`] trait. A Raft group
//! with one voter commits as soon as its own log write is durable, so a
//! confirm costs one (shared) fsync, as before.
//!
//! Restart semantics are a single RabbitMQ node's: non-durable queues and
//! exchanges, and exclusive queues, are gone after a restart
//! ([`Embedded::drop_transient_definitions`]), and queues drop their
//! non-persistent messages when they reopen; what a consumer held when the
//! process stopped is ready again, flagged redelivered.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_storage::{Store, StoreOptions};

use crate::backend::{ready, Backend, Queue, QueueId, QueueSpec, Reply};
use crate::meta::client::{LocalMeta, MetaClient};
use crate::meta::replica::{MetaCommand, MetaResult};
use crate::meta::{Command, Owner};
use crate::node::host::Host;
use crate::node::{MemberInfo, Membership, MembershipOptions};
use crate::rpc::Secret;
use crate::Error;

/// This node's id in its cluster of one.
pub const NODE_ID: &str = "local";

/// How long opening waits for the metadata group to elect itself.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of [`Embedded::open`].
#[derive(Clone, Debug)]
pub struct EmbeddedOptions {
    /// fsync before confirming (false loses data on power failure).
    pub sync: bool,
    /// RAM per queue for recent message bodies (0: the default, 16 MiB);
    /// older ones are read back from the log.
    pub body_cache_bytes: usize,
}

impl Default for EmbeddedOptions {
    fn default() -> Self {
        EmbeddedOptions { sync: true, body_cache_bytes: 0 }
    }
}

/// See the module docs.
pub struct Embedded {
    host: Arc<Host>,
    store: Store,
}

impl Embedded {
    /// Opens the data directory and the node. Blocks (storage replay, the
    /// first elections): call it from `spawn_blocking` inside a runtime.
    pub fn open(dir: &Path, options: EmbeddedOptions) -> Result<Arc<Embedded>, Error> {
        let store = Store::open(dir, StoreOptions { sync: options.sync, ..StoreOptions::default() })?;
        // Nobody connects to this node: the secret only has to exist.
        let secret = Secret::new(rand::random::<[u8; 32]>().to_vec())
            .map_err(|e| Error::Unavailable(format!("cluster secret: {e}")))?;
        let me = MemberInfo { id: NODE_ID.to_owned(), addr: "in-process".to_owned(), incarnation: 1 };
        let membership = Membership::new(me, secret.clone(), MembershipOptions::default());
        let host = Host::start_with(
            NODE_ID.to_owned(),
            "in-process".to_owned(),
            store.clone(),
            secret,
            membership,
            Vec::new(),
            true,
        )?;
        host.set_body_cache_bytes(options.body_cache_bytes);
        // A new data directory: wait until the node is a member of its own
        // cluster (the founding `AddMember`), so queues get placed on it.
        let deadline = Instant::now() + OPEN_TIMEOUT;
        while !host.members().iter().any(|m| m == NODE_ID) {
            if Instant::now() > deadline {
                return Err(Error::Unavailable("the metadata group did not start".to_owned()));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(Arc::new(Embedded { host, store }))
    }

    /// Replication figures (metrics).
    pub fn replication(&self) -> crate::node::ReplicationFigures {
        self.host.replication()
    }

    /// The metadata group, for the router.
    pub fn meta_client(&self) -> Arc<dyn MetaClient> {
        LocalMeta::new(self.host.meta())
    }

    /// Deletes what a restarted single RabbitMQ node no longer has:
    /// non-durable queues and exchanges, and exclusive queues (their
    /// connections are gone).
    pub async fn drop_transient_definitions(&self) -> Result<(), Error> {
        let (_, state) = self.host.meta().state();
        let mut cmds = Vec::new();
        for vh in state.topology.vhosts() {
            for q in vh.queues.values() {
                if !q.durable || q.exclusive_owner.is_some() {
                    cmds.push(Command::DeleteQueue {
                        vhost: vh.name.clone(),
                        name: q.name.clone(),
                        if_unused: false,
                        if_empty: false,
                        conn: q.exclusive_owner.unwrap_or(Owner(0)),
                        counts: (0, 0),
                    });
                }
            }
            for e in vh.exchanges.values() {
                if !e.durable {
                    cmds.push(Command::DeleteExchange { vhost: vh.name.clone(), name: e.name.clone(), if_unused: false });
                }
            }
        }
        let meta = self.meta_client();
        for cmd in cmds {
            if let (_, MetaResult::Topology(Err(e))) = meta.propose(MetaCommand::Topology(cmd)).await? {
                tracing::warn!(error = %e, "dropping a transient definition");
            }
        }
        Ok(())
    }
}

impl Backend for Embedded {
    fn open_queue(&self, spec: QueueSpec) -> Result<Arc<dyn Queue>, Error> {
        let q = self.host.local_queue(spec)?;
        Ok(q)
    }

    /// The node removes a deleted queue's replica when it applies the
    /// deletion from the metadata log; its consumers are told here, as
    /// the router applies it.
    fn delete_queue(&self, id: QueueId) -> Reply<u32> {
        self.host.cancel_consumers(id.0);
        ready(Ok(0))
    }

    fn backlog_bytes(&self) -> u64 {
        self.store.queued_bytes()
    }

    /// Closes every replica (each writes a checkpoint) and the storage.
    /// Blocking: call it from `spawn_blocking`.
    fn shutdown(&self) -> Result<(), Error> {
        let host = self.host.clone();
        tokio::runtime::Handle::current().block_on(async move { host.close().await });
        self.store.flush()?;
        self.store.close()?;
        Ok(())
    }
}
