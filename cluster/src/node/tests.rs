//! Nodes in one process over loopback, with fast timings.

use std::path::Path;
use std::time::{Duration, Instant};

use super::*;

fn fast() -> MembershipOptions {
    MembershipOptions {
        heartbeat_interval: Duration::from_millis(20),
        failure_timeout: Duration::from_millis(150),
        max_backoff: Duration::from_millis(100),
    }
}

fn secret(byte: u8) -> Secret {
    Secret::new(vec![byte; 32]).unwrap()
}

async fn start(dir: &Path, id: &str, listen: &str, seeds: &[&Node], secret: &Secret) -> Node {
    Node::start(NodeOptions {
        id: id.into(),
        data_dir: dir.join(id),
        listen: listen.into(),
        advertise: None,
        seeds: seeds.iter().map(|n| n.addr.to_string()).collect(),
        secret: secret.clone(),
        membership: fast(),
        alarms: Default::default(),
    })
    .await
    .unwrap()
}

fn states(node: &Node) -> Vec<(String, MemberState)> {
    node.members().into_iter().map(|r| (r.id, r.state)).collect()
}

/// Polls until `pred` holds for every node, or panics after `within`.
async fn wait_for(nodes: &[&Node], within: Duration, what: &str, pred: impl Fn(&Node) -> bool) -> Duration {
    let t0 = Instant::now();
    loop {
        if nodes.iter().all(|n| pred(n)) {
            return t0.elapsed();
        }
        if t0.elapsed() > within {
            let views: Vec<_> = nodes.iter().map(|n| n.members()).collect();
            panic!("{what}: not within {within:?}: {views:#?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn all_up<'a>(ids: &'a [&'a str]) -> impl Fn(&Node) -> bool + 'a {
    move |n: &Node| {
        let s = states(n);
        s.len() == ids.len() && ids.iter().all(|id| s.contains(&(id.to_string(), MemberState::Up)))
    }
}

fn sees(id: &str, state: MemberState) -> impl Fn(&Node) -> bool + '_ {
    move |n: &Node| states(n).contains(&(id.to_string(), state))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nodes_discover_each_other_through_gossip_detect_a_stop_and_readmit_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret(7);
    let n1 = start(dir.path(), "n1", "127.0.0.1:0", &[], &s).await;
    let n2 = start(dir.path(), "n2", "127.0.0.1:0", &[&n1], &s).await;
    // n3 names only n2: it learns n1 (and n1 learns it) through lists.
    let n3 = start(dir.path(), "n3", "127.0.0.1:0", &[&n2], &s).await;
    let ids = ["n1", "n2", "n3"];
    wait_for(&[&n1, &n2, &n3], Duration::from_secs(5), "all up", all_up(&ids)).await;

    let n3_addr = n3.addr.to_string();
    let first = n3.member_info();
    n3.stop().await.unwrap();
    let detected = wait_for(&[&n1, &n2], Duration::from_secs(2), "n3 down", sees("n3", MemberState::Down)).await;
    // Failure timeout 150 ms, heartbeats every 20 ms.
    assert!(detected < Duration::from_millis(600), "detected after {detected:?}");
    assert!(states(&n1).contains(&("n2".into(), MemberState::Up)));

    // Back at the same address without seeds: the others find it.
    let n3 = start(dir.path(), "n3", &n3_addr, &[], &s).await;
    assert!(n3.member_info().incarnation > first.incarnation);
    wait_for(&[&n1, &n2, &n3], Duration::from_secs(5), "all up again", all_up(&ids)).await;
    let seen = n1.members().into_iter().find(|r| r.id == "n3").unwrap();
    assert_eq!((seen.addr, seen.incarnation), (n3_addr, n3.member_info().incarnation));
    for n in [n1, n2, n3] {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_node_with_the_same_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let s = secret(7);
    let n1 = start(dir.path(), "n1", "127.0.0.1:0", &[], &s).await;
    let n2 = start(dir.path(), "n2", "127.0.0.1:0", &[&n1], &s).await;
    wait_for(&[&n1, &n2], Duration::from_secs(5), "n1 and n2 up", all_up(&["n1", "n2"])).await;
    let original = n1.member_info();
    let twin = start(other.path(), "n1", "127.0.0.1:0", &[&n1, &n2], &s).await;
    assert!(twin.member_info().incarnation >= original.incarnation);
    tokio::time::sleep(Duration::from_millis(400)).await;
    for n in [&n1, &n2] {
        let row = n.members().into_iter().find(|r| r.id == "n1").unwrap();
        assert_eq!((row.addr, row.incarnation), (original.addr.clone(), original.incarnation));
    }
    assert_eq!(states(&n2), vec![("n1".into(), MemberState::Up), ("n2".into(), MemberState::Up)]);
    // The twin's heartbeats are refused by n1 (same id) and its answers
    // from n2 would carry n1 as a member: it never takes them.
    assert_eq!(twin.members().len(), 1);
    for n in [n1, n2, twin] {
        n.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_with_another_secret_never_joins() {
    let dir = tempfile::tempdir().unwrap();
    let n1 = start(dir.path(), "n1", "127.0.0.1:0", &[], &secret(7)).await;
    let x = start(dir.path(), "x", "127.0.0.1:0", &[&n1], &secret(8)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(states(&n1), vec![("n1".into(), MemberState::Up)]);
    assert_eq!(states(&x), vec![("x".into(), MemberState::Up)]);
    for n in [n1, x] {
        n.stop().await.unwrap();
    }
}

#[tokio::test]
async fn the_incarnation_grows_across_restarts_of_one_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret(7);
    let a = start(dir.path(), "n1", "127.0.0.1:0", &[], &s).await;
    let first = a.member_info().incarnation;
    a.stop().await.unwrap();
    let b = start(dir.path(), "n1", "127.0.0.1:0", &[], &s).await;
    assert!(b.member_info().incarnation > first);
    b.stop().await.unwrap();
}

#[test]
fn the_incarnation_stays_above_the_stored_one_when_the_clock_is_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let ahead = u64::MAX / 2;
    store
        .write(vec![Op::PutMeta { key: INCARNATION_KEY.to_vec(), value: ahead.to_be_bytes().to_vec() }], true)
        .wait_blocking()
        .unwrap();
    assert_eq!(next_incarnation(&store, 5).unwrap(), ahead + 1);
    assert_eq!(next_incarnation(&store, 5).unwrap(), ahead + 2);
    store.close().unwrap();
}

#[tokio::test]
async fn ctl_members_answers_and_a_gateway_cannot_heartbeat() {
    let dir = tempfile::tempdir().unwrap();
    let s = secret(7);
    let n1 = start(dir.path(), "n1", "127.0.0.1:0", &[], &s).await;
    let rows = members(&n1.addr.to_string(), &s, PeerInfo::gateway("ctl")).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert!(rows[0].is_self && rows[0].id == "n1" && rows[0].addr == n1.addr.to_string());

    let (client, _in) = rpc::connect::<NodeRequest, NodeResponse>(n1.addr, &s, PeerInfo::gateway("g1")).await.unwrap();
    let from = MemberInfo { id: "g1".into(), addr: "127.0.0.1:1".into(), incarnation: 1 };
    let resp = client.call(NodeRequest::Heartbeat { from, members: vec![] }).await.unwrap();
    assert!(matches!(resp, NodeResponse::Refused { .. }), "{resp:?}");
    // A node claiming someone else's id on its connection: refused.
    let (client, _in) = rpc::connect::<NodeRequest, NodeResponse>(n1.addr, &s, PeerInfo::node("n2")).await.unwrap();
    let from = MemberInfo { id: "n3".into(), addr: "127.0.0.1:1".into(), incarnation: 1 };
    let resp = client.call(NodeRequest::Heartbeat { from, members: vec![] }).await.unwrap();
    assert!(matches!(resp, NodeResponse::Refused { .. }), "{resp:?}");
    assert_eq!(n1.members().len(), 1);
    n1.stop().await.unwrap();
}
