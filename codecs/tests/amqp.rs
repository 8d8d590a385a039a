//! Black-box tests of the AMQP 0-9-1 codec through its public API: byte-exact
//! fixtures, incremental decoding, limits, hostile input and content
//! splitting/reassembly.

#![allow(clippy::unwrap_used)] // tests may panic

use bytes::{BufMut, Bytes, BytesMut};
use proptest::prelude::*;
use sluice_codecs::amqp::frame::{encode_header_frame, FRAME_MIN_SIZE, HARD_FRAME_MAX};
use sluice_codecs::amqp::properties::{decode_properties, encode_properties};
use sluice_codecs::amqp::*;
use tokio_util::codec::{Decoder, Encoder};

fn method_frame(channel: u16, method: impl Into<Method>) -> BytesMut {
    let mut out = BytesMut::new();
    encode_method_frame(channel, &method.into(), &mut out);
    out
}

fn decode_all(buf: &mut BytesMut, frame_max: u32) -> Vec<Frame> {
    let mut frames = Vec::new();
    while let Some(f) = decode_frame(buf, frame_max).unwrap() {
        frames.push(f);
    }
    frames
}

// ---------------------------------------------------------------------------
// Byte-exact fixtures
// ---------------------------------------------------------------------------

#[test]
fn fixture_protocol_header() {
    assert_eq!(&PROTOCOL_HEADER, &[b'A', b'M', b'Q', b'P', 0, 0, 9, 1]);
    assert_eq!(
        parse_protocol_header(&PROTOCOL_HEADER),
        Some(ProtocolHeader::Amqp091)
    );
    assert_eq!(
        parse_protocol_header(b"AMQP\x00\x00\x09\x00"),
        Some(ProtocolHeader::Other(*b"AMQP\x00\x00\x09\x00"))
    );
}

#[test]
fn fixture_heartbeat() {
    let bytes = [0x08, 0, 0, 0, 0, 0, 0, 0xCE];
    let mut out = BytesMut::new();
    encode_frame(&Frame::Heartbeat { channel: 0 }, &mut out);
    assert_eq!(&out[..], &bytes);
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap(),
        Some(Frame::Heartbeat { channel: 0 })
    );
    assert!(buf.is_empty());
}

#[test]
fn fixture_connection_tune_ok() {
    let expected = [
        0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x0C, // method, channel 0, size 12
        0x00, 0x0A, 0x00, 0x1F, // connection.tune-ok (10, 31)
        0x07, 0xFF, // channel_max 2047
        0x00, 0x02, 0x00, 0x00, // frame_max 131072
        0x00, 0x3C, // heartbeat 60
        0xCE,
    ];
    let tune_ok = ConnectionTuneOk {
        channel_max: 2047,
        frame_max: 131_072,
        heartbeat: 60,
    };
    assert_eq!(&method_frame(0, tune_ok.clone())[..], &expected);
    let mut buf = BytesMut::from(&expected[..]);
    assert_eq!(
        decode_frame(&mut buf, FRAME_MIN_SIZE).unwrap(),
        Some(Frame::Method {
            channel: 0,
            method: Method::ConnectionTuneOk(tune_ok)
        })
    );
}

#[test]
fn fixture_basic_publish_bit_packing() {
    let expected = [
        0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0A, // method, channel 1, size 10
        0x00, 0x3C, 0x00, 0x28, // basic.publish (60, 40)
        0x00, 0x00, // ticket
        0x00, // exchange ""
        0x01, b'q', // routing key "q"
        0x01, // mandatory = bit 0, immediate = bit 1 (clear)
        0xCE,
    ];
    let publish = BasicPublish {
        ticket: 0,
        exchange: String::new(),
        routing_key: "q".into(),
        mandatory: true,
        immediate: false,
    };
    assert_eq!(&method_frame(1, publish.clone())[..], &expected);

    let both = BasicPublish {
        immediate: true,
        ..publish
    };
    let bytes = method_frame(1, both);
    assert_eq!(bytes.get(16), Some(&0b11));
}

#[test]
fn fixture_content_header_and_body() {
    let props = BasicProperties {
        delivery_mode: Some(2),
        ..Default::default()
    };
    let mut out = BytesMut::new();
    encode_content(1, class::BASIC, &props, b"hello", 131_072, &mut out);
    let expected = [
        // header frame: type 2, channel 1, size 15
        0x02, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0F, //
        0x00, 0x3C, 0x00, 0x00, // class 60, weight 0
        0, 0, 0, 0, 0, 0, 0, 5, // body size
        0x10, 0x00, // flags: delivery-mode
        0x02, 0xCE, //
        // body frame: type 3, channel 1, size 5
        0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0xCE,
    ];
    assert_eq!(&out[..], &expected);
}

#[test]
fn fixture_connection_close_reply_code() {
    let close = ConnectionClose {
        reply_code: reply_code::FRAME_ERROR,
        reply_text: "FRAME_ERROR".into(),
        class_id: 0,
        method_id: 0,
    };
    let bytes = method_frame(0, close);
    let mut expected = vec![1, 0, 0, 0, 0, 0, 22, 0, 10, 0, 50, 0x01, 0xF5, 11];
    expected.extend_from_slice(b"FRAME_ERROR");
    expected.extend_from_slice(&[0, 0, 0, 0, 0xCE]);
    assert_eq!(&bytes[..], &expected[..]);
}

// ---------------------------------------------------------------------------
// Incremental decoding
// ---------------------------------------------------------------------------

#[test]
fn stream_fed_one_byte_at_a_time() {
    let mut stream = BytesMut::new();
    encode_method_frame(0, &ConnectionTuneOk::default().into(), &mut stream);
    encode_method_frame(
        1,
        &BasicPublish {
            routing_key: "q".into(),
            ..Default::default()
        }
        .into(),
        &mut stream,
    );
    encode_content(
        1,
        class::BASIC,
        &BasicProperties::default(),
        &[9u8; 50],
        20,
        &mut stream,
    );
    encode_frame(&Frame::Heartbeat { channel: 0 }, &mut stream);

    let whole = decode_all(&mut stream.clone(), 0);
    assert_eq!(whole.len(), 1 + 1 + 1 + 5 + 1); // body split into 12+12+12+12+2

    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for b in stream.iter() {
        buf.put_u8(*b);
        if let Some(f) = decode_frame(&mut buf, 0).unwrap() {
            frames.push(f);
        }
    }
    assert_eq!(frames, whole);
    assert!(buf.is_empty());
}

#[test]
fn frame_codec_decodes_and_encodes() {
    let mut codec = FrameCodec::default();
    assert_eq!(codec.frame_max, FRAME_MIN_SIZE);
    let mut buf = BytesMut::new();
    let frame = Frame::Method {
        channel: 3,
        method: Method::BasicAck(BasicAck {
            delivery_tag: 42,
            multiple: true,
        }),
    };
    codec.encode(frame.clone(), &mut buf).unwrap();
    codec
        .encode(&Frame::Heartbeat { channel: 0 }, &mut buf)
        .unwrap();
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(frame));
    assert_eq!(
        codec.decode(&mut buf).unwrap(),
        Some(Frame::Heartbeat { channel: 0 })
    );
    assert_eq!(codec.decode(&mut buf).unwrap(), None);

    // A body bigger than the pre-tune limit is rejected until frame_max is raised.
    let mut big = BytesMut::new();
    encode_frame(
        &Frame::Body {
            channel: 1,
            payload: Bytes::from(vec![0u8; 5000]),
        },
        &mut big,
    );
    assert!(matches!(
        codec.decode(&mut big.clone()),
        Err(DecodeError::FrameTooLarge {
            size: 5000,
            max: 4096
        })
    ));
    codec.frame_max = 131_072;
    assert!(matches!(
        codec.decode(&mut big),
        Ok(Some(Frame::Body { .. }))
    ));

    let io: DecodeError = std::io::Error::other("boom").into();
    assert!(matches!(io, DecodeError::Io(_)));
}

// ---------------------------------------------------------------------------
// Limits and malformed frames
// ---------------------------------------------------------------------------

#[test]
fn wrong_frame_end() {
    let mut bytes = BytesMut::from(&[0x08, 0, 0, 0, 0, 0, 0, 0xCD][..]);
    let err = decode_frame(&mut bytes, 0).unwrap_err();
    assert!(matches!(err, DecodeError::BadFrameEnd { got: 0xCD }));
    assert_eq!(err.reply_code(), reply_code::FRAME_ERROR);
}

#[test]
fn frame_too_large_is_detected_from_the_header_alone() {
    // Only the 7-byte header: size 4089 + 8 > 4096.
    let mut buf = BytesMut::from(&[0x03, 0, 1, 0, 0, 0x0F, 0xF9][..]);
    let err = decode_frame(&mut buf, 4096).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::FrameTooLarge {
            size: 4089,
            max: 4096
        }
    ));
    assert_eq!(err.reply_code(), 501);

    // 4088 + 8 == 4096 is fine: just waits for the payload, reserving room.
    let mut buf = BytesMut::from(&[0x03, 0, 1, 0, 0, 0x0F, 0xF8][..]);
    assert_eq!(decode_frame(&mut buf, 4096).unwrap(), None);
    assert!(buf.capacity() >= 4096);
    assert_eq!(buf.len(), 7, "nothing consumed");

    // frame_max 0 means "no limit", but the hard cap still applies.
    let mut buf = BytesMut::from(&[0x03, 0, 1, 0xFF, 0xFF, 0xFF, 0xFF][..]);
    assert!(matches!(
        decode_frame(&mut buf, 0),
        Err(DecodeError::FrameTooLarge {
            max: HARD_FRAME_MAX,
            ..
        })
    ));
}

#[test]
fn unknown_frame_type_and_malformed_payloads() {
    let mut buf = BytesMut::from(&b"AMQP\x00\x00\x09\x01"[..]);
    assert!(matches!(
        decode_frame(&mut buf, 0),
        Err(DecodeError::UnknownFrameType(b'A'))
    ));

    // Method frame with a 2-byte payload.
    let mut buf = BytesMut::from(&[1, 0, 0, 0, 0, 0, 2, 0, 10, 0xCE][..]);
    let err = decode_frame(&mut buf, 0).unwrap_err();
    assert!(matches!(err, DecodeError::MalformedFrame { .. }));
    assert_eq!(err.reply_code(), 501);

    // Heartbeat with a payload.
    let mut buf = BytesMut::from(&[8, 0, 0, 0, 0, 0, 1, 0, 0xCE][..]);
    assert!(matches!(
        decode_frame(&mut buf, 0),
        Err(DecodeError::MalformedFrame { .. })
    ));

    // Unknown method → 540, unknown class → 540.
    let mut buf = BytesMut::from(&[1, 0, 0, 0, 0, 0, 4, 0, 60, 0, 99, 0xCE][..]);
    let err = decode_frame(&mut buf, 0).unwrap_err();
    assert!(matches!(
        err,
        DecodeError::UnknownMethod {
            class_id: 60,
            method_id: 99
        }
    ));
    assert_eq!(err.reply_code(), reply_code::NOT_IMPLEMENTED);
    let mut buf = BytesMut::from(&[1, 0, 0, 0, 0, 0, 4, 0, 70, 0, 10, 0xCE][..]);
    assert!(matches!(
        decode_frame(&mut buf, 0),
        Err(DecodeError::UnknownClass(70))
    ));

    // Truncated arguments (tune-ok without heartbeat) → 501, as RabbitMQ.
    let mut buf = BytesMut::from(&[1, 0, 0, 0, 0, 0, 10, 0, 10, 0, 31, 0, 0, 0, 0, 0, 0, 0xCE][..]);
    let err = decode_frame(&mut buf, 0).unwrap_err();
    assert!(matches!(err, DecodeError::Truncated { .. }));
    assert_eq!(err.reply_code(), reply_code::FRAME_ERROR);
}

/// `levels` tables nested through an empty key and type `F`, as a complete
/// table encoding. Built front to back: level `i` has `6 * (levels - 1 - i)`
/// bytes of content below it.
fn nested_tables(levels: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + 6 * levels);
    out.extend_from_slice(&((6 * levels) as u32).to_be_bytes());
    for i in 0..levels {
        out.push(0); // empty key
        out.push(b'F');
        out.extend_from_slice(&((6 * (levels - 1 - i)) as u32).to_be_bytes());
    }
    out
}

/// `levels` arrays nested inside a one-entry table.
fn nested_arrays(levels: usize) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&((1 + 5 * levels) as u32).to_be_bytes());
    out.push(0); // empty key
    for i in 0..levels {
        out.push(b'A');
        out.extend_from_slice(&((5 * (levels - 1 - i)) as u32).to_be_bytes());
    }
    out
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let deep = nested_tables(10_000);
    let err = FieldTable::decode(&deep).unwrap_err();
    assert!(matches!(err, DecodeError::TooDeep));
    assert_eq!(err.reply_code(), reply_code::SYNTAX_ERROR);
    assert!(FieldTable::decode(&nested_tables(10)).is_ok());

    assert!(matches!(
        FieldTable::decode(&nested_arrays(10_000)),
        Err(DecodeError::TooDeep)
    ));
    assert!(FieldTable::decode(&nested_arrays(10)).is_ok());

    // Through a method's arguments: queue.declare with the table as arguments.
    let mut args = vec![0, 0, 1, b'q', 0];
    args.extend_from_slice(&deep);
    assert!(matches!(
        Method::decode(50, 10, &args),
        Err(DecodeError::TooDeep)
    ));

    // Through the headers property.
    let mut props = vec![0x20, 0x00];
    props.extend_from_slice(&deep);
    assert!(matches!(
        decode_properties(&props),
        Err(DecodeError::TooDeep)
    ));
}

// ---------------------------------------------------------------------------
// Content splitting and reassembly
// ---------------------------------------------------------------------------

fn simple_properties() -> impl Strategy<Value = BasicProperties> {
    (
        proptest::option::of("[a-z/]{0,20}"),
        proptest::option::of(1u8..=2),
        proptest::option::of(any::<u64>()),
        proptest::option::of(("[a-z-]{1,10}", any::<i64>())),
    )
        .prop_map(
            |(content_type, delivery_mode, timestamp, header)| BasicProperties {
                content_type,
                delivery_mode,
                timestamp,
                headers: header.map(|(k, v)| FieldTable(vec![(k, FieldValue::I64(v))])),
                ..Default::default()
            },
        )
}

proptest! {
    #[test]
    fn content_split_and_reassembled(
        body in proptest::collection::vec(any::<u8>(), 0..3000),
        frame_max in 9u32..300,
        props in simple_properties(),
    ) {
        let publish = Method::BasicPublish(BasicPublish {
            exchange: "amq.direct".into(),
            routing_key: "k".into(),
            ..Default::default()
        });
        let mut wire = BytesMut::new();
        encode_method_frame(5, &publish, &mut wire);
        encode_content(5, class::BASIC, &props, &body, frame_max, &mut wire);

        let frames = decode_all(&mut wire, 0);
        let body_frames = frames.iter().filter(|f| matches!(f, Frame::Body { .. })).count();
        let chunk = (frame_max - 8) as usize;
        prop_assert_eq!(body_frames, body.len().div_ceil(chunk));
        for f in &frames {
            if let Frame::Body { payload, .. } = f {
                prop_assert!(payload.len() <= chunk && !payload.is_empty());
            }
        }

        let mut asm = Assembler::default();
        let mut done = None;
        for (i, f) in frames.into_iter().enumerate() {
            prop_assert!(done.is_none(), "completed before frame {}", i);
            done = asm.push(f)?;
        }
        prop_assert!(!asm.in_progress());
        prop_assert_eq!(
            done,
            Some(Assembled::Content { method: publish, properties: Box::new(props), body: Bytes::from(body) })
        );
    }

    #[test]
    fn encode_content_writes_exactly_frames(
        body_len in 0usize..5000,
        frame_max in prop_oneof![Just(0u32), 9u32..9000],
    ) {
        let body = vec![0xAB; body_len];
        let mut out = BytesMut::new();
        encode_content(1, class::BASIC, &BasicProperties::default(), &body, frame_max, &mut out);
        let frames = decode_all(&mut out, 0);
        prop_assert!(out.is_empty());
        let total: usize = frames.iter().map(|f| match f {
            Frame::Body { payload, .. } => payload.len(),
            _ => 0,
        }).sum();
        prop_assert_eq!(total, body_len);
        let expected_header = Frame::Header {
            channel: 1,
            class_id: class::BASIC,
            body_size: body_len as u64,
            properties: Box::default(),
        };
        prop_assert_eq!(frames.first(), Some(&expected_header));
    }
}

// ---------------------------------------------------------------------------
// Hostile input: must return Ok/Err, never panic
// ---------------------------------------------------------------------------

/// Arbitrary frames built from a plausible header and a random payload.
fn plausible_frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![Just(1u8), Just(2u8), Just(3u8), Just(8u8), any::<u8>()],
        any::<u16>(),
        proptest::collection::vec(any::<u8>(), 0..200),
        prop_oneof![9 => Just(0xCEu8), 1 => any::<u8>()],
        any::<bool>(),
    )
        .prop_map(|(ty, channel, payload, end, honest_size)| {
            let mut v = vec![ty];
            v.extend_from_slice(&channel.to_be_bytes());
            let size = if honest_size {
                payload.len() as u32
            } else {
                payload.len() as u32 / 2
            };
            v.extend_from_slice(&size.to_be_bytes());
            v.extend_from_slice(&payload);
            v.push(end);
            v
        })
}

/// Method payloads that at least name a real method, with random arguments.
fn plausible_method_payload() -> impl Strategy<Value = Vec<u8>> {
    (
        0..ALL_METHODS.len(),
        proptest::collection::vec(any::<u8>(), 0..100),
    )
        .prop_map(|(i, args)| {
            let (c, m, _) = ALL_METHODS.get(i).copied().unwrap_or((10, 10, ""));
            let mut v = vec![1, 0, 1];
            v.extend_from_slice(&((args.len() + 4) as u32).to_be_bytes());
            v.extend_from_slice(&c.to_be_bytes());
            v.extend_from_slice(&m.to_be_bytes());
            v.extend_from_slice(&args);
            v.push(0xCE);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn decode_frame_survives_garbage(
        chunks in proptest::collection::vec(
            prop_oneof![plausible_frame(), plausible_method_payload(),
                        proptest::collection::vec(any::<u8>(), 0..50)],
            1..6),
        frame_max in prop_oneof![Just(0u32), 1u32..300, Just(4096u32)],
    ) {
        let mut buf = BytesMut::from(&chunks.concat()[..]);
        // Decode until an error or "need more data"; must terminate.
        while let Ok(Some(_)) = decode_frame(&mut buf, frame_max) {}
    }

    #[test]
    fn method_decode_survives_garbage(
        c in prop_oneof![any::<u16>(), Just(10u16), Just(50u16), Just(60u16)],
        m in prop_oneof![any::<u16>(), 10u16..=120],
        args in proptest::collection::vec(any::<u8>(), 0..200),
    ) {
        let _ = Method::decode(c, m, &args);
    }

    #[test]
    fn properties_and_tables_survive_garbage(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_properties(&bytes);
        let _ = FieldTable::decode(&bytes);
        // Also with plausible flags / a matching length prefix in front.
        let mut with_flags = vec![0xFF, 0xFC];
        with_flags.extend_from_slice(&bytes);
        let _ = decode_properties(&with_flags);
        let mut with_len = (bytes.len() as u32).to_be_bytes().to_vec();
        with_len.extend_from_slice(&bytes);
        let _ = FieldTable::decode(&with_len);
    }

    #[test]
    fn assembler_survives_any_frame_sequence(
        ops in proptest::collection::vec((0u8..6, 0u64..40, 0usize..20), 0..40),
        max in 0u64..50,
    ) {
        let mut asm = Assembler::with_max_body(max);
        for (kind, size, len) in ops {
            let frame = match kind {
                0 => Frame::Method { channel: 1, method: BasicPublish::default().into() },
                1 => Frame::Method { channel: 1, method: BasicAck::default().into() },
                2 => Frame::Header { channel: 1, class_id: class::BASIC, body_size: size, properties: Box::default() },
                3 => Frame::Header { channel: 1, class_id: 10, body_size: size, properties: Box::default() },
                4 => Frame::Body { channel: 1, payload: Bytes::from(vec![1u8; len]) },
                _ => Frame::Heartbeat { channel: 0 },
            };
            if let Err(e) = asm.push(frame) {
                prop_assert!(!asm.in_progress());
                prop_assert!(e.reply_code() == 505 || (e.reply_code() == 406 && e.is_channel_error()));
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Standalone property encoding (used by storage)
// ---------------------------------------------------------------------------

#[test]
fn properties_standalone_round_trip() {
    let mut headers = FieldTable::new();
    headers.insert("x-delay", FieldValue::I32(500));
    headers.insert(
        "x-tags",
        FieldValue::Array(vec!["a".into(), FieldValue::Void]),
    );
    let props = BasicProperties {
        content_type: Some("application/json".into()),
        headers: Some(headers),
        delivery_mode: Some(2),
        priority: Some(5),
        expiration: Some("60000".into()),
        kind: Some("order.created".into()),
        timestamp: Some(1_700_000_000),
        ..Default::default()
    };
    let mut out = BytesMut::new();
    encode_properties(&props, &mut out);
    assert_eq!(out.len(), props.encoded_len());
    let back = decode_properties(&out).unwrap();
    assert_eq!(back, props);
    assert!(back.is_persistent());
    assert_eq!(
        back.headers
            .as_ref()
            .and_then(|h| h.get("x-delay"))
            .and_then(FieldValue::as_i64),
        Some(500)
    );

    // The header frame embeds exactly the standalone encoding.
    let mut frame = BytesMut::new();
    encode_header_frame(1, class::BASIC, 0, &props, &mut frame);
    assert_eq!(&frame[7 + 12..frame.len() - 1], &out[..]);

    // Trailing bytes after the property list are rejected.
    out.put_u8(0);
    assert!(matches!(
        decode_properties(&out),
        Err(DecodeError::TrailingBytes { .. })
    ));
}
