//! Machine facts from `/proc`: core count, load average, and CPU time of the
//! harness and of the whole machine (to tell how busy the cores were during
//! a phase). Every reader returns `None` where `/proc` is unavailable.

/// Linux's `USER_HZ`, the unit of `/proc/*/stat` times (100 on every
/// mainstream architecture).
const USER_HZ: f64 = 100.0;

/// Cores available to this process.
pub fn nproc() -> usize {
    std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
}

/// Ask the kernel for the least timer slack on the calling thread, so that
/// its sleeps end within microseconds of their deadline instead of up to
/// the default 50 µs late. Returns whether it took; best effort, no
/// privileges needed for one's own thread.
pub fn tighten_timer_slack() -> bool {
    // `/proc/thread-self` links to `PID/task/TID`; `/proc/TID` is the thread.
    let Ok(link) = std::fs::read_link("/proc/thread-self") else {
        return false;
    };
    let Some(tid) = link.file_name().and_then(|t| t.to_str()) else {
        return false;
    };
    let path = format!("/proc/{tid}/timerslack_ns");
    std::fs::write(&path, "1").is_ok()
        && std::fs::read_to_string(&path).is_ok_and(|v| v.trim() == "1")
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> Option<[f64; 3]> {
    parse_loadavg(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

fn parse_loadavg(text: &str) -> Option<[f64; 3]> {
    let mut it = text.split_whitespace().map(str::parse::<f64>);
    Some([it.next()?.ok()?, it.next()?.ok()?, it.next()?.ok()?])
}

/// CPU counters at one instant.
#[derive(Debug, Clone, Copy)]
pub struct CpuSnapshot {
    /// User + system time of this process, seconds.
    own_secs: Option<f64>,
    /// (busy, total) jiffies of the whole machine.
    machine: Option<(u64, u64)>,
}

impl CpuSnapshot {
    /// Read the counters now.
    pub fn now() -> Self {
        Self {
            own_secs: std::fs::read_to_string("/proc/self/stat")
                .ok()
                .and_then(|t| parse_self_stat(&t)),
            machine: std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|t| parse_proc_stat(&t)),
        }
    }

    /// Harness CPU since `earlier`, in percent of one core over `wall_secs`.
    pub fn own_pct_since(&self, earlier: &Self, wall_secs: f64) -> Option<f64> {
        let used = self.own_secs? - earlier.own_secs?;
        (wall_secs > 0.0).then(|| 100.0 * used / wall_secs)
    }

    /// Share of all cores' time that was busy since `earlier`, percent.
    pub fn machine_busy_pct_since(&self, earlier: &Self) -> Option<f64> {
        let (b1, t1) = self.machine?;
        let (b0, t0) = earlier.machine?;
        let total = t1.checked_sub(t0)?;
        let busy = b1.checked_sub(b0)?;
        (total > 0).then(|| 100.0 * busy as f64 / total as f64)
    }
}

/// utime + stime of `/proc/self/stat`, in seconds.
fn parse_self_stat(text: &str) -> Option<f64> {
    // The command name (field 2) may hold spaces: skip past its ')'.
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    // After ')': field 3 (state) is index 0, so utime (14) is index 11.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some((utime + stime) as f64 / USER_HZ)
}

/// (busy, total) from the aggregate `cpu` line of `/proc/stat`.
fn parse_proc_stat(text: &str) -> Option<(u64, u64)> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map_while(|f| f.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (v.len() >= 4).then(|| (total.saturating_sub(idle), total))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)]
    use super::*;

    #[test]
    fn parses_proc_formats() {
        assert_eq!(
            parse_loadavg("1.02 0.58 0.25 1/141 10094\n"),
            Some([1.02, 0.58, 0.25])
        );
        assert_eq!(parse_loadavg("garbage"), None);
        let stat = "1234 (a b) c) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 4 0";
        assert_eq!(parse_self_stat(stat), Some(2.0));
        let ps = "cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n";
        assert_eq!(parse_proc_stat(ps), Some((150, 1000)));
        assert!(nproc() >= 1);
        let a = CpuSnapshot::now();
        let b = CpuSnapshot::now();
        if let Some(p) = b.own_pct_since(&a, 1.0) {
            assert!(p >= 0.0);
        }
    }
}
