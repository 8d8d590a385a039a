//! Criterion microbenchmarks of the AMQP 0-9-1 codec: a `basic.publish`
//! (method + content header + body) decoded frame by frame and assembled
//! into one command, and the encoders of `basic.publish` and
//! `basic.deliver` with content. Bodies of 1 KiB and 64 KiB; throughput is
//! counted in wire bytes. Run: `cargo bench -p sluice-codecs --bench amqp`
//! (docs/performance.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use sluice_codecs::amqp::{
    class, decode_frame, encode_content, encode_method_frame, Assembled, Assembler, BasicDeliver,
    BasicProperties, BasicPublish, FieldTable, FieldValue, Method,
};

/// RabbitMQ's default negotiated frame_max: a 64 KiB body fits one frame.
const FRAME_MAX: u32 = 131_072;
/// The smallest frame_max: a 64 KiB body takes 17 body frames.
const FRAME_MIN: u32 = 4096;

const SIZES: [(usize, &str); 2] = [(1024, "1KiB"), (64 * 1024, "64KiB")];

/// Properties a typical client sets (pika/Java client with confirms).
fn properties() -> BasicProperties {
    let mut headers = FieldTable::new();
    headers.insert(
        "x-trace-id",
        FieldValue::LongString(Bytes::from_static(b"4bf92f3577b34da6")),
    );
    headers.insert("attempt", FieldValue::I32(1));
    BasicProperties {
        content_type: Some("application/json".into()),
        delivery_mode: Some(2),
        message_id: Some("9f1c2b8e-5a4d-4e2f-8b1a-3c6d7e8f9a0b".into()),
        timestamp: Some(1_764_000_000),
        headers: Some(headers),
        ..BasicProperties::default()
    }
}

fn body(len: usize) -> Bytes {
    Bytes::from((0..len).map(|i| (i % 251) as u8).collect::<Vec<u8>>())
}

fn publish() -> Method {
    Method::BasicPublish(BasicPublish {
        ticket: 0,
        exchange: "amq.direct".into(),
        routing_key: "orders.created".into(),
        mandatory: false,
        immediate: false,
    })
}

fn deliver(tag: u64) -> Method {
    Method::BasicDeliver(BasicDeliver {
        consumer_tag: "amq.ctag-VYWk6Lw1Z2pD3eQ8rJ7fHg".into(),
        delivery_tag: tag,
        redelivered: false,
        exchange: "amq.direct".into(),
        routing_key: "orders.created".into(),
    })
}

/// The wire bytes of one publish: method frame, header frame, body frame(s).
fn publish_wire(body: &[u8], frame_max: u32) -> BytesMut {
    let mut out = BytesMut::new();
    encode_method_frame(1, &publish(), &mut out);
    encode_content(1, class::BASIC, &properties(), body, frame_max, &mut out);
    out
}

/// Decodes every frame of a publish (frames only, no assembly).
fn bench_decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("amqp/decode_publish");
    for (len, name) in SIZES {
        let wire = publish_wire(&body(len), FRAME_MAX);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter_batched(
                || wire.clone(),
                |mut buf| {
                    let mut frames = 0;
                    while let Some(frame) = decode_frame(&mut buf, FRAME_MAX).expect("valid frame")
                    {
                        black_box(frame);
                        frames += 1;
                    }
                    assert_eq!(frames, 3);
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

/// Decodes a publish and pushes its frames through the per-channel
/// assembler into one `Assembled::Content`. `fm4096`: frame_max 4096, so
/// the 64 KiB body arrives in 17 frames and is reassembled by copying.
fn bench_assemble(c: &mut Criterion) {
    let mut g = c.benchmark_group("amqp/decode_assemble_publish");
    let cases = [
        (1024, "1KiB", FRAME_MAX),
        (64 * 1024, "64KiB", FRAME_MAX),
        (64 * 1024, "64KiB_fm4096", FRAME_MIN),
    ];
    for (len, name, frame_max) in cases {
        let wire = publish_wire(&body(len), frame_max);
        g.throughput(Throughput::Bytes(wire.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut assembler = Assembler::new();
            b.iter_batched(
                || wire.clone(),
                |mut buf| {
                    let mut done = None;
                    while let Some(frame) = decode_frame(&mut buf, frame_max).expect("valid frame")
                    {
                        if let Some(cmd) = assembler.push(frame).expect("valid sequence") {
                            done = Some(cmd);
                        }
                    }
                    match done {
                        Some(Assembled::Content { body, .. }) => assert_eq!(body.len(), len),
                        other => panic!("expected content, got {other:?}"),
                    }
                },
                BatchSize::SmallInput,
            );
        });
    }
    g.finish();
}

/// Encodes a publish (what a client does; the gateway's own client side
/// and the compat tests use it too).
fn bench_encode_publish(c: &mut Criterion) {
    let mut g = c.benchmark_group("amqp/encode_publish");
    let method = publish();
    let props = properties();
    for (len, name) in SIZES {
        let body = body(len);
        let wire_len = publish_wire(&body, FRAME_MAX).len();
        g.throughput(Throughput::Bytes(wire_len as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut out = BytesMut::with_capacity(wire_len);
            b.iter(|| {
                out.clear();
                encode_method_frame(1, black_box(&method), &mut out);
                encode_content(
                    1,
                    class::BASIC,
                    black_box(&props),
                    black_box(&body),
                    FRAME_MAX,
                    &mut out,
                );
                assert_eq!(out.len(), wire_len);
            });
        });
    }
    g.finish();
}

/// Encodes a basic.deliver with its content, the broker's per-message
/// write path towards a consumer.
fn bench_encode_deliver(c: &mut Criterion) {
    let mut g = c.benchmark_group("amqp/encode_deliver");
    let props = properties();
    for (len, name) in SIZES {
        let body = body(len);
        let mut probe = BytesMut::new();
        encode_method_frame(1, &deliver(1), &mut probe);
        encode_content(1, class::BASIC, &props, &body, FRAME_MAX, &mut probe);
        let wire_len = probe.len();
        g.throughput(Throughput::Bytes(wire_len as u64));
        g.bench_function(BenchmarkId::from_parameter(name), |b| {
            let mut out = BytesMut::with_capacity(wire_len);
            let mut tag = 0u64;
            b.iter(|| {
                tag += 1;
                out.clear();
                // Building the method (consumer tag, exchange and routing
                // key strings) is part of what the broker does per delivery.
                encode_method_frame(1, &deliver(tag), &mut out);
                encode_content(
                    1,
                    class::BASIC,
                    black_box(&props),
                    black_box(&body),
                    FRAME_MAX,
                    &mut out,
                );
                black_box(&out);
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
    targets = bench_decode, bench_assemble, bench_encode_publish, bench_encode_deliver
}
criterion_main!(benches);
