//! Command line and environment of `vpn-shoot-client`, validated into a [`Config`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use common::config::Flag;
use ipnet::IpNet;

/// Reference text after the flags in `--help`.
const AFTER_HELP: &str = "\
Every flag can also be set by the environment variable shown. Secrets are file paths.

Endpoints on --metrics-listen (default :15001): /healthz (liveness), /readyz, /metrics.
/readyz: 200 when the tunnel to every --header-value is up (--ready-when any: one).
SIGTERM: exits at once and removes its nftables table.

Exit codes: 0 stopped by SIGTERM/SIGINT; 1 a component failed; 2 configuration errors
(all printed at once); 3 stopped by a signal with connections still open at the drain
deadline.";

/// Reversed VPN shoot client: dials out through the seed's ingress with HTTP CONNECT, carries
/// the seed's connections into the shoot's pod, service and node networks.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "vpn-shoot-client",
    version,
    about,
    long_about = None,
    after_help = AFTER_HELP,
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub args: Args,
}

/// Key helpers, compatible with `wg genkey` and `wg pubkey`.
#[derive(Subcommand, Debug, Clone)]
pub enum Command {
    /// Print a new private key (base64).
    Keygen,
    /// Read a private key on stdin and print its public key.
    Pubkey,
}

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Ingress endpoint host:port (the seed's shared load balancer; default port 8132).
    #[arg(long, env = "ENDPOINT", required = true)]
    pub endpoint: Option<String>,

    /// Target of the CONNECT request [default: <endpoint host>:1194].
    #[arg(long, env = "CONNECT_TARGET")]
    pub connect_target: Option<String>,

    /// Name of the header the ingress routes by.
    #[arg(long, env = "REVERSED_VPN_HEADER_KEY", default_value = "Reversed-VPN")]
    pub header_name: String,

    /// Header value, one per seed server replica (repeatable; comma-separated in the
    /// environment). One tunnel is kept to each.
    #[arg(
        long = "header-value",
        env = "REVERSED_VPN_HEADER",
        value_delimiter = ',',
        required = true
    )]
    pub header_values: Vec<String>,

    /// Use TLS to the ingress.
    #[arg(long, env = "ENDPOINT_TLS", default_value_t = false)]
    pub endpoint_tls: bool,

    /// CA bundle to verify the ingress certificate with (PEM).
    #[arg(
        long,
        env = "ENDPOINT_CA",
        default_value = "/etc/ssl/certs/ca-certificates.crt"
    )]
    pub endpoint_ca: PathBuf,

    /// File holding the client's WireGuard private key (base64, as `wg genkey` writes it).
    #[arg(long, env = "PRIVATE_KEY_FILE", required = true)]
    pub private_key_file: Option<PathBuf>,

    /// File holding an optional WireGuard pre-shared key.
    #[arg(long, env = "PRESHARED_KEY_FILE")]
    pub preshared_key_file: Option<PathBuf>,

    /// The seed server's WireGuard public key (base64).
    #[arg(long, env = "SERVER_PUBLIC_KEY", required = true)]
    pub server_public_key: Option<String>,

    /// VPN transfer networks (one IPv4 and/or one IPv6 CIDR).
    #[arg(
        long,
        env = "VPN_NETWORK",
        default_value = "192.168.123.0/24,fd8f:6d53:b97a:1::/96"
    )]
    pub vpn_network: String,

    /// Name of the TUN device.
    #[arg(long, env = "TUN_NAME", default_value = "tun0")]
    pub tun_name: String,

    /// MTU of the TUN device.
    #[arg(long, env = "MTU", default_value = "1400", value_parser = common::config::parse::<u16>)]
    pub mtu: Flag<u16>,

    /// Use the TUN's offloads (TSO/GRO super-packets) when the kernel offers them.
    #[arg(long, env = "TUN_OFFLOAD", default_value = "true", action = clap::ArgAction::Set, value_parser = common::config::parse::<bool>)]
    pub tun_offload: Flag<bool>,

    /// Masquerade traffic from the VPN network leaving by other interfaces.
    #[arg(long, env = "MASQUERADE", default_value = "true", action = clap::ArgAction::Set, value_parser = common::config::parse::<bool>)]
    pub masquerade: Flag<bool>,

    /// Health and metrics listener (`/healthz`, `/readyz`, `/metrics`), or `off`.
    #[arg(long, env = "METRICS_LISTEN", default_value = "[::]:15001")]
    pub metrics_listen: String,

    /// Keepalive interval: a keepalive is sent into a tunnel that carried nothing for this long.
    #[arg(long, env = "KEEPALIVE", default_value = "5s", value_parser = common::config::duration)]
    pub keepalive: Flag<Duration>,

    /// A tunnel stream that received nothing for this long is reconnected (detects streams that
    /// silently stopped, e.g. black-holed, without waiting for TCP to time out).
    #[arg(long, env = "DEAD_PEER_TIMEOUT", default_value = "15s", value_parser = common::config::duration)]
    pub dead_peer_timeout: Flag<Duration>,

    /// Time allowed to reach the ingress and get its answer.
    #[arg(long, env = "DIAL_TIMEOUT", default_value = "10s", value_parser = common::config::duration)]
    pub dial_timeout: Flag<Duration>,

    /// Readiness: `all` = every configured seed server's tunnel is up; `any` = at least one.
    #[arg(long, env = "READY_WHEN", default_value = "all", value_parser = ["all", "any"])]
    pub ready_when: String,

    /// Stream preamble: `2` names this client to the server without any key exchange work
    /// (a keyed tag), so the server serves its handshakes ahead of strangers' during a flood;
    /// `1` for seed servers older than version 2 of the wire protocol.
    #[arg(long, env = "PREAMBLE_VERSION", default_value = "2", value_parser = ["1", "2"])]
    pub preamble_version: String,

    /// Log format.
    #[arg(long, env = "LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub endpoint_host: String,
    pub endpoint_port: u16,
    pub connect_target: String,
    pub header_name: String,
    pub header_values: Vec<String>,
    pub endpoint_tls: Option<PathBuf>,
    pub private_key_file: PathBuf,
    pub preshared_key_file: Option<PathBuf>,
    pub server_public_key: String,
    pub vpn_networks: Vec<IpNet>,
    pub tun_name: String,
    pub mtu: u16,
    pub tun_offload: bool,
    pub masquerade: bool,
    pub metrics_listen: Option<SocketAddr>,
    pub keepalive: Duration,
    pub dead_peer_timeout: Duration,
    pub dial_timeout: Duration,
    /// Ready when every configured server's tunnel is up (`all`) or at least one (`any`).
    pub ready_when_all: bool,
    /// Send version-2 (authenticated) preambles.
    pub preamble_v2: bool,
}

/// Splits `host:port` (IPv6 in brackets); `default_port` when the port is missing.
pub fn split_host_port(s: &str, default_port: u16) -> Result<(String, u16), String> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("{s:?}: missing ']'"))?;
        match after.strip_prefix(':') {
            Some(p) => (h.to_string(), Some(p)),
            None if after.is_empty() => (h.to_string(), None),
            None => return Err(format!("{s:?}: junk after ']'")),
        }
    } else {
        match s.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h.to_string(), Some(p)),
            _ => (s.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(format!("{s:?}: empty host"));
    }
    let port = match port {
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{s:?}: bad port {p:?}"))?,
        None => default_port,
    };
    Ok((host, port))
}

impl Args {
    /// Validates everything and reports all errors at once.
    pub fn validate(self) -> Result<Config, Vec<String>> {
        let mut errs = Vec::new();
        let mtu = self.mtu.get("mtu", &mut errs).unwrap_or(1400);
        let tun_offload = self
            .tun_offload
            .get("tun-offload", &mut errs)
            .unwrap_or(true);
        let masquerade = self.masquerade.get("masquerade", &mut errs).unwrap_or(true);
        let keepalive = self
            .keepalive
            .get("keepalive", &mut errs)
            .unwrap_or(Duration::from_secs(5));
        let dead_peer_timeout = self
            .dead_peer_timeout
            .get("dead-peer-timeout", &mut errs)
            .unwrap_or(Duration::from_secs(15));
        let dial_timeout = self
            .dial_timeout
            .get("dial-timeout", &mut errs)
            .unwrap_or(Duration::from_secs(10));
        let (endpoint_host, endpoint_port) =
            match self.endpoint.as_deref().map(|e| split_host_port(e, 8132)) {
                Some(Ok(hp)) => hp,
                Some(Err(e)) => {
                    errs.push(format!("--endpoint {e}"));
                    (String::new(), 0)
                }
                None => {
                    errs.push("--endpoint is required".into());
                    (String::new(), 0)
                }
            };
        let connect_target = self.connect_target.clone().unwrap_or_else(|| {
            if endpoint_host.contains(':') {
                format!("[{endpoint_host}]:1194")
            } else {
                format!("{endpoint_host}:1194")
            }
        });
        let bad_header = |s: &str| s.is_empty() || s.bytes().any(|b| b.is_ascii_control());
        if bad_header(&connect_target) || connect_target.contains(' ') {
            errs.push(format!(
                "--connect-target {connect_target:?}: not a valid target"
            ));
        }
        if bad_header(&self.header_name)
            || !self
                .header_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            errs.push(format!(
                "--header-name {:?}: not a valid header name",
                self.header_name
            ));
        }
        let header_values: Vec<String> = self
            .header_values
            .iter()
            .map(|v| v.trim().to_string())
            .collect();
        if header_values.is_empty() {
            errs.push("--header-value: give at least one".into());
        }
        for v in &header_values {
            if bad_header(v) {
                errs.push(format!(
                    "--header-value {v:?}: empty or has control characters"
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        for v in &header_values {
            if !seen.insert(v) {
                errs.push(format!("--header-value {v:?} given twice"));
            }
        }
        let server_public_key = self.server_public_key.clone().unwrap_or_default();
        if let Err(e) = common::keys::parse_public_key(&server_public_key) {
            errs.push(format!("--server-public-key: {e}"));
        }
        let private_key_file = self.private_key_file.clone().unwrap_or_default();
        if private_key_file.as_os_str().is_empty() {
            errs.push("--private-key-file is required".into());
        }
        let vpn_networks = common::config::vpn_networks(&self.vpn_network, &mut errs);
        common::config::tun(&self.tun_name, mtu, &mut errs);
        let metrics_listen =
            common::config::listen_addr("metrics-listen", &self.metrics_listen, &mut errs);
        common::config::liveness(keepalive, dead_peer_timeout, &mut errs);
        if dial_timeout.is_zero() {
            errs.push("--dial-timeout must be positive".into());
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        Ok(Config {
            endpoint_host,
            endpoint_port,
            connect_target,
            header_name: self.header_name,
            header_values,
            endpoint_tls: self.endpoint_tls.then_some(self.endpoint_ca),
            private_key_file,
            preshared_key_file: self.preshared_key_file,
            server_public_key,
            vpn_networks,
            tun_name: self.tun_name,
            mtu,
            tun_offload,
            masquerade,
            metrics_listen,
            keepalive,
            dead_peer_timeout,
            ready_when_all: self.ready_when == "all",
            dial_timeout,
            preamble_v2: self.preamble_version == "2",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port() {
        assert_eq!(split_host_port("a.b:1", 9).unwrap(), ("a.b".into(), 1));
        assert_eq!(split_host_port("a.b", 9).unwrap(), ("a.b".into(), 9));
        assert_eq!(split_host_port("[::1]:5", 9).unwrap(), ("::1".into(), 5));
        assert_eq!(split_host_port("[::1]", 9).unwrap(), ("::1".into(), 9));
        assert!(split_host_port("a:0", 9).is_err());
        assert!(split_host_port(":80", 9).is_err());
    }

    #[test]
    fn subcommands_need_no_flags() {
        let cli = Cli::try_parse_from(["vpn-shoot-client", "keygen"]).unwrap();
        assert!(matches!(cli.command, Some(Command::Keygen)));
    }

    #[test]
    fn default_target_and_all_errors() {
        let cli = Cli::try_parse_from([
            "vpn-shoot-client",
            "--endpoint",
            "api.example:8132",
            "--header-value",
            "vpn-seed-server",
            "--private-key-file",
            "/k",
            "--server-public-key",
            "bad",
            "--mtu",
            "70000",
            "--keepalive",
            "soon",
        ]);
        // Bad values are reported by validation, together with every other error.
        let errs = cli.unwrap().args.validate().unwrap_err().join("\n");
        assert!(errs.contains("--mtu \"70000\""), "{errs}");
        assert!(errs.contains("--keepalive \"soon\""), "{errs}");
        assert!(errs.contains("--server-public-key"), "{errs}");
        let cli = Cli::try_parse_from([
            "vpn-shoot-client",
            "--endpoint",
            "api.example:8132",
            "--header-value",
            "vpn-seed-server",
            "--private-key-file",
            "/k",
            "--server-public-key",
            "bad",
            "--mtu",
            "100",
        ])
        .unwrap();
        let errs = cli.args.validate().unwrap_err().join("\n");
        assert!(errs.contains("--server-public-key"), "{errs}");
        assert!(errs.contains("--mtu 100"), "{errs}");
    }
}
