//! The `sluice` binary: one executable, several roles.
//!
//! - `serve`: the all-in-one single node (AMQP and STOMP; metrics arrive
//!   with their issue).
//! - `node`, `gateway`: the storage-cluster roles (cluster issue).
//! - `ctl`: the admin CLI (operations issue).
//! - `bench`: the load tool (performance issue).

mod admin;
mod alarm;
mod amqp;
mod audit;
mod auth;
mod channel;
mod cli;
mod config;
mod ctl_admin;
mod error;
mod metrics;
mod router;
mod server;
mod stomp;

use clap::{Parser, Subcommand};

/// mimalloc returns freed memory to the OS far better than glibc's malloc
/// under this workload (many threads, short-lived message buffers): in the
/// churn run of docs/storage.md RSS stayed much lower with it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "sluice", version, about = "An AMQP 0-9-1 and STOMP message broker with its own replicated storage")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a single-node broker (listeners + storage in one process).
    Serve(config::ServeArgs),
    /// Run a storage node of a cluster (today: identity, storage and the authenticated node protocol).
    Node(config::NodeArgs),
    /// Run a stateless protocol gateway (AMQP) in front of storage nodes.
    Gateway(config::GatewayArgs),
    /// Administer a cluster.
    Ctl(config::CtlArgs),
    /// Load-test an AMQP or STOMP broker (not implemented yet).
    Bench,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Cmd::Serve(args) => {
            let again = args.clone();
            let reload: server::Reload = Box::new(move || again.clone().resolve().map(|c| c.front.limits.alarm));
            args.resolve().and_then(|config| runtime().and_then(|rt| rt.block_on(server::serve(config, reload))))
        }
        Cmd::Node(args) => {
            let again = args.clone();
            let reload: server::Reload = Box::new(move || again.clone().resolve().map(|c| c.alarm));
            args.resolve().and_then(|config| runtime().and_then(|rt| rt.block_on(cli::node(config, reload))))
        }
        Cmd::Ctl(args) => runtime().and_then(|rt| rt.block_on(cli::ctl(args))),
        Cmd::Gateway(args) => {
            let again = args.clone();
            let reload: server::Reload = Box::new(move || again.clone().resolve().map(|c| c.front.limits.alarm));
            args.resolve().and_then(|config| runtime().and_then(|rt| rt.block_on(server::gateway(config, reload))))
        }
        Cmd::Bench => {
            eprintln!("sluice: this subcommand is not implemented yet");
            std::process::exit(2);
        }
    };
    if let Err(e) = result {
        // One line: the context chain joined, skipping causes whose text
        // the previous message already includes.
        let mut msg: Vec<String> = Vec::new();
        for cause in e.chain() {
            let text = cause.to_string();
            if msg.last().is_some_and(|prev| prev.contains(&text)) {
                continue;
            }
            msg.push(text);
        }
        eprintln!("sluice: {}", msg.join(": "));
        std::process::exit(1);
    }
}
