//! TUN device setup (Linux, `tun-rs`).
//!
//! [`create`] opens (or re-attaches to) a named TUN, sets MTU and addresses and brings it up.
//! It returns a [`tun_rs::AsyncDevice`], so it must run inside a tokio runtime.
//!
//! # Reading and writing
//!
//! Without offload (`TunConfig::offload == false`), every read is one IP packet and every
//! write takes one IP packet:
//!
//! ```text
//! let mut buf = vec![0u8; usize::from(mtu)];
//! let n = dev.recv(&mut buf).await?;   // one packet in buf[..n]
//! dev.send(&packet).await?;            // one packet
//! ```
//!
//! With offload (`IFF_VNET_HDR` plus TSO/USO, see [`offload_active`]), the kernel hands over
//! and accepts TCP/UDP super-packets of up to 64 KiB behind a 10-byte virtio-net header;
//! `tun-rs` splits and coalesces them:
//!
//! ```text
//! use tun_rs::{GROTable, IDEAL_BATCH_SIZE, VIRTIO_NET_HDR_LEN};
//! // receive: one read, split into up to IDEAL_BATCH_SIZE MTU-sized packets
//! let mut original = vec![0u8; VIRTIO_NET_HDR_LEN + 65535];
//! let mut bufs = vec![vec![0u8; usize::from(mtu)]; IDEAL_BATCH_SIZE];
//! let mut sizes = vec![0usize; IDEAL_BATCH_SIZE];
//! let n = dev.recv_multiple(&mut original, &mut bufs, &mut sizes, 0).await?;
//! for i in 0..n { handle(&bufs[i][..sizes[i]]); }
//! // send: every buffer holds VIRTIO_NET_HDR_LEN spare bytes in front of its packet;
//! // packets of one batch are coalesced (GRO) where possible. Reuse the GROTable.
//! let mut gro = GROTable::default();
//! dev.send_multiple(&mut gro, &mut out_bufs, VIRTIO_NET_HDR_LEN).await?;
//! ```
//!
//! `recv_multiple`/`send_multiple` also work on a device without offload (one packet per
//! read; `offset` bytes ahead of each packet are then simply skipped), so a pump written
//! against them runs either way. Plain `recv`/`send` must not be used on an offload device.

use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{info, warn};

use super::sysctl::{self, SysctlError};

/// Longest interface name (without NUL), `IFNAMSIZ - 1`.
const MAX_IFNAME: usize = 15;

/// What [`create`] sets up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunConfig {
    /// Interface name, e.g. `tun0`.
    pub name: String,
    /// Link MTU.
    pub mtu: u16,
    /// Addresses with prefix length; at most one IPv4, any number of IPv6.
    pub addrs: Vec<IpNet>,
    /// Ask for virtio-net header offload (GSO/GRO); falls back to none when unsupported.
    pub offload: bool,
}

/// Errors of TUN setup; each names the device.
#[derive(Debug, thiserror::Error)]
pub enum TunError {
    /// The name is empty, too long or has characters the kernel rejects.
    #[error("invalid interface name {name:?}")]
    InvalidName {
        /// The rejected name.
        name: String,
    },
    /// More than one IPv4 address was configured.
    #[error("TUN {name}: at most one IPv4 address is supported, got {count}")]
    TooManyIpv4 {
        /// Device name.
        name: String,
        /// Number of IPv4 addresses given.
        count: usize,
    },
    /// Opening `/dev/net/tun` or attaching to the device failed.
    #[error("TUN {name}: create: {source}")]
    Create {
        /// Device name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Setting the MTU failed.
    #[error("TUN {name}: set mtu {mtu}: {source}")]
    Mtu {
        /// Device name.
        name: String,
        /// Requested MTU.
        mtu: u16,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Adding an address failed.
    #[error("TUN {name}: add address {addr}: {source}")]
    Address {
        /// Device name.
        name: String,
        /// The address.
        addr: IpNet,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Bringing the link up failed.
    #[error("TUN {name}: set up: {source}")]
    Up {
        /// Device name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A per-interface sysctl failed.
    #[error("TUN {name}: {source}")]
    Sysctl {
        /// Device name.
        name: String,
        /// The sysctl error.
        #[source]
        source: SysctlError,
    },
    /// The interface index lookup failed (no such interface).
    #[error("interface {name}: index: {source}")]
    Index {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Creates (or re-attaches to) the TUN `cfg.name`, sets MTU and addresses and brings it up.
///
/// The IPv4 address replaces any IPv4 address the device had; IPv6 addresses are added
/// (already present is fine) after `disable_ipv6=0`/`accept_dad=0` on the device, so they are
/// usable at once. Requested offload that the kernel refuses is logged and dropped; check
/// [`offload_active`] for what the device does. Must be called inside a tokio runtime.
pub fn create(cfg: &TunConfig) -> Result<tun_rs::AsyncDevice, TunError> {
    validate_name(&cfg.name)?;
    let name = cfg.name.clone();
    let v4: Vec<_> = cfg.addrs.iter().filter(|a| a.addr().is_ipv4()).collect();
    if v4.len() > 1 {
        return Err(TunError::TooManyIpv4 {
            name,
            count: v4.len(),
        });
    }

    let dev = match open(&name, cfg.offload) {
        Ok(dev) => dev,
        Err(e) if cfg.offload => {
            warn!(tun = %name, error = %e, "TUN offload unavailable, continuing without it");
            open(&name, false).map_err(|source| TunError::Create {
                name: name.clone(),
                source,
            })?
        }
        Err(source) => return Err(TunError::Create { name, source }),
    };
    if cfg.offload && dev.tcp_gso() {
        info!(tun = %name, udp_gso = dev.udp_gso(), "TUN offload enabled");
    }

    dev.set_mtu(cfg.mtu).map_err(|source| TunError::Mtu {
        name: name.clone(),
        mtu: cfg.mtu,
        source,
    })?;
    if let Some(net) = v4.first() {
        if let IpAddr::V4(addr) = net.addr() {
            dev.set_network_address(addr, net.prefix_len(), None)
                .map_err(|source| TunError::Address {
                    name: name.clone(),
                    addr: **net,
                    source,
                })?;
        }
    }
    let v6: Vec<_> = cfg.addrs.iter().filter(|a| a.addr().is_ipv6()).collect();
    if !v6.is_empty() {
        sysctl::ipv6_static(&name).map_err(|source| TunError::Sysctl {
            name: name.clone(),
            source,
        })?;
    }
    for net in v6 {
        if let IpAddr::V6(addr) = net.addr() {
            match dev.add_address_v6(addr, net.prefix_len()) {
                Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
                    return Err(TunError::Address {
                        name,
                        addr: *net,
                        source: e,
                    })
                }
                _ => {}
            }
        }
    }
    dev.enabled(true).map_err(|source| TunError::Up {
        name: name.clone(),
        source,
    })?;
    Ok(dev)
}

/// Whether the device was opened with the virtio-net header (offload); then only
/// `recv_multiple`/`send_multiple` may be used on it.
pub fn offload_active(dev: &tun_rs::AsyncDevice) -> bool {
    dev.tcp_gso()
}

/// Index of the interface `name` in the calling thread's network namespace.
pub fn if_index(name: &str) -> Result<u32, TunError> {
    validate_name(name)?;
    let c_name = std::ffi::CString::new(name).map_err(|_| TunError::InvalidName {
        name: name.to_owned(),
    })?;
    match nametoindex(&c_name) {
        0 => Err(TunError::Index {
            name: name.to_owned(),
            source: std::io::Error::last_os_error(),
        }),
        index => Ok(index),
    }
}

/// FFI glue: `if_nametoindex(3)` reads the NUL-terminated name and returns 0 on error.
#[allow(unsafe_code)]
fn nametoindex(name: &std::ffi::CStr) -> u32 {
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) }
}

fn open(name: &str, offload: bool) -> std::io::Result<tun_rs::AsyncDevice> {
    tun_rs::DeviceBuilder::new()
        .name(name)
        .offload(offload)
        .inherit_enable_state()
        .build_async()
}

fn validate_name(name: &str) -> Result<(), TunError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_IFNAME
        && name != "."
        && name != ".."
        && !name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace() || c == '\0');
    if ok {
        Ok(())
    } else {
        Err(TunError::InvalidName {
            name: name.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_validated() {
        for bad in ["", ".", "..", "a/b", "a b", "a:1", "0123456789abcdef"] {
            assert!(
                matches!(validate_name(bad), Err(TunError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        for good in ["tun0", "vpn-seed", "0123456789abcde", "eth0.100"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn loopback_has_an_index() {
        assert!(if_index("lo").unwrap() > 0);
        assert!(matches!(
            if_index("nonexistent-if"),
            Err(TunError::Index { .. })
        ));
    }
}
