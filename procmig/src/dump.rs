//! Dump (source side): freeze a single-threaded process with PTRACE_SEIZE +
//! PTRACE_INTERRUPT, collect its state from registers, /proc and a few injected syscalls,
//! copy its private pages into the swap file and write the metadata. The process stays
//! frozen afterwards: the caller gets a [`Frozen`] handle and decides between
//! [`Frozen::kill`] (target confirmed) and [`Frozen::resume`] (restore failed). If the dump
//! itself fails, the process is resumed before the error is returned: nothing is lost.
//!
//! Syscall restart: a process stopped inside an interruptible syscall has rax = -ERESTART*
//! and orig_rax = the syscall number. The image (and a resumed source) gets registers with
//! the restart already applied, the way the kernel would on signal return:
//! -ERESTARTSYS/-ERESTARTNOINTR/-ERESTARTNOHAND re-execute the syscall (rip -= 2,
//! rax = orig_rax); -ERESTART_RESTARTBLOCK of a relative nanosleep/clock_nanosleep with a
//! `rem` pointer re-executes it with `req := rem` (the kernel stored the remaining time
//! there), any other -ERESTART_RESTARTBLOCK returns -EINTR (the kernel restart block does
//! not migrate). orig_rax is set to -1 so the kernel does not restart a second time.

use std::fs::File;
use std::io::Write;
use std::marker::PhantomData;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use sha2::Digest;

use crate::image::{
    self, AltStack, Creds, FdEntry, FdKind, FileId, ITimer, ImageMeta, MmFields, PageRun, Rlimit, Rseq, SigAction,
    Vma, VmaKind, PAGE, PAGES_DATA_OFFSET,
};
use crate::inject::{self, InjectError, Injector};
use crate::procfs::{self, ProcError};
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
pub fn normalize_restart(r: &Regs) -> (Regs, String) {
    let mut n = *r;
    let nr = r.orig_rax as i64;
    let ret = r.rax as i64;
    let mut note = String::new();
    if nr >= 0 {
        match -ret {
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND => {
                n.rax = r.orig_rax;
                n.rip = r.rip.wrapping_sub(2);
                note = format!("syscall {nr} interrupted, will be re-executed");
            }
            ERESTART_RESTARTBLOCK => {
                let relative_with_rem = match nr {
                    x if x == libc::SYS_nanosleep => (r.rsi != 0).then(|| n.rdi = r.rsi),
                    x if x == libc::SYS_clock_nanosleep => {
                        (r.rsi & libc::TIMER_ABSTIME as u64 == 0 && r.r10 != 0).then(|| n.rdx = r.r10)
                    }
                    _ => None,
                };
                if relative_with_rem.is_some() {
                    n.rax = r.orig_rax;
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
    pub pages: u64,
    pub bytes: u64,
    pub fds: usize,
    /// Time the process was frozen before the image was complete.
    pub frozen_ms: u64,
    pub syscall_note: String,
    /// The still-frozen source.
    pub frozen: Frozen,
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
    suppressed: Vec<i32>,
    state: FrozenState,
    _not_send: PhantomData<*const ()>,
}

impl Frozen {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Let the source run on (restore failed or this was a checkpoint).
    pub fn resume(mut self) -> Result<()> {
        self.state = FrozenState::Released;
        sys::set_regs(self.pid, &self.resume_regs)?;
        sys::detach(self.pid, 0)?;
        for s in &self.suppressed {
            let _ = sys::kill(self.pid, *s);
        }
        Ok(())
    }

    /// Kill the source (the target confirmed) and wait until it is gone.
    pub fn kill(mut self) -> Result<()> {
        self.state = FrozenState::Released;
        sys::kill(self.pid, libc::SIGKILL)?;
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
        self.state = FrozenState::Released;
        sys::kill(self.pid, libc::SIGSTOP)?;
        sys::set_regs(self.pid, &self.resume_regs)?;
        sys::detach(self.pid, 0)?;
        for s in &self.suppressed {
            let _ = sys::kill(self.pid, *s);
        }
        // Wait until the group-stop is visible.
        for _ in 0..200 {
            if process_state(self.pid) == Some('T') {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        Err(DumpError::Vanished { pid: self.pid, what: "did not enter the stopped state after release".into() })
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

/// The one-letter state of /proc/pid/stat.
pub fn process_state(pid: i32) -> Option<char> {
    procfs::stat_fields(pid).ok()?.first()?.chars().next()
}

/// Resume a process left frozen by [`Frozen::release_stopped`].
pub fn resume_stopped(pid: i32) -> Result<()> {
    Ok(sys::kill(pid, libc::SIGCONT)?)
}

/// Kill a process left frozen by [`Frozen::release_stopped`].
pub fn kill_stopped(pid: i32) -> Result<()> {
    Ok(sys::kill(pid, libc::SIGKILL)?)
}

fn file_id(meta: &std::fs::Metadata) -> FileId {
    FileId { size: meta.size(), mtime_sec: meta.mtime(), mtime_nsec: meta.mtime_nsec() }
}

const ALLOWED_CHARDEVS: &[&str] = &["/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full"];

/// Freeze `pid` and write its image into `dir` (created if missing).
pub fn dump(pid: i32, dir: &Path) -> Result<DumpInfo> {
    let t0 = sys::monotonic_ns();
    let threads = procfs::threads(pid)?;
    if threads.len() != 1 {
        return Err(DumpError::Unsupported { pid, what: format!("{} threads (only single-threaded processes migrate)", threads.len()) });
    }
    std::fs::create_dir_all(dir).map_err(|source| DumpError::Write { path: dir.to_path_buf(), source })?;

    sys::seize(pid, libc::PTRACE_O_TRACESYSGOOD).map_err(|source| DumpError::Freeze { pid, source })?;
    let mut suppressed = Vec::new();
    let stop = freeze(pid, &mut suppressed);
    let regs = match stop.and_then(|_| Ok(sys::get_regs(pid)?)) {
        Ok(r) => r,
        Err(e) => {
            let _ = sys::detach(pid, 0);
            return Err(e);
        }
    };
    let (norm, note) = normalize_restart(&regs);
    let mut frozen =
        Frozen { pid, resume_regs: norm, suppressed, state: FrozenState::Traced, _not_send: PhantomData };
    match dump_frozen(pid, dir, &regs, &norm, &note, &mut frozen) {
        Ok((vmas, pages, fds)) => Ok(DumpInfo {
            pid,
            dir: dir.to_path_buf(),
            vmas,
            pages,
            bytes: pages * PAGE,
            fds,
            frozen_ms: (sys::monotonic_ns() - t0) / 1_000_000,
            syscall_note: note,
            frozen,
        }),
        Err(e) => {
            if let Err(re) = frozen.resume() {
                tracing::error!(pid, "dump failed ({e}) and resuming the source failed too: {re}");
            }
            Err(e)
        }
    }
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
            Wait::Exited(c) => return Err(DumpError::Vanished { pid, what: format!("exited with {c}") }),
            Wait::Signaled(s) => return Err(DumpError::Vanished { pid, what: format!("killed by signal {s}") }),
        }
    }
}

fn dump_frozen(
    pid: i32,
    dir: &Path,
    regs: &Regs,
    norm: &Regs,
    note: &str,
    frozen: &mut Frozen,
) -> Result<(usize, u64, usize)> {
    let xstate = sys::get_xstate(pid)?;
    let rseq = match sys::get_rseq(pid) {
        Ok(c) if c.abi_size > 0 => Some(Rseq { addr: c.abi_pointer, len: c.abi_size, sig: c.signature }),
        Ok(_) => None,
        Err(e) => return Err(e.into()),
    };
    let (robust_list, robust_list_len) = sys::get_robust_list(pid)?;

    let maps0 = procfs::maps(pid)?;
    let vdso = maps0
        .iter()
        .find(|m| m.name == "[vdso]")
        .ok_or_else(|| DumpError::Unsupported { pid, what: "no [vdso] mapping".into() })?;
    let memf = File::open(format!("/proc/{pid}/mem")).map_err(|source| DumpError::ReadMem { pid, addr: 0, source })?;
    let syscall_ip = inject::find_syscall_in_vdso(pid, &memf, vdso.start, vdso.end)
        .ok_or_else(|| DumpError::Unsupported { pid, what: "no syscall instruction found in [vdso]".into() })?;
    let mut vdso_bytes = vec![0u8; (vdso.end - vdso.start) as usize];
    memf.read_exact_at(&mut vdso_bytes, vdso.start)
        .map_err(|source| DumpError::ReadMem { pid, addr: vdso.start, source })?;
    let vdso_sha256 = sha2::Sha256::digest(&vdso_bytes).to_vec();

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
    let mut pending: Vec<u32> = (1..=64u32).filter(|s| pnd & (1u64 << (s - 1)) != 0).collect();
    pending.extend(frozen.suppressed.iter().map(|s| *s as u32));
    pending.sort_unstable();
    pending.dedup();
    let umask = u32::from_str_radix(procfs::status_get(pid, &st, "Umask")?, 8)
        .map_err(|_| DumpError::Unsupported { pid, what: "unparsable Umask".into() })?;
    let uids: Vec<u32> = procfs::nums(pid, "Uid", procfs::status_get(pid, &st, "Uid")?)?;
    let gids: Vec<u32> = procfs::nums(pid, "Gid", procfs::status_get(pid, &st, "Gid")?)?;
    let groups: Vec<u32> = procfs::nums(pid, "Groups", procfs::status_get(pid, &st, "Groups")?)?;
    let ns_pids: Vec<i32> = procfs::nums(pid, "NSpid", procfs::status_get(pid, &st, "NSpid")?)?;
    if uids.len() != 4 || gids.len() != 4 {
        return Err(DumpError::Unsupported { pid, what: "unexpected Uid/Gid lines in status".into() });
    }
    let creds = Creds { uids: [uids[0], uids[1], uids[2], uids[3]], gids: [gids[0], gids[1], gids[2], gids[3]], groups };

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
    let comm = procfs::read_string(pid, "comm")?.trim_end_matches('\n').to_string();
    let exe = procfs::read_link(pid, "exe")?;
    if exe.ends_with(" (deleted)") {
        return Err(DumpError::Unsupported { pid, what: format!("executable {exe} is deleted") });
    }
    let exe_file = std::fs::metadata(&exe).ok().map(|m| file_id(&m));
    let cwd = procfs::read_link(pid, "cwd")?;
    let mut rlimits = Vec::new();
    for res in 0..16u32 {
        let (cur, max) = sys::prlimit(pid, res, None)?;
        rlimits.push(Rlimit { resource: res, cur, max });
    }
    let fds = dump_fds(pid)?;

    // --- memory -----------------------------------------------------------------------
    let smaps = procfs::smaps(pid)?;
    let mut vmas = Vec::new();
    for m in &smaps {
        let special = m.name == "[vdso]" || m.name.starts_with("[vvar") || m.name == "[vsyscall]";
        if !special && (m.has_flag("io") || m.has_flag("pf")) {
            return Err(DumpError::Unsupported { pid, what: format!("device mapping {:#x}-{:#x} {}", m.start, m.end, m.name) });
        }
        if m.name.ends_with(" (deleted)") && !m.name.starts_with("/dev/zero") && !m.name.starts_with("/SYSV") {
            return Err(DumpError::Unsupported { pid, what: format!("mapping of deleted file {}", m.name) });
        }
        let mut prot = 0u32;
        for (on, bit) in [(m.read, libc::PROT_READ), (m.write, libc::PROT_WRITE), (m.exec, libc::PROT_EXEC)] {
            if on {
                prot |= bit as u32;
            }
        }
        let (kind, file) = if m.name == "[vsyscall]" {
            (VmaKind::Vsyscall, None)
        } else if m.name == "[vdso]" || m.name.starts_with("[vvar") {
            (VmaKind::Special, None)
        } else if m.name.starts_with("/dev/zero") || m.name.starts_with("/SYSV") || (m.shared && m.inode == 0) {
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
            (if m.shared { VmaKind::FileShared } else { VmaKind::FilePrivate }, Some(file_id(&meta)))
        } else if m.name.is_empty() || m.name == "[heap]" || m.name == "[stack]" || m.name.starts_with("[anon") {
            (VmaKind::AnonPrivate, None)
        } else {
            return Err(DumpError::Unsupported { pid, what: format!("mapping {:#x}-{:#x} of kind {}", m.start, m.end, m.name) });
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
        });
    }

    let image_id = random_u64();
    let pages_path = dir.join(image::PAGES_FILE);
    let mut pf = File::create(&pages_path).map_err(|source| DumpError::Write { path: pages_path.clone(), source })?;
    pf.write_all(&image::pages_header(image_id)).map_err(|source| DumpError::Write { path: pages_path.clone(), source })?;
    let (page_runs, pages) = dump_pages(pid, &memf, &vmas, &mut pf, &pages_path)?;
    pf.sync_all().map_err(|source| DumpError::Write { path: pages_path.clone(), source })?;
    let pages_file_len = PAGES_DATA_OFFSET + pages * PAGE;

    let meta = ImageMeta {
        image_id,
        created_unix: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
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
        fds: fds.clone(),
        cwd,
        umask,
        rlimits,
        creds,
        personality: q.personality,
        itimers: q.itimers,
        syscall_note: note.to_string(),
    };
    image::validate(&dir.join(image::META_FILE), &meta)?;
    image::write_meta(dir, &meta)?;
    Ok((meta.vmas.len(), pages, fds.len()))
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
        [0, SCRATCH, (libc::PROT_READ | libc::PROT_WRITE) as u64, (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS) as u64, u64::MAX, 0],
    )?;
    let r = (|| -> std::result::Result<Queried, InjectError> {
        let brk = inj.call("brk", libc::SYS_brk, [0; 6])?;
        let mut sigactions = Vec::new();
        for sig in 1..=64u64 {
            if sig == libc::SIGKILL as u64 || sig == libc::SIGSTOP as u64 {
                continue;
            }
            inj.call("rt_sigaction", libc::SYS_rt_sigaction, [sig, 0, scratch, 8, 0, 0])?;
            let b = inj.read(scratch, 32)?;
            sigactions.push(SigAction {
                signo: sig as u32,
                handler: le_u64(&b, 0),
                flags: le_u64(&b, 8),
                restorer: le_u64(&b, 16),
                mask: le_u64(&b, 24),
            });
        }
        inj.call("sigaltstack", libc::SYS_sigaltstack, [0, scratch, 0, 0, 0, 0])?;
        let b = inj.read(scratch, 24)?;
        let altstack = AltStack {
            sp: le_u64(&b, 0),
            flags: (le_u64(&b, 8) as u32 as i32) & !libc::SS_ONSTACK,
            size: le_u64(&b, 16),
        };
        inj.call("prctl(PR_GET_TID_ADDRESS)", libc::SYS_prctl, [libc::PR_GET_TID_ADDRESS as u64, scratch, 0, 0, 0, 0])?;
        let clear_child_tid = inj.read_u64(scratch)?;
        let mut itimers = Vec::new();
        for which in 0..3u64 {
            inj.call("getitimer", libc::SYS_getitimer, [which, scratch, 0, 0, 0, 0])?;
            let b = inj.read(scratch, 32)?;
            let interval_usec = le_u64(&b, 0) * 1_000_000 + le_u64(&b, 8);
            let value_usec = le_u64(&b, 16) * 1_000_000 + le_u64(&b, 24);
            if value_usec != 0 {
                itimers.push(ITimer { which: which as i32, interval_usec, value_usec });
            }
        }
        inj.call("uname", libc::SYS_uname, [scratch, 0, 0, 0, 0, 0])?;
        let u = inj.read(scratch, 65 * 6)?;
        let hostname = cstr_at(&u[65..130]);
        let release = cstr_at(&u[130..195]);
        let personality = inj.call("personality", libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0])? as u32;
        Ok(Queried { brk, sigactions, altstack, clear_child_tid, itimers, hostname, release, personality })
    })();
    let un = inj.call("munmap(scratch)", libc::SYS_munmap, [scratch, SCRATCH, 0, 0, 0, 0]);
    let q = r?;
    un?;
    Ok(q)
}

fn dump_fds(pid: i32) -> Result<Vec<FdEntry>> {
    let mut out = Vec::new();
    for fd in procfs::fds(pid)? {
        let link = procfs::read_link(pid, &format!("fd/{fd}"))?;
        let info = procfs::fdinfo(pid, fd)?;
        let kind;
        let mut file = None;
        if let Some(ino) = link.strip_prefix("pipe:[").and_then(|s| s.strip_suffix(']')) {
            let ino = ino.parse().map_err(|_| DumpError::Unsupported { pid, what: format!("fd {fd}: odd pipe link {link}") })?;
            kind = FdKind::Pipe { ino };
        } else if link.starts_with('/') {
            if link.ends_with(" (deleted)") {
                return Err(DumpError::Unsupported { pid, what: format!("fd {fd} refers to deleted file {link}") });
            }
            let meta = std::fs::metadata(format!("/proc/{pid}/fd/{fd}"))
                .map_err(|source| DumpError::Unsupported { pid, what: format!("fd {fd} ({link}) cannot be inspected: {source}") })?;
            if meta.file_type().is_file() || meta.file_type().is_dir() {
                kind = FdKind::Regular;
                if meta.file_type().is_file() {
                    file = Some(file_id(&meta));
                }
            } else if ALLOWED_CHARDEVS.contains(&link.as_str()) {
                kind = FdKind::CharDev;
            } else {
                return Err(DumpError::Unsupported { pid, what: format!("fd {fd} is {link}, a kind of file that cannot migrate") });
            }
        } else {
            return Err(DumpError::Unsupported { pid, what: format!("fd {fd} is {link}, a kind of file that cannot migrate") });
        }
        out.push(FdEntry { fd, kind, path: link, pos: info.pos, flags: info.flags, file });
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

/// Copy the pages that a fresh mapping would not reproduce into the pages file.
fn dump_pages(pid: i32, mem: &File, vmas: &[Vma], pf: &mut File, path: &Path) -> Result<(Vec<PageRun>, u64)> {
    let pm = procfs::open_pagemap(pid)?;
    let mut runs: Vec<PageRun> = Vec::new();
    let mut written: u64 = 0;
    let mut ents = Vec::new();
    const CHUNK_PAGES: u64 = 4096; // 16 MiB of address space per pagemap read
    let mut buf = vec![0u8; (CHUNK_PAGES * PAGE) as usize];
    for v in vmas {
        let anon = match v.kind {
            VmaKind::AnonPrivate | VmaKind::AnonShared => true,
            VmaKind::FilePrivate => false,
            _ => continue,
        };
        let first_run_of_vma = runs.len();
        let mut a = v.start;
        while a < v.end {
            let e = (a + CHUNK_PAGES * PAGE).min(v.end);
            procfs::read_pagemap(pid, &pm, a, e, &mut ents)?;
            // Contiguous candidate spans inside this chunk.
            let mut i = 0usize;
            while i < ents.len() {
                let want = |x: u64| {
                    let present = x & (procfs::PM_PRESENT | procfs::PM_SWAPPED) != 0;
                    present && (anon || x & procfs::PM_SWAPPED != 0 || x & procfs::PM_FILE_OR_SHARED == 0)
                };
                if !want(ents[i]) {
                    i += 1;
                    continue;
                }
                let s = i;
                while i < ents.len() && want(ents[i]) {
                    i += 1;
                }
                let span_addr = a + s as u64 * PAGE;
                let span_len = ((i - s) as u64 * PAGE) as usize;
                let data = &mut buf[..span_len];
                mem.read_exact_at(data, span_addr).map_err(|source| DumpError::ReadMem { pid, addr: span_addr, source })?;
                for (k, page) in data.chunks_exact(PAGE as usize).enumerate() {
                    if anon && page.iter().all(|b| *b == 0) {
                        continue;
                    }
                    let va = span_addr + k as u64 * PAGE;
                    let off = PAGES_DATA_OFFSET + written * PAGE;
                    pf.write_all(page).map_err(|source| DumpError::Write { path: path.to_path_buf(), source })?;
                    written += 1;
                    // Runs never cross a VMA boundary (restore and lazy paging rely on it).
                    let n = runs.len();
                    if n > first_run_of_vma
                        && runs[n - 1].vaddr + runs[n - 1].npages * PAGE == va
                        && runs[n - 1].offset + runs[n - 1].npages * PAGE == off
                    {
                        runs[n - 1].npages += 1;
                    } else {
                        runs.push(PageRun { vaddr: va, npages: 1, offset: off });
                    }
                }
            }
            a = e;
        }
    }
    Ok((runs, written))
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
        let (n, _) = normalize_restart(&r);
        assert_eq!((n.rax, n.rip, n.orig_rax), (libc::SYS_read as u64, 0x1000, u64::MAX));

        r.orig_rax = libc::SYS_clock_nanosleep as u64;
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.rsi = 0;
        r.rdx = 0x5000;
        r.r10 = 0x6000;
        let (n, _) = normalize_restart(&r);
        assert_eq!((n.rax, n.rip, n.rdx), (libc::SYS_clock_nanosleep as u64, 0x1000, 0x6000));

        r.r10 = 0;
        let (n, _) = normalize_restart(&r);
        assert_eq!((n.rax as i64, n.rip), (-(libc::EINTR as i64), 0x1002));

        r.orig_rax = u64::MAX;
        r.rax = 7;
        let (n, _) = normalize_restart(&r);
        assert_eq!((n.rax, n.rip), (7, 0x1002));
    }
}
