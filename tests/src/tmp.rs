//! Per-lab temporary directory, removed on drop (kept, minus bulky `*.bin` files, on panic).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// A directory under the system temp dir owned by one test or lab run.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
    keep: bool,
}

impl TempDir {
    /// Creates `<tmp>/vpn-<tag>`; fails if it already exists (tags are unique per run).
    pub fn new(tag: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("vpn-{tag}"));
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path, keep: false })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Keeps the directory after drop (lab `--keep`).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if std::thread::panicking() {
            remove_bin_files(&self.path, 2);
            eprintln!("test files and logs kept in {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Removes `*.bin` files under `dir`, descending at most `depth` levels.
fn remove_bin_files(dir: &Path, depth: u32) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() && depth > 0 {
            remove_bin_files(&p, depth - 1);
        } else if p.extension().is_some_and(|x| x == "bin") {
            let _ = std::fs::remove_file(&p);
        }
    }
}
