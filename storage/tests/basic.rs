//! Write/read/remove/scan, ack floor, meta, reopen, errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{fast, open, put, rec, seqs};
use sluice_storage::{Error, MessageRecord, Op, Store, StoreOptions};

#[test]
fn write_read_remove_scan_with_ack_floor() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    store.write((0..10).map(|s| put(1, s)).collect(), false).wait_blocking().unwrap();
    store.write(vec![put(2, 0)], false).wait_blocking().unwrap();

    assert_eq!(store.get_message(1, 3).unwrap(), Some(rec(1, 3).data));
    assert_eq!(store.get_message(1, 10).unwrap(), None);
    assert_eq!(seqs(&store, 1), (0..10).collect::<Vec<_>>());
    assert_eq!(seqs(&store, 2), vec![0], "queues do not bleed into each other");

    // Ack 0..4 and move the floor past them in one atomic group.
    let mut ops: Vec<Op> = (0..4).map(|seq| Op::RemoveMessage { queue: 1, seq }).collect();
    ops.push(Op::SetAckFloor { queue: 1, floor: 4 });
    store.write(ops, true).wait_blocking().unwrap();
    // An out-of-order ack above the floor.
    store.write(vec![Op::RemoveMessage { queue: 1, seq: 7 }], false).wait_blocking().unwrap();

    assert_eq!(store.ack_floor(1).unwrap(), 4);
    assert_eq!(store.ack_floor(2).unwrap(), 0);
    assert_eq!(store.get_message(1, 2).unwrap(), None);
    assert_eq!(seqs(&store, 1), vec![4, 5, 6, 8, 9]);
    let from6: Vec<u64> = store.scan_queue(1, 6).unwrap().into_iter().map(|(s, _)| s).collect();
    assert_eq!(from6, vec![6, 8, 9]);
    // `from` below the floor still starts at the floor.
    let page = store.scan_queue_page(1, 0, 2).unwrap();
    assert_eq!(page, vec![(4, rec(1, 4)), (5, rec(1, 5))]);
}

#[test]
fn reopen_preserves_durable_writes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), StoreOptions::default());
        store.write((0..100).map(|s| put(9, s)).collect(), true).wait_blocking().unwrap();
        let mut ops: Vec<Op> = (0..50).map(|seq| Op::RemoveMessage { queue: 9, seq }).collect();
        ops.push(Op::SetAckFloor { queue: 9, floor: 50 });
        ops.push(Op::PutMeta { key: b"q/orders".to_vec(), value: b"durable=1".to_vec() });
        store.write(ops, true).wait_blocking().unwrap();
        // Dropped without close(): Drop flushes too, but durable writes did
        // not need it.
    }
    let store = open(dir.path(), StoreOptions::default());
    assert_eq!(store.ack_floor(9).unwrap(), 50);
    let scanned = store.scan_queue(9, 0).unwrap();
    assert_eq!(scanned.len(), 50);
    for (seq, r) in scanned {
        assert_eq!(r, rec(9, seq));
    }
    assert_eq!(store.list_meta(b"q/").unwrap(), vec![(b"q/orders".to_vec(), b"durable=1".to_vec())]);
    assert_eq!(store.stats().live_estimate, 50, "counters are persisted with the data");
}

#[test]
fn only_a_store_left_open_is_reported_as_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join(sluice_storage::RUNNING_MARKER);
    let store = open(dir.path(), fast());
    assert!(!store.opened_after_crash(), "a fresh directory");
    assert!(marker.exists(), "the marker is there while the store is open");
    store.write(vec![put(1, 0)], false).wait_blocking().unwrap();
    store.close().unwrap();
    assert!(!marker.exists(), "a clean close removes the marker");
    drop(store);
    let store = open(dir.path(), fast());
    assert!(!store.opened_after_crash(), "after a clean close");
    drop(store);
    let store = open(dir.path(), fast());
    assert!(!store.opened_after_crash(), "dropping flushes and closes cleanly too");
    assert_eq!(seqs(&store, 1), vec![0]);
    // A process that dies leaves the marker behind: crash.rs checks that
    // the open after a kill -9 reports it.
}

#[test]
fn durable_completion_resolves_after_a_sync() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let s0 = store.stats();
    store.write(vec![put(1, 0)], false).wait_blocking().unwrap();
    let s1 = store.stats();
    assert_eq!(s1.syncs, s0.syncs, "a non-durable write does not fsync");
    assert_eq!(s1.writes, s0.writes + 1);
    store.write(vec![put(1, 1)], true).wait_blocking().unwrap();
    let s2 = store.stats();
    assert_eq!(s2.syncs, s1.syncs + 1, "the durable completion resolved after its fsync");
    store.flush().unwrap();
    assert_eq!(store.stats().syncs, s2.syncs + 1, "flush is one fsync");
    assert!(store.stats().disk_bytes > 0);
}

#[test]
fn sync_false_never_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    store.write(vec![put(1, 0)], true).wait_blocking().unwrap();
    store.flush().unwrap();
    assert_eq!(store.stats().syncs, 0);
}

#[tokio::test]
async fn completion_is_a_future() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let pending: Vec<_> = (0..20).map(|s| store.write(vec![put(3, s)], true)).collect();
    for c in pending {
        c.await.unwrap();
    }
    assert_eq!(seqs(&store, 3).len(), 20);
    let bad = store.write(vec![Op::PutMeta { key: vec![], value: vec![] }], true).await;
    assert!(matches!(bad, Err(Error::InvalidOp(_))), "{bad:?}");
}

#[test]
fn meta_put_list_delete() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    let kv = |k: &str, v: &str| Op::PutMeta { key: k.as_bytes().to_vec(), value: v.as_bytes().to_vec() };
    store.write(vec![kv("x/b", "2"), kv("x/a", "1"), kv("y/a", "3"), kv("x/a", "1b")], false).wait_blocking().unwrap();
    let x = store.list_meta(b"x/").unwrap();
    assert_eq!(x, vec![(b"x/a".to_vec(), b"1b".to_vec()), (b"x/b".to_vec(), b"2".to_vec())], "last write wins");
    assert_eq!(store.list_meta(b"").unwrap().len(), 3);
    store.write(vec![Op::DeleteMeta { key: b"x/a".to_vec() }], false).wait_blocking().unwrap();
    assert_eq!(store.list_meta(b"x/").unwrap(), vec![(b"x/b".to_vec(), b"2".to_vec())]);
}

#[test]
fn delete_queue_removes_messages_floor_and_same_group_puts() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    store.write((0..20).map(|s| put(5, s)).collect(), false).wait_blocking().unwrap();
    store.write(vec![put(6, 0)], false).wait_blocking().unwrap();
    let mut acks: Vec<Op> = (0..3).map(|seq| Op::RemoveMessage { queue: 5, seq }).collect();
    acks.push(Op::SetAckFloor { queue: 5, floor: 3 });
    store.write(acks, false).wait_blocking().unwrap();
    // A put earlier in the same group is deleted too.
    store.write(vec![put(5, 20), Op::DeleteQueue { queue: 5 }], false).wait_blocking().unwrap();
    assert_eq!(store.ack_floor(5).unwrap(), 0);
    assert_eq!(seqs(&store, 5), Vec::<u64>::new());
    assert_eq!(store.get_message(5, 20).unwrap(), None);
    assert_eq!(seqs(&store, 6), vec![0], "other queues untouched");
    // The id can be reused; numbering continues after the old seqs.
    assert_eq!(store.next_seq(5).unwrap(), 21);
    store.write(vec![put(5, 21)], false).wait_blocking().unwrap();
    assert_eq!(seqs(&store, 5), vec![21]);
}

#[test]
fn next_seq_survives_acks_delete_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), StoreOptions::default());
        assert_eq!(store.next_seq(1).unwrap(), 0);
        // Out-of-order groups: the highest seq counts.
        store.write(vec![put(1, 7), put(1, 3)], false).wait_blocking().unwrap();
        store.write(vec![put(1, 5)], false).wait_blocking().unwrap();
        assert_eq!(store.next_seq(1).unwrap(), 8);
        let acks = [3, 5, 7].map(|seq| Op::RemoveMessage { queue: 1, seq }).to_vec();
        store.write(acks, true).wait_blocking().unwrap();
        assert!(seqs(&store, 1).is_empty());
        assert_eq!(store.next_seq(1).unwrap(), 8, "acking the tail does not lower it");
    }
    let store = open(dir.path(), StoreOptions::default());
    assert_eq!(store.next_seq(1).unwrap(), 8, "persisted");
    store.write(vec![Op::DeleteQueue { queue: 1 }], true).wait_blocking().unwrap();
    assert_eq!(store.next_seq(1).unwrap(), 8, "kept across DeleteQueue");
    assert_eq!(store.next_seq(2).unwrap(), 0);
}

#[test]
fn last_op_on_a_key_wins_inside_one_group() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    store
        .write(vec![put(1, 0), Op::RemoveMessage { queue: 1, seq: 0 }, put(1, 1)], false)
        .wait_blocking()
        .unwrap();
    assert_eq!(seqs(&store, 1), vec![1]);
    // Separate writes that land in one group behave the same.
    let a = store.write(vec![put(1, 2)], false);
    let b = store.write(vec![Op::RemoveMessage { queue: 1, seq: 2 }], false);
    a.wait_blocking().unwrap();
    b.wait_blocking().unwrap();
    assert_eq!(seqs(&store, 1), vec![1]);
}

#[test]
fn non_persistent_records_are_returned_flagged() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), StoreOptions::default());
        let transient = MessageRecord { persistent: false, data: Bytes::from_static(b"t") };
        store
            .write(vec![put(1, 0), Op::PutMessage { queue: 1, seq: 1, record: transient }], true)
            .wait_blocking()
            .unwrap();
        store.close().unwrap();
    }
    let store = open(dir.path(), StoreOptions::default());
    let flags: Vec<(u64, bool)> = store.scan_queue(1, 0).unwrap().into_iter().map(|(s, r)| (s, r.persistent)).collect();
    assert_eq!(flags, vec![(0, true), (1, false)], "recovery leaves deleting transients to the caller");
}

#[test]
fn invalid_ops_are_rejected_without_applying_anything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    let too_long = vec![0u8; 70_000];
    for bad in [Op::PutMeta { key: vec![], value: vec![1] }, Op::DeleteMeta { key: too_long }] {
        let r = store.write(vec![put(1, 0), bad], true).wait_blocking();
        assert!(matches!(r, Err(Error::InvalidOp(_))), "{r:?}");
    }
    assert_eq!(store.get_message(1, 0).unwrap(), None);
    assert!(!store.stats().poisoned, "a rejected write() does not poison");
}

#[test]
fn invalid_nowait_write_poisons() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), fast());
    store.write_nowait(vec![put(1, 0)]);
    store.flush().unwrap();
    store.write_nowait(vec![Op::PutMeta { key: vec![], value: vec![] }]);
    assert!(store.stats().poisoned);
    assert!(matches!(store.write(vec![put(1, 1)], false).wait_blocking(), Err(Error::Poisoned)));
    assert!(matches!(store.flush(), Err(Error::Poisoned)));
    assert_eq!(seqs(&store, 1), vec![0], "reads still work");
}

#[test]
fn second_open_of_a_dir_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path(), fast());
    match Store::open(dir.path(), fast()) {
        Err(Error::Locked { path }) => assert_eq!(path, dir.path()),
        other => panic!("expected Locked, got {:?}", other.err()),
    }
}

#[test]
fn a_file_is_not_a_usable_dir() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let r = Store::open(&file, fast());
    assert!(matches!(r, Err(Error::Unusable { .. })), "{:?}", r.err());
    let r = Store::open(&file.join("sub"), fast());
    assert!(matches!(r, Err(Error::Unusable { .. })), "{:?}", r.err());
}

#[test]
fn writes_after_close_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let clone = store.clone();
    let c = store.write(vec![put(1, 0)], false);
    store.close().unwrap();
    c.wait_blocking().unwrap();
    assert!(matches!(clone.write(vec![put(1, 1)], true).wait_blocking(), Err(Error::Closed)));
    assert!(matches!(clone.flush(), Err(Error::Closed)));
    clone.write_nowait(vec![put(1, 2)]);
    store.close().unwrap();
    // Reads keep working, and what was queued before close is there.
    assert_eq!(seqs(&clone, 1), vec![0]);
    drop((store, clone));
    let store = open(dir.path(), StoreOptions::default());
    assert_eq!(seqs(&store, 1), vec![0]);
}

#[test]
fn unknown_record_version_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = open(dir.path(), fast());
        store.write(vec![put(1, 0)], true).wait_blocking().unwrap();
    }
    {
        // Plant a record from a "future" format version behind the store's back.
        let db = fjall::Database::builder(dir.path()).open().unwrap();
        let msgs = db.keyspace("msgs", fjall::KeyspaceCreateOptions::default).unwrap();
        let mut key = 1u64.to_be_bytes().to_vec();
        key.extend_from_slice(&1u64.to_be_bytes());
        msgs.insert(key, vec![2u8, 0, b'x']).unwrap();
        db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    let store = open(dir.path(), fast());
    assert_eq!(store.get_message(1, 0).unwrap(), Some(rec(1, 0).data));
    assert!(matches!(store.get_message(1, 1), Err(Error::Corrupt { .. })));
    assert!(matches!(store.scan_queue(1, 0), Err(Error::Corrupt { .. })));
}

/// A queue id reused right after DeleteQueue (numbering from `next_seq`,
/// as the write-once rule asks), with the delete and the new puts landing in
/// one group commit: after everything is acked and compacted, no old
/// message resurfaces.
#[test]
fn reused_queue_id_never_uncovers_old_messages() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let msg = |q, seq, data: &'static [u8]| Op::PutMessage { queue: q, seq, record: MessageRecord { persistent: true, data: Bytes::from_static(data) } };
    store.write((0..20).map(|q| msg(q, 0, b"old")).collect(), true).wait_blocking().unwrap();
    store.compact().unwrap(); // the old messages now live in a table
    let mut pending = vec![store.write(vec![put(99, 0)], true)]; // keeps the writer busy in an fsync
    for q in 0..20 {
        pending.push(store.write(vec![Op::DeleteQueue { queue: q }], false));
        pending.push(store.write(vec![msg(q, 1, b"new")], false));
    }
    for c in pending {
        c.wait_blocking().unwrap();
    }
    for q in 0..20 {
        assert_eq!(store.next_seq(q).unwrap(), 2);
        assert_eq!(store.get_message(q, 0).unwrap(), None);
        assert_eq!(store.get_message(q, 1).unwrap().as_deref(), Some(&b"new"[..]));
    }
    store.write((0..20).map(|q| Op::RemoveMessage { queue: q, seq: 1 }).collect(), true).wait_blocking().unwrap();
    store.compact().unwrap();
    for q in 0..20 {
        assert!(seqs(&store, q).is_empty(), "queue {q}: a message resurfaced");
        assert_eq!(store.get_message(q, 0).unwrap(), None, "queue {q}: old message resurfaced");
    }
}
