//! One test binary: every test starts the real `sluice` binary (see the
//! harness in `src/lib.rs`) and drives it with lapin on tokio.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod alarms;
mod amqp_basic;
mod amqp_dead_letters;
mod amqp_errors;
mod amqp_exchanges;
mod amqp_limits;
mod amqp_partitions;
mod amqp_queues;
mod auth;
mod bench;
mod cli;
mod cluster_cli;
mod cluster_membership;
mod cluster_partition;
mod cluster_queues;
mod cluster_rebalance;
mod client_suites;
mod clients;
mod crash;
mod crash_loop;
mod disk_full;
mod flow;
mod fuzz_corpus;
mod hostile;
mod matrix;
mod matrix_lapin;
mod metrics;
mod raw;
mod soak;
mod stomp;
mod tls;
mod web_stomp;
