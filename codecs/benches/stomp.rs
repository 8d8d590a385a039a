//! Criterion microbenchmarks of the STOMP codec: decoding a SEND frame
//! (a few headers, 1 KiB or 64 KiB body, with `content-length`, and 1 KiB
//! without it so the decoder scans for the NUL) and encoding a MESSAGE
//! frame (STOMP 1.2, so header values are escaped). Throughput is counted
//! in wire bytes. Run: `cargo bench -p sluice-codecs --bench stomp`
//! (docs/performance.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use sluice_codecs::stomp::{encode_frame, header, Command, Decoder, Frame, Item, Limits, Version};

const VERSION: Version = Version::V1_2;

const SIZES: [(usize, &str); 2] = [(1024, "1KiB"), (64 * 1024, "64KiB")];

/// A body without NUL octets, so it can also be sent without
/// `content-length`.
fn body(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| b'a' + (i % 26) as u8).collect::<Vec<u8>>())
}

/// The wire bytes of a SEND as stomp.js / stomp.py send it.
fn send_wire(body: &[u8], with_length: bool) -> BytesMut {
    let mut out = Vec::new();
    out.extend_from_slice(
        b"SEND\ndestination:/queue/orders.created\ncontent-type:application/json\n",
    );
    out.extend_from_slice(b"persistent:true\nreceipt:r-42\nx-trace-id:4bf92f3577b34da6\n");
    if with_length {
        out.extend_from_slice(format!("content-length:{}\n", body.len()).as_bytes());
    }
    out.push(b'\n');
    out.extend_from_slice(body);
    out.push(0);
    BytesMut::from(&out[..])
}

fn message(body: Bytes) -> Frame {
    Frame::new(Command::Message)
        .with_header(header::SUBSCRIPTION, "sub-0")
        .with_header(header::MESSAGE_ID, "T_sub-0@@session-aZ3kQ9@@1@@42")
        .with_header(header::DESTINATION, "/queue/orders.created")
        .with_header(header::ACK, "42")
        .with_header(header::REDELIVERED, "false")
        .with_header(header::CONTENT_TYPE, "application/json")
        .with_header(header::PERSISTENT, "true")
        .with_header("x-trace-id", "4bf92f3577b34da6")
        .with_body(body)
}

/// Decodes one SEND with a reused [`Decoder`], as a session does.
fn bench_decode_send(c: &mut Criterion) {
    let mut g = c.benchmark_group("stomp/decode_send");
    let cases = [
        (1024, "1KiB", true),
        (64 * 1024, "64KiB", true),
        (1024, "1KiB_no_length", false),
    ];
    for (len, name, with_length) in cases {
        let wire = send_wire(&body(len), with_length);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut decoder = Decoder::new(VERSION, Limits::default());
            b.iter_batched(
                || wire.clone(),
                |mut buf| match decoder.decode(&mut buf).expect("valid frame") {
                    Some(Item::Frame(frame)) => {
                        assert_eq!(frame.body.len(), len);
                        black_box(frame);
                    }
                    other => panic!("expected a frame, got {other:?}"),
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

/// Encodes a MESSAGE (the broker's per-delivery write path) into a reused
/// buffer.
fn bench_encode_message(c: &mut Criterion) {
    let mut g = c.benchmark_group("stomp/encode_message");
    for (len, name) in SIZES {
        let frame = message(body(len));
        let mut probe = BytesMut::new();
        encode_frame(&frame, VERSION, &mut probe).expect("encodable");
        let wire_len = probe.len();
        g.throughput(Throughput::Bytes(wire_len as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut out = BytesMut::with_capacity(wire_len);
            b.iter(|| {
                out.clear();
                encode_frame(black_box(&frame), VERSION, &mut out).expect("encodable");
                assert_eq!(out.len(), wire_len);
            });
        });
    }
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_decode_send, bench_encode_message
}
criterion_main!(benches);
