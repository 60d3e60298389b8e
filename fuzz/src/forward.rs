//! `forward`: `parse_request` then `forward_request`, and `close_response_head`.
//!
//! Input: the raw bytes are a request head for the forward proxy, and also an upstream
//! response head for `close_response_head`.
//! Checks: no panic; a forwarded head parses again with `parse_request` as one complete head
//! of its full length, in origin form (path starting with `/`), with the same method, exactly
//! one `Host` header (the target's authority), no `Transfer-Encoding`, no hop-by-hop header and
//! exactly one `Connection: close`; `Content-Length` is repeated only as the single value the
//! body length came from. A closed response head parses again as one complete head with the
//! same status, one `Connection: close` and none of the headers its `Connection` named.

use common::connect::{
    parse_request, parse_response, RequestHead, Target, MAX_HEADERS, MAX_HEAD_LEN,
};
use common::forward::{close_response_head, forward_request, HOP_BY_HOP, MAX_BODY};

/// Runs one input.
pub fn run(data: &[u8]) {
    if let Some((head, n)) = super::connect_request::request(data) {
        forward(&head, n);
    }
    close(data);
}

fn count<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Vec<&'a [u8]> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
        .collect()
}

fn authority(t: &Target) -> String {
    match t {
        Target::Addr(a) if a.port() == 80 => match a.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        },
        Target::Host { host, port: 80 } => host.clone(),
        other => other.to_string(),
    }
}

fn forward(head: &RequestHead, orig_len: usize) {
    let Ok(f) = forward_request(head) else {
        return;
    };
    assert!(f.body_len <= MAX_BODY);
    // The forwarded head can outgrow the original a little (`Host` and `Connection: close`
    // added, `name: value` spacing) and so `MAX_HEAD_LEN`, which is our limit, not the
    // upstream's: re-parse it without that limit, and with `parse_request` when it fits.
    let n = f.head.len();
    assert!(
        n <= orig_len + 128,
        "forwarded head of {n} bytes from {orig_len}"
    );
    let Some(out) = reparse(&f.head) else {
        panic!(
            "forwarded head does not parse: {:?}",
            String::from_utf8_lossy(&f.head)
        );
    };
    if n <= MAX_HEAD_LEN && out.headers.len() <= MAX_HEADERS {
        assert_eq!(parse_request(&f.head), Ok(Some((out.clone(), n))));
    }
    assert_eq!(out.method, head.method);
    assert_eq!(out.version, 1);
    assert!(out.target.starts_with('/'), "origin form: {:?}", out.target);
    assert!(!out.target.contains('#'));

    let host = count(&out.headers, "host");
    assert_eq!(host.len(), 1, "exactly one Host");
    assert_eq!(host[0], authority(&f.target).as_bytes());
    assert!(count(&out.headers, "transfer-encoding").is_empty());
    for h in HOP_BY_HOP.iter().filter(|h| **h != "connection") {
        assert!(count(&out.headers, h).is_empty(), "hop-by-hop {h} kept");
    }
    assert_eq!(count(&out.headers, "connection"), vec![&b"close"[..]]);

    let lengths = count(&out.headers, "content-length");
    assert!(lengths.len() <= 1, "Content-Length repeated");
    match lengths.first() {
        Some(v) => {
            let n = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<u64>().ok());
            assert_eq!(n, Some(f.body_len));
        }
        None => assert_eq!(f.body_len, 0),
    }
    // Every forwarded header was in the request (besides the rewritten Host and Connection).
    for (name, value) in &out.headers {
        if name.eq_ignore_ascii_case("host") || name.eq_ignore_ascii_case("connection") {
            continue;
        }
        assert!(
            head.headers.iter().any(|(n, v)| n == name && v == value),
            "header {name} not from the request"
        );
    }
}

fn close(data: &[u8]) {
    let Ok(Some((out, n))) = close_response_head(data) else {
        return;
    };
    assert!(n <= data.len() && n <= MAX_HEAD_LEN);
    let Ok(Some((orig, _))) = parse_response(data) else {
        panic!("close_response_head accepted what parse_response refuses");
    };
    // As for requests: the rewritten head may exceed our own parser's limits (one more field,
    // a few more bytes); the client's parser has its own.
    let (status, version, names) = response_fields(&out);
    if out.len() <= MAX_HEAD_LEN && names.len() <= MAX_HEADERS {
        let parsed = parse_response(&out);
        let Ok(Some((resp, m))) = parsed else {
            panic!("closed response head does not parse: {parsed:?}");
        };
        assert_eq!((m, resp.status, resp.version), (out.len(), status, version));
    }
    assert_eq!(status, orig.status);
    assert_eq!(version, orig.version);

    // Headers of the rewritten head, and the names the original's Connection headers listed.
    assert_eq!(
        names.iter().filter(|(n, _)| n == "connection").count(),
        1,
        "one Connection header"
    );
    assert!(names.contains(&("connection".to_owned(), b"close".to_vec())));
    for gone in ["keep-alive", "proxy-connection"] {
        assert!(!names.iter().any(|(n, _)| n == gone), "{gone} kept");
    }
    let listed: Vec<String> = response_fields(&data[..n])
        .2
        .into_iter()
        .filter(|(name, _)| name == "connection")
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(&v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect();
    for l in listed.iter().filter(|l| *l != "connection") {
        assert!(
            !names.iter().any(|(n, _)| n == l),
            "header {l} named by Connection kept"
        );
    }
}

/// A complete request head of exactly `raw` (CRLF line endings only), without a size limit.
fn reparse(raw: &[u8]) -> Option<RequestHead> {
    let crlf = raw
        .iter()
        .enumerate()
        .all(|(i, &b)| b != b'\n' || (i > 0 && raw[i - 1] == b'\r'));
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut req = httparse::Request::new(&mut headers);
    match req.parse(raw) {
        Ok(httparse::Status::Complete(n)) if n == raw.len() && crlf => Some(RequestHead {
            method: req.method?.to_owned(),
            target: req.path?.to_owned(),
            version: req.version?,
            headers: req
                .headers
                .iter()
                .map(|h| (h.name.to_owned(), h.value.to_vec()))
                .collect(),
        }),
        _ => None,
    }
}

/// Status, minor version and header fields (lowercase names) of exactly one complete
/// response head, without a size limit.
fn response_fields(head: &[u8]) -> (u16, u8, Vec<(String, Vec<u8>)>) {
    let mut headers = [httparse::EMPTY_HEADER; 128];
    let mut resp = httparse::Response::new(&mut headers);
    match resp.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => (
            resp.code.unwrap_or_default(),
            resp.version.unwrap_or_default(),
            resp.headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        ),
        other => panic!(
            "head does not parse again: {other:?}: {:?}",
            String::from_utf8_lossy(head)
        ),
    }
}
