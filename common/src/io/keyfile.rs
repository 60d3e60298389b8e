//! Key files: a private key, a pre-shared key, or a directory of allowed public keys (a
//! mounted Secret), parsed by [`crate::keys`]. A key file readable by others draws a warning
//! that names only the path.

use std::io::Read;
use std::path::Path;

use boringtun::x25519::{PublicKey, StaticSecret};

use crate::keys::{parse_key, KeyError, MAX_KEY_FILE_LEN, MAX_PEER_FILES};

/// Loads a private key file. Warns (naming only the path) when group or others may read it.
pub fn load_private_key(path: &Path) -> Result<StaticSecret, KeyError> {
    load_key_file(path).map(StaticSecret::from)
}

/// Loads a pre-shared key file (same format as a private key).
pub fn load_psk(path: &Path) -> Result<[u8; 32], KeyError> {
    load_key_file(path)
}

/// Reads the public keys of a peers directory: every file whose name does not start with `.`
/// (Kubernetes Secret volumes keep their bookkeeping in `..data` and friends; the visible
/// entries are symlinks to the files) holds one base64 public key. Returns (file name, key)
/// sorted by name.
pub fn load_public_keys_dir(dir: &Path) -> Result<Vec<(String, PublicKey)>, KeyError> {
    let (keys, bad) = read_public_keys_dir(dir)?;
    match bad.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(keys),
    }
}

/// Like [`load_public_keys_dir`], but a file that holds no valid key is reported (its error in
/// the second list) and skipped, and the rest are returned: what a watcher of a peers
/// directory keeps in force. Fails only when the directory cannot be listed.
#[allow(clippy::type_complexity)]
pub fn read_public_keys_dir(
    dir: &Path,
) -> Result<(Vec<(String, PublicKey)>, Vec<KeyError>), KeyError> {
    let io_err = |source| KeyError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let (mut keys, mut bad) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        if keys.len() + bad.len() == MAX_PEER_FILES {
            bad.push(KeyError::InFile {
                path: dir.to_path_buf(),
                reason: Box::new(KeyError::TooManyFiles),
            });
            break;
        }
        match read_key_file(&path, false) {
            Ok(key) => keys.push((name, PublicKey::from(key))),
            Err(e) => bad.push(e),
        }
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((keys, bad))
}

/// What changes when a peers directory changes: the visible entries' names, sizes and
/// modification times (following symlinks), and the target of a Secret volume's `..data`.
/// Cheap enough to compare every second.
pub fn dir_fingerprint(
    dir: &Path,
) -> std::io::Result<Vec<(String, u64, Option<std::time::SystemTime>)>> {
    let mut out = Vec::new();
    if let Ok(target) = std::fs::read_link(dir.join("..data")) {
        out.push((target.to_string_lossy().into_owned(), 0, None));
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || out.len() > MAX_PEER_FILES {
            continue;
        }
        // Follows symlinks; a dangling one counts with size 0.
        let meta = std::fs::metadata(entry.path()).ok();
        out.push((
            name,
            meta.as_ref().map_or(0, |m| m.len()),
            meta.and_then(|m| m.modified().ok()),
        ));
    }
    out.sort();
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
    use crate::keys::tests::{hex, PRIV_HEX, PUB_HEX};
    use crate::keys::{encode_public_key, generate_private_key, public_key_of};
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use std::io::Write;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

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
