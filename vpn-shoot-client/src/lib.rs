//! `vpn-shoot-client`: the shoot side of the reversed VPN. It dials out through the seed's
//! ingress with HTTP CONNECT, keeps a WireGuard session to each seed server replica, and
//! forwards the seed's connections into the shoot's networks through its TUN device.

pub mod config;
mod dialer;
mod eventloop;

pub use eventloop::run;
