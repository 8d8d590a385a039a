//! Users, vhosts and permissions (issue 6 item 2) and the admin API with
//! `sluice ctl` (item 6), against the real binary: users made with ctl log
//! in with lapin and STOMP, RabbitMQ's 530/403 answers, guest from
//! loopback only (network namespaces), definitions export and import.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sluice_compat_tests::{run_sluice, sluice_bin};

use crate::common::*;

/// `sluice ctl --admin http://ADDR ARGS...` as guest; panics unless it
/// succeeds; returns stdout.
fn ctl(s: &Server, args: &[&str]) -> String {
    ctl_as(s, "guest", "guest", args).expect("ctl failed")
}

fn ctl_as(s: &Server, user: &str, password: &str, args: &[&str]) -> Result<String, String> {
    let admin = format!("http://{}", s.admin_addr());
    let mut all = vec!["ctl", "--admin", &admin, "--user", user, "--password", password];
    all.extend_from_slice(args);
    let (code, out, err) = run_sluice(&all);
    if code == 0 {
        Ok(out)
    } else {
        Err(err)
    }
}

async fn connect_as(s: &Server, user: &str, password: &str, vhost: &str) -> Result<Connection, lapin::Error> {
    let vhost = vhost.replace('/', "%2f");
    let url = format!("amqp://{user}:{password}@{}/{vhost}", s.amqp);
    Connection::connect(&url, ConnectionProperties::default()).await
}

#[tokio::test]
async fn users_and_permissions_made_with_ctl_are_enforced() {
    let s = Server::start();
    ctl(&s, &["add-vhost", "dev"]);
    ctl(&s, &["add-user", "alice", "alice-pw"]);
    ctl(&s, &["set-permissions", "-p", "dev", "alice", "^alice-", "^alice-|^amq\\.default$", "^alice-"]);
    let users = ctl(&s, &["list-users"]);
    assert!(users.contains("alice\t[]") && users.contains("guest\t[administrator]"), "{users}");

    // Wrong password: refused (lapin sees the connection closed with 403).
    let err = connect_as(&s, "alice", "nope", "dev").await.expect_err("a wrong password is refused");
    assert!(format!("{err:?}").contains("ACCESS_REFUSED") || format!("{err:?}").contains("403"), "{err:?}");
    // No permissions on "/": 530 NOT_ALLOWED at connection.open.
    let err = connect_as(&s, "alice", "alice-pw", "/").await.expect_err("no access to /");
    assert_eq!(code(&err), 530, "{err:?}");
    assert!(text(&err).contains("access to vhost '/' refused for user 'alice'"), "{}", text(&err));

    let c = connect_as(&s, "alice", "alice-pw", "dev").await.expect("alice logs in to dev");
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare("alice-q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.expect("configure ^alice-");
    ch.basic_publish("".into(), "alice-q".into(), BasicPublishOptions::default(), b"hi", BasicProperties::default())
        .await
        .unwrap();
    let got = get_body(&ch, "alice-q").await;
    assert_eq!(got.as_deref(), Some(&b"hi"[..]), "write on amq.default, read on alice-q");
    // Configure refused on another name: 403, the channel closes.
    let err = ch.queue_declare("bob-q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 403, "{err:?}");
    assert!(text(&err).contains("access to queue 'bob-q' in vhost 'dev' refused for user 'alice'"), "{}", text(&err));
    // Read on an exchange it may not read: binding needs it.
    let ch = c.create_channel().await.unwrap();
    let err = ch
        .queue_bind("alice-q".into(), "amq.topic".into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap_err();
    assert_eq!(code(&err), 403);
    assert!(text(&err).contains("access to exchange 'amq.topic'"), "{}", text(&err));
    // Write refused: publishing to amq.direct closes the channel with 403.
    let ch = c.create_channel().await.unwrap();
    // (A confirm carries the close; a later method may find the channel
    // already closing, which says nothing of the reason.)
    let refused = publish_close_code(&ch, "amq.direct", "k", BasicPublishOptions::default(), BasicProperties::default()).await;
    assert_eq!(refused, 403);
    // Read refused: a queue guest made in dev.
    ctl(&s, &["set-permissions", "-p", "dev", "guest", ".*", ".*", ".*"]);
    let g = connect_as(&s, "guest", "guest", "dev").await.unwrap();
    let gch = g.create_channel().await.unwrap();
    gch.queue_declare("shared".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    let ch = c.create_channel().await.unwrap();
    let err = ch.basic_get("shared".into(), BasicGetOptions::default()).await.unwrap_err();
    assert_eq!(code(&err), 403);
    // A change of permissions applies to open connections.
    let ch = c.create_channel().await.unwrap();
    ch.queue_declare("alice-2".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ctl(&s, &["set-permissions", "-p", "dev", "alice", "", "", ""]);
    let err = ch.queue_declare("alice-3".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 403, "the empty expression allows nothing");
    // Deleting the user: new logins fail.
    ctl(&s, &["delete-user", "alice"]);
    assert!(connect_as(&s, "alice", "alice-pw", "dev").await.is_err());
    assert!(!ctl(&s, &["list-permissions"]).contains("alice"), "its permissions went with it");
}

#[tokio::test]
async fn admin_api_needs_an_administrator_and_reports_errors() {
    let s = Server::start();
    ctl(&s, &["add-user", "mon", "mon-pw", "--tag", "monitoring"]);
    // Monitoring may read, not change.
    assert!(ctl_as(&s, "mon", "mon-pw", &["list-vhosts"]).is_ok_and(|o| o.contains('/')));
    let err = ctl_as(&s, "mon", "mon-pw", &["add-vhost", "x"]).unwrap_err();
    assert!(err.contains("403"), "{err}");
    let err = ctl_as(&s, "guest", "wrong", &["list-vhosts"]).unwrap_err();
    assert!(err.contains("401"), "{err}");
    // Bad input is named.
    let err = ctl_as(&s, "guest", "guest", &["set-permissions", "mon", "(", ".*", ".*"]).unwrap_err();
    assert!(err.contains("invalid regular expression"), "{err}");
    let err = ctl_as(&s, "guest", "guest", &["set-permissions", "-p", "nowhere", "mon", ".*", ".*", ".*"]).unwrap_err();
    assert!(err.contains("vhost 'nowhere' does not exist"), "{err}");
    let err = ctl_as(&s, "guest", "guest", &["declare-queue", "q", "--arguments", "[1]"]).unwrap_err();
    assert!(err.contains("JSON object"), "{err}");
    let err = ctl_as(&s, "guest", "guest", &["declare-queue", "q", "--arguments", "{\"x-max-priority\": 300}"]).unwrap_err();
    assert!(err.contains("x-max-priority"), "{err}");
    let err = ctl_as(&s, "guest", "guest", &["delete-user", "ghost"]).unwrap_err();
    assert!(err.contains("404"), "{err}");
}

#[tokio::test]
async fn ctl_manages_queues_exchanges_bindings_and_vhosts() {
    let s = Server::start();
    ctl(&s, &["declare-exchange", "events", "topic"]);
    ctl(&s, &["declare-queue", "audit", "--arguments", "{\"x-max-length\": 2}"]);
    ctl(&s, &["bind", "events", "audit", "--routing-key", "user.*"]);
    let (_c, ch) = open(&s).await;
    for i in 0..3u8 {
        ch.basic_publish("events".into(), "user.login".into(), BasicPublishOptions::default(), &[b'0' + i], BasicProperties::default())
            .await
            .unwrap();
    }
    wait_ready(&ch, "audit", 2).await;
    let queues = ctl(&s, &["list-queues"]);
    assert!(queues.lines().any(|l| l.starts_with("audit\t/\t2\t0\ttrue")), "{queues}");
    let bindings = ctl(&s, &["list-bindings"]);
    assert!(bindings.contains("events\t/\taudit\tqueue\tuser.*"), "{bindings}");
    assert!(ctl(&s, &["list-exchanges"]).contains("events\t/\ttopic\ttrue"));
    ctl(&s, &["purge-queue", "audit"]);
    wait_ready(&ch, "audit", 0).await;
    ctl(&s, &["unbind", "events", "audit", "--routing-key", "user.*"]);
    assert!(!ctl(&s, &["list-bindings"]).contains("audit"));
    ctl(&s, &["delete-queue", "audit"]);
    ctl(&s, &["delete-exchange", "events"]);
    assert!(!ctl(&s, &["list-queues"]).contains("audit"));
    // A vhost with a queue in it: deleting the vhost deletes the queue.
    ctl(&s, &["add-vhost", "tmp"]);
    ctl(&s, &["declare-queue", "inside", "-p", "tmp"]);
    assert!(ctl(&s, &["list-queues", "-p", "tmp"]).contains("inside"));
    ctl(&s, &["delete-vhost", "tmp"]);
    assert!(!ctl(&s, &["list-vhosts"]).contains("tmp"));
    let err = ctl_as(&s, "guest", "guest", &["list-queues", "-p", "tmp"]).unwrap_err();
    assert!(err.contains("404"), "{err}");
}

/// A RabbitMQ 3.10 definitions file (the shape `rabbitmqctl
/// export_definitions` writes; the hash is of "s3cret").
const RABBIT_DEFS: &str = r#"{
  "rabbit_version": "3.10.8", "rabbitmq_version": "3.10.8", "product_name": "RabbitMQ", "product_version": "3.10.8",
  "users": [{"name": "app", "password_hash": "HASH", "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": [], "limits": {}}],
  "vhosts": [{"name": "/", "limits": [], "metadata": {"description": "Default virtual host", "tags": []}}, {"name": "shop", "limits": [], "metadata": {}}],
  "permissions": [{"user": "app", "vhost": "shop", "configure": "", "write": "orders", "read": "orders-q"}],
  "topic_permissions": [], "parameters": [], "global_parameters": [{"name": "cluster_name", "value": "rabbit@x"}], "policies": [],
  "queues": [{"name": "orders-q", "vhost": "shop", "durable": true, "auto_delete": false, "arguments": {"x-queue-type": "classic", "x-max-length": 100}}],
  "exchanges": [{"name": "orders", "vhost": "shop", "type": "topic", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}],
  "bindings": [{"source": "orders", "vhost": "shop", "destination": "orders-q", "destination_type": "queue", "routing_key": "order.#", "arguments": {}}]
}"#;

#[tokio::test]
async fn definitions_from_rabbitmq_import_and_export_round_trips() {
    let s = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let hash = sluice_cluster::meta::auth::hash_password("s3cret");
    let file: PathBuf = dir.path().join("rabbit.json");
    std::fs::write(&file, RABBIT_DEFS.replace("HASH", &hash)).unwrap();
    ctl(&s, &["import-definitions", file.to_str().unwrap()]);
    // The imported user works with its imported password and permissions.
    let c = connect_as(&s, "app", "s3cret", "shop").await.expect("imported user logs in");
    let ch = c.create_channel().await.unwrap();
    ch.basic_publish("orders".into(), "order.new".into(), BasicPublishOptions::default(), b"o1", BasicProperties::default())
        .await
        .unwrap();
    assert_eq!(get_body(&ch, "orders-q").await.as_deref(), Some(&b"o1"[..]), "binding order.# routed it");
    let err = ch.queue_declare("other".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap_err();
    assert_eq!(code(&err), 403, "configure is empty: nothing");
    // Export, wipe into a fresh server, import: the same definitions.
    let exported = dir.path().join("out.json");
    ctl(&s, &["export-definitions", exported.to_str().unwrap()]);
    let defs: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&exported).unwrap()).unwrap();
    assert!(defs["queues"].as_array().unwrap().iter().any(|q| q["name"] == "orders-q" && q["arguments"]["x-max-length"] == 100));
    assert!(defs["users"].as_array().unwrap().iter().any(|u| u["name"] == "app" && u["password_hash"] == hash.as_str()));
    let t = Server::start();
    ctl(&t, &["import-definitions", exported.to_str().unwrap()]);
    let again = dir.path().join("again.json");
    ctl(&t, &["export-definitions", again.to_str().unwrap()]);
    let mut a: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&again).unwrap()).unwrap();
    let mut b = defs.clone();
    for v in [&mut a, &mut b] {
        v["users"].as_array_mut().unwrap().retain(|u| u["name"] != "guest");
    }
    assert_eq!(a, b, "export → import → export is the identity (guest's salt aside)");
    assert!(connect_as(&t, "app", "s3cret", "shop").await.is_ok());
    // Unsupported sections are refused, naming them.
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, r#"{"policies": [{"name": "p", "vhost": "/", "pattern": ".*", "definition": {}}]}"#).unwrap();
    let err = ctl_as(&t, "guest", "guest", &["import-definitions", bad.to_str().unwrap()]).unwrap_err();
    assert!(err.contains("\"policies\" are not supported"), "{err}");
}

#[test]
fn config_file_users_are_created_hashed_and_stomp_logins_use_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("sluice.toml");
    std::fs::write(&cfg, "[users]\nops = \"ops-pw\"\n").unwrap();
    let s = Server::start_with(&["--config", cfg.to_str().unwrap()]);
    let users = ctl(&s, &["list-users"]);
    assert!(users.contains("ops\t[administrator]"), "{users}");
    let defs = ctl(&s, &["export-definitions", "-"]);
    assert!(!defs.contains("ops-pw"), "the password is stored hashed");
    // STOMP: the configured user logs in; a wrong passcode is refused.
    let mut sock = std::net::TcpStream::connect(s.stomp_addr()).unwrap();
    use std::io::{Read, Write};
    sock.write_all(b"CONNECT\naccept-version:1.2\nlogin:ops\npasscode:ops-pw\n\n\0").unwrap();
    let mut buf = [0u8; 9];
    sock.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"CONNECTED");
    let mut sock = std::net::TcpStream::connect(s.stomp_addr()).unwrap();
    sock.write_all(b"CONNECT\naccept-version:1.2\nlogin:ops\npasscode:wrong\n\n\0").unwrap();
    let mut buf = [0u8; 5];
    sock.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ERROR");
}

/// RabbitMQ's loopback_users: guest is refused from another address, a
/// made user is not; guest from the broker's own loopback is fine. The
/// broker runs in one network namespace, the client in another.
#[test]
fn guest_may_only_log_in_from_loopback() {
    let net = sluice_compat_tests::netns::Net::new(3, 2).expect("network namespaces (needs root and iproute2)");
    let home = tempfile::tempdir().unwrap();
    let mut serve = net
        .command(0, &sluice_bin())
        .args(["serve", "--amqp", "0.0.0.0:0", "--stomp", "127.0.0.1:0", "--web-stomp", "127.0.0.1:0"])
        .args(["--metrics", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--data-dir"])
        .arg(home.path().join("data"))
        .env("SLUICE_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = serve.stdout.take().unwrap();
    let (mut amqp_port, mut admin) = (None, None);
    let mut lines = BufReader::new(stdout).lines();
    for line in lines.by_ref().map_while(Result::ok) {
        if let Some(a) = line.strip_prefix("admin API listening on ") {
            admin = Some(a.trim().to_owned());
        }
        if let Some(a) = line.strip_prefix("AMQP listening on ") {
            amqp_port = a.trim().rsplit(':').next().map(str::to_owned);
            break;
        }
    }
    // Keep reading: a closed pipe would fail the server's later lines.
    std::thread::spawn(move || lines.for_each(drop));
    let (port, admin) = (amqp_port.expect("AMQP line"), admin.expect("admin line"));
    let client = PathBuf::from(env!("CARGO_BIN_EXE_cluster_client"));
    let probe = |host: usize, user: &str, addr: &str| {
        let url = format!("amqp://{user}:{user}-pw@{addr}:{port}/%2f");
        let url = if user == "guest" { url.replace("guest-pw", "guest") } else { url };
        let out = net.command(host, &client).args(["declare", &url, "probe"]).output().unwrap();
        (String::from_utf8_lossy(&out.stdout).contains("declared"), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let remote = net.addrs[0].clone();
    let (ok, err) = probe(1, "guest", &remote);
    assert!(!ok, "guest from {} must be refused", net.addrs[1]);
    // lapin reports the 403 close, or (when the socket closes first) a
    // reset; either way the connection is refused, while "remote" gets in
    // from the same host below.
    assert!(err.contains("ACCESS_REFUSED") || err.contains("403") || err.contains("reset by peer"), "{err}");
    let (ok, err) = probe(0, "guest", "127.0.0.1");
    assert!(ok, "guest from loopback: {err}");
    let ctl = net
        .command(0, &sluice_bin())
        .args(["ctl", "--admin", &format!("http://{admin}"), "add-user", "remote", "remote-pw"])
        .output()
        .unwrap();
    assert!(ctl.status.success(), "{}", String::from_utf8_lossy(&ctl.stderr));
    let set = net
        .command(0, &sluice_bin())
        .args(["ctl", "--admin", &format!("http://{admin}"), "set-permissions", "remote", ".*", ".*", ".*"])
        .output()
        .unwrap();
    assert!(set.status.success());
    let (ok, err) = probe(1, "remote", &remote);
    assert!(ok, "a made user logs in from anywhere: {err}");
    let _ = serve.kill();
    let _ = serve.wait();
    std::thread::sleep(Duration::from_millis(10));
}

/// Audit events (item 7): a queue bound to `amq.rabbitmq.event` sees user
/// and permission changes, logins (failed ones too), connections and
/// declares, with who did them; clients cannot publish there.
#[tokio::test]
async fn audit_events_reach_the_event_exchange() {
    use lapin::types::AMQPValue;
    let s = Server::start();
    let (_c, ch) = open(&s).await;
    ch.queue_declare("audit".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    ch.queue_bind("audit".into(), "amq.rabbitmq.event".into(), "#".into(), QueueBindOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ctl(&s, &["add-user", "bob", "bob-pw"]);
    ctl(&s, &["set-permissions", "bob", ".*", ".*", ".*"]);
    assert!(connect_as(&s, "bob", "wrong", "/").await.is_err());
    let b = connect_as(&s, "bob", "bob-pw", "/").await.unwrap();
    let bch = b.create_channel().await.unwrap();
    bch.queue_declare("bob-q".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
    bch.exchange_declare("bob-x".into(), lapin::ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    bch.queue_delete("bob-q".into(), QueueDeleteOptions::default()).await.unwrap();
    b.close(200, "bye".into()).await.unwrap();
    // (event, name header, user header, who acted)
    let mut seen: Vec<(String, String, String, String)> = Vec::new();
    let text = |h: &FieldTable, k: &str| match h.inner().get(k) {
        Some(AMQPValue::LongString(s)) => s.to_string(),
        _ => String::new(),
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !seen.iter().any(|e| e.0 == "connection.closed" && e.2 == "bob") {
        assert!(std::time::Instant::now() < deadline, "events so far: {seen:?}");
        match ch.basic_get("audit".into(), BasicGetOptions { no_ack: true }).await.unwrap() {
            Some(m) => {
                let h = m.delivery.properties.headers().clone().unwrap_or_default();
                assert!(h.inner().contains_key("timestamp_in_ms"));
                seen.push((m.delivery.routing_key.to_string(), text(&h, "name"), text(&h, "user"), text(&h, "user_who_performed_action")));
            }
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let has = |event: &str, name: &str, user: &str, by: &str| {
        seen.iter().any(|e| e.0 == event && (name.is_empty() || e.1 == name) && (user.is_empty() || e.2 == user) && e.3 == by)
    };
    assert!(has("user.created", "bob", "bob", "guest"), "{seen:?}");
    assert!(has("permission.created", "", "bob", "guest"), "{seen:?}");
    assert!(has("user.authentication.failure", "", "bob", "sluice"), "{seen:?}");
    assert!(has("user.authentication.success", "", "bob", "sluice"), "{seen:?}");
    assert!(has("connection.created", "", "bob", "sluice"), "{seen:?}");
    assert!(has("queue.created", "bob-q", "", "bob"), "{seen:?}");
    assert!(has("exchange.created", "bob-x", "", "bob"), "{seen:?}");
    assert!(has("queue.deleted", "bob-q", "", "bob"), "{seen:?}");
    // Clients cannot forge events.
    let refused = publish_close_code(&ch, "amq.rabbitmq.event", "user.created", BasicPublishOptions::default(), BasicProperties::default()).await;
    assert_eq!(refused, 403);
}

/// Over STOMP a refused operation is an ERROR frame (`access_refused`, the
/// AMQP text in the body), as RabbitMQ's STOMP plugin sends.
#[test]
fn stomp_gets_an_error_frame_for_a_refused_destination() {
    use std::io::{Read, Write};
    let s = Server::start();
    ctl(&s, &["add-user", "erin", "erin-pw"]);
    ctl(&s, &["set-permissions", "erin", "^erin-", "^erin-|^amq\\.default$", "^erin-"]);
    let mut sock = std::net::TcpStream::connect(s.stomp_addr()).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    sock.write_all(b"CONNECT\naccept-version:1.2\nlogin:erin\npasscode:erin-pw\n\n\0").unwrap();
    sock.write_all(b"SEND\ndestination:/queue/erin-ok\nreceipt:r1\n\nfine\0").unwrap();
    // The receipt comes once the message is stored.
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&all).contains("receipt-id:r1") {
        let n = sock.read(&mut buf).unwrap();
        assert!(n > 0, "closed before the receipt: {}", String::from_utf8_lossy(&all).replace('\0', "^@"));
        all.extend_from_slice(&buf[..n]);
    }
    assert!(String::from_utf8_lossy(&all).starts_with("CONNECTED"));
    sock.write_all(b"SEND\ndestination:/queue/frank-q\n\nnope\0").unwrap();
    let mut all = Vec::new();
    let _ = sock.read_to_end(&mut all);
    let text = String::from_utf8_lossy(&all).replace('\0', "^@");
    let error = text.split("ERROR\n").nth(1).unwrap_or_else(|| panic!("no ERROR frame: {text}"));
    assert!(error.contains("message:access_refused"), "{error}");
    assert!(error.contains("access to queue 'frank-q' in vhost '/' refused for user 'erin'"), "{error}");
}
