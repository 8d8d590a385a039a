//! The third-party clients' own integration suites (issue #7), unchanged,
//! against the real binary: the test code is the one their packages ship,
//! downloaded from the package registry (PyPI's sdist, npm's tarball) at
//! test time and unpacked under `target/client-suites/`, at the versions
//! pinned in `compat-tests/python/requirements.txt` and
//! `compat-tests/node/package.json`. Results and the reason for every
//! failure and deselection: docs/client-suites.md.
//!
//! Each suite gets its own fresh broker, pointed at through the suite's
//! own configuration (environment variables), or, where the suite
//! hard-codes `localhost:5672`, by running the broker and the suite in a
//! private network namespace (`netns::Loopback`) where the broker listens
//! on port 5672. No test talks to anything but loopback: tests that name
//! another host are deselected below. The suites use fixed queue names and
//! leave messages behind, so every queue of the vhost is deleted before
//! and after each suite.
//!
//! Each test asserts that the failures are exactly the documented expected
//! ones: a new failure, or an expected failure that now passes, fails it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sluice_compat_tests::netns::Loopback;
use sluice_compat_tests::{sluice_bin, Server};

use crate::clients::{locked, manifest_dir, python, run, target_dir};

fn suites_dir() -> PathBuf {
    target_dir().join("client-suites")
}

/// The version of `name` pinned in requirements.txt.
fn pinned_python(name: &str) -> String {
    let reqs = std::fs::read_to_string(manifest_dir().join("python/requirements.txt")).unwrap();
    reqs.lines()
        .find_map(|l| l.trim().strip_prefix(&format!("{name}==")).map(str::to_owned))
        .unwrap_or_else(|| panic!("{name} is not pinned in requirements.txt"))
}

/// The version of `name` pinned in compat-tests/node/package.json.
fn pinned_node(name: &str) -> String {
    let package: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(manifest_dir().join("node/package.json")).unwrap()).unwrap();
    package["dependencies"][name].as_str().unwrap_or_else(|| panic!("{name} not in package.json")).to_owned()
}

/// The only directory directly under `dir`.
fn only_subdir(dir: &Path) -> PathBuf {
    let dirs: Vec<PathBuf> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    assert_eq!(dirs.len(), 1, "expected one unpacked folder in {}: {dirs:?}", dir.display());
    dirs.into_iter().next().unwrap()
}

/// Downloads the sdist of `name` (at its pinned version) from PyPI and
/// unpacks it, once; returns the unpacked source tree.
fn pypi_sdist(name: &str) -> PathBuf {
    let version = pinned_python(name);
    let py = python();
    let dir = suites_dir().join(format!("pypi-{name}-{version}"));
    locked(&format!("client-suite-{name}"), || {
        if dir.join(".unpacked").exists() {
            return;
        }
        let _ = std::fs::remove_dir_all(&dir);
        let download = dir.join("download");
        std::fs::create_dir_all(&download).unwrap();
        run(
            Command::new(&py)
                .args(["-m", "pip", "download", "--quiet", "--no-binary", ":all:", "--no-deps", "--dest"])
                .arg(&download)
                .arg(format!("{name}=={version}")),
            "pip download",
        );
        let archive = std::fs::read_dir(&download).unwrap().map(|e| e.unwrap().path()).next().expect("sdist");
        std::fs::create_dir_all(dir.join("src")).unwrap();
        run(Command::new("tar").arg("xzf").arg(&archive).arg("-C").arg(dir.join("src")), "tar xzf");
        std::fs::write(dir.join(".unpacked"), "").unwrap();
    });
    only_subdir(&dir.join("src"))
}

/// Downloads the npm tarball of `name` (at its pinned version), unpacks it
/// and installs its runtime dependencies, once; returns the package.
fn npm_package(name: &str) -> PathBuf {
    let version = pinned_node(name);
    let dir = suites_dir().join(format!("npm-{name}-{version}"));
    locked(&format!("client-suite-{name}"), || {
        if dir.join(".unpacked").exists() {
            return;
        }
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("src")).unwrap();
        run(
            Command::new("npm")
                .args(["pack", "--silent", &format!("{name}@{version}"), "--pack-destination"])
                .arg(&dir),
            "npm pack",
        );
        let archive = dir.join(format!("{name}-{version}.tgz"));
        run(Command::new("tar").arg("xzf").arg(&archive).arg("-C").arg(dir.join("src")), "tar xzf");
        run(
            Command::new("npm")
                .args(["install", "--omit=dev", "--no-audit", "--no-fund", "--no-package-lock", "--loglevel=error"])
                .current_dir(dir.join("src/package")),
            "npm install (runtime dependencies)",
        );
        std::fs::write(dir.join(".unpacked"), "").unwrap();
    });
    dir.join("src/package")
}

/// mocha and claire (amqplib's test-only devDependencies), pinned in
/// compat-tests/node/suite-tools/package.json; returns its node_modules.
fn node_suite_tools() -> PathBuf {
    let dir = target_dir().join("client-suite-node-tools");
    let package = std::fs::read_to_string(manifest_dir().join("node/suite-tools/package.json")).unwrap();
    locked("client-suite-node-tools", || {
        let marker = dir.join("installed-package.json");
        if std::fs::read_to_string(&marker).ok().as_deref() == Some(package.as_str()) {
            return;
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("package.json"), &package).unwrap();
        run(
            Command::new("npm").args(["install", "--no-audit", "--no-fund", "--loglevel=error"]).current_dir(&dir),
            "npm install (suite tools)",
        );
        std::fs::write(&marker, &package).unwrap();
    });
    dir.join("node_modules")
}

/// Runs `sluice ctl` against the admin API (inside `ns` if given).
fn ctl(admin: SocketAddr, ns: Option<&Loopback>, args: &[&str]) -> (bool, String) {
    let mut cmd = match ns {
        Some(ns) => ns.command(sluice_bin()),
        None => Command::new(sluice_bin()),
    };
    let out = cmd
        .arg("ctl")
        .args(["--admin-url", &format!("http://{admin}"), "--admin-user", "guest", "--admin-password", "guest"])
        .args(args)
        .output()
        .unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// Deletes every queue of vhost `/` (the suites' fixed-name queues and
/// whatever they left behind); returns their names.
fn delete_all_queues(admin: SocketAddr, ns: Option<&Loopback>) -> Vec<String> {
    let (ok, listing) = ctl(admin, ns, &["list-queues", "--vhost", "/"]);
    assert!(ok, "list-queues: {listing}");
    let names: Vec<String> =
        listing.lines().filter_map(|l| l.split('\t').next()).filter(|n| !n.is_empty()).map(str::to_owned).collect();
    for name in &names {
        let (ok, out) = ctl(admin, ns, &["delete-queue", "--vhost", "/", name]);
        // An exclusive or auto-delete queue may vanish on its own meanwhile.
        assert!(ok || out.contains("404") || out.to_lowercase().contains("not found"), "delete-queue {name}: {out}");
    }
    let (ok, listing) = ctl(admin, ns, &["list-queues", "--vhost", "/"]);
    assert!(ok && listing.trim().is_empty(), "queues left after cleanup: {listing}");
    names
}

/// What a suite run gave.
#[derive(Debug, Default)]
struct Outcome {
    passed: usize,
    failed: usize,
    skipped: usize,
    deselected: usize,
    /// The ids of the failed (or erroring) tests.
    failures: BTreeSet<String>,
    secs: f64,
    output: String,
}

impl Outcome {
    fn report(&self, suite: &str, left_behind: &[String]) {
        println!(
            "{suite}: {} passed, {} failed, {} skipped, {} deselected in {:.1}s; failures: {:?}; queues left behind (deleted): {:?}",
            self.passed,
            self.failed,
            self.skipped,
            self.deselected,
            self.secs,
            self.failures,
            left_behind
        );
    }

    /// The failures must be exactly `expected` (and something must have run).
    fn check(&self, expected: &[&str], expected_deselected: usize) {
        let expected: BTreeSet<String> = expected.iter().map(|s| s.to_string()).collect();
        assert_eq!(self.failures, expected, "unexpected failures (or expected ones now passing):\n{}", self.output);
        assert_eq!(self.failed, expected.len(), "{}", self.output);
        assert_eq!(self.deselected, expected_deselected, "a deselect id no longer matches a test:\n{}", self.output);
        assert!(self.passed > 0, "{}", self.output);
    }
}

/// Bounds each suite (seconds); the whole run of a suite is killed past it.
const SUITE_TIMEOUT: &str = "240";
/// Bounds each pytest test (seconds), via pytest-timeout.
const TEST_TIMEOUT: &str = "60";

/// Runs pytest (from the pinned venv) in `dir` on `paths`, with
/// `deselect`ed test ids, and parses its closing lines.
fn pytest(dir: &Path, paths: &[&str], deselect: &[(&str, &str)], env: &[(&str, String)]) -> Outcome {
    let py = python();
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "10", SUITE_TIMEOUT])
        .arg(py)
        .args(["-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-q", "-rfE"])
        .args(["-W", "ignore::pytest.PytestUnknownMarkWarning", &format!("--timeout={TEST_TIMEOUT}")]);
    for (id, _why) in deselect {
        cmd.args(["--deselect", id]);
    }
    cmd.args(paths).current_dir(dir).env("PYTHONDONTWRITEBYTECODE", "1").envs(env.iter().map(|(k, v)| (k, v)));
    let start = Instant::now();
    let out = cmd.output().unwrap();
    let secs = start.elapsed().as_secs_f64();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    parse_pytest(&output, secs)
}

/// Counts from pytest's closing line (`1 failed, 50 passed, 2 deselected
/// in 3.2s`) and the ids from its short summary (`FAILED id - why`).
fn parse_pytest(output: &str, secs: f64) -> Outcome {
    let mut o = Outcome { secs, output: output.to_owned(), ..Outcome::default() };
    let summary = output
        .lines()
        .rev()
        .map(|l| l.trim_matches(|c: char| c == '=' || c.is_whitespace()))
        .find(|l| l.contains(" in ") && [" passed", " failed", " error", " skipped", " deselected"].iter().any(|w| l.contains(w)))
        .unwrap_or_else(|| panic!("no pytest summary line (timed out?):\n{output}"));
    let counts = summary.rsplit_once(" in ").map(|(c, _)| c).unwrap_or(summary);
    for part in counts.split(", ") {
        let mut words = part.split_whitespace();
        let (Some(n), Some(what)) = (words.next().and_then(|n| n.parse::<usize>().ok()), words.next()) else {
            continue;
        };
        match what {
            "passed" | "xpassed" => o.passed += n,
            "failed" | "error" | "errors" => o.failed += n,
            "skipped" | "xfailed" => o.skipped += n,
            "deselected" => o.deselected += n,
            _ => {}
        }
    }
    for line in output.lines() {
        if let Some(rest) = line.strip_prefix("FAILED ").or_else(|| line.strip_prefix("ERROR ")) {
            o.failures.insert(rest.split(" - ").next().unwrap_or(rest).trim().to_owned());
        }
    }
    o
}

/// py-amqp's t/integration: test_rmq.py against the broker (plain AMQP and
/// AMQPS with client certificates made here, written where the suite
/// reads them: t/certs/), test_integration.py against mocks.
#[test]
fn py_amqp_integration_suite() {
    use crate::tls::Pki;
    let src = pypi_sdist("amqp");
    // The suite reads its certificates from t/certs/ (not in the sdist):
    // a CA, a client certificate signed by it, and a "broken" client
    // certificate from another CA.
    let pki = Pki::new(&["guest"]);
    let other = Pki::new(&["broken"]);
    let certs = src.join("t/certs");
    std::fs::create_dir_all(&certs).unwrap();
    let (cert, key) = pki.client_files("guest");
    let (bad_cert, bad_key) = other.client_files("broken");
    for (from, to) in [
        (&pki.ca, "ca_certificate.pem"),
        (&cert, "client_certificate.pem"),
        (&key, "client_key.pem"),
        (&bad_cert, "client_certificate_broken.pem"),
        (&bad_key, "client_key_broken.pem"),
    ] {
        std::fs::copy(from, certs.join(to)).unwrap();
    }
    let s = pki.start(&["--tls-verify-peer", "true"]);
    let amqps = s.amqps.expect("amqps listener");
    let before = delete_all_queues(s.admin_addr(), None);
    assert!(before.is_empty(), "a fresh broker has no queues: {before:?}");
    // Tests that talk to hosts other than loopback.
    let deselect = [
        ("t/integration/test_rmq.py::test_tls_default_certs", "connects to tls-v1-2.badssl.com:1012 (the Internet)"),
        ("t/integration/test_rmq.py::test_tls_no_default_certs_fails", "connects to tls-v1-2.badssl.com:1012 (the Internet)"),
    ];
    let o = pytest(
        &src,
        &["t/integration"],
        &deselect,
        &[
            ("RABBITMQ_HOST", "127.0.0.1".into()),
            ("RABBITMQ_5672_TCP", s.amqp.port().to_string()),
            ("RABBITMQ_5671_TCP", amqps.port().to_string()),
        ],
    );
    let after = delete_all_queues(s.admin_addr(), None);
    o.report("py-amqp t/integration", &after);
    // Expected failures: none.
    o.check(&[], deselect.len());
}

/// kombu's t/integration/test_py_amqp.py (the py-amqp transport; the
/// other files there need Redis, MongoDB, Kafka, SQS or PostgreSQL).
#[test]
fn kombu_py_amqp_integration_suite() {
    let src = pypi_sdist("kombu");
    let s = Server::start();
    let before = delete_all_queues(s.admin_addr(), None);
    assert!(before.is_empty(), "a fresh broker has no queues: {before:?}");
    // No test names a host other than loopback (the failover and retry
    // tests use localhost:12345 and a closed 127.0.0.1 port on purpose).
    let deselect: [(&str, &str); 0] = [];
    let o = pytest(
        &src,
        &["t/integration/test_py_amqp.py"],
        &deselect,
        &[("RABBITMQ_HOST", "127.0.0.1".into()), ("RABBITMQ_5672_TCP", s.amqp.port().to_string())],
    );
    let after = delete_all_queues(s.admin_addr(), None);
    o.report("kombu t/integration/test_py_amqp.py", &after);
    // Expected failures: none.
    o.check(&[], deselect.len());
}

/// amqplib's test/ folder, run as its Makefile does (`mocha --check-leaks
/// -u tdd --exit test/`). Some tests connect to the default
/// `amqp://localhost` (port 5672) and `amqp://[::1]` whatever `URL` says,
/// so the broker and mocha run in a private network namespace where the
/// broker listens on [::]:5672 and the suite keeps all its defaults.
#[test]
fn amqplib_test_suite() {
    let package = npm_package("amqplib");
    let tools = node_suite_tools();
    let ns = Loopback::new("cs").expect("a network namespace (needs root and iproute2)");
    let s = Server::start_in_netns(&ns.name, &["--amqp", "[::]:5672"]);
    let before = delete_all_queues(s.admin_addr(), Some(&ns));
    assert!(before.is_empty(), "a fresh broker has no queues: {before:?}");
    let report = tempfile::NamedTempFile::new().unwrap();
    let start = Instant::now();
    let out = ns
        .command("timeout")
        .args(["-k", "10", SUITE_TIMEOUT])
        .arg(tools.join(".bin/mocha"))
        .args(["--check-leaks", "-u", "tdd", "--exit", "-R", "json", "--reporter-option"])
        .arg(format!("output={}", report.path().display()))
        .arg("test/")
        .current_dir(&package)
        .env("NODE_PATH", &tools)
        .env_remove("URL")
        .output()
        .unwrap();
    let secs = start.elapsed().as_secs_f64();
    let output = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(report.path()).unwrap_or_default())
        .unwrap_or_else(|e| panic!("no mocha report ({e}):\n{output}"));
    let count = |k: &str| json["stats"][k].as_u64().unwrap_or(0) as usize;
    let failures: BTreeSet<String> = json["failures"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|f| f["fullTitle"].as_str().unwrap_or("?").to_owned())
        .collect();
    let details = serde_json::to_string_pretty(&json["failures"]).unwrap_or_default();
    let o = Outcome {
        passed: count("passes"),
        failed: count("failures"),
        skipped: count("pending"),
        deselected: 0,
        failures,
        secs,
        output: format!("{output}\n{details}"),
    };
    let after = delete_all_queues(s.admin_addr(), Some(&ns));
    o.report("amqplib test/", &after);
    drop(s);
    o.check(
        &[
            // Asserts serverProperties.product == 'RabbitMQ'; Sluice says
            // 'Sluice' (RabbitMQ-specific).
            "Connect API serverProperties",
        ],
        0,
    );
}

/// pika and stomp.py ship no tests in their sdists (their integration
/// tests live only in their source repositories): checked here, so a
/// pinned version that starts shipping them is noticed.
#[test]
fn pika_and_stomp_py_sdists_ship_no_tests() {
    for name in ["pika", "stomp.py"] {
        let src = pypi_sdist(name);
        let mut stack = vec![src.clone()];
        let mut tests = Vec::new();
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                let file = path.file_name().and_then(|f| f.to_str()).unwrap_or_default().to_owned();
                if path.is_dir() {
                    if file == "tests" || file == "test" || file == "t" {
                        tests.push(path.clone());
                    }
                    stack.push(path);
                } else if file.starts_with("test_") || file.ends_with("_test.py") {
                    tests.push(path);
                }
            }
        }
        assert!(tests.is_empty(), "{name}'s sdist now ships tests: run them here (client_suites.rs): {tests:?}");
    }
}

/// The pytest output parser on a closing summary with a failure and an
/// error (no server needed).
#[test]
fn pytest_summary_is_parsed() {
    let out = "....F.E\n=========================== short test summary info ============================\n\
FAILED t/integration/test_py_amqp.py::test_PyAMQPPriority::test_publish_requeue_consume - AssertionError\n\
ERROR t/x.py::test_y[tls]\n\
1 failed, 50 passed, 3 skipped, 2 deselected, 1 error, 13 warnings in 39.98s\n";
    let o = parse_pytest(out, 1.0);
    assert_eq!((o.passed, o.failed, o.skipped, o.deselected), (50, 2, 3, 2));
    let ids: Vec<&str> = o.failures.iter().map(String::as_str).collect();
    assert_eq!(ids, ["t/integration/test_py_amqp.py::test_PyAMQPPriority::test_publish_requeue_consume", "t/x.py::test_y[tls]"]);
}
