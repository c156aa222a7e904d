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
        SysError::Call {
            op,
            pid,
            source: io::Error::last_os_error(),
        }
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
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: iov describes `buf`, which is writable for iov_len bytes and outlives the call;
    // the kernel shrinks iov_len to what it wrote.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETREGSET,
            pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
    };
    check("ptrace(PTRACE_GETREGSET, NT_X86_XSTATE)", pid, r)?;
    buf.truncate(iov.iov_len);
    Ok(buf)
}

/// PTRACE_SETREGSET NT_X86_XSTATE.
pub fn set_xstate(pid: i32, xstate: &[u8]) -> Result<()> {
    let mut copy = xstate.to_vec();
    let mut iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: copy.len(),
    };
    // SAFETY: iov describes `copy`, readable for iov_len bytes for the duration of the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_SETREGSET,
            pid,
            NT_X86_XSTATE as usize,
            &mut iov as *mut libc::iovec,
        )
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
        libc::syscall(
            libc::SYS_get_robust_list,
            pid,
            &mut head as *mut u64,
            &mut len as *mut usize,
        )
    };
    check("get_robust_list", pid, r)?;
    Ok((head, len as u64))
}

/// prlimit(pid, res, new, old) with an optional new value; returns the old value.
pub fn prlimit(pid: i32, res: u32, new: Option<(u64, u64)>) -> Result<(u64, u64)> {
    let newl = new.map(|(c, m)| libc::rlimit64 {
        rlim_cur: c,
        rlim_max: m,
    });
    let mut old = libc::rlimit64 {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let newp = newl
        .as_ref()
        .map_or(std::ptr::null(), |n| n as *const libc::rlimit64);
    // SAFETY: `newp` is null or points to a live rlimit64; `old` is a live out-parameter.
    let r = unsafe { libc::prlimit64(pid, res as _, newp, &mut old) };
    check("prlimit", pid, r as libc::c_long)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// What `waitpid` reported for a traced pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Stopped with WSTOPSIG = sig and ptrace event = event (status >> 16).
    Stopped {
        sig: i32,
        event: i32,
    },
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
            return Err(SysError::Call {
                op: "waitpid",
                pid,
                source: e,
            });
        }
        break;
    }
    Ok(if libc::WIFSTOPPED(status) {
        Wait::Stopped {
            sig: libc::WSTOPSIG(status),
            event: (status >> 16) & 0xff,
        }
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

/// tgkill(tgid, tid, sig).
pub fn tgkill(tgid: i32, tid: i32, sig: i32) -> Result<()> {
    // SAFETY: tgkill takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) };
    check("tgkill", tid, r).map(|_| ())
}

/// PTRACE_GETEVENTMSG (e.g. the new tid at a PTRACE_EVENT_CLONE stop).
pub fn get_event_msg(pid: i32) -> Result<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: the kernel writes one unsigned long into `msg`, live for the call.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_GETEVENTMSG,
            pid,
            0usize,
            &mut msg as *mut libc::c_ulong,
        )
    };
    check("ptrace(PTRACE_GETEVENTMSG)", pid, r)?;
    Ok(msg as u64)
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
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
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
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
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

/// Position-independent x86_64 code of the sandbox init, entered as
/// `extern "C" fn(main_pid, page_base, page_len) -> !`: it unmaps every user mapping but
/// its own page (so the init keeps no copy-on-write copy of the process that forked it),
/// then loops on wait4(-1, page_base + 0x800, 0, NULL) and exit_group()s with the status
/// of `main_pid` (exit code, or 128 + signal), or 0 when it has no children left.
/// Source (GNU as, Intel syntax) in the comment of [`child_become_reaper`].
const REAPER_CODE: [u8; 132] = [
    0x49, 0x89, 0xfc, 0x49, 0x89, 0xf5, 0x49, 0x89, 0xd6, 0x31, 0xff, 0x4c, 0x89, 0xee, 0xb8, 0x0b,
    0x00, 0x00, 0x00, 0x0f, 0x05, 0x4b, 0x8d, 0x7c, 0x35, 0x00, 0x48, 0xbe, 0x00, 0xf0, 0xff, 0xff,
    0xff, 0x7f, 0x00, 0x00, 0x48, 0x29, 0xfe, 0xb8, 0x0b, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0xc7,
    0xc7, 0xff, 0xff, 0xff, 0xff, 0x49, 0x8d, 0xb5, 0x00, 0x08, 0x00, 0x00, 0x31, 0xd2, 0x45, 0x31,
    0xd2, 0xb8, 0x3d, 0x00, 0x00, 0x00, 0x0f, 0x05, 0x48, 0x83, 0xf8, 0xfc, 0x74, 0xe0, 0x48, 0x85,
    0xc0, 0x78, 0x27, 0x4c, 0x39, 0xe0, 0x75, 0xd6, 0x41, 0x8b, 0xbd, 0x00, 0x08, 0x00, 0x00, 0x89,
    0xf8, 0x83, 0xe0, 0x7f, 0x74, 0x09, 0x05, 0x80, 0x00, 0x00, 0x00, 0x89, 0xc7, 0xeb, 0x0d, 0xc1,
    0xef, 0x08, 0x81, 0xe7, 0xff, 0x00, 0x00, 0x00, 0xeb, 0x02, 0x31, 0xff, 0xb8, 0xe7, 0x00, 0x00,
    0x00, 0x0f, 0x05, 0xf4,
];

/// Child body of a sandbox init (pid 1 of a pid namespace), light version: reset signal
/// dispositions and mask, close every descriptor, then jump into `REAPER_CODE` in a
/// fresh page, which drops all other memory and reaps. Never returns. Falls back to
/// [`child_init_reap`] if the page cannot be mapped.
///
/// ```text
///   mov r12, rdi ; mov r13, rsi ; mov r14, rdx
///   xor edi, edi ; mov rsi, r13 ; mov eax, 11 ; syscall            # munmap(0, base)
///   lea rdi, [r13+r14] ; movabs rsi, 0x7ffffffff000 ; sub rsi, rdi
///   mov eax, 11 ; syscall                                          # munmap(end, top-end)
/// top:
///   mov rdi, -1 ; lea rsi, [r13+0x800] ; xor edx, edx ; xor r10d, r10d
///   mov eax, 61 ; syscall                                          # wait4(-1, &st, 0, 0)
///   cmp rax, -4 ; je top ; test rax, rax ; js done0 ; cmp rax, r12 ; jne top
///   mov edi, [r13+0x800] ; mov eax, edi ; and eax, 0x7f ; jz exited
///   add eax, 128 ; mov edi, eax ; jmp out
/// exited: shr edi, 8 ; and edi, 0xff ; jmp out
/// done0:  xor edi, edi
/// out:    mov eax, 231 ; syscall ; hlt                             # exit_group(code)
/// ```
pub fn child_become_reaper(main: i32, rseq: Option<GlibcRseq>) -> ! {
    // The kernel writes into the rseq area on return to user space; that area is about to
    // be unmapped, so the registration must go first (or the init would die of SIGSEGV).
    if !child_unregister_rseq(rseq) {
        child_init_reap(main);
    }
    // SAFETY: async-signal-safe raw calls only. The code page is freshly mapped RWX and
    // holds exactly REAPER_CODE, whose only memory accesses are to that page; it never
    // returns, so no Rust state is used after the jump. Signal handlers are reset first so
    // that no handler address into the unmapped memory can be invoked.
    unsafe {
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        libc::prctl(libc::PR_SET_NAME, c"wisp-init".as_ptr());
        let len = 4096usize;
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            child_init_reap(main);
        }
        std::ptr::copy_nonoverlapping(REAPER_CODE.as_ptr(), p as *mut u8, REAPER_CODE.len());
        libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
        let entry: extern "C" fn(u64, u64, u64) -> ! =
            std::mem::transmute::<*mut libc::c_void, extern "C" fn(u64, u64, u64) -> !>(p);
        entry(main as u64, p as u64, len as u64)
    }
}

/// Where glibc keeps the calling thread's rseq area: (`__rseq_offset` from the thread
/// pointer, `__rseq_size`). Resolved before a fork with dlsym, which is not
/// async-signal-safe.
#[derive(Debug, Clone, Copy)]
pub struct GlibcRseq {
    offset: isize,
    size: u32,
}

/// Look up glibc's rseq symbols (None on a libc without them).
pub fn glibc_rseq() -> Option<GlibcRseq> {
    // SAFETY: dlsym with RTLD_DEFAULT and NUL-terminated names; the results are checked for
    // null before they are read as the types glibc documents for these symbols.
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr());
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr());
        if off.is_null() || size.is_null() {
            return None;
        }
        Some(GlibcRseq {
            offset: *(off as *const isize),
            size: *(size as *const u32),
        })
    }
}

/// Child body: unregister the thread's rseq area. True when nothing is registered any
/// more (or nothing was).
fn child_unregister_rseq(rseq: Option<GlibcRseq>) -> bool {
    const RSEQ_SIG: u32 = 0x5305_3053;
    let Some(r) = rseq else { return false };
    if r.size == 0 {
        return true; // glibc did not register
    }
    let tp: u64;
    // SAFETY: on x86_64 glibc, %fs:0 holds the thread pointer (TCB self pointer).
    unsafe {
        std::arch::asm!("mov {}, fs:0", out(reg) tp, options(nostack, readonly, preserves_flags))
    };
    let area = tp.wrapping_add(r.offset as u64);
    for len in [32u32, r.size] {
        // SAFETY: rseq(UNREGISTER) only compares the arguments with the registration.
        let ret = unsafe { libc::syscall(libc::SYS_rseq, area, len, 1u32, RSEQ_SIG) };
        if ret == 0 {
            return true;
        }
    }
    false
}

/// Child body: join the cgroups whose `cgroup.procs` files the parent opened for writing
/// (writing "0" moves the writer), then close them. Called before the child forks, so
/// everything it starts is born inside those cgroups. Errors are ignored: the parent
/// checks `/proc/<pid>/cgroup` afterwards.
pub fn child_join_cgroups(procs: &[i32]) {
    for fd in procs {
        // SAFETY: write(2) and close(2) on descriptors the parent opened; async-signal-safe.
        unsafe {
            libc::write(*fd, b"0".as_ptr() as *const libc::c_void, 1);
            libc::close(*fd);
        }
    }
}

/// Child body, pid 1 of a new pid namespace in a new mount namespace: stop mounts made
/// here from propagating out (slave), and mount a procfs of this pid namespace on /proc,
/// so the job sees (and can name) only its own processes. Errors are ignored: the job
/// then sees the host's /proc, as before (the sandbox test checks it).
pub fn child_private_proc() {
    let (root, dir, fs) = (b"/\0", b"/proc\0", b"proc\0");
    // SAFETY: mount(2) with NUL-terminated static strings and null data; async-signal-safe.
    unsafe {
        if libc::mount(
            std::ptr::null(),
            root.as_ptr() as *const libc::c_char,
            std::ptr::null(),
            libc::MS_REC | libc::MS_SLAVE,
            std::ptr::null(),
        ) == 0
        {
            libc::mount(
                fs.as_ptr() as *const libc::c_char,
                dir.as_ptr() as *const libc::c_char,
                fs.as_ptr() as *const libc::c_char,
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                std::ptr::null(),
            );
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
    pub fn new(
        path: std::ffi::CString,
        args: Vec<std::ffi::CString>,
        envs: Vec<std::ffi::CString>,
    ) -> Self {
        let mut argp: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        argp.push(std::ptr::null());
        let mut envp: Vec<*const libc::c_char> = envs.iter().map(|a| a.as_ptr()).collect();
        envp.push(std::ptr::null());
        // The CStrings' heap buffers do not move when the Vecs holding them move.
        ExecArgs {
            path,
            _args: args,
            _envs: envs,
            argp,
            envp,
        }
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

/// pidfd_open(pid) + pidfd_getfd(fd): take a copy of another process's descriptor.
pub fn steal_fd(pid: i32, fd: i32) -> Result<std::os::fd::OwnedFd> {
    // SAFETY: pidfd_open takes no pointers.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0u32) };
    check("pidfd_open", pid, pidfd)?;
    // SAFETY: `pidfd` is the descriptor just returned; pidfd_getfd takes no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd as i32, fd, 0u32) };
    let err = (r < 0).then(|| SysError::last("pidfd_getfd", pid));
    // SAFETY: closing the pidfd we own and no longer need.
    unsafe { libc::close(pidfd as i32) };
    if let Some(e) = err {
        return Err(e);
    }
    // SAFETY: `r` is a fresh descriptor owned by nobody else.
    Ok(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(r as i32) })
}

/// userfaultfd ioctl numbers and structures (linux/userfaultfd.h).
pub mod uffd {
    pub const API: u64 = 0xAA;
    pub const IOC_API: u64 = 0xC018_AA3F;
    pub const IOC_REGISTER: u64 = 0xC020_AA00;
    pub const IOC_WAKE: u64 = 0x8010_AA02;
    pub const IOC_COPY: u64 = 0xC028_AA03;
    pub const IOC_ZEROPAGE: u64 = 0xC020_AA04;
    pub const REGISTER_MODE_MISSING: u64 = 1;
    pub const REGISTER_MODE_WP: u64 = 2;
    pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
    pub const FEATURE_WP_ASYNC: u64 = 1 << 15;
    pub const FEATURE_EVENT_FORK: u64 = 1 << 1;
    pub const FEATURE_EVENT_REMAP: u64 = 1 << 2;
    pub const FEATURE_EVENT_REMOVE: u64 = 1 << 3;
    pub const FEATURE_EVENT_UNMAP: u64 = 1 << 6;
    pub const EVENT_PAGEFAULT: u8 = 0x12;
    pub const EVENT_FORK: u8 = 0x13;
    pub const EVENT_REMAP: u8 = 0x14;
    pub const EVENT_REMOVE: u8 = 0x15;
    pub const EVENT_UNMAP: u8 = 0x16;
    /// Size of struct uffd_msg.
    pub const MSG_LEN: usize = 32;
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZero {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// UFFDIO_COPY of `src` to `dst` in the userfaultfd's mm. Returns Ok(bytes copied) or
/// Err((errno, bytes copied before the error)).
pub fn uffd_copy(uffd: i32, dst: u64, src: &[u8]) -> std::result::Result<u64, (i32, u64)> {
    let mut c = UffdioCopy {
        dst,
        src: src.as_ptr() as u64,
        len: src.len() as u64,
        mode: 0,
        copy: 0,
    };
    // SAFETY: `c` is a live repr(C) uffdio_copy; the kernel reads `src.len()` bytes from
    // `src`, which is borrowed for the call, and writes only `c.copy`.
    let r = unsafe { libc::ioctl(uffd, uffd::IOC_COPY as _, &mut c as *mut UffdioCopy) };
    if r < 0 {
        let e = io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        return Err((e, c.copy.max(0) as u64));
    }
    Ok(c.copy as u64)
}

/// UFFDIO_ZEROPAGE of one range. Err(errno) on failure.
pub fn uffd_zeropage(uffd: i32, start: u64, len: u64) -> std::result::Result<(), i32> {
    let mut z = UffdioZero {
        start,
        len,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `z` is a live repr(C) uffdio_zeropage for the call.
    let r = unsafe { libc::ioctl(uffd, uffd::IOC_ZEROPAGE as _, &mut z as *mut UffdioZero) };
    if r < 0 {
        return Err(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO));
    }
    Ok(())
}

/// UFFDIO_UNREGISTER of one range (errors ignored: best effort on teardown).
pub fn uffd_unregister(uffd: i32, start: u64, len: u64) -> bool {
    const IOC_UNREGISTER: u64 = 0x8010_AA01;
    let range: [u64; 2] = [start, len];
    // SAFETY: `range` is a live struct uffdio_range (two u64) for the call.
    unsafe { libc::ioctl(uffd, IOC_UNREGISTER as _, range.as_ptr()) == 0 }
}

/// UFFDIO_WAKE of one range.
pub fn uffd_wake(uffd: i32, start: u64, len: u64) {
    let range: [u64; 2] = [start, len];
    // SAFETY: `range` is a live struct uffdio_range (two u64) for the call.
    unsafe { libc::ioctl(uffd, uffd::IOC_WAKE as _, range.as_ptr()) };
}

/// poll(fd, POLLIN, timeout_ms): true when readable.
pub fn poll_in(fd: i32, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// PAGEMAP_SCAN ioctl on a `/proc/<pid>/pagemap` descriptor: the page ranges of
/// [start, end) that were written since they were last write-protected (uffd-wp async
/// VMAs only; others are skipped), write-protecting them again when `wp` is set.
pub fn pagemap_scan(
    pid: i32,
    pagemap: i32,
    start: u64,
    end: u64,
    wp: bool,
) -> Result<Vec<(u64, u64)>> {
    const PM_SCAN_WP_MATCHING: u64 = 1;
    const PAGE_IS_WRITTEN: u64 = 1 << 1;
    let flags = if wp { PM_SCAN_WP_MATCHING } else { 0 };
    pagemap_scan_raw(
        pid,
        pagemap,
        start,
        end,
        flags,
        PAGE_IS_WRITTEN,
        0,
        PAGE_IS_WRITTEN,
    )
}

/// PAGEMAP_SCAN for the ranges of [start, end) holding present or swapped pages: lets a
/// dump skip the empty parts of huge sparse mappings without reading their pagemap.
pub fn pagemap_scan_present(
    pid: i32,
    pagemap: i32,
    start: u64,
    end: u64,
) -> Result<Vec<(u64, u64)>> {
    const PAGE_IS_PRESENT: u64 = 1 << 3;
    const PAGE_IS_SWAPPED: u64 = 1 << 4;
    let any = PAGE_IS_PRESENT | PAGE_IS_SWAPPED;
    pagemap_scan_raw(pid, pagemap, start, end, 0, 0, any, any)
}

#[allow(clippy::too_many_arguments)] // the fields of struct pm_scan_arg
fn pagemap_scan_raw(
    pid: i32,
    pagemap: i32,
    start: u64,
    end: u64,
    flags: u64,
    category_mask: u64,
    anyof_mask: u64,
    return_mask: u64,
) -> Result<Vec<(u64, u64)>> {
    const PAGEMAP_SCAN: u64 = 0xC060_6610;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut regions = vec![[0u64; 3]; 512];
    let mut at = start;
    while at < end {
        let mut arg: [u64; 12] = [
            96,
            flags,
            at,
            end,
            0,
            regions.as_mut_ptr() as u64,
            regions.len() as u64,
            0,
            0,
            category_mask,
            anyof_mask,
            return_mask,
        ];
        // SAFETY: `arg` is a live struct pm_scan_arg (12 u64); `vec` points to `regions`, a
        // live buffer of vec_len struct page_region (3 u64 each) the kernel fills.
        let r = unsafe { libc::ioctl(pagemap, PAGEMAP_SCAN as _, arg.as_mut_ptr()) };
        if r < 0 {
            return Err(SysError::last("ioctl(PAGEMAP_SCAN)", pid));
        }
        for reg in &regions[..r as usize] {
            match out.last_mut() {
                Some(l) if l.1 == reg[0] => l.1 = reg[1],
                _ => out.push((reg[0], reg[1])),
            }
        }
        let walk_end = arg[4];
        if walk_end <= at {
            break;
        }
        at = walk_end;
    }
    Ok(out)
}

/// Whether this kernel tracks soft-dirty pages (CONFIG_MEM_SOFT_DIRTY): a freshly
/// written page of a new mapping must show pagemap bit 55.
pub fn probe_soft_dirty() -> bool {
    use std::os::unix::fs::FileExt;
    // SAFETY: a private anonymous page mapped, written and unmapped by this function only.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        if p == libc::MAP_FAILED {
            return false;
        }
        std::ptr::write_volatile(p as *mut u8, 1);
        let mut e = [0u8; 8];
        let ok = std::fs::File::open("/proc/self/pagemap")
            .and_then(|f| f.read_exact_at(&mut e, (p as u64 / 4096) * 8))
            .is_ok();
        libc::munmap(p, 4096);
        ok && u64::from_le_bytes(e) & (1 << 55) != 0
    }
}

/// Current time on CLOCK_MONOTONIC in nanoseconds (for durations in reports).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
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

/// kcmp(2) resource types.
pub const KCMP_FILE: i32 = 0;
pub const KCMP_VM: i32 = 1;

/// kcmp(pid1, pid2, type, idx1, idx2): Ok(true) when both refer to the same kernel object
/// (for [`KCMP_FILE`]: the same open file description).
pub fn kcmp_same(pid1: i32, pid2: i32, kind: i32, idx1: u64, idx2: u64) -> Result<bool> {
    // SAFETY: kcmp takes no pointers for these types.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, kind, idx1, idx2) };
    check("kcmp", pid1, r).map(|v| v == 0)
}

/// pipe2(O_CLOEXEC | flags): (read end, write end).
pub fn pipe2(flags: i32) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    let mut fds = [-1i32; 2];
    // SAFETY: `fds` is a live array of two ints.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC | flags) };
    check("pipe2", 0, r as libc::c_long)?;
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe {
        use std::os::fd::FromRawFd;
        Ok((
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        ))
    }
}

/// F_GETPIPE_SZ.
pub fn pipe_size(fd: i32) -> Result<u32> {
    // SAFETY: fcntl(F_GETPIPE_SZ) takes no pointers.
    let r = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    check("fcntl(F_GETPIPE_SZ)", 0, r as libc::c_long).map(|v| v as u32)
}

/// F_SETPIPE_SZ; returns the capacity the kernel chose (>= `size`).
pub fn set_pipe_size(fd: i32, size: u32) -> Result<u32> {
    // SAFETY: fcntl(F_SETPIPE_SZ) takes no pointers.
    let r = unsafe { libc::fcntl(fd, libc::F_SETPIPE_SZ, size as libc::c_int) };
    check("fcntl(F_SETPIPE_SZ)", 0, r as libc::c_long).map(|v| v as u32)
}

/// FIONREAD: bytes waiting in a pipe.
pub fn bytes_unread(fd: i32) -> Result<u64> {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int into `n`, live for the call.
    let r = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
    check("ioctl(FIONREAD)", 0, r as libc::c_long).map(|_| n as u64)
}

/// tee(2) without blocking: duplicate up to `len` bytes from pipe `from` into pipe `to`
/// without consuming them. Returns the bytes duplicated.
pub fn tee_nonblock(from: i32, to: i32, len: usize) -> Result<usize> {
    // SAFETY: tee takes no pointers.
    let r = unsafe { libc::tee(from, to, len, libc::SPLICE_F_NONBLOCK) };
    check("tee", 0, r as libc::c_long).map(|v| v as usize)
}
