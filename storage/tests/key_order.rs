//! Property: scans return exactly the live seqs of a queue, in numeric
//! order, whatever the (queue, seq) values (exercises the BE key encoding
//! end to end, including seqs near u64::MAX).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{fast, open, put};
use proptest::prelude::*;
use sluice_storage::Op;
use std::collections::{BTreeMap, BTreeSet};

fn seq() -> impl Strategy<Value = u64> {
    prop_oneof![0..1000u64, any::<u64>(), (u64::MAX - 1000)..=u64::MAX]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn scan_order_is_numeric_order(
        puts in proptest::collection::vec((0..4u64, seq()), 1..200),
        removes in proptest::collection::vec(any::<prop::sample::Index>(), 0..50),
        queue_ids in proptest::array::uniform4(prop_oneof![Just(0u64), Just(u64::MAX), any::<u64>()]),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = open(dir.path(), fast());
        let mut model: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
        let mut ops = Vec::new();
        for (qi, s) in &puts {
            let q = queue_ids[*qi as usize];
            if model.entry(q).or_default().insert(*s) {
                ops.push(put(q, *s));
            }
        }
        store.write(ops, false).wait_blocking().unwrap();
        let all: Vec<(u64, u64)> = model.iter().flat_map(|(q, ss)| ss.iter().map(move |s| (*q, *s))).collect();
        let mut acks = Vec::new();
        for idx in &removes {
            let (q, s) = *idx.get(&all);
            if model.get_mut(&q).unwrap().remove(&s) {
                acks.push(Op::RemoveMessage { queue: q, seq: s });
            }
        }
        store.write(acks, false).wait_blocking().unwrap();
        for (q, expected) in &model {
            let got: Vec<u64> = store.scan_queue(*q, 0).unwrap().into_iter().map(|(s, _)| s).collect();
            prop_assert_eq!(got, expected.iter().copied().collect::<Vec<_>>());
        }
    }
}
