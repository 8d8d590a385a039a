//! A whole STOMP session, stateful: the input goes to a live session of
//! a real broker after a CONNECT when its first byte is even
//! ([`sluice_fuzz::session_bytes`]). Any panic, or a session that does
//! not end once the client closed, is a crash.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_fuzz::run_session(sluice_fuzz::Session::Stomp, data));
