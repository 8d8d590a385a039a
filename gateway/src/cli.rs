//! The cluster subcommands: `sluice node` and `sluice ctl`.

use std::path::PathBuf;

use anyhow::Context;
use sluice_cluster::node::{self, MemberView, MembershipOptions, Node, NodeOptions};
use sluice_cluster::rpc::{PeerInfo, Secret};

use crate::config::{CtlArgs, CtlCommand, NodeConfig};

fn secret(path: Option<&PathBuf>) -> anyhow::Result<Secret> {
    Secret::load_or_create(path.map(PathBuf::as_path)).context("cluster secret")
}

/// Runs a node until SIGTERM or ctrl-c.
pub async fn node(config: NodeConfig) -> anyhow::Result<()> {
    let secret = secret(config.cluster_secret_file.as_ref())?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    let signal = crate::server::shutdown_signal()?;
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
    })
    .await?;
    println!("sluice node {} ({}) serving; data dir {}", config.id, env!("CARGO_PKG_VERSION"), config.data_dir.display());
    println!("node protocol listening on {}", node.addr);
    signal.await;
    node.stop().await.context("flushing storage")?;
    println!("sluice node stopped");
    Ok(())
}

/// `sluice ctl`.
pub async fn ctl(args: CtlArgs) -> anyhow::Result<()> {
    let secret = secret(args.cluster_secret_file.as_ref())?;
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
    }
    Ok(())
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

