//! Test harness: starts the real `sluice` binary on a free 127.0.0.1 port
//! with its own data directory, and stops it (kill -9 or SIGTERM).
//!
//! The binary is looked up in `$SLUICE_BIN`, else next to the test
//! executable (`target/<profile>/sluice`); the README's test command builds
//! it first.

pub mod netns;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Path of the `sluice` binary under test.
pub fn sluice_bin() -> PathBuf {
    if let Ok(p) = std::env::var("SLUICE_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/sluice
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let bin = profile_dir.join("sluice");
    assert!(
        bin.exists(),
        "{} not found: build it first with `cargo build --bin sluice` (the README's test command does)",
        bin.display()
    );
    bin
}

/// Whether `args` hold `flag` (as `--flag VALUE` or `--flag=VALUE`; not
/// a longer flag such as `--stomps` for `--stomp`).
fn has_flag(args: &[&str], flag: &str) -> bool {
    args.iter().any(|a| *a == flag || a.strip_prefix(flag).is_some_and(|rest| rest.starts_with('=')))
}

/// A running broker.
pub struct Server {
    child: Option<Child>,
    /// Address of the AMQP listener.
    pub amqp: SocketAddr,
    /// Address of the STOMP listener.
    pub stomp: SocketAddr,
    /// Address of the Web-STOMP (STOMP over WebSocket) listener.
    pub web_stomp: SocketAddr,
    /// The TLS listeners, when `--amqps`/`--stomps`/`--web-stomps` were given.
    pub amqps: Option<SocketAddr>,
    pub stomps: Option<SocketAddr>,
    pub web_stomps: Option<SocketAddr>,
    /// The data directory (kept across restarts).
    pub data_dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    extra: Vec<String>,
    /// Lines the server printed on stderr (collected in the background).
    pub stderr: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The metrics listener, once its line was printed.
    metrics: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    /// The admin API listener.
    admin: Option<SocketAddr>,
}

impl Server {
    /// Starts a broker on a fresh data directory.
    pub fn start() -> Server {
        Self::start_with(&[])
    }

    /// Starts a broker with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::spawn(&dir, extra).expect("start sluice");
        s._tmp = Some(tmp);
        s
    }

    /// Starts a broker on an existing data directory.
    pub fn spawn(data_dir: &Path, extra: &[&str]) -> Result<Server, String> {
        Self::spawn_limited(data_dir, extra, false, None)
    }

    /// Starts a broker on a fresh data directory inside the network
    /// namespace `netns` (a name under /run/netns, e.g. a
    /// [`netns::Loopback`]): its listeners are reachable only from
    /// processes in that namespace. `restart` does not keep the namespace.
    pub fn start_in_netns(netns: &str, extra: &[&str]) -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::spawn_limited(&dir, extra, false, Some(netns)).expect("start sluice");
        s._tmp = Some(tmp);
        s
    }

    /// Starts a broker that will be able to run out of file space: SIGXFSZ
    /// is ignored, so once [`Server::limit_file_size`] is applied, writes
    /// past the limit fail with EFBIG (as on a full disk) instead of
    /// killing the process.
    pub fn start_for_disk_full() -> Server {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().to_path_buf();
        let mut s = Self::spawn_limited(&dir, &[], true, None).expect("start sluice");
        s._tmp = Some(tmp);
        s
    }

    /// Sets the running broker's RLIMIT_FSIZE (prlimit(2)): no write may
    /// reach past `bytes` in any file.
    pub fn limit_file_size(&self, bytes: u64) {
        let lim = libc::rlimit { rlim_cur: bytes as libc::rlim_t, rlim_max: libc::RLIM_INFINITY };
        // SAFETY: plain syscall on another process; pointers live for the call.
        let r = unsafe { libc::prlimit(self.pid() as libc::pid_t, libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
        assert_eq!(r, 0, "prlimit: {}", std::io::Error::last_os_error());
    }

    fn spawn_limited(
        data_dir: &Path,
        extra: &[&str],
        ignore_sigxfsz: bool,
        netns: Option<&str>,
    ) -> Result<Server, String> {
        let mut cmd = Command::new(sluice_bin());
        if let Some(name) = netns {
            use std::os::fd::{AsRawFd, OwnedFd};
            use std::os::unix::process::CommandExt;
            let ns: OwnedFd = std::fs::File::open(Path::new("/run/netns").join(name))
                .map_err(|e| format!("network namespace {name}: {e}"))?
                .into();
            // SAFETY: only an async-signal-safe syscall between fork and
            // exec; the closure owns the descriptor, so it stays open.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        if ignore_sigxfsz {
            use std::os::unix::process::CommandExt;
            // SAFETY: only an async-signal-safe libc call between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                    Ok(())
                });
            }
        }
        cmd.arg("serve")
            .arg("--data-dir")
            .arg(data_dir);
        if !has_flag(extra, "--amqp") {
            cmd.arg("--amqp").arg("127.0.0.1:0");
        }
        // A free port unless the test chose one (the default, 61613, would
        // collide between parallel tests).
        if !has_flag(extra, "--stomp") {
            cmd.arg("--stomp").arg("127.0.0.1:0");
        }
        if !has_flag(extra, "--web-stomp") {
            cmd.arg("--web-stomp").arg("127.0.0.1:0");
        }
        if !has_flag(extra, "--metrics") {
            cmd.arg("--metrics").arg("127.0.0.1:0");
        }
        if !has_flag(extra, "--admin") {
            cmd.arg("--admin").arg("127.0.0.1:0");
        }
        cmd.args(extra)
            .env("SLUICE_LOG", std::env::var("SLUICE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|e| format!("spawn: {e}"))?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[sluice] {line}");
                sink.lock().map(|mut v| v.push(line)).ok();
            }
        });
        let (tx, rx) = mpsc::channel();
        let metrics_line = std::sync::Arc::new(std::sync::Mutex::new(None));
        let metrics_sink = metrics_line.clone();
        std::thread::spawn(move || {
            // The STOMP line follows the AMQP one, then the TLS listeners'
            // lines, then the Web-STOMP line.
            let (mut amqp, mut stomp, mut admin) = (None, None, None);
            let mut tls: [Option<String>; 3] = [None, None, None];
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let tls_line = ["AMQPS listening on ", "STOMPS listening on ", "Web-STOMPS listening on "]
                    .iter()
                    .position(|p| line.starts_with(p));
                if let Some(i) = tls_line {
                    tls[i] = line.split(" listening on ").nth(1).map(|a| a.trim().to_string());
                } else if let Some(addr) = line.strip_prefix("AMQP listening on ") {
                    amqp = Some(addr.trim().to_string());
                } else if let Some(addr) = line.strip_prefix("STOMP listening on ") {
                    stomp = Some(addr.trim().to_string());
                } else if let Some(addr) = line.strip_prefix("Web-STOMP listening on ") {
                    if let (Some(amqp), Some(stomp)) = (amqp.take(), stomp.take()) {
                        let _ = tx.send((amqp, stomp, addr.trim().to_string(), std::mem::take(&mut tls), admin.take()));
                    }
                } else if let Some(addr) = line.strip_prefix("admin API listening on ") {
                    admin = Some(addr.trim().to_string());
                } else if let Some(addr) = line.strip_prefix("metrics listening on ") {
                    metrics_sink.lock().map(|mut m| *m = Some(addr.trim().to_string())).ok();
                }
            }
        });
        let (addr, stomp, web_stomp, tls, admin) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                return Err(format!("sluice did not start (exit {status:?}): {:?}", lines.lock().map(|v| v.clone())));
            }
        };
        Ok(Server {
            child: Some(child),
            amqp: addr.parse().map_err(|e| format!("bad address {addr}: {e}"))?,
            stomp: stomp.parse().map_err(|e| format!("bad address {stomp}: {e}"))?,
            web_stomp: web_stomp.parse().map_err(|e| format!("bad address {web_stomp}: {e}"))?,
            amqps: tls[0].as_deref().and_then(|a| a.parse().ok()),
            stomps: tls[1].as_deref().and_then(|a| a.parse().ok()),
            web_stomps: tls[2].as_deref().and_then(|a| a.parse().ok()),
            data_dir: data_dir.to_path_buf(),
            _tmp: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            stderr: lines,
            metrics: metrics_line,
            admin: admin.and_then(|a| a.parse().ok()),
        })
    }

    /// Address of the admin HTTP API (`sluice ctl --admin`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin.expect("sluice printed no 'admin API listening on' line")
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp)
    }

    /// Same with extra query parameters, e.g. `heartbeat=1`.
    pub fn url_with(&self, query: &str) -> String {
        format!("amqp://guest:guest@{}/%2f?{query}", self.amqp)
    }

    /// Address of the STOMP listener.
    pub fn stomp_addr(&self) -> SocketAddr {
        self.stomp
    }

    /// Address of the Web-STOMP listener (`ws://ADDR/ws`).
    pub fn web_stomp_addr(&self) -> SocketAddr {
        self.web_stomp
    }

    /// Address of the Prometheus metrics listener (`http://ADDR/metrics`);
    /// waits up to 10 s for its line.
    pub fn metrics_addr(&self) -> SocketAddr {
        for _ in 0..200 {
            if let Some(a) = self.metrics.lock().ok().and_then(|m| m.clone()) {
                return a.parse().expect("metrics address");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sluice printed no 'metrics listening on' line");
    }

    /// OS process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// `kill -9`: no chance to flush anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit status.
    pub fn terminate(&mut self) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        unsafe {
            libc::kill(c.id() as i32, libc::SIGTERM);
        }
        for _ in 0..300 {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        c.wait().ok()
    }

    /// Starts the broker again on the same data dir (new port).
    pub fn restart(&mut self) {
        self.kill9();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let tmp = self._tmp.take();
        let mut s = Self::spawn(&self.data_dir, &extra).expect("restart sluice");
        s._tmp = tmp;
        *self = s;
    }

    /// Stops the broker (SIGTERM) and starts it again on the same data dir
    /// and the same AMQP, STOMP and Web-STOMP addresses, so clients can
    /// reconnect to the address they had (retries while the ports are
    /// still being released).
    pub fn restart_same_ports(&mut self) {
        self.terminate();
        let (amqp, stomp, web) = (self.amqp.to_string(), self.stomp.to_string(), self.web_stomp.to_string());
        let mut extra: Vec<String> = Vec::new();
        let mut old = self.extra.iter();
        while let Some(a) = old.next() {
            if ["--amqp", "--stomp", "--web-stomp"].contains(&a.as_str()) {
                old.next();
            } else if !["--amqp=", "--stomp=", "--web-stomp="].iter().any(|p| a.starts_with(p)) {
                extra.push(a.clone());
            }
        }
        extra.extend(["--amqp".into(), amqp, "--stomp".into(), stomp, "--web-stomp".into(), web]);
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let tmp = self._tmp.take();
        let mut last = String::new();
        for _ in 0..50 {
            match Self::spawn(&self.data_dir, &args) {
                Ok(mut s) => {
                    s._tmp = tmp;
                    *self = s;
                    return;
                }
                Err(e) => last = e,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("restart on the same ports failed: {last}");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `sluice` with arguments and returns (exit code, stdout, stderr).
pub fn run_sluice(args: &[&str]) -> (i32, String, String) {
    // SLUICE_STOMP: a free port unless args choose one (the default,
    // 61613, would collide between parallel tests).
    let out = Command::new(sluice_bin())
        .args(args)
        .env("SLUICE_LOG", std::env::var("SLUICE_LOG").unwrap_or_else(|_| "warn".into()))
        .env("SLUICE_STOMP", "127.0.0.1:0")
        .env("SLUICE_ADMIN", "127.0.0.1:0")
        .output()
        .expect("run sluice");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running `sluice node`.
pub struct NodeProcess {
    /// The process (tests signal and wait on it).
    pub child: Child,
    /// The address its node protocol listens on.
    pub addr: String,
    /// Its metrics listener, when started with `--metrics`.
    pub metrics: Option<SocketAddr>,
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sluice node --id id --listen listen` with its data in
/// `home/dir` and the per-user config (so the default cluster secret)
/// under `home/config`, plus `extra` flags; waits for its listening line.
pub fn start_node(home: &Path, id: &str, dir: &str, listen: &str, extra: &[&str]) -> NodeProcess {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["node", "--id", id, "--listen", listen, "--data-dir"]).arg(home.join(dir)).args(extra);
    let (child, lines) = spawn_until_lines(cmd, home, "node protocol listening on ", Duration::from_secs(30));
    let find = |prefix: &str| lines.iter().find_map(|l| l.strip_prefix(prefix)).map(|a| a.trim().to_string());
    let addr = find("node protocol listening on ").unwrap_or_default();
    let metrics = find("metrics listening on ").and_then(|a| a.parse().ok());
    NodeProcess { child, addr, metrics }
}

/// Spawns `cmd` with the per-user config under `home/config`, quiet logs
/// and stdout piped, and returns it with every stdout line up to and
/// including the first that starts with `prefix` (panics if none comes
/// within `timeout`).
fn spawn_until_lines(mut cmd: Command, home: &Path, prefix: &'static str, timeout: Duration) -> (Child, Vec<String>) {
    // Logs show (in --no-capture runs) when SLUICE_LOG asks; otherwise
    // warnings and the gateway's queue-link events go to a file under
    // `home/logs/` that a failing test can print ([`print_logs`]).
    let (level, stderr) = match std::env::var("SLUICE_LOG") {
        Ok(level) => (level, Stdio::inherit()),
        Err(_) => {
            let dir = home.join("logs");
            let _ = std::fs::create_dir_all(&dir);
            static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let what: Vec<String> = cmd.get_args().take(3).map(|a| a.to_string_lossy().into_owned()).collect();
            let name = format!("{n:02}-{}.log", what.join("-").replace(['/', ' '], "_"));
            let file = std::fs::File::create(dir.join(name)).map(Stdio::from).unwrap_or_else(|_| Stdio::null());
            ("warn,sluice_cluster::remote=debug".to_owned(), file)
        }
    };
    let mut child = cmd
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", level)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn sluice");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let deadline = std::time::Instant::now() + timeout;
    let mut lines = Vec::new();
    let found = loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let Ok(line) = rx.recv_timeout(left) else { break false };
        let done = line.starts_with(prefix);
        lines.push(line);
        if done {
            break true;
        }
    };
    if !found {
        let _ = child.kill();
        let _ = child.wait();
        panic!("no line starting with {prefix:?} (got {lines:?})");
    }
    (child, lines)
}

/// Prints the last `lines` lines of every log under `home/logs/` (the
/// nodes' and gateways' started with that home), for a failing test.
pub fn print_logs(home: &Path, lines: usize) {
    let Ok(dir) = std::fs::read_dir(home.join("logs")) else { return };
    let mut files: Vec<PathBuf> = dir.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        let all = collapse_runs(text.lines());
        eprintln!("==== {} ({} lines after collapsing runs, last {lines}) ====", f.display(), all.len());
        for l in &all[all.len().saturating_sub(lines)..] {
            eprintln!("{l}");
        }
    }
}

/// Log lines with runs of lines alike but for their digits (a timestamp,
/// a sequence number) folded into the first, a count and the last, so a
/// flood of one event does not hide what came before it.
fn collapse_runs<'a>(lines: impl Iterator<Item = &'a str>) -> Vec<String> {
    fn shape(l: &str) -> String {
        l.chars().filter(|c| !c.is_ascii_digit()).collect()
    }
    let mut out = Vec::new();
    let mut run: Vec<&str> = Vec::new();
    let flush = |run: &mut Vec<&'a str>, out: &mut Vec<String>| {
        match run.len() {
            0 => {}
            1 | 2 => out.extend(run.iter().map(|l| (*l).to_owned())),
            n => {
                out.push(run[0].to_owned());
                out.push(format!("    ... {} more like it ...", n - 2));
                out.push(run[n - 1].to_owned());
            }
        }
        run.clear();
    };
    for l in lines {
        if run.first().is_some_and(|first| shape(first) != shape(l)) {
            flush(&mut run, &mut out);
        }
        run.push(l);
    }
    flush(&mut run, &mut out);
    out
}

/// Prints the logs under a test's home ([`print_logs`]) when dropped
/// while the test panics: a guard for tests without their own reporting.
pub struct LogsOnPanic(pub PathBuf);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            print_logs(&self.0, 200);
        }
    }
}

/// A running `sluice gateway`.
pub struct GatewayProcess {
    pub child: Child,
    /// The address its AMQP listener is bound to.
    pub amqp: String,
    /// The AMQP over TLS listener, when `--amqps` was given.
    pub amqps: Option<String>,
    /// The admin HTTP API listener.
    pub admin: Option<String>,
    /// The metrics listener.
    pub metrics: Option<SocketAddr>,
    /// The STOMP and Web-STOMP listeners.
    pub stomp: Option<String>,
    pub web_stomp: Option<String>,
    /// How it was started (for [`GatewayProcess::restart_same_ports`]).
    home: PathBuf,
    nodes: Vec<String>,
    extra: Vec<String>,
}

impl GatewayProcess {
    /// Stops the gateway (SIGTERM) and starts it again on the same
    /// listener ports (retrying while the ports are freed).
    pub fn restart_same_ports(&mut self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.child.wait();
        let mut extra: Vec<String> = self.extra.clone();
        for (flag, addr) in [("--amqp", Some(self.amqp.clone())), ("--stomp", self.stomp.clone()), ("--web-stomp", self.web_stomp.clone())] {
            if let Some(a) = addr {
                extra.push(flag.into());
                extra.push(a);
            }
        }
        let nodes: Vec<&str> = self.nodes.iter().map(String::as_str).collect();
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        for _ in 0..50 {
            let started = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| start_gateway(&self.home, &nodes, &args)));
            if let Ok(mut g) = started {
                g.extra = self.extra.clone();
                *self = g;
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("gateway restart on the same ports failed");
    }

    /// `amqp://guest:guest@ADDR/%2f`.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.amqp)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `sluice gateway --nodes nodes --amqp 127.0.0.1:0 --stomp 127.0.0.1:0` with the
/// per-user config (so the default cluster secret) under `home/config`;
/// waits for its listening line (it prints it once it has the metadata).
pub fn start_gateway(home: &Path, nodes: &[&str], extra: &[&str]) -> GatewayProcess {
    let mut cmd = Command::new(sluice_bin());
    cmd.args(["gateway", "--nodes", &nodes.join(",")]);
    if !has_flag(extra, "--amqp") {
        cmd.args(["--amqp", "127.0.0.1:0"]);
    }
    if !has_flag(extra, "--stomp") {
        cmd.args(["--stomp", "127.0.0.1:0"]);
    }
    if !has_flag(extra, "--web-stomp") {
        cmd.args(["--web-stomp", "127.0.0.1:0"]);
    }
    if !has_flag(extra, "--metrics") {
        cmd.args(["--metrics", "127.0.0.1:0"]);
    }
    if !has_flag(extra, "--admin") {
        cmd.args(["--admin", "127.0.0.1:0"]);
    }
    cmd.args(extra);
    // The Web-STOMP line comes after every other listener's.
    let (child, lines) = spawn_until_lines(cmd, home, "Web-STOMP listening on ", Duration::from_secs(40));
    let find = |prefix: &str| lines.iter().find_map(|l| l.strip_prefix(prefix)).map(|a| a.trim().to_string());
    let amqp = find("AMQP listening on ").expect("an AMQP listening line");
    let metrics = find("metrics listening on ").and_then(|a| a.parse().ok());
    GatewayProcess {
        child,
        amqp,
        amqps: find("AMQPS listening on "),
        admin: find("admin API listening on "),
        metrics,
        stomp: find("STOMP listening on "),
        web_stomp: find("Web-STOMP listening on "),
        home: home.to_path_buf(),
        nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        extra: extra.iter().map(|e| (*e).to_owned()).collect(),
    }
}

/// `sluice ctl --node addr status` lines, with the per-user config under
/// `home/config`; `None` if ctl failed.
pub fn ctl_status(home: &Path, addr: &str) -> Option<String> {
    let out = Command::new(sluice_bin())
        .args(["ctl", "--node", addr, "status"])
        .env("XDG_CONFIG_HOME", home.join("config"))
        .env("SLUICE_LOG", std::env::var("SLUICE_LOG").unwrap_or_else(|_| "error".into()))
        .output()
        .ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}
