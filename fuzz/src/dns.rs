//! `dns`: the response parser (`parse_response`) and the query builder (`encode_query`).
//!
//! Input: a query id, a type, a name (from a small list or raw text) and a mode. Mode 0: the
//! rest is a raw response datagram. Mode 1: the rest is appended as answer records to the
//! query turned into a response (so the question matches and the record parser is reached).
//! Mode 2: well-formed address records (owner: a pointer to the question name) are built from
//! the rest and the parsed answer is compared with the expected one.
//! Checks: no panic; an answer holds at most `MAX_ADDRS` addresses, all of the asked family,
//! a TTL without the top bit, and a TTL whenever it holds addresses; a response to our own
//! query is never a mismatch; built records are read back exactly.

use std::net::IpAddr;

use common::dns::{check_name, encode_query, parse_response, DnsError, QType, MAX_ADDRS};

use super::Reader;

const NAMES: [&str; 5] = [
    "kubernetes.default.svc.cluster.local",
    "a.example",
    "A.Example.",
    "x",
    "vpn-seed-server.shoot--p--s.svc",
];

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let id = r.u16();
    let qtype = if r.bool() { QType::Aaaa } else { QType::A };
    let sel = r.u8();
    let raw_name;
    let name = if sel < 0xf0 {
        NAMES[usize::from(sel) % NAMES.len()]
    } else {
        raw_name = String::from_utf8_lossy(r.short(255)).into_owned();
        raw_name.as_str()
    };
    let mode = r.u8() % 3;
    let rest = r.rest();

    // The raw input as a response, whatever the mode.
    let _ = check(data, id, name, qtype);

    let query = encode_query(id, name, qtype);
    assert_eq!(query.is_ok(), check_name(name).is_ok());
    let _ = qtype.to_string();
    let Ok(query) = query else {
        let _ = check(rest, id, name, qtype);
        return;
    };
    assert_eq!(query[..2], id.to_be_bytes());
    match mode {
        0 => {
            let _ = check(rest, id, name, qtype);
        }
        1 => {
            let mut m = as_response(&query, rest.first().copied().unwrap_or(0));
            m.extend_from_slice(rest.get(1..).unwrap_or_default());
            let res = check(&m, id, name, qtype);
            assert!(
                !matches!(
                    res,
                    Err(DnsError::Mismatch(_) | DnsError::IdMismatch { .. })
                ),
                "our own question does not match: {res:?}"
            );
        }
        _ => built(&query, rest, id, name, qtype),
    }
}

/// The query as a NOERROR response announcing `ancount` answers.
fn as_response(query: &[u8], ancount: u8) -> Vec<u8> {
    let mut m = query.to_vec();
    m[2] |= 0x80; // QR
    m[3] &= 0xf0; // rcode 0
    m[6..8].copy_from_slice(&u16::from(ancount).to_be_bytes());
    m
}

fn check(buf: &[u8], id: u16, name: &str, qtype: QType) -> Result<common::dns::Answer, DnsError> {
    let res = parse_response(buf, id, name, qtype);
    match &res {
        Ok(a) => {
            assert_eq!(buf[..2], id.to_be_bytes());
            assert!(buf[2] & 0x80 != 0, "a query accepted as response");
            assert!(a.addrs.len() <= MAX_ADDRS);
            for ip in &a.addrs {
                assert_eq!(ip.is_ipv6(), qtype == QType::Aaaa, "{ip} for {qtype}");
            }
            if let Some(t) = a.ttl {
                assert!(t <= 0x7fff_ffff, "ttl {t}");
            }
            if !a.addrs.is_empty() {
                assert!(a.ttl.is_some());
            }
            let _ = a.rcode.to_string();
        }
        Err(DnsError::IdMismatch { got, want }) => {
            assert_eq!(*want, id);
            assert_ne!(*got, id);
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    res
}

/// Address records owned by the question name (compression pointer to offset 12) with the
/// given addresses and TTLs; the answer must list them in order (at most `MAX_ADDRS`).
/// (An AAAA record takes 16 bytes of input, an A record the first 4 of them.)
fn built(query: &[u8], rest: &[u8], id: u16, name: &str, qtype: QType) {
    let mut r = Reader::new(rest);
    let n = r.below(40);
    let len = if qtype == QType::A { 4 } else { 16 };
    let mut want: Vec<IpAddr> = Vec::new();
    let mut ttl: Option<u32> = None;
    let mut m = as_response(query, 0);
    m[6..8].copy_from_slice(&u16::try_from(n).unwrap_or(0).to_be_bytes());
    for _ in 0..n {
        let t = r.u32();
        let rd: [u8; 16] = r.array();
        m.extend_from_slice(&[0xc0, 12]);
        m.extend_from_slice(&qtype.code().to_be_bytes());
        m.extend_from_slice(&[0, 1]);
        m.extend_from_slice(&t.to_be_bytes());
        m.extend_from_slice(&u16::try_from(len).unwrap_or(0).to_be_bytes());
        m.extend_from_slice(&rd[..len]);
        if want.len() < MAX_ADDRS {
            want.push(if len == 4 {
                IpAddr::from([rd[0], rd[1], rd[2], rd[3]])
            } else {
                IpAddr::from(rd)
            });
            let t = if t > 0x7fff_ffff { 0 } else { t };
            ttl = Some(ttl.map_or(t, |m| m.min(t)));
        }
    }
    let res = check(&m, id, name, qtype);
    let Ok(a) = res else {
        panic!("well-formed response refused: {res:?}");
    };
    assert_eq!(a.addrs, want);
    assert_eq!(a.ttl, ttl);
}
