//! WebSocket upgrade and framing ([`sluice_codecs::fuzzing::websocket`]).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_codecs::fuzzing::websocket(data));
