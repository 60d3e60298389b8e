//! The pod-side TCP echo server (`bench echo`): answers every byte with the same byte, with
//! `TCP_NODELAY`, and holds tens of thousands of idle connections cheaply (the read buffer
//! of a connection is allocated only while data arrives).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Read buffer per active connection.
const BUF: usize = 16 << 10;

/// Serves echo on `listen` with at most `max_conns` connections (more are closed at once).
pub async fn serve(listen: SocketAddr, max_conns: usize) -> Result<()> {
    let listener = tokio::net::TcpSocket::new_v4()
        .and_then(|s| {
            s.set_reuseaddr(true)?;
            s.bind(listen)?;
            s.listen(4096)
        })
        .with_context(|| format!("listen on {listen}"))?;
    eprintln!("echo: listening on {listen}, at most {max_conns} connections");
    accept_loop(listener, max_conns).await;
    Ok(())
}

async fn accept_loop(listener: TcpListener, max_conns: usize) {
    let limit = Arc::new(Semaphore::new(max_conns));
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                eprintln!("echo: accept: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
            continue;
        };
        tokio::spawn(async move {
            let _ = echo(stream).await;
            drop(permit);
        });
    }
}

async fn echo(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    loop {
        s.readable().await?;
        let mut buf = vec![0u8; BUF];
        // Drain what is there without holding the buffer while idle.
        loop {
            match s.try_read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => s.write_all(buf.get(..n).unwrap_or_default()).await?,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
    }
}

/// Runs the echo server on a fresh runtime until the process is stopped.
pub fn run_blocking(listen: SocketAddr, max_conns: usize, workers: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()?;
    rt.block_on(serve(listen, max_conns))
}
