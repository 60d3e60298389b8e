//! Kernel parameters under `/proc/sys`, read and written directly.
//!
//! Keys use the `sysctl(8)` forms: `net.ipv4.ip_forward` (dot-separated) or
//! `net/ipv4/conf/eth0.100/rp_filter` (slash-separated, dots literal). Interface names may
//! contain dots, so code that builds a key from an interface name should use [`set_path`] /
//! [`get_path`] with explicit segments instead.
//!
//! `/proc/sys/net` shows the network namespace of the calling thread.

use std::path::PathBuf;

/// Errors of sysctl access; each names the key.
#[derive(Debug, thiserror::Error)]
pub enum SysctlError {
    /// The key is empty, has an empty, `.` or `..` segment, or a NUL byte.
    #[error("invalid sysctl key {key:?}")]
    InvalidKey {
        /// The rejected key.
        key: String,
    },
    /// Reading or writing the file failed.
    #[error("sysctl {key}: {op}: {source}")]
    Io {
        /// The key (dot-joined segments).
        key: String,
        /// `read` or `write`.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Value of `rp_filter` for loose reverse-path filtering.
pub const RP_FILTER_LOOSE: &str = "2";

/// Writes `value` to the sysctl `key` (`net.ipv4.ip_forward` or `net/ipv4/ip_forward`).
pub fn set(key: &str, value: &str) -> Result<(), SysctlError> {
    set_path(&split_key(key), value)
}

/// Reads the sysctl `key`, trimmed of surrounding whitespace.
pub fn get(key: &str) -> Result<String, SysctlError> {
    get_path(&split_key(key))
}

/// Writes `value` to the sysctl given by path segments, e.g.
/// `&["net", "ipv4", "conf", "eth0.100", "rp_filter"]`. A value that is already set is not
/// written again, so a container whose `/proc/sys` is read-only starts when an init container
/// (or the pod's `securityContext.sysctls`) set the values before.
pub fn set_path(segments: &[&str], value: &str) -> Result<(), SysctlError> {
    if get_path(segments).is_ok_and(|v| v == value.trim()) {
        return Ok(());
    }
    let (key, path) = resolve(segments)?;
    std::fs::write(&path, value).map_err(|source| SysctlError::Io {
        key,
        op: "write",
        source,
    })
}

/// Reads the sysctl given by path segments, trimmed of surrounding whitespace.
pub fn get_path(segments: &[&str]) -> Result<String, SysctlError> {
    let (key, path) = resolve(segments)?;
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| SysctlError::Io {
            key,
            op: "read",
            source,
        })
}

/// Whether the sysctl given by path segments exists (e.g. IPv6 may be compiled out).
pub fn exists_path(segments: &[&str]) -> bool {
    resolve(segments).is_ok_and(|(_, path)| path.exists())
}

/// Shoot side: forward between the TUN and the node network.
///
/// Sets `net.ipv4.ip_forward=1`, `rp_filter=2` (loose) on `all`, `default` and the TUN, and
/// with `v6` also `net.ipv6.conf.all.forwarding=1`. Note that IPv6 forwarding makes the
/// kernel ignore router advertisements on interfaces whose `accept_ra` is 1.
pub fn shoot_forwarding(tun: &str, v6: bool) -> Result<(), SysctlError> {
    set_path(&["net", "ipv4", "ip_forward"], "1")?;
    for dev in ["all", "default", tun] {
        set_path(&["net", "ipv4", "conf", dev, "rp_filter"], RP_FILTER_LOOSE)?;
    }
    if v6 {
        set_path(&["net", "ipv6", "conf", "all", "forwarding"], "1")?;
    }
    Ok(())
}

/// Seed side: reverse-path filtering off on the TUN.
///
/// Packets from the tunnel come from the shoot's networks, for which the seed usually has no
/// route but the TUN's policy table, which a reverse-path lookup (no output interface) never
/// consults: even loose mode drops them when the main table has no default route. The flow
/// table already admits only replies to seed-initiated flows from the shoot networks, so the
/// TUN gets `rp_filter=0`. The kernel uses `max(conf.all.rp_filter, conf.<tun>.rp_filter)`:
/// a strict `all` (1) is lowered to loose (2), which keeps filtering on for every interface
/// that has its own value 1; then loose mode applies to the TUN and works where the seed has
/// a default route, as every pod does.
pub fn seed_tun(tun: &str) -> Result<(), SysctlError> {
    set_path(&["net", "ipv4", "conf", tun, "rp_filter"], "0")?;
    let all = ["net", "ipv4", "conf", "all", "rp_filter"];
    if get_path(&all)? == "1" {
        set_path(&all, RP_FILTER_LOOSE)?;
    }
    let accept_ra = ["net", "ipv6", "conf", tun, "accept_ra"];
    if exists_path(&accept_ra) {
        set_path(&accept_ra, "0")?;
    }
    Ok(())
}

/// Prepares an interface for static IPv6 addresses: `disable_ipv6=0`, `accept_dad=0`
/// (the address is usable at once; the moral equivalent of `nodad`). Does nothing when the
/// interface has no IPv6 configuration directory.
pub fn ipv6_static(ifname: &str) -> Result<(), SysctlError> {
    if !exists_path(&["net", "ipv6", "conf", ifname]) {
        return Ok(());
    }
    set_path(&["net", "ipv6", "conf", ifname, "disable_ipv6"], "0")?;
    set_path(&["net", "ipv6", "conf", ifname, "accept_dad"], "0")
}

/// Splits on `/` when the key has one (sysctl(8) convention), else on `.`. Segments are
/// validated by `resolve`.
fn split_key(key: &str) -> Vec<&str> {
    let sep = if key.contains('/') { '/' } else { '.' };
    key.split(sep).collect()
}

fn resolve(segments: &[&str]) -> Result<(String, PathBuf), SysctlError> {
    let key = segments.join(".");
    let bad = |s: &&str| s.is_empty() || *s == "." || *s == ".." || s.contains(['/', '\0']);
    if segments.is_empty() || segments.iter().any(bad) {
        return Err(SysctlError::InvalidKey { key });
    }
    let mut path = PathBuf::from("/proc/sys");
    path.extend(segments);
    Ok((key, path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_resolve_to_proc_paths() {
        let (k, p) = resolve(&split_key("net.ipv4.ip_forward")).unwrap();
        assert_eq!(k, "net.ipv4.ip_forward");
        assert_eq!(p, PathBuf::from("/proc/sys/net/ipv4/ip_forward"));
        let (_, p) = resolve(&split_key("net/ipv4/conf/eth0.100/rp_filter")).unwrap();
        assert_eq!(
            p,
            PathBuf::from("/proc/sys/net/ipv4/conf/eth0.100/rp_filter")
        );
        let (_, p) = resolve(&["net", "ipv4", "conf", "a.b", "rp_filter"]).unwrap();
        assert_eq!(p, PathBuf::from("/proc/sys/net/ipv4/conf/a.b/rp_filter"));
    }

    #[test]
    fn weird_keys_are_rejected() {
        for key in [
            "",
            ".",
            "net..ipv4",
            "net.ipv4.",
            "/net/ipv4",
            "net/../../etc/passwd",
            "net/./ipv4",
            "net.ip\0v4",
        ] {
            assert!(
                matches!(get(key), Err(SysctlError::InvalidKey { .. })),
                "{key:?}"
            );
        }
        assert!(set_path(&["net", "..", "x"], "1").is_err());
        assert!(set_path(&["net", "a/b"], "1").is_err());
        assert!(set_path(&[], "1").is_err());
    }

    #[test]
    fn reads_a_present_key() {
        // Present on every Linux with procfs.
        assert!(!get("kernel.ostype").unwrap().is_empty());
    }
}
