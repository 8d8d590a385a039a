//! Placement of queues on nodes: golden values, determinism, movement on
//! membership changes, balance.

use std::collections::{BTreeSet, HashMap};

use sluice_cluster::placement::{
    replication_factor, NodeId, Placement, PlacementHasher, PlacementKey, DEFAULT_REPLICAS,
};

fn ids(names: &[&str]) -> Vec<NodeId> {
    names.iter().map(|n| NodeId::from(*n)).collect()
}

fn names(nodes: &[NodeId]) -> Vec<&str> {
    nodes.iter().map(NodeId::as_str).collect()
}

/// `sluice-1` ..= `sluice-n`.
fn cluster(n: usize) -> Vec<NodeId> {
    (1..=n).map(|i| NodeId(format!("sluice-{i}"))).collect()
}

/// `count` queue keys spread over three vhosts.
fn queue_keys(count: usize) -> Vec<PlacementKey> {
    const VHOSTS: [&str; 3] = ["/", "prod", "staging"];
    (0..count).map(|i| PlacementKey::queue(VHOSTS[i % 3], format!("queue-{i}"))).collect()
}

const THREE: [&str; 3] = ["sluice-1", "sluice-2", "sluice-3"];
const FIVE: [&str; 5] = ["node-a", "node-b", "node-c", "node-d", "node-e"];
const SEVEN: [&str; 7] = [
    "rabbit@alpha",
    "rabbit@bravo",
    "rabbit@charlie",
    "rabbit@delta",
    "rabbit@echo",
    "rabbit@foxtrot",
    "rabbit@golf",
];

/// Golden placements: (vhost, name, partition, members, r) → replicas.
///
/// The expected lists were computed once with this implementation and
/// pasted here as literals. They are the guarantee that two nodes built by
/// different compilers, on different platforms, or from a later refactor of
/// this code, place every queue identically: a node that disagreed would
/// look for a queue's replicas on the wrong nodes. If this test fails, the
/// placement function changed; that is a cluster-breaking change, not a test
/// to update.
#[test]
fn golden_placements() {
    /// (vhost, queue, partition, members, replicas, expected replica set)
    type Row<'a> = (&'a str, &'a str, Option<u32>, &'a [&'a str], usize, &'a [&'a str]);
    #[rustfmt::skip]
    let table: Vec<Row> = vec![
        ("/", "orders", None, &THREE, 3, &["sluice-1", "sluice-2", "sluice-3"]),
        ("/", "orders", None, &FIVE, 3, &["node-e", "node-a", "node-b"]),
        ("/", "orders", None, &SEVEN, 3, &["rabbit@echo", "rabbit@bravo", "rabbit@charlie"]),
        ("/", "", None, &FIVE, 3, &["node-b", "node-d", "node-c"]),
        ("", "orders", None, &FIVE, 3, &["node-d", "node-b", "node-c"]),
        ("prod", "orders", None, &FIVE, 3, &["node-b", "node-c", "node-a"]),
        ("prod", "orders", Some(0), &FIVE, 3, &["node-e", "node-a", "node-c"]),
        ("prod", "orders", Some(1), &FIVE, 3, &["node-a", "node-c", "node-b"]),
        ("prod", "orders", Some(2), &FIVE, 3, &["node-d", "node-e", "node-a"]),
        ("prod", "orders", Some(u32::MAX), &FIVE, 3, &["node-c", "node-d", "node-b"]),
        ("prod", "amq.gen-JzTY20BRgKO-HjmUJj0wLg", None, &SEVEN, 5,
            &["rabbit@delta", "rabbit@echo", "rabbit@alpha", "rabbit@foxtrot", "rabbit@bravo"]),
        ("staging", "emails.retry", None, &SEVEN, 1, &["rabbit@delta"]),
        ("staging", "emails.retry", None, &SEVEN, 7,
            &["rabbit@delta", "rabbit@golf", "rabbit@foxtrot", "rabbit@charlie", "rabbit@echo",
              "rabbit@bravo", "rabbit@alpha"]),
        ("/", "résumé-队列", None, &THREE, 2, &["sluice-3", "sluice-1"]),
        ("vhost/with/slashes", "q", None, &FIVE, 3, &["node-a", "node-c", "node-d"]),
        ("/", "single", None, &["only"], 3, &["only"]),
        ("/", "pair", None, &["left", "right"], 3, &["right", "left"]),
        ("/", "events", Some(7), &SEVEN, 3, &["rabbit@echo", "rabbit@foxtrot", "rabbit@delta"]),
        ("/", "events", Some(8), &SEVEN, 3, &["rabbit@charlie", "rabbit@alpha", "rabbit@bravo"]),
        ("/", "events", Some(9), &SEVEN, 3, &["rabbit@echo", "rabbit@delta", "rabbit@bravo"]),
        // Same bytes concatenated, different split between vhost and name.
        ("/", "ab", None, &["n1", "n2", "n3", "n4"], 4, &["n3", "n4", "n1", "n2"]),
        ("/a", "b", None, &["n1", "n2", "n3", "n4"], 4, &["n4", "n1", "n3", "n2"]),
    ];
    for (vhost, name, partition, members, r, expected) in table {
        let key = PlacementKey { vhost: vhost.into(), name: name.into(), partition };
        let got = Placement::new(ids(members)).replicas(&key, r);
        assert_eq!(names(&got), expected, "{key:?} over {members:?}, r={r}");
    }
}

/// The score function itself, pinned: SipHash-1-3 with the fixed keys over
/// the documented byte encoding. Same reason as `golden_placements`.
#[test]
fn golden_scores() {
    let cases: [(&str, &str, Option<u32>, &str, u64); 5] = [
        ("/", "orders", None, "sluice-1", 0xb928_b73d_a008_f8aa),
        ("", "", None, "", 0x4bb9_23bd_bb97_0d21),
        ("prod", "events", Some(0), "node-a", 0x416b_570a_25a6_ac97),
        ("prod", "events", Some(u32::MAX), "rabbit@golf", 0x2ecc_a4a1_0c95_e40a),
        ("/", "résumé-队列", None, "ünï", 0x526c_c2c4_04be_bad6),
    ];
    for (vhost, name, partition, node, expected) in cases {
        let key = PlacementKey { vhost: vhost.into(), name: name.into(), partition };
        let got = PlacementHasher.score(&key, &NodeId::from(node));
        assert_eq!(got, expected, "{key:?} on {node:?}: got {got:#018x}");
    }
}

/// The replica list is the members sorted by score, best first.
#[test]
fn replicas_are_members_ranked_by_score() {
    let members = cluster(6);
    let placement = Placement::new(members.clone());
    for key in queue_keys(200) {
        let mut ranked = members.clone();
        ranked.sort_by_key(|n| std::cmp::Reverse(PlacementHasher.score(&key, n)));
        assert_eq!(placement.replicas(&key, members.len()), ranked, "{key:?}");
    }
}

#[test]
fn member_order_and_duplicates_do_not_matter() {
    let members = cluster(7);
    let forward = Placement::new(members.clone());
    let backward = Placement::new(members.iter().rev().cloned());
    let shuffled = Placement::new([3, 0, 6, 2, 5, 1, 4].map(|i| members[i].clone()));
    let doubled = Placement::new(members.iter().chain(members.iter()).cloned());
    for key in queue_keys(2_000) {
        let expected = forward.replicas(&key, 3);
        assert_eq!(backward.replicas(&key, 3), expected);
        assert_eq!(shuffled.replicas(&key, 3), expected);
        assert_eq!(doubled.replicas(&key, 3), expected);
    }
    assert_eq!(forward.members().collect::<Vec<_>>(), shuffled.members().collect::<Vec<_>>());
}

#[test]
fn replicas_are_distinct_members() {
    for n in 1..=9 {
        let placement = Placement::new(cluster(n));
        for key in queue_keys(500) {
            for r in 1..=4 {
                let replicas = placement.replicas(&key, r);
                assert_eq!(replicas.len(), r.min(n));
                let distinct: BTreeSet<&NodeId> = replicas.iter().collect();
                assert_eq!(distinct.len(), replicas.len(), "{key:?}: {replicas:?}");
                assert!(replicas.iter().all(|x| placement.contains(x)));
            }
        }
    }
}

/// A smaller R is a prefix of a larger one: growing a queue's group adds
/// replicas at the end and keeps the preferred leader.
#[test]
fn smaller_r_is_a_prefix() {
    let placement = Placement::new(cluster(8));
    for key in queue_keys(500) {
        let all = placement.replicas(&key, 8);
        for r in 0..=8 {
            assert_eq!(placement.replicas(&key, r), all[..r]);
        }
    }
}

#[test]
fn r_above_member_count_returns_every_member() {
    let members = cluster(4);
    let placement = Placement::new(members.clone());
    for key in queue_keys(100) {
        for r in [5, 100, usize::MAX, replication_factor(Some(i64::MAX))] {
            let got: BTreeSet<NodeId> = placement.replicas(&key, r).into_iter().collect();
            assert_eq!(got, members.iter().cloned().collect::<BTreeSet<_>>());
        }
    }
}

#[test]
fn r_zero_and_no_members() {
    let key = PlacementKey::queue("/", "q");
    assert!(Placement::new(cluster(3)).replicas(&key, 0).is_empty());
    let empty = Placement::new(Vec::new());
    assert!(empty.is_empty());
    assert!(empty.replicas(&key, 3).is_empty());
    // What callers use as R is never 0.
    for arg in [Some(0), Some(-1), Some(i64::MIN)] {
        assert_eq!(replication_factor(arg), 1);
        assert_eq!(Placement::new(cluster(3)).replicas(&key, replication_factor(arg)).len(), 1);
    }
    assert_eq!(replication_factor(None), DEFAULT_REPLICAS);
    assert_eq!(replication_factor(Some(5)), 5);
}

/// Partitions of one queue are placed independently: their leaders spread
/// over the members instead of all landing where the queue's name points.
#[test]
fn partitions_spread_independently() {
    let placement = Placement::new(cluster(5));
    let mut leaders: HashMap<NodeId, usize> = HashMap::new();
    for index in 0..1_000 {
        let key = PlacementKey::partition("/", "events", index);
        let leader = placement.replicas(&key, 1).remove(0);
        *leaders.entry(leader).or_default() += 1;
    }
    assert_eq!(leaders.len(), 5, "{leaders:?}");
    for (node, count) in &leaders {
        assert!((150..=250).contains(count), "{node}: {count} of 1000 partition leaders");
    }
}

const KEYS: usize = 100_000;
const R: usize = 3;

/// Adding the (N+1)th node changes a key's replica set only by putting the
/// new node in it in place of exactly one old node; the old nodes keep
/// their relative order, sets without the new node are unchanged (order
/// included), and the share of changed sets is close to R/(N+1).
#[test]
fn adding_a_node_only_moves_replicas_to_it() {
    let keys = queue_keys(KEYS);
    for n in 3..=9 {
        let members = cluster(n + 1);
        let newcomer = members[n].clone();
        let before = Placement::new(members[..n].iter().cloned());
        let after = Placement::new(members.iter().cloned());
        let mut changed = 0usize;
        for key in &keys {
            let old = before.replicas(key, R);
            let new = after.replicas(key, R);
            if !new.contains(&newcomer) {
                assert_eq!(new, old, "{key:?} changed without the new node");
                continue;
            }
            changed += 1;
            // Old set with one node replaced by the newcomer, the survivors
            // in their old order: no shuffling among old nodes.
            let survivors: Vec<&NodeId> = new.iter().filter(|x| **x != newcomer).collect();
            assert_eq!(survivors.len(), R - 1, "{key:?}: {new:?}");
            let kept: Vec<&NodeId> = old.iter().filter(|x| survivors.contains(x)).collect();
            assert_eq!(kept, survivors, "{key:?}: {old:?} -> {new:?}");
            // With rendezvous it is always the old R-th that makes room.
            assert_eq!(old[..R - 1].iter().collect::<Vec<_>>(), survivors, "{key:?}");
        }
        let fraction = changed as f64 / KEYS as f64;
        let ideal = R as f64 / (n + 1) as f64;
        // One standard deviation is about 0.0015 here; 0.01 is over 6.
        assert!((fraction - ideal).abs() < 0.01, "N={n}: {fraction:.4} of sets changed, ideal {ideal:.4}");
    }
}

/// Removing a node only moves the replicas that were on it: sets without it
/// are unchanged (order included); sets with it lose it, keep the others in
/// order, and gain one node that was not in the set.
#[test]
fn removing_a_node_only_moves_its_replicas() {
    let keys = queue_keys(KEYS);
    for n in 4..=10 {
        let members = cluster(n);
        // Not the last one added, to differ from the add test.
        let leaving = members[n / 2].clone();
        let before = Placement::new(members.iter().cloned());
        let after = Placement::new(members.iter().filter(|x| **x != leaving).cloned());
        let mut changed = 0usize;
        for key in &keys {
            let old = before.replicas(key, R);
            let new = after.replicas(key, R);
            assert!(!new.contains(&leaving));
            if !old.contains(&leaving) {
                assert_eq!(new, old, "{key:?} changed though {leaving} held no replica");
                continue;
            }
            changed += 1;
            let stayed: Vec<&NodeId> = old.iter().filter(|x| **x != leaving).collect();
            assert_eq!(new[..R - 1].iter().collect::<Vec<_>>(), stayed, "{key:?}");
            assert!(!old.contains(&new[R - 1]), "{key:?}: {old:?} -> {new:?}");
        }
        let fraction = changed as f64 / KEYS as f64;
        let ideal = R as f64 / n as f64;
        assert!((fraction - ideal).abs() < 0.01, "N={n}: {fraction:.4} of sets changed, ideal {ideal:.4}");
    }
}

/// Each of 5 nodes is the preferred leader of 1/5 of the queues within ±5%
/// (relative: 0.19..0.21), and holds a replica of 3/5 of them likewise.
#[test]
fn primaries_and_replicas_are_balanced() {
    let members = cluster(5);
    let placement = Placement::new(members.clone());
    let mut primaries: HashMap<NodeId, usize> = HashMap::new();
    let mut replicas: HashMap<NodeId, usize> = HashMap::new();
    for key in queue_keys(KEYS) {
        let set = placement.replicas(&key, R);
        *primaries.entry(set[0].clone()).or_default() += 1;
        for node in set {
            *replicas.entry(node).or_default() += 1;
        }
    }
    for node in &members {
        let primary = primaries.get(node).copied().unwrap_or(0) as f64 / KEYS as f64;
        assert!((primary - 0.2).abs() <= 0.2 * 0.05, "{node}: leads {primary:.4}");
        let replica = replicas.get(node).copied().unwrap_or(0) as f64 / KEYS as f64;
        assert!((replica - 0.6).abs() <= 0.6 * 0.05, "{node}: holds {replica:.4}");
    }
}
