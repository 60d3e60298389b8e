//! Tunnel streams: accept (raw or CONNECT-prefixed), preamble, peer identification, binding a
//! stream to its peer, and the per-stream reader and writer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use common::connect::{format_response, parse_request, MAX_HEAD_LEN};
use common::flow::TunnelId;
use common::frame::{check_preamble, FrameDecoder, MAX_FRAME_LEN, PREAMBLE};
use common::io::framed::{read_some, FrameSink, MAX_QUEUED};
use common::io::tunio::TunWriter;
use common::packet::PacketView;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::state::{inc, lock, Server, StreamHandle};

/// Time a new stream has to send its CONNECT head, preamble and first message.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer size of a tunnel stream.
const READ_BUF: usize = 256 * 1024;

/// Reads until `buf` holds at least `n` bytes.
async fn fill(r: &mut TcpStream, buf: &mut BytesMut, n: usize) -> Result<()> {
    while buf.len() < n {
        if r.read_buf(buf).await? == 0 {
            bail!("stream closed after {} bytes", buf.len());
        }
    }
    Ok(())
}

/// Handles an optional CONNECT head and the preamble; returns the first frame and what was
/// read beyond it.
async fn open_stream(r: &mut TcpStream, decoder: &FrameDecoder) -> Result<(BytesMut, BytesMut)> {
    let mut buf = BytesMut::with_capacity(READ_BUF);
    fill(r, &mut buf, 8).await?;
    if buf.starts_with(b"CONNECT ") {
        let (head, len) = loop {
            match parse_request(&buf).context("CONNECT head")? {
                Some(h) => break h,
                None => {
                    if buf.len() >= MAX_HEAD_LEN || r.read_buf(&mut buf).await? == 0 {
                        bail!("incomplete CONNECT head");
                    }
                }
            }
        };
        tracing::debug!(target = %head.target, "tunnel stream begins with CONNECT");
        let _ = buf.split_to(len);
        r.write_all(&format_response(200, "Connection established", ""))
            .await?;
        fill(r, &mut buf, 8).await?;
    }
    let pre: [u8; 8] = buf
        .get(..8)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| anyhow!("short preamble"))?;
    check_preamble(&pre).context("preamble")?;
    let _ = buf.split_to(PREAMBLE.len());
    loop {
        if let Some(frame) = decoder.decode(&mut buf)? {
            return Ok((frame, buf));
        }
        if r.read_buf(&mut buf).await? == 0 {
            bail!("stream closed before the first message");
        }
    }
}

/// Accepts one tunnel stream and serves it until it ends or is replaced.
pub async fn serve_stream(
    server: Arc<Server>,
    tun: TunWriter,
    stream: TcpStream,
    remote: String,
) -> Result<()> {
    let mut stream = stream;
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let (first, rest) = tokio::time::timeout(ACCEPT_TIMEOUT, open_stream(&mut stream, &decoder))
        .await
        .map_err(|_| anyhow!("no preamble and first message within {ACCEPT_TIMEOUT:?}"))??;

    let peer = server.hub.identify(&first).context("identify peer")?;
    let id = peer as TunnelId;
    let sock = Arc::new(stream);
    let sink = FrameSink::new(Some(sock.clone()), MAX_QUEUED);
    let mut to_net = BytesMut::with_capacity(MAX_FRAME_LEN);
    let mut tun = tun;
    let generation = {
        let mut slot = server
            .peer(id)
            .ok_or_else(|| anyhow!("peer {peer} vanished"))?;
        // The first message must authenticate before this stream may replace another.
        slot.session
            .decapsulate(&first, Instant::now(), &mut to_net, |p| {
                if PacketView::parse(p).is_ok_and(|v| admit_inbound(&server, id, &v)) {
                    tun.push(p);
                }
            })
            .context("first message")?;
        slot.generation += 1;
        let generation = slot.generation;
        slot.session.stream_up(Instant::now(), &mut to_net)?;
        if let Some(old) = slot.stream.replace(StreamHandle {
            generation,
            sink: sink.clone(),
            reader: None,
            remote: remote.clone(),
        }) {
            tracing::info!(peer, old = %old.remote, new = %remote, "newer stream replaces the peer's stream");
        }
        generation
    };
    inc(&server.stats.streams_accepted);
    tracing::info!(peer, %remote, generation, "tunnel stream up");
    if !to_net.is_empty() {
        send_frames(&server, &sink, to_net.split().freeze());
    }
    flush_tun(&mut tun, &server).await;
    server.refresh_live();

    let writer = {
        let sink = sink.clone();
        tokio::spawn(async move { sink.run_writer(tokio::io::sink()).await })
    };
    let reader = {
        let server = server.clone();
        tokio::spawn(async move { read_loop(server, tun, id, generation, sock, rest, sink).await })
    };
    if let Some(mut slot) = server.peer(id) {
        if let Some(s) = slot.stream.as_mut().filter(|s| s.generation == generation) {
            s.reader = Some(reader.abort_handle());
        } else {
            reader.abort();
        }
    }
    let res = match reader.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(anyhow!("reader task failed: {e}")),
    };
    server.detach_stream(id, generation);
    writer.abort();
    tracing::info!(peer, %remote, generation, "tunnel stream down");
    res
}

/// Whether a decrypted packet from tunnel `id` may enter the seed: a reply to a known flow
/// pinned to that tunnel (or an ICMP error about one), from the shoot or VPN networks.
fn admit_inbound(server: &Server, id: TunnelId, view: &PacketView) -> bool {
    let verdict = lock(&server.flows).inbound(view, id, &server.tunnel_sources, Instant::now());
    match verdict {
        Ok(()) => true,
        Err(reason) => {
            server.stats.plane.drops.inc(reason.reason());
            tracing::trace!(src = %view.src(), dst = %view.dst(), reason = reason.reason(), "dropped packet from tunnel");
            false
        }
    }
}

/// Sends frames on a peer's stream, counting what was sent and what was dropped.
pub fn send_frames(server: &Server, sink: &FrameSink, frames: Bytes) {
    let n = frames.len() as u64;
    if sink.send(frames) {
        server
            .stats
            .plane
            .tunnel_tx_bytes
            .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    } else {
        server.stats.plane.frame_drops.inc("queue_full");
    }
}

async fn flush_tun(tun: &mut TunWriter, server: &Server) {
    let n = tun.len() as u64;
    match tun.flush().await {
        Ok(()) => {
            server
                .stats
                .plane
                .tun_tx_packets
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
        Err(e) => tracing::debug!(error = %e, "TUN write failed"),
    }
}

async fn read_loop(
    server: Arc<Server>,
    mut tun: TunWriter,
    id: TunnelId,
    generation: u64,
    sock: Arc<TcpStream>,
    mut buf: BytesMut,
    sink: FrameSink,
) -> Result<()> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut to_net = BytesMut::with_capacity(MAX_FRAME_LEN);
    let mut was_established = false;
    loop {
        // Decrypt what the buffer holds, up to one TUN batch, under the peer's lock.
        let more;
        {
            let mut slot = server
                .peer(id)
                .ok_or_else(|| anyhow!("peer {id} vanished"))?;
            if slot.stream.as_ref().map(|s| s.generation) != Some(generation) {
                return Ok(());
            }
            more = common::io::framed::decrypt_frames(
                &mut slot.session,
                &decoder,
                &mut buf,
                Instant::now(),
                &mut to_net,
                &mut tun,
                &server.stats.plane.tunnel_rx_bytes,
                |view| admit_inbound(&server, id, view),
            )
            .context("tunnel stream")?;
            let established = slot.session.is_established();
            if established != was_established {
                was_established = established;
                drop(slot);
                server.refresh_live();
            }
        }
        if !to_net.is_empty() {
            send_frames(&server, &sink, to_net.split().freeze());
        }
        flush_tun(&mut tun, &server).await;
        if more {
            continue;
        }
        if buf.capacity() - buf.len() < MAX_FRAME_LEN {
            buf.reserve(READ_BUF);
        }
        if read_some(&sock, &mut buf).await? == 0 {
            return Ok(());
        }
    }
}
