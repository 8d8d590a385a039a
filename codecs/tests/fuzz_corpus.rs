//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`, grown by
//! `scripts/fuzz.sh`) through the decoders, so an input that once
//! crashed a decoder, or reached a new path, is checked in every test
//! run, without cargo-fuzz. Each file must be decoded without a panic.

#![allow(clippy::unwrap_used)] // tests may panic


fn replay(target: &str, decode: fn(&[u8])) {
    let files = sluice_codecs::fuzzing::corpus(target);
    assert!(files.len() >= 4, "the {target} corpus has {} inputs", files.len());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let outcome = std::panic::catch_unwind(|| decode(&data));
        assert!(outcome.is_ok(), "{} panics the decoder", f.display());
    }
}

#[test]
fn amqp_corpus_decodes_without_panics() {
    replay("amqp_frame", sluice_codecs::fuzzing::amqp);
}

#[test]
fn stomp_corpus_decodes_without_panics() {
    replay("stomp_frame", sluice_codecs::fuzzing::stomp);
}

#[test]
fn websocket_corpus_decodes_without_panics() {
    replay("ws_frame", sluice_codecs::fuzzing::websocket);
}
