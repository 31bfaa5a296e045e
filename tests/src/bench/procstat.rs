//! CPU time and memory of processes, read from `/proc` (Linux only).
//!
//! The bench reports CPU seconds per 1000 messages and peak RSS. For one
//! process (a relay, redis-server) that is `utime + stime` and `VmHWM`. For a
//! process tree (Postfix: master plus short-lived smtpd/cleanup/smtp
//! children) CPU is the root's own plus its reaped children's time
//! (`cutime + cstime`) plus that of the live descendants.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times (`getconf CLK_TCK`),
/// 100 on every Linux this runs on.
const TICKS_PER_SEC: f64 = 100.0;

/// Fields of `/proc/<pid>/stat` we use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stat {
    /// Parent pid.
    pub ppid: u32,
    /// User + system time of the process itself, in ticks.
    pub own_ticks: u64,
    /// User + system time of its reaped children, in ticks.
    pub children_ticks: u64,
}

/// Parses the text of `/proc/<pid>/stat`. The command name (field 2) may
/// contain spaces and parentheses, so fields are counted after its last `)`.
pub fn parse_stat(text: &str) -> Option<Stat> {
    let after = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // after ')': state(3) ppid(4) ... utime(14) stime(15) cutime(16) cstime(17)
    let field = |n: usize| -> Option<u64> { fields.get(n - 3)?.parse().ok() };
    Some(Stat {
        ppid: u32::try_from(field(4)?).ok()?,
        own_ticks: field(14)? + field(15)?,
        children_ticks: field(16)? + field(17)?,
    })
}

/// `/proc/<pid>/stat` of a live process.
pub fn stat(pid: u32) -> Option<Stat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU time (user + system) used by `pid` itself so far.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    stat(pid).map(|s| ticks(s.own_ticks))
}

/// A `kB` field of `/proc/<pid>/status`, e.g. `VmHWM` (peak RSS) or `VmRSS`.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_status_kb(&text, field)
}

/// Reads `field:   1234 kB` from the text of `/proc/<pid>/status`.
pub fn parse_status_kb(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// Every live process whose ancestors include `root` (not `root` itself).
pub fn descendants(root: u32) -> Vec<u32> {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some(s) = stat(pid) {
                parents.push((pid, s.ppid));
            }
        }
    }
    let mut found = vec![root];
    let mut i = 0;
    while i < found.len() {
        let p = found[i];
        found.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    found.remove(0);
    found
}

/// CPU time of a whole process tree: the root, its reaped children, and
/// every live descendant.
pub fn tree_cpu_time(root: u32) -> Option<Duration> {
    let s = stat(root)?;
    let live: u64 = descendants(root)
        .into_iter()
        .filter_map(stat)
        .map(|s| s.own_ticks)
        .sum();
    Some(ticks(s.own_ticks + s.children_ticks + live))
}

/// Summed `VmRSS` of a process tree right now, in kB. Shared pages (the
/// same binary in 100 smtpd processes) count once per process: see
/// [`tree_pss_kb`] for a fair sum.
pub fn tree_rss_kb(root: u32) -> u64 {
    std::iter::once(root)
        .chain(descendants(root))
        .filter_map(|p| status_kb(p, "VmRSS"))
        .sum()
}

/// Proportional set size of one process in kB (`/proc/<pid>/smaps_rollup`):
/// its private pages plus its share of pages shared with others.
pub fn pss_kb(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    parse_status_kb(&text, "Pss")
}

/// Summed PSS of a process tree right now, in kB: the memory the whole tree
/// costs the machine, shared pages counted once.
pub fn tree_pss_kb(root: u32) -> u64 {
    std::iter::once(root)
        .chain(descendants(root))
        .filter_map(pss_kb)
        .sum()
}

fn ticks(t: u64) -> Duration {
    Duration::from_secs_f64(t as f64 / TICKS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_spaces_in_name() {
        let text = "1234 (we ird) name) S 77 1 1 0 -1 4194560 100 0 0 0 250 50 7 3 20 0 1 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                ppid: 77,
                own_ticks: 300,
                children_ticks: 10
            })
        );
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn parses_status_fields() {
        let text = "Name:\tx\nVmHWM:\t   10240 kB\nVmRSS:\t    9000 kB\n";
        assert_eq!(parse_status_kb(text, "VmHWM"), Some(10240));
        assert_eq!(parse_status_kb(text, "VmRSS"), Some(9000));
        assert_eq!(parse_status_kb(text, "VmPeak"), None);
    }

    #[test]
    fn reads_own_process() {
        let me = std::process::id();
        assert!(cpu_time(me).is_some());
        assert!(status_kb(me, "VmHWM").unwrap_or(0) > 0);
        assert!(pss_kb(me).unwrap_or(0) > 0);
    }
}
