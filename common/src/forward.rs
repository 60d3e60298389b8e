//! Plain-HTTP forward-proxy requests in absolute form (`GET http://100.96.1.10:8080/metrics
//! HTTP/1.1`), as Prometheus sends them through a `proxy_url`.
//!
//! [`forward_request`] turns such a request head into the target and the head to send
//! upstream (origin form, hop-by-hop headers removed, `Connection: close`);
//! [`close_response_head`] rewrites the upstream's response head so the client does not reuse
//! the connection either. One request per proxied connection keeps authorization simple: every
//! target is checked, none can ride on a connection opened for another.

use crate::connect::{parse_target, HeadError, RequestHead, Target, MAX_HEADERS, MAX_HEAD_LEN};

/// Largest request body forwarded (scrapes have none; this bounds what a client can push).
pub const MAX_BODY: u64 = 1 << 20;

/// Why a request cannot be forwarded.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ForwardError {
    /// The request target is not an absolute `http://` URI (an origin-form request to a proxy).
    #[error("request target {0:?} is not an absolute http:// URI; use CONNECT")]
    NotAbsolute(String),
    /// `https://` targets must use CONNECT.
    #[error("https:// targets need CONNECT")]
    Https,
    /// The URI carries user information, which is never forwarded.
    #[error("user information in the request URI is not allowed")]
    UserInfo,
    /// The authority is not `ip[:port]`, `[ipv6][:port]` or `name[:port]`.
    #[error("bad target: {0}")]
    Target(#[from] HeadError),
    /// Chunked request bodies are not forwarded.
    #[error("request bodies with Transfer-Encoding are not supported")]
    Chunked,
    /// `Content-Length` is not one run of digits, appears more than once, or is above
    /// [`MAX_BODY`].
    #[error(
        "bad, repeated or too large Content-Length (one value of digits, at most {MAX_BODY} bytes)"
    )]
    ContentLength,
    /// `Host` appears more than once.
    #[error("more than one Host header")]
    DuplicateHost,
    /// `Connection` names a header that frames or routes the request.
    #[error("Connection names {0}, which frames or routes the request")]
    ConnectionOption(String),
}

/// A request to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Where to connect (port 80 when the URI has none).
    pub target: Target,
    /// The head to send upstream.
    pub head: Vec<u8>,
    /// Body bytes that follow the head.
    pub body_len: u64,
}

/// Headers that concern one connection only (RFC 9110 §7.6.1) and proxy credentials.
pub const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "proxy-connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-authenticate",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Names listed in the `Connection` headers, lowercase.
fn connection_options(headers: &[(String, Vec<u8>)]) -> Vec<String> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("connection"))
        .flat_map(|(_, v)| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
        })
        .collect()
}

fn is_hop_by_hop(name: &str, listed: &[String]) -> bool {
    let lower = name.to_ascii_lowercase();
    HOP_BY_HOP.contains(&lower.as_str()) || listed.contains(&lower)
}

/// Splits `http://authority/path?query` into the target and the origin-form path.
fn split_uri(uri: &str) -> Result<(Target, String), ForwardError> {
    let scheme_end = uri
        .find("://")
        .ok_or_else(|| ForwardError::NotAbsolute(uri.to_owned()))?;
    let (scheme, rest) = (&uri[..scheme_end], &uri[scheme_end + 3..]);
    if scheme.eq_ignore_ascii_case("https") {
        return Err(ForwardError::Https);
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(ForwardError::NotAbsolute(uri.to_owned()));
    }
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(auth_end);
    if authority.contains('@') {
        return Err(ForwardError::UserInfo);
    }
    // A port is present unless the authority ends in the host: `name`, `1.2.3.4`, `[v6]`.
    let has_port = match authority.rfind(':') {
        Some(i) => !authority[i..].contains(']'),
        None => false,
    };
    let target = if has_port {
        parse_target(authority)?
    } else {
        parse_target(&format!("{authority}:80"))?
    };
    let tail = tail.split('#').next().unwrap_or("");
    let path = if tail.starts_with('/') {
        tail.to_owned()
    } else {
        format!("/{tail}")
    };
    Ok((target, path))
}

/// Checks an absolute-form request and builds the head to send upstream.
pub fn forward_request(head: &RequestHead) -> Result<Forward, ForwardError> {
    let (target, path) = split_uri(&head.target)?;
    if head
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("transfer-encoding"))
    {
        return Err(ForwardError::Chunked);
    }
    let mut lengths = head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v);
    let body_len = match (lengths.next(), lengths.next()) {
        (None, _) => 0,
        (Some(v), None) => content_length(v).ok_or(ForwardError::ContentLength)?,
        (Some(_), Some(_)) => return Err(ForwardError::ContentLength),
    };
    if head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("host"))
        .count()
        > 1
    {
        return Err(ForwardError::DuplicateHost);
    }
    let listed = connection_options(&head.headers);
    if let Some(bad) = listed
        .iter()
        .find(|o| matches!(o.as_str(), "content-length" | "host" | "transfer-encoding"))
    {
        return Err(ForwardError::ConnectionOption(bad.clone()));
    }
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(head.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // RFC 9112 §3.2.2: a proxy replaces Host with the authority of the absolute-form target.
    out.extend_from_slice(format!("Host: {}\r\n", host_header(&target)).as_bytes());
    end_head(&mut out, &head.headers, |name| {
        name.eq_ignore_ascii_case("host") || is_hop_by_hop(name, &listed)
    });
    Ok(Forward {
        target,
        head: out,
        body_len,
    })
}

/// A `Content-Length` value: ASCII digits only (RFC 9110 §8.6), no sign, no list, at most
/// [`MAX_BODY`]. Surrounding whitespace is not part of a field value (httparse strips it).
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v)
        .ok()?
        .parse::<u64>()
        .ok()
        .filter(|n| *n <= MAX_BODY)
}

/// Appends the headers that `drop` does not reject, `Connection: close` and the blank line.
fn end_head(out: &mut Vec<u8>, headers: &[(String, Vec<u8>)], drop: impl Fn(&str) -> bool) {
    for (name, value) in headers {
        if drop(name) {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Connection: close\r\n\r\n");
}

fn host_header(t: &Target) -> String {
    match t {
        Target::Addr(a) if a.port() == 80 => match a.ip() {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        },
        Target::Host { host, port: 80 } => host.clone(),
        other => other.to_string(),
    }
}

/// Parses the upstream's response head at the start of `buf` and rewrites it with
/// `Connection: close` (its own connection headers removed). Returns the new head and the
/// length of the original one, or `Ok(None)` while incomplete.
pub fn close_response_head(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let len = match resp.parse(window) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => {
            return Err(HeadError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
        Err(e) => return Err(HeadError::Malformed(e)),
    };
    let owned: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_owned(), h.value.to_vec()))
        .collect();
    let listed = connection_options(&owned);
    let mut out = Vec::with_capacity(len + 32);
    out.extend_from_slice(
        format!(
            // Three digits, as received: `{:03}` keeps a status such as `044` parseable.
            "HTTP/1.{} {:03} {}\r\n",
            resp.version.unwrap_or(1),
            resp.code.unwrap_or(502),
            resp.reason.unwrap_or("")
        )
        .as_bytes(),
    );
    end_head(&mut out, &owned, |name| {
        let lower = name.to_ascii_lowercase();
        matches!(
            lower.as_str(),
            "connection" | "keep-alive" | "proxy-connection"
        ) || listed.contains(&lower)
    });
    Ok(Some((out, len)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connect::parse_request;

    fn head(raw: &str) -> RequestHead {
        parse_request(raw.as_bytes()).unwrap().unwrap().0
    }

    fn text(b: &[u8]) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn prometheus_scrape() {
        let h = head(
            "GET http://100.96.1.10:8080/metrics?x=1 HTTP/1.1\r\nHost: 100.96.1.10:8080\r\nUser-Agent: Prometheus/2.45\r\nAccept-Encoding: gzip\r\nProxy-Connection: keep-alive\r\nProxy-Authorization: Basic eDp5\r\n\r\n",
        );
        let f = forward_request(&h).unwrap();
        assert_eq!(f.target, Target::Addr("100.96.1.10:8080".parse().unwrap()));
        assert_eq!(f.body_len, 0);
        assert_eq!(
            text(&f.head),
            "GET /metrics?x=1 HTTP/1.1\r\nHost: 100.96.1.10:8080\r\nUser-Agent: Prometheus/2.45\r\nAccept-Encoding: gzip\r\nConnection: close\r\n\r\n"
        );
    }

    #[test]
    fn default_port_host_and_paths() {
        let f = forward_request(&head("GET http://web.default.svc HTTP/1.0\r\n\r\n")).unwrap();
        assert_eq!(
            f.target,
            Target::Host {
                host: "web.default.svc".into(),
                port: 80
            }
        );
        assert_eq!(
            text(&f.head),
            "GET / HTTP/1.1\r\nHost: web.default.svc\r\nConnection: close\r\n\r\n"
        );
        let f = forward_request(&head(
            "HEAD http://[fd00:96:0:1::10]?q#frag HTTP/1.1\r\n\r\n",
        ))
        .unwrap();
        assert_eq!(
            f.target,
            Target::Addr("[fd00:96:0:1::10]:80".parse().unwrap())
        );
        assert!(text(&f.head).starts_with("HEAD /?q HTTP/1.1\r\nHost: [fd00:96:0:1::10]\r\n"));
        let f = forward_request(&head("GET HTTP://10.0.0.1:81/a/b HTTP/1.1\r\n\r\n")).unwrap();
        assert!(text(&f.head).contains("Host: 10.0.0.1:81\r\n"));
    }

    #[test]
    fn connection_listed_headers_are_dropped() {
        let f = forward_request(&head(
            "GET http://10.0.0.1/ HTTP/1.1\r\nConnection: X-Secret, keep-alive\r\nX-Secret: 1\r\nX-Kept: 2\r\nUpgrade: h2c\r\n\r\n",
        ))
        .unwrap();
        let t = text(&f.head);
        assert!(!t.contains("X-Secret"), "{t}");
        assert!(!t.contains("Upgrade"), "{t}");
        assert!(t.contains("X-Kept: 2\r\n"), "{t}");
    }

    #[test]
    fn refusals() {
        let err = |raw: &str| forward_request(&head(raw)).unwrap_err();
        assert!(matches!(
            err("GET /metrics HTTP/1.1\r\n\r\n"),
            ForwardError::NotAbsolute(_)
        ));
        assert_eq!(
            err("GET https://10.0.0.1/ HTTP/1.1\r\n\r\n"),
            ForwardError::Https
        );
        assert!(matches!(
            err("GET ftp://10.0.0.1/ HTTP/1.1\r\n\r\n"),
            ForwardError::NotAbsolute(_)
        ));
        assert_eq!(
            err("GET http://u:p@10.0.0.1/ HTTP/1.1\r\n\r\n"),
            ForwardError::UserInfo
        );
        assert!(matches!(
            err("GET http://10.0.0.1:0/ HTTP/1.1\r\n\r\n"),
            ForwardError::Target(_)
        ));
        assert!(matches!(
            err("GET http:///x HTTP/1.1\r\n\r\n"),
            ForwardError::Target(_)
        ));
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ForwardError::Chunked
        );
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            ForwardError::ContentLength
        );
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"),
            ForwardError::ContentLength
        );
        let ok = forward_request(&head(
            "POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
        ))
        .unwrap();
        assert_eq!(ok.body_len, 5);
    }

    #[test]
    fn smuggling_variants_are_refused() {
        let err = |raw: &str| forward_request(&head(raw)).unwrap_err();
        for cl in ["+5", "-1", "5 5", "5,5", "0x5", "5.0", "1e3", "\u{661}"] {
            assert_eq!(
                err(&format!(
                    "POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: {cl}\r\n\r\n"
                )),
                ForwardError::ContentLength,
                "{cl}"
            );
        }
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n"),
            ForwardError::ContentLength
        );
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            ForwardError::Chunked
        );
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nTransfer-Encoding: identity\r\n\r\n"),
            ForwardError::Chunked
        );
        assert_eq!(
            err("GET http://10.0.0.1/ HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"),
            ForwardError::DuplicateHost
        );
        assert_eq!(
            err("POST http://10.0.0.1/ HTTP/1.1\r\nConnection: Content-Length\r\nContent-Length: 5\r\n\r\n"),
            ForwardError::ConnectionOption("content-length".into())
        );
        assert_eq!(
            err("GET http://10.0.0.1/ HTTP/1.1\r\nConnection: close, host\r\n\r\n"),
            ForwardError::ConnectionOption("host".into())
        );
        // Leading zeros are digits: 5 bytes.
        let f = forward_request(&head(
            "POST http://10.0.0.1/ HTTP/1.1\r\nContent-Length: 005\r\n\r\n",
        ))
        .unwrap();
        assert_eq!(f.body_len, 5);
    }

    #[test]
    fn host_is_the_target_authority() {
        // The client's own Host names something else: the upstream gets the target's.
        let f = forward_request(&head(
            "GET http://100.96.1.10:8080/x HTTP/1.1\r\nHost: internal.seed.local\r\nAccept: */*\r\n\r\n",
        ))
        .unwrap();
        let t = text(&f.head);
        assert_eq!(
            t,
            "GET /x HTTP/1.1\r\nHost: 100.96.1.10:8080\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(t.matches("Host:").count(), 1);
    }

    #[test]
    fn response_head_is_closed() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nContent-Length: 3\r\n\r\nabc";
        for i in 0..raw.len() - 3 {
            assert_eq!(close_response_head(&raw[..i]).unwrap(), None, "at {i}");
        }
        let (h, n) = close_response_head(raw).unwrap().unwrap();
        assert_eq!(&raw[n..], b"abc");
        assert_eq!(
            text(&h),
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nConnection: close\r\n\r\n"
        );
        assert!(close_response_head(b"garbage\r\n\r\n").is_err());
        let mut long = b"HTTP/1.1 200 OK\r\nX-Long: ".to_vec();
        long.resize(MAX_HEAD_LEN + 1, b'a');
        assert_eq!(close_response_head(&long), Err(HeadError::HeadTooLarge));
    }
}
