//! Test PKI: a CA, the egress proxy's server certificate and kube-apiserver's client certificate.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// PEM files written by [`Pki::generate`].
#[derive(Debug, Clone)]
pub struct Pki {
    /// CA certificate (trust anchor for both sides).
    pub ca: PathBuf,
    /// Proxy server certificate: SAN 127.0.0.1, ::1, localhost, vpn-seed-server.
    pub server_cert: PathBuf,
    /// Proxy server key (mode 0600).
    pub server_key: PathBuf,
    /// Client certificate, CN kube-apiserver, clientAuth.
    pub client_cert: PathBuf,
    /// Client key (mode 0600).
    pub client_key: PathBuf,
}

/// Writes `contents` to `path` with mode 0600 (for keys).
pub fn write_secret(path: &Path, contents: &[u8]) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    f.write_all(contents)?;
    Ok(())
}

fn leaf(
    cn: &str,
    sans: &[&str],
    usage: ExtendedKeyUsagePurpose,
    ca: &Certificate,
    ca_key: &KeyPair,
) -> Result<(String, String)> {
    let mut params =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    params.extended_key_usages = vec![usage];
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, ca, ca_key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

impl Pki {
    /// Generates the CA and both leaf certificates into `dir`.
    pub fn generate(dir: &Path) -> Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "vpn-e2e-ca");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca = ca_params.self_signed(&ca_key)?;

        let (server_pem, server_key) = leaf(
            "vpn-seed-server",
            &["127.0.0.1", "::1", "localhost", "vpn-seed-server"],
            ExtendedKeyUsagePurpose::ServerAuth,
            &ca,
            &ca_key,
        )?;
        let (client_pem, client_key) = leaf(
            "kube-apiserver",
            &[],
            ExtendedKeyUsagePurpose::ClientAuth,
            &ca,
            &ca_key,
        )?;

        let pki = Self {
            ca: dir.join("ca.pem"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server-key.pem"),
            client_cert: dir.join("client.pem"),
            client_key: dir.join("client-key.pem"),
        };
        std::fs::write(&pki.ca, ca.pem())?;
        std::fs::write(&pki.server_cert, server_pem)?;
        write_secret(&pki.server_key, server_key.as_bytes())?;
        std::fs::write(&pki.client_cert, client_pem)?;
        write_secret(&pki.client_key, client_key.as_bytes())?;
        Ok(pki)
    }
}
