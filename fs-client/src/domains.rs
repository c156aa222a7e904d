//! Prefix tables: several file servers, each serving a domain (a path prefix), seen as one
//! tree under the mount.
//!
//! As in Sprite, the client keeps a table from path prefixes to servers, filled from a
//! source the caller provides (in `wispd`, the replicated registry) at mount and then every
//! [`REFRESH`] by a background thread, so no file operation ever waits for the registry.
//! Entries are hints: a domain that moves gets a new connection.
//!
//! Inode numbers: the root domain (`/`, the server given at mount) keeps its own numbers;
//! the inodes of the n-th other domain carry n in their top byte ([`join`]). A request is
//! sent to the domain of its inodes with the byte stripped, and the inodes in the answer get
//! it back, so the rest of the client never knows there is more than one server. A request
//! naming inodes of two domains (rename, link) fails with `EXDEV`, as across a mount
//! boundary.
//!
//! Architecture Invariant: this module knows nothing of Raft or of how the table is
//! fetched: it calls a [`DomainSource`] closure.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use wisp_proto::msg::{Request as Rq, Response as Rs, WireError, ROOT_INO};
use wisp_proto::rpc::{CallbackHandler, RpcClient, RpcError};

/// Where the domain table comes from: prefix -> server address.
pub type DomainSource = Arc<dyn Fn() -> Result<BTreeMap<String, String>, String> + Send + Sync>;

/// How often the table is asked for again.
pub const REFRESH: Duration = Duration::from_secs(2);

const SHIFT: u32 = 56;
const LOCAL: u64 = (1 << SHIFT) - 1;
/// Most domains one client can see (one byte of the inode number).
pub const MAX_DOMAINS: usize = 255;

/// (domain, the server's inode number) of a client inode number.
pub fn split(ino: u64) -> (usize, u64) {
    ((ino >> SHIFT) as usize, ino & LOCAL)
}

/// The client inode number of a server's inode in domain `d`.
pub fn join(d: usize, ino: u64) -> u64 {
    ((d as u64) << SHIFT) | (ino & LOCAL)
}

/// The inode fields of a request.
fn inos_mut(r: &mut Rq) -> Vec<&mut u64> {
    match r {
        Rq::Lookup { parent, .. }
        | Rq::MkNod { parent, .. }
        | Rq::Mkdir { parent, .. }
        | Rq::Create { parent, .. }
        | Rq::Symlink { parent, .. }
        | Rq::Unlink { parent, .. }
        | Rq::Rmdir { parent, .. } => vec![parent],
        Rq::Link {
            ino, new_parent, ..
        } => vec![ino, new_parent],
        Rq::Rename {
            parent, new_parent, ..
        } => vec![parent, new_parent],
        Rq::GetAttr { ino }
        | Rq::SetAttr { ino, .. }
        | Rq::ReadLink { ino }
        | Rq::Open { ino, .. }
        | Rq::Close { ino, .. }
        | Rq::Read { ino, .. }
        | Rq::Write { ino, .. }
        | Rq::PipeAwait { ino, .. }
        | Rq::Fsync { ino }
        | Rq::ReadDir { ino, .. }
        | Rq::SetXattr { ino, .. }
        | Rq::GetXattr { ino, .. }
        | Rq::ListXattr { ino, .. }
        | Rq::RemoveXattr { ino, .. }
        | Rq::Fallocate { ino, .. } => vec![ino],
        _ => vec![],
    }
}

/// Give the inodes of an answer from domain `d` their client numbers.
pub(crate) fn globalize(d: usize, r: &mut Rs) {
    match r {
        Rs::Attr(a) | Rs::Entry(a) | Rs::Opened { attr: a, .. } | Rs::Written { attr: a, .. } => {
            a.ino = join(d, a.ino)
        }
        Rs::Entries(es) => {
            for e in es {
                e.attr.ino = join(d, e.attr.ino);
            }
        }
        _ => {}
    }
}

/// One domain's server and connection.
pub(crate) struct Domain {
    pub prefix: String,
    pub addr: String,
    pub rpc: RpcClient,
    /// The connection generation whose opens are registered with this server.
    pub registered_gen: Mutex<u64>,
}

/// Makes the connection of a new domain (its callback handler knows the domain number).
pub(crate) type Connect = Box<dyn Fn(usize, &str) -> RpcClient + Send + Sync>;

pub(crate) struct Domains {
    /// Index = domain number; 0 is the root domain.
    list: RwLock<Vec<Arc<Domain>>>,
    /// prefix -> domain number, for every domain but the root.
    table: RwLock<BTreeMap<String, usize>>,
    /// Directories on the way to a prefix (and the root): inode -> path.
    paths: Mutex<HashMap<u64, String>>,
    source: Option<DomainSource>,
    connect: Connect,
    /// The registry names another server for `/` (said once).
    warned_root: std::sync::atomic::AtomicBool,
}

fn exdev() -> RpcError {
    RpcError::Remote(WireError::new(
        libc::EXDEV,
        "the two names are in different domains (file servers)",
    ))
}

impl Domains {
    pub fn new(root: Domain, source: Option<DomainSource>, connect: Connect) -> Self {
        let mut paths = HashMap::new();
        paths.insert(ROOT_INO, "/".to_string());
        Domains {
            list: RwLock::new(vec![Arc::new(root)]),
            table: RwLock::new(BTreeMap::new()),
            paths: Mutex::new(paths),
            source,
            connect,
            warned_root: std::sync::atomic::AtomicBool::new(false),
        }
    }

    pub fn get(&self, d: usize) -> Option<Arc<Domain>> {
        self.list.read().unwrap().get(d).cloned()
    }

    pub fn all(&self) -> Vec<Arc<Domain>> {
        self.list.read().unwrap().clone()
    }

    pub fn root(&self) -> Arc<Domain> {
        self.list.read().unwrap()[0].clone()
    }

    /// The domain to send `r` to, and `r` with server inode numbers.
    pub fn route(&self, mut r: Rq) -> Result<(usize, Arc<Domain>, Rq), RpcError> {
        let mut dom: Option<usize> = None;
        for ino in inos_mut(&mut r) {
            let (d, local) = split(*ino);
            if dom.is_some_and(|x| x != d) {
                return Err(exdev());
            }
            dom = Some(d);
            *ino = local;
        }
        let d = dom.unwrap_or(0);
        let conn = self.get(d).ok_or_else(|| {
            RpcError::Remote(WireError::new(
                libc::ESTALE,
                format!("inode of unknown domain {d}"),
            ))
        })?;
        Ok((d, conn, r))
    }

    /// Send `r` to its domain and wait (for the client's own background work).
    pub fn call_blocking(&self, r: Rq) -> Result<Rs, RpcError> {
        let (d, conn, r) = self.route(r)?;
        let mut resp = conn.rpc.call_blocking(r)?;
        globalize(d, &mut resp);
        Ok(resp)
    }

    /// Send `r` to its domain (async, for parallel write-backs).
    pub async fn call(&self, r: Rq) -> Result<Rs, RpcError> {
        let (d, conn, r) = self.route(r)?;
        let mut resp = conn.rpc.call(r).await?;
        globalize(d, &mut resp);
        Ok(resp)
    }

    /// Sum of every connection's generation: changes when any of them reconnected.
    pub fn connections(&self) -> u64 {
        self.list
            .read()
            .unwrap()
            .iter()
            .map(|d| d.rpc.connections())
            .sum()
    }

    /// Whether every domain's connection is up now (read on every cached lookup: no
    /// allocation).
    pub fn all_up(&self) -> bool {
        self.list.read().unwrap().iter().all(|d| d.rpc.is_up())
    }

    /// The path of a directory on the way to a prefix (or the root), if it is one.
    pub fn path_of(&self, ino: u64) -> Option<String> {
        self.paths.lock().unwrap().get(&ino).cloned()
    }

    /// Whether there is a source to refresh from.
    pub fn has_source(&self) -> bool {
        self.source.is_some()
    }

    /// Ask the source again; returns the prefixes that are new. Errors keep the old table
    /// (entries are hints).
    pub fn refresh(&self) -> Vec<String> {
        let Some(src) = &self.source else {
            return vec![];
        };
        match src() {
            Ok(t) => {
                let before = self.prefixes();
                self.install(t);
                self.prefixes()
                    .into_iter()
                    .filter(|p| !before.contains(p))
                    .collect()
            }
            Err(e) => {
                tracing::debug!("domain table not refreshed: {e}");
                vec![]
            }
        }
    }

    /// Take a new table: a connection for every prefix not seen before (or whose server
    /// moved). The root prefix stays with the server given at mount.
    fn install(&self, t: BTreeMap<String, String>) {
        let mut map = BTreeMap::new();
        for (prefix, addr) in t {
            if prefix == "/" {
                if addr != self.root().addr
                    && !self
                        .warned_root
                        .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(%addr, root = %self.root().addr, "the registry names another server for /; this mount keeps its own");
                }
                continue;
            }
            let known = self
                .all()
                .iter()
                .position(|d| d.prefix == prefix && d.addr == addr);
            let d = match known {
                Some(d) => d,
                None => {
                    let mut list = self.list.write().unwrap();
                    if list.len() > MAX_DOMAINS {
                        tracing::warn!(%prefix, "more than {MAX_DOMAINS} domains; ignored");
                        continue;
                    }
                    let d = list.len();
                    list.push(Arc::new(Domain {
                        prefix: prefix.clone(),
                        addr: addr.clone(),
                        rpc: (self.connect)(d, &addr),
                        registered_gen: Mutex::new(0),
                    }));
                    tracing::info!(%prefix, %addr, domain = d, "domain added");
                    d
                }
            };
            map.insert(prefix, d);
        }
        *self.table.write().unwrap() = map;
    }

    /// The domain whose prefix is exactly `path`.
    pub fn domain_at(&self, path: &str) -> Option<usize> {
        self.table.read().unwrap().get(path).copied()
    }

    /// Whether `path` lies on the way to some prefix (a proper ancestor of it).
    pub fn leads_to_prefix(&self, path: &str) -> bool {
        let t = self.table.read().unwrap();
        t.keys().any(|p| {
            p.len() > path.len() && p.starts_with(path) && p.as_bytes()[path.len()] == b'/'
        })
    }

    pub fn remember_path(&self, ino: u64, path: String) {
        self.paths.lock().unwrap().insert(ino, path);
    }

    /// Every prefix but the root's.
    pub fn prefixes(&self) -> Vec<String> {
        self.table.read().unwrap().keys().cloned().collect()
    }
}

/// `dir`/`name` as a path.
pub fn child_path(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// A callback handler for domain `d`: the callback's inodes get their client numbers.
pub(crate) fn domain_handler(d: usize, inner: CallbackHandler) -> CallbackHandler {
    use wisp_proto::msg::Callback;
    Arc::new(move |cb: Callback| {
        let cb = match cb {
            Callback::InvalidateInode { ino } => Callback::InvalidateInode { ino: join(d, ino) },
            Callback::WriteBack { ino } => Callback::WriteBack { ino: join(d, ino) },
            Callback::InvalidateEntry { parent, name } => Callback::InvalidateEntry {
                parent: join(d, parent),
                name,
            },
        };
        inner(cb)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip() {
        for d in [0usize, 1, 7, 255] {
            for ino in [1u64, 2, 12345, LOCAL] {
                assert_eq!(split(join(d, ino)), (d, ino));
            }
        }
        assert_eq!(join(0, 42), 42);
    }

    #[test]
    fn paths_join_by_component() {
        assert_eq!(child_path("/", "home"), "/home");
        assert_eq!(child_path("/a", "b"), "/a/b");
    }
}
