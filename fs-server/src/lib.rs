//! wisp file server: serves one domain of the `/wisp` namespace.
//!
//! Owns the domain's durable state (metadata in redb via [`store`], contents in local files
//! via [`objects`]), answers the file system requests of `wisp-proto`, and tracks which
//! clients hold each file open. Every request arrives already authenticated and size-bounded
//! by the rpc layer.
//!
//! Architecture Invariant: this crate knows nothing of FUSE or of the kernel of any client;
//! it speaks inode numbers and POSIX errnos. It knows nothing of Raft: the registry replica
//! it may host is plugged in as an opaque [`NamingHandler`].

pub mod objects;
pub mod perm;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use tracing::{info, warn};
use wisp_proto::msg::*;
use wisp_proto::rpc::{PeerHandle, Service};
use wisp_proto::MAX_IO;

use objects::Objects;
use store::{InodeRec, Store, StoreError};
use wisp_pseudodev::pipe::{Pipe, PipeError};

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open metadata database in {path}: {source}")]
    Store { path: PathBuf, source: StoreError },
}

/// Handles registry requests for a replica hosted in this server process.
pub type NamingHandler = Arc<dyn Fn(Vec<u8>) -> Result<Vec<u8>, WireError> + Send + Sync>;

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    callbacks: AtomicU64,
}

/// Per-client open counts of one inode.
#[derive(Default, Clone, Copy, Debug)]
struct OpenCount {
    readers: u32,
    writers: u32,
    /// Opens made while the file was write-shared (served uncached).
    uncached: u32,
}

/// The file server of one domain.
pub struct FsServer {
    store: Store,
    objects: Objects,
    data_dir: PathBuf,
    /// ino -> session -> opens.
    opens: Mutex<HashMap<Ino, HashMap<u64, OpenCount>>>,
    /// Serialises appends and truncates so O_APPEND writes from many hosts never interleave.
    append_lock: Mutex<()>,
    counters: Counters,
    peers: Mutex<HashMap<u64, Arc<PeerHandle>>>,
    naming: RwLock<Option<NamingHandler>>,
    interest: Mutex<Interest>,
    /// Buffers of the cluster pipes served here, by inode.
    pipes: Mutex<HashMap<Ino, Arc<Pipe>>>,
    /// ino -> sessions that opened it for writing and may still hold delayed writes
    /// (clients write back after a delay). Before another session looks at the file, they
    /// are told to write back ([`Callback::WriteBack`]): sequential write-sharing.
    /// session -> a counter bumped at each of its opens for writing, so a settle that ran
    /// across a new open does not forget the writer.
    writers: Mutex<HashMap<Ino, HashMap<u64, u64>>>,
    writer_opens: AtomicU64,
    /// After a restart, reads wait until this instant (set by the first request, so the
    /// window starts when the server is actually serving): clients reconnect and write back
    /// what they held meanwhile (the server forgot who may hold delayed writes).
    restarted: bool,
    recovering_until: OnceLock<std::time::Instant>,
    /// Hosts (authenticated peer names) whose uid 0 is root here; root from any other host
    /// is squashed to nobody. `*` trusts every host.
    trusted_root: RwLock<HashSet<String>>,
    /// Requests refused for lack of permission (EACCES/EPERM from [`perm`]).
    denied: AtomicU64,
}

/// Longest wait for another client to write back its delayed writes before a request
/// that needs them fails with EIO (below the clients' 60 s call timeout).
pub const WRITEBACK_WAIT: std::time::Duration = std::time::Duration::from_secs(45);

/// The recovery window after a restart (clients reconnect within about a second).
pub const RECOVERY_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// How long one pipe request may wait on the server before the client asks again.
const PIPE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Which clients may hold cached copies (the server's half of the consistency protocol).
#[derive(Default)]
struct Interest {
    /// ino -> sessions that were given its attributes or data since their last callback.
    cachers: HashMap<Ino, std::collections::HashSet<u64>>,
}

fn io_err(e: std::io::Error) -> WireError {
    WireError::new(e.raw_os_error().unwrap_or(libc::EIO), e.to_string())
}

impl From<StoreError> for WireError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Errno(n, m) => WireError::new(n, m),
            other => WireError::new(libc::EIO, other.to_string()),
        }
    }
}

type R<T> = Result<T, WireError>;

/// A name to make or remove: one component that is not `.` or `..`, without `/` or NUL,
/// at most NAME_MAX bytes. Names never reach the server's own file system (contents are
/// stored by inode number), so this is about the namespace's integrity.
fn check_name(name: &[u8]) -> R<()> {
    if name.is_empty() || name.contains(&b'/') || name.contains(&0) || name == b"." || name == b".."
    {
        return Err(WireError::new(
            libc::EINVAL,
            format!("invalid file name {:?}", String::from_utf8_lossy(name)),
        ));
    }
    if name.len() > NAME_MAX {
        return Err(WireError::new(
            libc::ENAMETOOLONG,
            format!(
                "file name of {} bytes is longer than {NAME_MAX}",
                name.len()
            ),
        ));
    }
    Ok(())
}

/// EINVAL when directory `dir` would move into `new_parent`, which is `dir` itself or lies
/// below it (walking up the parent links to the root).
fn refuse_move_below_itself(t: &store::Txn<'_>, dir: Ino, new_parent: Ino) -> R<()> {
    let mut cur = new_parent;
    loop {
        if cur == dir {
            return Err(WireError::new(
                libc::EINVAL,
                "cannot move a directory into its own subdirectory",
            ));
        }
        if cur == ROOT_INO {
            return Ok(());
        }
        cur = t.get(cur)?.parent;
    }
}

fn kind_of_mode(mode: u32) -> R<Kind> {
    Ok(match mode & libc::S_IFMT {
        libc::S_IFREG | 0 => Kind::File,
        libc::S_IFDIR => Kind::Dir,
        libc::S_IFLNK => Kind::Symlink,
        libc::S_IFIFO => Kind::Fifo,
        libc::S_IFSOCK => Kind::Socket,
        libc::S_IFCHR => Kind::CharDev,
        libc::S_IFBLK => Kind::BlockDev,
        other => {
            return Err(WireError::new(
                libc::EINVAL,
                format!("unknown file type {other:o}"),
            ))
        }
    })
}

impl FsServer {
    /// Open the domain stored in `data_dir` (created if new), sweeping inodes and objects
    /// left behind by a crash (unlinked-while-open files, objects of uncommitted creates).
    pub fn open(data_dir: &Path) -> Result<Self, ServerError> {
        std::fs::create_dir_all(data_dir).map_err(|source| ServerError::DataDir {
            path: data_dir.into(),
            source,
        })?;
        let db = data_dir.join("meta.redb");
        let restarted = db.exists();
        let store = Store::open(&db).map_err(|source| ServerError::Store {
            path: db.clone(),
            source,
        })?;
        let objects =
            Objects::open(&data_dir.join("objects")).map_err(|source| ServerError::DataDir {
                path: data_dir.into(),
                source,
            })?;
        let s = FsServer {
            store,
            objects,
            data_dir: data_dir.into(),
            opens: Mutex::new(HashMap::new()),
            append_lock: Mutex::new(()),
            counters: Counters::default(),
            peers: Mutex::new(HashMap::new()),
            naming: RwLock::new(None),
            interest: Mutex::new(Interest::default()),
            pipes: Mutex::new(HashMap::new()),
            writers: Mutex::new(HashMap::new()),
            writer_opens: AtomicU64::new(0),
            restarted,
            recovering_until: OnceLock::new(),
            trusted_root: RwLock::new(HashSet::new()),
            denied: AtomicU64::new(0),
        };
        s.sweep()
            .map_err(|source| ServerError::Store { path: db, source })?;
        Ok(s)
    }

    /// Make every metadata change durable now (graceful shutdown).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.store.sync()
    }

    /// Make metadata changes durable every [`store::FLUSH_EVERY`] in the background (until
    /// the server is dropped). Client fsyncs do not wait for this: they sync at once.
    pub fn start_flusher(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("wisp-flusher".into())
            .spawn(move || loop {
                std::thread::sleep(store::FLUSH_EVERY);
                let Some(s) = weak.upgrade() else { return };
                if let Err(e) = s.store.sync_if_dirty() {
                    warn!("background metadata sync failed: {e}");
                }
            })
            .expect("spawn the flusher thread");
    }

    fn sweep(&self) -> Result<(), StoreError> {
        let inodes = self.store.all_inodes()?;
        let mut live = std::collections::HashSet::new();
        let mut orphans = Vec::new();
        for (ino, rec) in &inodes {
            if rec.nlink == 0 {
                orphans.push(*ino);
            } else {
                live.insert(*ino);
            }
        }
        if !orphans.is_empty() {
            let mut t = self.store.begin()?;
            for ino in &orphans {
                t.remove_inode(*ino)?;
            }
            t.commit()?;
        }
        let mut removed = 0;
        for ino in self.objects.all().unwrap_or_default() {
            if !live.contains(&ino) {
                let _ = self.objects.remove(ino);
                removed += 1;
            }
        }
        info!(
            inodes = inodes.len(),
            orphans = orphans.len(),
            stray_objects = removed,
            "domain opened"
        );
        Ok(())
    }

    /// Trust these hosts (peer names; `*` for every host) for root: their uid 0 acts as root
    /// here. Root from any other host is squashed to nobody (65534). Replaces the list.
    pub fn set_trusted_root(&self, hosts: impl IntoIterator<Item = String>) {
        *self.trusted_root.write().unwrap() = hosts.into_iter().collect();
    }

    /// The identity to check a request of `peer` against: `cred` as the host asserts it,
    /// with root squashed unless the host is trusted for root.
    fn who(&self, peer: &PeerHandle, cred: &Cred) -> R<Cred> {
        if cred.groups.len() > MAX_GROUPS {
            return Err(WireError::new(
                libc::EINVAL,
                format!(
                    "credential with {} supplementary groups (at most {MAX_GROUPS})",
                    cred.groups.len()
                ),
            ));
        }
        let t = self.trusted_root.read().unwrap();
        let trusted = t.contains("*") || t.contains(&peer.name);
        Ok(perm::squash(cred, trusted))
    }

    /// Requests refused by the permission checks since the server started.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }

    /// Plug in the registry replica hosted by this server.
    pub fn set_naming_handler(&self, h: NamingHandler) {
        *self.naming.write().unwrap() = Some(h);
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Attributes of `ino` as clients see them.
    pub fn attr(&self, ino: Ino, rec: &InodeRec) -> R<Attr> {
        let (size, blocks, atime, mtime, ctime) = match rec.kind {
            Kind::File => {
                let o = self.objects.stat(ino).map_err(io_err)?;
                (o.size, o.blocks, o.atime, o.mtime, rec.ctime.max(o.ctime))
            }
            Kind::Dir => (4096, 8, rec.atime, rec.mtime, rec.ctime),
            Kind::Symlink => (rec.target.len() as u64, 0, rec.atime, rec.mtime, rec.ctime),
            _ => (0, 0, rec.atime, rec.mtime, rec.ctime),
        };
        Ok(Attr {
            ino,
            kind: rec.kind,
            perm: rec.perm,
            nlink: rec.nlink,
            uid: rec.uid,
            gid: rec.gid,
            rdev: rec.rdev,
            size,
            blocks,
            atime,
            mtime,
            ctime,
            version: rec.version,
        })
    }

    fn getattr(&self, ino: Ino) -> R<Attr> {
        let rec = self.store.get(ino)?;
        self.attr(ino, &rec)
    }

    fn is_open(&self, ino: Ino) -> bool {
        self.opens
            .lock()
            .unwrap()
            .get(&ino)
            .is_some_and(|m| !m.is_empty())
    }

    /// Remove an inode whose last link went away, unless some client still has it open.
    fn maybe_reap(&self, ino: Ino) -> R<()> {
        if self.is_open(ino) {
            return Ok(());
        }
        let mut t = self.store.begin()?;
        match t.get(ino) {
            Ok(rec) if rec.nlink == 0 => {
                t.remove_inode(ino)?;
                t.commit()?;
                self.objects.remove(ino).map_err(io_err)?;
            }
            _ => {}
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)] // one call per kind of node; a struct would only rename them
    /// Make `name` in `parent` (or, for a non-exclusive file create, return the existing
    /// file). `session` is recorded as a cacher of the new inode before it is committed, so
    /// any change another client makes to it afterwards calls this client back.
    fn new_child(
        &self,
        session: u64,
        cred: &Cred,
        parent: Ino,
        name: &[u8],
        kind: Kind,
        mode: u32,
        rdev: u32,
        target: &[u8],
        excl: bool,
    ) -> R<(Attr, bool)> {
        check_name(name)?;
        let mut t = self.store.begin()?;
        let mut prec = t.get(parent)?;
        if prec.kind != Kind::Dir {
            return Err(WireError::new(
                libc::ENOTDIR,
                format!("inode {parent} is not a directory"),
            ));
        }
        if prec.nlink == 0 {
            return Err(WireError::new(libc::ENOENT, "directory was removed"));
        }
        perm::check_search(&prec, cred)?;
        if let Some((existing, _)) = t.lookup(parent, name)? {
            if excl || kind != Kind::File {
                return Err(WireError::new(
                    libc::EEXIST,
                    format!("{} exists", String::from_utf8_lossy(name)),
                ));
            }
            drop(t);
            self.watch(session, existing);
            let rec = self.store.get(existing)?;
            if rec.kind == Kind::Dir {
                return Err(WireError::new(libc::EISDIR, "is a directory"));
            }
            return Ok((self.attr(existing, &rec)?, false));
        }
        perm::check_dir_write(&prec, cred)?;
        if matches!(kind, Kind::CharDev | Kind::BlockDev) && cred.uid != 0 {
            return Err(WireError::new(
                libc::EPERM,
                "only root may make device nodes",
            ));
        }
        let ino = t.alloc_ino()?;
        self.watch(session, ino);
        let gid = if prec.perm & 0o2000 != 0 {
            prec.gid
        } else {
            cred.gid
        };
        let mut perm = (mode & 0o7777) as u16;
        if kind == Kind::Dir && prec.perm & 0o2000 != 0 {
            perm |= 0o2000;
        }
        let mut rec = InodeRec::new(kind, perm, cred.uid, gid, parent);
        rec.rdev = rdev;
        rec.target = target.to_vec();
        t.link(parent, &mut prec, name, ino)?;
        if kind == Kind::Dir {
            prec.nlink += 1;
        }
        let now = Time::now();
        prec.mtime = now;
        prec.ctime = now;
        t.put(parent, &prec)?;
        t.put(ino, &rec)?;
        if kind == Kind::File {
            self.objects.handle(ino).map_err(io_err)?;
        }
        t.commit()?;
        Ok((self.attr(ino, &rec)?, true))
    }

    fn unlink(&self, who: &Cred, parent: Ino, name: &[u8], want_dir: bool) -> R<Ino> {
        if name == b"." || name == b".." {
            return Err(WireError::new(
                if want_dir { libc::EINVAL } else { libc::EISDIR },
                "cannot remove . or ..",
            ));
        }
        check_name(name)?;
        let mut t = self.store.begin()?;
        let mut prec = t.get(parent)?;
        if prec.kind != Kind::Dir {
            return Err(WireError::new(libc::ENOTDIR, "not a directory"));
        }
        let (child, _) = t.lookup(parent, name)?.ok_or_else(|| {
            WireError::new(
                libc::ENOENT,
                format!("{} does not exist", String::from_utf8_lossy(name)),
            )
        })?;
        let mut crec = t.get(child)?;
        perm::check_delete(&prec, &crec, who)?;
        if want_dir {
            if crec.kind != Kind::Dir {
                return Err(WireError::new(libc::ENOTDIR, "not a directory"));
            }
            if crec.entries > 0 {
                return Err(WireError::new(libc::ENOTEMPTY, "directory not empty"));
            }
        } else if crec.kind == Kind::Dir {
            return Err(WireError::new(libc::EISDIR, "is a directory"));
        }
        t.unlink(parent, &mut prec, name)?;
        let now = Time::now();
        prec.mtime = now;
        prec.ctime = now;
        if want_dir {
            prec.nlink -= 1;
            crec.nlink = 0;
        } else {
            crec.nlink = crec.nlink.saturating_sub(1);
        }
        crec.ctime = now;
        t.put(parent, &prec)?;
        t.put(child, &crec)?;
        t.commit()?;
        if crec.nlink == 0 {
            self.maybe_reap(child)?;
        }
        Ok(child)
    }

    #[allow(clippy::too_many_arguments)] // renameat2's arguments plus who asks
    fn rename(
        &self,
        who: &Cred,
        parent: Ino,
        name: &[u8],
        np: Ino,
        nn: &[u8],
        flags: u32,
    ) -> R<(Ino, Option<Ino>)> {
        check_name(name)?;
        check_name(nn)?;
        const NOREPLACE: u32 = 1;
        const EXCHANGE: u32 = 2;
        if flags & !(NOREPLACE | EXCHANGE) != 0 || flags == NOREPLACE | EXCHANGE {
            return Err(WireError::new(
                libc::EINVAL,
                format!("unsupported rename flags {flags:#x}"),
            ));
        }
        let mut t = self.store.begin()?;
        let (src, _) = t.lookup(parent, name)?.ok_or_else(|| {
            WireError::new(
                libc::ENOENT,
                format!("{} does not exist", String::from_utf8_lossy(name)),
            )
        })?;
        let srec = t.get(src)?;
        perm::check_delete(&t.get(parent)?, &srec, who)?;
        let dst = t.lookup(np, nn)?.map(|x| x.0);
        if dst == Some(src) {
            return Ok((src, dst)); // same inode: POSIX says do nothing
        }
        let nprec0 = t.get(np)?;
        if nprec0.kind != Kind::Dir {
            return Err(WireError::new(
                libc::ENOTDIR,
                "target parent is not a directory",
            ));
        }
        perm::check_dir_write(&nprec0, who)?;
        if let Some(d) = dst {
            perm::check_delete(&nprec0, &t.get(d)?, who)?;
        }
        // A directory moving to another parent has its `..` rewritten: it needs write
        // permission on it (as the kernel asks); so does the other one of an exchange.
        if parent != np {
            if srec.kind == Kind::Dir {
                perm::check(&srec, who, perm::MAY_WRITE)?;
            }
            if let (Some(d), true) = (dst, flags & 2 != 0) {
                let drec = t.get(d)?;
                if drec.kind == Kind::Dir {
                    perm::check(&drec, who, perm::MAY_WRITE)?;
                }
            }
        }
        // A directory may not move into itself or below itself.
        if srec.kind == Kind::Dir {
            refuse_move_below_itself(&t, src, np)?;
        }
        if flags & EXCHANGE != 0 {
            let dst =
                dst.ok_or_else(|| WireError::new(libc::ENOENT, "exchange target does not exist"))?;
            let drec = t.get(dst)?;
            if drec.kind == Kind::Dir {
                refuse_move_below_itself(&t, dst, parent)?;
            }
            let mut prec = t.get(parent)?;
            t.unlink(parent, &mut prec, name)?;
            t.put(parent, &prec)?;
            let mut nprec = t.get(np)?;
            t.unlink(np, &mut nprec, nn)?;
            t.link(np, &mut nprec, nn, src)?;
            t.put(np, &nprec)?;
            let mut prec = t.get(parent)?;
            t.link(parent, &mut prec, name, dst)?;
            if srec.kind == Kind::Dir && drec.kind != Kind::Dir && parent != np {
                prec.nlink -= 1;
                nprec.nlink += 1;
            } else if drec.kind == Kind::Dir && srec.kind != Kind::Dir && parent != np {
                prec.nlink += 1;
                nprec.nlink -= 1;
            }
            t.put(parent, &prec)?;
            if parent != np {
                t.put(np, &nprec)?;
            }
            let now = Time::now();
            for (ino, newp) in [(src, np), (dst, parent)] {
                let mut r = t.get(ino)?;
                r.ctime = now;
                if r.kind == Kind::Dir {
                    r.parent = newp;
                }
                t.put(ino, &r)?;
            }
            t.commit()?;
            return Ok((src, Some(dst)));
        }
        let mut reap = None;
        if let Some(dst) = dst {
            if flags & NOREPLACE != 0 {
                return Err(WireError::new(
                    libc::EEXIST,
                    format!("{} exists", String::from_utf8_lossy(nn)),
                ));
            }
            let mut drec = t.get(dst)?;
            match (srec.kind == Kind::Dir, drec.kind == Kind::Dir) {
                (true, false) => {
                    return Err(WireError::new(
                        libc::ENOTDIR,
                        "cannot replace a non-directory with a directory",
                    ))
                }
                (false, true) => {
                    return Err(WireError::new(
                        libc::EISDIR,
                        "cannot replace a directory with a non-directory",
                    ))
                }
                (true, true) if drec.entries > 0 => {
                    return Err(WireError::new(
                        libc::ENOTEMPTY,
                        "target directory not empty",
                    ))
                }
                _ => {}
            }
            let mut nprec = t.get(np)?;
            t.unlink(np, &mut nprec, nn)?;
            if drec.kind == Kind::Dir {
                nprec.nlink -= 1;
                drec.nlink = 0;
            } else {
                drec.nlink = drec.nlink.saturating_sub(1);
            }
            drec.ctime = Time::now();
            t.put(np, &nprec)?;
            t.put(dst, &drec)?;
            if drec.nlink == 0 {
                reap = Some(dst);
            }
        }
        let now = Time::now();
        let mut prec = t.get(parent)?;
        t.unlink(parent, &mut prec, name)?;
        prec.mtime = now;
        prec.ctime = now;
        if parent == np {
            t.link(np, &mut prec, nn, src)?;
            t.put(parent, &prec)?;
        } else {
            if srec.kind == Kind::Dir {
                prec.nlink -= 1;
            }
            t.put(parent, &prec)?;
            let mut nprec = t.get(np)?;
            t.link(np, &mut nprec, nn, src)?;
            if srec.kind == Kind::Dir {
                nprec.nlink += 1;
            }
            nprec.mtime = now;
            nprec.ctime = now;
            t.put(np, &nprec)?;
        }
        let mut srec = t.get(src)?;
        srec.ctime = now;
        if srec.kind == Kind::Dir {
            srec.parent = np;
        }
        t.put(src, &srec)?;
        t.commit()?;
        if let Some(d) = reap {
            self.maybe_reap(d)?;
        }
        Ok((src, dst))
    }

    fn setattr(&self, who: &Cred, ino: Ino, set: SetAttrs) -> R<Attr> {
        let mut t = self.store.begin()?;
        let mut rec = t.get(ino)?;
        let new_perm = perm::check_setattr(&rec, who, &set)?;
        if let Some(size) = set.size {
            match rec.kind {
                Kind::File => {
                    let _g = self.append_lock.lock().unwrap();
                    self.objects.truncate(ino, size).map_err(io_err)?;
                }
                Kind::Dir => {
                    return Err(WireError::new(libc::EISDIR, "cannot truncate a directory"))
                }
                _ => {
                    return Err(WireError::new(
                        libc::EINVAL,
                        "cannot truncate this kind of file",
                    ))
                }
            }
        }
        if let Some(p) = new_perm {
            rec.perm = p;
        }
        if let Some(uid) = set.uid {
            rec.uid = uid;
        }
        if let Some(gid) = set.gid {
            rec.gid = gid;
        }
        let resolve = |s: Option<SetTime>| {
            s.map(|s| match s {
                SetTime::Now => None,
                SetTime::At(t) => Some(t),
            })
        };
        let (at, mt) = (resolve(set.atime), resolve(set.mtime));
        if rec.kind == Kind::File {
            if at.is_some() || mt.is_some() {
                self.objects.set_times(ino, at, mt).map_err(io_err)?;
            }
        } else {
            let now = Time::now();
            if let Some(a) = at {
                rec.atime = a.unwrap_or(now);
            }
            if let Some(m) = mt {
                rec.mtime = m.unwrap_or(now);
            }
        }
        rec.ctime = Time::now();
        t.put(ino, &rec)?;
        t.commit()?;
        self.attr(ino, &rec)
    }

    fn pipe(&self, ino: Ino) -> Arc<Pipe> {
        self.pipes.lock().unwrap().entry(ino).or_default().clone()
    }

    /// Register an open. Returns the attributes, whether the client may cache the file
    /// for this open, and the other sessions that held it open when write-sharing began
    /// (they must drop their cached pages).
    /// `who` is checked for the access asked, unless it just created the file (`None`).
    fn open_file(
        &self,
        peer: u64,
        who: Option<&Cred>,
        ino: Ino,
        mode: OpenMode,
    ) -> R<(Attr, bool, Vec<u64>)> {
        let mut rec = self.store.get(ino)?;
        if let Some(who) = who {
            let mut want = 0;
            if mode.read {
                want |= perm::MAY_READ;
            }
            if mode.write || mode.truncate {
                want |= perm::MAY_WRITE;
            }
            perm::check(&rec, who, want)?;
        }
        if rec.kind == Kind::Dir && mode.write {
            return Err(WireError::new(
                libc::EISDIR,
                "cannot open a directory for writing",
            ));
        }
        if mode.write && rec.kind == Kind::File {
            let mut t = self.store.begin()?;
            rec = t.get(ino)?;
            rec.version += 1;
            t.put(ino, &rec)?;
            t.commit()?;
        }
        if mode.truncate && rec.kind == Kind::File {
            let _g = self.append_lock.lock().unwrap();
            self.objects.truncate(ino, 0).map_err(io_err)?;
        }
        let (cache, sharers) = {
            let mut opens = self.opens.lock().unwrap();
            let m = opens.entry(ino).or_default();
            let others: Vec<(u64, OpenCount)> = m
                .iter()
                .filter(|(s, _)| **s != peer)
                .map(|(s, c)| (*s, *c))
                .collect();
            let other_writer = others.iter().any(|(_, c)| c.writers > 0);
            let shared = other_writer || (mode.write && !others.is_empty());
            let c = m.entry(peer).or_default();
            let was_shared_for_me = c.uncached > 0;
            if mode.write {
                c.writers += 1;
            } else {
                c.readers += 1;
            }
            if shared {
                c.uncached += 1;
            }
            // Write-sharing begins now: holders that were caching must drop their pages.
            let sharers = if shared && !was_shared_for_me {
                others.iter().map(|(s, _)| *s).collect()
            } else {
                vec![]
            };
            (!shared, sharers)
        };
        if rec.kind == Kind::Pipe {
            let p = self.pipe(ino);
            let deadline = std::time::Instant::now() + PIPE_WAIT;
            let r = match (mode.read, mode.write) {
                (true, true) => p
                    .open_read(true, deadline)
                    .and_then(|_| p.open_write(true, deadline)),
                (_, true) => p.open_write(mode.nonblock, deadline),
                _ => p.open_read(mode.nonblock, deadline),
            };
            match r {
                Ok(()) => {}
                Err(PipeError::Again) => {
                    return Err(WireError::new(
                        libc::EAGAIN,
                        "pipe open registered; waiting for the other end",
                    ))
                }
                Err(e) => {
                    self.forget_open(peer, ino, mode);
                    return Err(WireError::new(e.errno(), e.to_string()));
                }
            }
            return Ok((self.attr(ino, &rec)?, false, vec![]));
        }
        Ok((self.attr(ino, &rec)?, cache, sharers))
    }

    fn forget_open(&self, peer: u64, ino: Ino, mode: OpenMode) {
        let mut opens = self.opens.lock().unwrap();
        if let Some(m) = opens.get_mut(&ino) {
            if let Some(c) = m.get_mut(&peer) {
                if mode.write {
                    c.writers = c.writers.saturating_sub(1);
                } else {
                    c.readers = c.readers.saturating_sub(1);
                }
                if c.readers == 0 && c.writers == 0 {
                    m.remove(&peer);
                }
            }
            if m.is_empty() {
                opens.remove(&ino);
            }
        }
    }

    fn close(&self, peer: u64, ino: Ino, mode: OpenMode) -> R<()> {
        self.forget_open(peer, ino, mode);
        match self.store.get(ino) {
            Ok(rec) if rec.kind == Kind::Pipe => {
                self.pipe(ino).close(mode.read, mode.write);
                Ok(())
            }
            Ok(rec) if rec.nlink == 0 => self.maybe_reap(ino),
            _ => Ok(()),
        }
    }

    fn write(
        &self,
        who: &Cred,
        ino: Ino,
        offset: u64,
        data: &[u8],
        append: bool,
        nonblock: bool,
    ) -> R<Response> {
        if data.len() > MAX_IO {
            return Err(WireError::new(
                libc::EINVAL,
                format!("write of {} bytes exceeds {MAX_IO}", data.len()),
            ));
        }
        let rec = self.store.get(ino)?;
        perm::check_io(&rec, who, perm::MAY_WRITE)?;
        if rec.kind == Kind::Pipe {
            let n = self
                .pipe(ino)
                .write(data, nonblock, std::time::Instant::now() + PIPE_WAIT)
                .map_err(|e| WireError::new(e.errno(), e.to_string()))?;
            self.counters
                .bytes_written
                .fetch_add(n as u64, Ordering::Relaxed);
            return Ok(Response::Written {
                size: n as u32,
                attr: self.attr(ino, &rec)?,
            });
        }
        if rec.kind != Kind::File {
            return Err(WireError::new(libc::EISDIR, "not a regular file"));
        }
        if append {
            let _g = self.append_lock.lock().unwrap();
            self.objects.append(ino, data).map_err(io_err)?;
        } else {
            offset
                .checked_add(data.len() as u64)
                .filter(|e| *e <= i64::MAX as u64)
                .ok_or_else(|| WireError::new(libc::EFBIG, "offset too large"))?;
            self.objects.write(ino, offset, data).map_err(io_err)?;
        }
        self.counters
            .bytes_written
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        Ok(Response::Written {
            size: data.len() as u32,
            attr: self.attr(ino, &rec)?,
        })
    }

    fn readdir(&self, who: &Cred, ino: Ino, offset: u64, max: u32) -> R<Vec<DirEntry>> {
        let rec = self.store.get(ino)?;
        if rec.kind != Kind::Dir {
            return Err(WireError::new(libc::ENOTDIR, "not a directory"));
        }
        perm::check(&rec, who, perm::MAY_READ)?;
        let max = max.clamp(1, 4096) as usize;
        let mut out = Vec::new();
        if offset < 1 {
            out.push(DirEntry {
                name: b".".to_vec(),
                cookie: 1,
                attr: self.attr(ino, &rec)?,
            });
        }
        if offset < 2 {
            let p = self.store.get(rec.parent)?;
            out.push(DirEntry {
                name: b"..".to_vec(),
                cookie: 2,
                attr: self.attr(rec.parent, &p)?,
            });
        }
        for (cookie, name, child) in self.store.list(ino, offset.max(2), max)? {
            match self.store.get(child) {
                Ok(c) => out.push(DirEntry {
                    name,
                    cookie,
                    attr: self.attr(child, &c)?,
                }),
                Err(e) => warn!(ino, child, "dangling directory entry: {e}"),
            }
        }
        Ok(out)
    }

    fn statfs(&self) -> R<Response> {
        let mut s: libc::statvfs = unsafe_zeroed_statvfs();
        let p = std::ffi::CString::new(self.data_dir.as_os_str().as_encoded_bytes())
            .map_err(|_| WireError::new(libc::EINVAL, "data dir path"))?;
        // SAFETY: `p` is a valid NUL-terminated path and `s` a writable statvfs.
        if unsafe { libc::statvfs(p.as_ptr(), &mut s) } != 0 {
            return Err(io_err(std::io::Error::last_os_error()));
        }
        let used = self.store.inode_count()?;
        Ok(Response::StatFs {
            blocks: s.f_blocks * s.f_frsize / 4096,
            bfree: s.f_bfree * s.f_frsize / 4096,
            bavail: s.f_bavail * s.f_frsize / 4096,
            files: used + s.f_ffree,
            ffree: s.f_ffree,
            bsize: 4096,
            namelen: NAME_MAX as u32,
        })
    }

    fn setxattr(&self, who: &Cred, ino: Ino, name: &[u8], value: &[u8], flags: i32) -> R<()> {
        perm::check_xattr(&self.store.get(ino)?, who, name, true)?;
        if name == PIPE_XATTR {
            let mut t = self.store.begin()?;
            let mut rec = t.get(ino)?;
            match rec.kind {
                Kind::Pipe => return Ok(()),
                Kind::File if self.objects.stat(ino).map_err(io_err)?.size == 0 => {
                    rec.kind = Kind::Pipe;
                    rec.ctime = Time::now();
                    t.put(ino, &rec)?;
                    t.commit()?;
                    let _ = self.objects.remove(ino);
                    return Ok(());
                }
                _ => {
                    return Err(WireError::new(
                        libc::EINVAL,
                        "only an empty regular file can become a cluster pipe",
                    ))
                }
            }
        }
        if name.is_empty() || name.len() > 255 {
            return Err(WireError::new(
                libc::ERANGE,
                "xattr name must be 1 to 255 bytes",
            ));
        }
        if value.len() > 65536 {
            return Err(WireError::new(
                libc::E2BIG,
                "xattr value larger than 64 KiB",
            ));
        }
        let mut t = self.store.begin()?;
        let mut rec = t.get(ino)?;
        let exists = t.get_xattr(ino, name)?.is_some();
        if flags & libc::XATTR_CREATE != 0 && exists {
            return Err(WireError::new(libc::EEXIST, "xattr exists"));
        }
        if flags & libc::XATTR_REPLACE != 0 && !exists {
            return Err(WireError::new(libc::ENODATA, "no such xattr"));
        }
        t.set_xattr(ino, name, value)?;
        rec.ctime = Time::now();
        t.put(ino, &rec)?;
        t.commit()?;
        Ok(())
    }

    fn dispatch(&self, peer: &Arc<PeerHandle>, req: Request) -> R<Response> {
        Ok(match req {
            Request::Ping => Response::Pong,
            Request::Lookup { cred, parent, name } => {
                if name.is_empty() || name.contains(&b'/') || name.contains(&0) {
                    return Err(WireError::new(
                        libc::EINVAL,
                        format!("invalid file name {:?}", String::from_utf8_lossy(&name)),
                    ));
                }
                if name.len() > NAME_MAX {
                    return Err(WireError::new(
                        libc::ENAMETOOLONG,
                        format!(
                            "file name of {} bytes is longer than {NAME_MAX}",
                            name.len()
                        ),
                    ));
                }
                let prec = self.store.get(parent)?;
                if prec.kind != Kind::Dir {
                    return Err(WireError::new(libc::ENOTDIR, "not a directory"));
                }
                perm::check_search(&prec, &self.who(peer, &cred)?)?;
                let ino = match name.as_slice() {
                    b"." => parent,
                    b".." => prec.parent,
                    _ => self.store.lookup(parent, &name)?.ok_or_else(|| {
                        WireError::new(
                            libc::ENOENT,
                            format!("{} does not exist", String::from_utf8_lossy(&name)),
                        )
                    })?,
                };
                self.watch(peer.session, ino);
                self.settle(peer, ino)?;
                Response::Entry(self.getattr(ino)?)
            }
            Request::GetAttr { ino } => Response::Attr(self.getattr(ino)?),
            Request::SetAttr { cred, ino, set } => {
                let a = self.setattr(&self.who(peer, &cred)?, ino, set)?;
                self.changed(peer, &[ino]);
                Response::Attr(a)
            }
            Request::ReadLink { ino } => {
                let rec = self.store.get(ino)?;
                if rec.kind != Kind::Symlink {
                    return Err(WireError::new(libc::EINVAL, "not a symlink"));
                }
                Response::Data(rec.target)
            }
            Request::MkNod {
                cred,
                parent,
                name,
                mode,
                rdev,
            } => {
                let kind = kind_of_mode(mode)?;
                if kind == Kind::Dir || kind == Kind::Symlink {
                    return Err(WireError::new(libc::EINVAL, "use mkdir or symlink"));
                }
                let a = self
                    .new_child(
                        peer.session,
                        &self.who(peer, &cred)?,
                        parent,
                        &name,
                        kind,
                        mode,
                        rdev,
                        &[],
                        true,
                    )?
                    .0;
                self.changed(peer, &[parent]);
                Response::Entry(a)
            }
            Request::Mkdir {
                cred,
                parent,
                name,
                mode,
            } => {
                let a = self
                    .new_child(
                        peer.session,
                        &self.who(peer, &cred)?,
                        parent,
                        &name,
                        Kind::Dir,
                        mode,
                        0,
                        &[],
                        true,
                    )?
                    .0;
                self.changed(peer, &[parent]);
                Response::Entry(a)
            }
            Request::Create {
                cred,
                parent,
                name,
                mode,
                excl,
                mode_open,
            } => {
                let who = self.who(peer, &cred)?;
                let (attr, created) = self.new_child(
                    peer.session,
                    &who,
                    parent,
                    &name,
                    Kind::File,
                    mode,
                    0,
                    &[],
                    excl,
                )?;
                self.changed(peer, &[parent]);
                if !created {
                    // An existing file opened (maybe truncated) through create: another
                    // client's delayed writes go back first.
                    self.settle(peer, attr.ino)?;
                }
                let (attr, cache, sharers) = self.open_file(
                    peer.session,
                    (!created).then_some(&who),
                    attr.ino,
                    mode_open,
                )?;
                if mode_open.truncate && !created {
                    self.changed(peer, &[attr.ino]);
                }
                self.call_back(&sharers, attr.ino);
                self.note_writer(peer, &attr, mode_open);
                Response::Opened { attr, cache }
            }
            Request::Symlink {
                cred,
                parent,
                name,
                target,
            } => {
                if target.is_empty() || target.len() > 4095 {
                    return Err(WireError::new(
                        libc::ENAMETOOLONG,
                        "symlink target must be 1 to 4095 bytes",
                    ));
                }
                let a = self
                    .new_child(
                        peer.session,
                        &self.who(peer, &cred)?,
                        parent,
                        &name,
                        Kind::Symlink,
                        0o777,
                        0,
                        &target,
                        true,
                    )?
                    .0;
                self.changed(peer, &[parent]);
                Response::Entry(a)
            }
            Request::Link {
                cred,
                ino,
                new_parent,
                new_name,
            } => {
                check_name(&new_name)?;
                let who = self.who(peer, &cred)?;
                let mut t = self.store.begin()?;
                let mut rec = t.get(ino)?;
                if rec.kind == Kind::Dir {
                    return Err(WireError::new(libc::EPERM, "cannot hard-link a directory"));
                }
                if rec.nlink == 0 {
                    return Err(WireError::new(libc::ENOENT, "file was removed"));
                }
                let mut prec = t.get(new_parent)?;
                if prec.kind != Kind::Dir {
                    return Err(WireError::new(libc::ENOTDIR, "not a directory"));
                }
                perm::check_dir_write(&prec, &who)?;
                if t.lookup(new_parent, &new_name)?.is_some() {
                    return Err(WireError::new(
                        libc::EEXIST,
                        format!("{} exists", String::from_utf8_lossy(&new_name)),
                    ));
                }
                t.link(new_parent, &mut prec, &new_name, ino)?;
                let now = Time::now();
                prec.mtime = now;
                prec.ctime = now;
                rec.nlink += 1;
                rec.ctime = now;
                t.put(new_parent, &prec)?;
                t.put(ino, &rec)?;
                t.commit()?;
                self.changed(peer, &[ino, new_parent]);
                Response::Entry(self.attr(ino, &rec)?)
            }
            Request::Unlink { cred, parent, name } => {
                let child = self.unlink(&self.who(peer, &cred)?, parent, &name, false)?;
                self.changed(peer, &[parent, child]);
                Response::Ok
            }
            Request::Rmdir { cred, parent, name } => {
                let child = self.unlink(&self.who(peer, &cred)?, parent, &name, true)?;
                self.changed(peer, &[parent, child]);
                Response::Ok
            }
            Request::Rename {
                cred,
                parent,
                name,
                new_parent,
                new_name,
                flags,
            } => {
                let who = self.who(peer, &cred)?;
                let (src, dst) = self.rename(&who, parent, &name, new_parent, &new_name, flags)?;
                let mut inos = vec![parent, new_parent, src];
                inos.extend(dst);
                self.changed(peer, &inos);
                Response::Ok
            }
            Request::Open { cred, ino, mode } => {
                let who = self.who(peer, &cred)?;
                let (attr, cache, sharers) = self.open_file(peer.session, Some(&who), ino, mode)?;
                if mode.truncate {
                    self.changed(peer, &[ino]);
                }
                self.call_back(&sharers, ino);
                self.note_writer(peer, &attr, mode);
                Response::Opened { attr, cache }
            }
            Request::Close { ino, mode } => {
                self.close(peer.session, ino, mode)?;
                Response::Ok
            }
            Request::Read {
                cred,
                ino,
                offset,
                size,
                nonblock,
            } => {
                let rec = self.store.get(ino)?;
                perm::check_io(&rec, &self.who(peer, &cred)?, perm::MAY_READ)?;
                if rec.kind == Kind::Pipe {
                    let d = self
                        .pipe(ino)
                        .read(
                            (size as usize).min(MAX_IO),
                            nonblock,
                            std::time::Instant::now() + PIPE_WAIT,
                        )
                        .map_err(|e| WireError::new(e.errno(), e.to_string()))?;
                    self.counters
                        .bytes_read
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                    return Ok(Response::Data(d));
                }
                if rec.kind != Kind::File {
                    return Err(WireError::new(libc::EISDIR, "not a regular file"));
                }
                let data = self
                    .objects
                    .read(ino, offset, (size as usize).min(MAX_IO))
                    .map_err(io_err)?;
                self.counters
                    .bytes_read
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                Response::Data(data)
            }
            Request::Write {
                cred,
                ino,
                offset,
                data,
                append,
                nonblock,
            } => {
                let who = self.who(peer, &cred)?;
                let r = self.write(&who, ino, offset, &data, append, nonblock)?;
                if !matches!(&r, Response::Written { attr, .. } if attr.kind == Kind::Pipe) {
                    self.changed(peer, &[ino]);
                }
                r
            }
            Request::PipeAwait { ino, writer } => {
                let p = self.pipe(ino);
                let deadline = std::time::Instant::now() + PIPE_WAIT;
                let r = if writer {
                    p.await_reader(deadline)
                } else {
                    p.await_writer(deadline)
                };
                r.map_err(|e| {
                    WireError::new(e.errno(), "still waiting for the other end of the pipe")
                })?;
                Response::Ok
            }
            Request::Fsync { ino } => {
                if self.store.get(ino)?.kind == Kind::File {
                    self.objects.sync(ino).map_err(io_err)?;
                }
                self.store.sync()?;
                Response::Ok
            }
            Request::ReadDir {
                cred,
                ino,
                offset,
                max,
            } => {
                let mut es = self.readdir(&self.who(peer, &cred)?, ino, offset, max)?;
                // Entries whose files another client may hold delayed writes for: have them
                // written back, then read their attributes again.
                let held: Vec<usize> = {
                    let w = self.writers.lock().unwrap();
                    es.iter()
                        .enumerate()
                        .filter(|(_, e)| {
                            w.get(&e.attr.ino)
                                .is_some_and(|m| m.keys().any(|s| *s != peer.session))
                        })
                        .map(|(i, _)| i)
                        .collect()
                };
                for i in held {
                    self.settle(peer, es[i].attr.ino)?;
                    es[i].attr = self.getattr(es[i].attr.ino)?;
                }
                Response::Entries(es)
            }
            Request::StatFs => self.statfs()?,
            Request::SetXattr {
                cred,
                ino,
                name,
                value,
                flags,
            } => {
                self.setxattr(&self.who(peer, &cred)?, ino, &name, &value, flags)?;
                self.changed(peer, &[ino]);
                Response::Ok
            }
            Request::GetXattr { cred, ino, name } => {
                perm::check_xattr(&self.store.get(ino)?, &self.who(peer, &cred)?, &name, false)?;
                Response::Xattr(
                    self.store
                        .get_xattr(ino, &name)?
                        .ok_or_else(|| WireError::new(libc::ENODATA, "no such xattr"))?,
                )
            }
            Request::ListXattr { cred, ino } => {
                self.store.get(ino)?;
                let who = self.who(peer, &cred)?;
                let mut out = Vec::new();
                for n in self.store.list_xattrs(ino)? {
                    if !perm::lists_xattr(&who, &n) {
                        continue;
                    }
                    out.extend_from_slice(&n);
                    out.push(0);
                }
                Response::Xattr(out)
            }
            Request::RemoveXattr { cred, ino, name } => {
                perm::check_xattr(&self.store.get(ino)?, &self.who(peer, &cred)?, &name, true)?;
                let mut t = self.store.begin()?;
                if !t.remove_xattr(ino, &name)? {
                    return Err(WireError::new(libc::ENODATA, "no such xattr"));
                }
                let mut rec = t.get(ino)?;
                rec.ctime = Time::now();
                t.put(ino, &rec)?;
                t.commit()?;
                self.changed(peer, &[ino]);
                Response::Ok
            }
            Request::Fallocate {
                cred,
                ino,
                offset,
                length,
                mode,
            } => {
                let rec = self.store.get(ino)?;
                perm::check_io(&rec, &self.who(peer, &cred)?, perm::MAY_WRITE)?;
                if rec.kind != Kind::File {
                    return Err(WireError::new(libc::ENODEV, "not a regular file"));
                }
                self.objects
                    .fallocate(ino, mode, offset, length)
                    .map_err(io_err)?;
                self.changed(peer, &[ino]);
                Response::Ok
            }
            Request::Stats => Response::Stats(self.stats()),
            Request::Naming(payload) => {
                let h = self.naming.read().unwrap().clone();
                match h {
                    Some(h) => Response::Naming(h(payload)?),
                    None => {
                        return Err(WireError::new(
                            libc::EOPNOTSUPP,
                            "this server hosts no registry replica",
                        ))
                    }
                }
            }
            Request::Exec(_)
            | Request::JobWait { .. }
            | Request::JobSignal { .. }
            | Request::JobList
            | Request::MigrateOut { .. }
            | Request::MigrateIn { .. }
            | Request::JobStats
            | Request::Evict { .. } => {
                return Err(WireError::new(
                    libc::EOPNOTSUPP,
                    "this is a file server, not a workstation agent (port 7071)",
                ))
            }
        })
    }

    /// Call back every other client that may cache attributes or pages of one of `inos`, and
    /// wait until each has dropped its copy (bounded by the rpc callback timeout). Called
    /// after the change is committed and with no lock held.
    ///
    /// Names are not called back: clients do not cache name lookups at all (entry TTL 0, as
    /// Sprite clients did not cache directories), because a kernel's entry invalidation
    /// takes the directory lock and two hosts changing one directory would wait on each
    /// other.
    fn changed(&self, origin: &Arc<PeerHandle>, inos: &[Ino]) {
        let mut calls: Vec<(u64, Callback)> = Vec::new();
        {
            let mut interest = self.interest.lock().unwrap();
            for ino in inos {
                if let Some(set) = interest.cachers.get_mut(ino) {
                    let others: Vec<u64> = set
                        .iter()
                        .copied()
                        .filter(|s| *s != origin.session)
                        .collect();
                    for s in others {
                        set.remove(&s);
                        calls.push((s, Callback::InvalidateInode { ino: *ino }));
                    }
                }
            }
        }
        self.send_callbacks(calls);
    }

    /// Remember that `session` may hold delayed writes for `ino` (it opened the regular
    /// file to write), and call back every other client that may cache it: their copies go
    /// stale without a single write reaching the server while the writes are delayed.
    fn note_writer(&self, peer: &Arc<PeerHandle>, attr: &Attr, mode: OpenMode) {
        if !mode.write || attr.kind != Kind::File {
            return;
        }
        let n = self.writer_opens.fetch_add(1, Ordering::Relaxed) + 1;
        self.writers
            .lock()
            .unwrap()
            .entry(attr.ino)
            .or_default()
            .insert(peer.session, n);
        self.changed(peer, &[attr.ino]);
    }

    /// Record that `session` may cache `ino` (attributes, pages, or a directory's names).
    /// Done *before* the state is read for the reply, so a change committed after the read
    /// always finds the session and calls it back.
    fn watch(&self, session: u64, ino: Ino) {
        self.interest
            .lock()
            .unwrap()
            .cachers
            .entry(ino)
            .or_default()
            .insert(session);
    }

    /// Before `peer` looks at `ino`, every other client that opened it for writing writes
    /// back its delayed blocks. One that still has it open for writing is also switched to
    /// write-through (`InvalidateInode`: its later writes reach the server, which calls the
    /// cachers back); one that closed it gets `WriteBack` (it cannot write again without an
    /// open, which registers it again). A writer that does not manage it within
    /// [`WRITEBACK_WAIT`] fails this request with EIO (never stale data); a writer that is
    /// gone has lost them (they were never fsynced).
    fn settle(&self, peer: &Arc<PeerHandle>, ino: Ino) -> R<()> {
        let others: Vec<(u64, u64)> = match self.writers.lock().unwrap().get(&ino) {
            Some(m) => m
                .iter()
                .filter(|(s, _)| **s != peer.session)
                .map(|(s, n)| (*s, *n))
                .collect(),
            None => return Ok(()),
        };
        if others.is_empty() {
            return Ok(());
        }
        let open_for_write: Vec<u64> = {
            let opens = self.opens.lock().unwrap();
            others
                .iter()
                .map(|(s, _)| *s)
                .filter(|s| {
                    opens
                        .get(&ino)
                        .and_then(|m| m.get(s))
                        .is_some_and(|c| c.writers > 0)
                })
                .collect()
        };
        let results = self.send_callbacks_within(
            others
                .iter()
                .map(|(s, _)| {
                    let cb = if open_for_write.contains(s) {
                        Callback::InvalidateInode { ino }
                    } else {
                        Callback::WriteBack { ino }
                    };
                    (*s, cb)
                })
                .collect(),
            WRITEBACK_WAIT,
        );
        for (name, r) in &results {
            match r {
                Ok(()) => {}
                Err(e) if e.errno == libc::ENOTCONN => {
                    warn!(ino, writer = %name, "writer gone before writing back: its unsynced writes are lost")
                }
                Err(e) => {
                    return Err(WireError::new(
                        libc::EIO,
                        format!(
                        "{name} holds delayed writes for this file and did not write them back: {}",
                        e.msg
                    ),
                    ))
                }
            }
        }
        // Writers that had closed the file are clean now, unless they opened it again
        // meanwhile (a newer open number); the others write through until their next open.
        let mut w = self.writers.lock().unwrap();
        if let Some(m) = w.get_mut(&ino) {
            for (s, n) in &others {
                if m.get(s) == Some(n) {
                    m.remove(s);
                }
            }
            if m.is_empty() {
                w.remove(&ino);
            }
        }
        Ok(())
    }

    /// Tell `sessions` to drop their cached copy of `ino` (write-sharing began).
    fn call_back(&self, sessions: &[u64], ino: Ino) {
        self.send_callbacks(
            sessions
                .iter()
                .map(|s| (*s, Callback::InvalidateInode { ino }))
                .collect(),
        );
    }

    /// Send each (session, callback) and wait until every client has answered (each wait
    /// bounded by the rpc layer). Called with no lock held.
    fn send_callbacks(&self, calls: Vec<(u64, Callback)>) {
        for (name, r) in self.send_callbacks_within(calls, wisp_proto::rpc::CALLBACK_TIMEOUT) {
            if let Err(e) = r {
                warn!(peer = %name, "callback failed: {e}");
            }
        }
    }

    /// Send each (session, callback) in parallel and wait for every answer, at most
    /// `limit`. Sessions no longer connected are skipped.
    fn send_callbacks_within(
        &self,
        calls: Vec<(u64, Callback)>,
        limit: std::time::Duration,
    ) -> Vec<(String, Result<(), WireError>)> {
        if calls.is_empty() {
            return vec![];
        }
        let peers = self.peers.lock().unwrap().clone();
        let futs: Vec<_> = calls
            .into_iter()
            .filter_map(|(s, cb)| peers.get(&s).cloned().map(|p| (p, cb)))
            .map(|(p, cb)| async move { (p.name.clone(), p.callback_within(cb, limit).await) })
            .collect();
        self.counters
            .callbacks
            .fetch_add(futs.len() as u64, Ordering::Relaxed);
        tokio::runtime::Handle::current().block_on(futures::future::join_all(futs))
    }

    pub fn stats(&self) -> ServerStats {
        ServerStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            bytes_read: self.counters.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.counters.bytes_written.load(Ordering::Relaxed),
            callbacks: self.counters.callbacks.load(Ordering::Relaxed),
            clients: self.peers.lock().unwrap().len() as u64,
        }
    }
}

fn unsafe_zeroed_statvfs() -> libc::statvfs {
    // SAFETY: statvfs is a plain C struct of integers; all-zero is a valid value.
    unsafe { std::mem::zeroed() }
}

impl Service for FsServer {
    fn call(&self, peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError> {
        // File system requests only: registry traffic (heartbeats, Raft) is the naming
        // crate's to count.
        if !matches!(req, Request::Naming(_)) {
            self.counters.requests.fetch_add(1, Ordering::Relaxed);
            tracing::trace!(peer = %peer.name, "request {}", format!("{req:?}").split([' ', '{', '(']).next().unwrap_or("?"));
        }
        self.peers
            .lock()
            .unwrap()
            .entry(peer.session)
            .or_insert_with(|| peer.clone());
        if self.restarted {
            let until = *self
                .recovering_until
                .get_or_init(|| std::time::Instant::now() + RECOVERY_GRACE);
            let reads = matches!(
                req,
                Request::Lookup { .. }
                    | Request::ReadDir { .. }
                    | Request::GetAttr { .. }
                    | Request::Read { .. }
                    | Request::Open { .. }
            );
            let left = until.saturating_duration_since(std::time::Instant::now());
            if reads && !left.is_zero() {
                std::thread::sleep(left);
            }
        }
        // Register interest before the state is read, and have other clients' delayed
        // writes written back before this one looks at the file.
        match &req {
            Request::Lookup { parent: ino, .. }
            | Request::ReadDir { ino, .. }
            | Request::GetXattr { ino, .. }
            | Request::ListXattr { ino, .. } => self.watch(peer.session, *ino),
            Request::GetAttr { ino }
            | Request::Read { ino, .. }
            | Request::Open { ino, .. }
            | Request::SetAttr { ino, .. }
            | Request::Fallocate { ino, .. }
            | Request::Link { ino, .. } => {
                self.watch(peer.session, *ino);
                self.settle(peer, *ino)?;
            }
            // Not settled: a client flushing its own delayed writes must never wait for
            // another's (two flushes would wait on each other), and a write-shared file
            // has no delayed writes anywhere (its opens write through).
            Request::Write { ino, .. } => self.watch(peer.session, *ino),
            _ => {}
        }
        let resp = match self.dispatch(peer, req) {
            Ok(r) => r,
            Err(e) => {
                if e.errno == libc::EACCES || e.errno == libc::EPERM {
                    self.denied.fetch_add(1, Ordering::Relaxed);
                }
                return Err(e);
            }
        };
        let s = peer.session;
        let mut interest = self.interest.lock().unwrap();
        match &resp {
            Response::Attr(a)
            | Response::Entry(a)
            | Response::Written { attr: a, .. }
            | Response::Opened { attr: a, .. } => {
                interest.cachers.entry(a.ino).or_default().insert(s);
            }
            Response::Entries(es) => {
                for e in es {
                    interest.cachers.entry(e.attr.ino).or_default().insert(s);
                }
            }
            _ => {}
        }
        Ok(resp)
    }

    fn disconnected(&self, peer: &Arc<PeerHandle>) {
        self.peers.lock().unwrap().remove(&peer.session);
        self.writers.lock().unwrap().retain(|_, m| {
            m.remove(&peer.session);
            !m.is_empty()
        });
        {
            let mut i = self.interest.lock().unwrap();
            i.cachers.retain(|_, s| {
                s.remove(&peer.session);
                !s.is_empty()
            });
        }
        let closed: Vec<(Ino, OpenCount)> = {
            let mut opens = self.opens.lock().unwrap();
            let mut closed = Vec::new();
            opens.retain(|ino, m| {
                if let Some(c) = m.remove(&peer.session) {
                    closed.push((*ino, c));
                }
                !m.is_empty()
            });
            closed
        };
        for (ino, c) in closed {
            if let Some(p) = self.pipes.lock().unwrap().get(&ino).cloned() {
                for _ in 0..c.readers {
                    p.close(true, false);
                }
                for _ in 0..c.writers {
                    p.close(false, true);
                }
            }
            if let Ok(rec) = self.store.get(ino) {
                if rec.nlink == 0 {
                    let _ = self.maybe_reap(ino);
                }
            }
        }
    }
}

/// Run a server on `listener` until `shutdown` resolves.
pub async fn run(
    server: Arc<FsServer>,
    listener: tokio::net::TcpListener,
    key: wisp_proto::key::ClusterKey,
    shutdown: impl std::future::Future<Output = ()>,
) {
    wisp_proto::rpc::serve(listener, key, server, shutdown).await
}
