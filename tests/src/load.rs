//! A paced load of new proxied connections (CONNECT + `GET /whoami` through a seed server's
//! UDS), connections held open across faults, and the accounting of attempts by disruption
//! windows: the load generator of the HA, fault and soak tests.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::client::{connect_uds, http_get, read_head, status_of};
use crate::lab::{client_lan_v4, client_lan_v6, MAX_REPLICAS, POD_TARGET};

/// Read/write timeout of one attempt of [`Load`].
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(3);
/// Most attempts of a [`Load`] in flight at once (more are skipped, not queued).
pub const LOAD_MAX_IN_FLIGHT: usize = 128;
/// Most attempts a [`Load`] records.
pub const LOAD_MAX_ATTEMPTS: usize = 20_000;

/// Sends `GET /whoami` on a persistent HTTP/1.1 stream and returns the address the pod saw.
pub fn ask_whoami<S: Read + Write>(s: &mut S) -> Result<String> {
    s.write_all(b"GET /whoami HTTP/1.1\r\nHost: pod\r\n\r\n")
        .context("send GET /whoami")?;
    let head = read_head(s)?;
    let status = status_of(&head)?;
    if status != 200 {
        bail!("GET /whoami answered {status}");
    }
    let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
    let len: usize = text
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Content-Length in the /whoami answer")?;
    if len > 256 {
        bail!("/whoami body of {len} bytes");
    }
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).context("read /whoami body")?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

/// Index (0 = A, 1 = B, …) of the client whose LAN address is `ip`.
pub fn client_of(ip: &str) -> Option<usize> {
    (0..MAX_REPLICAS).find(|&i| ip == client_lan_v4(i) || ip == client_lan_v6(i))
}

/// A proxied connection kept open: it asked `/whoami` once and can ask again.
#[derive(Debug)]
pub struct Held {
    /// The CONNECT stream.
    pub stream: UnixStream,
    /// Seed server it went through.
    pub server: usize,
    /// Client that carried it at first.
    pub client: usize,
}

impl Held {
    /// Asks `/whoami` again within `timeout`; returns the client that carried it.
    pub fn ask(&mut self, timeout: Duration) -> Result<usize> {
        self.stream.set_read_timeout(Some(timeout))?;
        self.stream.set_write_timeout(Some(timeout))?;
        let ip = ask_whoami(&mut self.stream)?;
        client_of(&ip).with_context(|| format!("unknown client address {ip}"))
    }
}

/// One attempt of a [`Load`]: a new CONNECT + `GET /whoami`.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// Seed server it went through.
    pub server: usize,
    /// When it started.
    pub start: Instant,
    /// When it finished.
    pub end: Instant,
    /// The address the pod saw, or what went wrong.
    pub result: Result<String, String>,
}

impl Attempt {
    /// Whether it succeeded.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }

    /// The client that carried it, if it succeeded.
    pub fn client(&self) -> Option<usize> {
        self.result.as_deref().ok().and_then(client_of)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn attempt(uds: &Path) -> Result<String, String> {
    let (reply, mut s) =
        connect_uds(uds, POD_TARGET, LOAD_TIMEOUT).map_err(|e| format!("{e:#}"))?;
    if reply.status != 200 {
        return Err(format!("CONNECT answered {}", reply.head.trim()));
    }
    match http_get(&mut s, POD_TARGET, "/whoami") {
        Ok((200, body)) => Ok(String::from_utf8_lossy(&body).trim().to_owned()),
        Ok((code, _)) => Err(format!("GET /whoami answered {code}")),
        Err(e) => Err(format!("GET /whoami: {e:#}")),
    }
}

/// A paced connection load: every `interval` a new attempt (CONNECT + `GET /whoami`) starts
/// on its own thread, through the given UDS paths in turn, so a hanging attempt never delays
/// the next. Stopped and joined by [`Load::finish`] or on drop.
#[derive(Debug)]
pub struct Load {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Attempt>>>,
    thread: Option<JoinHandle<usize>>,
}

impl Load {
    /// Starts the load through `uds[0], uds[1], …` in turn (index = server number).
    pub fn start(uds: Vec<PathBuf>, interval: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (stop2, done2) = (Arc::clone(&stop), Arc::clone(&done));
        let thread = std::thread::spawn(move || {
            let mut running: Vec<JoinHandle<()>> = Vec::new();
            let (mut k, mut skipped) = (0usize, 0usize);
            let mut next = Instant::now();
            while !stop2.load(Ordering::SeqCst) && k < LOAD_MAX_ATTEMPTS && !uds.is_empty() {
                running.retain(|h| !h.is_finished());
                if running.len() < LOAD_MAX_IN_FLIGHT {
                    let server = k % uds.len();
                    let path = uds[server].clone();
                    let done = Arc::clone(&done2);
                    running.push(std::thread::spawn(move || {
                        let start = Instant::now();
                        let result = attempt(&path);
                        let a = Attempt {
                            server,
                            start,
                            end: Instant::now(),
                            result,
                        };
                        lock(&done).push(a);
                    }));
                    k += 1;
                } else {
                    skipped += 1;
                }
                // Pacing of the load, not synchronization.
                next += interval;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            for h in running {
                let _ = h.join();
            }
            skipped
        });
        Self {
            stop,
            done,
            thread: Some(thread),
        }
    }

    /// Attempts finished so far, in order of completion.
    pub fn snapshot(&self) -> Vec<Attempt> {
        lock(&self.done).clone()
    }

    /// Waits until `n` attempts that started at or after `since` have finished.
    pub fn wait_finished_since(&self, since: Instant, n: usize, timeout: Duration) -> Result<()> {
        crate::wait::wait_until(timeout, &format!("{n} load attempts"), || {
            lock(&self.done).iter().filter(|a| a.start >= since).count() >= n
        })
        .map(drop)
    }

    /// Stops the load, waits for the attempts in flight and returns all, ordered by start.
    /// Fails if attempts had to be skipped (too many in flight).
    pub fn finish(mut self) -> Result<Vec<Attempt>> {
        let skipped = self.halt();
        let mut all = std::mem::take(&mut *lock(&self.done));
        all.sort_by_key(|a| a.start);
        if skipped > 0 {
            bail!("{skipped} load attempts skipped: more than {LOAD_MAX_IN_FLIGHT} in flight");
        }
        Ok(all)
    }

    fn halt(&mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        self.thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Attempts of a [`Load`] split by disruption windows.
#[derive(Debug, Clone, Default)]
pub struct Windows {
    /// Succeeded attempts that overlapped a window.
    pub inside_ok: usize,
    /// Failed attempts that overlapped a window.
    pub inside_failed: usize,
    /// Succeeded attempts outside every window.
    pub outside_ok: usize,
    /// Failed attempts outside every window (each should be explained).
    pub outside_failed: Vec<Attempt>,
}

/// Splits `attempts` by the windows `[event, event + window)`: an attempt is inside when it
/// was still running at an event and started before that event's window closed.
pub fn windows(attempts: &[Attempt], events: &[Instant], window: Duration) -> Windows {
    let mut w = Windows::default();
    for a in attempts {
        let inside = events.iter().any(|&e| a.end >= e && a.start < e + window);
        match (inside, a.ok()) {
            (true, true) => w.inside_ok += 1,
            (true, false) => w.inside_failed += 1,
            (false, true) => w.outside_ok += 1,
            (false, false) => w.outside_failed.push(a.clone()),
        }
    }
    w
}

impl std::fmt::Display for Windows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "inside the windows {} ok / {} failed, outside {} ok / {} failed",
            self.inside_ok,
            self.inside_failed,
            self.outside_ok,
            self.outside_failed.len()
        )
    }
}
