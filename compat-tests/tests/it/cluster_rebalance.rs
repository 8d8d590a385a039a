//! Replicas move when the cluster's members change (docs/cluster.md,
//! "Membership change"), with real processes on 127.0.0.1:
//!
//! - a fourth node joins a cluster of three holding 30 queues: only the
//!   queues whose placement now includes it move (one replica each, to the
//!   new node), about 1/(N+1) of the replicas; publishing goes on during
//!   the move and every confirmed message is still there afterwards;
//! - `sluice ctl decommission` of one node of four: its replicas are
//!   recreated on the others, ctl says when it can be stopped, it is
//!   killed, and every queue still works with nothing confirmed lost.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sluice_compat_tests::{ctl_status, sluice_bin, start_gateway, start_node, GatewayProcess, NodeProcess};

/// `sluice ctl --node addr args...`: (exit code, stdout, stderr).
fn ctl(home: &Path, addr: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(sluice_bin())
        .args(["ctl", "--node", addr])
        .args(args)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", "error")
        .output()
        .expect("run sluice ctl");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One line of `sluice ctl queues`.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    leader: String,
    voters: BTreeSet<String>,
    learners: BTreeSet<String>,
    hosted: BTreeSet<String>,
}

fn set(field: &str) -> BTreeSet<String> {
    if field == "-" {
        BTreeSet::new()
    } else {
        field.split(',').map(str::to_owned).collect()
    }
}

/// `sluice ctl queues` as queue name -> row.
fn queues(home: &Path, addr: &str) -> BTreeMap<String, Row> {
    let (code, out, err) = ctl(home, addr, &["queues"]);
    assert_eq!(code, 0, "ctl queues: {err}");
    out.lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 5).then(|| {
                (f[0].to_owned(), Row { leader: f[1].to_owned(), voters: set(f[2]), learners: set(f[3]), hosted: set(f[4]) })
            })
        })
        .collect()
}

fn status_field(home: &Path, addr: &str, key: &str) -> Option<String> {
    let text = ctl_status(home, addr)?;
    text.lines().find_map(|l| l.strip_prefix(&format!("{key}: ")).map(str::to_owned))
}

/// `n` nodes (n1 founds, the others join through it), once every node
/// lists all of them as members.
fn nodes(home: &Path, n: usize) -> Vec<NodeProcess> {
    let first = start_node(home, "n1", "n1", "127.0.0.1:0", &[]);
    let seed = first.addr.clone();
    let mut nodes = vec![first];
    for i in 2..=n {
        let id = format!("n{i}");
        nodes.push(start_node(home, &id, &id, "127.0.0.1:0", &["--seeds", &seed]));
    }
    wait_members(home, &nodes, n);
    nodes
}

fn wait_members(home: &Path, nodes: &[NodeProcess], n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let all = nodes.iter().all(|node| {
            status_field(home, &node.addr, "cluster members").is_some_and(|m| m.split(", ").count() == n)
        });
        if all {
            return;
        }
        assert!(Instant::now() < deadline, "the nodes did not form a cluster of {n}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Every queue has `r` voters, no learner, and no replica outside its
/// group; `None` until then.
fn settled(table: &BTreeMap<String, Row>, names: &[String], r: usize) -> bool {
    names.iter().all(|n| {
        table.get(n).is_some_and(|row| {
            row.voters.len() == r && row.learners.is_empty() && row.hosted == row.voters && row.leader != "-"
        })
    })
}

async fn open(gw: &GatewayProcess) -> (Connection, Channel) {
    let conn = Connection::connect(&gw.url(), ConnectionProperties::default()).await.expect("connect to gateway");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

/// Declares `names` (durable) and publishes `per_queue` confirmed
/// persistent messages `name:i` to each.
async fn fill(gw: &GatewayProcess, names: &[String], per_queue: u32) {
    let (_conn, ch) = open(gw).await;
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    for name in names {
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
    }
    let mut confirms = Vec::new();
    for name in names {
        for i in 0..per_queue {
            let body = format!("{name}:{i}");
            let c = ch
                .basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), persistent())
                .await
                .unwrap();
            confirms.push(c);
        }
    }
    for c in confirms {
        assert!(c.await.unwrap().is_ack());
    }
}

/// Publishes `name:p{i}` round robin over `names`, one confirmed message at
/// a time (a failed one is retried on a new connection), until `stop`;
/// returns the confirmed bodies.
async fn publish_until(url: String, names: Vec<String>, stop: Arc<AtomicBool>) -> BTreeSet<String> {
    let mut confirmed = BTreeSet::new();
    let mut i = 0u32;
    while !stop.load(Ordering::Relaxed) {
        let Ok(conn) = Connection::connect(&url, ConnectionProperties::default()).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(ch) = conn.create_channel().await else { continue };
        if ch.confirm_select(ConfirmSelectOptions::default()).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let name = &names[i as usize % names.len()];
            let body = format!("{name}:p{i}");
            let sent = ch.basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), persistent()).await;
            let ok = match sent {
                Ok(c) => matches!(tokio::time::timeout(Duration::from_secs(10), c).await, Ok(Ok(c)) if c.is_ack()),
                Err(_) => false,
            };
            if !ok {
                break;
            }
            confirmed.insert(body);
            i += 1;
        }
        let _ = conn.close(0, "".into()).await;
    }
    confirmed
}

/// Takes every message of `name` (basic.get, no ack) and returns the bodies.
async fn drain(ch: &Channel, name: &str) -> Vec<String> {
    let mut out = Vec::new();
    loop {
        let got = tokio::time::timeout(Duration::from_secs(10), ch.basic_get(name.into(), BasicGetOptions { no_ack: true }))
            .await
            .expect("basic.get answered")
            .expect("basic.get");
        match got {
            Some(m) => out.push(String::from_utf8(m.delivery.data.clone()).unwrap()),
            None => return out,
        }
    }
}

/// Checks that `expected` are all in the drained messages of every queue.
async fn check_all_there(gw: &GatewayProcess, names: &[String], expected: &BTreeSet<String>) -> usize {
    let (_conn, ch) = open(gw).await;
    let mut drained = BTreeSet::new();
    for name in names {
        drained.extend(drain(&ch, name).await);
    }
    let lost: Vec<&String> = expected.iter().filter(|b| !drained.contains(*b)).collect();
    assert!(lost.is_empty(), "{} confirmed messages lost, e.g. {:?}", lost.len(), &lost[..lost.len().min(5)]);
    drained.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_takes_over_only_the_replicas_placement_gives_it() {
    let t0 = Instant::now();
    let home = tempfile::tempdir().unwrap();
    let mut cluster = nodes(home.path(), 3);
    let addrs: Vec<String> = cluster.iter().map(|n| n.addr.clone()).collect();
    let gw = start_gateway(home.path(), &[addrs[0].as_str(), addrs[1].as_str()], &[]);
    let names: Vec<String> = (0..30).map(|i| format!("rb{i:02}")).collect();
    fill(&gw, &names, 20).await;
    let mut expected: BTreeSet<String> =
        names.iter().flat_map(|n| (0..20).map(move |i| format!("{n}:{i}"))).collect();
    // An acking consumer on the first five queues takes 10 messages each.
    {
        let (_conn, ch) = open(&gw).await;
        ch.basic_qos(5, BasicQosOptions::default()).await.unwrap();
        for name in &names[..5] {
            let mut c = ch.basic_consume(name.as_str().into(), "c".into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
            for i in 0..10 {
                let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("delivery").unwrap().unwrap();
                assert_eq!(String::from_utf8_lossy(&d.data), format!("{name}:{i}"));
                d.ack(BasicAckOptions::default()).await.unwrap();
                expected.remove(&format!("{name}:{i}"));
            }
            ch.basic_cancel("c".into(), BasicCancelOptions::default()).await.unwrap();
        }
    }
    let before = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = queues(home.path(), &addrs[0]);
            if settled(&t, &names, 3) {
                break t;
            }
            assert!(Instant::now() < deadline, "queues not settled: {t:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    // Publishing goes on while the fourth node joins and replicas move.
    let stop = Arc::new(AtomicBool::new(false));
    let publisher = tokio::spawn(publish_until(gw.url(), names.clone(), stop.clone()));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let joined_at = Instant::now();
    cluster.push(start_node(home.path(), "n4", "n4", "127.0.0.1:0", &["--seeds", &addrs[0]]));
    let after = {
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            let t = queues(home.path(), &addrs[0]);
            let n4_has_some = t.values().any(|r| r.voters.contains("n4"));
            if n4_has_some && settled(&t, &names, 3) {
                // Stable for one more look (no change in flight).
                std::thread::sleep(Duration::from_millis(500));
                let again = queues(home.path(), &addrs[0]);
                let same = names.iter().all(|n| again.get(n).map(|r| &r.voters) == t.get(n).map(|r| &r.voters));
                if same && settled(&again, &names, 3) {
                    break again;
                }
            }
            assert!(Instant::now() < deadline, "not rebalanced after 40 s: {t:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let took = joined_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    let during = publisher.await.unwrap();
    assert!(!during.is_empty(), "nothing confirmed during the rebalance");

    // Only queues whose placement now has n4 moved, one replica each.
    let mut moved = 0;
    for name in &names {
        let (old, new) = (&before[name].voters, &after[name].voters);
        if old == new {
            assert!(!new.contains("n4"));
            continue;
        }
        moved += 1;
        assert!(new.contains("n4"), "{name} moved but not to n4: {old:?} -> {new:?}");
        assert_eq!(old.intersection(new).count(), 2, "{name}: more than one replica moved: {old:?} -> {new:?}");
    }
    let total = names.len() * 3;
    println!(
        "4th node: {moved} of {total} replicas moved ({:.1}%, ideal 1/(N+1) = 25%) in {:.1} s; {} messages confirmed meanwhile",
        100.0 * moved as f64 / total as f64,
        took.as_secs_f64(),
        during.len()
    );
    assert!((10..=29).contains(&moved), "moved {moved} of {total}");
    assert_eq!(status_field(home.path(), &cluster[3].addr, "queue replicas"), Some(moved.to_string()));

    expected.extend(during);
    let drained = check_all_there(&gw, &names, &expected).await;
    println!("drained {drained} messages, {} expected; whole test {:.1} s", expected.len(), t0.elapsed().as_secs_f64());
    drop(cluster);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decommissioned_node_hands_its_replicas_over_and_can_be_stopped() {
    let t0 = Instant::now();
    let home = tempfile::tempdir().unwrap();
    let mut cluster = nodes(home.path(), 4);
    let addrs: Vec<String> = cluster.iter().map(|n| n.addr.clone()).collect();
    let gw = start_gateway(home.path(), &[addrs[0].as_str(), addrs[1].as_str()], &[]);
    // A gateway that knows only the node about to leave: it must follow
    // the metadata elsewhere once that node is decommissioned.
    let gw3 = start_gateway(home.path(), &[addrs[2].as_str()], &[]);
    let names: Vec<String> = (0..20).map(|i| format!("dc{i:02}")).collect();
    fill(&gw, &names, 10).await;
    let mut expected: BTreeSet<String> =
        names.iter().flat_map(|n| (0..10).map(move |i| format!("{n}:{i}"))).collect();
    let before = {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = queues(home.path(), &addrs[0]);
            if settled(&t, &names, 3) {
                break t;
            }
            assert!(Instant::now() < deadline, "queues not settled: {t:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let on_n3 = before.values().filter(|r| r.voters.contains("n3")).count();
    assert!(on_n3 > 0);

    // Refusals.
    let (code, _, err) = ctl(home.path(), &addrs[1], &["decommission", "n9"]);
    assert_ne!(code, 0);
    assert!(err.contains("n9 is not a member"), "{err}");

    let started = Instant::now();
    let (code, out, err) = ctl(home.path(), &addrs[1], &["decommission", "n3", "--timeout-secs", "40"]);
    let took = started.elapsed();
    println!("{out}");
    assert_eq!(code, 0, "decommission failed: {out} {err}");
    assert!(out.contains("n3 hosts no queue replica") && out.contains("it can be stopped"), "{out}");
    assert_eq!(status_field(home.path(), &addrs[2], "queue replicas").as_deref(), Some("0"));
    let members = status_field(home.path(), &addrs[0], "cluster members").unwrap();
    assert_eq!(members, "n1, n2, n4");
    println!("decommission of n3 ({on_n3} replicas) took {:.1} s", took.as_secs_f64());
    // Stopped for good.
    let mut n3 = cluster.remove(2);
    let _ = n3.child.kill();
    let _ = n3.child.wait();

    let table = queues(home.path(), &addrs[0]);
    assert!(settled(&table, &names, 3), "{table:?}");
    assert!(table.values().all(|r| !r.voters.contains("n3") && !r.hosted.contains("n3")));
    // Only the queues that had n3 changed.
    for name in &names {
        if !before[name].voters.contains("n3") {
            assert_eq!(before[name].voters, table[name].voters, "{name} moved without a reason");
        }
    }

    // Every queue works (publish + consume) and nothing confirmed is lost.
    {
        let (_conn, ch) = open(&gw).await;
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        for name in &names {
            for i in 10..15 {
                let body = format!("{name}:{i}");
                let c = ch
                    .basic_publish("".into(), name.as_str().into(), BasicPublishOptions::default(), body.as_bytes(), persistent())
                    .await
                    .unwrap();
                assert!(tokio::time::timeout(Duration::from_secs(10), c).await.unwrap().unwrap().is_ack());
                expected.insert(body);
            }
        }
    }
    let (_conn, ch) = open(&gw).await;
    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut got = BTreeSet::new();
    for name in &names {
        let tag = format!("c-{name}");
        let mut c = ch.basic_consume(name.as_str().into(), tag.as_str().into(), BasicConsumeOptions::default(), FieldTable::default()).await.unwrap();
        for _ in 0..15 {
            let d = tokio::time::timeout(Duration::from_secs(10), c.next()).await.expect("delivery").unwrap().unwrap();
            got.insert(String::from_utf8(d.data.clone()).unwrap());
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await.unwrap();
    }
    let lost: Vec<&String> = expected.iter().filter(|b| !got.contains(*b)).collect();
    assert!(lost.is_empty(), "lost: {lost:?}");

    // The gateway that followed n3 declares, publishes and consumes.
    {
        let (_conn, ch) = open(&gw3).await;
        ch.queue_declare("after".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        let c = ch.basic_publish("".into(), "after".into(), BasicPublishOptions::default(), b"x", persistent()).await.unwrap();
        assert!(tokio::time::timeout(Duration::from_secs(10), c).await.unwrap().unwrap().is_ack());
        let got = ch.basic_get("after".into(), BasicGetOptions { no_ack: true }).await.unwrap().expect("the message");
        assert_eq!(got.delivery.data, b"x");
        // And sees what the other gateway declared since.
        let (_c2, ch2) = open(&gw).await;
        ch2.queue_declare("later".into(), QueueDeclareOptions { durable: true, ..Default::default() }, FieldTable::default())
            .await
            .unwrap();
        ch.queue_declare("later".into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await
            .expect("declared through the other gateway, visible here");
    }
    println!("whole test {:.1} s", t0.elapsed().as_secs_f64());
    drop(cluster);
}

#[test]
fn decommissioning_below_two_members_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let cluster = nodes(home.path(), 2);
    let (code, _, err) = ctl(home.path(), &cluster[0].addr, &["decommission", "n2"]);
    assert_ne!(code, 0);
    assert!(err.contains("a cluster keeps at least 2"), "{err}");
    // Both are still members.
    let (code, out, _) = ctl(home.path(), &cluster[1].addr, &["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("cluster members: n1, n2"), "{out}");
}
