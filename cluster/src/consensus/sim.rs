//! A seeded, deterministic simulation of one Raft group, driving the real
//! [`Group`] code (feature `sim`; `cargo test` turns it on).
//!
//! Time is counted in steps, [`STEPS_PER_TICK`] to a Raft tick (at 50 ms
//! ticks a step is 5 ms). Everything random (network delays, losses,
//! crashes, election timeouts) comes from one [`SplitMix64`] seeded with
//! the run's seed, and every collection is iterated in a fixed order, so a
//! seed replays exactly.
//!
//! **Fault model.**
//! - Network: each message is delayed a few steps, and with some
//!   probability dropped, duplicated or held back long enough to arrive
//!   after later ones. Messages already sent are delivered even if their
//!   sender crashed meanwhile.
//! - Disk: every write the group submits becomes durable after a latency
//!   (sometimes long), in order. A crash loses every write not yet durable
//!   (`MemLogStore::crash`) and the replica's in-memory state machine; the
//!   state machine's last checkpoint and the apply state saved with it
//!   survive, as do local snapshots.
//! - Crashes and restarts at any step, of any replica (often the leader),
//!   for a random time; a restarted replica reopens its `Group` from its
//!   durable store.
//! - Partitions: the leader isolated, or a random minority cut off, for a
//!   while, then healed.
//! - Membership: a new replica (fresh id, empty store) is added as a
//!   learner, caught up (by snapshot, since the log starts after the
//!   bootstrap snapshot, or after compaction), then promoted while another
//!   voter is removed in one joint-consensus change. Removed replicas are
//!   destroyed.
//! - State machines checkpoint and compact their logs at random.
//!
//! **Invariants**, checked as the run goes and at its end:
//! - (a) every value the leader confirmed to a client is, once replicas
//!   catch up, at the same index in the applied sequence of every member;
//! - (b) no two replicas apply different entries at one index (including
//!   the entries inside restored snapshots);
//! - (c) at most one leader per term;
//! - (d) the applied index never goes backwards: within a process lifetime
//!   entries arrive exactly at `applied + 1`; checkpoints are monotone; a
//!   restarted replica resumes at or after its last checkpoint and
//!   re-applies, onto the checkpointed state, the same entries (by (b));
//! - (e) liveness: after the last fault (everything healed and restarted),
//!   within a bounded number of ticks a new proposal is confirmed and every
//!   member applies everything confirmed.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;

use bytes::Bytes;
use raft::eraftpb::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Message,
    MessageType,
};

use super::{
    Error, Group, GroupConfig, MemLogStore, Output, Payload, ProposalId, ProposalOutcome, Role,
    SplitMix64, BOOTSTRAP_INDEX, BOOTSTRAP_TERM,
};

/// Simulation steps per Raft tick.
pub const STEPS_PER_TICK: u64 = 10;

/// How the network misbehaves. Delays are in steps.
#[derive(Debug, Clone)]
pub struct NetworkFaults {
    /// Shortest delivery delay.
    pub min_delay: u64,
    /// Longest ordinary delivery delay.
    pub max_delay: u64,
    /// Chance (per mille) a message is lost.
    pub drop_per_mille: u64,
    /// Chance (per mille) a message is delivered twice.
    pub duplicate_per_mille: u64,
    /// Chance (per mille) a message is held back 5–40 steps.
    pub slow_per_mille: u64,
}

/// Which faults a run injects and how often (chances per tick are per
/// mille).
#[derive(Debug, Clone)]
pub struct Faults {
    /// The network.
    pub network: NetworkFaults,
    /// Chance per tick that a replica crashes.
    pub crash_per_tick: u64,
    /// A crashed replica stays down 1..this many ticks.
    pub max_down_ticks: u64,
    /// Chance per tick that a partition starts (when none is active).
    pub partition_per_tick: u64,
    /// A partition lasts 5..this many ticks.
    pub max_partition_ticks: u64,
    /// Chance per tick that a membership change (add a replica, swap it in
    /// for a voter) starts.
    pub membership_per_tick: u64,
    /// Chance per tick and replica of a state machine checkpoint.
    pub checkpoint_per_tick: u64,
    /// Chance per tick and replica of a checkpoint plus log compaction.
    pub compact_per_tick: u64,
    /// Chance (per mille) a disk write takes 10–40 steps.
    pub slow_disk_per_mille: u64,
    /// Shortest disk write latency in steps.
    pub min_disk_delay: u64,
    /// Longest ordinary disk write latency in steps.
    pub max_disk_delay: u64,
}

impl Faults {
    /// Everything at once, often.
    pub fn chaos() -> Self {
        Faults {
            network: NetworkFaults {
                min_delay: 1,
                max_delay: 4,
                drop_per_mille: 50,
                duplicate_per_mille: 30,
                slow_per_mille: 50,
            },
            crash_per_tick: 25,
            max_down_ticks: 60,
            partition_per_tick: 15,
            max_partition_ticks: 60,
            membership_per_tick: 10,
            checkpoint_per_tick: 60,
            compact_per_tick: 15,
            slow_disk_per_mille: 30,
            min_disk_delay: 1,
            max_disk_delay: 3,
        }
    }

    /// A healthy LAN: short delays, nothing lost, no crashes. Used after the
    /// fault phase and for the failover measurement.
    pub fn calm() -> Self {
        Faults {
            network: NetworkFaults {
                min_delay: 1,
                max_delay: 3,
                drop_per_mille: 0,
                duplicate_per_mille: 0,
                slow_per_mille: 0,
            },
            crash_per_tick: 0,
            max_down_ticks: 1,
            partition_per_tick: 0,
            max_partition_ticks: 5,
            membership_per_tick: 0,
            checkpoint_per_tick: 60,
            compact_per_tick: 10,
            slow_disk_per_mille: 0,
            min_disk_delay: 1,
            max_disk_delay: 2,
        }
    }
}

/// One simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The integration test whose `replay` test replays a failing seed
    /// (named in failures).
    pub replay_test: &'static str,
    /// The seed; the same seed gives the same run.
    pub seed: u64,
    /// Voters the group starts with (it keeps that many through membership
    /// changes).
    pub voters: usize,
    /// Ticks during which faults are injected.
    pub fault_ticks: u64,
    /// Ticks after the last fault within which (e) must hold.
    pub settle_ticks: u64,
    /// Faults of the fault phase.
    pub faults: Faults,
    /// Client proposals per tick (per mille: 1500 = 1.5 per tick).
    pub proposals_per_tick: u64,
    /// How every replica runs (`id` and `timeout_seed` are set per replica).
    pub group: GroupConfig,
    /// Record a trace of events to print on failure.
    pub trace: bool,
}

impl SimConfig {
    /// A chaos run of `voters` replicas.
    pub fn chaos(seed: u64, voters: usize) -> Self {
        SimConfig {
            replay_test: "raft_sim",
            seed,
            voters,
            fault_ticks: 400,
            settle_ticks: 100,
            faults: Faults::chaos(),
            proposals_per_tick: 1500,
            group: GroupConfig::new(1),
            trace: false,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimReport {
    /// The seed.
    pub seed: u64,
    /// Steps simulated.
    pub steps: u64,
    /// Client proposals accepted by a leader.
    pub proposed: u64,
    /// Proposals confirmed (committed, seen by the leader that accepted them).
    pub confirmed: u64,
    /// Proposals failed because their leader lost leadership.
    pub leadership_lost: u64,
    /// Proposals whose leader crashed before answering.
    pub unanswered: u64,
    /// Highest index applied anywhere.
    pub max_applied: u64,
    /// Distinct terms that had a leader.
    pub leader_terms: u64,
    /// Crashes.
    pub crashes: u64,
    /// Partitions.
    pub partitions: u64,
    /// Configuration changes applied (counted once per log index).
    pub conf_changes: u64,
    /// Replicas added.
    pub replicas_added: u64,
    /// Replicas removed and destroyed.
    pub replicas_removed: u64,
    /// Snapshots restored by state machines (received or at restart).
    pub restores: u64,
    /// Log compactions.
    pub compactions: u64,
    /// Messages delivered.
    pub delivered: u64,
    /// Messages lost (dropped, cut by a partition, or to a crashed replica).
    pub lost: u64,
    /// Ticks from the end of the fault phase to the first confirmed new
    /// proposal.
    pub liveness_ticks: u64,
    /// Ticks from the end of the fault phase until every member had applied
    /// everything confirmed.
    pub catch_up_ticks: u64,
    /// A digest of every applied entry, to compare runs of one seed.
    pub digest: u64,
}

/// An invariant broke (or the driver returned an error).
#[derive(Debug, Clone)]
pub struct SimFailure {
    /// The seed that fails.
    pub seed: u64,
    /// Voters of the run.
    pub voters: usize,
    /// Step at which the failure was detected.
    pub step: u64,
    /// What broke.
    pub what: String,
    /// The last events, if tracing was on.
    pub trace: Vec<String>,
    /// The command that replays the seed.
    pub replay: String,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} ({} voters) failed at step {} (tick {}): {}",
            self.seed,
            self.voters,
            self.step,
            self.step / STEPS_PER_TICK,
            self.what
        )?;
        writeln!(f, "  replay: {}", self.replay)?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimFailure {}

/// Runs one simulation.
pub fn run(config: &SimConfig) -> Result<SimReport, SimFailure> {
    let mut sim = Sim::new(config.clone(), Values);
    sim.run_chaos()
}

/// Failover timing from one leader crash.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FailoverSample {
    /// Ticks from the crash until another replica is leader.
    pub ticks_to_leader: f64,
    /// Ticks from the crash until the new leader has committed an entry of
    /// its term (it can confirm publishes again).
    pub ticks_to_commit: f64,
}

impl SimConfig {
    /// A failover measurement: a healthy LAN ([`Faults::calm`]), one client
    /// proposal per tick; [`measure_failover`] crashes the leader.
    pub fn failover(seed: u64, voters: usize) -> Self {
        SimConfig {
            seed,
            voters,
            fault_ticks: 0,
            settle_ticks: 0,
            faults: Faults::calm(),
            proposals_per_tick: 1000,
            ..SimConfig::chaos(seed, voters)
        }
    }
}

/// Crashes the leader of a healthy group under steady load (after a warm-up
/// of 30–50 ticks) and measures how long the group is without a working
/// leader.
pub fn measure_failover(config: &SimConfig) -> Result<FailoverSample, SimFailure> {
    let mut sim = Sim::new(config.clone(), Values);
    sim.run_failover()
}

// Payloads as the simulated state machine records them.
const PAYLOAD_NOOP: u64 = 0;
const PAYLOAD_CONF: u64 = 1;
const PAYLOAD_BOOT: u64 = 2;
const PAYLOAD_VALUE_BASE: u64 = 16;

/// What runs on top of the simulated group: the state machine every replica
/// applies, and the clients around it. [`run`] uses [`Values`] (opaque
/// values, applied as a sequence); `queue_sim` runs whole replicated queues.
///
/// Hooks get the simulation itself (the workload is taken out of it for the
/// call) to propose, look at replicas, draw random numbers and trace.
pub(crate) trait Workload: Sized {
    /// The per-replica state machine. It is lost in a crash; checkpoints
    /// and snapshots carry it ([`Workload::encode`]).
    type State: Clone;

    /// The state of a fresh group (and of a new replica before its first
    /// snapshot).
    fn initial(&self) -> Self::State;

    /// The state's bytes inside a snapshot.
    fn encode(state: &Self::State) -> Vec<u8>;

    /// Reads [`Workload::encode`]'s bytes.
    fn decode(bytes: &[u8]) -> Result<Self::State, String>;

    /// A digest of a data entry for invariants (a) and (b) (at least
    /// [`PAYLOAD_VALUE_BASE`]), or why the bytes are foreign.
    fn digest(data: &[u8]) -> Result<u64, String>;

    /// Replica `id` applies the entry at `index` (`data` is `None` for a
    /// no-op or a configuration change). `up` is the replica (taken out of
    /// the simulation for the call: propose through
    /// [`Sim::propose_on`]); its state is `up.sm.app`.
    fn apply(
        &mut self,
        sim: &mut Sim<Self>,
        id: u64,
        up: &mut Up<Self>,
        index: u64,
        data: Option<&[u8]>,
    ) -> SimResult<()>;

    /// Replica `id` restored a snapshot at `index`.
    fn restored(&mut self, sim: &mut Sim<Self>, id: u64, index: u64, state: &Self::State) -> SimResult<()>;

    /// One step of the clients (after the simulation's own).
    fn step(&mut self, sim: &mut Sim<Self>) -> SimResult<()>;

    /// The fault phase ended: everything heals.
    fn healed(&mut self, sim: &mut Sim<Self>);

    /// After healing: the run may end once this holds (and every member
    /// has applied everything confirmed).
    fn done(&mut self, sim: &mut Sim<Self>) -> bool;

    /// The run ends: final checks.
    fn finish(&mut self, sim: &mut Sim<Self>) -> SimResult<()>;

    /// What is still missing when [`Workload::done`] never held.
    fn describe(&self) -> String;
}

/// The opaque values of [`run`]: the simulation's own clients propose them
/// and the state machine is the applied sequence itself.
pub(crate) struct Values;

impl Workload for Values {
    type State = ();

    fn initial(&self) {}

    fn encode(_: &()) -> Vec<u8> {
        Vec::new()
    }

    fn decode(bytes: &[u8]) -> Result<(), String> {
        if bytes.is_empty() {
            Ok(())
        } else {
            Err(format!("{} bytes after the entries", bytes.len()))
        }
    }

    fn digest(data: &[u8]) -> Result<u64, String> {
        if data.len() != 8 {
            return Err(format!("{} bytes of data", data.len()));
        }
        Ok(read_u64(data) + PAYLOAD_VALUE_BASE)
    }

    fn apply(&mut self, _: &mut Sim<Self>, _: u64, _: &mut Up<Self>, _: u64, _: Option<&[u8]>) -> SimResult<()> {
        Ok(())
    }

    fn restored(&mut self, _: &mut Sim<Self>, _: u64, _: u64, _: &()) -> SimResult<()> {
        Ok(())
    }

    fn step(&mut self, _: &mut Sim<Self>) -> SimResult<()> {
        Ok(())
    }

    fn healed(&mut self, _: &mut Sim<Self>) {}

    fn done(&mut self, _: &mut Sim<Self>) -> bool {
        true
    }

    fn finish(&mut self, _: &mut Sim<Self>) -> SimResult<()> {
        Ok(())
    }

    fn describe(&self) -> String {
        String::new()
    }
}

/// How a workload's proposal ended, as [`Sim::take_outcomes`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Finished {
    /// Committed: confirmed to the client.
    Committed,
    /// Leadership lost, or the replica crashed or was removed before
    /// answering: it may still commit.
    Failed,
}

/// A client proposal waiting for its outcome.
#[derive(Debug, Clone, Copy)]
struct InFlight {
    /// The run's proposal number (liveness counts from it).
    value: u64,
    /// [`Workload::digest`] of the data.
    payload: u64,
    /// The workload's tag, if the workload proposed it.
    tag: Option<u64>,
}

/// The simulated state machine: the applied sequence itself, so that
/// invariants can compare replicas index by index, plus the workload's own
/// state (`app`, `()` for the opaque values of [`run`]). `entries[i]` is the
/// (term, payload) applied at index `i + 1`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Sm<S> {
    entries: Vec<(u64, u64)>,
    /// The workload's state machine.
    pub(crate) app: S,
}

impl<S> Sm<S> {
    fn bootstrap(app: S) -> Self {
        Sm { entries: vec![(BOOTSTRAP_TERM, PAYLOAD_BOOT)], app }
    }

    /// The last index applied.
    pub(crate) fn applied(&self) -> u64 {
        self.entries.len() as u64
    }

    fn at(&self, index: u64) -> Option<(u64, u64)> {
        index.checked_sub(1).and_then(|i| self.entries.get(i as usize).copied())
    }

    /// Snapshot layout: entry count (8 bytes), the entries (term and
    /// payload, 8 bytes each), then the workload's state.
    fn encode(&self, app: Vec<u8>) -> Bytes {
        let mut bytes = Vec::with_capacity(8 + self.entries.len() * 16 + app.len());
        bytes.extend_from_slice(&(self.entries.len() as u64).to_be_bytes());
        for (term, payload) in &self.entries {
            bytes.extend_from_slice(&term.to_be_bytes());
            bytes.extend_from_slice(&payload.to_be_bytes());
        }
        bytes.extend_from_slice(&app);
        Bytes::from(bytes)
    }

    fn decode(data: &[u8], app: impl FnOnce(&[u8]) -> Result<S, String>) -> Result<Self, String> {
        let count = data.get(..8).map(read_u64).ok_or("snapshot shorter than its header")?;
        let end = usize::try_from(count)
            .ok()
            .and_then(|n| n.checked_mul(16))
            .and_then(|n| n.checked_add(8))
            .filter(|end| *end <= data.len())
            .ok_or_else(|| format!("snapshot of {} bytes cannot hold {count} entries", data.len()))?;
        let entries = data
            .get(8..end)
            .unwrap_or_default()
            .chunks_exact(16)
            .map(|chunk| {
                let (term, payload) = chunk.split_at(8);
                (read_u64(term), read_u64(payload))
            })
            .collect();
        let app = app(data.get(end..).unwrap_or_default())?;
        Ok(Sm { entries, app })
    }
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buffer = [0u8; 8];
    buffer.copy_from_slice(bytes.get(..8).unwrap_or(&[0; 8]));
    u64::from_be_bytes(buffer)
}

/// A running replica.
pub(crate) struct Up<W: Workload> {
    /// The Raft driver.
    pub(crate) group: Group<MemLogStore>,
    /// Its state machine.
    pub(crate) sm: Sm<W::State>,
    /// Writes waiting for the disk: (due step, write number), in order.
    disk: VecDeque<(u64, u64)>,
}

struct Node<W: Workload> {
    id: u64,
    incarnation: u64,
    up: Option<Box<Up<W>>>,
    /// The disk while crashed, and when it comes back.
    down: Option<(MemLogStore, u64)>,
    destroyed: bool,
    /// The state machine's last checkpoint (durable).
    checkpoint: Sm<W::State>,
    /// Ticks fire when `(step + phase) % STEPS_PER_TICK == 0`: replicas'
    /// clocks are not aligned.
    phase: u64,
}

struct Packet {
    due: u64,
    order: u64,
    from: u64,
    to: u64,
    message: Message,
}

/// A proposal the operator (membership driver) made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OperatorOp {
    AddLearner,
    Swap,
    LeaveJoint,
}

/// State of the failover measurement.
#[derive(Debug, Default)]
struct Watch {
    crashed_at: u64,
    old_term: u64,
    leader_at: Option<u64>,
    new_leader: Option<u64>,
    commit_at: Option<u64>,
}

/// The simulation of one group (see the module docs); `W` is what runs on it.
pub(crate) struct Sim<W: Workload> {
    config: SimConfig,
    faults: Faults,
    rng: SplitMix64,
    logger: slog::Logger,
    now: u64,
    nodes: BTreeMap<u64, Node<W>>,
    next_id: u64,
    network: Vec<Packet>,
    /// Transport reports on snapshot messages: (sender, recipient, delivered).
    snapshot_reports: Vec<(u64, u64, bool)>,
    isolated: BTreeSet<u64>,
    partition_until: u64,
    /// (b): the entry first applied at each index (`applied_at[i]` is index i + 1).
    applied_at: Vec<(u64, u64)>,
    /// (c): the leader of each term.
    leaders: HashMap<u64, u64>,
    /// (a): confirmed proposals: (value, index, payload).
    confirmed: Vec<(u64, u64, u64)>,
    next_value: u64,
    believed_leader: Option<u64>,
    in_flight: HashMap<(u64, u64, ProposalId), InFlight>,
    /// Outcomes of the workload's proposals, until it takes them.
    outcomes: Vec<(u64, Finished)>,
    operator_in_flight: HashMap<(u64, u64, ProposalId), OperatorOp>,
    /// The newest configuration applied anywhere, with its index.
    latest_conf: (u64, ConfState),
    joining: Option<u64>,
    joint_since: Option<u64>,
    watch: Option<Watch>,
    report: SimReport,
    trace: VecDeque<String>,
    /// The workload (taken out while one of its hooks runs).
    workload: Option<W>,
    /// [`Workload::initial`], for replicas added later.
    initial: W::State,
}

/// What the simulation's steps return.
pub(crate) type SimResult<T> = Result<T, SimFailure>;

const TRACE_LINES: usize = 400;

impl<W: Workload> Sim<W> {
    pub(crate) fn new(config: SimConfig, workload: W) -> Self {
        let mut rng = SplitMix64::new(config.seed);
        let voters: Vec<u64> = (1..=config.voters as u64).collect();
        let bootstrap = Sm::bootstrap(workload.initial());
        let mut nodes = BTreeMap::new();
        for &id in &voters {
            let store = MemLogStore::bootstrap(&voters, &[], bootstrap.encode(W::encode(&bootstrap.app)));
            let phase = rng.below(STEPS_PER_TICK);
            nodes.insert(
                id,
                Node {
                    id,
                    incarnation: 0,
                    up: None,
                    down: Some((store, 0)),
                    destroyed: false,
                    checkpoint: bootstrap.clone(),
                    phase,
                },
            );
        }
        let conf = ConfState { voters: voters.clone(), ..ConfState::default() };
        let faults = config.faults.clone();
        Sim {
            faults,
            rng,
            logger: slog::Logger::root(slog::Discard, slog::o!()),
            now: 0,
            nodes,
            next_id: config.voters as u64 + 1,
            network: Vec::new(),
            snapshot_reports: Vec::new(),
            isolated: BTreeSet::new(),
            partition_until: 0,
            applied_at: bootstrap.entries.clone(),
            leaders: HashMap::new(),
            confirmed: Vec::new(),
            next_value: 0,
            believed_leader: None,
            in_flight: HashMap::new(),
            outcomes: Vec::new(),
            operator_in_flight: HashMap::new(),
            latest_conf: (BOOTSTRAP_INDEX, conf),
            joining: None,
            joint_since: None,
            watch: None,
            report: SimReport { seed: config.seed, ..SimReport::default() },
            trace: VecDeque::new(),
            initial: workload.initial(),
            workload: Some(workload),
            config,
        }
    }

    /// A failure at this step.
    pub(crate) fn fail<T>(&self, what: impl Into<String>) -> SimResult<T> {
        let (seed, voters) = (self.config.seed, self.config.voters);
        Err(SimFailure {
            seed,
            voters,
            step: self.now,
            what: what.into(),
            trace: self.trace.iter().cloned().collect(),
            replay: format!(
                "SIM_SEED={seed} SIM_VOTERS={voters} SIM_TRACE=1 cargo test -p sluice-cluster \
                 --test {} replay -- --nocapture",
                self.config.replay_test
            ),
        })
    }

    /// Adds a line to the trace (when tracing).
    pub(crate) fn note(&mut self, line: impl FnOnce() -> String) {
        if self.config.trace {
            if self.trace.len() == TRACE_LINES {
                self.trace.pop_front();
            }
            let line = format!("[{}] {}", self.now, line());
            self.trace.push_back(line);
        }
    }

    fn group_config(&mut self, id: u64) -> GroupConfig {
        GroupConfig { id, timeout_seed: Some(self.rng.next_u64()), ..self.config.group.clone() }
    }

    // ---- the two scenarios -------------------------------------------------

    /// Runs a workload hook with the workload taken out of the simulation.
    fn with_workload<T>(&mut self, hook: impl FnOnce(&mut W, &mut Self) -> SimResult<T>) -> SimResult<T> {
        let Some(mut workload) = self.workload.take() else {
            return self.fail("a workload hook re-entered the simulation");
        };
        let result = hook(&mut workload, self);
        self.workload = Some(workload);
        result
    }

    /// The fault phase, healing, and the settle phase (see the module docs).
    pub(crate) fn run_chaos(&mut self) -> SimResult<SimReport> {
        let fault_end = self.config.fault_ticks * STEPS_PER_TICK;
        let settle_end = fault_end + self.config.settle_ticks * STEPS_PER_TICK;
        let mut liveness_from_value = None;
        let mut live_at = None;
        for step in 0..settle_end {
            self.now = step;
            if step < fault_end {
                self.inject_faults()?;
            } else if step == fault_end {
                self.heal_everything();
                self.with_workload(|workload, sim| {
                    workload.healed(sim);
                    Ok(())
                })?;
                liveness_from_value = Some(self.next_value);
            }
            self.step_world(step < fault_end)?;
            if let Some(first_value) = liveness_from_value {
                if live_at.is_none()
                    && self.confirmed.iter().any(|(value, _, _)| *value >= first_value)
                {
                    live_at = Some(step);
                    self.report.liveness_ticks = (step - fault_end) / STEPS_PER_TICK;
                }
                if live_at.is_some()
                    && self.caught_up()
                    && self.with_workload(|workload, sim| Ok(workload.done(sim)))?
                {
                    self.report.catch_up_ticks = (step - fault_end) / STEPS_PER_TICK;
                    self.check_confirmed_everywhere()?;
                    self.with_workload(|workload, sim| workload.finish(sim))?;
                    self.finish_report(step);
                    return Ok(self.report.clone());
                }
            }
        }
        if live_at.is_none() {
            return self.fail(format!(
                "(e) no proposal confirmed within {} ticks after the last fault",
                self.config.settle_ticks
            ));
        }
        let workload = self.workload.as_ref().map(W::describe).unwrap_or_default();
        self.fail(format!(
            "(e) members did not catch up within {} ticks after the last fault: {}; {workload}",
            self.config.settle_ticks,
            self.describe_progress()
        ))
    }

    fn run_failover(&mut self) -> SimResult<FailoverSample> {
        let warm_up = (30 + self.rng.below(20)) * STEPS_PER_TICK + self.rng.below(STEPS_PER_TICK);
        let limit = warm_up + 300 * STEPS_PER_TICK;
        for step in 0..limit {
            self.now = step;
            if step >= warm_up && self.watch.is_none() && self.confirmed.len() >= 10 {
                if let Some(leader) = self.current_leader() {
                    let old_term = self.up(leader).map_or(0, |up| up.group.term());
                    self.crash(leader, 1_000_000)?;
                    self.watch = Some(Watch { crashed_at: step, old_term, ..Watch::default() });
                }
            }
            self.step_world(false)?;
            if let Some(watch) = &self.watch {
                if let (Some(leader_at), Some(commit_at)) = (watch.leader_at, watch.commit_at) {
                    let ticks = |at: u64| (at - watch.crashed_at) as f64 / STEPS_PER_TICK as f64;
                    return Ok(FailoverSample {
                        ticks_to_leader: ticks(leader_at),
                        ticks_to_commit: ticks(commit_at),
                    });
                }
            }
        }
        self.fail("failover: no new leader committed within 300 ticks of the crash")
    }

    /// One step of everything but fault injection.
    fn step_world(&mut self, fault_phase: bool) -> SimResult<()> {
        self.restart_due()?;
        self.deliver()?;
        self.run_disks()?;
        self.run_ticks();
        self.clients()?;
        self.with_workload(|workload, sim| workload.step(sim))?;
        if self.now.is_multiple_of(5 * STEPS_PER_TICK) {
            self.operator(fault_phase)?;
        }
        self.drive_all()?;
        if self.now.is_multiple_of(STEPS_PER_TICK) {
            self.checkpoints()?;
        }
        Ok(())
    }

    // ---- faults -------------------------------------------------------------

    fn per_tick(&mut self, per_mille: u64) -> bool {
        self.rng.below(1000 * STEPS_PER_TICK) < per_mille
    }

    fn inject_faults(&mut self) -> SimResult<()> {
        if self.per_tick(self.faults.crash_per_tick) {
            let leader = self.current_leader();
            let target = match leader {
                Some(leader) if self.rng.chance(400) => Some(leader),
                _ => self.random_up_node(),
            };
            if let Some(id) = target {
                let down_for = self.rng.range(1, self.faults.max_down_ticks.max(2))
                    * STEPS_PER_TICK
                    + self.rng.below(STEPS_PER_TICK);
                self.crash(id, self.now + down_for)?;
            }
        }
        if self.isolated.is_empty() {
            if self.per_tick(self.faults.partition_per_tick) {
                self.start_partition();
            }
        } else if self.now >= self.partition_until {
            self.note(|| "partition healed".to_owned());
            self.isolated.clear();
        }
        Ok(())
    }

    fn start_partition(&mut self) {
        let members: Vec<u64> = self.live_ids();
        if members.len() < 2 {
            return;
        }
        let leader = self.current_leader();
        let isolated: BTreeSet<u64> = match leader {
            Some(leader) if self.rng.chance(600) => [leader].into_iter().collect(),
            _ => {
                let size = 1 + self.rng.below((members.len() as u64 - 1) / 2 + 1) as usize;
                let mut pool = members.clone();
                let mut chosen = BTreeSet::new();
                while chosen.len() < size && !pool.is_empty() {
                    let pick = self.rng.below(pool.len() as u64) as usize;
                    chosen.insert(pool.remove(pick));
                }
                chosen
            }
        };
        let ticks = self.rng.range(5, self.faults.max_partition_ticks.max(6));
        self.partition_until = self.now + ticks * STEPS_PER_TICK;
        self.report.partitions += 1;
        self.note(|| format!("partition: {isolated:?} cut off for {ticks} ticks"));
        self.isolated = isolated;
    }

    fn heal_everything(&mut self) {
        self.isolated.clear();
        self.faults = Faults::calm();
        // Keep a little loss: liveness must not depend on a perfect network.
        self.faults.network.drop_per_mille = 5;
        self.faults.network.duplicate_per_mille = 5;
        let now = self.now;
        for node in self.nodes.values_mut() {
            if let Some((_, until)) = node.down.as_mut() {
                *until = now;
            }
        }
        self.note(|| "healed: partitions gone, every replica restarting".to_owned());
    }

    fn crash(&mut self, id: u64, until: u64) -> SimResult<()> {
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let Some(up) = node.up.take() else {
            return Ok(());
        };
        let mut store = up.group.into_store();
        store.crash();
        node.down = Some((store, until));
        let incarnation = node.incarnation;
        self.report.unanswered += self.forget_proposals_of(id, incarnation);
        self.operator_in_flight
            .retain(|(node_id, inc, _), _| !(*node_id == id && *inc == incarnation));
        self.report.crashes += 1;
        self.note(|| format!("crash {id} until step {until}"));
        Ok(())
    }

    /// Drops the client proposals a replica accepted in its incarnation
    /// (it crashed or was removed); the workload's fail. Returns how many.
    fn forget_proposals_of(&mut self, id: u64, incarnation: u64) -> u64 {
        let mut gone: Vec<((u64, u64, ProposalId), InFlight)> = Vec::new();
        self.in_flight.retain(|key, proposal| {
            let (node_id, inc, _) = *key;
            let mine = node_id == id && inc == incarnation;
            if mine {
                gone.push((*key, *proposal));
            }
            !mine
        });
        // HashMap order is not deterministic: report in proposal order.
        gone.sort_by_key(|(_, proposal)| proposal.value);
        for (_, proposal) in &gone {
            if let Some(tag) = proposal.tag {
                self.outcomes.push((tag, Finished::Failed));
            }
        }
        gone.len() as u64
    }

    fn restart_due(&mut self) -> SimResult<()> {
        let due: Vec<u64> = self
            .nodes
            .values()
            .filter(|node| node.down.as_ref().is_some_and(|(_, until)| *until <= self.now))
            .map(|node| node.id)
            .collect();
        for id in due {
            self.restart(id)?;
        }
        Ok(())
    }

    fn restart(&mut self, id: u64) -> SimResult<()> {
        let config = self.group_config(id);
        let phase = self.rng.below(STEPS_PER_TICK);
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let Some((store, _)) = node.down.take() else {
            return Ok(());
        };
        let checkpoint = node.checkpoint.applied();
        let group = match Group::open(&config, store, &self.logger) {
            Ok(group) => group,
            Err(error) => return self.fail(format!("replica {id} cannot reopen: {error}")),
        };
        let resumes_at = group.applied().index;
        node.incarnation += 1;
        node.phase = phase;
        node.up = Some(Box::new(Up { group, sm: node.checkpoint.clone(), disk: VecDeque::new() }));
        self.note(|| format!("restart {id}: checkpoint {checkpoint}, resumes after {resumes_at}"));
        if resumes_at < checkpoint {
            return self.fail(format!(
                "(d) replica {id} resumes after {resumes_at}, before its checkpoint {checkpoint}"
            ));
        }
        Ok(())
    }

    // ---- network --------------------------------------------------------------

    fn link_ok(&self, from: u64, to: u64) -> bool {
        self.isolated.contains(&from) == self.isolated.contains(&to)
    }

    fn send(&mut self, from: u64, message: Message) {
        let to = message.to;
        let network = self.faults.network.clone();
        if self.rng.chance(network.drop_per_mille) {
            self.report.lost += 1;
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.report_snapshot(from, to, false);
            }
            return;
        }
        let copies = if self.rng.chance(network.duplicate_per_mille) { 2 } else { 1 };
        for _ in 0..copies {
            let delay = if self.rng.chance(network.slow_per_mille) {
                self.rng.range(5, 41)
            } else {
                self.rng.range(network.min_delay, network.max_delay + 1)
            };
            let order = self.rng.next_u64();
            let message = message.clone();
            self.network.push(Packet { due: self.now + delay.max(1), order, from, to, message });
        }
    }

    fn deliver(&mut self) -> SimResult<()> {
        let now = self.now;
        if !self.network.iter().any(|packet| packet.due <= now) {
            return Ok(());
        }
        let (mut due, rest): (Vec<Packet>, Vec<Packet>) =
            std::mem::take(&mut self.network).into_iter().partition(|packet| packet.due <= now);
        self.network = rest;
        due.sort_by_key(|packet| (packet.due, packet.order));
        for packet in due {
            self.deliver_one(packet)?;
        }
        self.flush_snapshot_reports();
        Ok(())
    }

    fn deliver_one(&mut self, packet: Packet) -> SimResult<()> {
        let Packet { from, to, message, .. } = packet;
        let kind = message.get_msg_type();
        let reachable = self.link_ok(from, to) && self.up(to).is_some();
        if !reachable {
            self.report.lost += 1;
            if kind == MessageType::MsgSnapshot {
                self.report_snapshot(from, to, false);
            } else if matches!(kind, MessageType::MsgAppend) && self.rng.chance(300) {
                // A transport notices a dead connection now and then.
                if let Some(up) = self.up_mut(from) {
                    up.group.report_unreachable(to);
                }
            }
            return Ok(());
        }
        self.report.delivered += 1;
        let result = match self.up_mut(to) {
            Some(up) => up.group.step(message),
            None => Ok(()),
        };
        if let Err(error) = result {
            return self.fail(format!("replica {to} refused {kind:?} from {from}: {error}"));
        }
        if kind == MessageType::MsgSnapshot {
            self.report_snapshot(from, to, true);
        }
        Ok(())
    }

    /// Queues the transport's report on a snapshot message for its sender;
    /// [`Sim::flush_snapshot_reports`] delivers it (the sender may be the
    /// replica whose output is being handled).
    fn report_snapshot(&mut self, from: u64, to: u64, delivered: bool) {
        self.note(|| format!("snapshot {from} -> {to}: delivered {delivered}"));
        self.snapshot_reports.push((from, to, delivered));
    }

    fn flush_snapshot_reports(&mut self) {
        for (from, to, delivered) in std::mem::take(&mut self.snapshot_reports) {
            if let Some(up) = self.up_mut(from) {
                up.group.report_snapshot(to, delivered);
            }
        }
    }

    // ---- disks, clocks, clients -------------------------------------------

    fn run_disks(&mut self) -> SimResult<()> {
        let now = self.now;
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let mut failure = None;
            if let Some(up) = self.up_mut(id) {
                while let Some(&(due, number)) = up.disk.front() {
                    if due > now {
                        break;
                    }
                    up.disk.pop_front();
                    let synced = up.group.store_mut().sync_through(number);
                    let reported =
                        synced.map_err(Error::from).and_then(|_| up.group.on_persisted(number));
                    if let Err(error) = reported {
                        failure = Some(format!("replica {id}: persisting write {number}: {error}"));
                        break;
                    }
                }
            }
            if let Some(what) = failure {
                return self.fail(what);
            }
        }
        Ok(())
    }

    fn run_ticks(&mut self) {
        let now = self.now;
        for node in self.nodes.values_mut() {
            if (now + node.phase).is_multiple_of(STEPS_PER_TICK) {
                if let Some(up) = node.up.as_mut() {
                    up.group.tick();
                }
            }
        }
    }

    fn clients(&mut self) -> SimResult<()> {
        if !self.per_tick(self.config.proposals_per_tick) || self.in_flight.len() > 256 {
            return Ok(());
        }
        let target = match self.believed_leader {
            Some(id) if self.up(id).is_some() => Some(id),
            _ => self.random_up_node(),
        };
        let Some(target) = target else {
            return Ok(());
        };
        let value = self.next_value;
        let incarnation = self.nodes.get(&target).map_or(0, |node| node.incarnation);
        let result = match self.up_mut(target) {
            Some(up) => up.group.propose(value.to_be_bytes().to_vec()),
            None => return Ok(()),
        };
        match result {
            Ok(id) => {
                self.next_value += 1;
                self.report.proposed += 1;
                let payload = value + PAYLOAD_VALUE_BASE;
                self.in_flight.insert((target, incarnation, id), InFlight { value, payload, tag: None });
                self.note(|| format!("client: v{value} accepted by {target} as {id:?}"));
            }
            Err(Error::NotLeader { leader }) => self.believed_leader = leader,
            Err(Error::ProposalDropped) => self.believed_leader = None,
            Err(error) => return self.fail(format!("propose to {target}: {error}")),
        }
        Ok(())
    }

    fn checkpoints(&mut self) -> SimResult<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            let checkpoint = self.rng.below(1000) < self.faults.checkpoint_per_tick;
            let compact = self.rng.below(1000) < self.faults.compact_per_tick;
            if !checkpoint && !compact {
                continue;
            }
            let Some(node) = self.nodes.get_mut(&id) else {
                continue;
            };
            let Some(up) = node.up.as_mut() else {
                continue;
            };
            if up.group.has_ready() {
                // Output not yet handled (more than one drive round's worth).
                continue;
            }
            // Applying is synchronous here, so the state machine has applied
            // everything the group handed out.
            let applied = up.group.applied().index;
            if applied != up.sm.applied() {
                let sm = up.sm.applied();
                return self.fail(format!(
                    "replica {id}: group handed out up to {applied}, state machine at {sm}"
                ));
            }
            if applied < node.checkpoint.applied() {
                let previous = node.checkpoint.applied();
                return self.fail(format!(
                    "(d) replica {id}: checkpoint would go back from {previous} to {applied}"
                ));
            }
            let result = up.group.save_apply_state().and_then(|()| {
                if compact {
                    up.group.compact(up.sm.encode(W::encode(&up.sm.app)))
                } else {
                    Ok(())
                }
            });
            node.checkpoint = up.sm.clone();
            if let Err(error) = result {
                return self.fail(format!("replica {id}: checkpoint at {applied}: {error}"));
            }
            if compact {
                self.report.compactions += 1;
            }
        }
        Ok(())
    }

    // ---- membership --------------------------------------------------------

    /// Adds a replica as a learner, swaps it in for a voter with one joint
    /// change, and destroys replicas the newest configuration no longer
    /// contains.
    fn operator(&mut self, may_start: bool) -> SimResult<()> {
        let conf = self.latest_conf.1.clone();
        let joint = !conf.voters_outgoing.is_empty();
        if !joint {
            let removed: Vec<u64> = self
                .nodes
                .values()
                .filter(|node| !node.destroyed && Some(node.id) != self.joining)
                .filter(|node| !conf_contains(&conf, node.id))
                .map(|node| node.id)
                .collect();
            for id in removed {
                self.destroy(id);
            }
        }
        if !self.operator_in_flight.is_empty() {
            return Ok(());
        }
        let Some(leader) = self.current_leader() else {
            return Ok(());
        };
        if joint {
            let since = *self.joint_since.get_or_insert(self.now);
            if self.now - since > 30 * STEPS_PER_TICK {
                self.operator_propose(leader, OperatorOp::LeaveJoint, ConfChangeV2::default())?;
            }
            return Ok(());
        }
        self.joint_since = None;
        match self.joining {
            Some(new) if conf.voters.contains(&new) => {
                self.joining = None;
            }
            Some(new) if conf.learners.contains(&new) => {
                let leader_commit = self.up(leader).map_or(0, |up| up.group.commit_index());
                let caught_up = self.up(new).is_some_and(|up| up.sm.applied() + 3 >= leader_commit);
                let candidates: Vec<u64> =
                    conf.voters.iter().copied().filter(|id| *id != leader).collect();
                if caught_up && !candidates.is_empty() {
                    let victim = candidates
                        .get(self.rng.below(candidates.len() as u64) as usize)
                        .copied()
                        .unwrap_or(leader);
                    let mut change = ConfChangeV2::default();
                    change.set_transition(ConfChangeTransition::Auto);
                    change.changes.push(single(ConfChangeType::AddNode, new));
                    change.changes.push(single(ConfChangeType::RemoveNode, victim));
                    self.note(|| format!("operator: promote {new}, remove {victim}"));
                    self.operator_propose(leader, OperatorOp::Swap, change)?;
                }
            }
            Some(new) => {
                let mut change = ConfChangeV2::default();
                change.changes.push(single(ConfChangeType::AddLearnerNode, new));
                self.operator_propose(leader, OperatorOp::AddLearner, change)?;
            }
            None => {
                if may_start && self.rng.below(1000) < self.faults.membership_per_tick * 5 {
                    let id = self.next_id;
                    self.next_id += 1;
                    let phase = self.rng.below(STEPS_PER_TICK);
                    self.nodes.insert(
                        id,
                        Node {
                            id,
                            incarnation: 0,
                            up: None,
                            down: Some((MemLogStore::new(), self.now)),
                            destroyed: false,
                            checkpoint: Sm { entries: Vec::new(), app: self.initial.clone() },
                            phase,
                        },
                    );
                    self.restart(id)?;
                    self.joining = Some(id);
                    self.report.replicas_added += 1;
                    self.note(|| format!("operator: new replica {id}"));
                }
            }
        }
        Ok(())
    }

    fn operator_propose(
        &mut self,
        leader: u64,
        op: OperatorOp,
        change: ConfChangeV2,
    ) -> SimResult<()> {
        let incarnation = self.nodes.get(&leader).map_or(0, |node| node.incarnation);
        let result = match self.up_mut(leader) {
            Some(up) => up.group.propose_conf_change(change),
            None => return Ok(()),
        };
        match result {
            Ok(id) => {
                self.operator_in_flight.insert((leader, incarnation, id), op);
                self.note(|| format!("operator: {op:?} proposed by {leader} as {id:?}"));
            }
            // The leader's applied configuration may lag the newest one, or
            // leadership moved: try again later.
            Err(
                Error::ConfChangePending
                | Error::ConfChangeRefused(_)
                | Error::NotLeader { .. }
                | Error::ProposalDropped,
            ) => {}
            Err(error) => return self.fail(format!("conf change at {leader}: {error}")),
        }
        Ok(())
    }

    fn destroy(&mut self, id: u64) {
        if let Some(node) = self.nodes.get_mut(&id) {
            if node.destroyed {
                return;
            }
            node.destroyed = true;
            node.up = None;
            node.down = None;
            let incarnation = node.incarnation;
            self.forget_proposals_of(id, incarnation);
            self.operator_in_flight
                .retain(|(node_id, inc, _), _| !(*node_id == id && *inc == incarnation));
            self.isolated.remove(&id);
            self.report.replicas_removed += 1;
            self.note(|| format!("operator: destroyed removed replica {id}"));
        }
    }

    // ---- outputs and invariants -------------------------------------------

    fn drive_all(&mut self) -> SimResult<()> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        for id in ids {
            for _ in 0..16 {
                let output = match self.up_mut(id) {
                    Some(up) if up.group.has_ready() => up.group.ready(),
                    _ => break,
                };
                match output {
                    Ok(output) => self.handle_output(id, output)?,
                    Err(error) => return self.fail(format!("replica {id}: ready: {error}")),
                }
            }
        }
        Ok(())
    }

    fn handle_output(&mut self, id: u64, output: Output) -> SimResult<()> {
        let Some(node) = self.nodes.get_mut(&id) else {
            return Ok(());
        };
        let incarnation = node.incarnation;
        let Some(mut up) = node.up.take() else {
            return Ok(());
        };
        let result = self.handle_output_of(id, incarnation, &mut up, output);
        let removed = matches!(result, Ok(true));
        if let Some(node) = self.nodes.get_mut(&id) {
            node.up = Some(up);
        }
        if removed {
            self.destroy(id);
        }
        self.flush_snapshot_reports();
        result.map(|_| ())
    }

    /// Returns whether the replica reported its own removal.
    fn handle_output_of(
        &mut self,
        id: u64,
        incarnation: u64,
        up: &mut Up<W>,
        output: Output,
    ) -> SimResult<bool> {
        if let Some(ticket) = output.persist {
            let latency = if self.rng.chance(self.faults.slow_disk_per_mille) {
                self.rng.range(10, 41)
            } else {
                self.rng.range(self.faults.min_disk_delay, self.faults.max_disk_delay + 1)
            };
            let after_previous = up.disk.back().map_or(0, |(due, _)| *due);
            up.disk.push_back(((self.now + latency).max(after_previous), ticket.number));
        }
        for message in output.send {
            self.check_persisted_before_send(id, up, &message)?;
            self.send(id, message);
        }
        if let Some(snapshot) = output.restore {
            let sm = match Sm::decode(&snapshot.data, W::decode) {
                Ok(sm) => sm,
                Err(reason) => return self.fail(format!("replica {id}: bad snapshot: {reason}")),
            };
            let metadata = snapshot.get_metadata();
            if sm.applied() != metadata.index {
                return self.fail(format!(
                    "replica {id}: snapshot at {} holds {} entries",
                    metadata.index,
                    sm.applied()
                ));
            }
            for (offset, (term, payload)) in sm.entries.iter().enumerate() {
                self.record_apply(id, offset as u64 + 1, *term, *payload)?;
            }
            self.observe_conf(metadata.index, metadata.get_conf_state());
            self.note(|| format!("replica {id} restored snapshot at {}", metadata.index));
            let index = metadata.index;
            self.with_workload(|workload, sim| workload.restored(sim, id, index, &sm.app))?;
            up.sm = sm;
            self.report.restores += 1;
        }
        for committed in output.committed {
            let expected = up.sm.applied() + 1;
            if committed.index != expected {
                return self.fail(format!(
                    "(d) replica {id} got entry {} to apply, expected {expected}",
                    committed.index
                ));
            }
            let payload = match &committed.payload {
                Payload::Noop => PAYLOAD_NOOP,
                Payload::Data(data) => match W::digest(data) {
                    Ok(digest) => digest,
                    Err(reason) => {
                        return self.fail(format!(
                            "replica {id}: foreign data at {}: {reason}",
                            committed.index
                        ));
                    }
                },
                Payload::ConfChange { conf_state, .. } => {
                    if let Some(conf_state) = conf_state {
                        self.observe_conf(committed.index, conf_state);
                    }
                    PAYLOAD_CONF
                }
            };
            let first = self.record_apply(id, committed.index, committed.term, payload)?;
            if first && payload == PAYLOAD_CONF {
                self.report.conf_changes += 1;
            }
            up.sm.entries.push((committed.term, payload));
            let data = match &committed.payload {
                Payload::Data(data) => Some(&data[..]),
                _ => None,
            };
            let index = committed.index;
            self.with_workload(|workload, sim| workload.apply(sim, id, up, index, data))?;
            if let Some(watch) = self.watch.as_mut() {
                if Some(id) == watch.new_leader
                    && committed.term > watch.old_term
                    && watch.commit_at.is_none()
                {
                    watch.commit_at = Some(self.now);
                }
            }
        }
        if output.snapshot_wanted {
            self.snapshot_now(id, up)?;
        }
        for (proposal, outcome) in output.proposals {
            self.proposal_outcome(id, incarnation, up, proposal, outcome)?;
        }
        if let Some(role) = output.role {
            self.note(|| format!("replica {id}: {role:?}"));
            if role.role == Role::Leader {
                match self.leaders.insert(role.term, id) {
                    Some(other) if other != id => {
                        return self.fail(format!(
                            "(c) replicas {other} and {id} both led term {}",
                            role.term
                        ));
                    }
                    Some(_) => {}
                    None => self.report.leader_terms += 1,
                }
                self.believed_leader = Some(id);
                if let Some(watch) = self.watch.as_mut() {
                    if role.term > watch.old_term && watch.leader_at.is_none() {
                        watch.leader_at = Some(self.now);
                        watch.new_leader = Some(id);
                    }
                }
            }
        }
        Ok(output.removed)
    }

    /// Rule 1 of the driver, checked on the wire: a vote, a vote request
    /// and an append acknowledgement only leave once what they promise is
    /// durable. (A later durable write can only have moved the hard state
    /// to a higher term, which is why a higher durable term also passes.)
    fn check_persisted_before_send(&self, id: u64, up: &Up<W>, message: &Message) -> SimResult<()> {
        let store = up.group.store();
        let durable = store.durable_hard_state();
        let kind = message.get_msg_type();
        let ok = match kind {
            MessageType::MsgRequestVoteResponse if !message.reject => {
                durable.term > message.term
                    || (durable.term == message.term && durable.vote == message.to)
            }
            MessageType::MsgRequestVote => {
                durable.term > message.term || (durable.term == message.term && durable.vote == id)
            }
            MessageType::MsgAppendResponse if !message.reject => {
                store.durable_last_index() >= message.index || durable.term > message.term
            }
            _ => true,
        };
        if ok {
            return Ok(());
        }
        self.fail(format!(
            "rule 1: replica {id} sent {kind:?} (term {}, index {}) to {} before persisting \
             (durable term {}, vote {}, last index {})",
            message.term,
            message.index,
            message.to,
            durable.term,
            durable.vote,
            store.durable_last_index()
        ))
    }

    /// The leader needs a fresh snapshot for a follower: checkpoint and
    /// compact at once (a real state machine may take longer; raft-rs asks
    /// again until it gets one).
    fn snapshot_now(&mut self, id: u64, up: &mut Up<W>) -> SimResult<()> {
        let applied = up.group.applied().index;
        let result = up
            .group
            .save_apply_state()
            .and_then(|()| up.group.compact(up.sm.encode(W::encode(&up.sm.app))));
        if let Err(error) = result {
            return self.fail(format!("replica {id}: snapshot at {applied}: {error}"));
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            node.checkpoint = up.sm.clone();
        }
        self.report.compactions += 1;
        self.note(|| format!("replica {id}: snapshot for a follower at {applied}"));
        Ok(())
    }

    fn proposal_outcome(
        &mut self,
        id: u64,
        incarnation: u64,
        up: &Up<W>,
        proposal: ProposalId,
        outcome: ProposalOutcome,
    ) -> SimResult<()> {
        let key = (id, incarnation, proposal);
        if let Some(op) = self.operator_in_flight.remove(&key) {
            self.note(|| format!("operator: {op:?} {proposal:?} -> {outcome:?}"));
            return Ok(());
        }
        let Some(InFlight { value, payload, tag }) = self.in_flight.remove(&key) else {
            return self.fail(format!("replica {id}: outcome for unknown proposal {proposal:?}"));
        };
        if let Some(tag) = tag {
            let finished = match outcome {
                ProposalOutcome::Committed => Finished::Committed,
                _ => Finished::Failed,
            };
            self.outcomes.push((tag, finished));
        }
        match outcome {
            ProposalOutcome::Committed => {
                let expected = (proposal.term, payload);
                if up.sm.at(proposal.index) != Some(expected) {
                    let found = up.sm.at(proposal.index);
                    return self.fail(format!(
                        "(a) replica {id} confirmed v{value} at {proposal:?} but applied {found:?} there"
                    ));
                }
                self.confirmed.push((value, proposal.index, payload));
                self.report.confirmed += 1;
            }
            ProposalOutcome::LeadershipLost => self.report.leadership_lost += 1,
            ProposalOutcome::Rejected | ProposalOutcome::Superseded => {
                return self.fail(format!(
                    "replica {id}: data proposal {proposal:?} ended {outcome:?} while it was leader"
                ));
            }
        }
        Ok(())
    }

    /// (b): records the entry applied at `index`, or checks it against the
    /// one recorded. Returns whether it was the first application.
    fn record_apply(&mut self, id: u64, index: u64, term: u64, payload: u64) -> SimResult<bool> {
        let position = index.saturating_sub(1) as usize;
        match self.applied_at.get(position) {
            Some(&(known_term, known_payload)) => {
                if (known_term, known_payload) != (term, payload) {
                    return self.fail(format!(
                        "(b) replica {id} applied (term {term}, payload {payload}) at {index}, \
                         another replica applied (term {known_term}, payload {known_payload})"
                    ));
                }
                Ok(false)
            }
            None if position == self.applied_at.len() => {
                self.applied_at.push((term, payload));
                self.report.max_applied = index;
                Ok(true)
            }
            None => self.fail(format!(
                "replica {id} applied index {index} while index {} was never applied",
                self.applied_at.len() + 1
            )),
        }
    }

    fn observe_conf(&mut self, index: u64, conf_state: &ConfState) {
        if index > self.latest_conf.0 {
            self.latest_conf = (index, conf_state.clone());
        }
    }

    /// (a) at the end: every member holds every confirmed value.
    fn check_confirmed_everywhere(&self) -> SimResult<()> {
        for node in self.nodes.values() {
            let Some(up) = node.up.as_ref() else {
                continue;
            };
            if !conf_contains(&self.latest_conf.1, node.id) {
                continue;
            }
            for &(value, index, payload) in &self.confirmed {
                let held = up.sm.at(index).map(|(_, payload)| payload);
                if held != Some(payload) {
                    return self.fail(format!(
                        "(a) confirmed v{value} at {index} is missing on replica {}: {held:?}",
                        node.id
                    ));
                }
            }
        }
        Ok(())
    }

    fn caught_up(&self) -> bool {
        let target = self.confirmed.iter().map(|(_, index, _)| *index).max().unwrap_or(0);
        let conf = &self.latest_conf.1;
        if !conf.voters_outgoing.is_empty() {
            return false;
        }
        self.nodes
            .values()
            .filter(|node| conf_contains(conf, node.id))
            .all(|node| node.up.as_ref().is_some_and(|up| up.sm.applied() >= target))
    }

    fn describe_progress(&self) -> String {
        let parts: Vec<String> = self
            .nodes
            .values()
            .filter(|node| !node.destroyed)
            .map(|node| match node.up.as_ref() {
                Some(up) => format!(
                    "{}: {:?} term {} applied {} commit {} last {}",
                    node.id,
                    up.group.role(),
                    up.group.term(),
                    up.sm.applied(),
                    up.group.commit_index(),
                    up.group.last_index()
                ),
                None => format!("{}: down", node.id),
            })
            .collect();
        format!("conf {:?}; {}", self.latest_conf, parts.join("; "))
    }

    fn finish_report(&mut self, step: u64) {
        self.report.steps = step + 1;
        let mut digest = SplitMix64::new(self.config.seed);
        let mut acc = 0u64;
        for (term, payload) in &self.applied_at {
            acc = acc.rotate_left(7) ^ term ^ payload.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            acc ^= digest.next_u64();
        }
        self.report.digest = acc;
    }

    // ---- for workloads ---------------------------------------------------------

    /// The current step.
    pub(crate) fn now(&self) -> u64 {
        self.now
    }

    /// The run's random numbers.
    pub(crate) fn rng(&mut self) -> &mut SplitMix64 {
        &mut self.rng
    }

    /// Replica `id`'s incarnation (it grows with every restart).
    pub(crate) fn incarnation(&self, id: u64) -> u64 {
        self.nodes.get(&id).map_or(0, |node| node.incarnation)
    }

    /// The workload, once the run is over.
    pub(crate) fn into_workload(self) -> Option<W> {
        self.workload
    }

    /// Replicas of the newest configuration that are running.
    pub(crate) fn member_ids(&self) -> Vec<u64> {
        self.nodes
            .values()
            .filter(|node| node.up.is_some() && conf_contains(&self.latest_conf.1, node.id))
            .map(|node| node.id)
            .collect()
    }

    /// The workload's proposal outcomes since the last call, in the order
    /// they happened.
    pub(crate) fn take_outcomes(&mut self) -> Vec<(u64, Finished)> {
        std::mem::take(&mut self.outcomes)
    }

    /// A client proposes `data` at replica `id`; its outcome comes back
    /// under `tag` ([`Sim::take_outcomes`]). Returns the proposal's id, or
    /// `None` when the replica is down or refused it (not the leader,
    /// dropped): then no outcome follows.
    pub(crate) fn propose(&mut self, id: u64, data: Vec<u8>, tag: u64) -> SimResult<Option<ProposalId>> {
        let incarnation = self.incarnation(id);
        let Some(mut up) = self.nodes.get_mut(&id).and_then(|node| node.up.take()) else {
            return Ok(None);
        };
        let result = self.propose_on(id, incarnation, &mut up, data, tag);
        if let Some(node) = self.nodes.get_mut(&id) {
            node.up = Some(up);
        }
        result
    }

    /// [`Sim::propose`] at a replica taken out of the simulation (the one a
    /// [`Workload::apply`] hook is given).
    pub(crate) fn propose_on(
        &mut self,
        id: u64,
        incarnation: u64,
        up: &mut Up<W>,
        data: Vec<u8>,
        tag: u64,
    ) -> SimResult<Option<ProposalId>> {
        let payload = match W::digest(&data) {
            Ok(payload) => payload,
            Err(reason) => return self.fail(format!("workload proposes foreign data: {reason}")),
        };
        match up.group.propose(data) {
            Ok(proposal) => {
                let value = self.next_value;
                self.next_value += 1;
                self.report.proposed += 1;
                self.in_flight.insert((id, incarnation, proposal), InFlight { value, payload, tag: Some(tag) });
                Ok(Some(proposal))
            }
            Err(Error::NotLeader { .. } | Error::ProposalDropped) => Ok(None),
            Err(error) => self.fail(format!("propose to {id}: {error}")),
        }
    }

    // ---- lookups --------------------------------------------------------------

    /// Replica `id`, if it is running (and not the one being handled).
    pub(crate) fn up(&self, id: u64) -> Option<&Up<W>> {
        self.nodes.get(&id).and_then(|node| node.up.as_deref())
    }

    fn up_mut(&mut self, id: u64) -> Option<&mut Up<W>> {
        self.nodes.get_mut(&id).and_then(|node| node.up.as_deref_mut())
    }

    fn live_ids(&self) -> Vec<u64> {
        self.nodes.values().filter(|node| node.up.is_some()).map(|node| node.id).collect()
    }

    fn random_up_node(&mut self) -> Option<u64> {
        let ids = self.live_ids();
        if ids.is_empty() {
            return None;
        }
        ids.get(self.rng.below(ids.len() as u64) as usize).copied()
    }

    /// The up replica that leads the highest term.
    pub(crate) fn current_leader(&self) -> Option<u64> {
        self.nodes
            .values()
            .filter_map(|node| node.up.as_ref().map(|up| (node.id, up)))
            .filter(|(_, up)| up.group.is_leader())
            .max_by_key(|(id, up)| (up.group.term(), *id))
            .map(|(id, _)| id)
    }
}

fn single(change_type: ConfChangeType, node_id: u64) -> ConfChangeSingle {
    let mut change = ConfChangeSingle::default();
    change.set_change_type(change_type);
    change.node_id = node_id;
    change
}

fn conf_contains(conf: &ConfState, id: u64) -> bool {
    conf.voters.contains(&id)
        || conf.learners.contains(&id)
        || conf.voters_outgoing.contains(&id)
        || conf.learners_next.contains(&id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_machine_snapshot_round_trips() {
        let sm = Sm { entries: vec![(1, 2), (3, 40), (3, 0)], app: () };
        assert_eq!(Sm::decode(&sm.encode(Vec::new()), Values::decode).unwrap(), sm);
        assert!(Sm::decode(&[0; 7], Values::decode).is_err());
        assert!(Sm::decode(&sm.encode(vec![1]), Values::decode).is_err());
        let mut short = sm.encode(Vec::new()).to_vec();
        short.pop();
        assert!(Sm::decode(&short, Values::decode).is_err());
    }

    #[test]
    fn a_short_chaos_run_passes() {
        let config = SimConfig { fault_ticks: 60, ..SimConfig::chaos(1, 3) };
        let report = run(&config).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(report.confirmed > 0);
    }
}
