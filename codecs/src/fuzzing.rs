//! Fuzzing entry points: each runs arbitrary bytes through a decoder the
//! way the broker applies it to what a client sends. The cargo-fuzz
//! targets (`fuzz/fuzz_targets/`) call them, and `tests/fuzz_corpus.rs`
//! replays the committed corpus (`fuzz/corpus/`) through them in every
//! test run. Whatever the input, each must return (errors are fine),
//! never panic or loop forever.

use std::collections::HashMap;

use bytes::BytesMut;

use crate::amqp::frame::{decode_frame, parse_protocol_header, Frame};
use crate::amqp::{map, Assembler};
use crate::stomp::{Decoder, Limits, Version};
use crate::ws::frame::{MessageDecoder, Role};
use crate::ws::handshake::{check_upgrade, parse_request};

/// AMQP: the protocol header, frames (with a small and the default
/// frame_max), per-channel command assembly and the mapping to commands.
pub fn amqp(data: &[u8]) {
    let _ = parse_protocol_header(data);
    for frame_max in [4096, 131_072] {
        let mut buf = BytesMut::from(data);
        let mut channels: HashMap<u16, Assembler> = HashMap::new();
        while let Ok(Some(frame)) = decode_frame(&mut buf, frame_max) {
            let channel = match &frame {
                Frame::Method { channel, .. } | Frame::Header { channel, .. } | Frame::Body { channel, .. } => *channel,
                Frame::Heartbeat { .. } => continue,
            };
            let assembler = channels.entry(channel).or_insert_with(|| Assembler::with_max_body(1 << 20));
            if let Ok(Some(assembled)) = assembler.push(frame) {
                let _ = map::inbound(assembled);
            }
        }
    }
}

/// STOMP: the streaming decoder in the version the first byte picks,
/// with the default limits and tight ones.
pub fn stomp(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else { return };
    let version = match pick % 3 {
        0 => Version::V1_0,
        1 => Version::V1_1,
        _ => Version::V1_2,
    };
    let tight = Limits { max_frame_size: 4096, max_headers: 8, max_header_line_length: 256 };
    for limits in [Limits::default(), tight] {
        let mut decoder = Decoder::new(version, limits);
        let mut buf = BytesMut::from(rest);
        while let Ok(Some(_)) = decoder.decode(&mut buf) {}
    }
}

/// WebSocket: the upgrade request parser and its checks, then the
/// message decoder on what follows, as a server and as a client.
pub fn websocket(data: &[u8]) {
    let mut rest = data;
    if let Ok(Some((request, head))) = parse_request(data, 8192) {
        let _ = check_upgrade(&request);
        rest = data.get(head..).unwrap_or_default();
    }
    for role in [Role::Server, Role::Client] {
        let mut decoder = MessageDecoder::new(role, 1 << 20);
        let mut buf = BytesMut::from(rest);
        while let Ok(Some(_)) = decoder.decode(&mut buf) {}
    }
}

/// Which session a session input is for.
#[derive(Clone, Copy, Debug)]
pub enum Session {
    Amqp,
    Stomp,
}

/// What a client sends for a session input (the `amqp_session` and
/// `stomp_session` targets, and the live replay of their corpus): when
/// the first byte is even, a whole login first (AMQP: protocol header,
/// start-ok as guest, tune-ok, open of `/`; STOMP: CONNECT as guest),
/// then the rest of the input; when it is odd, the rest alone (the
/// handshake itself fuzzed).
pub fn session_bytes(session: Session, data: &[u8]) -> Vec<u8> {
    let Some((&pick, rest)) = data.split_first() else { return Vec::new() };
    let mut out = if pick % 2 == 1 {
        Vec::new()
    } else {
        match session {
            Session::Amqp => amqp_login(),
            Session::Stomp => STOMP_CONNECT.to_vec(),
        }
    };
    out.extend_from_slice(rest);
    out
}

/// A STOMP CONNECT as guest, any version.
pub const STOMP_CONNECT: &[u8] = b"CONNECT\naccept-version:1.0,1.1,1.2\nhost:/\nlogin:guest\npasscode:guest\n\n\0";

fn amqp_frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(1);
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&u32::try_from(payload.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
}

fn shortstr(out: &mut Vec<u8>, s: &str) {
    out.push(u8::try_from(s.len()).unwrap_or(u8::MAX));
    out.extend_from_slice(s.as_bytes());
}

/// The client's side of an AMQP login as guest on `/`.
fn amqp_login() -> Vec<u8> {
    let mut out = b"AMQP\x00\x00\x09\x01".to_vec();
    let mut start_ok = vec![0, 10, 0, 11];
    start_ok.extend_from_slice(&0u32.to_be_bytes()); // client properties: an empty table
    shortstr(&mut start_ok, "PLAIN");
    let response = b"\0guest\0guest";
    start_ok.extend_from_slice(&12u32.to_be_bytes());
    start_ok.extend_from_slice(response);
    shortstr(&mut start_ok, "en_US");
    amqp_frame(&mut out, &start_ok);
    let mut tune_ok = vec![0, 10, 0, 31];
    tune_ok.extend_from_slice(&2047u16.to_be_bytes());
    tune_ok.extend_from_slice(&131_072u32.to_be_bytes());
    tune_ok.extend_from_slice(&0u16.to_be_bytes());
    amqp_frame(&mut out, &tune_ok);
    let mut open = vec![0, 10, 0, 40];
    shortstr(&mut open, "/");
    shortstr(&mut open, "");
    open.push(0);
    amqp_frame(&mut out, &open);
    out
}

/// The committed corpus of a fuzz target (`fuzz/corpus/<target>/`), its
/// files sorted, for the tests that replay it. Panics if it is missing.
pub fn corpus(target: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut files: Vec<std::path::PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    files
}
