//! Network namespaces for partition tests: `n` hosts, each in its own
//! namespace, joined by veth pairs to one bridge in a namespace of their
//! own (so nothing touches the machine's real interfaces), addresses
//! `10.<a>.<b>.<i+1>/24`. A host can be cut off (its veth goes down) and
//! healed. Everything is removed on drop. Needs root and `ip` (iproute2).

use std::process::Command;

/// A set of namespaced hosts on one private bridge.
pub struct Net {
    prefix: String,
    /// Namespace names, one per host.
    pub hosts: Vec<String>,
    /// Each host's address.
    pub addrs: Vec<String>,
    hub: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip").args(args).output().map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// Creates `n` hosts. Names derive from the process id and `tag`, so
    /// parallel tests do not collide.
    pub fn new(tag: u8, n: usize) -> Result<Net, String> {
        let pid = std::process::id();
        let prefix = format!("sl{}{}", pid % 100_000, tag);
        let hub = format!("{prefix}h");
        let mut net = Net { prefix: prefix.clone(), hosts: Vec::new(), addrs: Vec::new(), hub: hub.clone() };
        ip(&["netns", "add", &hub])?;
        ip(&["netns", "exec", &hub, "ip", "link", "add", "br0", "type", "bridge"])?;
        ip(&["netns", "exec", &hub, "ip", "link", "set", "br0", "up"])?;
        let (a, b) = ((pid % 200) as u8 + 20, tag);
        for i in 0..n {
            let host = format!("{prefix}n{i}");
            let inside = format!("{prefix}i{i}");
            let outside = format!("{prefix}o{i}");
            ip(&["netns", "add", &host])?;
            net.hosts.push(host.clone());
            ip(&["link", "add", &inside, "type", "veth", "peer", "name", &outside])?;
            ip(&["link", "set", &inside, "netns", &host])?;
            ip(&["link", "set", &outside, "netns", &hub])?;
            ip(&["netns", "exec", &hub, "ip", "link", "set", &outside, "master", "br0"])?;
            ip(&["netns", "exec", &hub, "ip", "link", "set", &outside, "up"])?;
            let addr = format!("10.{a}.{b}.{}", i + 1);
            ip(&["netns", "exec", &host, "ip", "addr", "add", &format!("{addr}/24"), "dev", &inside])?;
            ip(&["netns", "exec", &host, "ip", "link", "set", &inside, "up"])?;
            ip(&["netns", "exec", &host, "ip", "link", "set", "lo", "up"])?;
            net.addrs.push(addr);
        }
        Ok(net)
    }

    /// A command run inside host `i`'s namespace.
    pub fn command(&self, i: usize, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.hosts[i]]).arg(program);
        c
    }

    /// Cuts host `i` off from every other host.
    pub fn isolate(&self, i: usize) -> Result<(), String> {
        ip(&["netns", "exec", &self.hub, "ip", "link", "set", &format!("{}o{i}", self.prefix), "down"])
    }

    /// Reconnects host `i`.
    pub fn heal(&self, i: usize) -> Result<(), String> {
        ip(&["netns", "exec", &self.hub, "ip", "link", "set", &format!("{}o{i}", self.prefix), "up"])
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth ends inside it.
        for h in self.hosts.iter().chain(std::iter::once(&self.hub)) {
            let _ = ip(&["netns", "del", h]);
        }
    }
}

/// A network namespace with nothing but its own loopback interface (up,
/// with 127.0.0.1 and ::1): a private copy of "localhost" where a test can
/// listen on fixed ports such as 5672 without colliding with anything
/// else on the machine, and from which no traffic can leave. Removed on
/// drop. Needs root and `ip` (iproute2).
pub struct Loopback {
    /// The namespace's name (under /run/netns).
    pub name: String,
}

impl Loopback {
    /// Creates the namespace; `tag` keeps parallel tests apart.
    pub fn new(tag: &str) -> Result<Loopback, String> {
        let name = format!("sl{}{tag}", std::process::id() % 100_000);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = Loopback { name };
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}
