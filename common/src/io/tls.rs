//! TLS configuration from PEM files: the egress proxy's server side (client certificates
//! required) with reload on file change, and the shoot client's optional TLS to the ingress.
//!
//! Reload compares a digest of the file *contents*, so Kubernetes Secret updates (an atomic
//! swap of the `..data` symlink) are seen like any other change.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// Upper bound for any PEM file we read.
const MAX_PEM_FILE: u64 = 1 << 20;

/// Errors loading TLS material. Messages name the file, never its contents.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is larger than {MAX_PEM_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} holds no PEM {what}")]
    Empty { path: PathBuf, what: &'static str },
    #[error("{path}: invalid PEM: {source}")]
    Pem {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client CA {path}: {reason}")]
    ClientCa { path: PathBuf, reason: String },
}

fn read_bounded(path: &Path) -> Result<Vec<u8>, TlsError> {
    let err = |source| TlsError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if meta.len() > MAX_PEM_FILE {
        return Err(TlsError::TooLarge {
            path: path.to_owned(),
        });
    }
    std::fs::read(path).map_err(err)
}

fn parse_certs(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.to_owned(),
            what: "certificate",
        });
    }
    Ok(certs)
}

/// Reads all certificates of a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    parse_certs(path, &read_bounded(path)?)
}

/// Reads the first private key (PKCS#8, PKCS#1 or SEC1) of a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_bounded(path)?;
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::Empty {
            path: path.to_owned(),
            what: "private key",
        })
}

fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in load_certs(path)? {
        store.add(cert).map_err(|e| TlsError::ClientCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(store)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The server's suites in its order of preference: AES-128-GCM with SHA-256 first (what Go
/// clients such as kube-apiserver prefer on hardware with AES instructions; its key schedule
/// costs less than SHA-384's), then the provider's others.
fn server_provider() -> Arc<rustls::crypto::CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(p)
}

/// Paths of the egress proxy's TLS material.
#[derive(Clone, Debug)]
pub struct ServerTlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

impl ServerTlsFiles {
    fn digest(&self) -> Result<u64, TlsError> {
        let mut h = DefaultHasher::new();
        for p in [&self.cert, &self.key, &self.client_ca] {
            read_bounded(p)?.hash(&mut h);
        }
        Ok(h.finish())
    }

    /// Builds a server configuration that requires a client certificate signed by `client_ca`.
    pub fn server_config(&self) -> Result<Arc<ServerConfig>, TlsError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots(&self.client_ca)?),
            provider(),
        )
        .build()
        .map_err(|e| TlsError::ClientCa {
            path: self.client_ca.clone(),
            reason: e.to_string(),
        })?;
        let mut cfg = ServerConfig::builder_with_provider(server_provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(load_certs(&self.cert)?, load_key(&self.key)?)?;
        cfg.ignore_client_order = true;
        Ok(Arc::new(cfg))
    }
}

/// A server configuration that is rebuilt when its files change. Connections already accepted
/// keep the configuration they were accepted with.
pub struct ReloadingServerConfig {
    files: ServerTlsFiles,
    current: RwLock<(u64, Arc<ServerConfig>)>,
}

impl ReloadingServerConfig {
    /// Loads the files once; errors here are fatal configuration errors.
    pub fn new(files: ServerTlsFiles) -> Result<Self, TlsError> {
        let digest = files.digest()?;
        let cfg = files.server_config()?;
        Ok(Self {
            files,
            current: RwLock::new((digest, cfg)),
        })
    }

    /// The configuration for the next accepted connection.
    pub fn current(&self) -> Arc<ServerConfig> {
        match self.current.read() {
            Ok(g) => g.1.clone(),
            Err(poisoned) => poisoned.into_inner().1.clone(),
        }
    }

    /// Reloads if the files' contents changed. Returns `Ok(true)` when a new configuration was
    /// installed; on error the previous configuration stays in force.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let digest = self.files.digest()?;
        let old = match self.current.read() {
            Ok(g) => g.0,
            Err(poisoned) => poisoned.into_inner().0,
        };
        if digest == old {
            return Ok(false);
        }
        let cfg = self.files.server_config()?;
        let mut g = match self.current.write() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        *g = (digest, cfg);
        Ok(true)
    }
}

/// Client configuration for TLS to the ingress, trusting the CAs in `ca_file`.
pub fn client_config(ca_file: &Path) -> Result<Arc<ClientConfig>, TlsError> {
    let cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca_file)?)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pki(dir: &Path) -> ServerTlsFiles {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(vec![]).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        let files = ServerTlsFiles {
            cert: dir.join("tls.crt"),
            key: dir.join("tls.key"),
            client_ca: dir.join("ca.crt"),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.client_ca, ca.pem()).unwrap();
        files
    }

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tls-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn loads_and_reloads_on_change() {
        let dir = tempdir("reload");
        let files = write_pki(&dir);
        let cfg = ReloadingServerConfig::new(files.clone()).unwrap();
        assert!(!cfg.reload_if_changed().unwrap());
        let before = cfg.current();
        write_pki(&dir);
        assert!(cfg.reload_if_changed().unwrap());
        assert!(!Arc::ptr_eq(&before, &cfg.current()));
        // A broken file keeps the old configuration.
        std::fs::write(&files.key, "garbage").unwrap();
        assert!(cfg.reload_if_changed().is_err());
        let _still = cfg.current();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn errors_name_the_file() {
        let dir = tempdir("errors");
        let missing = dir.join("nope.pem");
        let e = load_certs(&missing).unwrap_err().to_string();
        assert!(e.contains("nope.pem"), "{e}");
        std::fs::write(&missing, "not pem").unwrap();
        let e = load_certs(&missing).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
