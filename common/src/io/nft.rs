//! Shoot-side nftables rules: masquerade, forward accept and MSS clamping.
//!
//! Uses the `nftables` crate (typed JSON fed to `nft -j -f -`). Everything lives in one table
//! of its own, which is replaced atomically on install (`add table; delete table; add table;
//! chains; rules` in one transaction), so a restart after a crash is idempotent and nothing
//! else in the ruleset is touched. The calls run the `nft` binary synchronously; from async
//! code, call them on a blocking thread if the latency (a few ms) matters.
//!
//! The rules, for TUN `tun0` and VPN network `192.168.123.0/24`:
//!
//! ```text
//! table inet vpn_shoot_client {
//!   chain postrouting {                 # only with masquerade
//!     type nat hook postrouting priority srcnat; policy accept;
//!     ip saddr 192.168.123.0/24 oifname != "tun0" masquerade
//!   }
//!   chain forward {
//!     type filter hook forward priority filter; policy accept;
//!     iifname "tun0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu   # mss_clamp
//!     oifname "tun0" tcp flags syn / syn,rst tcp option maxseg size set rt mtu   # mss_clamp
//!     iifname "tun0" counter accept
//!     oifname "tun0" counter accept
//!   }
//! }
//! ```

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use nftables::batch::Batch;
use nftables::expr::{
    BinaryOperation, Expression, Meta, MetaKey, NamedExpression, Payload, PayloadField, Prefix,
    TcpOption, RT,
};
use nftables::schema::{Chain, NfListObject, Rule, Table};
use nftables::stmt::{Counter, Mangle, Match, Operator, Statement};
use nftables::types::{NfChainPolicy, NfChainType, NfFamily, NfHook};
use tracing::warn;

/// Default table name (family `inet`).
pub const DEFAULT_TABLE: &str = "vpn_shoot_client";

/// Priority of the `srcnat` hook position.
const PRIO_SRCNAT: i32 = 100;
/// Priority of the `filter` hook position.
const PRIO_FILTER: i32 = 0;

/// Errors of nftables operations; each names the table.
#[derive(Debug, thiserror::Error)]
pub enum NftError {
    /// The table name is empty or not a plain identifier.
    #[error("invalid nftables table name {0:?}")]
    InvalidName(String),
    /// The interface name cannot be used in a rule.
    #[error("invalid interface name {0:?}")]
    InvalidIfname(String),
    /// Running `nft` failed or it rejected the batch (stderr is in the message).
    #[error("nftables table inet {table}: {op}: {source}")]
    Nft {
        /// Table name.
        table: String,
        /// `install` or `remove`.
        op: &'static str,
        /// The error from running `nft`.
        #[source]
        source: Box<nftables::helper::NftablesError>,
    },
}

/// The installed table; removed by [`ShootNat::remove`] or, best effort, on drop.
#[derive(Debug)]
pub struct ShootNat {
    table: String,
    removed: AtomicBool,
}

impl ShootNat {
    /// Installs table `inet` [`DEFAULT_TABLE`]; see [`ShootNat::install_named`].
    pub fn install(
        tun: &str,
        vpn_nets: &[IpNet],
        masquerade: bool,
        mss_clamp: bool,
    ) -> Result<ShootNat, NftError> {
        Self::install_named(DEFAULT_TABLE, tun, vpn_nets, masquerade, mss_clamp)
    }

    /// Replaces table `inet <table>` with the rules for `tun` (see the module docs).
    ///
    /// `masquerade`: traffic from `vpn_nets` leaving by any other interface gets the node's
    /// address. `mss_clamp`: TCP SYNs in and out of the TUN get their MSS clamped to the route
    /// MTU (`rt mtu`), so shoot peers never send segments too large for the tunnel.
    pub fn install_named(
        table: &str,
        tun: &str,
        vpn_nets: &[IpNet],
        masquerade: bool,
        mss_clamp: bool,
    ) -> Result<ShootNat, NftError> {
        validate_table(table)?;
        if tun.is_empty() || tun.len() > 15 || tun.contains(['\0', '"']) {
            return Err(NftError::InvalidIfname(tun.to_owned()));
        }
        let mut batch = Batch::new();
        batch.add(NfListObject::Table(table_obj(table)));
        batch.delete(NfListObject::Table(table_obj(table)));
        batch.add(NfListObject::Table(table_obj(table)));

        if masquerade {
            batch.add(NfListObject::Chain(base_chain(
                table,
                "postrouting",
                NfChainType::NAT,
                NfHook::Postrouting,
                PRIO_SRCNAT,
            )));
            for net in vpn_nets {
                let net = net.trunc();
                let proto = if net.addr().is_ipv4() { "ip" } else { "ip6" };
                let exprs = vec![
                    eq(payload(proto, "saddr"), prefix(net)),
                    Statement::Match(Match {
                        left: meta(MetaKey::Oifname),
                        right: string(tun),
                        op: Operator::NEQ,
                    }),
                    Statement::Masquerade(None),
                ];
                batch.add(rule(table, "postrouting", exprs));
            }
        }

        batch.add(NfListObject::Chain(base_chain(
            table,
            "forward",
            NfChainType::Filter,
            NfHook::Forward,
            PRIO_FILTER,
        )));
        let dirs = [MetaKey::Iifname, MetaKey::Oifname];
        if mss_clamp {
            for dir in dirs {
                let exprs = vec![
                    eq(meta(dir), string(tun)),
                    eq(
                        Expression::BinaryOperation(Box::new(BinaryOperation::AND(
                            payload("tcp", "flags"),
                            Expression::List(vec![string("syn"), string("rst")]),
                        ))),
                        string("syn"),
                    ),
                    Statement::Mangle(Mangle {
                        key: Expression::Named(NamedExpression::TcpOption(TcpOption {
                            name: "maxseg".into(),
                            field: Some("size".into()),
                        })),
                        value: Expression::Named(NamedExpression::RT(RT {
                            key: nftables::expr::RTKey::MTU,
                            family: None,
                        })),
                    }),
                ];
                batch.add(rule(table, "forward", exprs));
            }
        }
        for dir in dirs {
            let exprs = vec![
                eq(meta(dir), string(tun)),
                Statement::Counter(Counter::Anonymous(None)),
                Statement::Accept(None),
            ];
            batch.add(rule(table, "forward", exprs));
        }

        nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(|source| NftError::Nft {
            table: table.to_owned(),
            op: "install",
            source: Box::new(source),
        })?;
        Ok(ShootNat {
            table: table.to_owned(),
            removed: AtomicBool::new(false),
        })
    }

    /// The table name (family `inet`).
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Deletes the table; succeeds when it is already gone.
    pub fn remove(&self) -> Result<(), NftError> {
        remove_table(&self.table)?;
        self.removed.store(true, Ordering::Relaxed);
        Ok(())
    }
}

impl Drop for ShootNat {
    fn drop(&mut self) {
        if !self.removed.load(Ordering::Relaxed) {
            if let Err(e) = remove_table(&self.table) {
                warn!(error = %e, "removing nftables table on drop failed");
            }
        }
    }
}

/// Deletes table `inet <table>` if it exists (e.g. left over by a crashed run).
pub fn remove_table(table: &str) -> Result<(), NftError> {
    validate_table(table)?;
    let mut batch = Batch::new();
    batch.add(NfListObject::Table(table_obj(table)));
    batch.delete(NfListObject::Table(table_obj(table)));
    nftables::helper::apply_ruleset(&batch.to_nftables()).map_err(|source| NftError::Nft {
        table: table.to_owned(),
        op: "remove",
        source: Box::new(source),
    })
}

fn validate_table(table: &str) -> Result<(), NftError> {
    let ok = table.len() <= 64
        && table.starts_with(|c: char| c.is_ascii_alphabetic())
        && table
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(NftError::InvalidName(table.to_owned()))
    }
}

fn table_obj(name: &str) -> Table<'static> {
    Table {
        family: NfFamily::INet,
        name: Cow::Owned(name.to_owned()),
        handle: None,
    }
}

fn base_chain(
    table: &str,
    name: &'static str,
    kind: NfChainType,
    hook: NfHook,
    prio: i32,
) -> Chain<'static> {
    Chain {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_owned()),
        name: Cow::Borrowed(name),
        _type: Some(kind),
        hook: Some(hook),
        prio: Some(prio),
        policy: Some(NfChainPolicy::Accept),
        ..Chain::default()
    }
}

fn rule(table: &str, chain: &'static str, expr: Vec<Statement<'static>>) -> NfListObject<'static> {
    NfListObject::Rule(Rule {
        family: NfFamily::INet,
        table: Cow::Owned(table.to_owned()),
        chain: Cow::Borrowed(chain),
        expr: Cow::Owned(expr),
        ..Rule::default()
    })
}

fn eq(left: Expression<'static>, right: Expression<'static>) -> Statement<'static> {
    Statement::Match(Match {
        left,
        right,
        op: Operator::EQ,
    })
}

fn string(s: &str) -> Expression<'static> {
    Expression::String(Cow::Owned(s.to_owned()))
}

fn meta(key: MetaKey) -> Expression<'static> {
    Expression::Named(NamedExpression::Meta(Meta { key }))
}

fn payload(protocol: &'static str, field: &'static str) -> Expression<'static> {
    Expression::Named(NamedExpression::Payload(Payload::PayloadField(
        PayloadField {
            protocol: Cow::Borrowed(protocol),
            field: Cow::Borrowed(field),
        },
    )))
}

fn prefix(net: IpNet) -> Expression<'static> {
    Expression::Named(NamedExpression::Prefix(Prefix {
        addr: Box::new(string(&net.network().to_string())),
        len: u32::from(net.prefix_len()),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        assert!(validate_table("vpn_shoot_client").is_ok());
        assert!(validate_table("t-1").is_ok());
        for bad in ["", "1abc", "a b", "a;b", "a\"b"] {
            assert!(
                matches!(validate_table(bad), Err(NftError::InvalidName(_))),
                "{bad:?}"
            );
        }
        assert!(matches!(
            ShootNat::install_named("t", "", &[], true, true),
            Err(NftError::InvalidIfname(_))
        ));
    }
}
