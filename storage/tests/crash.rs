//! The durability proof: a child process writes durable groups and prints
//! each acknowledged one; it is killed with SIGKILL mid-stream; after reopen
//! every acknowledged write must be there exactly once, in order, intact.
//!
//! The child is this same test binary, re-executed to run `crash_child`
//! with `SLUICE_STORAGE_CRASH_DIR` set (without it, `crash_child` is a no-op).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::payload;
use sluice_storage::{MessageRecord, Op, Store, StoreOptions};
use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const DIR_ENV: &str = "SLUICE_STORAGE_CRASH_DIR";
const QUEUES: u64 = 4;
const GROUP: u64 = 10;
const PAYLOAD: usize = 300;
const ROUNDS: usize = 3;
/// Acknowledged groups to see per round before pulling the plug.
const ACKS_BEFORE_KILL: usize = 400;

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(DIR_ENV) else { return };
    let store = Store::open(Path::new(&dir), StoreOptions::default()).expect("child: open");
    std::thread::scope(|s| {
        for q in 0..QUEUES {
            let store = store.clone();
            s.spawn(move || child_queue_loop(&store, q));
        }
    });
}

/// Appends durable groups of GROUP messages forever; every 5th group also
/// acks the oldest GROUP messages and moves the floor, atomically.
fn child_queue_loop(store: &Store, q: u64) {
    let mut floor = store.ack_floor(q).unwrap();
    let mut next = store.next_seq(q).unwrap();
    for i in 0u64.. {
        let ops = (next..next + GROUP)
            .map(|seq| Op::PutMessage { queue: q, seq, record: MessageRecord { persistent: true, data: payload(q, seq, PAYLOAD) } })
            .collect();
        store.write(ops, true).wait_blocking().unwrap();
        next += GROUP;
        println!("ACK {q} {}", next - 1);
        if i % 5 == 4 {
            let mut ops: Vec<Op> = (floor..floor + GROUP).map(|seq| Op::RemoveMessage { queue: q, seq }).collect();
            ops.push(Op::SetAckFloor { queue: q, floor: floor + GROUP });
            store.write(ops, true).wait_blocking().unwrap();
            floor += GROUP;
            println!("FLOOR {q} {floor}");
        }
    }
}

#[test]
fn kill_9_keeps_every_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    // Highest acknowledged appended seq and ack floor per queue, over all rounds.
    let mut acked_last: HashMap<u64, u64> = HashMap::new();
    let mut acked_floor: HashMap<u64, u64> = HashMap::new();
    for round in 0..ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(DIR_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });

        let mut record = |line: &str, acks: &mut usize| {
            let mut parts = line.split_whitespace();
            let (kind, q, v) = (parts.next(), parts.next(), parts.next());
            let (Some(q), Some(v)) = (q.and_then(|q| q.parse().ok()), v.and_then(|v| v.parse::<u64>().ok())) else { return };
            match kind {
                Some("ACK") => {
                    *acks += 1;
                    let e = acked_last.entry(q).or_default();
                    *e = (*e).max(v);
                }
                Some("FLOOR") => {
                    let e = acked_floor.entry(q).or_default();
                    *e = (*e).max(v);
                }
                _ => {}
            }
        };

        let deadline = Instant::now() + Duration::from_secs(120);
        let mut acks = 0;
        while acks < ACKS_BEFORE_KILL {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => record(&line, &mut acks),
                Err(e) => {
                    let _ = child.kill();
                    panic!("round {round}: child stopped acknowledging after {acks} acks: {e}");
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines already in the pipe were printed before the kill, so they
        // were acknowledged too.
        reader.join().unwrap();
        while let Ok(line) = rx.try_recv() {
            record(&line, &mut acks);
        }

        let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
        assert!(store.opened_after_crash(), "round {round}: a kill -9 not noticed");
        for q in 0..QUEUES {
            let last = acked_last[&q];
            let want_floor = acked_floor.get(&q).copied().unwrap_or(0);
            let floor = store.ack_floor(q).unwrap();
            assert!(floor >= want_floor, "round {round} q{q}: floor {floor} < acknowledged {want_floor}");
            assert!(floor <= last + 1, "round {round} q{q}: floor {floor} beyond data {last}");
            let scanned = store.scan_queue(q, 0).unwrap();
            let seqs: Vec<u64> = scanned.iter().map(|(s, _)| *s).collect();
            // Exactly once and without holes: floor, floor+1, ... (groups
            // of one queue are written one after another, so an unacknowledged
            // tail may exist, but never a gap).
            let expected: Vec<u64> = (floor..floor + seqs.len() as u64).collect();
            assert_eq!(seqs, expected, "round {round} q{q}: not a contiguous run from the floor");
            let top = seqs.last().copied().unwrap_or(floor.saturating_sub(1));
            assert!(top >= last, "round {round} q{q}: acknowledged seq {last} lost (have up to {top})");
            assert_eq!((top + 1) % GROUP, 0, "round {round} q{q}: torn group (atomicity)");
            for (seq, r) in &scanned {
                assert!(r.persistent);
                assert_eq!(r.data, payload(q, *seq, PAYLOAD), "round {round} q{q}: seq {seq} corrupt");
            }
            if floor > 0 {
                assert_eq!(store.get_message(q, floor - 1).unwrap(), None, "acked message below the floor resurfaced");
            }
            assert_eq!(store.next_seq(q).unwrap(), top + 1, "round {round} q{q}: next seq out of step with the data");
        }
        println!("round {round}: {acks} acks, last {acked_last:?}, floors {acked_floor:?}");
        store.close().unwrap();
    }
}
