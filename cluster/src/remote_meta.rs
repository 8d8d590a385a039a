//! [`RemoteMeta`]: a gateway's access to the metadata group.
//!
//! - [`RemoteMeta::propose`] sends a command to the group's leader (found
//!   by following `NotLeader` hints from any node) and returns the log
//!   index it was applied at with its result.
//! - [`RemoteMeta::follow`] keeps the gateway's copy current: it subscribes
//!   at one node (which answers with its whole state and then pushes every
//!   applied entry in order), and starts over at another node whenever the
//!   link drops or an entry is missing. The caller gets `reset(index,
//!   state)` then `applied(entry)` for each next index, never a gap.
//!
//! A gateway that waits until its copy has applied the index its own
//! command returned sees its own writes; another gateway sees them as soon
//! as the push reaches it (one network hop after the commit).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use crate::meta::client::{BoxFuture, MetaClient, OnApplied, OnReset};
use crate::meta::replica::{Applied, MetaCommand, MetaResult};
use crate::node::{NodeRequest, NodeResponse, QueueResult};
use crate::remote::RemoteBackend;
use crate::Error;

/// See the module docs.
pub struct RemoteMeta {
    backend: Arc<RemoteBackend>,
    /// The address that answered the last proposal as leader.
    leader: Mutex<Option<String>>,
    timeout: Duration,
    me: std::sync::Weak<RemoteMeta>,
    /// Raised when the copy does not catch up with a write: the node
    /// followed may be cut off from the group, so follow another one.
    lagging: tokio::sync::Notify,
    /// When `lagging` last asked for a new subscription: many writes
    /// waiting at once ask together, and one new subscription answers
    /// them all.
    lagging_asked: Mutex<Option<std::time::Instant>>,
}

/// The least time between two new subscriptions asked by `lagging`.
const LAGGING_EVERY: Duration = Duration::from_secs(2);

impl RemoteMeta {
    pub fn new(backend: Arc<RemoteBackend>) -> Arc<Self> {
        Arc::new_cyclic(|me| RemoteMeta {
            backend,
            leader: Mutex::new(None),
            timeout: Duration::from_secs(15),
            me: me.clone(),
            lagging: tokio::sync::Notify::new(),
            lagging_asked: Mutex::new(None),
        })
    }

    fn leader_hint(&self) -> Option<String> {
        self.leader.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_leader(&self, addr: Option<String>) {
        *self.leader.lock().unwrap_or_else(|p| p.into_inner()) = addr;
    }

    /// Commits `cmd` in the metadata group: (log index, result).
    pub async fn propose_cmd(&self, cmd: MetaCommand) -> Result<(u64, MetaResult), Error> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut delay = Duration::from_millis(10);
        loop {
            let mut candidates = self.backend.node_addresses();
            if let Some(l) = self.leader_hint() {
                candidates.retain(|a| a != &l);
                candidates.insert(0, l);
            }
            let mut i = 0;
            while let Some(addr) = candidates.get(i).cloned() {
                i += 1;
                match self.backend.call(&addr, NodeRequest::Meta { cmd: cmd.clone() }).await {
                    Ok(NodeResponse::MetaDone { index, result }) => {
                        self.set_leader(Some(addr));
                        return Ok((index, result));
                    }
                    Ok(NodeResponse::Queue(QueueResult::NotLeader { leader: Some(id) })) => {
                        if let Some(a) = self.backend.node_address(&id) {
                            if !candidates[i..].contains(&a) {
                                candidates.insert(i, a);
                            }
                        }
                    }
                    // A proposal that timed out may still commit: the
                    // commands are conditional (declare is idempotent, a
                    // second delete answers 404), as with RabbitMQ.
                    _ => {}
                }
            }
            self.set_leader(None);
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Unavailable("no metadata leader answered".to_owned()));
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(200));
        }
    }

    /// Follows the metadata forever: see the module docs.
    pub async fn follow_forever(self: Arc<Self>, mut reset: OnReset, mut applied: OnApplied) {
        let (tx, mut rx) = mpsc::unbounded_channel::<NodeRequest>();
        self.backend.set_push_handler(tx);
        let mut delay = Duration::from_millis(20);
        loop {
            // Subscribe somewhere.
            let mut subscribed = None;
            for addr in self.backend.node_addresses() {
                if let Ok(NodeResponse::MetaState { index: at, state }) =
                    self.backend.call(&addr, NodeRequest::MetaSubscribe).await
                {
                    subscribed = Some((addr, at, state));
                    break;
                }
            }
            let Some((addr, at, state)) = subscribed else {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            };
            delay = Duration::from_millis(20);
            // Pushes of an earlier subscription may still be queued: skip
            // them by index.
            let mut index = at;
            for (id, member_addr) in &state.members {
                self.backend.learn_node(id, member_addr);
            }
            reset(at, *state);
            loop {
                let next = tokio::select! {
                    m = rx.recv() => m,
                    _ = self.backend.link_closed(&addr) => None,
                    _ = self.lagging.notified() => {
                        tracing::warn!(node = addr, "metadata copy lagging; subscribing again");
                        None
                    }
                };
                let Some(NodeRequest::MetaApplied(entry)) = next else {
                    if next.is_none() {
                        break;
                    }
                    continue;
                };
                let entry = *entry;
                let i = entry.index();
                if i <= index {
                    continue;
                }
                if i != index + 1 {
                    tracing::warn!(expected = index + 1, got = i, "metadata stream has a gap; subscribing again");
                    break;
                }
                index = i;
                let mut leaving = false;
                match &entry {
                    Applied::Command { cmd: MetaCommand::AddMember { id, addr }, .. } => self.backend.learn_node(id, addr),
                    // A decommissioned node leaves the metadata group: its
                    // stream would go stale, so follow another node.
                    Applied::Command { cmd: MetaCommand::RemoveMember { id }, .. } => {
                        leaving = self.backend.node_address(id).is_some_and(|a| a == addr);
                        self.backend.forget_node(id);
                    }
                    _ => {}
                }
                applied(entry);
                if leaving {
                    break;
                }
            }
        }
    }
}

impl MetaClient for RemoteMeta {
    fn propose(&self, cmd: MetaCommand) -> BoxFuture<Result<(u64, MetaResult), Error>> {
        let me = self.me.upgrade();
        Box::pin(async move {
            match me {
                Some(me) => me.propose_cmd(cmd).await,
                None => Err(Error::ShuttingDown),
            }
        })
    }

    fn follow(self: Arc<Self>, reset: OnReset, applied: OnApplied) -> BoxFuture<()> {
        Box::pin(self.follow_forever(reset, applied))
    }

    fn lagging(&self) {
        {
            let mut asked = self.lagging_asked.lock().unwrap_or_else(|p| p.into_inner());
            if asked.is_some_and(|at| at.elapsed() < LAGGING_EVERY) {
                return;
            }
            *asked = Some(std::time::Instant::now());
        }
        self.lagging.notify_one();
    }
}
