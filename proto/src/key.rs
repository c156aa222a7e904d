//! The cluster key: a secret shared by every host of one cluster, kept in a key file.
//!
//! Format: one line of hex, 32 to 64 bytes of key material. The file must not be readable by
//! group or others (mode 0600 or stricter), like an ssh private key.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::RngCore;

/// Errors reading or writing a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read key file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write key file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {path} is readable by group or others (mode {mode:o}); run chmod 600 {path}"
    )]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {path} does not hold a hex key of 32 to 64 bytes; make one with `wisp keygen {path}`")]
    Format { path: PathBuf },
}

/// A cluster key. Debug output never shows the secret.
#[derive(Clone)]
pub struct ClusterKey(Vec<u8>);

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClusterKey({} bytes)", self.0.len())
    }
}

impl ClusterKey {
    /// A fresh random 32-byte key.
    pub fn generate() -> Self {
        let mut k = vec![0u8; 32];
        rand::thread_rng().fill_bytes(&mut k);
        ClusterKey(k)
    }

    /// Key from raw bytes (tests and embedding).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        ClusterKey(bytes.to_vec())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// Load a key file, refusing one that group or others may read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let meta = fs::metadata(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.into(),
                mode,
            });
        }
        let text = fs::read_to_string(path).map_err(|source| KeyError::Read {
            path: path.into(),
            source,
        })?;
        let bytes = hex::decode(text.trim()).map_err(|_| KeyError::Format { path: path.into() })?;
        if !(32..=64).contains(&bytes.len()) {
            return Err(KeyError::Format { path: path.into() });
        }
        Ok(ClusterKey(bytes))
    }

    /// Write the key to a new file with mode 0600 (fails if the file exists).
    pub fn save(&self, path: &Path) -> Result<(), KeyError> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| KeyError::Write {
                path: path.into(),
                source,
            })?;
        writeln!(f, "{}", hex::encode(&self.0))
            .and_then(|_| f.sync_all())
            .map_err(|source| KeyError::Write {
                path: path.into(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = ClusterKey::generate();
        k.save(&p).unwrap();
        assert_eq!(ClusterKey::load(&p).unwrap().as_bytes(), k.as_bytes());
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        let e = ClusterKey::load(&p).unwrap_err();
        assert!(matches!(e, KeyError::Permissions { .. }), "{e}");
        fs::write(dir.path().join("bad"), "zz").unwrap();
        fs::set_permissions(dir.path().join("bad"), fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            ClusterKey::load(&dir.path().join("bad")),
            Err(KeyError::Format { .. })
        ));
    }
}
