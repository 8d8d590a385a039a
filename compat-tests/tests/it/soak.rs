//! The two-minute soak (issue #9): `scripts/soak.sh` with the binary
//! under test for 120 s of mixed load (persistent with confirms,
//! transient, STOMP, fan-out, 20 queues, connection churn). It fails if
//! a load run failed, the broker died or logged an error, file
//! descriptors leaked or memory kept growing; the samples it printed are
//! shown with `--no-capture`.

use std::process::Command;

#[test]
fn two_minute_soak_of_mixed_load() {
    let out_dir = tempfile::tempdir().unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/soak.sh");
    let out = Command::new("bash")
        .arg(script)
        .env("BIN", sluice_compat_tests::sluice_bin())
        .env("SOAK_SECS", "120")
        .env("SOAK_SAMPLE", "10")
        .env("SOAK_OUT", out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the soak failed:\n{stdout}\n{}\nbroker log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(out_dir.path().join("broker.log")).unwrap_or_default()
    );
    let samples = std::fs::read_to_string(out_dir.path().join("soak.csv")).unwrap();
    let rows: Vec<Vec<u64>> =
        samples.lines().skip(1).map(|l| l.split(',').map(|v| v.parse().unwrap()).collect()).collect();
    assert!(rows.len() >= 10, "{} samples in 120 s", rows.len());
    // The load ran throughout: every sample after the first saw deliveries.
    assert!(rows.iter().skip(1).all(|r| r[2] > 0), "a sample without deliveries:\n{samples}");
}
