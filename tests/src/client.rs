//! Minimal blocking HTTP clients for the tests: kube-apiserver's CONNECT over a UDS, a raw
//! CONNECT over any stream, and an HTTP/1.1 GET over an established tunnel.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Longest response head the helpers accept.
pub const MAX_HEAD: usize = 8192;

/// A CONNECT answer: status code, the raw head and how long it took to arrive.
#[derive(Debug, Clone)]
pub struct ConnectReply {
    /// Status code from the status line.
    pub status: u16,
    /// The head as text, up to and including the blank line.
    pub head: String,
    /// Time from sending the request to the end of the head.
    pub elapsed: Duration,
}

/// Reads a response head byte by byte (so nothing after it is consumed).
pub fn read_head<R: Read>(r: &mut R) -> Result<Vec<u8>> {
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        match r.read(&mut byte) {
            Ok(0) => bail!(
                "connection closed inside the response head (got {:?})",
                String::from_utf8_lossy(&head)
            ),
            Ok(_) => head.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e).context("read response head"),
        }
    }
    Ok(head)
}

/// Status code of a response head (`HTTP/1.x NNN ...`).
pub fn status_of(head: &[u8]) -> Result<u16> {
    let text = String::from_utf8_lossy(head);
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some(v), Some(code)) if v.starts_with("HTTP/1.") => code
            .parse()
            .with_context(|| format!("bad status line {line:?}")),
        _ => bail!("bad status line {line:?}"),
    }
}

/// Sends `request` and reads the response head.
pub fn send_connect<S: Read + Write>(s: &mut S, request: &[u8]) -> Result<ConnectReply> {
    let start = Instant::now();
    s.write_all(request).context("send CONNECT")?;
    let head = read_head(s)?;
    Ok(ConnectReply {
        status: status_of(&head)?,
        head: String::from_utf8_lossy(&head).into_owned(),
        elapsed: start.elapsed(),
    })
}

/// kube-apiserver's exact CONNECT request for `target`.
pub fn apiserver_connect_request(target: &str) -> Vec<u8> {
    format!("CONNECT {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").into_bytes()
}

/// Connects to the proxy's UDS and sends kube-apiserver's CONNECT for `target`.
/// `timeout` bounds every read and write.
pub fn connect_uds(
    path: &Path,
    target: &str,
    timeout: Duration,
) -> Result<(ConnectReply, UnixStream)> {
    let mut s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let reply = send_connect(&mut s, &apiserver_connect_request(target))?;
    Ok((reply, s))
}

/// Fails if any byte arrives on `s` within `wait` (nothing may follow a CONNECT 200 head
/// before the client speaks). Restores `restore` as the read timeout.
pub fn expect_silence(s: &mut UnixStream, wait: Duration, restore: Duration) -> Result<()> {
    s.set_read_timeout(Some(wait))?;
    let mut b = [0u8; 64];
    let res = s.read(&mut b);
    s.set_read_timeout(Some(restore))?;
    match res {
        Ok(0) => bail!("proxy closed the stream right after the 200 head"),
        Ok(n) => bail!(
            "{n} unexpected bytes after the 200 head: {:?}",
            String::from_utf8_lossy(&b[..n])
        ),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(()),
        Err(e) => Err(e).context("read after head"),
    }
}

/// Sends `GET path` (Connection: close) and reads the whole response: status and body.
pub fn http_get<S: Read + Write>(s: &mut S, host: &str, path: &str) -> Result<(u16, Vec<u8>)> {
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .context("send GET")?;
    let head = read_head(s)?;
    let status = status_of(&head)?;
    let mut body = Vec::new();
    s.read_to_end(&mut body).context("read body")?;
    Ok((status, body))
}
