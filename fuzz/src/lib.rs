//! What the session targets share: one broker (a single node on a
//! temporary directory, no fsync) for the whole fuzzing run, and a client
//! that writes an input to a fresh session over an in-memory stream,
//! closes its side, and reads until the server closes its own.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

pub use sluice_codecs::fuzzing::{session_bytes, Session};
use sluice::server::{broker_without_listeners, Broker};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Longer than any of the session's own timeouts once the client has
/// closed its side: a session still open after it hangs.
const SESSION_DEADLINE: Duration = Duration::from_secs(30);

struct Shared {
    rt: tokio::runtime::Runtime,
    broker: Arc<Broker>,
    _dir: tempfile::TempDir,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let broker = rt.block_on(broker_without_listeners(dir.path().to_path_buf())).expect("a broker");
        Shared { rt, broker, _dir: dir }
    })
}

/// Runs one session with what a client sends for `data`
/// ([`session_bytes`]), then EOF. Panics (a crash to libFuzzer) if the
/// session does not end.
pub fn run_session(protocol: Session, data: &[u8]) {
    let s = shared();
    let broker = s.broker.clone();
    let bytes = session_bytes(protocol, data);
    s.rt.block_on(async move {
        let (client, server) = tokio::io::duplex(64 * 1024);
        let (srd, swr) = tokio::io::split(server);
        let conn_id = broker.next_conn_id();
        let peer = sluice::auth::Peer { cert_user: None, loopback: true, addr: "fuzz".into() };
        let shutdown = CancellationToken::new();
        let session = match protocol {
            Session::Amqp => {
                tokio::spawn(sluice::amqp::connection::serve(srd, swr, conn_id, broker, shutdown, peer))
            }
            Session::Stomp => {
                tokio::spawn(sluice::stomp::connection::serve(srd, swr, conn_id, broker, shutdown, peer))
            }
        };
        let (mut crd, mut cwr) = tokio::io::split(client);
        let write = async move {
            // The server may close first (a refused header, an error):
            // what it did not read is of no interest.
            let _ = cwr.write_all(&bytes).await;
            let _ = cwr.shutdown().await;
            cwr
        };
        let read = async move {
            // SLUICE_FUZZ_ECHO=1 prints what the server answered (to look
            // at one input: `cargo fuzz run -s none <target> <file>`).
            let echo = std::env::var_os("SLUICE_FUZZ_ECHO").is_some();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = crd.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                if echo {
                    eprintln!("server: {}", String::from_utf8_lossy(&buf[..n]).escape_debug());
                }
            }
        };
        let ended = tokio::time::timeout(SESSION_DEADLINE, async {
            let (_cwr, ()) = tokio::join!(write, read);
            session.await
        })
        .await;
        match ended {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the session task failed: {e}"),
            Err(_) => panic!("the session did not end {SESSION_DEADLINE:?} after the client closed"),
        }
    });
}
