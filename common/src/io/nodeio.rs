//! The IO glue around [`Node`] that both binaries share: the node behind one short lock, the
//! stream reader, the TUN pump and the timer driver. Nothing here decides anything: every
//! decision is the node's; this module moves bytes and executes what the node polls out.
//!
//! Tasks reach the node through one `std::sync::Mutex`, held for one batch at a time (a TUN
//! batch, or the frames one read brought, up to a TUN batch) and never across an `.await`.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use super::framed::{read_some, FrameSink};
use super::tunio::{Tun, TunReader, TunWriter};
use crate::flow::TunnelId;
use crate::frame::MAX_FRAME_LEN;
use crate::node::{Event, Node, PacketSink, Refusal, StreamId};

/// Read buffer of an attached tunnel stream.
pub const READ_BUF: usize = 256 * 1024;

/// What the node keeps for an attached stream: where its frames go, and how its reader is
/// told to stop.
pub struct StreamIo {
    pub sink: FrameSink,
    pub stop: Arc<Notify>,
}

impl StreamIo {
    pub fn new(sink: FrameSink) -> Self {
        Self {
            sink,
            stop: Arc::new(Notify::new()),
        }
    }

    /// Closes the stream: the writer half-closes it after what is queued, the reader stops.
    pub fn close(&self) {
        self.sink.close();
        // Stores a permit if the reader is not waiting: it sees it at its next await.
        self.stop.notify_one();
    }
}

/// What the node keeps for a stream that has not authenticated yet: its wake-up when it lost
/// its slot, and why.
#[derive(Default)]
pub struct PendingIo {
    notify: Notify,
    reason: OnceLock<Refusal>,
}

impl PendingIo {
    /// Completes when the node evicted the stream; returns why.
    pub async fn evicted(&self) -> Refusal {
        self.notify.notified().await;
        self.reason.get().copied().unwrap_or(Refusal::Evicted)
    }

    fn fire(&self, reason: Refusal) {
        let _ = self.reason.set(reason);
        self.notify.notify_one();
    }
}

/// The node type both binaries run.
pub type IoNode = Node<StreamIo, Arc<PendingIo>>;

/// The node behind its lock, and the wake-up of the timer driver.
pub struct NodeCell {
    node: Mutex<IoNode>,
    /// Woken after calls that may move the next deadline earlier (a stream opened, closed or
    /// pending): the driver then asks the node again.
    changed: Notify,
    /// Woken (all waiters) when a tunnel becomes live, and by [`NodeCell::wake_tunnel_waiters`].
    tunnel_up: Notify,
}

impl NodeCell {
    pub fn new(node: IoNode) -> Arc<Self> {
        Arc::new(Self {
            node: Mutex::new(node),
            changed: Notify::new(),
            tunnel_up: Notify::new(),
        })
    }

    /// Locks the node (recovering a poisoned lock: a panicking task must not take the data
    /// plane down with it).
    pub fn lock(&self) -> MutexGuard<'_, IoNode> {
        self.node.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the driver that deadlines may have moved.
    pub fn poke(&self) {
        self.changed.notify_one();
    }

    /// Waits until some tunnel becomes live or [`NodeCell::wake_tunnel_waiters`] is called,
    /// whichever first, or returns at once when `ready()` holds. `ready` is checked after the
    /// wait is registered, so a tunnel that comes up in between is not missed.
    pub async fn wait_tunnel_up(&self, ready: impl Fn() -> bool) {
        loop {
            let notified = self.tunnel_up.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if ready() {
                return;
            }
            notified.await;
        }
    }

    /// Wakes every [`NodeCell::wait_tunnel_up`] to check its condition again (e.g. on
    /// shutdown).
    pub fn wake_tunnel_waiters(&self) {
        self.tunnel_up.notify_waiters();
    }

    /// Executes what the node polled out that needs no await: frames to the streams' sinks,
    /// detached streams closed, evicted pending streams woken, events logged, tunnel waiters
    /// woken when a tunnel became live.
    pub fn drain(&self, node: &mut IoNode) {
        node.flush_transmits(|io, frames| io.sink.send(frames));
        while let Some(c) = node.poll_close() {
            c.handle.close();
        }
        while let Some((p, reason)) = node.poll_evicted() {
            p.fire(reason);
        }
        while let Some(e) = node.poll_event() {
            if matches!(e, Event::Live { live: true, .. }) {
                self.tunnel_up.notify_waiters();
            }
            log_event(node, &e);
        }
    }
}

fn log_event(node: &IoNode, e: &Event) {
    match e {
        Event::StreamUp { stream, replaced } => {
            let name = node.name(stream.tunnel);
            match replaced {
                Some(old) => {
                    tracing::info!(tunnel = name, %stream, %old, "newer stream replaces the tunnel's stream")
                }
                None => tracing::info!(tunnel = name, %stream, "tunnel stream up"),
            }
        }
        Event::StreamDown {
            stream,
            reason,
            detail,
        } => {
            let name = node.name(stream.tunnel);
            match reason {
                crate::node::CloseReason::Replaced | crate::node::CloseReason::Ended => {
                    tracing::info!(tunnel = name, %stream, %reason, %detail, "tunnel stream down")
                }
                _ => {
                    tracing::warn!(tunnel = name, %stream, %reason, %detail, "closing the tunnel stream")
                }
            }
        }
        Event::Live { tunnel, live } => {
            tracing::debug!(tunnel = node.name(*tunnel), live, "tunnel liveness")
        }
        Event::Redial { tunnel, wait } => {
            tracing::debug!(tunnel = node.name(*tunnel), ?wait, "redialling")
        }
    }
}

/// The reading side of a tunnel stream.
pub enum StreamReader {
    /// Plain TCP, read by readiness (the same socket is written directly by the sink).
    Plain(Arc<TcpStream>),
    /// The read half of a TLS stream.
    Boxed(Pin<Box<dyn AsyncRead + Send>>),
}

impl StreamReader {
    /// Reads what is available into `buf`; 0 at end of stream.
    pub async fn read(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        match self {
            StreamReader::Plain(sock) => read_some(sock, buf).await,
            StreamReader::Boxed(r) => r.read_buf(buf).await,
        }
    }
}

/// Starts the writer task of an attached stream: through `w` (TLS), or the shared socket.
pub fn spawn_writer(
    sink: &FrameSink,
    w: Option<Pin<Box<dyn AsyncWrite + Send>>>,
) -> tokio::task::JoinHandle<()> {
    let sink = sink.clone();
    tokio::spawn(async move {
        match w {
            Some(w) => sink.run_writer(w).await,
            None => sink.run_writer(tokio::io::sink()).await,
        }
    })
}

impl PacketSink for TunWriter {
    fn push(&mut self, packet: &[u8]) -> bool {
        TunWriter::push(self, packet)
    }
    fn is_full(&self) -> bool {
        TunWriter::is_full(self)
    }
}

/// One TUN writer per tunnel, created when its first stream attaches and held by the reader of
/// its current stream: a newer stream's reader waits until the replaced one let go, so a peer
/// holds one writer's batch memory however many streams it opens.
pub struct TunWriters {
    tun: Tun,
    /// One per tunnel; grows when the seed's node gains peers at run time (bounded by the
    /// node's tunnels).
    slots: Mutex<Vec<Arc<tokio::sync::Mutex<Option<TunWriter>>>>>,
}

impl TunWriters {
    pub fn new(tun: Tun, tunnels: usize) -> Self {
        Self {
            tun,
            slots: Mutex::new((0..tunnels).map(|_| Arc::default()).collect()),
        }
    }

    /// Tunnel `i`'s writer slot (created when the tunnel is new).
    fn slot(&self, i: usize) -> Arc<tokio::sync::Mutex<Option<TunWriter>>> {
        let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if slots.len() <= i {
            slots.resize_with(i + 1, Arc::default);
        }
        slots[i].clone()
    }
}

/// Serves an attached stream until it ends, is replaced or breaks: decrypts what it reads
/// into the tunnel's TUN writer, writes what the node wants sent. `early`: bytes read past
/// the first message; `first_packets`: packets of the first message. Tells the node when the
/// stream ended; returns how.
pub async fn serve_attached(
    cell: &NodeCell,
    writers: &TunWriters,
    id: StreamId,
    mut reader: StreamReader,
    early: &[u8],
    first_packets: &[Vec<u8>],
    stop: Arc<Notify>,
) -> Result<(), String> {
    let res = async {
        let slot = writers.slot(id.tunnel.index());
        // Waits until the reader of a replaced stream let go of the tunnel's TUN writer.
        let mut guard = tokio::select! {
            g = slot.clone().lock_owned() => g,
            _ = stop.notified() => return Ok(()),
        };
        let tun = guard.get_or_insert_with(|| writers.tun.writer());
        for p in first_packets {
            tun.push(p);
        }
        flush_tun(tun).await;
        let mut buf = BytesMut::with_capacity(READ_BUF);
        buf.extend_from_slice(early);
        loop {
            let more = {
                let mut node = cell.lock();
                let res = node.handle_stream_data(id, &mut buf, Instant::now(), tun);
                cell.drain(&mut node);
                match res {
                    Ok(more) => more,
                    Err(crate::node::StreamGone::Stale(_)) => return Ok(()),
                    Err(e) => return Err(e.to_string()),
                }
            };
            flush_tun(tun).await;
            if more {
                continue;
            }
            if buf.capacity() - buf.len() < MAX_FRAME_LEN {
                buf.reserve(READ_BUF);
            }
            let n = tokio::select! {
                r = reader.read(&mut buf) => r.map_err(|e| format!("read: {e}"))?,
                _ = stop.notified() => return Ok(()),
            };
            if n == 0 {
                return Err("the other side closed the stream".into());
            }
        }
    }
    .await;
    let mut node = cell.lock();
    let detail = match &res {
        Ok(()) => "stopped",
        Err(e) => e.as_str(),
    };
    node.stream_closed(id, detail, Instant::now());
    cell.drain(&mut node);
    drop(node);
    cell.poke();
    res
}

async fn flush_tun(tun: &mut TunWriter) {
    if let Err(e) = tun.flush().await {
        tracing::debug!(error = %e, "TUN write failed");
    }
}

/// Creates the node's TUN and a netlink handle; with offload, lowers the TUN's
/// `gso_max_size` so that one super-packet fits one tunnel frame.
pub async fn open_tun(
    cfg: &super::tun::TunConfig,
) -> anyhow::Result<(Tun, super::netlink::Netlink)> {
    use anyhow::Context;
    let dev = super::tun::create(cfg).with_context(|| format!("TUN {}", cfg.name))?;
    let tun = Tun::new(dev, cfg.mtu);
    let netlink = super::netlink::Netlink::new().await.context("netlink")?;
    if tun.offload {
        netlink
            .set_gso_max_size(&cfg.name, super::tunio::GSO_MAX_SIZE)
            .await
            .context("TUN gso_max_size")?;
    }
    Ok((tun, netlink))
}

/// TUN → node → streams: every batch read from the TUN is handed to the node under one lock.
pub async fn pump_tun(cell: Arc<NodeCell>, mut reader: TunReader) -> anyhow::Result<()> {
    loop {
        reader
            .recv()
            .await
            .map_err(|e| anyhow::anyhow!("TUN read: {e}"))?;
        let mut node = cell.lock();
        node.handle_tun_packets(reader.packets(), Instant::now());
        cell.drain(&mut node);
    }
}

/// Sleeps until the node's next deadline (or until poked), runs its timers, and hands every
/// tunnel due for a dial to `dial`.
pub async fn drive(cell: Arc<NodeCell>, mut dial: impl FnMut(TunnelId)) -> anyhow::Result<()> {
    loop {
        let deadline = {
            let mut node = cell.lock();
            node.handle_timeout(Instant::now());
            cell.drain(&mut node);
            while let Some(t) = node.poll_dial() {
                dial(t);
            }
            node.poll_timeout()
        };
        tokio::select! {
            _ = tokio::time::sleep_until(deadline.into()) => {}
            _ = cell.changed.notified() => {}
        }
    }
}
