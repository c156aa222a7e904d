//! The FUSE file system: kernel requests in, wisp-proto requests out.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::*;
use tracing::{debug, info};
use wisp_proto::identity::Identity;
use wisp_proto::msg::{
    self, Attr, Callback, Cred, Kind, OpenMode, Request as Rq, Response as Rs, SetAttrs, SetTime,
    WireError,
};
use wisp_proto::rpc::{CallbackHandler, RpcClient, RpcError};

use crate::cache::{Hit, Meta, WriteBack};
use crate::domains::{self, child_path, join, split, Domain, DomainSource, Domains};
use crate::notify;
use crate::stream::{self, DevOpen, Op, PollState, Target};
use crate::{CACHE_TTL, ENTRY_TTL};

/// Errors mounting the file system.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot mount at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach file server {addr}: {source}")]
    Server { addr: String, source: RpcError },
}

/// What a workstation needs to mount a domain.
#[derive(Clone)]
pub struct MountOptions {
    pub server: String,
    pub mountpoint: PathBuf,
    pub key: Identity,
    /// Name this host gives the server (its host name).
    pub host: String,
    /// Bound on any one wait for the server; after it the caller gets EIO.
    pub call_timeout: Duration,
    /// FUSE worker threads.
    pub threads: usize,
    /// Cache names and attributes in this client (callback-invalidated). Off: every
    /// lookup and attribute fetch asks the server (for comparison).
    pub cache_names: bool,
    /// Most names and attributes kept.
    pub cache_entries: usize,
    /// How long a written block may stay on this client before it is written back
    /// (Sprite: 30 s). Zero: write-through.
    pub writeback_delay: Duration,
    /// Most delayed-write bytes held before writers wait for a write-back.
    pub dirty_max: u64,
    /// Where the other domains are (prefix -> server); None: only `server`'s tree.
    pub domains: Option<DomainSource>,
}

impl MountOptions {
    /// Defaults for everything but where to mount and what to talk to.
    pub fn new(server: String, mountpoint: PathBuf, key: Identity, host: String) -> Self {
        MountOptions {
            server,
            mountpoint,
            key,
            host,
            call_timeout: Duration::from_secs(60),
            threads: 16,
            cache_names: true,
            cache_entries: 200_000,
            writeback_delay: Duration::from_secs(30),
            dirty_max: 256 << 20,
            domains: None,
        }
    }
}

/// A mounted file system; dropping it unmounts.
pub struct Mounted {
    session: Option<BackgroundSession>,
    pub rpc: RpcClient,
    pub stats: Arc<ClientStats>,
    mountpoint: PathBuf,
    core: Arc<Core>,
}

impl Mounted {
    /// Write back every delayed write now (as on unmount).
    pub fn sync(&self) {
        self.core.flush_all();
    }

    /// Write back every delayed write, unmount and wait for the FUSE session to end.
    pub fn unmount(mut self) -> std::io::Result<()> {
        self.core.flush_all();
        match self.session.take() {
            Some(s) => s.umount_and_join(),
            None => Ok(()),
        }
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Wait until the FUSE session ends (someone unmounted it).
    pub fn join(mut self) -> std::io::Result<()> {
        match self.session.take() {
            Some(s) => s.join(),
            None => Ok(()),
        }
    }
}

/// Counters a client keeps (exported as metrics).
#[derive(Default, Debug)]
pub struct ClientStats {
    pub rpcs: AtomicU64,
    /// Total time spent waiting for the server, in microseconds (with `rpcs`: mean latency).
    pub rpc_micros: AtomicU64,
    pub callbacks: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    /// Lookups and attribute fetches answered from this client's cache.
    pub meta_hits: AtomicU64,
    /// Bytes written back to the server after a delay (part of `bytes_written`).
    pub written_back: AtomicU64,
    /// Delayed-write bytes dropped because the file was removed first.
    pub discarded: AtomicU64,
}

struct Handle {
    ino: u64,
    mode: OpenMode,
    append: bool,
    /// A stream (cluster pipe or pseudo-device): its reads, writes and polls run as tasks
    /// (crate::stream), and blocking ones are re-asked until they complete.
    pipe: bool,
    /// A pseudo-device's open on its serving host.
    dev: Option<DevOpen>,
    /// Poll waiter state of a stream.
    poll: Arc<PollState>,
    /// Writes may be delayed (the open was cacheable and write-back is on).
    delayed: bool,
}

/// What both the FUSE threads and the callback handler use: the connection and the caches.
struct Core {
    domains: Domains,
    /// The connection generation the cached names and attributes belong to.
    cache_gen: AtomicU64,
    rt: tokio::runtime::Handle,
    stats: Arc<ClientStats>,
    meta: Meta,
    wb: WriteBack,
}

/// Write-backs of one file sent at once.
const FLUSH_PARALLEL: usize = 8;

impl Core {
    /// Write back `ino`'s delayed writes, and return once the server has them.
    fn flush(&self, ino: u64) -> Result<(), RpcError> {
        // Nothing held or in flight: no lock either (a callback must never wait behind
        // another file's write-back that shares the stripe; two hosts flushing would wait on
        // each other). A write-back of this file in flight is waited for (the stripe), so
        // "written back" is never said before the server has the data.
        if !self.wb.holds(ino) {
            return Ok(());
        }
        let _g = self.wb.stripe(ino);
        let Some(d) = self.wb.take(ino) else {
            return Ok(());
        };
        let mut chunks = Vec::new();
        for (off, buf) in &d.extents {
            let mut at = 0usize;
            while at < buf.len() {
                let n = (buf.len() - at).min(wisp_proto::MAX_IO);
                chunks.push((off + at as u64, &buf[at..at + n]));
                at += n;
            }
        }
        let mut res = Ok(());
        for batch in chunks.chunks(FLUSH_PARALLEL) {
            let calls = batch.iter().map(|(off, data)| {
                self.domains.call(Rq::Write {
                    ino,
                    offset: *off,
                    data: data.to_vec(),
                    append: false,
                    nonblock: false,
                })
            });
            self.stats
                .rpcs
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            for r in self.rt.block_on(futures::future::join_all(calls)) {
                match r {
                    Ok(_) => {}
                    // Removed on the server meanwhile: nothing to keep.
                    Err(RpcError::Remote(w)) if w.errno == libc::ENOENT => {}
                    Err(e) => res = Err(e),
                }
            }
            if res.is_err() {
                break;
            }
        }
        self.meta.changed(&[ino], &[]);
        match res {
            Ok(()) => {
                self.stats
                    .written_back
                    .fetch_add(d.bytes, Ordering::Relaxed);
                self.stats
                    .bytes_written
                    .fetch_add(d.bytes, Ordering::Relaxed);
                self.wb.done(ino, None);
                Ok(())
            }
            // The server refused the data for good: it is dropped (as a local file system
            // drops dirty pages it cannot write) and the error goes to the next close/fsync.
            Err(RpcError::Remote(w))
                if [libc::ENOSPC, libc::EFBIG, libc::EDQUOT, libc::EROFS].contains(&w.errno) =>
            {
                tracing::warn!(
                    ino,
                    bytes = d.bytes,
                    "write-back refused, data dropped: {w}"
                );
                self.wb.failed(ino, w.errno);
                Err(RpcError::Remote(w))
            }
            Err(e) => {
                tracing::warn!(ino, "write-back failed, kept for a retry: {e}");
                self.wb.done(ino, Some(d));
                Err(e)
            }
        }
    }

    /// Whether cached names and attributes may answer now: only while every connection is
    /// up and none was re-established since they were cached (a server that restarted, or
    /// dropped us after a lease, no longer calls us back for them). Otherwise they are
    /// dropped and requests go to the servers.
    fn cache_ok(&self) -> bool {
        let gen = self.domains.connections();
        if self.cache_gen.swap(gen, Ordering::Relaxed) != gen {
            self.meta.clear();
            return false;
        }
        self.domains.all_up()
    }

    /// Write back everything held, oldest first.
    fn flush_all(&self) {
        for ino in self.wb.older_than(Duration::ZERO) {
            let _ = self.flush(ino);
        }
    }

    /// A server callback, applied to this client's own caches before the kernel's.
    fn on_callback(&self, cb: &Callback) -> Result<(), WireError> {
        let flush = |ino: u64| {
            self.flush(ino)
                .map_err(|e| WireError::new(e.errno(), format!("write-back failed: {e}")))
        };
        match cb {
            Callback::WriteBack { ino } => flush(*ino),
            Callback::InvalidateInode { ino } => {
                // Another client changed it, or opened it while we write: what we hold
                // goes back first, and writes go through until our next cacheable open.
                if self.wb.enabled() {
                    self.wb.set_cacheable(*ino, false);
                }
                let r = flush(*ino);
                self.meta.invalidate(*ino);
                r
            }
            Callback::InvalidateEntry { parent, .. } => {
                self.meta.invalidate(*parent);
                Ok(())
            }
        }
    }
}

impl Core {
    /// Make the directory a new domain covers in its parent domain, so `ls` shows it, as a
    /// mount point (the directories on the way to it must exist or are made too).
    fn make_mountpoint(&self, prefix: &str) {
        let comps: Vec<&str> = prefix.trim_start_matches('/').split('/').collect();
        let (mut dir, mut path) = (msg::ROOT_INO, "/".to_string());
        for (i, c) in comps.iter().enumerate() {
            let cp = child_path(&path, c);
            let last = i + 1 == comps.len();
            if !last {
                if let Some(d) = self.domains.domain_at(&cp) {
                    (dir, path) = (join(d, msg::ROOT_INO), cp);
                    continue;
                }
            }
            let name = c.as_bytes().to_vec();
            let found = self.domains.call_blocking(Rq::Lookup {
                cred: Cred::ROOT,
                parent: dir,
                name: name.clone(),
            });
            let ino = match found {
                Ok(Rs::Entry(a)) => a.ino,
                Err(e) if e.errno() == libc::ENOENT => {
                    let made = self.domains.call_blocking(Rq::Mkdir {
                        cred: Cred::ROOT,
                        parent: dir,
                        name,
                        mode: 0o755,
                    });
                    self.meta.changed(&[dir], &[(dir, c.as_bytes())]);
                    match made {
                        Ok(Rs::Entry(a)) => a.ino,
                        // Made meanwhile by another host.
                        Err(e) if e.errno() == libc::EEXIST => {
                            match self.domains.call_blocking(Rq::Lookup {
                                cred: Cred::ROOT,
                                parent: dir,
                                name: c.as_bytes().to_vec(),
                            }) {
                                Ok(Rs::Entry(a)) => a.ino,
                                _ => return,
                            }
                        }
                        other => {
                            tracing::warn!(%prefix, "cannot make the directory the domain covers: {other:?}");
                            return;
                        }
                    }
                }
                other => {
                    tracing::warn!(%prefix, "cannot reach the directory the domain covers: {other:?}");
                    return;
                }
            };
            if !last {
                self.domains.remember_path(ino, cp.clone());
            }
            (dir, path) = (ino, cp);
        }
    }

    fn refresh_domains(&self) {
        for p in self.domains.refresh() {
            self.make_mountpoint(&p);
        }
    }
}

/// Refresh the domain table every [`domains::REFRESH`] until the client goes away.
fn start_domain_refresher(core: std::sync::Weak<Core>) {
    std::thread::Builder::new()
        .name("wisp-domains".into())
        .spawn(move || loop {
            std::thread::sleep(domains::REFRESH);
            let Some(core) = core.upgrade() else { return };
            core.refresh_domains();
        })
        .expect("spawn domain refresher thread");
}

/// Write back what is old enough, until the client goes away; and everything at once
/// after reconnecting (a restarted server forgot who holds delayed writes, and holds its
/// reads for the server's recovery window meanwhile).
fn start_flusher(core: std::sync::Weak<Core>, delay: Duration) {
    let tick = Duration::from_millis(100);
    let mut seen_conn = 0;
    let mut last_age_check = std::time::Instant::now();
    std::thread::Builder::new()
        .name("wisp-writeback".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            let Some(core) = core.upgrade() else { return };
            let conn = core.domains.connections();
            if conn != seen_conn {
                if seen_conn != 0 && core.wb.any() {
                    info!("reconnected: writing back every delayed write");
                    core.flush_all();
                }
                seen_conn = conn;
            }
            if last_age_check.elapsed() >= (delay / 4).min(Duration::from_secs(1)) {
                last_age_check = std::time::Instant::now();
                for ino in core.wb.older_than(delay) {
                    let _ = core.flush(ino);
                }
            }
        })
        .expect("spawn write-back thread");
}

struct WispFs {
    core: Arc<Core>,
    stats: Arc<ClientStats>,
    handles: Mutex<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
    /// Inodes the kernel may hold (lookup counts), to drop its copies after the server
    /// restarted (it forgot who caches what, so it cannot call us back for them).
    known: Mutex<HashMap<u64, u64>>,
    notifier: Arc<OnceLock<std::sync::mpsc::SyncSender<notify::Job>>>,
    /// This host's name (callers of pseudo-devices are named by it).
    host: String,
    key: Identity,
    call_timeout: Duration,
    /// Connections to the wispds serving pseudo-devices, by address.
    agents: Mutex<HashMap<String, RpcClient>>,
}

/// A write that failed: a pipe with no reader also gets the writer SIGPIPE, as the kernel
/// does for local pipes.
fn write_failed(e: &RpcError, pid: u32, reply: ReplyWrite) {
    if e.errno() == libc::EPIPE {
        // SAFETY: kill(2) on the pid the kernel gave us for this request.
        unsafe { libc::kill(pid as i32, libc::SIGPIPE) };
    }
    reply.error(errno(e))
}

fn cred(req: &Request) -> Cred {
    Cred {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn systime(t: msg::Time) -> SystemTime {
    if t.secs >= 0 {
        UNIX_EPOCH + Duration::new(t.secs as u64, t.nsecs)
    } else {
        UNIX_EPOCH - Duration::from_secs(t.secs.unsigned_abs())
    }
}

fn wtime(t: SystemTime) -> msg::Time {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => msg::Time {
            secs: d.as_secs() as i64,
            nsecs: d.subsec_nanos(),
        },
        Err(e) => msg::Time {
            secs: -(e.duration().as_secs() as i64),
            nsecs: 0,
        },
    }
}

fn ftype(k: Kind) -> FileType {
    match k {
        Kind::File => FileType::RegularFile,
        Kind::Dir => FileType::Directory,
        Kind::Symlink => FileType::Symlink,
        Kind::Fifo => FileType::NamedPipe,
        Kind::Socket => FileType::Socket,
        Kind::CharDev => FileType::CharDevice,
        Kind::BlockDev => FileType::BlockDevice,
        Kind::Pipe | Kind::Device => FileType::RegularFile,
    }
}

fn fattr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: systime(a.atime),
        mtime: systime(a.mtime),
        ctime: systime(a.ctime),
        crtime: systime(a.ctime),
        kind: ftype(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: 65536,
        flags: 0,
    }
}

fn errno(e: &RpcError) -> Errno {
    Errno::from_i32(e.errno())
}

fn set_time(t: TimeOrNow) -> SetTime {
    match t {
        TimeOrNow::Now => SetTime::Now,
        TimeOrNow::SpecificTime(s) => SetTime::At(wtime(s)),
    }
}

fn open_mode(flags: i32) -> OpenMode {
    let acc = flags & libc::O_ACCMODE;
    OpenMode {
        read: acc == libc::O_RDONLY || acc == libc::O_RDWR,
        write: acc == libc::O_WRONLY || acc == libc::O_RDWR,
        truncate: flags & libc::O_TRUNC != 0,
        nonblock: flags & libc::O_NONBLOCK != 0,
    }
}

impl WispFs {
    /// Send a request to the server of its inodes' domain.
    fn call(&self, r: Rq) -> Result<Rs, RpcError> {
        let (d, conn, r) = self.core.domains.route(r)?;
        self.send(d, &conn, r)
    }

    /// Send a request (with server inode numbers) to domain `d`.
    fn send(&self, d: usize, conn: &Domain, r: Rq) -> Result<Rs, RpcError> {
        self.after_reconnect(d, conn);
        self.stats.rpcs.fetch_add(1, Ordering::Relaxed);
        let t = std::time::Instant::now();
        let res = conn.rpc.call_blocking(r);
        self.stats
            .rpc_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        res.map(|mut resp| {
            domains::globalize(d, &mut resp);
            resp
        })
    }

    /// After the connection to the server was re-established (the server restarted, or the
    /// network came back): register our open files again, so the server tracks them and
    /// calls us back for them, and drop every copy the kernel holds, since the server may
    /// not know we have them. Runs once per new connection, before any other request.
    fn after_reconnect(&self, d: usize, conn: &Domain) {
        let gen = conn.rpc.connections();
        let mut reg = conn.registered_gen.lock().unwrap();
        if *reg == gen {
            return;
        }
        let first = *reg == 0;
        *reg = gen;
        if first {
            return;
        }
        let opens: Vec<(u64, OpenMode)> = self
            .handles
            .lock()
            .unwrap()
            .values()
            .filter(|h| !h.pipe && split(h.ino).0 == d)
            .map(|h| (split(h.ino).1, h.mode))
            .collect();
        for (ino, mode) in &opens {
            let mode = OpenMode {
                truncate: false,
                ..*mode
            };
            if let Err(e) = conn.rpc.call_blocking(Rq::Open {
                cred: Cred::ROOT,
                ino: *ino,
                mode,
            }) {
                tracing::warn!(ino, "re-registering an open file after reconnecting: {e}");
            }
        }
        self.core.meta.clear();
        let inos: Vec<u64> = self.known.lock().unwrap().keys().copied().collect();
        if let Some(tx) = self.notifier.get() {
            // Waited for, but briefly: this is a FUSE request thread, and the kernel might
            // need something this request holds (see notify.rs); after the bound, the
            // request goes on and the invalidations complete on their own.
            let mut waits = Vec::with_capacity(inos.len());
            for ino in &inos {
                let (done, wait) = std::sync::mpsc::sync_channel(1);
                if tx
                    .try_send(notify::Job {
                        cb: Callback::InvalidateInode { ino: *ino },
                        done,
                    })
                    .is_ok()
                {
                    waits.push(wait);
                }
            }
            let deadline = std::time::Instant::now() + Duration::from_secs(2);
            for w in waits {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if w.recv_timeout(left).is_err() {
                    break;
                }
            }
        }
        info!(
            domain = %conn.prefix,
            generation = gen,
            opens = opens.len(),
            dropped = inos.len(),
            "reconnected: open files registered again, kernel caches dropped"
        );
    }

    fn remember(&self, ino: u64) {
        *self.known.lock().unwrap().entry(ino).or_default() += 1;
    }

    /// Attributes as this client sees them: the server's, with our delayed writes.
    fn seen(&self, mut a: Attr) -> FileAttr {
        self.core.wb.overlay_attr(&mut a);
        fattr(&a)
    }

    /// A request that changes `inos` and `names` (this client's own change: the server
    /// calls back only the others, so our caches are dropped here, before and after).
    fn changing(&self, inos: &[u64], names: &[(u64, &[u8])], r: Rq) -> Result<Rs, RpcError> {
        if inos.is_empty() && names.is_empty() {
            return self.call(r);
        }
        self.core.meta.changed(inos, names);
        let res = self.call(r);
        self.core.meta.changed(inos, names);
        res
    }

    fn entry(&self, inos: &[u64], names: &[(u64, &[u8])], r: Rq, reply: ReplyEntry) {
        match self.changing(inos, names, r) {
            Ok(Rs::Entry(a)) | Ok(Rs::Attr(a)) => {
                self.remember(a.ino);
                reply.entry_with_ttls(&CACHE_TTL, &ENTRY_TTL, &self.seen(a), Generation(0))
            }
            Ok(other) => unexpected(other, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn empty(&self, inos: &[u64], names: &[(u64, &[u8])], r: Rq, reply: ReplyEmpty) {
        match self.changing(inos, names, r) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    /// Write back `ino` before a request that must see all of its data.
    fn flushed(&self, ino: u64) -> Result<(), Errno> {
        if self.core.wb.holds(ino) {
            self.core.flush(ino).map_err(|e| errno(&e))?;
        }
        Ok(())
    }

    /// The inode a name points to, from the cache or the server (not cached: the caller
    /// is about to change it).
    fn child_ino(&self, req: &Request, parent: u64, name: &[u8]) -> Option<u64> {
        if let Some(i) = self.core.meta.child(parent, name) {
            return Some(i);
        }
        match self.call(Rq::Lookup {
            cred: cred(req),
            parent,
            name: name.to_vec(),
        }) {
            Ok(Rs::Entry(a)) => Some(a.ino),
            _ => None,
        }
    }

    /// Attributes, from the cache when it has them.
    fn attr_of(&self, ino: u64) -> Result<Attr, RpcError> {
        if let Some(a) = self.core.meta.attr(ino).filter(|_| self.core.cache_ok()) {
            self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(a);
        }
        let e = self.core.meta.epoch();
        match self.call(Rq::GetAttr { ino })? {
            Rs::Attr(a) => {
                self.core.meta.put_attr(e, &a);
                Ok(a)
            }
            o => Err(RpcError::Remote(WireError::new(
                libc::EIO,
                format!("unexpected reply {o:?}"),
            ))),
        }
    }

    /// A handle for an open answered `cache`; `clean`: no callback for the file arrived
    /// while the open was on its way (one that did keeps the file write-through).
    fn new_handle(&self, ino: u64, flags: i32, pipe: bool, cache: bool, clean: bool) -> u64 {
        self.new_stream_handle(ino, flags, pipe, None, cache, clean)
    }

    fn new_stream_handle(
        &self,
        ino: u64,
        flags: i32,
        pipe: bool,
        dev: Option<DevOpen>,
        cache: bool,
        clean: bool,
    ) -> u64 {
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mode = open_mode(flags);
        let append = flags & libc::O_APPEND != 0;
        let delayed = cache && mode.write && !append && !pipe && self.core.wb.enabled();
        if delayed && clean {
            self.core.wb.set_cacheable(ino, true);
        }
        self.handles.lock().unwrap().insert(
            fh,
            Handle {
                ino,
                mode,
                append,
                pipe,
                dev,
                delayed,
                poll: Arc::default(),
            },
        );
        fh
    }

    /// The wispd at `addr` (a pseudo-device's serving host).
    fn agent(&self, addr: &str) -> RpcClient {
        self.agents
            .lock()
            .unwrap()
            .entry(addr.to_string())
            .or_insert_with(|| {
                let none: CallbackHandler = Arc::new(|_| Ok(()));
                RpcClient::start(
                    self.core.rt.clone(),
                    addr.to_string(),
                    self.key.clone(),
                    format!("{}-pdev", self.host),
                    self.call_timeout,
                    none,
                )
            })
            .clone()
    }

    /// Open a pseudo-device at the wispd its attachment names.
    fn open_device(&self, req: &Request, ino: u64, flags: i32) -> Result<DevOpen, Errno> {
        let gone = |m: String| {
            tracing::info!(ino, "{m}");
            Errno::from_i32(libc::ENXIO)
        };
        let v = match self.call(Rq::GetXattr {
            ino,
            name: msg::PDEV_XATTR.to_vec(),
        }) {
            Ok(Rs::Xattr(v)) => v,
            Ok(_) => return Err(Errno::EIO),
            Err(e) => return Err(gone(format!("pseudo-device without attachment: {e}"))),
        };
        let v = String::from_utf8_lossy(&v).into_owned();
        let (addr, dev) = v
            .split_once(' ')
            .and_then(|(a, d)| Some((a.to_string(), d.trim().parse::<u64>().ok()?)))
            .ok_or_else(|| gone(format!("bad pseudo-device attachment {v:?}")))?;
        let agent = self.agent(&addr);
        let r = self.core.rt.block_on(agent.call(Rq::Pdev(msg::PdevCall {
            dev,
            open: 0,
            caller: self.caller(req),
            op: msg::PdevOp::Open { flags },
        })));
        match r {
            Ok(Rs::PdevOpened { open }) => Ok(DevOpen { agent, dev, open }),
            Ok(_) => Err(Errno::EIO),
            Err(e) => Err(errno(&e)),
        }
    }

    fn caller(&self, req: &Request) -> msg::PdevCaller {
        msg::PdevCaller {
            host: self.host.clone(),
            pid: req.pid(),
            uid: req.uid(),
            gid: req.gid(),
        }
    }

    /// The stream an open handle is, if it is one.
    fn stream_of(&self, fh: u64) -> Option<(Target, Arc<PollState>)> {
        let hs = self.handles.lock().unwrap();
        let h = hs.get(&fh).filter(|h| h.pipe)?;
        let t = match &h.dev {
            Some(d) => Target::Dev(d.clone()),
            None => Target::Pipe {
                ino: h.ino,
                mode: h.mode,
            },
        };
        Some((t, h.poll.clone()))
    }

    /// Keep asking while a blocking pipe operation reports "still waiting" (EAGAIN).
    fn call_pipe(&self, blocking: bool, r: Rq) -> Result<Rs, RpcError> {
        loop {
            match self.call(r.clone()) {
                Err(RpcError::Remote(w)) if blocking && w.errno == libc::EAGAIN => continue,
                other => return other,
            }
        }
    }
}

trait ErrReply {
    fn error(self, e: Errno);
}
macro_rules! err_reply {
    ($($t:ty),*) => {$( impl ErrReply for $t { fn error(self, e: Errno) { <$t>::error(self, e) } } )*};
}
err_reply!(
    ReplyEntry,
    ReplyAttr,
    ReplyEmpty,
    ReplyData,
    ReplyOpen,
    ReplyWrite,
    ReplyCreate,
    ReplyXattr,
    ReplyStatfs,
    ReplyDirectory,
    ReplyDirectoryPlus,
    ReplyIoctl,
    ReplyPoll
);

fn unexpected<R: ErrReply>(r: Rs, reply: R) {
    tracing::error!("server sent an unexpected reply {r:?}");
    reply.error(Errno::EIO)
}

impl Filesystem for WispFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(1 << 20);
        let _ = config.set_max_readahead(1 << 20);
        let _ = config.set_max_background(64);
        for cap in [
            InitFlags::FUSE_ATOMIC_O_TRUNC,
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_EXPORT_SUPPORT,
            InitFlags::FUSE_CACHE_SYMLINKS,
        ] {
            let _ = config.add_capabilities(cap);
        }
        Ok(())
    }

    fn destroy(&mut self) {
        self.core.flush_all();
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        let mut known = self.known.lock().unwrap();
        if let Some(n) = known.get_mut(&ino.0) {
            *n = n.saturating_sub(nlookup);
            if *n == 0 {
                known.remove(&ino.0);
            }
        }
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if name.len() > msg::NAME_MAX {
            return reply.error(Errno::from_i32(libc::ENAMETOOLONG));
        }
        let n = name.as_bytes();
        // On the way to another domain: its prefix is answered with its root.
        let mut on_the_way = None;
        if let (Some(ppath), Some(name_str)) = (self.core.domains.path_of(parent.0), name.to_str())
        {
            let cp = child_path(&ppath, name_str);
            if let Some(d) = self.core.domains.domain_at(&cp) {
                return match self.attr_of(join(d, msg::ROOT_INO)) {
                    Ok(a) => {
                        self.remember(a.ino);
                        reply.entry_with_ttls(&CACHE_TTL, &ENTRY_TTL, &self.seen(a), Generation(0))
                    }
                    Err(e) => reply.error(errno(&e)),
                };
            }
            if self.core.domains.leads_to_prefix(&cp) {
                on_the_way = Some(cp);
            }
        }
        let cached = if self.core.cache_ok() {
            self.core.meta.lookup(parent.0, n)
        } else {
            None
        };
        match cached {
            Some(Hit::Found(a)) => {
                self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
                self.remember(a.ino);
                return reply.entry_with_ttls(&CACHE_TTL, &ENTRY_TTL, &self.seen(a), Generation(0));
            }
            Some(Hit::Absent) => {
                self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
                return reply.error(Errno::from_i32(libc::ENOENT));
            }
            None => {}
        }
        let e = self.core.meta.epoch();
        match self.call(Rq::Lookup {
            cred: cred(req),
            parent: parent.0,
            name: n.to_vec(),
        }) {
            Ok(Rs::Entry(a)) => {
                self.core.meta.put_entry(e, parent.0, n, Some(&a));
                if let Some(cp) = on_the_way {
                    self.core.domains.remember_path(a.ino, cp);
                }
                self.remember(a.ino);
                reply.entry_with_ttls(&CACHE_TTL, &ENTRY_TTL, &self.seen(a), Generation(0))
            }
            Ok(o) => unexpected(o, reply),
            Err(err) => {
                if err.errno() == libc::ENOENT {
                    self.core.meta.put_entry(e, parent.0, n, None);
                }
                reply.error(errno(&err))
            }
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr_of(ino.0) {
            Ok(a) => reply.attr(&CACHE_TTL, &self.seen(a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let set = SetAttrs {
            mode,
            uid,
            gid,
            size,
            atime: atime.map(set_time),
            mtime: mtime.map(set_time),
        };
        if let Err(e) = self.flushed(ino.0) {
            return reply.error(e);
        }
        match self.changing(
            &[ino.0],
            &[],
            Rq::SetAttr {
                cred: cred(req),
                ino: ino.0,
                set,
            },
        ) {
            Ok(Rs::Attr(a)) => reply.attr(&CACHE_TTL, &self.seen(a)),
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.call(Rq::ReadLink { ino: ino.0 }) {
            Ok(Rs::Data(d)) => reply.data(&d),
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let mode = mode & !(umask & 0o777);
        self.entry(
            &[parent.0],
            &[(parent.0, name.as_bytes())],
            Rq::MkNod {
                cred: cred(req),
                parent: parent.0,
                name: name.as_bytes().to_vec(),
                mode,
                rdev,
            },
            reply,
        )
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mode = mode & !(umask & 0o777);
        self.entry(
            &[parent.0],
            &[(parent.0, name.as_bytes())],
            Rq::Mkdir {
                cred: cred(req),
                parent: parent.0,
                name: name.as_bytes().to_vec(),
                mode,
            },
            reply,
        )
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let n = name.as_bytes();
        // A file with delayed writes, removed by its last name: its writes need never
        // reach the server (Sprite's short-lived files).
        let victim = if self.core.wb.any() {
            self.child_ino(req, parent.0, n)
                .filter(|i| self.core.wb.is_dirty(*i))
                .filter(|i| self.attr_of(*i).is_ok_and(|a| a.nlink <= 1))
        } else {
            None
        };
        match self.changing(
            &[parent.0],
            &[(parent.0, n)],
            Rq::Unlink {
                cred: cred(req),
                parent: parent.0,
                name: n.to_vec(),
            },
        ) {
            Ok(_) => {
                if let Some(ino) = victim {
                    if !self.handles.lock().unwrap().values().any(|h| h.ino == ino) {
                        let _g = self.core.wb.stripe(ino);
                        let dropped = self.core.wb.discard(ino);
                        self.stats.discarded.fetch_add(dropped, Ordering::Relaxed);
                    }
                }
                reply.ok()
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(
            &[parent.0],
            &[(parent.0, name.as_bytes())],
            Rq::Rmdir {
                cred: cred(req),
                parent: parent.0,
                name: name.as_bytes().to_vec(),
            },
            reply,
        )
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        self.entry(
            &[parent.0],
            &[(parent.0, link_name.as_bytes())],
            Rq::Symlink {
                cred: cred(req),
                parent: parent.0,
                name: link_name.as_bytes().to_vec(),
                target: target.as_os_str().as_bytes().to_vec(),
            },
            reply,
        )
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        self.empty(
            &[parent.0, newparent.0],
            &[
                (parent.0, name.as_bytes()),
                (newparent.0, newname.as_bytes()),
            ],
            Rq::Rename {
                cred: cred(req),
                parent: parent.0,
                name: name.as_bytes().to_vec(),
                new_parent: newparent.0,
                new_name: newname.as_bytes().to_vec(),
                flags: flags.bits(),
            },
            reply,
        )
    }

    fn link(
        &self,
        req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(
            &[ino.0, newparent.0],
            &[(newparent.0, newname.as_bytes())],
            Rq::Link {
                cred: cred(req),
                ino: ino.0,
                new_parent: newparent.0,
                new_name: newname.as_bytes().to_vec(),
            },
            reply,
        )
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mode = open_mode(flags.0);
        if mode.truncate {
            if let Err(e) = self.flushed(ino.0) {
                return reply.error(e);
            }
            self.core.meta.changed(&[ino.0], &[]);
        }
        let e = self.core.meta.epoch();
        let r = match self.call(Rq::Open {
            cred: cred(req),
            ino: ino.0,
            mode,
        }) {
            // A blocking open of a cluster pipe: registered; wait for the other end.
            Err(RpcError::Remote(w)) if w.errno == libc::EAGAIN && !mode.nonblock => {
                match self.call_pipe(
                    true,
                    Rq::PipeAwait {
                        ino: ino.0,
                        writer: mode.write,
                    },
                ) {
                    Ok(_) => self.call(Rq::GetAttr { ino: ino.0 }).map(|r| match r {
                        Rs::Attr(attr) => Rs::Opened { attr, cache: false },
                        o => o,
                    }),
                    Err(e) => Err(e),
                }
            }
            other => other,
        };
        match r {
            Ok(Rs::Opened { attr, cache }) => {
                let pipe = matches!(attr.kind, Kind::Pipe | Kind::Device);
                let dev = if attr.kind == Kind::Device {
                    match self.open_device(req, ino.0, flags.0) {
                        Ok(d) => Some(d),
                        Err(e) => {
                            let _ = self.call(Rq::Close { ino: ino.0, mode });
                            return reply.error(e);
                        }
                    }
                } else {
                    None
                };
                let clean = !self.core.meta.invalidated_since(e, ino.0);
                if mode.truncate {
                    self.core.meta.changed(&[ino.0], &[]);
                } else {
                    self.core.meta.put_attr(e, &attr);
                }
                if !cache && !pipe && self.core.wb.enabled() {
                    // Write-shared from now on: nothing of ours may stay behind.
                    self.core.wb.set_cacheable(ino.0, false);
                    if let Err(e) = self.flushed(ino.0) {
                        return reply.error(e);
                    }
                }
                let fh = self.new_stream_handle(ino.0, flags.0, pipe, dev, cache, clean);
                reply.opened(
                    FileHandle(fh),
                    fopen_flags(
                        &attr,
                        cache,
                        mode,
                        flags.0 & libc::O_APPEND != 0,
                        self.core.meta.same_version(&attr, mode.write),
                    ),
                )
            }
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let nonblock = flags.0 & libc::O_NONBLOCK != 0;
        if let Some((t, _)) = self.stream_of(fh.0) {
            let (core, stats, caller) = (self.core.clone(), self.stats.clone(), self.caller(_req));
            let op = Op::Read { size, nonblock };
            self.core.rt.spawn(async move {
                match stream::call_blocking(&core.domains, &t, &caller, op, !nonblock).await {
                    Ok(Rs::Data(d)) => {
                        stats
                            .bytes_read
                            .fetch_add(d.len() as u64, Ordering::Relaxed);
                        reply.data(&d)
                    }
                    Ok(o) => unexpected(o, reply),
                    Err(e) => reply.error(errno(&e)),
                }
            });
            return;
        }
        let pipe = false;
        // With delayed writes of ours, the server's bytes get ours laid over them, and no
        // write-back may be in flight meanwhile.
        let held = (!pipe && self.core.wb.holds(ino.0)).then(|| self.core.wb.stripe(ino.0));
        match self.call_pipe(
            pipe && !nonblock,
            Rq::Read {
                ino: ino.0,
                offset,
                size,
                nonblock,
            },
        ) {
            Ok(Rs::Data(d)) => {
                let d = match &held {
                    Some(_) => self.core.wb.with_dirty(ino.0, |dirty| match dirty {
                        Some(dirty) => dirty.overlay(offset, size as u64, d),
                        None => d,
                    }),
                    None => d,
                };
                self.stats
                    .bytes_read
                    .fetch_add(d.len() as u64, Ordering::Relaxed);
                reply.data(&d)
            }
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _wf: WriteFlags,
        flags: OpenFlags,
        _lock: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (append, pipe, delayed) = self
            .handles
            .lock()
            .unwrap()
            .get(&fh.0)
            .map(|h| (h.append, h.pipe, h.delayed))
            .unwrap_or((flags.0 & libc::O_APPEND != 0, false, false));
        let nonblock = flags.0 & libc::O_NONBLOCK != 0;
        if let Some((t, _)) = self.stream_of(fh.0) {
            let (core, stats, caller) = (self.core.clone(), self.stats.clone(), self.caller(req));
            let op = Op::Write {
                data: data.to_vec(),
                nonblock,
            };
            self.core.rt.spawn(async move {
                match stream::call_blocking(&core.domains, &t, &caller, op, !nonblock).await {
                    Ok(Rs::Written { size, .. }) => {
                        stats
                            .bytes_written
                            .fetch_add(size as u64, Ordering::Relaxed);
                        reply.written(size)
                    }
                    Ok(o) => unexpected(o, reply),
                    Err(e) => write_failed(&e, caller.pid, reply),
                }
            });
            return;
        }
        // Whether the file may still be written back later is decided under its stripe: a
        // callback that makes it write-through flips the flag first, then writes back
        // (under the stripe), so no delayed write slips in after it.
        let held = delayed
            .then(|| {
                let _g = self.core.wb.stripe(ino.0);
                self.core
                    .wb
                    .cacheable(ino.0)
                    .then(|| self.core.wb.add(ino.0, offset, data))
            })
            .flatten();
        if let Some(total) = held {
            if total > self.core.wb.max_bytes {
                // Over the memory bound: this writer waits for write-backs, oldest first.
                // This write is held either way; a failure shows at fsync or close.
                for victim in std::iter::once(ino.0).chain(self.core.wb.older_than(Duration::ZERO))
                {
                    let _ = self.core.flush(victim);
                    if self.core.wb.total() <= self.core.wb.max_bytes / 2 {
                        break;
                    }
                }
            }
            return reply.written(data.len() as u32);
        }
        if !pipe {
            if let Err(e) = self.flushed(ino.0) {
                return reply.error(e);
            }
            self.core.meta.changed(&[ino.0], &[]);
        }
        match self.call_pipe(
            pipe && !nonblock,
            Rq::Write {
                ino: ino.0,
                offset,
                data: data.to_vec(),
                append,
                nonblock,
            },
        ) {
            Ok(Rs::Written { size, .. }) => {
                if !pipe {
                    // An attribute fetch answered before the write may have been cached
                    // meanwhile; the server calls back only the other clients.
                    self.core.meta.changed(&[ino.0], &[]);
                }
                self.stats
                    .bytes_written
                    .fetch_add(size as u64, Ordering::Relaxed);
                reply.written(size)
            }
            Ok(o) => unexpected(o, reply),
            Err(e) => write_failed(&e, req.pid(), reply),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Close does not write back (Sprite's delayed write): fsync, age, a callback or
        // unmount does. It reports a write-back that failed for good, as close(2) does.
        match self.core.wb.take_error(_ino.0) {
            Some(e) => reply.error(Errno::from_i32(e)),
            None => reply.ok(),
        }
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        let h = self.handles.lock().unwrap().remove(&fh.0);
        if let Some(h) = &h {
            h.poll.closed.store(true, Ordering::Relaxed);
            if let Some(d) = h.dev.clone() {
                let call = msg::PdevCall {
                    dev: d.dev,
                    open: d.open,
                    caller: self.caller(_req),
                    op: msg::PdevOp::Close,
                };
                self.core.rt.spawn(async move {
                    let _ = d.agent.call(Rq::Pdev(call)).await;
                });
            }
        }
        match h {
            Some(h) => self.empty(
                &[],
                &[],
                Rq::Close {
                    ino: h.ino,
                    mode: h.mode,
                },
                reply,
            ),
            None => {
                debug!(ino = ino.0, fh = fh.0, "release of unknown handle");
                reply.ok()
            }
        }
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.flushed(ino.0) {
            return reply.error(e);
        }
        if let Some(e) = self.core.wb.take_error(ino.0) {
            return reply.error(Errno::from_i32(e));
        }
        self.empty(&[], &[], Rq::Fsync { ino: ino.0 }, reply)
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.empty(&[], &[], Rq::Fsync { ino: ino.0 }, reply)
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.call(Rq::ReadDir {
            ino: ino.0,
            offset,
            max: 512,
        }) {
            Ok(Rs::Entries(es)) => {
                for e in es {
                    if reply.add(
                        INodeNo(e.attr.ino),
                        e.cookie,
                        ftype(e.attr.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.call(Rq::ReadDir {
            ino: ino.0,
            offset,
            max: 256,
        }) {
            Ok(Rs::Entries(es)) => {
                for e in es {
                    let name = OsStr::from_bytes(&e.name);
                    if e.name != b"." && e.name != b".." {
                        self.remember(e.attr.ino);
                    }
                    if reply.add(
                        INodeNo(e.attr.ino),
                        e.cookie,
                        name,
                        &ENTRY_TTL,
                        &self.seen(e.attr),
                        Generation(0),
                    ) {
                        break;
                    }
                }
                reply.ok()
            }
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        let d = split(ino.0).0;
        let r = match self.core.domains.get(d) {
            Some(conn) => self.send(d, &conn, Rq::StatFs),
            None => return reply.error(Errno::from_i32(libc::ESTALE)),
        };
        match r {
            Ok(Rs::StatFs {
                blocks,
                bfree,
                bavail,
                files,
                ffree,
                bsize,
                namelen,
            }) => reply.statfs(blocks, bfree, bavail, files, ffree, bsize, namelen, bsize),
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        self.empty(
            &[ino.0],
            &[],
            Rq::SetXattr {
                cred: cred(req),
                ino: ino.0,
                name: name.as_bytes().to_vec(),
                value: value.to_vec(),
                flags,
            },
            reply,
        )
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let n = name.as_bytes();
        let cached = if self.core.cache_ok() {
            self.core.meta.xattr(ino.0, n)
        } else {
            None
        };
        let r = match cached {
            Some(v) => {
                self.stats.meta_hits.fetch_add(1, Ordering::Relaxed);
                v.map(Rs::Xattr)
                    .ok_or_else(|| RpcError::Remote(WireError::new(libc::ENODATA, "no such xattr")))
            }
            None => {
                let e = self.core.meta.epoch();
                let r = self.call(Rq::GetXattr {
                    ino: ino.0,
                    name: n.to_vec(),
                });
                match &r {
                    Ok(Rs::Xattr(v)) => self.core.meta.put_xattr(e, ino.0, n, Some(v)),
                    Err(err) if err.errno() == libc::ENODATA => {
                        self.core.meta.put_xattr(e, ino.0, n, None)
                    }
                    _ => {}
                }
                r
            }
        };
        xattr_reply(r, size, reply)
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        xattr_reply(self.call(Rq::ListXattr { ino: ino.0 }), size, reply)
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.empty(
            &[ino.0],
            &[],
            Rq::RemoveXattr {
                cred: cred(req),
                ino: ino.0,
                name: name.as_bytes().to_vec(),
            },
            reply,
        )
    }

    fn access(&self, req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        match self.attr_of(ino.0) {
            Ok(a) => {
                if access_ok(&a, req.uid(), req.gid(), mask.bits()) {
                    reply.ok()
                } else {
                    reply.error(Errno::from_i32(libc::EACCES))
                }
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        if name.len() > msg::NAME_MAX {
            return reply.error(Errno::from_i32(libc::ENAMETOOLONG));
        }
        let mode = mode & !(umask & 0o777);
        let mode_open = open_mode(flags);
        // The new file's attributes are cached below unless something about that inode was
        // invalidated meanwhile (the server records us as its cacher before it commits the
        // create; `changing` itself only drops the parent and the name).
        let e = self.core.meta.epoch();
        let r = self.changing(
            &[parent.0],
            &[(parent.0, name.as_bytes())],
            Rq::Create {
                cred: cred(req),
                parent: parent.0,
                name: name.as_bytes().to_vec(),
                mode,
                excl: flags & libc::O_EXCL != 0,
                mode_open,
            },
        );
        match r {
            Ok(Rs::Opened { attr, cache }) => {
                self.remember(attr.ino);
                // The kernel keeps a created file's attributes for the entry TTL (0), so
                // it asks again at once: answered from here.
                self.core.meta.put_attr(e, &attr);
                let clean = !self.core.meta.invalidated_since(e, attr.ino);
                let fh = self.new_handle(attr.ino, flags, attr.kind == Kind::Pipe, cache, clean);
                // The entry TTL is also the attribute TTL here: 0, so the name is checked again.
                reply.created(
                    &ENTRY_TTL,
                    &self.seen(attr.clone()),
                    Generation(0),
                    FileHandle(fh),
                    fopen_flags(
                        &attr,
                        cache,
                        mode_open,
                        flags & libc::O_APPEND != 0,
                        self.core.meta.same_version(&attr, mode_open.write),
                    ),
                )
            }
            Ok(o) => unexpected(o, reply),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn ioctl(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let Some((t @ Target::Dev(_), _)) = self.stream_of(fh.0) else {
            return reply.error(Errno::from_i32(libc::ENOTTY));
        };
        let (core, caller) = (self.core.clone(), self.caller(req));
        let op = Op::Ioctl {
            cmd,
            data: in_data.to_vec(),
            out_size,
        };
        self.core.rt.spawn(async move {
            match stream::call(&core.domains, &t, &caller, op).await {
                Ok(Rs::Ioctl { result, data }) => reply.ioctl(result, &data),
                Ok(o) => unexpected(o, reply),
                Err(e) => reply.error(errno(&e)),
            }
        });
    }

    fn poll(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        ph: PollNotifier,
        events: PollEvents,
        flags: PollFlags,
        reply: ReplyPoll,
    ) {
        let Some((t, st)) = self.stream_of(fh.0) else {
            // A stored file is always ready, as on a local file system.
            return reply.poll(
                PollEvents::POLLIN
                    | PollEvents::POLLOUT
                    | PollEvents::POLLRDNORM
                    | PollEvents::POLLWRNORM,
            );
        };
        let (core, caller) = (self.core.clone(), self.caller(req));
        let events = events.bits();
        let notify = flags.contains(PollFlags::FUSE_POLL_SCHEDULE_NOTIFY);
        if notify {
            *st.notifier.lock().unwrap() = Some(ph);
        }
        self.core.rt.spawn(async move {
            let op = Op::Poll {
                events,
                wait: false,
            };
            let r = match stream::call(&core.domains, &t, &caller, op).await {
                Ok(Rs::Ready(r)) => r,
                Ok(o) => return unexpected(o, reply),
                Err(e) => return reply.error(errno(&e)),
            };
            reply.poll(PollEvents::from_bits_truncate(r));
            let hup = (libc::POLLERR | libc::POLLHUP) as u32;
            // Not ready: one waiter per open tells the kernel when it is.
            if notify
                && r & (events | hup) == 0
                && st.wanted.fetch_or(events, Ordering::Relaxed) == 0
            {
                stream::poll_waiter(&core.domains, t, caller, st).await;
            }
        });
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        if let Err(e) = self.flushed(ino.0) {
            return reply.error(e);
        }
        self.empty(
            &[ino.0],
            &[],
            Rq::Fallocate {
                ino: ino.0,
                offset,
                length,
                mode,
            },
            reply,
        )
    }
}

/// How the kernel should treat an open: cluster pipes are streams; a write-shared file is
/// read and written straight through to the server; otherwise the page cache is kept
/// across opens when the file's version is the one this host saw last (the server calls
/// us back before any cached page goes stale; the version check is Sprite's open-time
/// check on top), and dropped when another host opened it for writing since.
///
/// O_APPEND writes bypass the page cache too: the server places them at its own end of
/// file, which may not be where this kernel believes the end is.
fn fopen_flags(attr: &Attr, cache: bool, mode: OpenMode, append: bool, same: bool) -> FopenFlags {
    if matches!(attr.kind, Kind::Pipe | Kind::Device) {
        FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NONSEEKABLE | FopenFlags::FOPEN_STREAM
    } else if !cache || append {
        FopenFlags::FOPEN_DIRECT_IO
    } else if mode.truncate || !same {
        FopenFlags::empty()
    } else {
        FopenFlags::FOPEN_KEEP_CACHE
    }
}

fn xattr_reply(r: Result<Rs, RpcError>, size: u32, reply: ReplyXattr) {
    match r {
        Ok(Rs::Xattr(v)) => {
            if size == 0 {
                reply.size(v.len() as u32)
            } else if v.len() > size as usize {
                reply.error(Errno::from_i32(libc::ERANGE))
            } else {
                reply.data(&v)
            }
        }
        Ok(o) => unexpected(o, reply),
        Err(e) => reply.error(errno(&e)),
    }
}

/// The classic owner/group/other check of access(2) (root may do anything but execute a
/// file that has no execute bit at all).
pub(crate) fn access_ok(a: &Attr, uid: u32, gid: u32, mask: i32) -> bool {
    if mask == libc::F_OK {
        return true;
    }
    let perm = a.perm as i32;
    if uid == 0 {
        return mask & libc::X_OK == 0 || perm & 0o111 != 0 || a.kind == Kind::Dir;
    }
    let bits = if uid == a.uid {
        (perm >> 6) & 7
    } else if gid == a.gid {
        (perm >> 3) & 7
    } else {
        perm & 7
    };
    bits & mask == mask
}

/// Mount the domain served at `opts.server` on `opts.mountpoint`. Returns once the kernel
/// has the mount; FUSE requests are served by background threads.
pub fn mount(rt: tokio::runtime::Handle, opts: MountOptions) -> Result<Mounted, MountError> {
    let stats = Arc::new(ClientStats::default());
    let notifier: Arc<OnceLock<std::sync::mpsc::SyncSender<notify::Job>>> =
        Arc::new(OnceLock::new());
    let core_cell: Arc<OnceLock<Arc<Core>>> = Arc::new(OnceLock::new());
    let n2 = notifier.clone();
    let s2 = stats.clone();
    let c2 = core_cell.clone();
    let handler: CallbackHandler = Arc::new(move |cb: Callback| {
        s2.callbacks.fetch_add(1, Ordering::Relaxed);
        // Our own caches first (delayed writes go back before anything is dropped).
        let own = match c2.get() {
            Some(core) => core.on_callback(&cb),
            None => Ok(()),
        };
        if matches!(cb, Callback::WriteBack { .. }) {
            return own;
        }
        let kernel = match n2.get() {
            Some(tx) => notify::apply(tx, cb, Duration::from_secs(5)),
            None => Ok(()), // not mounted yet: the kernel holds nothing to invalidate
        };
        own.and(kernel)
    });
    let (key, host, timeout, rt2, h2) = (
        opts.key.clone(),
        opts.host.clone(),
        opts.call_timeout,
        rt.clone(),
        handler.clone(),
    );
    let connect: domains::Connect = Box::new(move |d, addr: &str| {
        RpcClient::start(
            rt2.clone(),
            addr.to_string(),
            key.clone(),
            host.clone(),
            timeout,
            domains::domain_handler(d, h2.clone()),
        )
    });
    let rpc = connect(0, &opts.server);
    // Fail early with a clear message when the server is unreachable or refuses our key.
    rpc.call_blocking(Rq::Ping)
        .map_err(|source| MountError::Server {
            addr: opts.server.clone(),
            source,
        })?;
    let root = Domain {
        prefix: "/".into(),
        addr: opts.server.clone(),
        rpc: rpc.clone(),
        registered_gen: Mutex::new(0),
    };
    let core = Arc::new(Core {
        domains: Domains::new(root, opts.domains.clone(), connect),
        rt,
        stats: stats.clone(),
        meta: Meta::new(opts.cache_names, opts.cache_entries),
        cache_gen: AtomicU64::new(rpc.connections()),
        wb: WriteBack::new(opts.writeback_delay, opts.dirty_max),
    });
    let _ = core_cell.set(core.clone());
    if core.wb.enabled() {
        start_flusher(Arc::downgrade(&core), opts.writeback_delay);
    }
    if core.domains.has_source() {
        core.refresh_domains();
        start_domain_refresher(Arc::downgrade(&core));
    }
    let fs = WispFs {
        core: core.clone(),
        stats: stats.clone(),
        handles: Mutex::new(HashMap::new()),
        next_fh: AtomicU64::new(1),
        known: Mutex::new(HashMap::new()),
        notifier: notifier.clone(),
        host: opts.host.clone(),
        key: opts.key.clone(),
        call_timeout: opts.call_timeout.min(Duration::from_secs(15)),
        agents: Mutex::new(HashMap::new()),
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(format!("wisp@{}", opts.server)),
        MountOption::Subtype("wisp".into()),
        MountOption::DefaultPermissions,
        MountOption::CUSTOM("allow_other".into()),
        MountOption::Exec,
        MountOption::Suid,
        MountOption::Dev,
    ];
    config.acl = SessionACL::All;
    config.n_threads = Some(opts.threads.max(2));
    config.clone_fd = true;
    let session =
        Session::new(fs, &opts.mountpoint, &config).map_err(|source| MountError::Mount {
            path: opts.mountpoint.clone(),
            source,
        })?;
    let _ = notifier.set(notify::start(session.notifier()));
    let bg = session.spawn().map_err(|source| MountError::Mount {
        path: opts.mountpoint.clone(),
        source,
    })?;
    info!(server = %opts.server, mountpoint = %opts.mountpoint.display(), "mounted");
    Ok(Mounted {
        session: Some(bg),
        rpc,
        stats,
        mountpoint: opts.mountpoint,
        core,
    })
}
