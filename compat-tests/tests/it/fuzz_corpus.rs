//! The session fuzz corpora (`fuzz/corpus/amqp_session/` and
//! `stomp_session/`, grown by `scripts/fuzz.sh`) replayed over TCP
//! against a live broker process: every input, sent as the fuzz targets
//! send it ([`session_bytes`]), must end with the server closing the
//! connection once the client has closed its side, and the broker must
//! still serve afterwards.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::Path;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use sluice_codecs::fuzzing::{corpus, session_bytes, Session};

use crate::common::{open, Server};

/// Sends one input, closes the write side, and reads until the server
/// closes; panics if it is still open 10 s later.
fn replay(addr: SocketAddr, session: Session, file: &Path) {
    let bytes = session_bytes(session, &std::fs::read(file).unwrap());
    let mut sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may close before reading everything (a refused header).
    let _ = sock.write_all(&bytes);
    let _ = sock.shutdown(Shutdown::Write);
    let mut buf = [0u8; 65536];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("{}: the session was still open 10 s after the client closed its side", file.display())
            }
            Err(_) => return, // reset by the server: closed too
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_fuzz_corpus_replays_against_a_live_server() {
    let s = Server::start();
    let runs = [("amqp_session", Session::Amqp, s.amqp), ("stomp_session", Session::Stomp, s.stomp_addr())];
    for (target, session, addr) in runs {
        let files = corpus(target);
        assert!(files.len() >= 4, "the {target} corpus has {} inputs", files.len());
        tokio::task::spawn_blocking(move || {
            for f in &files {
                replay(addr, session, f);
            }
        })
        .await
        .unwrap();
    }
    // Still serving.
    let (_conn, ch) = open(&s).await;
    ch.queue_declare("after-the-corpus".into(), QueueDeclareOptions::default(), FieldTable::default()).await.unwrap();
}
