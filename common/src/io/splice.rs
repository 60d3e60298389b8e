//! Copying both ways between two sockets with half-close, holding a buffer only while bytes
//! are in flight.
//!
//! `tokio::io::copy_bidirectional` keeps two buffers per connection for its whole life; with
//! tens of thousands of mostly idle exec/logs/port-forward connections that is most of the
//! process's memory. Here each direction waits for readiness first and borrows a buffer from
//! a small per-thread cache only for one read and its write, so an idle connection costs no
//! buffer at all.

use std::cell::RefCell;
use std::io;

use tokio::net::{TcpStream, UnixStream};

/// Size of one copy buffer.
pub const BUF_SIZE: usize = 64 * 1024;
/// Buffers each runtime thread keeps for reuse.
const CACHED_PER_THREAD: usize = 8;

thread_local! {
    static CACHE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buf() -> Vec<u8> {
    CACHE
        .with(|c| c.borrow_mut().pop())
        .unwrap_or_else(|| vec![0; BUF_SIZE])
}

fn give_buf(b: Vec<u8>) {
    CACHE.with(|c| {
        let mut c = c.borrow_mut();
        if c.len() < CACHED_PER_THREAD {
            c.push(b);
        }
    });
}

/// A socket that can wait for readiness and read or write without a pending buffer.
pub trait ReadySocket {
    fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send;
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
    /// Shuts the write side down (half-close).
    fn shutdown_write(&self) -> io::Result<()>;
}

macro_rules! ready_socket {
    ($t:ty) => {
        impl ReadySocket for $t {
            fn readable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::readable(self)
            }
            fn writable(&self) -> impl std::future::Future<Output = io::Result<()>> + Send {
                <$t>::writable(self)
            }
            fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
                <$t>::try_read(self, buf)
            }
            fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
                <$t>::try_write(self, buf)
            }
            fn shutdown_write(&self) -> io::Result<()> {
                socket2::SockRef::from(self).shutdown(std::net::Shutdown::Write)
            }
        }
    };
}

ready_socket!(TcpStream);
ready_socket!(UnixStream);

async fn write_all<W: ReadySocket>(w: &W, mut data: &[u8]) -> io::Result<()> {
    while !data.is_empty() {
        match w.try_write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or(&[]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies `src` to `dst` until end of stream, then half-closes `dst`. Returns the bytes copied.
pub async fn copy_one_way<R: ReadySocket, W: ReadySocket>(src: &R, dst: &W) -> io::Result<u64> {
    let mut total = 0u64;
    loop {
        src.readable().await?;
        let mut buf = take_buf();
        let n = match src.try_read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                give_buf(buf);
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            give_buf(buf);
            // A peer that is already gone makes the half-close fail; nothing is lost then.
            let _ = dst.shutdown_write();
            return Ok(total);
        }
        let res = write_all(dst, buf.get(..n).unwrap_or(&[])).await;
        give_buf(buf);
        res?;
        total += n as u64;
    }
}

/// Copies both ways until both directions have ended; the first error ends both.
pub async fn copy_bidirectional<A: ReadySocket, B: ReadySocket>(
    a: &A,
    b: &B,
) -> io::Result<(u64, u64)> {
    tokio::try_join!(copy_one_way(a, b), copy_one_way(b, a))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    #[tokio::test]
    async fn copies_both_ways_with_half_close() {
        // client <-> [proxy: a | b] <-> echo server that answers after the client's EOF.
        let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server_addr = server.local_addr().unwrap();
        let echo = tokio::spawn(async move {
            let (mut s, _) = server.accept().await.unwrap();
            let mut all = Vec::new();
            s.read_to_end(&mut all).await.unwrap();
            s.write_all(&all).await.unwrap();
            s.shutdown().await.unwrap();
            all.len()
        });
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let front_addr = front.local_addr().unwrap();
        let proxy = tokio::spawn(async move {
            let (a, _) = front.accept().await.unwrap();
            let b = TcpStream::connect(server_addr).await.unwrap();
            copy_bidirectional(&a, &b).await.unwrap()
        });
        let mut c = TcpStream::connect(front_addr).await.unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        c.write_all(&data).await.unwrap();
        c.shutdown().await.unwrap();
        let mut back = Vec::new();
        c.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, data);
        assert_eq!(echo.await.unwrap(), data.len());
        assert_eq!(proxy.await.unwrap(), (data.len() as u64, data.len() as u64));
    }
}
