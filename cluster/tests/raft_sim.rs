//! The deterministic Raft simulation over many seeds (see
//! `cluster/src/consensus/sim.rs` for the fault model and invariants).
//!
//! - `SIM_SEEDS=n` runs n seeds of the 3-replica test (and n/3 of the
//!   5-replica one) instead of the defaults.
//! - `SIM_SEED=s [SIM_VOTERS=v] [SIM_TRACE=1]` replays one seed in the
//!   `replay` test and prints its report (and, on failure, its trace).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use sluice_cluster::consensus::sim::{self, SimConfig, SimReport};
use sluice_cluster::consensus::GroupConfig;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|value| value.parse().ok())
}

fn seeds(default: u64, divisor: u64) -> u64 {
    env_u64("SIM_SEEDS").map_or(default, |n| (n / divisor).max(1))
}

/// Runs `count` seeds, starting at a base that differs per group size so the
/// two tests cover different seeds, and fails with every failing seed.
fn run_seeds(voters: usize, count: u64) -> Vec<SimReport> {
    let base = voters as u64 * 1_000_000;
    let started = Instant::now();
    let mut reports = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    for seed in base..base + count {
        // A panic (in raft-rs or the driver) is a failure of that seed too.
        let outcome = std::panic::catch_unwind(|| sim::run(&SimConfig::chaos(seed, voters)));
        match outcome {
            Ok(Ok(report)) => reports.push(report),
            Ok(Err(failure)) => failures.push(failure.to_string()),
            Err(panic) => failures.push(panic_failure(seed, voters, &*panic)),
        }
    }
    let elapsed = started.elapsed();
    if !failures.is_empty() {
        panic!("{} of {count} seeds failed:\n{}", failures.len(), failures.join("\n"));
    }
    summarize(voters, &reports, elapsed.as_secs_f64());
    reports
}

fn panic_failure(seed: u64, voters: usize, panic: &(dyn std::any::Any + Send)) -> String {
    let message = panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_default();
    format!(
        "seed {seed} ({voters} voters) panicked: {message}\n  replay: SIM_SEED={seed} \
         SIM_VOTERS={voters} SIM_TRACE=1 cargo test -p sluice-cluster --test raft_sim replay -- --nocapture"
    )
}

fn summarize(voters: usize, reports: &[SimReport], seconds: f64) {
    let sum = |f: fn(&SimReport) -> u64| reports.iter().map(f).sum::<u64>();
    let max = |f: fn(&SimReport) -> u64| reports.iter().map(f).max().unwrap_or(0);
    println!(
        "{voters} replicas: {} seeds, {} steps ({} ticks) in {seconds:.1} s; \
         proposed {}, confirmed {}, leadership lost {}, unanswered {}; \
         leader terms {}, crashes {}, partitions {}, conf changes {}, replicas added {} / removed {}, \
         restores {}, compactions {}; messages delivered {}, lost {}; \
         liveness after last fault: max {} ticks, catch-up max {} ticks",
        reports.len(),
        sum(|r| r.steps),
        sum(|r| r.steps) / sim::STEPS_PER_TICK,
        sum(|r| r.proposed),
        sum(|r| r.confirmed),
        sum(|r| r.leadership_lost),
        sum(|r| r.unanswered),
        sum(|r| r.leader_terms),
        sum(|r| r.crashes),
        sum(|r| r.partitions),
        sum(|r| r.conf_changes),
        sum(|r| r.replicas_added),
        sum(|r| r.replicas_removed),
        sum(|r| r.restores),
        sum(|r| r.compactions),
        sum(|r| r.delivered),
        sum(|r| r.lost),
        max(|r| r.liveness_ticks),
        max(|r| r.catch_up_ticks),
    );
}

#[test]
fn three_replicas_keep_every_invariant_under_chaos() {
    let reports = run_seeds(3, seeds(300, 1));
    // The faults must actually have happened.
    assert!(reports.iter().map(|r| r.crashes).sum::<u64>() > 0);
    assert!(reports.iter().map(|r| r.partitions).sum::<u64>() > 0);
    assert!(reports.iter().map(|r| r.replicas_removed).sum::<u64>() > 0);
    assert!(reports.iter().map(|r| r.restores).sum::<u64>() > 0);
    assert!(reports.iter().all(|r| r.confirmed > 0));
}

#[test]
fn five_replicas_keep_every_invariant_under_chaos() {
    let reports = run_seeds(5, seeds(100, 3));
    assert!(reports.iter().map(|r| r.replicas_removed).sum::<u64>() > 0);
    assert!(reports.iter().all(|r| r.confirmed > 0));
}

#[test]
fn a_seed_replays_identically() {
    let config = SimConfig { fault_ticks: 120, ..SimConfig::chaos(42, 3) };
    let first = sim::run(&config).unwrap_or_else(|failure| panic!("{failure}"));
    let second = sim::run(&config).unwrap_or_else(|failure| panic!("{failure}"));
    assert_eq!(first, second);
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank]
}

/// Crash the leader of a healthy group under load; report how long until a
/// new leader is elected and has committed in its term (it can confirm
/// publishes again).
#[test]
fn failover_ticks() {
    let defaults = GroupConfig::new(1);
    for voters in [3, 5] {
        let mut to_leader = Vec::new();
        let mut to_commit = Vec::new();
        for seed in 0..seeds(200, 5) {
            let config = SimConfig::failover(seed, voters);
            let sample =
                sim::measure_failover(&config).unwrap_or_else(|failure| panic!("{failure}"));
            to_leader.push(sample.ticks_to_leader);
            to_commit.push(sample.ticks_to_commit);
        }
        to_leader.sort_by(f64::total_cmp);
        to_commit.sort_by(f64::total_cmp);
        let line = |name: &str, v: &[f64]| {
            let points =
                [v[0], percentile(v, 0.5), percentile(v, 0.9), percentile(v, 0.99), v[v.len() - 1]];
            let ticks: Vec<String> = points.iter().map(|t| format!("{t:.1}")).collect();
            let ms: Vec<String> = points.iter().map(|t| format!("{:.0}", t * 50.0)).collect();
            format!(
                "{name}: min / median / p90 / p99 / max = {} ticks = {} ms at 50 ms ticks",
                ticks.join(" / "),
                ms.join(" / ")
            )
        };
        println!(
            "failover, {voters} replicas, election_tick {}, heartbeat_tick {}, {} leader crashes:\n  {}\n  {}",
            defaults.election_tick,
            defaults.heartbeat_tick,
            to_leader.len(),
            line("new leader", &to_leader),
            line("new leader committed", &to_commit)
        );
        // Well under 0.5 s at 50 ms ticks, for most crashes.
        assert!(percentile(&to_commit, 0.5) <= 6.0, "median failover too slow: {to_commit:?}");
        assert!(percentile(&to_commit, 0.9) < 10.0, "p90 failover too slow: {to_commit:?}");
    }
}

/// Replays one seed given in the environment (does nothing without it).
#[test]
fn replay() {
    let Some(seed) = env_u64("SIM_SEED") else {
        return;
    };
    let voters = env_u64("SIM_VOTERS").unwrap_or(3) as usize;
    let config =
        SimConfig { trace: env_u64("SIM_TRACE") == Some(1), ..SimConfig::chaos(seed, voters) };
    match sim::run(&config) {
        Ok(report) => println!("{report:#?}"),
        Err(failure) => panic!("{failure}"),
    }
}
