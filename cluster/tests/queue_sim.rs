//! The deterministic simulation of a replicated queue with publishers and
//! consumers over many seeds (see `cluster/src/consensus/queue_sim.rs` for
//! the clients and invariants, `sim.rs` for the fault model).
//!
//! - `SIM_SEEDS=n` runs n seeds of 3 replicas (and n/3 of 5) instead of the
//!   defaults (120 and 40).
//! - `SIM_SEED=s [SIM_VOTERS=v] [SIM_TRACE=1]` replays one seed in the
//!   `replay` test and prints its report (and, on failure, its trace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use sluice_cluster::consensus::queue_sim::{self, QueueSimConfig, QueueSimReport};

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

fn seeds(default: u64, divisor: u64) -> u64 {
    env_u64("SIM_SEEDS").map_or(default, |n| (n / divisor).max(1))
}

/// Runs seeds `from..to` (offsets from a base that differs per group size)
/// and fails with every failing seed.
fn run_seeds(voters: usize, from: u64, to: u64) -> Vec<QueueSimReport> {
    let base = voters as u64 * 1_000_000;
    let count = to - from;
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for seed in base + from..base + to {
        let outcome =
            std::panic::catch_unwind(|| queue_sim::run(&QueueSimConfig::chaos(seed, voters)));
        match outcome {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(failure)) => failures.push(failure.to_string()),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                failures.push(format!(
                    "seed {seed} ({voters} voters) panicked: {message}\n  replay: SIM_SEED={seed} \
                     SIM_VOTERS={voters} SIM_TRACE=1 cargo test -p sluice-cluster --test queue_sim replay -- --nocapture"
                ));
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    if !failures.is_empty() {
        panic!(
            "{} of {count} seeds failed:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    summarize(voters, &reports, seconds);
    reports
}

fn summarize(voters: usize, reports: &[QueueSimReport], seconds: f64) {
    let sum = |f: fn(&QueueSimReport) -> u64| reports.iter().map(f).sum::<u64>();
    let max = |f: fn(&QueueSimReport) -> u64| reports.iter().map(f).max().unwrap_or(0);
    println!(
        "{voters} replicas: {} seeds, {} steps in {seconds:.1} s; raft: crashes {}, partitions {}, \
         leader terms {}, conf changes {}, restores {}, compactions {}, commands proposed {} / confirmed {}; \
         queue: published {}, confirmed {}, enqueue proposals {}, retried ids {}, dedup hits {}, \
         deliveries {} (redelivered {}), acks {}, requeues {}, undelivered checkouts {}, \
         resync requeued {}, attaches {}, backlog settles {}, gateway downs {}, channel closes {}, \
         leaderships {}, whole-state checks {}, max depth {}; settle phase max {} ticks",
        reports.len(),
        sum(|r| r.raft.steps),
        sum(|r| r.raft.crashes),
        sum(|r| r.raft.partitions),
        sum(|r| r.raft.leader_terms),
        sum(|r| r.raft.conf_changes),
        sum(|r| r.raft.restores),
        sum(|r| r.raft.compactions),
        sum(|r| r.raft.proposed),
        sum(|r| r.raft.confirmed),
        sum(|r| r.published),
        sum(|r| r.confirmed),
        sum(|r| r.publish_proposals),
        sum(|r| r.retried),
        sum(|r| r.dedup_hits),
        sum(|r| r.deliveries),
        sum(|r| r.redeliveries),
        sum(|r| r.acks),
        sum(|r| r.requeues),
        sum(|r| r.undelivered),
        sum(|r| r.resync_requeued),
        sum(|r| r.attaches),
        sum(|r| r.backlog_settles),
        sum(|r| r.gateway_downs),
        sum(|r| r.channel_closes),
        sum(|r| r.leaderships),
        sum(|r| r.state_checks),
        max(|r| r.max_depth),
        max(|r| r.raft.catch_up_ticks),
    );
}

// The 3-replica seeds are split in two tests so that both cores work.

#[test]
fn three_replicas_keep_every_queue_invariant_under_chaos_first_half() {
    let n = seeds(120, 1);
    let reports = run_seeds(3, 0, n / 2);
    assert!(reports
        .iter()
        .all(|r| r.confirmed > 0 && r.deliveries >= r.confirmed));
}

#[test]
fn three_replicas_keep_every_queue_invariant_under_chaos() {
    let n = seeds(120, 1);
    let reports = run_seeds(3, n / 2, n);
    let sum = |f: fn(&QueueSimReport) -> u64| reports.iter().map(f).sum::<u64>();
    // The interesting paths must actually have been taken.
    assert!(sum(|r| r.raft.crashes) > 0);
    assert!(sum(|r| r.raft.restores) > 0);
    assert!(sum(|r| r.dedup_hits) > 0);
    assert!(sum(|r| r.resync_requeued) > 0);
    assert!(sum(|r| r.redeliveries) > 0);
    assert!(sum(|r| r.gateway_downs) > 0);
    assert!(reports
        .iter()
        .all(|r| r.confirmed > 0 && r.deliveries >= r.confirmed));
}

#[test]
fn five_replicas_keep_every_queue_invariant_under_chaos() {
    let reports = run_seeds(5, 0, seeds(40, 3));
    assert!(reports.iter().all(|r| r.confirmed > 0));
}

#[test]
fn a_queue_seed_replays_identically() {
    let mut config = QueueSimConfig::chaos(42, 3);
    config.sim.fault_ticks = 120;
    let first = queue_sim::run(&config).unwrap_or_else(|failure| panic!("{failure}"));
    let second = queue_sim::run(&config).unwrap_or_else(|failure| panic!("{failure}"));
    assert_eq!(first, second);
}

/// Replays one seed given in the environment (does nothing without it).
#[test]
fn replay() {
    let Some(seed) = env_u64("SIM_SEED") else {
        return;
    };
    let voters = env_u64("SIM_VOTERS").unwrap_or(3) as usize;
    let mut config = QueueSimConfig::chaos(seed, voters);
    config.sim.trace = env_u64("SIM_TRACE") == Some(1);
    match queue_sim::run(&config) {
        Ok(report) => println!("{report:#?}"),
        Err(failure) => panic!("{failure}"),
    }
}
