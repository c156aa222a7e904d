//! The narrow system-call layer of procmig: every raw `ptrace`, `clone`/`clone3`,
//! `waitpid`, `prlimit`, `get_robust_list` and the post-fork child bodies live here, each
//! `unsafe` block with the invariant it relies on. Everything above this module (dump,
//! restore, injection, sandbox) is safe Rust over these wrappers.
//!
//! Ptrace is bound to the tracing *thread*: every wrapper that takes a traced pid must be
//! called from the thread that seized it.

use std::io;

/// x86_64 `struct user_regs_struct`, as PTRACE_GETREGS/SETREGS see it.
pub type Regs = libc::user_regs_struct;

/// Number of u64 words in [`Regs`] (27 on x86_64).
pub const REGS_WORDS: usize = std::mem::size_of::<Regs>() / 8;

const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
const NT_X86_XSTATE: libc::c_int = 0x202;
/// Upper bound for the XSAVE area we accept (AMX tiles make it ~11 KiB).
pub const XSTATE_MAX: usize = 64 * 1024;

/// Errors of a raw system call: which call, on which pid, and the errno.
#[derive(Debug, thiserror::Error)]
pub enum SysError {
    #[error("{op} on pid {pid} failed: {source}")]
    Call {
        op: &'static str,
        pid: i32,
        #[source]
        source: io::Error,
    },
}

impl SysError {
    fn last(op: &'static str, pid: i32) -> Self {
        SysError::Call { op, pid, source: io::Error::last_os_error() }
    }

    /// The errno behind this error, if any.
    pub fn errno(&self) -> Option<i32> {
        match self {
            SysError::Call { source, .. } => source.raw_os_error(),
        }
    }
}

type Result<T> = std::result::Result<T, SysError>;

fn check(op: &'static str, pid: i32, ret: libc::c_long) -> Result<libc::c_long> {
    if ret < 0 {
        Err(SysError::last(op, pid))
    } else {
        Ok(ret)
    }
}

/// PTRACE_SEIZE with the given options (no stop is caused).
pub fn seize(pid: i32, options: libc::c_int) -> Result<()> {
    // SAFETY: PTRACE_SEIZE takes no pointers; addr is ignored and data carries the options.
    let r = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0usize, options as libc::c_ulong) };
    check("ptrace(PTRACE_SEIZE)", pid, r).map(|_| ())
}

/// PTRACE_INTERRUPT: ask a seized tracee to enter a group-stop-like trap.
pub fn interrupt(pid: i32) -> Result<()> {
    // SAFETY: no pointers are passed.
    let r = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, pid, 0usize, 0usize) };
    check("ptrace(PTRACE_INTERRUPT)", pid, r).map(|_| ())
}

/// PTRACE_SYSCALL: run until the next syscall entry/exit stop, delivering `sig`.
pub fn cont_syscall(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: no pointers are passed; data is a signal number.
    let r = unsafe { libc::ptrace(libc::PTRACE_SYSCALL, pid, 0usize, sig as libc::c_ulong) };
    check("ptrace(PTRACE_SYSCALL)", pid, r).map(|_| ())
}

/// PTRACE_CONT delivering `sig`.
pub fn cont(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: no pointers are passed; data is a signal number.
    let r = unsafe { libc::ptrace(libc::PTRACE_CONT, pid, 0usize, sig as libc::c_ulong) };
    check("ptrace(PTRACE_CONT)", pid, r).map(|_| ())
}

/// PTRACE_DETACH delivering `sig`.
pub fn detach(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: no pointers are passed; data is a signal number.
    let r = unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0usize, sig as libc::c_ulong) };
    check("ptrace(PTRACE_DETACH)", pid, r).map(|_| ())
}

/// PTRACE_GETREGS.
pub fn get_regs(pid: i32) -> Result<Regs> {
    // SAFETY: user_regs_struct is plain old data; all-zero is a valid value.
    let mut regs: Regs = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes exactly one user_regs_struct into `regs`, which lives for the call.
    let r = unsafe { libc::ptrace(libc::PTRACE_GETREGS, pid, 0usize, &mut regs as *mut Regs) };
    check("ptrace(PTRACE_GETREGS)", pid, r)?;
    Ok(regs)
}

/// PTRACE_SETREGS.
pub fn set_regs(pid: i32, regs: &Regs) -> Result<()> {
    // SAFETY: the kernel only reads one user_regs_struct from `regs`, valid for the call.
    let r = unsafe { libc::ptrace(libc::PTRACE_SETREGS, pid, 0usize, regs as *const Regs) };
    check("ptrace(PTRACE_SETREGS)", pid, r).map(|_| ())
}

/// PTRACE_GETREGSET NT_X86_XSTATE: the XSAVE area (FPU, SSE, AVX...).
pub fn get_xstate(pid: i32) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; XSTATE_MAX];
    let mut iov = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    // SAFETY: iov describes `buf`, which is writable for iov_len bytes and outlives the call;
    // the kernel shrinks iov_len to what it wrote.
    let r = unsafe {
        libc::ptrace(libc::PTRACE_GETREGSET, pid, NT_X86_XSTATE as usize, &mut iov as *mut libc::iovec)
    };
    check("ptrace(PTRACE_GETREGSET, NT_X86_XSTATE)", pid, r)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// PTRACE_SETREGSET NT_X86_XSTATE.
pub fn set_xstate(pid: i32, xstate: &[u8]) -> Result<()> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec { iov_base: copy.as_mut_ptr().cast(), iov_len: copy.len() };
    // SAFETY: iov describes `copy`, readable for iov_len bytes for the duration of the call.
    let r = unsafe {
        libc::ptrace(libc::PTRACE_SETREGSET, pid, NT_X86_XSTATE as usize, &mut iov as *mut libc::iovec)
    };
    check("ptrace(PTRACE_SETREGSET, NT_X86_XSTATE)", pid, r).map(|_| ())
}

/// rseq registration of a task (PTRACE_GET_RSEQ_CONFIGURATION).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RseqConfig {
    pub abi_pointer: u64,
    pub abi_size: u32,
    pub signature: u32,
    pub flags: u32,
    pub pad: u32,
}

/// PTRACE_GET_RSEQ_CONFIGURATION.
pub fn get_rseq(pid: i32) -> Result<RseqConfig> {
    let mut cfg = RseqConfig::default();
    // SAFETY: addr is the size of the buffer and data points to a repr(C) struct of exactly
    // that layout, valid for the call.
    let r = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            pid,
            std::mem::size_of::<RseqConfig>(),
            &mut cfg as *mut RseqConfig,
        )
    };
    check("ptrace(PTRACE_GET_RSEQ_CONFIGURATION)", pid, r)?;
    Ok(cfg)
}

/// get_robust_list(pid): (head, len).
pub fn get_robust_list(pid: i32) -> Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out-pointers refer to live locals of the right size.
    let r = unsafe {
        libc::syscall(libc::SYS_get_robust_list, pid, &mut head as *mut u64, &mut len as *mut usize)
    };
    check("get_robust_list", pid, r)?;
    Ok((head, len as u64))
}

/// prlimit(pid, res, new, old) with an optional new value; returns the old value.
pub fn prlimit(pid: i32, res: u32, new: Option<(u64, u64)>) -> Result<(u64, u64)> {
    let newl = new.map(|(c, m)| libc::rlimit64 { rlim_cur: c, rlim_max: m });
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    let newp = newl.as_ref().map_or(std::ptr::null(), |n| n as *const libc::rlimit64);
    // SAFETY: `newp` is null or points to a live rlimit64; `old` is a live out-parameter.
    let r = unsafe { libc::prlimit64(pid, res as _, newp, &mut old) };
    check("prlimit", pid, r as libc::c_long)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// What `waitpid` reported for a traced pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Stopped with WSTOPSIG = sig and ptrace event = event (status >> 16).
    Stopped { sig: i32, event: i32 },
    Exited(i32),
    Signaled(i32),
}

/// waitpid(pid, __WALL) decoded.
pub fn wait(pid: i32) -> Result<Wait> {
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a live out-parameter.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Err(SysError::Call { op: "waitpid", pid, source: e });
        }
        break;
    }
    Ok(if libc::WIFSTOPPED(status) {
        Wait::Stopped { sig: libc::WSTOPSIG(status), event: (status >> 16) & 0xff }
    } else if libc::WIFSIGNALED(status) {
        Wait::Signaled(libc::WTERMSIG(status))
    } else {
        Wait::Exited(libc::WEXITSTATUS(status))
    })
}

/// Non-blocking waitpid(pid, WNOHANG): Some(exit-like status) if the child is gone.
pub fn try_reap(pid: i32) -> Option<Wait> {
    let mut status: libc::c_int = 0;
    // SAFETY: `status` is a live out-parameter.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG | libc::__WALL) };
    if r <= 0 {
        return None;
    }
    if libc::WIFSIGNALED(status) {
        Some(Wait::Signaled(libc::WTERMSIG(status)))
    } else if libc::WIFEXITED(status) {
        Some(Wait::Exited(libc::WEXITSTATUS(status)))
    } else {
        None
    }
}

/// kill(pid, sig).
pub fn kill(pid: i32, sig: i32) -> Result<()> {
    // SAFETY: kill takes no pointers.
    let r = unsafe { libc::kill(pid, sig) };
    check("kill", pid, r as libc::c_long).map(|_| ())
}

/// fork-like raw clone with extra namespace flags (e.g. CLONE_NEWPID | CLONE_NEWUTS).
/// Returns 0 in the child, the child's pid in the parent.
///
/// The child of a (possibly multithreaded) Rust process may only use async-signal-safe
/// calls: callers run the `child_*` bodies of this module, which never allocate.
pub fn fork_with_flags(flags: i32) -> Result<i32> {
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork: the child gets a
    // copy-on-write copy of this thread's stack and continues from here.
    let r = unsafe {
        libc::syscall(libc::SYS_clone, (flags | libc::SIGCHLD) as libc::c_ulong, 0usize, 0usize, 0usize, 0usize)
    };
    check("clone", 0, r).map(|p| p as i32)
}

#[repr(C)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// clone3 acting as fork, asking for pid `tid` in the caller's pid namespace for children
/// (set_tid). Returns 0 in the child. The same child restrictions as [`fork_with_flags`].
pub fn fork_with_tid(tid: i32) -> Result<i32> {
    let tids: [libc::pid_t; 1] = [tid];
    let args = CloneArgs {
        flags: 0,
        pidfd: 0,
        child_tid: 0,
        parent_tid: 0,
        exit_signal: libc::SIGCHLD as u64,
        stack: 0,
        stack_size: 0,
        tls: 0,
        set_tid: tids.as_ptr() as u64,
        set_tid_size: 1,
        cgroup: 0,
    };
    // SAFETY: `args` and `tids` are live for the call; without CLONE_VM and with a null
    // stack, clone3 behaves like fork (copy-on-write copy of this stack).
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    check("clone3(set_tid)", tid, r).map(|p| p as i32)
}

/// Child body for restore: map an RWX trampoline at exactly `addr` (`len` bytes), copy
/// `code` to its start, report readiness by writing one byte (0 = ok, 1 = mapping failed)
/// to `sync_fd`, then wait in pause() for the restorer to seize it. Never returns.
pub fn child_trampoline_then_pause(addr: u64, len: usize, code: &[u8], sync_fd: i32) -> ! {
    // SAFETY: only async-signal-safe raw calls; MAP_FIXED_NOREPLACE never clobbers an
    // existing mapping, and the copy targets the fresh mapping of `len` >= code.len() bytes.
    unsafe {
        let p = libc::mmap(
            addr as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
            -1,
            0,
        );
        let status: u8 = if p as u64 == addr && code.len() <= len {
            std::ptr::copy_nonoverlapping(code.as_ptr(), p as *mut u8, code.len());
            0
        } else {
            1
        };
        libc::write(sync_fd, &status as *const u8 as *const libc::c_void, 1);
        if status != 0 {
            libc::_exit(121);
        }
        loop {
            libc::pause();
        }
    }
}

/// Child body of a sandbox init (pid 1 of a pid namespace): reap every child; when `main`
/// exits, exit with its status (128+sig if killed). Never returns.
pub fn child_init_reap(main: i32) -> ! {
    // SAFETY: only async-signal-safe raw calls on live locals. Closing every descriptor is
    // sound here: this init never touches a descriptor again, and it must not keep pipe
    // ends or files of the process that forked it alive.
    unsafe {
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        loop {
            let mut status: libc::c_int = 0;
            let r = libc::waitpid(-1, &mut status, 0);
            if r < 0 {
                if *libc::__errno_location() == libc::EINTR {
                    continue;
                }
                libc::_exit(0);
            }
            if r == main {
                if libc::WIFEXITED(status) {
                    libc::_exit(libc::WEXITSTATUS(status));
                }
                if libc::WIFSIGNALED(status) {
                    libc::_exit(128 + libc::WTERMSIG(status));
                }
            }
        }
    }
}

/// Child body: leave immediately with `code` (no atexit handlers, no unwinding).
pub fn child_exit(code: i32) -> ! {
    // SAFETY: _exit is async-signal-safe and never returns.
    unsafe { libc::_exit(code) }
}

/// Child body: set the hostname of the (new) uts namespace; errors are ignored because the
/// child has no way to report them other than its exit.
pub fn child_sethostname(name: &[u8]) {
    if name.is_empty() {
        return;
    }
    // SAFETY: `name` is a live byte slice of the given length.
    unsafe {
        libc::sethostname(name.as_ptr().cast(), name.len());
    }
}

/// A prepared execve(2) call: owned strings plus the NULL-terminated pointer arrays
/// into them, built before a fork so that the child does not allocate.
pub struct ExecArgs {
    path: std::ffi::CString,
    _args: Vec<std::ffi::CString>,
    _envs: Vec<std::ffi::CString>,
    argp: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
}

impl ExecArgs {
    pub fn new(path: std::ffi::CString, args: Vec<std::ffi::CString>, envs: Vec<std::ffi::CString>) -> Self {
        let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argp.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = envs.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());
        // The CStrings' heap buffers do not move when the Vecs holding them move.
        ExecArgs { path, _args: args, _envs: envs, argp, envp }
    }
}

/// Child body for `run`: redirect stdio from prepared fds (-1 = keep), reset SIGPIPE and
/// the signal mask, then execve. Never returns (exit 127 when execve fails).
pub fn child_exec(stdio: [i32; 3], exec: &ExecArgs) -> ! {
    // SAFETY: async-signal-safe calls only; every pointer comes from `exec`, whose strings
    // and NULL-terminated arrays are owned by it and alive for the call.
    unsafe {
        // The Rust runtime ignores SIGPIPE and exec keeps ignored dispositions: undo that,
        // and start with an empty signal mask.
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        for (target, fd) in stdio.iter().enumerate() {
            if *fd >= 0 {
                libc::dup2(*fd, target as i32);
            }
        }
        libc::execve(exec.path.as_ptr(), exec.argp.as_ptr(), exec.envp.as_ptr());
        libc::_exit(127);
    }
}

/// Duplicate a caller-supplied raw descriptor into an owned one (F_DUPFD_CLOEXEC).
pub fn dup_owned(raw: i32) -> Result<std::os::fd::OwnedFd> {
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) takes no pointers; an invalid `raw` gives EBADF.
    let r = unsafe { libc::fcntl(raw, libc::F_DUPFD_CLOEXEC, 0) };
    check("fcntl(F_DUPFD_CLOEXEC)", 0, r as libc::c_long)?;
    // SAFETY: `r` is a fresh descriptor owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r) })
}

/// Current time on CLOCK_MONOTONIC in nanoseconds (for durations in reports).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a live out-parameter.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Regs <-> words conversions for the image.
pub fn regs_to_words(r: &Regs) -> Vec<u64> {
    // SAFETY: user_regs_struct is repr(C) made only of c_ulong fields (27 u64 on x86_64).
    let words: &[u64; REGS_WORDS] = unsafe { &*(r as *const Regs as *const [u64; REGS_WORDS]) };
    words.to_vec()
}

/// Inverse of [`regs_to_words`]; None when the length is wrong.
pub fn regs_from_words(w: &[u64]) -> Option<Regs> {
    if w.len() != REGS_WORDS {
        return None;
    }
    let mut arr = [0u64; REGS_WORDS];
    arr.copy_from_slice(w);
    // SAFETY: same layout argument as regs_to_words; every bit pattern is a valid u64.
    Some(unsafe { std::mem::transmute::<[u64; REGS_WORDS], Regs>(arr) })
}
