//! Sets of IP networks (shoot pod, service and node networks; VPN network).
//!
//! Sets are small (a handful of networks), so lookups scan a vector. IPv4-mapped IPv6 addresses
//! (`::ffff:a.b.c.d`) are treated as their IPv4 address.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// Error from [`parse_list`], naming the offending item.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
#[error("invalid network {item:?}: expected address/prefix such as 10.0.0.0/8 or fd00::/64")]
pub struct CidrError {
    /// The item that failed to parse.
    pub item: String,
}

/// A set of IP networks, normalized (host bits cleared) and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidrSet {
    nets: Vec<IpNet>,
}

/// Parses a comma-separated list of networks (`10.0.0.0/8, fd00::/64`).
///
/// Whitespace around items and empty items are ignored, so `""` is the empty set. A bare
/// address is a host network (`/32` or `/128`). Host bits are cleared.
pub fn parse_list(s: &str) -> Result<CidrSet, CidrError> {
    let mut set = CidrSet::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let net = match item.parse::<IpNet>() {
            Ok(n) => n,
            Err(_) => item
                .parse::<IpAddr>()
                .map(IpNet::from)
                .map_err(|_| CidrError {
                    item: item.to_owned(),
                })?,
        };
        set.push(net);
    }
    Ok(set)
}

fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

impl CidrSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a network (normalized; duplicates are ignored).
    pub fn push(&mut self, net: IpNet) {
        let net = net.trunc();
        if !self.nets.contains(&net) {
            self.nets.push(net);
        }
    }

    /// Adds all given networks.
    pub fn extend<I: IntoIterator<Item = IpNet>>(&mut self, nets: I) {
        for n in nets {
            self.push(n);
        }
    }

    /// Whether `ip` lies in one of the networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = unmap(ip);
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether `net` shares at least one address with one of the networks.
    pub fn overlaps(&self, net: &IpNet) -> bool {
        self.nets
            .iter()
            .any(|n| n.contains(&net.network()) || net.contains(&n.network()))
    }

    /// Whether the set has no networks.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Number of networks.
    pub fn len(&self) -> usize {
        self.nets.len()
    }

    /// The networks in insertion order.
    pub fn iter(&self) -> std::slice::Iter<'_, IpNet> {
        self.nets.iter()
    }
}

impl Extend<IpNet> for CidrSet {
    fn extend<I: IntoIterator<Item = IpNet>>(&mut self, iter: I) {
        CidrSet::extend(self, iter);
    }
}

impl FromIterator<IpNet> for CidrSet {
    fn from_iter<I: IntoIterator<Item = IpNet>>(iter: I) -> Self {
        let mut s = Self::new();
        s.extend(iter);
        s
    }
}

impl<'a> IntoIterator for &'a CidrSet {
    type Item = &'a IpNet;
    type IntoIter = std::slice::Iter<'a, IpNet>;
    fn into_iter(self) -> Self::IntoIter {
        self.nets.iter()
    }
}

impl std::str::FromStr for CidrSet {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_list(s)
    }
}

impl fmt::Display for CidrSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, n) in self.nets.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            n.fmt(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn parse_and_contains() {
        let s = parse_list(" 100.96.0.0/11 ,10.0.0.5/24,, fd00:10::/48 ,10.0.0.0/24,").unwrap();
        assert_eq!(s.to_string(), "100.96.0.0/11,10.0.0.0/24,fd00:10::/48");
        assert_eq!(s.len(), 3);
        assert!(s.contains(ip("100.96.1.10")));
        assert!(s.contains(ip("100.127.255.255")));
        assert!(!s.contains(ip("100.128.0.0")));
        assert!(s.contains(ip("10.0.0.200")));
        assert!(s.contains(ip("::ffff:10.0.0.1")));
        assert!(!s.contains(ip("::ffff:10.0.1.1")));
        assert!(s.contains(ip("fd00:10::1")));
        assert!(!s.contains(ip("fd00:11::1")));
        assert!(parse_list("").unwrap().is_empty());
        assert!(parse_list(" , ").unwrap().is_empty());
        assert_eq!(parse_list("10.1.2.3").unwrap().to_string(), "10.1.2.3/32");
    }

    #[test]
    fn errors_name_item() {
        let e = parse_list("10.0.0.0/8, 10.0.0.0/33 ,x").unwrap_err();
        assert_eq!(e.item, "10.0.0.0/33");
        assert!(e.to_string().contains("10.0.0.0/33"));
        assert_eq!(parse_list("bogus").unwrap_err().item, "bogus");
    }

    #[test]
    fn overlaps_extend_display() {
        let mut s = parse_list("10.0.0.0/16").unwrap();
        assert!(s.overlaps(&"10.0.5.0/24".parse().unwrap()));
        assert!(s.overlaps(&"10.0.0.0/8".parse().unwrap()));
        assert!(!s.overlaps(&"10.1.0.0/16".parse().unwrap()));
        assert!(!s.overlaps(&"::/0".parse().unwrap()));
        s.extend(parse_list("fd00::/8,10.0.0.0/16").unwrap().iter().copied());
        assert_eq!(s.to_string(), "10.0.0.0/16,fd00::/8");
        assert_eq!(s.iter().count(), 2);
        assert_eq!(s.to_string().parse::<CidrSet>().unwrap(), s);
        let c: CidrSet = s.iter().copied().collect();
        assert_eq!(c, s);
    }

    proptest! {
        #[test]
        fn display_roundtrip(nets in proptest::collection::vec((any::<u32>(), 0u8..=32, any::<u128>(), 0u8..=128), 0..6)) {
            let mut s = CidrSet::new();
            for (a, p, b, q) in nets {
                s.push(IpNet::V4(ipnet::Ipv4Net::new(a.into(), p).unwrap()));
                s.push(IpNet::V6(ipnet::Ipv6Net::new(b.into(), q).unwrap()));
            }
            prop_assert_eq!(parse_list(&s.to_string()).unwrap(), s.clone());
            for n in s.iter() {
                prop_assert!(s.contains(n.network()) && s.contains(n.broadcast()));
            }
        }

        #[test]
        fn parse_never_panics(text in ".{0,80}") {
            let _ = parse_list(&text);
        }
    }
}
