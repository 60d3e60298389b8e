//! A tokio runtime whose threads live in one network namespace.
//!
//! The runtime is built on a thread that entered the namespace; its worker threads are
//! spawned during the build and inherit it, and so do the blocking-pool threads they spawn.
//! Futures therefore only run through [`NsRuntime::run`] / [`NsRuntime::spawn`], which put
//! them on the workers (never on the calling thread, which is in the host namespace).

use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::runtime::{Builder, Runtime};
use tokio::task::JoinHandle;

use crate::netns::Netns;

/// A multi-thread tokio runtime inside a network namespace.
#[derive(Debug)]
pub struct NsRuntime {
    rt: Option<Runtime>,
    ns: String,
}

impl NsRuntime {
    /// Builds a runtime with `workers` worker threads inside `ns`.
    pub fn new(ns: &Netns, workers: usize) -> Result<Self> {
        let rt = ns
            .in_ns(|| {
                Builder::new_multi_thread()
                    .worker_threads(workers.max(1))
                    .thread_name("bench-ns")
                    .enable_all()
                    .build()
            })?
            .context("build the namespace runtime")?;
        Ok(Self {
            rt: Some(rt),
            ns: ns.name().to_owned(),
        })
    }

    fn rt(&self) -> Result<&Runtime> {
        self.rt.as_ref().context("runtime already shut down")
    }

    /// Runs `fut` on the namespace's workers and waits for it, at most `timeout`.
    pub fn run<F>(&self, timeout: Duration, fut: F) -> Result<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let rt = self.rt()?;
        let task = rt.spawn(async move { tokio::time::timeout(timeout, fut).await });
        match rt.block_on(task) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(anyhow!(
                "task in namespace {} timed out after {timeout:?}",
                self.ns
            )),
            Err(e) => Err(anyhow!("task in namespace {} failed: {e}", self.ns)),
        }
    }

    /// Starts `fut` on the namespace's workers in the background.
    pub fn spawn<F>(&self, fut: F) -> Result<JoinHandle<F::Output>>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Ok(self.rt()?.spawn(fut))
    }
}

impl Drop for NsRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_timeout(Duration::from_secs(2));
        }
    }
}
