//! Batched TUN reads and writes, with Linux offloads when the device has them.
//!
//! With offload (`IFF_VNET_HDR`, TSO/USO) the kernel hands one TCP super-packet of up to 64 KiB
//! per read, which [`TunReader`] splits into MTU-sized packets in user space: one syscall per
//! 64 KiB instead of one per packet. [`TunWriter`] coalesces consecutive TCP segments of a flow
//! back into super-packets (GRO) before writing, so the receiving kernel handles few large
//! packets. The wire format of the tunnel is unchanged: every WireGuard message still carries
//! one MTU-sized IP packet. Without offload both fall back to one packet per syscall.

use std::io;
use std::sync::Arc;

use bytes::BytesMut;
use tun_rs::{AsyncDevice, GROTable, VIRTIO_NET_HDR_LEN};

/// Packets a batch holds (one super-packet splits into at most this many).
pub const BATCH: usize = 64;
/// Slots kept free for the packets one message may release.
pub const SLACK: usize = 8;
/// Largest packet the TUN hands over or takes (IPv4/IPv6 total length bound).
pub const MAX_PACKET: usize = 65535;

/// Reads packets from the TUN in batches.
pub struct TunReader {
    dev: Arc<AsyncDevice>,
    offload: bool,
    original: Vec<u8>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl TunReader {
    /// `mtu` bounds the size of the split packets.
    pub fn new(dev: Arc<AsyncDevice>, offload: bool, mtu: u16) -> Self {
        let (n, size) = if offload {
            (BATCH, usize::from(mtu).max(1500) + 128)
        } else {
            (1, MAX_PACKET)
        };
        Self {
            dev,
            offload,
            original: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            bufs: vec![vec![0; size]; n],
            sizes: vec![0; n],
            count: 0,
        }
    }

    /// Waits for the next read and returns how many packets it produced.
    pub async fn recv(&mut self) -> io::Result<usize> {
        self.count = 0;
        let n = if self.offload {
            self.dev
                .recv_multiple(&mut self.original, &mut self.bufs, &mut self.sizes, 0)
                .await?
        } else {
            let buf = self
                .bufs
                .first_mut()
                .ok_or_else(|| io::Error::other("no buffer"))?;
            let n = self.dev.recv(buf).await?;
            if let Some(s) = self.sizes.first_mut() {
                *s = n;
            }
            1
        };
        self.count = n.min(self.bufs.len());
        Ok(self.count)
    }

    /// The packets of the last read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        self.bufs
            .iter()
            .zip(self.sizes.iter())
            .take(self.count)
            .map(|(b, &n)| b.get(..n).unwrap_or(&[]))
    }
}

/// Collects packets and writes them to the TUN, coalesced when offload is on.
pub struct TunWriter {
    dev: Arc<AsyncDevice>,
    offload: bool,
    gro: GROTable,
    bufs: Vec<BytesMut>,
    len: usize,
}

impl TunWriter {
    pub fn new(dev: Arc<AsyncDevice>, offload: bool) -> Self {
        Self {
            dev,
            offload,
            gro: GROTable::new(),
            // GRO appends segments in place and never reallocates, so every slot has room for
            // a whole super-packet. Pages untouched stay virtual: RSS grows only with use.
            bufs: (0..BATCH)
                .map(|_| BytesMut::with_capacity(2 * VIRTIO_NET_HDR_LEN + MAX_PACKET))
                .collect(),
            len: 0,
        }
    }

    /// Queues one packet (copied). Returns false when the batch is full; flush first.
    pub fn push(&mut self, p: &[u8]) -> bool {
        let Some(b) = self.bufs.get_mut(self.len) else {
            return false;
        };
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(p);
        self.len += 1;
        true
    }

    /// True when fewer than [`SLACK`] slots are left: one decrypted message can release
    /// several packets (those queued during a handshake), so callers stop early.
    pub fn is_full(&self) -> bool {
        self.len + SLACK >= self.bufs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of packets queued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Writes every queued packet. Errors of single writes (e.g. a packet the kernel refuses)
    /// are returned after the batch is emptied, so one bad packet never blocks the others.
    pub async fn flush(&mut self) -> io::Result<()> {
        if self.len == 0 {
            return Ok(());
        }
        let n = self.len;
        self.len = 0;
        let bufs = self
            .bufs
            .get_mut(..n)
            .ok_or_else(|| io::Error::other("batch out of range"))?;
        let res = if self.offload {
            self.dev
                .send_multiple(&mut self.gro, bufs, VIRTIO_NET_HDR_LEN)
                .await
                .map(|_| ())
        } else {
            let mut res = Ok(());
            for b in bufs.iter() {
                if let Err(e) = self
                    .dev
                    .send(b.get(VIRTIO_NET_HDR_LEN..).unwrap_or(&[]))
                    .await
                {
                    res = Err(e);
                }
            }
            res
        };
        res
    }
}
