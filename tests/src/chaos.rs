//! Chaos: the lab ([`Lab::up`]) with one of its processes — shoot client, seed server or
//! ingress — killed with SIGKILL and restarted with the same arguments, round after round.
//! After every restart a new CONNECT must succeed within a deadline, and each side must hold
//! exactly one set of the product's network state: a killed process cannot clean up, so its
//! successor has to replace that state, not add a second copy. At the end both VPN processes
//! are stopped with SIGTERM and nothing of that state may be left.
//!
//! Targets are drawn from a seeded RNG as a shuffled bag: every three consecutive rounds
//! (1–3, 4–6, …) kill each target once, in random order.

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;

use crate::lab::{Lab, LabOptions, VPN_NETWORK};
use crate::netns::Netns;
use crate::soak::{short_connect, SEED_SERVER, SHOOT_CLIENT};
use crate::wait::{wait_until, POLL};

/// The TUN device of both sides in [`Lab`].
pub const TUN: &str = "tun0";
/// The seed server's policy routing table (and rule priority) in [`Lab`].
pub const TABLE: &str = "1194";
/// The shoot client's nftables table.
pub const NFT_TABLE: &str = "vpn_shoot_client";
/// Longest read/write timeout of one CONNECT attempt.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(1);
/// A first CONNECT slower than this prints the failed attempts before it.
pub const SLOW_CONNECT: Duration = Duration::from_millis(500);
/// How long a SIGTERMed VPN process may take to exit (the seed server drains up to 20 s).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(25);

/// What the chaos run does.
#[derive(Debug, Clone)]
pub struct ChaosOptions {
    /// Number of kill/restart rounds.
    pub rounds: usize,
    /// RNG seed; `None`: a random one (printed, and kept in the report).
    pub seed: Option<u64>,
    /// A new CONNECT must succeed within this time after the restart.
    pub connect_deadline: Duration,
    /// How long the network state may take to look right after the first CONNECT.
    pub state_deadline: Duration,
}

impl Default for ChaosOptions {
    fn default() -> Self {
        Self {
            rounds: 20,
            seed: None,
            connect_deadline: Duration::from_secs(5),
            state_deadline: Duration::from_secs(2),
        }
    }
}

/// A process chaos can kill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// The shoot client.
    ShootClient,
    /// The seed server.
    SeedServer,
    /// The ingress stand-in.
    Ingress,
}

impl Target {
    /// All targets.
    pub const ALL: [Target; 3] = [Target::ShootClient, Target::SeedServer, Target::Ingress];

    /// The process name in [`Lab`].
    pub fn name(self) -> &'static str {
        match self {
            Target::ShootClient => SHOOT_CLIENT,
            Target::SeedServer => SEED_SERVER,
            Target::Ingress => "ingress",
        }
    }
}

/// The order of targets for `rounds` rounds from `seed`: shuffled bags of all three.
pub fn schedule(seed: u64, rounds: usize) -> Vec<Target> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(rounds + 3);
    while out.len() < rounds {
        let mut bag = Target::ALL;
        bag.shuffle(&mut rng);
        out.extend(bag);
    }
    out.truncate(rounds);
    out
}

/// One round.
#[derive(Debug, Clone)]
pub struct Round {
    /// 1-based.
    pub n: usize,
    /// What was killed.
    pub target: Target,
    /// PID that got SIGKILL.
    pub killed_pid: u32,
    /// From the kill until the restarted process was up (listening / healthy).
    pub restart: Duration,
    /// From the restart until the first successful CONNECT + GET; `None` if none within the
    /// deadline.
    pub first_connect: Option<Duration>,
    /// CONNECT attempts made (the successful one included).
    pub attempts: usize,
    /// What the failed attempts said, in order, each with its start after the restart.
    pub attempt_errors: Vec<(Duration, String)>,
    /// Failed assertions of this round.
    pub errors: Vec<String>,
}

impl std::fmt::Display for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "round {:>2}: killed {:<12} (pid {:>7}): up again after {:>7.1} ms, first CONNECT {} after the restart ({} attempt{}), {}",
            self.n,
            self.target.name(),
            self.killed_pid,
            ms(self.restart),
            self.first_connect
                .map_or("NONE".to_owned(), |d| format!("{:.1} ms", ms(d))),
            self.attempts,
            if self.attempts == 1 { "" } else { "s" },
            if self.errors.is_empty() {
                "state ok".to_owned()
            } else {
                format!("FAILED: {}", self.errors.join("; "))
            }
        )
    }
}

/// Everything the chaos run saw.
#[derive(Debug, Clone)]
pub struct ChaosReport {
    /// The RNG seed.
    pub seed: u64,
    /// The rounds run.
    pub rounds: Vec<Round>,
    /// Rounds that were planned.
    pub planned: usize,
    /// Failed assertions before the rounds (the initial state) and after them (the stop).
    pub errors: Vec<String>,
    /// Exit statuses of the seed server and the shoot client after SIGTERM.
    pub exits: Vec<(String, Option<ExitStatus>)>,
}

impl ChaosReport {
    /// Whether every assertion held and every planned round ran.
    pub fn passed(&self) -> bool {
        self.errors.is_empty()
            && self.rounds.len() == self.planned
            && self.rounds.iter().all(|r| r.errors.is_empty())
    }

    /// Every failed assertion, one per line.
    pub fn failures(&self) -> String {
        let mut s = String::new();
        for r in self.rounds.iter().filter(|r| !r.errors.is_empty()) {
            s.push_str(&format!("{r}\n"));
        }
        for e in &self.errors {
            s.push_str(&format!("{e}\n"));
        }
        if self.rounds.len() != self.planned {
            s.push_str(&format!(
                "only {} of {} rounds ran\n",
                self.rounds.len(),
                self.planned
            ));
        }
        s
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl std::fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "chaos report: seed {}, {} of {} rounds",
            self.seed,
            self.rounds.len(),
            self.planned
        )?;
        for t in Target::ALL {
            let rs: Vec<&Round> = self.rounds.iter().filter(|r| r.target == t).collect();
            let mut times: Vec<Duration> = rs.iter().filter_map(|r| r.first_connect).collect();
            times.sort();
            let failed = rs.iter().filter(|r| !r.errors.is_empty()).count();
            let fmt = |d: Option<&Duration>| d.map_or("-".to_owned(), |d| format!("{:.1}", ms(*d)));
            writeln!(
                f,
                "  {:<12} killed {:>2}×, failed {failed}; first CONNECT after restart ms: min {} median {} max {}",
                t.name(),
                rs.len(),
                fmt(times.first()),
                fmt(times.get(times.len() / 2)),
                fmt(times.last()),
            )?;
        }
        for (name, st) in &self.exits {
            writeln!(
                f,
                "  {name} after SIGTERM: {}",
                st.map_or("did not exit".to_owned(), |s| s.to_string())
            )?;
        }
        for e in &self.errors {
            writeln!(f, "  FAILED: {e}")?;
        }
        write!(
            f,
            "  result: {}",
            if self.passed() { "PASSED" } else { "FAILED" }
        )
    }
}

/// Lines of `program args…` run inside `ns`; a failing command is an error.
fn lines(ns: &Netns, program: &str, args: &[&str]) -> Result<Vec<String>> {
    let out = ns.run(program, args)?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        .filter(|l| !l.is_empty())
        .collect())
}

/// Number of links called `name` in `ns` (`ip -o link show`: `N: name: <…>` or `name@peer`).
fn links_named(ns: &Netns, name: &str) -> Result<usize> {
    Ok(lines(ns, "ip", &["-o", "link", "show"])?
        .iter()
        .filter(|l| {
            l.split_whitespace().nth(1).is_some_and(|n| {
                let n = n.trim_end_matches(':');
                n == name || n.split('@').next() == Some(name)
            })
        })
        .count())
}

/// The product's network state in both namespaces.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetState {
    /// Seed: links named `tun0`.
    pub seed_tun: usize,
    /// Seed: `oif tun0 lookup 1194` rules, IPv4.
    pub seed_rules_v4: usize,
    /// Seed: `oif tun0 lookup 1194` rules, IPv6.
    pub seed_rules_v6: usize,
    /// Seed: routes of table 1194, IPv4.
    pub seed_table_v4: Vec<String>,
    /// Seed: routes of table 1194, IPv6.
    pub seed_table_v6: Vec<String>,
    /// Shoot: links named `tun0`.
    pub shoot_tun: usize,
    /// Shoot: main-table routes for the IPv4 VPN network.
    pub shoot_routes_v4: Vec<String>,
    /// Shoot: main-table routes for the IPv6 VPN network.
    pub shoot_routes_v6: Vec<String>,
    /// Shoot: `nft list tables` lines naming `inet vpn_shoot_client`.
    pub nft_tables: usize,
    /// Shoot: the table's rules without counters (`nft -s list table`), empty if absent.
    pub nft_table: String,
}

fn vpn_nets() -> (String, String) {
    let mut v4 = String::new();
    let mut v6 = String::new();
    for n in VPN_NETWORK.split(',') {
        if n.contains(':') {
            v6 = n.to_owned();
        } else {
            v4 = n.to_owned();
        }
    }
    (v4, v6)
}

/// Reads the product's network state from the seed and shoot namespaces.
pub fn observe(lab: &Lab) -> Result<NetState> {
    let rule = |v6: bool| -> Result<usize> {
        let mut args = vec!["rule", "show"];
        if v6 {
            args.insert(0, "-6");
        }
        Ok(lines(&lab.seeds[0], "ip", &args)?
            .iter()
            .filter(|l| {
                l.contains(&format!("oif {TUN} "))
                    && l.split_whitespace()
                        .skip_while(|w| *w != "lookup")
                        .nth(1)
                        .is_some_and(|t| t == TABLE)
            })
            .count())
    };
    let (v4, v6) = vpn_nets();
    let routes_to = |net: &str, fam: &str| -> Result<Vec<String>> {
        Ok(lines(&lab.shoots[0], "ip", &[fam, "route", "show"])?
            .into_iter()
            .filter(|l| l.split_whitespace().next() == Some(net))
            .collect())
    };
    let tables = lines(&lab.shoots[0], "nft", &["list", "tables"])?;
    let nft_tables = tables
        .iter()
        .filter(|l| **l == format!("table inet {NFT_TABLE}"))
        .count();
    let nft_table = if nft_tables > 0 {
        lines(
            &lab.shoots[0],
            "nft",
            &["-s", "list", "table", "inet", NFT_TABLE],
        )
        .map(|l| l.join("\n"))
        .unwrap_or_default()
    } else {
        String::new()
    };
    Ok(NetState {
        seed_tun: links_named(&lab.seeds[0], TUN)?,
        seed_rules_v4: rule(false)?,
        seed_rules_v6: rule(true)?,
        seed_table_v4: lines(
            &lab.seeds[0],
            "ip",
            &["-4", "route", "show", "table", TABLE],
        )?,
        seed_table_v6: lines(
            &lab.seeds[0],
            "ip",
            &["-6", "route", "show", "table", TABLE],
        )?,
        shoot_tun: links_named(&lab.shoots[0], TUN)?,
        shoot_routes_v4: routes_to(&v4, "-4")?,
        shoot_routes_v6: routes_to(&v6, "-6")?,
        nft_tables,
        nft_table,
    })
}

fn one_default_via_tun(routes: &[String]) -> bool {
    routes.len() == 1 && routes[0].starts_with(&format!("default dev {TUN}"))
}

fn one_via_tun(routes: &[String]) -> bool {
    routes.len() == 1 && routes[0].contains(&format!(" dev {TUN}"))
}

/// What is wrong with `s` for a running lab: exactly one of everything; the nftables table
/// must equal `nft_baseline` (the first start's) when given.
pub fn problems_up(s: &NetState, nft_baseline: Option<&str>) -> Vec<String> {
    let mut p = Vec::new();
    if s.seed_tun != 1 {
        p.push(format!("seed: {} links named {TUN}", s.seed_tun));
    }
    if s.seed_rules_v4 != 1 {
        p.push(format!(
            "seed: {} IPv4 rules oif {TUN} lookup {TABLE}",
            s.seed_rules_v4
        ));
    }
    if s.seed_rules_v6 != 1 {
        p.push(format!(
            "seed: {} IPv6 rules oif {TUN} lookup {TABLE}",
            s.seed_rules_v6
        ));
    }
    if !one_default_via_tun(&s.seed_table_v4) {
        p.push(format!("seed: IPv4 table {TABLE} is {:?}", s.seed_table_v4));
    }
    if !one_default_via_tun(&s.seed_table_v6) {
        p.push(format!("seed: IPv6 table {TABLE} is {:?}", s.seed_table_v6));
    }
    if s.shoot_tun != 1 {
        p.push(format!("shoot: {} links named {TUN}", s.shoot_tun));
    }
    if !one_via_tun(&s.shoot_routes_v4) {
        p.push(format!(
            "shoot: IPv4 VPN-network routes {:?}",
            s.shoot_routes_v4
        ));
    }
    if !one_via_tun(&s.shoot_routes_v6) {
        p.push(format!(
            "shoot: IPv6 VPN-network routes {:?}",
            s.shoot_routes_v6
        ));
    }
    if s.nft_tables != 1 {
        p.push(format!(
            "shoot: {} nftables tables inet {NFT_TABLE}",
            s.nft_tables
        ));
    }
    if let Some(base) = nft_baseline {
        if s.nft_tables == 1 && s.nft_table != base {
            p.push(format!(
                "shoot: nftables table differs from the first start's:\n{}\nfirst start:\n{base}",
                s.nft_table
            ));
        }
    }
    p
}

/// What is left of the product's state in `s` after both VPN processes stopped.
pub fn problems_clean(s: &NetState) -> Vec<String> {
    let mut p = Vec::new();
    let mut left = |what: String, n: usize| {
        if n > 0 {
            p.push(format!("left after the stop: {what} ({n})"));
        }
    };
    left(format!("seed {TUN}"), s.seed_tun);
    left(format!("seed IPv4 rule lookup {TABLE}"), s.seed_rules_v4);
    left(format!("seed IPv6 rule lookup {TABLE}"), s.seed_rules_v6);
    left(
        format!("seed IPv4 table {TABLE} routes {:?}", s.seed_table_v4),
        s.seed_table_v4.len(),
    );
    left(
        format!("seed IPv6 table {TABLE} routes {:?}", s.seed_table_v6),
        s.seed_table_v6.len(),
    );
    left(format!("shoot {TUN}"), s.shoot_tun);
    left(
        format!("shoot IPv4 VPN routes {:?}", s.shoot_routes_v4),
        s.shoot_routes_v4.len(),
    );
    left(
        format!("shoot IPv6 VPN routes {:?}", s.shoot_routes_v6),
        s.shoot_routes_v6.len(),
    );
    left(
        format!("shoot nftables table inet {NFT_TABLE}"),
        s.nft_tables,
    );
    p
}

/// Polls [`observe`] until `check` finds nothing wrong or `timeout` passes; returns the last
/// problems (empty when it held).
fn settle(lab: &Lab, timeout: Duration, check: impl Fn(&NetState) -> Vec<String>) -> Vec<String> {
    let mut last = Vec::new();
    let _ = wait_until(timeout, "the network state", || {
        last = match observe(lab) {
            Ok(s) => check(&s),
            Err(e) => vec![format!("cannot read the network state: {e:#}")],
        };
        last.is_empty()
    });
    last
}

fn pid_of(lab: &Lab, name: &str) -> Result<u32> {
    lab.procs()
        .find(|(n, _)| *n == name)
        .map(|(_, pid)| pid)
        .with_context(|| format!("no process {name} in the lab"))
}

/// Kills `target` with SIGKILL and restarts it with the same arguments; returns the killed
/// PID and the restart instant.
fn kill_restart(lab: &mut Lab, target: Target) -> Result<(u32, Instant)> {
    let name = target.name();
    let pid = pid_of(lab, name)?;
    match lab.proc_mut(name) {
        Some(p) => p.kill9().with_context(|| format!("SIGKILL {name}"))?,
        None => bail!("{name} is not running"),
    }
    let restart = Instant::now();
    match target {
        Target::ShootClient => lab.start_client(0),
        Target::SeedServer => lab.start_server(0),
        Target::Ingress => lab.start_ingress(),
    }
    .with_context(|| format!("restart {name}"))?;
    Ok((pid, restart))
}

/// Polls a new CONNECT + GET until one succeeds or `deadline` passes: the time since
/// `since` (or the last error) and the failed attempts (start since `since`, error).
fn first_connect(
    lab: &Lab,
    since: Instant,
    deadline: Instant,
) -> (Result<Duration, String>, Vec<(Duration, String)>) {
    let uds = lab.uds(0);
    let mut failed = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let timeout = left.clamp(Duration::from_millis(50), ATTEMPT_TIMEOUT);
        let start = since.elapsed();
        match short_connect(&uds, timeout) {
            Ok(()) => return (Ok(since.elapsed()), failed),
            Err(e) => {
                let e = format!("{e:#}");
                failed.push((start, e.clone()));
                if Instant::now() >= deadline {
                    return (Err(e), failed);
                }
                std::thread::sleep(POLL);
            }
        }
    }
}

/// The failed attempts of a round, consecutive identical errors folded: `at 12 ms: error (×3)`.
pub fn fold_errors(errors: &[(Duration, String)]) -> Vec<String> {
    let mut out: Vec<(Duration, &str, usize)> = Vec::new();
    for (at, e) in errors {
        match out.last_mut() {
            Some((_, last, n)) if *last == e.as_str() => *n += 1,
            _ => out.push((*at, e, 1)),
        }
    }
    out.into_iter()
        .map(|(at, e, n)| {
            let times = if n > 1 {
                format!(" (×{n})")
            } else {
                String::new()
            };
            format!("from {:.1} ms: {e}{times}", ms(at))
        })
        .collect()
}

/// Brings the lab up and runs the chaos rounds on it (see the module docs).
pub fn run(opts: &ChaosOptions) -> Result<ChaosReport> {
    let mut lab = Lab::up(LabOptions::default()).context("bring the lab up")?;
    let res = run_on(&mut lab, opts);
    if res.as_ref().map_or(true, |r| !r.passed()) {
        lab.print_logs();
    }
    res
}

/// Runs the chaos rounds on a lab that is up, then stops both VPN processes with SIGTERM.
pub fn run_on(lab: &mut Lab, opts: &ChaosOptions) -> Result<ChaosReport> {
    let seed = opts.seed.unwrap_or_else(rand::random);
    println!(
        "chaos: lab {} up; {} rounds, seed {seed} (repeat with --seed {seed})",
        lab.prefix, opts.rounds
    );
    let mut report = ChaosReport {
        seed,
        rounds: Vec::new(),
        planned: opts.rounds,
        errors: Vec::new(),
        exits: Vec::new(),
    };

    let start = settle(lab, opts.state_deadline, |s| problems_up(s, None));
    let baseline = observe(lab)?.nft_table;
    if !start.is_empty() {
        report
            .errors
            .push(format!("initial state: {}", start.join("; ")));
    }

    for (i, target) in schedule(seed, opts.rounds).into_iter().enumerate() {
        let killed = Instant::now();
        let (killed_pid, restart) = match kill_restart(lab, target) {
            Ok(x) => x,
            Err(e) => {
                report
                    .errors
                    .push(format!("round {}: {e:#}; rounds stopped", i + 1));
                break;
            }
        };
        let up = restart.elapsed();
        let (res, attempt_errors) = first_connect(lab, restart, restart + opts.connect_deadline);
        let attempts = attempt_errors.len() + usize::from(res.is_ok());
        let mut errors = Vec::new();
        let first = match res {
            Ok(d) if d <= opts.connect_deadline => Some(d),
            Ok(d) => {
                errors.push(format!(
                    "first CONNECT took {:.1} ms (deadline {:?})",
                    ms(d),
                    opts.connect_deadline
                ));
                None
            }
            Err(e) => {
                errors.push(format!(
                    "no CONNECT within {:?} after the restart: {e}",
                    opts.connect_deadline
                ));
                None
            }
        };
        errors.extend(settle(lab, opts.state_deadline, |s| {
            problems_up(s, Some(&baseline))
        }));
        let round = Round {
            n: i + 1,
            target,
            killed_pid,
            restart: restart.duration_since(killed) + up,
            first_connect: first,
            attempts,
            attempt_errors,
            errors,
        };
        println!("chaos: {round}");
        if round.first_connect.is_none_or(|d| d >= SLOW_CONNECT) || !round.errors.is_empty() {
            for e in fold_errors(&round.attempt_errors) {
                println!("chaos:     failed attempt {e}");
            }
        }
        report.rounds.push(round);
    }

    // Graceful stop of both VPN processes, then nothing of their state may be left.
    let mut signalled = Vec::new();
    for name in [SHOOT_CLIENT, SEED_SERVER] {
        // Running means not reaped yet, so the PID is still this child's.
        let pid = lab
            .proc_mut(name)
            .and_then(|p| p.is_running().then(|| p.pid()));
        match pid {
            Some(pid) => match crate::proc::signal(pid, libc::SIGTERM) {
                Ok(()) => signalled.push(name),
                Err(e) => report.errors.push(format!("SIGTERM {name}: {e:#}")),
            },
            None => report
                .errors
                .push(format!("{name} is not running before the stop")),
        }
    }
    for name in signalled {
        let Some(p) = lab.proc_mut(name) else {
            continue;
        };
        match p.wait_exit(STOP_TIMEOUT) {
            Ok(st) => {
                if !st.success() {
                    report
                        .errors
                        .push(format!("{name} exited with {st} after SIGTERM"));
                }
                report.exits.push((name.to_owned(), Some(st)));
            }
            Err(e) => {
                report.errors.push(format!("{name}: {e:#}"));
                report.exits.push((name.to_owned(), None));
            }
        }
    }
    report
        .errors
        .extend(settle(lab, opts.state_deadline, problems_clean));
    Ok(report)
}
