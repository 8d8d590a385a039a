//! A seeded, deterministic simulation of one replicated queue with
//! publishers and consumers (feature `sim`; `cargo test` turns it on).
//!
//! It runs on the Raft simulation of `sim.rs` (same network, disks,
//! crashes, partitions and membership changes, see there), with a
//! [`QueueSm`] as every replica's state machine: log entries are postcard
//! encodings of `(tag, Command)`, the tag naming the simulated client
//! request, and snapshots carry [`QueueSm::snapshot`].
//!
//! **Clients**, modelled on `ReplicatedQueue` and the gateway's
//! `RemoteQueue`:
//! - *Publishers* (each with a publisher id and increasing ids) propose
//!   [`Command::Enqueue`] at the replica they believe leads, batching what
//!   is not yet confirmed; a publish is confirmed when its proposal commits
//!   (confirm = commit). Unconfirmed ones (leadership lost, leader crashed)
//!   are proposed again, with the same [`PublishId`], later.
//! - *Leaders.* The replica leading the highest term keeps, per leadership,
//!   the consumers attached at it. It decides checkouts from its applied
//!   state (credit = prefetch minus what the consumer holds and what is in
//!   pending checkouts) and delivers when the [`Command::Checkout`] applies
//!   on it while it still leads that term. It proposes
//!   [`Command::GatewayDown`] for gateways found dead whose consumers its
//!   state still has.
//! - *Gateways* hold consumers. After noticing a new leader (with a delay)
//!   a gateway re-attaches each consumer there with the seqs it still
//!   holds; seqs the leader's state says it holds but the gateway does not
//!   never reached it and are requeued ([`Command::Settle`] requeue) before
//!   deliveries start, as in `ReplicatedQueue`. From the moment it sends
//!   the re-attach, a consumer takes no deliveries from the old leader.
//!   Consumers ack or requeue what they hold after a delay; a settle goes
//!   to the leader the consumer is attached at (dropped if it no longer
//!   leads, kept in a backlog sent after the next re-attach if that
//!   replica is down). Channels close (`Detach` + `ReturnAll`, retried
//!   until committed) and gateways die (their consumers vanish with what
//!   they hold) and come back as new incarnations.
//!
//! **Not modelled** (so not checked): deliveries reach the consumer at
//! once (no `Deliver` in flight on the network during a failover), and
//! only the leadership the clients currently follow delivers: an old
//! leader that has not yet noticed its deposition does not deliver after
//! the clients moved on. Together with "no deliveries from the old leader
//! once the re-attach is sent", this is an assumption about the gateway:
//! a delivery accepted after the held list was sent is requeued by the new
//! leader while the consumer still holds it. Also not exercised: `Get`,
//! `Purge`, `Delete`, exclusive and no-ack consumers (the state machine's
//! own tests cover them).
//!
//! **Invariants**, checked as the run goes and at its end:
//! - (a) every confirmed publish was enqueued (a seq assigned at its first
//!   application) and, after healing, is delivered; nothing is delivered
//!   that was never published;
//! - (b) no seq is in two places (ready, or held by two consumers) in any
//!   replica's applied state (checked at sampled indexes, at restores and
//!   at the end), and, on the consumer side, no consumer receives a seq
//!   that another consumer still holds (received and not yet acked,
//!   requeued or returned), nor one it holds itself;
//! - (c) a seq delivered before is flagged redelivered;
//! - (d) replicas that applied index i have identical states at i: a cheap
//!   fingerprint at every index, the hash of the whole snapshot at every
//!   64th index, at every restored snapshot and at the end;
//! - entries decode (foreign bytes fail the run);
//! - (e) dedup: a publish id is given a seq once; an enqueue recognised as
//!   a duplicate refers to an id that was enqueued before;
//! - liveness: after healing, every publish is confirmed and the queue
//!   drains (nothing ready or held) within the settle phase.

use std::collections::{BTreeMap, BTreeSet};
use std::hash::Hasher;

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher13;

use super::sim::STEPS_PER_TICK;
use super::sim::{Finished, Sim, SimConfig, SimFailure, SimReport, SimResult, Up, Workload};
use crate::replica::queue_sm::{
    Command, ConsumerId, ConsumerOpts, Effect, MsgMeta, NewMsg, Outcome, PublishId, QueueSm, Seq,
    Snapshot,
};

/// One run of the queue simulation.
#[derive(Debug, Clone)]
pub struct QueueSimConfig {
    /// The Raft simulation underneath (seed, voters, faults, phases).
    pub sim: SimConfig,
    /// Publishers.
    pub publishers: usize,
    /// Gateways with consumers.
    pub gateways: usize,
    /// Consumers per gateway.
    pub consumers_per_gateway: usize,
    /// Chance per tick and publisher (per mille) of publishing 1–3 messages.
    pub publish_per_tick: u64,
    /// Chance per tick and gateway (per mille) that it dies.
    pub gateway_down_per_tick: u64,
    /// Chance per tick and consumer (per mille) that its channel closes.
    pub close_per_tick: u64,
    /// Chance (per mille) that a consumer requeues a message instead of
    /// acking it.
    pub requeue_per_mille: u64,
}

impl QueueSimConfig {
    /// A chaos run of `voters` replicas: the Raft simulation's faults, two
    /// publishers, two gateways of two consumers.
    pub fn chaos(seed: u64, voters: usize) -> Self {
        QueueSimConfig {
            sim: SimConfig {
                replay_test: "queue_sim",
                fault_ticks: 250,
                settle_ticks: 400,
                proposals_per_tick: 0,
                ..SimConfig::chaos(seed, voters)
            },
            publishers: 2,
            gateways: 2,
            consumers_per_gateway: 2,
            publish_per_tick: 300,
            gateway_down_per_tick: 4,
            close_per_tick: 3,
            requeue_per_mille: 150,
        }
    }
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSimReport {
    /// The Raft simulation's figures (its `proposed`/`confirmed` count every
    /// queue command).
    pub raft: SimReport,
    /// Publish ids created.
    pub published: u64,
    /// Publish ids confirmed.
    pub confirmed: u64,
    /// Enqueue proposals accepted by a leader.
    pub publish_proposals: u64,
    /// Publish ids proposed again after a failed proposal.
    pub retried: u64,
    /// Enqueues of an id enqueued before (dropped by dedup).
    pub dedup_hits: u64,
    /// Messages received by consumers.
    pub deliveries: u64,
    /// Of which flagged redelivered.
    pub redeliveries: u64,
    /// Acks sent.
    pub acks: u64,
    /// Requeues sent.
    pub requeues: u64,
    /// Checkouts applied at the leader for a consumer not attached there
    /// (any more): not delivered, requeued by the next re-attach.
    pub undelivered: u64,
    /// Held seqs a re-attach requeued (the gateway did not hold them).
    pub resync_requeued: u64,
    /// Consumers attached (first attach or re-attach) at a leader.
    pub attaches: u64,
    /// Settles sent from a backlog after a re-attach.
    pub backlog_settles: u64,
    /// Gateways that died.
    pub gateway_downs: u64,
    /// Channels closed.
    pub channel_closes: u64,
    /// Leaderships the clients followed.
    pub leaderships: u64,
    /// Whole-state comparisons (snapshot hashes).
    pub state_checks: u64,
    /// Most messages (ready + held) in a leader's state.
    pub max_depth: u64,
}

/// Runs one queue simulation.
pub fn run(config: &QueueSimConfig) -> Result<QueueSimReport, SimFailure> {
    let mut sim = Sim::new(config.sim.clone(), Queues::new(config.clone()));
    let raft = sim.run_chaos()?;
    let workload = sim.into_workload();
    Ok(QueueSimReport {
        raft,
        ..workload.map(|w| w.report).unwrap_or_default()
    })
}

/// A log entry: the client request's tag and the command.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Entry {
    tag: u64,
    cmd: Command,
}

fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(0x5eed, 0x51ce);
    hasher.write(bytes);
    hasher.finish()
}

/// Whole states are compared at every this many indexes (and at restores
/// and at the end); a fingerprint at every index.
const FULL_CHECK_EVERY: u64 = 64;

/// (replica, incarnation, term): one leadership.
type Key = (u64, u64, u64);

/// What a tag stands for.
#[derive(Debug, Clone)]
enum Request {
    Publish {
        publisher: usize,
        ids: Vec<u64>,
    },
    Attach {
        consumer: ConsumerId,
        held: BTreeSet<Seq>,
        key: Key,
    },
    Resync {
        consumer: ConsumerId,
        key: Key,
    },
    Checkout {
        key: Key,
    },
    /// Settles and detaches: nobody waits for them.
    OneWay,
    Close {
        consumer: ConsumerId,
        gateway: usize,
    },
    GatewayDown {
        gateway: String,
        key: Key,
    },
}

/// The leader's side of one leadership.
struct Leadership {
    key: Key,
    /// Consumers attached here; `true` once their resync applied and
    /// deliveries may start.
    handles: BTreeMap<ConsumerId, bool>,
    /// Pending checkouts by tag.
    checkouts: BTreeMap<u64, (ConsumerId, Vec<Seq>)>,
    in_checkout: BTreeSet<Seq>,
    gateway_down: BTreeSet<String>,
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    tag: Option<u64>,
    tries: u32,
}

struct Publisher {
    name: String,
    next_id: u64,
    /// Created, not yet confirmed.
    pending: BTreeMap<u64, Pending>,
    believed: Option<u64>,
    next_attempt: u64,
}

struct Gateway {
    incarnation: u64,
    alive: bool,
    back_at: u64,
    next_channel: u16,
    /// The leadership it last noticed, and from when it acts on it.
    seen: Option<Key>,
    notice_at: u64,
    /// Closed channels whose `ReturnAll` has not committed: its tag.
    closing: BTreeMap<ConsumerId, Option<u64>>,
}

struct Consumer {
    gateway: usize,
    prefetch: usize,
    /// Received, not yet acked, requeued or returned: seq → step at which
    /// the client is done with it.
    holding: BTreeMap<Seq, u64>,
    /// The leadership whose deliveries it takes.
    attached_at: Option<Key>,
    /// The attach (or its resync) in flight.
    attaching: Option<u64>,
    /// Settles that could not be sent (the replica was down).
    backlog: Vec<(Vec<Seq>, Outcome)>,
    /// Not before this step: (re-)attach attempts.
    next_attempt: u64,
}

/// The queue workload (see the module docs).
pub(crate) struct Queues {
    config: QueueSimConfig,
    healed: bool,
    next_tag: u64,
    requests: BTreeMap<u64, Request>,
    publishers: Vec<Publisher>,
    gateways: Vec<Gateway>,
    consumers: BTreeMap<ConsumerId, Consumer>,
    /// Dead gateways and when the cluster notices.
    dead: BTreeMap<String, u64>,
    leadership: Option<Leadership>,
    /// (e): the seq of every enqueued publish id, and back.
    seq_of: BTreeMap<(usize, u64), Seq>,
    pid_of: BTreeMap<Seq, (usize, u64)>,
    confirmed: BTreeSet<(usize, u64)>,
    /// (a), (c): seqs delivered at least once; acked at least once.
    delivered: BTreeSet<Seq>,
    acked: BTreeSet<Seq>,
    /// (d): fingerprint of the state at each index (position = index).
    fingerprints: Vec<u64>,
    /// (d): snapshot hash at sampled indexes.
    full: BTreeMap<u64, u64>,
    report: QueueSimReport,
}

fn gateway_name(gateway: usize, incarnation: u64) -> String {
    format!("g{gateway}.{incarnation}")
}

fn fingerprint(state: &QueueSm) -> u64 {
    let mut hasher = SipHasher13::new_with_keys(1, 2);
    for value in [
        state.next_seq(),
        u64::from(state.ready_count()),
        u64::from(state.unacked_count()),
        u64::from(state.consumer_count()),
        state.ack_floor(),
        u64::from(state.is_deleted()),
    ] {
        hasher.write_u64(value);
    }
    hasher.finish()
}

/// (b) within one state: a seq is ready or held by one holder, not both.
fn check_places(state: &QueueSm) -> Result<(), String> {
    let mut seen: BTreeSet<Seq> = state.next_ready(usize::MAX).map(|(seq, _)| seq).collect();
    for holder in state.holders() {
        for (seq, _) in state.held_by(holder) {
            if !seen.insert(seq) {
                return Err(format!(
                    "seq {seq} is held by {holder:?} and ready or held by another"
                ));
            }
        }
    }
    Ok(())
}

fn full_hash(state: &QueueSm) -> Result<u64, String> {
    postcard::to_allocvec(&state.snapshot())
        .map(|bytes| hash_bytes(&bytes))
        .map_err(|error| error.to_string())
}

impl Workload for Queues {
    type State = QueueSm;

    fn initial(&self) -> QueueSm {
        QueueSm::new()
    }

    fn encode(state: &QueueSm) -> Vec<u8> {
        // A snapshot of plain data always serialises.
        postcard::to_allocvec(&state.snapshot()).unwrap_or_default()
    }

    fn decode(bytes: &[u8]) -> Result<QueueSm, String> {
        let snapshot: Snapshot = postcard::from_bytes(bytes).map_err(|error| error.to_string())?;
        QueueSm::restore(snapshot).map_err(|error| error.to_string())
    }

    fn digest(data: &[u8]) -> Result<u64, String> {
        // Foreign bytes are refused when applied (they do not decode).
        Ok(hash_bytes(data) | 1 << 63)
    }

    fn apply(
        &mut self,
        sim: &mut Sim<Self>,
        id: u64,
        up: &mut Up<Self>,
        index: u64,
        data: Option<&[u8]>,
    ) -> SimResult<()> {
        let entry = match data.map(postcard::from_bytes::<Entry>) {
            None => None,
            Some(Ok(entry)) => Some(entry),
            Some(Err(error)) => return sim.fail(format!("replica {id}: entry {index}: {error}")),
        };
        let effects = match &entry {
            Some(entry) => up.sm.app.apply(entry.cmd.clone()),
            None => Vec::new(),
        };
        let first = self.check_state(sim, id, index, &up.sm.app)?;
        let Some(entry) = entry else {
            return Ok(());
        };
        if first {
            self.first_application(sim, index, &entry, &effects)?;
        }
        if up.group.is_leader() {
            let key = (id, sim.incarnation(id), up.group.term());
            self.leader_applied(sim, up, key, entry, effects)?;
        }
        Ok(())
    }

    fn restored(
        &mut self,
        sim: &mut Sim<Self>,
        id: u64,
        index: u64,
        state: &QueueSm,
    ) -> SimResult<()> {
        let Some(&known) = self.fingerprints.get(index as usize) else {
            return sim.fail(format!(
                "replica {id} restored a snapshot at {index}, never applied"
            ));
        };
        if fingerprint(state) != known {
            return sim.fail(format!(
                "(d) replica {id} restored a state at {index} unlike the one applied there"
            ));
        }
        self.check_full(sim, id, index, state)
    }

    fn step(&mut self, sim: &mut Sim<Self>) -> SimResult<()> {
        for (tag, finished) in sim.take_outcomes() {
            self.outcome(sim, tag, finished)?;
        }
        self.follow_leader(sim);
        if !self.healed {
            self.faults(sim);
        }
        self.restart_gateways(sim);
        self.publish(sim)?;
        self.attach(sim)?;
        self.consume(sim)?;
        self.lead(sim)
    }

    fn healed(&mut self, sim: &mut Sim<Self>) {
        self.healed = true;
        let now = sim.now();
        for gateway in &mut self.gateways {
            if !gateway.alive {
                gateway.back_at = now;
            }
        }
    }

    fn done(&mut self, sim: &mut Sim<Self>) -> bool {
        if self.publishers.iter().any(|p| !p.pending.is_empty())
            || self.consumers.values().any(|c| !c.holding.is_empty())
            || self
                .gateways
                .iter()
                .any(|g| !g.alive || !g.closing.is_empty())
        {
            return false;
        }
        let Some(state) = self.leader_state(sim) else {
            return false;
        };
        if state.ready_count() > 0 || state.unacked_count() > 0 {
            return false;
        }
        self.confirmed.iter().all(|pid| {
            self.seq_of
                .get(pid)
                .is_some_and(|seq| self.acked.contains(seq))
        })
    }

    fn finish(&mut self, sim: &mut Sim<Self>) -> SimResult<()> {
        for pid in &self.confirmed {
            let Some(seq) = self.seq_of.get(pid) else {
                return sim.fail(format!("(a) confirmed publish {pid:?} was never enqueued"));
            };
            if !self.delivered.contains(seq) {
                return sim.fail(format!(
                    "(a) confirmed publish {pid:?} (seq {seq}) was never delivered"
                ));
            }
        }
        for (index, (id, hash)) in self.final_states(sim)? {
            if let Some(&known) = self.full.get(&index) {
                if known != hash {
                    return sim.fail(format!(
                        "(d) replica {id} ends with a state at {index} unlike another's"
                    ));
                }
            }
            self.full.insert(index, hash);
        }
        self.report.confirmed = self.confirmed.len() as u64;
        self.report.published = self.publishers.iter().map(|p| p.next_id).sum();
        Ok(())
    }

    fn describe(&self) -> String {
        let pending: usize = self.publishers.iter().map(|p| p.pending.len()).sum();
        let holding: usize = self.consumers.values().map(|c| c.holding.len()).sum();
        let unacked = self
            .confirmed
            .iter()
            .filter(|pid| self.seq_of.get(pid).is_none_or(|s| !self.acked.contains(s)));
        format!(
            "queue: {pending} publishes unconfirmed, {holding} held by consumers, {} confirmed not acked, \
             leadership {:?}",
            unacked.count(),
            self.leadership.as_ref().map(|l| (l.key, l.handles.clone()))
        )
    }
}

impl Queues {
    fn new(config: QueueSimConfig) -> Self {
        let publishers = (0..config.publishers)
            .map(|p| Publisher {
                name: format!("p{p}"),
                next_id: 0,
                pending: BTreeMap::new(),
                believed: None,
                next_attempt: 0,
            })
            .collect();
        let gateways = (0..config.gateways)
            .map(|_| Gateway {
                incarnation: 0,
                alive: false,
                back_at: 0,
                next_channel: 1,
                seen: None,
                notice_at: 0,
                closing: BTreeMap::new(),
            })
            .collect();
        Queues {
            config,
            healed: false,
            next_tag: 0,
            requests: BTreeMap::new(),
            publishers,
            gateways,
            consumers: BTreeMap::new(),
            dead: BTreeMap::new(),
            leadership: None,
            seq_of: BTreeMap::new(),
            pid_of: BTreeMap::new(),
            confirmed: BTreeSet::new(),
            delivered: BTreeSet::new(),
            acked: BTreeSet::new(),
            // Index 0 does not exist; index 1 is the bootstrap snapshot.
            fingerprints: vec![0, fingerprint(&QueueSm::new())],
            full: BTreeMap::new(),
            report: QueueSimReport::default(),
        }
    }

    // ---- proposing ------------------------------------------------------------

    fn encode_entry(sim: &Sim<Self>, tag: u64, cmd: Command) -> SimResult<Vec<u8>> {
        match postcard::to_allocvec(&Entry { tag, cmd }) {
            Ok(bytes) => Ok(bytes),
            Err(error) => sim.fail(format!("encoding an entry: {error}")),
        }
    }

    /// Proposes `cmd` at replica `at` for `request`; returns its tag if the
    /// replica accepted it.
    fn propose(
        &mut self,
        sim: &mut Sim<Self>,
        at: u64,
        cmd: Command,
        request: Request,
    ) -> SimResult<Option<u64>> {
        let tag = self.next_tag;
        let data = Self::encode_entry(sim, tag, cmd)?;
        if sim.propose(at, data, tag)?.is_none() {
            return Ok(None);
        }
        self.next_tag += 1;
        self.requests.insert(tag, request);
        Ok(Some(tag))
    }

    /// [`Queues::propose`] at the replica an apply hook runs on.
    fn propose_on(
        &mut self,
        sim: &mut Sim<Self>,
        up: &mut Up<Self>,
        key: Key,
        cmd: Command,
        request: Request,
    ) -> SimResult<Option<u64>> {
        let tag = self.next_tag;
        let data = Self::encode_entry(sim, tag, cmd)?;
        if sim.propose_on(key.0, key.1, up, data, tag)?.is_none() {
            return Ok(None);
        }
        self.next_tag += 1;
        self.requests.insert(tag, request);
        Ok(Some(tag))
    }

    // ---- applying -----------------------------------------------------------------

    /// (b), (d) at every application; returns whether `index` was applied
    /// for the first time.
    fn check_state(
        &mut self,
        sim: &mut Sim<Self>,
        id: u64,
        index: u64,
        state: &QueueSm,
    ) -> SimResult<bool> {
        let print = fingerprint(state);
        let position = index as usize;
        let first = match self.fingerprints.get(position) {
            Some(&known) if known != print => {
                return sim.fail(format!(
                    "(d) replica {id} has a state at {index} unlike another replica's"
                ));
            }
            Some(_) => false,
            None if position == self.fingerprints.len() => {
                self.fingerprints.push(print);
                true
            }
            None => {
                return sim.fail(format!(
                    "replica {id} applied {index} before anyone applied {position}"
                ))
            }
        };
        if index.is_multiple_of(FULL_CHECK_EVERY) || self.full.contains_key(&index) {
            self.check_full(sim, id, index, state)?;
        }
        Ok(first)
    }

    fn check_full(
        &mut self,
        sim: &mut Sim<Self>,
        id: u64,
        index: u64,
        state: &QueueSm,
    ) -> SimResult<()> {
        if let Err(what) = check_places(state) {
            return sim.fail(format!("(b) replica {id} at {index}: {what}"));
        }
        let hash = match full_hash(state) {
            Ok(hash) => hash,
            Err(error) => return sim.fail(format!("snapshot encoding: {error}")),
        };
        self.report.state_checks += 1;
        match self.full.insert(index, hash) {
            Some(known) if known != hash => sim.fail(format!(
                "(d) replica {id} has a state at {index} unlike another replica's (whole state)"
            )),
            _ => Ok(()),
        }
    }

    /// (e) and (a) on the first application of an index.
    fn first_application(
        &mut self,
        sim: &mut Sim<Self>,
        index: u64,
        entry: &Entry,
        effects: &[Effect],
    ) -> SimResult<()> {
        let Command::Enqueue { msgs, .. } = &entry.cmd else {
            return Ok(());
        };
        let seqs = match effects {
            [Effect::Enqueued { seqs }] if seqs.len() == msgs.len() => seqs,
            other => return sim.fail(format!("enqueue at {index} answered {other:?}")),
        };
        for (msg, seq) in msgs.iter().zip(seqs) {
            let Some(pid) = msg.publish_id.as_ref().and_then(|pid| self.pid(pid)) else {
                return sim.fail(format!(
                    "(a) enqueue at {index} of an unknown publish id {:?}",
                    msg.publish_id
                ));
            };
            match seq {
                Some(seq) => {
                    if let Some(before) = self.seq_of.insert(pid, *seq) {
                        return sim.fail(format!(
                            "(e) publish {pid:?} enqueued twice: seqs {before} and {seq}"
                        ));
                    }
                    self.pid_of.insert(*seq, pid);
                }
                None => {
                    if !self.seq_of.contains_key(&pid) {
                        return sim.fail(format!(
                            "(e) publish {pid:?} dropped as a duplicate at {index}, never enqueued"
                        ));
                    }
                    self.report.dedup_hits += 1;
                }
            }
        }
        Ok(())
    }

    /// A publish id as (publisher, id), if one of ours created it.
    fn pid(&self, pid: &PublishId) -> Option<(usize, u64)> {
        let publisher = pid.publisher.strip_prefix('p')?.parse::<usize>().ok()?;
        (self.publishers.get(publisher)?.next_id > pid.id).then_some((publisher, pid.id))
    }

    /// What the leader does when its own request applies on it.
    fn leader_applied(
        &mut self,
        sim: &mut Sim<Self>,
        up: &mut Up<Self>,
        key: Key,
        entry: Entry,
        effects: Vec<Effect>,
    ) -> SimResult<()> {
        if self.leadership.as_ref().is_none_or(|l| l.key != key) {
            return Ok(());
        }
        let Some(request) = self.requests.get(&entry.tag).cloned() else {
            return Ok(());
        };
        match request {
            Request::Checkout { key: k } if k == key => {
                if let Some(leadership) = self.leadership.as_mut() {
                    if let Some((_, seqs)) = leadership.checkouts.remove(&entry.tag) {
                        for seq in seqs {
                            leadership.in_checkout.remove(&seq);
                        }
                    }
                }
                for effect in effects {
                    if let Effect::Delivered { consumer, msgs } = effect {
                        self.deliver(sim, key, &consumer, msgs)?;
                    }
                }
            }
            Request::Attach {
                consumer,
                held,
                key: k,
            } if k == key => {
                if !effects.iter().any(|e| matches!(e, Effect::Attached { .. })) {
                    return sim.fail(format!("attach of {consumer:?} answered {effects:?}"));
                }
                if !self.consumers.contains_key(&consumer) {
                    return Ok(());
                }
                let lost: Vec<Seq> = up
                    .sm
                    .app
                    .held_by(&consumer)
                    .map(|(seq, _)| seq)
                    .filter(|s| !held.contains(s))
                    .collect();
                if lost.is_empty() {
                    return self.activate(sim, up, key, consumer);
                }
                self.report.resync_requeued += lost.len() as u64;
                let cmd = Command::Settle {
                    consumer: consumer.clone(),
                    seqs: lost,
                    outcome: Outcome::Requeue,
                };
                let request = Request::Resync {
                    consumer: consumer.clone(),
                    key,
                };
                let tag = self.propose_on(sim, up, key, cmd, request)?;
                if let Some(leadership) = self.leadership.as_mut() {
                    leadership.handles.insert(consumer.clone(), false);
                }
                if let Some(c) = self.consumers.get_mut(&consumer) {
                    c.attaching = tag;
                }
            }
            Request::Resync { consumer, key: k }
                if k == key && self.consumers.contains_key(&consumer) =>
            {
                self.activate(sim, up, key, consumer)?;
            }
            _ => {}
        }
        Ok(())
    }

    /// The consumer's attach answered: deliveries start; its backlog goes.
    fn activate(
        &mut self,
        sim: &mut Sim<Self>,
        up: &mut Up<Self>,
        key: Key,
        consumer: ConsumerId,
    ) -> SimResult<()> {
        if let Some(leadership) = self.leadership.as_mut() {
            leadership.handles.insert(consumer.clone(), true);
        }
        let backlog = match self.consumers.get_mut(&consumer) {
            Some(c) => {
                c.attached_at = Some(key);
                c.attaching = None;
                std::mem::take(&mut c.backlog)
            }
            None => return Ok(()),
        };
        self.report.attaches += 1;
        sim.note(|| format!("queue: {consumer:?} attached at {key:?}"));
        for (seqs, outcome) in backlog {
            self.report.backlog_settles += 1;
            let cmd = Command::Settle {
                consumer: consumer.clone(),
                seqs,
                outcome,
            };
            self.propose_on(sim, up, key, cmd, Request::OneWay)?;
        }
        Ok(())
    }

    /// A checkout applied at the leader `key`: the consumer receives the
    /// messages if it is attached there.
    fn deliver(
        &mut self,
        sim: &mut Sim<Self>,
        key: Key,
        consumer: &ConsumerId,
        msgs: Vec<(Seq, MsgMeta)>,
    ) -> SimResult<()> {
        let active = self
            .leadership
            .as_ref()
            .is_some_and(|l| l.handles.get(consumer) == Some(&true));
        let attached = self
            .consumers
            .get(consumer)
            .is_some_and(|c| c.attached_at == Some(key));
        if !active || !attached {
            self.report.undelivered += msgs.len() as u64;
            return Ok(());
        }
        for (seq, meta) in msgs {
            if !self.pid_of.contains_key(&seq) {
                return sim.fail(format!(
                    "(a) {consumer:?} received seq {seq}, never enqueued"
                ));
            }
            if let Some((other, _)) = self
                .consumers
                .iter()
                .find(|(_, c)| c.holding.contains_key(&seq))
            {
                return sim.fail(format!(
                    "(b) {consumer:?} received seq {seq} while {other:?} holds it"
                ));
            }
            if self.delivered.contains(&seq) && !meta.redelivered {
                return sim.fail(format!(
                    "(c) seq {seq} delivered again to {consumer:?} without the redelivered flag"
                ));
            }
            self.delivered.insert(seq);
            self.report.deliveries += 1;
            self.report.redeliveries += u64::from(meta.redelivered);
            let ticks = if self.healed {
                sim.rng().range(0, 3)
            } else {
                sim.rng().range(0, 12)
            };
            let due = sim.now() + ticks * STEPS_PER_TICK + sim.rng().below(STEPS_PER_TICK);
            if let Some(c) = self.consumers.get_mut(consumer) {
                c.holding.insert(seq, due);
            }
            sim.note(|| {
                format!(
                    "queue: {consumer:?} received {seq} (redelivered {})",
                    meta.redelivered
                )
            });
        }
        Ok(())
    }

    // ---- outcomes -----------------------------------------------------------------

    fn outcome(&mut self, sim: &mut Sim<Self>, tag: u64, finished: Finished) -> SimResult<()> {
        let Some(request) = self.requests.remove(&tag) else {
            return sim.fail(format!("outcome of unknown request {tag}"));
        };
        let committed = finished == Finished::Committed;
        match request {
            Request::Publish { publisher, ids } => {
                for id in ids {
                    let Some(p) = self.publishers.get_mut(publisher) else {
                        continue;
                    };
                    let Some(pending) = p.pending.get_mut(&id) else {
                        continue;
                    };
                    if pending.tag != Some(tag) {
                        continue;
                    }
                    if committed {
                        p.pending.remove(&id);
                        if !self.seq_of.contains_key(&(publisher, id)) {
                            return sim.fail(format!(
                                "(a) publish ({publisher}, {id}) confirmed, never enqueued"
                            ));
                        }
                        self.confirmed.insert((publisher, id));
                    } else {
                        pending.tag = None;
                        p.believed = None;
                    }
                }
            }
            Request::Attach { consumer, .. } | Request::Resync { consumer, .. } => {
                if let Some(c) = self.consumers.get_mut(&consumer) {
                    if c.attaching == Some(tag) {
                        c.attaching = None;
                    }
                }
            }
            Request::Checkout { key } => {
                if let Some(leadership) = self.leadership.as_mut().filter(|l| l.key == key) {
                    if let Some((_, seqs)) = leadership.checkouts.remove(&tag) {
                        for seq in seqs {
                            leadership.in_checkout.remove(&seq);
                        }
                    }
                }
            }
            Request::OneWay => {}
            Request::Close { consumer, gateway } => {
                if let Some(g) = self.gateways.get_mut(gateway) {
                    if committed {
                        g.closing.remove(&consumer);
                    } else if let Some(pending) = g.closing.get_mut(&consumer) {
                        *pending = None;
                    }
                }
            }
            Request::GatewayDown { gateway, key } => {
                if let Some(leadership) = self.leadership.as_mut().filter(|l| l.key == key) {
                    leadership.gateway_down.remove(&gateway);
                }
            }
        }
        Ok(())
    }

    // ---- the clients ------------------------------------------------------------

    /// The leader's state, if the leadership the clients follow is still
    /// leading.
    fn leader_state<'a>(&self, sim: &'a Sim<Self>) -> Option<&'a QueueSm> {
        let (id, incarnation, term) = self.leadership.as_ref()?.key;
        let up = sim.up(id).filter(|_| sim.incarnation(id) == incarnation)?;
        (up.group.is_leader() && up.group.term() == term).then_some(&up.sm.app)
    }

    fn follow_leader(&mut self, sim: &mut Sim<Self>) {
        let Some(leader) = sim.current_leader() else {
            return;
        };
        let term = sim.up(leader).map_or(0, |up| up.group.term());
        let key = (leader, sim.incarnation(leader), term);
        if self.leadership.as_ref().is_some_and(|l| l.key == key) {
            return;
        }
        self.report.leaderships += 1;
        sim.note(|| format!("queue: clients follow leadership {key:?}"));
        self.leadership = Some(Leadership {
            key,
            handles: BTreeMap::new(),
            checkouts: BTreeMap::new(),
            in_checkout: BTreeSet::new(),
            gateway_down: BTreeSet::new(),
        });
    }

    fn per_tick(sim: &mut Sim<Self>, per_mille: u64) -> bool {
        sim.rng().below(1000 * STEPS_PER_TICK) < per_mille
    }

    fn faults(&mut self, sim: &mut Sim<Self>) {
        for g in 0..self.gateways.len() {
            if !self.gateways.get(g).is_some_and(|gw| gw.alive)
                || !Self::per_tick(sim, self.config.gateway_down_per_tick)
            {
                continue;
            }
            let now = sim.now();
            let back = now + sim.rng().range(5, 40) * STEPS_PER_TICK;
            let noticed = now + sim.rng().range(2, 10) * STEPS_PER_TICK;
            let Some(gateway) = self.gateways.get_mut(g) else {
                continue;
            };
            gateway.alive = false;
            gateway.back_at = back;
            gateway.closing.clear();
            let name = gateway_name(g, gateway.incarnation);
            self.consumers.retain(|_, c| c.gateway != g);
            if let Some(leadership) = self.leadership.as_mut() {
                leadership.handles.retain(|id, _| id.gateway != name);
            }
            sim.note(|| format!("queue: gateway {name} died"));
            self.dead.insert(name, noticed);
            self.report.gateway_downs += 1;
        }
        let ids: Vec<ConsumerId> = self.consumers.keys().cloned().collect();
        for id in ids {
            if !Self::per_tick(sim, self.config.close_per_tick) {
                continue;
            }
            let Some(consumer) = self.consumers.remove(&id) else {
                continue;
            };
            if let Some(leadership) = self.leadership.as_mut() {
                leadership.handles.remove(&id);
            }
            if let Some(gateway) = self.gateways.get_mut(consumer.gateway) {
                gateway.closing.insert(id.clone(), None);
            }
            self.report.channel_closes += 1;
            sim.note(|| format!("queue: channel of {id:?} closed"));
            self.new_consumer(sim, consumer.gateway);
        }
    }

    fn new_consumer(&mut self, sim: &mut Sim<Self>, g: usize) {
        let prefetch = sim.rng().range(1, 5) as usize;
        let Some(gateway) = self.gateways.get_mut(g) else {
            return;
        };
        let channel = gateway.next_channel;
        gateway.next_channel = gateway.next_channel.wrapping_add(1);
        let id = ConsumerId {
            gateway: gateway_name(g, gateway.incarnation),
            connection: 1,
            channel,
            tag: format!("c{channel}"),
        };
        self.consumers.insert(
            id,
            Consumer {
                gateway: g,
                prefetch,
                holding: BTreeMap::new(),
                attached_at: None,
                attaching: None,
                backlog: Vec::new(),
                next_attempt: 0,
            },
        );
    }

    fn restart_gateways(&mut self, sim: &mut Sim<Self>) {
        let now = sim.now();
        for g in 0..self.gateways.len() {
            let Some(gateway) = self.gateways.get_mut(g) else {
                continue;
            };
            if gateway.alive || gateway.back_at > now {
                continue;
            }
            if now > 0 {
                gateway.incarnation += 1;
            }
            gateway.alive = true;
            gateway.seen = None;
            gateway.next_channel = 1;
            for _ in 0..self.config.consumers_per_gateway {
                self.new_consumer(sim, g);
            }
        }
    }

    fn publish(&mut self, sim: &mut Sim<Self>) -> SimResult<()> {
        let now = sim.now();
        let leader = self.leadership.as_ref().map(|l| l.key.0);
        for p in 0..self.publishers.len() {
            let create = !self.healed && Self::per_tick(sim, self.config.publish_per_tick);
            let count = sim.rng().range(1, 4);
            let refresh = sim.rng().chance(100);
            let Some(publisher) = self.publishers.get_mut(p) else {
                continue;
            };
            if create && publisher.pending.len() < 16 {
                for _ in 0..count {
                    publisher.pending.insert(
                        publisher.next_id,
                        Pending {
                            tag: None,
                            tries: 0,
                        },
                    );
                    publisher.next_id += 1;
                }
            }
            if publisher.believed.is_none() || refresh {
                publisher.believed = leader;
            }
            let idle: Vec<u64> = publisher
                .pending
                .iter()
                .filter(|(_, p)| p.tag.is_none())
                .map(|(id, _)| *id)
                .collect();
            let Some(at) = publisher
                .believed
                .filter(|_| !idle.is_empty() && now >= publisher.next_attempt)
            else {
                continue;
            };
            let msgs = idle
                .iter()
                .map(|&id| NewMsg {
                    size: 1,
                    persistent: true,
                    publish_id: Some(PublishId {
                        publisher: publisher.name.clone(),
                        id,
                    }),
                    ttl_ms: None,
                    priority: 0,
                    ..NewMsg::default()
                })
                .collect();
            let request = Request::Publish {
                publisher: p,
                ids: idle.clone(),
            };
            match self.propose(sim, at, Command::Enqueue { now_ms: 0, msgs }, request)? {
                Some(tag) => {
                    self.report.publish_proposals += 1;
                    let Some(publisher) = self.publishers.get_mut(p) else {
                        continue;
                    };
                    for id in idle {
                        if let Some(pending) = publisher.pending.get_mut(&id) {
                            self.report.retried += u64::from(pending.tries > 0);
                            pending.tries += 1;
                            pending.tag = Some(tag);
                        }
                    }
                }
                None => {
                    let Some(publisher) = self.publishers.get_mut(p) else {
                        continue;
                    };
                    publisher.believed = None;
                    publisher.next_attempt = now + 5;
                }
            }
        }
        Ok(())
    }

    /// Gateways (re-)attach their consumers at the leadership they follow,
    /// and close channels.
    fn attach(&mut self, sim: &mut Sim<Self>) -> SimResult<()> {
        let Some(key) = self.leadership.as_ref().map(|l| l.key) else {
            return Ok(());
        };
        let now = sim.now();
        for g in 0..self.gateways.len() {
            let delay = sim.rng().range(1, 6) * STEPS_PER_TICK;
            let Some(gateway) = self.gateways.get_mut(g) else {
                continue;
            };
            if !gateway.alive {
                continue;
            }
            if gateway.seen != Some(key) {
                gateway.seen = Some(key);
                gateway.notice_at = now + delay;
            }
            if now < gateway.notice_at {
                continue;
            }
            let closing: Vec<ConsumerId> = gateway
                .closing
                .iter()
                .filter(|(_, tag)| tag.is_none())
                .map(|(id, _)| id.clone())
                .collect();
            for id in closing {
                let detached = self.propose(
                    sim,
                    key.0,
                    Command::Detach {
                        consumer: id.clone(),
                    },
                    Request::OneWay,
                )?;
                if detached.is_none() {
                    break;
                }
                let request = Request::Close {
                    consumer: id.clone(),
                    gateway: g,
                };
                let tag = self.propose(
                    sim,
                    key.0,
                    Command::ReturnAll {
                        consumer: id.clone(),
                    },
                    request,
                )?;
                if let Some(gateway) = self.gateways.get_mut(g) {
                    gateway.closing.insert(id, tag);
                }
            }
            let ids: Vec<ConsumerId> = self
                .consumers
                .iter()
                .filter(|(_, c)| {
                    c.gateway == g && c.attached_at != Some(key) && c.attaching.is_none()
                })
                .filter(|(_, c)| now >= c.next_attempt)
                .map(|(id, _)| id.clone())
                .collect();
            for id in ids {
                let Some(consumer) = self.consumers.get_mut(&id) else {
                    continue;
                };
                // From now on deliveries from the previous leader are not
                // taken: what it still checks out is requeued by the resync.
                consumer.attached_at = None;
                let held: BTreeSet<Seq> = consumer.holding.keys().copied().collect();
                let cmd = Command::Attach {
                    consumer: id.clone(),
                    opts: ConsumerOpts::default(),
                };
                let request = Request::Attach {
                    consumer: id.clone(),
                    held,
                    key,
                };
                let tag = self.propose(sim, key.0, cmd, request)?;
                if let Some(consumer) = self.consumers.get_mut(&id) {
                    consumer.attaching = tag;
                    if tag.is_none() {
                        consumer.next_attempt = now + 5;
                    }
                }
            }
        }
        Ok(())
    }

    /// Consumers ack or requeue what they are done with.
    fn consume(&mut self, sim: &mut Sim<Self>) -> SimResult<()> {
        let now = sim.now();
        let ids: Vec<ConsumerId> = self
            .consumers
            .iter()
            .filter(|(_, c)| c.holding.values().any(|at| *at <= now))
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let due: Vec<Seq> = match self.consumers.get(&id) {
                Some(c) => c
                    .holding
                    .iter()
                    .filter(|(_, at)| **at <= now)
                    .map(|(seq, _)| *seq)
                    .collect(),
                None => continue,
            };
            let requeue_per_mille = if self.healed {
                50
            } else {
                self.config.requeue_per_mille
            };
            let mut acks = Vec::new();
            let mut requeues = Vec::new();
            for seq in due {
                if sim.rng().chance(requeue_per_mille) {
                    requeues.push(seq);
                } else {
                    acks.push(seq);
                }
            }
            let Some(consumer) = self.consumers.get_mut(&id) else {
                continue;
            };
            for seq in acks.iter().chain(&requeues) {
                consumer.holding.remove(seq);
            }
            self.report.acks += acks.len() as u64;
            self.report.requeues += requeues.len() as u64;
            self.acked.extend(acks.iter().copied());
            let attached_at = consumer.attached_at;
            for (seqs, outcome) in [(acks, Outcome::Ack), (requeues, Outcome::Requeue)] {
                if seqs.is_empty() {
                    continue;
                }
                // Sent to the replica the consumer is attached at: dropped
                // there if it no longer leads; kept for after the next
                // re-attach if the connection is gone.
                let reachable = attached_at.filter(|(replica, incarnation, _)| {
                    sim.up(*replica).is_some() && sim.incarnation(*replica) == *incarnation
                });
                match reachable {
                    Some((replica, _, _)) => {
                        let cmd = Command::Settle {
                            consumer: id.clone(),
                            seqs,
                            outcome,
                        };
                        self.propose(sim, replica, cmd, Request::OneWay)?;
                    }
                    None => {
                        if let Some(consumer) = self.consumers.get_mut(&id) {
                            consumer.backlog.push((seqs, outcome));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// The leader's decisions (every other step): checkouts, and (every
    /// tick) gateway-down commands.
    fn lead(&mut self, sim: &mut Sim<Self>) -> SimResult<()> {
        let now = sim.now();
        if !now.is_multiple_of(2) {
            return Ok(());
        }
        let Some(state) = self.leader_state(sim) else {
            return Ok(());
        };
        let Some(leadership) = self.leadership.as_ref() else {
            return Ok(());
        };
        let key = leadership.key;
        let depth = u64::from(state.ready_count()) + u64::from(state.unacked_count());
        let mut taken: BTreeSet<Seq> = BTreeSet::new();
        let mut checkouts: Vec<(ConsumerId, Vec<Seq>)> = Vec::new();
        for (id, _) in leadership.handles.iter().filter(|(_, active)| **active) {
            let Some(consumer) = self.consumers.get(id) else {
                continue;
            };
            if !state.is_attached(id) {
                continue;
            }
            let pending: usize = leadership
                .checkouts
                .values()
                .filter(|(c, _)| c == id)
                .map(|(_, seqs)| seqs.len())
                .sum();
            let credit = consumer
                .prefetch
                .saturating_sub(state.held_by(id).count() + pending);
            if credit == 0 {
                continue;
            }
            let seqs: Vec<Seq> = state
                .next_ready(usize::MAX)
                .map(|(seq, _)| seq)
                .filter(|seq| !leadership.in_checkout.contains(seq) && !taken.contains(seq))
                .take(credit)
                .collect();
            if seqs.is_empty() {
                break;
            }
            taken.extend(seqs.iter().copied());
            checkouts.push((id.clone(), seqs));
        }
        let mut downs = Vec::new();
        let dead = if now.is_multiple_of(STEPS_PER_TICK) {
            &self.dead
        } else {
            &BTreeMap::new()
        };
        for (gateway, noticed) in dead {
            if *noticed > now || leadership.gateway_down.contains(gateway) {
                continue;
            }
            let mentioned = state.consumers().any(|(id, _)| id.gateway == *gateway)
                || state.holders().any(|id| id.gateway == *gateway);
            if mentioned {
                downs.push(gateway.clone());
            }
        }
        self.report.max_depth = self.report.max_depth.max(depth);
        for (consumer, seqs) in checkouts {
            let cmd = Command::Checkout {
                consumer: consumer.clone(),
                seqs: seqs.clone(),
                now_ms: 0,
            };
            let Some(tag) = self.propose(sim, key.0, cmd, Request::Checkout { key })? else {
                return Ok(());
            };
            if let Some(leadership) = self.leadership.as_mut() {
                leadership.in_checkout.extend(seqs.iter().copied());
                leadership.checkouts.insert(tag, (consumer, seqs));
            }
        }
        for gateway in downs {
            let cmd = Command::GatewayDown {
                gateway: gateway.clone(),
            };
            let request = Request::GatewayDown {
                gateway: gateway.clone(),
                key,
            };
            if self.propose(sim, key.0, cmd, request)?.is_some() {
                if let Some(leadership) = self.leadership.as_mut() {
                    leadership.gateway_down.insert(gateway);
                }
            }
        }
        Ok(())
    }

    /// Every running member's final state, by applied index: (index,
    /// (replica, snapshot hash)); members at one index must agree.
    fn final_states(&self, sim: &Sim<Self>) -> SimResult<Vec<(u64, (u64, u64))>> {
        let mut out = Vec::new();
        for id in sim.member_ids() {
            let Some(up) = sim.up(id) else { continue };
            if let Err(what) = check_places(&up.sm.app) {
                return sim.fail(format!("(b) replica {id} at the end: {what}"));
            }
            match full_hash(&up.sm.app) {
                Ok(hash) => out.push((up.sm.applied(), (id, hash))),
                Err(error) => return sim.fail(format!("snapshot encoding: {error}")),
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_foreign_bytes_do_not_decode() {
        let entry = Entry {
            tag: 7,
            cmd: Command::Purge,
        };
        let bytes = postcard::to_allocvec(&entry).unwrap();
        assert!(Queues::digest(&bytes).unwrap() >= 1 << 63);
        assert!(postcard::from_bytes::<Entry>(&[0xff; 3]).is_err());
    }

    #[test]
    fn a_short_queue_run_passes() {
        let mut config = QueueSimConfig::chaos(1, 3);
        config.sim.fault_ticks = 80;
        let report = run(&config).unwrap_or_else(|failure| panic!("{failure}"));
        assert!(report.confirmed > 0);
        assert!(report.deliveries >= report.confirmed);
    }
}
