//! Child processes as RAII guards: spawned in a namespace, output to a log file, stopped by PID.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::Netns;
use crate::wait::POLL;

/// How long [`Proc`]'s drop waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(3);

/// A child process; SIGTERM, then SIGKILL after [`STOP_GRACE`], on drop.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Option<Child>,
    pid: u32,
    log: PathBuf,
}

impl Proc {
    /// Spawns `program args…` inside `ns`, appending stdout and stderr to `log`.
    pub fn spawn(
        name: &str,
        ns: &Netns,
        program: &Path,
        args: &[String],
        envs: &[(&str, &str)],
        log: &Path,
    ) -> Result<Self> {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("open log {}", log.display()))?;
        writeln!(
            file,
            "### {name}: ip netns exec {} {} {}",
            ns.name(),
            program.display(),
            args.join(" ")
        )?;
        let err: File = file.try_clone()?;
        let mut cmd = ns.exec(program);
        cmd.args(args).stdin(Stdio::null()).stdout(file).stderr(err);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn {name} ({})", program.display()))?;
        Ok(Self {
            name: name.to_owned(),
            pid: child.id(),
            child: Some(child),
            log: log.to_owned(),
        })
    }

    /// The process's name in logs and reports.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log file's contents so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log.display()))
    }

    /// Whether the child is still running (reaps it if it exited).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The exit status if the child has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits up to `timeout` for the child to exit on its own; returns its exit status.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut().context("process already reaped")?;
            if let Some(st) = c.try_wait()? {
                return Ok(st);
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{} (pid {}) still running after {timeout:?}",
                    self.name,
                    self.pid
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGKILL and reaps the child.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            if c.try_wait()?.is_none() {
                c.kill().context("SIGKILL")?;
            }
            c.wait()?;
        }
        Ok(())
    }

    /// Sends SIGTERM, waits up to `grace`, then SIGKILL; reaps the child.
    pub fn stop(&mut self, grace: Duration) -> Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        if c.try_wait()?.is_some() {
            return Ok(());
        }
        // The child is not reaped yet, so its PID cannot have been reused.
        signal(self.pid, libc::SIGTERM)?;
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if c.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        c.kill()?;
        c.wait()?;
        Ok(())
    }

    /// Lets the process outlive this guard (lab `--keep`); returns its PID.
    pub fn detach(mut self) -> u32 {
        self.child = None;
        self.pid
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Err(e) = self.stop(STOP_GRACE) {
            eprintln!("warning: stopping {} (pid {}): {e:#}", self.name, self.pid);
        }
    }
}

/// Sends `sig` to `pid`.
// FFI glue: kill(2) has no std wrapper for signals other than SIGKILL.
#[allow(unsafe_code)]
pub fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid).context("pid out of range")?;
    // SAFETY: plain syscall with integer arguments.
    let rc = unsafe { libc::kill(pid, sig) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()).with_context(|| format!("kill({pid}, {sig})"))
    }
}

/// The named processes of a lab, each logging to `<dir>/<name>.log`; stopped, the last started
/// first, when dropped (before the namespaces they run in, which are dropped after it).
#[derive(Debug)]
pub struct Procs {
    dir: PathBuf,
    list: Vec<Proc>,
}

impl Procs {
    /// An empty set whose logs go to `dir`.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            list: Vec::new(),
        }
    }

    /// Starts `bin args…` as process `name` in `ns` with the caller's `RUST_LOG` (default
    /// `info`), appending to `<dir>/<name>.log` (a restart continues it). Hand the result to
    /// [`Procs::insert`].
    pub fn start(&self, name: &str, ns: &Netns, bin: &Path, args: &[String]) -> Result<Proc> {
        let log = self.dir.join(format!("{name}.log"));
        let rust_log = std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned());
        Proc::spawn(name, ns, bin, args, &[("RUST_LOG", &rust_log)], &log)
    }

    /// Adds a started process, replacing an earlier one of the same name.
    pub fn insert(&mut self, p: Proc) {
        self.list.retain(|q| q.name() != p.name());
        self.list.push(p);
    }

    /// Leaves every process running and forgets it (a lab kept for exploring).
    pub fn detach_all(&mut self) {
        for p in std::mem::take(&mut self.list) {
            p.detach();
        }
    }

    /// The process `name`.
    pub fn get(&self, name: &str) -> Option<&Proc> {
        self.list.iter().find(|p| p.name() == name)
    }

    /// The process `name`, mutably.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Proc> {
        self.list.iter_mut().find(|p| p.name() == name)
    }

    /// All processes, in start order.
    pub fn iter(&self) -> impl Iterator<Item = &Proc> {
        self.list.iter()
    }

    /// SIGKILLs `name` (no cleanup, like a crashed pod); it stays in the set with its log.
    pub fn kill9(&mut self, name: &str) -> Result<()> {
        match self.get_mut(name) {
            Some(p) => p.kill9(),
            None => anyhow::bail!("{name} is not running"),
        }
    }

    /// SIGTERMs `name` and waits for it (SIGKILL after [`STOP_GRACE`]); it stays in the set.
    pub fn stop(&mut self, name: &str) -> Result<()> {
        match self.get_mut(name) {
            Some(p) => p.stop(STOP_GRACE),
            None => anyhow::bail!("{name} is not running"),
        }
    }

    /// Stops `name` as [`Procs::stop`] does and forgets it; nothing happens if it is unknown.
    pub fn remove(&mut self, name: &str) -> Result<()> {
        if let Some(i) = self.list.iter().position(|p| p.name() == name) {
            let mut p = self.list.remove(i);
            p.stop(STOP_GRACE)?;
        }
        Ok(())
    }

    /// The first process (of `only`, or of all when `None`) that has exited: its name, status
    /// and log — for readiness waits that should fail early.
    pub fn first_exited(&mut self, only: Option<&str>) -> Option<(String, String, String)> {
        self.list
            .iter_mut()
            .filter(|p| only.is_none_or(|n| p.name() == n))
            .find_map(|p| {
                p.exit_status()
                    .map(|st| (p.name().to_owned(), st.to_string(), p.log()))
            })
    }

    /// Prints every process's log to stderr.
    pub fn print_logs(&self) {
        for p in &self.list {
            eprintln!(
                "===== log of {} (pid {}) =====\n{}",
                p.name(),
                p.pid(),
                p.log()
            );
        }
    }
}

/// Polls `cond(owner)` every [`POLL`] up to `timeout`; fails early, with its log, when a
/// process of the owner's set (only `only`, if given) exits meanwhile.
pub fn wait_running<T>(
    owner: &mut T,
    procs: fn(&mut T) -> &mut Procs,
    only: Option<&str>,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&T) -> bool,
) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if cond(owner) {
            return Ok(start.elapsed());
        }
        if let Some((name, st, log)) = procs(owner).first_exited(only) {
            anyhow::bail!("{name} exited ({st}) while waiting for {what}; its log:\n{log}");
        }
        if start.elapsed() >= timeout {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(POLL);
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.print_logs();
        }
        // The last started first: clients before the ingress and the servers, so that they
        // do not log reconnects.
        for mut p in std::mem::take(&mut self.list).into_iter().rev() {
            if let Err(e) = p.stop(STOP_GRACE) {
                eprintln!("warning: stopping {}: {e:#}", p.name());
            }
        }
    }
}
