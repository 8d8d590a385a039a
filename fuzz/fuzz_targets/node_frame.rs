//! The node protocol ([`sluice_cluster::rpc::fuzz_decode`]): what a node
//! or gateway decodes from a peer.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_cluster::rpc::fuzz_decode(data));
