//! Readiness polling: conditions checked every 25 ms up to a deadline, never fixed sleeps.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::netns::Netns;

/// Poll interval of [`wait_until`].
pub const POLL: Duration = Duration::from_millis(25);

/// Polls `cond` until it returns true (→ elapsed time) or `timeout` passes (→ error naming `what`).
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

/// Whether something in `ns` listens on TCP `addr` (or on the wildcard address of its port),
/// checked with `ss` so the listener sees no probe connection.
pub fn is_listening(ns: &Netns, addr: SocketAddr) -> bool {
    let Ok(out) = ns.run("ss", &["-Hltn"]) else {
        return false;
    };
    let port = addr.port();
    let wanted = [
        addr.to_string(),
        format!("0.0.0.0:{port}"),
        format!("[::]:{port}"),
        format!("*:{port}"),
        // ss prints IPv6 addresses in brackets; SocketAddr's Display does too.
    ];
    String::from_utf8_lossy(&out.stdout).lines().any(|l| {
        l.split_whitespace()
            .nth(3)
            .is_some_and(|local| wanted.iter().any(|w| w == local))
    })
}

/// Waits until something in `ns` listens on `addr`.
pub fn wait_tcp_listen(ns: &Netns, addr: SocketAddr, timeout: Duration) -> Result<Duration> {
    wait_until(
        timeout,
        &format!("a TCP listener on {addr} in {}", ns.name()),
        || is_listening(ns, addr),
    )
}

/// HTTP status of `GET url` made with curl inside `ns` (1 s limit), `None` if no answer.
pub fn http_status(ns: &Netns, url: &str) -> Option<u16> {
    let out = ns
        .exec("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-m",
            "1",
            "-w",
            "%{http_code}",
            url,
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    match String::from_utf8_lossy(&out.stdout).trim().parse() {
        Ok(0) | Err(_) => None,
        Ok(code) => Some(code),
    }
}

/// Waits until `GET url` inside `ns` answers 200.
pub fn wait_http_ok(ns: &Netns, url: &str, timeout: Duration) -> Result<Duration> {
    wait_until(timeout, &format!("200 from {url} in {}", ns.name()), || {
        http_status(ns, url) == Some(200)
    })
}
