//! The `sluice` binary: one executable, several roles.
//!
//! - `serve`: the all-in-one single node (AMQP and STOMP; metrics arrive
//!   with their issue).
//! - `node`, `gateway`: the storage-cluster roles (cluster issue).
//! - `ctl`: the admin CLI (operations issue).
//! - `bench`: the load tool (performance issue).

use sluice::{bench, cli, config, server};

use clap::{CommandFactory, Parser, Subcommand};

/// mimalloc returns freed memory to the OS far better than glibc's malloc
/// under this workload (many threads, short-lived message buffers): in the
/// churn run of docs/storage.md RSS stayed much lower with it. The
/// `system-alloc` feature leaves the system allocator in place, for heap
/// profilers that hook malloc (heaptrack; docs/performance.md).
#[cfg(not(feature = "system-alloc"))]
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
    /// Load-test an AMQP 0-9-1 broker (sluice or any other), PerfTest-style.
    Bench(bench::BenchArgs),
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

/// Starts logging to stderr, once the configuration is resolved (its
/// errors are printed with eprintln).
fn init_logging(log: &config::Logging) {
    // The level was checked when the configuration was resolved.
    let filter = tracing_subscriber::EnvFilter::builder().parse_lossy(&log.level);
    // Colours only on a terminal, not in files or pipes.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match log.format {
        config::LogFormat::Text => fmt.init(),
        // One object a line; "span" holds the connection's fields (id,
        // peer, proto, user, vhost).
        config::LogFormat::Json => fmt.json().with_current_span(true).with_span_list(false).init(),
    }
}

/// Exits with clap's error; a bad value that came from a `SLUICE_*`
/// variable (clap names only the flag) also names the variable.
fn clap_exit(e: clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue};
    if let (Some(ContextValue::String(arg)), Some(ContextValue::String(value))) =
        (e.get(ContextKind::InvalidArg), e.get(ContextKind::InvalidValue))
    {
        // arg is "--channel-max <CHANNEL_MAX>".
        let long = arg.split_whitespace().next().unwrap_or("").trim_start_matches("--");
        let on_command_line =
            std::env::args().any(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")));
        let env = Cli::command()
            .get_subcommands()
            .flat_map(|sub| sub.get_arguments())
            .find(|a| a.get_long() == Some(long))
            .and_then(|a| a.get_env().and_then(|e| e.to_str()).map(str::to_string));
        if let Some(env) = env.filter(|env| !on_command_line && std::env::var(env).as_deref() == Ok(value.as_str())) {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("").trim_start_matches("error: ");
            eprintln!("sluice: environment variable {env}: {first}");
            std::process::exit(2);
        }
    }
    e.exit()
}

/// mimalloc's `mi_option_purge_delay`: its place in the `mi_option_e`
/// enum of mimalloc.h (v3, which libmimalloc-sys builds; the same in v2),
/// which the sys crate does not name.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Freed memory goes back to the OS after 100 ms instead of mimalloc v3's
/// 1 s, which under steady load in effect never came: a backlog of 1M
/// messages left 310 MB of RSS for 75 MB of live heap, 170 MB with this;
/// no delay at all cost a quarter of the transient throughput
/// (docs/performance.md, "Memory per queued message").
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
fn tune_allocator() {
    #[cfg(not(feature = "system-alloc"))]
    // SAFETY: sets a process-wide option of the allocator; any value is valid.
    unsafe {
        libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 100);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::try_parse().unwrap_or_else(|e| clap_exit(e));
    let result = match cli.command {
        Cmd::Serve(args) => {
            // SIGHUP re-reads the alarm limits from the same sources.
            let again = args.clone();
            let reload: server::Reload = Box::new(move || again.clone().resolve().map(|c| c.front.limits.alarm));
            args.resolve().and_then(|config| {
                init_logging(&config.log);
                runtime().and_then(|rt| rt.block_on(server::serve(config, reload)))
            })
        }
        Cmd::Node(args) => {
            let again = args.clone();
            let reload: server::Reload = Box::new(move || again.clone().resolve().map(|c| c.alarm));
            args.resolve().and_then(|config| {
                init_logging(&config.log);
                runtime().and_then(|rt| rt.block_on(cli::node(config, reload)))
            })
        }
        Cmd::Ctl(args) => {
            // ctl has no log keys: SLUICE_LOG only, warn if unset or invalid.
            let level = std::env::var("SLUICE_LOG").unwrap_or_default();
            let level = if config::check_log_level(&level).is_ok() && !level.is_empty() { level } else { "warn".into() };
            init_logging(&config::Logging { level, format: config::LogFormat::Text });
            args.resolve().and_then(|config| runtime().and_then(|rt| rt.block_on(cli::ctl(config))))
        }
        Cmd::Gateway(args) => {
            let again = args.clone();
            let reload: server::Reload = Box::new(move || again.clone().resolve().map(|c| c.front.limits.alarm));
            args.resolve().and_then(|config| {
                init_logging(&config.log);
                runtime().and_then(|rt| rt.block_on(server::gateway(config, reload)))
            })
        }
        Cmd::Bench(args) => runtime().and_then(|rt| rt.block_on(bench::run(args))),
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

#[cfg(test)]
mod tests {
    /// The option index is mimalloc's purge delay: it reads v3's default
    /// (1000 ms, options.c) before it is set, and what is set after.
    #[test]
    fn purge_delay_is_the_option_we_set() {
        // SAFETY: reads and sets an allocator option.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY), 1000);
        }
        super::tune_allocator();
        // SAFETY: reads an allocator option.
        unsafe {
            assert_eq!(libmimalloc_sys::mi_option_get(super::MI_OPTION_PURGE_DELAY), 100);
        }
    }
}
