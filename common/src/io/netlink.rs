//! Routes and policy rules over rtnetlink.
//!
//! All operations are idempotent: adding what exists or deleting what is gone succeeds.
//! They act on the network namespace the [`Netlink`] socket was opened in.
//!
//! Seed side (DESIGN §4): [`Netlink::install_seed_routing`] puts `default dev <tun>` into a
//! dedicated table and adds `oif <tun> lookup <table>` rules; a socket bound to the TUN
//! (`SO_BINDTODEVICE`) then routes through it with the TUN's source address even where the
//! main table has an overlapping route, and the main table stays untouched. Replies to such
//! sockets fail a strict reverse-path check, so pair this with
//! [`sysctl::seed_tun`](super::sysctl::seed_tun).

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use rtnetlink::packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::{Handle, RouteMessageBuilder};

/// The main routing table (`table None` means this).
pub const MAIN_TABLE: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// Errors of netlink operations; each names the object and carries the OS error.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Opening the rtnetlink socket failed.
    #[error("netlink: open socket: {0}")]
    Open(#[source] io::Error),
    /// No interface with this name.
    #[error("link {name}: not found")]
    LinkNotFound {
        /// Interface name.
        name: String,
    },
    /// A request failed; `object` describes it like `ip` would (`route 0.0.0.0/0 dev 7 table 100`).
    #[error("{op} {object}: {source}")]
    Request {
        /// `add`, `delete` or `list`.
        op: &'static str,
        /// The object acted on.
        object: String,
        /// The OS error (or a protocol error wrapped as `io::Error`).
        #[source]
        source: io::Error,
    },
}

impl NetError {
    /// The OS error number, if the kernel returned one.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetError::Open(e) | NetError::Request { source: e, .. } => e.raw_os_error(),
            NetError::LinkNotFound { .. } => Some(libc::ENODEV),
        }
    }
}

/// An rtnetlink connection; its driver task runs on the tokio runtime until this is dropped.
pub struct Netlink {
    handle: Handle,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for Netlink {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl std::fmt::Debug for Netlink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Netlink").finish_non_exhaustive()
    }
}

impl Netlink {
    /// Opens a socket in the calling thread's network namespace and spawns its driver.
    pub async fn new() -> Result<Netlink, NetError> {
        // The third element receives multicast notifications; no group is joined, so it
        // stays empty and is dropped.
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetError::Open)?;
        let conn = tokio::spawn(conn);
        Ok(Netlink { handle, conn })
    }

    /// The raw rtnetlink handle, for operations not wrapped here.
    pub fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Index of the interface `name`.
    pub async fn link_index(&self, name: &str) -> Result<u32, NetError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(link)) => Ok(link.header.index),
            Ok(None) => Err(NetError::LinkNotFound {
                name: name.to_owned(),
            }),
            Err(e) if errno(&e) == Some(libc::ENODEV) => Err(NetError::LinkNotFound {
                name: name.to_owned(),
            }),
            Err(e) => Err(request_err("get", format!("link {name}"), e)),
        }
    }

    /// Sets the largest GSO super-packet the kernel builds for the interface
    /// (`ip link set <name> gso_max_size <size>`).
    pub async fn set_gso_max_size(&self, name: &str, size: u32) -> Result<(), NetError> {
        let index = self.link_index(name).await?;
        let mut msg = rtnetlink::packet_route::link::LinkMessage::default();
        msg.header.index = index;
        msg.attributes
            .push(rtnetlink::packet_route::link::LinkAttribute::GsoMaxSize(
                size,
            ));
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| request_err("set", format!("gso_max_size of link {name}"), e))
    }

    /// Adds or replaces (`NLM_F_REPLACE`) the route `dst dev <oif>` in `table` (None = main).
    ///
    /// IPv4 routes get scope link, IPv6 routes scope universe, as `ip route` does for routes
    /// without a gateway.
    pub async fn replace_route(
        &self,
        dst: IpNet,
        oif: u32,
        table: Option<u32>,
    ) -> Result<(), NetError> {
        let msg = route_message(dst, oif, table, false);
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| request_err("add", route_name(dst, oif, table), e))
    }

    /// Deletes the route `dst dev <oif>` from `table` (None = main); absent is fine.
    pub async fn delete_route(
        &self,
        dst: IpNet,
        oif: u32,
        table: Option<u32>,
    ) -> Result<(), NetError> {
        let msg = route_message(dst, oif, table, true);
        match self.handle.route().del(msg).execute().await {
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT | libc::ENODEV)) => {
                Ok(())
            }
            r => r.map_err(|e| request_err("delete", route_name(dst, oif, table), e)),
        }
    }

    /// Whether `table` (None = main) holds a route for exactly `dst` out of `oif`.
    pub async fn has_route(
        &self,
        dst: IpNet,
        oif: u32,
        table: Option<u32>,
    ) -> Result<bool, NetError> {
        let table = table.unwrap_or(MAIN_TABLE);
        let filter = match dst {
            IpNet::V4(_) => RouteMessageBuilder::<Ipv4Addr>::new().build(),
            IpNet::V6(_) => RouteMessageBuilder::<Ipv6Addr>::new().build(),
        };
        let mut routes = self.handle.route().get(filter).execute();
        loop {
            match routes.try_next().await {
                Ok(Some(r)) if route_matches(&r, dst, oif, table) => return Ok(true),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(false),
                Err(e) => return Err(request_err("list", "routes".to_owned(), e)),
            }
        }
    }

    /// `ip rule add oif <oif_name> lookup <table> pref <priority>` (IPv6 with `v6`);
    /// an identical rule is not duplicated.
    pub async fn add_rule_oif(
        &self,
        oif_name: &str,
        table: u32,
        priority: u32,
        v6: bool,
    ) -> Result<(), NetError> {
        let mut req = self.handle.rule().add();
        *req.message_mut() = rule_message(oif_name, table, priority, v6);
        // NLM_F_EXCL (the default here) makes the kernel answer EEXIST for an identical rule.
        match req.execute().await {
            Err(e) if errno(&e) == Some(libc::EEXIST) => Ok(()),
            r => r.map_err(|e| request_err("add", rule_name(oif_name, table, priority, v6), e)),
        }
    }

    /// Deletes the rule added by [`Netlink::add_rule_oif`]; absent is fine.
    pub async fn delete_rule_oif(
        &self,
        oif_name: &str,
        table: u32,
        priority: u32,
        v6: bool,
    ) -> Result<(), NetError> {
        let msg = rule_message(oif_name, table, priority, v6);
        match self.handle.rule().del(msg).execute().await {
            Err(e) if matches!(errno(&e), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
            r => r.map_err(|e| request_err("delete", rule_name(oif_name, table, priority, v6), e)),
        }
    }

    /// Seed side: `default dev <tun>` in `table` and `oif <tun> lookup <table> pref <priority>`
    /// for each enabled family. The main table is not touched.
    pub async fn install_seed_routing(
        &self,
        tun: &str,
        table: u32,
        priority: u32,
        v4: bool,
        v6: bool,
    ) -> Result<(), NetError> {
        let oif = self.link_index(tun).await?;
        for (enabled, is_v6) in [(v4, false), (v6, true)] {
            if enabled {
                self.replace_route(default_net(is_v6), oif, Some(table))
                    .await?;
                self.add_rule_oif(tun, table, priority, is_v6).await?;
            }
        }
        Ok(())
    }

    /// Undoes [`Netlink::install_seed_routing`]. Rules go first; the routes are gone with the
    /// device already if it no longer exists.
    pub async fn remove_seed_routing(
        &self,
        tun: &str,
        table: u32,
        priority: u32,
        v4: bool,
        v6: bool,
    ) -> Result<(), NetError> {
        for (enabled, is_v6) in [(v4, false), (v6, true)] {
            if enabled {
                self.delete_rule_oif(tun, table, priority, is_v6).await?;
            }
        }
        let oif = match self.link_index(tun).await {
            Ok(oif) => oif,
            Err(NetError::LinkNotFound { .. }) => return Ok(()),
            Err(e) => return Err(e),
        };
        for (enabled, is_v6) in [(v4, false), (v6, true)] {
            if enabled {
                self.delete_route(default_net(is_v6), oif, Some(table))
                    .await?;
            }
        }
        Ok(())
    }

    /// Shoot side: a route `net dev <tun>` in main for each VPN network. A route the kernel
    /// already made for the TUN's address (same prefix, same device) is left alone; anything
    /// else for that prefix is replaced.
    pub async fn install_vpn_routes(&self, tun: &str, nets: &[IpNet]) -> Result<(), NetError> {
        let oif = self.link_index(tun).await?;
        for net in nets {
            let net = net.trunc();
            if !self.has_route(net, oif, None).await? {
                self.replace_route(net, oif, None).await?;
            }
        }
        Ok(())
    }
}

fn default_net(v6: bool) -> IpNet {
    if v6 {
        IpNet::V6(ipnet::Ipv6Net::default())
    } else {
        IpNet::V4(ipnet::Ipv4Net::default())
    }
}

fn route_message(dst: IpNet, oif: u32, table: Option<u32>, for_delete: bool) -> RouteMessage {
    let dst = dst.trunc();
    let mut msg = match dst {
        IpNet::V4(n) => RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(n.addr(), n.prefix_len())
            .output_interface(oif)
            .scope(RouteScope::Link)
            .build(),
        IpNet::V6(n) => RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(n.addr(), n.prefix_len())
            .output_interface(oif)
            .build(),
    };
    let table = table.unwrap_or(MAIN_TABLE);
    match u8::try_from(table) {
        Ok(t) => msg.header.table = t,
        Err(_) => {
            msg.header.table = RouteHeader::RT_TABLE_UNSPEC;
            msg.attributes.push(RouteAttribute::Table(table));
        }
    }
    if for_delete {
        // Match any protocol, scope and type, like `ip route del`.
        msg.header.protocol = RouteProtocol::Unspec;
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unspec;
    }
    msg
}

fn route_matches(r: &RouteMessage, dst: IpNet, oif: u32, table: u32) -> bool {
    let family = match dst {
        IpNet::V4(_) => AddressFamily::Inet,
        IpNet::V6(_) => AddressFamily::Inet6,
    };
    let mut r_table = u32::from(r.header.table);
    let mut r_dst = None;
    let mut r_oif = None;
    for attr in &r.attributes {
        match attr {
            RouteAttribute::Table(t) => r_table = *t,
            RouteAttribute::Destination(RouteAddress::Inet(a)) => r_dst = Some(IpAddr::V4(*a)),
            RouteAttribute::Destination(RouteAddress::Inet6(a)) => r_dst = Some(IpAddr::V6(*a)),
            RouteAttribute::Oif(i) => r_oif = Some(*i),
            _ => {}
        }
    }
    // A default route carries no destination attribute.
    let r_dst = r_dst.unwrap_or(match dst {
        IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpNet::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    r.header.address_family == family
        && r.header.kind == RouteType::Unicast
        && r_table == table
        && r.header.destination_prefix_length == dst.prefix_len()
        && r_dst == dst.network()
        && r_oif == Some(oif)
}

fn rule_message(oif_name: &str, table: u32, priority: u32, v6: bool) -> RuleMessage {
    let mut msg = RuleMessage::default();
    msg.header.family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    msg.header.action = RuleAction::ToTable;
    match u8::try_from(table) {
        Ok(t) => msg.header.table = t,
        Err(_) => msg.header.table = RouteHeader::RT_TABLE_UNSPEC,
    }
    msg.attributes.push(RuleAttribute::Table(table));
    msg.attributes.push(RuleAttribute::Priority(priority));
    msg.attributes
        .push(RuleAttribute::Oifname(oif_name.to_owned()));
    msg
}

fn route_name(dst: IpNet, oif: u32, table: Option<u32>) -> String {
    format!(
        "route {} dev #{oif} table {}",
        dst.trunc(),
        table.unwrap_or(MAIN_TABLE)
    )
}

fn rule_name(oif_name: &str, table: u32, priority: u32, v6: bool) -> String {
    let fam = if v6 { "-6 " } else { "" };
    format!("rule {fam}oif {oif_name} lookup {table} pref {priority}")
}

fn errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.code.map(|c| c.get().abs()),
        _ => None,
    }
}

fn request_err(op: &'static str, object: String, e: rtnetlink::Error) -> NetError {
    let source = match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    };
    NetError::Request { op, object, source }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_nets() {
        assert_eq!(default_net(false).to_string(), "0.0.0.0/0");
        assert_eq!(default_net(true).to_string(), "::/0");
    }

    #[test]
    fn route_message_uses_table_attribute_for_large_tables() {
        let m = route_message("10.1.2.3/24".parse().unwrap(), 7, Some(1000), false);
        assert_eq!(m.header.table, RouteHeader::RT_TABLE_UNSPEC);
        assert!(m.attributes.contains(&RouteAttribute::Table(1000)));
        assert!(m
            .attributes
            .contains(&RouteAttribute::Destination(RouteAddress::Inet(
                Ipv4Addr::new(10, 1, 2, 0)
            ))));
        assert!(route_matches(&m, "10.1.2.0/24".parse().unwrap(), 7, 1000));
        assert!(!route_matches(&m, "10.1.2.0/24".parse().unwrap(), 8, 1000));
        let m = route_message("fd00::/64".parse().unwrap(), 7, None, false);
        assert_eq!(m.header.table, RouteHeader::RT_TABLE_MAIN);
        assert!(route_matches(
            &m,
            "fd00::/64".parse().unwrap(),
            7,
            MAIN_TABLE
        ));
    }
}
