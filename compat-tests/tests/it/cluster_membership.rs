//! Membership and failure detection with real `sluice node` processes:
//! discovery through one seed, `sluice ctl members` on every node, kill -9
//! detection time, rejoin after a restart, and nodes that must not get in
//! (another secret, a second node with an existing id).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use sluice_compat_tests::sluice_bin;

use sluice_compat_tests::{start_node as start, NodeProcess as Node};

#[derive(Debug, Clone, PartialEq)]
struct Row {
    id: String,
    addr: String,
    state: String,
    heard: String,
    incarnation: u64,
}

/// `sluice ctl --node addr members`, parsed; `None` if ctl failed.
fn members(home: &Path, addr: &str, extra: &[&str]) -> Option<Vec<Row>> {
    let out = Command::new(sluice_bin())
        .args(["ctl", "--node", addr])
        .args(extra)
        .arg("members")
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", "error")
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next()?.split_whitespace().collect();
    assert_eq!(header, ["ID", "ADDRESS", "STATE", "LAST-HEARD", "INCARNATION"], "{text}");
    Some(
        lines
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert!(f.len() >= 5, "{text}");
                Row {
                    id: f[0].into(),
                    addr: f[1].into(),
                    state: f[2].into(),
                    heard: f[3..f.len() - 1].join(" "),
                    incarnation: f[f.len() - 1].parse().unwrap(),
                }
            })
            .collect(),
    )
}

fn states(rows: &[Row]) -> Vec<(&str, &str)> {
    rows.iter().map(|r| (r.id.as_str(), r.state.as_str())).collect()
}

/// Polls `check` until it holds or `within` passes; returns the time it took.
fn wait_until(within: Duration, what: &str, mut check: impl FnMut() -> Result<(), String>) -> Duration {
    let t0 = Instant::now();
    loop {
        let result = check();
        if result.is_ok() {
            return t0.elapsed();
        }
        if t0.elapsed() > within {
            panic!("{what}: not within {within:?}: {}", result.unwrap_err());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every node's table lists exactly `ids`, all up.
fn all_up(home: &Path, nodes: &[&Node], ids: &[&str]) -> Result<(), String> {
    for node in nodes {
        let rows = members(home, &node.addr, &[]).ok_or_else(|| format!("ctl members on {} failed", node.addr))?;
        let want: Vec<(&str, &str)> = ids.iter().map(|id| (*id, "up")).collect();
        if states(&rows) != want {
            return Err(format!("{} sees {rows:?}", node.addr));
        }
    }
    Ok(())
}

#[test]
fn three_nodes_find_each_other_detect_a_kill_9_and_readmit_the_restarted_node() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let n1 = start(home, "n1", "n1", "127.0.0.1:0", &[]);
    let n2 = start(home, "n2", "n2", "127.0.0.1:0", &["--seeds", &n1.addr]);
    let n3 = start(home, "n3", "n3", "127.0.0.1:0", &["--seeds", &n1.addr]);
    let ids = ["n1", "n2", "n3"];
    let joined = wait_until(Duration::from_secs(5), "all three up everywhere", || all_up(home, &[&n1, &n2, &n3], &ids));
    eprintln!("membership: all three up on every node {} ms after the last start", joined.as_millis());
    let rows = members(home, &n2.addr, &[]).unwrap();
    let n1_row = rows.iter().find(|r| r.id == "n1").unwrap().clone();
    assert_eq!(n1_row.addr, n1.addr);
    assert!(n1_row.heard.ends_with("ms ago"), "{rows:?}");
    assert_eq!(rows.iter().find(|r| r.id == "n2").unwrap().heard, "self");

    // kill -9 the seed; the others must see it down within a second.
    let n1_addr = n1.addr.clone();
    let mut n1 = n1;
    let t0 = Instant::now();
    n1.child.kill().unwrap();
    let _ = n1.child.wait();
    let mut detected: [Option<Duration>; 2] = [None, None];
    while detected.iter().any(Option::is_none) && t0.elapsed() < Duration::from_secs(3) {
        for (i, node) in [&n2, &n3].into_iter().enumerate() {
            if detected[i].is_none() {
                let rows = members(home, &node.addr, &[]).unwrap();
                if states(&rows).contains(&("n1", "down")) {
                    detected[i] = Some(t0.elapsed());
                }
                // The survivors still see each other.
                assert!(states(&rows).contains(&("n2", "up")) && states(&rows).contains(&("n3", "up")), "{rows:?}");
            }
        }
    }
    eprintln!(
        "membership: kill -9 of n1 seen as down by n2 after {:?} ms, by n3 after {:?} ms (polling ctl members)",
        detected[0].map(|d| d.as_millis()),
        detected[1].map(|d| d.as_millis())
    );
    for d in detected {
        let d = d.expect("the killed node was not marked down");
        assert!(d < Duration::from_secs(1), "detection took {d:?}");
    }
    drop(n1);

    // Restarted with the same id, address and data dir, without seeds:
    // the others' heartbeats bring it back, with a new incarnation.
    let n1 = start(home, "n1", "n1", &n1_addr, &[]);
    assert_eq!(n1.addr, n1_addr);
    let back = wait_until(Duration::from_secs(5), "all three up again", || all_up(home, &[&n1, &n2, &n3], &ids));
    eprintln!("membership: restarted n1 up everywhere {} ms after its start", back.as_millis());
    for node in [&n2, &n3] {
        let rows = members(home, &node.addr, &[]).unwrap();
        let row = rows.iter().find(|r| r.id == "n1").unwrap();
        assert_eq!(row.addr, n1_addr);
        assert!(row.incarnation > n1_row.incarnation, "{row:?} after {n1_row:?}");
    }
}

#[test]
fn a_node_with_another_secret_cannot_join() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let n1 = start(home, "n1", "n1", "127.0.0.1:0", &[]);
    let n2 = start(home, "n2", "n2", "127.0.0.1:0", &["--seeds", &n1.addr]);
    let other = home.join("other-secret");
    std::fs::write(&other, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&other, <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o600)).unwrap();
    let other = other.to_str().unwrap();
    let seeds = format!("{},{}", n1.addr, n2.addr);
    let x = start(home, "x", "x", "127.0.0.1:0", &["--cluster-secret-file", other, "--seeds", &seeds]);
    wait_until(Duration::from_secs(5), "n1 and n2 up", || all_up(home, &[&n1, &n2], &["n1", "n2"]));
    // Give the stranger time for several attempts (every 100 ms at first).
    std::thread::sleep(Duration::from_millis(1000));
    all_up(home, &[&n1, &n2], &["n1", "n2"]).unwrap();
    let rows = members(home, &x.addr, &["--cluster-secret-file", other]).unwrap();
    assert_eq!(states(&rows), [("x", "up")]);
    // And a ctl with the cluster's secret cannot even ask it.
    assert!(members(home, &x.addr, &[]).is_none());
}

#[test]
fn a_second_node_with_an_existing_id_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let home = home.path();
    let n1 = start(home, "n1", "n1", "127.0.0.1:0", &[]);
    let n2 = start(home, "n2", "n2", "127.0.0.1:0", &["--seeds", &n1.addr]);
    wait_until(Duration::from_secs(5), "n1 and n2 up", || all_up(home, &[&n1, &n2], &["n1", "n2"]));
    let seeds = format!("{},{}", n1.addr, n2.addr);
    let twin = start(home, "n1", "twin", "127.0.0.1:0", &["--seeds", &seeds]);
    std::thread::sleep(Duration::from_millis(1000));
    for node in [&n1, &n2] {
        let rows = members(home, &node.addr, &[]).unwrap();
        assert_eq!(states(&rows), [("n1", "up"), ("n2", "up")]);
        assert_eq!(rows[0].addr, n1.addr, "the first n1 keeps its id");
    }
    let rows = members(home, &twin.addr, &[]).unwrap();
    assert_eq!(states(&rows), [("n1", "up")], "the twin learns nothing");
    assert_eq!(rows[0].addr, twin.addr);
}

#[test]
fn advertise_address_and_membership_timings_are_configurable() {
    let home = tempfile::tempdir().unwrap();
    let bad = Command::new(sluice_bin())
        .args(["node", "--id", "x", "--listen", "127.0.0.1:0", "--heartbeat-ms", "500", "--failure-timeout-ms", "400", "--data-dir"])
        .arg(home.path().join("x"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("failure_timeout_ms"), "{}", String::from_utf8_lossy(&bad.stderr));

    // b listens on every loopback address and advertises 127.0.0.2: the
    // other node lists it (and reaches it) there.
    let a = start(home.path(), "a", "a", "127.0.0.1:0", &[]);
    let port = {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let advertised = format!("127.0.0.2:{port}");
    let _b = start(
        home.path(),
        "b",
        "b",
        &format!("0.0.0.0:{port}"),
        &["--advertise", &advertised, "--seeds", &a.addr, "--heartbeat-ms", "50", "--failure-timeout-ms", "400"],
    );
    wait_until(Duration::from_secs(5), "b up at its advertised address", || {
        let rows = members(home.path(), &a.addr, &[]).ok_or("ctl failed")?;
        match rows.iter().find(|r| r.id == "b") {
            Some(r) if r.addr == advertised && r.state == "up" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}
