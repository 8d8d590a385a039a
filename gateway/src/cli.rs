//! The cluster subcommands: `sluice node` and `sluice ctl`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::Context;
use sluice_cluster::node::{self, MemberView, MembershipOptions, Node, NodeOptions, ReplicaInfo};
use sluice_cluster::rpc::{PeerInfo, Secret};

use crate::config::{CtlCommand, CtlConfig, NodeConfig};

/// Runs a node until SIGTERM or ctrl-c.
pub async fn node(config: NodeConfig, reload: crate::server::Reload) -> anyhow::Result<()> {
    let secret = crate::config::cluster_credentials(config.cluster_secret_file.as_deref(), config.cluster_tls.as_ref())?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let signal = crate::server::shutdown_signal()?;
    // Before the node starts, so that a busy port stops nothing.
    let metrics_addr = config.metrics.as_deref().map(crate::metrics::install).transpose()?;
    // The node watches its own memory and disk; gateways ask for the
    // state (NodeRequest::Alarms) and block their publishers.
    let alarms = crate::alarm::Alarms::new(config.alarm, Some(config.data_dir.clone()));
    alarms.spawn_monitor();
    crate::server::spawn_reload(alarms.clone(), reload)?;
    let node_alarms = std::sync::Arc::new(node::NodeAlarms::default());
    let mut watch = alarms.subscribe();
    let shared = node_alarms.clone();
    tokio::spawn(async move {
        loop {
            let s = *watch.borrow_and_update();
            shared.memory.store(s.memory, std::sync::atomic::Ordering::Relaxed);
            shared.disk.store(s.disk, std::sync::atomic::Ordering::Relaxed);
            if watch.changed().await.is_err() {
                return;
            }
        }
    });
    let node = Node::start(NodeOptions {
        id: config.id.clone(),
        data_dir: config.data_dir.clone(),
        listen: config.listen.clone(),
        seeds: config.seeds.clone(),
        secret,
        advertise: config.advertise.clone(),
        membership: MembershipOptions {
            heartbeat_interval: std::time::Duration::from_millis(config.heartbeat_ms),
            failure_timeout: std::time::Duration::from_millis(config.failure_timeout_ms),
            ..MembershipOptions::default()
        },
        alarms: node_alarms,
    })
    .await?;
    if metrics_addr.is_some() {
        crate::metrics::spawn_node_collector(node.replication_source());
    }
    println!("sluice node {} ({}) serving; data dir {}", config.id, env!("CARGO_PKG_VERSION"), config.data_dir.display());
    if let Some(addr) = metrics_addr {
        println!("metrics listening on {addr}");
    }
    println!("node protocol listening on {}", node.addr);
    signal.await;
    node.stop().await.context("flushing storage")?;
    println!("sluice node stopped");
    Ok(())
}

/// `sluice ctl`.
pub async fn ctl(args: CtlConfig) -> anyhow::Result<()> {
    // Definition and user commands go to a gateway's admin API.
    let admin_args = args.clone();
    if tokio::task::spawn_blocking(move || crate::ctl_admin::run(&admin_args)).await?? {
        return Ok(());
    }
    let secret = args.credentials()?;
    let me = PeerInfo::gateway(format!("ctl-{}", std::process::id()));
    match args.command {
        CtlCommand::Status => {
            let s = node::status(&args.node, &secret, me).await.with_context(|| format!("node {}", args.node))?;
            println!("node {} at {}: sluice {}, up {} s", s.node_id, s.listen, s.version, s.uptime_ms / 1000);
            if !s.seeds.is_empty() {
                println!("seeds: {}", s.seeds.join(", "));
            }
            println!("cluster members: {}", s.members.join(", "));
            println!("leading: {}", s.leading.join(", "));
            println!("queue replicas: {}", s.replicas);
        }
        CtlCommand::Members => {
            let rows = node::members(&args.node, &secret, me).await.with_context(|| format!("node {}", args.node))?;
            print!("{}", members_table(&rows));
        }
        CtlCommand::Queues => queues(&args.node, &secret, me).await?,
        CtlCommand::Decommission { node_id, timeout_secs } => {
            decommission(&args.node, &secret, me, &node_id, Duration::from_secs(timeout_secs)).await?
        }
        _ => anyhow::bail!("not a cluster command"),
    }
    Ok(())
}

/// `sluice ctl queues`: asks every node the given one knows for the
/// replicas it hosts and prints one line per queue: name, leader, voters,
/// learners (as its leader sees them; `-` for none), and the nodes that
/// still host a replica outside the group.
async fn queues(addr: &str, secret: &Secret, me: PeerInfo) -> anyhow::Result<()> {
    let members = node::members(addr, secret, me.clone()).await.with_context(|| format!("node {addr}"))?;
    let mut by_queue: BTreeMap<u64, Vec<ReplicaInfo>> = BTreeMap::new();
    for m in &members {
        let ask = node::replicas(&m.addr, secret, me.clone());
        match tokio::time::timeout(Duration::from_secs(3), ask).await {
            Ok(Ok(rows)) => {
                for r in rows {
                    by_queue.entry(r.queue).or_default().push(r);
                }
            }
            Ok(Err(e)) => eprintln!("node {} ({}): {e}", m.id, m.addr),
            Err(_) => eprintln!("node {} ({}): no answer", m.id, m.addr),
        }
    }
    let mut rows: Vec<[String; 5]> = Vec::new();
    for replicas in by_queue.values() {
        let Some(first) = replicas.first() else { continue };
        let leading = replicas.iter().find(|r| r.leader.as_deref() == Some(r.node.as_str())).unwrap_or(first);
        let list = |v: &[String]| if v.is_empty() { "-".to_owned() } else { v.join(",") };
        let mut hosts: Vec<String> = replicas.iter().map(|r| r.node.clone()).collect();
        hosts.sort();
        rows.push([
            leading.name.clone(),
            leading.leader.clone().unwrap_or_else(|| "-".to_owned()),
            list(&leading.voters),
            list(&leading.learners),
            list(&hosts),
        ]);
    }
    rows.sort();
    let header = ["QUEUE", "LEADER", "VOTERS", "LEARNERS", "HOSTED-ON"].map(str::to_owned);
    let widths: Vec<usize> =
        (0..5).map(|i| rows.iter().map(|r| r[i].len()).chain([header[i].len()]).max().unwrap_or(0)).collect();
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", line.join("  ").trim_end());
    }
    Ok(())
}

/// How many queue groups still have `id` as a voter or learner, as the
/// other members' replicas see them (`None` if none answered).
async fn groups_with(members: &[MemberView], id: &str, secret: &Secret, me: &PeerInfo) -> Option<usize> {
    let mut groups: BTreeMap<u64, bool> = BTreeMap::new();
    let mut answered = false;
    for m in members.iter().filter(|m| m.id != id) {
        let ask = node::replicas(&m.addr, secret, me.clone());
        if let Ok(Ok(rows)) = tokio::time::timeout(Duration::from_secs(3), ask).await {
            answered = true;
            for r in rows {
                let has = r.voters.iter().chain(r.learners.iter()).any(|v| v == id);
                *groups.entry(r.queue).or_default() |= has;
            }
        }
    }
    answered.then(|| groups.values().filter(|has| **has).count())
}

/// `sluice ctl decommission NODE_ID`: asks for the removal, then waits
/// until the node hosts no queue replica.
async fn decommission(addr: &str, secret: &Secret, me: PeerInfo, id: &str, timeout: Duration) -> anyhow::Result<()> {
    let members = node::members(addr, secret, me.clone()).await.with_context(|| format!("node {addr}"))?;
    let target = members.iter().find(|m| m.id == id).map(|m| m.addr.clone());
    node::decommission(addr, secret, me.clone(), id)
        .await
        .map_err(|e| anyhow::anyhow!("cannot decommission {id}: {e}"))?;
    println!("{id} removed from the cluster members; its queue replicas are moving to the other nodes");
    let Some(target) = target else {
        println!("{id}'s address is unknown here: check `sluice ctl --node <its address> status` before stopping it");
        return Ok(());
    };
    let started = Instant::now();
    let mut last: Option<u64> = None;
    let mut last_print = Instant::now();
    loop {
        match tokio::time::timeout(Duration::from_secs(3), node::status(&target, secret, me.clone())).await {
            Ok(Ok(s)) => {
                if s.replicas == 0 {
                    println!(
                        "{id} hosts no queue replica ({:.1} s): it can be stopped",
                        started.elapsed().as_secs_f64()
                    );
                    return Ok(());
                }
                if last != Some(s.replicas) || last_print.elapsed() >= Duration::from_secs(5) {
                    println!("{id}: {} queue replicas left", s.replicas);
                    last = Some(s.replicas);
                    last_print = Instant::now();
                }
            }
            Ok(Err(e)) => {
                println!("{id} at {target}: {e}");
                if groups_with(&members, id, secret, &me).await == Some(0) {
                    println!("{id} is unreachable and no queue group has it any more: it can be stopped");
                    return Ok(());
                }
            }
            Err(_) => println!("{id} at {target}: no answer"),
        }
        if started.elapsed() > timeout {
            anyhow::bail!(
                "{id} still hosts queue replicas after {} s; see `sluice ctl queues` (is every other node up?)",
                timeout.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `sluice ctl members`: one line per member, columns aligned:
/// `ID ADDRESS STATE LAST-HEARD INCARNATION`, where LAST-HEARD is
/// `N ms ago`, `never`, or `self` for the node that answered.
fn members_table(rows: &[MemberView]) -> String {
    let heard = |r: &MemberView| match (r.is_self, r.last_heard_ms) {
        (true, _) => "self".to_string(),
        (false, Some(ms)) => format!("{ms} ms ago"),
        (false, None) => "never".to_string(),
    };
    let id_w = rows.iter().map(|r| r.id.len()).chain([2]).max().unwrap_or(2);
    let addr_w = rows.iter().map(|r| r.addr.len()).chain([7]).max().unwrap_or(7);
    let heard_w = rows.iter().map(|r| heard(r).len()).chain([10]).max().unwrap_or(10);
    let mut out = format!("{:<id_w$}  {:<addr_w$}  {:<5}  {:<heard_w$}  INCARNATION\n", "ID", "ADDRESS", "STATE", "LAST-HEARD");
    for r in rows {
        out.push_str(&format!(
            "{:<id_w$}  {:<addr_w$}  {:<5}  {:<heard_w$}  {}\n",
            r.id,
            r.addr,
            r.state.to_string(),
            heard(r),
            r.incarnation
        ));
    }
    out
}

