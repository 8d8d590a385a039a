//! [`Group`]: the driver of one Raft group's replica on raft-rs 0.7.
//!
//! raft-rs does no I/O: it takes ticks, messages and proposals, and hands
//! back a `Ready` saying what to persist, what to send and what is
//! committed. `Group` turns each `Ready` into an [`Output`] of plain data
//! and keeps raft-rs's rules so its caller cannot break them:
//!
//! 1. **Persist before acknowledging.** Entries, hard state and received
//!    snapshots go to the [`LogStore`] with `submit` (visible at once,
//!    durable later). Messages raft-rs marks as needing persistence first
//!    (`Ready::persisted_messages`: every message of a follower or
//!    candidate, i.e. votes and append acknowledgements) are held inside the
//!    group and only appear in [`Output::send`] after
//!    [`Group::on_persisted`] reported every write up to their ready as
//!    durable. A leader's own messages (`Ready::messages`) go out at once:
//!    the leader may replicate while it writes (Raft thesis, 10.2.1); it only
//!    counts itself towards a quorum once its write is durable.
//! 2. **Writes are durable in order.** `on_persisted(n)` means every write
//!    numbered `n` or lower is durable; the group then tells raft-rs
//!    (`on_persist_ready`), which may commit and emit more in the next
//!    [`Group::ready`].
//! 3. **Apply in order, exactly once.** [`Output::committed`] holds
//!    committed entries in index order, each exactly once per process
//!    lifetime, and only entries that are durable locally (raft-rs's
//!    `min(committed, persisted)`). The caller applies them in order before
//!    it handles the next `Output`. A received snapshot is handed out as
//!    [`Output::restore`] once it is durable, before any entry after it.
//!    Across restarts, the group resumes after the apply state saved with
//!    [`Group::save_apply_state`] (or after a newer snapshot), so entries
//!    after the last checkpoint are applied again, onto the checkpointed
//!    state: the caller must save its state machine and the apply state
//!    atomically.
//! 4. **Proposals finish.** A proposal accepted by this leader gets exactly
//!    one [`ProposalOutcome`]: `Committed` when its entry is applied,
//!    `LeadershipLost` as soon as this replica stops being leader of the
//!    term it was proposed in (it may still commit under a later leader, so
//!    the client must treat it as unknown and retry with its dedup id),
//!    `Rejected` if raft-rs replaced a configuration change with an empty
//!    entry or refused it at apply, `Superseded` if another entry was
//!    committed at its index.
//!
//! Call [`Group::ready`] after every input (tick, step, propose,
//! on_persisted); it returns an empty `Output` when there is nothing to do.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use protobuf::Message as _;
use raft::eraftpb::{
    ConfChange, ConfChangeSingle, ConfChangeType, ConfChangeV2, ConfState, Entry, EntryType,
    Message, MessageType, Snapshot,
};
use raft::{RawNode, SnapshotStatus, StateRole};

use super::log_store::{start_point, ApplyState, LogStore, LogWrite, RaftStore};
use super::{Error, SplitMix64};

/// Default election timeout in ticks. Followers wait a random
/// `[election_tick, 2 * election_tick)` ticks without hearing from a
/// leader before they campaign; with 50 ms ticks the simulation measures a
/// median failover of about 0.25 s (docs/cluster.md, "Raft driver and
/// simulation").
pub const DEFAULT_ELECTION_TICK: usize = 3;
/// Default heartbeat interval in ticks.
pub const DEFAULT_HEARTBEAT_TICK: usize = 1;

/// At most this many raft-rs `Ready`s are folded into one [`Output`]; the
/// rest waits for the next [`Group::ready`] (see [`Group::has_ready`]).
const MAX_READIES_PER_OUTPUT: usize = 8;

/// How a replica of a group runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupConfig {
    /// This replica's id in the group; not 0, never reused by another
    /// replica of the same group (a re-added node gets a new id).
    pub id: u64,
    /// Election timeout in ticks (see [`DEFAULT_ELECTION_TICK`]).
    pub election_tick: usize,
    /// Heartbeat interval in ticks; less than `election_tick`.
    pub heartbeat_tick: usize,
    /// Election timeouts are drawn from `[election_tick,
    /// max_election_tick)`; 0 means `2 * election_tick`.
    pub max_election_tick: usize,
    /// Byte limit of the entries in one append message.
    pub max_size_per_msg: u64,
    /// Append messages in flight per follower.
    pub max_inflight_msgs: usize,
    /// Byte limit of the leader's uncommitted entries; proposals beyond it
    /// fail with [`Error::ProposalDropped`].
    pub max_uncommitted_size: u64,
    /// A leader steps down when it has not heard from a quorum within an
    /// election timeout (so a partitioned leader stops accepting
    /// proposals), and followers that hear from a leader ignore votes.
    pub check_quorum: bool,
    /// A candidate first asks whether it could win (Raft thesis 9.6), so a
    /// replica returning from a partition does not depose a working leader.
    pub pre_vote: bool,
    /// If set, election timeouts are drawn from a generator with this seed
    /// instead of raft-rs's thread-local one, which makes runs
    /// reproducible (the simulation sets it).
    pub timeout_seed: Option<u64>,
}

impl GroupConfig {
    /// The defaults for replica `id`.
    pub fn new(id: u64) -> Self {
        GroupConfig {
            id,
            election_tick: DEFAULT_ELECTION_TICK,
            heartbeat_tick: DEFAULT_HEARTBEAT_TICK,
            max_election_tick: 0,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            max_uncommitted_size: 64 << 20,
            check_quorum: true,
            pre_vote: true,
            timeout_seed: None,
        }
    }

    fn raft_config(&self, applied: u64) -> raft::Config {
        let mut config = raft::Config::new(self.id);
        config.election_tick = self.election_tick;
        config.heartbeat_tick = self.heartbeat_tick;
        config.max_election_tick = self.max_election_tick;
        config.applied = applied;
        config.max_size_per_msg = self.max_size_per_msg;
        config.max_inflight_msgs = self.max_inflight_msgs;
        config.max_uncommitted_size = self.max_uncommitted_size;
        config.check_quorum = self.check_quorum;
        config.pre_vote = self.pre_vote;
        config
    }
}

/// A replica's role in its group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Follows a leader (or waits for one).
    Follower,
    /// Asking whether it could win an election (pre-vote).
    PreCandidate,
    /// Campaigning.
    Candidate,
    /// Leads the group in the current term.
    Leader,
}

impl From<StateRole> for Role {
    fn from(role: StateRole) -> Self {
        match role {
            StateRole::Follower => Role::Follower,
            StateRole::PreCandidate => Role::PreCandidate,
            StateRole::Candidate => Role::Candidate,
            StateRole::Leader => Role::Leader,
        }
    }
}

/// Leader changes seen by the groups of this process: a replica learned of
/// a leader (itself or another) different from the one it knew before,
/// including the first election of a group (metrics:
/// `sluice_raft_leader_changes_total`).
pub static LEADER_CHANGES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The role, leader or (for a leader) term changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoleChange {
    /// This replica's role now.
    pub role: Role,
    /// The current term.
    pub term: u64,
    /// The leader this replica knows of, if any (itself when leader).
    pub leader: Option<u64>,
}

/// Identifies a proposal: the index and term of its log entry. Two entries
/// with the same index and term are the same entry (Log Matching).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProposalId {
    /// Log index of the proposed entry.
    pub index: u64,
    /// Term in which this replica proposed it as leader.
    pub term: u64,
}

/// How a proposal ended. Each accepted proposal gets exactly one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProposalOutcome {
    /// Committed, and in this `Output`'s `committed`: confirm the client.
    Committed,
    /// This replica stopped being leader of the proposal's term first. The
    /// entry may still commit under a later leader: fail the client's
    /// confirm (it retries, deduplicated by its own id).
    LeadershipLost,
    /// A configuration change that raft-rs refused (another change was
    /// pending, or it does not apply to the configuration); nothing changed.
    Rejected,
    /// A different entry was committed at the proposal's index.
    Superseded,
}

/// What a committed entry carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// The empty entry a new leader appends; nothing to apply.
    Noop,
    /// Data proposed with [`Group::propose`].
    Data(Bytes),
    /// A configuration change. `conf_state` is the configuration after it,
    /// or `None` if raft-rs refused it (identically on every replica).
    ConfChange {
        /// The change as proposed (v1 changes are converted).
        change: ConfChangeV2,
        /// The configuration after applying it.
        conf_state: Option<ConfState>,
    },
}

/// One committed entry, to apply in order.
#[derive(Debug, Clone, PartialEq)]
pub struct Committed {
    /// Log index.
    pub index: u64,
    /// Term of the entry.
    pub term: u64,
    /// What it carries.
    pub payload: Payload,
}

/// Says that writes were handed to the store in this `Output`: once the
/// store has made write `number` (and so every earlier one) durable, call
/// [`Group::on_persisted`] with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PersistTicket {
    /// The number to report.
    pub number: u64,
    /// The last log index written, if entries were written.
    pub last_index: Option<u64>,
    /// Whether any of the writes must be synced (see `LogWrite::must_sync`).
    pub must_sync: bool,
}

/// What the caller must do after an input, as plain data. Handle the fields
/// in this order: start `persist`, send `send`, apply `restore` then
/// `committed`, then answer clients from `proposals`.
#[derive(Debug, Default)]
pub struct Output {
    /// Writes to wait for; report them with [`Group::on_persisted`].
    pub persist: Option<PersistTicket>,
    /// Messages to send, in order, to `msg.to`. For a `MsgSnapshot`, the
    /// transport must later call [`Group::report_snapshot`].
    pub send: Vec<Message>,
    /// Replace the state machine with this snapshot's data before applying
    /// `committed`.
    pub restore: Option<Snapshot>,
    /// Committed entries, in index order, exactly once.
    pub committed: Vec<Committed>,
    /// Proposals of this replica that finished.
    pub proposals: Vec<(ProposalId, ProposalOutcome)>,
    /// The role or leader changed; the latest state.
    pub role: Option<RoleChange>,
    /// This replica has applied a configuration without itself: stop it
    /// and delete its data once `send` is sent.
    pub removed: bool,
    /// A follower needs a snapshot newer than the stored one (it joined
    /// after it, or the log it needs is compacted): snapshot the state
    /// machine at the applied index and call [`Group::compact`].
    pub snapshot_wanted: bool,
}

impl Output {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.persist.is_none()
            && self.send.is_empty()
            && self.restore.is_none()
            && self.committed.is_empty()
            && self.proposals.is_empty()
            && self.role.is_none()
            && !self.removed
            && !self.snapshot_wanted
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProposalKind {
    Data,
    ConfChange,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    term: u64,
    kind: ProposalKind,
}

#[derive(Debug)]
struct Jitter {
    rng: SplitMix64,
    min: u64,
    max: u64,
}

/// The replica of one Raft group on this node. See the module docs for the
/// contract.
pub struct Group<S: LogStore> {
    id: u64,
    node: RawNode<RaftStore<S>>,
    /// What has been handed out for applying (index, term, configuration).
    applied: ApplyState,
    /// A restore the caller must do before anything else (set at open).
    restore_at_open: Option<Snapshot>,
    /// Received snapshots submitted to the store, with their write number;
    /// handed out as restores once durable.
    snapshot_writes: VecDeque<(u64, Snapshot)>,
    /// Numbers of writes submitted and not yet reported durable.
    in_flight: VecDeque<u64>,
    /// Messages waiting for the writes up to their ready to be durable.
    held: VecDeque<(u64, Vec<Message>)>,
    /// Messages released by `on_persisted`, sent with the next output.
    released: Vec<Message>,
    last_ready: u64,
    durable: u64,
    proposals: BTreeMap<u64, Pending>,
    reported: RoleChange,
    member: bool,
    jitter: Option<Jitter>,
    /// Set when a store write failed: raft-rs's state then no longer matches
    /// the store, so the group must be reopened from the store.
    poisoned: bool,
    /// Configuration changes at or below this index are already reflected
    /// in the configuration (a snapshot placed below the state it holds,
    /// see [`Group::skip_conf_changes_through`]): not applied again.
    conf_through: u64,
}

impl<S: LogStore> std::fmt::Debug for Group<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("id", &self.id)
            .field("role", &self.role())
            .field("term", &self.term())
            .field("applied", &self.applied.index)
            .finish_non_exhaustive()
    }
}

impl<S: LogStore> Group<S> {
    /// Opens the replica from its store: a bootstrapped store for a founding
    /// member, an empty one for a replica joining an existing group, or the
    /// store of a replica that is restarting.
    pub fn open(config: &GroupConfig, store: S, logger: &slog::Logger) -> Result<Self, Error> {
        let start = start_point(&store)?;
        let restore_at_open = if start.restore { Some(store.snapshot()?) } else { None };
        let raft_config = config.raft_config(start.applied.index);
        let jitter = config.timeout_seed.map(|seed| Jitter {
            rng: SplitMix64::new(seed ^ config.id.rotate_left(32)),
            min: raft_config.min_election_tick() as u64,
            max: raft_config.max_election_tick() as u64,
        });
        let node =
            RawNode::new(&raft_config, RaftStore::new(store), logger).map_err(Error::Raft)?;
        let member = conf_contains(&start.applied.conf_state, config.id);
        let mut group = Group {
            id: config.id,
            node,
            applied: start.applied,
            restore_at_open,
            snapshot_writes: VecDeque::new(),
            in_flight: VecDeque::new(),
            held: VecDeque::new(),
            released: Vec::new(),
            last_ready: 0,
            durable: 0,
            proposals: BTreeMap::new(),
            reported: RoleChange { role: Role::Follower, term: 0, leader: None },
            member,
            jitter,
            poisoned: false,
            conf_through: 0,
        };
        group.reported = group.role_now();
        group.rejitter();
        Ok(group)
    }

    /// This replica's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The number of the last ready handed out (its writes are with the
    /// store).
    pub fn last_ready(&self) -> u64 {
        self.last_ready
    }

    /// The current role.
    pub fn role(&self) -> Role {
        self.node.raft.state.into()
    }

    /// Whether this replica is the leader.
    pub fn is_leader(&self) -> bool {
        self.node.raft.state == StateRole::Leader
    }

    /// The current term.
    pub fn term(&self) -> u64 {
        self.node.raft.term
    }

    /// The leader this replica knows of.
    pub fn leader(&self) -> Option<u64> {
        let leader = self.node.raft.leader_id;
        (leader != raft::INVALID_ID).then_some(leader)
    }

    /// The commit index this replica knows of.
    pub fn commit_index(&self) -> u64 {
        self.node.raft.raft_log.committed
    }

    /// The last index of this replica's log.
    pub fn last_index(&self) -> u64 {
        self.node.raft.raft_log.last_index()
    }

    /// Leader only: how many entries the furthest behind other voter or
    /// learner lacks (last index minus its matched index); `None` when
    /// not leading.
    pub fn max_follower_lag(&self) -> Option<u64> {
        if !self.is_leader() {
            return None;
        }
        let last = self.last_index();
        let lag = self.node.raft.prs().iter().filter(|(id, _)| **id != self.id).map(|(_, p)| last.saturating_sub(p.matched));
        Some(lag.max().unwrap_or(0))
    }

    /// What has been handed out for applying.
    pub fn applied(&self) -> &ApplyState {
        &self.applied
    }

    /// The configuration as of the applied index.
    pub fn conf_state(&self) -> &ConfState {
        &self.applied.conf_state
    }

    /// Whether the applied configuration includes this replica.
    pub fn is_member(&self) -> bool {
        self.member
    }

    /// The store.
    pub fn store(&self) -> &S {
        self.node.store().get()
    }

    /// The store, mutably (for the owner's durability bookkeeping; raft
    /// writes go through the group).
    pub fn store_mut(&mut self) -> &mut S {
        self.node.mut_store().get_mut()
    }

    /// Closes the replica and returns its store.
    pub fn into_store(self) -> S {
        self.node.raft.r.raft_log.store.into_inner()
    }

    /// Proposes `data` as a new log entry. Only the leader accepts
    /// proposals; others answer [`Error::NotLeader`] with the leader they
    /// know of. The outcome arrives later in [`Output::proposals`].
    pub fn propose(&mut self, data: Vec<u8>) -> Result<ProposalId, Error> {
        if data.is_empty() {
            return Err(Error::EmptyProposal);
        }
        self.ensure_leader()?;
        let before = self.last_index();
        self.node.propose(Vec::new(), data).map_err(proposal_error)?;
        self.track(before, ProposalKind::Data)
    }

    /// Proposes a configuration change (joint consensus when it has more
    /// than one change, per `cc.transition`). Refused up front when another
    /// change is pending, when it does not fit a joint/simple
    /// configuration, or when it removes or demotes this leader (transfer
    /// leadership first).
    pub fn propose_conf_change(&mut self, cc: ConfChangeV2) -> Result<ProposalId, Error> {
        self.ensure_leader()?;
        if self.node.raft.has_pending_conf() {
            return Err(Error::ConfChangePending);
        }
        let joint = !self.applied.conf_state.voters_outgoing.is_empty();
        if joint && !cc.changes.is_empty() {
            return Err(Error::ConfChangeRefused("in a joint configuration: leave it first"));
        }
        if !joint && cc.changes.is_empty() {
            return Err(Error::ConfChangeRefused("not in a joint configuration"));
        }
        let removes_self = cc.changes.iter().any(|change| {
            change.node_id == self.id
                && matches!(
                    change.get_change_type(),
                    ConfChangeType::RemoveNode | ConfChangeType::AddLearnerNode
                )
        });
        if removes_self {
            return Err(Error::ConfChangeRefused(
                "removes or demotes the leader: transfer leadership first",
            ));
        }
        let before = self.last_index();
        self.node.propose_conf_change(Vec::new(), cc).map_err(proposal_error)?;
        self.track(before, ProposalKind::ConfChange)
    }

    /// Proposes leaving a joint configuration. raft-rs leaves on its own
    /// after an automatic-transition change, unless the leader changed
    /// before the joint configuration was applied.
    pub fn propose_leave_joint(&mut self) -> Result<ProposalId, Error> {
        self.propose_conf_change(ConfChangeV2::default())
    }

    /// Feeds a message from a peer. Malformed messages, and message types
    /// that are not part of the peer protocol (local events, forwarded
    /// proposals, read-index requests), are refused with
    /// [`Error::InvalidMessage`] without touching raft's state. A late
    /// response from a replica no longer in the group is dropped silently,
    /// and so is a leadership transfer to this replica while it installs a
    /// snapshot (see [`Group::tick`]).
    pub fn step(&mut self, message: Message) -> Result<(), Error> {
        self.validate(&message)?;
        if message.get_msg_type() == MessageType::MsgTimeoutNow && self.installing_snapshot() {
            return Ok(());
        }
        match self.node.step(message) {
            Ok(()) | Err(raft::Error::StepPeerNotFound) => {}
            Err(error) => return Err(Error::Raft(error)),
        }
        self.rejitter();
        Ok(())
    }

    /// Advances the logical clock by one tick.
    ///
    /// Two cases hold the clock, because an election would break a raft-rs
    /// assumption (and raft-rs panics):
    /// - a non-leader that is the only voter of its configuration, while
    ///   writes are in flight: it would elect itself at once, and raft-rs
    ///   requires a new leader's earlier log writes to be durable;
    /// - a follower installing a received snapshot (written, not yet handed
    ///   out as a restore): raft-rs reads the entries between its applied
    ///   index and its commit index when it campaigns, and the snapshot has
    ///   replaced them in the store.
    ///
    /// Both last as long as one disk write.
    pub fn tick(&mut self) {
        if self.would_win_alone() || self.installing_snapshot() {
            return;
        }
        self.node.tick();
        self.rejitter();
    }

    /// Starts an election now (tests, and bootstrapping a single-voter
    /// group without waiting for a timeout). Does nothing in the cases
    /// where [`Group::tick`] holds the clock.
    pub fn campaign(&mut self) -> Result<(), Error> {
        if self.would_win_alone() || self.installing_snapshot() {
            return Ok(());
        }
        self.node.campaign().map_err(Error::Raft)?;
        self.rejitter();
        Ok(())
    }

    /// Asks the leader to hand leadership to `to`.
    pub fn transfer_leader(&mut self, to: u64) {
        self.node.transfer_leader(to);
        self.rejitter();
    }

    /// The transport could not reach `to`: the leader stops pipelining to it
    /// and probes.
    pub fn report_unreachable(&mut self, to: u64) {
        self.node.report_unreachable(to);
    }

    /// The transport finished sending a snapshot to `to` (`delivered`) or
    /// gave up. Without this report the leader waits for that follower
    /// forever.
    pub fn report_snapshot(&mut self, to: u64, delivered: bool) {
        let status = if delivered { SnapshotStatus::Finish } else { SnapshotStatus::Failure };
        self.node.report_snapshot(to, status);
    }

    /// Whether [`Group::ready`] has something to hand out.
    pub fn has_ready(&self) -> bool {
        !self.released.is_empty()
            || self.restore_at_open.is_some()
            || self.snapshot_writes.front().is_some_and(|(number, _)| *number <= self.durable)
            || self.node.has_ready()
    }

    /// Everything the caller must do now; see [`Output`] and the module
    /// docs. After an error the group must be closed and reopened from its
    /// store.
    pub fn ready(&mut self) -> Result<Output, Error> {
        if self.poisoned {
            return Err(Error::Store(super::LogStoreError::Failed(
                "an earlier store write failed; reopen the group".to_owned(),
            )));
        }
        let mut out = Output::default();
        out.send.append(&mut self.released);
        self.hand_out_restore(&mut out);
        // After a restore, entries wait for the next call: the caller may
        // have to call `skip_conf_changes_through` first.
        let readies = if out.restore.is_some() { 0 } else { MAX_READIES_PER_OUTPUT };
        for _ in 0..readies {
            if !self.node.has_ready() {
                break;
            }
            if let Err(error) = self.process_ready(&mut out) {
                self.poisoned = true;
                return Err(error);
            }
        }
        self.fail_stale_proposals(&mut out);
        out.snapshot_wanted = self.node.store().take_snapshot_wanted();
        let now = self.role_now();
        if now != self.reported {
            if now.leader.is_some() && now.leader != self.reported.leader {
                LEADER_CHANGES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            self.reported = now;
            out.role = Some(now);
        }
        Ok(out)
    }

    /// The store made write `number` and every earlier one durable.
    pub fn on_persisted(&mut self, number: u64) -> Result<(), Error> {
        if number > self.last_ready {
            return Err(Error::UnknownPersist { number, last: self.last_ready });
        }
        if number <= self.durable {
            return Ok(());
        }
        self.durable = number;
        while self.in_flight.front().is_some_and(|front| *front <= number) {
            self.in_flight.pop_front();
        }
        // Readies that wrote nothing are durable once every earlier write
        // is: everything below the oldest write still in flight.
        let bound = self.in_flight.front().map_or(self.last_ready, |front| front - 1);
        while self.held.front().is_some_and(|(ready, _)| *ready <= bound) {
            if let Some((_, messages)) = self.held.pop_front() {
                self.released.extend(messages);
            }
        }
        self.node.on_persist_ready(bound);
        Ok(())
    }

    /// Saves the apply state (what has been handed out for applying) as the
    /// checkpoint to resume from. Call it in the same atomic write as the
    /// state machine's own state, after applying every `committed` entry
    /// handed out so far.
    pub fn save_apply_state(&mut self) -> Result<(), Error> {
        let state = self.applied.clone();
        self.store_mut().save_apply_state(&state)?;
        Ok(())
    }

    /// Installs a snapshot of the state machine at the applied index
    /// (`data` is its serialized state) and drops the log it covers.
    /// Followers that need dropped entries get the snapshot instead.
    pub fn compact(&mut self, data: Bytes) -> Result<(), Error> {
        let mut snapshot = Snapshot { data, ..Default::default() };
        let metadata = snapshot.mut_metadata();
        metadata.index = self.applied.index;
        metadata.term = self.applied.term;
        metadata.set_conf_state(self.applied.conf_state.clone());
        self.store_mut().compact(snapshot)?;
        Ok(())
    }

    /// Like [`Group::compact`], but the snapshot is placed at `index`, at
    /// or below the applied index, so the entries after `index` stay in the
    /// log (a state machine that reads data back from its log entries keeps
    /// the ones it still needs). `data` is the state machine as of the
    /// applied index: whoever restores it must skip the entries between
    /// `index` and the index its state reflects (the caller records that
    /// index in `data`). The configuration stored with the snapshot is the
    /// applied one: whoever restores it must not apply the configuration
    /// changes up to the index its state reflects again
    /// ([`Group::skip_conf_changes_through`]).
    pub fn compact_to(&mut self, index: u64, data: Bytes) -> Result<(), Error> {
        if index > self.applied.index {
            return Err(Error::Store(super::LogStoreError::BadCompaction {
                index,
                term: 0,
                reason: "beyond the applied index",
            }));
        }
        let term = self.store().term(index)?;
        let mut snapshot = Snapshot { data, ..Default::default() };
        let metadata = snapshot.mut_metadata();
        metadata.index = index;
        metadata.term = term;
        metadata.set_conf_state(self.applied.conf_state.clone());
        self.store_mut().compact(snapshot)?;
        Ok(())
    }

    /// Configuration-change entries up to `index` are not applied again:
    /// the configuration already reflects them. For a snapshot made with
    /// [`Group::compact_to`] below the state it holds: its configuration is
    /// the one applied when it was made (at the index the caller records in
    /// its data), so the changes between the snapshot's index and that one
    /// are in it already (raft-rs would otherwise apply them twice, and an
    /// "add learner" applied to a voter demotes it). Call it when restoring
    /// such a snapshot ([`Output::restore`] is handed out alone, before any
    /// later entry).
    pub fn skip_conf_changes_through(&mut self, index: u64) {
        self.conf_through = self.conf_through.max(index);
    }

    fn role_now(&self) -> RoleChange {
        RoleChange { role: self.role(), term: self.term(), leader: self.leader() }
    }

    fn ensure_leader(&self) -> Result<(), Error> {
        if self.is_leader() {
            Ok(())
        } else {
            Err(Error::NotLeader { leader: self.leader() })
        }
    }

    fn installing_snapshot(&self) -> bool {
        !self.snapshot_writes.is_empty()
    }

    fn would_win_alone(&self) -> bool {
        !self.is_leader() && !self.in_flight.is_empty() && self.node.raft.prs().is_singleton()
    }

    fn track(&mut self, before: u64, kind: ProposalKind) -> Result<ProposalId, Error> {
        let index = self.last_index();
        if index != before + 1 {
            return Err(Error::ProposalDropped);
        }
        let term = self.term();
        self.proposals.insert(index, Pending { term, kind });
        Ok(ProposalId { index, term })
    }

    /// Draws the next election timeout from the seeded generator whenever
    /// raft-rs has just restarted the election clock. raft-rs draws its own
    /// from a thread-local generator at the same moments (`reset`); ours
    /// replaces it before any tick compares against it, so timing depends
    /// on the seed only.
    fn rejitter(&mut self) {
        let Some(jitter) = self.jitter.as_mut() else {
            return;
        };
        let raft = &mut self.node.raft;
        if raft.election_elapsed == 0 && raft.state != StateRole::Leader && jitter.max > jitter.min
        {
            let timeout = jitter.rng.range(jitter.min, jitter.max);
            raft.set_randomized_election_timeout(timeout as usize);
        }
    }

    fn validate(&self, message: &Message) -> Result<(), Error> {
        let invalid = |reason: String| Err(Error::InvalidMessage(reason));
        if message.to != self.id {
            return invalid(format!("addressed to {}, this replica is {}", message.to, self.id));
        }
        if message.from == raft::INVALID_ID || message.from == self.id {
            return invalid(format!("bad sender {}", message.from));
        }
        let kind = message.get_msg_type();
        match kind {
            MessageType::MsgHup
            | MessageType::MsgBeat
            | MessageType::MsgUnreachable
            | MessageType::MsgSnapStatus
            | MessageType::MsgCheckQuorum
            | MessageType::MsgPropose
            | MessageType::MsgReadIndex
            | MessageType::MsgReadIndexResp => {
                return invalid(format!("{kind:?} is not a peer message"));
            }
            MessageType::MsgAppend => {
                if message.log_term > message.term {
                    return invalid("append: previous term after message term".to_owned());
                }
                for (offset, entry) in message.entries.iter().enumerate() {
                    // Checked arithmetic: the indexes come from the network.
                    if entry.index.checked_sub(message.index) != Some(1 + offset as u64) {
                        return invalid("append: entries not consecutive".to_owned());
                    }
                    if entry.term > message.term {
                        return invalid("append: entry from a later term".to_owned());
                    }
                }
            }
            MessageType::MsgSnapshot
                if message.get_snapshot().get_metadata().index == 0 => {
                    return invalid("snapshot without metadata".to_owned());
                }
            MessageType::MsgHeartbeat
                // A leader sends min(match, commit), which our log reaches.
                // A larger commit index from a current leader would make
                // raft-rs commit entries we may not share with it (raft-rs
                // panics on it). A stale leader's heartbeat may be larger
                // after our log was repaired; raft-rs ignores those.
                if message.term >= self.term() && message.commit > self.last_index() => {
                    return invalid(format!(
                        "heartbeat commit {} beyond the last index {}",
                        message.commit,
                        self.last_index()
                    ));
                }
            _ => {}
        }
        Ok(())
    }

    fn process_ready(&mut self, out: &mut Output) -> Result<(), Error> {
        let mut ready = self.node.ready();
        let number = ready.number();
        self.last_ready = number;
        // A leader's messages need not wait for its own write (rule 1).
        out.send.extend(ready.take_messages());
        let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
        let write = LogWrite {
            number,
            hard_state: ready.hs().cloned(),
            snapshot: snapshot.clone(),
            entries: ready.take_entries(),
            must_sync: ready.must_sync(),
        };
        if !write.is_empty() {
            let last_index = write.entries.last().map(|entry| entry.index);
            let must_sync = write.must_sync;
            // raft-rs requires the write to be readable before
            // `advance_append_async`; `submit` guarantees that.
            self.store_mut().submit(write)?;
            self.in_flight.push_back(number);
            if let Some(snapshot) = snapshot {
                self.snapshot_writes.push_back((number, snapshot));
            }
            let previous = out.persist.take();
            out.persist = Some(PersistTicket {
                number,
                last_index: last_index.or(previous.and_then(|ticket| ticket.last_index)),
                must_sync: must_sync || previous.is_some_and(|ticket| ticket.must_sync),
            });
        }
        let persisted_messages = ready.take_persisted_messages();
        let committed = ready.take_committed_entries();
        self.node.advance_append_async(ready);
        if self.in_flight.is_empty() {
            // Nothing of this ready or any earlier one awaits durability.
            out.send.extend(persisted_messages);
            self.node.on_persist_ready(number);
        } else if !persisted_messages.is_empty() {
            self.held.push_back((number, persisted_messages));
        }
        self.apply(committed, out)
    }

    /// Hands out the snapshot to restore from, if one became due: at open,
    /// or a received snapshot whose write is durable (the latest wins; the
    /// entries it covers were never handed out).
    fn hand_out_restore(&mut self, out: &mut Output) {
        if let Some(snapshot) = self.restore_at_open.take() {
            out.restore = Some(snapshot);
            return;
        }
        let mut due = None;
        while self.snapshot_writes.front().is_some_and(|(number, _)| *number <= self.durable) {
            due = self.snapshot_writes.pop_front().map(|(_, snapshot)| snapshot);
        }
        let Some(snapshot) = due else {
            return;
        };
        let metadata = snapshot.get_metadata();
        if metadata.index <= self.applied.index {
            return;
        }
        self.applied = ApplyState {
            index: metadata.index,
            term: metadata.term,
            conf_state: metadata.get_conf_state().clone(),
        };
        self.node.advance_apply_to(metadata.index);
        self.update_membership(out);
        out.restore = Some(snapshot);
    }

    fn apply(&mut self, committed: Vec<Entry>, out: &mut Output) -> Result<(), Error> {
        if committed.is_empty() {
            return Ok(());
        }
        for entry in committed {
            let expected = self.applied.index + 1;
            if entry.index != expected {
                return Err(Error::ApplyOrder { expected, got: entry.index });
            }
            let payload = match entry.get_entry_type() {
                EntryType::EntryNormal if entry.data.is_empty() => Payload::Noop,
                EntryType::EntryNormal => Payload::Data(entry.data.clone()),
                EntryType::EntryConfChange => {
                    let change = ConfChange::parse_from_bytes(&entry.data)
                        .map_err(|error| corrupt(&entry, error))?;
                    self.apply_conf_change(conf_change_v2(&change), out)
                }
                EntryType::EntryConfChangeV2 => {
                    let change = ConfChangeV2::parse_from_bytes(&entry.data)
                        .map_err(|error| corrupt(&entry, error))?;
                    self.apply_conf_change(change, out)
                }
            };
            self.applied.index = entry.index;
            self.applied.term = entry.term;
            self.resolve(&entry, &payload, out);
            out.committed.push(Committed { index: entry.index, term: entry.term, payload });
        }
        self.node.advance_apply_to(self.applied.index);
        Ok(())
    }

    fn apply_conf_change(&mut self, change: ConfChangeV2, out: &mut Output) -> Payload {
        if self.applied.index < self.conf_through {
            // Entry `applied.index + 1` is at or below `conf_through`.
            return Payload::ConfChange { change, conf_state: Some(self.applied.conf_state.clone()) };
        }
        // raft-rs checks the change against the current configuration before
        // touching anything, and every replica has the same configuration
        // at this index, so a refusal is identical everywhere.
        match self.node.apply_conf_change(&change) {
            Ok(conf_state) => {
                self.applied.conf_state = conf_state.clone();
                self.update_membership(out);
                Payload::ConfChange { change, conf_state: Some(conf_state) }
            }
            Err(_) => Payload::ConfChange { change, conf_state: None },
        }
    }

    /// Notices this replica's removal. A removed leader stays leader in
    /// raft-rs (it cannot commit and keeps followers from electing), so it
    /// hands leadership to the most up-to-date voter first.
    fn update_membership(&mut self, out: &mut Output) {
        let member = conf_contains(&self.applied.conf_state, self.id);
        if self.member && !member {
            out.removed = true;
            if self.is_leader() {
                let voters = &self.applied.conf_state.voters;
                let target = self
                    .node
                    .raft
                    .prs()
                    .iter()
                    .filter(|(id, _)| voters.contains(id))
                    .max_by_key(|(id, progress)| (progress.matched, **id))
                    .map(|(id, _)| *id);
                if let Some(target) = target {
                    self.node.transfer_leader(target);
                }
            }
        }
        self.member = member;
    }

    fn resolve(&mut self, entry: &Entry, payload: &Payload, out: &mut Output) {
        let Some(pending) = self.proposals.remove(&entry.index) else {
            return;
        };
        let outcome = if pending.term != entry.term {
            ProposalOutcome::Superseded
        } else {
            match (pending.kind, payload) {
                (ProposalKind::Data, Payload::Data(_)) => ProposalOutcome::Committed,
                (ProposalKind::ConfChange, Payload::ConfChange { conf_state: Some(_), .. }) => {
                    ProposalOutcome::Committed
                }
                _ => ProposalOutcome::Rejected,
            }
        };
        out.proposals.push((ProposalId { index: entry.index, term: pending.term }, outcome));
    }

    /// Proposals of a term in which this replica is no longer leader can
    /// no longer be confirmed by it (rule 4).
    fn fail_stale_proposals(&mut self, out: &mut Output) {
        let leader_term = self.is_leader().then(|| self.term());
        if self.proposals.values().all(|pending| Some(pending.term) == leader_term) {
            return;
        }
        let proposals = std::mem::take(&mut self.proposals);
        for (index, pending) in proposals {
            if Some(pending.term) == leader_term {
                self.proposals.insert(index, pending);
            } else {
                out.proposals.push((
                    ProposalId { index, term: pending.term },
                    ProposalOutcome::LeadershipLost,
                ));
            }
        }
    }
}

fn proposal_error(error: raft::Error) -> Error {
    match error {
        raft::Error::ProposalDropped => Error::ProposalDropped,
        other => Error::Raft(other),
    }
}

fn corrupt(entry: &Entry, error: protobuf::ProtobufError) -> Error {
    Error::CorruptEntry { index: entry.index, reason: error.to_string() }
}

/// Whether `id` is in the configuration in any role.
fn conf_contains(conf_state: &ConfState, id: u64) -> bool {
    conf_state.voters.contains(&id)
        || conf_state.learners.contains(&id)
        || conf_state.voters_outgoing.contains(&id)
        || conf_state.learners_next.contains(&id)
}

/// A v1 change as the equivalent single-step v2 change.
fn conf_change_v2(change: &ConfChange) -> ConfChangeV2 {
    let mut single = ConfChangeSingle::default();
    single.set_change_type(change.get_change_type());
    single.node_id = change.node_id;
    let mut v2 = ConfChangeV2::default();
    v2.changes.push(single);
    v2.context = change.context.clone();
    v2
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consensus::MemLogStore;

    fn logger() -> slog::Logger {
        slog::Logger::root(slog::Discard, slog::o!())
    }

    fn config(id: u64) -> GroupConfig {
        GroupConfig { timeout_seed: Some(7), ..GroupConfig::new(id) }
    }

    fn single_leader() -> Group<MemLogStore> {
        let store = MemLogStore::bootstrap(&[1], &[], Bytes::new());
        let mut group = Group::open(&config(1), store, &logger()).unwrap();
        group.campaign().unwrap();
        let out = group.ready().unwrap();
        assert_eq!(out.role.map(|role| role.role), Some(Role::Leader));
        sync(&mut group, out.persist);
        group
    }

    fn sync(group: &mut Group<MemLogStore>, ticket: Option<PersistTicket>) {
        if let Some(ticket) = ticket {
            group.store_mut().sync_through(ticket.number).unwrap();
            group.on_persisted(ticket.number).unwrap();
        }
    }

    #[test]
    fn single_voter_commits_only_after_its_write_is_durable() {
        let mut group = single_leader();
        let _ = group.ready().unwrap();
        let id = group.propose(b"v0".to_vec()).unwrap();
        let out = group.ready().unwrap();
        assert!(out.committed.iter().all(|c| c.index < id.index));
        let ticket = out.persist.unwrap();
        // Not durable yet: nothing for the proposal.
        assert!(group.ready().unwrap().committed.iter().all(|c| c.index < id.index));
        sync(&mut group, Some(ticket));
        let out = group.ready().unwrap();
        let committed: Vec<_> = out.committed.iter().map(|c| c.payload.clone()).collect();
        assert!(committed.contains(&Payload::Data(Bytes::from_static(b"v0"))));
        assert_eq!(out.proposals, vec![(id, ProposalOutcome::Committed)]);
    }

    #[test]
    fn followers_refuse_proposals_with_a_hint() {
        let store = MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new());
        let mut group = Group::open(&config(2), store, &logger()).unwrap();
        assert!(matches!(group.propose(b"x".to_vec()), Err(Error::NotLeader { leader: None })));
        assert!(matches!(group.propose(Vec::new()), Err(Error::EmptyProposal)));
    }

    #[test]
    fn peer_messages_that_are_not_peer_protocol_are_refused() {
        let store = MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new());
        let mut group = Group::open(&config(1), store, &logger()).unwrap();
        let mut propose = Message::default();
        propose.set_msg_type(MessageType::MsgPropose);
        propose.to = 1;
        propose.from = 2;
        assert!(matches!(group.step(propose), Err(Error::InvalidMessage(_))));
        let mut misrouted = Message::default();
        misrouted.set_msg_type(MessageType::MsgHeartbeat);
        misrouted.to = 3;
        misrouted.from = 2;
        assert!(matches!(group.step(misrouted), Err(Error::InvalidMessage(_))));
        let mut heartbeat = Message::default();
        heartbeat.set_msg_type(MessageType::MsgHeartbeat);
        heartbeat.to = 1;
        heartbeat.from = 2;
        heartbeat.term = 2;
        heartbeat.commit = 99;
        assert!(matches!(group.step(heartbeat), Err(Error::InvalidMessage(_))));
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgAppend);
        append.to = 1;
        append.from = 2;
        append.term = 2;
        append.index = 1;
        append.entries.push(Entry { index: 5, term: 2, ..Entry::default() });
        assert!(matches!(group.step(append), Err(Error::InvalidMessage(_))));
    }

    #[test]
    fn a_candidates_votes_wait_for_its_hard_state() {
        let store = MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new());
        let mut group = Group::open(&config(1), store, &logger()).unwrap();
        group.campaign().unwrap();
        let out = group.ready().unwrap();
        // Pre-vote requests do not change the hard state, so they go out.
        assert!(out.send.iter().all(|m| m.get_msg_type() == MessageType::MsgRequestPreVote));
        assert_eq!(out.send.len(), 2);
        for from in [2, 3] {
            let mut grant = Message::default();
            grant.set_msg_type(MessageType::MsgRequestPreVoteResponse);
            grant.to = 1;
            grant.from = from;
            grant.term = 2;
            group.step(grant).unwrap();
        }
        let out = group.ready().unwrap();
        // Now a candidate at term 2: the vote requests are held until the
        // new term and self-vote are durable.
        assert!(out.send.is_empty());
        let ticket = out.persist.unwrap();
        assert!(group.ready().unwrap().send.is_empty());
        sync(&mut group, Some(ticket));
        let out = group.ready().unwrap();
        assert_eq!(out.send.len(), 2);
        assert!(out.send.iter().all(|m| m.get_msg_type() == MessageType::MsgRequestVote));
    }

    #[test]
    fn leader_refuses_to_remove_itself_and_reports_lost_leadership() {
        let store = MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new());
        let mut group = Group::open(&config(1), store, &logger()).unwrap();
        group.campaign().unwrap();
        let out = group.ready().unwrap();
        sync(&mut group, out.persist);
        for from in [2, 3] {
            let mut grant = Message::default();
            grant.set_msg_type(MessageType::MsgRequestPreVoteResponse);
            grant.to = 1;
            grant.from = from;
            grant.term = 2;
            group.step(grant).unwrap();
        }
        let out = group.ready().unwrap();
        sync(&mut group, out.persist);
        let _ = group.ready().unwrap();
        let mut vote = Message::default();
        vote.set_msg_type(MessageType::MsgRequestVoteResponse);
        vote.to = 1;
        vote.from = 2;
        vote.term = group.term();
        group.step(vote).unwrap();
        let out = group.ready().unwrap();
        assert_eq!(out.role.map(|role| role.role), Some(Role::Leader));
        sync(&mut group, out.persist);

        let mut remove_self = ConfChangeV2::default();
        let mut change = ConfChangeSingle::default();
        change.set_change_type(ConfChangeType::RemoveNode);
        change.node_id = 1;
        remove_self.changes.push(change);
        assert!(matches!(group.propose_conf_change(remove_self), Err(Error::ConfChangeRefused(_))));

        let id = group.propose(b"lost?".to_vec()).unwrap();
        let _ = group.ready().unwrap();
        // A higher-term message deposes the leader before the entry commits.
        let mut append = Message::default();
        append.set_msg_type(MessageType::MsgHeartbeat);
        append.to = 1;
        append.from = 3;
        append.term = group.term() + 1;
        group.step(append).unwrap();
        let out = group.ready().unwrap();
        assert_eq!(out.proposals, vec![(id, ProposalOutcome::LeadershipLost)]);
        assert_eq!(out.role.map(|role| role.role), Some(Role::Follower));
    }
}
