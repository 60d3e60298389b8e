//! A tiny authoritative DNS responder over UDP for the e2e tests: answers A and AAAA queries
//! for the names given with `--record name=ip` (repeatable; a name may have several), an empty
//! NOERROR for a known name without records of the asked type, NXDOMAIN for any other name,
//! and FORMERR for queries it cannot read. Logs every query to stderr.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};

use anyhow::{bail, Context, Result};
use clap::Parser;

/// TTL of every answer record (seconds).
const TTL: u32 = 5;
/// Largest answer this responder sends (no EDNS).
const MAX_UDP: usize = 512;

#[derive(Parser, Debug)]
#[command(about = "A and AAAA responder for the e2e tests")]
struct Args {
    /// UDP listen address.
    #[arg(long, default_value = "0.0.0.0:53")]
    listen: SocketAddr,
    /// `name=ip`: an A (IPv4) or AAAA (IPv6) record. Repeatable.
    #[arg(long = "record")]
    records: Vec<String>,
}

/// A query's id, flags, question (raw, to be echoed), lowercase name and type.
struct Query<'a> {
    id: [u8; 2],
    rd: u8,
    question: &'a [u8],
    name: String,
    qtype: u16,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut zone: HashMap<String, Vec<IpAddr>> = HashMap::new();
    for r in &args.records {
        let (name, ip) = r
            .split_once('=')
            .with_context(|| format!("--record {r:?}: want name=ip"))?;
        let ip: IpAddr = ip
            .parse()
            .with_context(|| format!("--record {r:?}: bad address"))?;
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if name.is_empty() {
            bail!("--record {r:?}: empty name");
        }
        zone.entry(name).or_default().push(ip);
    }
    let sock = UdpSocket::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    eprintln!(
        "dnsserver: listening on {} with {} names",
        args.listen,
        zone.len()
    );
    let mut buf = [0u8; 1500];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("dnsserver: recv: {e}");
                continue;
            }
        };
        let msg = buf.get(..n).unwrap_or_default();
        let reply = match parse_query(msg) {
            Some(q) => {
                let reply = answer(&q, &zone);
                eprintln!(
                    "dnsserver: {from} {} type {} -> rcode {}, {} records",
                    q.name,
                    q.qtype,
                    reply.get(3).map_or(0, |b| b & 0x0f),
                    reply.get(7).copied().unwrap_or(0)
                );
                reply
            }
            None if n >= 2 => {
                eprintln!("dnsserver: {from} unreadable query of {n} bytes");
                // FORMERR without a question.
                let mut r = msg.get(..2).unwrap_or_default().to_vec();
                r.extend_from_slice(&[0x80, 0x01, 0, 0, 0, 0, 0, 0, 0, 0]);
                r
            }
            None => continue,
        };
        if let Err(e) = sock.send_to(&reply, from) {
            eprintln!("dnsserver: send to {from}: {e}");
        }
    }
}

/// Reads a standard query with one uncompressed question.
fn parse_query(m: &[u8]) -> Option<Query<'_>> {
    let id = [*m.first()?, *m.get(1)?];
    let flags = u16::from_be_bytes([*m.get(2)?, *m.get(3)?]);
    // A query (QR clear) with opcode QUERY and exactly one question.
    if flags & 0xf800 != 0 || m.get(4..6)? != [0, 1] {
        return None;
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*m.get(pos)?);
        if len == 0 {
            pos += 1;
            break;
        }
        if len > 63 {
            return None;
        }
        let label = m.get(pos + 1..pos + 1 + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += 1 + len;
    }
    let qtype = u16::from_be_bytes([*m.get(pos)?, *m.get(pos + 1)?]);
    let question = m.get(12..pos + 4)?;
    Some(Query {
        id,
        rd: u8::from(flags & 0x0100 != 0),
        question,
        name: labels.join("."),
        qtype,
    })
}

/// The response to `q` from `zone`.
fn answer(q: &Query<'_>, zone: &HashMap<String, Vec<IpAddr>>) -> Vec<u8> {
    let records: Vec<&IpAddr> = zone
        .get(&q.name)
        .map(|ips| {
            ips.iter()
                .filter(|ip| match ip {
                    IpAddr::V4(_) => q.qtype == 1,
                    IpAddr::V6(_) => q.qtype == 28,
                })
                .collect()
        })
        .unwrap_or_default();
    let rcode = if zone.contains_key(&q.name) { 0 } else { 3 };
    let mut r = Vec::with_capacity(MAX_UDP);
    r.extend_from_slice(&q.id);
    // QR, AA, RD echoed; RA.
    r.push(0x84 | q.rd);
    r.push(0x80 | rcode);
    r.extend_from_slice(&[0, 1]);
    let count_at = r.len();
    r.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    r.extend_from_slice(q.question);
    let mut count: u16 = 0;
    for ip in records {
        let rdata: Vec<u8> = match ip {
            IpAddr::V4(a) => a.octets().to_vec(),
            IpAddr::V6(a) => a.octets().to_vec(),
        };
        if r.len() + 12 + rdata.len() > MAX_UDP {
            break;
        }
        // Owner: pointer to the question name at offset 12.
        r.extend_from_slice(&[0xc0, 12]);
        r.extend_from_slice(&q.qtype.to_be_bytes());
        r.extend_from_slice(&1u16.to_be_bytes());
        r.extend_from_slice(&TTL.to_be_bytes());
        r.extend_from_slice(&u16::try_from(rdata.len()).unwrap_or(0).to_be_bytes());
        r.extend_from_slice(&rdata);
        count += 1;
    }
    if let Some(c) = r.get_mut(count_at..count_at + 2) {
        c.copy_from_slice(&count.to_be_bytes());
    }
    r
}
