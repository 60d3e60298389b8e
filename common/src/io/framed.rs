//! The writer half of a tunnel stream, shared by both binaries: frames queued on a bounded
//! channel are coalesced into large writes.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Most bytes coalesced into one write.
pub const WRITE_COALESCE: usize = 256 * 1024;

/// Writes everything queued on `rx` to `w` until the channel closes (then shuts the write side
/// down) or a write fails. `written` counts the bytes.
pub async fn write_frames<W: AsyncWrite + Unpin>(
    mut rx: mpsc::Receiver<Bytes>,
    mut w: W,
    written: &AtomicU64,
) {
    let mut out = BytesMut::with_capacity(WRITE_COALESCE);
    while let Some(first) = rx.recv().await {
        // A lone chunk is written as it is; several are gathered into one write.
        let chunk = match rx.try_recv() {
            Err(_) => first,
            Ok(second) => {
                out.extend_from_slice(&first);
                out.extend_from_slice(&second);
                while out.len() < WRITE_COALESCE {
                    match rx.try_recv() {
                        Ok(b) => out.extend_from_slice(&b),
                        Err(_) => break,
                    }
                }
                out.split().freeze()
            }
        };
        written.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        if let Err(e) = w.write_all(&chunk).await {
            tracing::debug!(error = %e, "tunnel stream write failed");
            return;
        }
    }
    let _ = w.shutdown().await;
}

/// Decrypts the complete frames at the front of `buf` until the TUN batch is full, queueing
/// every decrypted packet that `admit` accepts on `tun` and every reply (handshake response,
/// keepalive) on `to_net`. Returns true when the batch filled up (frames may remain in `buf`).
/// A fatal session error ends the stream; others are logged and the message is dropped.
#[allow(clippy::too_many_arguments)]
pub fn decrypt_frames(
    session: &mut crate::session::Session,
    decoder: &crate::frame::FrameDecoder,
    buf: &mut BytesMut,
    now: std::time::Instant,
    to_net: &mut BytesMut,
    tun: &mut super::tunio::TunWriter,
    rx_bytes: &AtomicU64,
    mut admit: impl FnMut(&crate::packet::PacketView) -> bool,
) -> Result<bool, DecryptError> {
    while !tun.is_full() {
        let Some(frame) = decoder.decode(buf)? else {
            return Ok(false);
        };
        rx_bytes.fetch_add(
            (frame.len() + crate::frame::LEN_PREFIX) as u64,
            Ordering::Relaxed,
        );
        let mut overflow = false;
        let res = session.decapsulate(&frame, now, to_net, |p| {
            let Ok(view) = crate::packet::PacketView::parse(p) else {
                return;
            };
            if admit(&view) && !tun.push(p) {
                overflow = true;
            }
        });
        if overflow {
            tracing::debug!("TUN batch overflow; packet dropped");
        }
        if let Err(e) = res {
            if e.is_fatal() {
                return Err(e.into());
            }
            tracing::debug!(error = %e, "tunnel message dropped");
        }
    }
    Ok(true)
}

/// Why a tunnel stream's reader stops.
#[derive(Debug, thiserror::Error)]
pub enum DecryptError {
    #[error(transparent)]
    Frame(#[from] crate::frame::FrameError),
    #[error(transparent)]
    Session(#[from] crate::session::SessionError),
}
