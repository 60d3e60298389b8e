//! What the bench reads from the system: process RSS and CPU time, listening sockets of the
//! calling thread's namespace, file-descriptor limits, and machine facts for the report.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

/// Resident set size of `pid` in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no VmRSS for pid {pid}"))
}

/// User plus system CPU time of `pid` (all its threads) in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at field 3 (state).
    let rest = s
        .rsplit_once(')')
        .map(|(_, r)| r)
        .with_context(|| format!("bad /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: indexes 11 and 12 here.
    let num = |i: usize| -> Result<u64> {
        f.get(i)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("bad /proc/{pid}/stat field {}", i + 3))
    };
    Ok(num(11)? + num(12)?)
}

/// Summed CPU seconds of `pids` (processes that are gone count as zero).
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let hz = clock_ticks_per_second() as f64;
    pids.iter()
        .map(|&p| cpu_ticks(p).unwrap_or(0) as f64 / hz)
        .sum()
}

/// Number of open file descriptors of `pid`.
pub fn open_fds(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("list /proc/{pid}/fd"))?
        .count())
}

/// `sysconf(_SC_CLK_TCK)`, the unit of `/proc/<pid>/stat` times.
// FFI glue: sysconf(3) has no std wrapper.
#[allow(unsafe_code)]
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value; no memory is passed.
    let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(100)
}

/// Raises `RLIMIT_NOFILE` to at least `n` (soft and hard; raising the hard limit needs
/// `CAP_SYS_RESOURCE`). Without that capability the soft limit goes to the hard limit.
/// Child processes inherit the result. Returns the new `(soft, hard)`.
// FFI glue: getrlimit/setrlimit on local structs.
#[allow(unsafe_code)]
pub fn raise_nofile(n: u64) -> Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit for the duration of the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    let both = libc::rlimit {
        rlim_cur: lim.rlim_cur.max(n),
        rlim_max: lim.rlim_max.max(n),
    };
    // SAFETY: `both` is a valid rlimit read by the kernel during the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &both) } == 0 {
        return Ok((both.rlim_cur, both.rlim_max));
    }
    let soft = libc::rlimit {
        rlim_cur: lim.rlim_max,
        rlim_max: lim.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("setrlimit(RLIMIT_NOFILE) to the hard limit");
    }
    Ok((soft.rlim_cur, soft.rlim_max))
}

/// Whether a TCP socket listens on `port` in the network namespace of the calling thread
/// (read from `/proc/thread-self/net/tcp{,6}`, so nothing connects to the listener).
pub fn listening_here(port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
            .map(|s| tcp_table_listens(&s, port, None))
            .unwrap_or(false)
    })
}

/// Number of TCP connections on local `port` in the calling thread's namespace that are not
/// yet finished (any state but LISTEN, TIME_WAIT and CLOSE).
pub fn active_conns_here(port: u16) -> usize {
    ["tcp", "tcp6"]
        .iter()
        .map(|f| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                .map(|s| tcp_table_active(&s, port))
                .unwrap_or(0)
        })
        .sum()
}

/// Waits until no unfinished TCP connection on local `port` is left in `ns` (polled every
/// 10 ms); returns how long that took, or an error naming what is left after `timeout`.
pub fn wait_port_idle(ns: &Netns, port: u16, timeout: Duration) -> Result<Duration> {
    ns.in_ns(move || {
        let start = Instant::now();
        loop {
            let left = active_conns_here(port);
            if left == 0 {
                return Ok(start.elapsed());
            }
            if start.elapsed() >= timeout || super::interrupted() {
                bail!("{left} connections on port {port} still open after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    })?
}

/// Number of unfinished TCP connections on local `port` in `ns`.
pub fn port_conns(ns: &Netns, port: u16) -> Result<usize> {
    ns.in_ns(move || active_conns_here(port))
}

/// Entries of a `/proc/net/tcp`-format table on local `port` in an unfinished state.
pub fn tcp_table_active(table: &str, port: u16) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && !matches!(f.get(3), Some(&"0A" | &"06" | &"07"))
        })
        .count()
}

/// Whether a `/proc/net/tcp`-format table holds a LISTEN socket on `port` (and, if given, on
/// IPv4 address `addr` or the wildcard).
pub fn tcp_table_listens(table: &str, port: u16, addr: Option<Ipv4Addr>) -> bool {
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(local), Some(state)) = (f.get(1), f.get(3)) else {
            return false;
        };
        let Some((ip, p)) = local.rsplit_once(':') else {
            return false;
        };
        if *state != "0A" || u16::from_str_radix(p, 16).ok() != Some(port) {
            return false;
        }
        match addr {
            None => true,
            Some(want) => u32::from_str_radix(ip, 16)
                .map(|v| {
                    let a = Ipv4Addr::from(v.to_ne_bytes());
                    a == want || a.is_unspecified()
                })
                .unwrap_or(false),
        }
    })
}

/// Whether `program` is on `PATH`.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// First line of `program args…` output (stdout, else stderr), or `None`.
pub fn first_line(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text = if out.stdout.is_empty() {
        out.stderr
    } else {
        out.stdout
    };
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_owned())
}

/// Facts about the machine for the top of the report.
#[derive(Debug, Clone)]
pub struct MachineInfo {
    /// UTC time of the run, ISO 8601.
    pub date: String,
    /// Online CPUs.
    pub nproc: usize,
    /// CPU model name.
    pub cpu: String,
    /// Kernel release.
    pub kernel: String,
    /// Total memory in GiB.
    pub mem_gib: f64,
    /// `iperf3 --version`.
    pub iperf3: String,
    /// `openvpn --version`, if installed.
    pub openvpn: Option<String>,
}

impl MachineInfo {
    /// Collects the facts.
    pub fn collect() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find_map(|l| {
                l.strip_prefix("model name")
                    .and_then(|r| r.split_once(':'))
                    .map(|(_, v)| v.trim().to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        let mem_kib: f64 = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0.0);
        Self {
            date: iso_utc(now_secs()),
            nproc: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            mem_gib: mem_kib / (1024.0 * 1024.0),
            iperf3: first_line("iperf3", &["--version"]).unwrap_or_else(|| "missing".into()),
            openvpn: have("openvpn")
                .then(|| first_line("openvpn", &["--version"]))
                .flatten(),
        }
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Civil UTC date of `secs` since the epoch as `(year, month, day, hour, minute, second)`.
fn civil(secs: u64) -> (i64, u32, u32, u32, u32, u32) {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days-to-civil conversion for the proleptic Gregorian calendar (eras of 400 years).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

/// `2026-01-31T12:34:56Z`.
pub fn iso_utc(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}Z")
}

/// `20260131-123456`, for directory names.
pub fn stamp(secs: u64) -> String {
    let (y, mo, d, h, mi, s) = civil(secs);
    format!("{y:04}{mo:02}{d:02}-{h:02}{mi:02}{s:02}")
}

/// Fails unless we run as root.
pub fn require_root() -> Result<()> {
    if !crate::env::is_root() {
        bail!("the bench needs root (network namespaces); run it as root");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(stamp(1_700_000_000), "20231114-221320");
    }

    #[test]
    fn tcp_table() {
        let t = "  sl  local_address rem_address   st tx_queue\n\
                 0: 014DA8C0:04AA 00000000:0000 0A 00000000:00000000\n\
                 1: 0100007F:24E3 0100007F:9C40 01 00000000:00000000\n";
        assert!(tcp_table_listens(t, 1194, None));
        assert!(tcp_table_listens(
            t,
            1194,
            Some(Ipv4Addr::new(192, 168, 77, 1))
        ));
        assert!(!tcp_table_listens(
            t,
            1194,
            Some(Ipv4Addr::new(10, 0, 0, 1))
        ));
        assert!(!tcp_table_listens(t, 9443, None));
        assert_eq!(tcp_table_active(t, 1194), 0);
        assert_eq!(tcp_table_active(t, 9443), 1);
    }

    #[test]
    fn own_process_stats() {
        let me = std::process::id();
        assert!(rss_kib(me).unwrap() > 0);
        cpu_ticks(me).unwrap();
        assert!(open_fds(me).unwrap() > 0);
    }
}
