//! The lab: builds the `seed | gw | shoot | pod` topology with every component, makes
//! kube-apiserver's CONNECT through the tunnel, and tells step by step what happened.
//! `--keep` leaves it running; `--teardown <prefix>` removes a kept lab.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use tests::client::{connect_uds, expect_silence, http_get};
use tests::lab::{
    Lab, LabOptions, CLIENT_METRICS, INGRESS, POD_PORT, POD_V4, POD_V6, PROXY_TCP, SEED_METRICS,
    SEED_TUNNEL, START_TIMEOUT,
};
use tests::netns;
use tests::proc::signal;
use tests::wait::wait_until;

#[derive(Parser, Debug)]
#[command(about = "Build the reversed-VPN lab in network namespaces and make a CONNECT through it")]
struct Args {
    /// Leave the lab running (namespaces, processes, files) and print how to use and remove it.
    #[arg(long)]
    keep: bool,
    /// Name prefix of the lab's namespaces and of its directory /tmp/vpn-<prefix>.
    #[arg(long, default_value = "vlab")]
    prefix: String,
    /// Remove the kept lab with this prefix (stop its processes, delete its namespaces and files).
    #[arg(long, value_name = "PREFIX", conflicts_with = "keep")]
    teardown: Option<String>,
}

fn main() {
    let args = Args::parse();
    let res = match &args.teardown {
        Some(prefix) => teardown(prefix),
        None => run(&args),
    };
    if let Err(e) = res {
        eprintln!("lab: error: {e:#}");
        std::process::exit(1);
    }
}

struct Steps {
    start: Instant,
    n: u32,
}

impl Steps {
    fn step(&mut self, what: &str) {
        self.n += 1;
        println!(
            "\n[{:>7.3}s] {}. {what}",
            self.start.elapsed().as_secs_f64(),
            self.n
        );
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn run(args: &Args) -> Result<()> {
    tests::require_root()?;
    for b in [
        "vpn-seed-server",
        "vpn-shoot-client",
        "ingress-standin",
        "podserver",
    ] {
        tests::try_bin(b)?;
    }
    let existing: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{}-", args.prefix)))
        .collect();
    if !existing.is_empty() {
        bail!(
            "a lab with prefix {p} exists ({}); remove it first: scripts/lab.sh --teardown {p}",
            existing.join(", "),
            p = args.prefix
        );
    }
    let mut s = Steps {
        start: Instant::now(),
        n: 0,
    };
    s.step("Network namespaces and links");
    let t = Instant::now();
    let mut lab = Lab::with_prefix(&args.prefix, LabOptions::default())?;
    let p = &args.prefix;
    println!(
        "  built in {}; files and logs in {}",
        ms(t.elapsed()),
        lab.dir().display()
    );
    println!("  {p}-seed   gw0 192.168.77.1/24 fd00:77::1/64         (seed server, kube-apiserver's side)");
    println!(
        "  {p}-gw     seed0 192.168.77.2/24, shoot0 10.250.0.1/24 (ingress; does not forward)"
    );
    println!("  {p}-shoot  gw0 10.250.0.2/24, pod0 100.96.1.1/24 fd00:96:0:1::1/64 (shoot client)");
    println!("  {p}-pod    shoot0 {POD_V4}/24 {POD_V6}/64, default via the shoot");
    println!("  checked: the seed cannot connect to {POD_V4} or {POD_V6} directly");

    s.step("Pod HTTP server");
    let d = lab.start_pod_server()?;
    report_proc(
        &lab,
        "podserver",
        &format!("{p}-pod"),
        &format!("[::]:{POD_PORT}"),
        d,
    );

    s.step("Ingress stand-in (routes CONNECT by the Reversed-VPN header)");
    let d = lab.start_ingress()?;
    report_proc(
        &lab,
        "ingress",
        &format!("{p}-gw"),
        &format!("{INGRESS} → {SEED_TUNNEL}"),
        d,
    );

    s.step("WireGuard keys (vpn-shoot-client keygen / pubkey)");
    let (seed_key, client_key) = lab.keys();
    println!("  seed server public key  {}", seed_key.public);
    println!("  shoot client public key {}", client_key.public);

    s.step("Seed server");
    let d = lab.start_server(0)?;
    let uds = lab.uds(0);
    report_proc(
        &lab,
        "seed-server",
        &format!("{p}-seed"),
        &format!(
            "tunnel {SEED_TUNNEL}, proxy {PROXY_TCP} (mTLS) and {}, health {SEED_METRICS}",
            uds.display()
        ),
        d,
    );

    s.step("Shoot client (dials out through the ingress)");
    let d = lab.start_client(0)?;
    report_proc(
        &lab,
        "shoot-client",
        &format!("{p}-shoot"),
        &format!("→ {INGRESS}, health {CLIENT_METRICS}"),
        d,
    );
    let d = lab.wait_all_up(START_TIMEOUT)?;
    println!(
        "  tunnel up (client and server /readyz 200) after {}",
        ms(d)
    );

    s.step("kube-apiserver's CONNECT over mTLS with curl");
    let url = format!("http://{POD_V4}:{POD_PORT}/index.html");
    println!(
        "  ip netns exec {p}-seed curl --proxytunnel --proxy https://{PROXY_TCP} --proxy-cacert ca.pem \
         --proxy-cert client.pem --proxy-key client-key.pem {url}"
    );
    let out = lab.curl_proxy(
        &[
            "-m",
            "10",
            "-w",
            "\n%{http_connect} %{http_code} %{time_connect} %{time_starttransfer} %{time_total}",
        ],
        &url,
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let (body, stats) = stdout.rsplit_once('\n').unwrap_or((&stdout, ""));
    let f: Vec<&str> = stats.split_whitespace().collect();
    if !out.status.success() || f.len() < 5 {
        bail!(
            "curl failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let secs = |x: &str| {
        x.parse::<f64>()
            .map(|v| format!("{:.1} ms", v * 1000.0))
            .unwrap_or_default()
    };
    println!("  CONNECT answered {}, GET answered {}", f[0], f[1]);
    println!(
        "  TCP to the proxy {}, first byte of the page {}, total {}",
        secs(f[2]),
        secs(f[3]),
        secs(f[4])
    );
    println!("  body: {:?}", body);

    s.step("kube-apiserver's CONNECT over the UDS (exact bytes, then GET)");
    let target = format!("{POD_V4}:{POD_PORT}");
    let (reply, mut stream) = connect_uds(&uds, &target, Duration::from_secs(10))?;
    println!(
        "  CONNECT {target} HTTP/1.1 → {:?} in {}",
        reply.head.trim_end(),
        ms(reply.elapsed)
    );
    if reply.status != 200 {
        bail!("CONNECT over the UDS answered {}", reply.status);
    }
    expect_silence(
        &mut stream,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )?;
    let t = Instant::now();
    let (code, body) = http_get(&mut stream, &target, "/index.html")?;
    println!(
        "  GET /index.html → {code} {:?} in {}",
        String::from_utf8_lossy(&body),
        ms(t.elapsed())
    );

    s.step("IPv6 pod address through the tunnel");
    let out = lab.curl_proxy(
        &["-m", "10"],
        &format!("http://[{POD_V6}]:{POD_PORT}/index.html"),
    )?;
    println!(
        "  [{POD_V6}]:{POD_PORT} → {}",
        if out.status.success() {
            format!("{:?}", String::from_utf8_lossy(&out.stdout))
        } else {
            format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim())
        }
    );

    s.step("Log excerpts");
    for name in ["ingress", "seed-server", "shoot-client"] {
        if let Some(pr) = lab.proc(name) {
            println!("  --- {name} ({})", pr.log_path().display());
            let log = pr.log();
            let lines: Vec<&str> = log.lines().collect();
            for l in &lines[lines.len().saturating_sub(8)..] {
                println!("  | {l}");
            }
        }
    }

    if args.keep {
        let procs: Vec<(String, u32)> = lab.procs().map(|(n, pid)| (n.to_owned(), pid)).collect();
        let dir = lab.keep();
        println!("\nThe lab keeps running:");
        for (n, pid) in procs {
            println!("  {n:<13} pid {pid}");
        }
        println!("  files and logs: {}", dir.display());
        println!("Enter a namespace:   ip netns exec {p}-seed bash     (also {p}-gw, {p}-shoot, {p}-pod)");
        println!(
            "Try:                 ip netns exec {p}-seed curl --proxytunnel --proxy https://{PROXY_TCP} \
             --proxy-cacert {d}/ca.pem --proxy-cert {d}/client.pem --proxy-key {d}/client-key.pem {url}",
            p = args.prefix,
            d = dir.display()
        );
        println!(
            "Tear down:           scripts/lab.sh --teardown {}",
            args.prefix
        );
    } else {
        s.step("Teardown");
        drop(lab);
        println!("  processes stopped, namespaces deleted, files removed");
    }
    println!("\nlab: OK in {:.2} s", s.start.elapsed().as_secs_f64());
    Ok(())
}

fn report_proc(lab: &Lab, name: &str, ns: &str, what: &str, ready: Duration) {
    let pid = lab.proc(name).map(|p| p.pid()).unwrap_or_default();
    println!(
        "  {name} pid {pid} in {ns}: {what}; ready after {}",
        ms(ready)
    );
}

/// Stops the processes of a kept lab (by the PIDs in its namespaces), deletes its namespaces
/// and its directory.
fn teardown(prefix: &str) -> Result<()> {
    tests::require_root()?;
    let names: Vec<String> = netns::list()?
        .into_iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .collect();
    let mut pids = Vec::new();
    for n in &names {
        pids.extend(netns::pids(n)?);
    }
    for &pid in &pids {
        println!("stopping pid {pid}");
        let _ = signal(pid, libc::SIGTERM);
    }
    let gone = |pid: &u32| !PathBuf::from(format!("/proc/{pid}")).exists();
    if wait_until(Duration::from_secs(5), "lab processes to exit", || {
        pids.iter().all(gone)
    })
    .is_err()
    {
        for pid in pids.iter().filter(|p| !gone(p)) {
            println!("killing pid {pid}");
            let _ = signal(*pid, libc::SIGKILL);
        }
    }
    for n in &names {
        netns::run(Command::new("ip").args(["netns", "del", n]))
            .with_context(|| format!("delete {n}"))?;
        println!("deleted namespace {n}");
    }
    let dir = std::env::temp_dir().join(format!("vpn-{prefix}"));
    if dir.is_dir() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
        println!("removed {}", dir.display());
    }
    if names.is_empty() {
        println!("no namespaces with prefix {prefix}-");
    }
    Ok(())
}
