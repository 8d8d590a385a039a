//! Acked messages must not linger: after a queue of 200k messages is drained
//! with a moving ack floor, the automatic compaction runs, the queue scans
//! empty from its floor, and disk usage goes down. (The 1M-message
//! measurement is `examples/queue_churn.rs`.)
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{du, fast, open, payload};
use sluice_storage::{MessageRecord, Op, StoreOptions};
use std::time::{Duration, Instant};

#[test]
fn drained_queue_is_compacted_and_disk_shrinks() {
    const N: u64 = 200_000;
    const GROUP: u64 = 2_000;
    const Q: u64 = 42;
    let dir = tempfile::tempdir().unwrap();
    // Small memtables, so the values reach tables before they are acked: the
    // bad case where tombstones and values end up in different tables.
    let opts = StoreOptions { memtable_bytes: 4 << 20, ..fast() };
    let store = open(dir.path(), opts);
    let t = Instant::now();

    for start in (0..N).step_by(GROUP as usize) {
        let ops = (start..start + GROUP)
            .map(|seq| Op::PutMessage { queue: Q, seq, record: MessageRecord { persistent: true, data: payload(Q, seq, 200) } })
            .collect();
        store.write_nowait(ops);
    }
    store.flush().unwrap();
    // Let flushes settle so the table bytes are counted.
    std::thread::sleep(Duration::from_millis(500));
    let before = store.stats();
    let du_before = du(dir.path());
    assert_eq!(before.compactions, 0);
    println!("appended {N} in {:?}; disk {} B (journal {} B), du {du_before} B", t.elapsed(), before.disk_bytes, before.journal_bytes);

    // Consume in order and ack with a moving floor, like a consumer would.
    let mut floor = 0;
    while floor < N {
        let page = store.scan_queue_page(Q, floor, GROUP as usize).unwrap();
        assert_eq!(page.first().map(|(s, _)| *s), Some(floor));
        let mut ops: Vec<Op> = page.iter().map(|(seq, _)| Op::RemoveMessage { queue: Q, seq: *seq }).collect();
        floor = page.last().unwrap().0 + 1;
        ops.push(Op::SetAckFloor { queue: Q, floor });
        store.write(ops, false).wait_blocking().unwrap();
    }
    store.flush().unwrap();
    println!("drained at {:?}", t.elapsed());

    // The writer requested the compaction itself when the floor passed the
    // last seq; wait for it (no timing assertion, just a generous bound).
    let deadline = Instant::now() + Duration::from_secs(120);
    while store.stats().compactions == 0 || store.stats().compaction_running {
        assert!(Instant::now() < deadline, "no automatic compaction: {:?}", store.stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    // The next commit folds the compacted removes into the persisted counter.
    store.flush().unwrap();
    let after = store.stats();
    let du_after = du(dir.path());
    println!(
        "after compaction at {:?}: disk {} B (journal {} B), du {du_after} B, compaction took {:?}",
        t.elapsed(),
        after.disk_bytes,
        after.journal_bytes,
        after.last_compaction
    );

    assert!(after.compactions >= 1);
    assert_eq!(store.ack_floor(Q).unwrap(), N);
    assert!(store.scan_queue(Q, 0).unwrap().is_empty());
    assert_eq!(store.get_message(Q, N - 1).unwrap(), None);
    assert_eq!(after.removes_since_compaction, 0, "counter reset by the compaction: {after:?}");
    assert_eq!(after.live_estimate, 0);
    assert!(after.disk_bytes < before.disk_bytes, "disk did not shrink: {} -> {}", before.disk_bytes, after.disk_bytes);
    // The replaced table files are really gone, not just unaccounted.
    assert!(du_after < du_before, "allocated bytes did not shrink: {du_before} -> {du_after}");
}
