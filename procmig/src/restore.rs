//! Restore (target side): create a new process (fork, or clone3 with set_tid inside a
//! fresh pid + uts namespace so the pid is exactly the old one), seize it while it waits
//! in a tiny trampoline page, and rebuild it by injected syscalls: drop the inherited
//! rseq registration and descriptors, unmap everything but the trampoline and the kernel's
//! vdso/vvar pages, move those to their old addresses, map every VMA at its exact address
//! (files MAP_PRIVATE/MAP_SHARED at their offset), write the stored pages over them
//! through `/proc/<pid>/mem`, then mm fields (PR_SET_MM_MAP), signal state, descriptors, cwd,
//! umask, timers, rlimits, threads (injected clone3 with CLONE_THREAD and set_tid, each
//! then given its own mask, altstack, robust list, tid address, rseq and name), creds in
//! every thread, rseq/robust list/tid address, registers and xstate, and detach. On any
//! failure the half-built process is killed; the source is never touched.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::image::{self, FdKind, ImageError, ImageMeta, VmaKind, PAGE};
use crate::inject::{InjectError, Injector};
use crate::lazy::LazyPager;
use crate::procfs::{self, ProcError};
use crate::swap::SwapReader;
use crate::sys::{self, uffd, SysError, Wait};

/// Errors of a restore.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("{path}: {what}")]
    File { path: String, what: String },
    #[error("fd {fd}: {what}")]
    Fd { fd: i32, what: String },
    #[error("pid {pid}: cannot be recreated: {what}")]
    Pid { pid: i32, what: String },
    #[error("vdso of this host differs from the source's: {what}")]
    Vdso { what: String },
    #[error("restored process {pid}: cannot map {what}: {source}")]
    Map {
        pid: i32,
        what: String,
        #[source]
        source: InjectError,
    },
    #[error("no free address range for the restore trampoline")]
    NoTrampolineSpace,
    #[error("restored process {pid}: injected {step} returned {got:#x}, expected {want:#x}")]
    Mismatch {
        pid: i32,
        step: String,
        got: u64,
        want: u64,
    },
    #[error("cannot read pages file {path}: {source}")]
    Pages {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore helper for pid {pid} failed: {what}")]
    Helper { pid: i32, what: String },
}

type Result<T> = std::result::Result<T, RestoreError>;

/// How the restored process gets its pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PidMode {
    /// New pid namespace when the source was in one (keeps getpid()), else any pid.
    #[default]
    Auto,
    /// Always a fresh pid + uts namespace with clone3 set_tid = the innermost old pid.
    NewNamespace,
    /// Plain fork: any pid.
    Any,
}

/// Options of [`restore_with`].
#[derive(Debug, Default)]
pub struct RestoreOptions {
    pub pid_mode: PidMode,
    /// Descriptors supplied by the caller for pipe ends: (image fd number, descriptor).
    /// Pipes not listed here are reopened from the frozen source's `/proc/<pid>/fd/<n>`
    /// (same host only).
    pub inherit_fds: Vec<(i32, RawFd)>,
    /// Lazy restore only: answer page faults only (pure demand paging) for this long
    /// before pushing the remaining pages in the background.
    pub lazy_push_delay: std::time::Duration,
    /// `cgroup.procs` files (open for writing) of cgroups the restored tree is to live in:
    /// its first process joins them before it creates any other, so the whole tree is
    /// born inside them.
    pub cgroup_procs: Vec<RawFd>,
    /// Check the image's tags (see [`crate::swap`]): it must belong to `tag` and be made
    /// with `key`. Without, the image is trusted as it is (a local restore).
    pub mac: Option<crate::swap::MacCheck>,
    /// A streamed swap file that stops growing for this long is given up (the process is
    /// killed, or not created); zero means [`DEFAULT_STREAM_STALL`].
    pub stream_stall: std::time::Duration,
}

/// Default of [`RestoreOptions::stream_stall`].
pub const DEFAULT_STREAM_STALL: std::time::Duration = std::time::Duration::from_secs(30);

/// Restore with lazy (post-copy) paging of the anonymous memory: the process runs as soon
/// as its registers are loaded; the returned [`LazyPager`] serves its page faults from the
/// swap file and pushes the rest in the background. Keep the calling process alive until
/// [`LazyPager::wait`] returns (then the process no longer depends on the image).
pub fn restore_lazy(dir: &Path, opts: &RestoreOptions) -> Result<(Restored, LazyPager)> {
    restore_impl(dir, opts, true)
}

/// Result of a restore.
#[derive(Debug, Clone)]
pub struct Restored {
    /// Pid in the restorer's pid namespace.
    pub pid: i32,
    /// Pid inside the new namespace (equal to the image's innermost pid), if one was made.
    pub ns_pid: Option<i32>,
    /// The namespace's init (reaper), a child of the restorer, if one was made.
    pub init_pid: Option<i32>,
    /// The other processes of a restored process tree (pids in the restorer's namespace).
    pub members: Vec<i32>,
    /// Things that could not be restored exactly (e.g. a raised hard rlimit).
    pub warnings: Vec<String>,
}

/// Restore the image in `dir` with default options; returns the new pid.
pub fn restore(dir: &Path) -> Result<i32> {
    restore_with(dir, &RestoreOptions::default()).map(|r| r.pid)
}

const TRAMP_CODE: &[u8] = &[0x0f, 0x05, 0xcc, 0xcc]; // syscall; int3
const TRAMP_LEN: u64 = 16 * PAGE; // code page + 15 scratch pages
const SCRATCH_OFF: u64 = PAGE;

fn fid_ok(path: &str, want: &Option<image::FileId>) -> Result<()> {
    let m = std::fs::metadata(path).map_err(|e| RestoreError::File {
        path: path.into(),
        what: format!("cannot stat: {e}"),
    })?;
    if let Some(w) = want {
        if m.size() != w.size || m.mtime() != w.mtime_sec || m.mtime_nsec() != w.mtime_nsec {
            return Err(RestoreError::File {
                path: path.into(),
                what: format!(
                    "differs from the dumped file (size {} vs {}, mtime {} vs {})",
                    m.size(),
                    w.size,
                    m.mtime(),
                    w.mtime_sec
                ),
            });
        }
    }
    Ok(())
}

/// Restore the image in `dir`.
pub fn restore_with(dir: &Path, opts: &RestoreOptions) -> Result<Restored> {
    restore_impl(dir, opts, false).map(|r| r.0)
}

fn restore_impl(dir: &Path, opts: &RestoreOptions, lazy: bool) -> Result<(Restored, LazyPager)> {
    // ---- load and check every image of the tree before anything is created ------------
    let stall = if opts.stream_stall.is_zero() {
        DEFAULT_STREAM_STALL
    } else {
        opts.stream_stall
    };
    let (root, digest) = image::load_with_digest(dir)?;
    let mut readers = vec![SwapReader::open(dir, &root, &digest, opts.mac.as_ref())?];
    let mut imgs: Vec<(PathBuf, ImageMeta)> = Vec::new();
    for mb in &root.members {
        let d = dir.join(&mb.dir);
        let (m, digest) = image::load_with_digest(&d)?;
        readers.push(SwapReader::open(&d, &m, &digest, opts.mac.as_ref())?);
        let ns = *m.ns_pids.last().unwrap_or(&m.pid);
        if m.image_id != mb.image_id || ns != mb.ns_pid {
            return Err(ImageError::Invalid {
                path: d.join(image::META_FILE),
                detail: format!(
                    "member image is pid {ns} / image {:#x}, the tree expects pid {} / image {:#x}",
                    m.image_id, mb.ns_pid, mb.image_id
                ),
            }
            .into());
        }
        imgs.push((d, m));
    }
    imgs.insert(0, (dir.to_path_buf(), root));
    let tree = imgs.len() > 1;
    if !lazy {
        // An eager restore needs every page before the process runs.
        for r in readers.iter_mut() {
            r.wait_for(r.len(), stall)?;
        }
    }

    // ---- preflight: everything that can fail without creating anything -----------------
    let own_maps = procfs::maps(std::process::id() as i32)?;
    for (_, meta) in &imgs {
        preflight(meta, &own_maps)?;
    }
    let meta = &imgs[0].1;
    let (owned, pass) = open_descriptors(&imgs, opts)?;

    // ---- trampoline address: free in every image and in our own (= the child's) layout --
    let mut busy: Vec<(u64, u64)> = imgs
        .iter()
        .flat_map(|(_, m)| m.vmas.iter().map(|v| (v.start, v.end)))
        .collect();
    busy.extend(own_maps.iter().map(|m| (m.start, m.end)));
    let tramp = find_gap(&busy, TRAMP_LEN + 2 * PAGE, 0x1000_0000)
        .ok_or(RestoreError::NoTrampolineSpace)?
        + PAGE;

    let mode = match opts.pid_mode {
        PidMode::Auto if meta.ns_pids.len() > 1 => PidMode::NewNamespace,
        PidMode::Auto => PidMode::Any,
        m => m,
    };
    let want_ns_pid = *meta.ns_pids.last().unwrap_or(&meta.pid);

    if !meta.threads.is_empty() && mode != PidMode::NewNamespace {
        // glibc caches every thread's tid (struct pthread::tid): threads must keep theirs.
        return Err(RestoreError::Pid {
            pid: meta.pid,
            what: format!(
                "{} threads can only be restored into a new pid namespace (their tids must not change)",
                meta.threads.len() + 1
            ),
        });
    }
    if tree && mode != PidMode::NewNamespace {
        return Err(RestoreError::Pid {
            pid: meta.pid,
            what: format!(
                "a tree of {} processes can only be restored into a new pid namespace (their pids must not change)",
                imgs.len()
            ),
        });
    }
    let (pid, init_pid) = spawn(mode, want_ns_pid, tramp, &meta.hostname, &opts.cgroup_procs)?;
    let created = std::cell::RefCell::new(vec![pid]);
    let cleanup = |e: RestoreError| -> RestoreError {
        // Every thread of the half-built processes is traced by us: its death must be
        // collected here (threads first, then the leader), or it stays a traced zombie
        // and the namespace init, which waits for it while dying, never exits.
        let pids = created.borrow().clone();
        let tids: Vec<Vec<i32>> = pids
            .iter()
            .map(|p| procfs::threads(*p).unwrap_or_default())
            .collect();
        for p in &pids {
            let _ = sys::kill(*p, libc::SIGKILL);
        }
        for (p, ts) in pids.iter().zip(&tids) {
            for tid in ts.iter().filter(|t| *t != p) {
                let _ = sys::wait(*tid);
            }
            let _ = sys::wait(*p);
        }
        if let Some(i) = init_pid {
            let _ = sys::kill(i, libc::SIGKILL);
            let _ = sys::wait(i);
        }
        e
    };
    let mut warnings = Vec::new();
    let r = (|| -> Result<(Vec<Option<LazyPager>>, Vec<i32>)> {
        sys::seize(
            pid,
            libc::PTRACE_O_TRACESYSGOOD
                | libc::PTRACE_O_EXITKILL
                | libc::PTRACE_O_TRACECLONE
                | libc::PTRACE_O_TRACEFORK,
        )?;
        sys::interrupt(pid)?;
        wait_event_stop(pid, "restore child")?;
        let base = sys::get_regs(pid)?;
        let mut injs = vec![Injector::new(pid, tramp, base)?];
        if tree {
            create_members(&imgs, &mut injs, tramp, &created)?;
        }
        let mut pagers = Vec::new();
        let mut launches = Vec::new();
        for (i, (inj, pages)) in injs.iter_mut().zip(readers.drain(..)).enumerate() {
            let (p, l) = build(
                inj,
                &imgs[i].1,
                pages,
                stall,
                tramp,
                &pass[i],
                &mut warnings,
                lazy,
                opts.lazy_push_delay,
                mode != PidMode::NewNamespace,
            )?;
            pagers.push(p);
            launches.push(l);
        }
        // Every process is complete: only now does any of them run.
        for l in launches.iter().rev() {
            l.go()?;
        }
        Ok((pagers, injs[1..].iter().map(|i| i.pid()).collect()))
    })();
    let (pagers, members) = match r {
        Ok(p) => p,
        Err(e) => return Err(cleanup(e)),
    };
    drop(owned);
    let pager = LazyPager::all(pagers.into_iter().flatten().collect());
    Ok((
        Restored {
            pid,
            ns_pid: (mode == PidMode::NewNamespace).then_some(want_ns_pid),
            init_pid,
            members,
            warnings,
        },
        pager,
    ))
}

/// Wait for the PTRACE_EVENT_STOP of a new or interrupted tracee.
fn wait_event_stop(pid: i32, what: &str) -> Result<()> {
    loop {
        match sys::wait(pid)? {
            Wait::Stopped { event, .. } if event == libc::PTRACE_EVENT_STOP => return Ok(()),
            Wait::Stopped { .. } => sys::cont(pid, 0)?,
            other => {
                return Err(RestoreError::Helper {
                    pid,
                    what: format!("{what} ended early: {other:?}"),
                })
            }
        }
    }
}

/// Checks of one image against this host that need no process.
fn preflight(meta: &ImageMeta, own_maps: &[procfs::MapEntry]) -> Result<()> {
    for v in &meta.vmas {
        if matches!(v.kind, VmaKind::FilePrivate | VmaKind::FileShared) {
            fid_ok(&v.name, &v.file)?;
        }
    }
    fid_ok(&meta.exe, &meta.exe_file)?;
    let own_vdso = own_maps
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| RestoreError::Vdso {
            what: "this process has no [vdso]".into(),
        })?;
    let mut vb = vec![0u8; (own_vdso.end - own_vdso.start) as usize];
    File::open("/proc/self/mem")
        .and_then(|f| f.read_exact_at(&mut vb, own_vdso.start))
        .map_err(|e| RestoreError::Vdso {
            what: format!("cannot read own vdso: {e}"),
        })?;
    if sha2::Sha256::digest(&vb).as_slice() != meta.vdso_sha256.as_slice() {
        return Err(RestoreError::Vdso {
            what: "vdso contents differ (different kernel build)".into(),
        });
    }
    let own_specials: Vec<_> = own_maps
        .iter()
        .filter(|m| m.name == "[vdso]" || m.name.starts_with("[vvar"))
        .cloned()
        .collect();
    for s in &own_specials {
        let img = meta.vmas.iter().find(|v| v.name == s.name);
        match img {
            Some(v) if v.end - v.start == s.end - s.start => {}
            _ => {
                return Err(RestoreError::Vdso {
                    what: format!("{} has a different size or is missing in the image", s.name),
                })
            }
        }
    }
    if meta
        .vmas
        .iter()
        .filter(|v| v.kind == VmaKind::Special)
        .count()
        != own_specials.len()
    {
        return Err(RestoreError::Vdso {
            what: "different set of vdso/vvar mappings".into(),
        });
    }
    for f in &meta.fds {
        match &f.kind {
            // Only existence: an open file's contents may legitimately change while the
            // process is frozen (shared files, cluster pipes); mapped files are checked.
            FdKind::Regular => fid_ok(&f.path, &None)?,
            FdKind::CharDev => {
                if !Path::new(&f.path).exists() {
                    return Err(RestoreError::Fd {
                        fd: f.fd,
                        what: format!("{} does not exist here", f.path),
                    });
                }
            }
            FdKind::Pipe { .. } => {}
        }
    }
    Ok(())
}

/// Descriptors opened here, in the restorer, and handed to the processes: pipe ends
/// (inherited from the caller, recreated with their data, or reopened from the frozen
/// source) and files whose open file description several descriptors shared. Returns the
/// owned descriptors (keep them until every process is built) and, per image, the
/// (fd number, our descriptor) pairs to install. Other files are reopened by path inside
/// each process.
#[allow(clippy::type_complexity)]
fn open_descriptors(
    imgs: &[(PathBuf, ImageMeta)],
    opts: &RestoreOptions,
) -> Result<(Vec<OwnedFd>, Vec<Vec<(i32, RawFd)>>)> {
    use std::collections::HashMap;
    use std::os::unix::fs::OpenOptionsExt;
    let root = &imgs[0].1;
    let mut uses: HashMap<u32, usize> = HashMap::new();
    for (_, m) in imgs {
        for f in &m.fds {
            *uses.entry(f.desc).or_default() += 1;
        }
    }
    let mut owned: Vec<OwnedFd> = Vec::new();
    // Recreated pipes: ino -> (read end, write end, ends already given a description).
    let mut pipes: HashMap<u64, (RawFd, RawFd, Vec<bool>)> = HashMap::new();
    for p in root.pipes.iter().filter(|p| !p.external) {
        let (rd, wr) = sys::pipe2(libc::O_NONBLOCK)?;
        let got = sys::set_pipe_size(wr.as_raw_fd(), p.size)?;
        if got < p.data.len() as u32 {
            return Err(RestoreError::Fd {
                fd: -1,
                what: format!("pipe {}: capacity {got} < {} bytes", p.ino, p.data.len()),
            });
        }
        if !p.data.is_empty() {
            let n = nix::unistd::write(&wr, &p.data).map_err(|e| RestoreError::Fd {
                fd: -1,
                what: format!("pipe {}: cannot refill it: {e}", p.ino),
            })?;
            if n != p.data.len() {
                return Err(RestoreError::Fd {
                    fd: -1,
                    what: format!("pipe {}: refilled {n} of {} bytes", p.ino, p.data.len()),
                });
            }
        }
        // The processes set their own O_NONBLOCK status flags later.
        for fd in [&rd, &wr] {
            let _ = nix::fcntl::fcntl(
                fd.as_raw_fd(),
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
            );
        }
        pipes.insert(p.ino, (rd.as_raw_fd(), wr.as_raw_fd(), vec![false, false]));
        owned.push(rd);
        owned.push(wr);
    }
    let mut by_desc: HashMap<u32, RawFd> = HashMap::new();
    let mut out = Vec::new();
    for (i, (_, m)) in imgs.iter().enumerate() {
        let mut pass = Vec::new();
        for f in &m.fds {
            if i == 0 {
                if let Some((_, raw)) = opts.inherit_fds.iter().find(|(n, _)| *n == f.fd) {
                    let fd = sys::dup_owned(*raw).map_err(|e| RestoreError::Fd {
                        fd: f.fd,
                        what: format!("cannot dup inherited fd {raw}: {e}"),
                    })?;
                    pass.push((f.fd, fd.as_raw_fd()));
                    owned.push(fd);
                    continue;
                }
            }
            if let Some(raw) = by_desc.get(&f.desc) {
                pass.push((f.fd, *raw));
                continue;
            }
            let acc = f.flags & libc::O_ACCMODE as u32;
            let opened: OwnedFd = match &f.kind {
                FdKind::Pipe { ino } => match pipes.get_mut(ino) {
                    Some((rd, wr, given)) => {
                        let end = if acc == libc::O_WRONLY as u32 { 1 } else { 0 };
                        let raw = if end == 1 { *wr } else { *rd };
                        if !given[end] && acc != libc::O_RDWR as u32 {
                            // The pipe end itself is this description.
                            given[end] = true;
                            by_desc.insert(f.desc, raw);
                            pass.push((f.fd, raw));
                            continue;
                        }
                        // Another description of the same pipe: reopen it.
                        reopen(&format!("/proc/self/fd/{raw}"), acc, f)?
                    }
                    None => reopen_source_pipe(m, f)?,
                },
                FdKind::Regular | FdKind::CharDev if uses.get(&f.desc).copied() > Some(1) => {
                    let fl = (f.flags as i32)
                        & !(libc::O_CREAT
                            | libc::O_EXCL
                            | libc::O_TRUNC
                            | libc::O_CLOEXEC
                            | libc::O_ACCMODE)
                        | libc::O_CLOEXEC;
                    let file = std::fs::OpenOptions::new()
                        .read(acc != libc::O_WRONLY as u32)
                        .write(acc != libc::O_RDONLY as u32)
                        .custom_flags(fl)
                        .open(&f.path)
                        .map_err(|e| RestoreError::Fd {
                            fd: f.fd,
                            what: format!("cannot reopen {}: {e}", f.path),
                        })?;
                    if f.kind == FdKind::Regular && f.pos != 0 {
                        nix::unistd::lseek(
                            file.as_raw_fd(),
                            f.pos as i64,
                            nix::unistd::Whence::SeekSet,
                        )
                        .map_err(|e| RestoreError::Fd {
                            fd: f.fd,
                            what: format!("cannot seek {} to {}: {e}", f.path, f.pos),
                        })?;
                    }
                    OwnedFd::from(file)
                }
                // Private descriptions: reopened inside the process.
                _ => continue,
            };
            by_desc.insert(f.desc, opened.as_raw_fd());
            pass.push((f.fd, opened.as_raw_fd()));
            owned.push(opened);
        }
        out.push(pass);
    }
    Ok((owned, out))
}

fn reopen(src: &str, acc: u32, f: &image::FdEntry) -> Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(acc != libc::O_WRONLY as u32)
        .write(acc != libc::O_RDONLY as u32)
        .open(src)
        .map_err(|e| RestoreError::Fd {
            fd: f.fd,
            what: format!("pipe {} cannot be reopened from {src}: {e}", f.path),
        })?;
    Ok(OwnedFd::from(file))
}

/// A pipe shared with processes outside the job: reopened from the frozen source (same
/// host only).
fn reopen_source_pipe(m: &ImageMeta, f: &image::FdEntry) -> Result<OwnedFd> {
    let src = format!("/proc/{}/fd/{}", m.pid, f.fd);
    let acc = f.flags & libc::O_ACCMODE as u32;
    let fd = reopen(&src, acc, f).map_err(|e| RestoreError::Fd {
        fd: f.fd,
        what: format!("pipe {} is not inherited and {e}", f.path),
    })?;
    let ino = std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|m| m.ino())
        .unwrap_or(0);
    if (FdKind::Pipe { ino }) != f.kind {
        return Err(RestoreError::Fd {
            fd: f.fd,
            what: format!("{src} is no longer {}", f.path),
        });
    }
    Ok(fd)
}

/// Create the other processes of a tree, each with its old pid (clone3 set_tid injected
/// into its parent; CLONE_PARENT from the root for children of the namespace's init),
/// then its session (setsid) and process group (setpgid), and check both. Parents come
/// before their children in `imgs`.
fn create_members(
    imgs: &[(PathBuf, ImageMeta)],
    injs: &mut Vec<Injector>,
    tramp: u64,
    created: &std::cell::RefCell<Vec<i32>>,
) -> Result<()> {
    let sc = Scratch {
        base: tramp + SCRATCH_OFF,
        len: TRAMP_LEN - SCRATCH_OFF,
    };
    let ns = |m: &ImageMeta| *m.ns_pids.last().unwrap_or(&m.pid);
    let root = &imgs[0].1;
    let root_ns = ns(root);
    let mut order: Vec<usize> = Vec::new();
    // Children of init outside the root's session must be created before the root
    // starts a session of its own (they inherit the session at creation).
    let root_setsid = root.ns_sid == root_ns;
    if root_setsid {
        order.extend(
            (1..imgs.len()).filter(|i| imgs[*i].1.ns_ppid == 1 && imgs[*i].1.ns_sid != root_ns),
        );
    }
    let early = order.clone();
    order.push(0);
    order.extend((1..imgs.len()).filter(|i| !early.contains(i)));
    // injs[k] belongs to imgs[k]; members are created in `order`.
    let mut slot: Vec<Option<Injector>> = (0..imgs.len()).map(|_| None).collect();
    slot[0] = Some(injs.remove(0));
    for i in order {
        let m = &imgs[i].1;
        if i != 0 {
            let (parent, flags) = if m.ns_ppid == 1 {
                (0usize, libc::CLONE_PARENT as u64)
            } else {
                let p = (0..imgs.len())
                    .find(|k| ns(&imgs[*k].1) == m.ns_ppid)
                    .ok_or_else(|| RestoreError::Pid {
                        pid: ns(m),
                        what: format!("its parent {} is not in the image", m.ns_ppid),
                    })?;
                (p, 0)
            };
            let pinj = slot[parent].as_mut().ok_or_else(|| RestoreError::Pid {
                pid: ns(m),
                what: format!("its parent {} is created after it", m.ns_ppid),
            })?;
            let exit_signal = if flags == 0 { libc::SIGCHLD as u64 } else { 0 };
            inject_clone3(pinj, &sc, "clone3(process)", flags, exit_signal, ns(m))?.map_err(
                |e| RestoreError::Pid {
                    pid: ns(m),
                    what: format!("cannot recreate the process: {e}"),
                },
            )?;
            let child = pinj.cloned.pop().ok_or_else(|| RestoreError::Helper {
                pid: pinj.pid(),
                what: format!("clone3 of process {} reported no ptrace event", ns(m)),
            })?;
            created.borrow_mut().push(child);
            wait_event_stop(child, "new process")?;
            let base = sys::get_regs(child)?;
            slot[i] = Some(Injector::new(child, tramp, base)?);
        }
        if m.ns_sid == ns(m) {
            let inj = slot[i].as_mut().expect("just created");
            inj.call("setsid", libc::SYS_setsid, [0; 6])
                .map_err(|e| RestoreError::Pid {
                    pid: ns(m),
                    what: format!("cannot start its session: {e}"),
                })?;
        }
    }
    // Process groups: leaders first, then the members join.
    for leaders in [true, false] {
        for (i, (_, m)) in imgs.iter().enumerate() {
            if m.ns_pgid == 0 || (m.ns_pgid == ns(m)) != leaders || m.ns_sid == ns(m) {
                continue;
            }
            let inj = slot[i].as_mut().expect("created");
            if ns_ids(inj.pid())?.0 == m.ns_pgid {
                continue;
            }
            let target = if leaders { 0 } else { m.ns_pgid as u64 };
            inj.call("setpgid", libc::SYS_setpgid, [0, target, 0, 0, 0, 0])
                .map_err(|e| RestoreError::Pid {
                    pid: ns(m),
                    what: format!("cannot join process group {}: {e}", m.ns_pgid),
                })?;
        }
    }
    for (i, (_, m)) in imgs.iter().enumerate() {
        let pid = slot[i].as_ref().expect("created").pid();
        let (pgid, sid) = ns_ids(pid)?;
        if (pgid, sid) != (m.ns_pgid, m.ns_sid) {
            return Err(RestoreError::Pid {
                pid: ns(m),
                what: format!(
                    "process group/session {pgid}/{sid} instead of {}/{}",
                    m.ns_pgid, m.ns_sid
                ),
            });
        }
    }
    *injs = slot.into_iter().map(|s| s.expect("created")).collect();
    Ok(())
}

/// (process group, session) of a process in its innermost pid namespace (0: outside it).
fn ns_ids(pid: i32) -> Result<(i32, i32)> {
    let st = procfs::status(pid)?;
    let last = |k: &str| -> Result<i32> {
        Ok(
            procfs::nums::<i32>(pid, k, procfs::status_get(pid, &st, k)?)?
                .last()
                .copied()
                .unwrap_or(0),
        )
    };
    Ok((last("NSpgid")?, last("NSsid")?))
}

/// Lowest gap of `len` bytes at or above `min`, not overlapping any busy range.
fn find_gap(busy: &[(u64, u64)], len: u64, min: u64) -> Option<u64> {
    let mut b = busy.to_vec();
    b.sort_unstable();
    let mut cand = min;
    for (s, e) in b {
        if e <= cand {
            continue;
        }
        if s >= cand + len {
            return Some(cand);
        }
        cand = cand.max(e);
    }
    (cand + len <= 0x7fff_0000_0000).then_some(cand)
}

/// Create the child that waits in the trampoline. Returns (pid, init pid).
fn spawn(
    mode: PidMode,
    ns_pid: i32,
    tramp: u64,
    hostname: &str,
    cgroup_procs: &[RawFd],
) -> Result<(i32, Option<i32>)> {
    let (rd, wr) = nix::unistd::pipe().map_err(|e| RestoreError::Helper {
        pid: ns_pid,
        what: format!("pipe: {e}"),
    })?;
    let wr_raw = wr.as_raw_fd();
    let host = hostname.as_bytes().to_vec();
    let rseq = sys::glibc_rseq();
    let (pid, init) = if mode == PidMode::NewNamespace {
        let init = sys::fork_with_flags(libc::CLONE_NEWPID | libc::CLONE_NEWUTS)?;
        if init == 0 {
            // Child: pid 1 of the new namespace. Only async-signal-safe calls from here.
            sys::child_join_cgroups(cgroup_procs);
            sys::child_sethostname(&host);
            match sys::fork_with_tid(ns_pid) {
                Ok(0) => {
                    sys::child_trampoline_then_pause(tramp, TRAMP_LEN as usize, TRAMP_CODE, wr_raw)
                }
                Ok(t) => {
                    sys::child_become_reaper(t, rseq);
                }
                Err(_) => {
                    let b = [2u8];
                    let _ = nix::unistd::write(&wr, &b);
                    sys::child_exit(122);
                }
            }
        }
        drop(wr);
        let st = read_sync(&rd, init)?;
        if st != 0 {
            let _ = sys::wait(init);
            return Err(RestoreError::Pid {
                pid: ns_pid,
                what: if st == 2 {
                    "clone3 with set_tid failed in the new pid namespace".into()
                } else {
                    "trampoline mapping failed".into()
                },
            });
        }
        let kids = procfs::children_of(init);
        if kids.len() != 1 {
            let _ = sys::kill(init, libc::SIGKILL);
            let _ = sys::wait(init);
            return Err(RestoreError::Helper {
                pid: init,
                what: format!("expected one child of the namespace init, found {kids:?}"),
            });
        }
        (kids[0], Some(init))
    } else {
        let t = sys::fork_with_flags(0)?;
        if t == 0 {
            sys::child_join_cgroups(cgroup_procs);
            sys::child_trampoline_then_pause(tramp, TRAMP_LEN as usize, TRAMP_CODE, wr_raw);
        }
        drop(wr);
        let st = read_sync(&rd, t)?;
        if st != 0 {
            let _ = sys::wait(t);
            return Err(RestoreError::Helper {
                pid: t,
                what: "trampoline mapping failed".into(),
            });
        }
        (t, None)
    };
    Ok((pid, init))
}

fn read_sync(rd: &OwnedFd, pid: i32) -> Result<u8> {
    let mut b = [0u8; 1];
    loop {
        match nix::unistd::read(rd.as_raw_fd(), &mut b) {
            Ok(1) => return Ok(b[0]),
            Ok(_) => {
                return Err(RestoreError::Helper {
                    pid,
                    what: "child exited before reporting".into(),
                })
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                return Err(RestoreError::Helper {
                    pid,
                    what: format!("sync read: {e}"),
                })
            }
        }
    }
}

struct Scratch {
    base: u64,
    len: u64,
}

impl Scratch {
    /// Place `data` at the start of scratch + `off`; returns the address.
    fn put(&self, inj: &Injector, off: u64, data: &[u8]) -> Result<u64> {
        if off + data.len() as u64 > self.len {
            return Err(RestoreError::Helper {
                pid: inj.pid(),
                what: format!("scratch overflow ({} bytes)", data.len()),
            });
        }
        inj.write(self.base + off, data)?;
        Ok(self.base + off)
    }

    fn cstr(&self, inj: &Injector, off: u64, s: &str) -> Result<u64> {
        let mut b = s.as_bytes().to_vec();
        b.push(0);
        self.put(inj, off, &b)
    }
}

#[allow(clippy::too_many_arguments)] // mirrors mmap(2) plus a label for errors
fn mmap_at(
    inj: &mut Injector,
    what: &str,
    start: u64,
    len: u64,
    prot: u32,
    flags: i32,
    fd: u64,
    off: u64,
) -> Result<()> {
    let got = inj
        .call(
            "mmap",
            libc::SYS_mmap,
            [
                start,
                len,
                prot as u64,
                (flags | libc::MAP_FIXED) as u64,
                fd,
                off,
            ],
        )
        .map_err(|e| RestoreError::Map {
            pid: inj.pid(),
            what: format!("{what} at {start:#x} ({len} bytes)"),
            source: e,
        })?;
    if got != start {
        return Err(RestoreError::Mismatch {
            pid: inj.pid(),
            step: format!("mmap of {what}"),
            got,
            want: start,
        });
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)] // one call site; the state of one restore
fn build(
    inj: &mut Injector,
    meta: &ImageMeta,
    mut pages: SwapReader,
    stall: std::time::Duration,
    tramp: u64,
    pass: &[(i32, RawFd)],
    warnings: &mut Vec<String>,
    lazy: bool,
    push_delay: std::time::Duration,
    new_pid: bool,
) -> Result<(Option<LazyPager>, Launch)> {
    let pid = inj.pid();
    let sc = Scratch {
        base: tramp + SCRATCH_OFF,
        len: TRAMP_LEN - SCRATCH_OFF,
    };
    let nr = |n: libc::c_long| -> i64 { n };

    // 1. Drop the rseq registration inherited from the restorer (it points into memory
    //    that is about to disappear).
    let cfg = sys::get_rseq(pid)?;
    if cfg.abi_size > 0 {
        inj.call(
            "rseq(unregister)",
            nr(libc::SYS_rseq),
            [
                cfg.abi_pointer,
                cfg.abi_size as u64,
                1,
                cfg.signature as u64,
                0,
                0,
            ],
        )?;
    }

    // 2. Descriptors: keep only the pipe ends we pass, parked above every wanted number.
    let hi = meta
        .fds
        .iter()
        .map(|f| f.fd)
        .chain(pass.iter().map(|(_, o)| *o))
        .max()
        .unwrap_or(0) as u64
        + 1;
    let mut parked: BTreeMap<i32, u64> = BTreeMap::new();
    for (want, o) in pass {
        let t = inj.call(
            "fcntl(F_DUPFD)",
            nr(libc::SYS_fcntl),
            [*o as u64, libc::F_DUPFD as u64, hi, 0, 0, 0],
        )?;
        parked.insert(*want, t);
    }
    for fd in procfs::fds(pid)? {
        if !parked.values().any(|p| *p == fd as u64) {
            inj.call("close", nr(libc::SYS_close), [fd as u64, 0, 0, 0, 0, 0])?;
        }
    }

    // 3. Address space: unmap all but the trampoline and the vdso/vvar pages.
    let cur = procfs::maps(pid)?;
    for m in &cur {
        let special = m.name == "[vdso]" || m.name.starts_with("[vvar") || m.name == "[vsyscall]";
        if special || (m.start >= tramp && m.end <= tramp + TRAMP_LEN) {
            continue;
        }
        inj.call(
            "munmap",
            nr(libc::SYS_munmap),
            [m.start, m.end - m.start, 0, 0, 0, 0],
        )?;
    }
    // Move vdso/vvar to their old addresses, through a free parking area.
    let specials: Vec<_> = cur
        .iter()
        .filter(|m| m.name == "[vdso]" || m.name.starts_with("[vvar"))
        .cloned()
        .collect();
    let total: u64 = specials.iter().map(|m| m.end - m.start).sum();
    let mut busy: Vec<(u64, u64)> = meta.vmas.iter().map(|v| (v.start, v.end)).collect();
    busy.extend(specials.iter().map(|m| (m.start, m.end)));
    busy.push((tramp, tramp + TRAMP_LEN));
    let park = find_gap(&busy, total + PAGE, 0x2000_0000).ok_or(RestoreError::NoTrampolineSpace)?;
    let mut at = park;
    let mut parked_specials = Vec::new();
    for m in &specials {
        let len = m.end - m.start;
        let got = inj.call(
            "mremap(park)",
            nr(libc::SYS_mremap),
            [
                m.start,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                at,
                0,
            ],
        )?;
        if got != at {
            return Err(RestoreError::Mismatch {
                pid,
                step: format!("mremap of {}", m.name),
                got,
                want: at,
            });
        }
        parked_specials.push((m.name.clone(), at, len));
        at += len;
    }
    for (name, from, len) in parked_specials {
        let v = meta
            .vmas
            .iter()
            .find(|v| v.name == name)
            .ok_or_else(|| RestoreError::Vdso {
                what: format!("{name} missing in image"),
            })?;
        let got = inj.call(
            "mremap",
            nr(libc::SYS_mremap),
            [
                from,
                len,
                len,
                (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                v.start,
                0,
            ],
        )?;
        if got != v.start {
            return Err(RestoreError::Mismatch {
                pid,
                step: format!("mremap of {name}"),
                got,
                want: v.start,
            });
        }
    }

    // 4. Recreate every VMA at its address.
    for v in &meta.vmas {
        let len = v.end - v.start;
        match v.kind {
            VmaKind::AnonPrivate => {
                let mut fl = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                if v.growsdown {
                    fl |= libc::MAP_GROWSDOWN;
                }
                if v.noreserve {
                    fl |= libc::MAP_NORESERVE;
                }
                mmap_at(
                    inj,
                    &format!("anonymous {:#x}", v.start),
                    v.start,
                    len,
                    v.prot,
                    fl,
                    u64::MAX,
                    0,
                )?;
            }
            VmaKind::AnonShared => {
                mmap_at(
                    inj,
                    &format!("shared anonymous {:#x}", v.start),
                    v.start,
                    len,
                    v.prot,
                    libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                    u64::MAX,
                    0,
                )?;
            }
            VmaKind::FilePrivate | VmaKind::FileShared => {
                let shared = v.kind == VmaKind::FileShared;
                let oflags = if shared && v.maywrite {
                    libc::O_RDWR
                } else {
                    libc::O_RDONLY
                };
                let p = sc.cstr(inj, 0, &v.name)?;
                let fd = inj
                    .call(
                        "openat(mapping)",
                        nr(libc::SYS_openat),
                        [
                            libc::AT_FDCWD as u64,
                            p,
                            (oflags | libc::O_CLOEXEC) as u64,
                            0,
                            0,
                            0,
                        ],
                    )
                    .map_err(|e| RestoreError::File {
                        path: v.name.clone(),
                        what: format!("cannot open for mapping: {e}"),
                    })?;
                let mut fl = if shared {
                    libc::MAP_SHARED
                } else {
                    libc::MAP_PRIVATE
                };
                if v.noreserve {
                    fl |= libc::MAP_NORESERVE;
                }
                let r = mmap_at(inj, &v.name, v.start, len, v.prot, fl, fd, v.offset);
                inj.call("close", nr(libc::SYS_close), [fd, 0, 0, 0, 0, 0])?;
                r?;
            }
            VmaKind::Special | VmaKind::Vsyscall => {}
        }
    }

    // 5. Page contents from the swap file (lazy VMAs: only remembered for the pager).
    let lazy_vmas: Vec<&image::Vma> = meta
        .vmas
        .iter()
        .filter(|v| lazy && crate::lazy::paged_lazily(v))
        .collect();
    let mut pending = crate::lazy::Runs::default();
    let mut buf = vec![0u8; 4 << 20];
    let mut vi = 0;
    for r in &meta.page_runs {
        // Runs and VMAs are both sorted: one pass.
        while vi < lazy_vmas.len() && lazy_vmas[vi].end <= r.vaddr {
            vi += 1;
        }
        if lazy_vmas.get(vi).is_some_and(|v| v.start <= r.vaddr) {
            pending.add(r.vaddr, r.npages, r.offset);
            continue;
        }
        let mut done = 0u64;
        let total = r.npages * PAGE;
        while done < total {
            let n = (total - done).min(buf.len() as u64) as usize;
            let off = r.offset + done;
            pages.wait_for(off + n as u64, stall)?;
            pages.read_at(&mut buf[..n], off).map_err(|e| match e {
                crate::swap::SwapError::Image(e) => RestoreError::from(e),
                crate::swap::SwapError::NotYet { path, .. } => RestoreError::Pages {
                    path,
                    source: std::io::Error::other("not written yet"),
                },
            })?;
            inj.write(r.vaddr + done, &buf[..n])?;
            done += n as u64;
        }
    }
    let mut pager = None;
    if lazy && !lazy_vmas.is_empty() {
        let fd_t = inj.call(
            "userfaultfd",
            nr(libc::SYS_userfaultfd),
            [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
        )?;
        let mut api = Vec::new();
        let features = uffd::FEATURE_EVENT_REMAP
            | uffd::FEATURE_EVENT_REMOVE
            | uffd::FEATURE_EVENT_UNMAP
            | uffd::FEATURE_EVENT_FORK;
        for w in [uffd::API, features, 0] {
            api.extend_from_slice(&w.to_le_bytes());
        }
        let a = sc.put(inj, 0, &api)?;
        inj.call(
            "ioctl(UFFDIO_API)",
            nr(libc::SYS_ioctl),
            [fd_t, uffd::IOC_API, a, 0, 0, 0],
        )?;
        for v in &lazy_vmas {
            let mut reg = Vec::new();
            for w in [v.start, v.end - v.start, uffd::REGISTER_MODE_MISSING, 0] {
                reg.extend_from_slice(&w.to_le_bytes());
            }
            let a = sc.put(inj, 0, &reg)?;
            inj.call(
                "ioctl(UFFDIO_REGISTER)",
                nr(libc::SYS_ioctl),
                [fd_t, uffd::IOC_REGISTER, a, 0, 0, 0],
            )?;
        }
        let owned = sys::steal_fd(pid, fd_t as i32)?;
        inj.call(
            "close(userfaultfd)",
            nr(libc::SYS_close),
            [fd_t, 0, 0, 0, 0, 0],
        )?;
        pager = Some(crate::lazy::start(
            pid, owned, pages, pending, push_delay, stall,
        ));
    }

    // The pid changed (no namespace): glibc caches the thread's tid in struct pthread,
    // at the very address registered with set_tid_address; raise(), abort() and
    // pthread_kill() read it. Write the new one there.
    if new_pid && meta.clear_child_tid != 0 {
        inj.write(meta.clear_child_tid, &pid.to_le_bytes())?;
    }

    // 6. mm fields and exe link.
    let p = sc.cstr(inj, 0, &meta.exe)?;
    let exe_fd = inj
        .call(
            "openat(exe)",
            nr(libc::SYS_openat),
            [
                libc::AT_FDCWD as u64,
                p,
                (libc::O_RDONLY | libc::O_CLOEXEC) as u64,
                0,
                0,
                0,
            ],
        )
        .map_err(|e| RestoreError::File {
            path: meta.exe.clone(),
            what: format!("cannot open executable: {e}"),
        })?;
    let auxv_addr = sc.put(inj, 0x1000, &meta.mm.auxv)?;
    let m = &meta.mm;
    let mut mm = Vec::with_capacity(104);
    for w in [
        m.start_code,
        m.end_code,
        m.start_data,
        m.end_data,
        m.start_brk,
        m.brk,
        m.start_stack,
        m.arg_start,
        m.arg_end,
        m.env_start,
        m.env_end,
        auxv_addr,
    ] {
        mm.extend_from_slice(&w.to_le_bytes());
    }
    mm.extend_from_slice(&(m.auxv.len() as u32).to_le_bytes());
    mm.extend_from_slice(&(exe_fd as u32).to_le_bytes());
    let mm_addr = sc.put(inj, 0x2000, &mm)?;
    let r = inj.call(
        "prctl(PR_SET_MM_MAP)",
        nr(libc::SYS_prctl),
        [
            libc::PR_SET_MM as u64,
            libc::PR_SET_MM_MAP as u64,
            mm_addr,
            mm.len() as u64,
            0,
            0,
        ],
    );
    inj.call("close", nr(libc::SYS_close), [exe_fd, 0, 0, 0, 0, 0])?;
    r?;

    // 7. Descriptors.
    for f in &meta.fds {
        let cloexec = f.flags & libc::O_CLOEXEC as u32 != 0;
        let tmp = match (&f.kind, parked.get(&f.fd)) {
            (_, Some(p)) => *p,
            (FdKind::Pipe { .. }, None) => {
                return Err(RestoreError::Fd {
                    fd: f.fd,
                    what: "pipe end not available".into(),
                })
            }
            (FdKind::Regular | FdKind::CharDev, None) => {
                let p = sc.cstr(inj, 0, &f.path)?;
                let fl = (f.flags as i32)
                    & !(libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC | libc::O_CLOEXEC)
                    | libc::O_CLOEXEC;
                inj.call(
                    "openat(fd)",
                    nr(libc::SYS_openat),
                    [libc::AT_FDCWD as u64, p, fl as u64, 0, 0, 0],
                )
                .map_err(|e| RestoreError::Fd {
                    fd: f.fd,
                    what: format!("cannot reopen {}: {e}", f.path),
                })?
            }
        };
        if tmp != f.fd as u64 {
            inj.call(
                "dup3",
                nr(libc::SYS_dup3),
                [
                    tmp,
                    f.fd as u64,
                    if cloexec { libc::O_CLOEXEC as u64 } else { 0 },
                    0,
                    0,
                    0,
                ],
            )?;
            inj.call("close", nr(libc::SYS_close), [tmp, 0, 0, 0, 0, 0])?;
        } else if !cloexec {
            inj.call(
                "fcntl(F_SETFD)",
                nr(libc::SYS_fcntl),
                [tmp, libc::F_SETFD as u64, 0, 0, 0, 0],
            )?;
        }
        let status_flags =
            f.flags & (libc::O_APPEND | libc::O_NONBLOCK | libc::O_ASYNC | libc::O_NOATIME) as u32;
        inj.call(
            "fcntl(F_SETFL)",
            nr(libc::SYS_fcntl),
            [
                f.fd as u64,
                libc::F_SETFL as u64,
                status_flags as u64,
                0,
                0,
                0,
            ],
        )?;
        if f.kind == FdKind::Regular && f.pos != 0 && !parked.contains_key(&f.fd) {
            let got = inj.call(
                "lseek",
                nr(libc::SYS_lseek),
                [f.fd as u64, f.pos, libc::SEEK_SET as u64, 0, 0, 0],
            )?;
            if got != f.pos {
                return Err(RestoreError::Mismatch {
                    pid,
                    step: format!("lseek of fd {}", f.fd),
                    got,
                    want: f.pos,
                });
            }
        }
    }

    // 8. Process attributes.
    let p = sc.cstr(inj, 0, &meta.cwd)?;
    inj.call("chdir", nr(libc::SYS_chdir), [p, 0, 0, 0, 0, 0])
        .map_err(|e| RestoreError::File {
            path: meta.cwd.clone(),
            what: format!("cannot chdir: {e}"),
        })?;
    inj.call(
        "umask",
        nr(libc::SYS_umask),
        [meta.umask as u64, 0, 0, 0, 0, 0],
    )?;
    inj.call(
        "personality",
        nr(libc::SYS_personality),
        [meta.personality as u64, 0, 0, 0, 0, 0],
    )?;
    let p = sc.cstr(inj, 0, &meta.comm)?;
    inj.call(
        "prctl(PR_SET_NAME)",
        nr(libc::SYS_prctl),
        [libc::PR_SET_NAME as u64, p, 0, 0, 0, 0],
    )?;
    for t in &meta.itimers {
        let mut b = Vec::new();
        for w in [
            t.interval_usec / 1_000_000,
            t.interval_usec % 1_000_000,
            t.value_usec / 1_000_000,
            t.value_usec % 1_000_000,
        ] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let a = sc.put(inj, 0, &b)?;
        inj.call(
            "setitimer",
            nr(libc::SYS_setitimer),
            [t.which as u64, a, 0, 0, 0, 0],
        )?;
    }
    for rl in &meta.rlimits {
        if let Err(e) = sys::prlimit(pid, rl.resource, Some((rl.cur, rl.max))) {
            // Raising a hard limit needs CAP_SYS_RESOURCE; keep the soft one if possible.
            let (_, curmax) = sys::prlimit(pid, rl.resource, None)?;
            let cur = rl.cur.min(curmax);
            let _ = sys::prlimit(pid, rl.resource, Some((cur, curmax)));
            warnings.push(format!(
                "rlimit {}: wanted {}/{}, got {}/{} ({e})",
                rl.resource, rl.cur, rl.max, cur, curmax
            ));
        }
    }

    // 9. Signals.
    for a in &meta.sigactions {
        let mut b = Vec::with_capacity(32);
        for w in [a.handler, a.flags, a.restorer, a.mask] {
            b.extend_from_slice(&w.to_le_bytes());
        }
        let addr = sc.put(inj, 0, &b)?;
        inj.call(
            "rt_sigaction",
            nr(libc::SYS_rt_sigaction),
            [a.signo as u64, addr, 0, 8, 0, 0],
        )?;
    }
    let mut b = Vec::new();
    let st = &meta.altstack;
    let (sp, flags, size) = if st.flags & libc::SS_DISABLE != 0 {
        (0, libc::SS_DISABLE, 0)
    } else {
        (st.sp, 0, st.size)
    };
    b.extend_from_slice(&sp.to_le_bytes());
    b.extend_from_slice(&(flags as u64).to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    let a = sc.put(inj, 0, &b)?;
    inj.call("sigaltstack", nr(libc::SYS_sigaltstack), [a, 0, 0, 0, 0, 0])?;
    let a = sc.put(inj, 0, &meta.sigmask.to_le_bytes())?;
    inj.call(
        "rt_sigprocmask",
        nr(libc::SYS_rt_sigprocmask),
        [libc::SIG_SETMASK as u64, a, 0, 8, 0, 0],
    )?;

    // Threads: each created by an injected clone3(CLONE_THREAD, set_tid = its old tid),
    // caught by PTRACE_O_TRACECLONE, then given its own per-thread state.
    let mut threads: Vec<RestoredThread> = Vec::new();
    for t in &meta.threads {
        threads.push(create_thread(inj, &sc, tramp, t)?);
    }

    // 10. Per-thread kernel pointers into user memory.
    inj.call(
        "set_robust_list",
        nr(libc::SYS_set_robust_list),
        [meta.robust_list, meta.robust_list_len, 0, 0, 0, 0],
    )?;
    inj.call(
        "set_tid_address",
        nr(libc::SYS_set_tid_address),
        [meta.clear_child_tid, 0, 0, 0, 0, 0],
    )?;
    if let Some(rs) = &meta.rseq {
        inj.call(
            "rseq(register)",
            nr(libc::SYS_rseq),
            [rs.addr, rs.len as u64, 0, rs.sig as u64, 0, 0],
        )?;
    }

    // 11. Credentials (last privileged step), in every thread: the kernel keeps them per
    //     thread (glibc's setuid broadcasts to all threads itself).
    set_creds(inj, &sc, &meta.creds)?;
    for t in threads.iter_mut() {
        set_creds(&mut t.inj, &sc, &meta.creds)?;
    }
    if meta.no_new_privs {
        // Per thread as well; it can only be set, never cleared.
        inj.call(
            "prctl(PR_SET_NO_NEW_PRIVS)",
            libc::SYS_prctl,
            [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
        )?;
        for t in threads.iter_mut() {
            t.inj.call(
                "prctl(PR_SET_NO_NEW_PRIVS)",
                libc::SYS_prctl,
                [libc::PR_SET_NO_NEW_PRIVS as u64, 1, 0, 0, 0, 0],
            )?;
        }
    }

    // 12. Drop the trampoline, load registers, let it go (other threads first).
    inj.call(
        "munmap(trampoline)",
        nr(libc::SYS_munmap),
        [tramp, TRAMP_LEN, 0, 0, 0, 0],
    )?;
    let regs = meta.regs().ok_or_else(|| RestoreError::Helper {
        pid,
        what: "bad register block".into(),
    })?;
    let mut resend: Vec<(i32, i32)> = Vec::new();
    for (t, img) in threads.iter_mut().zip(&meta.threads) {
        let tregs = sys::regs_from_words(&img.regs).ok_or_else(|| RestoreError::Helper {
            pid: t.tid,
            what: "bad register block".into(),
        })?;
        sys::set_xstate(t.tid, &img.xstate)?;
        sys::set_regs(t.tid, &tregs)?;
        resend.extend(img.pending.iter().map(|s| (t.tid, *s as i32)));
        resend.extend(t.inj.suppressed.drain(..).map(|s| (t.tid, s)));
    }
    sys::set_xstate(pid, &meta.xstate)?;
    sys::set_regs(pid, &regs)?;
    let suppressed = std::mem::take(&mut inj.suppressed);
    Ok((
        pager,
        Launch {
            pid,
            tids: threads.iter().map(|t| t.tid).collect(),
            signals: meta
                .pending
                .iter()
                .map(|s| *s as i32)
                .chain(suppressed)
                .collect(),
            thread_signals: resend,
        },
    ))
}

/// A rebuilt process, stopped with its final registers, ready to run.
struct Launch {
    pid: i32,
    tids: Vec<i32>,
    signals: Vec<i32>,
    thread_signals: Vec<(i32, i32)>,
}

impl Launch {
    /// Let it go (other threads first) and re-send its pending signals.
    fn go(&self) -> Result<()> {
        for t in &self.tids {
            sys::detach(*t, 0)?;
        }
        sys::detach(self.pid, 0)?;
        for s in &self.signals {
            let _ = sys::kill(self.pid, *s);
        }
        for (tid, s) in &self.thread_signals {
            let _ = sys::tgkill(self.pid, *tid, *s);
        }
        Ok(())
    }
}

/// Run clone3(flags, exit_signal, set_tid = [tid]) inside the tracee. The outer error is
/// about the scratch memory, the inner one the clone3 call itself.
fn inject_clone3(
    inj: &mut Injector,
    sc: &Scratch,
    name: &'static str,
    flags: u64,
    exit_signal: u64,
    tid: i32,
) -> Result<std::result::Result<u64, InjectError>> {
    let tid_addr = sc.put(inj, 0x200, &tid.to_le_bytes())?;
    let mut args = Vec::with_capacity(88);
    for w in [flags, 0, 0, 0, exit_signal, 0, 0, 0, tid_addr, 1, 0] {
        args.extend_from_slice(&w.to_le_bytes());
    }
    let a = sc.put(inj, 0x100, &args)?;
    Ok(inj.call(name, libc::SYS_clone3, [a, args.len() as u64, 0, 0, 0, 0]))
}

/// A thread created during restore, still stopped under ptrace.
struct RestoredThread {
    tid: i32,
    inj: Injector,
}

fn set_creds(inj: &mut Injector, sc: &Scratch, c: &image::Creds) -> Result<()> {
    if c.uids == [0; 4] && c.gids == [0; 4] && c.groups.is_empty() {
        return Ok(());
    }
    let mut g = Vec::new();
    for x in &c.groups {
        g.extend_from_slice(&x.to_le_bytes());
    }
    let a = sc.put(inj, 0, &g)?;
    inj.call(
        "setgroups",
        libc::SYS_setgroups,
        [c.groups.len() as u64, a, 0, 0, 0, 0],
    )?;
    let [rg, eg, sg, _] = c.gids;
    inj.call(
        "setresgid",
        libc::SYS_setresgid,
        [rg as u64, eg as u64, sg as u64, 0, 0, 0],
    )?;
    let [ru, eu, su, _] = c.uids;
    inj.call(
        "setresuid",
        libc::SYS_setresuid,
        [ru as u64, eu as u64, su as u64, 0, 0, 0],
    )?;
    Ok(())
}

/// Create one thread of the image inside the half-built process and give it its own
/// signal mask, alternate stack, robust list, tid address, rseq area and name.
fn create_thread(
    inj: &mut Injector,
    sc: &Scratch,
    tramp: u64,
    t: &image::ThreadImage,
) -> Result<RestoredThread> {
    let pid = inj.pid();
    let flags = (libc::CLONE_VM
        | libc::CLONE_FS
        | libc::CLONE_FILES
        | libc::CLONE_SIGHAND
        | libc::CLONE_THREAD
        | libc::CLONE_SYSVSEM) as u64;
    inject_clone3(inj, sc, "clone3(thread)", flags, 0, t.ns_tid)?.map_err(|e| {
        RestoreError::Pid {
            pid: t.ns_tid,
            what: format!("cannot recreate thread: {e}"),
        }
    })?;
    let tid = inj.cloned.pop().ok_or_else(|| RestoreError::Helper {
        pid,
        what: format!(
            "clone3 of thread {} reported no PTRACE_EVENT_CLONE",
            t.ns_tid
        ),
    })?;
    loop {
        match sys::wait(tid)? {
            Wait::Stopped { event, .. } if event == libc::PTRACE_EVENT_STOP => break,
            Wait::Stopped { .. } => sys::cont(tid, 0)?,
            other => {
                return Err(RestoreError::Helper {
                    pid: tid,
                    what: format!("new thread ended early: {other:?}"),
                })
            }
        }
    }
    let base = sys::get_regs(tid)?;
    let mut ti = Injector::new(tid, tramp, base)?;
    let nr = |n: libc::c_long| -> i64 { n };
    let st = &t.altstack;
    let (sp, fl, size) = if st.flags & libc::SS_DISABLE != 0 {
        (0, libc::SS_DISABLE, 0)
    } else {
        (st.sp, 0, st.size)
    };
    let mut b = Vec::new();
    b.extend_from_slice(&sp.to_le_bytes());
    b.extend_from_slice(&(fl as u64).to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    let a = sc.put(&ti, 0, &b)?;
    ti.call("sigaltstack", nr(libc::SYS_sigaltstack), [a, 0, 0, 0, 0, 0])?;
    let a = sc.put(&ti, 0, &t.sigmask.to_le_bytes())?;
    ti.call(
        "rt_sigprocmask",
        nr(libc::SYS_rt_sigprocmask),
        [libc::SIG_SETMASK as u64, a, 0, 8, 0, 0],
    )?;
    ti.call(
        "set_robust_list",
        nr(libc::SYS_set_robust_list),
        [t.robust_list, t.robust_list_len, 0, 0, 0, 0],
    )?;
    ti.call(
        "set_tid_address",
        nr(libc::SYS_set_tid_address),
        [t.clear_child_tid, 0, 0, 0, 0, 0],
    )?;
    if let Some(rs) = &t.rseq {
        ti.call(
            "rseq(register)",
            nr(libc::SYS_rseq),
            [rs.addr, rs.len as u64, 0, rs.sig as u64, 0, 0],
        )?;
    }
    let p = sc.cstr(&ti, 0, &t.comm)?;
    ti.call(
        "prctl(PR_SET_NAME)",
        nr(libc::SYS_prctl),
        [libc::PR_SET_NAME as u64, p, 0, 0, 0, 0],
    )?;
    Ok(RestoredThread { tid, inj: ti })
}

#[cfg(test)]
mod tests {
    use super::find_gap;

    #[test]
    fn gap_finding() {
        let busy = [(0x1000_0000, 0x1001_0000), (0x1002_0000, 0x1003_0000)];
        assert_eq!(find_gap(&busy, 0x10000, 0x1000_0000), Some(0x1001_0000));
        assert_eq!(find_gap(&busy, 0x20000, 0x1000_0000), Some(0x1003_0000));
        assert_eq!(find_gap(&busy, 0x1000, 0x2000_0000), Some(0x2000_0000));
    }
}
