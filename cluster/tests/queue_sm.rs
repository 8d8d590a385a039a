//! The queue state machine (`replica::queue_sm`): one scenario per command,
//! then property tests against a deliberately naive model (a `Vec` indexed
//! by seq), across snapshot/restore, and for determinism.
#![allow(clippy::expect_used)]

use std::collections::BTreeSet;

use proptest::prelude::*;
use sluice_cluster::replica::queue_sm::{
    Command, ConsumerId, ConsumerOpts, DeadLetter, DeathReason, Effect, Limits, MsgMeta, NewMsg, Outcome, Overflow,
    PublishId, QueueSm, Rejection, Seq, Snapshot, DEDUP_MAX_KEYS,
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
    let first: Vec<(Seq, MsgMeta)> = sm.next_ready(2).collect();
    assert_eq!(
        first,
        vec![
            (0, MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 }),
            (1, MsgMeta { size: 101, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 }),
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
                (1, MsgMeta { size: 101, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 }),
                (0, MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 }),
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
            msgs: vec![(0, MsgMeta { size: 100, persistent: true, redelivered: true, expires_at: None, priority: 0, delivery_count: 1, order_ts: 0, order_pub: 0 })],
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
    let meta0 = MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 };
    assert_eq!(fx, vec![Effect::Got { holder: getter.clone(), msg: Some((0, meta0)), remaining: 2 }]);
    // Held although never attached; settled like any delivery.
    assert_eq!(held(&sm, &getter), vec![0]);
    assert_eq!(sm.consumer_count(), 0);
    let fx = sm.apply(Command::Get { holder: getter.clone(), no_ack: true, now_ms: 0 });
    let meta1 = MsgMeta { size: 101, persistent: false, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 };
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

// ------------------------------------- dead letters, delays, visibility, dedup

fn with_ttl(size: u32, ttl_ms: u64) -> NewMsg {
    NewMsg { ttl_ms: Some(ttl_ms), ..plain(size) }
}

fn delayed(size: u32, delay_ms: u64) -> NewMsg {
    NewMsg { delay_ms: Some(delay_ms), ..plain(size) }
}

fn keyed(key: &str) -> NewMsg {
    NewMsg { dedup_key: Some(key.into()), ..plain(1) }
}

fn enqueue_at(sm: &mut QueueSm, now_ms: u64, msgs: Vec<NewMsg>) -> Vec<Effect> {
    sm.apply(Command::Enqueue { now_ms, msgs })
}

fn expire(sm: &mut QueueSm, now_ms: u64) -> Vec<Effect> {
    sm.apply(Command::Expire { now_ms })
}

fn dead_lettered(sm: &mut QueueSm, ids: &[u64]) -> Vec<Effect> {
    sm.apply(Command::DeadLettered { ids: ids.to_vec() })
}

/// Dead letters as (id, seq, reason).
fn dead(sm: &QueueSm) -> Vec<(u64, Seq, DeathReason)> {
    sm.dead_letters().map(|(id, dl)| (id, dl.seq, dl.reason)).collect()
}

/// A queue with a dead-letter exchange and nothing else.
fn dlx() -> Limits {
    Limits { dead_letter: true, ..Limits::default() }
}

#[test]
fn discard_with_dead_letter_keeps_the_body_live_until_dead_lettered() {
    let mut sm = QueueSm::with_limits(dlx());
    let a = cid("g1", 1, "a");
    enqueue(&mut sm, 3);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[0, 1]);
    // No Removed: the body must stay until the leader published it.
    assert_eq!(settle(&mut sm, &a, &[0], Outcome::Discard), vec![]);
    let meta0 = MsgMeta { size: 100, persistent: true, redelivered: false, expires_at: None, priority: 0, delivery_count: 0, order_ts: 0, order_pub: 0 };
    let listed: Vec<(u64, DeadLetter)> = sm.dead_letters().map(|(id, dl)| (id, *dl)).collect();
    assert_eq!(listed, vec![(0, DeadLetter { seq: 0, meta: meta0, reason: DeathReason::Rejected })]);
    assert!(sm.is_live(0));
    assert!(sm.is_dead_letter(0));
    assert_eq!((sm.live_count(), sm.dead_letter_count(), sm.ack_floor()), (3, 1, 0));
    // Acks still remove at once.
    assert_eq!(settle(&mut sm, &a, &[1], Outcome::Ack), vec![Effect::Removed { seqs: vec![1] }]);
    assert_eq!(sm.ack_floor(), 0, "the dead letter holds the floor");
    // Unknown and repeated ids are skipped.
    assert_eq!(dead_lettered(&mut sm, &[7, 0, 0]), vec![Effect::Removed { seqs: vec![0] }]);
    assert_eq!(dead_lettered(&mut sm, &[0]), vec![]);
    assert!(!sm.is_live(0));
    assert!(!sm.is_dead_letter(0));
    assert_eq!((sm.live_count(), sm.dead_letter_count(), sm.ack_floor()), (1, 0, 2));
}

#[test]
fn dead_letter_reasons_and_ids() {
    let limits = Limits { max_length: Some(2), delivery_limit: Some(0), ..dlx() };
    let mut sm = QueueSm::with_limits(limits);
    let a = cid("g1", 1, "a");
    // drop-head: seq 0 makes room, as dead letter 0.
    assert_eq!(enqueue_at(&mut sm, 0, vec![plain(1), plain(2), plain(3)]), vec![Effect::Enqueued {
        seqs: vec![Some(0), Some(1), Some(2)]
    }]);
    // Over the delivery limit: dead letter 1, with its count raised.
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[1]);
    assert_eq!(settle(&mut sm, &a, &[1], Outcome::Requeue), vec![]);
    // TTL at the head: dead letter 2.
    enqueue_at(&mut sm, 0, vec![with_ttl(4, 5)]);
    let fx = sm.apply(Command::Get { holder: a.clone(), no_ack: true, now_ms: 0 });
    assert_eq!(fx[1], Effect::Removed { seqs: vec![2] });
    assert_eq!(expire(&mut sm, 10), vec![]);
    assert_eq!(
        dead(&sm),
        vec![(0, 0, DeathReason::Maxlen), (1, 1, DeathReason::DeliveryLimit), (2, 3, DeathReason::Expired)]
    );
    let dl1 = sm.dead_letters().nth(1).map(|(_, dl)| dl.meta).expect("dead letter 1");
    assert_eq!((dl1.redelivered, dl1.delivery_count), (true, 1));
    assert_eq!((sm.ready_count(), sm.live_count(), sm.ack_floor()), (0, 3, 0));
    assert_eq!(DeathReason::DeliveryLimit.as_str(), "delivery_limit");
    // Published out of order: the floor moves once the lowest is gone.
    assert_eq!(dead_lettered(&mut sm, &[1]), vec![Effect::Removed { seqs: vec![1] }]);
    assert_eq!(sm.ack_floor(), 0);
    assert_eq!(dead_lettered(&mut sm, &[2, 0]), vec![Effect::Removed { seqs: vec![3, 0] }]);
    assert_eq!(sm.ack_floor(), 4);
    // Ids keep increasing.
    enqueue_at(&mut sm, 0, vec![plain(1), plain(2), plain(3)]);
    assert_eq!(dead(&sm), vec![(3, 4, DeathReason::Maxlen)]);
}

#[test]
fn expiry_in_checkout_get_and_enqueue_dead_letters() {
    let mut sm = QueueSm::with_limits(dlx());
    let a = cid("g1", 1, "a");
    enqueue_at(&mut sm, 0, vec![plain(1), with_ttl(2, 5)]);
    attach(&mut sm, &a, ACK);
    // Checkout: the expired one is dead-lettered, not delivered.
    let fx = sm.apply(Command::Checkout { consumer: a.clone(), seqs: vec![1, 0], now_ms: 5 });
    assert_eq!(delivered_seqs(&fx), vec![0]);
    assert_eq!(fx.len(), 1, "no Removed: {fx:?}");
    assert_eq!(dead(&sm), vec![(0, 1, DeathReason::Expired)]);
    // Get: the expired head goes first.
    enqueue_at(&mut sm, 10, vec![with_ttl(3, 5), plain(4)]); // seqs 2, 3
    let fx = sm.apply(Command::Get { holder: a.clone(), no_ack: false, now_ms: 15 });
    let got = match fx.as_slice() {
        [Effect::Got { msg: Some((seq, _)), .. }] => *seq,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(got, 3);
    // Enqueue: likewise.
    enqueue_at(&mut sm, 20, vec![with_ttl(5, 1)]); // seq 4
    assert_eq!(enqueue_at(&mut sm, 21, vec![plain(6)]), vec![Effect::Enqueued { seqs: vec![Some(5)] }]);
    assert_eq!(
        dead(&sm),
        vec![(0, 1, DeathReason::Expired), (1, 2, DeathReason::Expired), (2, 4, DeathReason::Expired)]
    );
    assert_eq!((sm.live_count(), sm.ack_floor()), (6, 0));
}

#[test]
fn reject_publish_dlx_dead_letters_refused_publishes() {
    let limits = Limits { max_length: Some(1), overflow: Overflow::RejectPublishDlx, ..dlx() };
    let mut sm = QueueSm::with_limits(limits);
    let fx = enqueue_at(&mut sm, 0, vec![published("p", 1), published("p", 2)]);
    // The refused one is nacked *and* gets a seq: its body is kept until
    // it is dead-lettered.
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), Some(1)] }, Effect::Refused { positions: vec![1] }]);
    assert_eq!(dead(&sm), vec![(0, 1, DeathReason::Maxlen)]);
    assert_eq!(ready(&sm), vec![(0, false)]);
    assert_eq!((sm.live_count(), sm.ack_floor()), (2, 0));
    // Refused ids are not remembered: a retry is judged (and refused) again.
    let fx = enqueue_at(&mut sm, 0, vec![published("p", 2)]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(2)] }, Effect::Refused { positions: vec![0] }]);
    assert_eq!(dead(&sm), vec![(0, 1, DeathReason::Maxlen), (1, 2, DeathReason::Maxlen)]);
    // A delayed message is never refused.
    assert_eq!(enqueue_at(&mut sm, 0, vec![delayed(1, 5)]), vec![Effect::Enqueued { seqs: vec![Some(3)] }]);
    assert_eq!(dead_lettered(&mut sm, &[0, 1]), vec![Effect::Removed { seqs: vec![1, 2] }]);
    // Without a dead-letter exchange, reject-publish-dlx is reject-publish.
    let mut plain_q = QueueSm::with_limits(Limits { dead_letter: false, ..limits });
    let fx = enqueue_at(&mut plain_q, 0, vec![plain(1), plain(2)]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), None] }, Effect::Refused { positions: vec![1] }]);
    assert_eq!((plain_q.dead_letter_count(), plain_q.next_seq()), (0, 1));
}

#[test]
fn visibility_timeout_redelivers_and_ignores_a_late_settle() {
    let limits = Limits { visibility_timeout: Some(10), ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    let a = cid("g1", 1, "a");
    let getter = cid("g2", 1, "");
    enqueue(&mut sm, 3);
    attach(&mut sm, &a, ACK);
    assert_eq!(sm.next_timer(), None);
    sm.apply(Command::Checkout { consumer: a.clone(), seqs: vec![0], now_ms: 5 });
    sm.apply(Command::Get { holder: getter.clone(), no_ack: false, now_ms: 8 }); // seq 1
    sm.apply(Command::Get { holder: getter.clone(), no_ack: true, now_ms: 8 }); // seq 2: no deadline
    assert_eq!(sm.next_timer(), Some(15));
    assert_eq!(expire(&mut sm, 14), vec![]);
    assert_eq!(expire(&mut sm, 15), vec![Effect::Requeued { seqs: vec![0] }]);
    assert_eq!(ready(&sm), vec![(0, true)]);
    assert_eq!(held(&sm, &a), Vec::<Seq>::new());
    assert_eq!(sm.next_timer(), Some(18));
    // a's ack comes too late: ignored, the message stays ready.
    assert_eq!(settle(&mut sm, &a, &[0], Outcome::Ack), vec![]);
    assert_eq!(ready(&sm), vec![(0, true)]);
    // Settled in time: no deadline left.
    assert_eq!(settle(&mut sm, &getter, &[1], Outcome::Ack), vec![Effect::Removed { seqs: vec![1] }]);
    assert_eq!(sm.next_timer(), None);
    assert_eq!(expire(&mut sm, 100), vec![]);
    // Redelivered with its count up, and a new deadline from the new hold.
    let fx = sm.apply(Command::Checkout { consumer: a.clone(), seqs: vec![0], now_ms: 100 });
    match fx.as_slice() {
        [Effect::Delivered { msgs, .. }] => assert_eq!((msgs[0].1.redelivered, msgs[0].1.delivery_count), (true, 1)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(sm.next_timer(), Some(110));
    // A settle before the Expire applies still counts, even past the time.
    assert_eq!(settle(&mut sm, &a, &[0], Outcome::Ack), vec![Effect::Removed { seqs: vec![0] }]);
    assert_eq!((sm.live_count(), sm.next_timer()), (0, None));
}

#[test]
fn visibility_timeout_over_the_delivery_limit_dead_letters() {
    let limits = Limits { visibility_timeout: Some(10), delivery_limit: Some(0), ..dlx() };
    let mut sm = QueueSm::with_limits(limits);
    let a = cid("g1", 1, "a");
    enqueue(&mut sm, 2);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[0, 1]);
    assert_eq!(expire(&mut sm, 10), vec![]);
    assert_eq!(dead(&sm), vec![(0, 0, DeathReason::DeliveryLimit), (1, 1, DeathReason::DeliveryLimit)]);
    assert_eq!((sm.unacked_count(), sm.live_count(), sm.next_timer()), (0, 2, None));
    // Without a dead-letter exchange they are removed.
    let mut sm = QueueSm::with_limits(Limits { dead_letter: false, ..limits });
    enqueue(&mut sm, 2);
    attach(&mut sm, &a, ACK);
    checkout(&mut sm, &a, &[1, 0]);
    assert_eq!(expire(&mut sm, 10), vec![Effect::Removed { seqs: vec![0, 1] }]);
}

#[test]
fn delays_release_in_time_order_and_ttl_counts_from_release() {
    let limits = Limits { message_ttl: Some(50), ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    let fx = enqueue_at(&mut sm, 100, vec![delayed(1, 30), plain(2), delayed(3, 10), delayed(4, 0)]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), Some(1), Some(2), Some(3)] }]);
    // A delay of 0 is no delay.
    assert_eq!(ready(&sm), vec![(1, false), (3, false)]);
    assert_eq!((sm.delayed_count(), sm.live_count(), sm.ack_floor()), (2, 4, 0));
    assert!(sm.is_live(0) && sm.is_live(2));
    // Delayed messages are not deliverable before their time.
    let getter = cid("g1", 1, "");
    let fx = sm.apply(Command::Get { holder: getter.clone(), no_ack: true, now_ms: 100 });
    assert!(matches!(fx.as_slice(), [Effect::Got { msg: Some((1, _)), remaining: 1, .. }, _]), "{fx:?}");
    assert_eq!(sm.next_timer(), Some(110), "the first release, before the head's expiry at 150");
    assert_eq!(expire(&mut sm, 109), vec![]);
    assert_eq!(expire(&mut sm, 110), vec![Effect::Requeued { seqs: vec![2] }]);
    // Back at its seq's place in the ready list, its TTL counted from
    // the release: 110 + 50.
    let metas: Vec<(Seq, Option<u64>)> = sm.next_ready(usize::MAX).map(|(s, m)| (s, m.expires_at)).collect();
    assert_eq!(metas, vec![(2, Some(160)), (3, Some(150))]);
    assert_eq!(sm.next_timer(), Some(130));
    // Both due at once: released earliest first. (0 is due at 130.)
    enqueue_at(&mut sm, 110, vec![delayed(5, 10)]); // seq 4, due at 120
    assert_eq!(expire(&mut sm, 130), vec![Effect::Requeued { seqs: vec![4, 0] }]);
    let metas: Vec<(Seq, Option<u64>)> = sm.next_ready(usize::MAX).map(|(s, m)| (s, m.expires_at)).collect();
    assert_eq!(metas, vec![(0, Some(180)), (2, Some(160)), (3, Some(150)), (4, Some(170))]);
    assert_eq!(sm.delayed_count(), 0);
    // Only the head is looked at: 3 (expired at 150) waits behind 0.
    assert_eq!(expire(&mut sm, 160), vec![]);
    sm.apply(Command::Get { holder: getter, no_ack: true, now_ms: 160 });
    assert_eq!(expire(&mut sm, 160), vec![Effect::Removed { seqs: vec![2, 3] }]);
    assert_eq!(ready(&sm), vec![(4, false)]);
}

#[test]
fn delayed_messages_skip_length_limits_and_drop_transient_drops_them() {
    let limits = Limits { max_length: Some(1), overflow: Overflow::RejectPublish, ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    let persistent_delayed = NewMsg { persistent: true, ..delayed(1, 5) };
    let transient_delayed = NewMsg { persistent: false, ..delayed(1, 5) };
    let fx = enqueue_at(&mut sm, 0, vec![plain(2), persistent_delayed, transient_delayed.clone(), plain(3)]);
    assert_eq!(
        fx,
        vec![Effect::Enqueued { seqs: vec![Some(0), Some(1), Some(2), None] }, Effect::Refused { positions: vec![3] }]
    );
    // Released over the limit (as requeues may be).
    assert_eq!(expire(&mut sm, 5), vec![Effect::Requeued { seqs: vec![1, 2] }]);
    assert_eq!(sm.ready_count(), 3);
    // DropTransient: transient ready ones, then transient delayed ones.
    enqueue_at(&mut sm, 5, vec![transient_delayed]); // seq 3
    let fx = sm.apply(Command::DropTransient);
    assert_eq!(fx, vec![Effect::Removed { seqs: vec![2, 3] }, Effect::Purged { count: 2 }]);
    assert_eq!((sm.delayed_count(), ready(&sm)), (0, vec![(0, false), (1, false)]));
    // Purge leaves delayed messages alone.
    enqueue_at(&mut sm, 5, vec![delayed(2, 5)]); // seq 4
    assert_eq!(sm.apply(Command::Purge), vec![Effect::Removed { seqs: vec![0, 1] }, Effect::Purged { count: 2 }]);
    assert_eq!((sm.delayed_count(), sm.ack_floor()), (1, 4));
}

#[test]
fn dedup_window_confirms_duplicates_until_it_ends() {
    let limits = Limits { dedup_window: Some(10), ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    let fx = enqueue_at(&mut sm, 0, vec![keyed("a"), keyed("a"), keyed("b"), plain(1)]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), None, Some(1), Some(2)] }]);
    // Still within the window, even after the original is consumed.
    sm.apply(Command::Purge);
    assert_eq!(enqueue_at(&mut sm, 9, vec![keyed("a")]), vec![Effect::Enqueued { seqs: vec![None] }]);
    // The window is not extended by a duplicate: at 0 + 10 it is over.
    let fx = enqueue_at(&mut sm, 10, vec![keyed("a"), keyed("a"), keyed("b")]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(3), None, Some(4)] }]);
    assert_eq!(enqueue_at(&mut sm, 19, vec![keyed("b")]), vec![Effect::Enqueued { seqs: vec![None] }]);
    assert_eq!(enqueue_at(&mut sm, 20, vec![keyed("b")]), vec![Effect::Enqueued { seqs: vec![Some(5)] }]);
    // A key duplicate still remembers its publish id.
    let both = |id| NewMsg { dedup_key: Some("c".into()), ..published("p", id) };
    assert_eq!(enqueue_at(&mut sm, 20, vec![both(1), both(2)]), vec![Effect::Enqueued { seqs: vec![Some(6), None] }]);
    assert_eq!(enqueue_at(&mut sm, 40, vec![both(2)]), vec![Effect::Enqueued { seqs: vec![None] }]);
    // Without a window, keys mean nothing.
    let mut plain_q = QueueSm::new();
    let fx = enqueue_at(&mut plain_q, 0, vec![keyed("a"), keyed("a")]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), Some(1)] }]);
}

#[test]
fn dedup_keys_beyond_the_bound_forget_the_earliest_window_end() {
    let mut sm = QueueSm::with_limits(Limits { dedup_window: Some(100), ..Limits::default() });
    // One key at 0 (window ends at 100), then the bound's worth at 1.
    enqueue_at(&mut sm, 0, vec![keyed("first")]);
    let many: Vec<NewMsg> = (1..DEDUP_MAX_KEYS).map(|i| keyed(&format!("k{i}"))).collect();
    enqueue_at(&mut sm, 1, many);
    assert_eq!(enqueue_at(&mut sm, 1, vec![keyed("first")]), vec![Effect::Enqueued { seqs: vec![None] }]);
    // One more key: "first" (its window ends first) is forgotten.
    let n = DEDUP_MAX_KEYS as Seq;
    assert_eq!(enqueue_at(&mut sm, 2, vec![keyed("new")]), vec![Effect::Enqueued { seqs: vec![Some(n)] }]);
    assert_eq!(enqueue_at(&mut sm, 2, vec![keyed("k1"), keyed("new")]), vec![Effect::Enqueued { seqs: vec![None, None] }]);
    // Remembered again, which forgets k1 (the lowest of the keys ending at 101).
    assert_eq!(enqueue_at(&mut sm, 2, vec![keyed("first")]), vec![Effect::Enqueued { seqs: vec![Some(n + 1)] }]);
    assert_eq!(enqueue_at(&mut sm, 2, vec![keyed("k2")]), vec![Effect::Enqueued { seqs: vec![None] }]);
    let back = QueueSm::restore(sm.snapshot()).map(|mut r| {
        r.set_limits(sm.limits());
        r
    });
    assert_eq!(back, Ok(sm));
}

#[test]
fn refused_messages_do_not_remember_their_dedup_key() {
    let limits =
        Limits { dedup_window: Some(10), max_length: Some(1), overflow: Overflow::RejectPublish, ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    let fx = enqueue_at(&mut sm, 0, vec![plain(1), keyed("a")]);
    assert_eq!(fx, vec![Effect::Enqueued { seqs: vec![Some(0), None] }, Effect::Refused { positions: vec![1] }]);
    sm.apply(Command::Purge);
    assert_eq!(enqueue_at(&mut sm, 1, vec![keyed("a")]), vec![Effect::Enqueued { seqs: vec![Some(1)] }]);
}

/// A machine using every new feature: dead letters, delayed messages,
/// visibility deadlines, dedup keys.
fn all_features() -> (QueueSm, Limits) {
    let limits = Limits {
        visibility_timeout: Some(10),
        dedup_window: Some(30),
        message_ttl: Some(100),
        delivery_limit: Some(3),
        ..dlx()
    };
    let mut sm = QueueSm::with_limits(limits);
    let a = cid("g1", 1, "a");
    enqueue_at(&mut sm, 0, vec![keyed("x"), keyed("y"), delayed(3, 20), plain(4), published("p", 1)]);
    attach(&mut sm, &a, ACK);
    sm.apply(Command::Checkout { consumer: a.clone(), seqs: vec![0, 1], now_ms: 2 });
    settle(&mut sm, &a, &[1], Outcome::Discard);
    sm.apply(Command::Get { holder: cid("g2", 1, ""), no_ack: false, now_ms: 4 });
    (sm, limits)
}

#[test]
fn snapshot_round_trips_the_new_state() {
    let (mut sm, limits) = all_features();
    assert_eq!((sm.dead_letter_count(), sm.delayed_count(), sm.unacked_count()), (1, 1, 2));
    let snap = sm.snapshot();
    let bytes = postcard::to_allocvec(&snap).expect("encode");
    let decoded: Snapshot = postcard::from_bytes(&bytes).expect("decode");
    assert_eq!(decoded, snap);
    let mut restored = QueueSm::restore(decoded).expect("valid");
    restored.set_limits(limits);
    assert_eq!(restored, sm);
    assert_eq!(restored.snapshot(), snap);
    // And both go on alike: deadlines, the delay, dedup keys, dead letters.
    let next = [
        Command::Expire { now_ms: 12 },
        Command::Enqueue { now_ms: 12, msgs: vec![keyed("x"), keyed("z")] },
        Command::DeadLettered { ids: vec![0, 5] },
        Command::Expire { now_ms: 20 },
        Command::Enqueue { now_ms: 30, msgs: vec![keyed("x"), keyed("y")] },
        Command::Expire { now_ms: 200 },
    ];
    for cmd in next {
        let want = sm.apply(cmd.clone());
        assert_eq!(restored.apply(cmd.clone()), want, "{cmd:?}");
    }
    assert_eq!(restored, sm);
    // Everything left expired at 200: seven dead letters, ids 1 to 7.
    assert_eq!(dead(&sm).iter().map(|(id, _, _)| *id).collect::<Vec<_>>(), (1..=7).collect::<Vec<_>>());
}

// ------------------------------------------------------- the naive model

/// Where a message is, in the model.
#[derive(Clone, Debug, PartialEq)]
enum Place {
    Ready,
    Held(ConsumerId),
    /// Delayed until this time (ms).
    Delayed(u64),
    /// A dead letter not yet published: its id and why.
    Dead(u64, DeathReason),
    Gone,
}

/// `Requeued` then `Removed`, each only when not empty: how the state
/// machine reports messages given back and messages gone.
fn requeued_then_removed(back: Vec<Seq>, removed: Vec<Seq>) -> Vec<Effect> {
    let mut fx = Vec::new();
    if !back.is_empty() {
        fx.push(Effect::Requeued { seqs: back });
    }
    if !removed.is_empty() {
        fx.push(Effect::Removed { seqs: removed });
    }
    fx
}

#[derive(Clone, Debug)]
struct ModelMsg {
    meta: MsgMeta,
    place: Place,
    /// The visibility deadline of its current hold (meaningful only while
    /// `place` is `Held`).
    deadline: Option<u64>,
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
    /// Deduplication keys with the end of their window, in no order.
    keys: Vec<(String, u64)>,
    /// The id the next dead letter gets.
    next_dead: u64,
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

    /// Pending dead letters by id, as the state machine lists them.
    fn dead_letters(&self) -> Vec<(u64, DeadLetter)> {
        let mut out: Vec<(u64, DeadLetter)> = self
            .msgs
            .iter()
            .enumerate()
            .filter_map(|(i, m)| match m.place {
                Place::Dead(id, reason) => Some((id, DeadLetter { seq: i as Seq, meta: m.meta, reason })),
                _ => None,
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out
    }

    fn delayed_count(&self) -> usize {
        self.msgs.iter().filter(|m| matches!(m.place, Place::Delayed(_))).count()
    }

    /// The earliest of: the head's expiry, a delayed message's release, a
    /// held message's visibility deadline.
    fn next_timer(&self) -> Option<u64> {
        let head = self.head().and_then(|i| self.msgs[i].meta.expires_at);
        let others = self.msgs.iter().filter_map(|m| match m.place {
            Place::Delayed(at) => Some(at),
            Place::Held(_) => m.deadline,
            _ => None,
        });
        head.into_iter().chain(others).min()
    }

    /// Message `i` leaves the queue for `reason`: a dead letter with the
    /// next id when the queue has a dead-letter exchange, else gone (its
    /// seq added to `removed`).
    fn drop_msg(&mut self, i: usize, reason: DeathReason, removed: &mut Vec<Seq>) {
        if self.limits.dead_letter {
            self.msgs[i].place = Place::Dead(self.next_dead, reason);
            self.next_dead += 1;
        } else {
            self.msgs[i].place = Place::Gone;
            removed.push(i as Seq);
        }
    }

    /// A message back from its holder: ready, redelivered, counted; or
    /// dropped (dead-lettered) when returned more than the delivery limit
    /// (returns false).
    fn give_back(&mut self, i: usize, removed: &mut Vec<Seq>) -> bool {
        let meta = &mut self.msgs[i].meta;
        meta.redelivered = true;
        meta.delivery_count += 1;
        if self.limits.delivery_limit.is_some_and(|l| meta.delivery_count > l) {
            self.drop_msg(i, DeathReason::DeliveryLimit, removed);
            false
        } else {
            self.msgs[i].place = Place::Ready;
            true
        }
    }

    /// Message `i` is now held by `c` (at `now`).
    fn hold(&mut self, i: usize, c: &ConsumerId, now: u64) {
        self.msgs[i].place = Place::Held(c.clone());
        self.msgs[i].deadline = self.limits.visibility_timeout.map(|t| now + t);
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

    /// Gives back everything the holders matching `pred` hold, holder by
    /// holder (in id order), each in seq order: the effects (requeued,
    /// then dropped over the delivery limit, both by seq).
    fn requeue_holders(&mut self, pred: impl Fn(&ConsumerId) -> bool) -> Vec<Effect> {
        let mut seqs = Vec::new();
        let mut dropped = Vec::new();
        for holder in self.holders().into_iter().filter(|h| pred(h)) {
            for i in 0..self.msgs.len() {
                if self.msgs[i].place == Place::Held(holder.clone()) && self.give_back(i, &mut dropped) {
                    seqs.push(i as Seq);
                }
            }
        }
        seqs.sort_unstable();
        dropped.sort_unstable();
        requeued_then_removed(seqs, dropped)
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

    /// Drops (dead-letters) ready messages from the first while the first
    /// has expired.
    fn expire_head(&mut self, now: u64, removed: &mut Vec<Seq>) {
        while let Some(i) = self.head() {
            if self.msgs[i].meta.expires_at.is_none_or(|at| at > now) {
                break;
            }
            self.drop_msg(i, DeathReason::Expired, removed);
        }
    }

    fn push(&mut self, meta: MsgMeta, place: Place) -> Seq {
        self.msgs.push(ModelMsg { meta, place, deadline: None });
        self.next_seq() - 1
    }

    fn apply(&mut self, cmd: &Command) -> Vec<Effect> {
        if self.deleted {
            return vec![Effect::Rejected { reason: Rejection::QueueDeleted }];
        }
        match cmd {
            Command::Enqueue { now_ms, msgs } => {
                let now = *now_ms;
                let mut removed = Vec::new();
                self.expire_head(now, &mut removed);
                self.keys.retain(|(_, until)| *until > now);
                let mut seqs = Vec::new();
                let mut refused = Vec::new();
                for (pos, m) in msgs.iter().enumerate() {
                    if let Some(p) = &m.publish_id {
                        if self.seen.contains(p) {
                            seqs.push(None);
                            continue;
                        }
                    }
                    let key = m.dedup_key.clone().filter(|_| self.limits.dedup_window.is_some());
                    if key.as_ref().is_some_and(|k| self.keys.iter().any(|(known, _)| known == k)) {
                        self.seen.extend(m.publish_id.clone());
                        seqs.push(None);
                        continue;
                    }
                    let ready_at = m.delay_ms.filter(|d| *d > 0).map(|d| now + d);
                    let ttl = [self.limits.message_ttl, m.ttl_ms].into_iter().flatten().min();
                    let expires_at = ttl.map(|t| ready_at.unwrap_or(now) + t);
                    let priority = self.limits.max_priority.map_or(0, |max| m.priority.min(max));
                    let meta = MsgMeta {
                        size: m.size,
                        persistent: m.persistent,
                        redelivered: false,
                        expires_at,
                        priority,
                        delivery_count: 0,
                        // Strict ordering is not generated (no `strict_window`).
                        order_ts: 0,
                        order_pub: 0,
                    };
                    let rejecting = self.limits.overflow != Overflow::DropHead;
                    if rejecting && ready_at.is_none() && self.over(1, u64::from(m.size)) {
                        refused.push(pos as u32);
                        if self.limits.overflow == Overflow::RejectPublishDlx && self.limits.dead_letter {
                            let seq = self.push(meta, Place::Gone);
                            self.drop_msg(seq as usize, DeathReason::Maxlen, &mut removed);
                            seqs.push(Some(seq));
                        } else {
                            seqs.push(None);
                        }
                        continue;
                    }
                    self.seen.extend(m.publish_id.clone());
                    if let (Some(k), Some(w)) = (key, self.limits.dedup_window) {
                        self.keys.push((k, now + w));
                    }
                    let place = ready_at.map_or(Place::Ready, Place::Delayed);
                    seqs.push(Some(self.push(meta, place)));
                    while ready_at.is_none() && self.over(0, 0) {
                        let Some(i) = self.head() else { break };
                        self.drop_msg(i, DeathReason::Maxlen, &mut removed);
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
                let now = *now_ms;
                self.now = self.now.max(now);
                let mut back = Vec::new();
                let mut removed = Vec::new();
                // Due delayed messages become ready, earliest first.
                let mut due: Vec<(u64, usize)> = (0..self.msgs.len())
                    .filter_map(|i| match self.msgs[i].place {
                        Place::Delayed(at) if at <= now => Some((at, i)),
                        _ => None,
                    })
                    .collect();
                due.sort_unstable();
                for (_, i) in due {
                    self.msgs[i].place = Place::Ready;
                    back.push(i as Seq);
                }
                // Held messages past their visibility deadline come back,
                // earliest deadline first.
                let mut late: Vec<(u64, usize)> = (0..self.msgs.len())
                    .filter_map(|i| match (&self.msgs[i].place, self.msgs[i].deadline) {
                        (Place::Held(_), Some(at)) if at <= now => Some((at, i)),
                        _ => None,
                    })
                    .collect();
                late.sort_unstable();
                for (_, i) in late {
                    if self.give_back(i, &mut removed) {
                        back.push(i as Seq);
                    }
                }
                self.expire_head(now, &mut removed);
                requeued_then_removed(back, removed)
            }
            Command::DeadLettered { ids } => {
                let mut seqs = Vec::new();
                for id in ids {
                    if let Some(i) = self.msgs.iter().position(|m| matches!(m.place, Place::Dead(d, _) if d == *id)) {
                        self.msgs[i].place = Place::Gone;
                        seqs.push(i as Seq);
                    }
                }
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
            Command::ReturnAll { consumer } => self.requeue_holders(|h| h == consumer),
            Command::Checkout { consumer, seqs, now_ms } => {
                let Some(opts) = self.consumers.iter().find(|(id, _)| id == consumer).map(|(_, o)| *o) else {
                    return vec![Effect::Rejected { reason: Rejection::NotAttached }];
                };
                let mut expired = Vec::new();
                self.expire_head(*now_ms, &mut expired);
                let mut msgs = Vec::new();
                for &seq in seqs {
                    let Some(m) = self.msg(seq) else { continue };
                    if m.place != Place::Ready {
                        continue;
                    }
                    let (i, meta) = (seq as usize, m.meta);
                    if meta.expires_at.is_some_and(|at| at <= *now_ms) {
                        self.drop_msg(i, DeathReason::Expired, &mut expired);
                    } else if opts.no_ack {
                        msgs.push((seq, meta));
                        self.msgs[i].place = Place::Gone;
                    } else {
                        msgs.push((seq, meta));
                        self.hold(i, consumer, *now_ms);
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
                let mut expired = Vec::new();
                self.expire_head(*now_ms, &mut expired);
                let mut fx = Vec::new();
                if !expired.is_empty() {
                    fx.push(Effect::Removed { seqs: expired });
                }
                let Some(i) = self.head() else {
                    fx.push(Effect::Got { holder: holder.clone(), msg: None, remaining: 0 });
                    return fx;
                };
                if *no_ack {
                    self.msgs[i].place = Place::Gone;
                } else {
                    self.hold(i, holder, *now_ms);
                }
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
                    if self.msg(seq).is_none_or(|m| m.place != Place::Held(consumer.clone())) {
                        continue;
                    }
                    let i = seq as usize;
                    match outcome {
                        Outcome::Requeue => {
                            if self.give_back(i, &mut done) {
                                back.push(seq);
                            }
                        }
                        Outcome::Discard => self.drop_msg(i, DeathReason::Rejected, &mut done),
                        Outcome::Ack => {
                            self.msgs[i].place = Place::Gone;
                            done.push(seq);
                        }
                    }
                }
                requeued_then_removed(back, done)
            }
            Command::GatewayDown { gateway } => {
                let mut gone: Vec<ConsumerId> =
                    self.consumers.iter().filter(|(id, _)| id.gateway == *gateway).map(|(id, _)| id.clone()).collect();
                gone.sort();
                self.consumers.retain(|(id, _)| id.gateway != *gateway);
                let mut fx: Vec<Effect> = gone.into_iter().map(|consumer| Effect::Detached { consumer }).collect();
                fx.extend(self.requeue_holders(|h| h.gateway == *gateway));
                fx
            }
            Command::Barrier => vec![],
            Command::MarkRedelivered => {
                // Only ready messages: delayed and held-back ones never
                // went out.
                for m in self.msgs.iter_mut().filter(|m| m.place == Place::Ready) {
                    m.meta.redelivered = true;
                }
                vec![]
            }
            Command::Purge | Command::DropTransient => {
                // Purge drops the ready messages; DropTransient the
                // transient ready ones, then the transient delayed ones.
                // Neither dead-letters.
                let transient_only = matches!(cmd, Command::DropTransient);
                let mut seqs = Vec::new();
                for delayed in [false, true] {
                    if delayed && !transient_only {
                        continue;
                    }
                    for (i, m) in self.msgs.iter_mut().enumerate() {
                        let right_place =
                            if delayed { matches!(m.place, Place::Delayed(_)) } else { m.place == Place::Ready };
                        if right_place && !(transient_only && m.meta.persistent) {
                            m.place = Place::Gone;
                            seqs.push(i as Seq);
                        }
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
            Command::Retire => {
                // Every live message (ready, held, delayed), in seq order.
                let mut removed = Vec::new();
                let mut count = 0;
                for i in 0..self.msgs.len() {
                    if matches!(self.msgs[i].place, Place::Ready | Place::Held(_) | Place::Delayed(_)) {
                        self.msgs[i].deadline = None;
                        self.drop_msg(i, DeathReason::QueueDeleted, &mut removed);
                        count += 1;
                    }
                }
                let mut fx = Vec::new();
                if !removed.is_empty() {
                    fx.push(Effect::Removed { seqs: removed });
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
                self.keys.clear();
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

/// A dead-letter id chosen relative to the state, like [`Pick`].
#[derive(Clone, Debug)]
enum DeadPick {
    /// The i-th pending dead letter.
    Pending(usize),
    /// Any id up to a few past the last one given (mostly unknown ids,
    /// or ones already published).
    Raw(u64),
}

/// One generated message.
#[derive(Clone, Debug)]
struct GenMsg {
    size: u32,
    persistent: bool,
    /// (publisher, id).
    publish_id: Option<(usize, u64)>,
    ttl_ms: Option<u64>,
    priority: u8,
    delay_ms: Option<u64>,
    /// Index into [`DEDUP_KEYS`].
    dedup_key: Option<usize>,
}

#[derive(Clone, Debug)]
enum Op {
    Enqueue(Vec<GenMsg>),
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
    MarkRedelivered,
    DeadLettered(Vec<DeadPick>),
    Retire,
    Delete,
}

const GATEWAYS: [&str; 4] = ["g1", "g2", "g10", "g"];
const PUBLISHERS: [&str; 3] = ["p1", "p2", "p3"];
/// Few keys, so that duplicates within and across windows are common.
const DEDUP_KEYS: [&str; 4] = ["k0", "k1", "k2", "k3"];

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

fn dead_pick_strategy() -> impl Strategy<Value = DeadPick> {
    prop_oneof![
        4 => any::<usize>().prop_map(DeadPick::Pending),
        1 => any::<u64>().prop_map(DeadPick::Raw),
    ]
}

fn outcome_strategy() -> impl Strategy<Value = Outcome> {
    prop_oneof![Just(Outcome::Ack), Just(Outcome::Requeue), Just(Outcome::Discard)]
}

fn gen_msg_strategy() -> impl Strategy<Value = GenMsg> {
    (
        1u32..2000,
        any::<bool>(),
        proptest::option::weighted(0.5, (0..PUBLISHERS.len(), 0u64..40)),
        proptest::option::weighted(0.3, 0u64..30),
        prop_oneof![3 => Just(0u8), 2 => 0u8..6, 1 => any::<u8>()],
        // Some(0) included: no delay at all.
        proptest::option::weighted(0.2, 0u64..25),
        proptest::option::weighted(0.3, 0..DEDUP_KEYS.len()),
    )
        .prop_map(|(size, persistent, publish_id, ttl_ms, priority, delay_ms, dedup_key)| GenMsg {
            size,
            persistent,
            publish_id,
            ttl_ms,
            priority,
            delay_ms,
            dedup_key,
        })
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let picks = || proptest::collection::vec(pick_strategy(), 0..6);
    // Delete is rare so that most sequences keep going long after it would
    // have made everything else a rejection.
    prop_oneof![
        60 => proptest::collection::vec(gen_msg_strategy(), 0..5).prop_map(Op::Enqueue),
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
        3 => Just(Op::MarkRedelivered),
        25 => (0u64..20).prop_map(Op::Expire),
        15 => proptest::collection::vec(dead_pick_strategy(), 0..4).prop_map(Op::DeadLettered),
        2 => Just(Op::Retire),
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
        any::<bool>(),
        proptest::option::weighted(0.4, 0u64..30),
        proptest::option::weighted(0.4, 0u64..30),
    )
        .prop_map(
            |(
                max_length,
                max_length_bytes,
                overflow,
                message_ttl,
                max_priority,
                delivery_limit,
                dead_letter,
                visibility_timeout,
                dedup_window,
            )| Limits {
                max_length,
                max_length_bytes,
                overflow,
                message_ttl,
                max_priority,
                delivery_limit,
                dead_letter,
                visibility_timeout,
                dedup_window,
                ..Limits::default()
            },
        );
    prop_oneof![1 => Just(Limits::default()), 3 => some]
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

fn resolve_dead_pick(pick: &DeadPick, model: &Model) -> u64 {
    match pick {
        DeadPick::Pending(i) => {
            let pending: Vec<u64> = model.dead_letters().into_iter().map(|(id, _)| id).collect();
            if pending.is_empty() { *i as u64 } else { pending[i % pending.len()] }
        }
        DeadPick::Raw(x) => x % (model.next_dead + 3),
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
                .map(|m| NewMsg {
                    size: m.size,
                    persistent: m.persistent,
                    publish_id: m.publish_id.map(|(p, id)| PublishId { publisher: PUBLISHERS[p].into(), id }),
                    ttl_ms: m.ttl_ms,
                    priority: m.priority,
                    delay_ms: m.delay_ms,
                    dedup_key: m.dedup_key.map(|k| DEDUP_KEYS[k].to_owned()),
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
        Op::MarkRedelivered => Command::MarkRedelivered,
        Op::DeadLettered(ps) => Command::DeadLettered { ids: ps.iter().map(|p| resolve_dead_pick(p, model)).collect() },
        Op::Retire => Command::Retire,
        Op::Delete => Command::Delete,
    }
}

/// The concrete command sequence `op` stands for, from an empty queue.
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
    let ready: Vec<(Seq, MsgMeta)> = sm.next_ready(usize::MAX).collect();
    prop_assert_eq!(&ready, &model.ready());
    let holders: Vec<ConsumerId> = sm.holders().cloned().collect();
    prop_assert_eq!(&holders, &model.holders());
    for h in &holders {
        let held: Vec<(Seq, MsgMeta)> = sm.held_by(h).map(|(s, m)| (s, *m)).collect();
        prop_assert_eq!(held, model.held(h), "held by {:?}", h);
    }
    let consumers: Vec<(ConsumerId, ConsumerOpts)> = sm.consumers().map(|(id, o)| (id.clone(), o)).collect();
    prop_assert_eq!(consumers, model.sorted_consumers());
    let dead: Vec<(u64, DeadLetter)> = sm.dead_letters().map(|(id, dl)| (id, *dl)).collect();
    prop_assert_eq!(&dead, &model.dead_letters());
    prop_assert_eq!(sm.ready_count() as usize, model.ready().len());
    prop_assert_eq!(sm.ready_bytes(), model.ready_bytes());
    prop_assert_eq!(sm.unacked_count() as usize, model.where_(|p| matches!(p, Place::Held(_))).len());
    prop_assert_eq!(sm.delayed_count() as usize, model.delayed_count());
    prop_assert_eq!(sm.dead_letter_count() as usize, dead.len());
    prop_assert_eq!(sm.live_count(), model.msgs.iter().filter(|m| m.place != Place::Gone).count());
    prop_assert_eq!(sm.consumer_count() as usize, model.consumers.len());
    prop_assert_eq!(sm.next_seq(), model.next_seq());
    prop_assert_eq!(sm.ack_floor(), model.ack_floor());
    prop_assert_eq!(sm.next_timer(), model.next_timer());
    prop_assert_eq!(sm.next_expiry(), model.head().and_then(|i| model.msgs[i].meta.expires_at));
    prop_assert_eq!(sm.is_deleted(), model.deleted);
    for id in 0..model.next_dead + 2 {
        let pending = dead.iter().any(|(d, _)| *d == id);
        prop_assert_eq!(sm.is_dead_letter(id), pending, "dead letter {}", id);
    }

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
    for (_, dl) in sm.dead_letters() {
        prop_assert!(live.insert(dl.seq), "dead letter seq {} in two places", dl.seq);
    }
    prop_assert_eq!(live.len(), sm.ready_count() as usize + sm.unacked_count() as usize + sm.dead_letter_count() as usize);
    prop_assert!(live.iter().all(|&s| s >= sm.ack_floor() && s < sm.next_seq()));
    prop_assert!(live.iter().all(|&s| sm.is_live(s)));
    // What is live and neither ready, held nor a dead letter is delayed.
    let live_seqs: Vec<Seq> = (sm.ack_floor()..sm.next_seq() + 2).filter(|&s| sm.is_live(s)).collect();
    let delayed = live_seqs.iter().filter(|s| !live.contains(s)).count();
    prop_assert_eq!(delayed, sm.delayed_count() as usize);
    prop_assert_eq!(live_seqs.len(), sm.live_count());
    prop_assert_eq!(live_seqs.first().copied().unwrap_or(sm.next_seq()), sm.ack_floor());
    for (i, m) in model.msgs.iter().enumerate() {
        prop_assert_eq!(sm.is_live(i as Seq), m.place != Place::Gone, "is_live({})", i);
    }
    Ok(())
}

fn encode_commands(cmds: &[Command]) -> Vec<Vec<u8>> {
    cmds.iter().map(|c| postcard::to_allocvec(c).expect("encode command")).collect()
}

proptest! {
    // More cases here: the features combine (a dead-letter exchange, a
    // delivery limit, visibility timeouts, delays...) and some
    // combinations are rare. About 10 s on two cores in a debug build.
    #![proptest_config(ProptestConfig::with_cases(512))]

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
            // Only a message that went to the ready list counts (a delayed
            // one does not make room, a refused dead-lettered one has a seq
            // but is not ready).
            let stored = match (&cmd, got.first()) {
                (Command::Enqueue { msgs, .. }, Some(Effect::Enqueued { seqs })) => {
                    msgs.iter().zip(seqs).any(|(m, s)| s.is_some() && m.delay_ms.is_none_or(|d| d == 0))
                }
                _ => false,
            };
            if let (Some(max), Overflow::DropHead, true) = (limits.max_length, limits.overflow, stored) {
                prop_assert!(u64::from(sm.ready_count()) <= max);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

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
        // What checkpoints encode (the ready list borrowed) is the same.
        prop_assert_eq!(&postcard::to_allocvec(&first.snapshot_ref()).expect("encode snapshot_ref"), &bytes);
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

// ------------------------------------------------------ strict ordering

fn stamped(publisher: &str, id: u64, ts: u64) -> NewMsg {
    NewMsg { timestamp_ms: Some(ts), ..published(publisher, id) }
}

/// Enqueues `msgs` one command each (at time 100), releases them (time
/// 200, past the window) and returns the release order as (publisher, id).
fn strict_release_order(msgs: &[(&str, u64, u64)]) -> Vec<(String, u64)> {
    let limits = Limits { strict_window: Some(50), ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    let mut by_seq = std::collections::BTreeMap::new();
    for (p, id, ts) in msgs {
        let fx = sm.apply(Command::Enqueue { now_ms: 100, msgs: vec![stamped(p, *id, *ts)] });
        let [Effect::Enqueued { seqs }] = fx.as_slice() else { panic!("{fx:?}") };
        by_seq.insert(seqs[0].expect("enqueued"), ((*p).to_owned(), *id));
    }
    assert!(ready(&sm).is_empty(), "held for the window");
    assert_eq!(sm.next_timer(), Some(msgs.iter().map(|m| m.2).min().expect("messages") + 50));
    sm.apply(Command::Expire { now_ms: 200 });
    ready(&sm).into_iter().map(|(seq, _)| by_seq[&seq].clone()).collect()
}

#[test]
fn strict_ordering_breaks_timestamp_ties_by_publisher_then_sequence_whatever_the_arrival_order() {
    // p and q publish at the same milliseconds; they arrive interleaved
    // differently (as through two gateways); one stamp is earlier.
    let a = [("p", 1, 10), ("q", 1, 10), ("p", 2, 10), ("q", 2, 10), ("q", 3, 5)];
    let b = [("q", 1, 10), ("q", 2, 10), ("p", 1, 10), ("q", 3, 5), ("p", 2, 10)];
    let first = strict_release_order(&a);
    let second = strict_release_order(&b);
    assert_eq!(first, second, "the release order does not depend on the arrival order");
    assert_eq!(first[0], ("q".to_owned(), 3), "the earliest stamp first");
    // The ties: one publisher's messages together, each in its sequence.
    let rest: Vec<&(String, u64)> = first[1..].iter().collect();
    let publishers: Vec<&str> = rest.iter().map(|(p, _)| p.as_str()).collect();
    assert!(publishers == ["p", "p", "q", "q"] || publishers == ["q", "q", "p", "p"], "{first:?}");
    for p in ["p", "q"] {
        let ids: Vec<u64> = rest.iter().filter(|(x, _)| x == p).map(|(_, id)| *id).collect();
        assert_eq!(ids, [1, 2], "{p} in its own order");
    }
}

#[test]
fn strict_ordering_dead_letters_a_message_stamped_before_one_released() {
    let limits = Limits { strict_window: Some(50), dead_letter: true, ..Limits::default() };
    let mut sm = QueueSm::with_limits(limits);
    sm.apply(Command::Enqueue { now_ms: 100, msgs: vec![stamped("p", 1, 100)] });
    sm.apply(Command::Expire { now_ms: 150 });
    assert_eq!(ready(&sm).len(), 1);
    // Stamped 90: before the released 100.
    let fx = sm.apply(Command::Enqueue { now_ms: 160, msgs: vec![stamped("q", 1, 90)] });
    let [Effect::Enqueued { seqs }] = fx.as_slice() else { panic!("{fx:?}") };
    let late = seqs[0].expect("logged, then dead-lettered");
    assert_eq!(dead(&sm), vec![(0, late, DeathReason::Late)]);
    assert_eq!(ready(&sm).len(), 1, "the late one is not delivered");
    // Retire (x-dead-letter-on-delete) takes the rest, reason queue_deleted.
    sm.apply(Command::Enqueue { now_ms: 170, msgs: vec![stamped("p", 2, 170)] });
    assert_eq!(sm.apply(Command::Retire), vec![Effect::Purged { count: 2 }]);
    let reasons: Vec<DeathReason> = dead(&sm).into_iter().map(|(_, _, r)| r).collect();
    assert_eq!(reasons, [DeathReason::Late, DeathReason::QueueDeleted, DeathReason::QueueDeleted]);
    assert!(ready(&sm).is_empty());
    assert_eq!(sm.next_timer(), None, "nothing held back any more");
}
