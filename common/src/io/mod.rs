//! Async and OS adapters shared by both binaries (the only place in `common` that does IO).

pub mod framed;
pub mod health;
pub mod keyfile;
pub mod log;
pub mod netlink;
pub mod nft;
pub mod nodeio;
pub mod process;
pub mod signal;
pub mod sock;
pub mod splice;
pub mod sysctl;
pub mod tls;
pub mod tun;
pub mod tunio;
