//! HTTP CONNECT request and response heads.
//!
//! Used by the shoot client (dialing through the ingress), the seed tunnel listener (streams
//! that begin with a CONNECT request) and the seed egress proxy (kube-apiserver's requests).
//! Parsers are incremental: they return `Ok(None)` until a complete head is buffered and report
//! the head's length so bytes after it stay with the caller.

use std::fmt;
use std::net::SocketAddr;

/// Largest accepted request or response head, in bytes.
pub const MAX_HEAD_LEN: usize = 8192;
/// Largest accepted number of header fields in a head.
pub const MAX_HEADERS: usize = 64;

/// Errors from parsing or formatting CONNECT heads and targets.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum HeadError {
    /// No complete head within [`MAX_HEAD_LEN`] bytes.
    #[error("HTTP head exceeds {MAX_HEAD_LEN} bytes")]
    HeadTooLarge,
    /// More than [`MAX_HEADERS`] header fields.
    #[error("HTTP head has more than {MAX_HEADERS} header fields")]
    TooManyHeaders,
    /// The head is not valid HTTP/1.x.
    #[error("malformed HTTP head: {0}")]
    Malformed(httparse::Error),
    /// The CONNECT target is not `ip:port`, `[ipv6]:port` or `hostname:port`.
    #[error("invalid CONNECT target {target:?}: {reason}")]
    InvalidTarget {
        /// The offending target (as received).
        target: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A header name is not an HTTP token.
    #[error("invalid header name {0:?}")]
    InvalidHeaderName(String),
    /// A header value or request target contains CR, LF or other control bytes.
    #[error("invalid header value for {0:?}")]
    InvalidHeaderValue(String),
    /// A line of a request head does not end in CRLF (a bare LF or CR): parsers disagree on
    /// such heads, so they are refused.
    #[error("request head line not ended by CRLF")]
    BareLineEnding,
    /// A CONNECT request that announces a body, or repeats `Host`: ambiguous, refused.
    #[error("ambiguous CONNECT request: {0}")]
    AmbiguousConnect(&'static str),
}

/// Whether every CR in `head` is followed by LF and every LF preceded by CR.
fn crlf_only(head: &[u8]) -> bool {
    let mut prev = 0u8;
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if prev != b'\r' => return false,
            b'\r' if head.get(i + 1) != Some(&b'\n') => return false,
            _ => {}
        }
        prev = b;
    }
    true
}

/// Checks a CONNECT request head beyond its syntax: no body (`Transfer-Encoding`, or a
/// `Content-Length` other than `0`), at most one `Host`.
pub fn check_connect(head: &RequestHead) -> Result<(), HeadError> {
    let count = |name: &str| {
        head.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .count()
    };
    if count("transfer-encoding") > 0 {
        return Err(HeadError::AmbiguousConnect("Transfer-Encoding"));
    }
    if head
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .any(|(_, v)| v.as_slice() != b"0")
    {
        return Err(HeadError::AmbiguousConnect("Content-Length"));
    }
    if count("host") > 1 {
        return Err(HeadError::AmbiguousConnect("more than one Host"));
    }
    Ok(())
}

/// A parsed HTTP/1.x request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestHead {
    /// Request method, e.g. `CONNECT`.
    pub method: String,
    /// Request target, e.g. `100.96.1.10:10250`.
    pub target: String,
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Header fields in order of appearance.
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RequestHead {
    /// The value of the first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// A parsed HTTP/1.x response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Minor HTTP version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Status code.
    pub status: u16,
    /// Reason phrase (may be empty).
    pub reason: String,
}

impl ResponseHead {
    /// The status line for error messages, e.g. `HTTP/1.1 403 Forbidden`.
    pub fn status_line(&self) -> String {
        if self.reason.is_empty() {
            format!("HTTP/1.{} {}", self.version, self.status)
        } else {
            format!("HTTP/1.{} {} {}", self.version, self.status, self.reason)
        }
    }
}

fn map_parse<T>(
    buf: &[u8],
    res: Result<httparse::Status<usize>, httparse::Error>,
    done: impl FnOnce(usize) -> T,
) -> Result<Option<(T, usize)>, HeadError> {
    match res {
        Ok(httparse::Status::Complete(n)) => Ok(Some((done(n), n))),
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD_LEN => Err(HeadError::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders),
        Err(e) => Err(HeadError::Malformed(e)),
    }
}

/// Parses a request head from the start of `buf`.
///
/// Returns the head and its length in bytes (bytes after it belong to the stream), `Ok(None)`
/// while incomplete, or [`HeadError::HeadTooLarge`] once [`MAX_HEAD_LEN`] bytes hold no
/// complete head.
pub fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let res = req.parse(window);
    if let Ok(httparse::Status::Complete(n)) = res {
        if !crlf_only(window.get(..n).unwrap_or(&[])) {
            return Err(HeadError::BareLineEnding);
        }
    }
    map_parse(buf, res, |_| RequestHead {
        method: req.method.unwrap_or_default().to_owned(),
        target: req.path.unwrap_or_default().to_owned(),
        version: req.version.unwrap_or_default(),
        headers: req
            .headers
            .iter()
            .map(|h| (h.name.to_owned(), h.value.to_vec()))
            .collect(),
    })
}

/// Parses a response head from the start of `buf`; same rules as [`parse_request`].
pub fn parse_response(buf: &[u8]) -> Result<Option<(ResponseHead, usize)>, HeadError> {
    let window = &buf[..buf.len().min(MAX_HEAD_LEN)];
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let res = resp.parse(window);
    map_parse(buf, res, |_| ResponseHead {
        version: resp.version.unwrap_or_default(),
        status: resp.code.unwrap_or_default(),
        reason: resp.reason.unwrap_or_default().to_owned(),
    })
}

/// A CONNECT target.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// A literal IPv4 or IPv6 socket address.
    Addr(SocketAddr),
    /// A host name to resolve, with its port.
    Host {
        /// The host name as given (a trailing dot is kept).
        host: String,
        /// Destination port, never zero.
        port: u16,
    },
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Addr(a) => a.fmt(f),
            Target::Host { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Parses `1.2.3.4:80`, `[fd00::1]:443` or `name.example:8080`.
///
/// Rejects an empty target, a missing or zero port, and host names that are not DNS names
/// (labels of 1–63 letters, digits, `-` or `_`, at most 253 characters, last label not numeric).
pub fn parse_target(s: &str) -> Result<Target, HeadError> {
    let bad = |reason| HeadError::InvalidTarget {
        target: s.to_owned(),
        reason,
    };
    if s.is_empty() {
        return Err(bad("empty"));
    }
    if let Ok(addr) = s.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(bad("port 0"));
        }
        return Ok(Target::Addr(addr));
    }
    if s.starts_with('[') {
        return Err(bad("bad IPv6 literal"));
    }
    let (host, port) = s.rsplit_once(':').ok_or_else(|| bad("missing port"))?;
    if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad("bad port"));
    }
    let port = match port.parse::<u16>() {
        Ok(0) => return Err(bad("port 0")),
        Ok(p) => p,
        Err(_) => return Err(bad("bad port")),
    };
    check_hostname(host).map_err(bad)?;
    Ok(Target::Host {
        host: host.to_owned(),
        port,
    })
}

fn check_hostname(host: &str) -> Result<(), &'static str> {
    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("empty host");
    }
    if name.len() > 253 {
        return Err("host name too long");
    }
    let mut last = "";
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err("bad host name label length");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("bad character in host name");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("host name label starts or ends with '-'");
        }
        last = label;
    }
    if last.bytes().all(|b| b.is_ascii_digit()) {
        return Err("numeric top-level label (not an address, not a name)");
    }
    Ok(())
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn is_field_value(s: &str) -> bool {
    s.bytes().all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// Formats a CONNECT request: `CONNECT t HTTP/1.1\r\nHost: t\r\n<h>: <v>\r\n\r\n`.
///
/// The target must be non-empty without spaces or control bytes, header names must be HTTP
/// tokens and values must not contain CR, LF or other control bytes. A request that
/// [`parse_request`] would refuse (more than [`MAX_HEADERS`] fields with `Host`, more than
/// [`MAX_HEAD_LEN`] bytes) is an error.
pub fn format_connect_request(
    target: &str,
    extra_headers: &[(&str, &str)],
) -> Result<Vec<u8>, HeadError> {
    if target.is_empty() || !target.bytes().all(|b| b > 0x20 && b != 0x7f) {
        return Err(HeadError::InvalidHeaderValue("Host".to_owned()));
    }
    if extra_headers.len() >= MAX_HEADERS {
        return Err(HeadError::TooManyHeaders);
    }
    let mut out = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    for (name, value) in extra_headers {
        if !is_token(name) {
            return Err(HeadError::InvalidHeaderName((*name).to_owned()));
        }
        if !is_field_value(value) {
            return Err(HeadError::InvalidHeaderValue((*name).to_owned()));
        }
        out.push_str(name);
        out.push_str(": ");
        out.push_str(value);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    if out.len() > MAX_HEAD_LEN {
        return Err(HeadError::HeadTooLarge);
    }
    Ok(out.into_bytes())
}

/// The exact response to a successful CONNECT.
pub const CONNECT_ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";

/// Formats a response head (and body) for a CONNECT request.
///
/// Status 200 yields exactly [`CONNECT_ESTABLISHED`] (no headers, no body; `reason` and `body`
/// are ignored). Any other status yields a `text/plain` response with `body` as one line and
/// `Connection: close`. Control characters in `reason` and `body` are replaced by spaces.
pub fn format_response(status: u16, reason: &str, body: &str) -> Vec<u8> {
    if status == 200 {
        return CONNECT_ESTABLISHED.to_vec();
    }
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    let body = clean(body);
    format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}\n",
        clean(reason),
        body.len() + 1
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const KUBE: &[u8] = b"CONNECT 100.96.1.10:10250 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

    #[test]
    fn bare_line_endings_and_ambiguous_connects_are_refused() {
        for raw in [
            &b"CONNECT 10.0.0.1:80 HTTP/1.1\nHost: x\r\n\r\n"[..],
            b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: x\n\n",
            b"CONNECT 10.0.0.1:80 HTTP/1.1\r\nHost: x\r\n\n",
            b"GET http://10.0.0.1/ HTTP/1.1\r\nX: a\rb\r\n\r\n",
        ] {
            assert!(
                parse_request(raw).is_err(),
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        let ok = |raw: &str| parse_request(raw.as_bytes()).unwrap().unwrap().0;
        assert_eq!(
            check_connect(&ok(std::str::from_utf8(KUBE).unwrap())),
            Ok(())
        );
        assert_eq!(
            check_connect(&ok("CONNECT a:1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n")),
            Ok(())
        );
        for raw in [
            "CONNECT a:1 HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "CONNECT a:1 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "CONNECT a:1 HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ] {
            assert!(
                matches!(check_connect(&ok(raw)), Err(HeadError::AmbiguousConnect(_))),
                "{raw}"
            );
        }
    }

    #[test]
    fn kube_apiserver_request() {
        let (head, n) = parse_request(KUBE).unwrap().unwrap();
        assert_eq!(n, KUBE.len());
        assert_eq!(head.method, "CONNECT");
        assert_eq!(head.target, "100.96.1.10:10250");
        assert_eq!(head.version, 1);
        assert_eq!(head.header("host"), Some(&b"127.0.0.1"[..]));
        assert_eq!(head.header("HOST"), Some(&b"127.0.0.1"[..]));
        assert_eq!(head.header("x"), None);
        assert_eq!(
            parse_target(&head.target).unwrap(),
            Target::Addr("100.96.1.10:10250".parse().unwrap())
        );
    }

    #[test]
    fn byte_by_byte_and_trailing_bytes() {
        let mut data = KUBE.to_vec();
        data.extend_from_slice(b"\x00\x94rest");
        for i in 0..KUBE.len() {
            assert_eq!(parse_request(&data[..i]).unwrap(), None, "at {i}");
        }
        let (_, n) = parse_request(&data).unwrap().unwrap();
        assert_eq!(&data[n..], b"\x00\x94rest");
    }

    #[test]
    fn http10_and_headers() {
        let req =
            b"CONNECT a.example:443 HTTP/1.0\r\nReversed-VPN: outbound|1194||x\r\nX-A: 1\r\n\r\n";
        let (head, _) = parse_request(req).unwrap().unwrap();
        assert_eq!(head.version, 0);
        assert_eq!(head.header("reversed-vpn"), Some(&b"outbound|1194||x"[..]));
        assert_eq!(head.headers.len(), 2);
        let (resp, n) = parse_response(b"HTTP/1.0 200 OK\r\n\r\nX")
            .unwrap()
            .unwrap();
        assert_eq!((resp.version, resp.status, n), (0, 200, 19));
    }

    #[test]
    fn responses() {
        let mut data = b"HTTP/1.1 200 Connection established\r\n\r\n".to_vec();
        data.extend_from_slice(b"\x01\x02");
        for i in 0..data.len() - 2 {
            assert_eq!(parse_response(&data[..i]).unwrap(), None);
        }
        let (r, n) = parse_response(&data).unwrap().unwrap();
        assert_eq!((r.status, &data[n..]), (200, &b"\x01\x02"[..]));
        let f = format_response(403, "Forbidden", "target 10.0.0.1:22 not in shoot networks");
        let (r, n) = parse_response(&f).unwrap().unwrap();
        assert_eq!(r.status_line(), "HTTP/1.1 403 Forbidden");
        assert_eq!(&f[n..], b"target 10.0.0.1:22 not in shoot networks\n");
        let s = String::from_utf8(f).unwrap();
        assert!(s.contains("Content-Length: 41\r\n") && s.contains("Connection: close\r\n"));
        let (r, _) = parse_response(b"HTTP/1.1 502\r\n\r\n").unwrap().unwrap();
        assert_eq!(r.status_line(), "HTTP/1.1 502");
        assert_eq!(
            format_response(200, "ignored", "ignored"),
            b"HTTP/1.1 200 Connection established\r\n\r\n"
        );
        let inj = String::from_utf8(format_response(400, "Bad\r\nX: y", "a\r\nb")).unwrap();
        assert!(inj.starts_with("HTTP/1.1 400 Bad  X: y\r\n") && inj.ends_with("\r\n\r\na  b\n"));
        assert!(matches!(
            parse_response(b"HTTP/2 200\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn oversize_and_too_many_headers() {
        let mut big = b"CONNECT a:1 HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEAD_LEN - 1, b'a');
        assert_eq!(parse_request(&big), Ok(None));
        big.push(b'a');
        assert_eq!(parse_request(&big), Err(HeadError::HeadTooLarge));
        big.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_request(&big), Err(HeadError::HeadTooLarge));
        let mut resp = b"HTTP/1.1 200 OK\r\n".to_vec();
        resp.resize(MAX_HEAD_LEN + 10, b'x');
        assert_eq!(parse_response(&resp), Err(HeadError::HeadTooLarge));

        let mut many = b"CONNECT a:1 HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("H{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse_request(&many), Err(HeadError::TooManyHeaders));
        assert!(matches!(
            parse_request(b"CONNECT\x01 a HTTP/1.1\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }

    #[test]
    fn targets() {
        assert_eq!(
            parse_target("[fd00::1]:443").unwrap(),
            Target::Addr("[fd00::1]:443".parse().unwrap())
        );
        assert_eq!(
            parse_target("name.example:8080").unwrap(),
            Target::Host {
                host: "name.example".into(),
                port: 8080
            }
        );
        assert_eq!(
            parse_target("kubernetes.default.svc.cluster.local.:443")
                .unwrap()
                .to_string(),
            "kubernetes.default.svc.cluster.local.:443"
        );
        assert_eq!(
            parse_target("localhost:1").unwrap().to_string(),
            "localhost:1"
        );
        for bad in [
            "",
            "1.2.3.4",
            "1.2.3.4:0",
            "[fd00::1]:0",
            "[fd00::1]",
            "[fd00::1:443",
            "fd00::1:443",
            "host:",
            "host:0",
            "host:+80",
            "host:65536",
            ":80",
            ".:80",
            "a..b:80",
            "-a.b:80",
            "a b:80",
            "a/b:80",
            "1.2.3:80",
            "256.1.1.1:80",
            "2130706433:80",
        ] {
            assert!(parse_target(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("{}.example:80", "a".repeat(64));
        assert!(parse_target(&long).is_err());
        let too_long = format!("{}x:80", "abcdefgh.".repeat(29));
        assert!(parse_target(&too_long).is_err());
    }

    #[test]
    fn connect_request_format() {
        let r = format_connect_request(
            "api.shoot.example:1194",
            &[("Reversed-VPN", "outbound|1194||s.ns.svc")],
        )
        .unwrap();
        assert_eq!(
            r,
            b"CONNECT api.shoot.example:1194 HTTP/1.1\r\nHost: api.shoot.example:1194\r\nReversed-VPN: outbound|1194||s.ns.svc\r\n\r\n"
        );
        let (head, n) = parse_request(&r).unwrap().unwrap();
        assert_eq!(
            (head.target.as_str(), n),
            ("api.shoot.example:1194", r.len())
        );
        assert!(matches!(
            format_connect_request("a:1\r\nX: y", &[]),
            Err(HeadError::InvalidHeaderValue(_))
        ));
        assert!(matches!(
            format_connect_request("", &[]),
            Err(HeadError::InvalidHeaderValue(_))
        ));
        assert!(matches!(
            format_connect_request("a:1", &[("X", "v\r\nY: z")]),
            Err(HeadError::InvalidHeaderValue(_))
        ));
        assert!(matches!(
            format_connect_request("a:1", &[("X\n", "v")]),
            Err(HeadError::InvalidHeaderName(_))
        ));
        assert!(matches!(
            format_connect_request("a:1", &[("", "v")]),
            Err(HeadError::InvalidHeaderName(_))
        ));
    }

    proptest! {
        #[test]
        fn parse_never_panics(data in proptest::collection::vec(any::<u8>(), 0..10000)) {
            if let Ok(Some((_, n))) = parse_request(&data) { prop_assert!(n <= data.len().min(MAX_HEAD_LEN)); }
            if let Ok(Some((_, n))) = parse_response(&data) { prop_assert!(n <= data.len().min(MAX_HEAD_LEN)); }
            if let Ok(s) = std::str::from_utf8(&data) { let _ = parse_target(s); }
        }

        #[test]
        fn formatted_requests_parse(host in "[a-z][a-z0-9-]{0,20}[a-z]", port in 1u16.., value in "[ -~]{0,40}") {
            let target = format!("{host}.example:{port}");
            let r = format_connect_request(&target, &[("X-Route", &value)]).unwrap();
            let (head, n) = parse_request(&r).unwrap().unwrap();
            prop_assert_eq!(n, r.len());
            prop_assert_eq!(head.header("x-route"), Some(value.trim().as_bytes()));
            prop_assert_eq!(parse_target(&head.target).unwrap(), Target::Host { host: format!("{host}.example"), port });
        }
    }
}
