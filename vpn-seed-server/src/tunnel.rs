//! Tunnel streams: accept (raw or CONNECT-prefixed), preamble, peer identification under the
//! pre-authentication budget, binding a stream to its peer, and the per-stream reader.
//!
//! Until its first message authenticates, a stream is a stranger from the internet: it holds
//! a pending slot (a newer stranger may take it over), a small head buffer, and a short
//! deadline. Handshake work for it comes from a budget: its peer's own when the preamble
//! authenticated (version 2), else the anonymous budget every stranger shares. Only an
//! authenticated stream gets the large read buffer and the peer's TUN writer.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use bytes::{Bytes, BytesMut};
use common::connect::{format_response, parse_request, MAX_HEAD_LEN};
use common::flow::TunnelId;
use common::frame::{FrameDecoder, MAX_FRAME_LEN};
use common::hub::MessageKind;
use common::io::framed::{read_some, FrameSink};
use common::io::tunio::{Tun, TunWriter};
use common::limits::{LimitKind, TokenBucket};
use common::packet::PacketView;
use common::preamble::{parse_preamble, Preamble, V2_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::state::{inc, lock, Pending, Server, StreamHandle};

/// Read buffer size of an authenticated tunnel stream.
const READ_BUF: usize = 256 * 1024;
/// Largest first message: a handshake initiation is 148 bytes, a resumed session's keepalive 32.
pub const MAX_FIRST_MESSAGE: usize = 2048;
/// Most bytes read from a stream before it authenticated.
pub const MAX_PREAUTH_BYTES: usize = MAX_HEAD_LEN + V2_LEN + 2 + MAX_FIRST_MESSAGE;
/// Bytes read per call before authentication.
const PREAUTH_CHUNK: usize = 2048;

/// Why a stream was refused before authentication (log and metric reason).
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("evicted by a newer pending stream")]
    Evicted,
    #[error("no preamble and first message within {0:?}")]
    Timeout(std::time::Duration),
    #[error("anonymous handshake budget spent")]
    Budget,
    #[error("the peer's handshake budget is spent")]
    PeerBudget,
    #[error("replayed preamble")]
    Replay,
    #[error("{0:#}")]
    Other(anyhow::Error),
}

impl Refused {
    /// Stable name for the log gate.
    pub fn reason(&self) -> &'static str {
        match self {
            Refused::Evicted => "tunnel_evicted",
            Refused::Timeout(_) => "tunnel_preauth_timeout",
            Refused::Budget => "tunnel_handshake_budget",
            Refused::PeerBudget => "tunnel_peer_handshake_budget",
            Refused::Replay => "tunnel_preamble_replay",
            Refused::Other(_) => "tunnel_rejected",
        }
    }
}

impl From<anyhow::Error> for Refused {
    fn from(e: anyhow::Error) -> Self {
        Refused::Other(e)
    }
}

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

/// Names the peer of a new stream within the handshake budgets: an authenticated preamble
/// names it at once (replays refused; initiations from the peer's own budget); otherwise an
/// initiation needs a token of the anonymous budget before the key work that names its sender.
fn identify(server: &Server, o: &Opening, now: Instant) -> Result<TunnelId, Refused> {
    let kind = MessageKind::of(&o.first);
    // A version-2 preamble naming no allowed key is served like version 1 (from the anonymous
    // budget): the handshake then names the refused key, which tells an operator which client
    // is misconfigured. A known key with a tag that does not verify is refused at once.
    let authenticated = match o.preamble {
        Preamble::V2(p) => match server.hub.authenticate_preamble(&p) {
            Ok(peer) => Some((peer, p)),
            Err(common::hub::HubError::PreambleUnknownKey) => None,
            Err(e) => return Err(Refused::Other(anyhow!(e).context("preamble"))),
        },
        Preamble::V1 => None,
    };
    let peer = match authenticated {
        Some((peer, p)) => {
            let mut slot = server
                .peer(peer as TunnelId)
                .ok_or_else(|| anyhow!("peer {peer} vanished"))?;
            // The preamble is authentic whatever follows it: its counter is used up now.
            if !slot.instances.check(p.instance, p.counter) {
                server.stats.limits.hit(LimitKind::PreambleReplay);
                return Err(Refused::Replay);
            }
            server
                .hub
                .identify_as(peer, &o.first)
                .context("first message")?;
            if kind == MessageKind::Initiation && !slot.handshakes.try_take(now) {
                server.stats.limits.hit(LimitKind::PeerHandshakes);
                return Err(Refused::PeerBudget);
            }
            peer
        }
        None => {
            if kind == MessageKind::Initiation && !lock(&server.anon_handshakes).try_take(now) {
                server.stats.limits.hit(LimitKind::Handshakes);
                return Err(Refused::Budget);
            }
            server.hub.identify(&o.first).context("identify peer")?
        }
    };
    Ok(peer as TunnelId)
}

/// Accepts one tunnel stream and serves it until it ends or is replaced. `pending` is the
/// stream's pending slot, held until the stream authenticated.
pub async fn serve_stream(
    server: Arc<Server>,
    tun: Tun,
    mut stream: TcpStream,
    remote: String,
    pending: Pending,
) -> Result<(), Refused> {
    let timeout = server.limits.preauth_timeout;
    let opening = tokio::select! {
        r = tokio::time::timeout(timeout, open_stream(&mut stream)) => match r {
            Ok(r) => r?,
            Err(_) => {
                server.stats.limits.hit(LimitKind::PreauthTimeout);
                return Err(Refused::Timeout(timeout));
            }
        },
        _ = pending.evicted() => return Err(Refused::Evicted),
    };
    let now = Instant::now();
    let id = identify(&server, &opening, now)?;
    let Opening {
        first, rest: early, ..
    } = opening;

    let sock = Arc::new(stream);
    let sink = FrameSink::new(Some(sock.clone()), server.limits.frames_queued_per_tunnel);
    let mut to_net = BytesMut::new();
    // Packets of the first message (a resumed session's data), written once the TUN is ours.
    let mut first_packets: Vec<Vec<u8>> = Vec::new();
    let (generation, tun_slot) = {
        let mut slot = server
            .peer(id)
            .ok_or_else(|| anyhow!("peer {id} vanished"))?;
        // The first message must authenticate before this stream may replace another.
        slot.session
            .decapsulate(&first, now, &mut to_net, |p| {
                if PacketView::parse(p).is_ok_and(|v| admit_inbound(&server, id, &v)) {
                    first_packets.push(p.to_vec());
                }
            })
            .context("first message")?;
        slot.generation += 1;
        let generation = slot.generation;
        slot.session
            .stream_up(now, &mut to_net)
            .context("stream up")?;
        if let Some(old) = slot.stream.replace(StreamHandle {
            generation,
            sink: sink.clone(),
            reader: None,
            remote: remote.clone(),
        }) {
            tracing::info!(peer = %slot.name, old = %old.remote, new = %remote, "newer stream replaces the peer's stream");
        }
        (generation, slot.tun.clone())
    };
    // Authenticated: no longer a stranger.
    drop(pending);
    inc(&server.stats.streams_accepted);
    tracing::info!(peer = id, %remote, generation, "tunnel stream up");
    if !to_net.is_empty() {
        send_frames(&server, &sink, to_net.split().freeze());
    }
    server.refresh_live();

    let writer = {
        let sink = sink.clone();
        tokio::spawn(async move { sink.run_writer(tokio::io::sink()).await })
    };
    let reader = {
        let server = server.clone();
        let sink = sink.clone();
        tokio::spawn(async move {
            // Waits until the reader of a replaced stream let go of the peer's TUN writer.
            let mut guard = tun_slot.lock_owned().await;
            let tun = guard.get_or_insert_with(|| tun.writer());
            for p in &first_packets {
                tun.push(p);
            }
            flush_tun(tun, &server).await;
            let mut buf = BytesMut::with_capacity(READ_BUF);
            buf.extend_from_slice(&early);
            read_loop(server, tun, id, generation, sock, buf, sink).await
        })
    };
    if let Some(mut slot) = server.peer(id) {
        if let Some(s) = slot.stream.as_mut().filter(|s| s.generation == generation) {
            s.reader = Some(reader.abort_handle());
        } else {
            reader.abort();
        }
    }
    let res = match reader.await {
        Ok(r) => r.map_err(Refused::Other),
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(Refused::Other(anyhow!("reader task failed: {e}"))),
    };
    server.detach_stream(id, generation);
    writer.abort();
    tracing::info!(peer = id, %remote, generation, "tunnel stream down");
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
        server.stats.limits.hit(LimitKind::FrameQueue);
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
    tun: &mut TunWriter,
    id: TunnelId,
    generation: u64,
    sock: Arc<TcpStream>,
    mut buf: BytesMut,
    sink: FrameSink,
) -> Result<()> {
    let decoder = FrameDecoder::new(MAX_FRAME_LEN);
    let mut to_net = BytesMut::with_capacity(MAX_FRAME_LEN);
    let mut was_established = false;
    // Rekeys on this stream: a client initiates every two minutes, so a few per second is
    // plenty; more would be Diffie-Hellman work on demand of the shoot.
    let rate = server.limits.peer_handshakes_per_second;
    let mut handshakes = TokenBucket::per_second(rate);
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
            let now = Instant::now();
            more = common::io::framed::decrypt_frames(
                &mut slot.session,
                &decoder,
                &mut buf,
                now,
                &mut to_net,
                tun,
                &server.stats.plane.tunnel_rx_bytes,
                |msg| {
                    if MessageKind::of(msg) != MessageKind::Initiation || handshakes.try_take(now) {
                        return true;
                    }
                    server.stats.limits.hit(LimitKind::PeerHandshakes);
                    false
                },
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
        flush_tun(tun, &server).await;
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
