//! `sluice node` and `sluice ctl` as processes: identity, the cluster
//! secret (created 0600 in the per-user place, refused when it differs or
//! is readable by others), clean errors.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use sluice_compat_tests::sluice_bin;

use sluice_compat_tests::NodeProcess as Node;

fn start_node(home: &std::path::Path, id: &str, extra: &[&str]) -> Node {
    sluice_compat_tests::start_node(home, id, id, "127.0.0.1:0", extra)
}

fn ctl(home: &std::path::Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(sluice_bin())
        .arg("ctl")
        .args(args)
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", "error")
        .output()
        .unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn node_and_ctl_share_the_default_secret_and_strangers_are_refused() {
    let home = tempfile::tempdir().unwrap();
    let node = start_node(home.path(), "n1", &[]);
    let secret = home.path().join("config/sluice/cluster-secret");
    let mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the default secret file is created private");

    let (code, out, err) = ctl(home.path(), &["--node", &node.addr, "status"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("node n1 at") && out.contains(env!("CARGO_PKG_VERSION")), "{out}");

    let other = home.path().join("other-secret");
    std::fs::write(&other, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, _out, err) = ctl(home.path(), &["--node", &node.addr, "--cluster-secret-file", other.to_str().unwrap(), "status"]);
    assert_eq!(code, 1);
    assert!(err.contains("cluster secret"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}

#[test]
fn a_secret_file_readable_by_others_is_refused() {
    let home = tempfile::tempdir().unwrap();
    let loose = home.path().join("loose-secret");
    std::fs::write(&loose, "0123456789abcdef0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&loose, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(sluice_bin())
        .args(["node", "--id", "n1", "--listen", "127.0.0.1:0", "--cluster-secret-file", loose.to_str().unwrap(), "--data-dir"])
        .arg(home.path().join("n1"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("chmod 600"), "{err}");
}

#[test]
fn node_needs_an_id_and_a_free_port() {
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(sluice_bin()).args(["node", "--listen", "127.0.0.1:0"]).env("XDG_CONFIG_HOME", home.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--id"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(sluice_bin())
        .args(["node", "--id", "n2", "--listen", &addr, "--data-dir"])
        .arg(home.path().join("n2"))
        .env("XDG_CONFIG_HOME", home.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&addr) && err.trim().lines().count() == 1, "{err}");
}

#[test]
fn node_stops_cleanly_on_sigterm() {
    let home = tempfile::tempdir().unwrap();
    let mut node = start_node(home.path(), "n1", &[]);
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(node.child.id() as i32, libc::SIGTERM);
    }
    let mut status = None;
    for _ in 0..200 {
        if let Ok(Some(s)) = node.child.try_wait() {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    assert!(status.expect("node did not stop").success());
}

/// The partition harness itself, with real processes: a node in one
/// namespace answers a ctl in another until the node's host is cut off,
/// and again after healing.
#[test]
fn network_namespace_partition_cuts_and_heals_node_traffic() {
    let net = sluice_compat_tests::netns::Net::new(1, 2).expect("network namespaces (needs root and iproute2)");
    let home = tempfile::tempdir().unwrap();
    let listen = format!("{}:25680", net.addrs[0]);
    let mut node = net
        .command(0, &sluice_bin())
        .args(["node", "--id", "n0", "--listen", &listen, "--data-dir"])
        .arg(home.path().join("n0"))
        .env("XDG_CONFIG_HOME", home.path().join("config"))
        .env("SLUICE_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = node.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    assert!(lines.any(|l| l.map(|l| l.starts_with("node protocol listening")).unwrap_or(false)));
    let status = || {
        net.command(1, &sluice_bin())
            .args(["ctl", "--node", &listen, "status"])
            .env("XDG_CONFIG_HOME", home.path().join("config"))
            .env("SLUICE_LOG", "error")
            .output()
            .unwrap()
    };
    let ok = status();
    assert!(ok.status.success(), "{}", String::from_utf8_lossy(&ok.stderr));
    net.isolate(0).unwrap();
    let cut = status();
    assert!(!cut.status.success(), "a cut-off node must not answer");
    net.heal(0).unwrap();
    let mut healed = false;
    for _ in 0..50 {
        if status().status.success() {
            healed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(healed, "traffic must flow again after healing");
    let _ = node.kill();
    let _ = node.wait();
}
