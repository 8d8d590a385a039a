//! `FjallLogStore`, the durable Raft log of one group on the shared fjall
//! `Store`: conformance with `MemLogStore` (the same checks on both, plus a
//! seeded differential run), truncation, compaction, reopen, a SIGKILL
//! crash, a real 3-replica group with restarts, and shared fsyncs.
//!
//! Everything runs on real fjall stores in temporary directories. The crash
//! child is this test binary, re-executed to run `crash_child` with
//! `SLUICE_FJALL_LOG_CRASH_DIR` set (without it, `crash_child` is a no-op).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use raft::eraftpb::{ConfState, Entry, HardState, Message, MessageType, Snapshot};
use sluice_cluster::consensus::{
    ApplyState, FjallLogStore, Group, GroupConfig, LogStore, LogStoreError, LogWrite, MemLogStore,
    Output, Payload, ProposalOutcome, SplitMix64,
};
use sluice_storage::{Op, Store, StoreOptions};

fn fast() -> StoreOptions {
    StoreOptions { sync: false, ..StoreOptions::default() }
}

fn open_store(dir: &Path, opts: StoreOptions) -> Store {
    Store::open(dir, opts).unwrap()
}

fn logger() -> slog::Logger {
    slog::Logger::root(slog::Discard, slog::o!())
}

fn entry(index: u64, term: u64) -> Entry {
    Entry { index, term, data: Bytes::from(vec![index as u8; 4]), ..Entry::default() }
}

fn entries(range: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
    range.map(|index| entry(index, term)).collect()
}

fn write(number: u64, entries: Vec<Entry>) -> LogWrite {
    LogWrite { number, entries, must_sync: true, ..LogWrite::default() }
}

fn snapshot_at(index: u64, term: u64, voters: &[u64], data: &'static [u8]) -> Snapshot {
    let mut snapshot = Snapshot { data: Bytes::from_static(data), ..Snapshot::default() };
    let metadata = snapshot.mut_metadata();
    metadata.index = index;
    metadata.term = term;
    metadata.set_conf_state(ConfState { voters: voters.to_vec(), ..ConfState::default() });
    snapshot
}

/// Everything a reader of a store can see, as one comparable value.
fn fingerprint<S: LogStore>(store: &S) -> String {
    let first = store.first_index();
    let last = store.last_index();
    let terms: Vec<_> =
        (first.saturating_sub(2)..=last + 1).map(|index| (index, store.term(index))).collect();
    format!(
        "hard state {:?}\napply state {:?}\nsnapshot {:?}\nfirst {first} last {last}\nterms {terms:?}\nentries {:?}",
        store.hard_state(),
        store.apply_state(),
        store.snapshot(),
        store.entries(first, last + 1, None),
    )
}

/// What the conformance checks need beyond `LogStore`.
trait Subject: LogStore + Sized {
    /// Makes every submitted write durable.
    fn sync_all(&mut self);
}

impl Subject for MemLogStore {
    fn sync_all(&mut self) {
        self.sync_through(u64::MAX).unwrap();
    }
}

impl Subject for FjallLogStore {
    fn sync_all(&mut self) {
        self.wait_idle_blocking().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Conformance: the checks of `MemLogStore`'s own tests (and a few more), run
// on both stores; the fjall one must also look the same after a reopen of
// the group and after a restart of the whole storage.
// ---------------------------------------------------------------------------

const CONFORMANCE_GROUP: u64 = 7;

fn run_on_both<F, G>(check_mem: F, check_fjall: G)
where
    F: FnOnce(MemLogStore) -> MemLogStore,
    G: FnOnce(FjallLogStore) -> FjallLogStore,
{
    let mem = check_mem(MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new()));
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), fast());
    let fjall =
        FjallLogStore::bootstrap(store.clone(), CONFORMANCE_GROUP, &[1, 2, 3], &[], Bytes::new())
            .unwrap();
    let fjall = check_fjall(fjall);
    let seen = fingerprint(&fjall);
    assert_eq!(seen, fingerprint(&mem), "fjall and mem stores differ");
    fjall.close().unwrap();
    let reopened = FjallLogStore::open(store.clone(), CONFORMANCE_GROUP).unwrap();
    assert_eq!(fingerprint(&reopened), seen, "group reopened from the store differs");
    drop(reopened);
    store.close().unwrap();
    drop(store);
    let store = open_store(dir.path(), fast());
    let restarted = FjallLogStore::open(store, CONFORMANCE_GROUP).unwrap();
    assert_eq!(fingerprint(&restarted), seen, "group after a storage restart differs");
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod conformance {
            $(
                #[test]
                fn $name() {
                    super::run_on_both(super::$name, super::$name);
                }
            )*
        }
    };
}

conformance!(
    bootstrap_store_starts_after_the_bootstrap_snapshot,
    pending_writes_are_readable_at_once,
    append_truncates_a_conflicting_suffix_and_refuses_gaps,
    compaction_keeps_later_entries_and_reports_compacted_reads,
    a_snapshot_newer_than_the_checkpoint_forces_a_restore,
    entries_respect_max_size_but_return_at_least_one,
    a_received_snapshot_replaces_the_log,
    hard_state_and_apply_state_are_kept,
    refused_writes_change_nothing,
);

fn bootstrap_store_starts_after_the_bootstrap_snapshot<S: Subject>(store: S) -> S {
    assert_eq!(store.first_index(), 2);
    assert_eq!(store.last_index(), 1);
    assert_eq!(store.term(1), Ok(1));
    assert!(matches!(store.term(0), Err(LogStoreError::Compacted { .. })));
    assert!(matches!(store.term(2), Err(LogStoreError::Unavailable { .. })));
    assert_eq!(store.apply_state().index, 1);
    assert_eq!(store.apply_state().conf_state.voters, vec![1, 2, 3]);
    assert_eq!(store.snapshot_metadata().index, 1);
    assert_eq!(store.hard_state().commit, 1);
    assert_eq!(store.entries(2, 2, None), Ok(Vec::new()));
    // Opening a group on it does not ask for a restore.
    let mut group = Group::open(&GroupConfig::new(1), store, &logger()).unwrap();
    assert!(group.ready().unwrap().restore.is_none());
    assert_eq!(group.applied().index, 1);
    group.into_store()
}

fn pending_writes_are_readable_at_once<S: Subject>(mut store: S) -> S {
    store.submit(write(1, vec![entry(2, 2), entry(3, 2)])).unwrap();
    store.submit(write(2, vec![entry(4, 2)])).unwrap();
    assert_eq!(store.last_index(), 4);
    assert_eq!(store.entries(2, 5, None).unwrap(), vec![entry(2, 2), entry(3, 2), entry(4, 2)]);
    assert_eq!(store.term(4), Ok(2));
    store.sync_all();
    assert_eq!(store.entries(2, 5, None).unwrap().len(), 3);
    store
}

fn append_truncates_a_conflicting_suffix_and_refuses_gaps<S: Subject>(mut store: S) -> S {
    store.submit(write(1, vec![entry(2, 2), entry(3, 2), entry(4, 2)])).unwrap();
    store.submit(write(2, vec![entry(3, 3)])).unwrap();
    assert_eq!(store.last_index(), 3);
    assert_eq!(store.term(3), Ok(3));
    let gap = store.submit(write(3, vec![entry(9, 3)]));
    assert!(matches!(gap, Err(LogStoreError::Detached { first: 9, .. })), "{gap:?}");
    let hole = store.submit(write(4, vec![entry(4, 3), entry(6, 3)]));
    assert!(matches!(hole, Err(LogStoreError::NotConsecutive { index: 5 })), "{hole:?}");
    store.sync_all();
    assert_eq!(store.entries(2, 4, None).unwrap(), vec![entry(2, 2), entry(3, 3)]);
    store
}

fn compaction_keeps_later_entries_and_reports_compacted_reads<S: Subject>(mut store: S) -> S {
    store.submit(write(1, vec![entry(2, 2), entry(3, 2), entry(4, 2)])).unwrap();
    store.sync_all();
    let mut snapshot = Snapshot::default();
    snapshot.mut_metadata().index = 3;
    snapshot.mut_metadata().term = 2;
    store.compact(snapshot).unwrap();
    assert_eq!(store.first_index(), 4);
    assert_eq!(store.term(3), Ok(2));
    assert!(matches!(store.term(2), Err(LogStoreError::Compacted { .. })));
    assert!(matches!(store.entries(2, 5, None), Err(LogStoreError::Compacted { .. })));
    assert_eq!(store.entries(4, 5, None).unwrap().len(), 1);
    let mut wrong = Snapshot::default();
    wrong.mut_metadata().index = 4;
    wrong.mut_metadata().term = 9;
    assert!(matches!(store.compact(wrong), Err(LogStoreError::BadCompaction { .. })));
    let mut beyond = Snapshot::default();
    beyond.mut_metadata().index = 9;
    beyond.mut_metadata().term = 2;
    assert!(matches!(store.compact(beyond), Err(LogStoreError::BadCompaction { .. })));
    // Not newer: ignored.
    let mut older = Snapshot::default();
    older.mut_metadata().index = 2;
    older.mut_metadata().term = 2;
    store.compact(older).unwrap();
    assert_eq!(store.first_index(), 4);
    store
}

fn a_snapshot_newer_than_the_checkpoint_forces_a_restore<S: Subject>(mut store: S) -> S {
    store.submit(write(1, vec![entry(2, 2), entry(3, 2)])).unwrap();
    store.sync_all();
    store.compact(snapshot_at(3, 2, &[1, 2, 3], b"state at 3")).unwrap();
    store.sync_all();
    let mut group = Group::open(&GroupConfig::new(1), store, &logger()).unwrap();
    let out = group.ready().unwrap();
    let restore = out.restore.expect("a restore at open");
    assert_eq!(restore.get_metadata().index, 3);
    assert_eq!(restore.data, Bytes::from_static(b"state at 3"));
    assert_eq!(group.applied().index, 3);
    // The commit index lagged (no hard state was written) and was raised.
    assert!(group.commit_index() >= 3);
    group.into_store()
}

fn entries_respect_max_size_but_return_at_least_one<S: Subject>(mut store: S) -> S {
    store.submit(write(1, vec![entry(2, 2), entry(3, 2), entry(4, 2)])).unwrap();
    let check = |store: &S| {
        assert_eq!(store.entries(2, 5, Some(0)).unwrap().len(), 1);
        assert_eq!(store.entries(2, 5, None).unwrap().len(), 3);
        let one = u64::from(protobuf::Message::compute_size(&entry(2, 2)));
        assert_eq!(store.entries(2, 5, Some(2 * one)).unwrap().len(), 2);
        assert_eq!(store.entries(2, 5, Some(2 * one - 1)).unwrap().len(), 1);
        assert_eq!(store.entries(2, 5, Some(u64::MAX)).unwrap().len(), 3);
        assert!(matches!(store.entries(2, 9, None), Err(LogStoreError::Unavailable { .. })));
    };
    check(&store);
    store.sync_all();
    check(&store);
    store
}

fn a_received_snapshot_replaces_the_log<S: Subject>(mut store: S) -> S {
    store.submit(write(1, entries(2..=5, 2))).unwrap();
    let received = LogWrite {
        number: 2,
        snapshot: Some(snapshot_at(10, 3, &[1, 2, 3], b"leader state")),
        entries: entries(11..=12, 3),
        must_sync: true,
        ..LogWrite::default()
    };
    store.submit(received).unwrap();
    let check = |store: &S| {
        assert_eq!(store.first_index(), 11);
        assert_eq!(store.last_index(), 12);
        assert_eq!(store.term(10), Ok(3));
        assert!(matches!(store.term(5), Err(LogStoreError::Compacted { .. })));
        assert!(store.hard_state().commit >= 10);
        assert!(store.hard_state().term >= 3);
        assert_eq!(store.snapshot().unwrap().data, Bytes::from_static(b"leader state"));
        assert_eq!(store.entries(11, 13, None).unwrap(), entries(11..=12, 3));
    };
    check(&store);
    store.sync_all();
    check(&store);
    store
}

fn hard_state_and_apply_state_are_kept<S: Subject>(mut store: S) -> S {
    store.submit(write(1, entries(2..=4, 2))).unwrap();
    let hard_state = HardState { term: 2, vote: 3, commit: 3, ..HardState::default() };
    store
        .submit(LogWrite {
            number: 2,
            hard_state: Some(hard_state.clone()),
            must_sync: false,
            ..LogWrite::default()
        })
        .unwrap();
    assert_eq!(store.hard_state(), hard_state);
    let conf_state = ConfState { voters: vec![1, 2, 3], learners: vec![4], ..ConfState::default() };
    let applied = ApplyState { index: 3, term: 2, conf_state };
    store.save_apply_state(&applied).unwrap();
    assert_eq!(store.apply_state(), applied);
    store.sync_all();
    store
}

fn refused_writes_change_nothing<S: Subject>(mut store: S) -> S {
    store.submit(write(1, entries(2..=4, 2))).unwrap();
    let before = fingerprint(&store);
    let detached = LogWrite {
        number: 2,
        hard_state: Some(HardState { term: 9, ..HardState::default() }),
        entries: entries(7..=8, 9),
        must_sync: true,
        ..LogWrite::default()
    };
    assert!(store.submit(detached).is_err());
    assert!(store.submit(write(3, vec![entry(1, 1)])).is_err());
    assert!(store.submit(write(4, vec![entry(5, 2), entry(5, 2)])).is_err());
    assert_eq!(fingerprint(&store), before);
    store
}

// ---------------------------------------------------------------------------
// Differential: random writes, compactions, received snapshots, checkpoints
// and reopens applied to both stores; every read must agree after each step.
// ---------------------------------------------------------------------------

struct Differential {
    rng: SplitMix64,
    mem: MemLogStore,
    fjall: Option<FjallLogStore>,
    store: Option<Store>,
    dir: tempfile::TempDir,
    number: u64,
    top_term: u64,
}

impl Differential {
    fn fjall(&mut self) -> &mut FjallLogStore {
        self.fjall.as_mut().unwrap()
    }

    fn sync(&mut self) {
        self.mem.sync_through(u64::MAX).unwrap();
        self.fjall().wait_idle_blocking().unwrap();
    }

    fn random_entries(&mut self, first: u64, count: u64, term: u64) -> Vec<Entry> {
        (first..first + count)
            .map(|index| {
                let mut entry = entry(index, term);
                let len = self.rng.below(40) as usize;
                entry.data = Bytes::from(vec![self.rng.below(256) as u8; len]);
                entry
            })
            .collect()
    }

    fn submit_both(&mut self, write: LogWrite) {
        let mem = self.mem.submit(write.clone());
        let fjall = self.fjall().submit(write);
        assert_eq!(mem, fjall, "submit results differ");
    }

    fn step(&mut self) {
        self.number += 1;
        let number = self.number;
        let first = self.mem.first_index();
        let last = self.mem.last_index();
        match self.rng.below(100) {
            0..=44 => {
                let start = if self.rng.chance(700) || last < first {
                    last + 1
                } else {
                    self.rng.range(first, last + 2)
                };
                if start < last + 1 || self.rng.chance(100) {
                    self.top_term += 1;
                }
                let count = self.rng.range(1, 6);
                let entries = self.random_entries(start, count, self.top_term);
                let hard_state = self.rng.chance(300).then(|| HardState {
                    term: self.top_term,
                    vote: self.rng.below(4),
                    commit: self.rng.below(start + count),
                    ..HardState::default()
                });
                let must_sync = self.rng.chance(800);
                self.submit_both(LogWrite {
                    number,
                    hard_state,
                    snapshot: None,
                    entries,
                    must_sync,
                });
            }
            45..=54 => {
                let hard_state = HardState {
                    term: self.top_term,
                    vote: self.rng.below(4),
                    commit: self.rng.below(last + 1),
                    ..HardState::default()
                };
                let must_sync = self.rng.chance(500);
                self.submit_both(LogWrite {
                    number,
                    hard_state: Some(hard_state),
                    must_sync,
                    ..LogWrite::default()
                });
            }
            55..=61 => {
                // Refused appends: detached, or not consecutive.
                let entries = if self.rng.chance(500) {
                    let start = last + 2 + self.rng.below(3);
                    self.random_entries(start, 2, self.top_term)
                } else {
                    let mut entries = self.random_entries(last + 1, 3, self.top_term);
                    entries[2].index += 1;
                    entries
                };
                self.submit_both(LogWrite {
                    number,
                    entries,
                    must_sync: true,
                    ..LogWrite::default()
                });
            }
            62..=69 => {
                let snapshot_index = self.mem.snapshot_metadata().index;
                let index = self.rng.range(snapshot_index, last + 6);
                self.top_term += self.rng.below(2);
                let mut snapshot = snapshot_at(index, self.top_term, &[1, 2, 3], b"");
                snapshot.data = Bytes::from(format!("received {number}"));
                let count = self.rng.below(4);
                let entries = self.random_entries(index + 1, count, self.top_term);
                let must_sync = true;
                self.submit_both(LogWrite {
                    number,
                    hard_state: None,
                    snapshot: Some(snapshot),
                    entries,
                    must_sync,
                });
            }
            70..=79 => {
                // Compaction covers applied, hence durable, entries.
                self.sync();
                let snapshot_index = self.mem.snapshot_metadata().index;
                let index = self.rng.range(snapshot_index, last + 3);
                let term = match self.mem.term(index) {
                    Ok(term) if self.rng.chance(900) => term,
                    _ => self.rng.range(1, self.top_term + 2),
                };
                let mut snapshot = snapshot_at(index, term, &[1, 2, 3], b"");
                snapshot.data = Bytes::from(format!("local {number}"));
                let mem = self.mem.compact(snapshot.clone());
                let fjall = self.fjall().compact(snapshot);
                assert_eq!(mem, fjall, "compact results differ");
            }
            80..=87 => {
                let voters = vec![1, 2, self.rng.range(3, 6)];
                let conf_state = ConfState { voters, ..ConfState::default() };
                let state =
                    ApplyState { index: self.rng.below(last + 1), term: self.top_term, conf_state };
                self.mem.save_apply_state(&state).unwrap();
                self.fjall().save_apply_state(&state).unwrap();
            }
            88..=93 => {
                // Restart: the group, or the whole storage.
                self.sync();
                self.mem.crash();
                self.fjall.take().unwrap().close().unwrap();
                if self.rng.chance(400) {
                    let store = self.store.take().unwrap();
                    store.close().unwrap();
                    drop(store);
                    self.store = Some(open_store(self.dir.path(), fast()));
                }
                let store = self.store.clone().unwrap();
                self.fjall = Some(FjallLogStore::open(store, CONFORMANCE_GROUP).unwrap());
            }
            _ => {
                if let Some(number) = self.fjall().poll_persisted().unwrap() {
                    self.mem.sync_through(number).unwrap();
                }
            }
        }
    }

    fn compare(&mut self) {
        let fjall = self.fjall.as_ref().unwrap();
        assert_eq!(fingerprint(fjall), fingerprint(&self.mem));
        let first = self.mem.first_index();
        let last = self.mem.last_index();
        for _ in 0..3 {
            let low = self.rng.range(first.saturating_sub(2), last + 2);
            let high = self.rng.range(low, last + 3);
            let max_size = match self.rng.below(3) {
                0 => None,
                1 => Some(self.rng.below(60)),
                _ => Some(self.rng.below(400)),
            };
            assert_eq!(
                fjall.entries(low, high, max_size),
                self.mem.entries(low, high, max_size),
                "entries({low}, {high}, {max_size:?})"
            );
        }
    }
}

#[test]
fn differential_against_mem_log_store() {
    let seeds: u64 =
        std::env::var("FJALL_LOG_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(12);
    for seed in 0..seeds {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(dir.path(), fast());
        let fjall = FjallLogStore::bootstrap(
            store.clone(),
            CONFORMANCE_GROUP,
            &[1, 2, 3],
            &[],
            Bytes::new(),
        )
        .unwrap();
        let mut run = Differential {
            rng: SplitMix64::new(seed),
            mem: MemLogStore::bootstrap(&[1, 2, 3], &[], Bytes::new()),
            fjall: Some(fjall),
            store: Some(store),
            dir,
            number: 0,
            top_term: 1,
        };
        for step in 0..250 {
            run.step();
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run.compare()));
            if let Err(panic) = outcome {
                eprintln!("seed {seed} diverged at step {step}");
                std::panic::resume_unwind(panic);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Specific behaviour on disk.
// ---------------------------------------------------------------------------

#[test]
fn a_conflicting_tail_is_truncated_on_disk_in_the_same_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), fast());
    let group = 3;
    let mut log = FjallLogStore::bootstrap(store.clone(), group, &[1], &[], Bytes::new()).unwrap();
    log.submit(write(1, entries(2..=10, 2))).unwrap();
    log.wait_idle_blocking().unwrap();
    let writes_before = store.stats().writes;
    // A new leader's entries from index 6 replace 6..=10, with a new hard state.
    let replace = LogWrite {
        number: 2,
        hard_state: Some(HardState { term: 3, vote: 2, commit: 5, ..HardState::default() }),
        entries: entries(6..=7, 3),
        must_sync: true,
        ..LogWrite::default()
    };
    log.submit(replace).unwrap();
    assert_eq!(log.last_index(), 7);
    assert_eq!(log.term(6), Ok(3));
    assert_eq!(log.term(5), Ok(2));
    assert_eq!(log.wait_idle_blocking().unwrap(), Some(2));
    assert_eq!(store.stats().writes - writes_before, 1, "one LogWrite = one storage write");
    let raw: Vec<u64> = store.log_entries(group, 0, 100).unwrap().iter().map(|(i, _)| *i).collect();
    assert_eq!(raw, (2..=7).collect::<Vec<_>>(), "the old tail is gone from disk");

    // Overlapping writes in flight: each later one truncates the earlier.
    log.submit(write(3, entries(8..=20, 3))).unwrap();
    log.submit(write(4, entries(15..=16, 4))).unwrap();
    log.submit(write(5, entries(16..=18, 5))).unwrap();
    let expect = |log: &FjallLogStore| {
        assert_eq!(log.last_index(), 18);
        let got = log.entries(2, 19, None).unwrap();
        let terms: Vec<u64> = got.iter().map(|e| e.term).collect();
        // 2..=5 term 2, 6..=14 term 3 (6..=7, then 8..=14 of the write cut
        // at 15), 15 term 4, 16..=18 term 5.
        let mut want = vec![2; 4];
        want.extend([3; 9]);
        want.extend([4]);
        want.extend([5; 3]);
        assert_eq!(terms, want);
    };
    expect(&log);
    log.wait_idle_blocking().unwrap();
    expect(&log);
    log.close().unwrap();
    store.close().unwrap();
    drop(store);
    let store = open_store(dir.path(), fast());
    let log = FjallLogStore::open(store.clone(), group).unwrap();
    expect(&log);
    assert_eq!(log.hard_state().term, 3);
    let raw = store.log_entries(group, 0, 100).unwrap();
    assert_eq!(raw.last().map(|(i, _)| *i), Some(18));
}

#[test]
fn compaction_answers_the_boundary_term_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), fast());
    let group = 11;
    let mut log = FjallLogStore::bootstrap(store.clone(), group, &[1], &[], Bytes::new()).unwrap();
    log.submit(write(1, entries(2..=10, 2))).unwrap();
    log.submit(write(2, entries(11..=20, 3))).unwrap();
    log.wait_idle_blocking().unwrap();
    // Compact exactly at the last entry of term 2.
    log.compact(snapshot_at(10, 2, &[1], b"at 10")).unwrap();
    assert_eq!(log.first_index(), 11);
    assert_eq!(log.term(10), Ok(2), "raft-rs asks term(first_index - 1)");
    assert_eq!(log.term(11), Ok(3));
    assert!(matches!(log.term(9), Err(LogStoreError::Compacted { index: 9, first: 11 })));
    assert!(matches!(log.entries(10, 12, None), Err(LogStoreError::Compacted { .. })));
    // And again inside term 3, while an append is in flight.
    log.submit(write(3, entries(21..=22, 3))).unwrap();
    log.compact(snapshot_at(15, 3, &[1], b"at 15")).unwrap();
    assert_eq!(log.first_index(), 16);
    assert_eq!(log.term(15), Ok(3));
    assert_eq!(log.entries(16, 23, None).unwrap().len(), 7);
    log.close().unwrap();
    assert_eq!(store.log_first_index(group).unwrap(), 16, "storage first index");
    assert!(store.log_entries(group, 0, 16).unwrap().is_empty(), "compacted entries are gone");
    store.close().unwrap();
    drop(store);

    let store = open_store(dir.path(), fast());
    let log = FjallLogStore::open(store, group).unwrap();
    assert_eq!(log.first_index(), 16);
    assert_eq!(log.last_index(), 22);
    assert_eq!(log.term(15), Ok(3));
    assert_eq!(log.snapshot().unwrap().data, Bytes::from_static(b"at 15"));
    assert_eq!(log.entries(16, 23, None).unwrap(), entries(16..=22, 3));
}

#[test]
fn reopen_after_close_recovers_everything() {
    let dir = tempfile::tempdir().unwrap();
    let group = 99;
    let store = open_store(dir.path(), StoreOptions::default());
    let mut log = FjallLogStore::bootstrap(
        store.clone(),
        group,
        &[1, 2],
        &[3],
        Bytes::from_static(b"initial"),
    )
    .unwrap();
    log.submit(write(1, entries(2..=30, 2))).unwrap();
    log.submit(LogWrite {
        number: 2,
        hard_state: Some(HardState { term: 4, vote: 2, commit: 25, ..HardState::default() }),
        entries: entries(28..=33, 4),
        must_sync: true,
        ..LogWrite::default()
    })
    .unwrap();
    log.wait_idle_blocking().unwrap();
    let conf_state = ConfState { voters: vec![1, 2], learners: vec![3], ..ConfState::default() };
    log.save_apply_state_with(
        &ApplyState { index: 25, term: 4, conf_state: conf_state.clone() },
        vec![Op::PutMeta { key: b"sm/99".to_vec(), value: b"state at 25".to_vec() }],
    )
    .unwrap();
    let mut snapshot = snapshot_at(20, 2, &[1, 2], b"state at 20");
    snapshot.mut_metadata().set_conf_state(conf_state.clone());
    log.compact(snapshot).unwrap();
    let before = fingerprint(&log);
    assert_eq!(log.close().unwrap(), Some(2));
    store.close().unwrap();
    drop(store);

    let store = open_store(dir.path(), StoreOptions::default());
    let log = FjallLogStore::open(store.clone(), group).unwrap();
    assert_eq!(fingerprint(&log), before);
    assert_eq!(
        log.hard_state(),
        HardState { term: 4, vote: 2, commit: 25, ..HardState::default() }
    );
    assert_eq!(log.apply_state().index, 25);
    assert_eq!(log.apply_state().conf_state, conf_state);
    assert_eq!(log.snapshot_metadata().get_conf_state(), &conf_state);
    assert_eq!((log.first_index(), log.last_index()), (21, 33));
    assert_eq!(
        store.list_meta(b"sm/99").unwrap(),
        vec![(b"sm/99".to_vec(), b"state at 25".to_vec())]
    );
    // A group opens on it and resumes after the checkpoint.
    let group = Group::open(&GroupConfig::new(1), log, &logger()).unwrap();
    assert_eq!(group.applied().index, 25);
    assert_eq!(group.last_index(), 33);
    assert!(!FjallLogStore::exists(&store, 100).unwrap());
    assert!(matches!(
        FjallLogStore::bootstrap(store.clone(), 99, &[1], &[], Bytes::new()),
        Err(sluice_cluster::consensus::FjallLogStoreError::AlreadyExists { group: 99 })
    ));
}

#[test]
fn durability_is_reported_in_submission_order() {
    // What the store relies on: the storage settles the writes of one
    // submitter in order, so the settled ones always form a prefix.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), StoreOptions::default());
    let mut tracked = Vec::new();
    for i in 0..2000u64 {
        let op = Op::LogAppend { log: 1, index: i + 1, data: Bytes::from(vec![1; 64]) };
        tracked.push(store.write_tracked(vec![op], i % 3 != 0).1);
        if i % 97 == 0 {
            // Read newest first: the writer settles oldest first, so a
            // settled write seen here implies every older one reads settled.
            let mut settled: Vec<bool> = tracked.iter().rev().map(|a| a.is_settled()).collect();
            settled.reverse();
            let prefix = settled.iter().take_while(|s| **s).count();
            assert!(settled[prefix..].iter().all(|s| !*s), "settled out of order at {i}");
        }
    }
    store.flush().unwrap();
    assert!(tracked.iter().all(|a| a.is_applied()));

    // And the log store reports numbers in order, never skipping back.
    let mut log = FjallLogStore::bootstrap(store.clone(), 2, &[1], &[], Bytes::new()).unwrap();
    let mut reported = Vec::new();
    for number in 1..=300u64 {
        let write = LogWrite {
            number,
            entries: vec![entry(number + 1, 2)],
            must_sync: number % 4 != 0,
            ..LogWrite::default()
        };
        log.submit(write).unwrap();
        if let Some(n) = log.poll_persisted().unwrap() {
            reported.push(n);
        }
    }
    while let Some(n) = log.wait_persisted_blocking().unwrap() {
        reported.push(n);
    }
    assert!(reported.windows(2).all(|w| w[0] < w[1]), "{reported:?}");
    assert_eq!(reported.last(), Some(&300));
    assert_eq!(log.in_flight(), 0);
}

#[test]
fn wait_persisted_is_async_and_cancel_safe() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), StoreOptions::default());
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    runtime.block_on(async move {
        let mut log = FjallLogStore::bootstrap(store.clone(), 5, &[1], &[], Bytes::new()).unwrap();
        for number in 1..=50u64 {
            log.submit(write(number, vec![entry(number + 1, 2)])).unwrap();
            // Cancel a wait right away now and then: nothing is lost.
            if number % 5 == 0 {
                let _ = tokio::time::timeout(Duration::from_micros(1), log.wait_persisted()).await;
            }
        }
        let mut last = None;
        while log.in_flight() > 0 {
            if let Some(n) = log.wait_persisted().await.unwrap() {
                last = Some(n);
            }
        }
        assert_eq!(log.durable_number(), Some(50));
        assert!(last.is_none_or(|n| n <= 50));
        assert_eq!(log.wait_persisted().await.unwrap(), None);
        // Compaction and checkpoints do not block inside the runtime.
        log.compact(snapshot_at(40, 2, &[1], b"x")).unwrap();
        log.save_apply_state(&ApplyState { index: 40, term: 2, ..ApplyState::default() }).unwrap();
        while log.in_flight() > 0 {
            log.wait_persisted().await.unwrap();
        }
        assert_eq!(log.first_index(), 41);
    });
}

// ---------------------------------------------------------------------------
// Crash: a child appends durable entries and prints each index once its
// durability is reported; it is killed with SIGKILL, and every printed index
// must be there, intact, with no hole.
// ---------------------------------------------------------------------------

const CRASH_DIR_ENV: &str = "SLUICE_FJALL_LOG_CRASH_DIR";
const CRASH_GROUPS: u64 = 4;
const CRASH_ROUNDS: usize = 3;
const CRASH_LINES_BEFORE_KILL: usize = 600;
const CRASH_PAYLOAD: usize = 200;

fn crash_payload(group: u64, index: u64, term: u64) -> Bytes {
    let seed = format!("g{group} i{index} t{term}|");
    Bytes::from(seed.bytes().cycle().take(CRASH_PAYLOAD).collect::<Vec<u8>>())
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CRASH_DIR_ENV) else { return };
    let store = open_store(Path::new(&dir), StoreOptions::default());
    std::thread::scope(|s| {
        for group in 0..CRASH_GROUPS {
            let store = store.clone();
            s.spawn(move || crash_child_group(store, group));
        }
    });
}

/// Appends forever with up to 8 writes in flight: durable writes of 1–4
/// entries carrying the hard state, now and then a non-durable commit-only
/// write, and every 50 writes a compaction. Prints `DURABLE group index
/// term` for every entry whose write was reported durable.
fn crash_child_group(store: Store, group: u64) {
    let mut log = if FjallLogStore::exists(&store, group).unwrap() {
        FjallLogStore::open(store, group).unwrap()
    } else {
        FjallLogStore::bootstrap(store, group, &[1], &[], Bytes::from_static(b"boot")).unwrap()
    };
    let term = log.hard_state().term + 1;
    let mut next = log.last_index() + 1;
    let mut durable_last = log.last_index();
    let mut writes: BTreeMap<u64, Option<(u64, u64)>> = BTreeMap::new();
    for i in 0u64.. {
        let number = i + 1;
        let persisted = if log.in_flight() >= 8 {
            log.wait_persisted_blocking().unwrap()
        } else {
            log.poll_persisted().unwrap()
        };
        if let Some(number) = persisted {
            print_durable(group, term, &mut writes, number, &mut durable_last);
        }
        let hard_state = HardState { term, vote: 1, commit: durable_last, ..HardState::default() };
        if i % 7 == 6 {
            log.submit(LogWrite {
                number,
                hard_state: Some(hard_state),
                must_sync: false,
                ..LogWrite::default()
            })
            .unwrap();
            writes.insert(number, None);
        } else {
            let count = 1 + i % 4;
            let batch: Vec<Entry> = (next..next + count)
                .map(|index| {
                    let mut entry = entry(index, term);
                    entry.data = crash_payload(group, index, term);
                    entry
                })
                .collect();
            log.submit(LogWrite {
                number,
                hard_state: Some(hard_state),
                entries: batch,
                must_sync: true,
                ..LogWrite::default()
            })
            .unwrap();
            writes.insert(number, Some((next, next + count - 1)));
            next += count;
        }
        if i % 50 == 49 && durable_last > log.first_index() + 10 {
            let index = durable_last - 5;
            let term_at = log.term(index).unwrap();
            log.compact(snapshot_at(index, term_at, &[1], b"child snapshot")).unwrap();
        }
    }
}

/// Prints every entry of the writes numbered up to `number` and forgets
/// those writes.
fn print_durable(
    group: u64,
    term: u64,
    writes: &mut BTreeMap<u64, Option<(u64, u64)>>,
    number: u64,
    durable_last: &mut u64,
) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    while let Some(entry) = writes.first_entry() {
        if *entry.key() > number {
            break;
        }
        if let Some((first, last)) = entry.remove() {
            for index in first..=last {
                writeln!(out, "DURABLE {group} {index} {term}").unwrap();
            }
            *durable_last = last;
        }
    }
    out.flush().unwrap();
}

#[test]
fn kill_9_keeps_every_reported_entry() {
    let dir = tempfile::tempdir().unwrap();
    // group -> index -> term, for every entry reported durable in any round.
    let mut reported: HashMap<u64, BTreeMap<u64, u64>> = HashMap::new();
    for round in 0..CRASH_ROUNDS {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
            .env(CRASH_DIR_ENV, dir.path())
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
        let mut record = |line: &str, lines: &mut usize| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            if let ["DURABLE", group, index, term] = parts.as_slice() {
                let (group, index, term) =
                    (group.parse().unwrap(), index.parse().unwrap(), term.parse().unwrap());
                reported.entry(group).or_default().insert(index, term);
                *lines += 1;
            }
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut lines = 0;
        while lines < CRASH_LINES_BEFORE_KILL {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => record(&line, &mut lines),
                Err(error) => {
                    let _ = child.kill();
                    panic!("round {round}: child stopped reporting after {lines} lines: {error}");
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        // Lines already in the pipe were printed before the kill.
        reader.join().unwrap();
        while let Ok(line) = rx.try_recv() {
            record(&line, &mut lines);
        }

        let store = open_store(dir.path(), StoreOptions::default());
        for group in 0..CRASH_GROUPS {
            let wanted = reported.get(&group).cloned().unwrap_or_default();
            let log = FjallLogStore::open(store.clone(), group)
                .unwrap_or_else(|e| panic!("round {round} group {group}: reopen failed: {e}"));
            let (first, last) = (log.first_index(), log.last_index());
            let top = wanted.keys().next_back().copied().unwrap_or(0);
            assert!(last >= top, "round {round} group {group}: reported {top} lost (last {last})");
            // Every entry present is intact and in sequence (no hole, no
            // torn entry).
            let all = log.entries(first, last + 1, None).unwrap();
            assert_eq!(all.len() as u64, last + 1 - first);
            for (offset, entry) in all.iter().enumerate() {
                assert_eq!(entry.index, first + offset as u64);
                assert_eq!(entry.data, crash_payload(group, entry.index, entry.term), "torn entry");
            }
            // Every reported entry is there with the reported term, or
            // compacted into the snapshot.
            for (&index, &term) in &wanted {
                if index >= first {
                    assert_eq!(
                        log.term(index),
                        Ok(term),
                        "round {round} group {group} index {index}"
                    );
                } else {
                    assert!(index <= log.snapshot_metadata().index);
                }
            }
            let max_term = wanted.values().copied().max().unwrap_or(0);
            assert!(log.hard_state().term >= max_term, "hard state older than reported entries");
            assert!(log.hard_state().commit <= last);
            // The recovered state is one a replica can start from.
            let group_replica = Group::open(&GroupConfig::new(1), log, &logger()).unwrap();
            assert!(group_replica.applied().index <= last);
            println!(
                "round {round} group {group}: first {first} last {last}, reported up to {top}, {} reported",
                wanted.len()
            );
        }
        store.close().unwrap();
    }
}

// ---------------------------------------------------------------------------
// A real 3-replica group on three stores, wired by an in-memory network.
// ---------------------------------------------------------------------------

const REPLICATED_GROUP: u64 = 42;
const SM_KEY: &[u8] = b"test-sm";

/// The test's state machine: every applied data entry with its index.
type Applied = Vec<(u64, Bytes)>;

fn encode_sm(sm: &Applied) -> Bytes {
    let mut out = Vec::new();
    for (index, data) in sm {
        out.extend_from_slice(&index.to_be_bytes());
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(data);
    }
    Bytes::from(out)
}

fn decode_sm(mut bytes: &[u8]) -> Applied {
    let mut sm = Vec::new();
    while !bytes.is_empty() {
        let index = u64::from_be_bytes(bytes[..8].try_into().unwrap());
        let len = u32::from_be_bytes(bytes[8..12].try_into().unwrap()) as usize;
        sm.push((index, Bytes::copy_from_slice(&bytes[12..12 + len])));
        bytes = &bytes[12 + len..];
    }
    sm
}

struct Replica {
    id: u64,
    dir: tempfile::TempDir,
    store: Option<Store>,
    group: Option<Group<FjallLogStore>>,
    sm: Applied,
    restores: usize,
}

struct Cluster {
    replicas: Vec<Replica>,
    network: VecDeque<Message>,
    last_tick: Instant,
    confirmed: u64,
    in_progress: u64,
    proposed: u64,
}

impl Cluster {
    fn new(size: u64) -> Self {
        let replicas = (1..=size)
            .map(|id| Replica {
                id,
                dir: tempfile::tempdir().unwrap(),
                store: None,
                group: None,
                sm: Vec::new(),
                restores: 0,
            })
            .collect();
        Cluster {
            replicas,
            network: VecDeque::new(),
            last_tick: Instant::now(),
            confirmed: 0,
            in_progress: 0,
            proposed: 0,
        }
    }

    fn voters(&self) -> Vec<u64> {
        self.replicas.iter().map(|r| r.id).collect()
    }

    /// Starts (or restarts) replica `id` from its directory.
    fn start(&mut self, id: u64) {
        let voters = self.voters();
        let replica = &mut self.replicas[id as usize - 1];
        let store = open_store(replica.dir.path(), StoreOptions::default());
        let log = if FjallLogStore::exists(&store, REPLICATED_GROUP).unwrap() {
            FjallLogStore::open(store.clone(), REPLICATED_GROUP).unwrap()
        } else {
            FjallLogStore::bootstrap(store.clone(), REPLICATED_GROUP, &voters, &[], Bytes::new())
                .unwrap()
        };
        // The state machine resumes from its checkpoint, written together
        // with the apply state.
        replica.sm = match store.list_meta(SM_KEY).unwrap().pop() {
            Some((_, value)) => decode_sm(&value),
            None => Vec::new(),
        };
        let checkpoint = log.apply_state().index;
        assert!(replica.sm.last().is_none_or(|(index, _)| *index <= checkpoint));
        let config = GroupConfig { timeout_seed: Some(id * 7919), ..GroupConfig::new(id) };
        replica.group = Some(Group::open(&config, log, &logger()).unwrap());
        replica.store = Some(store);
    }

    /// Stops replica `id`: drops its group and closes its storage.
    fn stop(&mut self, id: u64) {
        let replica = &mut self.replicas[id as usize - 1];
        drop(replica.group.take());
        let store = replica.store.take().unwrap();
        store.close().unwrap();
        replica.sm.clear();
    }

    fn group(&mut self, id: u64) -> &mut Group<FjallLogStore> {
        self.replicas[id as usize - 1].group.as_mut().unwrap()
    }

    fn leader(&self) -> Option<u64> {
        self.replicas.iter().find(|r| r.group.as_ref().is_some_and(Group::is_leader)).map(|r| r.id)
    }

    /// Saves replica `id`'s state machine and apply state in one write.
    fn checkpoint(&mut self, id: u64) {
        let replica = &mut self.replicas[id as usize - 1];
        let group = replica.group.as_mut().unwrap();
        let applied = group.applied().clone();
        let state = Op::PutMeta { key: SM_KEY.to_vec(), value: encode_sm(&replica.sm).to_vec() };
        group.store_mut().save_apply_state_with(&applied, vec![state]).unwrap();
    }

    /// Snapshots replica `id`'s state machine and compacts its log.
    fn compact(&mut self, id: u64) {
        let replica = &mut self.replicas[id as usize - 1];
        let data = encode_sm(&replica.sm);
        replica.group.as_mut().unwrap().compact(data).unwrap();
    }

    fn handle(&mut self, id: u64, out: Output) {
        let replica = &mut self.replicas[id as usize - 1];
        self.network.extend(out.send);
        if let Some(snapshot) = out.restore {
            replica.sm = decode_sm(&snapshot.data);
            replica.restores += 1;
        }
        for committed in out.committed {
            if let Payload::Data(data) = committed.payload {
                replica.sm.push((committed.index, data));
            }
        }
        for (_, outcome) in out.proposals {
            self.in_progress -= 1;
            if outcome == ProposalOutcome::Committed {
                self.confirmed += 1;
            }
        }
        if out.snapshot_wanted {
            let data = encode_sm(&replica.sm);
            replica.group.as_mut().unwrap().compact(data).unwrap();
        }
    }

    /// One round: durability reports and outputs of every running replica,
    /// then delivery of every message, then a tick every 50 ms. Returns
    /// whether anything happened.
    fn round(&mut self) -> bool {
        let mut progress = false;
        for id in 1..=self.replicas.len() as u64 {
            let Some(group) = self.replicas[id as usize - 1].group.as_mut() else { continue };
            if let Some(number) = group.store_mut().poll_persisted().unwrap() {
                group.on_persisted(number).unwrap();
                progress = true;
            }
            let out = group.ready().unwrap();
            progress |= !out.is_empty();
            self.handle(id, out);
        }
        while let Some(message) = self.network.pop_front() {
            progress = true;
            let (from, to) = (message.from, message.to);
            let snapshot = message.get_msg_type() == MessageType::MsgSnapshot;
            let delivered = match self.replicas[to as usize - 1].group.as_mut() {
                Some(group) => {
                    match group.step(message) {
                        Ok(()) | Err(sluice_cluster::consensus::Error::InvalidMessage(_)) => {}
                        Err(error) => panic!("replica {to}: step failed: {error}"),
                    }
                    true
                }
                None => false,
            };
            if let Some(sender) = self.replicas[from as usize - 1].group.as_mut() {
                if !delivered {
                    sender.report_unreachable(to);
                }
                if snapshot {
                    sender.report_snapshot(to, delivered);
                }
            }
        }
        if self.last_tick.elapsed() >= Duration::from_millis(50) {
            self.last_tick = Instant::now();
            for replica in &mut self.replicas {
                if let Some(group) = replica.group.as_mut() {
                    group.tick();
                }
            }
        }
        progress
    }

    /// Runs rounds (proposing up to `target` confirmed entries, 64 in
    /// flight) until `done` holds.
    fn run_until(&mut self, what: &str, target: u64, done: impl Fn(&Cluster) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while !done(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            if let Some(leader) = self.leader() {
                while self.confirmed + self.in_progress < target && self.in_progress < 64 {
                    let value = format!("v{}", self.proposed).into_bytes();
                    match self.group(leader).propose(value) {
                        Ok(_) => {
                            self.proposed += 1;
                            self.in_progress += 1;
                        }
                        Err(_) => break,
                    }
                }
            }
            if !self.round() {
                std::thread::sleep(Duration::from_micros(200));
            }
        }
    }

    fn applied_index(&self, id: u64) -> Option<u64> {
        self.replicas[id as usize - 1].group.as_ref().map(|g| g.applied().index)
    }

    /// Every running replica has applied as far as the leader committed.
    fn caught_up(&self) -> bool {
        let Some(leader) = self.leader() else { return false };
        let Some(commit) =
            self.replicas[leader as usize - 1].group.as_ref().map(Group::commit_index)
        else {
            return false;
        };
        self.in_progress == 0
            && self
                .replicas
                .iter()
                .all(|r| r.group.as_ref().is_none_or(|g| g.applied().index >= commit))
    }

    fn assert_same_sequence(&self) {
        let running: Vec<&Replica> = self.replicas.iter().filter(|r| r.group.is_some()).collect();
        for replica in &running[1..] {
            assert_eq!(
                replica.sm.len(),
                running[0].sm.len(),
                "replica {} applied a different count",
                replica.id
            );
            assert!(
                replica.sm == running[0].sm,
                "replica {} applied a different sequence",
                replica.id
            );
        }
    }
}

#[test]
fn three_replicas_replicate_restart_and_catch_up() {
    let started = Instant::now();
    let mut cluster = Cluster::new(3);
    for id in 1..=3 {
        cluster.start(id);
    }
    cluster.group(1).campaign().unwrap();
    cluster.run_until("a leader", 0, |c| c.leader().is_some());

    // 1000 entries, replicated to all three.
    cluster.run_until("1000 confirmed entries", 1000, |c| c.confirmed >= 1000 && c.caught_up());
    cluster.assert_same_sequence();
    let sm = &cluster.replicas[0].sm;
    assert!(sm.len() >= 1000);
    let mut values: Vec<&[u8]> = sm.iter().map(|(_, data)| data.as_ref()).collect();
    values.sort_unstable();
    values.dedup();
    assert_eq!(values.len(), sm.len(), "every value applied once");

    // Replica 3 checkpoints, then goes down; the others go on, and the
    // leader compacts its log past what replica 3 has.
    let follower = (1..=3).rev().find(|id| Some(*id) != cluster.leader()).unwrap();
    cluster.checkpoint(follower);
    let follower_last = cluster.group(follower).last_index();
    cluster.stop(follower);
    cluster.run_until("300 more entries on two replicas", 1300, |c| {
        c.confirmed >= 1300 && c.caught_up()
    });
    for id in 1..=3 {
        if id != follower {
            cluster.compact(id);
        }
    }
    let leader = cluster.leader().unwrap();
    assert!(cluster.group(leader).store().first_index() > follower_last + 1);

    // It restarts from its store and catches up with a snapshot.
    cluster.start(follower);
    let restores_before = cluster.replicas[follower as usize - 1].restores;
    cluster.run_until("the restarted replica to catch up", 1400, |c| {
        c.confirmed >= 1400
            && c.caught_up()
            && c.applied_index(follower) == c.leader().and_then(|l| c.applied_index(l))
    });
    assert!(
        cluster.replicas[follower as usize - 1].restores > restores_before,
        "caught up by snapshot"
    );
    cluster.assert_same_sequence();

    // Another follower restarts without a checkpoint of its own and catches
    // up from the leader's log (its store has the snapshot it made).
    let leader = cluster.leader().unwrap();
    let other = (1..=3).find(|id| *id != leader && *id != follower).unwrap();
    cluster.stop(other);
    cluster.run_until("100 more entries", 1500, |c| c.confirmed >= 1500 && c.caught_up());
    cluster.start(other);
    let leader = cluster.leader().unwrap();
    let other_last = cluster.group(other).last_index();
    assert!(cluster.group(leader).store().first_index() <= other_last + 1, "log catch-up possible");
    cluster.run_until("the second restart to catch up", 1550, |c| {
        c.confirmed >= 1550
            && c.caught_up()
            && c.applied_index(other) == c.leader().and_then(|l| c.applied_index(l))
    });
    cluster.assert_same_sequence();
    let final_len = cluster.replicas[0].sm.len();
    assert!(final_len >= 1550);
    println!(
        "3 replicas: {} confirmed, {} applied each, {:.1} s",
        cluster.confirmed,
        final_len,
        started.elapsed().as_secs_f64()
    );
}

// ---------------------------------------------------------------------------
// Many groups on one store share fsyncs.
// ---------------------------------------------------------------------------

#[test]
fn fifty_groups_share_fsyncs() {
    const GROUPS: u64 = 50;
    const PROPOSALS: usize = 20;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), StoreOptions::default());
    let before = store.stats();
    let durable_writes: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = (0..GROUPS)
            .map(|id| {
                let store = store.clone();
                s.spawn(move || single_voter_group(store, 1000 + id, PROPOSALS))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let after = store.stats();
    let syncs = after.syncs - before.syncs;
    let writes = after.writes - before.writes;
    println!("{GROUPS} groups: {writes} storage writes ({durable_writes} durable raft writes) in {syncs} fsyncs");
    assert!(durable_writes >= GROUPS * PROPOSALS as u64);
    assert!(syncs * 4 < durable_writes, "{durable_writes} durable writes took {syncs} fsyncs");
}

/// Drives a single-voter group: elects itself, then proposes `proposals`
/// entries one at a time, each committed once its write is durable.
/// Returns the number of durable raft writes.
fn single_voter_group(store: Store, id: u64, proposals: usize) -> u64 {
    let log = FjallLogStore::bootstrap(store, id, &[1], &[], Bytes::new()).unwrap();
    let mut group = Group::open(&GroupConfig::new(1), log, &logger()).unwrap();
    let mut durable_writes = 0;
    let mut drive = |group: &mut Group<FjallLogStore>,
                     done: &dyn Fn(&Output, &Group<FjallLogStore>) -> bool| loop {
        let out = group.ready().unwrap();
        if out.persist.is_some_and(|ticket| ticket.must_sync) {
            durable_writes += 1;
        }
        if done(&out, group) {
            return;
        }
        if out.is_empty() {
            if let Some(number) = group.store_mut().wait_persisted_blocking().unwrap() {
                group.on_persisted(number).unwrap();
            }
        }
    };
    group.campaign().unwrap();
    drive(&mut group, &|_, group| group.is_leader() && group.store().in_flight() == 0);
    for k in 0..proposals {
        let id = group.propose(format!("{k}").into_bytes()).unwrap();
        drive(&mut group, &|out, _| {
            out.proposals.iter().any(|(p, o)| *p == id && *o == ProposalOutcome::Committed)
        });
    }
    group.into_store().close().unwrap();
    durable_writes
}

#[test]
fn stores_and_groups_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<FjallLogStore>();
    assert_send::<Group<FjallLogStore>>();
}

#[test]
fn a_failed_write_fails_every_later_call() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(dir.path(), fast());
    let mut log = FjallLogStore::bootstrap(store.clone(), 8, &[1], &[], Bytes::new()).unwrap();
    log.submit(write(1, entries(2..=3, 2))).unwrap();
    log.wait_idle_blocking().unwrap();
    store.close().unwrap();
    let refused = log.submit(write(2, entries(4..=5, 2)));
    assert!(matches!(refused, Err(LogStoreError::Failed(_))), "{refused:?}");
    // Nothing of the refused write is visible, and the store stays failed.
    assert_eq!(log.last_index(), 3);
    assert!(matches!(
        log.poll_persisted(),
        Err(sluice_cluster::consensus::FjallLogStoreError::WriteFailed {
            group: 8,
            cause: Some(sluice_storage::Error::Closed)
        })
    ));
    assert!(log.save_apply_state(&ApplyState::default()).is_err());
    assert!(log.submit(write(3, entries(4..=4, 2))).is_err());
}
