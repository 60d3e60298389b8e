//! End-to-end harness for the reversed VPN: network namespaces, veth links, child processes,
//! readiness polling, test PKI and the `seed | gw | shoot | pod` topology ([`lab::Lab`]).
//!
//! Everything here cleans up after itself through RAII guards (also when a test panics), and
//! every name it creates carries a per-process, per-lab prefix so parallel runs never collide.
//! The binaries `ingress-standin`, `podserver` and `lab` of this crate are real tools used by
//! the end-to-end tests and by `scripts/lab.sh`.

pub mod bench;
pub mod chaos;
pub mod client;
pub mod env;
pub mod hostile;
pub mod lab;
pub mod load;
pub mod netns;
pub mod pki;
pub mod proc;
pub mod prom;
pub mod soak;
pub mod tmp;
pub mod wait;

pub use env::{bin, e2e_guard, lab_for_test, require_root, serial, try_bin};
pub use lab::{Lab, LabOptions};
pub use netns::Netns;
pub use proc::Proc;
pub use tmp::TempDir;
pub use wait::{wait_http_ok, wait_tcp_listen, wait_until};
