//! Batched TUN reads and writes, with Linux offloads when the device has them.
//!
//! With offload (`IFF_VNET_HDR`, TSO/USO) the kernel hands over one TCP super-packet of up to
//! 64 KiB per read (the TUN's `gso_max_size` is lowered so one fits a tunnel frame). Such a
//! super-packet is carried through the tunnel **whole**: one read, one encryption, one frame,
//! one write, whatever its size. Its TCP checksum field is normalised to the partial form
//! (pseudo-header sum) that the receiving kernel completes per segment.
//!
//! [`TunWriter`] writes a TCP packet larger than its MTU as a GSO super-packet: the kernel
//! segments it to `MTU − headers` (the same size the MSS clamp gives the flow), or, without
//! offload, it is split in user space first. Runs of ordinary packets are coalesced (GRO)
//! before writing. Everything else — UDP GSO, IPv6 with extension headers — is split on read.
//! Without offload, one packet per syscall.

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::BytesMut;
use tun_rs::{
    gso_split, AsyncDevice, GROTable, VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4,
    VIRTIO_NET_HDR_GSO_TCPV6, VIRTIO_NET_HDR_LEN,
};

/// Packets a batch holds (one super-packet splits into at most this many).
pub const BATCH: usize = 64;
/// Slots kept free for the packets one message may release.
pub const SLACK: usize = 8;
/// Largest packet the TUN hands over or takes (IPv4/IPv6 total length bound).
pub const MAX_PACKET: usize = 65535;
/// Largest super-packet carried whole: it must fit one WireGuard message in one frame.
pub const MAX_WHOLE: usize = crate::frame::MAX_FRAME_LEN - 32;
/// `gso_max_size` for the TUN so that the kernel's super-packets fit [`MAX_WHOLE`].
pub const GSO_MAX_SIZE: u32 = 65000;

const GSO_NONE: u8 = 0;
const GSO_ECN: u8 = 0x80;
const F_NEEDS_CSUM: u8 = 1;
const PROTO_TCP: u8 = 6;
const TCP_CSUM_OFFSET: u16 = 16;
const TCP_FLAG_CWR: u8 = 0x80;

/// Where the TCP header of a plain IPv4 (options allowed) or IPv6 (no extension headers)
/// packet starts, and how long it is.
fn tcp_header(p: &[u8]) -> Option<(usize, usize)> {
    let first = *p.first()?;
    let iph = match first >> 4 {
        4 if *p.get(9)? == PROTO_TCP => usize::from(first & 0x0f) * 4,
        6 if *p.get(6)? == PROTO_TCP => 40,
        _ => return None,
    };
    let tcph = usize::from(*p.get(iph + 12)? >> 4) * 4;
    if iph < 20 || !(20..=60).contains(&tcph) || p.len() < iph + tcph {
        return None;
    }
    Some((iph, tcph))
}

/// Folded (not complemented) TCP pseudo-header sum over the packet's addresses and TCP
/// length: the partial checksum a device completes.
fn pseudo_header_sum(p: &[u8], iph: usize) -> Option<u16> {
    let tcp_len = p.len().checked_sub(iph)?;
    let mut sum: u64 = 0;
    let mut add = |b: &[u8]| {
        for c in b.chunks(2) {
            let hi = u64::from(c.first().copied().unwrap_or(0)) << 8;
            sum += hi | u64::from(c.get(1).copied().unwrap_or(0));
        }
    };
    if p.first()? >> 4 == 4 {
        add(p.get(12..20)?);
    } else {
        add(p.get(8..40)?);
    }
    add(&[0, PROTO_TCP]);
    add(&(u32::try_from(tcp_len).ok()?).to_be_bytes());
    while sum > 0xffff {
        sum = (sum >> 16) + (sum & 0xffff);
    }
    u16::try_from(sum).ok()
}

/// Completes a partial checksum (`NEEDS_CSUM` without GSO), as a device would.
fn complete_checksum(p: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let at = start.checked_add(offset)?;
    let field = p.get_mut(at..at + 2)?;
    let initial = u16::from_be_bytes([field[0], field[1]]);
    field.fill(0);
    let sum = tun_rs::checksum(p.get(start..)?, u64::from(initial));
    p.get_mut(at..at + 2)?
        .copy_from_slice(&(!sum).to_be_bytes());
    Some(())
}

/// An open TUN and how to use it; hands out readers and writers.
#[derive(Clone)]
pub struct Tun {
    pub dev: Arc<AsyncDevice>,
    pub offload: bool,
    pub mtu: u16,
}

impl Tun {
    pub fn new(dev: AsyncDevice, mtu: u16) -> Self {
        let offload = super::tun::offload_active(&dev);
        Self {
            dev: Arc::new(dev),
            offload,
            mtu,
        }
    }

    pub fn reader(&self) -> TunReader {
        TunReader::new(self.dev.clone(), self.offload, self.mtu)
    }

    pub fn writer(&self) -> TunWriter {
        TunWriter::new(self.dev.clone(), self.offload, self.mtu)
    }
}

/// Reads packets from the TUN in batches.
pub struct TunReader {
    dev: Arc<AsyncDevice>,
    offload: bool,
    original: Vec<u8>,
    /// The last read is one packet in `original[whole]` (no split, no copy).
    whole: Option<Range<usize>>,
    bufs: Vec<Vec<u8>>,
    sizes: Vec<usize>,
    count: usize,
}

impl TunReader {
    /// `mtu` bounds the size of split packets.
    pub fn new(dev: Arc<AsyncDevice>, offload: bool, mtu: u16) -> Self {
        let (n, size) = if offload {
            (BATCH, usize::from(mtu).max(1500) + 128)
        } else {
            (0, 0)
        };
        Self {
            dev,
            offload,
            original: vec![0; VIRTIO_NET_HDR_LEN + MAX_PACKET],
            whole: None,
            bufs: vec![vec![0; size]; n],
            sizes: vec![0; n],
            count: 0,
        }
    }

    /// Waits for the next read and returns how many packets it produced (0 for a read the
    /// kernel marked in a way we cannot handle; it is dropped like a bad packet on a wire).
    pub async fn recv(&mut self) -> io::Result<usize> {
        self.count = 0;
        self.whole = None;
        if !self.offload {
            let n = self.dev.recv(&mut self.original).await?;
            self.whole = Some(0..n);
            self.count = 1;
            return Ok(1);
        }
        let len = self.dev.recv(&mut self.original).await?;
        let Some(hdr_bytes) = self.original.get(..VIRTIO_NET_HDR_LEN) else {
            return Ok(0);
        };
        let mut hdr = VirtioNetHdr::decode(hdr_bytes)?;
        let range = VIRTIO_NET_HDR_LEN..len.max(VIRTIO_NET_HDR_LEN);
        let Some(pkt) = self.original.get_mut(range.clone()) else {
            return Ok(0);
        };
        let gso = hdr.gso_type & !GSO_ECN;
        if gso == GSO_NONE {
            if hdr.flags & F_NEEDS_CSUM != 0
                && complete_checksum(
                    pkt,
                    usize::from(hdr.csum_start),
                    usize::from(hdr.csum_offset),
                )
                .is_none()
            {
                return Ok(0);
            }
            self.whole = Some(range);
            self.count = 1;
            return Ok(1);
        }
        let tcp = (gso == VIRTIO_NET_HDR_GSO_TCPV4 || gso == VIRTIO_NET_HDR_GSO_TCPV6)
            .then(|| tcp_header(pkt))
            .flatten();
        if let Some((iph, _)) = tcp {
            if pkt.len() <= MAX_WHOLE {
                // Normalise the checksum field to the partial form: a forwarded (GRO)
                // super-packet arrives with a validated but meaningless field.
                let Some(sum) = pseudo_header_sum(pkt, iph) else {
                    return Ok(0);
                };
                let at = iph + usize::from(TCP_CSUM_OFFSET);
                if let Some(field) = pkt.get_mut(at..at + 2) {
                    field.copy_from_slice(&sum.to_be_bytes());
                }
                self.whole = Some(range);
                self.count = 1;
                return Ok(1);
            }
        }
        // Split: the kernel's hdr_len is not trusted (it can be the whole first packet on
        // the forward path); derive it from the headers like a device would.
        let is_v6 = pkt.first().map(|b| b >> 4) == Some(6);
        let start = usize::from(hdr.csum_start);
        let l4 = match tcp {
            Some((_, tcph)) => tcph,
            None if gso == tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4 => 8,
            None => match pkt.get(start + 12) {
                Some(b) if gso != tun_rs::VIRTIO_NET_HDR_GSO_UDP_L4 => usize::from(b >> 4) * 4,
                _ => return Ok(0),
            },
        };
        hdr.hdr_len = u16::try_from(start + l4).unwrap_or(u16::MAX);
        if pkt.len() < usize::from(hdr.hdr_len) {
            return Ok(0);
        }
        let n = gso_split(pkt, hdr, &mut self.bufs, &mut self.sizes, 0, is_v6)?;
        self.count = n.min(self.bufs.len());
        Ok(self.count)
    }

    /// The packets of the last read.
    pub fn packets(&self) -> impl Iterator<Item = &[u8]> {
        let whole = self.whole.clone().and_then(|r| self.original.get(r));
        let split = self
            .bufs
            .iter()
            .zip(self.sizes.iter())
            .take(if whole.is_some() { 0 } else { self.count })
            .map(|(b, &n)| b.get(..n).unwrap_or(&[]));
        whole.into_iter().chain(split)
    }
}

/// Collects packets and writes them to the TUN: runs of ordinary packets coalesced (GRO), TCP
/// super-packets as GSO writes.
pub struct TunWriter {
    dev: Arc<AsyncDevice>,
    offload: bool,
    mtu: usize,
    gro: GROTable,
    bufs: Vec<BytesMut>,
    /// GSO header of each queued packet (None: an ordinary packet).
    gso: Vec<Option<VirtioNetHdr>>,
    len: usize,
    split_bufs: Vec<Vec<u8>>,
    split_sizes: Vec<usize>,
}

impl TunWriter {
    pub fn new(dev: Arc<AsyncDevice>, offload: bool, mtu: u16) -> Self {
        Self {
            dev,
            offload,
            mtu: usize::from(mtu),
            gro: GROTable::new(),
            // GRO appends segments in place and never reallocates, so every slot has room
            // for a whole super-packet. Pages untouched stay virtual: RSS grows only with use.
            bufs: (0..BATCH)
                .map(|_| BytesMut::with_capacity(2 * VIRTIO_NET_HDR_LEN + MAX_PACKET))
                .collect(),
            gso: vec![None; BATCH],
            len: 0,
            split_bufs: Vec::new(),
            split_sizes: Vec::new(),
        }
    }

    /// The GSO header for a TCP packet larger than the MTU.
    fn gso_header(&self, p: &[u8]) -> Option<VirtioNetHdr> {
        if p.len() <= self.mtu {
            return None;
        }
        let (iph, tcph) = tcp_header(p)?;
        let headers = iph + tcph;
        let gso_size = self.mtu.checked_sub(headers).filter(|s| *s > 0)?;
        let v6 = p.first()? >> 4 == 6;
        let mut gso_type = if v6 {
            VIRTIO_NET_HDR_GSO_TCPV6
        } else {
            VIRTIO_NET_HDR_GSO_TCPV4
        };
        if p.get(iph + 13)? & TCP_FLAG_CWR != 0 {
            gso_type |= GSO_ECN;
        }
        Some(VirtioNetHdr {
            flags: F_NEEDS_CSUM,
            gso_type,
            hdr_len: u16::try_from(headers).ok()?,
            gso_size: u16::try_from(gso_size).ok()?,
            csum_start: u16::try_from(iph).ok()?,
            csum_offset: TCP_CSUM_OFFSET,
        })
    }

    /// Queues one packet (copied). Returns false when the batch is full; flush first.
    pub fn push(&mut self, p: &[u8]) -> bool {
        let hdr = self.gso_header(p);
        let (Some(b), Some(g)) = (self.bufs.get_mut(self.len), self.gso.get_mut(self.len)) else {
            return false;
        };
        b.clear();
        b.resize(VIRTIO_NET_HDR_LEN, 0);
        b.extend_from_slice(p);
        *g = hdr;
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

    async fn write_run(&mut self, run: Range<usize>) -> io::Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let bufs = self
            .bufs
            .get_mut(run)
            .ok_or_else(|| io::Error::other("batch out of range"))?;
        if self.offload {
            return self
                .dev
                .send_multiple(&mut self.gro, bufs, VIRTIO_NET_HDR_LEN)
                .await
                .map(|_| ());
        }
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
    }

    async fn write_super(&mut self, i: usize, hdr: VirtioNetHdr) -> io::Result<()> {
        let b = self
            .bufs
            .get_mut(i)
            .ok_or_else(|| io::Error::other("batch out of range"))?;
        if self.offload {
            hdr.encode(b.get_mut(..VIRTIO_NET_HDR_LEN).unwrap_or(&mut []))?;
            return self.dev.send(b).await.map(|_| ());
        }
        // No offload: segment in user space (checksums computed per segment).
        let pkt = b.get_mut(VIRTIO_NET_HDR_LEN..).unwrap_or(&mut []);
        let n = pkt.len() / usize::from(hdr.gso_size.max(1)) + 2;
        let seg = self.mtu + 64;
        if self.split_bufs.len() < n {
            self.split_bufs.resize(n, vec![0; seg]);
            self.split_sizes.resize(n, 0);
        }
        let is_v6 = pkt.first().map(|b| b >> 4) == Some(6);
        let count = gso_split(
            pkt,
            hdr,
            &mut self.split_bufs,
            &mut self.split_sizes,
            0,
            is_v6,
        )?;
        for (b, &len) in self.split_bufs.iter().zip(&self.split_sizes).take(count) {
            self.dev.send(b.get(..len).unwrap_or(&[])).await?;
        }
        Ok(())
    }

    /// Writes every queued packet, in order. Errors of single writes (e.g. a packet the
    /// kernel refuses) are returned after the batch is emptied, so one bad packet never
    /// blocks the others.
    pub async fn flush(&mut self) -> io::Result<()> {
        let n = std::mem::take(&mut self.len);
        let mut res = Ok(());
        let mut run_start = 0;
        for i in 0..n {
            let Some(hdr) = self.gso.get_mut(i).and_then(Option::take) else {
                continue;
            };
            if let Err(e) = self.write_run(run_start..i).await {
                res = Err(e);
            }
            if let Err(e) = self.write_super(i, hdr).await {
                res = Err(e);
            }
            run_start = i + 1;
        }
        if let Err(e) = self.write_run(run_start..n).await {
            res = Err(e);
        }
        res
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(payload: usize) -> Vec<u8> {
        let tl = 40 + payload;
        let mut p = vec![0u8; tl];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(tl as u16).to_be_bytes());
        p[9] = PROTO_TCP;
        p[12..16].copy_from_slice(&[10, 0, 0, 1]);
        p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        p[32] = 0x50;
        p[33] = 0x10;
        p
    }

    #[test]
    fn finds_tcp_headers() {
        assert_eq!(tcp_header(&tcp4(10)), Some((20, 20)));
        let mut udp = tcp4(10);
        udp[9] = 17;
        assert_eq!(tcp_header(&udp), None);
        assert_eq!(tcp_header(&[0x45]), None);
        assert_eq!(tcp_header(&[]), None);
    }

    #[test]
    fn pseudo_header_sum_matches_a_full_checksum() {
        // A full checksum computed from the partial one must verify to zero.
        let mut p = tcp4(100);
        for (i, b) in p.iter_mut().enumerate().skip(40) {
            *b = i as u8;
        }
        let partial = pseudo_header_sum(&p, 20).unwrap();
        p[36..38].copy_from_slice(&partial.to_be_bytes());
        complete_checksum(&mut p, 20, 16).unwrap();
        // Verify: one's complement sum over pseudo header + segment is 0xffff.
        let mut pseudo = vec![];
        pseudo.extend_from_slice(&p[12..20]);
        pseudo.extend_from_slice(&[0, 6]);
        pseudo.extend_from_slice(&((p.len() - 20) as u16).to_be_bytes());
        pseudo.extend_from_slice(&p[20..]);
        assert_eq!(tun_rs::checksum(&pseudo, 0), 0xffff);
    }
}
