//! Resource alarms (RabbitMQ's memory and free-disk alarms).
//!
//! A monitor task checks, every [`CHECK_EVERY`], this process's resident
//! memory (`/proc/self/statm`) against the memory high watermark (a
//! fraction of the machine's RAM from `/proc/meminfo`, or bytes), and the
//! free space of the data directory's file system (`statvfs`) against the
//! free-disk limit. While an alarm is on, connections that publish stop
//! being read (see the AMQP and STOMP session loops); nothing already read
//! is dropped, and confirms come only for what was stored.
//!
//! `sluice serve` checks both; `sluice gateway` checks its own memory only
//! (it has no data directory). The limits can be changed at run time by
//! editing the config file and sending SIGHUP.

use std::path::PathBuf;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

/// How often memory and disk are checked (RabbitMQ: 0.5 s for memory,
/// 10 s at most for disk).
pub const CHECK_EVERY: Duration = Duration::from_secs(1);

/// RabbitMQ's default `vm_memory_high_watermark.relative`.
pub const DEFAULT_MEMORY_FRACTION: f64 = 0.4;
/// RabbitMQ's default `disk_free_limit.absolute` (50 MB).
pub const DEFAULT_DISK_FREE_LIMIT: u64 = 50_000_000;

/// The memory high watermark.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MemoryWatermark {
    /// A fraction of the machine's RAM (`memory_high_watermark`).
    Fraction(f64),
    /// Bytes (`memory_high_watermark_bytes`).
    Bytes(u64),
}

/// The alarm thresholds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlarmLimits {
    pub memory: MemoryWatermark,
    /// Free bytes below which the disk alarm is on.
    pub disk_free_limit: u64,
}

impl Default for AlarmLimits {
    fn default() -> Self {
        AlarmLimits { memory: MemoryWatermark::Fraction(DEFAULT_MEMORY_FRACTION), disk_free_limit: DEFAULT_DISK_FREE_LIMIT }
    }
}

/// Which alarms are on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AlarmState {
    pub memory: bool,
    pub disk: bool,
}

impl AlarmState {
    pub fn any(self) -> bool {
        self.memory || self.disk
    }

    fn or(self, other: AlarmState) -> AlarmState {
        AlarmState { memory: self.memory || other.memory, disk: self.disk || other.disk }
    }

    /// The `reason` of connection.blocked (RabbitMQ's texts).
    pub fn reason(self) -> &'static str {
        match (self.memory, self.disk) {
            (true, true) => "low on memory & disk",
            (true, false) => "low on memory",
            (false, true) => "low on disk",
            (false, false) => "",
        }
    }
}

/// The broker's alarms: the state connections watch, and the limits.
pub struct Alarms {
    /// This process's alarms or'ed with the storage nodes' (what
    /// connections obey).
    state: watch::Sender<AlarmState>,
    /// This process's own alarms.
    local: Mutex<AlarmState>,
    /// The storage nodes' alarms (a gateway's; see [`Alarms::set_remote`]).
    remote: Mutex<AlarmState>,
    limits: Mutex<AlarmLimits>,
    /// The directory whose file system is watched; `None`: no disk alarm.
    disk_path: Option<PathBuf>,
}

impl Alarms {
    pub fn new(limits: AlarmLimits, disk_path: Option<PathBuf>) -> Arc<Alarms> {
        Arc::new(Alarms {
            state: watch::Sender::new(AlarmState::default()),
            local: Mutex::new(AlarmState::default()),
            remote: Mutex::new(AlarmState::default()),
            limits: Mutex::new(limits),
            disk_path,
        })
    }

    /// A receiver that sees every change of the alarm state.
    pub fn subscribe(&self) -> watch::Receiver<AlarmState> {
        self.state.subscribe()
    }

    pub fn state(&self) -> AlarmState {
        *self.state.borrow()
    }

    pub fn limits(&self) -> AlarmLimits {
        self.limits.lock().map(|l| *l).unwrap_or_default()
    }

    /// Replaces the limits (config reload) and checks at once.
    pub fn set_limits(&self, limits: AlarmLimits) {
        if let Ok(mut l) = self.limits.lock() {
            *l = limits;
        }
        self.check();
    }

    /// Checks memory and disk once and sets or clears the alarms.
    pub fn check(&self) {
        let limits = self.limits();
        let Ok(mut local) = self.local.lock() else { return };
        let mut next = *local;
        if let Some(rss) = resident_bytes() {
            let limit = match limits.memory {
                MemoryWatermark::Bytes(b) => Some(b),
                MemoryWatermark::Fraction(f) => total_memory().map(|total| (total as f64 * f) as u64),
            };
            if let Some(limit) = limit {
                let on = rss > limit;
                if on != next.memory {
                    if on {
                        tracing::warn!(used = rss, limit, "memory resource limit alarm set: publishers are blocked until memory use drops below the limit");
                    } else {
                        tracing::info!(used = rss, limit, "memory resource limit alarm cleared");
                    }
                    next.memory = on;
                }
            }
        }
        if let Some(path) = &self.disk_path {
            match free_disk(path) {
                Some(free) => {
                    let on = free < limits.disk_free_limit;
                    if on != next.disk {
                        let limit = limits.disk_free_limit;
                        if on {
                            tracing::warn!(free, limit, dir = %path.display(), "disk resource limit alarm set: publishers are blocked until free disk space is above the limit");
                        } else {
                            tracing::info!(free, limit, dir = %path.display(), "disk resource limit alarm cleared");
                        }
                        next.disk = on;
                    }
                }
                None => tracing::debug!(dir = %path.display(), "cannot read free disk space"),
            }
        }
        *local = next;
        drop(local);
        self.publish();
    }

    /// Sets the storage nodes' alarms (a gateway polls them); `nodes`
    /// names the nodes that have one, for the log.
    pub fn set_remote(&self, remote: AlarmState, nodes: &str) {
        let Ok(mut r) = self.remote.lock() else { return };
        if *r != remote {
            if remote.any() {
                tracing::warn!(nodes, reason = remote.reason(), "storage node resource alarm set: publishers are blocked");
            } else {
                tracing::info!("storage node resource alarms cleared");
            }
            *r = remote;
        }
        drop(r);
        self.publish();
    }

    /// Publishes local-or-remote to the connections and the metrics.
    fn publish(&self) {
        let local = self.local.lock().map(|s| *s).unwrap_or_default();
        let remote = self.remote.lock().map(|s| *s).unwrap_or_default();
        let next = local.or(remote);
        crate::metrics::ALARM_MEMORY.store(i64::from(next.memory), Relaxed);
        crate::metrics::ALARM_DISK.store(i64::from(next.disk), Relaxed);
        self.state.send_if_modified(|s| {
            let changed = *s != next;
            *s = next;
            changed
        });
    }

    /// Checks now, then every [`CHECK_EVERY`], for the life of the process.
    pub fn spawn_monitor(self: &Arc<Self>) {
        let me = self.clone();
        me.check();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECK_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                // statvfs can block on a sick file system: off the workers.
                let m = me.clone();
                let _ = tokio::task::spawn_blocking(move || m.check()).await;
            }
        });
    }
}

/// This process's resident set size.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages.saturating_mul(page_size()))
}

fn page_size() -> u64 {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|n| *n > 0).unwrap_or(4096)
}

/// The machine's RAM (`MemTotal`).
pub fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

/// Bytes available to unprivileged users on `path`'s file system.
pub fn free_disk(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs fills the zeroed struct; `c` outlives the call.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return None;
    }
    #[allow(clippy::unnecessary_cast)]
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        assert!(resident_bytes().is_some_and(|b| b > 0));
        assert!(total_memory().is_some_and(|b| b > 0));
        assert!(free_disk(std::path::Path::new("/")).is_some());
        assert!(free_disk(std::path::Path::new("/no/such/dir")).is_none());
    }

    #[test]
    fn absolute_limit_sets_and_clears() {
        let a = Alarms::new(AlarmLimits { memory: MemoryWatermark::Bytes(1), disk_free_limit: 0 }, Some("/".into()));
        a.check();
        assert_eq!(a.state(), AlarmState { memory: true, disk: false });
        a.set_limits(AlarmLimits { memory: MemoryWatermark::Bytes(u64::MAX), disk_free_limit: u64::MAX });
        assert_eq!(a.state(), AlarmState { memory: false, disk: true });
        assert_eq!(a.state().reason(), "low on disk");
    }
}
