//! Prometheus metrics (`--metrics`, `GET /metrics`), see docs/metrics.md.
//!
//! Hot paths only touch atomics: process-wide counters and gauges here,
//! per-queue counters in each queue handle's [`sluice_cluster::QueueMeter`].
//! A collector task copies them, and every queue's figures (ready,
//! unacknowledged, bytes, consumers), into the exporter every
//! [`COLLECT_EVERY`]. Series the collector stops refreshing (a deleted
//! queue's) are dropped by the exporter after [`IDLE_AFTER`]. Histograms
//! are recorded directly (one sample per confirm, per first delivery, per
//! group commit). Per-user and per-vhost usage is counted in per-connection
//! atomics ([`Usage`]) that the collector sums. A node's replication
//! figures come from [`spawn_node_collector`] (`sluice node`, `sluice
//! serve`).

use std::future::Future;
use std::net::SocketAddr;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use futures_util::future::join_all;
use metrics::{counter, gauge, histogram, Histogram};
use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_util::MetricKindMask;
use sluice_cluster::node::ReplicationFigures;
use sluice_cluster::{QueueMeter, QueueStats};

use crate::router::Router;

/// How often the collector refreshes the exporter.
pub const COLLECT_EVERY: Duration = Duration::from_secs(1);
/// Counters and gauges not refreshed for this long are removed.
pub const IDLE_AFTER: Duration = Duration::from_secs(4);

pub static CONNECTIONS: AtomicI64 = AtomicI64::new(0);
pub static CHANNELS: AtomicI64 = AtomicI64::new(0);
pub static CONSUMERS: AtomicI64 = AtomicI64::new(0);
pub static AUTH_FAILURES_AMQP: AtomicU64 = AtomicU64::new(0);
pub static AUTH_FAILURES_STOMP: AtomicU64 = AtomicU64::new(0);
pub static AUTH_FAILURES_HTTP: AtomicU64 = AtomicU64::new(0);
pub static CONNECTIONS_OPENED: AtomicU64 = AtomicU64::new(0);
/// 1 while the memory alarm is on (set by [`crate::alarm`]).
pub static ALARM_MEMORY: AtomicI64 = AtomicI64::new(0);
/// 1 while the free-disk alarm is on.
pub static ALARM_DISK: AtomicI64 = AtomicI64::new(0);
/// Connections not read because of a resource alarm.
pub static BLOCKED_CONNECTIONS: AtomicI64 = AtomicI64::new(0);

/// Connections not read because a queue they publish to lags (flow control).
pub static FLOW_CONNECTIONS: AtomicI64 = AtomicI64::new(0);
/// Times a connection started waiting for flow control.
pub static FLOW_PAUSES: AtomicU64 = AtomicU64::new(0);

/// Adds one to a gauge for as long as it lives.
#[derive(Debug)]
pub struct Tracked(&'static AtomicI64);

impl Tracked {
    pub fn new(gauge: &'static AtomicI64) -> Self {
        gauge.fetch_add(1, Relaxed);
        Tracked(gauge)
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Counts a connection for as long as `f` runs.
pub fn tracked<F: Future>(f: F) -> impl Future<Output = F::Output> {
    CONNECTIONS_OPENED.fetch_add(1, Relaxed);
    let guard = Tracked::new(&CONNECTIONS);
    async move {
        let _guard = guard;
        f.await
    }
}

/// Counts a refused login of `protocol` ("amqp", "stomp" or "http", the
/// admin API).
pub fn auth_failed(protocol: &str) {
    let c = match protocol {
        "amqp" => &AUTH_FAILURES_AMQP,
        "http" => &AUTH_FAILURES_HTTP,
        _ => &AUTH_FAILURES_STOMP,
    };
    c.fetch_add(1, Relaxed);
}

/// Publish-to-confirm latency (basic.publish read to basic.ack sent).
pub fn confirm_latency() -> &'static Histogram {
    static H: OnceLock<Histogram> = OnceLock::new();
    H.get_or_init(|| histogram!("sluice_publish_confirm_seconds"))
}

/// Records the time from `since` in the confirm-latency histogram.
pub fn record_confirm(since: Instant) {
    confirm_latency().record(since.elapsed().as_secs_f64());
}

/// Publish-to-deliver latency (the queue leader's enqueue stamp to the
/// delivery handed to the connection's writer).
pub fn deliver_latency() -> &'static Histogram {
    static H: OnceLock<Histogram> = OnceLock::new();
    H.get_or_init(|| histogram!("sluice_publish_deliver_seconds"))
}

/// Records a first delivery of a message the queue's leader stamped at
/// `enqueued_ms` (ms since the epoch, its wall clock; 0: unknown, not
/// recorded).
pub fn record_deliver(enqueued_ms: u64) {
    if enqueued_ms == 0 {
        return;
    }
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    // Another host's clock may be ahead: never negative.
    deliver_latency().record((now - enqueued_ms as f64 / 1000.0).max(0.0));
}

/// Counts of one connection: messages and body bytes published and
/// delivered. Bumped by the connection only (relaxed atomics, no lock).
#[derive(Debug, Default)]
struct UsageMeter {
    published: AtomicU64,
    published_bytes: AtomicU64,
    delivered: AtomicU64,
    delivered_bytes: AtomicU64,
}

impl UsageMeter {
    fn get(&self) -> [u64; 4] {
        [&self.published, &self.published_bytes, &self.delivered, &self.delivered_bytes].map(|c| c.load(Relaxed))
    }
}

/// Every live connection's meter with its user and vhost, and what closed
/// connections counted, per user and per vhost.
struct UsageRegistry {
    live: Vec<(String, String, Arc<UsageMeter>)>,
    closed_users: BTreeMap<String, [u64; 4]>,
    closed_vhosts: BTreeMap<String, [u64; 4]>,
}

static USAGE: Mutex<UsageRegistry> =
    Mutex::new(UsageRegistry { live: Vec::new(), closed_users: BTreeMap::new(), closed_vhosts: BTreeMap::new() });

fn usage_registry() -> std::sync::MutexGuard<'static, UsageRegistry> {
    USAGE.lock().unwrap_or_else(|p| p.into_inner())
}

fn add4(to: &mut [u64; 4], from: [u64; 4]) {
    for (t, f) in to.iter_mut().zip(from) {
        *t = t.saturating_add(f);
    }
}

/// A connection's usage counters, counted under its user and vhost while
/// it lives and kept in their totals once it is gone.
#[derive(Debug)]
pub struct Usage(Arc<UsageMeter>);

impl Usage {
    pub fn new(user: &str, vhost: &str) -> Usage {
        let meter = Arc::new(UsageMeter::default());
        usage_registry().live.push((user.to_owned(), vhost.to_owned(), meter.clone()));
        Usage(meter)
    }

    /// A message with `bytes` of body was published.
    pub fn published(&self, bytes: usize) {
        self.0.published.fetch_add(1, Relaxed);
        self.0.published_bytes.fetch_add(bytes as u64, Relaxed);
    }

    /// A message with `bytes` of body was delivered (consume or get).
    pub fn delivered(&self, bytes: usize) {
        self.0.delivered.fetch_add(1, Relaxed);
        self.0.delivered_bytes.fetch_add(bytes as u64, Relaxed);
    }
}

impl Drop for Usage {
    fn drop(&mut self) {
        let mut reg = usage_registry();
        let Some(i) = reg.live.iter().position(|(_, _, m)| Arc::ptr_eq(m, &self.0)) else { return };
        let (user, vhost, meter) = reg.live.swap_remove(i);
        let counts = meter.get();
        add4(reg.closed_users.entry(user).or_default(), counts);
        add4(reg.closed_vhosts.entry(vhost).or_default(), counts);
    }
}

/// Installs the exporter on `addr` (on the current tokio runtime) and
/// returns the bound address.
pub fn install(addr: &str) -> anyhow::Result<SocketAddr> {
    // Bound here, so port 0 works and a busy port is reported at start.
    let listener = std::net::TcpListener::bind(addr).with_context(|| format!("cannot listen on {addr} for metrics"))?;
    let bound = listener.local_addr()?;
    drop(listener);
    let latency = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 4096.0];
    PrometheusBuilder::new()
        .with_http_listener(bound)
        .set_buckets(&latency)
        .context("histogram buckets")?
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Full("sluice_storage_batch_writes".into()), &sizes)
        .context("histogram buckets")?
        .idle_timeout(MetricKindMask::COUNTER | MetricKindMask::GAUGE, Some(IDLE_AFTER))
        .install()
        .with_context(|| format!("cannot serve metrics on {bound}"))?;
    describe();
    Ok(bound)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!("sluice_connections", "Open client connections (AMQP, STOMP, Web-STOMP).");
    describe_counter!("sluice_connections_opened_total", "Client connections accepted.");
    describe_gauge!("sluice_channels", "Open AMQP channels (one per STOMP session too).");
    describe_gauge!("sluice_consumers", "Consumers on this gateway.");
    describe_counter!("sluice_auth_failures_total", "Refused logins, by protocol.");
    describe_gauge!("sluice_alarm", "1 while the resource alarm is on (resource=memory|disk), else 0.");
    describe_gauge!("sluice_blocked_connections", "Publishing connections not read because of a resource alarm.");
    describe_gauge!(
        "sluice_flow_connections",
        "Publishing connections not read because a queue they publish to is behind its consumers (flow control)."
    );
    describe_counter!("sluice_flow_pauses_total", "Times a publishing connection started waiting for flow control.");
    describe_gauge!("sluice_queues", "Queues known to this gateway.");
    describe_gauge!("sluice_queue_messages_ready", "Messages ready for delivery.");
    describe_gauge!("sluice_queue_messages_unacked", "Messages delivered and not yet acknowledged.");
    describe_gauge!("sluice_queue_messages", "Ready plus unacknowledged messages.");
    describe_gauge!("sluice_queue_messages_ready_bytes", Unit::Bytes, "Body bytes of the ready messages.");
    describe_gauge!("sluice_queue_consumers", "Consumers attached to the queue.");
    describe_counter!("sluice_queue_messages_published_total", "Messages enqueued through this gateway.");
    describe_counter!("sluice_queue_messages_delivered_total", "Messages delivered by this gateway (consume and get).");
    describe_counter!("sluice_queue_messages_redelivered_total", "Deliveries flagged redelivered.");
    describe_counter!("sluice_queue_messages_acked_total", "Deliveries acknowledged.");
    describe_histogram!("sluice_publish_confirm_seconds", Unit::Seconds, "Publish to publisher-confirm latency.");
    describe_histogram!("sluice_storage_fsync_seconds", Unit::Seconds, "Group commit with fdatasync.");
    describe_histogram!("sluice_storage_batch_writes", "Writes per storage group commit.");
    describe_counter!("sluice_metrics_collect_errors_total", "Queues whose figures could not be read.");
    describe_counter!("sluice_queue_messages_dead_lettered_total", "Messages dead-lettered out of the queue (by its leader).");
    describe_histogram!("sluice_publish_deliver_seconds", Unit::Seconds, "Enqueue at the queue leader to first delivery.");
    for who in ["user", "vhost"] {
        describe_counter!(format!("sluice_{who}_messages_published_total"), format!("Messages published, by {who}."));
        describe_counter!(format!("sluice_{who}_published_bytes_total"), Unit::Bytes, format!("Body bytes published, by {who}."));
        describe_counter!(format!("sluice_{who}_messages_delivered_total"), format!("Messages delivered, by {who}."));
        describe_counter!(format!("sluice_{who}_delivered_bytes_total"), Unit::Bytes, format!("Body bytes delivered, by {who}."));
    }
    describe_gauge!("sluice_queue_replicas", "Queue replicas hosted by this node, by role.");
    describe_gauge!("sluice_replication_lag_entries", "Most log entries a follower lacks, over the queues led here.");
    describe_gauge!("sluice_cluster_members", "Committed cluster members, by state as this node sees them.");
    describe_gauge!("sluice_meta_leader", "1 if this node leads the metadata group.");
    describe_counter!("sluice_raft_leader_changes_total", "Raft leader changes seen by the groups of this node.");
}

/// Copies this node's replication figures into the exporter every
/// [`COLLECT_EVERY`] while `figures` gives them (`None`: the node is
/// gone).
pub fn spawn_node_collector(figures: impl Fn() -> Option<ReplicationFigures> + Send + 'static) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(COLLECT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(f) = figures() else { return };
            gauge!("sluice_queue_replicas", "role" => "leader").set(f.leading as f64);
            gauge!("sluice_queue_replicas", "role" => "follower").set(f.following as f64);
            gauge!("sluice_replication_lag_entries").set(f.max_lag as f64);
            gauge!("sluice_cluster_members", "state" => "up").set(f.members_up as f64);
            gauge!("sluice_cluster_members", "state" => "down").set(f.members_down as f64);
            gauge!("sluice_meta_leader").set(if f.leads_meta { 1.0 } else { 0.0 });
            counter!("sluice_raft_leader_changes_total").absolute(sluice_cluster::consensus::LEADER_CHANGES.load(Relaxed));
        }
    });
}

/// Sums the usage meters per user and per vhost into the exporter.
fn collect_usage() {
    let (users, vhosts) = {
        let reg = usage_registry();
        let (mut users, mut vhosts) = (reg.closed_users.clone(), reg.closed_vhosts.clone());
        for (user, vhost, meter) in &reg.live {
            let counts = meter.get();
            add4(users.entry(user.clone()).or_default(), counts);
            add4(vhosts.entry(vhost.clone()).or_default(), counts);
        }
        (users, vhosts)
    };
    for (who, rows) in [("user", users), ("vhost", vhosts)] {
        for (name, [published, published_bytes, delivered, delivered_bytes]) in rows {
            let labels = [(who, name)];
            counter!(format!("sluice_{who}_messages_published_total"), &labels).absolute(published);
            counter!(format!("sluice_{who}_published_bytes_total"), &labels).absolute(published_bytes);
            counter!(format!("sluice_{who}_messages_delivered_total"), &labels).absolute(delivered);
            counter!(format!("sluice_{who}_delivered_bytes_total"), &labels).absolute(delivered_bytes);
        }
    }
}

/// Copies the counters and queue figures into the exporter until the
/// process ends.
pub fn spawn_collector(router: Arc<Router>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(COLLECT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            collect(&router).await;
        }
    });
}

async fn collect(router: &Router) {
    gauge!("sluice_connections").set(CONNECTIONS.load(Relaxed) as f64);
    counter!("sluice_connections_opened_total").absolute(CONNECTIONS_OPENED.load(Relaxed));
    gauge!("sluice_channels").set(CHANNELS.load(Relaxed) as f64);
    gauge!("sluice_consumers").set(CONSUMERS.load(Relaxed) as f64);
    counter!("sluice_auth_failures_total", "protocol" => "amqp").absolute(AUTH_FAILURES_AMQP.load(Relaxed));
    counter!("sluice_auth_failures_total", "protocol" => "stomp").absolute(AUTH_FAILURES_STOMP.load(Relaxed));
    counter!("sluice_auth_failures_total", "protocol" => "http").absolute(AUTH_FAILURES_HTTP.load(Relaxed));
    collect_usage();
    gauge!("sluice_alarm", "resource" => "memory").set(ALARM_MEMORY.load(Relaxed) as f64);
    gauge!("sluice_alarm", "resource" => "disk").set(ALARM_DISK.load(Relaxed) as f64);
    gauge!("sluice_blocked_connections").set(BLOCKED_CONNECTIONS.load(Relaxed) as f64);
    gauge!("sluice_flow_connections").set(FLOW_CONNECTIONS.load(Relaxed) as f64);
    counter!("sluice_flow_pauses_total").absolute(FLOW_PAUSES.load(Relaxed));
    let queues = router.queue_handles();
    gauge!("sluice_queues").set(queues.len() as f64);
    let figures = join_all(queues.iter().map(|(_, _, parts)| async move {
        let all = join_all(parts.iter().map(|p| tokio::time::timeout(COLLECT_EVERY, p.stats()))).await;
        let mut sum = QueueStats::default();
        let mut ok = true;
        for r in all {
            match r {
                Ok(Ok(s)) => {
                    sum.ready = sum.ready.saturating_add(s.ready);
                    sum.unacked = sum.unacked.saturating_add(s.unacked);
                    sum.consumers = sum.consumers.max(s.consumers);
                    sum.ready_bytes = sum.ready_bytes.saturating_add(s.ready_bytes);
                    sum.dead_lettered = sum.dead_lettered.saturating_add(s.dead_lettered);
                }
                _ => ok = false,
            }
        }
        ok.then_some(sum)
    }))
    .await;
    let mut errors = 0u64;
    for ((vhost, name, parts), stats) in queues.iter().zip(figures) {
        let labels = [("vhost", vhost.clone()), ("queue", name.clone())];
        match stats {
            Some(s) => {
                gauge!("sluice_queue_messages_ready", &labels).set(f64::from(s.ready));
                gauge!("sluice_queue_messages_unacked", &labels).set(f64::from(s.unacked));
                gauge!("sluice_queue_messages", &labels).set(f64::from(s.ready) + f64::from(s.unacked));
                gauge!("sluice_queue_messages_ready_bytes", &labels).set(s.ready_bytes as f64);
                gauge!("sluice_queue_consumers", &labels).set(f64::from(s.consumers));
                counter!("sluice_queue_messages_dead_lettered_total", &labels).absolute(s.dead_lettered);
            }
            // Unreachable leader: keep the last values rather than drop
            // the series (they expire if this lasts).
            None => errors += 1,
        }
        let sum = |f: fn(&QueueMeter) -> &AtomicU64| parts.iter().map(|p| QueueMeter::get(f(p.meter()))).sum::<u64>();
        counter!("sluice_queue_messages_published_total", &labels).absolute(sum(|m| &m.published));
        counter!("sluice_queue_messages_delivered_total", &labels).absolute(sum(|m| &m.delivered));
        counter!("sluice_queue_messages_redelivered_total", &labels).absolute(sum(|m| &m.redelivered));
        counter!("sluice_queue_messages_acked_total", &labels).absolute(sum(|m| &m.acked));
    }
    counter!("sluice_metrics_collect_errors_total").increment(errors);
}
