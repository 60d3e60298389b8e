//! `connect_response`: `parse_response` and `format_response`.
//!
//! Input: the raw bytes are a response head (plus what follows). The first two bytes are also a
//! status code and the rest, as text, a reason and a body for `format_response`.
//! Checks: no panic; a complete head's length is at most the input's and `MAX_HEAD_LEN`, and
//! parsing just the head gives the same head; the status has at most three digits; a formatted response
//! with a three-digit status parses back with that status, its head followed by exactly
//! `Content-Length` body bytes.

use common::connect::{
    format_response, parse_response, HeadError, CONNECT_ESTABLISHED, MAX_HEAD_LEN,
};

use super::Reader;

/// Runs one input.
pub fn run(data: &[u8]) {
    response(data);
    let mut r = Reader::new(data);
    let status = r.u16();
    let text = String::from_utf8_lossy(r.rest());
    let (reason, body) = text.split_once('\n').unwrap_or((&text, ""));
    format(status, reason, body);
}

fn response(data: &[u8]) {
    match parse_response(data) {
        Ok(Some((head, n))) => {
            assert!(n <= data.len() && n <= MAX_HEAD_LEN);
            assert_eq!(
                parse_response(&data[..n]),
                Ok(Some((head.clone(), n))),
                "the head alone parses the same"
            );
            // Three digits, but `000`..`099` parse too (callers compare with 200).
            assert!(head.status <= 999, "status {}", head.status);
            assert!(head.version <= 1);
            let line = head.status_line();
            assert!(line.starts_with("HTTP/1."));
        }
        Ok(None) => assert!(data.len() < MAX_HEAD_LEN),
        Err(HeadError::HeadTooLarge) => assert!(data.len() >= MAX_HEAD_LEN),
        Err(_) => {}
    }
}

fn format(status: u16, reason: &str, body: &str) {
    let out = format_response(status, reason, body);
    if status == 200 {
        assert_eq!(out, CONNECT_ESTABLISHED);
    }
    if !(100..=999).contains(&status) {
        return;
    }
    let parsed = parse_response(&out);
    let Ok(Some((head, n))) = parsed else {
        panic!("formatted response does not parse: {parsed:?}\n{out:?}");
    };
    assert_eq!(head.status, status);
    assert_eq!(head.version, 1);
    if status != 200 {
        let text = String::from_utf8_lossy(&out[..n]);
        let len = text
            .split("\r\n")
            .find_map(|l| l.strip_prefix("Content-Length: "))
            .and_then(|v| v.parse::<usize>().ok());
        assert_eq!(len, Some(out.len() - n), "Content-Length matches the body");
        assert!(out.ends_with(b"\n"));
        assert!(!out[n..out.len() - 1].contains(&b'\n'), "one body line");
    } else {
        assert_eq!(n, out.len());
    }
}
