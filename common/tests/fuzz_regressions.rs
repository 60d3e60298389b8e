//! The fuzz targets' harness (`fuzz/src`) under plain `cargo test`: every committed corpus
//! file (`fuzz/corpus/<target>/*`) and every crash the fuzzers found goes through the same
//! `run` function, with the same property checks, as in the fuzz target.
//!
//! Run the fuzzers themselves with `scripts/fuzz.sh`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
#![allow(clippy::disallowed_methods, clippy::disallowed_types)] // tests set up files and clocks

#[path = "../../fuzz/src/lib.rs"]
mod harness;

use std::path::PathBuf;

/// The files of `fuzz/corpus/<target>`, sorted; none if the directory is missing.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

/// Feeds every corpus file of `target` to `run`, naming the file that fails.
fn replay(target: &str, run: fn(&[u8])) {
    for (path, data) in corpus(target) {
        if std::panic::catch_unwind(|| run(&data)).is_err() {
            panic!("{target}: corpus input {} fails", path.display());
        }
    }
}

#[test]
fn corpus_frame() {
    replay("frame", harness::frame::run);
}

#[test]
fn corpus_connect_request() {
    replay("connect_request", harness::connect_request::run);
}

#[test]
fn corpus_connect_response() {
    replay("connect_response", harness::connect_response::run);
}

#[test]
fn corpus_forward() {
    replay("forward", harness::forward::run);
}

#[test]
fn corpus_packet_flow() {
    replay("packet_flow", harness::packet_flow::run);
}

#[test]
fn corpus_dns() {
    replay("dns", harness::dns::run);
}

#[test]
fn corpus_keys() {
    replay("keys", harness::keys::run);
}

#[test]
fn corpus_hub() {
    replay("hub", harness::hub::run);
}

#[test]
fn corpus_limits() {
    replay("limits", harness::limits::run);
}

#[test]
fn empty_and_tiny_inputs() {
    let runs: [fn(&[u8]); 9] = [
        harness::frame::run,
        harness::connect_request::run,
        harness::connect_response::run,
        harness::forward::run,
        harness::packet_flow::run,
        harness::dns::run,
        harness::keys::run,
        harness::hub::run,
        harness::limits::run,
    ];
    for run in runs {
        for input in [&b""[..], b"\0", b"\xff", b"\x01\x01\x01\x01", &[0xff; 64]] {
            run(input);
        }
    }
}

// Crashes found by the fuzzers, one test each (input bytes as found).

/// `forward`: `close_response_head` printed the status with `{}`, so an upstream status of
/// `044` (three digits, accepted by the parser) came out as `HTTP/1.0 44`, which no HTTP
/// parser accepts. Found as `HTTP/1.0 044\n\n` (minimized).
#[test]
fn regression_close_response_head_keeps_three_digit_status() {
    use common::connect::parse_response;
    use common::forward::close_response_head;

    let input = b"HTTP/1.0 044\n\n";
    harness::forward::run(input);
    let (out, n) = close_response_head(input).unwrap().unwrap();
    assert_eq!(n, input.len());
    assert!(out.starts_with(b"HTTP/1.0 044 \r\n"), "{out:?}");
    let (resp, m) = parse_response(&out).unwrap().unwrap();
    assert_eq!((resp.status, m), (44, out.len()));
}

/// `connect_request`: `format_connect_request` formatted requests with more header fields than
/// `parse_request` accepts (`Host` plus 64 extra ones: `TooManyHeaders` at the server). Found
/// as a target line followed by 64 `name:` lines (this is that input, tidied).
#[test]
fn regression_format_connect_request_too_many_headers() {
    use common::connect::{format_connect_request, parse_request, HeadError, MAX_HEADERS};

    let input = format!("C{}", "\r\nX:".repeat(MAX_HEADERS));
    harness::connect_request::run(input.as_bytes());
    let extra = vec![("X", ""); MAX_HEADERS];
    assert_eq!(
        format_connect_request("C", &extra),
        Err(HeadError::TooManyHeaders)
    );
    let most = format_connect_request("C", &extra[..MAX_HEADERS - 1]).unwrap();
    let (head, n) = parse_request(&most).unwrap().unwrap();
    assert_eq!((head.headers.len(), n), (MAX_HEADERS, most.len()));
}

/// `connect_request`: `format_connect_request` formatted heads longer than `MAX_HEAD_LEN`
/// (the target appears twice: request line and `Host`), which `parse_request` refuses with
/// `HeadTooLarge`. Found with a 4097-byte target.
#[test]
fn regression_format_connect_request_too_large() {
    use common::connect::{format_connect_request, parse_request, HeadError, MAX_HEAD_LEN};

    let target = "a".repeat(4097);
    harness::connect_request::run(target.as_bytes());
    assert_eq!(
        format_connect_request(&target, &[]),
        Err(HeadError::HeadTooLarge)
    );
    // The longest target that fits: 2 * len + 29 bytes of head.
    let target = "a".repeat((MAX_HEAD_LEN - 29) / 2);
    let req = format_connect_request(&target, &[]).unwrap();
    assert!(req.len() <= MAX_HEAD_LEN);
    let (_, n) = parse_request(&req).unwrap().unwrap();
    assert_eq!(n, req.len());
}
