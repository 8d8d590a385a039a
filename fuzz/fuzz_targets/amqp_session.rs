//! A whole AMQP session, stateful: the input goes to a live session of a
//! real broker (single node, embedded storage), after a login when its
//! first byte is even ([`sluice_fuzz::session_bytes`]). Any panic, or a
//! session that does not end once the client closed, is a crash.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::run_session(sluice_fuzz::Session::Amqp, data));
