//! The OpenVPN 2.6 reference plane, configured like the production reversed-VPN setup it
//! replaces: TCP, the client dialing through the same CONNECT ingress with a routing header,
//! AES-256-GCM, tun, `tls-auth`, `keepalive 10 60`, `connect-retry 1 5`, no `tcp-nodelay`.
//! Its PKI (EC P-256) and `tls-auth` key are generated into the run's directory.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

use crate::lab::{INGRESS, POD_NETWORKS};
use crate::netns::{self, Netns};
use crate::pki::write_secret;

/// OpenVPN server port in the seed (the product's server has 1194).
pub const SERVER_PORT: u16 = 1195;
/// Seed-side listen address.
pub const SERVER_IP: &str = "192.168.77.1";
/// Routing-header value under which the ingress forwards to the OpenVPN server.
pub const ROUTE_VALUE: &str = "openvpn";
/// OpenVPN's transfer network (the product uses 192.168.123.0/24).
pub const NET: &str = "192.168.124.0";
/// Seed-side TUN.
pub const SERVER_TUN: &str = "ovs0";
/// Shoot-side TUN.
pub const CLIENT_TUN: &str = "ovc0";

/// Configuration files of both ends.
#[derive(Debug, Clone)]
pub struct OpenVpn {
    /// Server configuration.
    pub server_conf: PathBuf,
    /// Client configuration.
    pub client_conf: PathBuf,
}

/// The ingress route that leads to the OpenVPN server (`value=host:port`).
pub fn ingress_route() -> String {
    format!("{ROUTE_VALUE}={SERVER_IP}:{SERVER_PORT}")
}

fn leaf(
    cn: &str,
    usage: ExtendedKeyUsagePurpose,
    ca: &rcgen::Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String)> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.extended_key_usages = vec![usage];
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyAgreement,
    ];
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes PKI, `tls-auth` key and both configurations into `dir` (created).
/// `nodelay` adds `tcp-nodelay` (not in production configurations).
pub fn prepare(dir: &Path, nodelay: bool) -> Result<OpenVpn> {
    std::fs::create_dir_all(dir.join("ccd"))?;
    let mut ca_p = CertificateParams::new(Vec::<String>::new())?;
    ca_p.distinguished_name
        .push(DnType::CommonName, "vpn-bench-openvpn-ca");
    ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca = ca_p.self_signed(&ca_key)?;
    let (scrt, skey) = leaf(
        "vpn-seed-server",
        ExtendedKeyUsagePurpose::ServerAuth,
        &ca,
        &ca_key,
    )?;
    let (ccrt, ckey) = leaf(
        "vpn-shoot-client",
        ExtendedKeyUsagePurpose::ClientAuth,
        &ca,
        &ca_key,
    )?;
    std::fs::write(dir.join("ca.crt"), ca.pem())?;
    std::fs::write(dir.join("server.crt"), scrt)?;
    write_secret(&dir.join("server.key"), skey.as_bytes())?;
    std::fs::write(dir.join("client.crt"), ccrt)?;
    write_secret(&dir.join("client.key"), ckey.as_bytes())?;
    let ta = dir.join("ta.key");
    netns::run(
        Command::new("openvpn")
            .arg("--genkey")
            .arg("secret")
            .arg(&ta),
    )
    .context("openvpn --genkey")?;

    // The client's pod networks are routed to it (iroute) and to the server TUN (route).
    let mut iroutes = String::new();
    let mut routes = String::new();
    for net in POD_NETWORKS.split(',').filter(|n| !n.contains(':')) {
        let (addr, mask) = v4_net(net)?;
        iroutes.push_str(&format!("iroute {addr} {mask}\n"));
        routes.push_str(&format!("route {addr} {mask}\n"));
    }
    std::fs::write(dir.join("ccd").join("vpn-shoot-client"), iroutes)?;
    let d = dir.display();
    let nodelay = if nodelay { "tcp-nodelay\n" } else { "" };
    let server = format!(
        "dev {SERVER_TUN}\ndev-type tun\nproto tcp4-server\nlocal {SERVER_IP}\nport {SERVER_PORT}\n\
         topology subnet\nserver {NET} 255.255.255.0\nclient-config-dir {d}/ccd\n{routes}\
         keepalive 10 60\ntxqueuelen 1000\n{nodelay}ca {d}/ca.crt\ncert {d}/server.crt\n\
         key {d}/server.key\ndh none\nauth SHA256\ntls-auth {d}/ta.key 0\n\
         data-ciphers AES-256-GCM\ndisable-dco\nverb 3\n"
    );
    let (ingress_host, ingress_port) = INGRESS.split_once(':').context("ingress address")?;
    let client = format!(
        "client\ndev {CLIENT_TUN}\ndev-type tun\nproto tcp4-client\nremote {SERVER_IP} {SERVER_PORT}\n\
         http-proxy {ingress_host} {ingress_port}\nhttp-proxy-option VERSION 1.1\n\
         http-proxy-option CUSTOM-HEADER Reversed-VPN {ROUTE_VALUE}\nnobind\nconnect-retry 1 5\n\
         txqueuelen 1000\nremote-cert-tls server\nca {d}/ca.crt\ncert {d}/client.crt\n\
         key {d}/client.key\nauth SHA256\ntls-auth {d}/ta.key 1\ndata-ciphers AES-256-GCM\n\
         disable-dco\nverb 3\n"
    );
    let files = OpenVpn {
        server_conf: dir.join("server.conf"),
        client_conf: dir.join("client.conf"),
    };
    std::fs::write(&files.server_conf, server)?;
    std::fs::write(&files.client_conf, client)?;
    Ok(files)
}

/// `a.b.c.d/len` → (`a.b.c.d`, dotted mask).
fn v4_net(cidr: &str) -> Result<(String, String)> {
    let (addr, len) = cidr.split_once('/').context("CIDR without /")?;
    let len: u32 = len.parse().context("prefix length")?;
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - len.min(32))
    };
    Ok((addr.to_owned(), std::net::Ipv4Addr::from(mask).to_string()))
}

impl OpenVpn {
    /// Arguments of the server process.
    pub fn server_args(&self) -> Vec<String> {
        vec!["--config".into(), self.server_conf.display().to_string()]
    }

    /// Arguments of the client process.
    pub fn client_args(&self) -> Vec<String> {
        vec!["--config".into(), self.client_conf.display().to_string()]
    }
}

/// Shoot-side NAT for OpenVPN's transfer network toward the pod (the product installs its
/// own for 192.168.123.0/24), and forwarding on.
/// The rules file goes into `dir`.
pub fn shoot_nat(shoot: &Netns, pod_if: &str, dir: &Path) -> Result<()> {
    shoot.sysctl("net.ipv4.ip_forward", "1")?;
    let rules = format!(
        "table ip vpn_bench_ovpn {{\n chain post {{\n  type nat hook postrouting priority srcnat; policy accept;\n  \
         ip saddr {NET}/24 oifname \"{pod_if}\" masquerade\n }}\n}}\n"
    );
    let file = dir.join("shoot-nat.nft");
    std::fs::write(&file, rules)?;
    shoot
        .run("nft", &["-f", &file.display().to_string()])
        .map(drop)
        .context("install OpenVPN masquerade")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(
            v4_net("100.96.0.0/16").unwrap(),
            ("100.96.0.0".into(), "255.255.0.0".into())
        );
        assert_eq!(v4_net("0.0.0.0/0").unwrap().1, "0.0.0.0");
    }
}
