//! A full disk, for real (issue #9): the broker's data directory on a
//! small tmpfs the test mounts (needs root, as the partition tests do).
//! - With the free-disk alarm: as free space runs out, publishers are
//!   blocked and their publishes stay unconfirmed (no false confirm, no
//!   nack); once space is freed they go on, and every confirmed message
//!   comes back intact.
//! - Without the alarm, until the file system is really full: the write
//!   that fails is never confirmed; after space is freed and the broker
//!   restarted, every confirmed message is there, intact.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;

use crate::common::*;
use crate::metrics::{scrape, value};

/// A tmpfs of `mib` MiB mounted on a fresh directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let size = format!("size={mib}m");
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir.path()).output().unwrap();
        assert!(out.status.success(), "mount tmpfs (needs root): {}", String::from_utf8_lossy(&out.stderr));
        Tmpfs { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A file of `mib` MiB taking up space.
    fn ballast(&self, mib: usize) -> PathBuf {
        let path = self.path().join("ballast");
        std::fs::write(&path, vec![7u8; mib << 20]).unwrap();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

const BODY: usize = 32 * 1024;

/// Message `id`'s body: its id, then a pattern derived from it.
fn body(id: u64) -> Vec<u8> {
    let mut b = id.to_be_bytes().to_vec();
    b.extend((0..BODY - 8).map(|i| (id as usize).wrapping_mul(31).wrapping_add(i) as u8));
    b
}

/// What the publisher's confirms said.
#[derive(Default)]
struct Outcome {
    acked: HashSet<u64>,
    nacked: HashSet<u64>,
    /// When the latest ack arrived.
    last_ack: Option<Instant>,
}

/// Publishes `body(id)` for growing ids, persistent with confirms, about
/// 200 a second (so the 1 s alarm check is not outrun), until `stop` or
/// the connection fails. Records confirms and nacks in `out`.
async fn publish(url: String, first: u64, stop: tokio::sync::watch::Receiver<bool>, out: std::sync::Arc<std::sync::Mutex<Outcome>>) -> u64 {
    let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    let mut id = first;
    let mut pending = Vec::new();
    while !*stop.borrow() {
        let Ok(pc) = ch.basic_publish("".into(), "full".into(), BasicPublishOptions::default(), &body(id), persistent()).await else { break };
        let out = out.clone();
        pending.push(tokio::spawn(async move {
            match pc.await {
                Ok(c) if c.is_ack() => {
                    let mut o = out.lock().unwrap();
                    o.acked.insert(id);
                    o.last_ack = Some(Instant::now());
                }
                Ok(_) => {
                    out.lock().unwrap().nacked.insert(id);
                }
                Err(_) => {}
            }
        }));
        id += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for p in pending {
        p.abort();
    }
    id
}

/// Drains queue `full`, checking each body; returns the ids seen.
async fn drain(s: &Server) -> BTreeMap<u64, usize> {
    let (_c, ch) = open(s).await;
    let mut seen = BTreeMap::new();
    let mut deliveries = ch.basic_consume("full".into(), "".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
    while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(3), deliveries.next()).await {
        let d = d.unwrap();
        let id = u64::from_be_bytes(d.data[..8].try_into().unwrap());
        assert!(d.data == body(id), "message {id} came back corrupt ({} bytes)", d.data.len());
        *seen.entry(id).or_insert(0) += 1;
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    seen
}

/// Waits until `pred` holds of the metrics text, or panics after 20 s.
async fn until_metric(s: &Server, what: &str, pred: impl Fn(&str) -> bool) {
    let t0 = Instant::now();
    loop {
        let text = scrape(s.metrics_addr()).await;
        if pred(&text) {
            return;
        }
        assert!(t0.elapsed() < Duration::from_secs(20), "not within 20 s: {what}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

const DISK_ALARM: &str = "sluice_alarm{resource=\"disk\"}";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filling_disk_blocks_publishers_without_false_confirms_and_frees_them() {
    let fs = Tmpfs::mount(128);
    let ballast = fs.ballast(48);
    // Blocked below 40 MB free: about 80 MB are left now, minus what the
    // broker starts with.
    let mut s = Server::spawn(&fs.path().join("data"), &["--disk-free-limit", "40000000"]).unwrap();
    {
        let (_c, ch) = open(&s).await;
        declare_durable(&ch, "full").await;
    }
    let out = std::sync::Arc::new(std::sync::Mutex::new(Outcome::default()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish(s.url(), 0, stop.clone(), out.clone()));

    // The alarm goes on, and publishes stop being confirmed.
    until_metric(&s, "the disk alarm", |t| value(t, DISK_ALARM) == Some(1.0)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (acked_while_blocked, last_ack) = {
        let o = out.lock().unwrap();
        (o.acked.len(), o.last_ack)
    };
    assert!(acked_while_blocked > 0, "nothing was confirmed before the alarm");
    assert!(last_ack.is_some_and(|t| t.elapsed() > Duration::from_secs(2)), "confirms went on under the disk alarm");
    assert!(out.lock().unwrap().nacked.is_empty(), "publishes were nacked instead of held");

    // Space comes back: the alarm clears and publishing goes on.
    std::fs::remove_file(&ballast).unwrap();
    until_metric(&s, "the disk alarm to clear", |t| value(t, DISK_ALARM) == Some(0.0)).await;
    let t0 = Instant::now();
    while out.lock().unwrap().acked.len() < acked_while_blocked + 50 {
        assert!(t0.elapsed() < Duration::from_secs(20), "publishing did not resume after space was freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_tx.send(true).unwrap();
    let _ = publisher.await;

    let seen = drain(&s).await;
    let o = out.lock().unwrap();
    let missing: Vec<&u64> = o.acked.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(missing.is_empty(), "confirmed messages lost: {missing:?}");
    assert!(o.nacked.is_empty());
    println!(
        "disk alarm on a 128 MiB tmpfs: {acked_while_blocked} confirmed before the block, {} in all, {} delivered",
        o.acked.len(),
        seen.len()
    );
    s.kill9();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_file_system_confirms_nothing_it_cannot_keep() {
    let fs = Tmpfs::mount(96);
    let ballast = fs.ballast(32);
    let data = fs.path().join("data");
    // No alarm: the writes run into ENOSPC.
    let mut s = Server::spawn(&data, &["--disk-free-limit", "0"]).unwrap();
    {
        let (_c, ch) = open(&s).await;
        declare_durable(&ch, "full").await;
    }
    let out = std::sync::Arc::new(std::sync::Mutex::new(Outcome::default()));
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let publisher = tokio::spawn(publish(s.url(), 0, stop.clone(), out.clone()));
    // Until confirms stop for good (the disk is full).
    let t0 = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stalled = out.lock().unwrap().last_ack.is_some_and(|t| t.elapsed() > Duration::from_secs(3));
        if stalled || publisher.is_finished() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(90), "the file system never filled");
    }
    stop_tx.send(true).unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
    let acked = out.lock().unwrap().acked.clone();
    assert!(!acked.is_empty(), "nothing was confirmed before the disk filled");

    // Free space, restart on the same data directory: every confirmed
    // message is there, intact.
    s.kill9();
    std::fs::remove_file(&ballast).unwrap();
    let s = Server::spawn(&data, &["--disk-free-limit", "0"]).unwrap();
    let seen = drain(&s).await;
    let missing: Vec<&u64> = acked.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(missing.is_empty(), "{} confirmed messages lost: {missing:?}", missing.len());
    println!("ENOSPC on a 96 MiB tmpfs: {} confirmed, {} delivered after the restart", acked.len(), seen.len());
}
