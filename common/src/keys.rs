//! WireGuard key files: 32 bytes in standard base64, compatible with `wg genkey` / `wg pubkey`.
//!
//! Errors describe what is wrong with a key but never contain key material.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use boringtun::x25519::{PublicKey, StaticSecret};
use rand::RngCore;

/// Largest key file we read (a key is 44 characters; the rest is slack for whitespace).
pub const MAX_KEY_FILE_LEN: u64 = 4096;

/// Error while parsing or loading a key.
#[derive(thiserror::Error, Debug)]
pub enum KeyError {
    /// The key text is empty (after trimming whitespace).
    #[error("key is empty")]
    Empty,
    /// The key text is far longer than a base64 key.
    #[error("key text is too long ({0} characters, a key has 44)")]
    TooLong(usize),
    /// The key text is not standard base64.
    #[error("key is not valid base64")]
    Base64,
    /// The key decodes to the wrong number of bytes.
    #[error("key decodes to {0} bytes, expected 32")]
    Length(usize),
    /// The key file cannot be read.
    #[error("cannot read key file {}: {source}", path.display())]
    Io {
        /// File path.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The key file is larger than [`MAX_KEY_FILE_LEN`].
    #[error("key file {} is too large (more than {MAX_KEY_FILE_LEN} bytes)", path.display())]
    FileTooLarge {
        /// File path.
        path: PathBuf,
    },
    /// A peers directory holds more than [`MAX_PEER_FILES`] files.
    #[error("more than {MAX_PEER_FILES} key files")]
    TooManyFiles,
    /// The key file's content is not a valid key.
    #[error("key file {}: {reason}", path.display())]
    InFile {
        /// File path.
        path: PathBuf,
        /// What is wrong with the content.
        reason: Box<KeyError>,
    },
}

/// Generates a new private key (random, clamped like `wg genkey`), base64 without newline.
pub fn generate_private_key() -> String {
    let mut key = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut key);
    key[0] &= 248;
    key[31] &= 127;
    key[31] |= 64;
    STANDARD.encode(key)
}

/// Public key (base64) of a base64 private key, like `wg pubkey`.
pub fn public_key_of(private_b64: &str) -> Result<String, KeyError> {
    let secret = StaticSecret::from(parse_key(private_b64)?);
    Ok(STANDARD.encode(PublicKey::from(&secret).as_bytes()))
}

/// Parses a base64 key (surrounding whitespace ignored) into exactly 32 bytes.
pub fn parse_key(b64: &str) -> Result<[u8; 32], KeyError> {
    let text = b64.trim();
    if text.is_empty() {
        return Err(KeyError::Empty);
    }
    if text.len() > 256 {
        return Err(KeyError::TooLong(text.len()));
    }
    let bytes = STANDARD.decode(text).map_err(|_| KeyError::Base64)?;
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| KeyError::Length(bytes.len()))
}

/// Parses a base64 public key.
pub fn parse_public_key(b64: &str) -> Result<PublicKey, KeyError> {
    parse_key(b64).map(PublicKey::from)
}

/// Encodes a public key as base64 (for logs and messages).
pub fn encode_public_key(key: &PublicKey) -> String {
    STANDARD.encode(key.as_bytes())
}

/// Loads a private key file. Warns (naming only the path) when group or others may read it.
pub fn load_private_key(path: &Path) -> Result<StaticSecret, KeyError> {
    load_key_file(path).map(StaticSecret::from)
}

/// Loads a pre-shared key file (same format as a private key).
pub fn load_psk(path: &Path) -> Result<[u8; 32], KeyError> {
    load_key_file(path)
}

/// Upper bound on the files of a peers directory.
pub const MAX_PEER_FILES: usize = 1024;

/// Reads the public keys of a peers directory: every file whose name does not start with `.`
/// (Kubernetes Secret volumes keep their bookkeeping in `..data` and friends; the visible
/// entries are symlinks to the files) holds one base64 public key. Returns (file name, key)
/// sorted by name.
pub fn load_public_keys_dir(dir: &Path) -> Result<Vec<(String, PublicKey)>, KeyError> {
    let io_err = |source| KeyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        // Follows symlinks, so Secret volume entries count as files.
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        if out.len() == MAX_PEER_FILES {
            return Err(KeyError::InFile {
                path: dir.to_path_buf(),
                reason: Box::new(KeyError::TooManyFiles),
            });
        }
        let key = read_key_file(&path, false)?;
        out.push((name, PublicKey::from(key)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn load_key_file(path: &Path) -> Result<[u8; 32], KeyError> {
    read_key_file(path, true)
}

fn read_key_file(path: &Path, secret: bool) -> Result<[u8; 32], KeyError> {
    let io_err = |source| KeyError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io_err)?;
    let meta = file.metadata().map_err(io_err)?;
    if secret {
        warn_if_readable_by_others(path, &meta);
    }
    let mut text = String::new();
    file.take(MAX_KEY_FILE_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| {
            if e.kind() == std::io::ErrorKind::InvalidData {
                KeyError::InFile {
                    path: path.to_path_buf(),
                    reason: Box::new(KeyError::Base64),
                }
            } else {
                io_err(e)
            }
        })?;
    if text.len() as u64 > MAX_KEY_FILE_LEN {
        return Err(KeyError::FileTooLarge {
            path: path.to_path_buf(),
        });
    }
    parse_key(&text).map_err(|reason| KeyError::InFile {
        path: path.to_path_buf(),
        reason: Box::new(reason),
    })
}

#[cfg(unix)]
fn warn_if_readable_by_others(path: &Path, meta: &std::fs::Metadata) {
    use std::os::unix::fs::PermissionsExt;
    // Group access is how Kubernetes Secret volumes with an fsGroup share a file with a
    // non-root container (mode 0440); only access for others is worth a warning.
    let mode = meta.permissions().mode();
    if mode & 0o007 != 0 {
        tracing::warn!(
            path = %path.display(),
            mode = format_args!("{:o}", mode & 0o777),
            "key file is accessible by others"
        );
    }
}

#[cfg(not(unix))]
fn warn_if_readable_by_others(_path: &Path, _meta: &std::fs::Metadata) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    // RFC 7748 section 6.1 (Alice).
    const PRIV_HEX: &str = "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a";
    const PUB_HEX: &str = "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("keys-test-{}-{name}", std::process::id()))
    }

    fn write_file(path: &Path, content: &[u8], mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let mut f = std::fs::File::create(path).unwrap();
        f.write_all(content).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn known_vector() {
        let private = STANDARD.encode(hex(PRIV_HEX));
        let public = public_key_of(&format!("  {private}\n")).unwrap();
        assert_eq!(public, STANDARD.encode(hex(PUB_HEX)));
        assert_eq!(
            parse_public_key(&public).unwrap().as_bytes().as_slice(),
            hex(PUB_HEX)
        );
    }

    #[test]
    fn generated_keys_are_clamped_and_match_wg() {
        let k = generate_private_key();
        assert_eq!(k.len(), 44);
        assert!(!k.ends_with('\n'));
        let bytes = parse_key(&k).unwrap();
        assert_eq!(bytes[0] & 7, 0);
        assert_eq!(bytes[31] & 0xc0, 0x40);
        let ours = public_key_of(&k).unwrap();
        // Compare with the reference tool when it is installed.
        let wg = std::process::Command::new("wg")
            .arg("pubkey")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn();
        if let Ok(mut child) = wg {
            child.stdin.take().unwrap().write_all(k.as_bytes()).unwrap();
            let out = child.wait_with_output().unwrap();
            assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), ours);
        }
    }

    #[test]
    fn bad_keys() {
        assert!(matches!(parse_key(" \n"), Err(KeyError::Empty)));
        assert!(matches!(parse_key("AAAA"), Err(KeyError::Length(3))));
        let long = STANDARD.encode([7u8; 33]);
        assert!(matches!(parse_key(&long), Err(KeyError::Length(33))));
        let bad = "secretsecret!secretsecretsecretsecretsecret=";
        let err = parse_key(bad).unwrap_err();
        assert!(matches!(err, KeyError::Base64));
        assert!(!err.to_string().contains("secret"));
        assert!(matches!(
            parse_key(&"A".repeat(1000)),
            Err(KeyError::TooLong(1000))
        ));
    }

    #[test]
    fn load_files() {
        let good = temp_path("good");
        let private = STANDARD.encode(hex(PRIV_HEX));
        write_file(&good, format!("{private}\n").as_bytes(), 0o600);
        let secret = load_private_key(&good).unwrap();
        assert_eq!(PublicKey::from(&secret).as_bytes().as_slice(), hex(PUB_HEX));
        assert_eq!(load_psk(&good).unwrap().as_slice(), hex(PRIV_HEX));

        let big = temp_path("big");
        write_file(&big, &vec![b'A'; 5000], 0o600);
        assert!(matches!(
            load_private_key(&big),
            Err(KeyError::FileTooLarge { .. })
        ));

        let bad = temp_path("bad");
        write_file(&bad, b"not a key at all", 0o600);
        let err = load_private_key(&bad).err().unwrap();
        assert!(matches!(err, KeyError::InFile { .. }));
        assert!(err.to_string().contains(&bad.display().to_string()));
        assert!(!err.to_string().contains("not a key"));

        let missing = temp_path("missing");
        assert!(matches!(
            load_private_key(&missing),
            Err(KeyError::Io { .. })
        ));
        for p in [good, big, bad] {
            std::fs::remove_file(p).unwrap();
        }
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn permission_warning_names_path_only() {
        let private = STANDARD.encode(hex(PRIV_HEX));
        let open = temp_path("open");
        write_file(&open, private.as_bytes(), 0o644);
        let closed = temp_path("closed");
        write_file(&closed, private.as_bytes(), 0o600);

        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            load_private_key(&closed).unwrap();
        });
        assert!(capture.0.lock().unwrap().is_empty());

        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            load_private_key(&open).unwrap();
        });
        let logged = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
        assert!(logged.contains("WARN"), "{logged}");
        assert!(logged.contains(&open.display().to_string()));
        assert!(logged.contains("644"));
        assert!(!logged.contains(&private));
        std::fs::remove_file(open).unwrap();
        std::fs::remove_file(closed).unwrap();
    }

    #[test]
    fn peers_dir_like_a_secret_volume() {
        let dir = temp_path("peers");
        let _ = std::fs::remove_dir_all(&dir);
        let data = dir.join("..2026_11_22");
        std::fs::create_dir_all(&data).unwrap();
        let a = public_key_of(&generate_private_key()).unwrap();
        let b = public_key_of(&generate_private_key()).unwrap();
        std::fs::write(data.join("vpn-shoot-1"), format!("{b}\n")).unwrap();
        std::fs::write(data.join("vpn-shoot-0"), &a).unwrap();
        std::os::unix::fs::symlink("..2026_11_22", dir.join("..data")).unwrap();
        for n in ["vpn-shoot-0", "vpn-shoot-1"] {
            std::os::unix::fs::symlink(format!("..data/{n}"), dir.join(n)).unwrap();
        }
        let keys = load_public_keys_dir(&dir).unwrap();
        let got: Vec<_> = keys
            .iter()
            .map(|(n, k)| (n.as_str(), encode_public_key(k)))
            .collect();
        assert_eq!(got, vec![("vpn-shoot-0", a), ("vpn-shoot-1", b)]);

        std::fs::write(data.join("bad"), "not a key").unwrap();
        std::os::unix::fs::symlink("..data/bad", dir.join("bad")).unwrap();
        let err = load_public_keys_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("bad"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(load_public_keys_dir(&dir).is_err());
    }
}
