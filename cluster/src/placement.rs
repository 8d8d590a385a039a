//! Placement: which nodes hold a queue's replicas.
//!
//! Every queue (or partition of a partitioned queue) is placed on the top R
//! nodes of a rendezvous ("highest random weight") ranking of the current
//! members: each member gets a score `h(key, node)` and the members are
//! sorted by score, best first. The first node is the preferred leader.
//!
//! Why rendezvous hashing: every node computes the same replica set from
//! nothing but the member list and the queue's identity, without asking
//! anyone, and a membership change moves only what it must. Adding a node
//! changes a key's set only when the new node scores among its top R (the
//! new node then replaces the old R-th, probability R/(N+1)); removing a
//! node changes only the sets that held it. The old nodes never reshuffle
//! among themselves, because their scores do not depend on who else is a
//! member.
//!
//! Why a custom hasher: the `rendezvous_hash` crate defaults to std's
//! `DefaultHasher`, whose algorithm may change between Rust releases, and
//! std's `Hash` impls for `str`/integers decide themselves which bytes they
//! feed (a `str` appends a `0xff` marker today; integers go in native byte
//! order). Two nodes built by different compilers must place every queue
//! identically, so the score is SipHash-1-3 with fixed keys over an explicit
//! byte encoding that this module alone defines (see [`PlacementHasher`]).
//! The golden tests in `cluster/tests/placement.rs` pin the result.

use std::collections::BTreeSet;
use std::fmt;
use std::hash::{Hash, Hasher};

use rendezvous_hash::{Node, NodeHasher, RendezvousNodes};
use siphasher::sip::SipHasher13;

/// How many replicas a queue gets when its declaration does not say
/// (RabbitMQ's default quorum queue group size is 3 as well).
pub const DEFAULT_REPLICAS: usize = 3;

/// First SipHash key: the ASCII bytes `"sluice-p"` read as a big-endian u64.
///
/// The keys only need to be fixed forever; they are not a secret (placement
/// is not meant to resist an adversary choosing queue names).
pub const SIP_KEY0: u64 = u64::from_be_bytes(*b"sluice-p");

/// Second SipHash key: the ASCII bytes `"lacement"` read as a big-endian u64.
pub const SIP_KEY1: u64 = u64::from_be_bytes(*b"lacement");

/// Identity of a node in the cluster (stable across restarts; from
/// `sluice node --id`).
///
/// Its derived `Hash` is for maps only; placement never uses it (the score
/// writes the id's bytes explicitly, see [`PlacementHasher`]).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub String);

impl NodeId {
    /// Makes a node id from anything string-like.
    pub fn new(id: impl Into<String>) -> Self {
        NodeId(id.into())
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for NodeId {
    fn from(id: &str) -> Self {
        NodeId(id.to_owned())
    }
}

impl From<String> for NodeId {
    fn from(id: String) -> Self {
        NodeId(id)
    }
}

/// What is placed: a queue identified by vhost + name (and, for partitioned
/// queues, a partition index).
///
/// Each partition is a key of its own, so the partitions of one queue are
/// spread independently over the members. `partition: None` (a queue that is
/// not partitioned) and `Some(0)` are different keys.
///
/// Its derived `Hash` is for maps only; placement never uses it (see
/// [`PlacementHasher`] for the bytes that are hashed).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlacementKey {
    /// The virtual host the queue lives in.
    pub vhost: String,
    /// The queue's name within its vhost.
    pub name: String,
    /// The partition index for a partitioned queue (`x-partitions`), `None`
    /// for a plain queue.
    pub partition: Option<u32>,
}

impl PlacementKey {
    /// The key of a plain (not partitioned) queue.
    pub fn queue(vhost: impl Into<String>, name: impl Into<String>) -> Self {
        PlacementKey { vhost: vhost.into(), name: name.into(), partition: None }
    }

    /// The key of partition `index` of a partitioned queue.
    pub fn partition(vhost: impl Into<String>, name: impl Into<String>, index: u32) -> Self {
        PlacementKey { vhost: vhost.into(), name: name.into(), partition: Some(index) }
    }
}

/// The rendezvous score function: SipHash-1-3 keyed with
/// ([`SIP_KEY0`], [`SIP_KEY1`]) over `key bytes ‖ node bytes`, where
///
/// - key bytes = `u64 BE len(vhost)`, vhost UTF-8 bytes, `u64 BE len(name)`,
///   name UTF-8 bytes, then `0x00` for no partition or `0x01` followed by the
///   `u32 BE` partition index;
/// - node bytes = `u64 BE len(id)`, id UTF-8 bytes.
///
/// Length prefixes keep the encoding injective (`("ab","c")` and
/// `("a","bc")` differ). The output is `SipHasher13::finish`, a u64; larger
/// is better. This is fixed forever: changing any of it re-places queues
/// across a cluster that runs mixed versions, so the golden tests fail on
/// any change.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlacementHasher;

impl PlacementHasher {
    /// The score of `node` for `key`: the value that ranks the members.
    pub fn score(&self, key: &PlacementKey, node: &NodeId) -> u64 {
        NodeHasher::<NodeId>::hash(self, node, &KeyBytes(key))
    }
}

impl NodeHasher<NodeId> for PlacementHasher {
    /// Hashes the item first, then the node, as the crate's default does.
    ///
    /// The crate hands the item over as `T: Hash`, so the bytes it feeds are
    /// up to its `Hash` impl; placement only ever passes `KeyBytes`, whose
    /// impl writes the documented encoding through `write` alone. The
    /// `StableHasher` wrapper pins the integer methods too, in case some
    /// other item type reaches this impl.
    fn hash<T: Hash>(&self, node: &NodeId, item: &T) -> u64 {
        let mut state = StableHasher::new();
        item.hash(&mut state);
        write_str(&mut state, &node.0);
        state.finish()
    }
}

/// Lets [`RendezvousNodes`] hold node ids directly; the score goes through
/// [`PlacementHasher`] (the trait bound asks for `Hash` on the id, which the
/// hasher never calls).
impl Node for NodeId {
    type NodeId = NodeId;
    type HashCode = u64;

    fn node_id(&self) -> &Self::NodeId {
        self
    }

    fn hash_code<H, U: Hash>(&self, hasher: &H, item: &U) -> Self::HashCode
    where
        H: NodeHasher<Self::NodeId>,
    {
        hasher.hash(self, item)
    }
}

/// A [`PlacementKey`] as the item handed to the rendezvous crate: its `Hash`
/// writes the documented key encoding via `Hasher::write` only, so the
/// result depends on our hasher and on nothing std decides.
struct KeyBytes<'a>(&'a PlacementKey);

impl Hash for KeyBytes<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let key = self.0;
        write_str(state, &key.vhost);
        write_str(state, &key.name);
        match key.partition {
            None => state.write(&[0]),
            Some(index) => {
                state.write(&[1]);
                state.write(&index.to_be_bytes());
            }
        }
    }
}

/// Writes `u64 BE byte length` then the UTF-8 bytes.
fn write_str<H: Hasher>(state: &mut H, s: &str) {
    // usize fits in u64 on every target Rust supports, so `as` is lossless.
    state.write(&(s.len() as u64).to_be_bytes());
    state.write(s.as_bytes());
}

/// SipHash-1-3 with the fixed keys, accepting bytes only as we choose them.
///
/// Every integer method is overridden to feed big-endian bytes (a `usize`
/// as 8 bytes, an `isize` likewise), so no path depends on the platform's
/// byte order or pointer width, nor on how `siphasher` treats integers.
/// `siphasher`'s `write` is streaming, so the result is SipHash-1-3 of the
/// concatenation of everything written, however it was split.
struct StableHasher(SipHasher13);

impl StableHasher {
    fn new() -> Self {
        StableHasher(SipHasher13::new_with_keys(SIP_KEY0, SIP_KEY1))
    }
}

impl Hasher for StableHasher {
    fn finish(&self) -> u64 {
        self.0.finish()
    }
    fn write(&mut self, bytes: &[u8]) {
        self.0.write(bytes);
    }
    fn write_u8(&mut self, n: u8) {
        self.write(&[n]);
    }
    fn write_u16(&mut self, n: u16) {
        self.write(&n.to_be_bytes());
    }
    fn write_u32(&mut self, n: u32) {
        self.write(&n.to_be_bytes());
    }
    fn write_u64(&mut self, n: u64) {
        self.write(&n.to_be_bytes());
    }
    fn write_u128(&mut self, n: u128) {
        self.write(&n.to_be_bytes());
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_i8(&mut self, n: i8) {
        self.write(&n.to_be_bytes());
    }
    fn write_i16(&mut self, n: i16) {
        self.write(&n.to_be_bytes());
    }
    fn write_i32(&mut self, n: i32) {
        self.write(&n.to_be_bytes());
    }
    fn write_i64(&mut self, n: i64) {
        self.write(&n.to_be_bytes());
    }
    fn write_i128(&mut self, n: i128) {
        self.write(&n.to_be_bytes());
    }
    fn write_isize(&mut self, n: isize) {
        self.write_i64(n as i64);
    }
}

/// The placement function for one member list.
///
/// Built from the current members; a membership change builds a new one
/// (cheap: it only holds the ids). Nothing about it depends on the order
/// the members were given in: they are deduplicated and kept sorted, and
/// ties between equal scores (practically never) are broken by node id.
pub struct Placement {
    nodes: RendezvousNodes<NodeId, PlacementHasher>,
}

impl Placement {
    /// A placement over `members` (duplicates are ignored).
    pub fn new(members: impl IntoIterator<Item = NodeId>) -> Self {
        let sorted: BTreeSet<NodeId> = members.into_iter().collect();
        let mut nodes = RendezvousNodes::new(PlacementHasher);
        // Inserted in id order and never removed, so `members()` yields
        // them sorted (the crate keeps insertion order until a remove).
        for node in sorted {
            let _ = nodes.insert(node);
        }
        Placement { nodes }
    }

    /// The members, in id order.
    pub fn members(&self) -> impl Iterator<Item = &NodeId> {
        self.nodes.iter()
    }

    /// How many members there are.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether there are no members (then every replica set is empty).
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether `node` is a member.
    pub fn contains(&self, node: &NodeId) -> bool {
        self.nodes.contains(node)
    }

    /// The replica set, best first (the first is the preferred leader): top
    /// min(r, members) nodes.
    ///
    /// `r = 0` gives an empty set; callers take R from
    /// [`replication_factor`], which is never 0.
    pub fn replicas(&self, key: &PlacementKey, r: usize) -> Vec<NodeId> {
        self.nodes.calc_candidates(&KeyBytes(key)).take(r).cloned().collect()
    }
}

impl Clone for Placement {
    fn clone(&self) -> Self {
        Placement::new(self.members().cloned())
    }
}

impl fmt::Debug for Placement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Placement").field("members", &self.members().collect::<Vec<_>>()).finish()
    }
}

/// `x-quorum-initial-group-size` (RabbitMQ's argument) → R, defaulting to
/// [`DEFAULT_REPLICAS`], at least 1.
///
/// Zero and negative values become 1 so a queue always has a home; checking
/// the argument at declare time is the declaring code's business. A value
/// above the member count is kept: [`Placement::replicas`] then returns every
/// member, and the queue gains replicas as nodes join, as RabbitMQ's initial
/// group size does when the cluster is smaller than asked.
pub fn replication_factor(arg: Option<i64>) -> usize {
    match arg {
        None => DEFAULT_REPLICAS,
        Some(n) if n < 1 => 1,
        Some(n) => usize::try_from(n).unwrap_or(usize::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The documented encoding, built by hand, independent of `KeyBytes`.
    fn documented_bytes(key: &PlacementKey, node: &NodeId) -> Vec<u8> {
        let mut out = Vec::new();
        for s in [&key.vhost, &key.name] {
            out.extend_from_slice(&(s.len() as u64).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        match key.partition {
            None => out.push(0),
            Some(i) => {
                out.push(1);
                out.extend_from_slice(&i.to_be_bytes());
            }
        }
        out.extend_from_slice(&(node.0.len() as u64).to_be_bytes());
        out.extend_from_slice(node.0.as_bytes());
        out
    }

    #[test]
    fn score_is_siphash13_of_the_documented_bytes() {
        let cases = [
            (PlacementKey::queue("/", "orders"), NodeId::from("node-a")),
            (PlacementKey::queue("", ""), NodeId::from("")),
            (PlacementKey::partition("prod", "events", 0), NodeId::from("n1")),
            (PlacementKey::partition("prod", "events", u32::MAX), NodeId::from("ünï")),
        ];
        for (key, node) in cases {
            let one_shot = SipHasher13::new_with_keys(SIP_KEY0, SIP_KEY1)
                .hash(&documented_bytes(&key, &node));
            assert_eq!(PlacementHasher.score(&key, &node), one_shot, "{key:?} {node:?}");
        }
    }

    #[test]
    fn keys_spell_sluice_placement() {
        let mut both = SIP_KEY0.to_be_bytes().to_vec();
        both.extend_from_slice(&SIP_KEY1.to_be_bytes());
        assert_eq!(both, b"sluice-placement");
    }

    #[test]
    fn stable_hasher_integers_are_big_endian_bytes() {
        fn of(f: impl FnOnce(&mut StableHasher)) -> u64 {
            let mut h = StableHasher::new();
            f(&mut h);
            h.finish()
        }
        let bytes = |b: &[u8]| of(|h| h.write(b));
        assert_eq!(of(|h| h.write_u8(0xab)), bytes(&[0xab]));
        assert_eq!(of(|h| h.write_u16(0x0102)), bytes(&[1, 2]));
        assert_eq!(of(|h| h.write_u32(0x0102_0304)), bytes(&[1, 2, 3, 4]));
        assert_eq!(of(|h| h.write_u64(0x0102_0304_0506_0708)), bytes(&[1, 2, 3, 4, 5, 6, 7, 8]));
        assert_eq!(of(|h| h.write_usize(0x0102)), bytes(&[0, 0, 0, 0, 0, 0, 1, 2]));
        assert_eq!(of(|h| h.write_i32(-2)), bytes(&[0xff, 0xff, 0xff, 0xfe]));
        assert_eq!(of(|h| h.write_isize(-1)), bytes(&[0xff; 8]));
    }

    #[test]
    fn stable_hasher_ignores_how_writes_are_split() {
        let data: Vec<u8> = (0u8..=40).collect();
        let mut whole = StableHasher::new();
        whole.write(&data);
        for split in [1, 3, 7, 8, 9, 17] {
            let mut parts = StableHasher::new();
            for chunk in data.chunks(split) {
                parts.write(chunk);
            }
            assert_eq!(parts.finish(), whole.finish(), "split {split}");
        }
    }

    #[test]
    fn length_prefixes_keep_fields_apart() {
        let node = NodeId::from("n");
        let a = PlacementHasher.score(&PlacementKey::queue("ab", "c"), &node);
        let b = PlacementHasher.score(&PlacementKey::queue("a", "bc"), &node);
        assert_ne!(a, b);
        let plain = PlacementHasher.score(&PlacementKey::queue("v", "q"), &node);
        let part0 = PlacementHasher.score(&PlacementKey::partition("v", "q", 0), &node);
        assert_ne!(plain, part0);
    }

    #[test]
    fn replication_factor_defaults_and_clamps() {
        assert_eq!(replication_factor(None), DEFAULT_REPLICAS);
        assert_eq!(replication_factor(Some(0)), 1);
        assert_eq!(replication_factor(Some(-5)), 1);
        assert_eq!(replication_factor(Some(i64::MIN)), 1);
        assert_eq!(replication_factor(Some(1)), 1);
        assert_eq!(replication_factor(Some(5)), 5);
        assert!(replication_factor(Some(i64::MAX)) >= 1);
    }

    #[test]
    fn members_are_sorted_and_deduplicated() {
        let p = Placement::new(["c", "a", "b", "a"].map(NodeId::from));
        let ids: Vec<&str> = p.members().map(NodeId::as_str).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(p.len(), 3);
        assert!(p.contains(&NodeId::from("b")));
        assert!(!p.contains(&NodeId::from("d")));
        let cloned = p.clone();
        assert_eq!(cloned.members().collect::<Vec<_>>(), p.members().collect::<Vec<_>>());
    }
}
