//! The job sandbox: start a command as pid 2 of a fresh pid + uts namespace, under a
//! minimal init (pid 1) that reaps and exits with the command's status. Because the
//! namespace is private to the job, restore can recreate the very same pid inside a new
//! namespace with clone3 set_tid.

use std::ffi::CString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use crate::procfs;
use crate::sys::{self, SysError, Wait};

/// Errors starting a sandboxed command.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("empty command")]
    Empty,
    #[error("command {0:?} not found in PATH")]
    NotFound(String),
    #[error("argument {0:?} contains a NUL byte")]
    Nul(String),
    #[error("cannot open {path} for stdio: {source}")]
    Stdio {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Sys(#[from] SysError),
    #[error("sandbox init {init} did not start the command")]
    NoChild { init: i32 },
}

/// A command running in its own pid + uts namespace.
#[derive(Debug, Clone, Copy)]
pub struct Sandbox {
    /// The namespace's init, a child of the caller.
    pub init_pid: i32,
    /// The command, as seen from the caller's pid namespace.
    pub pid: i32,
}

impl Sandbox {
    /// Wait for the init (and so the command) to end; returns the command's exit code
    /// (128 + signal when killed).
    pub fn wait(&self) -> Result<i32, SandboxError> {
        Ok(match sys::wait(self.init_pid)? {
            Wait::Exited(c) => c,
            Wait::Signaled(s) => 128 + s,
            Wait::Stopped { .. } => -1,
        })
    }
}

fn resolve(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        return Some(PathBuf::from(cmd));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

fn cstring(s: &str) -> Result<CString, SandboxError> {
    CString::new(s).map_err(|_| SandboxError::Nul(s.into()))
}

/// Start `argv` in a new sandbox; `stdio[i]` = Some(path) redirects fd i (0 read, 1 and
/// 2 append), None inherits.
pub fn run_sandboxed(argv: &[String], stdio: [Option<&Path>; 3]) -> Result<Sandbox, SandboxError> {
    run_sandboxed_in(argv, stdio, &[])
}

/// Like [`run_sandboxed`], with the sandbox's init joining the cgroups whose
/// `cgroup.procs` files are open (for writing) in `cgroup_procs` before it forks the
/// command: the command and everything it starts is born inside them, so a limit such
/// as `pids.max` holds from its first instruction on (no window in which it could fork
/// outside). The descriptors stay owned by the caller.
pub fn run_sandboxed_in(
    argv: &[String],
    stdio: [Option<&Path>; 3],
    cgroup_procs: &[std::os::fd::RawFd],
) -> Result<Sandbox, SandboxError> {
    let first = argv.first().ok_or(SandboxError::Empty)?;
    let exe = resolve(first).ok_or_else(|| SandboxError::NotFound(first.clone()))?;
    let path = cstring(&exe.to_string_lossy())?;
    let args: Vec<CString> = argv.iter().map(|a| cstring(a)).collect::<Result<_, _>>()?;
    let envs: Vec<CString> = std::env::vars()
        .map(|(k, v)| cstring(&format!("{k}={v}")))
        .collect::<Result<_, _>>()?;
    let exec = sys::ExecArgs::new(path, args, envs);
    let mut files = Vec::new();
    let mut fds = [-1i32; 3];
    for (i, p) in stdio.iter().enumerate() {
        if let Some(p) = p {
            let f = if i == 0 {
                std::fs::File::open(p)
            } else {
                std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .open(p)
            }
            .map_err(|source| SandboxError::Stdio {
                path: p.to_path_buf(),
                source,
            })?;
            fds[i] = f.as_raw_fd();
            files.push(f);
        }
    }
    let rseq = sys::glibc_rseq();
    // A mount namespace too, for a /proc of the job's own: it cannot see the host's
    // processes, let alone signal or trace them (their pids do not exist in its namespace).
    let init = sys::fork_with_flags(libc::CLONE_NEWPID | libc::CLONE_NEWUTS | libc::CLONE_NEWNS)?;
    if init == 0 {
        // pid 1 of the new namespace: only async-signal-safe calls from here on.
        sys::child_join_cgroups(cgroup_procs);
        sys::child_private_proc();
        match sys::fork_with_flags(0) {
            Ok(0) => sys::child_exec(fds, &exec),
            Ok(main) => sys::child_become_reaper(main, rseq),
            Err(_) => sys::child_exit(126),
        }
    }
    drop(files);
    for _ in 0..2000 {
        if let Some(pid) = procfs::children_of(init).first() {
            return Ok(Sandbox {
                init_pid: init,
                pid: *pid,
            });
        }
        if let Some(_gone) = sys::try_reap(init) {
            return Err(SandboxError::NoChild { init });
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    Err(SandboxError::NoChild { init })
}
