//! Reopen 20 times, appending a batch each time; everything written before
//! must still be there (modelled on fjall's batch_recovery test).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{open, payload, seqs};
use sluice_storage::{MessageRecord, Op, StoreOptions};

#[test]
fn reopen_twenty_times_and_append() {
    const ROUNDS: u64 = 20;
    const PER_ROUND: u64 = 250;
    let dir = tempfile::tempdir().unwrap();
    for round in 0..ROUNDS {
        let store = open(dir.path(), StoreOptions::default());
        // Everything from earlier rounds: queue 1 keeps all, queue 2 had the
        // first half of every round acked below a moving floor.
        assert_eq!(seqs(&store, 1), (0..round * PER_ROUND).collect::<Vec<_>>(), "round {round}");
        assert_eq!(store.ack_floor(2).unwrap(), round * PER_ROUND);
        assert!(seqs(&store, 2).is_empty());
        for (seq, r) in store.scan_queue(1, 0).unwrap() {
            assert_eq!(r.data, payload(1, seq, 100));
        }
        let meta = store.list_meta(b"round/").unwrap();
        assert_eq!(meta.len() as u64, round);

        let base = round * PER_ROUND;
        let record = |q, s| MessageRecord { persistent: true, data: payload(q, s, 100) };
        let mut ops: Vec<Op> = (base..base + PER_ROUND)
            .flat_map(|s| [Op::PutMessage { queue: 1, seq: s, record: record(1, s) }, Op::PutMessage { queue: 2, seq: s, record: record(2, s) }])
            .collect();
        ops.push(Op::PutMeta { key: format!("round/{round:02}").into_bytes(), value: vec![round as u8] });
        store.write(ops, true).wait_blocking().unwrap();
        let mut acks: Vec<Op> = (base..base + PER_ROUND).map(|seq| Op::RemoveMessage { queue: 2, seq }).collect();
        acks.push(Op::SetAckFloor { queue: 2, floor: base + PER_ROUND });
        store.write(acks, true).wait_blocking().unwrap();
        // Alternate between a clean close and a plain drop.
        if round % 2 == 0 {
            store.close().unwrap();
        }
    }
}
