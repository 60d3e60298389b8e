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
