//! The `sluice` command line: errors are one line and a non-zero exit.

use std::net::TcpListener;

use sluice_compat_tests::run_sluice;

#[test]
fn taken_port_is_a_one_line_error() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let (code, _out, err) = run_sluice(&["serve", "--amqp", &addr, "--data-dir", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains(&addr) && err.contains("AMQP"), "{err}");
}

#[test]
fn unusable_data_dir_is_a_one_line_error() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let bad = f.path().join("sub");
    let (code, _out, err) = run_sluice(&["serve", "--amqp", "127.0.0.1:0", "--data-dir", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("data dir"), "{err}");
}

#[test]
fn config_file_with_unknown_key_is_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, "amqp = \"127.0.0.1:0\"\nbogus = 1\n").unwrap();
    let (code, _out, err) = run_sluice(&["serve", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bogus"), "{err}");
}

#[test]
fn second_server_on_the_same_data_dir_is_refused() {
    let s = sluice_compat_tests::Server::start();
    let dir = s.data_dir.to_str().unwrap().to_string();
    let (code, _out, err) = run_sluice(&["serve", "--amqp", "127.0.0.1:0", "--data-dir", &dir]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("data dir"), "{err}");
}

#[test]
fn config_file_and_environment_are_read() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, format!("data_dir = {:?}\nheartbeat = 7\n", data.to_str().unwrap())).unwrap();
    let out = std::process::Command::new(sluice_compat_tests::sluice_bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env("SLUICE_AMQP", "127.0.0.1:0")
        .env("SLUICE_STOMP", "127.0.0.1:0")
        .env("SLUICE_WEB_STOMP", "127.0.0.1:0")
        .env("SLUICE_METRICS", "127.0.0.1:0")
        .env("SLUICE_ADMIN", "127.0.0.1:0")
        .env("SLUICE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = out;
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    let mut found = false;
    for _ in 0..3 {
        line.clear();
        std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
        found |= line.starts_with("AMQP listening on 127.0.0.1:");
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "SLUICE_AMQP must set the listener");
    assert!(data.exists(), "data_dir from the config file must be used");
}
