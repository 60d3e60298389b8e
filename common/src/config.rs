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

#[cfg(test)]
mod tests {
    use super::*;

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
