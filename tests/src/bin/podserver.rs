//! A small HTTP/1.1 server standing in for a pod: `GET /name` serves a file from `--dir`
//! (`/` is `index.html`), `PUT`/`POST` reads the body (Content-Length) and answers the
//! sha256 hex of it; `GET /whoami` answers the client's IP address as the server sees it
//! (and, unlike the other paths, keeps an HTTP/1.1 connection open unless the request says
//! `Connection: close`, so a test can ask again later on the same connection); `GET /host`
//! answers the request's `Host` header values, one per line. One request
//! per connection otherwise, one thread per connection, bounded.

use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use sha2::{Digest, Sha256};

const MAX_HEAD: usize = 8192;
const IO_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Parser, Debug)]
#[command(about = "HTTP file server and upload sink for the e2e pod")]
struct Args {
    /// Listen address (`[::]:8080` is dual-stack).
    #[arg(long, default_value = "[::]:8080")]
    listen: SocketAddr,
    /// Directory with the files to serve.
    #[arg(long)]
    dir: PathBuf,
    /// Most connections served at once; more are answered 503.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
}

struct Request {
    method: String,
    path: String,
    content_length: Option<u64>,
    expect_continue: bool,
    /// HTTP/1.1 without `Connection: close`.
    keep_alive: bool,
    /// Every `Host` header value, in order (`GET /host` answers them).
    hosts: Vec<String>,
    /// Body bytes read together with the head.
    rest: Vec<u8>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let listener =
        TcpListener::bind(args.listen).with_context(|| format!("bind {}", args.listen))?;
    eprintln!(
        "podserver: listening on {} serving {}",
        args.listen,
        args.dir.display()
    );
    let active = Arc::new(AtomicUsize::new(0));
    let dir = Arc::new(args.dir);
    for conn in listener.incoming() {
        let mut stream = match conn {
            Ok(s) => s,
            Err(e) => {
                eprintln!("podserver: accept: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= args.max_connections {
            active.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(&mut stream, 503, "busy\n");
            continue;
        }
        let (active, dir) = (Arc::clone(&active), Arc::clone(&dir));
        std::thread::spawn(move || {
            let peer = stream
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            if let Err(e) = serve(stream, &dir, &peer) {
                eprintln!("podserver: {peer}: {e:#}");
            }
            active.fetch_sub(1, Ordering::SeqCst);
        });
    }
    Ok(())
}

fn serve(mut stream: TcpStream, dir: &std::path::Path, peer: &str) -> Result<()> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    let Some(mut req) = read_request(&mut stream)? else {
        return Ok(());
    };
    while req.method == "GET" && req.path == "/whoami" {
        whoami(&mut stream, peer, req.keep_alive)?;
        if !req.keep_alive {
            return Ok(());
        }
        match read_request(&mut stream)? {
            Some(next) => req = next,
            None => return Ok(()),
        }
    }
    if req.method == "GET" && req.path == "/host" {
        let body = format!("{}\n", req.hosts.join("\n"));
        return respond(&mut stream, 200, &body);
    }
    match req.method.as_str() {
        "GET" | "HEAD" => serve_file(&mut stream, dir, &req, peer),
        "PUT" | "POST" => receive(&mut stream, req, peer),
        _ => respond(&mut stream, 405, "method not allowed\n"),
    }
}

/// Answers the peer's IP address (IPv4-mapped addresses as plain IPv4).
fn whoami(stream: &mut TcpStream, peer: &str, keep_alive: bool) -> Result<()> {
    let ip = match peer.parse::<SocketAddr>().map(|a| a.ip()) {
        Ok(std::net::IpAddr::V6(v6)) => v6
            .to_ipv4_mapped()
            .map_or_else(|| v6.to_string(), |v4| v4.to_string()),
        Ok(ip) => ip.to_string(),
        Err(_) => peer.to_owned(),
    };
    let body = format!("{ip}\n");
    let conn = if keep_alive { "keep-alive" } else { "close" };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: {conn}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// Reads and parses the request head; `None` if the client closed before sending one.
fn read_request(stream: &mut TcpStream) -> Result<Option<Request>> {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            respond(stream, 431, "request head too large\n")?;
            bail!("request head too large");
        }
        let n = stream.read(&mut buf[filled..]).context("read request")?;
        if n == 0 {
            return Ok(None);
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; 32];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..filled]) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(len)) => {
                let mut content_length = None;
                let mut expect_continue = false;
                let mut close = false;
                let mut hosts = Vec::new();
                for h in req.headers.iter() {
                    if h.name.eq_ignore_ascii_case("host") {
                        hosts.push(String::from_utf8_lossy(h.value).into_owned());
                    }
                    if h.name.eq_ignore_ascii_case("content-length") {
                        content_length = std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse().ok());
                    } else if h.name.eq_ignore_ascii_case("expect") {
                        expect_continue = h.value.eq_ignore_ascii_case(b"100-continue");
                    } else if h.name.eq_ignore_ascii_case("connection") {
                        close = String::from_utf8_lossy(h.value)
                            .to_ascii_lowercase()
                            .contains("close");
                    }
                }
                return Ok(Some(Request {
                    method: req.method.unwrap_or_default().to_owned(),
                    path: req.path.unwrap_or_default().to_owned(),
                    content_length,
                    expect_continue,
                    keep_alive: req.version == Some(1) && !close,
                    hosts,
                    rest: buf[len..filled].to_vec(),
                }));
            }
            Err(e) => {
                respond(stream, 400, "malformed request\n")?;
                bail!("malformed request: {e}");
            }
        }
    }
}

fn serve_file(
    stream: &mut TcpStream,
    dir: &std::path::Path,
    req: &Request,
    peer: &str,
) -> Result<()> {
    let path = req.path.split('?').next().unwrap_or_default();
    let name = match path.strip_prefix('/') {
        Some("") => "index.html",
        Some(n) => n,
        None => return respond(stream, 400, "bad path\n"),
    };
    let valid = !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    let file = if valid {
        File::open(dir.join(name)).ok()
    } else {
        None
    };
    let Some(mut file) = file else {
        eprintln!("podserver: {peer} {} {path} -> 404", req.method);
        return respond(stream, 404, "not found\n");
    };
    let len = file.metadata()?.len();
    let ctype = if name.ends_with(".html") {
        "text/html"
    } else {
        "application/octet-stream"
    };
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    )?;
    if req.method == "GET" {
        let sent = io::copy(
            &mut file,
            &mut BufWriter::with_capacity(1 << 16, &mut *stream),
        )?;
        eprintln!("podserver: {peer} GET {path} -> 200, {sent} bytes");
    }
    Ok(())
}

fn receive(stream: &mut TcpStream, req: Request, peer: &str) -> Result<()> {
    let Some(len) = req.content_length else {
        return respond(stream, 411, "content-length required\n");
    };
    if req.expect_continue {
        stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
    }
    let mut hasher = Sha256::new();
    let first = req
        .rest
        .len()
        .min(usize::try_from(len).unwrap_or(usize::MAX));
    hasher.update(&req.rest[..first]);
    let mut left = len - first as u64;
    let mut buf = vec![0u8; 1 << 16];
    while left > 0 {
        let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        let n = stream.read(&mut buf[..want]).context("read body")?;
        if n == 0 {
            bail!("body ended {left} bytes early");
        }
        hasher.update(&buf[..n]);
        left -= n as u64;
    }
    let sum: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    eprintln!(
        "podserver: {peer} {} {} -> 200, {len} bytes, sha256 {sum}",
        req.method, req.path
    );
    respond(stream, 200, &format!("{sum}\n"))
}

fn respond(stream: &mut TcpStream, code: u16, body: &str) -> Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    write!(
        stream,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}
