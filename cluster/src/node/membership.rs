//! Membership and failure detection: which nodes exist (discovery) and
//! which of them answer (liveness), as this node sees it.
//!
//! This is not the authoritative member set: the set used for placement
//! will be the one committed in the metadata Raft group. This layer only
//! finds nodes and says whether they are reachable (docs/cluster.md,
//! "Membership and failure detection").
//!
//! - [`MemberTable`] is pure: it merges member lists and direct evidence
//!   (a heartbeat received from a node, or its answer to ours) and turns
//!   silence into `Down` when [`MemberTable::tick`] is called with a
//!   later `now`. No clock, no I/O, so it is tested without sleeping.
//! - [`Membership`] is the runtime around it: one task per known member
//!   heartbeats it over the node protocol every `heartbeat_interval`
//!   (one connection per peer, reconnected with backoff), seeds are
//!   contacted until they answer once, and the node's handler feeds
//!   received heartbeats in.
//!
//! # Rules
//!
//! - Members are keyed by node id. Each start of a node bumps its
//!   *incarnation* (persisted in its data directory, and at least the
//!   wall-clock milliseconds), so information about a previous life loses:
//!   in a merge, a higher incarnation replaces the entry (its address may
//!   have changed), a lower one is ignored, an equal one keeps ours.
//! - Liveness is local. Only direct evidence makes a member `Up`: a
//!   heartbeat it sent us or its answer to ours. A member only heard of
//!   through others' lists starts `Down` ("never heard"). A member not
//!   heard from for `failure_timeout` becomes `Down`, and `Up` again as
//!   soon as it is heard from. Lists carry no states.
//! - Self-protection: a heartbeat whose sender claims this node's id with
//!   another address or incarnation is refused (two nodes with one id); a
//!   list entry with our id and a newer incarnation, or our incarnation at
//!   another address, is ignored and reported ([`Change::Impostor`]); an
//!   entry with an older incarnation of us is our previous life: ignored.
//! - Members are never forgotten here (removal is decommissioning, which
//!   belongs to the metadata group).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::task::JoinSet;

use super::{NodeRequest, NodeResponse};
use crate::rpc::{self, Client, PeerInfo, Role, Secret};

/// Longest node id accepted from the network (as `sluice node --id`).
pub const MAX_ID_LEN: usize = 255;
/// Longest member address accepted from the network.
pub const MAX_ADDR_LEN: usize = 255;
/// Entries of one received member list that are looked at; the rest is
/// ignored.
pub const MAX_GOSSIP: usize = 4096;

/// A node as members tell each other about it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MemberInfo {
    /// `sluice node --id`.
    pub id: String,
    /// Where it serves the node protocol, HOST:PORT.
    pub addr: String,
    /// Bumped at each start of the node; higher wins.
    pub incarnation: u64,
}

impl fmt::Display for MemberInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {} (incarnation {})", self.id, self.addr, self.incarnation)
    }
}

/// Whether a member answers, as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Heard from within the failure timeout.
    Up,
    /// Not heard from within the failure timeout, or never.
    Down,
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MemberState::Up => "up",
            MemberState::Down => "down",
        })
    }
}

/// One row of the member table (`sluice ctl members`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    pub id: String,
    pub addr: String,
    pub incarnation: u64,
    pub state: MemberState,
    /// Milliseconds since this node last heard from the member directly;
    /// `None` if never (and for the node itself).
    pub last_heard_ms: Option<u64>,
    /// The row of the node that answered.
    pub is_self: bool,
}

/// What a table update changed (for the log, and for the runtime to start
/// heartbeating new members).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// A member this node did not know.
    Discovered(MemberInfo),
    /// A known member has a new incarnation (it restarted; its address may
    /// have changed).
    Restarted { previous: MemberInfo, current: MemberInfo },
    /// Heard from a member that was down (or new).
    Up { id: String },
    /// A member was not heard from for the failure timeout.
    Down { id: String, silent_for: Option<Duration> },
    /// A member list says another process uses this node's id.
    Impostor(MemberInfo),
    /// A member list holds a newer incarnation of a member at another
    /// address while the known one is up: ignored (two nodes with one id,
    /// or a restart on another address that is taken once the old one is
    /// down).
    Contested { known: MemberInfo, claimed: MemberInfo },
}

/// Why a heartbeat (or an answer to one) was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The sender claims this node's id: two nodes with one id.
    #[error("two nodes with one id: {claimed} claims the id of this node, {me}")]
    SameId { claimed: MemberInfo, me: MemberInfo },
    /// The sender is an older incarnation than the one known for its id.
    #[error("stale incarnation: {claimed}, but {known} is known (two nodes with one id?)")]
    Stale { claimed: MemberInfo, known: MemberInfo },
    /// The sender is a newer incarnation at another address while the
    /// known one is up. Taken once the known one is down.
    #[error("node id in use: {claimed} claims it while {known} is up (two nodes with one id?)")]
    InUse { claimed: MemberInfo, known: MemberInfo },
    /// The sender's id differs from the one it authenticated with.
    #[error("heartbeat for node {claimed} on a connection authenticated as {authenticated}")]
    WrongSender { claimed: String, authenticated: String },
    /// Only `sluice node` processes heartbeat.
    #[error("heartbeat from {peer}, which is not a node")]
    NotANode { peer: String },
    /// Id or address empty or too long.
    #[error("invalid member: {0}")]
    Invalid(String),
}

fn validate(info: &MemberInfo) -> Result<(), Rejected> {
    if info.id.is_empty() || info.id.len() > MAX_ID_LEN {
        return Err(Rejected::Invalid(format!("node id of {} bytes", info.id.len())));
    }
    if info.addr.is_empty() || info.addr.len() > MAX_ADDR_LEN {
        return Err(Rejected::Invalid(format!("address of {} bytes", info.addr.len())));
    }
    Ok(())
}

/// Whether `theirs` is our address `mine`: equal, or `mine` is a wildcard
/// (0.0.0.0 / ::) with the same port (others see us at a real address).
fn same_addr(mine: &str, theirs: &str) -> bool {
    if mine == theirs {
        return true;
    }
    match (mine.parse::<SocketAddr>(), theirs.parse::<SocketAddr>()) {
        (Ok(m), Ok(t)) => m.ip().is_unspecified() && m.port() == t.port(),
        _ => false,
    }
}

/// The address to reach a node that announced `addr` and was seen
/// connecting from `seen`: a wildcard IP (a node listening on 0.0.0.0) is
/// replaced by the IP it connected from; anything else is kept.
pub fn reachable_addr(addr: &str, seen: IpAddr) -> String {
    match addr.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => SocketAddr::new(seen, a.port()).to_string(),
        _ => addr.to_string(),
    }
}

#[derive(Clone, Debug)]
struct Entry {
    info: MemberInfo,
    state: MemberState,
    last_heard: Option<Instant>,
}

/// The member table of one node: pure state, driven by explicit times.
#[derive(Clone, Debug)]
pub struct MemberTable {
    me: MemberInfo,
    failure_timeout: Duration,
    /// Every other member, by id.
    members: BTreeMap<String, Entry>,
    /// Conflicting list entries already reported (each is reported once).
    reported: HashSet<MemberInfo>,
}

impl MemberTable {
    /// A table knowing only `me`.
    pub fn new(me: MemberInfo, failure_timeout: Duration) -> Self {
        MemberTable { me, failure_timeout, members: BTreeMap::new(), reported: HashSet::new() }
    }

    /// This node.
    pub fn me(&self) -> &MemberInfo {
        &self.me
    }

    /// What is known of member `id` (not this node).
    pub fn get(&self, id: &str) -> Option<&MemberInfo> {
        self.members.get(id).map(|e| &e.info)
    }

    /// The state of member `id` (this node is always `Up`).
    pub fn state(&self, id: &str) -> Option<MemberState> {
        if id == self.me.id {
            return Some(MemberState::Up);
        }
        self.members.get(id).map(|e| e.state)
    }

    /// The ids of the other members.
    pub fn peer_ids(&self) -> impl Iterator<Item = &str> {
        self.members.keys().map(String::as_str)
    }

    /// Direct evidence: `from` sent us a heartbeat, or answered ours, at
    /// `now`. It becomes (or stays) `Up`, with its address and incarnation.
    /// Refused when it claims our id without being us, is older than the
    /// incarnation we know for its id, or is newer but at another address
    /// while the known incarnation is up. A message from ourselves (a seed
    /// list that names this node) changes nothing.
    pub fn heard(&mut self, from: MemberInfo, now: Instant) -> Result<Vec<Change>, Rejected> {
        validate(&from)?;
        if from.id == self.me.id {
            if from.incarnation == self.me.incarnation && same_addr(&self.me.addr, &from.addr) {
                return Ok(Vec::new());
            }
            return Err(Rejected::SameId { claimed: from, me: self.me.clone() });
        }
        let mut changes = Vec::new();
        match self.members.get_mut(&from.id) {
            None => {
                changes.push(Change::Discovered(from.clone()));
                changes.push(Change::Up { id: from.id.clone() });
                let id = from.id.clone();
                self.members.insert(id, Entry { info: from, state: MemberState::Up, last_heard: Some(now) });
            }
            Some(entry) => {
                if from.incarnation < entry.info.incarnation {
                    return Err(Rejected::Stale { claimed: from, known: entry.info.clone() });
                }
                if from.incarnation > entry.info.incarnation
                    && entry.state == MemberState::Up
                    && from.addr != entry.info.addr
                {
                    return Err(Rejected::InUse { claimed: from, known: entry.info.clone() });
                }
                if from.incarnation > entry.info.incarnation {
                    changes.push(Change::Restarted { previous: entry.info.clone(), current: from.clone() });
                }
                // Same incarnation: the node's own word on its address wins.
                entry.info = from;
                entry.last_heard = Some(entry.last_heard.map_or(now, |t| t.max(now)));
                if entry.state == MemberState::Down {
                    entry.state = MemberState::Up;
                    changes.push(Change::Up { id: entry.info.id.clone() });
                }
            }
        }
        Ok(changes)
    }

    /// Gossip: a member list from another node. New ids are added (`Down`
    /// until heard from directly), higher incarnations replace what is
    /// known (liveness is kept: it is about the id) unless they are at
    /// another address while the known one is up, anything else is
    /// ignored. Invalid entries and entries beyond [`MAX_GOSSIP`] are
    /// skipped. Conflicts are reported once each.
    pub fn merge(&mut self, list: impl IntoIterator<Item = MemberInfo>, _now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        for info in list.into_iter().take(MAX_GOSSIP) {
            if validate(&info).is_err() {
                continue;
            }
            if info.id == self.me.id {
                let newer = info.incarnation > self.me.incarnation;
                let elsewhere = info.incarnation == self.me.incarnation && !same_addr(&self.me.addr, &info.addr);
                if (newer || elsewhere) && self.first_report(&info) {
                    changes.push(Change::Impostor(info));
                }
                continue;
            }
            match self.members.get_mut(&info.id) {
                None => {
                    changes.push(Change::Discovered(info.clone()));
                    let id = info.id.clone();
                    self.members.insert(id, Entry { info, state: MemberState::Down, last_heard: None });
                }
                Some(entry) if info.incarnation > entry.info.incarnation => {
                    if entry.state == MemberState::Up && info.addr != entry.info.addr {
                        let known = entry.info.clone();
                        if self.first_report(&info) {
                            changes.push(Change::Contested { known, claimed: info });
                        }
                        continue;
                    }
                    changes.push(Change::Restarted { previous: entry.info.clone(), current: info.clone() });
                    entry.info = info;
                }
                Some(_) => {}
            }
        }
        changes
    }

    /// Whether a conflicting entry is seen for the first time (bounded
    /// memory: forgets everything past 1,024 entries).
    fn first_report(&mut self, info: &MemberInfo) -> bool {
        if self.reported.contains(info) {
            return false;
        }
        if self.reported.len() >= 1024 {
            self.reported.clear();
        }
        self.reported.insert(info.clone());
        true
    }

    /// Marks `Down` every member not heard from for the failure timeout
    /// at `now`.
    pub fn tick(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        for entry in self.members.values_mut() {
            if entry.state != MemberState::Up {
                continue;
            }
            let silent_for = entry.last_heard.map(|t| now.saturating_duration_since(t));
            if silent_for.is_none_or(|s| s >= self.failure_timeout) {
                entry.state = MemberState::Down;
                changes.push(Change::Down { id: entry.info.id.clone(), silent_for });
            }
        }
        changes
    }

    /// The list sent to others: every known member except this node
    /// (heartbeats carry the sender separately).
    pub fn gossip(&self) -> Vec<MemberInfo> {
        self.members.values().map(|e| e.info.clone()).collect()
    }

    /// The table as of `now` (call [`MemberTable::tick`] first for
    /// current states), this node included, sorted by id.
    pub fn view(&self, now: Instant) -> Vec<MemberView> {
        let mut rows: Vec<MemberView> = self
            .members
            .values()
            .map(|e| MemberView {
                id: e.info.id.clone(),
                addr: e.info.addr.clone(),
                incarnation: e.info.incarnation,
                state: e.state,
                last_heard_ms: e
                    .last_heard
                    .map(|t| u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)),
                is_self: false,
            })
            .collect();
        rows.push(MemberView {
            id: self.me.id.clone(),
            addr: self.me.addr.clone(),
            incarnation: self.me.incarnation,
            state: MemberState::Up,
            last_heard_ms: None,
            is_self: true,
        });
        rows.sort_by(|a, b| a.id.cmp(&b.id));
        rows
    }
}

/// Timing of heartbeats and failure detection.
#[derive(Clone, Debug)]
pub struct MembershipOptions {
    /// How often each member is sent a heartbeat (default 100 ms).
    pub heartbeat_interval: Duration,
    /// Silence after which a member is `Down` (default 500 ms).
    pub failure_timeout: Duration,
    /// Longest wait between two connection attempts to an unreachable
    /// member or seed (default 1 s); attempts start at `heartbeat_interval`
    /// and double.
    pub max_backoff: Duration,
}

impl Default for MembershipOptions {
    fn default() -> Self {
        MembershipOptions {
            heartbeat_interval: Duration::from_millis(100),
            failure_timeout: Duration::from_millis(500),
            max_backoff: Duration::from_secs(1),
        }
    }
}

impl MembershipOptions {
    fn interval(&self) -> Duration {
        self.heartbeat_interval.max(Duration::from_millis(1))
    }

    /// Deadline of one heartbeat call; a call that times out drops the
    /// connection (the next heartbeat reconnects).
    fn call_timeout(&self) -> Duration {
        self.failure_timeout.max(self.interval())
    }

    fn connect_options(&self) -> rpc::Options {
        rpc::Options { handshake_timeout: self.failure_timeout.max(Duration::from_secs(1)), ..rpc::Options::default() }
    }
}

/// Waits between attempts: from `base`, doubling, up to `max`.
struct Backoff {
    base: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    fn new(base: Duration, max: Duration) -> Self {
        Backoff { base, max: max.max(base), next: base }
    }

    fn next(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    fn reset(&mut self) {
        self.next = self.base;
    }
}

fn log_changes(changes: Vec<Change>) {
    for change in changes {
        match change {
            Change::Discovered(info) => tracing::info!(member = %info.id, addr = %info.addr,
                incarnation = info.incarnation, "membership: discovered a member"),
            Change::Restarted { previous, current } => tracing::info!(member = %current.id,
                addr = %current.addr, incarnation = current.incarnation,
                previous_addr = %previous.addr, previous_incarnation = previous.incarnation,
                "membership: member restarted"),
            Change::Up { id } => tracing::info!(member = %id, "membership: member is up"),
            Change::Down { id, silent_for } => tracing::warn!(member = %id,
                silent_ms = silent_for.map(|d| d.as_millis() as u64),
                "membership: member is down (no heartbeat within the failure timeout)"),
            Change::Impostor(info) => tracing::warn!(claimed = %info,
                "membership: another node uses this node's id (two nodes with one id); ignored"),
            Change::Contested { known, claimed } => tracing::warn!(%known, %claimed,
                "membership: a second incarnation of an up member at another address \
                 (two nodes with one id?); ignored while the known one is up"),
        }
    }
}

/// The membership of a running node: the table, and what the heartbeat
/// tasks and the node's handler share.
pub struct Membership {
    table: Mutex<MemberTable>,
    secret: Secret,
    options: MembershipOptions,
}

impl Membership {
    pub(crate) fn new(me: MemberInfo, secret: Secret, options: MembershipOptions) -> Arc<Self> {
        Arc::new(Membership {
            table: Mutex::new(MemberTable::new(me, options.failure_timeout)),
            secret,
            options,
        })
    }

    fn table(&self) -> MutexGuard<'_, MemberTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// This node.
    pub fn me(&self) -> MemberInfo {
        self.table().me().clone()
    }

    /// The member table now.
    pub fn view(&self) -> Vec<MemberView> {
        let now = Instant::now();
        let mut table = self.table();
        log_changes(table.tick(now));
        table.view(now)
    }

    fn heartbeat_request(&self) -> NodeRequest {
        let table = self.table();
        NodeRequest::Heartbeat { from: table.me().clone(), members: table.gossip() }
    }

    /// A heartbeat received on the connection of `peer` (authenticated in
    /// the handshake) from `seen`. Returns the answer: this node and its
    /// list.
    pub(crate) fn on_heartbeat(
        &self,
        peer: &PeerInfo,
        seen: IpAddr,
        from: MemberInfo,
        members: Vec<MemberInfo>,
    ) -> Result<(MemberInfo, Vec<MemberInfo>), Rejected> {
        if peer.role != Role::Node {
            return Err(Rejected::NotANode { peer: peer.node_id.clone() });
        }
        self.take(peer, seen, from, members)?;
        let table = self.table();
        Ok((table.me().clone(), table.gossip()))
    }

    /// Takes what a peer says about itself and the others.
    fn take(&self, peer: &PeerInfo, seen: IpAddr, mut from: MemberInfo, members: Vec<MemberInfo>) -> Result<(), Rejected> {
        if from.id != peer.node_id {
            return Err(Rejected::WrongSender { claimed: from.id, authenticated: peer.node_id.clone() });
        }
        let now = Instant::now();
        let mut table = self.table();
        if from.id != table.me().id {
            from.addr = reachable_addr(&from.addr, seen);
        }
        let heard = table.heard(from, now)?;
        let merged = table.merge(members, now);
        drop(table);
        log_changes(heard);
        log_changes(merged);
        Ok(())
    }

    /// Sends one heartbeat on `client` and takes the answer. Returns the
    /// id of the node that answered.
    async fn exchange(&self, client: &Client<NodeRequest, NodeResponse>) -> Result<String, ExchangeError> {
        let resp = client.call_timeout(self.heartbeat_request(), self.options.call_timeout()).await?;
        match resp {
            NodeResponse::Heartbeat { from, members } => {
                let id = from.id.clone();
                self.take(client.peer(), client.peer_addr().ip(), from, members)?;
                Ok(id)
            }
            NodeResponse::Refused { reason } => Err(ExchangeError::Refused(reason)),
            other => Err(ExchangeError::Unexpected(format!("{other:?}"))),
        }
    }

    async fn connect(&self, addr: &str) -> Result<Client<NodeRequest, NodeResponse>, rpc::Error> {
        let me = PeerInfo::node(self.me().id);
        let (client, _incoming) =
            rpc::connect_with::<NodeRequest, NodeResponse>(addr, &self.secret, me, &self.options.connect_options())
                .await?;
        Ok(client)
    }

    /// Runs discovery and heartbeats until dropped: contacts `seeds` until
    /// each answers once, heartbeats every member, marks silent ones down.
    pub(crate) async fn run(self: Arc<Self>, seeds: Vec<String>) {
        let mut tasks = JoinSet::new();
        for seed in seeds {
            tasks.spawn(self.clone().seed_loop(seed));
        }
        let mut running: HashSet<String> = HashSet::new();
        let mut task_member: HashMap<tokio::task::Id, String> = HashMap::new();
        let tick = (self.options.interval() / 2).max(Duration::from_millis(1));
        loop {
            let new: Vec<String> = {
                let now = Instant::now();
                let mut table = self.table();
                let changes = table.tick(now);
                let new = table.peer_ids().filter(|id| !running.contains(*id)).map(str::to_string).collect();
                drop(table);
                log_changes(changes);
                new
            };
            for id in new {
                let handle = tasks.spawn(self.clone().peer_loop(id.clone()));
                task_member.insert(handle.id(), id.clone());
                running.insert(id);
            }
            // A peer task only ends by panicking: forget it so it is
            // started again.
            while let Some(done) = tasks.try_join_next_with_id() {
                let task = match done {
                    Ok((task, ())) => task,
                    Err(e) => {
                        tracing::error!(error = %e, "membership: heartbeat task failed");
                        e.id()
                    }
                };
                if let Some(id) = task_member.remove(&task) {
                    running.remove(&id);
                }
            }
            tokio::time::sleep(tick).await;
        }
    }

    /// Contacts a seed until it answers one heartbeat (then the member
    /// lists do the rest).
    async fn seed_loop(self: Arc<Self>, seed: String) {
        let mut backoff = Backoff::new(self.options.interval(), self.options.max_backoff.max(Duration::from_secs(2)));
        let mut failures = 0u32;
        loop {
            let outcome = match self.connect(&seed).await {
                Ok(client) => {
                    let r = self.exchange(&client).await.map_err(|e| e.to_string());
                    client.close();
                    r
                }
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(id) => {
                    tracing::debug!(%seed, member = %id, "membership: seed answered");
                    return;
                }
                Err(e) => {
                    if failures.is_multiple_of(10) {
                        tracing::warn!(%seed, error = %e, "membership: no accepted answer from seed; retrying");
                    }
                    failures = failures.saturating_add(1);
                }
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// Heartbeats member `id` every interval, at whatever address the
    /// table holds for it, over one connection (reconnected with backoff).
    async fn peer_loop(self: Arc<Self>, id: String) {
        let interval = self.options.interval();
        let mut backoff = Backoff::new(interval, self.options.max_backoff);
        let mut conn: Option<(String, Client<NodeRequest, NodeResponse>)> = None;
        let mut refusals = 0u32;
        loop {
            let started = tokio::time::Instant::now();
            let Some(addr) = self.table().get(&id).map(|m| m.addr.clone()) else { return };
            if conn.as_ref().is_some_and(|(a, c)| *a != addr || c.is_closed()) {
                conn = None;
            }
            let client = match &conn {
                Some((_, client)) => client.clone(),
                None => match self.connect(&addr).await {
                    Ok(client) => {
                        conn = Some((addr.clone(), client.clone()));
                        client
                    }
                    Err(e) => {
                        tracing::debug!(member = %id, %addr, error = %e, "membership: cannot connect");
                        tokio::time::sleep(backoff.next()).await;
                        continue;
                    }
                },
            };
            match self.exchange(&client).await {
                Ok(answered) if answered == id => {
                    backoff.reset();
                    refusals = 0;
                }
                Ok(other) => {
                    tracing::debug!(member = %id, %addr, answered = %other,
                        "membership: another node answers at this member's address");
                    conn = None;
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
                Err(e) => {
                    let quiet = matches!(e, ExchangeError::Rpc(_));
                    if !quiet && refusals.is_multiple_of(10) {
                        tracing::warn!(member = %id, %addr, error = %e, "membership: heartbeat not accepted");
                    } else {
                        tracing::debug!(member = %id, %addr, error = %e, "membership: heartbeat failed");
                    }
                    if !quiet {
                        refusals = refusals.saturating_add(1);
                    }
                    client.close();
                    conn = None;
                    tokio::time::sleep(backoff.next()).await;
                    continue;
                }
            }
            tokio::time::sleep_until(started + interval).await;
        }
    }
}

/// Why one heartbeat exchange failed.
#[derive(Debug, thiserror::Error)]
enum ExchangeError {
    #[error(transparent)]
    Rpc(#[from] rpc::Error),
    #[error("refused by the peer: {0}")]
    Refused(String),
    #[error("answer not taken: {0}")]
    Rejected(#[from] Rejected),
    #[error("unexpected answer to a heartbeat: {0}")]
    Unexpected(String),
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(500);

    fn info(id: &str, port: u16, incarnation: u64) -> MemberInfo {
        MemberInfo { id: id.into(), addr: format!("127.0.0.1:{port}"), incarnation }
    }

    fn table() -> MemberTable {
        MemberTable::new(info("n1", 1001, 10), TIMEOUT)
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_node_heard_from_directly_is_up_and_discovered() {
        let mut t = table();
        let t0 = Instant::now();
        let changes = t.heard(info("n2", 1002, 5), t0).unwrap();
        assert_eq!(changes, vec![Change::Discovered(info("n2", 1002, 5)), Change::Up { id: "n2".into() }]);
        assert_eq!(t.state("n2"), Some(MemberState::Up));
        // Heard again: nothing changes.
        assert_eq!(t.heard(info("n2", 1002, 5), t0 + ms(50)).unwrap(), vec![]);
    }

    #[test]
    fn a_member_only_gossiped_about_is_down_until_heard() {
        let mut t = table();
        let t0 = Instant::now();
        let changes = t.merge([info("n3", 1003, 7)], t0);
        assert_eq!(changes, vec![Change::Discovered(info("n3", 1003, 7))]);
        assert_eq!(t.state("n3"), Some(MemberState::Down));
        let row = t.view(t0).into_iter().find(|r| r.id == "n3").unwrap();
        assert_eq!(row.last_heard_ms, None);
        assert_eq!(t.heard(info("n3", 1003, 7), t0 + ms(10)).unwrap(), vec![Change::Up { id: "n3".into() }]);
        assert_eq!(t.state("n3"), Some(MemberState::Up));
    }

    #[test]
    fn silence_for_the_failure_timeout_marks_down_and_an_answer_marks_up() {
        let mut t = table();
        let t0 = Instant::now();
        t.heard(info("n2", 1002, 5), t0).unwrap();
        assert_eq!(t.tick(t0 + TIMEOUT - ms(1)), vec![]);
        assert_eq!(t.state("n2"), Some(MemberState::Up));
        assert_eq!(t.tick(t0 + TIMEOUT), vec![Change::Down { id: "n2".into(), silent_for: Some(TIMEOUT) }]);
        assert_eq!(t.state("n2"), Some(MemberState::Down));
        // Down is reported once.
        assert_eq!(t.tick(t0 + TIMEOUT * 3), vec![]);
        let row = t.view(t0 + ms(700)).into_iter().find(|r| r.id == "n2").unwrap();
        assert_eq!((row.state, row.last_heard_ms), (MemberState::Down, Some(700)));
        assert_eq!(t.heard(info("n2", 1002, 5), t0 + ms(2000)).unwrap(), vec![Change::Up { id: "n2".into() }]);
        assert_eq!(t.tick(t0 + ms(2000) + TIMEOUT - ms(1)), vec![]);
    }

    #[test]
    fn heartbeats_keep_a_member_up_indefinitely() {
        let mut t = table();
        let t0 = Instant::now();
        for i in 0..100 {
            let now = t0 + ms(100 * i);
            t.heard(info("n2", 1002, 5), now).unwrap();
            assert_eq!(t.tick(now + ms(99)), vec![]);
        }
    }

    #[test]
    fn an_older_heard_time_does_not_move_last_heard_back() {
        let mut t = table();
        let t0 = Instant::now();
        t.heard(info("n2", 1002, 5), t0 + ms(400)).unwrap();
        t.heard(info("n2", 1002, 5), t0).unwrap();
        assert_eq!(t.tick(t0 + ms(800)), vec![]);
    }

    #[test]
    fn a_higher_incarnation_at_the_same_address_replaces_an_up_member_at_once() {
        let mut t = table();
        let t0 = Instant::now();
        t.heard(info("n2", 1002, 5), t0).unwrap();
        let changes = t.heard(info("n2", 1002, 6), t0 + ms(10)).unwrap();
        assert_eq!(changes, vec![Change::Restarted { previous: info("n2", 1002, 5), current: info("n2", 1002, 6) }]);
        assert_eq!(t.merge([info("n2", 1002, 7)], t0 + ms(20)).len(), 1);
        assert_eq!(t.get("n2"), Some(&info("n2", 1002, 7)));
    }

    #[test]
    fn a_newer_incarnation_elsewhere_waits_until_the_known_one_is_down() {
        let mut t = table();
        let t0 = Instant::now();
        t.heard(info("n2", 1002, 5), t0).unwrap();
        let err = t.heard(info("n2", 2002, 6), t0 + ms(10)).unwrap_err();
        assert!(matches!(err, Rejected::InUse { .. }), "{err}");
        let contested = Change::Contested { known: info("n2", 1002, 5), claimed: info("n2", 2002, 6) };
        assert_eq!(t.merge([info("n2", 2002, 6)], t0 + ms(10)), vec![contested]);
        // Reported once.
        assert_eq!(t.merge([info("n2", 2002, 6)], t0 + ms(20)), vec![]);
        assert_eq!(t.get("n2"), Some(&info("n2", 1002, 5)));
        t.tick(t0 + TIMEOUT);
        assert_eq!(t.merge([info("n2", 2002, 6)], t0 + TIMEOUT).len(), 1);
        assert_eq!(t.get("n2"), Some(&info("n2", 2002, 6)));
    }

    #[test]
    fn a_higher_incarnation_replaces_the_entry_and_its_address() {
        let mut t = table();
        let t0 = Instant::now();
        t.heard(info("n2", 1002, 5), t0).unwrap();
        t.tick(t0 + TIMEOUT);
        let changes = t.heard(info("n2", 2002, 6), t0 + ms(900)).unwrap();
        assert_eq!(
            changes,
            vec![
                Change::Restarted { previous: info("n2", 1002, 5), current: info("n2", 2002, 6) },
                Change::Up { id: "n2".into() }
            ]
        );
        assert_eq!(t.get("n2"), Some(&info("n2", 2002, 6)));
        // Through gossip too, keeping liveness (the old one is down).
        t.tick(t0 + ms(900) + TIMEOUT);
        let changes = t.merge([info("n2", 3002, 9)], t0 + ms(1500));
        assert_eq!(changes, vec![Change::Restarted { previous: info("n2", 2002, 6), current: info("n2", 3002, 9) }]);
        assert_eq!(t.get("n2"), Some(&info("n2", 3002, 9)));
        assert_eq!(t.state("n2"), Some(MemberState::Down));
    }

    #[test]
    fn stale_gossip_loses() {
        let mut t = table();
        let t0 = Instant::now();
        t.heard(info("n2", 2002, 6), t0).unwrap();
        assert_eq!(t.merge([info("n2", 1002, 5)], t0), vec![]);
        // An equal incarnation at another address in gossip: ours stays.
        assert_eq!(t.merge([info("n2", 9002, 6)], t0), vec![]);
        assert_eq!(t.get("n2"), Some(&info("n2", 2002, 6)));
    }

    #[test]
    fn a_heartbeat_from_an_older_incarnation_is_refused() {
        let mut t = table();
        let t0 = Instant::now();
        t.merge([info("n2", 2002, 6)], t0);
        let err = t.heard(info("n2", 1002, 5), t0).unwrap_err();
        assert!(matches!(err, Rejected::Stale { .. }), "{err}");
        assert_eq!(t.state("n2"), Some(MemberState::Down), "a refused heartbeat does not count");
        assert_eq!(t.get("n2"), Some(&info("n2", 2002, 6)));
    }

    #[test]
    fn a_heartbeat_claiming_our_id_elsewhere_or_in_another_life_is_refused() {
        let mut t = table();
        let t0 = Instant::now();
        for claim in [info("n1", 1999, 10), info("n1", 1001, 11), info("n1", 1001, 9)] {
            let err = t.heard(claim.clone(), t0).unwrap_err();
            assert_eq!(err, Rejected::SameId { claimed: claim, me: info("n1", 1001, 10) });
            assert!(err.to_string().contains("two nodes with one id"), "{err}");
        }
        assert_eq!(t.view(t0).len(), 1);
        // Ourselves (a seed list naming this node): accepted, no change.
        assert_eq!(t.heard(info("n1", 1001, 10), t0).unwrap(), vec![]);
        assert_eq!(t.view(t0).len(), 1);
    }

    #[test]
    fn gossip_about_ourselves_never_changes_the_table() {
        let mut t = table();
        let t0 = Instant::now();
        // Our previous life, and ourselves: silent.
        assert_eq!(t.merge([info("n1", 1001, 3), info("n1", 5555, 9), info("n1", 1001, 10)], t0), vec![]);
        // A newer incarnation, or ours elsewhere: reported, ignored.
        let changes = t.merge([info("n1", 1001, 11), info("n1", 1999, 10)], t0);
        assert_eq!(changes, vec![Change::Impostor(info("n1", 1001, 11)), Change::Impostor(info("n1", 1999, 10))]);
        assert_eq!(t.merge([info("n1", 1001, 11)], t0), vec![], "reported once");
        assert_eq!(t.me(), &info("n1", 1001, 10));
        assert_eq!(t.view(t0).len(), 1);
        assert!(t.gossip().is_empty());
    }

    #[test]
    fn a_wildcard_listener_is_itself_at_any_ip_with_its_port() {
        let me = MemberInfo { id: "n1".into(), addr: "0.0.0.0:25672".into(), incarnation: 1 };
        let mut t = MemberTable::new(me, TIMEOUT);
        let t0 = Instant::now();
        let seen_as = MemberInfo { id: "n1".into(), addr: "10.0.0.1:25672".into(), incarnation: 1 };
        assert_eq!(t.heard(seen_as.clone(), t0).unwrap(), vec![]);
        assert_eq!(t.merge([seen_as], t0), vec![]);
        assert!(t.heard(MemberInfo { id: "n1".into(), addr: "10.0.0.1:1".into(), incarnation: 1 }, t0).is_err());
    }

    #[test]
    fn wildcard_addresses_are_replaced_by_the_address_seen() {
        let seen: IpAddr = "10.1.2.3".parse().unwrap();
        assert_eq!(reachable_addr("0.0.0.0:25672", seen), "10.1.2.3:25672");
        assert_eq!(reachable_addr("[::]:25672", seen), "10.1.2.3:25672");
        assert_eq!(reachable_addr("127.0.0.1:7", seen), "127.0.0.1:7");
        assert_eq!(reachable_addr("node-a:25672", seen), "node-a:25672");
    }

    #[test]
    fn invalid_entries_are_skipped_and_lists_are_capped() {
        let mut t = table();
        let t0 = Instant::now();
        let long = "x".repeat(MAX_ID_LEN + 1);
        let bad = [
            MemberInfo { id: String::new(), addr: "a:1".into(), incarnation: 1 },
            MemberInfo { id: long.clone(), addr: "a:1".into(), incarnation: 1 },
            MemberInfo { id: "ok".into(), addr: String::new(), incarnation: 1 },
            MemberInfo { id: "ok".into(), addr: "a".repeat(MAX_ADDR_LEN + 1), incarnation: 1 },
        ];
        assert_eq!(t.merge(bad.clone(), t0), vec![]);
        for b in bad {
            assert!(matches!(t.heard(b, t0), Err(Rejected::Invalid(_))));
        }
        let many = (0..MAX_GOSSIP + 10).map(|i| info(&format!("m{i}"), 1, 1));
        t.merge(many, t0);
        assert_eq!(t.gossip().len(), MAX_GOSSIP);
    }

    #[test]
    fn gossip_spreads_and_converges() {
        // n1 knows n2, n3 knows n4; after n1 and n3 exchange lists (and
        // each other's identity) both know all four, and merging again
        // changes nothing.
        let t0 = Instant::now();
        let mut a = table();
        let mut b = MemberTable::new(info("n3", 1003, 1), TIMEOUT);
        a.heard(info("n2", 1002, 4), t0).unwrap();
        b.heard(info("n4", 1004, 2), t0).unwrap();
        b.merge([info("n2", 1002, 3)], t0); // an older life of n2
        let (a_me, a_list) = (a.me().clone(), a.gossip());
        let (b_me, b_list) = (b.me().clone(), b.gossip());
        b.heard(a_me.clone(), t0).unwrap();
        b.merge(a_list.clone(), t0);
        a.heard(b_me.clone(), t0).unwrap();
        a.merge(b_list.clone(), t0);
        let ids = |t: &MemberTable| t.view(t0).into_iter().map(|r| (r.id, r.incarnation)).collect::<Vec<_>>();
        let all = vec![("n1".to_string(), 10), ("n2".into(), 4), ("n3".into(), 1), ("n4".into(), 2)];
        assert_eq!(ids(&a), all);
        assert_eq!(ids(&b), all);
        assert_eq!(a.merge(b.gossip(), t0), vec![]);
        assert_eq!(b.merge(a.gossip(), t0), vec![]);
        // n2 was only heard of through n1 by n3: down there until heard.
        assert_eq!(b.state("n2"), Some(MemberState::Down));
        assert_eq!(a.state("n2"), Some(MemberState::Up));
    }

    #[test]
    fn the_view_includes_this_node_and_is_sorted_by_id() {
        let mut t = MemberTable::new(info("b", 1, 1), TIMEOUT);
        let t0 = Instant::now();
        t.heard(info("c", 3, 1), t0).unwrap();
        t.merge([info("a", 2, 1)], t0);
        let rows = t.view(t0 + ms(20));
        let got: Vec<_> = rows.iter().map(|r| (r.id.as_str(), r.state, r.last_heard_ms, r.is_self)).collect();
        assert_eq!(
            got,
            vec![
                ("a", MemberState::Down, None, false),
                ("b", MemberState::Up, None, true),
                ("c", MemberState::Up, Some(20), false)
            ]
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_and_resets() {
        let mut b = Backoff::new(ms(100), ms(1000));
        let waits: Vec<_> = (0..6).map(|_| b.next()).collect();
        assert_eq!(waits, vec![ms(100), ms(200), ms(400), ms(800), ms(1000), ms(1000)]);
        b.reset();
        assert_eq!(b.next(), ms(100));
    }
}
