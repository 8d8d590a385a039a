//! How much a node joining moves: for N = 3..=9 members, places 100,000
//! queues with R = 3, adds the (N+1)th node, and prints the fraction of
//! replica sets that changed and the fraction of individual replicas that
//! moved, next to the ideal (a rebalance that moves only what the new node
//! must take: R/(N+1) of the sets, 1/(N+1) of the replicas).
//!
//! `cargo run --release -p sluice-cluster --example placement_movement`
//! (the figures are in docs/cluster.md).

use std::time::Instant;

use sluice_cluster::placement::{NodeId, Placement, PlacementKey};

const KEYS: usize = 100_000;
const R: usize = 3;

fn main() {
    const VHOSTS: [&str; 3] = ["/", "prod", "staging"];
    let keys: Vec<PlacementKey> =
        (0..KEYS).map(|i| PlacementKey::queue(VHOSTS[i % 3], format!("queue-{i}"))).collect();
    let started = Instant::now();
    println!("{KEYS} queues, R = {R}; adding the (N+1)th node to N members");
    println!();
    println!("| N | sets changed | ideal R/(N+1) | replicas moved | ideal 1/(N+1) |");
    println!("|---|---|---|---|---|");
    for n in 3..=9usize {
        let members: Vec<NodeId> = (1..=n + 1).map(|i| NodeId(format!("sluice-{i}"))).collect();
        let before = Placement::new(members[..n].iter().cloned());
        let after = Placement::new(members.iter().cloned());
        let mut sets_changed = 0usize;
        let mut replicas_moved = 0usize;
        for key in &keys {
            let old = before.replicas(key, R);
            let new = after.replicas(key, R);
            // A replica "moved" when the new set holds it on a node that did
            // not hold one before (the data has to be copied there).
            let moved = new.iter().filter(|node| !old.contains(node)).count();
            if moved > 0 {
                sets_changed += 1;
            }
            replicas_moved += moved;
        }
        let total_replicas = (KEYS * R) as f64;
        println!(
            "| {n} | {:.4} | {:.4} | {:.4} | {:.4} |",
            sets_changed as f64 / KEYS as f64,
            R as f64 / (n + 1) as f64,
            replicas_moved as f64 / total_replicas,
            1.0 / (n + 1) as f64,
        );
    }
    println!();
    println!("({:.2} s)", started.elapsed().as_secs_f64());
}
