//! The AMQP 0-9-1 decoders ([`sluice_codecs::fuzzing::amqp`]).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_codecs::fuzzing::amqp(data));
