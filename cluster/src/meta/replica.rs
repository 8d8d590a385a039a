//! [`MetaReplica`]: the replicated metadata group (docs/cluster.md,
//! "Metadata"). One Raft group, [`META_GROUP`] (id 0), whose state machine
//! is the metadata of the whole cluster: the [`Topology`] (vhosts,
//! exchanges, bindings, queue definitions) plus the committed member list
//! (node id → address, the input of placement). Every node runs one
//! replica; gateways run none and follow a replica's change stream.
//!
//! **State machine.** [`MetaState::apply`] is pure and deterministic: a
//! [`MetaCommand`] is a [`Command`] for the topology (decided by
//! [`Topology::apply`], which refuses with RabbitMQ's [`MetaError`]s), or
//! an [`MetaCommand::AddMember`] / [`MetaCommand::RemoveMember`] of the
//! member set. Refusals are results, not failures: a refused declare still
//! occupies its log index and returns the same error on every replica.
//! Log entries are a version byte ([`ENTRY_VERSION`]) followed by the
//! postcard encoding of the command; snapshots and checkpoints hold
//! [`STATE_VERSION`] followed by the postcard encoding of the
//! [`MetaState`].
//!
//! **Driving.** The replica owns a [`Group`] on the node's
//! [`FjallLogStore`] (log id 0) behind a `std` mutex that is never held
//! across an `.await`. Every input (`step` from the transport's receiving
//! side, `propose`, the driver's ticks) "pumps" the group under the lock:
//! report durable writes, take its `Output`, hand `send` to the
//! [`Transport`] (snapshot messages are reported as delivered at once: a
//! lost one only costs the leader a retry), restore a snapshot, apply the
//! committed entries in order, finish proposals, make a snapshot when the
//! leader needs one for a follower. A tokio task (the driver) ticks every
//! [`MetaOptions::tick`] and, while raft writes are in flight, awaits an
//! empty marker write on the storage: the storage answers writes in
//! submission order, so the marker's answer means every earlier raft write
//! is settled and the group can be told. Elections come from raft-rs's
//! ticks; a replica campaigns on its own only when it is the sole voter
//! (`sluice serve`'s cluster of one).
//!
//! **Proposals.** [`MetaReplica::propose`] is leader-only
//! ([`Error::NotLeader`] with the known leader otherwise). It resolves when
//! the entry is committed and applied locally, with its index and result.
//! If this replica loses leadership before that, it fails with
//! `NotLeader` too, but then the command may still commit under the new
//! leader: the caller learns the truth from the state or the change stream
//! (topology commands are conditional, so a retried declare is safe).
//!
//! **Change stream.** [`MetaReplica::subscribe`] gives every applied index
//! exactly once, in order, without gaps ([`Applied`]): a command with its
//! result, an internal entry (a leader's no-op or a configuration change:
//! the state is unchanged), or [`Applied::Reset`] with the whole state
//! after a snapshot was installed, from which a subscriber rebuilds its
//! copy. [`MetaReplica::subscribe_with_state`] returns the state and a
//! receiver atomically, so a subscriber starts from a consistent copy. A
//! receiver that lags by more than [`CHANGE_BUFFER`] events gets
//! `RecvError::Lagged` and must start again from the state.
//!
//! **Checkpoints and compaction.** Every [`MetaOptions::checkpoint_every`]
//! applied entries the replica writes a checkpoint: the apply state
//! (`save_apply_state_with`) plus the encoded state under the log's
//! [`CHECKPOINT_TAG`] record, in one atomic write. At the same time it
//! compacts the log up to the *previous* checkpoint (its encoded state
//! becomes the stored snapshot), so the log keeps between one and two
//! intervals of entries: a follower a little behind catches up from the
//! log, one further behind (or a new replica) by snapshot. A restart loads
//! the checkpoint (or a newer snapshot, e.g. one received from the leader)
//! and replays only the tail. When raft-rs needs a snapshot the stored one
//! cannot serve (a replica added after it was made), the replica compacts
//! at its applied index on the spot.
//!
//! **Membership.** [`MetaReplica::add_voter`] adds a replica as a learner,
//! waits until it has acknowledged the leader's commit index (seen on its
//! append responses, which pass through [`MetaReplica::step`]), then
//! promotes it; beyond [`MAX_VOTERS`] voters it stays a learner.
//! [`MetaReplica::remove_voter`] removes one and promotes the most
//! caught-up learner if there is room. A leader asked to remove itself
//! hands leadership over first and answers `NotLeader`.
//!
//! Not done: no read index or lease reads (`state()` is this replica's
//! applied state, possibly stale on a follower); no batching of proposals
//! into one entry; snapshots are the whole state in one message, fine for
//! metadata sizes but not for millions of bindings; a replica that applied
//! its own removal keeps running (see [`MetaReplica::is_member`]); the
//! node's wiring (transport over the node protocol, who calls `add_voter`)
//! is elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{ConfChangeType, ConfChangeV2, MessageType, Snapshot};
use serde::{Deserialize, Serialize};
use sluice_storage::{Completion, Op, Store};
use tokio::sync::{broadcast, oneshot, watch, Notify};
use tokio::task::JoinHandle;

use super::auth::{Auth, AuthCommand, AuthError};
use super::{Command, MetaError, Outcome, Topology};
use crate::consensus::reconfig::single_change;
use crate::consensus::{
    self, ApplyState, Committed, FjallLogStore, FjallLogStoreError, Group, GroupConfig, LogStore,
    Payload, ProposalId, ProposalOutcome, Role, Transport, META_GROUP,
};
use crate::Error;

/// Version byte in front of every log entry of the metadata group.
pub const ENTRY_VERSION: u8 = 1;
/// Version byte in front of every encoded [`MetaState`] (snapshots and
/// checkpoints).
/// (1: without users and permissions, read as having the default user.)
pub const STATE_VERSION: u8 = 2;
/// `Op::LogMeta` tag (on log [`META_GROUP`]) of the state machine's
/// checkpoint: [`STATE_VERSION`]-prefixed state after an 8-byte
/// little-endian applied index. Distinct from the log store's own tags.
pub const CHECKPOINT_TAG: u8 = b'm';
/// Most voters of the metadata group; further replicas are learners.
pub const MAX_VOTERS: usize = 5;
/// Default checkpoint interval in applied entries.
pub const DEFAULT_CHECKPOINT_EVERY: u64 = 512;
/// Events a subscriber may fall behind before it gets `Lagged`.
pub const CHANGE_BUFFER: usize = 4096;

/// How long `open` may wait for the storage to settle earlier writes.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// One command of the metadata log.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaCommand {
    /// A topology change (declare, bind, delete...), decided by
    /// [`Topology::apply`].
    Topology(Command),
    /// A node joins the committed member set (the input of placement), or
    /// changes its address. Idempotent.
    AddMember {
        /// The node id.
        id: String,
        /// Its node-protocol address.
        addr: String,
    },
    /// A node leaves the member set (decommission). Idempotent.
    RemoveMember {
        /// The node id.
        id: String,
    },
    /// A change to users or permissions ([`super::auth`]).
    Auth(AuthCommand),
}

/// The replicated metadata: what every replica holds at an applied index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MetaState {
    /// Vhosts, exchanges, bindings, queue definitions.
    pub topology: Topology,
    /// Committed members: node id → address.
    pub members: BTreeMap<String, String>,
    /// Users and permissions.
    pub auth: Auth,
}

/// [`MetaState`] as version 1 stored it (before users and permissions).
#[derive(Deserialize)]
struct MetaStateV1 {
    topology: Topology,
    members: BTreeMap<String, String>,
}

impl Default for MetaState {
    /// The state of a new cluster: vhost "/" with its standard exchanges,
    /// no members, RabbitMQ's default user.
    fn default() -> Self {
        MetaState { topology: Topology::load(std::iter::empty()).0, members: BTreeMap::new(), auth: default_auth() }
    }
}

/// A new cluster's users: `guest`/`guest` (RabbitMQ's default). The hash's
/// salt is fixed so that every replica starts from the same state (the
/// password is public anyway).
fn default_auth() -> Auth {
    Auth::bootstrap(super::auth::hash_password_with_salt([0x5e, 0x1c, 0xe0, 0x01], "guest"))
}

/// What applying a [`MetaCommand`] gave.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MetaResult {
    /// The topology's outcome or refusal.
    Topology(Result<Outcome, MetaError>),
    /// A member command (always succeeds).
    Members,
    /// A user or permission change, or why it was refused.
    Auth(Result<(), AuthError>),
}

impl MetaState {
    /// Applies one command. Pure and deterministic.
    pub fn apply(&mut self, cmd: &MetaCommand) -> MetaResult {
        match cmd {
            MetaCommand::Topology(cmd) => {
                let result = self.topology.apply(cmd.clone());
                if let (Command::DeleteVhost { name }, Ok(_)) = (cmd, &result) {
                    self.auth.vhost_deleted(name);
                }
                MetaResult::Topology(result)
            }
            MetaCommand::AddMember { id, addr } => {
                self.members.insert(id.clone(), addr.clone());
                MetaResult::Members
            }
            MetaCommand::RemoveMember { id } => {
                self.members.remove(id);
                MetaResult::Members
            }
            MetaCommand::Auth(cmd) => {
                let topology = &self.topology;
                MetaResult::Auth(self.auth.apply(cmd, |v| topology.vhost(v).is_some()))
            }
        }
    }

    /// [`STATE_VERSION`] followed by the postcard encoding.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        let mut out = vec![STATE_VERSION];
        let body =
            postcard::to_stdvec(self).map_err(|e| Error::Corrupt(format!("encoding the metadata state: {e}")))?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes [`MetaState::encode`]'s bytes; empty bytes are the initial
    /// state.
    pub fn decode(bytes: &[u8]) -> Result<Self, Error> {
        match bytes.split_first() {
            None => Ok(MetaState::default()),
            Some((&STATE_VERSION, rest)) => {
                postcard::from_bytes(rest).map_err(|e| Error::Corrupt(format!("metadata state: {e}")))
            }
            Some((1, rest)) => {
                let old: MetaStateV1 =
                    postcard::from_bytes(rest).map_err(|e| Error::Corrupt(format!("metadata state (version 1): {e}")))?;
                Ok(MetaState { topology: old.topology, members: old.members, auth: default_auth() })
            }
            Some((v, _)) => Err(Error::Corrupt(format!("metadata state: unknown version {v}"))),
        }
    }
}

/// Encodes a log entry: [`ENTRY_VERSION`] + postcard.
pub fn encode_command(cmd: &MetaCommand) -> Result<Vec<u8>, Error> {
    let mut out = vec![ENTRY_VERSION];
    let body = postcard::to_stdvec(cmd).map_err(|e| Error::Corrupt(format!("encoding a metadata command: {e}")))?;
    out.extend_from_slice(&body);
    Ok(out)
}

/// Decodes a log entry of the metadata group.
pub fn decode_command(index: u64, data: &[u8]) -> Result<MetaCommand, Error> {
    match data.split_first() {
        Some((&ENTRY_VERSION, rest)) => {
            postcard::from_bytes(rest).map_err(|e| Error::Corrupt(format!("metadata log entry {index}: {e}")))
        }
        _ => Err(Error::Corrupt(format!("metadata log entry {index}: unknown version"))),
    }
}

/// One event of the change stream: every applied index once, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Applied {
    /// A command was applied at `index` with `result`.
    Command {
        /// Log index.
        index: u64,
        /// The command.
        cmd: MetaCommand,
        /// What applying it gave (identical on every replica).
        result: MetaResult,
    },
    /// An entry that does not change the state: a new leader's no-op or a
    /// Raft configuration change.
    Internal {
        /// Log index.
        index: u64,
    },
    /// A snapshot was installed: the state at `index` is `state`; replace
    /// your copy with it. The next event is at `index + 1`.
    Reset {
        /// The snapshot's index.
        index: u64,
        /// The whole state.
        state: Box<MetaState>,
    },
}

impl Applied {
    /// The log index this event brings a copy to.
    pub fn index(&self) -> u64 {
        match self {
            Applied::Command { index, .. } | Applied::Internal { index } | Applied::Reset { index, .. } => *index,
        }
    }

    /// Applies the event to a subscriber's copy of the state (at
    /// `index() - 1`, or anything for a reset).
    pub fn apply_to(&self, state: &mut MetaState) {
        match self {
            Applied::Command { cmd, .. } => {
                state.apply(cmd);
            }
            Applied::Internal { .. } => {}
            Applied::Reset { state: new, .. } => *state = (**new).clone(),
        }
    }
}

/// How a [`MetaReplica`] runs.
#[derive(Clone)]
pub struct MetaOptions {
    /// This replica's raft id (see [`consensus::raft_id`]).
    pub me: u64,
    /// The founding voters if the store holds no metadata group yet (every
    /// founding replica must be given the same list). Empty: join an
    /// existing group, i.e. open an empty store and wait for the leader's
    /// snapshot (after someone called [`MetaReplica::add_voter`]). Ignored
    /// when the store holds the group already.
    pub voters: Vec<u64>,
    /// Where outgoing Raft messages go.
    pub transport: Arc<dyn Transport>,
    /// Logical clock tick (election timeout 3–6 ticks, heartbeat 1).
    pub tick: Duration,
    /// Checkpoint (and compact) every this many applied entries.
    pub checkpoint_every: u64,
    /// How long [`MetaReplica::add_voter`] waits for a learner to catch up
    /// before promoting it.
    pub catch_up_timeout: Duration,
}

impl MetaOptions {
    /// Defaults: 50 ms ticks, [`DEFAULT_CHECKPOINT_EVERY`], 30 s catch-up.
    pub fn new(me: u64, voters: Vec<u64>, transport: Arc<dyn Transport>) -> Self {
        MetaOptions {
            me,
            voters,
            transport,
            tick: Duration::from_millis(50),
            checkpoint_every: DEFAULT_CHECKPOINT_EVERY,
            catch_up_timeout: Duration::from_secs(30),
        }
    }
}

/// Who waits for a proposal.
enum Waiter {
    Command(oneshot::Sender<Result<(u64, MetaResult), Error>>),
    Conf(oneshot::Sender<Result<(), Error>>),
}

impl Waiter {
    fn fail(self, error: Error) {
        match self {
            Waiter::Command(tx) => {
                let _ = tx.send(Err(error));
            }
            Waiter::Conf(tx) => {
                let _ = tx.send(Err(error));
            }
        }
    }
}

/// A checkpoint the log is compacted to at the next one.
struct Checkpoint {
    apply: ApplyState,
    state: Bytes,
}

struct Inner {
    group: Group<FjallLogStore>,
    state: MetaState,
    /// Index of the last applied entry (or installed snapshot).
    applied: u64,
    /// Index of the last checkpoint or installed snapshot.
    checkpointed: u64,
    /// The last checkpoint, which the next one compacts the log to.
    previous: Option<Checkpoint>,
    waiters: HashMap<ProposalId, Waiter>,
    /// Highest index each peer acknowledged (successful append responses).
    acked: HashMap<u64, u64>,
    /// Set after a failure of the group or its store: the text, and
    /// whether the storage failed (then callers get `StorageFailed`).
    failed: Option<(String, bool)>,
    closed: bool,
}

/// The error a failed replica answers with.
fn failure(why: &str, storage: bool) -> Error {
    if storage {
        Error::StorageFailed(why.to_owned())
    } else {
        Error::Corrupt(why.to_owned())
    }
}

impl Inner {
    fn check(&self) -> Result<(), Error> {
        if let Some((why, storage)) = &self.failed {
            return Err(failure(why, *storage));
        }
        if self.closed {
            return Err(Error::ShuttingDown);
        }
        Ok(())
    }

    fn fail_all(&mut self, error: impl Fn() -> Error) {
        for (_, waiter) in self.waiters.drain() {
            waiter.fail(error());
        }
    }
}

/// This node's replica of the metadata group. See the module docs.
pub struct MetaReplica {
    me: u64,
    store: Store,
    transport: Arc<dyn Transport>,
    checkpoint_every: u64,
    tick: Duration,
    catch_up_timeout: Duration,
    // std Mutex: never held across .await.
    inner: Mutex<Inner>,
    changes: broadcast::Sender<Applied>,
    applied_tx: watch::Sender<u64>,
    wake: Arc<Notify>,
    driver: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for MetaReplica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaReplica").field("me", &self.me).finish_non_exhaustive()
    }
}

fn log_error(e: FjallLogStoreError) -> Error {
    match e {
        FjallLogStoreError::Storage(e) | FjallLogStoreError::WriteFailed { cause: Some(e), .. } => Error::Storage(e),
        other => Error::Corrupt(format!("metadata raft log: {other}")),
    }
}

fn consensus_error(e: consensus::Error) -> Error {
    match e {
        consensus::Error::NotLeader { leader } => Error::NotLeader { leader },
        consensus::Error::ProposalDropped => {
            Error::Unavailable("metadata proposal dropped (leadership transfer in progress?)".to_owned())
        }
        consensus::Error::ConfChangePending => {
            Error::Unavailable("a metadata configuration change is pending".to_owned())
        }
        consensus::Error::ConfChangeRefused(why) => {
            Error::Unavailable(format!("metadata configuration change refused: {why}"))
        }
        consensus::Error::Store(consensus::LogStoreError::Failed(why)) => Error::StorageFailed(why),
        other => Error::Corrupt(format!("metadata raft group: {other}")),
    }
}

/// Whether an error from the group leaves it usable (a refusal) rather than
/// poisoning the replica.
fn is_refusal(e: &consensus::Error) -> bool {
    matches!(
        e,
        consensus::Error::NotLeader { .. }
            | consensus::Error::ProposalDropped
            | consensus::Error::EmptyProposal
            | consensus::Error::ConfChangePending
            | consensus::Error::ConfChangeRefused(_)
            | consensus::Error::InvalidMessage(_)
    )
}

fn encode_checkpoint(index: u64, state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + state.len());
    out.extend_from_slice(&index.to_le_bytes());
    out.extend_from_slice(state);
    out
}

fn decode_checkpoint(bytes: &[u8]) -> Result<(u64, MetaState), Error> {
    let (index, state) = bytes
        .split_first_chunk::<8>()
        .ok_or_else(|| Error::Corrupt("metadata checkpoint: too short".to_owned()))?;
    Ok((u64::from_le_bytes(*index), MetaState::decode(state)?))
}


impl MetaReplica {
    /// Opens this node's replica on `store`: resumes the group if the store
    /// holds it (from its checkpoint or snapshot, then the log's tail),
    /// bootstraps it with `opts.voters` if not, or opens it empty to join
    /// (`opts.voters` empty). Applies what the local log has committed and
    /// starts the driver on `runtime`. The receiving side of the transport
    /// must call [`MetaReplica::step`] with this replica's messages.
    ///
    /// A previous replica on the same store must be closed (or dropped)
    /// first; this waits, blocking briefly, until the storage has applied
    /// its writes.
    pub fn open(store: Store, opts: MetaOptions, runtime: &tokio::runtime::Handle) -> Result<Arc<Self>, Error> {
        let (_barrier, barrier_applied) = store.write_tracked(Vec::new(), false);
        let deadline = Instant::now() + OPEN_TIMEOUT;
        while !barrier_applied.is_settled() {
            if Instant::now() > deadline {
                return Err(Error::Unavailable("storage did not answer".to_owned()));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        // An existing group resumes; with no voters given, an empty store
        // waits for the leader's snapshot.
        let resume = opts.voters.is_empty() || FjallLogStore::exists(&store, META_GROUP).map_err(log_error)?;
        let log = if resume {
            FjallLogStore::open(store.clone(), META_GROUP).map_err(log_error)?
        } else {
            let initial = Bytes::from(MetaState::default().encode()?);
            FjallLogStore::bootstrap(store.clone(), META_GROUP, &opts.voters, &[], initial).map_err(log_error)?
        };
        let (state, applied) = Self::load_state(&store, &log)?;
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        let group = Group::open(&GroupConfig::new(opts.me), log, &logger).map_err(consensus_error)?;
        let (changes, _) = broadcast::channel(CHANGE_BUFFER);
        let (applied_tx, _) = watch::channel(applied);
        let replica = Arc::new(MetaReplica {
            me: opts.me,
            store,
            transport: opts.transport,
            checkpoint_every: opts.checkpoint_every.max(1),
            tick: opts.tick,
            catch_up_timeout: opts.catch_up_timeout,
            inner: Mutex::new(Inner {
                group,
                state,
                applied,
                checkpointed: applied,
                previous: None,
                waiters: HashMap::new(),
                acked: HashMap::new(),
                failed: None,
                closed: false,
            }),
            changes,
            applied_tx,
            wake: Arc::new(Notify::new()),
            driver: Mutex::new(None),
        });
        {
            let mut inner = replica.lock();
            replica.pump(&mut inner);
            inner.check()?;
        }
        let handle = runtime.spawn(drive(Arc::downgrade(&replica), replica.wake.clone(), replica.tick));
        *replica.driver.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(replica)
    }

    /// The state the group resumes from: the checkpoint if it matches the
    /// apply state, the snapshot if it is at the apply state (bootstrap),
    /// or nothing yet when a newer snapshot will be restored (handed out by
    /// the group's first output) or the store is empty (joining).
    fn load_state(store: &Store, log: &FjallLogStore) -> Result<(MetaState, u64), Error> {
        let apply = log.apply_state();
        let snapshot = log.snapshot_metadata();
        if snapshot.index > apply.index || (apply.index == 0 && snapshot.index == 0) {
            return Ok((MetaState::default(), 0));
        }
        if let Some(bytes) = store.log_meta(META_GROUP, CHECKPOINT_TAG)? {
            let (index, state) = decode_checkpoint(&bytes)?;
            if index == apply.index {
                return Ok((state, index));
            }
        }
        if snapshot.index == apply.index {
            let data = log.snapshot().map_err(|e| Error::Corrupt(format!("metadata snapshot: {e}")))?.data;
            return Ok((MetaState::decode(&data)?, apply.index));
        }
        Err(Error::Corrupt(format!("metadata group: no checkpoint for the applied index {}", apply.index)))
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This replica's raft id.
    pub fn id(&self) -> u64 {
        self.me
    }

    /// Feeds a message from a peer (the transport's receiving side calls
    /// this). Invalid messages are dropped.
    pub fn step(&self, msg: raft::eraftpb::Message) {
        let mut inner = self.lock();
        if inner.closed || inner.failed.is_some() {
            return;
        }
        if msg.get_msg_type() == MessageType::MsgAppendResponse && !msg.reject {
            let acked = inner.acked.entry(msg.from).or_insert(0);
            *acked = (*acked).max(msg.index);
        }
        match inner.group.step(msg) {
            Ok(()) => {}
            Err(e) if is_refusal(&e) => tracing::debug!(error = %e, "metadata group: message dropped"),
            Err(e) => self.fail(&mut inner, consensus_error(e)),
        }
        self.pump(&mut inner);
        drop(inner);
        self.wake.notify_one();
    }

    /// The leader this replica knows of (itself when leader).
    pub fn leader(&self) -> Option<u64> {
        self.lock().group.leader()
    }

    /// Whether this replica leads the group.
    pub fn is_leader(&self) -> bool {
        self.lock().group.is_leader()
    }

    /// The group's role and term here.
    pub fn role(&self) -> (Role, u64) {
        let inner = self.lock();
        (inner.group.role(), inner.group.term())
    }

    /// The configuration as of the applied index: (voters, learners).
    pub fn config(&self) -> (Vec<u64>, Vec<u64>) {
        let inner = self.lock();
        let conf = inner.group.conf_state();
        (conf.voters.clone(), conf.learners.clone())
    }

    /// Whether the applied configuration includes this replica (false
    /// before a joining replica got its snapshot, and after its removal).
    pub fn is_member(&self) -> bool {
        self.lock().group.is_member()
    }

    /// Reads the applied state without copying it.
    pub fn with_state<R>(&self, f: impl FnOnce(&MetaState) -> R) -> R {
        f(&self.lock().state)
    }

    /// The applied index and a copy of the state at it.
    pub fn state(&self) -> (u64, MetaState) {
        let inner = self.lock();
        (inner.applied, inner.state.clone())
    }

    /// The applied index.
    pub fn applied_index(&self) -> u64 {
        self.lock().applied
    }

    /// The change stream: every index applied from now on, once, in order
    /// (see [`Applied`]).
    pub fn subscribe(&self) -> broadcast::Receiver<Applied> {
        self.changes.subscribe()
    }

    /// The applied index, the state at it and the change stream from the
    /// next index, taken atomically.
    pub fn subscribe_with_state(&self) -> (u64, MetaState, broadcast::Receiver<Applied>) {
        let inner = self.lock();
        (inner.applied, inner.state.clone(), self.changes.subscribe())
    }

    /// Returns once the applied index is at least `index`.
    pub async fn wait_applied(&self, index: u64) {
        let mut rx = self.applied_tx.subscribe();
        let _ = rx.wait_for(|applied| *applied >= index).await;
    }

    /// Proposes `cmd` (leader only, else [`Error::NotLeader`]) and returns
    /// its log index and result once it is committed and applied here. If
    /// this replica loses leadership first the answer is `NotLeader`, and
    /// the command may still commit (see the module docs).
    pub async fn propose(&self, cmd: MetaCommand) -> Result<(u64, MetaResult), Error> {
        let data = encode_command(&cmd)?;
        let rx = {
            let mut inner = self.lock();
            inner.check()?;
            let id = match inner.group.propose(data) {
                Ok(id) => id,
                Err(e) => return Err(consensus_error(e)),
            };
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(id, Waiter::Command(tx));
            self.pump(&mut inner);
            rx
        };
        self.wake.notify_one();
        rx.await.unwrap_or(Err(Error::ShuttingDown))
    }

    /// Adds `raft_id` to the group (leader only): as a learner, then, once
    /// it has caught up with the commit index, promoted to voter unless the
    /// group has [`MAX_VOTERS`] voters already. Idempotent.
    pub async fn add_voter(&self, raft_id: u64) -> Result<(), Error> {
        let (voters, learners) = self.leader_config()?;
        if voters.contains(&raft_id) {
            return Ok(());
        }
        if !learners.contains(&raft_id) {
            self.conf_change(single_change(ConfChangeType::AddLearnerNode, raft_id)).await?;
        }
        if voters.len() >= MAX_VOTERS {
            return Ok(());
        }
        self.wait_caught_up(raft_id).await?;
        let (voters, _) = self.leader_config()?;
        if voters.contains(&raft_id) || voters.len() >= MAX_VOTERS {
            return Ok(());
        }
        self.conf_change(single_change(ConfChangeType::AddNode, raft_id)).await
    }

    /// Removes `raft_id` (voter or learner) from the group (leader only),
    /// then, if there is room, promotes the most caught-up learner once it
    /// has caught up (best effort: a learner that does not catch up within
    /// [`MetaOptions::catch_up_timeout`] stays one). A leader
    /// asked to remove itself hands leadership to another voter and answers
    /// [`Error::NotLeader`]: ask the new leader. Idempotent.
    pub async fn remove_voter(&self, raft_id: u64) -> Result<(), Error> {
        let (voters, learners) = self.leader_config()?;
        if raft_id == self.me {
            self.transfer_away().await;
            return Err(Error::NotLeader { leader: self.leader() });
        }
        if !voters.contains(&raft_id) && !learners.contains(&raft_id) {
            return Ok(());
        }
        self.conf_change(single_change(ConfChangeType::RemoveNode, raft_id)).await?;
        let (voters, learners) = self.leader_config()?;
        if voters.len() >= MAX_VOTERS {
            return Ok(());
        }
        let best = {
            let inner = self.lock();
            learners.iter().map(|id| (inner.acked.get(id).copied().unwrap_or(0), *id)).max().map(|(_, id)| id)
        };
        let Some(id) = best else { return Ok(()) };
        // The removal is done; promoting is best effort.
        match self.wait_caught_up(id).await {
            Ok(()) => self.conf_change(single_change(ConfChangeType::AddNode, id)).await,
            Err(e) => {
                tracing::warn!(learner = id, error = %e, "metadata learner not promoted");
                Ok(())
            }
        }
    }

    /// Stops the replica: fails waiting proposals with
    /// [`Error::ShuttingDown`], waits until every raft write submitted so
    /// far is settled, and stops the driver. Reopen with
    /// [`MetaReplica::open`] on the same store.
    pub async fn close(&self) {
        loop {
            let marker = {
                let mut inner = self.lock();
                inner.closed = true;
                inner.fail_all(|| Error::ShuttingDown);
                if inner.failed.is_some() {
                    break;
                }
                if let Err(e) = inner.group.store_mut().poll_persisted() {
                    tracing::warn!(error = %e, "metadata group: write failed while closing");
                    break;
                }
                if inner.group.store().in_flight() == 0 {
                    break;
                }
                self.store.write(Vec::new(), false)
            };
            let _ = marker.await;
        }
        if let Some(handle) = self.driver.lock().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }

    /// The configuration, if this replica leads.
    fn leader_config(&self) -> Result<(Vec<u64>, Vec<u64>), Error> {
        let inner = self.lock();
        inner.check()?;
        if !inner.group.is_leader() {
            return Err(Error::NotLeader { leader: inner.group.leader() });
        }
        let conf = inner.group.conf_state();
        Ok((conf.voters.clone(), conf.learners.clone()))
    }

    /// Proposes a configuration change and waits until it is applied here,
    /// retrying while another change is pending.
    async fn conf_change(&self, cc: ConfChangeV2) -> Result<(), Error> {
        let deadline = Instant::now() + self.catch_up_timeout;
        loop {
            let rx = {
                let mut inner = self.lock();
                inner.check()?;
                match inner.group.propose_conf_change(cc.clone()) {
                    Ok(id) => {
                        let (tx, rx) = oneshot::channel();
                        inner.waiters.insert(id, Waiter::Conf(tx));
                        self.pump(&mut inner);
                        Some(rx)
                    }
                    Err(consensus::Error::ConfChangePending) if Instant::now() < deadline => None,
                    Err(e) => return Err(consensus_error(e)),
                }
            };
            match rx {
                Some(rx) => {
                    self.wake.notify_one();
                    return rx.await.unwrap_or(Err(Error::ShuttingDown));
                }
                None => tokio::time::sleep(self.tick).await,
            }
        }
    }

    /// Waits until `raft_id` acknowledged the commit index (as it was when
    /// the wait started), while this replica leads.
    async fn wait_caught_up(&self, raft_id: u64) -> Result<(), Error> {
        let target = self.lock().group.commit_index();
        let deadline = Instant::now() + self.catch_up_timeout;
        loop {
            {
                let inner = self.lock();
                inner.check()?;
                if !inner.group.is_leader() {
                    return Err(Error::NotLeader { leader: inner.group.leader() });
                }
                if inner.acked.get(&raft_id).is_some_and(|acked| *acked >= target) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(Error::Unavailable(format!(
                    "metadata replica {raft_id} did not catch up to index {target}; it stays a learner"
                )));
            }
            tokio::time::sleep(self.tick).await;
        }
    }

    /// Hands leadership to the most caught-up other voter and waits (a few
    /// election timeouts at most) until this replica no longer leads.
    async fn transfer_away(&self) {
        {
            let mut inner = self.lock();
            let voters = inner.group.conf_state().voters.clone();
            let target = voters
                .iter()
                .filter(|id| **id != self.me)
                .map(|id| (inner.acked.get(id).copied().unwrap_or(0), *id))
                .max()
                .map(|(_, id)| id);
            let Some(target) = target else { return };
            inner.group.transfer_leader(target);
            self.pump(&mut inner);
        }
        self.wake.notify_one();
        for _ in 0..20 {
            if !self.is_leader() {
                return;
            }
            tokio::time::sleep(self.tick).await;
        }
    }

    /// One tick of the logical clock.
    fn tick(&self) {
        let mut inner = self.lock();
        if inner.closed || inner.failed.is_some() {
            return;
        }
        inner.group.tick();
        self.pump(&mut inner);
    }

    /// Pumps, and (if `want_marker`) returns a marker write to await while
    /// raft writes are in flight.
    fn drive_once(&self, want_marker: bool) -> Option<Completion> {
        let mut inner = self.lock();
        if inner.closed {
            return None;
        }
        self.pump(&mut inner);
        let in_flight = inner.failed.is_none() && inner.group.store().in_flight() > 0;
        (want_marker && in_flight).then(|| self.store.write(Vec::new(), false))
    }

    /// Marks the replica failed: every waiter fails, later calls too.
    fn fail(&self, inner: &mut Inner, error: Error) {
        tracing::error!(error = %error, "metadata replica failed; reopen it");
        let storage = matches!(error, Error::Storage(_) | Error::StorageFailed(_));
        let why = match &error {
            Error::StorageFailed(why) => why.clone(),
            other => other.to_string(),
        };
        inner.failed.get_or_insert_with(|| (why.clone(), storage));
        inner.fail_all(|| failure(&why, storage));
    }

    fn pump(&self, inner: &mut Inner) {
        if inner.failed.is_some() {
            return;
        }
        if let Err(e) = self.try_pump(inner) {
            self.fail(inner, e);
        }
    }

    /// Reports durable writes and handles the group's outputs until it has
    /// nothing more (see the module docs).
    fn try_pump(&self, inner: &mut Inner) -> Result<(), Error> {
        loop {
            if let Some(n) = inner.group.store_mut().poll_persisted().map_err(log_error)? {
                inner.group.on_persisted(n).map_err(consensus_error)?;
            }
            if !inner.closed && inner.group.role() == Role::Follower && self.sole_voter(inner) {
                inner.group.campaign().map_err(consensus_error)?;
            }
            if !inner.group.has_ready() {
                return Ok(());
            }
            let out = inner.group.ready().map_err(consensus_error)?;
            if !out.send.is_empty() {
                let snapshots: Vec<u64> = out
                    .send
                    .iter()
                    .filter(|m| m.get_msg_type() == MessageType::MsgSnapshot)
                    .map(|m| m.to)
                    .collect();
                self.transport.send(META_GROUP, out.send);
                for to in snapshots {
                    inner.group.report_snapshot(to, true);
                }
            }
            if let Some(snapshot) = out.restore {
                self.restore(inner, &snapshot)?;
            }
            for committed in out.committed {
                self.apply(inner, committed)?;
            }
            for (id, outcome) in out.proposals {
                if outcome == ProposalOutcome::Committed {
                    continue;
                }
                if let Some(waiter) = inner.waiters.remove(&id) {
                    let error = match outcome {
                        ProposalOutcome::Rejected => {
                            Error::Unavailable("metadata configuration change refused by raft".to_owned())
                        }
                        _ => Error::NotLeader { leader: inner.group.leader() },
                    };
                    waiter.fail(error);
                }
            }
            if out.snapshot_wanted {
                let data = Bytes::from(inner.state.encode()?);
                inner.group.compact(data).map_err(consensus_error)?;
            }
            if out.removed {
                tracing::info!(me = self.me, "metadata replica removed from the group");
            }
            if inner.applied >= inner.checkpointed + self.checkpoint_every {
                self.checkpoint(inner)?;
            }
        }
    }

    fn sole_voter(&self, inner: &Inner) -> bool {
        let conf = inner.group.conf_state();
        conf.voters == [self.me] && conf.voters_outgoing.is_empty()
    }

    fn restore(&self, inner: &mut Inner, snapshot: &Snapshot) -> Result<(), Error> {
        let index = snapshot.get_metadata().index;
        let state = MetaState::decode(&snapshot.data)?;
        inner.state = state.clone();
        inner.applied = index;
        inner.checkpointed = index;
        inner.previous = None;
        let _ = self.changes.send(Applied::Reset { index, state: Box::new(state) });
        self.applied_tx.send_replace(index);
        Ok(())
    }

    fn apply(&self, inner: &mut Inner, committed: Committed) -> Result<(), Error> {
        let Committed { index, term, payload } = committed;
        let waiter = inner.waiters.remove(&ProposalId { index, term });
        let event = match payload {
            Payload::Noop => Applied::Internal { index },
            Payload::ConfChange { conf_state, .. } => {
                if let Some(Waiter::Conf(tx)) = waiter {
                    let result = match conf_state {
                        Some(_) => Ok(()),
                        None => Err(Error::Unavailable("metadata configuration change refused by raft".to_owned())),
                    };
                    let _ = tx.send(result);
                }
                Applied::Internal { index }
            }
            Payload::Data(data) => {
                let cmd = decode_command(index, &data)?;
                let result = inner.state.apply(&cmd);
                if let Some(Waiter::Command(tx)) = waiter {
                    let _ = tx.send(Ok((index, result.clone())));
                }
                Applied::Command { index, cmd, result }
            }
        };
        inner.applied = index;
        let _ = self.changes.send(event);
        self.applied_tx.send_replace(index);
        Ok(())
    }

    /// Writes a checkpoint at the applied index and compacts the log to
    /// the previous one.
    fn checkpoint(&self, inner: &mut Inner) -> Result<(), Error> {
        let apply = inner.group.applied().clone();
        if apply.index != inner.applied {
            return Ok(());
        }
        let state = Bytes::from(inner.state.encode()?);
        let record = encode_checkpoint(apply.index, &state);
        let op = Op::LogMeta { log: META_GROUP, tag: CHECKPOINT_TAG, value: Some(record.into()) };
        inner.group.store_mut().save_apply_state_with(&apply, vec![op]).map_err(log_error)?;
        if let Some(previous) = inner.previous.take() {
            let mut snapshot = Snapshot { data: previous.state, ..Snapshot::default() };
            let meta = snapshot.mut_metadata();
            meta.index = previous.apply.index;
            meta.term = previous.apply.term;
            meta.set_conf_state(previous.apply.conf_state);
            inner.group.store_mut().compact_with(snapshot, Vec::new()).map_err(log_error)?;
        }
        inner.checkpointed = apply.index;
        inner.previous = Some(Checkpoint { apply, state });
        Ok(())
    }
}

impl Drop for MetaReplica {
    fn drop(&mut self) {
        if let Some(handle) = self.driver.get_mut().unwrap_or_else(|p| p.into_inner()).take() {
            handle.abort();
        }
    }
}

/// The driver task: ticks, and wakes up when raft writes settle or when an
/// input asks for it. Holds the replica only weakly.
async fn drive(replica: Weak<MetaReplica>, wake: Arc<Notify>, tick: Duration) {
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut marker: Option<Pin<Box<Completion>>> = None;
    loop {
        {
            let Some(r) = replica.upgrade() else { return };
            if let Some(next) = r.drive_once(marker.is_none()) {
                marker = Some(Box::pin(next));
            }
        }
        tokio::select! {
            _ = async { if let Some(m) = marker.as_mut() { let _ = m.as_mut().await; } }, if marker.is_some() => {
                marker = None;
            }
            _ = wake.notified() => {}
            _ = ticker.tick() => {
                let Some(r) = replica.upgrade() else { return };
                r.tick();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_and_commands_round_trip() {
        let mut state = MetaState::default();
        let cmd = MetaCommand::AddMember { id: "n1".into(), addr: "127.0.0.1:25680".into() };
        assert_eq!(state.apply(&cmd), MetaResult::Members);
        assert_eq!(decode_command(3, &encode_command(&cmd).unwrap()).unwrap(), cmd);
        let bytes = state.encode().unwrap();
        assert_eq!(MetaState::decode(&bytes).unwrap(), state);
        assert_eq!(MetaState::decode(&[]).unwrap(), MetaState::default());
        assert!(MetaState::decode(&[9, 1]).is_err());
        let (index, back) = decode_checkpoint(&encode_checkpoint(42, &bytes)).unwrap();
        assert_eq!((index, back), (42, state));
    }
}
