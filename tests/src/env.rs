//! Environment checks for end-to-end runs: root, required tools, and where the binaries are.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

/// Tools the end-to-end tests and the lab run as subprocesses.
pub const REQUIRED_TOOLS: &[&str] = &["ip", "nft", "curl", "ss", "sysctl"];

/// Directory that holds the workspace binaries: `$VPN_BIN_DIR`, else derived from the running
/// executable (`target/debug/deps/<test>` and `target/debug/<bin>` both give `target/debug`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("VPN_BIN_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut dir = exe
        .parent()
        .context("executable has no parent directory")?
        .to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    Ok(dir)
}

/// Path of the workspace binary `name`, or an error that says how to build it.
pub fn try_bin(name: &str) -> Result<PathBuf> {
    let path = bin_dir()?.join(name);
    if !path.is_file() {
        bail!(
            "{} not found; build the binaries first: cargo build --release --workspace --bins",
            path.display()
        );
    }
    Ok(path)
}

/// Path of the workspace binary `name`; panics with build instructions when it is missing.
#[allow(clippy::panic)] // test-harness entry point: a missing binary must fail the test loudly
pub fn bin(name: &str) -> PathBuf {
    match try_bin(name) {
        Ok(p) => p,
        Err(e) => panic!("{e:#}"),
    }
}

/// Whether the process runs as root (effective uid 0), read from `/proc/self/status`.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Names of [`REQUIRED_TOOLS`] that are not on `PATH`.
pub fn missing_tools() -> Vec<&'static str> {
    REQUIRED_TOOLS
        .iter()
        .copied()
        .filter(|t| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {t}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect()
}

/// Root and tool check for tools (the lab): an error instead of a panic.
pub fn require_root() -> Result<()> {
    if !is_root() {
        bail!("this needs root (network namespaces); run it as root");
    }
    let missing = missing_tools();
    if !missing.is_empty() {
        bail!(
            "missing tools: {} (apt-get install iproute2 nftables curl procps)",
            missing.join(", ")
        );
    }
    Ok(())
}

/// First call of every end-to-end test. Returns `false` (test should return early) when
/// `VPN_E2E=skip`; panics when not root or when a required tool is missing.
#[allow(clippy::panic)] // test-harness entry point: a wrong environment must fail the test loudly
pub fn e2e_guard() -> bool {
    if std::env::var("VPN_E2E").is_ok_and(|v| v == "skip") {
        eprintln!("e2e skipped (VPN_E2E=skip)");
        return false;
    }
    if !is_root() {
        panic!("e2e tests need root (network namespaces); run as root or set VPN_E2E=skip");
    }
    let missing = missing_tools();
    if !missing.is_empty() {
        panic!(
            "e2e tests need these tools on PATH: {} (apt-get install iproute2 nftables curl procps)",
            missing.join(", ")
        );
    }
    true
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Held by tests of one binary that must not run at the same time (they measure failover on a
/// small machine); a failed test does not block the rest.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A test's lab: `None` when `VPN_E2E=skip` (the test returns early), else [`crate::Lab::up`]
/// (a failure fails the test, with every process log).
#[allow(clippy::panic)] // test-harness entry point
pub fn lab_for_test(opts: crate::LabOptions) -> Option<crate::Lab> {
    if !e2e_guard() {
        return None;
    }
    match crate::Lab::up(opts) {
        Ok(l) => Some(l),
        Err(e) => panic!("bring the lab up: {e:#}"),
    }
}
