//! The writing side of a tunnel stream ([`FrameSink`]) and socket reads by readiness.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

/// Most bytes coalesced into one write by the writer task.
pub const WRITE_COALESCE: usize = 256 * 1024;

#[derive(Default)]
struct SinkState {
    queue: VecDeque<Bytes>,
    queued: usize,
    /// The writer task holds bytes it has not written yet: senders must queue behind them.
    busy: bool,
    closed: bool,
}

struct SinkInner {
    direct: Option<Arc<TcpStream>>,
    state: Mutex<SinkState>,
    wake: Notify,
    max_queued: usize,
}

/// Reads what the socket has into `buf` (at least one byte, or 0 at end of stream).
pub async fn read_some(sock: &TcpStream, buf: &mut BytesMut) -> std::io::Result<usize> {
    loop {
        match sock.try_read_buf(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.readable().await?,
            res => return res,
        }
    }
}

/// The sending side of a tunnel stream. On a plain TCP stream, frames are written at once
/// from the sending task (`try_write`) when nothing is queued ahead of them — no hand-off to
/// another task, no wake-up, on the latency path. What the socket does not take at once is
/// queued, in order, for the writer task ([`FrameSink::run_writer`]), which also serves streams
/// that cannot be written without a task (TLS). The queue is bounded: frames beyond it are
/// dropped like packets at a full NIC queue (TCP inside the tunnel recovers).
#[derive(Clone)]
pub struct FrameSink {
    inner: Arc<SinkInner>,
}

fn lock(m: &Mutex<SinkState>) -> std::sync::MutexGuard<'_, SinkState> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl FrameSink {
    /// `direct`: the stream's socket when it is plain TCP (written from any task).
    pub fn new(direct: Option<Arc<TcpStream>>, max_queued: usize) -> Self {
        Self {
            inner: Arc::new(SinkInner {
                direct,
                state: Mutex::new(SinkState::default()),
                wake: Notify::new(),
                max_queued,
            }),
        }
    }

    /// Sends `frames` (whole frames only). Returns false when they were dropped: the stream is
    /// closed or its queue is full.
    pub fn send(&self, mut frames: Bytes) -> bool {
        let inner = &*self.inner;
        let mut st = lock(&inner.state);
        if st.closed {
            return false;
        }
        let mut partial = false;
        if let (Some(sock), false, true) = (&inner.direct, st.busy, st.queue.is_empty()) {
            loop {
                match sock.try_write(&frames) {
                    Ok(n) => {
                        if n == frames.len() {
                            return true;
                        }
                        frames.advance(n);
                        partial = true;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "tunnel stream write failed");
                        st.closed = true;
                        drop(st);
                        inner.wake.notify_one();
                        return false;
                    }
                }
            }
        }
        // The rest of a partly written frame must follow, whatever the bound.
        if !partial && st.queued + frames.len() > inner.max_queued {
            return false;
        }
        st.queued += frames.len();
        st.queue.push_back(frames);
        drop(st);
        inner.wake.notify_one();
        true
    }

    /// Closes the sink: the writer half-closes the stream after what is queued.
    pub fn close(&self) {
        lock(&self.inner.state).closed = true;
        self.inner.wake.notify_one();
    }

    /// Takes what is queued (up to [`WRITE_COALESCE`] bytes), or None when closed and empty.
    async fn next_chunk(&self) -> Option<Bytes> {
        loop {
            {
                let mut st = lock(&self.inner.state);
                if let Some(first) = st.queue.pop_front() {
                    st.busy = true;
                    let chunk = if st.queue.is_empty() {
                        first
                    } else {
                        let mut out = BytesMut::with_capacity(WRITE_COALESCE);
                        out.extend_from_slice(&first);
                        while out.len() < WRITE_COALESCE {
                            let Some(b) = st.queue.pop_front() else { break };
                            out.extend_from_slice(&b);
                        }
                        out.freeze()
                    };
                    st.queued = st.queued.saturating_sub(chunk.len());
                    return Some(chunk);
                }
                st.busy = false;
                if st.closed {
                    return None;
                }
            }
            self.inner.wake.notified().await;
        }
    }

    /// The writer task: writes what [`send`](Self::send) queued, through `w` or, for a plain
    /// TCP stream, the shared socket; half-closes the stream when the sink is closed.
    pub async fn run_writer<W: AsyncWrite + Unpin>(&self, mut w: W) {
        while let Some(chunk) = self.next_chunk().await {
            let res = match &self.inner.direct {
                Some(sock) => write_direct(sock, &chunk).await,
                None => w.write_all(&chunk).await,
            };
            if let Err(e) = res {
                tracing::debug!(error = %e, "tunnel stream write failed");
                let mut st = lock(&self.inner.state);
                st.closed = true;
                st.busy = false;
                return;
            }
        }
        let _ = match &self.inner.direct {
            Some(sock) => socket2::SockRef::from(&**sock).shutdown(std::net::Shutdown::Write),
            None => w.shutdown().await,
        };
    }
}

/// Writes all of `data` to a socket shared between tasks.
pub async fn write_direct(sock: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        match sock.try_write(data) {
            Ok(n) => data = data.get(n..).unwrap_or(&[]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => sock.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
