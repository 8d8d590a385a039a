//! The queue state machine (`replica::queue_sm`): one scenario per command,
//! then property tests against a deliberately naive model (a `Vec` indexed
//! by seq), across snapshot/restore, and for determinism.
#![allow(clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use sluice_cluster::replica::queue_sm::{
    Command, ConsumerId, ConsumerOpts, Effect, Limits, MsgMeta, NewMsg, Outcome, Overflow, PublishId, QueueSm, Rejection,
    Seq, Snapshot,
};

// ---------------------------------------------------------------- helpers

fn cid(gateway: &str, connection: u64, tag: &str) -> ConsumerId {
    ConsumerId { gateway: gateway.into(), connection, channel: 1, tag: tag.into() }
}

fn plain(size: u32) -> NewMsg {
    NewMsg { size, persistent: size.is_multiple_of(2), publish_id: None, ttl_ms: None, priority: 0, ..Default::default() }
}

fn published(publisher: &str, id: u64) -> NewMsg {
    NewMsg { size: 10, persistent: true, publish_id: Some(PublishId { publisher: publisher.into(), id }), ttl_ms: None, priority: 0, ..Default::default() }
}

const ACK: ConsumerOpts = ConsumerOpts { exclusive: false, no_ack: false };
const EXCLUSIVE: ConsumerOpts = ConsumerOpts { exclusive: true, no_ack: false };
const NO_ACK: ConsumerOpts = ConsumerOpts { exclusive: false, no_ack: true };

/// Enqueues `n` messages and returns their seqs.
fn enqueue(sm: &mut QueueSm, n: u32) -> Vec<Seq> {
    let fx = sm.apply(Command::Enqueue { now_ms: 0, msgs: (0..n).map(|i| plain(100 + i)).collect() });
    match fx.as_slice() {
        [Effect::Enqueued { seqs }] => seqs.iter().map(|s| s.expect("no dedup id, never a duplicate")).collect(),
        other => panic!("unexpected {other:?}"),
    }
}

fn attach(sm: &mut QueueSm, consumer: &ConsumerId, opts: ConsumerOpts) -> Vec<Effect> {
    sm.apply(Command::Attach { consumer: consumer.clone(), opts })
}

fn checkout(sm: &mut QueueSm, consumer: &ConsumerId, seqs: &[Seq]) -> Vec<Effect> {
    sm.apply(Command::Checkout { consumer: consumer.clone(), seqs: seqs.to_vec(), now_ms: 0 })
}

fn settle(sm: &mut QueueSm, consumer: &ConsumerId, seqs: &[Seq], outcome: Outcome) -> Vec<Effect> {
    sm.apply(Command::Settle { consumer: consumer.clone(), seqs: seqs.to_vec(), outcome })
}

/// The ready list as (seq, redelivered).
fn ready(sm: &QueueSm) -> Vec<(Seq, bool)> {
    sm.next_ready(usize::MAX).map(|(s, m)| (s, m.redelivered)).collect()
}

fn held(sm: &QueueSm, consumer: &ConsumerId) -> Vec<Seq> {
    sm.held_by(consumer).map(|(s, _)| s).collect()
}

fn delivered_seqs(fx: &[Effect]) -> Vec<Seq> {
    match fx {
        [Effect::Delivered { msgs, .. }, ..] => msgs.iter().map(|(s, _)| *s).collect(),
        other => panic!("expected a delivery, got {other:?}"),
    }
}

// -------------------------------------------------------------- scenarios

#[test]
fn enqueue_assigns_increasing_seqs_in_order() {
    let mut sm = QueueSm::new();
    assert_eq!(enqueue(&mut sm, 3), vec![0, 1, 2]);
    assert_eq!(enqueue(&mut sm, 0), Vec::<Seq>::new());
    assert_eq!(enqueue(&mut sm, 2), vec![3, 4]);
    assert_eq!(sm.ready_count(), 5);
    assert_eq!(sm.next_seq(), 5);
    assert_eq!(sm.ack_floor(), 0);
    let first: Vec<(Seq, MsgMeta)> = sm.next_ready(2).map(|(s, m)| (s, *m)).collect();
    assert_eq!(
        first,
        vec![
            (0, MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0 }),
            (1, MsgMeta { size: 101, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0 }),
        ]
    );
}

#[test]
fn enqueue_deduplicates_publisher_retries() {
    let mut sm = QueueSm::new();
    let fx = sm.apply(Command::Enqueue { now_ms: 0, msgs: vec![published("p", 1), published("p", 2), plain(1)] });
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), Some(1), Some(2)] }]);
    // A retry of 2 and 1 (out of order), a new id, a duplicate within the
    // batch, the same id from another publisher, and one without an id.
    let fx = sm.apply(Command::Enqueue {
        now_ms: 0,
        msgs: vec![
            published("p", 2),
            published("p", 1),
            published("p", 5),
            published("p", 5),
            published("q", 1),
            plain(1),
        ],
    });
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![None, None, Some(3), None, Some(4), Some(5)] }]);
    // Late retry of a gap (id 3 never arrived before): accepted once.
    let fx = sm.apply(Command::Enqueue { now_ms: 0, msgs: vec![published("p", 3), published("p", 3), published("p", 4)] });
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(6), None, Some(7)] }]);
    // Remembered across a purge: the messages are gone, a retry still must
    // not bring them back.
    sm.apply(Command::Purge);
    let fx = sm.apply(Command::Enqueue { now_ms: 0, msgs: vec![published("p", 1), published("q", 1)] });
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![None, None] }]);
    assert_eq!(sm.ready_count(), 0);
}

#[test]
fn attach_and_detach() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g1", 1, "b");
    assert_eq!(attach(&mut sm, &a, ACK), vec![Effect::Attached { consumer: a.clone() }]);
    // A retried attach is answered alike and registers nothing new.
    assert_eq!(attach(&mut sm, &a, ACK), vec![Effect::Attached { consumer: a.clone() }]);
    assert_eq!(attach(&mut sm, &b, NO_ACK), vec![Effect::Attached { consumer: b.clone() }]);
    assert_eq!(sm.consumer_count(), 2);
    let listed: Vec<(ConsumerId, ConsumerOpts)> = sm.consumers().map(|(id, o)| (id.clone(), o)).collect();
    assert_eq!(listed, vec![(a.clone(), ACK), (b.clone(), NO_ACK)]);
    assert_eq!(sm.apply(Command::Detach { consumer: a.clone() }), vec![Effect::Detached { consumer: a.clone() }]);
    assert!(!sm.is_attached(&a));
    assert!(sm.is_attached(&b));
    // Detaching again (a retry) is answered alike.
    assert_eq!(sm.apply(Command::Detach { consumer: a.clone() }), vec![Effect::Detached { consumer: a }]);
    assert_eq!(sm.consumer_count(), 1);
}

#[test]
fn exclusive_consumers_conflict_and_leave_state_unchanged() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g2", 1, "b");
    attach(&mut sm, &a, ACK);
    let before = sm.clone();
    let conflict = vec![Effect::Rejected { reason: Rejection::ExclusiveConflict }];
    assert_eq!(attach(&mut sm, &b, EXCLUSIVE), conflict);
    assert_eq!(sm, before);
    // Alone, a consumer may make itself exclusive; then nobody else fits.
    assert_eq!(attach(&mut sm, &a, EXCLUSIVE), vec![Effect::Attached { consumer: a.clone() }]);
    let before = sm.clone();
    assert_eq!(attach(&mut sm, &b, ACK), conflict);
    assert_eq!(attach(&mut sm, &b, EXCLUSIVE), conflict);
    assert_eq!(sm, before);
    sm.apply(Command::Detach { consumer: a });
    assert_eq!(attach(&mut sm, &b, EXCLUSIVE), vec![Effect::Attached { consumer: b }]);
}

#[test]
fn checkout_moves_only_ready_messages() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g1", 1, "b");
    enqueue(&mut sm, 5);
    attach(&mut sm, &a, ACK);
    attach(&mut sm, &b, ACK);
    let fx = checkout(&mut sm, &a, &[1, 0, 1]);
    assert_eq!(
        fx,
        vec![Effect::Delivered {
            consumer: a.clone(),
            msgs: vec![
                (1, MsgMeta { size: 101, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0 }),
                (0, MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0 }),
            ],
        }]
    );
    // 0 and 1 are a's now: a stale checkout of them for b skips them, and
    // so does one of seqs that never existed.
    assert_eq!(delivered_seqs(&checkout(&mut sm, &b, &[0, 2, 1, 99])), vec![2]);
    assert_eq!(checkout(&mut sm, &b, &[0, 1, 2, 99]), vec![]);
    assert_eq!(held(&sm, &a), vec![0, 1]);
    assert_eq!(held(&sm, &b), vec![2]);
    assert_eq!(ready(&sm), vec![(3, false), (4, false)]);
    assert_eq!((sm.ready_count(), sm.unacked_count()), (2, 3));
    // Not attached: refused, nothing moves.
    let before = sm.clone();
    let stranger = cid("g9", 1, "x");
    assert_eq!(checkout(&mut sm, &stranger, &[3]), vec![Effect::Rejected { reason: Rejection::NotAttached }]);
    assert_eq!(sm, before);
}

#[test]
fn no_ack_checkout_removes_at_once() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    enqueue(&mut sm, 3);
    attach(&mut sm, &a, NO_ACK);
    let fx = checkout(&mut sm, &a, &[0, 1]);
    assert_eq!(fx.len(), 2);
    assert_eq!(delivered_seqs(&fx), vec![0, 1]);
    assert_eq!(fx[1], Effect::Removed { seqs: vec![0, 1] });
    assert_eq!(sm.unacked_count(), 0);
    assert_eq!(sm.holders().count(), 0);
    assert_eq!(sm.ack_floor(), 2);
}

#[test]
fn settle_ack_and_discard_remove_only_what_the_consumer_holds() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g1", 1, "b");
    enqueue(&mut sm, 4);
    attach(&mut sm, &a, ACK);
    attach(&mut sm, &b, ACK);
    checkout(&mut sm, &a, &[0, 1, 2]);
    checkout(&mut sm, &b, &[3]);
    // b does not hold 0; 7 does not exist; a holds 1 and 2.
    assert_eq!(settle(&mut sm, &b, &[0, 7], Outcome::Ack), vec![]);
    assert_eq!(settle(&mut sm, &a, &[2, 3, 1, 2], Outcome::Ack), vec![Effect::Removed { seqs: vec![2, 1] }]);
    // A duplicated settle changes nothing.
    assert_eq!(settle(&mut sm, &a, &[1, 2], Outcome::Ack), vec![]);
    assert_eq!(settle(&mut sm, &a, &[0], Outcome::Discard), vec![Effect::Removed { seqs: vec![0] }]);
    assert_eq!(held(&sm, &a), Vec::<Seq>::new());
    assert_eq!(held(&sm, &b), vec![3]);
    assert_eq!(sm.holders().cloned().collect::<Vec<_>>(), vec![b]);
    assert_eq!(sm.ack_floor(), 3);
}

#[test]
fn requeue_returns_to_original_position_flagged_redelivered() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    enqueue(&mut sm, 5);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[0, 1, 2]);
    assert_eq!(settle(&mut sm, &a, &[2, 0], Outcome::Requeue), vec![Effect::Requeued { seqs: vec![2, 0] }]);
    assert_eq!(ready(&sm), vec![(0, true), (2, true), (3, false), (4, false)]);
    assert_eq!(held(&sm, &a), vec![1]);
    // Delivered again with the flag set.
    let fx = checkout(&mut sm, &a, &[0]);
    assert_eq!(
        fx,
        vec![Effect::Delivered {
            consumer: a.clone(),
            msgs: vec![(0, MsgMeta { size: 100, persistent: true, redelivered: true, expires_at: None, priority: 0, delivery_count: 1 })],
        }]
    );
}

#[test]
fn detached_consumer_keeps_its_messages() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    enqueue(&mut sm, 3);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[0, 1]);
    sm.apply(Command::Detach { consumer: a.clone() });
    assert_eq!(sm.consumer_count(), 0);
    assert_eq!(held(&sm, &a), vec![0, 1]);
    // basic.cancel does not settle: acks still work, checkouts do not.
    assert_eq!(settle(&mut sm, &a, &[0], Outcome::Ack), vec![Effect::Removed { seqs: vec![0] }]);
    assert_eq!(checkout(&mut sm, &a, &[2]), vec![Effect::Rejected { reason: Rejection::NotAttached }]);
    // Attached again under the same id, it still holds 1.
    attach(&mut sm, &a, ACK);
    assert_eq!(held(&sm, &a), vec![1]);
}

#[test]
fn return_all_requeues_everything_the_consumer_holds() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g1", 1, "b");
    enqueue(&mut sm, 5);
    attach(&mut sm, &a, ACK);
    attach(&mut sm, &b, ACK);
    checkout(&mut sm, &a, &[3, 1]);
    checkout(&mut sm, &b, &[0]);
    let fx = sm.apply(Command::ReturnAll { consumer: a.clone() });
    assert_eq!(fx, vec![Effect::Requeued { seqs: vec![1, 3] }]);
    assert_eq!(ready(&sm), vec![(1, true), (2, false), (3, true), (4, false)]);
    assert_eq!(held(&sm, &b), vec![0]);
    // Still attached (returning is not detaching); nothing left to return.
    assert!(sm.is_attached(&a));
    assert_eq!(sm.apply(Command::ReturnAll { consumer: a }), vec![]);
    assert_eq!(sm.apply(Command::ReturnAll { consumer: cid("nobody", 0, "") }), vec![]);
}

#[test]
fn get_takes_the_first_ready_message() {
    let mut sm = QueueSm::new();
    let getter = cid("g1", 1, "");
    enqueue(&mut sm, 3);
    let fx = sm.apply(Command::Get { holder: getter.clone(), no_ack: false, now_ms: 0 });
    let meta0 = MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0 };
    assert_eq!(fx, vec![Effect::Got { holder: getter.clone(), msg: Some((0, meta0)), remaining: 2 }]);
    // Held although never attached; settled like any delivery.
    assert_eq!(held(&sm, &getter), vec![0]);
    assert_eq!(sm.consumer_count(), 0);
    let fx = sm.apply(Command::Get { holder: getter.clone(), no_ack: true, now_ms: 0 });
    let meta1 = MsgMeta { size: 101, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0 };
    assert_eq!(
        fx,
        vec![
            Effect::Got { holder: getter.clone(), msg: Some((1, meta1)), remaining: 1 },
            Effect::Removed { seqs: vec![1] },
        ]
    );
    assert_eq!(settle(&mut sm, &getter, &[0], Outcome::Requeue), vec![Effect::Requeued { seqs: vec![0] }]);
    sm.apply(Command::Get { holder: getter.clone(), no_ack: false, now_ms: 0 });
    sm.apply(Command::Get { holder: getter.clone(), no_ack: false, now_ms: 0 });
    let fx = sm.apply(Command::Get { holder: getter.clone(), no_ack: false, now_ms: 0 });
    assert_eq!(fx, vec![Effect::Got { holder: getter.clone(), msg: None, remaining: 0 }]);
    assert_eq!(held(&sm, &getter), vec![0, 2]);
    assert_eq!(sm.apply(Command::ReturnAll { consumer: getter }), vec![Effect::Requeued { seqs: vec![0, 2] }]);
}

#[test]
fn gateway_down_requeues_exactly_that_gateways_holdings() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g1", 2, "b");
    let getter = cid("g1", 3, "");
    // Another gateway, one whose name starts with "g1" and one that sorts
    // just before it.
    let other = cid("g2", 1, "a");
    let prefixed = cid("g10", 1, "a");
    let before = cid("g0", 9, "z");
    enqueue(&mut sm, 10);
    for c in [&a, &b, &other, &prefixed, &before] {
        attach(&mut sm, c, ACK);
    }
    checkout(&mut sm, &a, &[0, 5]);
    checkout(&mut sm, &b, &[2]);
    checkout(&mut sm, &other, &[1]);
    checkout(&mut sm, &prefixed, &[3]);
    checkout(&mut sm, &before, &[4]);
    sm.apply(Command::Detach { consumer: b.clone() });
    sm.apply(Command::Get { holder: getter.clone(), no_ack: false, now_ms: 0 }); // seq 6
    let fx = sm.apply(Command::GatewayDown { gateway: "g1".into() });
    assert_eq!(fx, vec![Effect::Detached { consumer: a.clone() }, Effect::Requeued { seqs: vec![0, 2, 5, 6] }]);
    let consumers: Vec<ConsumerId> = sm.consumers().map(|(id, _)| id.clone()).collect();
    assert_eq!(consumers, vec![before.clone(), prefixed.clone(), other.clone()]);
    assert_eq!(sm.holders().cloned().collect::<Vec<_>>(), vec![before, prefixed, other]);
    assert_eq!(ready(&sm), vec![(0, true), (2, true), (5, true), (6, true), (7, false), (8, false), (9, false)]);
    // Stale settles from the dead gateway change nothing.
    assert_eq!(settle(&mut sm, &a, &[0, 5], Outcome::Ack), vec![]);
    // Unknown gateway: nothing.
    assert_eq!(sm.apply(Command::GatewayDown { gateway: "g".into() }), vec![]);
}

#[test]
fn purge_drops_ready_messages_only() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    assert_eq!(sm.apply(Command::Purge), vec![Effect::Purged { count: 0 }]);
    enqueue(&mut sm, 5);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[1, 3]);
    let fx = sm.apply(Command::Purge);
    assert_eq!(fx, vec![Effect::Removed { seqs: vec![0, 2, 4] }, Effect::Purged { count: 3 }]);
    assert_eq!(sm.ready_count(), 0);
    assert_eq!(held(&sm, &a), vec![1, 3]);
    assert_eq!(sm.ack_floor(), 1);
    // Held messages requeued after the purge come back.
    settle(&mut sm, &a, &[3], Outcome::Requeue);
    assert_eq!(ready(&sm), vec![(3, true)]);
}

#[test]
fn delete_is_terminal() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g2", 1, "b");
    enqueue(&mut sm, 4);
    attach(&mut sm, &b, ACK);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[0]);
    let fx = sm.apply(Command::Delete);
    assert_eq!(
        fx,
        vec![
            Effect::Cancelled { consumer: a.clone() },
            Effect::Cancelled { consumer: b },
            Effect::Deleted { count: 3 }
        ]
    );
    assert!(sm.is_deleted());
    assert_eq!((sm.ready_count(), sm.unacked_count(), sm.consumer_count()), (0, 0, 0));
    assert_eq!(sm.ack_floor(), 4);
    let rejected = vec![Effect::Rejected { reason: Rejection::QueueDeleted }];
    let later = [
        Command::Enqueue { now_ms: 0, msgs: vec![plain(1)] },
        Command::Attach { consumer: a.clone(), opts: ACK },
        Command::Detach { consumer: a.clone() },
        Command::ReturnAll { consumer: a.clone() },
        Command::Checkout { consumer: a.clone(), seqs: vec![1], now_ms: 0 },
        Command::Get { holder: a.clone(), no_ack: true, now_ms: 0 },
        Command::Settle { consumer: a.clone(), seqs: vec![0], outcome: Outcome::Ack },
        Command::GatewayDown { gateway: "g1".into() },
        Command::Purge,
        Command::Delete,
    ];
    for cmd in later {
        assert_eq!(sm.apply(cmd.clone()), rejected, "{cmd:?}");
    }
    assert_eq!(sm.next_seq(), 4);
    assert_eq!(QueueSm::restore(sm.snapshot()), Ok(sm));
}

#[test]
fn ack_floor_follows_the_lowest_live_message() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    assert_eq!(sm.ack_floor(), 0);
    enqueue(&mut sm, 4);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[0, 1, 2]);
    settle(&mut sm, &a, &[1], Outcome::Ack);
    assert_eq!(sm.ack_floor(), 0, "0 is still held");
    settle(&mut sm, &a, &[0], Outcome::Requeue);
    assert_eq!(sm.ack_floor(), 0, "0 is ready again");
    checkout(&mut sm, &a, &[0]);
    settle(&mut sm, &a, &[0], Outcome::Ack);
    assert_eq!(sm.ack_floor(), 2);
    settle(&mut sm, &a, &[2], Outcome::Ack);
    assert_eq!(sm.ack_floor(), 3);
    sm.apply(Command::Purge);
    assert_eq!(sm.ack_floor(), 4);
}

#[test]
fn snapshot_round_trips_through_postcard() {
    let mut sm = QueueSm::new();
    let a = cid("g1", 1, "a");
    let b = cid("g2", 7, "b");
    sm.apply(Command::Enqueue { now_ms: 0, msgs: vec![published("p", 1), published("p", 3), published("q", 9), plain(4)] });
    enqueue(&mut sm, 3);
    attach(&mut sm, &a, NO_ACK);
    attach(&mut sm, &b, ACK);
    checkout(&mut sm, &b, &[1, 4]);
    checkout(&mut sm, &a, &[0]);
    settle(&mut sm, &b, &[1], Outcome::Requeue);
    sm.apply(Command::Get { holder: cid("g1", 1, ""), no_ack: false, now_ms: 0 });
    let snap = sm.snapshot();
    let bytes = postcard::to_allocvec(&snap).expect("encode");
    let decoded: Snapshot = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(decoded, snap);
    let restored = QueueSm::restore(decoded).expect("valid");
    assert_eq!(restored, sm);
    assert_eq!(restored.snapshot(), snap);
    // Including the dedup window.
    let mut restored = restored;
    let fx = restored.apply(Command::Enqueue { now_ms: 0, msgs: vec![published("p", 3), published("p", 2)] });
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![None, Some(7)] }]);
}

fn prio(size: u32, priority: u8) -> NewMsg {
    NewMsg { size, persistent: true, publish_id: None, ttl_ms: None, priority, ..Default::default() }
}

#[test]
fn priorities_deliver_highest_first_fifo_within_and_requeue_in_place() {
    let limits = Limits { max_priority: Some(5), ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    // Priority 9 is capped at 5.
    let msgs = vec![prio(1, 0), prio(2, 3), prio(3, 9), prio(4, 3), prio(5, 5), prio(6, 1)];
    sm.apply(Command::Enqueue { now_ms: 0, msgs });
    let order: Vec<Seq> = sm.next_ready(usize::MAX).map(|(s, _)| s).collect();
    assert_eq!(order, vec![2, 4, 1, 3, 5, 0]);
    assert_eq!(sm.next_ready(1).map(|(_, m)| m.priority).collect::<Vec<_>>(), vec![5]);
    let a = cid("g1", 1, "a");
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[2, 4, 1]);
    settle(&mut sm, &a, &[1, 2], Outcome::Requeue);
    let order: Vec<Seq> = sm.next_ready(usize::MAX).map(|(s, _)| s).collect();
    assert_eq!(order, vec![2, 1, 3, 5, 0]);
    let getter = cid("g1", 1, "");
    let fx = sm.apply(Command::Get { holder: getter, no_ack: true, now_ms: 0 });
    assert!(matches!(fx.as_slice(), [Effect::Got { msg: Some((2, _)), remaining: 4, .. }, ..]), "{fx:?}");
    // Without x-max-priority every message has priority 0: plain FIFO.
    let mut plain_q = QueueSm::new();
    plain_q.apply(Command::Enqueue { now_ms: 0, msgs: vec![prio(1, 0), prio(2, 7)] });
    assert_eq!(plain_q.next_ready(2).map(|(s, m)| (s, m.priority)).collect::<Vec<_>>(), vec![(0, 0), (1, 0)]);
    let back = QueueSm::restore(sm.snapshot()).map(|mut r| {
        r.set_limits(limits);
        r
    });
    assert_eq!(back, Ok(sm));
}

#[test]
fn delivery_limit_drops_a_message_returned_too_often() {
    let mut sm = QueueSm::with_limits(Limits { delivery_limit: Some(2), ..Limits::default() });
    let a = cid("g1", 1, "a");
    enqueue(&mut sm, 2);
    attach(&mut sm, &a, ACK);
    for count in 0..=2u32 {
        let fx = checkout(&mut sm, &a, &[0]);
        match fx.as_slice() {
            [Effect::Delivered { msgs, .. }] => assert_eq!(msgs[0].1.delivery_count, count),
            other => panic!("unexpected {other:?}"),
        }
        let fx = settle(&mut sm, &a, &[0], Outcome::Requeue);
        if count < 2 {
            assert_eq!(fx, vec![Effect::Requeued { seqs: vec![0] }]);
        } else {
            assert_eq!(fx, vec![Effect::Removed { seqs: vec![0] }]);
        }
    }
    assert_eq!(ready(&sm), vec![(1, false)]);
    // Returns by a channel or gateway going away count too.
    checkout(&mut sm, &a, &[1]);
    assert_eq!(sm.apply(Command::ReturnAll { consumer: a.clone() }), vec![Effect::Requeued { seqs: vec![1] }]);
    checkout(&mut sm, &a, &[1]);
    assert_eq!(sm.apply(Command::ReturnAll { consumer: a.clone() }), vec![Effect::Requeued { seqs: vec![1] }]);
    checkout(&mut sm, &a, &[1]);
    let fx = sm.apply(Command::GatewayDown { gateway: "g1".into() });
    assert_eq!(fx, vec![Effect::Detached { consumer: a }, Effect::Removed { seqs: vec![1] }]);
    assert_eq!((sm.ready_count(), sm.unacked_count(), sm.ack_floor()), (0, 0, 2));
}

#[test]
fn backend_outcome_converts() {
    use sluice_cluster::Outcome as B;
    assert_eq!(Outcome::from(B::Ack), Outcome::Ack);
    assert_eq!(Outcome::from(B::Requeue), Outcome::Requeue);
    assert_eq!(Outcome::from(B::Discard), Outcome::Discard);
}

// ------------------------------------------------------- the naive model

/// Where a message is, in the model.
#[derive(Clone, Debug, PartialEq)]
enum Place {
    Ready,
    Held(ConsumerId),
    Gone,
}

#[derive(Clone, Debug)]
struct ModelMsg {
    meta: MsgMeta,
    place: Place,
}

/// Obviously correct and slow: every message ever enqueued sits in a `Vec`
/// at index = seq; lists are recomputed by scanning.
#[derive(Clone, Debug, Default)]
struct Model {
    msgs: Vec<ModelMsg>,
    /// Attached consumers in attach order.
    consumers: Vec<(ConsumerId, ConsumerOpts)>,
    /// Every publish id ever enqueued (the property tests stay far below
    /// the state machine's dedup bounds).
    seen: Vec<PublishId>,
    deleted: bool,
    /// The queue's limits (x-max-length, x-overflow, x-message-ttl...).
    limits: Limits,
    /// The clock: the latest `now_ms` an `Expire` carried.
    now: u64,
}

impl Model {
    fn next_seq(&self) -> Seq {
        self.msgs.len() as Seq
    }

    fn where_(&self, pred: impl Fn(&Place) -> bool) -> Vec<(Seq, MsgMeta)> {
        self.msgs.iter().enumerate().filter(|(_, m)| pred(&m.place)).map(|(i, m)| (i as Seq, m.meta)).collect()
    }

    /// Ready messages in delivery order: highest priority first, then seq.
    fn ready(&self) -> Vec<(Seq, MsgMeta)> {
        let mut out = self.where_(|p| *p == Place::Ready);
        out.sort_by_key(|(seq, m)| (std::cmp::Reverse(m.priority), *seq));
        out
    }

    /// The index of the first ready message in delivery order.
    fn head(&self) -> Option<usize> {
        self.ready().first().map(|(seq, _)| *seq as usize)
    }

    /// A message back from its holder: ready, redelivered, counted; or
    /// gone when returned more than the delivery limit (returns false).
    fn give_back(&mut self, i: usize) -> bool {
        let limit = self.limits.delivery_limit;
        let m = &mut self.msgs[i];
        m.meta.redelivered = true;
        m.meta.delivery_count += 1;
        if limit.is_some_and(|l| m.meta.delivery_count > l) {
            m.place = Place::Gone;
            false
        } else {
            m.place = Place::Ready;
            true
        }
    }

    fn held(&self, c: &ConsumerId) -> Vec<(Seq, MsgMeta)> {
        self.where_(|p| *p == Place::Held(c.clone()))
    }

    fn holders(&self) -> Vec<ConsumerId> {
        let mut out: Vec<ConsumerId> = self
            .msgs
            .iter()
            .filter_map(|m| match &m.place {
                Place::Held(c) => Some(c.clone()),
                _ => None,
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    fn sorted_consumers(&self) -> Vec<(ConsumerId, ConsumerOpts)> {
        let mut out = self.consumers.clone();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn ack_floor(&self) -> Seq {
        self.msgs.iter().position(|m| m.place != Place::Gone).map_or(self.next_seq(), |i| i as Seq)
    }

    fn msg(&mut self, seq: Seq) -> Option<&mut ModelMsg> {
        usize::try_from(seq).ok().and_then(|i| self.msgs.get_mut(i))
    }

    /// Gives back every message whose place matches: the effects
    /// (requeued, then dropped over the delivery limit, both by seq).
    fn requeue_where(&mut self, pred: impl Fn(&Place) -> bool) -> Vec<Effect> {
        let mut seqs = Vec::new();
        let mut dropped = Vec::new();
        for i in 0..self.msgs.len() {
            if pred(&self.msgs[i].place) {
                if self.give_back(i) {
                    seqs.push(i as Seq);
                } else {
                    dropped.push(i as Seq);
                }
            }
        }
        let mut fx = Vec::new();
        if !seqs.is_empty() {
            fx.push(Effect::Requeued { seqs });
        }
        if !dropped.is_empty() {
            fx.push(Effect::Removed { seqs: dropped });
        }
        fx
    }

    fn with_limits(limits: Limits) -> Self {
        Model { limits, ..Model::default() }
    }

    fn ready_bytes(&self) -> u64 {
        self.ready().iter().map(|(_, m)| u64::from(m.size)).sum()
    }

    fn over(&self, extra_count: u64, extra_bytes: u64) -> bool {
        let count = self.ready().len() as u64 + extra_count;
        let bytes = self.ready_bytes() + extra_bytes;
        self.limits.max_length.is_some_and(|max| count > max)
            || self.limits.max_length_bytes.is_some_and(|max| bytes > max)
    }

    /// Drops ready messages from the first while the first has expired.
    fn expire_head(&mut self, now: u64) -> Vec<Seq> {
        let mut out = Vec::new();
        while let Some(i) = self.head() {
            if !self.msgs[i].meta.expires_at.is_some_and(|at| at <= now) {
                break;
            }
            self.msgs[i].place = Place::Gone;
            out.push(i as Seq);
        }
        out
    }

    fn apply(&mut self, cmd: &Command) -> Vec<Effect> {
        if self.deleted {
            return vec![Effect::Rejected { reason: Rejection::QueueDeleted }];
        }
        match cmd {
            Command::Enqueue { now_ms, msgs } => {
                let mut removed = self.expire_head(*now_ms);
                let mut seqs = Vec::new();
                let mut refused = Vec::new();
                for (pos, m) in msgs.iter().enumerate() {
                    if let Some(p) = &m.publish_id {
                        if self.seen.contains(p) {
                            seqs.push(None);
                            continue;
                        }
                    }
                    if self.limits.overflow != Overflow::DropHead && self.over(1, u64::from(m.size)) {
                        seqs.push(None);
                        refused.push(pos as u32);
                        continue;
                    }
                    if let Some(p) = &m.publish_id {
                        self.seen.push(p.clone());
                    }
                    seqs.push(Some(self.next_seq()));
                    let ttl = [self.limits.message_ttl, m.ttl_ms].into_iter().flatten().min();
                    let expires_at = ttl.map(|t| now_ms + t);
                    let priority = self.limits.max_priority.map_or(0, |max| m.priority.min(max));
                    let meta = MsgMeta {
                        size: m.size,
                        persistent: m.persistent,
                        redelivered: false,
                        expires_at,
                        priority,
                        delivery_count: 0,
                    };
                    self.msgs.push(ModelMsg { meta, place: Place::Ready });
                    while self.over(0, 0) {
                        let Some(i) = self.head() else { break };
                        self.msgs[i].place = Place::Gone;
                        removed.push(i as Seq);
                    }
                }
                let mut fx = vec![Effect::Enqueued { seqs }];
                if !removed.is_empty() {
                    fx.push(Effect::Removed { seqs: removed });
                }
                if !refused.is_empty() {
                    fx.push(Effect::Refused { positions: refused });
                }
                fx
            }
            Command::Expire { now_ms } => {
                self.now = self.now.max(*now_ms);
                let seqs = self.expire_head(*now_ms);
                if seqs.is_empty() {
                    vec![]
                } else {
                    vec![Effect::Removed { seqs }]
                }
            }
            Command::Attach { consumer, opts } => {
                let others: Vec<ConsumerOpts> =
                    self.consumers.iter().filter(|(id, _)| id != consumer).map(|(_, o)| *o).collect();
                if !others.is_empty() && (opts.exclusive || others.iter().any(|o| o.exclusive)) {
                    return vec![Effect::Rejected { reason: Rejection::ExclusiveConflict }];
                }
                self.consumers.retain(|(id, _)| id != consumer);
                self.consumers.push((consumer.clone(), *opts));
                vec![Effect::Attached { consumer: consumer.clone() }]
            }
            Command::Detach { consumer } => {
                self.consumers.retain(|(id, _)| id != consumer);
                vec![Effect::Detached { consumer: consumer.clone() }]
            }
            Command::ReturnAll { consumer } => self.requeue_where(|p| *p == Place::Held(consumer.clone())),
            Command::Checkout { consumer, seqs, now_ms } => {
                let Some(opts) = self.consumers.iter().find(|(id, _)| id == consumer).map(|(_, o)| *o) else {
                    return vec![Effect::Rejected { reason: Rejection::NotAttached }];
                };
                let mut expired = self.expire_head(*now_ms);
                let mut msgs = Vec::new();
                for &seq in seqs {
                    if let Some(m) = self.msg(seq) {
                        if m.place == Place::Ready {
                            if m.meta.expires_at.is_some_and(|at| at <= *now_ms) {
                                m.place = Place::Gone;
                                expired.push(seq);
                                continue;
                            }
                            msgs.push((seq, m.meta));
                            m.place = if opts.no_ack { Place::Gone } else { Place::Held(consumer.clone()) };
                        }
                    }
                }
                let mut fx = Vec::new();
                if !expired.is_empty() {
                    fx.push(Effect::Removed { seqs: expired });
                }
                if msgs.is_empty() {
                    return fx;
                }
                let seqs: Vec<Seq> = msgs.iter().map(|(s, _)| *s).collect();
                fx.push(Effect::Delivered { consumer: consumer.clone(), msgs });
                if opts.no_ack {
                    fx.push(Effect::Removed { seqs });
                }
                fx
            }
            Command::Get { holder, no_ack, now_ms } => {
                let expired = self.expire_head(*now_ms);
                let mut fx = Vec::new();
                if !expired.is_empty() {
                    fx.push(Effect::Removed { seqs: expired });
                }
                let Some(i) = self.head() else {
                    fx.push(Effect::Got { holder: holder.clone(), msg: None, remaining: 0 });
                    return fx;
                };
                self.msgs[i].place = if *no_ack { Place::Gone } else { Place::Held(holder.clone()) };
                let remaining = self.ready().len() as u32;
                fx.push(Effect::Got { holder: holder.clone(), msg: Some((i as Seq, self.msgs[i].meta)), remaining });
                if *no_ack {
                    fx.push(Effect::Removed { seqs: vec![i as Seq] });
                }
                fx
            }
            Command::Settle { consumer, seqs, outcome } => {
                let mut back = Vec::new();
                let mut done = Vec::new();
                for &seq in seqs {
                    let Some(m) = self.msg(seq) else { continue };
                    if m.place != Place::Held(consumer.clone()) {
                        continue;
                    }
                    let i = seq as usize;
                    if *outcome == Outcome::Requeue {
                        if self.give_back(i) {
                            back.push(seq);
                        } else {
                            done.push(seq);
                        }
                    } else {
                        self.msgs[i].place = Place::Gone;
                        done.push(seq);
                    }
                }
                let mut fx = Vec::new();
                if !back.is_empty() {
                    fx.push(Effect::Requeued { seqs: back });
                }
                if !done.is_empty() {
                    fx.push(Effect::Removed { seqs: done });
                }
                fx
            }
            Command::GatewayDown { gateway } => {
                let mut gone: Vec<ConsumerId> =
                    self.consumers.iter().filter(|(id, _)| id.gateway == *gateway).map(|(id, _)| id.clone()).collect();
                gone.sort();
                self.consumers.retain(|(id, _)| id.gateway != *gateway);
                let mut fx: Vec<Effect> = gone.into_iter().map(|consumer| Effect::Detached { consumer }).collect();
                fx.extend(self.requeue_where(|p| matches!(p, Place::Held(c) if c.gateway == *gateway)));
                fx
            }
            // Without a dead-letter exchange (these limits) nothing waits.
            Command::Barrier | Command::DeadLettered { .. } => vec![],
            Command::Purge | Command::DropTransient => {
                let transient_only = matches!(cmd, Command::DropTransient);
                let mut seqs = Vec::new();
                for (i, m) in self.msgs.iter_mut().enumerate() {
                    if m.place == Place::Ready && !(transient_only && m.meta.persistent) {
                        m.place = Place::Gone;
                        seqs.push(i as Seq);
                    }
                }
                let count = seqs.len() as u32;
                let mut fx = Vec::new();
                if !seqs.is_empty() {
                    fx.push(Effect::Removed { seqs });
                }
                fx.push(Effect::Purged { count });
                fx
            }
            Command::Delete => {
                let count = self.ready().len() as u32;
                let mut fx: Vec<Effect> =
                    self.sorted_consumers().into_iter().map(|(consumer, _)| Effect::Cancelled { consumer }).collect();
                for m in &mut self.msgs {
                    m.place = Place::Gone;
                }
                self.consumers.clear();
                self.seen.clear();
                self.deleted = true;
                fx.push(Effect::Deleted { count });
                fx
            }
        }
    }
}

// ------------------------------------------------- generated commands

/// A seq chosen relative to the state when the command is made, so that
/// random sequences hit live messages often and invalid ones too.
#[derive(Clone, Debug)]
enum Pick {
    /// The i-th ready message.
    Ready(usize),
    /// The i-th message the command's consumer holds.
    Mine(usize),
    /// The i-th held message of anyone.
    Anyone(usize),
    /// Any seq up to a few past the last one.
    Raw(u64),
}

#[derive(Clone, Debug)]
enum Op {
    /// (size, persistent, (publisher, id), ttl, priority).
    Enqueue(Vec<(u32, bool, Option<(usize, u64)>, Option<u64>, u8)>),
    /// Advance the clock by this much and expire.
    Expire(u64),
    Attach(usize, bool, bool),
    Detach(usize),
    ReturnAll(usize),
    Checkout(usize, Vec<Pick>),
    Get(usize, bool),
    Settle(usize, Vec<Pick>, Outcome),
    GatewayDown(usize),
    Purge,
    DropTransient,
    Barrier,
    Delete,
}

const GATEWAYS: [&str; 4] = ["g1", "g2", "g10", "g"];
const PUBLISHERS: [&str; 3] = ["p1", "p2", "p3"];

/// A small pool, so that commands meet the same consumers often; "g10"
/// checks that a gateway is not matched by prefix, the empty tag stands for
/// basic.get holders.
fn pool(i: usize) -> ConsumerId {
    const POOL: [(&str, u64, u16, &str); 6] = [
        ("g1", 1, 1, "a"),
        ("g1", 1, 1, "b"),
        ("g1", 2, 3, "a"),
        ("g10", 1, 1, "a"),
        ("g2", 1, 1, "a"),
        ("g2", 1, 1, ""),
    ];
    let (gateway, connection, channel, tag) = POOL[i % POOL.len()];
    ConsumerId { gateway: gateway.into(), connection, channel, tag: tag.into() }
}

fn pick_strategy() -> impl Strategy<Value = Pick> {
    prop_oneof![
        3 => any::<usize>().prop_map(Pick::Ready),
        3 => any::<usize>().prop_map(Pick::Mine),
        2 => any::<usize>().prop_map(Pick::Anyone),
        1 => any::<u64>().prop_map(Pick::Raw),
    ]
}

fn outcome_strategy() -> impl Strategy<Value = Outcome> {
    prop_oneof![Just(Outcome::Ack), Just(Outcome::Requeue), Just(Outcome::Discard)]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let new_msg = (
        1u32..2000,
        any::<bool>(),
        proptest::option::weighted(0.5, (0..PUBLISHERS.len(), 0u64..40)),
        proptest::option::weighted(0.3, 0u64..30),
        prop_oneof![3 => Just(0u8), 2 => 0u8..6, 1 => any::<u8>()],
    );
    let picks = || proptest::collection::vec(pick_strategy(), 0..6);
    // Delete is rare so that most sequences keep going long after it would
    // have made everything else a rejection.
    prop_oneof![
        60 => proptest::collection::vec(new_msg, 0..5).prop_map(Op::Enqueue),
        30 => (0..6usize, proptest::bool::weighted(0.2), proptest::bool::weighted(0.2))
            .prop_map(|(c, e, n)| Op::Attach(c, e, n)),
        10 => (0..6usize).prop_map(Op::Detach),
        10 => (0..6usize).prop_map(Op::ReturnAll),
        60 => (0..6usize, picks()).prop_map(|(c, p)| Op::Checkout(c, p)),
        20 => (0..6usize, any::<bool>()).prop_map(|(c, n)| Op::Get(c, n)),
        60 => (0..6usize, picks(), outcome_strategy()).prop_map(|(c, p, o)| Op::Settle(c, p, o)),
        8 => (0..GATEWAYS.len()).prop_map(Op::GatewayDown),
        6 => Just(Op::Purge),
        4 => Just(Op::DropTransient),
        2 => Just(Op::Barrier),
        20 => (0u64..20).prop_map(Op::Expire),
        2 => Just(Op::Delete),
    ]
}

/// Mostly no limits (the plain queue), else small ones that bite.
fn limits_strategy() -> impl Strategy<Value = Limits> {
    let overflow = prop_oneof![Just(Overflow::DropHead), Just(Overflow::RejectPublish), Just(Overflow::RejectPublishDlx)];
    let some = (
        proptest::option::weighted(0.6, 0u64..6),
        proptest::option::weighted(0.4, 0u64..5000),
        overflow,
        proptest::option::weighted(0.4, 0u64..30),
        proptest::option::weighted(0.4, prop_oneof![0u8..5, Just(255u8)]),
        proptest::option::weighted(0.4, 0u32..4),
    )
        .prop_map(|(max_length, max_length_bytes, overflow, message_ttl, max_priority, delivery_limit)| Limits {
            max_length,
            max_length_bytes,
            overflow,
            message_ttl,
            max_priority,
            delivery_limit,
            ..Limits::default()
        });
    prop_oneof![1 => Just(Limits::default()), 2 => some]
}

fn ops_strategy() -> impl Strategy<Value = Vec<Op>> {
    proptest::collection::vec(op_strategy(), 0..200)
}

fn resolve_pick(pick: &Pick, me: &ConsumerId, model: &Model) -> Seq {
    let nth = |list: Vec<Seq>, i: usize| if list.is_empty() { i as Seq } else { list[i % list.len()] };
    match pick {
        Pick::Ready(i) => nth(model.ready().into_iter().map(|(s, _)| s).collect(), *i),
        Pick::Mine(i) => nth(model.held(me).into_iter().map(|(s, _)| s).collect(), *i),
        Pick::Anyone(i) => nth(model.where_(|p| matches!(p, Place::Held(_))).into_iter().map(|(s, _)| s).collect(), *i),
        Pick::Raw(x) => x % (model.next_seq() + 3),
    }
}

/// The concrete command `op` stands for in the model's current state.
fn resolve(op: &Op, model: &Model) -> Command {
    let picks = |c: usize, ps: &[Pick]| ps.iter().map(|p| resolve_pick(p, &pool(c), model)).collect();
    match op {
        Op::Expire(dt) => Command::Expire { now_ms: model.now + dt },
        Op::Enqueue(msgs) => Command::Enqueue {
            now_ms: model.now,
            msgs: msgs
                .iter()
                .map(|&(size, persistent, pid, ttl_ms, priority)| NewMsg {
                    size,
                    persistent,
                    publish_id: pid.map(|(p, id)| PublishId { publisher: PUBLISHERS[p].into(), id }),
                    ttl_ms,
                    priority,
                    ..NewMsg::default()
                })
                .collect(),
        },
        Op::Attach(c, exclusive, no_ack) => {
            Command::Attach { consumer: pool(*c), opts: ConsumerOpts { exclusive: *exclusive, no_ack: *no_ack } }
        }
        Op::Detach(c) => Command::Detach { consumer: pool(*c) },
        Op::ReturnAll(c) => Command::ReturnAll { consumer: pool(*c) },
        Op::Checkout(c, ps) => Command::Checkout { consumer: pool(*c), seqs: picks(*c, ps), now_ms: model.now },
        Op::Get(c, no_ack) => Command::Get { holder: pool(*c), no_ack: *no_ack, now_ms: model.now },
        Op::Settle(c, ps, outcome) => Command::Settle { consumer: pool(*c), seqs: picks(*c, ps), outcome: *outcome },
        Op::GatewayDown(g) => Command::GatewayDown { gateway: GATEWAYS[*g].into() },
        Op::Purge => Command::Purge,
        Op::DropTransient => Command::DropTransient,
        Op::Barrier => Command::Barrier,
        Op::Delete => Command::Delete,
    }
}

/// The concrete command sequence `ops` stands for, from an empty queue.
fn commands(ops: &[Op], limits: Limits) -> Vec<Command> {
    let mut model = Model::with_limits(limits);
    ops.iter()
        .map(|op| {
            let cmd = resolve(op, &model);
            model.apply(&cmd);
            cmd
        })
        .collect()
}

/// Compares everything observable, and checks the partition invariant on
/// the state machine's own views.
fn same_state(sm: &QueueSm, model: &Model) -> Result<(), TestCaseError> {
    let ready: Vec<(Seq, MsgMeta)> = sm.next_ready(usize::MAX).map(|(s, m)| (s, *m)).collect();
    prop_assert_eq!(&ready, &model.ready());
    let holders: Vec<ConsumerId> = sm.holders().cloned().collect();
    prop_assert_eq!(&holders, &model.holders());
    for h in &holders {
        let held: Vec<(Seq, MsgMeta)> = sm.held_by(h).map(|(s, m)| (s, *m)).collect();
        prop_assert_eq!(held, model.held(h), "held by {:?}", h);
    }
    let consumers: Vec<(ConsumerId, ConsumerOpts)> = sm.consumers().map(|(id, o)| (id.clone(), o)).collect();
    prop_assert_eq!(consumers, model.sorted_consumers());
    prop_assert_eq!(sm.ready_count() as usize, model.ready().len());
    prop_assert_eq!(sm.unacked_count() as usize, model.where_(|p| matches!(p, Place::Held(_))).len());
    prop_assert_eq!(sm.consumer_count() as usize, model.consumers.len());
    prop_assert_eq!(sm.next_seq(), model.next_seq());
    prop_assert_eq!(sm.ack_floor(), model.ack_floor());
    prop_assert_eq!(sm.is_deleted(), model.deleted);

    // Exactly one place per live message, from the machine's views alone.
    let mut live = BTreeSet::new();
    for (seq, _) in sm.next_ready(usize::MAX) {
        prop_assert!(live.insert(seq), "seq {} listed twice", seq);
    }
    for h in &holders {
        let before = live.len();
        for (seq, _) in sm.held_by(h) {
            prop_assert!(live.insert(seq), "seq {} in two places", seq);
        }
        prop_assert!(live.len() > before, "holder {:?} holds nothing", h);
    }
    prop_assert_eq!(live.len(), sm.ready_count() as usize + sm.unacked_count() as usize);
    prop_assert!(live.iter().all(|&s| s >= sm.ack_floor() && s < sm.next_seq()));
    prop_assert_eq!(live.first().copied().unwrap_or(sm.next_seq()), sm.ack_floor());
    Ok(())
}

fn encode_commands(cmds: &[Command]) -> Vec<Vec<u8>> {
    cmds.iter().map(|c| postcard::to_allocvec(c).expect("encode command")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// After every command of a random (often invalid) sequence, the state
    /// machine emits the effects the model predicts and shows the same
    /// state; seqs are assigned once, the ack floor never goes down, and a
    /// snapshot restores to an equal machine.
    #[test]
    fn matches_the_naive_model(ops in ops_strategy(), limits in limits_strategy()) {
        let mut sm = QueueSm::with_limits(limits);
        let mut model = Model::with_limits(limits);
        let mut assigned = BTreeSet::new();
        let mut floor = 0;
        for op in &ops {
            let cmd = resolve(op, &model);
            let want = model.apply(&cmd);
            let got = sm.apply(cmd.clone());
            prop_assert_eq!(&got, &want, "after {:?}", cmd);
            for effect in &got {
                if let Effect::Enqueued { seqs } = effect {
                    for &seq in seqs.iter().flatten() {
                        prop_assert!(assigned.insert(seq), "seq {} assigned twice", seq);
                    }
                }
            }
            same_state(&sm, &model)?;
            prop_assert!(sm.ack_floor() >= floor, "ack floor went down after {:?}", cmd);
            floor = sm.ack_floor();
            let mut restored = QueueSm::restore(sm.snapshot()).expect("valid snapshot");
            restored.set_limits(limits);
            prop_assert_eq!(&restored, &sm);
            // drop-head: after a publish, never more ready messages than
            // allowed (requeues may go over it, as in RabbitMQ).
            let stored = got.iter().any(|e| matches!(e, Effect::Enqueued { seqs } if seqs.iter().any(Option::is_some)));
            if let (Some(max), Overflow::DropHead, true) = (limits.max_length, limits.overflow, stored) {
                prop_assert!(u64::from(sm.ready_count()) <= max);
            }
        }
    }

    /// Snapshotting at any point (through postcard, as a follower receiving
    /// it would) and continuing gives the same effects and the same state
    /// as never snapshotting.
    #[test]
    fn snapshot_anywhere_changes_nothing(
        ops in ops_strategy(),
        at in any::<proptest::sample::Index>(),
        limits in limits_strategy(),
    ) {
        let cmds = commands(&ops, limits);
        let k = at.index(cmds.len() + 1);
        let mut straight = QueueSm::with_limits(limits);
        let all: Vec<Vec<Effect>> = cmds.iter().map(|c| straight.apply(c.clone())).collect();
        let mut first = QueueSm::with_limits(limits);
        for c in &cmds[..k] {
            first.apply(c.clone());
        }
        let bytes = postcard::to_allocvec(&first.snapshot()).expect("encode snapshot");
        let snap: Snapshot = postcard::from_bytes(&bytes).expect("decode snapshot");
        let mut resumed = QueueSm::restore(snap).expect("a snapshot of a live machine is valid");
        resumed.set_limits(limits);
        prop_assert_eq!(&resumed, &first);
        let rest: Vec<Vec<Effect>> = cmds[k..].iter().map(|c| resumed.apply(c.clone())).collect();
        prop_assert_eq!(&all[k..], &rest[..]);
        prop_assert_eq!(&resumed, &straight);
        prop_assert_eq!(resumed.snapshot(), straight.snapshot());
    }

    /// Two replicas, one fed the commands as decoded log entries, emit the
    /// same effects step by step and end with byte-identical snapshots.
    #[test]
    fn replicas_are_deterministic(ops in ops_strategy(), limits in limits_strategy()) {
        let cmds = commands(&ops, limits);
        let log = encode_commands(&cmds);
        let mut leader = QueueSm::with_limits(limits);
        let mut follower = QueueSm::with_limits(limits);
        for (cmd, entry) in cmds.iter().zip(&log) {
            let decoded: Command = postcard::from_bytes(entry).expect("decode command");
            prop_assert_eq!(&decoded, cmd);
            prop_assert_eq!(leader.apply(cmd.clone()), follower.apply(decoded));
        }
        let a = postcard::to_allocvec(&leader.snapshot()).expect("encode");
        let b = postcard::to_allocvec(&follower.snapshot()).expect("encode");
        prop_assert_eq!(a, b);
    }
}
