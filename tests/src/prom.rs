//! Prometheus helpers of the end-to-end tests: scraping an endpoint inside a namespace, reading
//! samples out of the text format, `promtool check metrics`, and the query API of a real
//! Prometheus.

// Test helpers: a failed scrape or check must fail the test loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::Write;
use std::process::{Command, Stdio};

use crate::Netns;

/// Body of `GET url` made with curl inside `ns` (1 s limit), `None` unless it answered 2xx.
pub fn http_text(ns: &Netns, url: &str) -> Option<String> {
    let out = ns
        .exec("curl")
        .args(["-sf", "-m", "1", url])
        .stdin(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Value of the first sample of metric `name` (exactly, labels included) in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// `GET url` with curl inside `ns`: status (0 without an answer) and body.
pub fn http(ns: &Netns, url: &str) -> (u16, String) {
    let out = ns
        .exec("curl")
        .args(["-s", "-m", "2", "-w", "\n%{http_code}", url])
        .stdin(Stdio::null())
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

pub fn scrape(ns: &Netns, addr: &str) -> String {
    let (code, body) = http(ns, &format!("http://{addr}/metrics"));
    assert_eq!(code, 200, "GET {addr}/metrics: {body}");
    body
}

/// Samples of metric `name` whose labels include all of `labels`: (label text, value).
pub fn samples<'a>(text: &'a str, name: &str, labels: &[(&str, &str)]) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = match l.find('{') {
                Some(i) => {
                    let end = l.rfind('}')?;
                    (
                        (&l[..i], &l[i + 1..end]),
                        l[end + 1..].split_whitespace().next()?,
                    )
                }
                None => {
                    let mut it = l.split_whitespace();
                    ((it.next()?, ""), it.next()?)
                }
            };
            let (metric, label_text) = series;
            let wanted = metric == name
                && labels
                    .iter()
                    .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")));
            let value = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().ok()?,
            };
            wanted.then_some((label_text, value))
        })
        .collect()
}

/// The value of the first sample of `name` with `labels`; fails the test when there is none.
pub fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    match samples(text, name, labels).first() {
        Some((_, v)) => *v,
        None => panic!("no sample {name}{labels:?} in:\n{text}"),
    }
}

/// Pipes `text` into `promtool check metrics`; fails on a non-zero exit or any output.
pub fn promtool_check(what: &str, text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let problems = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && problems.trim().is_empty(),
        "promtool check metrics on the {what} metrics: {} with:\n{problems}",
        out.status
    );
}

/// Prometheus's query API inside the seed namespace: the value of the first result of
/// `query` (None before it has one).
pub fn prom_query(ns: &Netns, query: &str) -> Option<f64> {
    let out = ns
        .exec("curl")
        .args(["-s", "-m", "2", "-G", "--data-urlencode"])
        .arg(format!("query={query}"))
        .arg("http://127.0.0.1:9090/api/v1/query")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
}
