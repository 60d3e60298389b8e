//! `vpn-seed-server`: the seed side of the reversed VPN. It accepts the shoot client's tunnel
//! streams, serves kube-apiserver's HTTP CONNECT egress proxy, and routes proxied connections
//! through its TUN device into the tunnel.

pub mod config;
mod eventloop;
mod proxy;
mod state;
mod tunnel;

pub use eventloop::{run, Listeners};
