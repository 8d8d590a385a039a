//! How replicas of different nodes reach each other: the [`Transport`]
//! trait (outgoing Raft messages, best effort), raft ids derived from node
//! ids, and [`MemNet`], an in-process network for tests of several
//! replicas (with isolation, to cut a replica off).
//!
//! Contract for replicas: a replica hands its outgoing messages to its
//! transport and never waits for them; the transport never calls back into
//! the sender. Loss, duplication and reordering are allowed (Raft copes).
//! Inbound messages reach a replica through its own `step` method, called
//! by whoever owns the receiving side (the node's connection handler, or
//! [`MemNet`]'s delivery task).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use raft::eraftpb::Message;
use siphasher::sip::SipHasher13;
use std::hash::Hasher;
use tokio::sync::mpsc;

/// Raft group id: a queue id, or [`META_GROUP`].
pub type GroupId = u64;

/// The metadata group's id. Queue ids are random u64s; this one is
/// reserved (the router never draws it: see `meta`).
pub const META_GROUP: GroupId = 0;

/// Outgoing Raft messages of the replicas of one node.
pub trait Transport: Send + Sync {
    /// Sends `msgs` of group `group`, each to its `to` raft id. Best
    /// effort: never blocks, may drop.
    fn send(&self, group: GroupId, msgs: Vec<Message>);
}

/// The raft id of node `node_id` in every group it is a member of: a
/// stable hash of the id (SipHash-1-3 with fixed keys over the UTF-8 bytes;
/// never 0, which raft-rs reserves). Golden-tested: it must not change
/// between versions.
pub fn raft_id(node_id: &str) -> u64 {
    let mut h = SipHasher13::new_with_keys(0x736c_7569_6365_2d72, 0x6166_742d_6964_2d31);
    h.write(node_id.as_bytes());
    match h.finish() {
        0 => 1,
        n => n,
    }
}

type Inbox = mpsc::UnboundedSender<(GroupId, Message)>;

#[derive(Default)]
struct NetState {
    /// Per raft id: where its messages go.
    inboxes: HashMap<u64, Inbox>,
    /// Raft ids cut off from everyone.
    isolated: HashSet<u64>,
}

/// An in-process network for tests: every registered raft id gets a
/// delivery task that calls its handler, in order, one message at a time.
/// Messages from or to an isolated id are dropped.
#[derive(Clone, Default)]
pub struct MemNet {
    state: Arc<Mutex<NetState>>,
}

impl MemNet {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, NetState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers (or replaces) the receiving side of `raft_id`: `handler`
    /// gets every message sent to it, on a task of the current runtime.
    pub fn register(&self, raft_id: u64, handler: impl Fn(GroupId, Message) + Send + Sync + 'static) {
        let (tx, mut rx) = mpsc::unbounded_channel::<(GroupId, Message)>();
        tokio::spawn(async move {
            while let Some((group, msg)) = rx.recv().await {
                handler(group, msg);
            }
        });
        self.lock().inboxes.insert(raft_id, tx);
    }

    /// Removes `raft_id` (a crashed node): messages to it are dropped.
    pub fn unregister(&self, raft_id: u64) {
        self.lock().inboxes.remove(&raft_id);
    }

    /// Cuts `raft_id` off from everyone (`true`) or heals it (`false`).
    pub fn isolate(&self, raft_id: u64, isolated: bool) {
        let mut st = self.lock();
        if isolated {
            st.isolated.insert(raft_id);
        } else {
            st.isolated.remove(&raft_id);
        }
    }

    /// The transport of the replicas of node `from`.
    pub fn transport(&self, from: u64) -> Arc<dyn Transport> {
        Arc::new(MemTransport { net: self.clone(), from })
    }
}

struct MemTransport {
    net: MemNet,
    from: u64,
}

impl Transport for MemTransport {
    fn send(&self, group: GroupId, msgs: Vec<Message>) {
        let st = self.net.lock();
        if st.isolated.contains(&self.from) {
            return;
        }
        for msg in msgs {
            if st.isolated.contains(&msg.to) {
                continue;
            }
            if let Some(inbox) = st.inboxes.get(&msg.to) {
                let _ = inbox.send((group, msg));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raft_ids_are_stable_and_nonzero() {
        // Golden values: a change re-numbers every replica of a running
        // cluster. Never update them; keep the function instead.
        assert_eq!(raft_id("n1"), raft_id("n1"));
        assert_ne!(raft_id("n1"), raft_id("n2"));
        assert_eq!(raft_id("n1"), 5_993_994_346_939_463_561);
        assert_eq!(raft_id("node-a"), 17_815_622_246_758_681_475);
    }

    #[tokio::test]
    async fn memnet_delivers_in_order_and_isolates() {
        let net = MemNet::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        net.register(2, move |g, m: Message| {
            let _ = tx.send((g, m.index));
        });
        let t = net.transport(1);
        let msg = |i: u64| Message { to: 2, from: 1, index: i, ..Default::default() };
        t.send(7, vec![msg(1), msg(2)]);
        assert_eq!(rx.recv().await, Some((7, 1)));
        assert_eq!(rx.recv().await, Some((7, 2)));
        net.isolate(2, true);
        t.send(7, vec![msg(3)]);
        net.isolate(2, false);
        t.send(7, vec![msg(4)]);
        assert_eq!(rx.recv().await, Some((7, 4)));
    }
}
