//! Black-box tests of the STOMP codec through its public API: examples from
//! the STOMP 1.0/1.1/1.2 specifications, escaping per version, bodies with
//! NULs, line ends and heart-beats, limits, hostile and truncated input, and
//! property-based round trips of every frame type in every version.

#![allow(clippy::unwrap_used)] // tests may panic

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use sluice_codecs::stomp::*;
use tokio_util::codec::{Decoder as _, Encoder as _};

const V10: Version = Version::V1_0;
const V11: Version = Version::V1_1;
const V12: Version = Version::V1_2;

/// Decodes everything in `bytes` with one decoder; panics on an error.
fn items(bytes: &[u8], version: Version) -> Vec<Item> {
    try_items(bytes, version, Limits::default()).unwrap()
}

/// Decodes everything in `bytes`; returns the error if one occurs.
fn try_items(bytes: &[u8], version: Version, limits: Limits) -> Result<Vec<Item>, DecodeError> {
    let mut decoder = Decoder::new(version, limits);
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(item) = decoder.decode(&mut buf)? {
        out.push(item);
    }
    Ok(out)
}

/// The frames in `bytes`, heart-beats dropped.
fn frames(bytes: &[u8], version: Version) -> Vec<Frame> {
    items(bytes, version)
        .into_iter()
        .filter_map(|i| match i {
            Item::Frame(f) => Some(f),
            Item::Heartbeat => None,
        })
        .collect()
}

/// The single frame in `bytes`.
fn one(bytes: &[u8], version: Version) -> Frame {
    let mut all = frames(bytes, version);
    assert_eq!(
        all.len(),
        1,
        "expected one frame in {:?}",
        String::from_utf8_lossy(bytes)
    );
    all.remove(0)
}

fn error_of(bytes: &[u8], version: Version) -> DecodeError {
    error_with(bytes, version, Limits::default())
}

fn error_with(bytes: &[u8], version: Version, limits: Limits) -> DecodeError {
    match try_items(bytes, version, limits) {
        Err(e) => e,
        Ok(items) => panic!("expected an error, decoded {items:?}"),
    }
}

fn encode(frame: &Frame, version: Version) -> BytesMut {
    let mut out = BytesMut::new();
    encode_frame(frame, version, &mut out).unwrap();
    out
}

fn h(headers: &[(&str, &str)]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

// ---------------------------------------------------------------------------
// Examples from the specifications
// ---------------------------------------------------------------------------

#[test]
fn spec_1_2_connect_and_connected() {
    let connect = one(
        b"CONNECT\naccept-version:1.2\nhost:stomp.github.org\n\n\0",
        V10,
    );
    assert_eq!(connect.command, Command::Connect);
    assert_eq!(connect.accept_version(), Some(vec![V12]));
    assert_eq!(connect.host(), Some("stomp.github.org"));
    assert!(connect.body.is_empty());

    let connected = one(b"CONNECTED\nversion:1.2\n\n\0", V12);
    assert_eq!(connected.command, Command::Connected);
    assert_eq!(connected.version(), Ok(Some(V12)));
}

#[test]
fn spec_1_2_protocol_negotiation_skips_unknown_versions() {
    let connect = one(
        b"CONNECT\naccept-version:1.0,1.1,2.0\nhost:stomp.github.org\n\n\0",
        V10,
    );
    assert_eq!(connect.accept_version(), Some(vec![V10, V11]));
    let old = one(b"CONNECT\nlogin:guest\n\n\0", V10);
    assert_eq!(old.accept_version(), None, "no header means 1.0 only");
}

#[test]
fn spec_1_2_send_subscribe_and_friends() {
    let send = one(
        b"SEND\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\n\0",
        V12,
    );
    assert_eq!(send.command, Command::Send);
    assert_eq!(send.destination(), Some("/queue/a"));
    assert_eq!(send.content_type(), Some("text/plain"));
    assert_eq!(&send.body[..], b"hello queue a\n");

    let subscribe = one(
        b"SUBSCRIBE\nid:0\ndestination:/queue/foo\nack:client\n\n\0",
        V12,
    );
    assert_eq!(subscribe.id(), Some("0"));
    assert_eq!(subscribe.ack_mode(), Ok(AckMode::Client));

    let unsubscribe = one(b"UNSUBSCRIBE\nid:0\n\n\0", V12);
    assert_eq!(unsubscribe.command, Command::Unsubscribe);

    let ack = one(b"ACK\nid:12345\ntransaction:tx1\n\n\0", V12);
    assert_eq!(ack.ack_id(V12), Some("12345"));
    assert_eq!(ack.transaction(), Some("tx1"));

    for (bytes, command) in [
        (&b"BEGIN\ntransaction:tx1\n\n\0"[..], Command::Begin),
        (b"COMMIT\ntransaction:tx1\n\n\0", Command::Commit),
        (b"ABORT\ntransaction:tx1\n\n\0", Command::Abort),
        (b"NACK\nid:12345\n\n\0", Command::Nack),
    ] {
        let frame = one(bytes, V12);
        assert_eq!(frame.command, command);
        assert_eq!(frame.headers.len(), 1);
    }

    let with_receipt = one(
        b"SEND\ndestination:/queue/a\nreceipt:message-12345\n\nhello queue a\0",
        V12,
    );
    assert_eq!(with_receipt.receipt_request(), Some("message-12345"));
    assert_eq!(&with_receipt.body[..], b"hello queue a");
}

#[test]
fn spec_1_2_disconnect_and_receipt_without_blank_line() {
    // The spec writes these two examples without the blank line before ^@.
    let stream = b"DISCONNECT\nreceipt:77\n\0RECEIPT\nreceipt-id:77\n\0";
    let all = frames(stream, V12);
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].command, Command::Disconnect);
    assert_eq!(all[0].receipt_request(), Some("77"));
    assert_eq!(all[1].receipt_id(), Some("77"));
    assert!(all[1].body.is_empty());
    // And the well-formed variant.
    assert_eq!(
        one(b"RECEIPT\nreceipt-id:message-12345\n\n\0", V12).receipt_id(),
        Some("message-12345")
    );
}

#[test]
fn spec_1_2_message_and_repeated_header() {
    let message = one(
        b"MESSAGE\nsubscription:0\nmessage-id:007\ndestination:/queue/a\ncontent-type:text/plain\n\nhello queue a\0",
        V12,
    );
    assert_eq!(message.subscription(), Some("0"));
    assert_eq!(message.message_id(), Some("007"));
    assert_eq!(&message.body[..], b"hello queue a");

    // "The value of the foo header is just World."
    let repeated = one(b"MESSAGE\nfoo:World\nfoo:Hello\n\n\0", V12);
    assert_eq!(repeated.header("foo"), Some("World"));
    assert_eq!(repeated.headers, h(&[("foo", "World")]));
}

const SPEC_ERROR_BODY: &str = "The message:\n-----\nMESSAGE\ndestined:/queue/a\nreceipt:message-12345\n\n\
Hello queue a!\n-----\nDid not contain a destination header, which is REQUIRED\nfor message propagation.\n";

#[test]
fn spec_1_2_error_frame_with_content_length() {
    // The 1.2 text says content-length:171, but its body has 170 octets
    // (the 1.1 text says 170); with 171 the NUL would be part of the body.
    let wire = format!(
        "ERROR\nreceipt-id:message-12345\ncontent-type:text/plain\ncontent-length:170\nmessage: malformed frame received\n\n{SPEC_ERROR_BODY}\0"
    );
    let error = one(wire.as_bytes(), V12);
    assert_eq!(error.command, Command::Error);
    // Values are never trimmed (spec 1.2 "Value Encoding").
    assert_eq!(error.error_message(), Some(" malformed frame received"));
    assert_eq!(error.content_length(), Ok(Some(170)));
    assert_eq!(&error.body[..], SPEC_ERROR_BODY.as_bytes());

    let off_by_one = wire.replace("content-length:170", "content-length:171");
    let mut decoder = Decoder::new(V12, Limits::default());
    let mut buf = BytesMut::from(off_by_one.as_bytes());
    assert_eq!(
        decoder.decode(&mut buf).unwrap(),
        None,
        "waits for the 171st octet"
    );
    buf.extend_from_slice(b"X");
    assert!(matches!(
        decoder.decode(&mut buf),
        Err(DecodeError::MissingNul {
            content_length: 171,
            found: b'X'
        })
    ));
}

#[test]
fn spec_1_1_ack_with_subscription_and_message_id() {
    let ack = one(
        b"ACK\nsubscription:0\nmessage-id:007\ntransaction:tx1\n\n\0",
        V11,
    );
    assert_eq!(ack.ack_id(V11), Some("007"));
    assert_eq!(ack.subscription(), Some("0"));
}

#[test]
fn spec_1_0_examples_keep_padding_and_backslashes() {
    let connect = one(
        b"CONNECT\nlogin: <username>\npasscode:<passcode>\n\n\0",
        V10,
    );
    assert_eq!(connect.login(), Some(" <username>"));
    let connected = one(b"CONNECTED\nsession: <session-id>\n\n\0", V10);
    assert_eq!(connected.header("session"), Some(" <session-id>"));
    let send = one(
        b"SEND\ndestination:/queue/a\nx:C:\\temp\\n\n\nhello queue a\n\0",
        V10,
    );
    assert_eq!(send.header("x"), Some("C:\\temp\\n"), "1.0 has no escapes");
    assert_eq!(&send.body[..], b"hello queue a\n");
}

#[test]
fn spec_heart_beat_header() {
    let connect = one(
        b"CONNECT\naccept-version:1.1,1.2\nheart-beat:0,1000\nhost:/\n\n\0",
        V10,
    );
    assert_eq!(
        connect.heart_beat(),
        Ok(Some(HeartBeat {
            outgoing: 0,
            incoming: 1000
        }))
    );
    assert_eq!(
        HeartBeat {
            outgoing: 5,
            incoming: 10
        }
        .to_string(),
        "5,10"
    );
    let bad = Frame::new(Command::Connect).with_header("heart-beat", "1000");
    assert!(bad.heart_beat().is_err());
    assert_eq!(Frame::new(Command::Connect).heart_beat(), Ok(None));
}

// ---------------------------------------------------------------------------
// Escaping
// ---------------------------------------------------------------------------

#[test]
fn escapes_are_decoded_per_version() {
    let wire = b"SEND\nkey\\cname:va\\nl\\\\ue\\c\n\n\0";
    let v12 = one(wire, V12);
    assert_eq!(v12.headers, h(&[("key:name", "va\nl\\ue:")]));
    assert_eq!(one(wire, V11).headers, v12.headers);
    assert_eq!(
        one(wire, V10).headers,
        h(&[("key\\cname", "va\\nl\\\\ue\\c")])
    );

    assert_eq!(one(b"SEND\na:x\\ry\n\n\0", V12).header("a"), Some("x\ry"));
    match error_of(b"SEND\na:x\\ry\n\n\0", V11) {
        DecodeError::BadEscape {
            sequence,
            header,
            version,
        } => {
            assert_eq!(
                (sequence.as_str(), header.as_str(), version),
                ("\\r", "a", V11)
            );
        }
        e => panic!("{e}"),
    }
    assert!(matches!(
        error_of(b"SEND\na:\\t\n\n\0", V12),
        DecodeError::BadEscape { .. }
    ));
    assert!(matches!(
        error_of(b"SEND\na\\t:b\n\n\0", V12),
        DecodeError::BadEscape { .. }
    ));
    assert!(matches!(
        error_of(b"SEND\na:b\\\n\n\0", V11),
        DecodeError::BadEscape { .. }
    ));
}

#[test]
fn connect_and_connected_are_never_escaped() {
    for version in Version::ALL {
        for command in ["CONNECT", "STOMP", "CONNECTED"] {
            let wire = format!("{command}\npasscode:a\\cb\\t\n\n\0");
            let frame = one(wire.as_bytes(), version);
            assert_eq!(frame.passcode(), Some("a\\cb\\t"), "{command} in {version}");
        }
    }
    // Encoding: a colon in a value is written as is; a line feed cannot be.
    let connected = Frame::new(Command::Connected).with_header("server", "Sluice/0.1 a:b");
    assert_eq!(
        &encode(&connected, V12)[..],
        b"CONNECTED\nserver:Sluice/0.1 a:b\n\n\0"
    );
    let bad = Frame::new(Command::Connect).with_header("login", "a\nb");
    let mut out = BytesMut::from(&b"keep"[..]);
    assert!(matches!(
        encode_frame(&bad, V12, &mut out),
        Err(EncodeError::Unrepresentable { .. })
    ));
    assert_eq!(&out[..], b"keep", "a failed encode writes nothing");
}

#[test]
fn encoder_escapes_per_version_and_refuses_what_cannot_be_written() {
    let frame = Frame::new(Command::Message).with_header("a:b", "c\\d\ne:f");
    assert_eq!(
        &encode(&frame, V11)[..],
        b"MESSAGE\na\\cb:c\\\\d\\ne\\cf\n\n\0"
    );
    assert_eq!(
        &encode(&frame, V12)[..],
        b"MESSAGE\na\\cb:c\\\\d\\ne\\cf\n\n\0"
    );
    let cr = Frame::new(Command::Message).with_header("a", "x\ry");
    assert_eq!(&encode(&cr, V12)[..], b"MESSAGE\na:x\\ry\n\n\0");
    let mut out = BytesMut::new();
    assert!(encode_frame(&cr, V11, &mut out).is_err(), "1.1 has no \\r");
    assert!(
        encode_frame(&frame, V10, &mut out).is_err(),
        "1.0 has no escapes"
    );
    let nul = Frame::new(Command::Message).with_header("a", "x\0y");
    assert!(encode_frame(&nul, V12, &mut out).is_err());
    assert!(out.is_empty());
    // 1.0 writes colons and backslashes in values as they are.
    let plain = Frame::new(Command::Send).with_header("a", "b:c\\n");
    assert_eq!(&encode(&plain, V10)[..], b"SEND\na:b:c\\n\n\n\0");
    assert_eq!(one(&encode(&plain, V10), V10), plain);
}

// ---------------------------------------------------------------------------
// Bodies, content-length, line ends
// ---------------------------------------------------------------------------

#[test]
fn content_length_body_may_contain_nul() {
    let frame = one(b"SEND\ndestination:/q\ncontent-length:5\n\na\0b\0c\0", V12);
    assert_eq!(&frame.body[..], b"a\0b\0c");
    assert_eq!(
        one(b"SEND\ncontent-length: 3 \n\nabc\0", V12).body,
        Bytes::from_static(b"abc"),
        "blanks around the digits are tolerated"
    );
}

#[test]
fn without_content_length_the_body_ends_at_the_first_nul() {
    let all = frames(b"SEND\ndestination:/q\n\nab\0SEND\n\ncd\0", V12);
    assert_eq!(all.len(), 2);
    assert_eq!(&all[0].body[..], b"ab");
    assert_eq!(&all[1].body[..], b"cd");
    // The octets after the first NUL are the next frame: here not a command.
    assert!(matches!(
        error_of(b"SEND\n\na\0b\n\n\0", V12),
        DecodeError::UnknownCommand { command } if command == "b"
    ));
}

#[test]
fn bad_content_length_values_are_rejected() {
    for value in [
        "-1",
        "abc",
        "",
        " ",
        "1e3",
        "0x10",
        "99999999999999999999999999",
    ] {
        let wire = format!("SEND\ncontent-length:{value}\n\n\0");
        match error_of(wire.as_bytes(), V12) {
            DecodeError::BadContentLength { .. } => {}
            e => panic!("content-length {value:?}: {e}"),
        }
    }
    assert!(matches!(
        error_of(b"SEND\ncontent-length:2\n\nabc\0", V12),
        DecodeError::MissingNul {
            content_length: 2,
            found: b'c'
        }
    ));
    // The first content-length wins.
    assert_eq!(
        &one(b"SEND\ncontent-length:1\ncontent-length:9\n\na\0", V12).body[..],
        b"a"
    );
}

#[test]
fn crlf_line_ends_are_accepted_in_every_version() {
    for version in Version::ALL {
        let frame = one(
            b"SEND\r\ndestination:/queue/a\r\ncontent-type:text/plain\r\n\r\nhi\0\r\n",
            version,
        );
        assert_eq!(
            frame.headers,
            h(&[("destination", "/queue/a"), ("content-type", "text/plain")])
        );
        assert_eq!(&frame.body[..], b"hi");
    }
    // Mixed line ends, as some clients send.
    assert_eq!(
        one(b"SEND\r\na:1\nb:2\r\n\n\0", V12).headers,
        h(&[("a", "1"), ("b", "2")])
    );
}

#[test]
fn carriage_return_outside_a_line_end_is_an_error() {
    for wire in [
        &b"SEND\na:b\rc\n\n\0"[..],
        b"SEND\ra:b\n\n\0",
        b"\rSEND\n\n\0",
    ] {
        assert!(
            matches!(error_of(wire, V12), DecodeError::BareCarriageReturn { .. }),
            "{wire:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// Heart-beats and noise between frames
// ---------------------------------------------------------------------------

#[test]
fn eols_between_frames_are_heartbeats() {
    let stream = b"\n\r\nSEND\n\nx\0\n\nRECEIPT\nreceipt-id:1\n\n\0\r\n";
    let all = items(stream, V12);
    let kinds: Vec<&str> = all
        .iter()
        .map(|i| match i {
            Item::Heartbeat => "hb",
            Item::Frame(f) => f.command.as_str(),
        })
        .collect();
    assert_eq!(kinds, ["hb", "hb", "SEND", "hb", "hb", "RECEIPT", "hb"]);
}

#[test]
fn heartbeat_cr_waits_for_its_lf_and_nuls_are_skipped() {
    let mut decoder = Decoder::default();
    let mut buf = BytesMut::from(&b"\0\0\r"[..]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    assert_eq!(&buf[..], b"\r", "NULs between frames are consumed");
    buf.extend_from_slice(b"\n");
    assert_eq!(decoder.decode(&mut buf).unwrap(), Some(Item::Heartbeat));
    assert!(buf.is_empty());

    let mut out = BytesMut::new();
    encode_heartbeat(&mut out);
    assert_eq!(&out[..], b"\n");
}

// ---------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------

#[test]
fn default_limits_are_rabbitmq_like() {
    let limits = Limits::default();
    assert_eq!(limits.max_frame_size, 4 * 1024 * 1024);
    assert_eq!(limits.max_headers, 1000);
    assert_eq!(limits.max_header_line_length, 100 * 1024);
}

#[test]
fn header_count_limit_ignores_repeated_headers() {
    let limits = Limits {
        max_headers: 3,
        ..Limits::default()
    };
    let ok = b"SEND\na:1\nb:2\nc:3\na:4\nb:5\n\n\0";
    assert_eq!(try_items(ok, V12, limits).unwrap().len(), 1);
    let too_many = b"SEND\na:1\nb:2\nc:3\nd:4\n\n\0";
    assert!(matches!(
        error_with(too_many, V12, limits),
        DecodeError::TooManyHeaders { max: 3 }
    ));
}

#[test]
fn many_repeated_headers_are_deduplicated() {
    let mut wire = b"SEND\n".to_vec();
    for i in 0..200 {
        wire.extend_from_slice(format!("h{}:{i}\n", i % 50).as_bytes());
    }
    wire.extend_from_slice(b"\n\0");
    let frame = one(&wire, V12);
    assert_eq!(frame.headers.len(), 50);
    assert_eq!(frame.header("h7"), Some("7"));
    assert_eq!(frame.header("h49"), Some("49"));
}

#[test]
fn long_lines_are_rejected_even_before_they_end() {
    let limits = Limits {
        max_header_line_length: 10,
        ..Limits::default()
    };
    assert_eq!(
        try_items(b"SEND\na:12345678\n\n\0", V12, limits)
            .unwrap()
            .len(),
        1
    );
    assert!(matches!(
        error_with(b"SEND\na:123456789\n\n\0", V12, limits),
        DecodeError::HeaderLineTooLong {
            length: 11,
            max: 10
        }
    ));
    // No LF yet: still detected.
    assert!(matches!(
        error_with(b"SEND\na:1234567890123", V12, limits),
        DecodeError::HeaderLineTooLong { .. }
    ));
    // The command line counts too.
    assert!(matches!(
        error_with(b"SUBSCRIBEXXXXXX", V12, limits),
        DecodeError::HeaderLineTooLong { .. }
    ));
    // A CR LF line end does not count.
    assert_eq!(
        try_items(b"SEND\r\na:12345678\r\n\r\n\0", V12, limits)
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn frame_size_limit_is_checked_before_the_body_is_buffered() {
    let limits = Limits {
        max_frame_size: 64,
        ..Limits::default()
    };
    // content-length alone tells: only the head has arrived.
    assert!(matches!(
        error_with(b"SEND\ncontent-length:100\n\n", V12, limits),
        DecodeError::FrameTooLarge { size: 126, max: 64 }
    ));
    // Exactly at the limit is fine: 24 octets of head + 39 + NUL = 64.
    let body = "x".repeat(39);
    let wire = format!("SEND\ncontent-length:39\n\n{body}\0");
    assert_eq!(wire.len(), 64);
    assert_eq!(try_items(wire.as_bytes(), V12, limits).unwrap().len(), 1);
    // Without content-length: detected as soon as the buffer passes the limit.
    let mut decoder = Decoder::new(V12, limits);
    let mut buf = BytesMut::from(&b"SEND\n\n"[..]);
    assert_eq!(decoder.decode(&mut buf).unwrap(), None);
    buf.extend_from_slice(&[b'x'; 58]);
    assert!(matches!(
        decoder.decode(&mut buf),
        Err(DecodeError::FrameTooLarge { .. })
    ));
    // A head that never ends.
    let endless = "SEND\n".to_string() + &"a:b\n".repeat(20);
    assert!(matches!(
        error_with(endless.as_bytes(), V12, limits),
        DecodeError::FrameTooLarge { .. }
    ));
}

#[test]
fn large_bodies_in_small_reads_are_scanned_once() {
    // 2 MiB without content-length, in 4 KiB reads: rescanning the buffer
    // on every read would scan ~1 GiB; the decoder scans each octet once.
    let body = vec![b'x'; 2 * 1024 * 1024];
    let wire = [&b"SEND\ndestination:/q\n\n"[..], &body, b"\0"].concat();
    let mut decoder = Decoder::default();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for chunk in wire.chunks(4096) {
        buf.extend_from_slice(chunk);
        if let Some(Item::Frame(frame)) = decoder.decode(&mut buf).unwrap() {
            frames.push(frame);
        }
    }
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].body.len(), body.len());
}

// ---------------------------------------------------------------------------
// Malformed input
// ---------------------------------------------------------------------------

#[test]
fn malformed_heads_give_typed_errors() {
    let cases: Vec<(&[u8], &str)> = vec![
        (b"send\n\n\0", "Bad command"),
        (b"FOO\n\n\0", "Bad command"),
        (b"SEND \n\n\0", "Bad command"),
        (b"SEND\0\n\n\0", "Invalid frame"),
        (b"SEND\nno-colon\n\n\0", "Invalid frame"),
        (b"SEND\na:b\0c\n\n\0", "Invalid frame"),
        (b"SEND\na:\xff\xfe\n\n\0", "Invalid frame"),
        (b"SEND\na:\\x\n\n\0", "Bad header escape"),
    ];
    for (wire, summary) in cases {
        let error = error_of(wire, V12);
        assert_eq!(error.summary(), summary, "{error}");
        assert!(!error.to_string().is_empty());
    }
    assert!(
        matches!(error_of(b"SEND\nno-colon\n\n\0", V12), DecodeError::MissingColon { line } if line == "no-colon")
    );
    assert!(matches!(
        error_of(b"SEND\na:\xff\n\n\0", V12),
        DecodeError::InvalidUtf8 { .. }
    ));
    assert!(matches!(
        error_of(b"SEND\0\n\n\0", V12),
        DecodeError::NulInHeaders { context: "command" }
    ));
}

#[test]
fn error_texts_say_what_was_wrong() {
    let e = error_of(b"HELLO\n\n\0", V12);
    assert_eq!(e.to_string(), "unknown command \"HELLO\"");
    let e = error_with(
        b"SEND\ncontent-length:100\n\n",
        V12,
        Limits {
            max_frame_size: 64,
            ..Limits::default()
        },
    );
    assert_eq!(
        e.to_string(),
        "frame of at least 126 bytes exceeds the limit of 64 bytes"
    );
    let long = vec![b'A'; 500];
    let e = error_of(&[&long[..], b"\n\n\0"].concat(), V12);
    assert!(
        e.to_string().len() < 120,
        "offending input is quoted as an excerpt: {e}"
    );
}

#[test]
fn every_prefix_of_a_frame_is_incomplete_never_an_error() {
    let frame = Frame::new(Command::Message)
        .with_header("destination", "/topic/a:b\nc")
        .with_header("subscription", "0")
        .with_body(&b"bin\0ary\r\n"[..]);
    for version in [V11, V12] {
        let wire = encode(&frame, version);
        for cut in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..cut]);
            let decoded = Decoder::new(version, Limits::default()).decode(&mut buf);
            assert_eq!(decoded.unwrap(), None, "cut at {cut}");
        }
        // And fed one byte at a time to one decoder.
        let mut decoder = Decoder::new(version, Limits::default());
        let mut buf = BytesMut::new();
        let mut got = None;
        for (i, &b) in wire.iter().enumerate() {
            buf.extend_from_slice(&[b]);
            if let Some(item) = decoder.decode(&mut buf).unwrap() {
                assert_eq!(i, wire.len() - 1);
                got = Some(item);
            }
        }
        let Some(Item::Frame(decoded)) = got else {
            panic!("no frame")
        };
        assert_eq!(decoded.header("destination"), Some("/topic/a:b\nc"));
        assert_eq!(decoded.body, frame.body);
    }
}

// ---------------------------------------------------------------------------
// Frame accessors and the tokio-util codec
// ---------------------------------------------------------------------------

#[test]
fn typed_accessors() {
    let mut frame = Frame::new(Command::Subscribe)
        .with_header("ack", "client-individual")
        .with_header("prefetch-count", " 10")
        .with_header("durable", "True")
        .with_header("persistent", "yes");
    assert_eq!(frame.ack_mode(), Ok(AckMode::ClientIndividual));
    assert_eq!(frame.u64_header(header::PREFETCH_COUNT), Ok(Some(10)));
    assert_eq!(frame.bool_header(header::DURABLE), Ok(Some(true)));
    assert!(frame.bool_header(header::PERSISTENT).is_err());
    assert_eq!(frame.bool_header(header::REQUEUE), Ok(None));
    frame.set_header("ack", "bogus");
    assert!(frame.ack_mode().is_err());
    assert_eq!(frame.remove_header("ack").as_deref(), Some("bogus"));
    assert_eq!(frame.ack_mode(), Ok(AckMode::Auto));

    let error = Frame::error("Bad command", "Could not interpret command FOO");
    assert_eq!(error.error_message(), Some("Bad command"));
    assert_eq!(error.content_type(), Some("text/plain"));
    let wire = encode(&error, V12);
    assert!(wire.starts_with(
        b"ERROR\nmessage:Bad command\ncontent-type:text/plain\ncontent-length:31\n\n"
    ));
    assert_eq!(Frame::receipt("77").receipt_id(), Some("77"));

    assert!(Command::ALL.iter().filter(|c| c.is_client()).count() == 11);
    for command in Command::ALL {
        assert_eq!(
            Command::from_bytes(command.as_str().as_bytes()),
            Some(command)
        );
    }
    assert_eq!("1.1".parse::<Version>(), Ok(V11));
    assert!(!V10.escapes_headers() && V11.escapes_headers());
}

#[test]
fn encoder_keeps_content_length_in_place_and_makes_it_right() {
    let frame = Frame::new(Command::Send)
        .with_header("content-length", "999")
        .with_header("destination", "/q")
        .with_header("content-length", "7")
        .with_body(&b"ab"[..]);
    assert_eq!(
        &encode(&frame, V12)[..],
        b"SEND\ncontent-length:2\ndestination:/q\n\nab\0"
    );
    let empty = Frame::new(Command::Send).with_header("destination", "/q");
    assert_eq!(&encode(&empty, V12)[..], b"SEND\ndestination:/q\n\n\0");
}

#[test]
fn codec_switches_version_after_connect() {
    let mut codec = StompCodec::default();
    assert_eq!(codec.version(), V10);
    let mut buf = BytesMut::from(
        &b"CONNECT\naccept-version:1.2\nhost:/\n\n\0SEND\ndestination:/queue/a\\cb\n\n\0"[..],
    );
    let Some(Item::Frame(connect)) = codec.decode(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(connect.command, Command::Connect);
    codec.set_version(V12);
    let Some(Item::Frame(send)) = codec.decode(&mut buf).unwrap() else {
        panic!()
    };
    assert_eq!(send.destination(), Some("/queue/a:b"));

    let mut out = BytesMut::new();
    codec.encode(Item::Heartbeat, &mut out).unwrap();
    codec.encode(&send, &mut out).unwrap();
    codec.encode(Item::Frame(send.clone()), &mut out).unwrap();
    let decoded = items(&out, V12);
    assert_eq!(
        decoded,
        vec![
            Item::Heartbeat,
            Item::Frame(send.clone()),
            Item::Frame(send)
        ]
    );
    assert_eq!(codec.limits(), &Limits::default());
}

// ---------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------

fn version() -> impl Strategy<Value = Version> {
    prop::sample::select(Version::ALL.to_vec())
}

fn command() -> impl Strategy<Value = Command> {
    prop::sample::select(Command::ALL.to_vec())
}

/// Header text that `command` frames in `version` can carry: with escaping,
/// every special octet (CR only in 1.2); without, no line ends, and no
/// colon in names.
fn header_text(version: Version, command: Command, is_name: bool) -> BoxedStrategy<String> {
    let escaped = version.escapes_headers() && command.escapes_headers();
    let pattern = match (escaped, version, is_name) {
        (true, Version::V1_2, _) => "[a-z0-9:\\\\\\n\\r é/-]{0,12}",
        (true, _, _) => "[a-z0-9:\\\\\\n é/-]{0,12}",
        (false, _, true) => "[a-z0-9\\\\ é/-]{0,12}",
        (false, _, false) => "[a-z0-9:\\\\ é/-]{0,12}",
    };
    proptest::string::string_regex(pattern).unwrap().boxed()
}

/// A frame `version` can carry, with distinct header names other than
/// content-length (the encoder owns that one).
fn frame_in(version: Version) -> impl Strategy<Value = Frame> {
    command().prop_flat_map(move |command| {
        let header = (
            header_text(version, command, true),
            header_text(version, command, false),
        );
        (
            prop::collection::vec(header, 0..6),
            prop::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(move |(headers, body)| {
                let mut frame = Frame::new(command).with_body(body);
                for (name, value) in headers {
                    if name != "content-length" && frame.header(&name).is_none() {
                        frame.headers.push((name, value));
                    }
                }
                frame
            })
    })
}

fn versioned_frame() -> impl Strategy<Value = (Version, Frame)> {
    version().prop_flat_map(|v| frame_in(v).prop_map(move |f| (v, f)))
}

/// What decoding an encoded `frame` gives: the frame plus content-length
/// when the body is not empty.
fn expected_after_round_trip(frame: &Frame) -> Frame {
    let mut expected = frame.clone();
    if !frame.body.is_empty() {
        expected
            .headers
            .push(("content-length".into(), frame.body.len().to_string()));
    }
    expected
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn round_trip_every_frame_type_and_version((version, frame) in versioned_frame()) {
        let wire = encode(&frame, version);
        let decoded = one(&wire, version);
        prop_assert_eq!(&decoded, &expected_after_round_trip(&frame));
        // Re-encoding a decoded frame gives the same bytes.
        prop_assert_eq!(encode(&decoded, version), wire);
    }

    #[test]
    fn chunked_decoding_equals_whole_decoding(
        (version, stream) in version().prop_flat_map(|v| {
            let item = prop_oneof![
                1 => Just(Item::Heartbeat),
                4 => frame_in(v).prop_map(Item::Frame),
            ];
            prop::collection::vec(item, 0..6).prop_map(move |s| (v, s))
        }),
        cuts in prop::collection::vec(1usize..40, 1..20),
    ) {
        let mut codec = StompCodec::new(version, Limits::default());
        let mut wire = BytesMut::new();
        for item in &stream {
            codec.encode(item.clone(), &mut wire).unwrap();
        }
        let expected: Vec<Item> = stream
            .iter()
            .map(|i| match i {
                Item::Frame(f) => Item::Frame(expected_after_round_trip(f)),
                Item::Heartbeat => Item::Heartbeat,
            })
            .collect();
        prop_assert_eq!(&items(&wire, version), &expected);

        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &wire[..];
        let mut cut = cuts.iter().cycle();
        while !rest.is_empty() {
            let n = (*cut.next().unwrap()).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(item) = codec.decode(&mut buf).unwrap() {
                got.push(item);
            }
        }
        prop_assert_eq!(got, expected);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn garbage_never_panics(
        chunks in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..8),
        version in version(),
    ) {
        let limits = Limits { max_frame_size: 256, max_headers: 4, max_header_line_length: 32 };
        let mut decoder = Decoder::new(version, limits);
        let mut buf = BytesMut::new();
        'feed: for chunk in chunks {
            buf.extend_from_slice(&chunk);
            loop {
                match decoder.decode(&mut buf) {
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        prop_assert!(!e.summary().is_empty() && !e.to_string().is_empty());
                        break 'feed;
                    }
                }
            }
        }
    }

    #[test]
    fn stomp_like_garbage_never_panics(
        parts in prop::collection::vec(
            prop_oneof![
                Just(b"SEND\n".to_vec()),
                Just(b"MESSAGE\r\n".to_vec()),
                Just(b"content-length:3\n".to_vec()),
                Just(b"content-length:-1\n".to_vec()),
                Just(b"a\\cb:c\\r\\n\\t\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r".to_vec()),
                Just(b"\0".to_vec()),
                Just(b":".to_vec()),
                prop::collection::vec(any::<u8>(), 0..6),
            ],
            0..30,
        ),
        version in version(),
        split in 0usize..200,
    ) {
        let wire = parts.concat();
        let limits = Limits { max_frame_size: 128, max_headers: 3, max_header_line_length: 24 };
        let mut decoder = Decoder::new(version, limits);
        let (first, second) = wire.split_at(split.min(wire.len()));
        let mut buf = BytesMut::from(first);
        let mut failed = false;
        while let Ok(Some(_)) = decoder.decode(&mut buf) {}
        buf.extend_from_slice(second);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => { failed = true; break; }
            }
        }
        // Whatever happened, a fresh decoder on the whole input agrees on
        // whether it was valid (only when the split did not hit an error).
        let whole = try_items(&wire, version, limits);
        if !failed {
            prop_assert!(whole.is_ok());
        }
    }

    #[test]
    fn mutated_frames_never_panic(
        (version, frame) in versioned_frame(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut wire = encode(&frame, version).to_vec();
        for (at, byte) in flips {
            let i = at.index(wire.len());
            wire[i] = byte;
        }
        let _ = try_items(&wire, version, Limits::default());
        for cut in 0..wire.len() {
            let _ = try_items(&wire[..cut], version, Limits::default());
        }
    }
}
