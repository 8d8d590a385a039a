//! The STOMP decoder ([`sluice_codecs::fuzzing::stomp`]).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_codecs::fuzzing::stomp(data));
