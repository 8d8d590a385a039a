//! `sluice bench` against a real server: the short smoke runs CI makes
//! (issue #8: the benchmark's figures are not part of pass/fail, but the
//! tool must work). Each run's JSON report must account for every message.

use serde_json::Value;
use sluice_compat_tests::{run_sluice, Server};

fn bench(s: &Server, extra: &[&str]) -> Value {
    let uri = s.url();
    let mut args = vec!["bench", "--uri", &uri, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = run_sluice(&args);
    assert_eq!(code, 0, "sluice bench {extra:?} failed: {err}\n{out}");
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("not one JSON report ({e}): {out}"))
}

fn n(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("{key} missing in {v}"))
}

#[test]
fn persistent_confirmed_manual_ack_run_accounts_for_every_message() {
    let s = Server::start();
    let r = bench(&s, &["-z", "1", "--persistent", "-c", "64", "-q", "100"]);
    let published = n(&r, "published");
    assert!(published > 0, "{r}");
    assert_eq!(n(&r, "confirmed"), published, "{r}");
    assert_eq!(n(&r, "nacked"), 0, "{r}");
    assert_eq!(n(&r, "consumed"), published, "{r}");
    for key in ["latency_us", "confirm_latency_us"] {
        let p = &r[key];
        let (p50, p99, max) = (n(p, "p50"), n(p, "p99"), n(p, "max"));
        assert!(p50 <= p99 && p99 <= max && max > 0, "{key}: {p}");
    }
}

#[test]
fn fixed_count_fanout_and_multi_queue_runs() {
    let s = Server::start();
    // Fan-out to 3 queues: every message reaches each of them.
    let r = bench(&s, &["-C", "300", "--fanout", "3", "-y", "3", "-s", "16"]);
    assert_eq!(n(&r, "published"), 300, "{r}");
    assert_eq!(n(&r, "consumed"), 900, "{r}");
    // 4 queues with a producer and a consumer each, auto-ack, 64 KiB.
    let r = bench(&s, &["-C", "50", "--queues", "4", "-x", "4", "-y", "4", "-a", "-s", "65536"]);
    assert_eq!((n(&r, "published"), n(&r, "consumed")), (200, 200), "{r}");
    // The queues are gone afterwards (no --keep).
    let (code, out, err) = run_sluice(&["ctl", "--admin", &format!("http://{}", s.admin_addr()), "list-queues"]);
    assert_eq!(code, 0, "{err}");
    assert!(!out.contains("sluice-bench"), "{out}");
}

#[test]
fn a_fixed_rate_is_kept() {
    let s = Server::start();
    let r = bench(&s, &["-z", "2", "-r", "200"]);
    let published = n(&r, "published");
    // 200 msg/s for 2 s: 400, give or take the start and the stop.
    assert!((380..=420).contains(&published), "{r}");
    assert_eq!(n(&r, "consumed"), published);
}

#[test]
fn bad_input_is_named() {
    let (code, _, err) = run_sluice(&["bench", "--uri", "http://localhost", "-z", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("--uri") && err.contains("amqp://"), "{err}");
    let s = Server::start();
    let uri = s.url().replace("guest:guest", "guest:wrong");
    let (code, _, err) = run_sluice(&["bench", "--uri", &uri, "-z", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("login as \"guest\" refused"), "{err}");
}

#[test]
fn stomp_runs_with_receipts_and_through_a_fanout_exchange() {
    let s = Server::start();
    let stomp = format!("stomp://guest:guest@{}/", s.stomp_addr());
    let run = |extra: &[&str]| {
        let mut args = vec!["bench", "--uri", &stomp, "--json"];
        args.extend_from_slice(extra);
        let (code, out, err) = run_sluice(&args);
        assert_eq!(code, 0, "sluice bench {extra:?} failed: {err}\n{out}");
        serde_json::from_str::<Value>(out.trim()).unwrap_or_else(|e| panic!("not one JSON report ({e}): {out}"))
    };
    // Receipts as confirms, client (cumulative) acks.
    let r = run(&["-z", "1", "--persistent", "-c", "32", "-q", "64", "--multi-ack", "10"]);
    let published = n(&r, "published");
    assert!(published > 0, "{r}");
    assert_eq!((n(&r, "confirmed"), n(&r, "consumed")), (published, published), "{r}");
    // Fan-out needs the exchange declared over AMQP.
    let manage = s.url();
    let r = run(&["-C", "100", "--fanout", "2", "-y", "2", "-a", "--manage-uri", &manage]);
    assert_eq!((n(&r, "published"), n(&r, "consumed")), (100, 200), "{r}");
    let (code, _, err) = run_sluice(&["bench", "--uri", &stomp, "--fanout", "2", "-z", "1"]);
    assert_ne!(code, 0);
    assert!(err.contains("--manage-uri"), "{err}");
}

#[test]
fn a_drain_acknowledges_everything_it_counted_before_it_closes() {
    let s = Server::start();
    let ready = || {
        let (code, out, err) = run_sluice(&["ctl", "--admin", &format!("http://{}", s.admin_addr()), "list-queues"]);
        assert_eq!(code, 0, "{err}");
        // Tab-separated: name, vhost, messages_ready, consumers, durable.
        let row = out.lines().find(|l| l.split('\t').next() == Some("kept-0")).unwrap_or_else(|| panic!("no kept-0 in {out}"));
        row.split('\t').nth(2).and_then(|n| n.parse::<u64>().ok()).unwrap_or_else(|| panic!("row {row}"))
    };
    // A backlog of 2,000, kept.
    let r = bench(&s, &["-y", "0", "-C", "2000", "--persistent", "-c", "100", "--keep", "--prefix", "kept"]);
    assert_eq!(n(&r, "confirmed"), 2000, "{r}");
    assert_eq!(ready(), 2000);
    // Drained in two runs, acking every 7 deliveries: each run's last
    // acks go out before it closes, so exactly what it counted is gone
    // (it may count more than -C: the prefetch window is on its way when
    // the count is reached) and the rest is ready again.
    let r = bench(&s, &["-x", "0", "-C", "1500", "--persistent", "-q", "500", "--multi-ack", "7", "--keep", "--prefix", "kept"]);
    let first = n(&r, "consumed");
    assert!((1500..=2000).contains(&first), "{r}");
    assert_eq!(ready(), 2000 - first, "after a run that counted {first}");
    if first < 2000 {
        let rest = (2000 - first).to_string();
        let r = bench(&s, &["-x", "0", "-C", &rest, "--persistent", "-q", "500", "--multi-ack", "7", "--keep", "--prefix", "kept"]);
        assert_eq!(n(&r, "consumed"), 2000 - first, "{r}");
    }
    assert_eq!(ready(), 0, "a drained queue");
}
