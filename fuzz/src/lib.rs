//! Fuzz harness for the sans-IO core of `common`: one module per fuzz target, each with a
//! `run(data)` that feeds the input to the API and asserts its properties (a failed assertion
//! is a finding).
//!
//! The harness depends only on `common` and crates `common` itself depends on, and decodes
//! structured inputs with [`Reader`] instead of `arbitrary`: `common/tests/fuzz_regressions.rs`
//! compiles this very file (`#[path]`) and replays the committed corpora and every crash found
//! through the same `run` functions under plain `cargo test`.

pub mod connect_request;
pub mod connect_response;
pub mod dns;
pub mod forward;
pub mod frame;
pub mod hub;
pub mod keys;
pub mod limits;
pub mod packet_flow;

/// A cursor over fuzz input that never fails: once the input is used up every read yields
/// zeros (or empty slices), so any byte string decodes to some structured input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    data: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from the start of `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Up to `n` bytes.
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, tail) = self.data.split_at(n.min(self.data.len()));
        self.data = tail;
        head
    }

    /// Exactly `N` bytes (zero-padded).
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let b = self.bytes(N);
        out[..b.len()].copy_from_slice(b);
        out
    }

    /// One byte.
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// Big-endian `u16`.
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.array())
    }

    /// Big-endian `u32`.
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.array())
    }

    /// Big-endian `u64`.
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.array())
    }

    /// One bit of a byte.
    pub fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        usize::from(self.u8()) % n.max(1)
    }

    /// A byte string of at most `max` bytes, prefixed by its length (one byte).
    pub fn short(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u8()).min(max);
        self.bytes(n)
    }

    /// A byte string of at most `max` bytes, prefixed by its length (two bytes).
    pub fn long(&mut self, max: usize) -> &'a [u8] {
        let n = usize::from(self.u16()).min(max);
        self.bytes(n)
    }

    /// Everything that is left.
    pub fn rest(&mut self) -> &'a [u8] {
        self.bytes(self.data.len())
    }
}
