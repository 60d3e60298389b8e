//! DNS client messages without IO (RFC 1035): builds `A`/`AAAA` queries and reads the
//! addresses out of a response, following CNAME chains inside the message.
//!
//! Every length, count and compression pointer is checked; hostile input yields a
//! [`DnsError`], never a panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Longest name in text form, without the trailing dot.
pub const MAX_NAME_LEN: usize = 253;
/// Longest label.
pub const MAX_LABEL_LEN: usize = 63;
/// Most CNAME records followed from the question name.
pub const MAX_CNAME_HOPS: usize = 8;
/// Most addresses an [`Answer`] holds; further ones are ignored.
pub const MAX_ADDRS: usize = 32;
/// Most answer records of interest (CNAME or the asked type) read from one message.
const MAX_RECORDS: usize = 128;
/// Most compression pointers followed while reading one name.
const MAX_POINTERS: usize = 32;
/// Longest decoded name (wire limit 255 octets, i.e. 253 characters plus dots slack).
const MAX_DECODED_NAME: usize = 255;

const HEADER_LEN: usize = 12;
const CLASS_IN: u16 = 1;
const TYPE_CNAME: u16 = 5;
const FLAG_QR: u16 = 0x8000;
const MASK_OPCODE: u16 = 0x7800;
const FLAG_TC: u16 = 0x0200;
const FLAG_RD: u16 = 0x0100;

/// The record types this client asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QType {
    /// IPv4 address (type 1).
    A,
    /// IPv6 address (type 28).
    Aaaa,
}

impl QType {
    /// The type code on the wire.
    pub fn code(self) -> u16 {
        match self {
            QType::A => 1,
            QType::Aaaa => 28,
        }
    }
}

impl std::fmt::Display for QType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            QType::A => "A",
            QType::Aaaa => "AAAA",
        })
    }
}

/// Response code of a response header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rcode {
    /// 0: success (possibly without records of the asked type).
    NoError,
    /// 1: the server could not read the query.
    FormErr,
    /// 2: the server failed.
    ServFail,
    /// 3: the name does not exist.
    NxDomain,
    /// 4: not implemented.
    NotImp,
    /// 5: refused by policy.
    Refused,
    /// Any other code.
    Other(u8),
}

impl From<u8> for Rcode {
    fn from(v: u8) -> Self {
        match v {
            0 => Rcode::NoError,
            1 => Rcode::FormErr,
            2 => Rcode::ServFail,
            3 => Rcode::NxDomain,
            4 => Rcode::NotImp,
            5 => Rcode::Refused,
            n => Rcode::Other(n),
        }
    }
}

impl std::fmt::Display for Rcode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rcode::NoError => f.write_str("NOERROR"),
            Rcode::FormErr => f.write_str("FORMERR"),
            Rcode::ServFail => f.write_str("SERVFAIL"),
            Rcode::NxDomain => f.write_str("NXDOMAIN"),
            Rcode::NotImp => f.write_str("NOTIMP"),
            Rcode::Refused => f.write_str("REFUSED"),
            Rcode::Other(n) => write!(f, "RCODE {n}"),
        }
    }
}

/// What a response says about the question.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// The response code.
    pub rcode: Rcode,
    /// Addresses of the asked type owned by the question name or the end of its CNAME chain,
    /// in message order (at most [`MAX_ADDRS`]).
    pub addrs: Vec<IpAddr>,
    /// Smallest TTL (seconds) of the records used (CNAMEs and addresses); `None` without any.
    pub ttl: Option<u32>,
}

/// Why a name or a message was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DnsError {
    /// The name cannot be queried.
    #[error("invalid name: {0}")]
    InvalidName(&'static str),
    /// The server set the TC bit: the answer did not fit into the datagram.
    #[error("truncated")]
    Truncated,
    /// The response carries another id (a stale or spoofed datagram).
    #[error("response id {got} does not match query id {want}")]
    IdMismatch {
        /// Id in the response.
        got: u16,
        /// Id of the query.
        want: u16,
    },
    /// The message is not the response to this query.
    #[error("not the response to the query: {0}")]
    Mismatch(&'static str),
    /// The message violates the format.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
}

/// Checks `name` (letters, digits, `-` and `_`; labels of 1 to 63 characters; at most 253
/// characters) and returns it without its trailing dot, if any.
pub fn check_name(name: &str) -> Result<&str, DnsError> {
    let bare = name.strip_suffix('.').unwrap_or(name);
    if bare.is_empty() {
        return Err(DnsError::InvalidName("empty"));
    }
    if bare.len() > MAX_NAME_LEN {
        return Err(DnsError::InvalidName("longer than 253 characters"));
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err(DnsError::InvalidName("empty label"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(DnsError::InvalidName("label longer than 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(DnsError::InvalidName(
                "characters other than letters, digits, '-' and '_'",
            ));
        }
    }
    Ok(bare)
}

/// Builds a recursive (RD) query for the `qtype` records of `name` (a trailing dot is
/// accepted; the name is always treated as absolute).
pub fn encode_query(id: u16, name: &str, qtype: QType) -> Result<Vec<u8>, DnsError> {
    let name = check_name(name)?;
    let mut m = Vec::with_capacity(HEADER_LEN + name.len() + 6);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&FLAG_RD.to_be_bytes());
    // One question; no answer, authority or additional records.
    m.extend_from_slice(&[0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.') {
        let len = u8::try_from(label.len())
            .map_err(|_| DnsError::InvalidName("label longer than 63 characters"))?;
        m.push(len);
        m.extend_from_slice(label.as_bytes());
    }
    m.push(0);
    m.extend_from_slice(&qtype.code().to_be_bytes());
    m.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(m)
}

/// Reads the response to query `id` for the `qtype` records of `name`.
///
/// Fails with [`DnsError::IdMismatch`] or [`DnsError::Mismatch`] for datagrams that do not
/// answer this query (callers keep waiting), [`DnsError::Truncated`] when the TC bit is set,
/// and [`DnsError::Malformed`] for broken messages. A response code other than NOERROR is
/// not an error: it is reported in [`Answer::rcode`].
pub fn parse_response(buf: &[u8], id: u16, name: &str, qtype: QType) -> Result<Answer, DnsError> {
    let want = check_name(name)?.to_ascii_lowercase().into_bytes();
    let mut r = Reader { buf, pos: 0 };
    let got = r.u16()?;
    if got != id {
        return Err(DnsError::IdMismatch { got, want: id });
    }
    let flags = r.u16()?;
    if flags & FLAG_QR == 0 {
        return Err(DnsError::Mismatch("not a response"));
    }
    if flags & MASK_OPCODE != 0 {
        return Err(DnsError::Mismatch("opcode is not QUERY"));
    }
    if flags & FLAG_TC != 0 {
        return Err(DnsError::Truncated);
    }
    // The low 4 bits fit into a u8.
    let rcode = Rcode::from(u8::try_from(flags & 0x000f).unwrap_or(0));
    let qdcount = r.u16()?;
    let ancount = r.u16()?;
    r.u16()?; // authority records: not read
    r.u16()?; // additional records: not read

    match qdcount {
        1 => {
            let qname = r.name()?;
            let (qt, qc) = (r.u16()?, r.u16()?);
            if qname != want || qt != qtype.code() || qc != CLASS_IN {
                return Err(DnsError::Mismatch("question differs"));
            }
        }
        // Some servers leave the question out of error responses.
        0 if rcode != Rcode::NoError => {}
        _ => return Err(DnsError::Mismatch("question count is not 1")),
    }

    let mut records: Vec<Record> = Vec::new();
    for _ in 0..ancount {
        let owner = r.name()?;
        let rtype = r.u16()?;
        let class = r.u16()?;
        let ttl = r.u32()?;
        let rdlen = usize::from(r.u16()?);
        let rdata_at = r.pos;
        let rdata = r.take(rdlen)?;
        if class != CLASS_IN || records.len() >= MAX_RECORDS {
            continue;
        }
        // RFC 2181 §8: a TTL with the top bit set counts as zero.
        let ttl = if ttl > 0x7fff_ffff { 0 } else { ttl };
        let data = if rtype == TYPE_CNAME {
            let (target, _) = read_name(buf, rdata_at)?;
            Data::Cname(target)
        } else if rtype == qtype.code() {
            Data::Addr(match qtype {
                QType::A => {
                    let o: [u8; 4] = rdata
                        .try_into()
                        .map_err(|_| DnsError::Malformed("A record is not 4 bytes"))?;
                    IpAddr::V4(Ipv4Addr::from(o))
                }
                QType::Aaaa => {
                    let o: [u8; 16] = rdata
                        .try_into()
                        .map_err(|_| DnsError::Malformed("AAAA record is not 16 bytes"))?;
                    IpAddr::V6(Ipv6Addr::from(o))
                }
            })
        } else {
            continue;
        };
        records.push(Record { owner, ttl, data });
    }

    let mut ttl: Option<u32> = None;
    let mut current = want;
    let mut hops = 0;
    while let Some((target, t)) = records.iter().find_map(|rec| match &rec.data {
        Data::Cname(target) if rec.owner == current => Some((target, rec.ttl)),
        _ => None,
    }) {
        hops += 1;
        if hops > MAX_CNAME_HOPS {
            return Err(DnsError::Malformed("CNAME chain longer than 8"));
        }
        ttl = Some(ttl.map_or(t, |m| m.min(t)));
        current = target.clone();
    }
    let mut addrs = Vec::new();
    for rec in records.iter().filter(|rec| rec.owner == current) {
        if let Data::Addr(ip) = rec.data {
            if addrs.len() < MAX_ADDRS {
                addrs.push(ip);
                ttl = Some(ttl.map_or(rec.ttl, |m| m.min(rec.ttl)));
            }
        }
    }
    Ok(Answer { rcode, addrs, ttl })
}

/// An answer record of interest; names are lowercase, dot-separated, without trailing dot.
struct Record {
    owner: Vec<u8>,
    ttl: u32,
    data: Data,
}

enum Data {
    Cname(Vec<u8>),
    Addr(IpAddr),
}

const SHORT: DnsError = DnsError::Malformed("message ends early");

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DnsError> {
        let end = self.pos.checked_add(n).ok_or(SHORT)?;
        let s = self.buf.get(self.pos..end).ok_or(SHORT)?;
        self.pos = end;
        Ok(s)
    }

    fn u16(&mut self) -> Result<u16, DnsError> {
        let s = self.take(2)?;
        Ok(u16::from_be_bytes([
            *s.first().ok_or(SHORT)?,
            *s.get(1).ok_or(SHORT)?,
        ]))
    }

    fn u32(&mut self) -> Result<u32, DnsError> {
        Ok(u32::from(self.u16()?) << 16 | u32::from(self.u16()?))
    }

    fn name(&mut self) -> Result<Vec<u8>, DnsError> {
        let (name, next) = read_name(self.buf, self.pos)?;
        self.pos = next;
        Ok(name)
    }
}

/// Reads the (possibly compressed) name at `start`: returns it lowercase and dot-separated,
/// and the position after it in the original record.
fn read_name(buf: &[u8], start: usize) -> Result<(Vec<u8>, usize), DnsError> {
    let mut name = Vec::new();
    let mut pos = start;
    let mut after: Option<usize> = None;
    let mut pointers = 0;
    loop {
        let len = *buf.get(pos).ok_or(SHORT)?;
        match len & 0xc0 {
            0x00 if len == 0 => return Ok((name, after.unwrap_or(pos + 1))),
            0x00 => {
                let n = usize::from(len);
                let label = buf.get(pos + 1..pos + 1 + n).ok_or(SHORT)?;
                if !name.is_empty() {
                    name.push(b'.');
                }
                name.extend(label.iter().map(u8::to_ascii_lowercase));
                if name.len() > MAX_DECODED_NAME {
                    return Err(DnsError::Malformed("name longer than 255 bytes"));
                }
                pos += 1 + n;
            }
            0xc0 => {
                let low = *buf.get(pos + 1).ok_or(SHORT)?;
                let target = usize::from(u16::from_be_bytes([len & 0x3f, low]));
                if target >= pos {
                    return Err(DnsError::Malformed(
                        "compression pointer does not point back",
                    ));
                }
                pointers += 1;
                if pointers > MAX_POINTERS {
                    return Err(DnsError::Malformed("too many compression pointers"));
                }
                after.get_or_insert(pos + 2);
                pos = target;
            }
            _ => return Err(DnsError::Malformed("unsupported label type")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NAME: &str = "web.default.svc.cluster.local";

    /// A hand-built message: header fields, then raw sections.
    fn msg(id: u16, flags: u16, qd: u16, an: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        for v in [id, flags, qd, an, 0, 0] {
            m.extend_from_slice(&v.to_be_bytes());
        }
        m.extend_from_slice(body);
        m
    }

    fn wire_name(name: &str) -> Vec<u8> {
        let mut w = Vec::new();
        for l in name.split('.') {
            w.push(l.len() as u8);
            w.extend_from_slice(l.as_bytes());
        }
        w.push(0);
        w
    }

    fn question(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = wire_name(name);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    /// A resource record with owner `owner` (raw wire bytes, may be a pointer).
    fn rr(owner: &[u8], rtype: u16, ttl: u32, rdata: &[u8]) -> Vec<u8> {
        let mut r = owner.to_vec();
        r.extend_from_slice(&rtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&ttl.to_be_bytes());
        r.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        r.extend_from_slice(rdata);
        r
    }

    /// Pointer to the question name (offset 12).
    const QPTR: [u8; 2] = [0xc0, 12];
    const RESP: u16 = 0x8180; // QR, RD, RA

    #[test]
    fn encodes_a_query() {
        let q = encode_query(0xbeef, "Web.default.svc.cluster.local.", QType::Aaaa).unwrap();
        let mut want = vec![0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        want.extend(question("Web.default.svc.cluster.local", 28));
        assert_eq!(q, want);
    }

    #[test]
    fn rejects_bad_names() {
        let long_label = "a".repeat(64);
        let long_name = ["a".repeat(63).as_str(); 4].join(".") + ".ab";
        for bad in [
            "",
            ".",
            "a..b",
            ".a",
            long_label.as_str(),
            long_name.as_str(),
            "a b",
            "ä.example",
            "a.example..",
        ] {
            assert!(
                matches!(
                    encode_query(1, bad, QType::A),
                    Err(DnsError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
        let max = ["a".repeat(63).as_str(); 4].join(".");
        assert_eq!(max.len(), 255);
        let ok = &max[..253];
        assert!(encode_query(1, ok, QType::A).is_ok());
        assert!(encode_query(1, "_srv-x.example.", QType::A).is_ok());
    }

    #[test]
    fn reads_a_records_with_compression() {
        let mut body = question(NAME, 1);
        body.extend(rr(&QPTR, 1, 300, &[100, 96, 1, 10]));
        body.extend(rr(&QPTR, 1, 60, &[100, 96, 1, 11]));
        body.extend(rr(&QPTR, 28, 60, &[0; 16])); // another type: ignored
        let m = msg(7, RESP, 1, 3, &body);
        let a = parse_response(&m, 7, "WEB.default.svc.cluster.local.", QType::A).unwrap();
        assert_eq!(a.rcode, Rcode::NoError);
        assert_eq!(
            a.addrs,
            vec![
                "100.96.1.10".parse::<IpAddr>().unwrap(),
                "100.96.1.11".parse().unwrap()
            ]
        );
        assert_eq!(a.ttl, Some(60));
    }

    #[test]
    fn follows_cname_chains() {
        let mut body = question(NAME, 28);
        // NAME CNAME alias.example (written out at offset cname_at), alias CNAME x.alias
        let mut first = vec![5];
        first.extend_from_slice(b"alias");
        first.extend_from_slice(&[7]);
        first.extend_from_slice(b"example");
        first.push(0);
        let cname_rdata_at = 12 + body.len() + 2 + 10;
        body.extend(rr(&QPTR, 5, 100, &first));
        let alias_ptr = [0xc0, cname_rdata_at as u8];
        let mut second = vec![1, b'x'];
        second.extend_from_slice(&alias_ptr);
        let second_at = 12 + body.len() + 2 + 10;
        body.extend(rr(&alias_ptr, 5, 50, &second));
        let x_ptr = [0xc0, second_at as u8];
        body.extend(rr(
            &x_ptr,
            28,
            200,
            &"fd00:96:0:1::10".parse::<Ipv6Addr>().unwrap().octets(),
        ));
        body.extend(rr(&alias_ptr, 28, 10, &[0xfd; 16])); // not at the chain's end
        let m = msg(9, RESP, 1, 4, &body);
        let a = parse_response(&m, 9, NAME, QType::Aaaa).unwrap();
        assert_eq!(a.addrs, vec!["fd00:96:0:1::10".parse::<IpAddr>().unwrap()]);
        assert_eq!(a.ttl, Some(50));
    }

    #[test]
    fn cname_loops_are_bounded() {
        // NAME CNAME NAME.
        let mut body = question(NAME, 1);
        body.extend(rr(&QPTR, 5, 1, &QPTR));
        let m = msg(1, RESP, 1, 1, &body);
        assert_eq!(
            parse_response(&m, 1, NAME, QType::A),
            Err(DnsError::Malformed("CNAME chain longer than 8"))
        );
    }

    #[test]
    fn reports_rcodes_and_empty_answers() {
        let m = msg(3, RESP | 3, 1, 0, &question(NAME, 1));
        let a = parse_response(&m, 3, NAME, QType::A).unwrap();
        assert_eq!((a.rcode, a.addrs.len(), a.ttl), (Rcode::NxDomain, 0, None));
        assert_eq!(a.rcode.to_string(), "NXDOMAIN");
        // SERVFAIL without the question section.
        let m = msg(3, RESP | 2, 0, 0, &[]);
        assert_eq!(
            parse_response(&m, 3, NAME, QType::A).unwrap().rcode,
            Rcode::ServFail
        );
        // NOERROR without the question is not an answer to it.
        let m = msg(3, RESP, 0, 0, &[]);
        assert!(matches!(
            parse_response(&m, 3, NAME, QType::A),
            Err(DnsError::Mismatch(_))
        ));
    }

    #[test]
    fn rejects_other_messages() {
        let q = question(NAME, 1);
        let m = msg(5, RESP, 1, 0, &q);
        assert_eq!(
            parse_response(&m, 6, NAME, QType::A),
            Err(DnsError::IdMismatch { got: 5, want: 6 })
        );
        assert!(matches!(
            parse_response(&m, 5, "other.example", QType::A),
            Err(DnsError::Mismatch(_))
        ));
        assert!(matches!(
            parse_response(&m, 5, NAME, QType::Aaaa),
            Err(DnsError::Mismatch(_))
        ));
        let query = msg(5, 0x0100, 1, 0, &q);
        assert_eq!(
            parse_response(&query, 5, NAME, QType::A),
            Err(DnsError::Mismatch("not a response"))
        );
        let tc = msg(5, RESP | FLAG_TC, 1, 0, &q);
        assert_eq!(
            parse_response(&tc, 5, NAME, QType::A),
            Err(DnsError::Truncated)
        );
        assert_eq!(DnsError::Truncated.to_string(), "truncated");
    }

    #[test]
    fn rejects_broken_messages() {
        let mut body = question(NAME, 1);
        body.extend(rr(&QPTR, 1, 1, &[1, 2, 3, 4]));
        let full = msg(1, RESP, 1, 1, &body);
        assert!(parse_response(&full, 1, NAME, QType::A).is_ok());
        for cut in 0..full.len() {
            assert!(
                parse_response(&full[..cut], 1, NAME, QType::A).is_err(),
                "cut at {cut}"
            );
        }
        // A record of the wrong length.
        let mut body = question(NAME, 1);
        body.extend(rr(&QPTR, 1, 1, &[1, 2, 3]));
        assert_eq!(
            parse_response(&msg(1, RESP, 1, 1, &body), 1, NAME, QType::A),
            Err(DnsError::Malformed("A record is not 4 bytes"))
        );
        // A pointer to itself, and a forward pointer.
        let mut body = question(NAME, 1);
        let at = (12 + body.len()) as u8;
        body.extend(rr(&[0xc0, at], 1, 1, &[1, 2, 3, 4]));
        assert!(matches!(
            parse_response(&msg(1, RESP, 1, 1, &body), 1, NAME, QType::A),
            Err(DnsError::Malformed(_))
        ));
        let mut body = question(NAME, 1);
        body.extend(rr(&[0xc0, 200], 1, 1, &[1, 2, 3, 4]));
        assert!(matches!(
            parse_response(&msg(1, RESP, 1, 1, &body), 1, NAME, QType::A),
            Err(DnsError::Malformed(_))
        ));
        // Extended label type.
        let mut body = question(NAME, 1);
        body.extend(rr(&[0x41, 0], 1, 1, &[1, 2, 3, 4]));
        assert_eq!(
            parse_response(&msg(1, RESP, 1, 1, &body), 1, NAME, QType::A),
            Err(DnsError::Malformed("unsupported label type"))
        );
    }

    #[test]
    fn pointer_chains_are_bounded() {
        // The root name at 0, then pointers, each to the one before.
        let chain = |n: usize| {
            let mut b = vec![0u8];
            let mut prev = 0u16;
            for i in 0..n {
                let at = 1 + 2 * i as u16;
                b.extend_from_slice(&(0xc000 | prev).to_be_bytes());
                prev = at;
            }
            (b, usize::from(prev))
        };
        let (b, last) = chain(MAX_POINTERS);
        assert_eq!(read_name(&b, last), Ok((Vec::new(), last + 2)));
        let (b, last) = chain(MAX_POINTERS + 1);
        assert_eq!(
            read_name(&b, last),
            Err(DnsError::Malformed("too many compression pointers"))
        );
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600), id in any::<u16>()) {
            let _ = parse_response(&bytes, id, NAME, QType::A);
            let _ = parse_response(&bytes, id, NAME, QType::Aaaa);
        }

        #[test]
        fn mutated_answers_never_panic(flips in proptest::collection::vec((0usize..200, any::<u8>()), 1..8)) {
            let mut body = question(NAME, 1);
            body.extend(rr(&QPTR, 5, 100, &wire_name("alias.example")));
            body.extend(rr(&wire_name("alias.example"), 1, 60, &[10, 0, 0, 1]));
            let mut m = msg(42, RESP, 1, 2, &body);
            for (at, v) in flips {
                let n = m.len();
                if let Some(b) = m.get_mut(at % n) {
                    *b = v;
                }
            }
            let _ = parse_response(&m, 42, NAME, QType::A);
        }

        #[test]
        fn queries_round_trip(labels in proptest::collection::vec("[a-zA-Z0-9_-]{1,20}", 1..6), id in any::<u16>()) {
            let name = labels.join(".");
            let q = encode_query(id, &name, QType::A).unwrap();
            // Turn the query into an empty NOERROR response.
            let mut r = q.clone();
            r[2] |= 0x80;
            let a = parse_response(&r, id, &name.to_ascii_uppercase(), QType::A).unwrap();
            prop_assert_eq!(a.rcode, Rcode::NoError);
            prop_assert!(a.addrs.is_empty());
        }

        #[test]
        fn any_string_is_checked_without_panic(s in "\\PC{0,300}") {
            let _ = encode_query(1, &s, QType::A);
        }
    }
}
