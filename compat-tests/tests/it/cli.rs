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
    // The AMQP line comes after the banner and the admin API's line.
    for _ in 0..10 {
        line.clear();
        if std::io::BufRead::read_line(&mut stdout, &mut line).unwrap() == 0 {
            break;
        }
        found |= line.starts_with("AMQP listening on 127.0.0.1:");
        if found {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(found, "SLUICE_AMQP must set the listener");
    assert!(data.exists(), "data_dir from the config file must be used");
}

/// Runs `sluice ARGS` with `env`, no SLUICE_LOG, and free ports unless
/// `file_keys` (keys of its config file) set them; killed after 20 s should
/// it start after all. Returns (exit code, stderr).
fn run_with_env(args: &[&str], env: &[(&str, &str)], file_keys: &[&str]) -> (i32, String) {
    let data = tempfile::tempdir().unwrap();
    let mut cmd = std::process::Command::new(sluice_compat_tests::sluice_bin());
    cmd.args(args).env_remove("SLUICE_LOG").env("XDG_CONFIG_HOME", data.path());
    for key in ["data_dir", "amqp", "stomp", "web_stomp", "admin", "metrics"] {
        // The environment would win over the file.
        if !file_keys.contains(&key) {
            let value = if key == "data_dir" { data.path().to_str().unwrap() } else { "127.0.0.1:0" };
            cmd.env(format!("SLUICE_{}", key.to_uppercase()), value);
        }
    }
    let mut child = cmd
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Writes `text` as a config file in `dir` and runs `sluice ROLE --config
/// FILE` (see [`run_with_env`]).
fn run_with_file(dir: &std::path::Path, role: &str, text: &str) -> (i32, String) {
    let cfg = dir.join(format!("{role}.toml"));
    std::fs::write(&cfg, text).unwrap();
    let keys: Vec<&str> = text.lines().filter_map(|l| l.split_once('=')).map(|(k, _)| k.trim()).collect();
    run_with_env(&[role, "--config", cfg.to_str().unwrap()], &[], &keys)
}

#[test]
fn config_file_errors_name_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("serve", "amqp = \"127.0.0.1:0\"\nunknown_key = 1\n", "line 2, key `unknown_key`: unknown field"),
        ("serve", "channel_max = \"many\"\n", "line 1, key `channel_max`: invalid type: string \"many\""),
        ("serve", "channel_max = 70000\n", "key `channel_max`"),
        ("serve", "fsync = \"yes\"\n", "key `fsync`"),
        ("serve", "[users]\nalice = 3\n", "line 2, key `users.alice`"),
        ("serve", "log_format = \"xml\"\n", "key `log_format`: unknown variant `xml`"),
        ("serve", "log_level = \"verbose\"\n", "log_level 'verbose'"),
        ("serve", "amqp = \"nowhere\"\n", "amqp address 'nowhere' is not HOST:PORT"),
        ("serve", "admin = \"localhost\"\n", "admin address 'localhost'"),
        ("serve", "frame_max = 100\n", "frame_max must be at least 4096"),
        ("gateway", "nodes = [\"127.0.0.1:1\"]\nbogus_gateway_key = true\n", "key `bogus_gateway_key`"),
        ("gateway", "nodes = [\"nowhere\"]\n", "nodes address 'nowhere'"),
        ("gateway", "nodes = \"127.0.0.1:1\"\n", "key `nodes`: invalid type"),
        ("node", "id = \"n1\"\nheartbeat_ms = \"fast\"\n", "line 2, key `heartbeat_ms`"),
        ("node", "id = \"n1\"\nlisten = \"nowhere\"\n", "listen address 'nowhere'"),
        ("node", "id = \"n1\"\nseeds = [\"nowhere\"]\n", "seeds address 'nowhere'"),
        ("node", "id = \"n1\"\nheartbeat_ms = 500\nfailure_timeout_ms = 400\n", "failure_timeout_ms (400) must be longer than heartbeat_ms (500)"),
        ("node", "id = \"n1\"\ncluster_tls_cert = \"x.pem\"\n", "missing cluster_tls_key, cluster_tls_ca"),
    ];
    for (role, text, expected) in cases {
        let (code, err) = run_with_file(dir.path(), role, text);
        assert_eq!(code, 1, "sluice {role} with {text:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "one line for {text:?}: {err}");
        assert!(err.starts_with("sluice: ") && err.contains(expected), "sluice {role} with {text:?}: expected {expected:?} in {err}");
    }
}

#[test]
fn bad_environment_values_name_the_variable() {
    let cases: &[(&str, (&str, &str), &str)] = &[
        ("serve", ("SLUICE_CHANNEL_MAX", "abc"), "--channel-max"),
        ("serve", ("SLUICE_FSYNC", "maybe"), "--fsync"),
        ("gateway", ("SLUICE_HEARTBEAT", "-1"), "--heartbeat"),
        ("node", ("SLUICE_LOG_FORMAT", "xml"), "--log-format"),
        ("node", ("SLUICE_FAILURE_TIMEOUT_MS", "soon"), "--failure-timeout-ms"),
    ];
    for (role, (var, value), flag) in cases {
        let (code, err) = run_with_env(&[role], &[(var, value)], &[]);
        assert_eq!(code, 2, "{var}={value}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        let expected = format!("sluice: environment variable {var}: invalid value '{value}' for '{flag}");
        assert!(err.starts_with(&expected), "expected {expected:?}, got {err}");
    }
    // Values that parse but are wrong name the key.
    let (code, err) = run_with_env(&["serve"], &[("SLUICE_LOG", "sluice=loud")], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("log_level 'sluice=loud'"), "{err}");
    let (code, err) = run_with_env(&["serve"], &[("SLUICE_METRICS", "everywhere")], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("metrics address 'everywhere'"), "{err}");
}

#[test]
fn bad_flag_values_name_the_flag() {
    let (code, _out, err) = run_sluice(&["serve", "--log-format", "xml"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid value 'xml' for '--log-format") && err.contains("text, json"), "{err}");
    let (code, _out, err) = run_sluice(&["node", "--id", "n1", "--log-level", "verbose"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("log_level 'verbose'"), "{err}");
    let (code, _out, err) = run_sluice(&["serve", "--channel-max", "70000"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("'--channel-max"), "{err}");
    assert!(!err.contains("environment variable"), "a flag is not blamed on a variable: {err}");
}

/// Starts `sluice serve` with free ports (from the environment) and `env`
/// on top; returns the AMQP address it printed, or its stderr if it exited.
fn serve_amqp_addr(args: &[&str], env: &[(&str, &str)]) -> Result<String, String> {
    use std::io::BufRead;
    let data = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(sluice_compat_tests::sluice_bin())
        .arg("serve")
        .args(args)
        .env("SLUICE_DATA_DIR", data.path())
        .env("SLUICE_STOMP", "127.0.0.1:0")
        .env("SLUICE_WEB_STOMP", "127.0.0.1:0")
        .env("SLUICE_METRICS", "127.0.0.1:0")
        .env("SLUICE_ADMIN", "127.0.0.1:0")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    // EOF when it exits: a refused configuration.
    let addr = stdout.lines().map_while(Result::ok).find_map(|l| l.strip_prefix("AMQP listening on ").map(str::to_string));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    addr.ok_or_else(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn flag_beats_environment_beats_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, "amqp = \"nowhere\"\n").unwrap();
    let cfg = cfg.to_str().unwrap();
    // The file alone: its bad value is used (and refused).
    let err = serve_amqp_addr(&["--config", cfg], &[]).unwrap_err();
    assert!(err.contains("amqp address 'nowhere'"), "{err}");
    // The environment wins over the file.
    let addr = serve_amqp_addr(&["--config", cfg], &[("SLUICE_AMQP", "127.0.0.1:0")]).unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // The flag wins over the environment (and the file).
    let addr = serve_amqp_addr(&["--config", cfg, "--amqp", "127.0.0.1:0"], &[("SLUICE_AMQP", "nowhere-either")]).unwrap();
    assert!(addr.starts_with("127.0.0.1:"), "{addr}");
    // SLUICE_CONFIG names the file too.
    let err = serve_amqp_addr(&[], &[("SLUICE_CONFIG", cfg)]).unwrap_err();
    assert!(err.contains("amqp address 'nowhere'"), "{err}");
}

/// The server's stderr lines so far.
fn stderr_lines(s: &sluice_compat_tests::Server) -> Vec<String> {
    s.stderr.lock().map(|l| l.clone()).unwrap_or_default()
}

/// Waits up to 10 s for a stderr line that `pick` accepts.
fn wait_for_line<T>(s: &sluice_compat_tests::Server, pick: impl Fn(&str) -> Option<T>) -> Option<T> {
    for _ in 0..200 {
        if let Some(found) = stderr_lines(s).iter().find_map(|l| pick(l)) {
            return Some(found);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    None
}

#[tokio::test]
async fn json_logs_carry_the_connection_span() {
    let s = sluice_compat_tests::Server::start_with(&["--log-format", "json", "--log-level", "debug"]);
    let conn = lapin::Connection::connect(&s.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let _ch = conn.create_channel().await.unwrap();
    let amqp = tokio::task::spawn_blocking({
        let stderr = s.stderr.clone();
        move || {
            for _ in 0..200 {
                let lines = stderr.lock().map(|l| l.clone()).unwrap_or_default();
                let found = lines.iter().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| {
                    v["span"]["proto"] == "amqp" && v["span"]["user"] == "guest" && v["fields"]["message"] == "connection open"
                });
                if found.is_some() {
                    return found;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            None
        }
    })
    .await
    .unwrap();
    let Some(line) = amqp else { panic!("no JSON 'connection open' line with the span: {:#?}", stderr_lines(&s)) };
    let span = &line["span"];
    assert_eq!(span["name"], "conn", "{line}");
    assert_eq!(span["vhost"], "/", "{line}");
    assert!(span["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{line}");
    assert!(span["id"].is_number(), "{line}");
    assert_eq!(line["level"], "DEBUG", "{line}");
    assert!(line["timestamp"].is_string(), "{line}");
    conn.close(200, "bye".into()).await.unwrap();

    // STOMP: the same span fields once CONNECT is accepted.
    use std::io::{Read, Write};
    let mut stomp = std::net::TcpStream::connect(s.stomp_addr()).unwrap();
    stomp.write_all(b"CONNECT\naccept-version:1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0").unwrap();
    let mut buf = [0u8; 9];
    stomp.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"CONNECTED");
    let stomp_line = wait_for_line(&s, |l| {
        let v: serde_json::Value = serde_json::from_str(l).ok()?;
        (v["span"]["proto"] == "stomp" && v["fields"]["message"] == "STOMP session open").then_some(v)
    });
    let Some(line) = stomp_line else { panic!("no JSON 'STOMP session open' line: {:#?}", stderr_lines(&s)) };
    assert_eq!(line["span"]["user"], "guest", "{line}");
    assert_eq!(line["span"]["vhost"], "/", "{line}");

    // Every line is JSON.
    for l in stderr_lines(&s) {
        assert!(serde_json::from_str::<serde_json::Value>(&l).is_ok(), "not JSON: {l}");
    }
}

#[tokio::test]
async fn text_logs_show_the_connection_span() {
    let s = sluice_compat_tests::Server::start_with(&["--log-level", "warn,sluice::amqp=debug"]);
    let conn = lapin::Connection::connect(&s.url(), lapin::ConnectionProperties::default()).await.unwrap();
    let found = tokio::task::spawn_blocking({
        let stderr = s.stderr.clone();
        move || {
            for _ in 0..200 {
                let lines = stderr.lock().map(|l| l.clone()).unwrap_or_default();
                if let Some(l) = lines.iter().find(|l| l.contains("connection open")) {
                    return Some(l.clone());
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            None
        }
    })
    .await
    .unwrap();
    let Some(line) = found else { panic!("no 'connection open' line: {:#?}", stderr_lines(&s)) };
    assert!(line.contains("conn{") && line.contains("peer=127.0.0.1:"), "{line}");
    assert!(line.contains("proto=\"amqp\"") || line.contains("proto=amqp"), "{line}");
    assert!(line.contains("user=\"guest\"") || line.contains("user=guest"), "{line}");
    assert!(line.contains("vhost=\"/\"") || line.contains("vhost=/"), "{line}");
    assert!(serde_json::from_str::<serde_json::Value>(&line).is_err(), "text, not JSON: {line}");
    assert!(!line.contains('\u{1b}'), "no colours outside a terminal: {line:?}");
    conn.close(200, "bye".into()).await.unwrap();
}

#[test]
fn log_level_and_format_from_the_config_file() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    let data = dir.path().join("data");
    let text = format!("data_dir = {:?}\nlog_level = \"info\"\nlog_format = \"json\"\n[users]\nalice = \"pw\"\n", data.to_str().unwrap());
    std::fs::write(&cfg, text).unwrap();
    let mut child = std::process::Command::new(sluice_compat_tests::sluice_bin())
        .args(["serve", "--config", cfg.to_str().unwrap()])
        .env_remove("SLUICE_LOG")
        .env_remove("SLUICE_LOG_FORMAT")
        .env("SLUICE_AMQP", "127.0.0.1:0")
        .env("SLUICE_STOMP", "127.0.0.1:0")
        .env("SLUICE_WEB_STOMP", "127.0.0.1:0")
        .env("SLUICE_ADMIN", "127.0.0.1:0")
        .env("SLUICE_METRICS", "127.0.0.1:0")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let started = stdout.lines().map_while(Result::ok).any(|l| l.starts_with("AMQP listening on "));
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(started, "{err}");
    // At info (the default, warn, would not show it), as JSON.
    let created = err.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| {
        v["fields"]["message"] == "user created from the configuration file" && v["fields"]["user"] == "alice"
    });
    assert!(created.is_some_and(|v| v["level"] == "INFO"), "{err}");
}

#[test]
fn ctl_reads_its_config_file_and_environment() {
    let s = sluice_compat_tests::Server::start();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("ctl.toml");
    let url = format!("http://{}", s.admin_addr());
    std::fs::write(&cfg, format!("admin_url = {url:?}\nadmin_user = \"guest\"\nadmin_password = \"guest\"\n")).unwrap();
    let ctl = |args: &[&str], env: &[(&str, &str)]| {
        let out = std::process::Command::new(sluice_compat_tests::sluice_bin())
            .arg("ctl")
            .args(args)
            .env("XDG_CONFIG_HOME", dir.path())
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    // The file names the admin API.
    let (code, out, err) = ctl(&["--config", cfg.to_str().unwrap(), "list-vhosts"], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l.trim() == "/"), "{out}");
    // A wrong password from the environment wins over the file's.
    let (code, _out, err) = ctl(&["list-vhosts"], &[("SLUICE_CONFIG", cfg.to_str().unwrap()), ("SLUICE_ADMIN_PASSWORD", "wrong")]);
    assert_ne!(code, 0, "the environment's password must be used");
    assert!(err.contains("401") || err.to_lowercase().contains("unauthorized") || err.contains("refused"), "{err}");
    // ... and the flag (old name, an alias) over the environment.
    let (code, _out, err) = ctl(
        &["--config", cfg.to_str().unwrap(), "--password", "guest", "list-vhosts"],
        &[("SLUICE_ADMIN_PASSWORD", "wrong")],
    );
    assert_eq!(code, 0, "{err}");
    // Unknown keys are refused, naming the key.
    std::fs::write(&cfg, "admin = \"http://127.0.0.1:1\"\n").unwrap();
    let (code, _out, err) = ctl(&["--config", cfg.to_str().unwrap(), "list-vhosts"], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("line 1, key `admin`: unknown field `admin`"), "{err}");
}
