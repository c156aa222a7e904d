//! Syscall injection into a ptrace-stopped tracee: point its rip at a `syscall`
//! instruction, load the syscall number and arguments, run it between the syscall-entry
//! and syscall-exit stops (PTRACE_SYSCALL), read the result. Memory of the tracee is read
//! and written through `/proc/<pid>/mem` (FOLL_FORCE: protection bits do not get in the way).
//!
//! The tracee is left in a syscall-exit stop after each call. Signals that arrive for the
//! tracee while it runs an injected call are suppressed and remembered in
//! [`Injector::suppressed`], so the caller can re-send them when the process really runs.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::sys::{self, Regs, SysError, Wait};

/// Errors of an injected system call.
#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("pid {pid}: tracee {what} during injected syscall {nr}")]
    Died { pid: i32, nr: i64, what: String },
    #[error(
        "pid {pid}: unexpected stop (signal {sig}, event {event}) during injected syscall {nr}"
    )]
    UnexpectedStop {
        pid: i32,
        nr: i64,
        sig: i32,
        event: i32,
    },
    #[error("pid {pid}: injected syscall {name} failed: {source}")]
    Failed {
        pid: i32,
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("pid {pid}: memory access at {addr:#x} ({len} bytes) failed: {source}")]
    Mem {
        pid: i32,
        addr: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
}

type Result<T> = std::result::Result<T, InjectError>;

/// Injects syscalls into one stopped tracee.
pub struct Injector {
    pid: i32,
    syscall_ip: u64,
    base: Regs,
    mem: File,
    /// Signals dequeued while injecting (to re-send later).
    pub suppressed: Vec<i32>,
    /// Host tids of threads or processes created by injected clone calls
    /// (PTRACE_EVENT_CLONE, PTRACE_EVENT_FORK).
    pub cloned: Vec<i32>,
}

impl Injector {
    /// `base` supplies the registers not used by the call (segment selectors, fs_base...).
    pub fn new(pid: i32, syscall_ip: u64, base: Regs) -> Result<Self> {
        let path = format!("/proc/{pid}/mem");
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|source| InjectError::Mem {
                pid,
                addr: 0,
                len: 0,
                source,
            })?;
        Ok(Injector {
            pid,
            syscall_ip,
            base,
            mem,
            suppressed: Vec::new(),
            cloned: Vec::new(),
        })
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// Change the address of the `syscall` instruction used.
    pub fn set_syscall_ip(&mut self, ip: u64) {
        self.syscall_ip = ip;
    }

    /// Run one syscall; returns the raw kernel return value (negative errno on failure).
    pub fn raw(&mut self, nr: i64, args: [u64; 6]) -> Result<i64> {
        let mut r = self.base;
        r.rip = self.syscall_ip;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        sys::set_regs(self.pid, &r)?;
        self.step(nr)?; // entry
        self.step(nr)?; // exit
        let out = sys::get_regs(self.pid)?;
        Ok(out.rax as i64)
    }

    /// Run one syscall; a negative return becomes [`InjectError::Failed`] named `name`.
    pub fn call(&mut self, name: &'static str, nr: i64, args: [u64; 6]) -> Result<u64> {
        let r = self.raw(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(InjectError::Failed {
                pid: self.pid,
                name,
                source: std::io::Error::from_raw_os_error(-r as i32),
            });
        }
        Ok(r as u64)
    }

    fn step(&mut self, nr: i64) -> Result<()> {
        let pid = self.pid;
        loop {
            sys::cont_syscall(pid, 0)?;
            match sys::wait(pid)? {
                Wait::Stopped { sig, event: 0 } if sig == (libc::SIGTRAP | 0x80) => return Ok(()),
                Wait::Stopped { sig, event: 0 } => {
                    // Signal-delivery stop: keep the signal for later, do not deliver it now.
                    self.suppressed.push(sig);
                }
                Wait::Stopped { event, .. }
                    if event == libc::PTRACE_EVENT_CLONE || event == libc::PTRACE_EVENT_FORK =>
                {
                    self.cloned.push(sys::get_event_msg(pid)? as i32);
                }
                Wait::Stopped { event, sig } if event == libc::PTRACE_EVENT_STOP => {
                    let _ = sig; // group-stop or interrupt trap: just go on
                }
                Wait::Stopped { sig, event } => {
                    return Err(InjectError::UnexpectedStop {
                        pid,
                        nr,
                        sig,
                        event,
                    });
                }
                Wait::Exited(c) => {
                    return Err(InjectError::Died {
                        pid,
                        nr,
                        what: format!("exited with {c}"),
                    })
                }
                Wait::Signaled(s) => {
                    return Err(InjectError::Died {
                        pid,
                        nr,
                        what: format!("was killed by signal {s}"),
                    })
                }
            }
        }
    }

    /// Write bytes into the tracee.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.mem
            .write_all_at(data, addr)
            .map_err(|source| InjectError::Mem {
                pid: self.pid,
                addr,
                len: data.len(),
                source,
            })
    }

    /// Read bytes from the tracee.
    pub fn read(&self, addr: u64, len: usize) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        self.mem
            .read_exact_at(&mut buf, addr)
            .map_err(|source| InjectError::Mem {
                pid: self.pid,
                addr,
                len,
                source,
            })?;
        Ok(buf)
    }

    /// Read a little-endian u64 from the tracee.
    pub fn read_u64(&self, addr: u64) -> Result<u64> {
        let b = self.read(addr, 8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(&b);
        Ok(u64::from_le_bytes(a))
    }

    /// The `/proc/<pid>/mem` handle (for bulk page transfer).
    pub fn mem(&self) -> &File {
        &self.mem
    }
}

/// Find a `syscall` instruction (0f 05) inside the tracee's `[vdso]`.
pub fn find_syscall_in_vdso(pid: i32, mem: &File, start: u64, end: u64) -> Option<u64> {
    let mut buf = vec![0u8; (end - start) as usize];
    mem.read_exact_at(&mut buf, start).ok()?;
    buf.windows(2).position(|w| w == [0x0f, 0x05]).map(|i| {
        let _ = pid;
        start + i as u64
    })
}
