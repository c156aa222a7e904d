//! Prefix tables: which file server serves which part of the namespace.
//!
//! As in Sprite, a client maps path prefixes (domains) to servers and sends the rest of the
//! path to the server of the longest matching prefix. Entries are hints: when a server
//! answers with an error that says "not mine" (or does not answer), the client drops the
//! entry and asks the registry again ([`PrefixTable::invalidate`] + [`PrefixTable::refresh`]);
//! a domain that moved is found transparently.
//!
//! Matching is by whole path components: `/home` matches `/home` and `/home/alice` but never
//! `/homework`.
//!
//! Architecture Invariant: this module knows nothing of Raft or of how the table is
//! fetched: the fs-client hands it a [`DomainSource`] (for example a closure over
//! `RegistryClient::domains`), so no consensus detail leaks into the file system client.

use std::collections::BTreeMap;
use std::sync::RwLock;

/// Errors resolving a path through a prefix table.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("no domain serves {path}")]
    NoDomain { path: String },
    #[error("path {path} is not absolute")]
    NotAbsolute { path: String },
    #[error("cannot refresh the prefix table: {0}")]
    Refresh(String),
}

/// Check that `prefix` is a normalised absolute path: starts with '/', no empty, "." or
/// ".." component, no trailing '/' (except the root itself).
pub fn validate_prefix(prefix: &str) -> Result<(), String> {
    if !prefix.starts_with('/') {
        return Err("must be an absolute path".into());
    }
    if prefix.len() > 4096 {
        return Err("longer than 4096 bytes".into());
    }
    if prefix == "/" {
        return Ok(());
    }
    if prefix.ends_with('/') {
        return Err("must not end with '/'".into());
    }
    for c in prefix[1..].split('/') {
        match c {
            "" => return Err("has an empty component".into()),
            "." | ".." => return Err(format!("has a '{c}' component")),
            _ => {}
        }
    }
    Ok(())
}

/// The entry of `table` whose key is the longest prefix of `path` by whole components.
/// Keys are expected in [`validate_prefix`] form; `path` should be absolute.
pub fn longest_prefix<'a, V>(
    table: &'a BTreeMap<String, V>,
    path: &str,
) -> Option<(&'a str, &'a V)> {
    let path = if path.len() > 1 {
        path.trim_end_matches('/')
    } else {
        path
    };
    let path = if path.is_empty() { "/" } else { path };
    let mut cand = path;
    loop {
        if let Some((k, v)) = table.get_key_value(cand) {
            return Some((k.as_str(), v));
        }
        if cand == "/" {
            return None;
        }
        cand = match cand.rfind('/') {
            Some(0) => "/",
            Some(i) => &cand[..i],
            None => return None,
        };
    }
}

/// The part of `path` below `prefix` (relative, without a leading '/'; "" for the prefix itself).
pub fn rest_of<'p>(prefix: &str, path: &'p str) -> &'p str {
    let r = path.strip_prefix(prefix).unwrap_or(path);
    r.trim_start_matches('/')
}

/// Where a path goes: the domain prefix, its server, and the path inside that domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub prefix: String,
    pub server: String,
    pub rest: String,
}

/// Something that can produce the current domain table (prefix -> server address).
pub trait DomainSource: Send + Sync {
    fn domains(&self) -> Result<BTreeMap<String, String>, String>;
}

impl<F> DomainSource for F
where
    F: Fn() -> Result<BTreeMap<String, String>, String> + Send + Sync,
{
    fn domains(&self) -> Result<BTreeMap<String, String>, String> {
        self()
    }
}

/// A client's table of domain hints.
pub struct PrefixTable {
    hints: RwLock<BTreeMap<String, String>>,
    source: Option<Box<dyn DomainSource>>,
}

impl std::fmt::Debug for PrefixTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixTable")
            .field(
                "hints",
                &*self.hints.read().unwrap_or_else(|e| e.into_inner()),
            )
            .finish()
    }
}

impl PrefixTable {
    /// A table with fixed hints and nowhere to refresh from (a single-server setup).
    pub fn new(hints: BTreeMap<String, String>) -> Self {
        PrefixTable {
            hints: RwLock::new(hints),
            source: None,
        }
    }

    /// An empty table filled (and refilled after errors) from `source`.
    pub fn with_source(source: impl DomainSource + 'static) -> Self {
        PrefixTable {
            hints: RwLock::new(BTreeMap::new()),
            source: Some(Box::new(source)),
        }
    }

    /// The current hints.
    pub fn hints(&self) -> BTreeMap<String, String> {
        self.hints.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Add or replace one hint.
    pub fn insert(&self, prefix: String, server: String) {
        self.hints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(prefix, server);
    }

    /// Route `path` from the hints alone.
    pub fn lookup(&self, path: &str) -> Option<Route> {
        let h = self.hints.read().unwrap_or_else(|e| e.into_inner());
        longest_prefix(&h, path).map(|(p, s)| Route {
            prefix: p.to_string(),
            server: s.clone(),
            rest: rest_of(p, path).to_string(),
        })
    }

    /// Drop the hint for `prefix` (its server failed or said the path is not its own).
    pub fn invalidate(&self, prefix: &str) {
        self.hints
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(prefix);
    }

    /// Replace all hints with the source's current table.
    pub fn refresh(&self) -> Result<(), PrefixError> {
        let Some(src) = &self.source else {
            return Err(PrefixError::Refresh(
                "this table has no registry to ask".into(),
            ));
        };
        let fresh = src.domains().map_err(PrefixError::Refresh)?;
        *self.hints.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Route `path`, asking the source once when the hints have no match.
    pub fn resolve(&self, path: &str) -> Result<Route, PrefixError> {
        if !path.starts_with('/') {
            return Err(PrefixError::NotAbsolute {
                path: path.to_string(),
            });
        }
        if let Some(r) = self.lookup(path) {
            return Ok(r);
        }
        self.refresh()?;
        self.lookup(path).ok_or_else(|| PrefixError::NoDomain {
            path: path.to_string(),
        })
    }

    /// The server of `failed` did not serve `path` (timeout, stale hint, redirect): drop the
    /// hint, refresh from the source, and route again.
    pub fn reroute(&self, failed: &Route, path: &str) -> Result<Route, PrefixError> {
        self.invalidate(&failed.prefix);
        self.refresh()?;
        self.lookup(path).ok_or_else(|| PrefixError::NoDomain {
            path: path.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    fn table(entries: &[(&str, &str)]) -> BTreeMap<String, String> {
        entries
            .iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn longest_prefix_matches_whole_components() {
        let t = table(&[
            ("/", "root"),
            ("/home", "home"),
            ("/home/alice", "alice"),
            ("/scratch", "scratch"),
        ]);
        let m = |p: &str| longest_prefix(&t, p).map(|(k, v)| (k.to_string(), v.to_string()));
        assert_eq!(
            m("/home/alice/src/x.c"),
            Some(("/home/alice".into(), "alice".into()))
        );
        assert_eq!(
            m("/home/alice"),
            Some(("/home/alice".into(), "alice".into()))
        );
        assert_eq!(
            m("/home/alice/"),
            Some(("/home/alice".into(), "alice".into()))
        );
        assert_eq!(m("/home/alicette"), Some(("/home".into(), "home".into())));
        assert_eq!(m("/homework"), Some(("/".into(), "root".into())));
        assert_eq!(m("/"), Some(("/".into(), "root".into())));
        assert_eq!(
            m("/scratch/a/b/c"),
            Some(("/scratch".into(), "scratch".into()))
        );
        let no_root = table(&[("/home", "home")]);
        assert_eq!(longest_prefix(&no_root, "/etc/passwd"), None);
        assert_eq!(longest_prefix(&no_root, "/"), None);
        assert_eq!(rest_of("/home", "/home/alice/x"), "alice/x");
        assert_eq!(rest_of("/", "/etc/passwd"), "etc/passwd");
        assert_eq!(rest_of("/home", "/home"), "");
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(validate_prefix("/").is_ok());
        assert!(validate_prefix("/home/alice").is_ok());
        for bad in ["", "home", "/home/", "//x", "/a//b", "/a/./b", "/a/.."] {
            assert!(validate_prefix(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stale_hint_is_dropped_and_refreshed() {
        // The "registry" moves /home from server A to server B after the first fetch.
        let current = Arc::new(Mutex::new(table(&[("/", "r:1"), ("/home", "a:1")])));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (c2, f2) = (current.clone(), fetches.clone());
        let t = PrefixTable::with_source(move || {
            f2.fetch_add(1, Ordering::SeqCst);
            Ok(c2.lock().unwrap().clone())
        });
        let r = t.resolve("/home/alice/f").unwrap();
        assert_eq!((r.server.as_str(), r.rest.as_str()), ("a:1", "alice/f"));
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Hints are served without asking again.
        t.resolve("/home/bob").unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        *current.lock().unwrap() = table(&[("/", "r:1"), ("/home", "b:1")]);
        assert_eq!(
            t.lookup("/home/alice/f").unwrap().server,
            "a:1",
            "a hint stays until it fails"
        );
        let r2 = t.reroute(&r, "/home/alice/f").unwrap();
        assert_eq!(r2.server, "b:1");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn errors_are_clear() {
        let t = PrefixTable::new(table(&[("/home", "a:1")]));
        assert_eq!(
            t.resolve("/etc").unwrap_err().to_string(),
            "cannot refresh the prefix table: this table has no registry to ask"
        );
        assert_eq!(
            t.resolve("etc").unwrap_err(),
            PrefixError::NotAbsolute { path: "etc".into() }
        );
        let t = PrefixTable::with_source(|| {
            Err::<BTreeMap<String, String>, _>("registry unreachable".to_string())
        });
        assert_eq!(
            t.resolve("/x").unwrap_err(),
            PrefixError::Refresh("registry unreachable".into())
        );
        let t = PrefixTable::with_source(|| Ok(table(&[("/home", "a:1")])));
        assert_eq!(
            t.resolve("/etc").unwrap_err(),
            PrefixError::NoDomain {
                path: "/etc".into()
            }
        );
    }
}
