//! Configuration: command-line flags, `SLUICE_*` environment variables and
//! a TOML file, merged in that order of precedence over the defaults.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use serde::Deserialize;
use sluice_cluster::tls::{ClientAuth, NodeTls, NodeTlsFiles};

pub use crate::server::Limits;
use crate::alarm::{AlarmLimits, MemoryWatermark};

/// The file format (every key optional; unknown keys are an error).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub amqp: Option<String>,
    pub stomp: Option<String>,
    pub web_stomp: Option<String>,
    pub amqps: Option<String>,
    pub stomps: Option<String>,
    pub web_stomps: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    pub tls_fail_if_no_peer_cert: Option<bool>,
    pub metrics: Option<String>,
    pub admin: Option<String>,
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    pub heartbeat: Option<u16>,
    pub max_message_size: Option<u64>,
    pub consumer_timeout: Option<u64>,
    pub memory_high_watermark: Option<f64>,
    pub memory_high_watermark_bytes: Option<u64>,
    pub disk_free_limit: Option<u64>,
    pub max_connections: Option<u64>,
    pub consumer_max_per_channel: Option<u32>,
    pub body_cache_bytes: Option<u64>,
    pub fsync: Option<bool>,
    /// user name → password: created (hashed, tag administrator, all
    /// permissions on `/`) in the replicated metadata at start if missing.
    pub users: Option<HashMap<String, String>>,
    pub loopback_users: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// How log lines are written to stderr (`log_format`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, with the fields of the current span
    /// (a connection's id, peer, proto, user and vhost).
    Json,
}

/// `--log-level` and `--log-format` of `serve`, `gateway` and `node`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct LogArgs {
    /// Which log lines to write to stderr: a level (error, warn, info, debug,
    /// trace, off) or tracing's EnvFilter directives, e.g. `warn,sluice=debug`
    /// (default warn).
    #[arg(long, env = "SLUICE_LOG")]
    pub log_level: Option<String>,
    /// Log line format: text or json (default text).
    #[arg(long, env = "SLUICE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}

/// The validated logging configuration.
#[derive(Debug, Clone)]
pub struct Logging {
    /// EnvFilter directives, already checked to parse.
    pub level: String,
    pub format: LogFormat,
}

impl LogArgs {
    /// Flags/env over the file's `log_level` and `log_format`, validated.
    pub fn resolve(self, level: Option<String>, format: Option<LogFormat>) -> anyhow::Result<Logging> {
        let level = self.log_level.or(level).unwrap_or_else(|| "warn".into());
        check_log_level(&level)?;
        Ok(Logging { level, format: self.log_format.or(format).unwrap_or_default() })
    }
}

/// EnvFilter accepts a bare word as a target name (`verbose` = everything
/// from target `verbose`, so in effect nothing): a typo for a level would
/// silently turn logging off, so a bare word must be a level here
/// (`TARGET=LEVEL` names a target).
pub fn check_log_level(level: &str) -> anyhow::Result<()> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    let hint = "(a level: off, error, warn, info, debug, trace; or directives such as warn,sluice=debug)";
    for part in level.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let plain = !part.contains(['=', '[', ':']);
        if plain && !LEVELS.iter().any(|l| l.eq_ignore_ascii_case(part)) {
            anyhow::bail!("log_level '{level}': '{part}' is not a level {hint}");
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(level) {
        anyhow::bail!("log_level '{level}' is not a log filter {hint}: {e}");
    }
    Ok(())
}

/// The client-facing part shared by `sluice serve` and `sluice gateway`:
/// listeners and what is offered to clients.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ClientArgs {
    /// AMQP listener address (default 0.0.0.0:5672; port 0 picks a free port).
    #[arg(long, env = "SLUICE_AMQP")]
    pub amqp: Option<String>,
    /// STOMP listener address (default 0.0.0.0:61613; port 0 picks a free port).
    #[arg(long, env = "SLUICE_STOMP")]
    pub stomp: Option<String>,
    /// STOMP over WebSocket listener, path /ws (default 0.0.0.0:15674; port 0 picks a free port).
    #[arg(long, env = "SLUICE_WEB_STOMP")]
    pub web_stomp: Option<String>,
    /// AMQP over TLS listener (off unless given; RabbitMQ uses 5671). Needs --tls-cert and --tls-key.
    #[arg(long, env = "SLUICE_AMQPS")]
    pub amqps: Option<String>,
    /// STOMP over TLS listener (off unless given; RabbitMQ uses 61614). Needs --tls-cert and --tls-key.
    #[arg(long, env = "SLUICE_STOMPS")]
    pub stomps: Option<String>,
    /// STOMP over WebSocket over TLS listener, path /ws (off unless given; RabbitMQ uses 15673).
    #[arg(long, env = "SLUICE_WEB_STOMPS")]
    pub web_stomps: Option<String>,
    /// Server certificate chain, PEM (leaf first), for the TLS listeners.
    #[arg(long, env = "SLUICE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Private key of the server certificate, PEM.
    #[arg(long, env = "SLUICE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates, PEM, that client certificates must chain to.
    #[arg(long, env = "SLUICE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Ask TLS clients for a certificate, verified against --tls-ca (default false).
    #[arg(long, env = "SLUICE_TLS_VERIFY_PEER")]
    pub tls_verify_peer: Option<bool>,
    /// Refuse TLS clients without a certificate (default false; implies --tls-verify-peer).
    #[arg(long, env = "SLUICE_TLS_FAIL_IF_NO_PEER_CERT")]
    pub tls_fail_if_no_peer_cert: Option<bool>,
    /// Prometheus metrics address, GET /metrics (default 0.0.0.0:15692; port 0 picks a free port).
    #[arg(long, env = "SLUICE_METRICS")]
    pub metrics: Option<String>,
    /// Admin HTTP API address (RabbitMQ's management API paths; `sluice ctl`;
    /// default 127.0.0.1:15672; port 0 picks a free port).
    #[arg(long, env = "SLUICE_ADMIN")]
    pub admin: Option<String>,
    /// Highest channel number offered to clients (default 2047).
    #[arg(long, env = "SLUICE_CHANNEL_MAX")]
    pub channel_max: Option<u16>,
    /// Largest frame offered to clients in bytes (default 131072).
    #[arg(long, env = "SLUICE_FRAME_MAX")]
    pub frame_max: Option<u32>,
    /// Heartbeat interval offered to clients in seconds (default 60; 0 = off).
    #[arg(long, env = "SLUICE_HEARTBEAT")]
    pub heartbeat: Option<u16>,
    /// Largest message body accepted in bytes (default 128 MiB).
    #[arg(long, env = "SLUICE_MAX_MESSAGE_SIZE")]
    pub max_message_size: Option<u64>,
    /// Milliseconds a delivery may stay unacknowledged before its channel is
    /// closed with 406 and its messages requeued (default 1800000, RabbitMQ's
    /// consumer_timeout; 0 = never). Queues override it with x-consumer-timeout.
    #[arg(long, env = "SLUICE_CONSUMER_TIMEOUT")]
    pub consumer_timeout: Option<u64>,
    /// Users that may only log in from a loopback address, comma separated
    /// (default guest, as RabbitMQ's loopback_users; an empty value: none).
    #[arg(long, env = "SLUICE_LOOPBACK_USERS", value_delimiter = ',')]
    pub loopback_users: Option<Vec<String>>,
    #[command(flatten)]
    pub alarm: AlarmArgs,
    /// Most client connections (AMQP, STOMP, Web-STOMP together) at once;
    /// more are refused (default: no limit).
    #[arg(long, env = "SLUICE_MAX_CONNECTIONS")]
    pub max_connections: Option<u64>,
    /// Most consumers on one AMQP channel; one more is a 530 connection error
    /// (default: no limit; RabbitMQ's consumer_max_per_channel).
    #[arg(long, env = "SLUICE_CONSUMER_MAX_PER_CHANNEL")]
    pub consumer_max_per_channel: Option<u32>,
}

/// The client keys of a config file (`FileConfig` or `GatewayFile`, which
/// both carry them: serde's `flatten` does not work with
/// `deny_unknown_fields`) as a [`ClientFile`].
macro_rules! client_file {
    ($file:ident) => {
        ClientFile {
            amqp: $file.amqp,
            stomp: $file.stomp,
            web_stomp: $file.web_stomp,
            amqps: $file.amqps,
            stomps: $file.stomps,
            web_stomps: $file.web_stomps,
            tls_cert: $file.tls_cert,
            tls_key: $file.tls_key,
            tls_ca: $file.tls_ca,
            tls_verify_peer: $file.tls_verify_peer,
            tls_fail_if_no_peer_cert: $file.tls_fail_if_no_peer_cert,
            metrics: $file.metrics,
            admin: $file.admin,
            channel_max: $file.channel_max,
            frame_max: $file.frame_max,
            heartbeat: $file.heartbeat,
            max_message_size: $file.max_message_size,
            consumer_timeout: $file.consumer_timeout,
            memory_high_watermark: $file.memory_high_watermark,
            memory_high_watermark_bytes: $file.memory_high_watermark_bytes,
            disk_free_limit: $file.disk_free_limit,
            max_connections: $file.max_connections,
            consumer_max_per_channel: $file.consumer_max_per_channel,
            users: $file.users,
            loopback_users: $file.loopback_users,
        }
    };
}

/// The same keys as read from a TOML file.
pub struct ClientFile {
    pub amqp: Option<String>,
    pub stomp: Option<String>,
    pub web_stomp: Option<String>,
    pub amqps: Option<String>,
    pub stomps: Option<String>,
    pub web_stomps: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    pub tls_fail_if_no_peer_cert: Option<bool>,
    pub metrics: Option<String>,
    pub admin: Option<String>,
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    pub heartbeat: Option<u16>,
    pub max_message_size: Option<u64>,
    pub consumer_timeout: Option<u64>,
    pub memory_high_watermark: Option<f64>,
    pub memory_high_watermark_bytes: Option<u64>,
    pub disk_free_limit: Option<u64>,
    pub max_connections: Option<u64>,
    pub consumer_max_per_channel: Option<u32>,
    pub users: Option<HashMap<String, String>>,
    pub loopback_users: Option<Vec<String>>,
}

/// The validated client-facing configuration.
#[derive(Debug, Clone)]
pub struct Frontend {
    pub amqp: String,
    pub stomp: String,
    pub web_stomp: String,
    /// The TLS listeners that are on, and the configuration they share.
    pub amqps: Option<String>,
    pub stomps: Option<String>,
    pub web_stomps: Option<String>,
    pub tls: Option<Arc<rustls::ServerConfig>>,
    pub metrics: String,
    /// The admin HTTP API listener (`sluice ctl`, RabbitMQ's management
    /// API paths).
    pub admin: String,
    pub limits: Limits,
    /// Users to create at start if missing (config file `users`).
    pub users: HashMap<String, String>,
    /// `loopback_users`.
    pub loopback_users: Vec<String>,
}

impl CtlConfig {
    /// The cluster secret, with the node protocol's TLS when configured.
    pub fn credentials(&self) -> anyhow::Result<sluice_cluster::rpc::Secret> {
        let tls = node_tls(
            self.cluster_tls.cluster_tls_cert.clone(),
            self.cluster_tls.cluster_tls_key.clone(),
            self.cluster_tls.cluster_tls_ca.clone(),
        )?;
        cluster_credentials(self.cluster_secret_file.as_deref(), tls.as_ref())
    }
}

impl ClientArgs {
    /// Flags/env over the file over the defaults, validated.
    pub fn resolve(self, file: ClientFile) -> anyhow::Result<Frontend> {
        let frame_max = self.frame_max.or(file.frame_max).unwrap_or(131_072);
        if frame_max < 4096 {
            anyhow::bail!("frame_max must be at least 4096 (got {frame_max})");
        }
        let users = file.users.unwrap_or_default();
        let loopback_users: Vec<String> = self
            .loopback_users
            .or(file.loopback_users)
            .unwrap_or_else(|| vec!["guest".into()])
            .into_iter()
            .filter(|u| !u.is_empty())
            .collect();
        let amqps = self.amqps.or(file.amqps);
        let stomps = self.stomps.or(file.stomps);
        let web_stomps = self.web_stomps.or(file.web_stomps);
        let tls_listener = [("amqps", &amqps), ("stomps", &stomps), ("web_stomps", &web_stomps)]
            .into_iter()
            .find_map(|(name, addr)| addr.as_ref().map(|_| name));
        let tls = match tls_listener {
            None => None,
            Some(listener) => Some(tls_config(
                listener,
                self.tls_cert.or(file.tls_cert),
                self.tls_key.or(file.tls_key),
                self.tls_ca.or(file.tls_ca),
                self.tls_verify_peer.or(file.tls_verify_peer).unwrap_or(false),
                self.tls_fail_if_no_peer_cert.or(file.tls_fail_if_no_peer_cert).unwrap_or(false),
            )?),
        };
        let alarm = self.alarm.resolve(file.memory_high_watermark, file.memory_high_watermark_bytes, file.disk_free_limit)?;
        let front = Frontend {
            amqp: self.amqp.or(file.amqp).unwrap_or_else(|| "0.0.0.0:5672".into()),
            stomp: self.stomp.or(file.stomp).unwrap_or_else(|| "0.0.0.0:61613".into()),
            web_stomp: self.web_stomp.or(file.web_stomp).unwrap_or_else(|| "0.0.0.0:15674".into()),
            amqps,
            stomps,
            web_stomps,
            tls,
            metrics: self.metrics.or(file.metrics).unwrap_or_else(|| "0.0.0.0:15692".into()),
            admin: self.admin.or(file.admin).unwrap_or_else(|| "127.0.0.1:15672".into()),
            limits: Limits {
                channel_max: self.channel_max.or(file.channel_max).unwrap_or(2047),
                frame_max,
                heartbeat: self.heartbeat.or(file.heartbeat).unwrap_or(60),
                max_message_size: self.max_message_size.or(file.max_message_size).unwrap_or(128 * 1024 * 1024),
                consumer_timeout_ms: match self.consumer_timeout.or(file.consumer_timeout).unwrap_or(1_800_000) {
                    0 => None,
                    ms => Some(ms),
                },
                alarm,
                max_connections: self.max_connections.or(file.max_connections),
                consumer_max_per_channel: self.consumer_max_per_channel.or(file.consumer_max_per_channel),
            },
            users,
            loopback_users,
        };
        let tls_addrs = [("amqps", &front.amqps), ("stomps", &front.stomps), ("web_stomps", &front.web_stomps)];
        let tls_addrs = tls_addrs.into_iter().filter_map(|(what, addr)| addr.as_ref().map(|a| (what, a)));
        let plain = [("amqp", &front.amqp), ("stomp", &front.stomp), ("web_stomp", &front.web_stomp), ("metrics", &front.metrics), ("admin", &front.admin)];
        for (what, addr) in plain.into_iter().chain(tls_addrs) {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                anyhow::bail!("{what} address '{addr}' is not HOST:PORT (for example 127.0.0.1:5672)");
            }
        }
        Ok(front)
    }
}

/// The resource alarm flags, shared by `serve`, `gateway` and `node`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct AlarmArgs {
    /// Memory alarm threshold as a fraction of the machine's RAM (default 0.4,
    /// RabbitMQ's vm_memory_high_watermark; 0 blocks every publisher). Above it
    /// publishers are blocked (on every gateway, for a node's alarm) until memory use drops.
    #[arg(long, env = "SLUICE_MEMORY_HIGH_WATERMARK")]
    pub memory_high_watermark: Option<f64>,
    /// Memory alarm threshold in bytes of resident memory (overrides --memory-high-watermark).
    #[arg(long, env = "SLUICE_MEMORY_HIGH_WATERMARK_BYTES")]
    pub memory_high_watermark_bytes: Option<u64>,
    /// Disk alarm threshold: free bytes on the data directory's file system below
    /// which publishers are blocked (default 50000000, RabbitMQ's disk_free_limit).
    #[arg(long, env = "SLUICE_DISK_FREE_LIMIT")]
    pub disk_free_limit: Option<u64>,
}

impl AlarmArgs {
    /// Flags/env over the file's keys, validated.
    fn resolve(self, fraction: Option<f64>, bytes: Option<u64>, disk_free_limit: Option<u64>) -> anyhow::Result<AlarmLimits> {
        alarm_limits(
            self.memory_high_watermark.or(fraction),
            self.memory_high_watermark_bytes.or(bytes),
            self.disk_free_limit.or(disk_free_limit),
        )
    }
}

/// The alarm limits from the (merged) keys `memory_high_watermark`,
/// `memory_high_watermark_bytes` (wins) and `disk_free_limit`.
fn alarm_limits(fraction: Option<f64>, bytes: Option<u64>, disk_free_limit: Option<u64>) -> anyhow::Result<AlarmLimits> {
    let memory = match (bytes, fraction) {
        (Some(bytes), _) => MemoryWatermark::Bytes(bytes),
        (None, Some(f)) if (0.0..=1.0).contains(&f) => MemoryWatermark::Fraction(f),
        (None, Some(f)) => anyhow::bail!(
            "memory_high_watermark must be a fraction of RAM from 0 to 1 (got {f}); give memory_high_watermark_bytes for an absolute limit"
        ),
        (None, None) => MemoryWatermark::Fraction(crate::alarm::DEFAULT_MEMORY_FRACTION),
    };
    Ok(AlarmLimits { memory, disk_free_limit: disk_free_limit.unwrap_or(crate::alarm::DEFAULT_DISK_FREE_LIMIT) })
}

/// The client listeners' TLS configuration (RabbitMQ's `ssl_options`):
/// certificate chain and key, and which client certificates to ask for.
/// `listener` names the TLS listener that needs it, for the errors.
fn tls_config(
    listener: &str,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
    verify_peer: bool,
    fail_if_no_peer_cert: bool,
) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let missing = |key: &str, what: &str| {
        let flag = key.replace('_', "-");
        let env = key.to_uppercase();
        anyhow::anyhow!("the {listener} listener needs {key} (--{flag}, SLUICE_{env} or `{key}` in the config file): {what}")
    };
    let cert = cert.ok_or_else(|| missing("tls_cert", "the server certificate chain, a PEM file"))?;
    let key = key.ok_or_else(|| missing("tls_key", "the server's private key, a PEM file"))?;
    let client_auth = if verify_peer || fail_if_no_peer_cert {
        let which = if verify_peer { "tls_verify_peer" } else { "tls_fail_if_no_peer_cert" };
        let Some(ca) = ca else {
            anyhow::bail!("{which} needs tls_ca (--tls-ca, SLUICE_TLS_CA or `tls_ca` in the config file): the CA certificates, a PEM file, that client certificates must chain to");
        };
        ClientAuth::Verify { ca, ca_key: "tls_ca", required: fail_if_no_peer_cert }
    } else {
        ClientAuth::None
    };
    Ok(sluice_cluster::tls::server_config(("tls_cert", &cert), ("tls_key", &key), &client_auth)?)
}

/// The node protocol's TLS from its three settings (all or none).
fn node_tls(cert: Option<PathBuf>, key: Option<PathBuf>, ca: Option<PathBuf>) -> anyhow::Result<Option<NodeTls>> {
    let files = match (cert, key, ca) {
        (None, None, None) => return Ok(None),
        (Some(cert), Some(key), Some(ca)) => NodeTlsFiles { cert, key, ca },
        (cert, key, ca) => {
            let missing: Vec<&str> = [("cluster_tls_cert", cert.is_none()), ("cluster_tls_key", key.is_none()), ("cluster_tls_ca", ca.is_none())]
                .into_iter()
                .filter_map(|(k, m)| m.then_some(k))
                .collect();
            anyhow::bail!(
                "node protocol TLS needs cluster_tls_cert, cluster_tls_key and cluster_tls_ca together; missing {} (flags --cluster-tls-*, SLUICE_CLUSTER_TLS_*)",
                missing.join(", ")
            );
        }
    };
    Ok(Some(NodeTls::load(&files)?))
}

/// The cluster secret, with the node protocol's TLS when configured.
pub fn cluster_credentials(secret_file: Option<&Path>, tls: Option<&NodeTls>) -> anyhow::Result<sluice_cluster::rpc::Secret> {
    let secret = sluice_cluster::rpc::Secret::load_or_create(secret_file).context("cluster secret")?;
    Ok(match tls {
        Some(tls) => secret.with_tls(tls.clone()),
        None => secret,
    })
}

/// `--cluster-tls-*` flags of `sluice node`, `sluice gateway` and `sluice ctl`.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ClusterTlsArgs {
    /// This process's certificate for the node protocol, PEM (with --cluster-tls-key and --cluster-tls-ca: node protocol over mutual TLS).
    #[arg(long, env = "SLUICE_CLUSTER_TLS_CERT")]
    pub cluster_tls_cert: Option<PathBuf>,
    /// Private key of --cluster-tls-cert, PEM.
    #[arg(long, env = "SLUICE_CLUSTER_TLS_KEY")]
    pub cluster_tls_key: Option<PathBuf>,
    /// The cluster CA, PEM: every node's and gateway's certificate must chain to it.
    #[arg(long, env = "SLUICE_CLUSTER_TLS_CA")]
    pub cluster_tls_ca: Option<PathBuf>,
}

/// The validated configuration of `sluice serve`.
#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub front: Frontend,
    pub body_cache_bytes: u64,
    pub fsync: bool,
    pub log: Logging,
}

/// Values given on the command line or in the environment.
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ServeArgs {
    /// Directory for messages and definitions.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// TOML configuration file with the same keys.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    /// RAM per queue for recent message bodies (default 16 MiB); older ones are read back from disk.
    #[arg(long, env = "SLUICE_BODY_CACHE_BYTES")]
    pub body_cache_bytes: Option<u64>,
    /// fsync before confirming persistent messages (default true; false loses data on power failure).
    #[arg(long, env = "SLUICE_FSYNC")]
    pub fsync: Option<bool>,
    #[command(flatten)]
    pub log: LogArgs,
}

impl ServeArgs {
    /// Merges flags/env over the file over the defaults and validates.
    pub fn resolve(self) -> anyhow::Result<Config> {
        let file: FileConfig = load_file(self.config.as_deref())?;
        let log = self.log.resolve(file.log_level, file.log_format)?;
        let front = self.client.resolve(client_file!(file))?;
        Ok(Config {
            log,
            data_dir: self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from("sluice-data")),
            front,
            body_cache_bytes: self.body_cache_bytes.or(file.body_cache_bytes).unwrap_or(16 * 1024 * 1024),
            fsync: self.fsync.or(file.fsync).unwrap_or(true),
        })
    }
}

/// Reads a TOML config file (none: every key unset). Errors name the file,
/// the line and the key.
fn load_file<T: serde::de::DeserializeOwned + Default>(path: Option<&Path>) -> anyhow::Result<T> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config file {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config file {}: {}", path.display(), toml_error(&text, &e)))
}

/// One line for a TOML error: `line N, key `K`: MESSAGE` (toml's own
/// Display spans several lines with the source excerpt). The key is the one
/// on the error's line, with the table it is in (`users.alice`).
fn toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim().replace('\n', " ");
    let Some(start) = e.span().map(|s| s.start) else { return message };
    let before = text.get(..start).unwrap_or(text);
    let line_no = before.matches('\n').count() + 1;
    let mut table = String::new();
    for line in text.lines().take(line_no - 1) {
        let line = line.trim();
        if line.starts_with('[') {
            table = line.trim_matches(|c| c == '[' || c == ']').trim().to_string();
        }
    }
    let line = text.lines().nth(line_no - 1).unwrap_or("").trim();
    let key = match line.split_once('=') {
        Some((key, _)) if !line.starts_with('[') => key.trim().trim_matches('"').to_string(),
        _ if line.starts_with('[') => line.trim_matches(|c| c == '[' || c == ']').trim().to_string(),
        _ => String::new(),
    };
    let key = match (table.is_empty() || line.starts_with('['), key.is_empty()) {
        (_, true) => return format!("line {line_no}: {message}"),
        (true, false) => key,
        (false, false) => format!("{table}.{key}"),
    };
    format!("line {line_no}, key `{key}`: {message}")
}

/// `sluice node` in a TOML file (every key optional; unknown keys are an error).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    pub id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub advertise: Option<String>,
    pub heartbeat_ms: Option<u64>,
    pub failure_timeout_ms: Option<u64>,
    pub seeds: Option<Vec<String>>,
    pub cluster_secret_file: Option<PathBuf>,
    pub cluster_tls_cert: Option<PathBuf>,
    pub cluster_tls_key: Option<PathBuf>,
    pub cluster_tls_ca: Option<PathBuf>,
    pub metrics: Option<String>,
    pub memory_high_watermark: Option<f64>,
    pub memory_high_watermark_bytes: Option<u64>,
    pub disk_free_limit: Option<u64>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// `sluice node` flags (each also `SLUICE_*` in the environment).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's identity in the cluster (stable across restarts).
    #[arg(long, env = "SLUICE_ID")]
    pub id: Option<String>,
    /// Directory for this node's data.
    #[arg(long, env = "SLUICE_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Node protocol listener (default 0.0.0.0:25680, chosen not to collide with RabbitMQ's 25672 inter-node port so both can run on one machine; port 0 picks a free port).
    #[arg(long, env = "SLUICE_LISTEN")]
    pub listen: Option<String>,
    /// Address other nodes should use for this one (default: the listen address).
    #[arg(long, env = "SLUICE_ADVERTISE")]
    pub advertise: Option<String>,
    /// Other nodes, HOST:PORT, comma separated.
    #[arg(long, env = "SLUICE_SEEDS", value_delimiter = ',')]
    pub seeds: Option<Vec<String>>,
    /// Heartbeat interval between members in milliseconds (default 100).
    #[arg(long, env = "SLUICE_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,
    /// Silence after which a member is down, in milliseconds (default 500).
    #[arg(long, env = "SLUICE_FAILURE_TIMEOUT_MS")]
    pub failure_timeout_ms: Option<u64>,
    /// The shared cluster secret (default: ~/.config/sluice/cluster-secret, created on first start).
    #[arg(long, env = "SLUICE_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
    /// Prometheus metrics address, GET /metrics (off unless given, so that several nodes can share a machine; port 0 picks a free port).
    #[arg(long, env = "SLUICE_METRICS")]
    pub metrics: Option<String>,
    #[command(flatten)]
    pub alarm: AlarmArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// TOML configuration file with the same keys.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The validated configuration of `sluice node`.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: String,
    pub data_dir: PathBuf,
    pub listen: String,
    pub advertise: Option<String>,
    pub heartbeat_ms: u64,
    pub failure_timeout_ms: u64,
    pub seeds: Vec<String>,
    pub cluster_secret_file: Option<PathBuf>,
    /// The node protocol's TLS, when configured.
    pub cluster_tls: Option<NodeTls>,
    /// The metrics listener, when configured.
    pub metrics: Option<String>,
    /// Memory and free-disk alarm thresholds.
    pub alarm: AlarmLimits,
    pub log: Logging,
}

impl NodeArgs {
    pub fn resolve(self) -> anyhow::Result<NodeConfig> {
        let file: NodeFile = load_file(self.config.as_deref())?;
        let log = self.log.resolve(file.log_level, file.log_format)?;
        let Some(id) = self.id.or(file.id) else {
            anyhow::bail!("a node needs an identity: give --id (or SLUICE_ID, or `id` in the config file)");
        };
        if id.is_empty() || id.len() > 255 {
            anyhow::bail!("id must be 1 to 255 bytes long (a node's identity)");
        }
        let config = NodeConfig {
            log,
            data_dir: self.data_dir.or(file.data_dir).unwrap_or_else(|| PathBuf::from(format!("sluice-node-{id}"))),
            listen: self.listen.or(file.listen).unwrap_or_else(|| "0.0.0.0:25680".into()),
            advertise: self.advertise.or(file.advertise),
            heartbeat_ms: self.heartbeat_ms.or(file.heartbeat_ms).unwrap_or(100),
            failure_timeout_ms: self.failure_timeout_ms.or(file.failure_timeout_ms).unwrap_or(500),
            seeds: self.seeds.or(file.seeds).unwrap_or_default(),
            cluster_secret_file: self.cluster_secret_file.or(file.cluster_secret_file),
            metrics: self.metrics.or(file.metrics),
            cluster_tls: node_tls(
                self.cluster_tls.cluster_tls_cert.or(file.cluster_tls_cert),
                self.cluster_tls.cluster_tls_key.or(file.cluster_tls_key),
                self.cluster_tls.cluster_tls_ca.or(file.cluster_tls_ca),
            )?,
            alarm: self.alarm.resolve(file.memory_high_watermark, file.memory_high_watermark_bytes, file.disk_free_limit)?,
            id,
        };
        if config.heartbeat_ms == 0 || config.failure_timeout_ms <= config.heartbeat_ms {
            anyhow::bail!(
                "failure_timeout_ms ({}) must be longer than heartbeat_ms ({}), which must be above 0",
                config.failure_timeout_ms,
                config.heartbeat_ms
            );
        }
        let addrs = std::iter::once(("listen", &config.listen))
            .chain(config.seeds.iter().map(|a| ("seeds", a)))
            .chain(config.advertise.iter().map(|a| ("advertise", a)));
        for (key, addr) in addrs {
            if addr.parse::<std::net::SocketAddr>().is_err() && !addr.contains(':') {
                anyhow::bail!("{key} address '{addr}' is not HOST:PORT");
            }
        }
        if let Some(addr) = &config.metrics {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                anyhow::bail!("metrics address '{addr}' is not HOST:PORT (for example 127.0.0.1:15692)");
            }
        }
        Ok(config)
    }
}

/// `sluice ctl` in a TOML file (every key optional; unknown keys are an error).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CtlFile {
    pub node: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    pub cluster_tls_cert: Option<PathBuf>,
    pub cluster_tls_key: Option<PathBuf>,
    pub cluster_tls_ca: Option<PathBuf>,
    pub admin_url: Option<String>,
    pub admin_user: Option<String>,
    pub admin_password: Option<String>,
}

/// `sluice ctl` flags shared by its commands (each also `SLUICE_*` in the
/// environment and a key of the file given with `--config`).
#[derive(Debug, Clone, clap::Args)]
pub struct CtlArgs {
    /// A node of the cluster, HOST:PORT (default 127.0.0.1:25680).
    #[arg(long, env = "SLUICE_NODE")]
    pub node: Option<String>,
    /// The shared cluster secret (default: ~/.config/sluice/cluster-secret).
    #[arg(long, env = "SLUICE_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
    /// The admin HTTP API of a gateway or `sluice serve` (their `--admin`),
    /// for the definition and user commands (default http://127.0.0.1:15672).
    #[arg(long, visible_alias = "admin", env = "SLUICE_ADMIN_URL")]
    pub admin_url: Option<String>,
    /// User for the admin API (tag administrator to change anything; default guest).
    #[arg(long, visible_alias = "user", env = "SLUICE_ADMIN_USER")]
    pub admin_user: Option<String>,
    /// Its password (default guest).
    #[arg(long, visible_alias = "password", env = "SLUICE_ADMIN_PASSWORD")]
    pub admin_password: Option<String>,
    /// TOML configuration file with the same keys.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// The resolved settings of `sluice ctl`.
#[derive(Debug, Clone)]
pub struct CtlConfig {
    pub node: String,
    pub cluster_secret_file: Option<PathBuf>,
    /// Loaded only by the commands that talk to a node.
    pub cluster_tls: ClusterTlsArgs,
    pub admin: String,
    pub user: String,
    pub password: String,
    pub command: CtlCommand,
}

impl CtlArgs {
    /// Flags/env over the file over the defaults.
    pub fn resolve(self) -> anyhow::Result<CtlConfig> {
        let file: CtlFile = load_file(self.config.as_deref())?;
        let node = self.node.or(file.node).unwrap_or_else(|| "127.0.0.1:25680".into());
        if !node.contains(':') {
            anyhow::bail!("node address '{node}' is not HOST:PORT");
        }
        Ok(CtlConfig {
            node,
            cluster_secret_file: self.cluster_secret_file.or(file.cluster_secret_file),
            cluster_tls: ClusterTlsArgs {
                cluster_tls_cert: self.cluster_tls.cluster_tls_cert.or(file.cluster_tls_cert),
                cluster_tls_key: self.cluster_tls.cluster_tls_key.or(file.cluster_tls_key),
                cluster_tls_ca: self.cluster_tls.cluster_tls_ca.or(file.cluster_tls_ca),
            },
            admin: self.admin_url.or(file.admin_url).unwrap_or_else(|| "http://127.0.0.1:15672".into()),
            user: self.admin_user.or(file.admin_user).unwrap_or_else(|| "guest".into()),
            password: self.admin_password.or(file.admin_password).unwrap_or_else(|| "guest".into()),
            command: self.command,
        })
    }
}

/// What `sluice ctl` can do: cluster commands talk to a node (`--node`),
/// definition and user commands to a gateway's admin API (`--admin`).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum CtlCommand {
    /// Show a node's identity and version.
    Status,
    /// Show the member table as that node sees it: id, address, up/down,
    /// when it last heard from each member.
    Members,
    /// Show every queue's replicas: leader, voters and learners (asks
    /// every node that node knows).
    Queues,
    /// Remove a node from the cluster: its queue replicas are recreated on
    /// the other nodes; waits until it hosts none, then says it can be
    /// stopped.
    Decommission {
        /// The id of the node to remove (`sluice node --id`).
        node_id: String,
        /// Give up waiting after this many seconds.
        #[arg(long, default_value_t = 300)]
        timeout_secs: u64,
    },
    /// List queues: name, vhost, ready messages, consumers, durable.
    ListQueues {
        #[arg(long, short = 'p')]
        vhost: Option<String>,
    },
    /// List exchanges: name, vhost, type, durable.
    ListExchanges {
        #[arg(long, short = 'p')]
        vhost: Option<String>,
    },
    /// List bindings: source, vhost, destination, type, routing key.
    ListBindings {
        #[arg(long, short = 'p')]
        vhost: Option<String>,
    },
    /// Declare a queue (durable unless --transient).
    DeclareQueue {
        name: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
        #[arg(long)]
        transient: bool,
        #[arg(long)]
        auto_delete: bool,
        /// x-arguments as a JSON object, e.g. '{"x-max-length": 10}'.
        #[arg(long)]
        arguments: Option<String>,
    },
    /// Delete a queue and its messages.
    DeleteQueue {
        name: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// Drop a queue's ready messages.
    PurgeQueue {
        name: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// Declare an exchange (durable unless --transient).
    DeclareExchange {
        name: String,
        /// direct, fanout, topic, headers or x-delayed-message.
        kind: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
        #[arg(long)]
        transient: bool,
        #[arg(long)]
        arguments: Option<String>,
    },
    /// Delete an exchange.
    DeleteExchange {
        name: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// Bind a queue (or, with --to-exchange, an exchange) to an exchange.
    Bind {
        source: String,
        destination: String,
        #[arg(long, default_value = "")]
        routing_key: String,
        #[arg(long)]
        to_exchange: bool,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// Remove a binding made without arguments.
    Unbind {
        source: String,
        destination: String,
        #[arg(long, default_value = "")]
        routing_key: String,
        #[arg(long)]
        to_exchange: bool,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// List users and their tags.
    ListUsers,
    /// Create a user (or set its password), with tags.
    AddUser {
        name: String,
        password: String,
        /// administrator, monitoring, management, ... (repeatable).
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Delete a user and its permissions.
    DeleteUser { name: String },
    /// Set a user's tags (none: no tags).
    SetUserTags { name: String, tags: Vec<String> },
    /// List vhosts.
    ListVhosts,
    /// Create a vhost.
    AddVhost { name: String },
    /// Delete a vhost with everything in it.
    DeleteVhost { name: String },
    /// List permissions: vhost, user, configure, write, read.
    ListPermissions,
    /// Set a user's permissions in a vhost (regular expressions).
    SetPermissions {
        user: String,
        configure: String,
        write: String,
        read: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// Remove a user's permissions in a vhost.
    ClearPermissions {
        user: String,
        #[arg(long, short = 'p', default_value = "/")]
        vhost: String,
    },
    /// Write all definitions (RabbitMQ's JSON format) to FILE (`-`: stdout).
    ExportDefinitions { file: String },
    /// Load definitions (RabbitMQ's JSON format, e.g. exported from
    /// RabbitMQ) from FILE (`-`: stdin).
    ImportDefinitions { file: String },
}

/// `sluice gateway` in a TOML file (every key optional; unknown keys are an error).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub id: Option<String>,
    pub nodes: Option<Vec<String>>,
    pub amqp: Option<String>,
    pub stomp: Option<String>,
    pub web_stomp: Option<String>,
    pub amqps: Option<String>,
    pub stomps: Option<String>,
    pub web_stomps: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_ca: Option<PathBuf>,
    pub tls_verify_peer: Option<bool>,
    pub tls_fail_if_no_peer_cert: Option<bool>,
    pub metrics: Option<String>,
    pub admin: Option<String>,
    pub cluster_secret_file: Option<PathBuf>,
    pub cluster_tls_cert: Option<PathBuf>,
    pub cluster_tls_key: Option<PathBuf>,
    pub cluster_tls_ca: Option<PathBuf>,
    pub channel_max: Option<u16>,
    pub frame_max: Option<u32>,
    pub heartbeat: Option<u16>,
    pub max_message_size: Option<u64>,
    pub consumer_timeout: Option<u64>,
    pub memory_high_watermark: Option<f64>,
    pub memory_high_watermark_bytes: Option<u64>,
    pub disk_free_limit: Option<u64>,
    pub max_connections: Option<u64>,
    pub consumer_max_per_channel: Option<u32>,
    pub users: Option<HashMap<String, String>>,
    pub loopback_users: Option<Vec<String>>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
}

/// `sluice gateway` flags (each also `SLUICE_*` in the environment).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct GatewayArgs {
    /// Storage nodes to start from, HOST:PORT, comma separated (the others are learned from them).
    #[arg(long, env = "SLUICE_NODES", value_delimiter = ',')]
    pub nodes: Option<Vec<String>>,
    #[command(flatten)]
    pub client: ClientArgs,
    /// This gateway's name in logs and in the cluster (default gateway-PID); a per-start incarnation is added.
    #[arg(long, env = "SLUICE_ID")]
    pub id: Option<String>,
    /// The shared cluster secret (default: ~/.config/sluice/cluster-secret, created on first start).
    #[arg(long, env = "SLUICE_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    #[command(flatten)]
    pub cluster_tls: ClusterTlsArgs,
    #[command(flatten)]
    pub log: LogArgs,
    /// TOML configuration file with the same keys.
    #[arg(long, env = "SLUICE_CONFIG")]
    pub config: Option<PathBuf>,
}

/// The validated configuration of `sluice gateway`.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub id: String,
    pub nodes: Vec<String>,
    pub front: Frontend,
    pub cluster_secret_file: Option<PathBuf>,
    /// The node protocol's TLS, when configured.
    pub cluster_tls: Option<NodeTls>,
    pub log: Logging,
}

impl GatewayArgs {
    pub fn resolve(self) -> anyhow::Result<GatewayConfig> {
        let file: GatewayFile = load_file(self.config.as_deref())?;
        let log = self.log.resolve(file.log_level, file.log_format)?;
        let nodes = self.nodes.or(file.nodes).unwrap_or_default();
        if nodes.is_empty() {
            anyhow::bail!("a gateway needs storage nodes: give --nodes HOST:PORT,... (or SLUICE_NODES, or `nodes` in the config file)");
        }
        let front = self.client.resolve(client_file!(file))?;
        let config = GatewayConfig {
            log,
            id: self.id.or(file.id).unwrap_or_else(|| format!("gateway-{}", std::process::id())),
            nodes,
            front,
            cluster_secret_file: self.cluster_secret_file.or(file.cluster_secret_file),
            cluster_tls: node_tls(
                self.cluster_tls.cluster_tls_cert.or(file.cluster_tls_cert),
                self.cluster_tls.cluster_tls_key.or(file.cluster_tls_key),
                self.cluster_tls.cluster_tls_ca.or(file.cluster_tls_ca),
            )?,
        };
        for addr in &config.nodes {
            if !addr.contains(':') {
                anyhow::bail!("nodes address '{addr}' is not HOST:PORT");
            }
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    //! Every key of every config file is a flag and a `SLUICE_*` variable
    //! too, and docs/configuration.md has a row for it: adding a key
    //! without its flag or its documentation fails here.

    use super::*;
    use clap::Args;

    /// The error of [`Probe`]: the field names serde asked for.
    #[derive(Debug)]
    struct Fields(&'static [&'static str]);

    impl std::fmt::Display for Fields {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{:?}", self.0)
        }
    }

    impl std::error::Error for Fields {}

    impl serde::de::Error for Fields {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Fields(&[])
        }
    }

    /// A deserializer that only records the field list a derived
    /// `Deserialize` passes to `deserialize_struct`: the keys the TOML file
    /// may hold.
    struct Probe;

    impl<'de> serde::Deserializer<'de> for Probe {
        type Error = Fields;

        fn deserialize_any<V: serde::de::Visitor<'de>>(self, _: V) -> Result<V::Value, Fields> {
            Err(Fields(&[]))
        }

        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _visitor: V,
        ) -> Result<V::Value, Fields> {
            Err(Fields(fields))
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
            bytes byte_buf option unit unit_struct newtype_struct seq tuple
            tuple_struct map enum identifier ignored_any
        }
    }

    fn file_keys<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
        match T::deserialize(Probe) {
            Err(Fields(fields)) => fields.to_vec(),
            Ok(_) => Vec::new(),
        }
    }

    /// The environment variable of a key.
    fn env_of(key: &str) -> String {
        match key {
            "log_level" => "SLUICE_LOG".into(),
            _ => format!("SLUICE_{}", key.to_uppercase()),
        }
    }

    /// Keys that are only in the file (a TOML table has no flag form).
    const FILE_ONLY: [&str; 1] = ["users"];

    fn roles() -> Vec<(&'static str, Vec<&'static str>, clap::Command)> {
        vec![
            ("serve", file_keys::<FileConfig>(), ServeArgs::augment_args(clap::Command::new("serve"))),
            ("gateway", file_keys::<GatewayFile>(), GatewayArgs::augment_args(clap::Command::new("gateway"))),
            ("node", file_keys::<NodeFile>(), NodeArgs::augment_args(clap::Command::new("node"))),
            ("ctl", file_keys::<CtlFile>(), CtlArgs::augment_args(clap::Command::new("ctl"))),
        ]
    }

    #[test]
    fn probe_sees_the_file_keys() {
        let keys = file_keys::<NodeFile>();
        assert!(keys.contains(&"heartbeat_ms") && keys.contains(&"log_format"), "{keys:?}");
    }

    #[test]
    fn every_file_key_is_a_flag_and_an_env_var_and_back() {
        for (role, keys, cmd) in roles() {
            assert!(keys.len() > 5, "{role}: {keys:?}");
            for key in keys.iter().filter(|k| !FILE_ONLY.contains(k)) {
                let arg = cmd.get_arguments().find(|a| a.get_id().as_str() == *key);
                let Some(arg) = arg else { panic!("sluice {role}: file key `{key}` has no flag") };
                assert_eq!(arg.get_long(), Some(key.replace('_', "-").as_str()), "sluice {role} {key}");
                assert_eq!(arg.get_env().and_then(|e| e.to_str()), Some(env_of(key).as_str()), "sluice {role} {key}");
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                assert!(id == "config" || keys.contains(&id), "sluice {role}: flag --{id} has no file key");
            }
        }
    }

    /// The sections of docs/configuration.md by their `## ` heading.
    fn doc_sections() -> Vec<(&'static str, &'static str)> {
        let doc = include_str!("../../docs/configuration.md");
        let mut sections = Vec::new();
        let mut starts: Vec<usize> = doc.match_indices("\n## ").map(|(i, _)| i + 1).collect();
        starts.push(doc.len());
        for pair in starts.windows(2) {
            let text = &doc[pair[0]..pair[1]];
            let heading = text.lines().next().unwrap_or("").trim_start_matches("## ").trim();
            sections.push((heading, text));
        }
        sections
    }

    fn section(heading: &str) -> &'static str {
        match doc_sections().into_iter().find(|(h, _)| *h == heading) {
            Some((_, text)) => text,
            None => panic!("docs/configuration.md has no section `## {heading}`"),
        }
    }

    const CLIENT: &str = "Client keys: `sluice serve` and `sluice gateway`";
    const LOGGING: &str = "Logging: `sluice serve`, `sluice gateway`, `sluice node`";

    #[test]
    fn docs_have_a_row_for_every_key_with_its_flag_and_env_var() {
        for (role, keys, cmd) in roles() {
            let own = format!("`sluice {role}`");
            let mut places = vec![section(&own)];
            if role != "ctl" {
                places.push(section(LOGGING));
            }
            if role == "serve" || role == "gateway" {
                places.push(section(CLIENT));
            }
            for key in keys.iter().copied().chain(["config"]) {
                let start = format!("| `{key}` |");
                let row = places.iter().flat_map(|s| s.lines()).find(|l| l.starts_with(&start));
                let Some(row) = row else { panic!("docs/configuration.md: no row `{start}` for sluice {role}") };
                if FILE_ONLY.contains(&key) {
                    continue;
                }
                let arg = cmd.get_arguments().find(|a| a.get_id().as_str() == key);
                let Some(arg) = arg else { panic!("sluice {role}: no flag for {key}") };
                let flag = format!("`--{}", arg.get_long().unwrap_or_default());
                let env = format!("`{}`", arg.get_env().and_then(|e| e.to_str()).unwrap_or_default());
                assert!(row.contains(&flag) && row.contains(&env), "docs/configuration.md, sluice {role}: {row}\nneeds {flag} and {env}");
            }
        }
        // No row for a key that does not exist.
        let all: Vec<&str> = roles().into_iter().flat_map(|(_, keys, _)| keys).chain(["config"]).collect();
        for heading in ["`sluice serve`", "`sluice gateway`", "`sluice node`", "`sluice ctl`", CLIENT, LOGGING] {
            for row in section(heading).lines().filter(|l| l.starts_with("| `")) {
                let key = row.split('`').nth(1).unwrap_or("");
                assert!(all.contains(&key), "docs/configuration.md ({heading}) documents `{key}`, which no config file takes");
            }
        }
    }

    #[test]
    fn example_files_in_the_docs_are_valid() {
        let doc = include_str!("../../docs/configuration.md");
        let mut seen = Vec::new();
        for block in doc.split("```toml\n").skip(1) {
            let text = block.split("```").next().unwrap_or("");
            let first = text.lines().next().unwrap_or("");
            let result = if first.contains("`sluice serve") {
                toml::from_str::<FileConfig>(text).map(|_| "serve")
            } else if first.contains("`sluice gateway") {
                toml::from_str::<GatewayFile>(text).map(|_| "gateway")
            } else if first.contains("`sluice node") {
                toml::from_str::<NodeFile>(text).map(|_| "node")
            } else if first.contains("`sluice ctl") {
                toml::from_str::<CtlFile>(text).map(|_| "ctl")
            } else {
                panic!("a TOML example must start with a comment naming its role: {first}");
            };
            match result {
                Ok(role) => seen.push(role),
                Err(e) => panic!("docs/configuration.md example ({first}): {}", toml_error(text, &e)),
            }
        }
        assert_eq!(seen, ["serve", "gateway", "node", "ctl"]);
    }

    fn toml_message<T: serde::de::DeserializeOwned + std::fmt::Debug>(text: &str) -> String {
        match toml::from_str::<T>(text) {
            Ok(v) => panic!("{text} was accepted: {v:?}"),
            Err(e) => toml_error(text, &e),
        }
    }

    #[test]
    fn toml_errors_name_line_and_key() {
        let m = toml_message::<FileConfig>("amqp = \"127.0.0.1:0\"\nchannel_max = \"many\"\n");
        assert!(m.starts_with("line 2, key `channel_max`: "), "{m}");
        let m = toml_message::<FileConfig>("unknown_key = 1\n");
        assert!(m.starts_with("line 1, key `unknown_key`: unknown field"), "{m}");
        let m = toml_message::<FileConfig>("fsync = true\n[users]\nalice = 3\n");
        assert!(m.starts_with("line 3, key `users.alice`: "), "{m}");
        let m = toml_message::<NodeFile>("log_format = \"xml\"\n");
        assert!(m.starts_with("line 1, key `log_format`: ") && m.contains("json"), "{m}");
        assert!(!m.contains('\n'), "{m}");
    }

    #[test]
    fn log_level_must_be_a_level_or_directives() {
        for good in ["warn", "INFO", "off", "warn,sluice=debug", "sluice::server=trace"] {
            assert!(check_log_level(good).is_ok(), "{good}");
        }
        for bad in ["verbose", "warn,loud", "sluice=loud"] {
            let e = check_log_level(bad).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(e.starts_with("log_level"), "{bad}: {e}");
        }
    }
}
