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

#[cfg(test)]
mod tests {
    use super::*;

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
