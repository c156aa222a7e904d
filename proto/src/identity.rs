//! Per-host identity: every host has its own Ed25519 key pair, enrolled with the cluster.
//!
//! The cluster key (the foundation's shared secret, [`crate::key::ClusterKey`]) is no longer
//! what a connection proves: it is only the *enrollment secret*. From it, anyone who holds it
//! derives the cluster's enrollment authority, an Ed25519 key pair
//! (seed = HMAC-SHA256(cluster key, "wisp-enrollment-authority-v1")). Enrolling a host
//! (`wisp enroll`) means the authority signs a [`Certificate`] binding the host's name to its
//! public key. Every host keeps, in its identity directory (mode 0700):
//!
//! ```text
//! host.key       the host's Ed25519 private key (PKCS#8, hex), mode 0600
//! host.cert      its enrollment certificate (hex): name, public key, issue time, authority signature
//! authority.pub  the cluster authority's public key (hex): the trust anchor
//! revoked        the signed revocation list (optional; may be a symlink to a shared copy)
//! ```
//!
//! A host that has been enrolled does not need the cluster key any more. Any server or agent
//! checks a peer's enrollment without asking anyone: the certificate must carry the
//! authority's signature, and no entry of the revocation list may cover it. `wisp revoke HOST`
//! (again with the cluster key) appends an authority-signed [`Revocation`] to the list: every
//! certificate issued to HOST up to that moment is dead. Each daemon re-reads its list when the
//! file changes ([`Identity::revocation_of`] checks its identity, size and mtime, at every
//! handshake and every [`REVOCATION_CHECK`] on live connections), so a revoked host's new
//! connections are refused at once and its open ones are closed within
//! [`REVOCATION_CHECK`] plus one check.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::key::ClusterKey;

/// How often live connections re-check their peer against the revocation list.
pub const REVOCATION_CHECK: Duration = Duration::from_secs(1);

/// Longest host name, in bytes.
pub const MAX_HOST_NAME: usize = 64;

const CERT_LABEL: &[u8] = b"wisp-enrollment-certificate-v1";
const REVOKE_LABEL: &[u8] = b"wisp-revocation-v1";

/// Errors loading, creating or writing identity files.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); run chmod 600 {path}")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("{path} is not a valid {what}")]
    Format { path: PathBuf, what: &'static str },
    #[error("this host is not enrolled: {dir}/host.cert is missing; run `wisp enroll --cluster-key FILE --identity {dir}`")]
    NotEnrolled { dir: PathBuf },
    #[error("{0}")]
    Invalid(String),
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Check a host name: 1 to [`MAX_HOST_NAME`] bytes of letters, digits, '-', '_' and '.'.
pub fn check_host_name(name: &str) -> Result<(), IdentityError> {
    if name.is_empty()
        || name.len() > MAX_HOST_NAME
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(IdentityError::Invalid(format!(
            "host name {name:?} must be 1-{MAX_HOST_NAME} letters, digits, '-', '_' or '.'"
        )));
    }
    Ok(())
}

/// An authority-signed binding of a host name to a host public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub name: String,
    pub host_key: [u8; 32],
    /// Milliseconds since the epoch when the authority signed it.
    pub issued_ms: u64,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Certificate {
    fn signed_bytes(name: &str, host_key: &[u8; 32], issued_ms: u64) -> Vec<u8> {
        let mut v = CERT_LABEL.to_vec();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(host_key);
        v.extend_from_slice(&issued_ms.to_le_bytes());
        v
    }

    /// Whether `authority` signed this certificate.
    pub fn verify(&self, authority: &[u8; 32]) -> bool {
        UnparsedPublicKey::new(&ED25519, authority)
            .verify(
                &Self::signed_bytes(&self.name, &self.host_key, self.issued_ms),
                &self.signature,
            )
            .is_ok()
    }

    pub fn to_hex(&self) -> String {
        hex::encode(postcard::to_allocvec(self).expect("certificate encodes"))
    }

    pub fn from_hex(s: &str) -> Option<Self> {
        postcard::from_bytes(&hex::decode(s.trim()).ok()?).ok()
    }
}

/// "Every certificate of `name` issued at or before `before_ms` is revoked", signed by the
/// authority.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub name: String,
    pub before_ms: u64,
    #[serde(with = "serde_bytes")]
    pub signature: Vec<u8>,
}

impl Revocation {
    fn signed_bytes(name: &str, before_ms: u64) -> Vec<u8> {
        let mut v = REVOKE_LABEL.to_vec();
        v.extend_from_slice(&(name.len() as u32).to_le_bytes());
        v.extend_from_slice(name.as_bytes());
        v.extend_from_slice(&before_ms.to_le_bytes());
        v
    }

    pub fn verify(&self, authority: &[u8; 32]) -> bool {
        UnparsedPublicKey::new(&ED25519, authority)
            .verify(
                &Self::signed_bytes(&self.name, self.before_ms),
                &self.signature,
            )
            .is_ok()
    }

    pub fn covers(&self, cert: &Certificate) -> bool {
        self.name == cert.name && cert.issued_ms <= self.before_ms
    }
}

/// The cluster's enrollment authority, derived from the cluster key.
pub struct Authority {
    pair: Ed25519KeyPair,
}

impl Authority {
    pub fn from_cluster_key(key: &ClusterKey) -> Self {
        let mut m =
            Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac takes any key length");
        m.update(b"wisp-enrollment-authority-v1");
        let seed: [u8; 32] = m.finalize().into_bytes().into();
        Authority {
            pair: Ed25519KeyPair::from_seed_unchecked(&seed).expect("32-byte seed"),
        }
    }

    pub fn public(&self) -> [u8; 32] {
        self.pair
            .public_key()
            .as_ref()
            .try_into()
            .expect("ed25519 key")
    }

    /// Enroll `host_key` under `name`.
    pub fn issue(&self, name: &str, host_key: &[u8; 32]) -> Result<Certificate, IdentityError> {
        check_host_name(name)?;
        // Strictly after any revocation signed in this same millisecond.
        std::thread::sleep(Duration::from_millis(2));
        let issued_ms = now_ms();
        let sig = self
            .pair
            .sign(&Certificate::signed_bytes(name, host_key, issued_ms));
        Ok(Certificate {
            name: name.into(),
            host_key: *host_key,
            issued_ms,
            signature: sig.as_ref().to_vec(),
        })
    }

    /// Revoke every certificate issued to `name` so far.
    pub fn revoke(&self, name: &str) -> Result<Revocation, IdentityError> {
        check_host_name(name)?;
        let before_ms = now_ms();
        std::thread::sleep(Duration::from_millis(2));
        let sig = self.pair.sign(&Revocation::signed_bytes(name, before_ms));
        Ok(Revocation {
            name: name.into(),
            before_ms,
            signature: sig.as_ref().to_vec(),
        })
    }
}

fn read(path: &Path) -> Result<String, IdentityError> {
    fs::read_to_string(path).map_err(|source| IdentityError::Read {
        path: path.into(),
        source,
    })
}

/// Write `text` to `path` atomically (temporary file, then rename) with `mode`.
fn write_atomic(path: &Path, text: &str, mode: u32) -> Result<(), IdentityError> {
    let err = |source| IdentityError::Write {
        path: path.into(),
        source,
    };
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(err)?;
    fs::rename(&tmp, path).map_err(err)
}

/// The host key file of identity directory `dir`.
pub fn host_key_path(dir: &Path) -> PathBuf {
    dir.join("host.key")
}

/// Load the host key of `dir`, creating the directory (0700) and a fresh key (0600) if there
/// is none yet. Returns the key pair and whether it was created.
pub fn load_or_create_host_key(dir: &Path) -> Result<(Ed25519KeyPair, bool), IdentityError> {
    let path = host_key_path(dir);
    if path.exists() {
        return load_host_key(&path).map(|k| (k, false));
    }
    fs::create_dir_all(dir).map_err(|source| IdentityError::Write {
        path: dir.into(),
        source,
    })?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map_err(|_| IdentityError::Invalid("cannot generate a host key".into()))?;
    write_atomic(&path, &format!("{}\n", hex::encode(pkcs8.as_ref())), 0o600)?;
    load_host_key(&path).map(|k| (k, true))
}

/// The public key of the host key of `dir` (made if missing), and whether it was made now.
pub fn host_public_key(dir: &Path) -> Result<([u8; 32], bool), IdentityError> {
    load_or_create_host_key(dir).map(|(p, made)| (public_of(&p), made))
}

fn load_host_key(path: &Path) -> Result<Ed25519KeyPair, IdentityError> {
    let meta = fs::metadata(path).map_err(|source| IdentityError::Read {
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(IdentityError::Permissions {
            path: path.into(),
            mode,
        });
    }
    let bytes = hex::decode(read(path)?.trim()).map_err(|_| IdentityError::Format {
        path: path.into(),
        what: "host key (hex PKCS#8 Ed25519)",
    })?;
    Ed25519KeyPair::from_pkcs8(&bytes).map_err(|_| IdentityError::Format {
        path: path.into(),
        what: "host key (hex PKCS#8 Ed25519)",
    })
}

fn public_of(pair: &Ed25519KeyPair) -> [u8; 32] {
    pair.public_key().as_ref().try_into().expect("ed25519 key")
}

/// Enroll the host of identity directory `dir` as `name`, with the cluster key: make its host
/// key if needed, and write its certificate and the authority's public key.
pub fn enroll(dir: &Path, name: &str, key: &ClusterKey) -> Result<Certificate, IdentityError> {
    let (pair, _) = load_or_create_host_key(dir)?;
    let authority = Authority::from_cluster_key(key);
    let cert = authority.issue(name, &public_of(&pair))?;
    write_atomic(
        &dir.join("host.cert"),
        &format!("{}\n", cert.to_hex()),
        0o644,
    )?;
    write_atomic(
        &dir.join("authority.pub"),
        &format!("{}\n", hex::encode(authority.public())),
        0o644,
    )?;
    Ok(cert)
}

/// Append a revocation of `name` to the revocation list at `list` (following a symlink, so a
/// shared list stays shared). The list keeps one hex entry per line.
pub fn revoke(list: &Path, name: &str, key: &ClusterKey) -> Result<Revocation, IdentityError> {
    let target = match fs::read_link(list) {
        Ok(t) if t.is_absolute() => t,
        Ok(t) => list.parent().unwrap_or(Path::new("/")).join(t),
        Err(_) => list.to_path_buf(),
    };
    let r = Authority::from_cluster_key(key).revoke(name)?;
    let mut text = match fs::read_to_string(&target) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(IdentityError::Read {
                path: target,
                source,
            })
        }
    };
    if !text.is_empty() && !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&hex::encode(postcard::to_allocvec(&r).expect("encodes")));
    text.push('\n');
    write_atomic(&target, &text, 0o644)?;
    Ok(r)
}

/// Lower-case hex of `bytes` (how keys are printed).
pub fn hex(bytes: &[u8]) -> String {
    hex::encode(bytes)
}

/// A throwaway cluster for tests and benchmarks: a fresh cluster key, and `names` enrolled
/// with it in identity directories under a new temporary directory (left behind, small).
pub fn throwaway_cluster(names: &[&str]) -> Result<Vec<Identity>, IdentityError> {
    use rand::RngCore;
    let root = std::env::temp_dir().join(format!(
        "wisp-ids-{}-{:x}",
        std::process::id(),
        rand::thread_rng().next_u64()
    ));
    let key = ClusterKey::generate();
    names
        .iter()
        .map(|n| {
            enroll(&root.join(n), n, &key)?;
            Identity::load(&root.join(n))
        })
        .collect()
}

/// One host of a [`throwaway_cluster`].
pub fn throwaway(name: &str) -> Identity {
    throwaway_cluster(&[name])
        .expect("temporary identity")
        .remove(0)
}

/// Why a peer's certificate is not accepted.
pub fn describe_rejection(cert: Option<&Certificate>, claimed: &str, why: &str) -> String {
    match cert {
        None => format!(
            "host {claimed:?} is not enrolled in this cluster (no certificate); run `wisp enroll` on it"
        ),
        Some(_) => format!("host {claimed:?} rejected: {why}"),
    }
}

#[derive(Default)]
struct ListCache {
    /// (device, inode, size, mtime ns) of the file last parsed; `None` if it did not exist.
    stamp: Option<(u64, u64, u64, i128)>,
    loaded: bool,
    entries: Vec<Revocation>,
}

struct Inner {
    dir: PathBuf,
    pair: Arc<Ed25519KeyPair>,
    cert: Option<Certificate>,
    authority: Option<[u8; 32]>,
    revoked: Mutex<ListCache>,
    plaintext: bool,
}

/// What a daemon proves and checks on every connection: its host key and certificate, the
/// authority's public key and the revocation list. Cheap to clone.
#[derive(Clone)]
pub struct Identity(Arc<Inner>);

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?}, {})", self.name(), self.0.dir.display())
    }
}

impl Identity {
    /// Load the identity of an enrolled host from directory `dir`.
    pub fn load(dir: &Path) -> Result<Self, IdentityError> {
        let id = Self::load_unenrolled(dir)?;
        let Some(c) = &id.0.cert else {
            return Err(IdentityError::NotEnrolled { dir: dir.into() });
        };
        if id.0.authority.is_none() {
            return Err(IdentityError::NotEnrolled { dir: dir.into() });
        }
        if c.host_key != id.public_key() {
            return Err(IdentityError::Invalid(format!(
                "{}/host.cert was issued for another host key than {}; enroll again",
                dir.display(),
                host_key_path(dir).display()
            )));
        }
        Ok(id)
    }

    /// Load `dir` even if the host is not enrolled (no certificate), or its certificate is
    /// not for its key: such an identity can only be refused by its peers. For tests and
    /// tools that show what a peer says.
    pub fn load_unenrolled(dir: &Path) -> Result<Self, IdentityError> {
        let pair = load_host_key(&host_key_path(dir))?;
        let cert_path = dir.join("host.cert");
        let cert = if cert_path.exists() {
            Some(
                Certificate::from_hex(&read(&cert_path)?).ok_or(IdentityError::Format {
                    path: cert_path.clone(),
                    what: "certificate",
                })?,
            )
        } else {
            None
        };
        let auth_path = dir.join("authority.pub");
        let authority = if auth_path.exists() {
            let b = hex::decode(read(&auth_path)?.trim()).ok();
            Some(
                b.and_then(|b| <[u8; 32]>::try_from(b.as_slice()).ok())
                    .ok_or(IdentityError::Format {
                        path: auth_path.clone(),
                        what: "authority public key (32 bytes hex)",
                    })?,
            )
        } else {
            None
        };
        Ok(Identity(Arc::new(Inner {
            dir: dir.into(),
            pair: Arc::new(pair),
            cert,
            authority,
            revoked: Mutex::new(ListCache::default()),
            plaintext: false,
        })))
    }

    /// This identity, asking for unencrypted frames on every connection it opens and
    /// allowing them on every connection it accepts: for benchmarking the cost of
    /// encryption only (see docs/security.md). A peer without the same setting refuses.
    pub fn with_plaintext_for_benchmarks_only(&self) -> Self {
        let i = &self.0;
        Identity(Arc::new(Inner {
            dir: i.dir.clone(),
            pair: i.pair.clone(),
            cert: i.cert.clone(),
            authority: i.authority,
            revoked: Mutex::new(ListCache::default()),
            plaintext: true,
        }))
    }

    pub fn plaintext(&self) -> bool {
        self.0.plaintext
    }

    /// The enrolled host name (empty if not enrolled).
    pub fn name(&self) -> &str {
        self.0.cert.as_ref().map(|c| c.name.as_str()).unwrap_or("")
    }

    pub fn certificate(&self) -> Option<&Certificate> {
        self.0.cert.as_ref()
    }

    pub fn public_key(&self) -> [u8; 32] {
        public_of(&self.0.pair)
    }

    pub fn dir(&self) -> &Path {
        &self.0.dir
    }

    /// Sign `msg` with the host key.
    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0
            .pair
            .sign(msg)
            .as_ref()
            .try_into()
            .expect("ed25519 signature")
    }

    /// Check a peer's certificate for host `claimed`: issued by our authority, for that
    /// name, not revoked. The error says why, in words for both logs.
    pub fn check_peer(&self, cert: Option<&Certificate>, claimed: &str) -> Result<(), String> {
        let Some(c) = cert else {
            return Err(describe_rejection(None, claimed, ""));
        };
        let Some(authority) = &self.0.authority else {
            return Err("this host is not enrolled, so it cannot check peers".into());
        };
        if c.name != claimed {
            return Err(format!(
                "host claims the name {claimed:?} but its certificate is for {:?}",
                c.name
            ));
        }
        if !c.verify(authority) {
            return Err(format!(
                "host {claimed:?} is not enrolled in this cluster (its certificate was not issued by this cluster's authority); run `wisp enroll` on it"
            ));
        }
        if let Some(why) = self.revocation_of(c) {
            return Err(why);
        }
        Ok(())
    }

    /// `Some(reason)` if the revocation list covers `cert`; re-reads the list if its file
    /// changed. An unreadable or corrupt list counts as revoking everyone (fail closed).
    pub fn revocation_of(&self, cert: &Certificate) -> Option<String> {
        let path = self.0.dir.join("revoked");
        let mut cache = self.0.revoked.lock().unwrap_or_else(|e| e.into_inner());
        let stamp = fs::metadata(&path).ok().map(|m| {
            (
                m.dev(),
                m.ino(),
                m.size(),
                m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            )
        });
        if !cache.loaded || stamp != cache.stamp {
            let text = match fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => {
                    return Some(format!(
                        "revocation list {} unreadable ({e}); refusing every peer",
                        path.display()
                    ))
                }
            };
            let authority = self.0.authority.unwrap_or([0; 32]);
            let mut entries = vec![];
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let r = hex::decode(line.trim())
                    .ok()
                    .and_then(|b| postcard::from_bytes::<Revocation>(&b).ok());
                match r {
                    Some(r) if r.verify(&authority) => entries.push(r),
                    _ => {
                        return Some(format!(
                            "revocation list {} line {} is corrupt or not signed by this cluster's authority; refusing every peer",
                            path.display(),
                            i + 1
                        ))
                    }
                }
            }
            *cache = ListCache {
                stamp,
                loaded: true,
                entries,
            };
        }
        cache.entries.iter().find(|r| r.covers(cert)).map(|_| {
            format!(
                "host {:?} has been revoked from this cluster (`wisp revoke`)",
                cert.name
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_load_verify_and_revoke() {
        let d = tempfile::tempdir().unwrap();
        let key = ClusterKey::generate();
        let a = d.path().join("a");
        let b = d.path().join("b");
        let cert = enroll(&a, "ws1", &key).unwrap();
        enroll(&b, "srv1", &key).unwrap();
        let mode = fs::metadata(host_key_path(&a))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
        let ia = Identity::load(&a).unwrap();
        let ib = Identity::load(&b).unwrap();
        assert_eq!(ia.name(), "ws1");
        ib.check_peer(Some(&cert), "ws1").unwrap();
        let e = ib.check_peer(Some(&cert), "ws2").unwrap_err();
        assert!(e.contains("claims the name"), "{e}");
        // Another cluster's authority.
        let other = d.path().join("o");
        let ocert = enroll(&other, "ws1", &ClusterKey::generate()).unwrap();
        let e = ib.check_peer(Some(&ocert), "ws1").unwrap_err();
        assert!(e.contains("not enrolled"), "{e}");
        let e = ib.check_peer(None, "ws9").unwrap_err();
        assert!(e.contains("not enrolled"), "{e}");
        // Revocation, then re-enrollment with a fresh certificate.
        revoke(&b.join("revoked"), "ws1", &key).unwrap();
        let e = ib.check_peer(Some(&cert), "ws1").unwrap_err();
        assert!(e.contains("revoked"), "{e}");
        let cert2 = enroll(&a, "ws1", &key).unwrap();
        ib.check_peer(Some(&cert2), "ws1").unwrap();
        // A forged revocation list fails closed.
        let bad = Authority::from_cluster_key(&ClusterKey::generate())
            .revoke("srv1")
            .unwrap();
        fs::write(
            b.join("revoked"),
            format!("{}\n", hex::encode(postcard::to_allocvec(&bad).unwrap())),
        )
        .unwrap();
        let e = ib.check_peer(Some(&cert2), "ws1").unwrap_err();
        assert!(e.contains("not signed"), "{e}");
        // Unenrolled.
        let u = d.path().join("u");
        load_or_create_host_key(&u).unwrap();
        assert!(matches!(
            Identity::load(&u),
            Err(IdentityError::NotEnrolled { .. })
        ));
        assert!(Identity::load_unenrolled(&u).is_ok());
    }
}
