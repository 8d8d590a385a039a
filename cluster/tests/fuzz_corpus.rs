//! Replays the committed node-protocol fuzz corpus (`fuzz/corpus/node_frame/`)
//! through every decoder a node applies to a peer's bytes
//! (`rpc::fuzz_decode`), so each input is checked in every test run.

#![allow(clippy::unwrap_used)] // tests may panic

#[test]
fn node_protocol_corpus_decodes_without_panics() {
    let files = sluice_codecs::fuzzing::corpus("node_frame");
    assert!(files.len() >= 4, "the node_frame corpus has {} inputs", files.len());
    for f in files {
        let data = std::fs::read(&f).unwrap();
        let outcome = std::panic::catch_unwind(|| sluice_cluster::rpc::fuzz_decode(&data));
        assert!(outcome.is_ok(), "{} panics a decoder", f.display());
    }
}
