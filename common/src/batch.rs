//! A reusable batch of packets in one contiguous buffer: decrypted packets are collected while
//! a session lock is held and written to the TUN after it is released.

/// Packets stored back to back; no allocation once the buffers have grown.
#[derive(Default, Debug)]
pub struct PacketBatch {
    data: Vec<u8>,
    ends: Vec<usize>,
}

impl PacketBatch {
    /// Appends one packet.
    pub fn push(&mut self, p: &[u8]) {
        self.data.extend_from_slice(p);
        self.ends.push(self.data.len());
    }

    /// The packets in the order they were pushed.
    pub fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let p = self.data.get(start..end).unwrap_or(&[]);
            start = end;
            p
        })
    }

    /// Empties the batch, keeping its capacity.
    pub fn clear(&mut self) {
        self.data.clear();
        self.ends.clear();
    }

    pub fn len(&self) -> usize {
        self.ends.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_packets_apart() {
        let mut b = PacketBatch::default();
        b.push(b"abc");
        b.push(b"");
        b.push(b"de");
        let v: Vec<&[u8]> = b.iter().collect();
        assert_eq!(v, vec![&b"abc"[..], &b""[..], &b"de"[..]]);
        b.clear();
        assert!(b.is_empty());
    }
}
