//! A failed journal write must fail every waiter of its group and poison the
//! store; nothing is reported as written unless it was.
//!
//! The failure is real: RLIMIT_FSIZE makes write(2) past 1 MiB fail with
//! EFBIG. The limit is per process, which is why this test has its own
//! file (cargo runs each test file as its own process).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use bytes::Bytes;
use common::{open, seqs};
use sluice_storage::{Error, MessageRecord, Op, StoreOptions};

fn set_file_size_limit(bytes: libc::rlim_t) {
    // SAFETY: plain libc calls on process-wide settings; no pointers kept.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        assert_eq!(libc::getrlimit(libc::RLIMIT_FSIZE, &mut lim), 0);
        lim.rlim_cur = bytes.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &lim), 0);
    }
}

/// Incompressible bytes (the journal lz4-compresses large values).
fn noise(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect::<Vec<u8>>()
        .into()
}

#[test]
fn failed_journal_write_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let big = |seq| Op::PutMessage { queue: 1, seq, record: MessageRecord { persistent: true, data: noise(seq, 64 << 10) } };
    let store = open(dir.path(), StoreOptions::default());
    store.write(vec![big(0)], true).wait_blocking().unwrap();

    set_file_size_limit(1 << 20);
    let mut acked = vec![0];
    let mut failure = None;
    for seq in 1..64 {
        match store.write(vec![big(seq)], true).wait_blocking() {
            Ok(()) => acked.push(seq),
            Err(e) => {
                failure = Some((seq, e));
                break;
            }
        }
    }
    let (failed_seq, err) = failure.expect("the journal grew past 1 MiB without an error");
    println!("acknowledged {} groups, then group {failed_seq} failed: {err}", acked.len());
    assert!(matches!(err, Error::Fjall(_) | Error::Poisoned), "{err:?}");
    assert!(store.stats().poisoned);
    assert!(matches!(store.write(vec![big(100)], true).wait_blocking(), Err(Error::Poisoned)));
    assert!(matches!(store.write(vec![big(101)], false).wait_blocking(), Err(Error::Poisoned)));
    assert!(matches!(store.flush(), Err(Error::Poisoned)));
    assert_eq!(store.get_message(1, failed_seq).unwrap(), None, "a failed group is not applied");
    assert!(matches!(store.close(), Err(Error::Poisoned)), "close cannot promise durability either");
    drop(store);

    // After a restart everything acknowledged is there.
    set_file_size_limit(libc::RLIM_INFINITY);
    let store = open(dir.path(), StoreOptions::default());
    let have = seqs(&store, 1);
    assert!(have.starts_with(&acked), "acknowledged {acked:?}, recovered {have:?}");
    assert!(!store.stats().poisoned);
    store.write(vec![big(200)], true).wait_blocking().unwrap();
}
