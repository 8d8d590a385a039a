//! [`MetaClient`]: how a router reaches the metadata group, whether over
//! the network (a gateway: [`crate::remote_meta::RemoteMeta`]) or in the
//! same process (`sluice serve`, a cluster of one: [`LocalMeta`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;

use super::replica::{Applied, MetaCommand, MetaReplica, MetaResult, MetaState};
use crate::Error;

/// A boxed future, as the trait is used as an object.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Called with a whole state (first, and whenever the follower starts over).
pub type OnReset = Box<dyn FnMut(u64, MetaState) + Send>;
/// Called with each next applied entry, without gaps.
pub type OnApplied = Box<dyn FnMut(Applied) + Send>;

/// The metadata group as a router sees it.
pub trait MetaClient: Send + Sync {
    /// Commits `cmd`: its log index and result.
    fn propose(&self, cmd: MetaCommand) -> BoxFuture<Result<(u64, MetaResult), Error>>;
    /// Keeps a copy current until the process ends: `reset` with the
    /// state, then `applied` for every next index; `reset` again whenever
    /// it has to start over.
    fn follow(self: Arc<Self>, reset: OnReset, applied: OnApplied) -> BoxFuture<()>;
    /// The copy has not caught up with a committed write for a while:
    /// follow the group from somewhere else. The default does nothing.
    fn lagging(&self) {}
}

/// The metadata replica of this process.
pub struct LocalMeta {
    replica: Arc<MetaReplica>,
    /// How long a proposal waits for this replica to lead.
    timeout: Duration,
}

impl LocalMeta {
    pub fn new(replica: Arc<MetaReplica>) -> Arc<Self> {
        Arc::new(LocalMeta { replica, timeout: Duration::from_secs(15) })
    }
}

impl MetaClient for LocalMeta {
    fn propose(&self, cmd: MetaCommand) -> BoxFuture<Result<(u64, MetaResult), Error>> {
        let replica = self.replica.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            loop {
                match replica.propose(cmd.clone()).await {
                    Err(Error::NotLeader { .. }) if tokio::time::Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    other => return other,
                }
            }
        })
    }

    fn follow(self: Arc<Self>, mut reset: OnReset, mut applied: OnApplied) -> BoxFuture<()> {
        Box::pin(async move {
            loop {
                let (mut index, state, mut rx) = self.replica.subscribe_with_state();
                reset(index, state);
                loop {
                    match rx.recv().await {
                        Ok(entry) => {
                            if entry.index() <= index {
                                continue;
                            }
                            index = entry.index();
                            applied(entry);
                        }
                        Err(RecvError::Lagged(_)) => break,
                        Err(RecvError::Closed) => return,
                    }
                }
            }
        })
    }
}
