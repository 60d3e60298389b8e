//! A local TCP port that leads through kube-apiserver's CONNECT, so tools that only speak
//! plain TCP (iperf3) reach the pod through the seed server's egress proxy.
//!
//! Listens on `127.0.0.1:<port>` in the seed namespace; every accepted connection opens the
//! proxy's Unix socket, sends `CONNECT <target> HTTP/1.1` exactly as kube-apiserver does,
//! waits for the 200 and then splices both ways with half-close (`TCP_NODELAY` on the TCP side).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::nsrt::NsRuntime;
use super::route::connect_via;

/// Most connections the forwarder carries at once.
pub const MAX_CONNECTIONS: usize = 256;
/// Splice buffer per direction.
const BUF: usize = 256 << 10;
/// Deadline for the proxy's answer to CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running forwarder; stops (with its connections) on drop.
#[derive(Debug)]
pub struct Forwarder {
    /// The local address to point clients at.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Forwarder {
    /// Starts a forwarder on `rt` (a seed-namespace runtime) to `target` via the proxy UDS.
    pub fn start(rt: &NsRuntime, uds: PathBuf, target: SocketAddr) -> Result<Self> {
        let listener = rt.run(Duration::from_secs(5), async {
            TcpListener::bind("127.0.0.1:0").await
        })??;
        let addr = listener.local_addr()?;
        let task = rt.spawn(serve(listener, Arc::new(uds), target.to_string()))?;
        Ok(Self { addr, task })
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(listener: TcpListener, uds: Arc<PathBuf>, target: String) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            continue; // dropping `client` closes it
        };
        while conns.try_join_next().is_some() {}
        let (uds, target) = (Arc::clone(&uds), target.clone());
        // Aborting `serve` drops the JoinSet, which aborts every connection task.
        conns.spawn(async move {
            if let Err(e) = forward(client, &uds, &target).await {
                tracing::debug!(error = format!("{e:#}"), "forwarder connection ended");
            }
            drop(permit);
        });
    }
}

async fn forward(mut client: TcpStream, uds: &PathBuf, target: &str) -> Result<()> {
    client.set_nodelay(true)?;
    let mut proxy = UnixStream::connect(uds)
        .await
        .with_context(|| format!("connect {}", uds.display()))?;
    tokio::time::timeout(CONNECT_TIMEOUT, connect_via(&mut proxy, target))
        .await
        .context("CONNECT timed out")??;
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut proxy, BUF, BUF).await?;
    Ok(())
}
