//! The run: build the topology, then for each round visit every plane once (round-robin) and
//! take the selected measurements; a failed measurement is recorded and the run goes on.
//! Finally print the table and write it with the raw results.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

use super::report::{self, Results};
use super::sys::{cpu_seconds, have, raise_nofile, require_root, MachineInfo};
use super::topo::{Topo, ECHO_PORT, HTTP_PORT};
use super::{check_interrupt, conns, iperf, rate, rr, startup, Config, Group, Plane};

/// File-descriptor limit for the bench and everything it starts (10k proxied connections
/// need two descriptors each in the seed server).
const NOFILE: u64 = 1 << 17;
/// Descriptors a process needs besides the proxied connections.
const FD_RESERVE: u64 = 256;

struct Ctx<'a> {
    cfg: &'a Config,
    res: Results,
    start: Instant,
}

impl Ctx<'_> {
    fn log(&self, msg: &str) {
        eprintln!("[{:>7.1}s] {msg}", self.start.elapsed().as_secs_f64());
    }

    /// Runs one measurement; failures are logged and recorded, never fatal (unless the run
    /// was interrupted).
    fn step(
        &mut self,
        round: u32,
        plane: Plane,
        what: &str,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) -> Result<()> {
        check_interrupt()?;
        if let Err(e) = f(self) {
            check_interrupt()?;
            self.log(&format!("  {plane} {what}: FAILED: {e:#}"));
            self.res.fail(round, plane, what, &e);
        }
        Ok(())
    }
}

/// Runs the benchmark; prints the Markdown table to stdout and writes it and the JSON to
/// `cfg.out`.
pub fn run(cfg: &Config) -> Result<()> {
    require_root()?;
    if !have("iperf3") && (cfg.has(Group::Throughput) || cfg.has(Group::Raw) || cfg.has(Group::Cpu))
    {
        anyhow::bail!("iperf3 is not installed (apt-get install iperf3)");
    }
    let (limit, _) = raise_nofile(NOFILE)?;
    let machine = MachineInfo::collect();
    std::fs::create_dir_all(cfg.out.join("raw"))
        .with_context(|| format!("create {}", cfg.out.display()))?;
    let mut res = Results::default();
    let mut planes = cfg.planes.clone();
    if planes.contains(&Plane::OpenVpn) && !have("openvpn") {
        planes.retain(|p| *p != Plane::OpenVpn);
        res.notes.push(
            "OpenVPN column omitted: openvpn is not installed (apt-get install openvpn).".into(),
        );
    }
    // The seed server holds two descriptors per proxied connection.
    let fit = usize::try_from(limit.saturating_sub(FD_RESERVE) / 2).unwrap_or(usize::MAX);
    let conns = if cfg.conns > fit {
        res.notes.push(format!(
            "{} connections requested; RLIMIT_NOFILE is {limit} here and cannot be raised \
             (no CAP_SYS_RESOURCE), so the connection test used {fit} (the seed server needs two \
             descriptors per proxied connection).",
            cfg.conns
        ));
        fit
    } else {
        cfg.conns
    };
    let cfg = Config {
        planes: planes.clone(),
        conns,
        ..cfg.clone()
    };
    let mut ctx = Ctx {
        cfg: &cfg,
        res,
        start: Instant::now(),
    };
    ctx.log(&format!(
        "building the topology (RLIMIT_NOFILE {limit}; results in {})",
        cfg.out.display()
    ));
    let mut topo = Topo::build(&cfg, cfg.conns + 1024)?;
    ctx.log(&format!(
        "topology up: {} (namespaces {}-*)",
        topo.dir().display(),
        topo.lab.prefix
    ));

    let outcome = rounds(&mut ctx, &mut topo, &planes);
    topo.save_logs(&cfg.out);
    let md = report::markdown(&ctx.res, &machine, &cfg, &planes);
    let js = report::json(&ctx.res, &machine, &cfg, &planes);
    println!("{md}");
    report::write(&cfg.out, &md, &js)?;
    ctx.log(&format!(
        "wrote {0}/summary.md and {0}/results.json (iperf3 JSON in {0}/raw, logs in {0}/logs)",
        cfg.out.display()
    ));
    if cfg.keep {
        let (prefix, dir) = topo.keep();
        eprintln!(
            "kept: namespaces {prefix}-seed/-gw/-shoot/-pod, files and logs in {}; remove with: \
             target/release/lab --teardown {prefix}",
            dir.display()
        );
    } else {
        drop(topo);
        ctx.log("topology removed");
    }
    outcome
}

fn rounds(ctx: &mut Ctx<'_>, topo: &mut Topo, planes: &[Plane]) -> Result<()> {
    for round in 1..=ctx.cfg.rounds {
        for &plane in planes {
            ctx.log(&format!("round {round}/{}: {plane}", ctx.cfg.rounds));
            let turn = plane_turn(ctx, topo, round, plane);
            if let Err(e) = topo.take_down(plane) {
                ctx.log(&format!("  {plane}: stopping failed: {e:#}"));
            }
            turn?;
        }
    }
    Ok(())
}

fn plane_turn(ctx: &mut Ctx<'_>, topo: &mut Topo, round: u32, plane: Plane) -> Result<()> {
    let cfg = ctx.cfg;
    let mut up = false;
    ctx.step(round, plane, "bring up", |c| {
        topo.bring_up(plane)?;
        up = true;
        c.log(&format!("  {plane} is up"));
        Ok(())
    })?;
    if !up {
        return Ok(());
    }
    if cfg.has(Group::Conns) {
        // Before any measurement of this turn.
        for (role, pid) in topo.pids(plane) {
            ctx.res
                .add(round, plane, &format!("rss.{role}.idle"), conns::mib(pid));
        }
    }
    if cfg.has(Group::Throughput) || cfg.has(Group::Cpu) {
        throughput(ctx, topo, round, plane, false)?;
    }
    if plane == Plane::Product && cfg.has(Group::Raw) {
        throughput(ctx, topo, round, plane, true)?;
    }
    if cfg.has(Group::Latency) {
        let mut routes = vec![("rr", topo.route(plane))];
        if plane == Plane::Product && cfg.has(Group::Raw) {
            routes.push(("raw.rr", topo.raw_route()));
        }
        for (key, route) in routes {
            ctx.step(round, plane, key, |c| {
                let o = rr::run(&topo.lab.seeds[0], &route, ECHO_PORT, cfg.rr_time)?;
                c.log(&format!(
                    "  {plane} {key}: p50 {:.0} µs, p99 {:.0} µs ({} round trips)",
                    o.p50_us, o.p99_us, o.count
                ));
                c.res.add(round, plane, &format!("{key}.p50"), o.p50_us);
                c.res.add(round, plane, &format!("{key}.p99"), o.p99_us);
                Ok(())
            })?;
        }
    }
    if cfg.has(Group::Rate) {
        let mut routes = vec![
            (
                "rate",
                topo.rate_route(plane),
                cfg.rate_workers,
                cfg.rate_time,
            ),
            ("rate.seq", topo.rate_route(plane), 1, cfg.rr_time),
        ];
        if plane == Plane::Product {
            routes.push((
                "rate.uds",
                topo.route(plane),
                cfg.rate_workers,
                cfg.rate_time,
            ));
        }
        for (key, route, workers, time) in routes {
            ctx.step(round, plane, key, |c| {
                let vpn: Vec<u32> = topo.pids(plane).iter().map(|(_, p)| *p).collect();
                let me = [std::process::id()];
                let (vpn0, me0) = (cpu_seconds(&vpn), cpu_seconds(&me));
                let o = rate::run(&topo.rt, &route, HTTP_PORT, workers, time)?;
                let ops = o.ok.max(1) as f64;
                let vpn_ms = (cpu_seconds(&vpn) - vpn0) * 1e3 / ops;
                let me_ms = (cpu_seconds(&me) - me0) * 1e3 / ops;
                if !vpn.is_empty() {
                    c.res.add(round, plane, &format!("{key}.cpu_ms"), vpn_ms);
                }
                c.res.add(round, plane, &format!("{key}.bench_cpu_ms"), me_ms);
                c.log(&format!(
                    "  {plane} {key}: {:.0} ops/s, time to 200 p50 {:.2} ms p99 {:.2} ms, CPU per op: VPN {vpn_ms:.3} ms, bench client {me_ms:.3} ms ({} ok, {} errors{})",
                    o.ops_per_s,
                    o.p50_ms,
                    o.p99_ms,
                    o.ok,
                    o.errors,
                    o.first_error
                        .as_deref()
                        .map(|e| format!(", first: {e}"))
                        .unwrap_or_default()
                ));
                c.res.add(round, plane, &format!("{key}.ops"), o.ops_per_s);
                c.res.add(round, plane, &format!("{key}.p50"), o.p50_ms);
                c.res.add(round, plane, &format!("{key}.p99"), o.p99_ms);
                c.res.add(round, plane, &format!("{key}.errors"), o.errors as f64);
                Ok(())
            })?;
        }
    }
    if cfg.has(Group::Conns) {
        ctx.step(round, plane, "conns", |c| {
            let left = topo.reset_echo_if_dirty()?;
            if left > 0 {
                c.log(&format!(
                    "  {left} connections of an earlier test were still open at the pod; echo server restarted"
                ));
            }
            let o = conns::run(topo, plane, cfg.conns)?;
            let mut line = format!(
                "  {plane} {} connections opened in {:.2} s",
                o.opened, o.open_s
            );
            c.res.add(round, plane, "conns.open_s", o.open_s);
            match &o.drain_s {
                Ok(d) => {
                    c.res.add(round, plane, "conns.close_s", *d);
                    line.push_str(&format!(", all closed at the pod {d:.2} s after closing"));
                }
                Err(e) => {
                    let err = anyhow::anyhow!("closing the connections: {e}");
                    c.res.fail(round, plane, "conns close", &err);
                    line.push_str(&format!(", {e}"));
                }
            }
            for r in &o.rss {
                line.push_str(&format!(
                    "; {} RSS {:.1} → {:.1} MiB (after close {:.1})",
                    r.role, r.before, r.loaded, r.after
                ));
                c.res
                    .add(round, plane, &format!("rss.{}.before", r.role), r.before);
                c.res
                    .add(round, plane, &format!("rss.{}.loaded", r.role), r.loaded);
                c.res
                    .add(round, plane, &format!("rss.{}.after", r.role), r.after);
            }
            c.log(&line);
            Ok(())
        })?;
    }
    if plane != Plane::Direct && cfg.has(Group::Startup) {
        ctx.step(round, plane, "startup", |c| {
            let s = startup::time_to_first_byte(topo, plane)?;
            c.log(&format!("  {plane} client start → first byte: {s:.3} s"));
            c.res.add(round, plane, "ttfb", s);
            topo.bring_up(plane)
        })?;
    }
    if plane != Plane::Direct && cfg.has(Group::Recovery) {
        ctx.step(round, plane, "recovery", |c| {
            let r = startup::recovery(topo, plane)?;
            c.log(&format!(
                "  {plane} server restart: listening → first byte {:.3} s, kill → first byte {:.3} s",
                r.from_listen, r.from_kill
            ));
            c.res.add(round, plane, "recover.listen", r.from_listen);
            c.res.add(round, plane, "recover.kill", r.from_kill);
            topo.bring_up(plane)
        })?;
        ctx.step(round, plane, "ingress outages", |c| {
            let v = startup::ingress_outages(topo, plane)?;
            let list: Vec<String> = v.iter().map(|x| format!("{x:.3}")).collect();
            c.log(&format!(
                "  {plane} ingress outages 0.5–5 s: listening again → first byte [{}] s",
                list.join(", ")
            ));
            c.res
                .add(round, plane, "recover.ingress.p50", v[v.len() / 2]);
            c.res
                .add(round, plane, "recover.ingress.max", v[v.len() - 1]);
            Ok(())
        })?;
    }
    Ok(())
}

fn throughput(
    ctx: &mut Ctx<'_>,
    topo: &mut Topo,
    round: u32,
    plane: Plane,
    raw: bool,
) -> Result<()> {
    let cfg = ctx.cfg;
    let prefix = if raw { "raw." } else { "" };
    let (host, port, bind_dev) = match topo.iperf_target(plane, raw) {
        Ok(t) => t,
        Err(e) => {
            ctx.res.fail(round, plane, "iperf3", &e);
            return Ok(());
        }
    };
    let procs = topo.pids(plane);
    let mut pids: Vec<u32> = procs.iter().map(|(_, p)| *p).collect();
    let ingress = topo.ingress_pid();
    pids.extend(ingress);
    for (dir, reverse) in [("s2p", false), ("p2s", true)] {
        for streams in [1u32, 4] {
            let want_tput = cfg.has(if raw { Group::Raw } else { Group::Throughput });
            let want_cpu = streams == 1 && plane != Plane::Direct && cfg.has(Group::Cpu);
            if !want_tput && !want_cpu {
                continue;
            }
            let key = format!("{prefix}{dir}.p{streams}");
            let json = cfg
                .out
                .join("raw")
                .join(format!("r{round}-{plane}-{key}.json"));
            ctx.step(round, plane, &format!("iperf3 {key}"), |c| {
                let o = iperf::run(
                    &topo.lab.seeds[0],
                    &topo.lab.pod,
                    &iperf::Run {
                        host: host.clone(),
                        port,
                        secs: cfg.iperf_secs,
                        streams,
                        reverse,
                        bind_dev: bind_dev.clone(),
                        json: Path::new(&json),
                    },
                    &pids,
                )?;
                let vpn_cpu: f64 = o.cpu_s.iter().take(procs.len()).sum();
                let mut line = format!("  {plane} iperf3 {key}: {:.0} Mbit/s", o.mbps);
                if want_tput {
                    let m = if raw {
                        key.clone()
                    } else {
                        format!("tput.{key}")
                    };
                    c.res.add(round, plane, &m, o.mbps);
                }
                if want_cpu {
                    let cpu_key = format!("cpu.{prefix}{dir}");
                    c.res.add(round, plane, &cpu_key, o.per_gb(vpn_cpu));
                    line.push_str(&format!(", VPN CPU {:.2} s/GB", o.per_gb(vpn_cpu)));
                    if let (Some(_), Some(ing)) = (ingress, o.cpu_s.get(procs.len())) {
                        c.res.add(
                            round,
                            plane,
                            &format!("cpu.ingress.{prefix}{dir}"),
                            o.per_gb(*ing),
                        );
                        line.push_str(&format!(", ingress {:.2} s/GB", o.per_gb(*ing)));
                    }
                }
                c.log(&line);
                Ok(())
            })?;
        }
    }
    Ok(())
}
