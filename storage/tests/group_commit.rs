//! Concurrent durable writers share fsyncs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{open, put, seqs};
use sluice_storage::StoreOptions;

#[test]
fn concurrent_durable_writes_share_fsyncs() {
    const THREADS: u64 = 64;
    const PER_THREAD: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), StoreOptions::default());
    let before = store.stats();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let store = store.clone();
            s.spawn(move || {
                for seq in 0..PER_THREAD {
                    store.write(vec![put(t, seq)], true).wait_blocking().unwrap();
                }
            });
        }
    });
    let after = store.stats();
    let writes = after.writes - before.writes;
    let syncs = after.syncs - before.syncs;
    println!("writes {writes} syncs {syncs} batches {} histogram {:?}", after.batches, after.writes_per_batch);
    assert_eq!(writes, THREADS * PER_THREAD);
    assert!(syncs > 0);
    assert!(syncs < writes / 4, "no batching: {syncs} fsyncs for {writes} durable writes");
    for t in 0..THREADS {
        assert_eq!(seqs(&store, t), (0..PER_THREAD).collect::<Vec<_>>());
    }
}
