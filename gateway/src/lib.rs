//! The gateway's library: listeners, AMQP and STOMP sessions, the router,
//! the admin API, metrics, the CLI and the load tool. The `sluice` binary
//! (`main.rs`) parses the command line and calls into it; the fuzz targets
//! (`fuzz/`) drive a session through it without a socket.

pub mod admin;
pub mod alarm;
pub mod amqp;
pub mod audit;
pub mod auth;
pub mod bench;
pub mod channel;
pub mod cli;
pub mod config;
pub mod ctl_admin;
pub mod error;
pub mod metrics;
pub mod router;
pub mod server;
pub mod stomp;
