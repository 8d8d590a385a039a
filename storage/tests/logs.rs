//! Replicated logs (one per Raft group) in the `logs` keyspace: append,
//! overwrite, truncate a conflicting tail, compact a prefix, small records,
//! and all of it across reopen.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{fast, open};
use sluice_storage::{Op, StoreOptions};

fn entry(log: u64, index: u64, term: u64) -> Op {
    Op::LogAppend { log, index, data: Bytes::from(format!("log{log}/i{index}/t{term}")) }
}

fn text(entries: &[(u64, Bytes)]) -> Vec<(u64, String)> {
    entries.iter().map(|(i, d)| (*i, String::from_utf8(d.to_vec()).unwrap())).collect()
}

#[test]
fn append_read_truncate_compact_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), fast());
        // Two logs interleaved in one write: they never see each other.
        let mut ops = Vec::new();
        for i in 1..=10 {
            ops.push(entry(7, i, 1));
            ops.push(entry(8, i, 1));
        }
        store.write(ops, false).wait_blocking().unwrap();
        assert_eq!(store.log_last_index(7).unwrap(), Some(10));
        assert_eq!(store.log_entries(7, 3, 6).unwrap().len(), 3);
        assert_eq!(text(&store.log_entries(8, 10, 11).unwrap()), vec![(10, "log8/i10/t1".to_string())]);

        // A conflicting tail: truncate from 8, then rewrite 8..=9 in term 2.
        store.write(vec![Op::LogTruncate { log: 7, from: 8 }, entry(7, 8, 2), entry(7, 9, 2)], false).wait_blocking().unwrap();
        assert_eq!(store.log_last_index(7).unwrap(), Some(9));
        assert_eq!(
            text(&store.log_entries(7, 8, 100).unwrap()),
            vec![(8, "log7/i8/t2".to_string()), (9, "log7/i9/t2".to_string())]
        );

        // Compact the prefix below 5.
        store.write(vec![Op::LogCompact { log: 7, below: 5 }], false).wait_blocking().unwrap();
        assert_eq!(store.log_first_index(7).unwrap(), 5);
        assert!(store.log_entries(7, 0, 5).unwrap().is_empty());
        assert_eq!(store.log_entries(7, 0, 100).unwrap().first().map(|e| e.0), Some(5));

        // Small records.
        store.write(vec![Op::LogMeta { log: 7, tag: b'h', value: Some(bytes::Bytes::from_static(b"hard-state")) }], true).wait_blocking().unwrap();
        assert_eq!(store.log_meta(7, b'h').unwrap().as_deref(), Some(&b"hard-state"[..]));
        assert_eq!(store.log_meta(8, b'h').unwrap(), None);
        store.close().unwrap();
    }
    let store = open(dir.path(), fast());
    assert_eq!(store.log_first_index(7).unwrap(), 5);
    assert_eq!(store.log_last_index(7).unwrap(), Some(9));
    assert_eq!(store.log_entries(7, 0, 100).unwrap().len(), 5);
    assert_eq!(store.log_entries(8, 0, 100).unwrap().len(), 10);
    assert_eq!(store.log_meta(7, b'h').unwrap().as_deref(), Some(&b"hard-state"[..]));
    store.write(vec![Op::LogMeta { log: 7, tag: b'h', value: None }], false).wait_blocking().unwrap();
    assert_eq!(store.log_meta(7, b'h').unwrap(), None);
}

#[test]
fn truncate_and_compact_inside_one_group_see_earlier_appends() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    let mut ops: Vec<Op> = (1..=6).map(|i| entry(1, i, 1)).collect();
    ops.push(Op::LogTruncate { log: 1, from: 5 });
    ops.push(Op::LogCompact { log: 1, below: 3 });
    ops.push(entry(1, 5, 2));
    store.write(ops, false).wait_blocking().unwrap();
    assert_eq!(
        text(&store.log_entries(1, 0, 100).unwrap()),
        vec![(3, "log1/i3/t1".into()), (4, "log1/i4/t1".into()), (5, "log1/i5/t2".into())]
    );
}

#[test]
fn durable_log_appends_of_many_logs_share_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let before = store.stats().syncs;
    // 100 groups append concurrently, as 100 Raft groups of one node would.
    std::thread::scope(|s| {
        for log in 0..100u64 {
            let store = store.clone();
            s.spawn(move || {
                for i in 1..=20 {
                    store.write(vec![entry(log, i, 1)], true).wait_blocking().unwrap();
                }
            });
        }
    });
    let syncs = store.stats().syncs - before;
    assert!(syncs < 2000 / 4, "2000 durable appends took {syncs} fsyncs");
    for log in 0..100u64 {
        assert_eq!(store.log_last_index(log).unwrap(), Some(20));
    }
}
