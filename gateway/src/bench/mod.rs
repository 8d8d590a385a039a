//! `sluice bench`: a load tool in the style of RabbitMQ's PerfTest, for any
//! AMQP 0-9-1 broker (RabbitMQ included).
//!
//! Producers and consumers each have their own connection. A producer
//! publishes to its queue (producer `i` to queue `i % queues`) or, with
//! `--fanout N`, to a fanout exchange bound to N queues; consumer `j`
//! consumes queue `j % queues`. Every body starts with the time it was
//! sent (nanoseconds since the run started), so consumers measure the
//! end-to-end latency; with `--confirm W` a producer keeps at most W
//! unconfirmed messages and measures publish-to-confirm latency. Latencies
//! go into HDR histograms; the report gives rates and p50/p95/p99/p99.9/max,
//! as text or `--json`.

mod amqp;
mod stomp;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use hdrhistogram::Histogram;
use sluice_codecs::amqp::{BasicProperties, FieldTable, FieldValue, Frame, Method};

use amqp::{Reader, Uri, Writer};

/// `sluice bench` flags.
#[derive(clap::Args, Clone, Debug)]
pub struct BenchArgs {
    /// The broker: amqp://user:password@host:port/vhost, or
    /// stomp://user:password@host:port/vhost for STOMP 1.2 (SEND and
    /// SUBSCRIBE on /queue/NAME, receipts as confirms).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// STOMP runs: an AMQP URI of the same broker to declare, purge and
    /// delete the queues with (then /amq/queue/NAME is used, and --fanout
    /// works through /exchange/NAME).
    #[arg(long)]
    pub manage_uri: Option<String>,
    /// Publishing connections.
    #[arg(short = 'x', long, default_value_t = 1)]
    pub producers: usize,
    /// Consuming connections.
    #[arg(short = 'y', long, default_value_t = 1)]
    pub consumers: usize,
    /// Queues (multi-queue mode when more than one).
    #[arg(long, default_value_t = 1)]
    pub queues: usize,
    /// Publish to a fanout exchange bound to this many queues instead.
    #[arg(long)]
    pub fanout: Option<usize>,
    /// Queue (and exchange) name prefix; the queues are purged first and
    /// deleted after, unless --keep.
    #[arg(long, default_value = "sluice-bench")]
    pub prefix: String,
    /// Keep the queues after the run.
    #[arg(long)]
    pub keep: bool,
    /// Message body size in bytes (at least 8 to measure latency).
    #[arg(short = 's', long, default_value_t = 1024)]
    pub size: usize,
    /// Publisher confirms with at most this many messages in flight per producer.
    #[arg(short = 'c', long)]
    pub confirm: Option<u32>,
    /// Persistent messages (delivery mode 2) on durable queues.
    #[arg(long)]
    pub persistent: bool,
    /// Consumer prefetch (basic.qos); 0 means unlimited.
    #[arg(short = 'q', long, default_value_t = 0)]
    pub prefetch: u16,
    /// Consume with auto-ack instead of manual acks.
    #[arg(short = 'a', long)]
    pub auto_ack: bool,
    /// Manual acks: acknowledge every this many deliveries with multiple=true.
    #[arg(long, default_value_t = 1)]
    pub multi_ack: u32,
    /// Fixed publishing rate per producer (messages/s); unlimited if not given.
    #[arg(short = 'r', long)]
    pub rate: Option<u64>,
    /// Publish for this many seconds (default 10 unless --count).
    #[arg(short = 'z', long)]
    pub duration: Option<f64>,
    /// Publish this many messages per producer; with --producers 0, the
    /// number of messages the consumers drain in total (a backlog filled
    /// by an earlier run with --keep).
    #[arg(short = 'C', long)]
    pub count: Option<u64>,
    /// Arguments for the queues' declare, as name=value (value as a string,
    /// or an integer): e.g. x-queue-type=quorum for RabbitMQ.
    #[arg(long = "queue-arg", value_name = "NAME=VALUE")]
    pub queue_args: Vec<String>,
    /// How long consumers may take to drain what was published, after the
    /// producers stopped.
    #[arg(long, default_value_t = 30.0)]
    pub drain_timeout: f64,
    /// Print the report as one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// Counters and histograms shared by the tasks.
struct Shared {
    start: Instant,
    stop: AtomicBool,
    /// Cancelled once the run is over: consumers send their last acks and
    /// close their connections (so nothing they consumed is requeued).
    finish: tokio_util::sync::CancellationToken,
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    consumed: AtomicU64,
    /// Published per queue (normal mode) or to the exchange (fan-out).
    per_target: Vec<AtomicU64>,
    confirm_latency: Mutex<Histogram<u64>>,
    e2e_latency: Mutex<Histogram<u64>>,
}

fn histogram() -> Result<Histogram<u64>> {
    // Microseconds, up to an hour, 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).map_err(|e| anyhow!("histogram: {e}"))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Shared {
    fn now_ns(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What a run measured.
#[derive(serde::Serialize, Debug)]
pub struct Report {
    pub uri: String,
    pub producers: usize,
    pub consumers: usize,
    pub queues: usize,
    pub size: usize,
    pub persistent: bool,
    pub confirm: Option<u32>,
    pub auto_ack: bool,
    pub prefetch: u16,
    pub rate: Option<u64>,
    /// Seconds the producers published.
    pub publish_secs: f64,
    /// Seconds from the start until the consumers stopped.
    pub consume_secs: f64,
    pub published: u64,
    pub confirmed: u64,
    pub nacked: u64,
    pub consumed: u64,
    /// Messages the consumers should have received (published × fan-out).
    pub expected: u64,
    pub publish_rate: f64,
    pub confirm_rate: f64,
    pub consume_rate: f64,
    /// Publish-to-confirm latency, microseconds.
    pub confirm_latency_us: Option<Percentiles>,
    /// Publish-to-deliver latency, microseconds.
    pub latency_us: Option<Percentiles>,
}

#[derive(serde::Serialize, Debug)]
pub struct Percentiles {
    pub p50: u64,
    pub p95: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

fn percentiles(h: &Histogram<u64>) -> Option<Percentiles> {
    (!h.is_empty()).then(|| Percentiles {
        p50: h.value_at_quantile(0.5),
        p95: h.value_at_quantile(0.95),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    })
}

fn parse_queue_args(args: &[String]) -> Result<FieldTable> {
    let mut table = Vec::new();
    for a in args {
        let (k, v) = a.split_once('=').ok_or_else(|| anyhow!("--queue-arg {a:?}: expected NAME=VALUE"))?;
        let value = match v.parse::<i64>() {
            Ok(n) => FieldValue::I64(n),
            Err(_) => FieldValue::LongString(bytes::Bytes::copy_from_slice(v.as_bytes())),
        };
        table.push((k.to_owned(), value));
    }
    Ok(FieldTable(table))
}

/// Runs `sluice bench`.
pub async fn run(args: BenchArgs) -> Result<()> {
    let report = measure(&args).await?;
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", text(&report));
    }
    if report.nacked > 0 || report.consumed < report.expected {
        bail!("{} nacked, {} of {} messages consumed", report.nacked, report.consumed, report.expected);
    }
    Ok(())
}

/// The run itself.
pub async fn measure(args: &BenchArgs) -> Result<Report> {
    if args.producers == 0 && args.consumers == 0 {
        bail!("nothing to do: --producers and --consumers are both 0");
    }
    if args.queues == 0 || args.fanout == Some(0) {
        bail!("--queues and --fanout must be at least 1");
    }
    let stomp = args.uri.starts_with("stomp://");
    let uri = if stomp { Uri::parse(&args.uri, "stomp", 61613)? } else { Uri::parse(&args.uri, "amqp", 5672)? };
    // Where the queues are declared, purged and deleted (over AMQP).
    let manage = match (&args.manage_uri, stomp) {
        (Some(m), _) => Some(Uri::parse(m, "amqp", 5672)?),
        (None, false) => Some(uri.clone()),
        (None, true) => None,
    };
    if stomp && args.fanout.is_some() && manage.is_none() {
        bail!("--fanout over STOMP needs --manage-uri (the exchange is declared over AMQP)");
    }
    let queue_args = parse_queue_args(&args.queue_args)?;
    let nqueues = args.fanout.unwrap_or(args.queues);
    let queues: Vec<String> = (0..nqueues).map(|i| format!("{}-{i}", args.prefix)).collect();
    let exchange = args.fanout.map(|_| format!("{}-fanout", args.prefix));
    // A drain-only run (no producers) keeps what the queues hold. STOMP's
    // /queue/ destinations are durable queues.
    if let Some(m) = &manage {
        setup(m, &queues, exchange.as_deref(), args.persistent || stomp, &queue_args, args.producers > 0).await?;
    }
    let stomp_dest = |q: &str| if manage.is_some() { format!("/amq/queue/{q}") } else { format!("/queue/{q}") };

    let shared = Arc::new(Shared {
        start: Instant::now(),
        stop: AtomicBool::new(false),
        finish: tokio_util::sync::CancellationToken::new(),
        published: AtomicU64::new(0),
        confirmed: AtomicU64::new(0),
        nacked: AtomicU64::new(0),
        consumed: AtomicU64::new(0),
        per_target: (0..queues.len()).map(|_| AtomicU64::new(0)).collect(),
        confirm_latency: Mutex::new(histogram()?),
        e2e_latency: Mutex::new(histogram()?),
    });
    // Consumers first, so nothing published waits in a queue for them.
    let consuming_since = Instant::now();
    let mut consumers = Vec::new();
    for j in 0..args.consumers {
        let queue = queues[j % queues.len()].clone();
        if stomp {
            let conn = stomp::connect(&uri).await?;
            consumers.push(tokio::spawn(consume_stomp(conn, stomp_dest(&queue), args.clone(), shared.clone())));
        } else {
            let conn = amqp::connect(&uri).await?;
            consumers.push(tokio::spawn(consume(conn, queue, args.clone(), shared.clone())));
        }
    }
    let duration = match (args.duration, args.count) {
        _ if args.producers == 0 => None,
        (Some(d), _) => Some(Duration::from_secs_f64(d.max(0.0))),
        (None, Some(_)) => None,
        (None, None) => Some(Duration::from_secs(10)),
    };
    let mut producers = Vec::new();
    for i in 0..args.producers {
        let target = match &exchange {
            Some(x) => (x.clone(), String::new(), 0),
            None => (String::new(), queues[i % queues.len()].clone(), i % queues.len()),
        };
        if stomp {
            let dest = match &exchange {
                Some(x) => format!("/exchange/{x}"),
                None => stomp_dest(&target.1),
            };
            let conn = stomp::connect(&uri).await?;
            producers.push(tokio::spawn(produce_stomp(conn, dest, target.2, args.clone(), shared.clone())));
        } else {
            let conn = amqp::connect(&uri).await?;
            producers.push(tokio::spawn(produce(conn, target, args.clone(), shared.clone())));
        }
    }
    let progress = progress_bar(args.json);
    let ticker = tokio::spawn(tick(progress.clone(), shared.clone()));
    let started = Instant::now();
    if let Some(d) = duration {
        tokio::time::sleep(d).await;
        shared.stop.store(true, Ordering::Release);
    }
    for p in producers {
        p.await??;
    }
    let publish_secs = started.elapsed().as_secs_f64();
    shared.stop.store(true, Ordering::Release);
    let published = shared.published.load(Ordering::Acquire);
    // What the consumers should get: every queue with a consumer gets
    // what was published to it (fan-out: everything published).
    let consumed_queues: Vec<usize> = (0..queues.len()).filter(|q| *q < args.consumers).collect();
    let expected: u64 = match args.fanout {
        _ if args.producers == 0 => args.count.unwrap_or(0),
        Some(_) => published * consumed_queues.len() as u64,
        None => consumed_queues.iter().map(|q| shared.per_target[*q].load(Ordering::Acquire)).sum(),
    };
    // Drain: until every expected message arrived, or no progress for
    // the drain timeout.
    let mut last = (shared.consumed.load(Ordering::Acquire), Instant::now());
    while args.consumers > 0 && shared.consumed.load(Ordering::Acquire) < expected {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.consumed.load(Ordering::Acquire);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed().as_secs_f64() > args.drain_timeout {
            break;
        }
    }
    let consume_secs = consuming_since.elapsed().as_secs_f64();
    ticker.abort();
    progress.finish_and_clear();
    // Consumers send their last acks and close; one that stopped early
    // stopped on an error: report it.
    shared.finish.cancel();
    for c in consumers {
        let abort = c.abort_handle();
        match tokio::time::timeout(Duration::from_secs(5), c).await {
            Ok(done) => done??,
            Err(_) => abort.abort(),
        }
    }
    if let (false, Some(m)) = (args.keep, &manage) {
        let _ = teardown(m, &queues, exchange.as_deref()).await;
    }
    let consumed = shared.consumed.load(Ordering::Acquire);
    let confirmed = shared.confirmed.load(Ordering::Acquire);
    let confirm_latency = percentiles(&lock(&shared.confirm_latency));
    let latency = percentiles(&lock(&shared.e2e_latency));
    Ok(Report {
        uri: args.uri.clone(),
        producers: args.producers,
        consumers: args.consumers,
        queues: queues.len(),
        size: args.size,
        persistent: args.persistent,
        confirm: args.confirm,
        auto_ack: args.auto_ack,
        prefetch: args.prefetch,
        rate: args.rate,
        publish_secs,
        consume_secs,
        published,
        confirmed,
        nacked: shared.nacked.load(Ordering::Acquire),
        consumed,
        expected,
        publish_rate: published as f64 / publish_secs.max(1e-9),
        confirm_rate: confirmed as f64 / publish_secs.max(1e-9),
        consume_rate: consumed as f64 / consume_secs.max(1e-9),
        confirm_latency_us: confirm_latency,
        latency_us: latency,
    })
}

/// Declares (and purges) the queues, and the fanout exchange with its
/// bindings.
async fn setup(uri: &Uri, queues: &[String], exchange: Option<&str>, durable: bool, args: &FieldTable, purge: bool) -> Result<()> {
    use sluice_codecs::amqp::{ExchangeDeclare, QueueBind, QueueDeclare, QueuePurge};
    let (mut r, mut w) = amqp::connect(uri).await?;
    if let Some(x) = exchange {
        let m = ExchangeDeclare { exchange: x.to_owned(), kind: "fanout".to_owned(), durable, ..Default::default() };
        amqp::call(&mut r, &mut w, m, |m| matches!(m, Method::ExchangeDeclareOk(_))).await?;
    }
    for q in queues {
        let m = QueueDeclare { queue: q.clone(), durable, arguments: args.clone(), ..Default::default() };
        amqp::call(&mut r, &mut w, m, |m| matches!(m, Method::QueueDeclareOk(_))).await?;
        if purge {
            amqp::call(&mut r, &mut w, QueuePurge { queue: q.clone(), ..Default::default() }, |m| matches!(m, Method::QueuePurgeOk(_))).await?;
        }
        if let Some(x) = exchange {
            let m = QueueBind { queue: q.clone(), exchange: x.to_owned(), ..Default::default() };
            amqp::call(&mut r, &mut w, m, |m| matches!(m, Method::QueueBindOk(_))).await?;
        }
    }
    amqp::close(r, w).await;
    Ok(())
}

async fn teardown(uri: &Uri, queues: &[String], exchange: Option<&str>) -> Result<()> {
    use sluice_codecs::amqp::{ExchangeDelete, QueueDelete};
    let (mut r, mut w) = amqp::connect(uri).await?;
    for q in queues {
        amqp::call(&mut r, &mut w, QueueDelete { queue: q.clone(), ..Default::default() }, |m| matches!(m, Method::QueueDeleteOk(_))).await?;
    }
    if let Some(x) = exchange {
        amqp::call(&mut r, &mut w, ExchangeDelete { exchange: x.to_owned(), ..Default::default() }, |m| matches!(m, Method::ExchangeDeleteOk(_)))
            .await?;
    }
    amqp::close(r, w).await;
    Ok(())
}

/// Confirm bookkeeping of one producer: (delivery tag, sent at ns) of
/// what is unconfirmed, oldest first.
#[derive(Default)]
struct Unconfirmed {
    sent: VecDeque<(u64, u64)>,
}

/// One producer: publishes until told to stop (or --count), keeping at
/// most --confirm messages unconfirmed.
async fn produce(conn: (Reader, Writer), target: (String, String, usize), args: BenchArgs, shared: Arc<Shared>) -> Result<()> {
    let (mut r, mut w) = conn;
    let (exchange, routing_key, slot) = target;
    let window = args.confirm.map(|n| n.max(1) as usize);
    let unconfirmed = Arc::new(Mutex::new(Unconfirmed::default()));
    let freed = Arc::new(tokio::sync::Notify::new());
    let reader = if window.is_some() {
        use sluice_codecs::amqp::ConfirmSelect;
        amqp::call(&mut r, &mut w, ConfirmSelect { nowait: false }, |m| matches!(m, Method::ConfirmSelectOk(_))).await?;
        tokio::spawn(read_confirms(r, unconfirmed.clone(), freed.clone(), shared.clone()))
    } else {
        // Nothing to read but errors (the broker's close ends the run)
        // and the answer to our close.
        tokio::spawn(async move {
            loop {
                if let Frame::Method { method: Method::ConnectionCloseOk(_), .. } = r.frame().await? {
                    return Ok(());
                }
            }
        })
    };
    let properties = BasicProperties { delivery_mode: Some(if args.persistent { 2 } else { 1 }), ..Default::default() };
    let mut out = |w: &mut Writer, body: &[u8], _tag: u64| {
        w.publish(&exchange, &routing_key, &properties, body);
        Ok(())
    };
    let pending = |w: &Writer| w.buf.len();
    let limits = Loop { window, slot, unconfirmed: &unconfirmed, freed: &freed, reader: &reader };
    publish_loop(&mut w, &mut out, pending, Writer::flush, &limits, &args, &shared).await?;
    // A polite close: the broker has handled every publish once it
    // answers (a broker may drop what it had not routed yet when a
    // connection just goes away: RabbitMQ does).
    if !reader.is_finished() {
        w.method(0, sluice_codecs::amqp::ConnectionClose { reply_code: 200, reply_text: "bye".to_owned(), class_id: 0, method_id: 0 });
        w.flush().await?;
    }
    finish(reader, args.drain_timeout).await
}

/// What a producer's loop shares with its reader of confirms (or receipts).
struct Loop<'a> {
    /// At most this many unconfirmed (with --confirm).
    window: Option<usize>,
    /// Which `per_target` counter to count in.
    slot: usize,
    unconfirmed: &'a Mutex<Unconfirmed>,
    freed: &'a tokio::sync::Notify,
    /// Finished early: the broker closed the connection (an error).
    reader: &'a tokio::task::JoinHandle<Result<()>>,
}

/// Publishes until told to stop (or --count), at --rate if given, keeping
/// at most the window unconfirmed; then waits for the last confirms.
/// `publish` encodes one message (body, tag) into the writer's buffer,
/// `pending` is the buffer's size, `flush` writes it. Shared by the AMQP
/// and STOMP producers.
async fn publish_loop<W>(
    w: &mut W,
    publish: &mut impl FnMut(&mut W, &[u8], u64) -> Result<()>,
    pending: impl Fn(&W) -> usize,
    flush: impl AsyncFn(&mut W) -> Result<()>,
    l: &Loop<'_>,
    args: &BenchArgs,
    shared: &Shared,
) -> Result<()> {
    let mut body = vec![0u8; args.size];
    let interval = args.rate.filter(|r| *r > 0).map(|r| Duration::from_secs_f64(1.0 / r as f64));
    let mut next_at = tokio::time::Instant::now();
    let mut tag = 0u64;
    while !shared.stop.load(Ordering::Acquire) && args.count.is_none_or(|c| tag < c) && !l.reader.is_finished() {
        if let Some(i) = interval {
            flush(w).await?;
            next_at += i;
            tokio::time::sleep_until(next_at).await;
        }
        if let Some(window) = l.window {
            while lock(l.unconfirmed).sent.len() >= window && !l.reader.is_finished() {
                flush(w).await?;
                let wait = l.freed.notified();
                if lock(l.unconfirmed).sent.len() < window {
                    break;
                }
                if tokio::time::timeout(Duration::from_millis(100), wait).await.is_err() && shared.stop.load(Ordering::Acquire) {
                    break;
                }
            }
        }
        let now = shared.now_ns();
        if body.len() >= 8 {
            body[..8].copy_from_slice(&now.to_be_bytes());
        }
        tag += 1;
        if l.window.is_some() {
            lock(l.unconfirmed).sent.push_back((tag, now));
        }
        publish(w, &body, tag)?;
        shared.published.fetch_add(1, Ordering::AcqRel);
        shared.per_target[l.slot].fetch_add(1, Ordering::AcqRel);
        if pending(w) >= 64 * 1024 {
            flush(w).await?;
        }
    }
    flush(w).await?;
    if l.window.is_some() {
        let deadline = Instant::now() + Duration::from_secs_f64(args.drain_timeout);
        while !lock(l.unconfirmed).sent.is_empty() && Instant::now() < deadline && !l.reader.is_finished() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok(())
}

/// Waits for a producer's reader to see the broker's answer to the close.
async fn finish(reader: tokio::task::JoinHandle<Result<()>>, secs: f64) -> Result<()> {
    match tokio::time::timeout(Duration::from_secs_f64(secs.max(1.0)), reader).await {
        Ok(result) => result?,
        Err(_) => bail!("the broker did not answer the producer's close within {secs} s"),
    }
}

/// Reads basic.ack / basic.nack for one producer.
async fn read_confirms(mut r: Reader, unconfirmed: Arc<Mutex<Unconfirmed>>, freed: Arc<tokio::sync::Notify>, shared: Arc<Shared>) -> Result<()> {
    loop {
        let (tag, multiple, ack) = match r.method().await? {
            Method::ConnectionCloseOk(_) => return Ok(()),
            Method::BasicAck(a) => (a.delivery_tag, a.multiple, true),
            Method::BasicNack(n) => (n.delivery_tag, n.multiple, false),
            _ => continue,
        };
        let now = shared.now_ns();
        let mut done = Vec::new();
        {
            let mut u = lock(&unconfirmed);
            while let Some(&(t, sent)) = u.sent.front() {
                if t > tag || (!multiple && t != tag) {
                    break;
                }
                u.sent.pop_front();
                done.push(sent);
            }
            if !multiple && done.is_empty() {
                // Out of order (not at the front): find it.
                if let Some(i) = u.sent.iter().position(|(t, _)| *t == tag) {
                    if let Some((_, sent)) = u.sent.remove(i) {
                        done.push(sent);
                    }
                }
            }
        }
        settled(&shared, now, &done, ack);
        freed.notify_one();
    }
}

/// Counts confirmed (with their latency) or nacked messages sent at `sent`.
fn settled(shared: &Shared, now: u64, sent: &[u64], ack: bool) {
    let n = sent.len() as u64;
    if ack {
        shared.confirmed.fetch_add(n, Ordering::AcqRel);
        let mut h = lock(&shared.confirm_latency);
        for at in sent {
            let _ = h.record(now.saturating_sub(*at) / 1000);
        }
    } else {
        shared.nacked.fetch_add(n, Ordering::AcqRel);
    }
}

/// Reads RECEIPTs for one STOMP producer (the one for DISCONNECT ends it).
async fn read_receipts(mut r: stomp::Reader, unconfirmed: Arc<Mutex<Unconfirmed>>, freed: Arc<tokio::sync::Notify>, shared: Arc<Shared>) -> Result<()> {
    loop {
        let f = r.frame().await?;
        if f.command != sluice_codecs::stomp::Command::Receipt {
            continue;
        }
        let id = f.header("receipt-id");
        if id == Some("disconnect") {
            return Ok(());
        }
        let Some(tag) = id.and_then(|t| t.parse::<u64>().ok()) else { continue };
        let now = shared.now_ns();
        let sent = {
            let mut u = lock(&unconfirmed);
            let at = u.sent.iter().position(|(t, _)| *t == tag);
            at.and_then(|i| u.sent.remove(i)).map(|(_, sent)| sent)
        };
        settled(&shared, now, sent.as_slice(), true);
        freed.notify_one();
    }
}

/// One consumer: basic.consume, then count deliveries and their latency.
async fn consume(conn: (Reader, Writer), queue: String, args: BenchArgs, shared: Arc<Shared>) -> Result<()> {
    use sluice_codecs::amqp::{BasicAck, BasicConsume, BasicQos};
    let (mut r, mut w) = conn;
    if args.prefetch > 0 {
        amqp::call(&mut r, &mut w, BasicQos { prefetch_count: args.prefetch, ..Default::default() }, |m| matches!(m, Method::BasicQosOk(_)))
            .await?;
    }
    let consume = BasicConsume { queue, no_ack: args.auto_ack, ..Default::default() };
    amqp::call(&mut r, &mut w, consume, |m| matches!(m, Method::BasicConsumeOk(_))).await?;
    let multi = args.multi_ack.max(1) as u64;
    let mut unacked = 0u64;
    let mut last_tag = 0u64;
    // The body's first bytes: the send time.
    let mut stamp: Option<u64> = None;
    let mut want_stamp = false;
    let mut latencies: Vec<u64> = Vec::with_capacity(4096);
    loop {
        // Acks go out when nothing more is buffered to read.
        if !r.buffered() {
            if !args.auto_ack && unacked > 0 {
                w.method(1, BasicAck { delivery_tag: last_tag, multiple: true });
                unacked = 0;
            }
            w.flush().await?;
            if !latencies.is_empty() {
                let mut h = lock(&shared.e2e_latency);
                for l in latencies.drain(..) {
                    let _ = h.record(l);
                }
            }
        }
        let frame = tokio::select! {
            biased;
            frame = r.frame() => frame?,
            () = shared.finish.cancelled() => {
                if !args.auto_ack && unacked > 0 {
                    w.method(1, BasicAck { delivery_tag: last_tag, multiple: true });
                }
                // The close waits for close-ok, so the broker has the acks.
                amqp::close(r, w).await;
                return Ok(());
            }
        };
        match frame {
            Frame::Method { method: Method::BasicDeliver(d), .. } => {
                last_tag = d.delivery_tag;
                want_stamp = true;
                stamp = None;
            }
            Frame::Header { body_size: 0, .. } => {
                count_delivery(&shared, None, &mut latencies);
                unacked += 1;
            }
            // Bodies larger than a frame: counted on the first frame (the
            // rest follow on the same channel).
            Frame::Body { payload, .. } if want_stamp => {
                want_stamp = false;
                // A drain-only run's bodies were stamped by another run.
                if payload.len() >= 8 && args.producers > 0 {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(&payload[..8]);
                    stamp = Some(u64::from_be_bytes(b));
                }
                count_delivery(&shared, stamp, &mut latencies);
                unacked += 1;
            }
            _ => {}
        }
        if !args.auto_ack && unacked >= multi {
            w.method(1, BasicAck { delivery_tag: last_tag, multiple: true });
            unacked = 0;
            if w.buf.len() >= 16 * 1024 {
                w.flush().await?;
            }
        }
    }
}

/// A STOMP producer: SEND, with a receipt per message when --confirm.
async fn produce_stomp(conn: (stomp::Reader, stomp::Writer), dest: String, slot: usize, args: BenchArgs, shared: Arc<Shared>) -> Result<()> {
    let (r, mut w) = conn;
    let window = args.confirm.map(|n| n.max(1) as usize);
    let unconfirmed = Arc::new(Mutex::new(Unconfirmed::default()));
    let freed = Arc::new(tokio::sync::Notify::new());
    let reader = tokio::spawn(read_receipts(r, unconfirmed.clone(), freed.clone(), shared.clone()));
    let persistent = args.persistent;
    let mut out = |w: &mut stomp::Writer, body: &[u8], tag: u64| w.send(&dest, body, persistent, window.map(|_| tag));
    let pending = |w: &stomp::Writer| w.buf.len();
    let limits = Loop { window, slot, unconfirmed: &unconfirmed, freed: &freed, reader: &reader };
    publish_loop(&mut w, &mut out, pending, stomp::Writer::flush, &limits, &args, &shared).await?;
    // DISCONNECT with a receipt: every SEND before it was handled.
    if !reader.is_finished() {
        let bye = sluice_codecs::stomp::Frame::new(sluice_codecs::stomp::Command::Disconnect).with_header("receipt", "disconnect");
        w.frame(&bye)?;
        w.flush().await?;
    }
    finish(reader, args.drain_timeout).await
}

/// A STOMP consumer: SUBSCRIBE (ack auto, or client: cumulative acks).
async fn consume_stomp(conn: (stomp::Reader, stomp::Writer), dest: String, args: BenchArgs, shared: Arc<Shared>) -> Result<()> {
    use sluice_codecs::stomp::{Command, Frame as StompFrame};
    let (mut r, mut w) = conn;
    let mut sub = StompFrame::new(Command::Subscribe)
        .with_header("destination", dest)
        .with_header("id", "0")
        .with_header("ack", if args.auto_ack { "auto" } else { "client" });
    if args.prefetch > 0 {
        sub = sub.with_header("prefetch-count", args.prefetch.to_string());
    }
    w.frame(&sub)?;
    w.flush().await?;
    let multi = args.multi_ack.max(1) as u64;
    let mut unacked = 0u64;
    let mut last_ack: Option<String> = None;
    let mut latencies: Vec<u64> = Vec::with_capacity(4096);
    loop {
        if !r.buffered() {
            if let (false, Some(id), true) = (args.auto_ack, &last_ack, unacked > 0) {
                w.frame(&StompFrame::new(Command::Ack).with_header("id", id.clone()))?;
                unacked = 0;
            }
            w.flush().await?;
            if !latencies.is_empty() {
                let mut h = lock(&shared.e2e_latency);
                for l in latencies.drain(..) {
                    let _ = h.record(l);
                }
            }
        }
        let f = tokio::select! {
            biased;
            f = r.frame() => f?,
            () = shared.finish.cancelled() => {
                if let (false, Some(id), true) = (args.auto_ack, &last_ack, unacked > 0) {
                    w.frame(&StompFrame::new(Command::Ack).with_header("id", id.clone()))?;
                }
                // DISCONNECT with a receipt: the broker has the acks once
                // it answers.
                w.frame(&StompFrame::new(Command::Disconnect).with_header("receipt", "bye"))?;
                w.flush().await?;
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(f) = r.frame().await {
                        if f.command == Command::Receipt {
                            break;
                        }
                    }
                })
                .await;
                return Ok(());
            }
        };
        if f.command != Command::Message {
            continue;
        }
        let stamp = (f.body.len() >= 8 && args.producers > 0).then(|| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&f.body[..8]);
            u64::from_be_bytes(b)
        });
        count_delivery(&shared, stamp, &mut latencies);
        if !args.auto_ack {
            last_ack = f.header("ack").or(f.header("message-id")).map(str::to_owned);
            unacked += 1;
            if unacked >= multi {
                if let Some(id) = &last_ack {
                    w.frame(&StompFrame::new(Command::Ack).with_header("id", id.clone()))?;
                }
                unacked = 0;
            }
        }
    }
}

fn count_delivery(shared: &Shared, stamp: Option<u64>, latencies: &mut Vec<u64>) {
    shared.consumed.fetch_add(1, Ordering::AcqRel);
    if let Some(sent) = stamp {
        latencies.push(shared.now_ns().saturating_sub(sent) / 1000);
    }
}

fn progress_bar(quiet: bool) -> indicatif::ProgressBar {
    if quiet {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    bar
}

/// Updates the progress line once a second with the current rates.
async fn tick(bar: indicatif::ProgressBar, shared: Arc<Shared>) {
    let mut last = (0u64, 0u64, Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (p, c) = (shared.published.load(Ordering::Acquire), shared.consumed.load(Ordering::Acquire));
        let secs = last.2.elapsed().as_secs_f64().max(1e-9);
        bar.set_message(format!(
            "{:>5.0}s  published {p} ({:.0}/s)  consumed {c} ({:.0}/s)  confirmed {}",
            shared.start.elapsed().as_secs_f64(),
            (p - last.0) as f64 / secs,
            (c.saturating_sub(last.1)) as f64 / secs,
            shared.confirmed.load(Ordering::Acquire),
        ));
        bar.tick();
        last = (p, c, Instant::now());
    }
}

fn text(r: &Report) -> String {
    let lat = |name: &str, p: &Option<Percentiles>| match p {
        Some(p) => format!(
            "{name:<18} p50 {} µs, p95 {} µs, p99 {} µs, p99.9 {} µs, max {} µs\n",
            p.p50, p.p95, p.p99, p.p999, p.max
        ),
        None => String::new(),
    };
    format!(
        "{} producer(s), {} consumer(s), {} queue(s), {} B, {}{}{}\n\
         published          {} in {:.1} s: {:.0} msg/s\n\
         confirmed          {} ({:.0} msg/s), nacked {}\n\
         consumed           {} of {} in {:.1} s: {:.0} msg/s\n{}{}",
        r.producers,
        r.consumers,
        r.queues,
        r.size,
        if r.persistent { "persistent" } else { "transient" },
        r.confirm.map(|c| format!(", confirms (window {c})")).unwrap_or_default(),
        if r.auto_ack { ", auto-ack" } else { ", manual ack" },
        r.published,
        r.publish_secs,
        r.publish_rate,
        r.confirmed,
        r.confirm_rate,
        r.nacked,
        r.consumed,
        r.expected,
        r.consume_secs,
        r.consume_rate,
        lat("confirm latency", &r.confirm_latency_us),
        lat("latency", &r.latency_us),
    )
}
