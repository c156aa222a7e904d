//! The workstation agent: starts, watches and signals jobs submitted by `rexec`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use wisp_proto::msg::{ExecSpec, JobInfo, Request, Response, WireError};
use wisp_proto::rpc::{PeerHandle, Service};

/// How long one `JobWait` may hold a server thread before the client asks again.
const WAIT_SLICE: Duration = Duration::from_secs(5);

struct Job {
    info: JobInfo,
    exit: Option<(i32, i32)>,
}

/// Policy of an agent.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Root of the cluster namespace on this host: a job's cwd must be inside it.
    pub mount: PathBuf,
    /// Nice value for foreign jobs.
    pub nice: i32,
    /// Run root's jobs as root (only when submitted by root).
    pub allow_root: bool,
}

/// The agent service.
pub struct Agent {
    cfg: AgentConfig,
    jobs: Mutex<HashMap<u64, Job>>,
    changed: Condvar,
    running: Arc<AtomicU32>,
}

fn err(errno: i32, msg: impl Into<String>) -> WireError {
    WireError::new(errno, msg)
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        Arc::new(Agent { cfg, jobs: Mutex::new(HashMap::new()), changed: Condvar::new(), running: Arc::new(AtomicU32::new(0)) })
    }

    /// Jobs running now (reported in heartbeats as foreign jobs).
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        self.jobs.lock().unwrap().values().map(|j| j.info.clone()).collect()
    }

    fn exec(self: &Arc<Self>, spec: ExecSpec) -> Result<u32, WireError> {
        let cwd = Path::new(OsStr::from_bytes(&spec.cwd));
        if !cwd.starts_with(&self.cfg.mount) {
            return Err(err(libc::EXDEV, format!("working directory {} is outside {}", cwd.display(), self.cfg.mount.display())));
        }
        if spec.uid == 0 && !self.cfg.allow_root {
            return Err(err(libc::EPERM, "this agent does not run jobs as root"));
        }
        if spec.argv.is_empty() {
            return Err(err(libc::EINVAL, "empty command"));
        }
        if self.jobs.lock().unwrap().contains_key(&spec.job) {
            return Err(err(libc::EEXIST, format!("job {} already exists here", spec.job)));
        }
        let open = |p: &[u8], write: bool| -> Result<std::fs::File, WireError> {
            let path = Path::new(OsStr::from_bytes(p));
            if !path.starts_with(&self.cfg.mount) {
                return Err(err(libc::EXDEV, format!("stdio {} is not a cluster pipe in {}", path.display(), self.cfg.mount.display())));
            }
            let r = if write { std::fs::OpenOptions::new().write(true).open(path) } else { std::fs::File::open(path) };
            r.map_err(|e| err(e.raw_os_error().unwrap_or(libc::EIO), format!("cannot open {}: {e}", path.display())))
        };
        // Same order as rexec opens the other ends: stdin, stdout, stderr.
        let stdin = open(&spec.stdin, false)?;
        let stdout = open(&spec.stdout, true)?;
        let stderr = open(&spec.stderr, true)?;
        let mut cmd = Command::new(OsStr::from_bytes(&spec.argv[0]));
        cmd.args(spec.argv[1..].iter().map(|a| OsStr::from_bytes(a)));
        cmd.env_clear();
        for (k, v) in &spec.env {
            cmd.env(OsStr::from_bytes(k), OsStr::from_bytes(v));
        }
        cmd.current_dir(cwd).stdin(Stdio::from(stdin)).stdout(Stdio::from(stdout)).stderr(Stdio::from(stderr));
        let (uid, gid, groups, umask, nice) = (spec.uid, spec.gid, spec.groups.clone(), spec.umask, self.cfg.nice);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe system calls on values captured by copy.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                libc::umask(umask as libc::mode_t);
                libc::setpriority(libc::PRIO_PROCESS, 0, nice);
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0 || libc::setgid(gid) != 0 || libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| err(e.raw_os_error().unwrap_or(libc::EIO), format!("cannot start {}: {e}", String::from_utf8_lossy(&spec.argv[0]))))?;
        let pid = child.id();
        let info = JobInfo {
            job: spec.job,
            pid,
            uid,
            home: spec.home.clone(),
            argv0: String::from_utf8_lossy(&spec.argv[0]).into_owned(),
            running: true,
        };
        info!(job = spec.job, pid, home = %spec.home, cmd = %info.argv0, "job started");
        self.jobs.lock().unwrap().insert(spec.job, Job { info, exit: None });
        self.running.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let job = spec.job;
        std::thread::spawn(move || {
            let st = child.wait();
            let (code, signal) = match st {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => (c, 0),
                    (None, Some(sig)) => (128 + sig, sig),
                    _ => (255, 0),
                },
                Err(e) => {
                    warn!(job, "wait failed: {e}");
                    (255, 0)
                }
            };
            me.running.fetch_sub(1, Ordering::Relaxed);
            let mut jobs = me.jobs.lock().unwrap();
            if let Some(j) = jobs.get_mut(&job) {
                j.exit = Some((code, signal));
                j.info.running = false;
            }
            info!(job, code, signal, "job ended");
            me.changed.notify_all();
        });
        Ok(pid)
    }

    fn wait(&self, job: u64) -> Result<Response, WireError> {
        let deadline = Instant::now() + WAIT_SLICE;
        let mut jobs = self.jobs.lock().unwrap();
        loop {
            match jobs.get(&job) {
                None => return Err(err(libc::ESRCH, format!("no job {job} on this host"))),
                Some(Job { exit: Some((code, signal)), .. }) => {
                    let (code, signal) = (*code, *signal);
                    jobs.remove(&job);
                    return Ok(Response::Exited { code, signal });
                }
                Some(_) => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(err(libc::EAGAIN, "job still running"));
            }
            jobs = self.changed.wait_timeout(jobs, deadline - now).unwrap().0;
        }
    }

    fn signal(&self, job: u64, sig: i32) -> Result<Response, WireError> {
        let pid = match self.jobs.lock().unwrap().get(&job) {
            Some(j) if j.exit.is_none() => j.info.pid,
            Some(_) => return Ok(Response::Ok),
            None => return Err(err(libc::ESRCH, format!("no job {job} on this host"))),
        };
        // SAFETY: kill(2) on the job's process group (it is a session leader: pgid == pid).
        if unsafe { libc::kill(-(pid as i32), sig) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(e.raw_os_error().unwrap_or(libc::EIO), format!("signal {sig} to job {job}: {e}")));
        }
        Ok(Response::Ok)
    }
}

/// The agent as an rpc service (an `Arc<Agent>` wrapper, so `exec` can hand itself to the
/// thread that waits for the job).
pub struct AgentService(pub Arc<Agent>);

impl Service for AgentService {
    fn call(&self, _peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError> {
        match req {
            Request::Ping => Ok(Response::Pong),
            Request::Exec(spec) => Ok(Response::Started { pid: self.0.exec(spec)? }),
            Request::JobWait { job } => self.0.wait(job),
            Request::JobSignal { job, signal } => self.0.signal(job, signal),
            Request::JobList => Ok(Response::Jobs(self.0.jobs())),
            other => Err(err(libc::EOPNOTSUPP, format!("the agent does not serve {:?}", std::mem::discriminant(&other)))),
        }
    }
}
