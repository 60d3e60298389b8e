//! Named network namespaces as RAII guards, veth links and addresses between them.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name prefix unique to this process and call: `v<pid%10000>-<counter>`.
pub fn unique_prefix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("v{}-{n}", std::process::id() % 10_000)
}

/// Runs `cmd`, returning its output, or an error naming the command and its stderr.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace created with `ip netns add` and deleted on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
    keep: bool,
}

impl Netns {
    /// Creates namespace `name` with `lo` up.
    pub fn create(name: &str) -> Result<Self> {
        run(Command::new("ip").args(["netns", "add", name]))?;
        let ns = Self {
            name: name.to_owned(),
            keep: false,
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A command that runs `program` inside the namespace (`ip netns exec <name> program`).
    /// `ip netns exec` execs the program, so the child's PID is the program's.
    pub fn exec(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `program args…` inside the namespace and fails on a non-zero exit.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Output> {
        run(self.exec(program).args(args))
    }

    /// Runs `ip -n <name> args…`.
    pub fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.name]).args(args)).map(drop)
    }

    /// Sets a sysctl inside the namespace (`key=value`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.run("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Adds an address to `dev` (IPv6 with `nodad`, so it is usable at once) and sets `dev` up.
    pub fn addr(&self, dev: &str, cidr: &str) -> Result<()> {
        if cidr.contains(':') {
            self.ip(&["-6", "addr", "add", cidr, "dev", dev, "nodad"])?;
        } else {
            self.ip(&["addr", "add", cidr, "dev", dev])?;
        }
        self.ip(&["link", "set", dev, "up"])
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it creates live here.
    pub fn in_ns<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = File::open(format!("/run/netns/{}", self.name))
            .with_context(|| format!("open netns {}", self.name))?;
        std::thread::scope(|s| {
            s.spawn(move || -> Result<T> {
                enter_netns(&file).with_context(|| format!("setns {}", self.name))?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))?
        })
    }

    /// Leaves the namespace in place after drop (lab `--keep`); returns its name.
    pub fn keep(&mut self) -> &str {
        self.keep = true;
        &self.name
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = run(Command::new("ip").args(["netns", "del", &self.name])) {
            eprintln!("warning: {e:#}");
        }
    }
}

/// Moves the calling thread into the network namespace open at `file`.
/// Moves the calling thread into namespace `name` for the rest of its life (for threads a test
/// spawns to generate load from inside a lab namespace).
pub fn enter(name: &str) -> Result<()> {
    let file =
        File::open(format!("/run/netns/{name}")).with_context(|| format!("open netns {name}"))?;
    enter_netns(&file).with_context(|| format!("setns {name}"))
}

// FFI glue: setns(2) has no std wrapper. The fd is valid for the call (borrowed from `file`),
// and CLONE_NEWNET only switches this thread's network namespace.
#[allow(unsafe_code)]
fn enter_netns(file: &File) -> std::io::Result<()> {
    // SAFETY: plain syscall on a valid, open file descriptor; no memory is passed.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Creates a veth pair directly inside two namespaces: `a_if` in `a`, `b_if` in `b`.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) -> Result<()> {
    a.ip(&[
        "link",
        "add",
        a_if,
        "type",
        "veth",
        "peer",
        "name",
        b_if,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_if, "up"])?;
    b.ip(&["link", "set", b_if, "up"])
}

/// Names of existing namespaces (`ip netns list`), first column only.
pub fn list() -> Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// PIDs of processes inside namespace `name` (`ip netns pids`).
pub fn pids(name: &str) -> Result<Vec<u32>> {
    let out = run(Command::new("ip").args(["netns", "pids", name]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect())
}
