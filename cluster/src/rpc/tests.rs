//! Connection-level tests over an in-memory pipe, with a hand-driven peer
//! that speaks raw frames after a real handshake.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::frame::{self, Header, HANDSHAKE_MAX_FRAME};
use super::handshake::handshake;
use super::*;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Msg {
    Ping(u32),
    Text(String),
}
impl Versioned for Msg {}

type Raw = (
    FramedRead<ReadHalf<DuplexStream>, LengthDelimitedCodec>,
    FramedWrite<WriteHalf<DuplexStream>, LengthDelimitedCodec>,
);

/// A `Client` on one end of a pipe and the raw framed other end, both past
/// the handshake.
async fn pair() -> (Client<Msg, Msg>, Incoming<Msg, Msg>, Raw) {
    let (a, b) = tokio::io::duplex(1 << 20);
    let secret = Secret::new(*b"a test secret, 32 bytes long....").unwrap();
    let opts = Options::default();
    let framed = |s: DuplexStream| {
        let (r, w) = tokio::io::split(s);
        (
            FramedRead::new(r, frame::codec(HANDSHAKE_MAX_FRAME)),
            FramedWrite::new(w, frame::codec(HANDSHAKE_MAX_FRAME)),
        )
    };
    let (mut ar, mut aw) = framed(a);
    let (mut br, mut bw) = framed(b);
    let (me_a, me_b) = (PeerInfo::gateway("a"), PeerInfo::node("b"));
    let (ea, eb) = tokio::join!(
        handshake(&mut ar, &mut aw, &secret, &me_a, &opts),
        handshake(&mut br, &mut bw, &secret, &me_b, &opts),
    );
    let (ea, eb) = (ea.unwrap(), eb.unwrap());
    assert_eq!(ea.peer, PeerInfo::node("b"));
    assert_eq!(eb.peer, PeerInfo::gateway("a"));
    br.decoder_mut().set_max_frame_length(opts.max_frame_len);
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let (client, incoming) = conn::start(ar, aw, ea, addr, opts.max_frame_len, None);
    (client, incoming, (br, bw))
}

fn raw(header: Header, body: Option<&Msg>) -> Bytes {
    frame::encode(&header, body, 1, usize::MAX).unwrap()
}

#[tokio::test]
async fn raw_peer_answers_and_pushes() {
    let (client, mut incoming, (mut r, mut w)) = pair().await;
    let call = tokio::spawn({
        let client = client.clone();
        async move { client.call(Msg::Ping(7)).await }
    });
    let req = r.next().await.unwrap().unwrap();
    let (h, body) = frame::decode_header(&req).unwrap();
    let Header::Request { id } = h else { panic!("{h:?}") };
    assert_eq!(Msg::decode(1, body).unwrap(), Msg::Ping(7));
    // An answer to nobody is ignored, then the real one.
    w.send(raw(Header::Response { id: id + 1000 }, Some(&Msg::Ping(0)))).await.unwrap();
    w.send(raw(Header::Response { id }, Some(&Msg::Ping(8)))).await.unwrap();
    assert_eq!(call.await.unwrap().unwrap(), Msg::Ping(8));

    w.send(raw(Header::Message, Some(&Msg::Text("push".into())))).await.unwrap();
    match incoming.recv().await.unwrap() {
        Inbound::Message(m) => assert_eq!(m, Msg::Text("push".into())),
        other => panic!("{other:?}"),
    }
    // A request from the peer, answered through Incoming.
    w.send(raw(Header::Request { id: 5 }, Some(&Msg::Ping(1)))).await.unwrap();
    match incoming.recv().await.unwrap() {
        Inbound::Request { body, responder } => {
            assert_eq!(body, Msg::Ping(1));
            responder.respond(Msg::Ping(2)).await.unwrap();
        }
        other => panic!("{other:?}"),
    }
    let resp = r.next().await.unwrap().unwrap();
    assert_eq!(frame::decode_header(&resp).unwrap().0, Header::Response { id: 5 });
}

#[tokio::test]
async fn undecodable_request_is_answered_failed() {
    let (_client, _incoming, (mut r, mut w)) = pair().await;
    let mut bad = raw(Header::Request { id: 9 }, None).to_vec();
    bad.extend_from_slice(&[0xff, 0xff, 0xff]);
    w.send(Bytes::from(bad)).await.unwrap();
    let resp = r.next().await.unwrap().unwrap();
    let (h, _) = frame::decode_header(&resp).unwrap();
    assert!(matches!(h, Header::Failed { id: 9, .. }), "{h:?}");
}

#[tokio::test]
async fn dropped_request_is_answered_failed() {
    let (_client, mut incoming, (mut r, mut w)) = pair().await;
    w.send(raw(Header::Request { id: 3 }, Some(&Msg::Ping(1)))).await.unwrap();
    drop(incoming.recv().await.unwrap());
    let resp = r.next().await.unwrap().unwrap();
    assert!(matches!(frame::decode_header(&resp).unwrap().0, Header::Failed { id: 3, .. }));
}

#[tokio::test]
async fn garbage_after_handshake_closes_and_fails_pending_calls() {
    for garbage in [&b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff"[..], &[2, 0xff], &[7]] {
        let (client, mut incoming, (_r, mut w)) = pair().await;
        let call = tokio::spawn({
            let client = client.clone();
            async move { client.call(Msg::Ping(1)).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        w.send(Bytes::copy_from_slice(garbage)).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(2), call).await.unwrap().unwrap();
        assert!(matches!(r, Err(Error::Closed)), "{r:?}");
        assert!(incoming.recv().await.is_none());
        assert!(client.is_closed());
        assert!(matches!(client.call(Msg::Ping(2)).await, Err(Error::Closed)));
    }
}

#[tokio::test]
async fn oversized_inbound_frame_closes() {
    let (client, _incoming, (_r, mut w)) = pair().await;
    // Claim a 2 GiB frame: refused from its length alone.
    w.get_mut().write_all_buf(&mut &[0x80u8, 0, 0, 0, 1, 2, 3][..]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(2), client.closed()).await.unwrap();
}
