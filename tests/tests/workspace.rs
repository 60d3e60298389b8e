//! Checks of the workspace itself: no crate lists a dependency it does not use, and the sans-IO
//! core (`common` without its `io` feature) depends on no runtime, TUN, netlink, nftables,
//! HTTP or TLS crate. Needs no extra tool: it reads the manifests and sources and asks cargo.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Dependency names of the `[dependencies]` / `[dev-dependencies]` tables of a manifest.
fn deps(manifest: &str) -> Vec<(String, &'static str)> {
    let mut out = Vec::new();
    let mut table: Option<&'static str> = None;
    for line in manifest.lines() {
        let l = line.trim();
        if l.starts_with('[') {
            table = match l {
                "[dependencies]" => Some("dependencies"),
                "[dev-dependencies]" => Some("dev-dependencies"),
                _ => None,
            };
            continue;
        }
        if let (Some(t), Some((name, _))) = (table, l.split_once(['=', '.'])) {
            let name = name.trim();
            if !name.is_empty() && !name.starts_with('#') {
                out.push((name.to_string(), t));
            }
        }
    }
    out
}

fn sources(dir: &Path, out: &mut String) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir()
            && p.file_name()
                .is_some_and(|n| n != "target" && n != "corpus")
        {
            sources(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push_str(&std::fs::read_to_string(&p).unwrap_or_default());
            out.push('\n');
        }
    }
}

#[test]
fn no_crate_lists_a_dependency_it_does_not_use() {
    let root = root();
    let mut unused = Vec::new();
    for member in [
        "common",
        "vpn-seed-server",
        "vpn-shoot-client",
        "tests",
        "fuzz",
    ] {
        let dir = root.join(member);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
        let mut src = String::new();
        sources(&dir, &mut src);
        for (dep, table) in deps(&manifest) {
            let id = dep.replace('-', "_");
            let used = [
                format!("{id}::"),
                format!("use {id}"),
                format!("{id}!"),
                format!("extern crate {id}"),
            ]
            .iter()
            .any(|pat| src.contains(pat.as_str()));
            if !used {
                unused.push(format!("{member}: {dep} ({table})"));
            }
        }
    }
    assert!(
        unused.is_empty(),
        "dependencies listed but not used: {unused:#?}"
    );
}

#[test]
fn the_sans_io_core_depends_on_no_io_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root())
        .args([
            "tree",
            "-p",
            "common",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .output()
        .expect("run cargo tree");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    let crates: Vec<&str> = tree
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for io in [
        "tokio",
        "tun-rs",
        "rtnetlink",
        "nftables",
        "hyper",
        "rustls",
        "tokio-rustls",
        "socket2",
        "mio",
    ] {
        assert!(
            !crates.contains(&io),
            "the sans-IO core depends on {io}:\n{tree}"
        );
    }
    assert!(crates.contains(&"boringtun"), "unexpected tree:\n{tree}");
}
