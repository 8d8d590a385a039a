//! The node protocol over real TCP on 127.0.0.1.

#![allow(clippy::unwrap_used)] // tests may panic

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sluice_cluster::rpc::{
    self, connect, connect_with, serve_with, Client, Error, Handler, Inbound, Options, PeerInfo,
    Role, Secret, Versioned, SUPPORTED_VERSIONS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Req {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Answer `n` after `delay_ms`.
    Tagged {
        n: u64,
        delay_ms: u64,
    },
    /// Never answer.
    Hang,
    Panic,
    /// The server pushes `Note(0..count)`, then answers `Done`.
    Subscribe {
        count: u64,
    },
    /// One-way.
    Note(u64),
    /// The server answers with the notes it has seen.
    Notes,
    /// The server answers with the version it negotiated.
    Version,
    /// The server calls the client back with `Echo(data)` and answers
    /// what the client answered.
    CallMeBack(#[serde(with = "serde_bytes")] Vec<u8>),
}
impl Versioned for Req {}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Resp {
    Echo(#[serde(with = "serde_bytes")] Vec<u8>),
    Tagged(u64),
    Done,
    Notes(Vec<u64>),
    Version(u16),
    Failed(String),
}
impl Versioned for Resp {}

#[derive(Default)]
struct State {
    connected: AtomicUsize,
    requests: AtomicUsize,
    notes: Mutex<Vec<u64>>,
}

#[derive(Clone, Default)]
struct TestHandler(Arc<State>);

impl Handler<Req, Resp> for TestHandler {
    async fn handle(&self, conn: &Client<Req, Resp>, req: Req) -> Resp {
        self.0.requests.fetch_add(1, Ordering::SeqCst);
        match req {
            Req::Echo(b) => Resp::Echo(b),
            Req::Tagged { n, delay_ms } => {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await;
                Resp::Tagged(n)
            }
            Req::Hang => {
                tokio::time::sleep(Duration::from_secs(3600)).await;
                Resp::Done
            }
            Req::Panic => panic!("handler panics on purpose"),
            Req::Subscribe { count } => {
                for i in 0..count {
                    if conn.send(Req::Note(i)).await.is_err() {
                        break;
                    }
                }
                Resp::Done
            }
            Req::Note(_) => Resp::Failed("notes are one-way".into()),
            Req::Notes => Resp::Notes(self.0.notes.lock().unwrap().clone()),
            Req::Version => Resp::Version(conn.negotiated_version()),
            Req::CallMeBack(data) => match conn.call(Req::Echo(data)).await {
                Ok(r) => r,
                Err(e) => Resp::Failed(e.to_string()),
            },
        }
    }

    async fn message(&self, _conn: &Client<Req, Resp>, msg: Req) {
        if let Req::Note(n) = msg {
            self.0.notes.lock().unwrap().push(n);
        }
    }

    fn connected(&self, conn: &Client<Req, Resp>) {
        assert_eq!(conn.peer().role, Role::Gateway);
        self.0.connected.fetch_add(1, Ordering::SeqCst);
    }
}

fn secret() -> Secret {
    Secret::new(*b"0123456789abcdef0123456789abcdef").unwrap()
}

fn me() -> PeerInfo {
    PeerInfo::gateway("gw-1")
}

struct Server {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

async fn server_with(secret: Secret, options: Options) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handler = TestHandler::default();
    let state = handler.0.clone();
    let task =
        tokio::spawn(serve_with(listener, secret, PeerInfo::node("node-1"), handler, options));
    Server { addr, state, task }
}

async fn server() -> Server {
    server_with(secret(), Options::default()).await
}

type Conn = (Client<Req, Resp>, rpc::Incoming<Req, Resp>);

async fn client(addr: SocketAddr) -> Conn {
    connect(addr, &secret(), me()).await.unwrap()
}

#[tokio::test]
async fn round_trip() {
    let s = server().await;
    let (c, _incoming) = client(s.addr).await;
    assert_eq!(c.peer(), &PeerInfo::node("node-1"));
    assert_eq!(c.negotiated_version(), *SUPPORTED_VERSIONS.end());
    let data: Vec<u8> = (0..=255).collect();
    assert_eq!(c.call(Req::Echo(data.clone())).await.unwrap(), Resp::Echo(data));
    assert_eq!(c.call(Req::Tagged { n: 42, delay_ms: 0 }).await.unwrap(), Resp::Tagged(42));
    assert_eq!(s.state.connected.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_pipelined_calls_answered_out_of_order() {
    let s = server().await;
    let (c, _incoming) = client(s.addr).await;
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for n in 0..1000u64 {
        let c = c.clone();
        let delay_ms = rand::random_range(0..50);
        tasks.spawn(async move { (n, c.call(Req::Tagged { n, delay_ms }).await) });
    }
    let mut seen = 0;
    while let Some(done) = tasks.join_next().await {
        let (n, r) = done.unwrap();
        assert_eq!(r.unwrap(), Resp::Tagged(n), "response matched to its caller");
        seen += 1;
    }
    assert_eq!(seen, 1000);
    // Pipelined: far less than 1000 × the mean delay.
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(s.state.connected.load(Ordering::SeqCst), 1, "one connection");
}

#[tokio::test]
async fn wrong_secret_is_refused_on_both_sides() {
    let s = server().await;
    let wrong = Secret::new(*b"not the cluster secret at all!!!").unwrap();
    let r = connect::<Req, Resp>(s.addr, &wrong, me()).await;
    assert!(matches!(r, Err(Error::Refused { .. })), "{r:?}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.state.connected.load(Ordering::SeqCst), 0);
    assert_eq!(s.state.requests.load(Ordering::SeqCst), 0);
    // The server still serves peers with the secret.
    let (c, _i) = client(s.addr).await;
    assert_eq!(c.call(Req::Tagged { n: 1, delay_ms: 0 }).await.unwrap(), Resp::Tagged(1));
}

#[tokio::test]
async fn server_with_wrong_secret_is_refused_by_the_client() {
    let wrong = Secret::new(*b"not the cluster secret at all!!!").unwrap();
    let s = server_with(wrong, Options::default()).await;
    let r = connect::<Req, Resp>(s.addr, &secret(), me()).await;
    assert!(matches!(r, Err(Error::Refused { .. })), "{r:?}");
    assert_eq!(s.state.connected.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn version_negotiation() {
    let s = server_with(secret(), Options { versions: 2..=3, ..Options::default() }).await;
    let opts = Options { versions: 1..=2, ..Options::default() };
    let (c, _i) = connect_with::<Req, Resp>(s.addr, &secret(), me(), &opts).await.unwrap();
    assert_eq!(c.negotiated_version(), 2);
    assert_eq!(c.call(Req::Version).await.unwrap(), Resp::Version(2), "the server agrees");

    let s = server_with(secret(), Options { versions: 2..=2, ..Options::default() }).await;
    let opts = Options { versions: 1..=1, ..Options::default() };
    let r = connect_with::<Req, Resp>(s.addr, &secret(), me(), &opts).await;
    match r {
        Err(Error::VersionMismatch { ours, theirs }) => {
            assert_eq!((ours, theirs), (1..=1, 2..=2));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(s.state.connected.load(Ordering::SeqCst), 0);
}

/// Sends `bytes` on a raw socket (optionally closing the write side) and
/// waits until the server has closed the connection.
async fn server_drops(addr: SocketAddr, bytes: &[u8], shutdown: bool) -> Duration {
    let start = Instant::now();
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The server may close (and reset) before everything is written.
    let _ = s.write_all(bytes).await;
    if shutdown {
        let _ = s.shutdown().await;
    }
    let mut sink = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut sink)).await;
    assert!(
        closed.is_ok(),
        "the server kept a connection that sent {:?}",
        &bytes[..bytes.len().min(16)]
    );
    start.elapsed()
}

/// Panics anywhere in the process other than the deliberate one.
static UNEXPECTED_PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_unexpected_panics() {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !info.to_string().contains("on purpose") {
                UNEXPECTED_PANICS.fetch_add(1, Ordering::SeqCst);
            }
            previous(info);
        }));
    });
}

#[tokio::test]
async fn garbage_is_rejected_without_affecting_other_connections() {
    count_unexpected_panics();
    let s = server().await;
    let (c, _i) = client(s.addr).await;

    let noise: Vec<u8> =
        (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    server_drops(s.addr, &noise, false).await;
    server_drops(s.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
    // A 2^31-byte length prefix.
    server_drops(s.addr, &[0x80, 0, 0, 0, 1, 2, 3, 4], false).await;
    // A truncated frame: 100 bytes announced, 10 sent, then EOF.
    let mut truncated = vec![0, 0, 0, 100];
    truncated.extend_from_slice(&[7; 10]);
    server_drops(s.addr, &truncated, true).await;
    // A well-framed payload that is not a handshake.
    server_drops(s.addr, &[0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0xff], false).await;
    // A handshake frame with the wrong magic.
    server_drops(s.addr, &[0, 0, 0, 6, 5, b'o', b't', b'h', b'e', b'r'], false).await;

    assert_eq!(s.state.connected.load(Ordering::SeqCst), 1);
    assert_eq!(c.call(Req::Tagged { n: 5, delay_ms: 0 }).await.unwrap(), Resp::Tagged(5));
    let (c2, _i2) = client(s.addr).await;
    assert_eq!(c2.call(Req::Tagged { n: 6, delay_ms: 0 }).await.unwrap(), Resp::Tagged(6));
    assert!(!s.task.is_finished());
    assert_eq!(UNEXPECTED_PANICS.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn silent_peer_is_dropped_after_the_handshake_timeout() {
    assert_eq!(Options::default().handshake_timeout, Duration::from_secs(5));
    let timeout = Duration::from_millis(300);
    let s =
        server_with(secret(), Options { handshake_timeout: timeout, ..Options::default() }).await;
    let took = server_drops(s.addr, &[], false).await;
    assert!(took >= Duration::from_millis(250), "dropped after {took:?}");

    // And a client facing a silent server gives up.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let _hold = tokio::spawn(async move {
        let (_sock, _) = silent.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let opts = Options { handshake_timeout: timeout, ..Options::default() };
    let start = Instant::now();
    let r = connect_with::<Req, Resp>(addr, &secret(), me(), &opts).await;
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_calls_fail_with_closed_when_the_server_dies() {
    let s = server().await;
    let (c, mut incoming) = client(s.addr).await;
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let c = c.clone();
        calls.spawn(async move { c.call(Req::Hang).await });
    }
    while s.state.requests.load(Ordering::SeqCst) < 20 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let died = Instant::now();
    s.task.abort();
    while let Some(r) = calls.join_next().await {
        let r = r.unwrap();
        assert!(matches!(r, Err(Error::Closed)), "{r:?}");
    }
    assert!(died.elapsed() < Duration::from_secs(1), "took {:?}", died.elapsed());
    assert!(incoming.recv().await.is_none());
    assert!(c.is_closed());
    assert!(matches!(c.call(Req::Version).await, Err(Error::Closed)));
    assert!(matches!(c.send(Req::Note(1)).await, Err(Error::Closed)));
}

#[tokio::test]
async fn one_way_messages_from_the_server_arrive_in_order() {
    let s = server().await;
    let (c, mut incoming) = client(s.addr).await;
    let count = 2000;
    assert_eq!(c.call(Req::Subscribe { count }).await.unwrap(), Resp::Done);
    for expected in 0..count {
        match incoming.recv().await {
            Some(Inbound::Message(Req::Note(n))) => assert_eq!(n, expected),
            other => panic!("{other:?}"),
        }
    }
}

#[tokio::test]
async fn one_way_messages_to_the_server_arrive_in_order() {
    let s = server().await;
    let (c, _i) = client(s.addr).await;
    for n in 0..1000 {
        c.send(Req::Note(n)).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let Resp::Notes(notes) = c.call(Req::Notes).await.unwrap() else { panic!() };
        if notes.len() == 1000 {
            assert_eq!(notes, (0..1000).collect::<Vec<_>>());
            break;
        }
        assert!(Instant::now() < deadline, "{} notes arrived", notes.len());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_server_can_call_the_client() {
    let s = server().await;
    let (c, mut incoming) = client(s.addr).await;
    let answering = tokio::spawn(async move {
        while let Some(inbound) = incoming.recv().await {
            if let Inbound::Request { body: Req::Echo(mut b), responder } = inbound {
                b.reverse();
                responder.respond(Resp::Echo(b)).await.unwrap();
            }
        }
    });
    assert_eq!(c.call(Req::CallMeBack(vec![1, 2, 3])).await.unwrap(), Resp::Echo(vec![3, 2, 1]));
    drop(c);
    tokio::time::timeout(Duration::from_secs(2), answering).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_panicking_handler_fails_only_its_call() {
    let s = server().await;
    let (c, _i) = client(s.addr).await;
    let r = c.call(Req::Panic).await;
    assert!(matches!(r, Err(Error::Remote(_))), "{r:?}");
    assert_eq!(c.call(Req::Tagged { n: 3, delay_ms: 0 }).await.unwrap(), Resp::Tagged(3));
}

#[tokio::test]
async fn too_large_request_fails_without_closing() {
    let s = server_with(secret(), Options { max_frame_len: 1024, ..Options::default() }).await;
    let (c, _i) = client(s.addr).await;
    let r = c.call(Req::Echo(vec![0; 2000])).await;
    assert!(matches!(r, Err(Error::FrameTooLarge { max: 1024, .. })), "{r:?}");
    assert_eq!(c.call(Req::Echo(vec![1; 900])).await.unwrap(), Resp::Echo(vec![1; 900]));
}

#[tokio::test]
async fn call_timeout_and_cancelled_calls() {
    let s = server().await;
    let (c, _i) = client(s.addr).await;
    let r = c.call_timeout(Req::Hang, Duration::from_millis(50)).await;
    assert!(matches!(r, Err(Error::Timeout)), "{r:?}");
    // A late answer to a caller that gave up is ignored.
    let r = c.call_timeout(Req::Tagged { n: 1, delay_ms: 100 }, Duration::from_millis(10)).await;
    assert!(matches!(r, Err(Error::Timeout)));
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(c.call(Req::Tagged { n: 2, delay_ms: 0 }).await.unwrap(), Resp::Tagged(2));
}

#[test]
fn secret_file_is_created_0600_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("config").join("sluice");
    let a = Secret::load_or_create_in(&base).unwrap();
    let path = base.join("cluster-secret");
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let content = std::fs::read_to_string(&path).unwrap();
    assert_eq!(content.trim().len(), 64, "32 random bytes in hex");
    assert!(content.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    let dir_mode = std::fs::metadata(&base).unwrap().permissions().mode() & 0o777;
    assert_eq!(dir_mode & 0o077, 0);
    // Reused, also through an explicit path.
    let b = Secret::load_or_create_in(&base).unwrap();
    let c = Secret::load_or_create(Some(&path)).unwrap();
    let files: Vec<_> = std::fs::read_dir(&base).unwrap().collect();
    assert_eq!(files.len(), 1, "no temporary file left behind");
    drop((a, b, c));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), content);
}

#[tokio::test]
async fn secrets_from_one_file_authenticate() {
    let dir = tempfile::tempdir().unwrap();
    let a = Secret::load_or_create_in(dir.path()).unwrap();
    let b = Secret::load_or_create_in(dir.path()).unwrap();
    let s = server_with(a, Options::default()).await;
    let (c, _i) = connect::<Req, Resp>(s.addr, &b, me()).await.unwrap();
    assert_eq!(c.call(Req::Version).await.unwrap(), Resp::Version(*SUPPORTED_VERSIONS.end()));
    let other = Secret::load_or_create_in(&dir.path().join("elsewhere")).unwrap();
    assert!(matches!(connect::<Req, Resp>(s.addr, &other, me()).await, Err(Error::Refused { .. })));
}

#[test]
fn processes_starting_together_agree_on_one_secret() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("sluice");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let base = base.clone();
            std::thread::spawn(move || {
                Secret::load_or_create_in(&base).unwrap();
                std::fs::read(base.join("cluster-secret")).unwrap()
            })
        })
        .collect();
    let seen: Vec<Vec<u8>> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert!(seen.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(std::fs::read_dir(&base).unwrap().count(), 1);
}

#[test]
fn readable_secret_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Secret::load_or_create_in(dir.path()).unwrap();
    let path = dir.path().join("cluster-secret");
    for mode in [0o640, 0o604, 0o660] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let e = Secret::load_or_create_in(dir.path()).unwrap_err();
        assert!(matches!(e, Error::InsecureSecretFile { .. }), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()) && text.contains("chmod 600"), "{text}");
        assert!(Secret::load_or_create(Some(&path)).is_err());
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    Secret::load(&path).unwrap();
    // A read-only owner file is fine too.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400)).unwrap();
    Secret::load(&path).unwrap();
}

#[test]
fn missing_or_weak_secret_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let e = Secret::load_or_create(Some(&missing)).unwrap_err();
    assert!(matches!(e, Error::SecretFile { .. }), "{e:?}");
    assert!(e.to_string().contains("nope"), "{e}");
    assert!(!missing.exists(), "an explicit path is never created");

    let short = dir.path().join("short");
    std::fs::write(&short, "tiny\n").unwrap();
    std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(matches!(Secret::load(&short), Err(Error::InvalidSecret(_))));

    // An operator's own secret: surrounding whitespace is not part of it.
    let own = dir.path().join("own");
    std::fs::write(&own, "  correct horse battery staple\n").unwrap();
    std::fs::set_permissions(&own, std::fs::Permissions::from_mode(0o600)).unwrap();
    Secret::load(&own).unwrap();
    assert!(Secret::new("short").is_err());
}

/// Throughput of one connection with 256 calls in flight, 1 KiB echoed
/// each way. Run: cargo test -p sluice-cluster --test rpc -- --ignored --nocapture
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement"]
async fn measure_pipelined_throughput() {
    let s = server().await;
    let (c, _i) = client(s.addr).await;
    let payload = vec![0xa5u8; 1024];
    for _ in 0..1000 {
        c.call(Req::Echo(payload.clone())).await.unwrap();
    }
    let run = Duration::from_secs(5);
    let done = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..256 {
        let (c, payload, done) = (c.clone(), payload.clone(), done.clone());
        tasks.spawn(async move {
            while start.elapsed() < run {
                let r = c.call(Req::Echo(payload.clone())).await.unwrap();
                assert!(matches!(r, Resp::Echo(b) if b.len() == 1024));
                done.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let secs = start.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "rpc: 1 connection, 256 in flight, 1 KiB echo: {n} calls in {secs:.2} s = {:.0} calls/s ({} build)",
        n as f64 / secs,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
}
