//! Tunnel streams: the IO of accepting one (raw or CONNECT-prefixed, preamble, first message);
//! the node decides who it is and whether it may attach.
//!
//! Until its first message authenticates, a stream is a stranger from the internet: it holds
//! a pending slot of the node (a newer stranger may take it over, the node times it out), a
//! small head buffer, and reads at most [`MAX_PREAUTH_BYTES`]. Handshake work for it comes
//! from a budget of the node: its peer's own when the preamble authenticated (version 2), else
//! the anonymous budget every stranger shares. Only an authenticated stream gets the large
//! read buffer and the peer's TUN writer.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use common::connect::{format_response, parse_request, MAX_HEAD_LEN};
use common::frame::FrameDecoder;
use common::io::framed::FrameSink;
use common::io::nodeio::{
    serve_attached, spawn_writer, PendingIo, StreamIo, StreamReader, TunWriters,
};
use common::node::{PacketBatch, Refusal, Refused};
use common::preamble::{parse_preamble, Preamble, V2_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::state::Server;

/// Packets one first message may carry (a resumed session's data message holds one).
const MAX_FIRST_PACKETS: usize = 4;
/// Largest first message: a handshake initiation is 148 bytes, a resumed session's keepalive 32.
pub const MAX_FIRST_MESSAGE: usize = 2048;
/// Most bytes read from a stream before it authenticated.
pub const MAX_PREAUTH_BYTES: usize = MAX_HEAD_LEN + V2_LEN + 2 + MAX_FIRST_MESSAGE;
/// Bytes read per call before authentication.
const PREAUTH_CHUNK: usize = 2048;

/// Reads at most `PREAUTH_CHUNK` more bytes into `buf`; fails at end of stream or when the
/// pre-authentication bound is reached.
async fn read_more(r: &mut TcpStream, buf: &mut BytesMut) -> Result<()> {
    if buf.len() >= MAX_PREAUTH_BYTES {
        bail!("{MAX_PREAUTH_BYTES} bytes without a complete first message");
    }
    let mut chunk = [0u8; PREAUTH_CHUNK];
    let room = (MAX_PREAUTH_BYTES - buf.len()).min(PREAUTH_CHUNK);
    let n = r.read(&mut chunk[..room]).await?;
    if n == 0 {
        bail!("stream closed after {} bytes", buf.len());
    }
    buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    Ok(())
}

/// What a new stream sent before authentication.
struct Opening {
    preamble: Preamble,
    first: BytesMut,
    rest: BytesMut,
}

/// Handles an optional CONNECT head and the preamble; returns the first frame and what was
/// read beyond it. Reads into a small buffer only.
async fn open_stream(r: &mut TcpStream) -> Result<Opening> {
    let mut buf = BytesMut::with_capacity(512);
    while buf.len() < 8 {
        // Neither a CONNECT head nor a preamble: refused without waiting for more.
        let n = buf.len();
        if !(b"CONNECT ".starts_with(&buf[..n])
            || common::frame::MAGIC.starts_with(&buf[..n.min(4)]))
        {
            bail!("neither a CONNECT head nor a preamble: {:02x?}", &buf[..n]);
        }
        read_more(r, &mut buf).await?;
    }
    if buf.starts_with(b"CONNECT ") {
        let (head, len) = loop {
            match parse_request(&buf).context("CONNECT head")? {
                Some(h) => break h,
                None => read_more(r, &mut buf).await?,
            }
        };
        tracing::debug!(target = %head.target, "tunnel stream begins with CONNECT");
        let _ = buf.split_to(len);
        r.write_all(&format_response(200, "Connection established", ""))
            .await?;
    }
    let (preamble, len) = loop {
        match parse_preamble(&buf).context("preamble")? {
            Some(p) => break p,
            None => read_more(r, &mut buf).await?,
        }
    };
    let _ = buf.split_to(len);
    let decoder = FrameDecoder::new(MAX_FIRST_MESSAGE);
    loop {
        if let Some(first) = decoder.decode(&mut buf).context("first message")? {
            return Ok(Opening {
                preamble,
                first,
                rest: buf,
            });
        }
        read_more(r, &mut buf).await?;
    }
}

/// Accepts one tunnel stream and serves it until it ends or is replaced. Until its first
/// message authenticates, the stream holds a pending slot of the node, which may evict it (a
/// newer stranger, or the pre-authentication timeout).
pub async fn serve_stream(
    server: Arc<Server>,
    writers: Arc<TunWriters>,
    mut stream: TcpStream,
    remote: String,
) -> Result<(), Refused> {
    let cell = &server.node;
    let pending = Arc::new(PendingIo::default());
    let key = {
        let mut node = cell.lock();
        let key = node.stream_arrived(pending.clone(), Instant::now());
        cell.drain(&mut node);
        key
    };
    cell.poke();
    let opening = tokio::select! {
        r = open_stream(&mut stream) => r,
        reason = pending.evicted() => {
            cell.lock().stream_refused(key, None);
            return Err(Refused { reason, detail: "pending slot lost".into() });
        }
    };
    let opening = match opening {
        Ok(o) => o,
        Err(e) => {
            cell.lock().stream_refused(key, Some(Refusal::Opening));
            return Err(Refused {
                reason: Refusal::Opening,
                detail: format!("{e:#}"),
            });
        }
    };
    let sock = Arc::new(stream);
    let sink = FrameSink::new(Some(sock.clone()), server.limits.frames_queued_per_tunnel);
    let io = StreamIo::new(sink.clone());
    let stop = io.stop.clone();
    // Packets of the first message (a resumed session's data), written once the TUN is ours.
    let mut first = PacketBatch::new(MAX_FIRST_PACKETS);
    let id = {
        let mut node = cell.lock();
        let res = node.accept_stream(
            key,
            &opening.preamble,
            &opening.first,
            io,
            Instant::now(),
            &mut first,
        );
        cell.drain(&mut node);
        res?
    };
    cell.poke();
    tracing::debug!(stream = %id, %remote, "tunnel stream authenticated");
    let writer = spawn_writer(&sink, None);
    let res = serve_attached(
        cell,
        &writers,
        id,
        StreamReader::Plain(sock),
        &opening.rest,
        &first.packets,
        stop,
    )
    .await;
    writer.abort();
    if let Err(e) = res {
        tracing::info!(stream = %id, %remote, error = %e, "tunnel stream ended");
    }
    Ok(())
}
