//! Other ecosystems' client libraries, unchanged, against the real binary:
//! pika, kombu, py-amqp and stomp.py (Python), amqplib and @stomp/stompjs
//! over WebSocket (Node); pika also over TLS with a client certificate
//! and EXTERNAL (Python's ssl, so OpenSSL on the client side). The test installs
//! them itself (a venv and an npm folder under `target/`), so a clean
//! machine needs only the package registries. These are smoke tests; the
//! full compatibility matrix (issue #7) is `matrix.rs`, and the clients' own
//! integration suites are `client_suites.rs`; both share the
//! installers below.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use sluice_compat_tests::{sluice_bin, Server};

pub(crate) fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `target/` (next to `target/<profile>/sluice`).
pub(crate) fn target_dir() -> PathBuf {
    sluice_bin().parent().and_then(Path::parent).expect("target dir").to_path_buf()
}

/// Runs `f` holding an exclusive lock, so parallel test processes install once.
pub(crate) fn locked<T>(name: &str, f: impl FnOnce() -> T) -> T {
    let lock = File::create(target_dir().join(format!("{name}.lock"))).expect("lock file");
    // SAFETY: flock on a file descriptor we own for the whole call.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
    let out = f();
    drop(lock);
    out
}

pub(crate) fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{what} failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// A venv with the pinned Python clients; returns its python.
pub(crate) fn python() -> PathBuf {
    let venv = target_dir().join("compat-venv");
    let python = venv.join("bin/python");
    let requirements = manifest_dir().join("python/requirements.txt");
    let wanted = std::fs::read_to_string(&requirements).expect("requirements.txt");
    let marker = venv.join("installed-requirements.txt");
    locked("compat-venv", || {
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(wanted.as_str()) {
            return;
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv");
        run(
            Command::new(&python).args(["-m", "pip", "install", "--quiet", "-r"]).arg(&requirements),
            "pip install",
        );
        std::fs::write(&marker, &wanted).expect("marker");
    });
    python
}

/// An npm folder with the pinned Node clients; returns it.
pub(crate) fn node_dir() -> PathBuf {
    let dir = target_dir().join("compat-node");
    let package = std::fs::read_to_string(manifest_dir().join("node/package.json")).expect("package.json");
    locked("compat-node", || {
        let marker = dir.join("installed-package.json");
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(package.as_str()) {
            return;
        }
        std::fs::create_dir_all(&dir).expect("node dir");
        std::fs::write(dir.join("package.json"), &package).expect("package.json");
        run(
            Command::new("npm").args(["install", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&dir),
            "npm install",
        );
        std::fs::write(&marker, &package).expect("marker");
    });
    dir
}

fn python_smoke(script: &str, expect: &str) {
    let py = python();
    let s = Server::start();
    let out = run(
        Command::new(py).arg(manifest_dir().join("python").join(script)).arg(s.amqp.port().to_string()),
        script,
    );
    assert!(out.contains(expect), "{script} printed: {out}");
}

#[test]
fn pika_blocking_client_works_unchanged() {
    python_smoke("smoke_pika.py", "pika ok");
}

#[test]
fn kombu_producer_and_consumer_work_unchanged() {
    python_smoke("smoke_kombu.py", "kombu ok");
}

#[test]
fn py_amqp_with_nested_headers_works_unchanged() {
    python_smoke("smoke_pyamqp.py", "py-amqp ok");
}

#[test]
fn pika_over_tls_with_a_client_certificate_and_external() {
    use crate::tls::{path, Pki};
    let py = python();
    let pki = Pki::new(&["alice"]);
    let s = pki.start(&["--tls-verify-peer", "true"]);
    let (cert, key) = pki.client_files("alice");
    let out = run(
        Command::new(py).arg(manifest_dir().join("python/smoke_pika_tls.py")).args([
            &s.amqps.expect("amqps listener").port().to_string(),
            path(&pki.ca),
            path(&cert),
            path(&key),
            "alice",
        ]),
        "smoke_pika_tls.py",
    );
    assert!(out.contains("pika tls ok"), "smoke_pika_tls.py printed: {out}");
}

#[test]
fn stomp_py_works_unchanged_in_every_version() {
    let py = python();
    let s = Server::start();
    let out = run(
        Command::new(py).arg(manifest_dir().join("python/smoke_stomp.py")).arg(s.stomp_addr().port().to_string()),
        "smoke_stomp.py",
    );
    assert!(out.contains("stomp.py ok"), "smoke_stomp.py printed: {out}");
}

#[test]
fn amqplib_confirm_channel_works_unchanged() {
    let dir = node_dir();
    let s = Server::start();
    let out = run(
        Command::new("node")
            .arg(manifest_dir().join("node/smoke_amqplib.js"))
            .arg(s.amqp.port().to_string())
            .env("NODE_PATH", dir.join("node_modules")),
        "node smoke_amqplib.js",
    );
    assert!(out.contains("amqplib ok"), "{out}");
}

#[test]
fn stompjs_over_websocket_works_unchanged() {
    let dir = node_dir();
    let s = Server::start();
    let out = run(
        Command::new("node")
            .arg(manifest_dir().join("node/smoke_stompjs.js"))
            .arg(s.web_stomp_addr().port().to_string())
            .env("NODE_PATH", dir.join("node_modules")),
        "node smoke_stompjs.js",
    );
    assert!(out.contains("stompjs ok"), "{out}");
}
