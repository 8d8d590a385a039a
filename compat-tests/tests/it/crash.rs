//! kill -9 in the middle of a confirmed publish stream: after a restart on
//! the same data dir every confirmed message is there exactly once.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;

use crate::common::*;

#[tokio::test]
async fn confirmed_messages_survive_kill_9_exactly_once() {
    let mut s = Server::start();
    let (_c, ch) = open(&s).await;
    declare_durable(&ch, "crash").await;
    let confirmed: Arc<Mutex<HashSet<u64>>> = Arc::default();

    // Several publishers so that group commit is exercised too.
    let mut tasks = Vec::new();
    for p in 0..4u64 {
        let url = s.url();
        let confirmed = confirmed.clone();
        tasks.push(tokio::spawn(async move {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
            let ch = conn.create_channel().await.unwrap();
            ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
            let mut window = std::collections::VecDeque::new();
            for i in 0..1_000_000u64 {
                let id = p << 32 | i;
                let Ok(pc) = ch
                    .basic_publish("".into(), "crash".into(), BasicPublishOptions::default(), &id.to_be_bytes(), persistent())
                    .await
                else {
                    return;
                };
                window.push_back((id, pc));
                if window.len() >= 64 {
                    let (id, pc) = window.pop_front().unwrap();
                    match pc.await {
                        Ok(c) if c.is_ack() => {
                            confirmed.lock().unwrap().insert(id);
                        }
                        _ => return,
                    }
                }
            }
        }));
    }
    // Let the stream run until a good number of confirms arrived, then kill.
    for _ in 0..600 {
        if confirmed.lock().unwrap().len() >= 3000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    s.kill9();
    for t in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(20), t).await;
    }
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(confirmed.len() >= 1000, "only {} confirms before the kill", confirmed.len());

    s.restart();
    let (_c, ch) = open(&s).await;
    let q = ch.queue_declare("crash".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    let total = q.message_count() as usize;
    assert!(total >= confirmed.len(), "{} messages after restart, {} were confirmed", total, confirmed.len());
    let mut consumer = ch
        .basic_consume("crash".into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap();
    let mut seen = HashSet::new();
    for _ in 0..total {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await.unwrap().unwrap().unwrap();
        let id = u64::from_be_bytes(d.data.as_slice().try_into().unwrap());
        assert!(seen.insert(id), "message {id:#x} delivered twice");
    }
    let missing: Vec<_> = confirmed.difference(&seen).collect();
    assert!(missing.is_empty(), "{} confirmed messages lost, e.g. {:?}", missing.len(), missing.iter().take(5).collect::<Vec<_>>());
}

/// Incompressible bytes (the journal compresses large values).
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

#[tokio::test]
async fn failed_disk_write_nacks_then_closes_with_506_and_loses_nothing_confirmed() {
    let mut s = Server::start_for_disk_full();
    let (c, ch) = open(&s).await;
    declare_durable(&ch, "full").await;
    // From now on no write may reach past 3 MiB in any file: writes fail
    // with EFBIG, as on a full disk.
    s.limit_file_size(3 << 20);
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut acked = Vec::new();
    let mut nacked = None;
    for i in 0..200u64 {
        let mut body = i.to_be_bytes().to_vec();
        body.extend(noise(i, 64 << 10));
        let confirm = ch
            .basic_publish("".into(), "full".into(), BasicPublishOptions::default(), &body, persistent())
            .await
            .unwrap()
            .await
            .unwrap();
        if confirm.is_ack() {
            acked.push(i);
        } else {
            nacked = Some(i);
            break;
        }
    }
    assert!(nacked.is_some(), "the broker confirmed 12 MiB on a 3 MiB file limit");
    assert!(!acked.is_empty());
    // A durable declare cannot be stored either: 506 on the connection.
    let ch2 = channel(&c).await;
    let err = ch2
        .queue_declare("another".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 506, "{err}");

    // Without the limit, every acknowledged message is there.
    s.kill9();
    let mut s2 = sluice_compat_tests::Server::spawn(&s.data_dir, &[]).expect("restart");
    let (_c, ch) = open(&s2).await;
    let q = ch.queue_declare("full".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default()).await.unwrap();
    assert!(q.message_count() as usize >= acked.len(), "{} messages, {} acked", q.message_count(), acked.len());
    let mut seen = HashSet::new();
    for _ in 0..q.message_count() {
        let m = ch.basic_get("full".into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        let id = u64::from_be_bytes(m.delivery.data[..8].try_into().unwrap());
        assert_eq!(&m.delivery.data[8..], noise(id, 64 << 10).as_slice(), "message {id} corrupt");
        seen.insert(id);
    }
    for id in &acked {
        assert!(seen.contains(id), "acknowledged message {id} lost");
    }
    s2.kill9();
}

/// Publishes `n` persistent messages to `queue` and takes the first `taken`
/// with basic.get without acking them.
async fn publish_and_take(ch: &lapin::Channel, queue: &str, n: u8, taken: u8) {
    declare_durable(ch, queue).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for i in 0..n {
        ch.basic_publish("".into(), queue.into(), BasicPublishOptions::default(), &[i], persistent()).await.unwrap().await.unwrap();
    }
    for i in 0..taken {
        let m = ch.basic_get(queue.into(), BasicGetOptions::default()).await.unwrap().unwrap();
        assert_eq!(m.delivery.data, vec![i]);
        assert!(!m.delivery.redelivered);
    }
}

async fn redelivered_flags(s: &Server, queue: &str, n: u8) -> Vec<bool> {
    let (_c, ch) = open(s).await;
    wait_ready(&ch, queue, n as u32).await;
    let mut flags = Vec::new();
    for i in 0..n {
        let m = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.unwrap().unwrap();
        assert_eq!(m.delivery.data, vec![i]);
        flags.push(m.delivery.redelivered);
    }
    flags
}

#[tokio::test]
async fn after_clean_restart_only_delivered_messages_are_flagged_redelivered() {
    let mut s = Server::start();
    {
        let (_c, ch) = open(&s).await;
        publish_and_take(&ch, "flags", 4, 2).await;
        assert!(s.terminate().unwrap().success());
    }
    s.restart();
    assert_eq!(redelivered_flags(&s, "flags", 4).await, vec![true, true, false, false]);
}

#[tokio::test]
async fn after_a_crash_every_message_that_may_have_gone_out_is_flagged_redelivered() {
    let mut s = Server::start();
    {
        let (_c, ch) = open(&s).await;
        publish_and_take(&ch, "flags", 4, 2).await;
        s.kill9();
    }
    s.restart();
    // A delivery leaves before its checkout is durable, so after a kill -9
    // the broker cannot tell which ready messages went out: all of them
    // come back flagged (as after an unclean shutdown of RabbitMQ), and
    // never one that went out unflagged.
    assert_eq!(redelivered_flags(&s, "flags", 4).await, vec![true, true, true, true]);
}

#[tokio::test]
async fn a_clean_restart_after_a_crash_flags_only_what_was_delivered() {
    let mut s = Server::start();
    {
        let (_c, ch) = open(&s).await;
        publish_and_take(&ch, "old", 1, 0).await;
        s.kill9();
    }
    s.restart();
    {
        let (_c, ch) = open(&s).await;
        publish_and_take(&ch, "flags", 4, 2).await;
        assert!(s.terminate().unwrap().success());
    }
    s.restart();
    assert_eq!(redelivered_flags(&s, "flags", 4).await, vec![true, true, false, false]);
    // Flagged by the restart after the crash, and it stays so.
    assert_eq!(redelivered_flags(&s, "old", 1).await, vec![true]);
}

#[tokio::test]
async fn redelivered_flags_survive_a_second_clean_restart() {
    let mut s = Server::start();
    {
        let (_c, ch) = open(&s).await;
        publish_and_take(&ch, "flags", 3, 1).await;
        assert!(s.terminate().unwrap().success());
    }
    s.restart();
    // Nothing delivered in the second run; the flag must stay.
    assert!(s.terminate().unwrap().success());
    s.restart();
    assert_eq!(redelivered_flags(&s, "flags", 3).await, vec![true, false, false]);
}
