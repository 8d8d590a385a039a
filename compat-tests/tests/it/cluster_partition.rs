//! A network partition that cuts off a queue's leader, with real processes
//! in network namespaces the test creates (needs root and iproute2, as CI
//! has): three nodes on hosts 0–2, a gateway on host 3 (the majority side)
//! and a gateway on the leader's own host (the minority side), each with a
//! publisher confirming one message at a time.
//!
//! While the leader is cut off, the minority side confirms nothing and the
//! majority side goes on confirming; after healing, a drain finds every
//! confirmed message, and nothing is delivered twice without
//! redelivered=true.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_compat_tests::netns::Net;
use sluice_compat_tests::sluice_bin;

fn client_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cluster_client"))
}

/// A child process whose stdout lines are collected with their arrival
/// time; killed on drop.
struct Proc {
    child: Child,
    lines: Lines,
}

impl Proc {
    fn spawn(mut cmd: std::process::Command, home: &Path) -> Proc {
        let mut child = cmd
            .env("XDG_CONFIG_HOME", home.join("config"))
            .env("SLUICE_LOG", "error")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((Instant::now(), line));
            }
        });
        Proc { child, lines }
    }

    fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((_, l)) = self.lines.lock().unwrap().iter().find(|(_, l)| l.starts_with(prefix)) {
                return l.clone();
            }
            assert!(Instant::now() < deadline, "no line starting with {prefix:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The numbers in `confirmed N` lines, with their times.
    fn confirmed(&self) -> Vec<(Instant, u32)> {
        confirmed_in(&self.lines)
    }
}

type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn confirmed_in(lines: &Lines) -> Vec<(Instant, u32)> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(t, l)| l.strip_prefix("confirmed ").and_then(|n| n.parse().ok()).map(|n| (*t, n)))
        .collect()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctl_status(net: &Net, from: usize, home: &Path, addr: &str) -> Option<String> {
    let out = net
        .command(from, &sluice_bin())
        .args(["ctl", "--node", addr, "status"])
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", "error")
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn field(status: &str, key: &str) -> Vec<String> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .map(|v| v.split(", ").filter(|s| !s.is_empty()).map(str::to_owned).collect())
        .unwrap_or_default()
}

#[test]
fn partition_cutting_off_the_leader_stops_the_minority_and_loses_nothing() {
    let net = Net::new(2, 4).expect("network namespaces (needs root and iproute2)");
    let home = tempfile::tempdir().unwrap();
    let addrs: Vec<String> = (0..3).map(|i| format!("{}:25680", net.addrs[i])).collect();

    let mut nodes = Vec::new();
    for i in 0..3 {
        let mut cmd = net.command(i, &sluice_bin());
        cmd.args(["node", "--id", &format!("n{i}"), "--listen", &addrs[i], "--data-dir"]).arg(home.path().join(format!("n{i}")));
        if i > 0 {
            cmd.args(["--seeds", &addrs[0]]);
        }
        let p = Proc::spawn(cmd, home.path());
        p.wait_line("node protocol listening", Duration::from_secs(30));
        nodes.push(p);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !addrs.iter().all(|a| ctl_status(&net, 3, home.path(), a).is_some_and(|s| field(&s, "cluster members").len() == 3)) {
        assert!(Instant::now() < deadline, "the nodes did not form a cluster");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The majority-side gateway, on host 3.
    let mut gw = net.command(3, &sluice_bin());
    gw.args(["gateway", "--amqp", "127.0.0.1:5672", "--nodes", &addrs.join(",")]);
    let gw_a = Proc::spawn(gw, home.path());
    gw_a.wait_line("AMQP listening", Duration::from_secs(40));
    let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
    let mut declare = net.command(3, &client_bin());
    declare.args(["declare", url, "p"]);
    let declared = Proc::spawn(declare, home.path());
    declared.wait_line("declared", Duration::from_secs(30));

    // Which node leads the queue?
    let deadline = Instant::now() + Duration::from_secs(20);
    let leader = loop {
        let found = (0..3).find(|i| {
            ctl_status(&net, 3, home.path(), &addrs[*i]).is_some_and(|s| field(&s, "leading").iter().any(|q| q == "p"))
        });
        if let Some(l) = found {
            break l;
        }
        assert!(Instant::now() < deadline, "no node leads the queue");
        std::thread::sleep(Duration::from_millis(100));
    };

    // The minority-side gateway, on the leader's own host, talking to it.
    let mut gw = net.command(leader, &sluice_bin());
    gw.args(["gateway", "--amqp", "127.0.0.1:5672", "--nodes", &addrs[leader]]);
    let gw_b = Proc::spawn(gw, home.path());
    gw_b.wait_line("AMQP listening", Duration::from_secs(40));

    let mut publish = net.command(3, &client_bin());
    publish.args(["publish", url, "p", "0", "1000000"]);
    let pub_a = Proc::spawn(publish, home.path());
    let mut publish = net.command(leader, &client_bin());
    publish.args(["publish", url, "p", "1000000", "2000000"]);
    let pub_b = Proc::spawn(publish, home.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    while pub_a.confirmed().len() < 50 || pub_b.confirmed().len() < 50 {
        assert!(Instant::now() < deadline, "publishers did not get going");
        std::thread::sleep(Duration::from_millis(50));
    }

    net.isolate(leader).unwrap();
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(4));
    net.heal(leader).unwrap();
    let healed = Instant::now();

    // During the cut (after a second for what was in flight), the minority
    // side confirms nothing; the majority side goes on.
    let settled = cut + Duration::from_secs(1);
    let minority: Vec<u32> = pub_b.confirmed().into_iter().filter(|(t, _)| *t > settled && *t < healed).map(|(_, n)| n).collect();
    assert!(minority.is_empty(), "the cut-off side confirmed {minority:?}");
    let majority = pub_a.confirmed().into_iter().filter(|(t, _)| *t > cut + Duration::from_millis(1500) && *t < healed).count();
    assert!(majority > 0, "the majority side did not go on confirming");
    println!("partition: majority side confirmed {majority} messages during the 4 s cut, minority side 0");

    // After healing, the minority side's publisher gets through again.
    let before = pub_b.confirmed().len();
    let deadline = Instant::now() + Duration::from_secs(40);
    while pub_b.confirmed().len() <= before {
        assert!(Instant::now() < deadline, "the healed side never confirmed again");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Stop publishing; what each confirmed is final once it is gone.
    let (lines_a, lines_b) = (pub_a.lines.clone(), pub_b.lines.clone());
    drop(pub_a);
    drop(pub_b);
    std::thread::sleep(Duration::from_millis(200));
    let confirmed: Vec<u32> = confirmed_in(&lines_a).into_iter().chain(confirmed_in(&lines_b)).map(|(_, n)| n).collect();

    // Drain through the majority-side gateway.
    let mut consume = net.command(3, &client_bin());
    consume.args(["consume", url, "p", "3000"]);
    let mut drain = Proc::spawn(consume, home.path());
    let status = drain.child.wait().unwrap();
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(100));
    let mut seen: BTreeMap<u32, u32> = BTreeMap::new();
    let mut twice_unflagged = 0;
    for (_, l) in drain.lines.lock().unwrap().iter() {
        let mut f = l.split_whitespace();
        if f.next() != Some("got") {
            continue;
        }
        let n: u32 = f.next().unwrap().parse().unwrap();
        let redelivered = f.next() == Some("1");
        let count = seen.entry(n).or_default();
        *count += 1;
        if *count > 1 && !redelivered {
            twice_unflagged += 1;
        }
    }
    let missing: Vec<u32> = confirmed.iter().filter(|n| !seen.contains_key(n)).copied().collect();
    assert!(missing.is_empty(), "{} confirmed messages lost, e.g. {:?}", missing.len(), &missing[..missing.len().min(10)]);
    assert_eq!(twice_unflagged, 0, "delivered twice without redelivered=true");
    let from_nowhere: Vec<u32> = seen.keys().filter(|n| !(**n < 1_000_000 || (1_000_000..2_000_000).contains(*n))).copied().collect();
    assert!(from_nowhere.is_empty(), "{from_nowhere:?}");
    println!("partition: {} confirmed, {} delivered after healing, none lost", confirmed.len(), seen.len());
    drop(gw_b);
    drop(gw_a);
    drop(nodes);
}
