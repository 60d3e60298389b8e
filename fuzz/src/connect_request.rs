//! `connect_request`: `parse_request`, `check_connect`, `parse_target` and
//! `format_connect_request`.
//!
//! Input: the raw bytes are a request head (plus whatever follows it). The same bytes, read as
//! text, are also a CONNECT target and extra headers for `format_connect_request` (first line
//! the target, further lines `name:value`).
//! Checks: no panic; a complete head's length is at most the input's and at most
//! `MAX_HEAD_LEN`, and parsing just the head gives the same head; every line of an accepted
//! head ends in CRLF; a parsed target prints back to the same target; a formatted request
//! parses back to the same target and headers and passes `check_connect`.

use common::connect::{
    check_connect, format_connect_request, parse_request, parse_target, HeadError, RequestHead,
    Target, MAX_HEAD_LEN,
};

/// Runs one input.
pub fn run(data: &[u8]) {
    request(data);
    if let Ok(text) = std::str::from_utf8(data) {
        target(text);
        target(text.lines().next().unwrap_or(""));
        format(text);
    }
}

/// Checks a parsed request head (shared with the `forward` target).
pub fn request(data: &[u8]) -> Option<(RequestHead, usize)> {
    let res = parse_request(data);
    match &res {
        Ok(Some((head, n))) => {
            assert!(*n <= data.len(), "head length {n} > input {}", data.len());
            assert!(*n <= MAX_HEAD_LEN);
            let again = parse_request(&data[..*n]);
            assert_eq!(again.as_ref(), Ok(&Some((head.clone(), *n))));
            let raw = &data[..*n];
            assert!(
                raw.ends_with(b"\r\n\r\n"),
                "head does not end in an empty line"
            );
            for (i, &b) in raw.iter().enumerate() {
                if b == b'\n' {
                    assert!(i > 0 && raw[i - 1] == b'\r', "bare LF at {i} accepted");
                }
            }
            let _ = head.header("host");
            if check_connect(head).is_ok() {
                let hosts = head
                    .headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
                    .count();
                assert!(hosts <= 1);
                assert!(!head
                    .headers
                    .iter()
                    .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding")));
            }
            target(&head.target);
        }
        Ok(None) => assert!(data.len() < MAX_HEAD_LEN),
        Err(HeadError::HeadTooLarge) => assert!(data.len() >= MAX_HEAD_LEN),
        Err(_) => {}
    }
    res.ok().flatten()
}

fn target(s: &str) {
    match parse_target(s) {
        Ok(t) => {
            let printed = t.to_string();
            assert_eq!(
                parse_target(&printed).as_ref(),
                Ok(&t),
                "{s:?} -> {printed:?}"
            );
            match &t {
                Target::Addr(a) => assert_ne!(a.port(), 0),
                Target::Host { host, port } => {
                    assert_ne!(*port, 0);
                    assert!(!host.is_empty() && host.len() <= 254);
                    assert!(host.is_ascii() && !host.contains(':'));
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
}

fn format(text: &str) {
    let mut lines = text.split("\r\n");
    let target = lines.next().unwrap_or("");
    let extra: Vec<(&str, &str)> = lines.take(80).filter_map(|l| l.split_once(':')).collect();
    let Ok(req) = format_connect_request(target, &extra) else {
        return;
    };
    let parsed = parse_request(&req);
    let Ok(Some((head, n))) = parsed else {
        panic!("formatted request does not parse: {parsed:?}\n{req:?}");
    };
    assert_eq!(n, req.len());
    assert_eq!(head.method, "CONNECT");
    assert_eq!(head.target, target);
    assert_eq!(head.header("host"), Some(target.as_bytes()));
    assert_eq!(head.headers.len(), extra.len() + 1);
    for ((name, value), (n, v)) in extra.iter().zip(&head.headers[1..]) {
        assert_eq!(name, n);
        // Field values are trimmed by the parser (RFC 9110 §5.5).
        assert_eq!(value.trim_matches([' ', '\t']).as_bytes(), &v[..]);
    }
    let framing = extra.iter().any(|(n, _)| {
        ["host", "content-length", "transfer-encoding"]
            .iter()
            .any(|f| n.eq_ignore_ascii_case(f))
    });
    if !framing {
        assert_eq!(check_connect(&head), Ok(()));
    }
}
