//! Validation helpers shared by both binaries' configurations. Each pushes a message that
//! names the flag and the offending value onto `errs`, so that all errors are reported at once.

use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;

/// A listen address, or None for `off` / empty.
pub fn listen_addr(flag: &str, v: &str, errs: &mut Vec<String>) -> Option<SocketAddr> {
    if v.eq_ignore_ascii_case("off") || v.is_empty() {
        return None;
    }
    match v.parse() {
        Ok(a) => Some(a),
        Err(e) => {
            errs.push(format!("--{flag} {v:?}: {e}"));
            None
        }
    }
}

/// The VPN transfer networks: one IPv4 and/or one IPv6 network.
pub fn vpn_networks(v: &str, errs: &mut Vec<String>) -> Vec<IpNet> {
    match crate::cidr::parse_list(v) {
        Ok(set) => {
            let nets: Vec<IpNet> = set.iter().copied().collect();
            let v4 = nets.iter().filter(|n| matches!(n, IpNet::V4(_))).count();
            if nets.is_empty() || v4 > 1 || nets.len() - v4 > 1 {
                errs.push(format!(
                    "--vpn-network {v:?}: give one IPv4 and/or one IPv6 network"
                ));
            }
            nets
        }
        Err(e) => {
            errs.push(format!("--vpn-network: {e}"));
            Vec::new()
        }
    }
}

/// The TUN device: a Linux interface name (1 to 15 bytes) and an MTU within 1280..=9000.
pub fn tun(name: &str, mtu: u16, errs: &mut Vec<String>) {
    if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
        errs.push(format!(
            "--tun-name {name:?}: must be 1 to 15 characters, no '/' or spaces"
        ));
    }
    if !(1280..=9000).contains(&mtu) {
        errs.push(format!("--mtu {mtu}: must be within 1280..=9000"));
    }
}

/// Keepalive interval and dead-peer timeout: keepalive at least 100 ms, and the timeout at
/// least two keepalive intervals (one lost keepalive must not end a healthy tunnel).
pub fn liveness(keepalive: Duration, dead_peer_timeout: Duration, errs: &mut Vec<String>) {
    if keepalive < Duration::from_millis(100) {
        errs.push(format!(
            "--keepalive {}: must be at least 100ms",
            humantime::format_duration(keepalive)
        ));
    }
    if dead_peer_timeout < keepalive.saturating_mul(2) {
        errs.push(format!(
            "--dead-peer-timeout {}: must be at least twice --keepalive ({})",
            humantime::format_duration(dead_peer_timeout),
            humantime::format_duration(keepalive)
        ));
    }
}

/// A flag value parsed leniently: clap keeps the parse result and validation reports every bad
/// value together with the others (clap itself would stop at the first).
#[derive(Clone, Debug)]
pub struct Flag<T>(Result<T, String>);

impl<T: Clone> Flag<T> {
    /// The value, or None after pushing `--<flag> "<text>": <why>` onto `errs`.
    pub fn get(&self, flag: &str, errs: &mut Vec<String>) -> Option<T> {
        match &self.0 {
            Ok(v) => Some(v.clone()),
            Err(e) => {
                errs.push(format!("--{flag} {e}"));
                None
            }
        }
    }
}

/// Lenient parser of any `FromStr` value, for `#[arg(value_parser = parse::<T>)]`.
pub fn parse<T: std::str::FromStr>(s: &str) -> Result<Flag<T>, std::convert::Infallible>
where
    T::Err: std::fmt::Display,
{
    Ok(Flag(
        s.trim().parse::<T>().map_err(|e| format!("{s:?}: {e}")),
    ))
}

/// Lenient parser of durations like `10s`, `500ms`, `2m`.
pub fn duration(s: &str) -> Result<Flag<Duration>, std::convert::Infallible> {
    Ok(Flag(
        humantime::parse_duration(s.trim()).map_err(|e| format!("{s:?}: {e}")),
    ))
}

/// Parses a byte size: a number with an optional `KiB`, `MiB` or `GiB` suffix.
pub fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let (num, mul) = [("GiB", 1usize << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)]
        .iter()
        .find_map(|(suffix, m)| t.strip_suffix(suffix).map(|n| (n.trim(), *m)))
        .unwrap_or((t, 1));
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{s:?}: not a size (e.g. 4MiB, 512KiB, 65536)"));
    }
    num.parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(mul))
        .ok_or_else(|| format!("{s:?}: too large"))
}

/// Lenient parser of byte sizes like `4MiB` (see [`parse_bytes`]).
pub fn bytes(s: &str) -> Result<Flag<usize>, std::convert::Infallible> {
    Ok(Flag(parse_bytes(s)))
}

/// Lenient parser of an octal file mode like `0660` or `660` (at most `0777`).
pub fn file_mode(s: &str) -> Result<Flag<u32>, std::convert::Infallible> {
    let t = s.trim();
    let digits = t.strip_prefix("0o").unwrap_or(t);
    Ok(Flag(
        u32::from_str_radix(digits, 8)
            .ok()
            .filter(|m| *m <= 0o777 && !digits.is_empty())
            .ok_or_else(|| format!("{s:?}: not an octal mode (e.g. 0660)")),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_modes() {
        assert_eq!(parse_bytes("4MiB"), Ok(4 << 20));
        assert_eq!(parse_bytes(" 512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("65536"), Ok(65536));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        for bad in [
            "",
            "MiB",
            "-1",
            "+5",
            "1.5MiB",
            "4MB",
            "99999999999999999999999",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad}");
        }
        let mut errs = Vec::new();
        assert_eq!(file_mode("0660").unwrap().get("m", &mut errs), Some(0o660));
        assert_eq!(file_mode("600").unwrap().get("m", &mut errs), Some(0o600));
        assert_eq!(file_mode("0o640").unwrap().get("m", &mut errs), Some(0o640));
        assert!(errs.is_empty());
        for bad in ["", "0888", "1777", "rw"] {
            assert_eq!(file_mode(bad).unwrap().get("m", &mut errs), None, "{bad}");
        }
    }

    #[test]
    fn lenient_flags_collect_every_error() {
        let mut errs = Vec::new();
        let ok = duration("5s").unwrap().get("keepalive", &mut errs);
        let bad = duration("soon").unwrap().get("dial-timeout", &mut errs);
        let mtu = parse::<u16>("99999").unwrap().get("mtu", &mut errs);
        assert_eq!(ok, Some(Duration::from_secs(5)));
        assert_eq!((bad, mtu), (None, None));
        assert_eq!(errs.len(), 2);
        assert!(errs[0].starts_with("--dial-timeout \"soon\": "), "{errs:?}");
        assert!(errs[1].starts_with("--mtu \"99999\": "), "{errs:?}");
    }

    #[test]
    fn reports_offending_values() {
        let mut errs = Vec::new();
        assert!(listen_addr("metrics-listen", "off", &mut errs).is_none());
        assert!(listen_addr("metrics-listen", "nope", &mut errs).is_none());
        assert_eq!(vpn_networks("10.0.0.0/24,10.1.0.0/24", &mut errs).len(), 2);
        tun("a/b", 100, &mut errs);
        let all = errs.join("\n");
        assert!(all.contains("--metrics-listen \"nope\""), "{all}");
        assert!(all.contains("give one IPv4"), "{all}");
        assert!(all.contains("--tun-name \"a/b\""), "{all}");
        assert!(all.contains("--mtu 100"), "{all}");
        assert_eq!(errs.len(), 4);
    }
}
