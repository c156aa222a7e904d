//! Dump (source side): freeze a process (every thread) with PTRACE_SEIZE +
//! PTRACE_INTERRUPT, collect its state from registers, /proc and a few injected syscalls,
//! copy its private pages into the swap file and write the metadata. The process stays
//! frozen afterwards: the caller gets a [`Frozen`] handle and decides between
//! [`Frozen::kill`] (target confirmed) and [`Frozen::resume`] (restore failed). If the dump
//! itself fails, the process is resumed before the error is returned: nothing is lost.
//!
//! Process trees: when the process is the main process of its own pid namespace (a
//! sandbox), every other process of the namespace but the init is frozen as well
//! (repeated scans until none appears; a zombie, a vfork child before exec or a process
//! vanishing mid-freeze resume everything and retry), each dumped into `proc-<ns pid>/`,
//! and the root image written last with the member list and the job's pipes. Unread pipe
//! data is duplicated with tee(2) into a private pipe and read from there: the job's pipe
//! is not drained, so a resumed source loses nothing. Descriptors are numbered by open
//! file description (kcmp KCMP_FILE), across processes.
//!
//! Syscall restart: a process stopped inside an interruptible syscall has rax = -ERESTART*
//! and orig_rax = the syscall number. The image (and a resumed source) gets registers with
//! the restart already applied, the way the kernel would on signal return:
//! -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND re-execute the syscall (rip -= 2,
//! rax = orig_rax); -ERESTART_RESTARTBLOCK of a relative nanosleep/clock_nanosleep with a
//! `rem` pointer re-executes it with `req := rem` (the kernel stored the remaining time
//! there), any other -ERESTART_RESTARTBLOCK returns -EINTR (the kernel restart block does
//! not migrate). orig_rax is set to -1 so the kernel does not restart a second time.
//!
//! Pre-copy ([`PreCopy`]): pages are copied while the process runs, then only the pages
//! written since are copied at the freeze. Writes are tracked with soft-dirty bits when
//! the kernel has them (CONFIG_MEM_SOFT_DIRTY), otherwise with a userfaultfd in
//! write-protect async mode registered inside the process and read with the PAGEMAP_SCAN
//! ioctl (Linux 6.7+); the kernel this was developed on has only the latter.

use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::image::{
    self, AltStack, Creds, FdEntry, FdKind, FileId, ITimer, ImageMeta, MmFields, PageRun, Rlimit,
    Rseq, SigAction, ThreadImage, Vma, VmaKind, PAGE, PAGES_DATA_OFFSET,
};
use crate::inject::{self, InjectError, Injector};
use crate::procfs::{self, ProcError};
use crate::swap::MacKey;
use crate::sys::{self, Regs, SysError, Wait};

/// Errors of a dump. The source process is resumed before any of these is returned.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("pid {pid}: unsupported: {what}")]
    Unsupported { pid: i32, what: String },
    #[error("pid {pid}: cannot freeze: {source}")]
    Freeze {
        pid: i32,
        #[source]
        source: SysError,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error(transparent)]
    Inject(#[from] InjectError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Image(#[from] image::ImageError),
    #[error("pid {pid}: process vanished while frozen ({what})")]
    Vanished { pid: i32, what: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: cannot read memory at {addr:#x}: {source}")]
    ReadMem {
        pid: i32,
        addr: u64,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, DumpError>;

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Apply the kernel's syscall-restart rules to registers captured at an interrupt stop.
/// Returns the adjusted registers and a note on what was done.
///
/// `hint`: the syscall a `restart_syscall` (219) stands for, when known (pre-copy saw the
/// original sleep interrupted); its arguments are still in the registers.
pub fn normalize_restart(r: &Regs, hint: Option<i64>) -> (Regs, String) {
    let mut n = *r;
    let mut nr = r.orig_rax as i64;
    if nr == libc::SYS_restart_syscall {
        if let Some(h) = hint {
            nr = h;
            n.orig_rax = h as u64;
        }
    }
    let r = &n.clone();
    let ret = r.rax as i64;
    let mut note = String::new();
    if nr >= 0 {
        match -ret {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                n.rax = nr as u64;
                n.rip = r.rip.wrapping_sub(2);
                note = format!("syscall {nr} interrupted, will be re-executed");
            }
            ERESTART_RESTARTBLOCK => {
                let relative_with_rem = match nr {
                    x if x == libc::SYS_nanosleep => (r.rsi != 0).then(|| n.rdi = r.rsi),
                    x if x == libc::SYS_clock_nanosleep => {
                        (r.rsi & libc::TIMER_ABSTIME as u64 == 0 && r.r10 != 0)
                            .then(|| n.rdx = r.r10)
                    }
                    _ => None,
                };
                if relative_with_rem.is_some() {
                    n.rax = nr as u64;
                    n.rip = r.rip.wrapping_sub(2);
                    note = format!("sleep syscall {nr} interrupted, will sleep the remaining time");
                } else {
                    n.rax = (-(libc::EINTR as i64)) as u64;
                    note = format!("syscall {nr} with a kernel restart block will return EINTR");
                }
            }
            _ => {}
        }
    }
    n.orig_rax = u64::MAX;
    (n, note)
}

/// What a dump produced, with the frozen source.
#[derive(Debug)]
pub struct DumpInfo {
    pub pid: i32,
    pub dir: PathBuf,
    pub vmas: usize,
    /// Pages copied while the process was frozen.
    pub pages: u64,
    /// Bytes copied while frozen.
    pub bytes: u64,
    /// Bytes left for [`DumpInfo::stream`] to write.
    pub deferred_bytes: u64,
    /// Pages referenced by the image (including those pre-copied while it ran).
    pub image_pages: u64,
    pub fds: usize,
    /// Time the process was frozen before the image was complete.
    pub frozen_ms: u64,
    /// Processes in the image (1, or the size of the process tree).
    pub processes: usize,
    pub syscall_note: String,
    /// The still-frozen source.
    pub frozen: Frozen,
    /// The migration key the image is tagged with (see [`crate::swap`]): give it to the
    /// restore over a private channel.
    pub mac_key: MacKey,
    /// With [`DumpOptions::stream`]: what is left to write, while the source stays frozen
    /// (run it in any thread, then let the source go). The image is complete when it returns.
    pub stream: Option<Streamer>,
}

/// Writes the pages a streamed dump deferred, from the frozen source's memory into the
/// swap file, with their tags (see [`crate::swap`]); readers see each chunk when its tag
/// is written.
#[derive(Debug)]
pub struct Streamer {
    procs: Vec<StreamProc>,
    cancel: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[derive(Debug)]
struct StreamProc {
    pid: i32,
    mem: File,
    pages: File,
    path: PathBuf,
    sum: File,
    sum_path: PathBuf,
    deferred: Vec<(u64, u64, u64)>,
    macs: crate::swap::ChunkMacs,
}

impl Streamer {
    /// Bytes still to write.
    pub fn bytes(&self) -> u64 {
        self.procs
            .iter()
            .flat_map(|p| p.deferred.iter())
            .map(|d| d.1 * PAGE)
            .sum()
    }

    /// A flag that makes [`Streamer::run`] stop early (with an error) when set.
    pub fn canceller(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.cancel.clone()
    }

    /// Write everything; the sources must stay frozen until this returns.
    pub fn run(self) -> Result<u64> {
        let mut total = 0;
        for p in self.procs {
            total += p.run(&self.cancel)?;
        }
        Ok(total)
    }
}

impl StreamProc {
    fn run(mut self, cancel: &std::sync::atomic::AtomicBool) -> Result<u64> {
        let chunk = crate::swap::CHUNK as usize;
        let mut buf: Vec<u8> = Vec::with_capacity(chunk);
        let mut buf_off = self.macs.pos();
        let mut total = 0u64;
        let werr = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DumpError::Write { path, source }
        };
        let deferred = std::mem::take(&mut self.deferred);
        for (va, n, off) in deferred {
            if off != buf_off + buf.len() as u64 {
                return Err(DumpError::Write {
                    path: self.path.clone(),
                    source: std::io::Error::other(format!(
                        "deferred pages at {off} do not follow byte {}",
                        buf_off + buf.len() as u64
                    )),
                });
            }
            let mut done = 0u64;
            while done < n * PAGE {
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err(DumpError::Write {
                        path: self.path.clone(),
                        source: std::io::Error::other("the migration was abandoned"),
                    });
                }
                let room = (chunk - buf.len()) as u64;
                let k = room.min(n * PAGE - done) as usize;
                let at = buf.len();
                buf.resize(at + k, 0);
                self.mem
                    .read_exact_at(&mut buf[at..], va + done)
                    .map_err(|source| DumpError::ReadMem {
                        pid: self.pid,
                        addr: va + done,
                        source,
                    })?;
                done += k as u64;
                if buf.len() == chunk {
                    self.pages
                        .write_all_at(&buf, buf_off)
                        .map_err(werr(&self.path))?;
                    self.macs.feed(&buf);
                    self.macs.save(&self.sum, &self.sum_path)?;
                    total += buf.len() as u64;
                    buf_off += buf.len() as u64;
                    buf.clear();
                }
            }
        }
        if !buf.is_empty() {
            self.pages
                .write_all_at(&buf, buf_off)
                .map_err(werr(&self.path))?;
            self.macs.feed(&buf);
            total += buf.len() as u64;
        }
        self.macs.cut();
        self.macs.save(&self.sum, &self.sum_path)?;
        Ok(total)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum FrozenState {
    Traced,
    Released,
}

/// A source process frozen under ptrace by this thread. Not `Send`: ptrace belongs to the
/// thread that seized the process. Dropping it without a decision releases the process in
/// a SIGSTOP group-stop (still frozen, never running twice or nowhere).
#[derive(Debug)]
pub struct Frozen {
    pid: i32,
    resume_regs: Regs,
    /// Threads other than the leader, with the registers to resume them with.
    others: Vec<(i32, Regs)>,
    suppressed: Vec<i32>,
    /// (tid, signal) dequeued from non-leader threads, re-sent to them on release.
    thread_suppressed: Vec<(i32, i32)>,
    state: FrozenState,
    /// The other processes of a frozen process tree (root only), parents first.
    members: Vec<Frozen>,
    _not_send: PhantomData<*const ()>,
}

impl Frozen {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Host pids of every frozen process (the root first).
    pub fn pids(&self) -> Vec<i32> {
        std::iter::once(self.pid)
            .chain(self.members.iter().map(|m| m.pid))
            .collect()
    }

    fn new(pid: i32, resume_regs: Regs, suppressed: Vec<i32>) -> Self {
        Frozen {
            pid,
            resume_regs,
            others: Vec::new(),
            suppressed,
            thread_suppressed: Vec::new(),
            state: FrozenState::Traced,
            members: Vec::new(),
            _not_send: PhantomData,
        }
    }

    fn resend(&self) {
        for s in &self.suppressed {
            let _ = sys::kill(self.pid, *s);
        }
        for (tid, s) in &self.thread_suppressed {
            let _ = sys::tgkill(self.pid, *tid, *s);
        }
    }

    /// Let the source run on (restore failed or this was a checkpoint): every process of
    /// a tree, even when one of them fails to resume (the first error is returned).
    pub fn resume(mut self) -> Result<()> {
        let members = std::mem::take(&mut self.members);
        let r = self.resume_one();
        first_error(members.into_iter().map(Frozen::resume).chain([r]))
    }

    fn resume_one(&mut self) -> Result<()> {
        self.state = FrozenState::Released;
        for (tid, regs) in &self.others {
            sys::set_regs(*tid, regs)?;
            sys::detach(*tid, 0)?;
        }
        sys::set_regs(self.pid, &self.resume_regs)?;
        sys::detach(self.pid, 0)?;
        self.resend();
        Ok(())
    }

    /// Kill the source (the target confirmed), every process of a tree, and wait until
    /// they are gone.
    pub fn kill(mut self) -> Result<()> {
        let members = std::mem::take(&mut self.members);
        for m in &members {
            let _ = sys::kill(m.pid, libc::SIGKILL);
        }
        let killed: Vec<Result<()>> = members.into_iter().map(Frozen::kill).collect();
        let r = self.kill_one();
        first_error(killed.into_iter().chain([r]))
    }

    fn kill_one(&mut self) -> Result<()> {
        self.state = FrozenState::Released;
        sys::kill(self.pid, libc::SIGKILL)?;
        // Each traced thread reports its death to us; the leader's comes last.
        for (tid, _) in &self.others {
            while let Ok(Wait::Stopped { .. }) = sys::wait(*tid) {
                let _ = sys::cont(*tid, 0);
            }
        }
        loop {
            match sys::wait(self.pid) {
                Ok(Wait::Exited(_)) | Ok(Wait::Signaled(_)) => return Ok(()),
                Ok(Wait::Stopped { .. }) => {
                    let _ = sys::cont(self.pid, 0);
                }
                Err(e) if e.errno() == Some(libc::ECHILD) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Give up ptrace but keep the process frozen in a SIGSTOP group-stop, so that it
    /// survives the exit of this tracer (CLI `dump --leave-frozen`). Resume it later with
    /// SIGCONT ([`resume_stopped`]) or kill it ([`kill_stopped`]).
    pub fn release_stopped(mut self) -> Result<()> {
        self.release_stopped_inner()
    }

    fn release_stopped_inner(&mut self) -> Result<()> {
        let released: Vec<Result<()>> = std::mem::take(&mut self.members)
            .iter_mut()
            .map(Frozen::release_stopped_inner)
            .collect();
        let r = self.release_one_stopped();
        first_error(released.into_iter().chain([r]))
    }

    fn release_one_stopped(&mut self) -> Result<()> {
        self.state = FrozenState::Released;
        sys::kill(self.pid, libc::SIGSTOP)?;
        for (tid, regs) in &self.others {
            sys::set_regs(*tid, regs)?;
            sys::detach(*tid, 0)?;
        }
        sys::set_regs(self.pid, &self.resume_regs)?;
        sys::detach(self.pid, 0)?;
        self.resend();
        // Wait until the group-stop is visible.
        for _ in 0..200 {
            if process_state(self.pid) == Some('T') {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Err(DumpError::Vanished {
            pid: self.pid,
            what: "did not enter the stopped state after release".into(),
        })
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if self.state == FrozenState::Traced {
            if let Err(e) = self.release_stopped_inner() {
                tracing::error!(pid = self.pid, "cannot release frozen process: {e}");
            }
        }
    }
}

/// Ok when every result is, else the first error (all of them have been run).
fn first_error(results: impl Iterator<Item = Result<()>>) -> Result<()> {
    let mut first = None;
    for r in results {
        if let Err(e) = r {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The one-letter state of /proc/pid/stat.
pub fn process_state(pid: i32) -> Option<char> {
    procfs::stat_fields(pid).ok()?.first()?.chars().next()
}

/// Resume a process (with its tree) left frozen by [`Frozen::release_stopped`].
pub fn resume_stopped(pid: i32) -> Result<()> {
    signal_tree(pid, libc::SIGCONT)
}

/// Kill a process (with its tree) left frozen by [`Frozen::release_stopped`].
pub fn kill_stopped(pid: i32) -> Result<()> {
    signal_tree(pid, libc::SIGKILL)
}

/// Signal `pid` and the other processes its dump would take ([`tree_pids`]); the error
/// is `pid`'s own.
fn signal_tree(pid: i32, sig: i32) -> Result<()> {
    let others = tree_pids(pid);
    let own = sys::kill(pid, sig);
    for p in others.into_iter().filter(|p| *p != pid) {
        let _ = sys::kill(p, sig);
    }
    Ok(own?)
}

fn file_id(meta: &std::fs::Metadata) -> FileId {
    FileId {
        size: meta.size(),
        mtime_sec: meta.mtime(),
        mtime_nsec: meta.mtime_nsec(),
    }
}

const ALLOWED_CHARDEVS: &[&str] = &[
    "/dev/null",
    "/dev/zero",
    "/dev/urandom",
    "/dev/random",
    "/dev/full",
];

/// The tracee's `/proc/<pid>/mem`, its `[vdso]` range and the address of a `syscall`
/// instruction inside it (where injected system calls are executed).
fn vdso_syscall(pid: i32) -> Result<(File, std::ops::Range<u64>, u64)> {
    let vdso = procfs::maps(pid)?
        .into_iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| DumpError::Unsupported {
            pid,
            what: "no [vdso] mapping".into(),
        })?;
    let memf = File::open(format!("/proc/{pid}/mem")).map_err(|source| DumpError::ReadMem {
        pid,
        addr: 0,
        source,
    })?;
    let ip = inject::find_syscall_in_vdso(pid, &memf, vdso.start, vdso.end).ok_or_else(|| {
        DumpError::Unsupported {
            pid,
            what: "no syscall instruction found in [vdso]".into(),
        }
    })?;
    Ok((memf, vdso.start..vdso.end, ip))
}

/// Freeze `pid` and write its image into `dir` (created if missing).
pub fn dump(pid: i32, dir: &Path) -> Result<DumpInfo> {
    dump_opts(pid, dir, &DumpOptions::default())
}

/// VMAs smaller than this are written at the freeze even by a streamed dump.
pub const STREAM_MIN: u64 = 1 << 20;

/// How to dump.
#[derive(Debug, Clone, Default)]
pub struct DumpOptions {
    /// Write only what a lazy restore needs before it starts (everything but the pages it
    /// pages lazily, see [`crate::lazy::paged_lazily`]); the rest is written afterwards by
    /// [`DumpInfo::stream`], while the source stays frozen.
    pub stream: bool,
    /// Whom the image belongs to (e.g. "job 12"), covered by the image's tag; a restore
    /// given another owner refuses it.
    pub tag: String,
}

/// [`dump`] with options.
pub fn dump_opts(pid: i32, dir: &Path, opts: &DumpOptions) -> Result<DumpInfo> {
    dump_with(pid, dir, Vec::new(), None, opts, &crate::swap::new_key())
}

fn dump_with(
    pid: i32,
    dir: &Path,
    copied: Vec<PreCopied>,
    restart_hint: Option<i64>,
    opts: &DumpOptions,
    key: &MacKey,
) -> Result<DumpInfo> {
    let t0 = sys::monotonic_ns();
    procfs::threads(pid)?;
    let init = sandbox_init_of(pid);
    if init.is_none() {
        let kids = procfs::children_of(pid);
        if !kids.is_empty() {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "has child processes {kids:?}; a process tree migrates only as the main \
                     process of a pid namespace of its own (run_sandboxed)"
                ),
            });
        }
    }
    image::create_private_dir(dir)?;

    // Freeze the whole tree. Transient states (a zombie not yet reaped, a vfork child
    // before its exec, a process exiting under us) resume everything and try again.
    let mut attempt = 0;
    let mut tree = loop {
        match freeze_tree(pid, init, restart_hint, &copied) {
            Ok(t) => break t,
            Err(TreeError::Transient(what)) if attempt < TREE_FREEZE_ATTEMPTS => {
                tracing::debug!(pid, attempt, "tree freeze retried: {what}");
                attempt += 1;
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(TreeError::Transient(what)) => {
                return Err(DumpError::Unsupported {
                    pid,
                    what: format!("{what} (still so after {attempt} attempts)"),
                })
            }
            Err(TreeError::Fatal(e)) => return Err(e),
        }
    };
    // Pre-copied pages serve the process they were copied from: same pid, same start.
    let mut copied = copied;
    let stores: Vec<Option<(PageStore, Tracker)>> = tree
        .procs
        .iter()
        .map(|f| {
            let st = start_time(f.pid).ok();
            let i = copied
                .iter()
                .position(|c| c.pid == f.pid && Some(c.start_time) == st)?;
            let c = copied.swap_remove(i);
            Some((c.store, c.tracker))
        })
        .collect();
    drop(copied);
    let note = tree.procs[0].note.clone();
    let r = dump_tree(dir, &mut tree, stores, opts, key).and_then(|r| {
        let (vmas, pages, fds, image_pages, streamer) = r;
        if opts.stream {
            return Ok(((vmas, pages, fds, image_pages), Some(streamer)));
        }
        // Nothing deferred: this only writes the last tags.
        streamer.run()?;
        Ok(((vmas, pages, fds, image_pages), None))
    });
    match r {
        Ok(((vmas, pages, fds, image_pages), stream)) => Ok(DumpInfo {
            pid,
            dir: dir.to_path_buf(),
            vmas,
            pages,
            bytes: pages * PAGE,
            deferred_bytes: stream.as_ref().map_or(0, Streamer::bytes),
            image_pages,
            fds,
            frozen_ms: (sys::monotonic_ns() - t0) / 1_000_000,
            syscall_note: note,
            processes: tree.procs.len(),
            frozen: tree.into_frozen(),
            mac_key: *key,
            stream,
        }),
        Err(e) => {
            if let Err(re) = tree.into_frozen().resume() {
                tracing::error!(
                    pid,
                    "dump failed ({e}) and resuming the source failed too: {re}"
                );
            }
            Err(e)
        }
    }
}

/// The processes a dump of `pid` would take: `pid` itself and, when it is the main
/// process of a pid namespace of its own (a sandboxed job), every other process of that
/// namespace but its init, parents before children.
pub fn tree_pids(pid: i32) -> Vec<i32> {
    let mut v = vec![pid];
    if let Some(init) = sandbox_init_of(pid) {
        v.extend(
            descendants(init)
                .into_iter()
                .map(|d| d.0)
                .filter(|p| *p != pid),
        );
    }
    v
}

/// How often a tree freeze that met a transient state is retried.
const TREE_FREEZE_ATTEMPTS: u32 = 100;

enum TreeError {
    Transient(String),
    Fatal(DumpError),
}

impl From<DumpError> for TreeError {
    fn from(e: DumpError) -> Self {
        TreeError::Fatal(e)
    }
}

/// One frozen process of a tree, with what its dump needs.
struct FrozenProc {
    pid: i32,
    ns_pid: i32,
    /// Host pid of the parent (the sandbox init for the root and for orphans).
    ppid: i32,
    regs: Regs,
    norm: Regs,
    note: String,
    threads: Vec<(i32, Regs)>,
    frozen: Frozen,
}

struct FrozenTree {
    /// The root first, then the other processes, each after its parent.
    procs: Vec<FrozenProc>,
}

impl FrozenTree {
    fn into_frozen(self) -> Frozen {
        let mut it = self.procs.into_iter();
        let mut root = it.next().expect("a tree has its root").frozen;
        root.members = it.map(|p| p.frozen).collect();
        root
    }
}

/// The init of `pid`'s pid namespace when `pid` is its direct child (a sandboxed job).
fn sandbox_init_of(pid: i32) -> Option<i32> {
    let st = procfs::status(pid).ok()?;
    let ns: Vec<i32> =
        procfs::nums(pid, "NSpid", procfs::status_get(pid, &st, "NSpid").ok()?).ok()?;
    if ns.len() < 2 {
        return None;
    }
    let ppid: i32 = procfs::status_get(pid, &st, "PPid").ok()?.parse().ok()?;
    let pst = procfs::status(ppid).ok()?;
    let pns: Vec<i32> =
        procfs::nums(ppid, "NSpid", procfs::status_get(ppid, &pst, "NSpid").ok()?).ok()?;
    (pns.len() == ns.len() && pns.last() == Some(&1)).then_some(ppid)
}

/// Descendants of `init` in breadth-first order (parents before children).
fn descendants(init: i32) -> Vec<(i32, i32, char)> {
    let table = procfs::process_table();
    let mut out: Vec<(i32, i32, char)> = Vec::new();
    let mut frontier = vec![init];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for p in frontier {
            let mut kids: Vec<_> = table
                .iter()
                .filter(|(_, pp, _)| *pp == p)
                .copied()
                .collect();
            kids.sort_unstable();
            next.extend(kids.iter().map(|k| k.0));
            out.extend(kids);
        }
        frontier = next;
    }
    out
}

fn innermost_pid(pid: i32) -> Result<i32> {
    let st = procfs::status(pid)?;
    let ns: Vec<i32> = procfs::nums(pid, "NSpid", procfs::status_get(pid, &st, "NSpid")?)?;
    Ok(*ns.last().unwrap_or(&pid))
}

/// Freeze one process (child of `ppid`): its leader, then every other thread.
fn freeze_process(pid: i32, ppid: i32, hint: Option<i64>) -> Result<FrozenProc> {
    sys::seize(pid, libc::PTRACE_O_TRACESYSGOOD)
        .map_err(|source| DumpError::Freeze { pid, source })?;
    let mut suppressed = Vec::new();
    let stop = freeze(pid, &mut suppressed);
    let regs = match stop.and_then(|_| Ok(sys::get_regs(pid)?)) {
        Ok(r) => r,
        Err(e) => {
            let _ = sys::detach(pid, 0);
            return Err(e);
        }
    };
    let (norm, note) = normalize_restart(&regs, hint);
    let mut frozen = Frozen::new(pid, norm, suppressed);
    match freeze_other_threads(pid, &mut frozen) {
        Ok(threads) => Ok(FrozenProc {
            pid,
            ns_pid: 0,
            ppid,
            regs,
            norm,
            note,
            threads,
            frozen,
        }),
        Err(e) => {
            let _ = frozen.resume();
            Err(e)
        }
    }
}

/// Freeze `root` and, in a sandbox, every other process of its pid namespace but the init,
/// until no new one shows up. On any error everything frozen so far is resumed.
fn freeze_tree(
    root: i32,
    init: Option<i32>,
    hint: Option<i64>,
    copied: &[PreCopied],
) -> std::result::Result<FrozenTree, TreeError> {
    let mut tree = FrozenTree {
        procs: vec![freeze_process(root, init.unwrap_or(0), hint)?],
    };
    let r = (|| -> std::result::Result<(), TreeError> {
        tree.procs[0].ns_pid = innermost_pid(root)?;
        let Some(init) = init else { return Ok(()) };
        loop {
            let mut new = false;
            for (p, pp, state) in descendants(init) {
                if tree.procs.iter().any(|f| f.pid == p) {
                    continue;
                }
                if state == 'Z' || state == 'X' {
                    return Err(TreeError::Transient(format!(
                        "process {p} is a zombie (its parent {pp} has not reaped it); zombies do not migrate"
                    )));
                }
                new = true;
                let hint = copied.iter().find(|c| c.pid == p).and_then(|c| c.hint);
                match freeze_process(p, pp, hint) {
                    Ok(f) => tree.procs.push(f),
                    // Gone (or dying) meanwhile; a live process we cannot seize (EPERM:
                    // traced by a debugger) is a real refusal.
                    Err(DumpError::Freeze { source, .. })
                        if source.errno() == Some(libc::ESRCH)
                            || !matches!(process_state(p), Some(s) if s != 'Z' && s != 'X') =>
                    {
                        return Err(TreeError::Transient(format!(
                            "process {p} went away while the tree was being frozen"
                        )))
                    }
                    Err(DumpError::Vanished { what, .. }) => {
                        return Err(TreeError::Transient(format!("process {p} {what}")))
                    }
                    Err(e) => return Err(e.into()),
                }
                let last = tree.procs.len() - 1;
                tree.procs[last].ns_pid = innermost_pid(p)?;
            }
            if !new {
                break;
            }
        }
        // A vfork child shares its parent's memory until it execs: not a state to move.
        for f in &tree.procs[1..] {
            if f.ppid != init && sys::kcmp_same(f.pid, f.ppid, sys::KCMP_VM, 0, 0).unwrap_or(false)
            {
                return Err(TreeError::Transient(format!(
                    "process {} shares the memory of its parent {} (vfork before exec)",
                    f.pid, f.ppid
                )));
            }
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok(tree),
        Err(e) => {
            let _ = tree.into_frozen().resume();
            Err(e)
        }
    }
}

/// Dump every process of a frozen tree: members into `dir/proc-<ns pid>/`, then the root
/// image (with the member list and the pipes) into `dir`, last.
fn dump_tree(
    dir: &Path,
    tree: &mut FrozenTree,
    mut stores: Vec<Option<(PageStore, Tracker)>>,
    opts: &DumpOptions,
    key: &MacKey,
) -> Result<(usize, u64, usize, u64, Streamer)> {
    let mut metas = Vec::new();
    let mut done = Vec::new();
    let mut pages_total = 0u64;
    let host_to_ns: std::collections::HashMap<i32, i32> =
        tree.procs.iter().map(|f| (f.pid, f.ns_pid)).collect();
    for (i, f) in tree.procs.iter_mut().enumerate() {
        let d = if i == 0 {
            dir.to_path_buf()
        } else {
            dir.join(member_dir(f.ns_pid))
        };
        image::create_private_dir(&d)?;
        let (mut meta, pages, store) = dump_frozen(
            f,
            &d,
            stores.get_mut(i).and_then(Option::take),
            key,
            opts.stream,
        )?;
        done.push((d.clone(), f.pid, store));
        meta.ns_ppid = if f.ppid == 0 {
            0
        } else {
            *host_to_ns.get(&f.ppid).unwrap_or(&1)
        };
        pages_total += pages;
        metas.push(meta);
    }
    // A group or session is recreated by its leader (setpgid/setsid): one whose leader
    // exited cannot be. (Outside a sandbox the ids are the host's and are not recreated.)
    let ns_pids: Vec<i32> = tree.procs.iter().map(|f| f.ns_pid).collect();
    let sandboxed = tree.procs[0].ppid != 0;
    for (f, m) in tree.procs.iter().zip(&metas).filter(|_| sandboxed) {
        for (what, id) in [("process group", m.ns_pgid), ("session", m.ns_sid)] {
            if id != 0 && !ns_pids.contains(&id) {
                return Err(DumpError::Unsupported {
                    pid: f.pid,
                    what: format!(
                        "its {what} {id} has no leader in the job any more; it cannot be recreated"
                    ),
                });
            }
        }
    }
    assign_descriptions(&tree.procs, &mut metas)?;
    let pipes = dump_pipes(&tree.procs, &metas)?;
    let members: Vec<image::Member> = metas[1..]
        .iter()
        .map(|m| image::Member {
            ns_pid: *m.ns_pids.last().unwrap_or(&m.pid),
            dir: member_dir(*m.ns_pids.last().unwrap_or(&m.pid)),
            image_id: m.image_id,
        })
        .collect();
    let mut digests = vec![[0u8; 32]; metas.len()];
    for (i, m) in metas.iter().enumerate().skip(1) {
        let d = dir.join(member_dir(*m.ns_pids.last().unwrap_or(&m.pid)));
        image::validate(&d.join(image::META_FILE), m)?;
        digests[i] = image::write_meta(&d, m)?;
    }
    let root = &mut metas[0];
    root.members = members;
    root.pipes = pipes;
    image::validate(&dir.join(image::META_FILE), root)?;
    digests[0] = image::write_meta(dir, root)?;
    let mut streamer = Streamer {
        procs: Vec::new(),
        cancel: Default::default(),
    };
    for ((d, pid, store), (m, digest)) in done.into_iter().zip(metas.iter().zip(&digests)) {
        streamer
            .procs
            .push(store.into_stream(&d, pid, &opts.tag, m.pages_file_len, digest)?);
    }
    let vmas = metas.iter().map(|m| m.vmas.len()).sum();
    let fds = metas.iter().map(|m| m.fds.len()).sum();
    let image_pages = metas
        .iter()
        .flat_map(|m| m.page_runs.iter())
        .map(|r| r.npages)
        .sum();
    Ok((vmas, pages_total, fds, image_pages, streamer))
}

/// Subdirectory of a tree image holding the image of the process with namespace pid `ns_pid`.
pub fn member_dir(ns_pid: i32) -> String {
    format!("proc-{ns_pid}")
}

/// Number descriptors by open file description: two descriptors (in one process or in
/// two) that kcmp(KCMP_FILE) reports as the same `struct file` get the same `desc`.
fn assign_descriptions(procs: &[FrozenProc], metas: &mut [ImageMeta]) -> Result<()> {
    let mut all: Vec<(usize, usize)> = Vec::new();
    for (pi, m) in metas.iter().enumerate() {
        for fi in 0..m.fds.len() {
            all.push((pi, fi));
        }
    }
    let mut ids = vec![0u32; all.len()];
    let mut next = 1u32;
    for a in 0..all.len() {
        if ids[a] != 0 {
            continue;
        }
        ids[a] = next;
        let (pa, fa) = all[a];
        let ea = &metas[pa].fds[fa];
        for b in a + 1..all.len() {
            if ids[b] != 0 {
                continue;
            }
            let (pb, fb) = all[b];
            let eb = &metas[pb].fds[fb];
            if ea.kind != eb.kind || ea.path != eb.path {
                continue;
            }
            let same = sys::kcmp_same(
                procs[pa].pid,
                procs[pb].pid,
                sys::KCMP_FILE,
                ea.fd as u64,
                eb.fd as u64,
            )?;
            if same {
                ids[b] = next;
            }
        }
        next += 1;
    }
    for (k, (pi, fi)) in all.into_iter().enumerate() {
        metas[pi].fds[fi].desc = ids[k];
    }
    Ok(())
}

/// Pipes held by the tree: internal ones (no process outside the tree holds an end) with
/// their unread data, copied out with tee(2) so that the pipe itself is left untouched
/// (a resumed source finds it as it was); external ones are only marked.
fn dump_pipes(procs: &[FrozenProc], metas: &[ImageMeta]) -> Result<Vec<image::PipeImage>> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out: Vec<image::PipeImage> = Vec::new();
    let mut holder: Vec<(u64, i32, i32)> = Vec::new();
    for (pi, m) in metas.iter().enumerate() {
        for f in &m.fds {
            if let FdKind::Pipe { ino } = f.kind {
                if !holder.iter().any(|(i, _, _)| *i == ino) {
                    holder.push((ino, procs[pi].pid, f.fd));
                }
            }
        }
    }
    if holder.is_empty() {
        return Ok(out);
    }
    let members: Vec<i32> = procs.iter().map(|p| p.pid).collect();
    let outside = pipes_held_outside(&members, &holder.iter().map(|h| h.0).collect::<Vec<_>>());
    for (ino, pid, fd) in holder {
        let src = format!("/proc/{pid}/fd/{fd}");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&src)
            .map_err(|e| DumpError::Unsupported {
                pid,
                what: format!("pipe {ino} cannot be inspected through {src}: {e}"),
            })?;
        let size = sys::pipe_size(file.as_raw_fd())?;
        if outside.contains(&ino) {
            out.push(image::PipeImage {
                ino,
                size,
                data: Vec::new(),
                external: true,
            });
            continue;
        }
        let n = sys::bytes_unread(file.as_raw_fd())? as usize;
        let mut data = vec![0u8; n];
        if n > 0 {
            let (rd, wr) = sys::pipe2(libc::O_NONBLOCK)?;
            sys::set_pipe_size(wr.as_raw_fd(), size.max(n as u32))?;
            let got = sys::tee_nonblock(file.as_raw_fd(), wr.as_raw_fd(), n)?;
            if got != n {
                return Err(DumpError::Unsupported {
                    pid,
                    what: format!("pipe {ino}: copied {got} of its {n} unread bytes"),
                });
            }
            drop(wr);
            let mut r = File::from(rd);
            std::io::Read::read_exact(&mut r, &mut data).map_err(|e| DumpError::Unsupported {
                pid,
                what: format!("pipe {ino}: cannot read its copied data: {e}"),
            })?;
        }
        out.push(image::PipeImage {
            ino,
            size,
            data,
            external: false,
        });
    }
    Ok(out)
}

/// Which of `inos` some process other than `members` holds open (this one included).
fn pipes_held_outside(members: &[i32], inos: &[u64]) -> Vec<u64> {
    let mut out = Vec::new();
    for (pid, _, _) in procfs::process_table() {
        if members.contains(&pid) {
            continue;
        }
        // Our own descriptors count too: a caller that passes a pipe end to the job.
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for f in fds.flatten() {
            let Ok(l) = std::fs::read_link(f.path()) else {
                continue;
            };
            let l = l.to_string_lossy();
            if let Some(ino) = l
                .strip_prefix("pipe:[")
                .and_then(|s| s.strip_suffix(']'))
                .and_then(|s| s.parse::<u64>().ok())
            {
                if inos.contains(&ino) && !out.contains(&ino) {
                    out.push(ino);
                }
            }
        }
    }
    out
}

fn freeze(pid: i32, suppressed: &mut Vec<i32>) -> Result<()> {
    sys::interrupt(pid).map_err(|source| DumpError::Freeze { pid, source })?;
    loop {
        match sys::wait(pid).map_err(|source| DumpError::Freeze { pid, source })? {
            Wait::Stopped { event, .. } if event == libc::PTRACE_EVENT_STOP => return Ok(()),
            Wait::Stopped { sig, .. } => {
                // Signal-delivery stop before our trap: keep the signal, re-send it later.
                suppressed.push(sig);
                sys::cont(pid, 0).map_err(|source| DumpError::Freeze { pid, source })?;
            }
            Wait::Exited(c) => {
                return Err(DumpError::Vanished {
                    pid,
                    what: format!("exited with {c}"),
                })
            }
            Wait::Signaled(s) => {
                return Err(DumpError::Vanished {
                    pid,
                    what: format!("killed by signal {s}"),
                })
            }
        }
    }
}

fn dump_frozen(
    f: &mut FrozenProc,
    dir: &Path,
    store: Option<(PageStore, Tracker)>,
    key: &MacKey,
    stream: bool,
) -> Result<(ImageMeta, u64, PageStore)> {
    let (pid, regs, norm) = (f.pid, &f.regs, &f.norm);
    let note = f.note.as_str();
    let threads = std::mem::take(&mut f.threads);
    let frozen = &mut f.frozen;
    let xstate = sys::get_xstate(pid)?;
    let rseq = match sys::get_rseq(pid) {
        Ok(c) if c.abi_size > 0 => Some(Rseq {
            addr: c.abi_pointer,
            len: c.abi_size,
            sig: c.signature,
        }),
        Ok(_) => None,
        Err(e) => return Err(e.into()),
    };
    let (robust_list, robust_list_len) = sys::get_robust_list(pid)?;

    let (memf, vdso, syscall_ip) = vdso_syscall(pid)?;
    let mut vdso_bytes = vec![0u8; (vdso.end - vdso.start) as usize];
    memf.read_exact_at(&mut vdso_bytes, vdso.start)
        .map_err(|source| DumpError::ReadMem {
            pid,
            addr: vdso.start,
            source,
        })?;
    let vdso_sha256 = sha2::Sha256::digest(&vdso_bytes).to_vec();

    // --- other threads (frozen with the leader): collect each one's own state ---------
    let mut thread_images = Vec::new();
    for (tid, tregs) in threads {
        thread_images.push(thread_state(pid, tid, syscall_ip, &tregs, frozen)?);
    }

    // --- injected queries -------------------------------------------------------------
    let mut inj = Injector::new(pid, syscall_ip, *regs)?;
    let q = injected_queries(&mut inj);
    frozen.suppressed.append(&mut inj.suppressed);
    let q = q?;

    // --- /proc ------------------------------------------------------------------------
    let st = procfs::status(pid)?;
    let sigmask = procfs::hex_u64(pid, "SigBlk", procfs::status_get(pid, &st, "SigBlk")?)?;
    let pnd = procfs::hex_u64(pid, "SigPnd", procfs::status_get(pid, &st, "SigPnd")?)?
        | procfs::hex_u64(pid, "ShdPnd", procfs::status_get(pid, &st, "ShdPnd")?)?;
    let mut pending: Vec<u32> = (1..=64u32)
        .filter(|s| pnd & (1u64 << (s - 1)) != 0)
        .collect();
    pending.extend(frozen.suppressed.iter().map(|s| *s as u32));
    pending.sort_unstable();
    pending.dedup();
    let umask = u32::from_str_radix(procfs::status_get(pid, &st, "Umask")?, 8).map_err(|_| {
        DumpError::Unsupported {
            pid,
            what: "unparsable Umask".into(),
        }
    })?;
    let uids: Vec<u32> = procfs::nums(pid, "Uid", procfs::status_get(pid, &st, "Uid")?)?;
    let gids: Vec<u32> = procfs::nums(pid, "Gid", procfs::status_get(pid, &st, "Gid")?)?;
    let groups: Vec<u32> = procfs::nums(pid, "Groups", procfs::status_get(pid, &st, "Groups")?)?;
    let ns_pids: Vec<i32> = procfs::nums(pid, "NSpid", procfs::status_get(pid, &st, "NSpid")?)?;
    let innermost = |key: &str| -> Result<i32> {
        Ok(
            procfs::nums::<i32>(pid, key, procfs::status_get(pid, &st, key)?)?
                .last()
                .copied()
                .unwrap_or(0),
        )
    };
    let (ns_pgid, ns_sid) = (innermost("NSpgid")?, innermost("NSsid")?);
    // State that would silently not move: refuse rather than lose it.
    if procfs::status_get(pid, &st, "Seccomp")
        .map(|v| v != "0")
        .unwrap_or(false)
    {
        return Err(DumpError::Unsupported {
            pid,
            what: "seccomp filters (they would not move)".into(),
        });
    }
    if !procfs::read_string(pid, "timers")
        .unwrap_or_default()
        .trim()
        .is_empty()
    {
        return Err(DumpError::Unsupported {
            pid,
            what: "POSIX timers (timer_create; they would not move)".into(),
        });
    }
    let no_new_privs = procfs::status_get(pid, &st, "NoNewPrivs")
        .map(|v| v == "1")
        .unwrap_or(false);
    if uids.len() != 4 || gids.len() != 4 {
        return Err(DumpError::Unsupported {
            pid,
            what: "unexpected Uid/Gid lines in status".into(),
        });
    }
    let creds = Creds {
        uids: [uids[0], uids[1], uids[2], uids[3]],
        gids: [gids[0], gids[1], gids[2], gids[3]],
        groups,
    };

    let sf = procfs::stat_fields(pid)?;
    let f = |n| procfs::stat_field(pid, &sf, n);
    let mm = MmFields {
        start_code: f(26)?,
        end_code: f(27)?,
        start_stack: f(28)?,
        start_data: f(45)?,
        end_data: f(46)?,
        start_brk: f(47)?,
        brk: q.brk,
        arg_start: f(48)?,
        arg_end: f(49)?,
        env_start: f(50)?,
        env_end: f(51)?,
        auxv: procfs::read_bytes(pid, "auxv")?,
    };
    let comm = procfs::read_string(pid, "comm")?
        .trim_end_matches('\n')
        .to_string();
    let exe = procfs::read_link(pid, "exe")?;
    if exe.ends_with(" (deleted)") {
        return Err(DumpError::Unsupported {
            pid,
            what: format!("executable {exe} is deleted"),
        });
    }
    let exe_file = std::fs::metadata(&exe).ok().map(|m| file_id(&m));
    let cwd = procfs::read_link(pid, "cwd")?;
    let rlimits = q.rlimits;
    let fds = dump_fds(pid)?;

    // --- memory -----------------------------------------------------------------------
    let smaps = procfs::smaps(pid)?;
    let mut vmas = Vec::new();
    for m in &smaps {
        let special = m.name == "[vdso]" || m.name.starts_with("[vvar") || m.name == "[vsyscall]";
        if !special && (m.has_flag("io") || m.has_flag("pf")) {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("device mapping {:#x}-{:#x} {}", m.start, m.end, m.name),
            });
        }
        // Missing-mode userfaultfd ("um"): pages not yet paged in by a lazy restore (or by
        // the program's own handler) are absent, and would come back as zeros.
        if m.has_flag("um") {
            return Err(DumpError::Unsupported {
                pid,
                what: format!(
                    "mapping {:#x}-{:#x} is served by a userfaultfd (still being paged in \
                     after a lazy restore?); its missing pages would be lost",
                    m.start, m.end
                ),
            });
        }
        if m.name.ends_with(" (deleted)")
            && !m.name.starts_with("/dev/zero")
            && !m.name.starts_with("/SYSV")
        {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("mapping of deleted file {}", m.name),
            });
        }
        let mut prot = 0u32;
        for (on, bit) in [
            (m.read, libc::PROT_READ),
            (m.write, libc::PROT_WRITE),
            (m.exec, libc::PROT_EXEC),
        ] {
            if on {
                prot |= bit as u32;
            }
        }
        let (kind, file) = if m.name == "[vsyscall]" {
            (VmaKind::Vsyscall, None)
        } else if m.name == "[vdso]" || m.name.starts_with("[vvar") {
            (VmaKind::Special, None)
        } else if m.name.starts_with("/dev/zero")
            || m.name.starts_with("/SYSV")
            || (m.shared && m.inode == 0)
        {
            if !m.shared {
                (VmaKind::AnonPrivate, None)
            } else {
                (VmaKind::AnonShared, None)
            }
        } else if m.name.starts_with('/') {
            let meta = std::fs::metadata(&m.name).map_err(|source| DumpError::Unsupported {
                pid,
                what: format!("mapped file {} cannot be inspected: {source}", m.name),
            })?;
            (
                if m.shared {
                    VmaKind::FileShared
                } else {
                    VmaKind::FilePrivate
                },
                Some(file_id(&meta)),
            )
        } else if m.name.is_empty()
            || m.name == "[heap]"
            || m.name == "[stack]"
            || m.name.starts_with("[anon")
        {
            (VmaKind::AnonPrivate, None)
        } else {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("mapping {:#x}-{:#x} of kind {}", m.start, m.end, m.name),
            });
        };
        vmas.push(Vma {
            start: m.start,
            end: m.end,
            prot,
            kind,
            name: m.name.clone(),
            offset: m.offset,
            file,
            growsdown: m.has_flag("gd"),
            maywrite: m.has_flag("mw"),
            noreserve: m.has_flag("nr"),
        });
    }

    let (mut store, dirty) = match store {
        Some((s, Tracker::SoftDirty)) => (s, Some(Dirty::SoftDirty)),
        Some((s, Tracker::UffdWp { pagemap, .. })) => {
            let tracked: Vec<(u64, u64)> = smaps
                .iter()
                .filter(|m| m.has_flag("uw"))
                .map(|m| (m.start, m.end))
                .collect();
            (s, Some(written_pages(pid, &pagemap)?.with_tracked(tracked)))
        }
        None => (PageStore::create(dir, key)?, None),
    };
    // Small VMAs (TLS, small arenas) go at the freeze: the restore may touch them.
    let lazy: &dyn Fn(&Vma) -> bool =
        &|v: &Vma| crate::lazy::paged_lazily(v) && v.end - v.start >= STREAM_MIN;
    let (pages, in_image) = store.collect(
        pid,
        &memf,
        &vmas,
        dirty.as_ref(),
        false,
        stream.then_some(lazy),
    )?;
    let page_runs = runs_from(&in_image);
    store.flush()?;
    let image_id = store.image_id;
    let pages_file_len = PAGES_DATA_OFFSET + store.written * PAGE;

    let meta = ImageMeta {
        image_id,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        pid,
        ns_pids,
        hostname: q.hostname,
        kernel_release: q.release,
        comm,
        exe,
        exe_file,
        regs: sys::regs_to_words(norm),
        xstate,
        fs_base: regs.fs_base,
        gs_base: regs.gs_base,
        rseq,
        robust_list,
        robust_list_len,
        clear_child_tid: q.clear_child_tid,
        vmas,
        page_runs,
        pages_file_len,
        vdso_sha256,
        mm,
        sigactions: q.sigactions,
        sigmask,
        pending,
        altstack: q.altstack,
        fds,
        cwd,
        umask,
        rlimits,
        creds,
        personality: q.personality,
        itimers: q.itimers,
        syscall_note: note.to_string(),
        threads: thread_images,
        no_new_privs,
        ns_ppid: 0,
        ns_pgid,
        ns_sid,
        members: Vec::new(),
        pipes: Vec::new(),
    };
    Ok((meta, pages, store))
}

/// Seize and stop every thread but the leader (repeating until no new thread shows up),
/// recording each in `frozen` so that any later failure resumes it. Returns the threads
/// with their registers as captured.
fn freeze_other_threads(pid: i32, frozen: &mut Frozen) -> Result<Vec<(i32, Regs)>> {
    let mut out: Vec<(i32, Regs)> = Vec::new();
    loop {
        let mut new = false;
        for tid in procfs::threads(pid)? {
            if tid == pid || out.iter().any(|(t, _)| *t == tid) {
                continue;
            }
            new = true;
            match sys::seize(tid, libc::PTRACE_O_TRACESYSGOOD) {
                Ok(()) => {}
                Err(e) if e.errno() == Some(libc::ESRCH) => continue, // exited meanwhile
                Err(source) => return Err(DumpError::Freeze { pid: tid, source }),
            }
            let mut sup = Vec::new();
            if let Err(e) = freeze(tid, &mut sup) {
                let _ = sys::detach(tid, 0);
                return Err(e);
            }
            let regs = match sys::get_regs(tid) {
                Ok(r) => r,
                Err(e) => {
                    let _ = sys::detach(tid, 0);
                    return Err(e.into());
                }
            };
            let (norm, _) = normalize_restart(&regs, None);
            frozen.others.push((tid, norm));
            // Thread-directed signals dequeued by the freeze go back to that thread only.
            frozen
                .thread_suppressed
                .extend(sup.into_iter().map(|s| (tid, s)));
            out.push((tid, regs));
        }
        if !new {
            return Ok(out);
        }
    }
}

/// State of one non-leader thread (frozen), with injected sigaltstack and
/// PR_GET_TID_ADDRESS queries run in that thread.
fn thread_state(
    pid: i32,
    tid: i32,
    syscall_ip: u64,
    regs: &Regs,
    frozen: &mut Frozen,
) -> Result<ThreadImage> {
    let rel = format!("task/{tid}/status");
    let text = procfs::read_string(pid, &rel)?;
    let get = |k: &str| -> Result<String> {
        text.lines()
            .find_map(|l| {
                l.strip_prefix(k)
                    .map(|v| v.trim_start_matches(':').trim().to_string())
            })
            .ok_or_else(|| DumpError::Unsupported {
                pid,
                what: format!("thread {tid}: no {k} in status"),
            })
    };
    let leader = procfs::read_string(pid, "status")?;
    for k in ["Uid:", "Gid:", "Groups:"] {
        let line = |t: &str| t.lines().find(|l| l.starts_with(k)).map(str::to_string);
        if line(&text) != line(&leader) {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("thread {tid} has other credentials than the leader ({k})"),
            });
        }
    }
    let sigmask = procfs::hex_u64(pid, "SigBlk", &get("SigBlk")?)?;
    let pnd = procfs::hex_u64(pid, "SigPnd", &get("SigPnd")?)?;
    let mut pending: Vec<u32> = (1..=64u32)
        .filter(|s| pnd & (1u64 << (s - 1)) != 0)
        .collect();
    pending.extend(
        frozen
            .thread_suppressed
            .iter()
            .filter(|(t, _)| *t == tid)
            .map(|(_, s)| *s as u32),
    );
    pending.sort_unstable();
    pending.dedup();
    let ns_tid = *procfs::nums::<i32>(pid, "NSpid", &get("NSpid")?)?
        .last()
        .unwrap_or(&tid);
    let comm = procfs::read_string(pid, &format!("task/{tid}/comm"))?
        .trim_end_matches('\n')
        .to_string();
    let xstate = sys::get_xstate(tid)?;
    let rseq = match sys::get_rseq(tid)? {
        c if c.abi_size > 0 => Some(Rseq {
            addr: c.abi_pointer,
            len: c.abi_size,
            sig: c.signature,
        }),
        _ => None,
    };
    let (robust_list, robust_list_len) = sys::get_robust_list(tid)?;
    let mut inj = Injector::new(tid, syscall_ip, *regs)?;
    let q = (|| -> std::result::Result<(AltStack, u64), InjectError> {
        let scratch = inj.call(
            "mmap(scratch)",
            libc::SYS_mmap,
            [
                0,
                4096,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        let r = (|| -> std::result::Result<(AltStack, u64), InjectError> {
            inj.call(
                "sigaltstack",
                libc::SYS_sigaltstack,
                [0, scratch, 0, 0, 0, 0],
            )?;
            let b = inj.read(scratch, 24)?;
            let alt = AltStack {
                sp: le_u64(&b, 0),
                flags: (le_u64(&b, 8) as u32 as i32) & !libc::SS_ONSTACK,
                size: le_u64(&b, 16),
            };
            inj.call(
                "prctl(PR_GET_TID_ADDRESS)",
                libc::SYS_prctl,
                [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0],
            )?;
            Ok((alt, inj.read_u64(scratch)?))
        })();
        let un = inj.call(
            "munmap(scratch)",
            libc::SYS_munmap,
            [scratch, 4096, 0, 0, 0, 0],
        );
        let v = r?;
        un?;
        Ok(v)
    })();
    frozen
        .thread_suppressed
        .extend(inj.suppressed.drain(..).map(|s| (tid, s)));
    let (altstack, clear_child_tid) = q?;
    let (norm, _) = normalize_restart(regs, None);
    Ok(ThreadImage {
        tid,
        ns_tid,
        comm,
        regs: sys::regs_to_words(&norm),
        xstate,
        sigmask,
        pending,
        altstack,
        rseq,
        robust_list,
        robust_list_len,
        clear_child_tid,
    })
}

struct Queried {
    brk: u64,
    sigactions: Vec<SigAction>,
    altstack: AltStack,
    clear_child_tid: u64,
    itimers: Vec<ITimer>,
    hostname: String,
    release: String,
    personality: u32,
    /// Queried from inside: prlimit on another uid needs CAP_SYS_RESOURCE.
    rlimits: Vec<Rlimit>,
}

fn cstr_at(b: &[u8]) -> String {
    let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}

fn injected_queries(inj: &mut Injector) -> std::result::Result<Queried, InjectError> {
    const SCRATCH: u64 = 0x10000;
    let scratch = inj.call(
        "mmap(scratch)",
        libc::SYS_mmap,
        [
            0,
            SCRATCH,
            (libc::PROT_READ | libc::PROT_WRITE) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
            u64::MAX,
            0,
        ],
    )?;
    let r = (|| -> std::result::Result<Queried, InjectError> {
        let brk = inj.call("brk", libc::SYS_brk, [0; 6])?;
        let mut sigactions = Vec::new();
        for sig in 1..=64u64 {
            if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
                continue;
            }
            inj.call(
                "rt_sigaction",
                libc::SYS_rt_sigaction,
                [sig, 0, scratch, 8, 0, 0],
            )?;
            let b = inj.read(scratch, 32)?;
            sigactions.push(SigAction {
                signo: sig as u32,
                handler: le_u64(&b, 0),
                flags: le_u64(&b, 8),
                restorer: le_u64(&b, 16),
                mask: le_u64(&b, 24),
            });
        }
        inj.call(
            "sigaltstack",
            libc::SYS_sigaltstack,
            [0, scratch, 0, 0, 0, 0],
        )?;
        let b = inj.read(scratch, 24)?;
        let altstack = AltStack {
            sp: le_u64(&b, 0),
            flags: (le_u64(&b, 8) as u32 as i32) & !libc::SS_ONSTACK,
            size: le_u64(&b, 16),
        };
        inj.call(
            "prctl(PR_GET_TID_ADDRESS)",
            libc::SYS_prctl,
            [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0],
        )?;
        let clear_child_tid = inj.read_u64(scratch)?;
        let mut itimers = Vec::new();
        for which in 0..3u64 {
            inj.call(
                "getitimer",
                libc::SYS_getitimer,
                [which, scratch, 0, 0, 0, 0],
            )?;
            let b = inj.read(scratch, 32)?;
            let interval_usec = le_u64(&b, 0) * 1_000_000 + le_u64(&b, 8);
            let value_usec = le_u64(&b, 16) * 1_000_000 + le_u64(&b, 24);
            if value_usec != 0 {
                itimers.push(ITimer {
                    which: which as i32,
                    interval_usec,
                    value_usec,
                });
            }
        }
        inj.call("uname", libc::SYS_uname, [scratch, 0, 0, 0, 0, 0])?;
        let u = inj.read(scratch, 65 * 6)?;
        let hostname = cstr_at(&u[65..130]);
        let release = cstr_at(&u[130..195]);
        let personality = inj.call(
            "personality",
            libc::SYS_personality,
            [0xffff_ffff, 0, 0, 0, 0, 0],
        )? as u32;
        let mut rlimits = Vec::new();
        for res in 0..16u64 {
            inj.call("prlimit64", libc::SYS_prlimit64, [0, res, 0, scratch, 0, 0])?;
            let b = inj.read(scratch, 16)?;
            rlimits.push(Rlimit {
                resource: res as u32,
                cur: le_u64(&b, 0),
                max: le_u64(&b, 8),
            });
        }
        Ok(Queried {
            brk,
            sigactions,
            altstack,
            clear_child_tid,
            itimers,
            hostname,
            release,
            personality,
            rlimits,
        })
    })();
    let un = inj.call(
        "munmap(scratch)",
        libc::SYS_munmap,
        [scratch, SCRATCH, 0, 0, 0, 0],
    );
    let q = r?;
    un?;
    Ok(q)
}

fn dump_fds(pid: i32) -> Result<Vec<FdEntry>> {
    let mut out = Vec::new();
    for fd in procfs::fds(pid)? {
        let link = procfs::read_link(pid, &format!("fd/{fd}"))?;
        let info = procfs::fdinfo(pid, fd)?;
        if info.locked {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("fd {fd} ({link}) holds a file lock, which would not move"),
            });
        }
        let kind;
        let mut file = None;
        if let Some(ino) = link
            .strip_prefix("pipe:[")
            .and_then(|s| s.strip_suffix(']'))
        {
            let ino = ino.parse().map_err(|_| DumpError::Unsupported {
                pid,
                what: format!("fd {fd}: odd pipe link {link}"),
            })?;
            kind = FdKind::Pipe { ino };
        } else if link.starts_with('/') {
            if link.ends_with(" (deleted)") {
                return Err(DumpError::Unsupported {
                    pid,
                    what: format!("fd {fd} refers to deleted file {link}"),
                });
            }
            let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}")).map_err(|source| {
                DumpError::Unsupported {
                    pid,
                    what: format!("fd {fd} ({link}) cannot be inspected: {source}"),
                }
            })?;
            if meta.file_type().is_file() || meta.file_type().is_dir() {
                kind = FdKind::Regular;
                if meta.file_type().is_file() {
                    file = Some(file_id(&meta));
                }
            } else if ALLOWED_CHARDEVS.contains(&link.as_str()) {
                kind = FdKind::CharDev;
            } else {
                return Err(DumpError::Unsupported {
                    pid,
                    what: format!("fd {fd} is {link}, a kind of file that cannot migrate"),
                });
            }
        } else {
            return Err(DumpError::Unsupported {
                pid,
                what: format!("fd {fd} is {link}, a kind of file that cannot migrate"),
            });
        }
        out.push(FdEntry {
            fd,
            kind,
            path: link,
            pos: info.pos,
            flags: info.flags,
            file,
            desc: 0,
        });
    }
    Ok(out)
}

fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Ok(f) = File::open("/dev/urandom") {
        let _ = f.read_exact_at(&mut b, 0);
    }
    u64::from_le_bytes(b) ^ sys::monotonic_ns()
}

/// Where the latest copy of a page is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    /// All zero: a fresh anonymous mapping reproduces it.
    Zero,
    /// Byte offset in pages.img.
    At(u64),
}

/// Pages that belong in an image: (vaddr, where its copy is, index of its VMA).
type ImagePages = Vec<(u64, Slot, usize)>;

/// How a pass over memory decides that an already copied page changed since.
pub(crate) enum Dirty {
    /// Soft-dirty bit (pagemap bit 55), cleared through clear_refs.
    SoftDirty,
    /// Pages reported written by PAGEMAP_SCAN on uffd-wp async VMAs (`tracked`); pages
    /// outside tracked VMAs are always treated as dirty.
    Set {
        written: std::collections::HashSet<u64>,
        tracked: Vec<(u64, u64)>,
    },
}

impl Dirty {
    fn is_dirty(&self, va: u64, pm_entry: u64) -> bool {
        match self {
            Dirty::SoftDirty => pm_entry & procfs::PM_SOFT_DIRTY != 0,
            Dirty::Set { written, tracked } => {
                !tracked.iter().any(|(s, e)| *s <= va && va < *e) || written.contains(&va)
            }
        }
    }
}

/// The pages file being written, with the latest copy of every page seen so far.
#[derive(Debug)]
pub(crate) struct PageStore {
    /// Buffered: the swap file usually lives on the cluster FUSE mount, where small
    /// writes are expensive.
    file: std::io::BufWriter<File>,
    path: PathBuf,
    image_id: u64,
    /// Pages written or reserved so far (the file is PAGES_DATA_OFFSET + written * PAGE
    /// long once complete).
    written: u64,
    index: std::collections::BTreeMap<u64, Slot>,
    /// Tags of the bytes written so far (see [`crate::swap`]).
    macs: crate::swap::ChunkMacs,
    /// Pages given a place in the file at the freeze but written afterwards by the
    /// [`Streamer`]: (vaddr, npages, offset), contiguous in the file, in file order.
    deferred: Vec<(u64, u64, u64)>,
}

impl PageStore {
    pub(crate) fn create(dir: &Path, key: &MacKey) -> Result<Self> {
        image::create_private_dir(dir)?;
        let image_id = random_u64();
        let path = dir.join(image::PAGES_FILE);
        let mut file = image::create_private_file(&path)?;
        let header = image::pages_header(image_id);
        file.write_all(&header).map_err(|source| DumpError::Write {
            path: path.clone(),
            source,
        })?;
        let mut macs = crate::swap::ChunkMacs::new(key, image_id);
        macs.feed(&header);
        let file = std::io::BufWriter::with_capacity(1 << 20, file);
        Ok(PageStore {
            file,
            path,
            image_id,
            written: 0,
            index: Default::default(),
            macs,
            deferred: Vec::new(),
        })
    }

    /// Give `n` pages at `va` a place at the end of the file, to be written later.
    fn reserve(&mut self, va: u64, n: u64) -> u64 {
        let off = PAGES_DATA_OFFSET + self.written * PAGE;
        match self.deferred.last_mut() {
            Some(l) if l.0 + l.1 * PAGE == va && l.2 + l.1 * PAGE == off => l.1 += n,
            _ => self.deferred.push((va, n, off)),
        }
        self.written += n;
        off
    }

    /// Hand over to a [`Streamer`]: size the pages file to its final length, write the
    /// header of `pages.sum` and the tags known so far.
    fn into_stream(
        mut self,
        dir: &Path,
        pid: i32,
        tag: &str,
        pages_len: u64,
        digest: &[u8; 32],
    ) -> Result<StreamProc> {
        self.flush()?;
        let pages = self.file.into_inner().map_err(|e| DumpError::Write {
            path: self.path.clone(),
            source: e.into_error(),
        })?;
        pages
            .set_len(pages_len)
            .map_err(|source| DumpError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.macs.cut();
        let sum = self.macs.write_header(dir, tag, pages_len, digest)?;
        let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| DumpError::ReadMem {
            pid,
            addr: 0,
            source,
        })?;
        Ok(StreamProc {
            pid,
            mem,
            pages,
            path: self.path,
            sum,
            sum_path: dir.join(crate::swap::SUM_FILE),
            deferred: self.deferred,
            macs: self.macs,
        })
    }

    /// Flush the buffer and fsync the pages file.
    fn flush(&mut self) -> Result<()> {
        let path = self.path.clone();
        self.file.flush().map_err(|source| DumpError::Write {
            path: path.clone(),
            source,
        })?;
        self.file
            .get_ref()
            .sync_all()
            .map_err(|source| DumpError::Write { path, source })
    }

    fn append(&mut self, page: &[u8]) -> Result<u64> {
        let off = PAGES_DATA_OFFSET + self.written * PAGE;
        self.file
            .write_all(page)
            .map_err(|source| DumpError::Write {
                path: self.path.clone(),
                source,
            })?;
        self.macs.feed(page);
        self.written += 1;
        Ok(off)
    }

    /// Copy pages of `vmas` into the store. With `dirty`, a page already copied that is not
    /// dirty since is kept as is. With `running`, read failures (the process
    /// unmapped memory under us) skip the span instead of failing: those pages are either
    /// gone or new, and the frozen pass picks them up. Returns (pages copied, the list of
    /// (vaddr, slot, vma index) of every page that belongs in the image).
    ///
    /// With `defer`, pages of the VMAs it selects are not read: they get a place at the end
    /// of the file, after every page copied now, and are written by the [`Streamer`].
    fn collect(
        &mut self,
        pid: i32,
        mem: &File,
        vmas: &[Vma],
        dirty: Option<&Dirty>,
        running: bool,
        defer: Option<&dyn Fn(&Vma) -> bool>,
    ) -> Result<(u64, ImagePages)> {
        let pm = procfs::open_pagemap(pid)?;
        let mut copied = 0u64;
        let mut out = Vec::new();
        let mut ents = Vec::new();
        const CHUNK_PAGES: u64 = 4096; // 16 MiB of address space per pagemap read
        let mut buf = vec![0u8; (CHUNK_PAGES * PAGE) as usize];
        let deferred = |v: &Vma| defer.is_some_and(|f| f(v));
        // Deferred VMAs smallest first: thread stacks and TLS (which the restore itself
        // may touch) reach the swap file before a big heap does.
        let mut later: Vec<(usize, &Vma)> = vmas
            .iter()
            .enumerate()
            .filter(|(_, v)| deferred(v))
            .collect();
        later.sort_by_key(|(_, v)| v.end - v.start);
        let order = vmas
            .iter()
            .enumerate()
            .filter(|(_, v)| !deferred(v))
            .chain(later);
        let mut cut = false;
        for (vi, v) in order {
            let later = deferred(v);
            if later && !cut {
                // Everything copied now ends a chunk: its tag is known at the freeze.
                self.macs.cut();
                cut = true;
            }
            let anon = match v.kind {
                VmaKind::AnonPrivate | VmaKind::AnonShared => true,
                VmaKind::FilePrivate => false,
                _ => continue,
            };
            let want = |x: u64| {
                let present = x & (procfs::PM_PRESENT | procfs::PM_SWAPPED) != 0;
                present
                    && (anon || x & procfs::PM_SWAPPED != 0 || x & procfs::PM_FILE_OR_SHARED == 0)
            };
            for (rs, re) in populated_ranges(pid, &pm, v) {
                let mut a = rs;
                while a < re {
                    let e = (a + CHUNK_PAGES * PAGE).min(re);
                    match procfs::read_pagemap(pid, &pm, a, e, &mut ents) {
                        Ok(()) => {}
                        Err(_) if running => {
                            a = e;
                            continue;
                        }
                        Err(err) => return Err(err.into()),
                    }
                    let mut i = 0usize;
                    while i < ents.len() {
                        let va = a + i as u64 * PAGE;
                        if !want(ents[i]) {
                            i += 1;
                            continue;
                        }
                        let keep = dirty.is_some_and(|d| !d.is_dirty(va, ents[i]));
                        if keep {
                            if let Some(slot) = self.index.get(&va) {
                                out.push((va, *slot, vi));
                                i += 1;
                                continue;
                            }
                        }
                        // A span of pages to (re)copy.
                        let s = i;
                        while i < ents.len()
                            && want(ents[i])
                            && !(dirty.is_some_and(|d| !d.is_dirty(a + i as u64 * PAGE, ents[i]))
                                && self.index.contains_key(&(a + i as u64 * PAGE)))
                        {
                            i += 1;
                        }
                        let span_addr = a + s as u64 * PAGE;
                        if later {
                            let off = self.reserve(span_addr, (i - s) as u64);
                            for k in 0..(i - s) as u64 {
                                let slot = Slot::At(off + k * PAGE);
                                self.index.insert(span_addr + k * PAGE, slot);
                                out.push((span_addr + k * PAGE, slot, vi));
                            }
                            continue;
                        }
                        let data = &mut buf[..((i - s) as u64 * PAGE) as usize];
                        match mem.read_exact_at(data, span_addr) {
                            Ok(()) => {}
                            Err(_) if running => continue,
                            Err(source) => {
                                return Err(DumpError::ReadMem {
                                    pid,
                                    addr: span_addr,
                                    source,
                                })
                            }
                        }
                        for (k, page) in data.chunks_exact(PAGE as usize).enumerate() {
                            let pva = span_addr + k as u64 * PAGE;
                            let slot = if anon && page.iter().all(|b| *b == 0) {
                                Slot::Zero
                            } else {
                                copied += 1;
                                Slot::At(self.append(page)?)
                            };
                            self.index.insert(pva, slot);
                            out.push((pva, slot, vi));
                        }
                    }
                    a = e;
                }
            }
        }
        if defer.is_some() {
            out.sort_unstable_by_key(|p| p.0);
        }
        Ok((copied, out))
    }
}

impl PageStore {
    /// Pages of `vmas` that must be (re)copied: present, not reproduced by a fresh mapping,
    /// and soft-dirty or never copied. Call with the process frozen.
    fn targets(&self, pid: i32, vmas: &[Vma], dirty: &Dirty) -> Result<Vec<(u64, bool)>> {
        let pm = procfs::open_pagemap(pid)?;
        let mut out = Vec::new();
        let mut ents = Vec::new();
        for v in vmas {
            let anon = match v.kind {
                VmaKind::AnonPrivate | VmaKind::AnonShared => true,
                VmaKind::FilePrivate => false,
                _ => continue,
            };
            for (rs, re) in populated_ranges(pid, &pm, v) {
                let mut a = rs;
                while a < re {
                    let e = (a + 4096 * PAGE).min(re);
                    procfs::read_pagemap(pid, &pm, a, e, &mut ents)?;
                    for (i, x) in ents.iter().enumerate() {
                        let va = a + i as u64 * PAGE;
                        let present = x & (procfs::PM_PRESENT | procfs::PM_SWAPPED) != 0;
                        let wanted = present
                            && (anon
                                || x & procfs::PM_SWAPPED != 0
                                || x & procfs::PM_FILE_OR_SHARED == 0);
                        if wanted && (dirty.is_dirty(va, *x) || !self.index.contains_key(&va)) {
                            out.push((va, anon));
                        }
                    }
                    a = e;
                }
            }
        }
        Ok(out)
    }

    /// Copy the given pages of a running process; unreadable ones (unmapped meanwhile) are
    /// skipped and forgotten, so the frozen pass copies them if they still exist.
    fn copy_targets(&mut self, pid: i32, mem: &File, targets: &[(u64, bool)]) -> Result<u64> {
        let mut page = vec![0u8; PAGE as usize];
        let mut n = 0;
        for (va, anon) in targets {
            if mem.read_exact_at(&mut page, *va).is_err() {
                self.index.remove(va);
                continue;
            }
            let slot = if *anon && page.iter().all(|b| *b == 0) {
                Slot::Zero
            } else {
                n += 1;
                Slot::At(self.append(&page)?)
            };
            self.index.insert(*va, slot);
        }
        let _ = pid;
        Ok(n)
    }
}

/// The parts of a VMA that may hold pages. Huge mappings (reservations of GiBs are common
/// in runtimes) are narrowed with PAGEMAP_SCAN to their populated ranges, so their empty
/// parts cost no pagemap reads; small ones, or kernels without PAGEMAP_SCAN, are scanned
/// whole.
fn populated_ranges(pid: i32, pm: &File, v: &Vma) -> Vec<(u64, u64)> {
    use std::os::fd::AsRawFd;
    if v.end - v.start <= 64 << 20 {
        return vec![(v.start, v.end)];
    }
    match sys::pagemap_scan_present(pid, pm.as_raw_fd(), v.start, v.end) {
        Ok(r) => r
            .into_iter()
            .map(|(s, e)| (s.max(v.start), e.min(v.end)))
            .filter(|(s, e)| s < e)
            .collect(),
        Err(_) => vec![(v.start, v.end)],
    }
}

/// Page runs from the pages that belong in the image (vaddr order), never crossing a VMA.
fn runs_from(pages: &[(u64, Slot, usize)]) -> Vec<PageRun> {
    let mut runs: Vec<PageRun> = Vec::new();
    let mut last_vma = usize::MAX;
    for (va, slot, vi) in pages {
        let Slot::At(off) = slot else { continue };
        let n = runs.len();
        if n > 0
            && last_vma == *vi
            && runs[n - 1].vaddr + runs[n - 1].npages * PAGE == *va
            && runs[n - 1].offset + runs[n - 1].npages * PAGE == *off
        {
            runs[n - 1].npages += 1;
        } else {
            runs.push(PageRun {
                vaddr: *va,
                npages: 1,
                offset: *off,
            });
        }
        last_vma = *vi;
    }
    runs
}

/// How pre-copy learns which pages were written.
#[derive(Debug)]
enum Tracker {
    /// clear_refs + pagemap bit 55 (kernels with CONFIG_MEM_SOFT_DIRTY).
    SoftDirty,
    /// A userfaultfd in write-protect async mode registered inside the process, read with
    /// PAGEMAP_SCAN (kernels without soft-dirty, 6.7+). Dropping `uffd` unregisters it.
    UffdWp { _uffd: WpTracker, pagemap: File },
}

/// The userfaultfd of uffd-wp tracking. Dropping it unregisters every range explicitly
/// (rather than relying on the last close, which a concurrent fork elsewhere in this
/// process could delay), so a resumed source carries no tracking.
#[derive(Debug)]
struct WpTracker {
    pid: i32,
    fd: std::os::fd::OwnedFd,
}

impl Drop for WpTracker {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        if let Ok(maps) = procfs::smaps(self.pid) {
            for m in maps.iter().filter(|m| m.has_flag("uw")) {
                if !sys::uffd_unregister(self.fd.as_raw_fd(), m.start, m.end - m.start) {
                    tracing::warn!(
                        pid = self.pid,
                        "cannot unregister uffd-wp range {:#x}-{:#x}",
                        m.start,
                        m.end
                    );
                }
            }
        }
    }
}

/// Written pages reported by PAGEMAP_SCAN (and write-protected again).
struct Written(std::collections::HashSet<u64>);

impl Written {
    fn with_tracked(self, tracked: Vec<(u64, u64)>) -> Dirty {
        Dirty::Set {
            written: self.0,
            tracked,
        }
    }
}

fn written_pages(pid: i32, pagemap: &File) -> Result<Written> {
    use std::os::fd::AsRawFd;
    let mut set = std::collections::HashSet::new();
    for (s, e) in sys::pagemap_scan(pid, pagemap.as_raw_fd(), 0, 0x7fff_ffff_f000, true)? {
        let mut a = s;
        while a < e {
            set.insert(a);
            a += PAGE;
        }
    }
    Ok(Written(set))
}

/// Iterative pre-copy of a running process: [`PreCopy::start`] starts write tracking
/// (soft-dirty bits, or a uffd-wp async userfaultfd read with PAGEMAP_SCAN when the kernel
/// lacks soft-dirty) and copies every page while the process runs; each
/// [`PreCopy::round`] copies only the pages written since the previous round;
/// [`PreCopy::finish`] freezes the process and copies what is still dirty, so the freeze
/// time depends on the dirtying rate, not on the size of memory.
#[derive(Debug)]
pub struct PreCopy {
    pid: i32,
    dir: PathBuf,
    store: PageStore,
    mem: File,
    tracker: Tracker,
    /// Pages copied by each round so far.
    pub rounds: Vec<u64>,
    /// The sleep syscall seen interrupted by a brief freeze (the kernel then continues it
    /// as restart_syscall, whose meaning the final dump must know).
    restart_hint: Option<i64>,
    /// Start time (clock ticks after boot, /proc stat field 22): tells a pid reused by
    /// another process from the one whose pages were copied.
    start_time: u64,
    /// Pre-copies of the other processes of a sandboxed tree (as they were at `start`).
    members: Vec<PreCopy>,
    /// The migration key the pages are tagged with.
    key: MacKey,
}

/// What pre-copy hands to the final dump for one process.
struct PreCopied {
    pid: i32,
    start_time: u64,
    store: PageStore,
    tracker: Tracker,
    hint: Option<i64>,
}

fn start_time(pid: i32) -> Result<u64> {
    let f = procfs::stat_fields(pid)?;
    Ok(procfs::stat_field(pid, &f, 22)?)
}

fn clear_soft_dirty(pid: i32) -> Result<()> {
    let p = PathBuf::from(format!("/proc/{pid}/clear_refs"));
    std::fs::write(&p, b"4").map_err(|source| DumpError::Write { path: p, source })
}

fn vmas_of(pid: i32) -> Result<Vec<Vma>> {
    Ok(procfs::smaps(pid)?
        .into_iter()
        .map(|m| Vma {
            start: m.start,
            end: m.end,
            prot: 0,
            kind: if m.name.starts_with('/') && !m.shared {
                VmaKind::FilePrivate
            } else if m.name.is_empty() || m.name == "[heap]" || m.name == "[stack]" {
                if m.shared {
                    VmaKind::AnonShared
                } else {
                    VmaKind::AnonPrivate
                }
            } else {
                VmaKind::Special
            },
            name: m.name,
            offset: m.offset,
            file: None,
            growsdown: false,
            maywrite: false,
            noreserve: false,
        })
        .collect())
}

impl PreCopy {
    /// First round: start tracking and copy all memory of the running `pid` into `dir`;
    /// for the main process of a sandbox, of every other process of its tree as well
    /// (into `dir/proc-<ns pid>/`; one that cannot be tracked, e.g. gone meanwhile, is
    /// simply copied whole at the final freeze, like any process started after this).
    pub fn start(pid: i32, dir: &Path) -> Result<Self> {
        let key = crate::swap::new_key();
        let mut pc = Self::start_one(pid, dir, key)?;
        for p in tree_pids(pid).into_iter().skip(1) {
            let one =
                innermost_pid(p).and_then(|ns| Self::start_one(p, &dir.join(member_dir(ns)), key));
            match one {
                Ok(m) => {
                    pc.rounds[0] += m.rounds[0];
                    pc.members.push(m);
                }
                Err(e) => tracing::debug!(pid = p, "no pre-copy for this process: {e}"),
            }
        }
        Ok(pc)
    }

    fn start_one(pid: i32, dir: &Path, key: MacKey) -> Result<Self> {
        // Soft-dirty rounds freeze only the leader, which is atomic only for a
        // single-threaded process; threaded ones use uffd-wp (atomic scan, no freeze).
        let single = procfs::threads(pid)?.len() == 1;
        let store = PageStore::create(dir, &key)?;
        let mem = File::open(format!("/proc/{pid}/mem")).map_err(|source| DumpError::ReadMem {
            pid,
            addr: 0,
            source,
        })?;
        let tracker = if single && sys::probe_soft_dirty() {
            clear_soft_dirty(pid)?;
            Tracker::SoftDirty
        } else {
            start_uffd_wp(pid)?
        };
        let mut pc = PreCopy {
            pid,
            dir: dir.to_path_buf(),
            store,
            mem,
            tracker,
            rounds: Vec::new(),
            restart_hint: None,
            start_time: start_time(pid)?,
            members: Vec::new(),
            key,
        };
        let vmas = vmas_of(pid)?;
        let (n, _) = pc.store.collect(pid, &pc.mem, &vmas, None, true, None)?;
        pc.rounds.push(n);
        Ok(pc)
    }

    /// The write-tracking mechanism in use: "soft-dirty" or "uffd-wp".
    pub fn tracking(&self) -> &'static str {
        match self.tracker {
            Tracker::SoftDirty => "soft-dirty",
            Tracker::UffdWp { .. } => "uffd-wp",
        }
    }

    /// Another round: learn which pages were written since the last round and copy them
    /// while the process runs. With soft-dirty the process is frozen for a moment to read
    /// and clear the bits (both while frozen, so no write slips between the two); with
    /// uffd-wp, PAGEMAP_SCAN reports and re-protects each page atomically, no freeze. A page written
    /// again during the copy has its bit set again and is copied by the next round or by
    /// [`PreCopy::finish`]. Returns the number of pages copied.
    pub fn round(&mut self) -> Result<u64> {
        let mut n = self.round_one()?;
        // A member that ended or changed meanwhile just leaves the pre-copy.
        let mut kept = Vec::new();
        for mut m in std::mem::take(&mut self.members) {
            match m.round_one() {
                Ok(k) => {
                    n += k;
                    kept.push(m);
                }
                Err(e) => tracing::debug!(pid = m.pid, "pre-copy round skipped: {e}"),
            }
        }
        self.members = kept;
        if let Some(last) = self.rounds.last_mut() {
            *last = n;
        }
        Ok(n)
    }

    fn round_one(&mut self) -> Result<u64> {
        let pid = self.pid;
        let vmas = vmas_of(pid)?;
        let targets = match &self.tracker {
            Tracker::SoftDirty => {
                let hint = &mut self.restart_hint;
                let store = &self.store;
                with_brief_freeze(pid, || {
                    let r = sys::get_regs(pid)?;
                    let nr = r.orig_rax as i64;
                    let in_restart_block = r.rax as i64 == -ERESTART_RESTARTBLOCK;
                    if !in_restart_block {
                        *hint = None;
                    } else if nr != libc::SYS_restart_syscall {
                        *hint = Some(nr);
                    }
                    let t = store.targets(pid, &vmas, &Dirty::SoftDirty)?;
                    clear_soft_dirty(pid)?;
                    Ok(t)
                })?
            }
            Tracker::UffdWp { pagemap, .. } => {
                // PAGEMAP_SCAN reports and write-protects each page atomically: no freeze.
                let tracked: Vec<(u64, u64)> = procfs::smaps(pid)?
                    .iter()
                    .filter(|m| m.has_flag("uw"))
                    .map(|m| (m.start, m.end))
                    .collect();
                let dirty = written_pages(pid, pagemap)?.with_tracked(tracked);
                self.store.targets(pid, &vmas, &dirty)?
            }
        };
        let n = self.store.copy_targets(pid, &self.mem, &targets)?;
        self.rounds.push(n);
        Ok(n)
    }

    /// Freeze the process and complete the image (same result as [`dump`]).
    pub fn finish(self) -> Result<DumpInfo> {
        self.finish_opts(&DumpOptions::default())
    }

    /// [`PreCopy::finish`] with options (a streamed finish writes no page at the freeze).
    pub fn finish_opts(self, opts: &DumpOptions) -> Result<DumpInfo> {
        let (pid, dir, hint, key) = (self.pid, self.dir.clone(), self.restart_hint, self.key);
        let mut copied = Vec::new();
        self.into_copied(&mut copied);
        dump_with(pid, &dir, copied, hint, opts, &key)
    }

    fn into_copied(self, out: &mut Vec<PreCopied>) {
        let PreCopy {
            pid,
            store,
            tracker,
            restart_hint,
            start_time,
            members,
            ..
        } = self;
        out.push(PreCopied {
            pid,
            start_time,
            store,
            tracker,
            hint: restart_hint,
        });
        for m in members {
            m.into_copied(out);
        }
    }
}

/// Start uffd-wp async write tracking in `pid`: freeze it, create a userfaultfd inside it
/// (UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED), register its private mappings in
/// write-protect mode, take the descriptor out (pidfd_getfd) and close it in the process,
/// let it run, then write-protect everything with one PAGEMAP_SCAN. From then on a write
/// is resolved by the kernel without any handler and shows as "written" in the next scan.
fn start_uffd_wp(pid: i32) -> Result<Tracker> {
    let pagemap_path = PathBuf::from(format!("/proc/{pid}/pagemap"));
    let pagemap = File::open(&pagemap_path).map_err(|source| DumpError::ReadMem {
        pid,
        addr: 0,
        source,
    })?;
    let vmas: Vec<procfs::MapEntry> = procfs::smaps(pid)?
        .into_iter()
        .filter(|m| {
            !m.shared && !m.name.starts_with("[v") && !m.has_flag("io") && !m.has_flag("pf")
        })
        .collect();
    sys::seize(pid, libc::PTRACE_O_TRACESYSGOOD)
        .map_err(|source| DumpError::Freeze { pid, source })?;
    let mut suppressed = Vec::new();
    let regs = match freeze(pid, &mut suppressed).and_then(|_| Ok(sys::get_regs(pid)?)) {
        Ok(r) => r,
        Err(e) => {
            let _ = sys::detach(pid, 0);
            return Err(e);
        }
    };
    let injected = (|| -> Result<std::os::fd::OwnedFd> {
        let (_, _, ip) = vdso_syscall(pid)?;
        let mut inj = Injector::new(pid, ip, regs)?;
        let scratch = inj.call(
            "mmap(scratch)",
            libc::SYS_mmap,
            [
                0,
                4096,
                (libc::PROT_READ | libc::PROT_WRITE) as u64,
                (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64,
                u64::MAX,
                0,
            ],
        )?;
        let r = (|| -> Result<std::os::fd::OwnedFd> {
            let fd = inj.call(
                "userfaultfd",
                libc::SYS_userfaultfd,
                [(libc::O_CLOEXEC | libc::O_NONBLOCK) as u64, 0, 0, 0, 0, 0],
            )?;
            let mut api = Vec::new();
            for w in [
                sys::uffd::API,
                sys::uffd::FEATURE_WP_ASYNC | sys::uffd::FEATURE_WP_UNPOPULATED,
                0,
            ] {
                api.extend_from_slice(&w.to_le_bytes());
            }
            inj.write(scratch, &api)?;
            let ok = inj.call(
                "ioctl(UFFDIO_API)",
                libc::SYS_ioctl,
                [fd, sys::uffd::IOC_API, scratch, 0, 0, 0],
            );
            if let Err(e) = ok {
                let _ = inj.call("close", libc::SYS_close, [fd, 0, 0, 0, 0, 0]);
                return Err(DumpError::Unsupported {
                    pid,
                    what: format!(
                        "no write tracking: no soft-dirty and uffd-wp async refused ({e})"
                    ),
                });
            }
            for m in &vmas {
                let mut reg = Vec::new();
                for w in [m.start, m.end - m.start, sys::uffd::REGISTER_MODE_WP, 0] {
                    reg.extend_from_slice(&w.to_le_bytes());
                }
                inj.write(scratch, &reg)?;
                // A mapping that cannot be registered stays untracked: always copied again.
                let _ = inj.raw(
                    libc::SYS_ioctl,
                    [fd, sys::uffd::IOC_REGISTER, scratch, 0, 0, 0],
                )?;
            }
            let owned = sys::steal_fd(pid, fd as i32)?;
            inj.call("close(userfaultfd)", libc::SYS_close, [fd, 0, 0, 0, 0, 0])?;
            Ok(owned)
        })();
        let un = inj.call(
            "munmap(scratch)",
            libc::SYS_munmap,
            [scratch, 4096, 0, 0, 0, 0],
        );
        suppressed.append(&mut inj.suppressed);
        let owned = r?;
        un?;
        Ok(owned)
    })();
    // Let the process run on, whatever happened.
    let (norm, _) = normalize_restart(&regs, None);
    let resumed = sys::set_regs(pid, &norm).and_then(|_| sys::detach(pid, 0));
    for s in &suppressed {
        let _ = sys::kill(pid, *s);
    }
    let uffd = injected?;
    resumed?;
    // Arm: write-protect every present page and mark the holes.
    written_pages(pid, &pagemap)?;
    Ok(Tracker::UffdWp {
        _uffd: WpTracker { pid, fd: uffd },
        pagemap,
    })
}

/// Stop `pid` with PTRACE_SEIZE + PTRACE_INTERRUPT, run `f`, detach. Registers are not
/// touched, so the kernel's own syscall-restart logic applies on detach.
fn with_brief_freeze<T>(pid: i32, f: impl FnOnce() -> Result<T>) -> Result<T> {
    sys::seize(pid, 0).map_err(|source| DumpError::Freeze { pid, source })?;
    let stopped = (|| {
        sys::interrupt(pid).map_err(|source| DumpError::Freeze { pid, source })?;
        loop {
            match sys::wait(pid).map_err(|source| DumpError::Freeze { pid, source })? {
                Wait::Stopped { event, .. } if event == libc::PTRACE_EVENT_STOP => return Ok(()),
                // A signal arrived first: deliver it normally and wait for our trap.
                Wait::Stopped { sig, .. } => {
                    sys::cont(pid, sig).map_err(|source| DumpError::Freeze { pid, source })?
                }
                Wait::Exited(c) => {
                    return Err(DumpError::Vanished {
                        pid,
                        what: format!("exited with {c}"),
                    })
                }
                Wait::Signaled(s) => {
                    return Err(DumpError::Vanished {
                        pid,
                        what: format!("killed by signal {s}"),
                    })
                }
            }
        }
    })();
    let r = stopped.and_then(|_| f());
    let d = sys::detach(pid, 0);
    let v = r?;
    d?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero_regs() -> Regs {
        sys::regs_from_words(&[0u64; sys::REGS_WORDS]).unwrap()
    }

    #[test]
    fn restart_rules() {
        let mut r = zero_regs();
        r.orig_rax = libc::SYS_read as u64;
        r.rax = (-ERESTARTSYS) as u64;
        r.rip = 0x1002;
        let (n, _) = normalize_restart(&r, None);
        assert_eq!(
            (n.rax, n.rip, n.orig_rax),
            (libc::SYS_read as u64, 0x1000, u64::MAX)
        );

        r.orig_rax = libc::SYS_clock_nanosleep as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.rsi = 0;
        r.rdx = 0x5000;
        r.r10 = 0x6000;
        let (n, _) = normalize_restart(&r, None);
        assert_eq!(
            (n.rax, n.rip, n.rdx),
            (libc::SYS_clock_nanosleep as u64, 0x1000, 0x6000)
        );

        r.r10 = 0;
        let (n, _) = normalize_restart(&r, None);
        assert_eq!((n.rax as i64, n.rip), (-(libc::EINTR as i64), 0x1002));

        r.orig_rax = u64::MAX;
        r.rax = 7;
        let (n, _) = normalize_restart(&r, None);
        assert_eq!((n.rax, n.rip), (7, 0x1002));

        // restart_syscall standing for a clock_nanosleep seen during pre-copy.
        r.orig_rax = libc::SYS_restart_syscall as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.r10 = 0x6000;
        let (n, _) = normalize_restart(&r, Some(libc::SYS_clock_nanosleep));
        assert_eq!(
            (n.rax, n.rip, n.rdx, n.orig_rax),
            (libc::SYS_clock_nanosleep as u64, 0x1000, 0x6000, u64::MAX)
        );
        let (n, _) = normalize_restart(&r, None);
        assert_eq!(n.rax as i64, -(libc::EINTR as i64));
    }
}
