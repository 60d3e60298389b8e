//! Sans-IO core of the reversed VPN data plane.
//!
//! Everything outside [`io`] is synchronous, takes `now` as an argument where time matters,
//! and returns data. [`io`] holds the shared async adapters used by both binaries.
#![cfg_attr(test, allow(clippy::disallowed_methods, clippy::disallowed_types))]

pub mod cidr;
pub mod config;
pub mod connect;
pub mod dns;
pub mod flow;
pub mod forward;
pub mod frame;
pub mod hub;
// The adapters are where IO and clocks live (see clippy.toml of this crate).
#[cfg(feature = "io")]
#[allow(clippy::disallowed_methods, clippy::disallowed_types)]
pub mod io;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod node;
pub mod packet;
pub mod preamble;
pub mod session;
