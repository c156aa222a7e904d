//! The workstation agent: starts, watches and signals jobs submitted by `rexec`.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use wisp_proto::msg::{ExecSpec, JobInfo, MigrateMode, Request, Response, WireError};
use wisp_proto::rpc::{PeerHandle, RpcClient, Service};

/// How long a source waits for the target to rebuild a job before resuming it itself.
const MIGRATE_IN_TIMEOUT: Duration = Duration::from_secs(600);
/// A target whose agent cannot be reached for this long during a migration is given up.
const TARGET_GONE_AFTER: Duration = Duration::from_secs(10);

/// How long a migration waits for a lazily arrived job's pages to be all in.
const PAGING_WAIT: Duration = Duration::from_secs(300);

/// How long one `JobWait` may hold a server thread before the client asks again.
const WAIT_SLICE: Duration = Duration::from_secs(5);

pub(crate) struct Job {
    pub(crate) info: JobInfo,
    pub(crate) exit: Option<(i32, i32)>,
    /// The job moved to (host, agent address).
    pub(crate) moved: Option<(String, String)>,
    pub(crate) migrating: bool,
    /// Arrived lazily and its pages are still being paged in (it cannot leave before).
    pub(crate) paging: bool,
    /// Stopped (SIGSTOP) because it could not migrate away when the owner came back.
    pub(crate) suspended: bool,
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
    /// The cluster key (to reach other agents when a job migrates).
    pub key: wisp_proto::key::ClusterKey,
    /// This host's name.
    pub host: String,
    /// Resource limits of each job's cgroup.
    pub limits: crate::cgroup::JobLimits,
    /// The owner forbids foreign jobs on this host: every job whose home is another host is
    /// refused (started or migrated here), whatever the eviction policy says.
    pub no_foreign: bool,
}

/// The agent service.
pub struct Agent {
    pub(crate) cfg: AgentConfig,
    pub(crate) jobs: Mutex<HashMap<u64, Job>>,
    changed: Condvar,
    running: Arc<AtomicU32>,
    /// Jobs being rebuilt here right now (MigrateIn in progress).
    arriving: Mutex<std::collections::HashSet<u64>>,
    /// Counters for the metrics endpoint.
    pub stats: AgentStats,
    /// Eviction policy and `wisp evict` requests (see `crate::evict`).
    pub(crate) evict: crate::evict::Control,
    /// Where jobs' cgroups go (detected when the agent starts).
    pub cgroups: crate::cgroup::Cgroups,
}

/// What an agent has done since it started.
#[derive(Default, Debug)]
pub struct AgentStats {
    pub jobs_started: std::sync::atomic::AtomicU64,
    pub migrations_out: std::sync::atomic::AtomicU64,
    pub migrations_in: std::sync::atomic::AtomicU64,
    pub migration_failures: std::sync::atomic::AtomicU64,
    pub evictions: std::sync::atomic::AtomicU64,
    /// Jobs stopped because they could not migrate when the owner came back.
    pub suspensions: std::sync::atomic::AtomicU64,
    /// Page faults the lazy pager answered from swap files (jobs migrated here lazily).
    pub pager_faults: std::sync::atomic::AtomicU64,
    /// Pages the lazy pager pushed in the background.
    pub pages_pushed: std::sync::atomic::AtomicU64,
    /// Milliseconds jobs spent frozen by migrations out of this host, summed.
    pub frozen_ms: std::sync::atomic::AtomicU64,
    /// Signals refused because the asking uid was neither the job's owner nor root.
    pub signals_refused: std::sync::atomic::AtomicU64,
    /// Foreign jobs refused because the owner forbids them (`no_foreign`).
    pub foreign_refused: std::sync::atomic::AtomicU64,
}

fn err(errno: i32, msg: impl Into<String>) -> WireError {
    WireError::new(errno, msg)
}

impl Agent {
    pub fn new(cfg: AgentConfig) -> Arc<Self> {
        let cgroups = crate::cgroup::Cgroups::detect(&cfg.host, cfg.limits);
        Arc::new(Agent {
            cgroups,
            cfg,
            jobs: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            running: Arc::new(AtomicU32::new(0)),
            arriving: Mutex::new(Default::default()),
            stats: AgentStats::default(),
            evict: Default::default(),
        })
    }

    /// Jobs running now (for metrics; the registry counts foreign jobs from job records).
    pub fn running(&self) -> u32 {
        self.running.load(Ordering::Relaxed)
    }

    pub fn jobs(&self) -> Vec<JobInfo> {
        self.jobs
            .lock()
            .unwrap()
            .values()
            .map(|j| j.info.clone())
            .collect()
    }

    fn exec(self: &Arc<Self>, spec: ExecSpec) -> Result<u32, WireError> {
        let cwd = Path::new(OsStr::from_bytes(&spec.cwd));
        if !cwd.starts_with(&self.cfg.mount) {
            return Err(err(
                libc::EXDEV,
                format!(
                    "working directory {} is outside {}",
                    cwd.display(),
                    self.cfg.mount.display()
                ),
            ));
        }
        if spec.uid == 0 && !self.cfg.allow_root {
            return Err(err(libc::EPERM, "this agent does not run jobs as root"));
        }
        if spec.argv.is_empty() {
            return Err(err(libc::EINVAL, "empty command"));
        }
        self.admit_foreign(spec.job, &spec.home)?;
        if self.jobs.lock().unwrap().contains_key(&spec.job) {
            return Err(err(
                libc::EEXIST,
                format!("job {} already exists here", spec.job),
            ));
        }
        for p in [&spec.stdin, &spec.stdout, &spec.stderr] {
            let path = Path::new(OsStr::from_bytes(p));
            if !path.starts_with(&self.cfg.mount) {
                return Err(err(
                    libc::EXDEV,
                    format!(
                        "stdio {} is not a cluster pipe in {}",
                        path.display(),
                        self.cfg.mount.display()
                    ),
                ));
            }
        }
        // The job runs as pid 2 of its own pid + uts namespace (so it keeps its pid when it
        // migrates), with the home host's name. A short chain of execs sets it up as the
        // submitting user: host name, umask and cwd, nice, credentials, environment.
        let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        let mut argv: Vec<String> = vec![
            "/bin/sh".into(),
            "-c".into(),
            r#"hostname "$1" 2>/dev/null; umask "$2" && cd "$3" || exit 126; shift 3; exec "$@""#
                .into(),
            "wisp-job".into(),
            spec.home.clone(),
            format!("{:04o}", spec.umask & 0o777),
            lossy(&spec.cwd),
            "nice".into(),
            "-n".into(),
            self.cfg.nice.to_string(),
        ];
        if spec.uid != 0 {
            argv.extend([
                "setpriv".into(),
                format!("--reuid={}", spec.uid),
                format!("--regid={}", spec.gid),
            ]);
            if spec.groups.is_empty() {
                argv.push("--clear-groups".into());
            } else {
                argv.push(format!(
                    "--groups={}",
                    spec.groups
                        .iter()
                        .map(|g| g.to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
            argv.push("--".into());
        }
        argv.extend(["env".into(), "-i".into()]);
        for (k, v) in &spec.env {
            if !k.contains(&b'=') {
                argv.push(format!("{}={}", lossy(k), lossy(v)));
            }
        }
        argv.extend(spec.argv.iter().map(|a| lossy(a)));
        let paths: Vec<PathBuf> = [&spec.stdin, &spec.stdout, &spec.stderr]
            .iter()
            .map(|p| PathBuf::from(OsStr::from_bytes(p)))
            .collect();
        // The job's cgroup: the sandbox's init joins it before it forks the job.
        let cg = self.cgroups.create(spec.job);
        let fds = cg.as_ref().map(|c| c.procs_fds()).unwrap_or_default();
        // Opens stdin, then stdout and stderr: the order in which rexec opens the other ends.
        let sb = match wisp_procmig::run_sandboxed_in(
            &argv,
            [Some(&paths[0]), Some(&paths[1]), Some(&paths[2])],
            &fds,
        ) {
            Ok(sb) => sb,
            Err(e) => {
                if let Some(cg) = cg {
                    cg.remove();
                }
                return Err(err(
                    libc::EIO,
                    format!("cannot start {}: {e}", lossy(&spec.argv[0])),
                ));
            }
        };
        let cg = check_joined(spec.job, sb.init_pid, cg);
        let info = JobInfo {
            job: spec.job,
            pid: sb.pid as u32,
            uid: spec.uid,
            home: spec.home.clone(),
            argv0: lossy(&spec.argv[0]),
            running: true,
        };
        info!(job = spec.job, pid = sb.pid, home = %spec.home, cmd = %info.argv0, "job started");
        self.stats.jobs_started.fetch_add(1, Ordering::Relaxed);
        self.adopt(info, sb, cg);
        Ok(sb.pid as u32)
    }

    /// Track a job whose sandbox init is our child, until it ends.
    fn adopt(
        self: &Arc<Self>,
        info: JobInfo,
        sb: wisp_procmig::Sandbox,
        cg: Option<crate::cgroup::JobCgroup>,
    ) {
        let job = info.job;
        self.jobs.lock().unwrap().insert(
            job,
            Job {
                info,
                exit: None,
                moved: None,
                migrating: false,
                paging: false,
                suspended: false,
            },
        );
        self.running.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        std::thread::spawn(move || {
            let code = sb.wait().unwrap_or_else(|e| {
                warn!(job, "wait failed: {e}");
                255
            });
            // The init is gone, so the namespace's other processes are being killed: the
            // cgroup goes once they are.
            if let Some(cg) = cg {
                cg.remove();
            }
            let signal = if code > 128 && code < 160 {
                code - 128
            } else {
                0
            };
            me.running.fetch_sub(1, Ordering::Relaxed);
            let mut jobs = me.jobs.lock().unwrap();
            if let Some(j) = jobs.get_mut(&job) {
                j.exit = Some((code, signal));
                j.info.running = false;
                if j.moved.is_some() {
                    info!(job, "frozen copy of a migrated job released");
                } else {
                    info!(job, code, "job ended");
                }
            }
            me.changed.notify_all();
        });
    }

    /// Source side of a migration (see `Request::MigrateOut`).
    pub(crate) fn migrate_out(
        &self,
        job: u64,
        to_host: String,
        to_addr: String,
        mode: MigrateMode,
    ) -> Result<Response, WireError> {
        let t0 = Instant::now();
        let (pid, uid, home, argv0) = {
            let mut jobs = self.jobs.lock().unwrap();
            let j = jobs
                .get_mut(&job)
                .ok_or_else(|| err(libc::ESRCH, format!("no job {job} on this host")))?;
            if j.exit.is_some() || j.moved.is_some() {
                return Err(err(
                    libc::ESRCH,
                    format!("job {job} is no longer running here"),
                ));
            }
            if j.migrating {
                return Err(err(libc::EBUSY, format!("job {job} is already migrating")));
            }
            j.migrating = true;
            (
                j.info.pid as i32,
                j.info.uid,
                j.info.home.clone(),
                j.info.argv0.clone(),
            )
        };
        let unmark = |me: &Self| {
            if let Some(j) = me.jobs.lock().unwrap().get_mut(&job) {
                j.migrating = false;
            }
        };
        // A job that arrived lazily moves on only once all its pages are here: a dump
        // now would miss the pages still in the previous swap file.
        {
            let deadline = Instant::now() + PAGING_WAIT;
            let mut jobs = self.jobs.lock().unwrap();
            while jobs.get(&job).is_some_and(|j| j.paging) {
                let now = Instant::now();
                if now >= deadline {
                    if let Some(j) = jobs.get_mut(&job) {
                        j.migrating = false;
                    }
                    return Err(err(
                        libc::EBUSY,
                        format!("job {job} is still being paged in after a lazy migration"),
                    ));
                }
                jobs = self.changed.wait_timeout(jobs, deadline - now).unwrap().0;
            }
        }
        // A job pre-flushed while the owner was away (`crate::preflush`) has most of its
        // image written already: only what it dirtied since is left to write. Otherwise one
        // directory per migration: the lazy pager of the job's previous arrival here may
        // still be paging from (and will then delete) the previous one.
        let pre = self.take_preflush(job);
        let dir = match &pre {
            Some((_, d)) => d.clone(),
            None => {
                let nonce = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                self.cfg
                    .mount
                    .join(".swap")
                    .join(format!("{job:x}.{nonce:x}"))
            }
        };
        if pre.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if let Err(e) = std::fs::create_dir_all(&dir) {
            unmark(self);
            return Err(err(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("cannot make {}: {e}", dir.display()),
            ));
        }
        // Freeze and write the image (the whole process tree of the job's sandbox); on
        // failure procmig resumes every process itself.
        let dumped = match (pre, mode) {
            (Some((pc, _)), _) => pc.finish(),
            (None, MigrateMode::PreCopy) => precopy(pid, &dir),
            (None, _) => wisp_procmig::dump(pid, &dir),
        };
        let dumped = match dumped {
            Ok(d) => d,
            Err(e) => {
                unmark(self);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(err(libc::EIO, format!("cannot freeze job {job}: {e}")));
            }
        };
        let rt = tokio::runtime::Handle::current();
        // A generous bound: if it ran out while the target was still restoring, the source
        // would resume a job that the target then also runs.
        let target = RpcClient::start(
            rt.clone(),
            to_addr.clone(),
            self.cfg.key.clone(),
            format!("agent@{}", self.cfg.host),
            MIGRATE_IN_TIMEOUT,
            Arc::new(|_| Ok(())),
        );
        let lazy = mode != MigrateMode::Eager;
        let req = Request::MigrateIn {
            job,
            dir: dir.as_os_str().as_bytes().to_vec(),
            uid,
            home,
            argv0,
            lazy,
        };
        let t_restore = Instant::now();
        // The wait is long while the target answers (a restore may take minutes), but a
        // target agent that went away (its connection down, or never up, for
        // TARGET_GONE_AFTER) is not restoring anything: the source resumes then.
        let gone = async {
            let mut down_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if target.is_up() {
                    down_since = None;
                } else if down_since.get_or_insert_with(Instant::now).elapsed() >= TARGET_GONE_AFTER
                {
                    return;
                }
            }
        };
        let answer = rt.block_on(async {
            tokio::select! {
                r = target.call(req) => r,
                _ = gone => Err(wisp_proto::rpc::RpcError::Remote(err(
                    libc::EHOSTDOWN,
                    format!(
                        "the target agent at {to_addr} went away during the migration (no connection for {} s)",
                        TARGET_GONE_AFTER.as_secs()
                    ),
                ))),
            }
        });
        match answer {
            Ok(Response::Started { pid: new_pid }) => {
                // Stopped = the final freeze of the dump plus the target's rebuild (with
                // pre-copy, the earlier rounds ran while the job kept running).
                let stopped_ms = dumped.frozen_ms + t_restore.elapsed().as_millis() as u64;
                // The target runs it: only now does the source let go of its frozen copy.
                if let Some(j) = self.jobs.lock().unwrap().get_mut(&job) {
                    j.moved = Some((to_host.clone(), to_addr.clone()));
                    j.migrating = false;
                }
                if let Err(e) = dumped.frozen.kill() {
                    warn!(job, "killing the frozen source failed: {e}");
                }
                self.changed.notify_all();
                self.stats.migrations_out.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .frozen_ms
                    .fetch_add(stopped_ms, Ordering::Relaxed);
                info!(job, to = %to_host, new_pid, processes = dumped.processes, frozen_ms = dumped.frozen_ms, bytes = dumped.bytes, "job migrated");
                Ok(Response::Migrated {
                    pid: new_pid,
                    frozen_ms: stopped_ms,
                    bytes: dumped.bytes,
                    total_ms: t0.elapsed().as_millis() as u64,
                })
            }
            other => {
                // The target failed: the source resumes as if nothing happened.
                let why = match other {
                    Err(e) => e.to_string(),
                    Ok(r) => format!("unexpected reply {r:?}"),
                };
                self.stats
                    .migration_failures
                    .fetch_add(1, Ordering::Relaxed);
                if let Err(e) = dumped.frozen.resume() {
                    warn!(job, "resuming the frozen source failed: {e}");
                }
                unmark(self);
                let _ = std::fs::remove_dir_all(&dir);
                Err(err(
                    libc::EIO,
                    format!(
                        "target {to_host} could not take job {job}: {why}; it keeps running here"
                    ),
                ))
            }
        }
    }

    /// Target side of a migration (see `Request::MigrateIn`).
    fn migrate_in(
        self: &Arc<Self>,
        job: u64,
        dir: &[u8],
        uid: u32,
        home: String,
        argv0: String,
        lazy: bool,
    ) -> Result<u32, WireError> {
        let dir = PathBuf::from(OsStr::from_bytes(dir));
        if !dir.starts_with(&self.cfg.mount) {
            return Err(err(
                libc::EXDEV,
                format!(
                    "image {} is not in {}",
                    dir.display(),
                    self.cfg.mount.display()
                ),
            ));
        }
        self.admit_foreign(job, &home)?;
        // A repeated MigrateIn (the source's connection dropped before our answer) must not
        // make the source resume a second copy, nor start a second restore: answer as the
        // first one does.
        loop {
            if let Some(j) = self.jobs.lock().unwrap().get(&job) {
                if j.exit.is_none() && j.moved.is_none() {
                    return Ok(j.info.pid);
                }
            }
            if self.arriving.lock().unwrap().insert(job) {
                break;
            }
            // The first MigrateIn is still restoring: wait for its outcome.
            std::thread::sleep(Duration::from_millis(50));
            if !self.arriving.lock().unwrap().contains(&job)
                && !self.jobs.lock().unwrap().contains_key(&job)
            {
                return Err(err(
                    libc::EIO,
                    format!("the first attempt to rebuild job {job} failed"),
                ));
            }
        }
        let r = self.restore_arriving(job, &dir, uid, home, argv0, lazy);
        self.arriving.lock().unwrap().remove(&job);
        r
    }

    fn restore_arriving(
        self: &Arc<Self>,
        job: u64,
        dir: &Path,
        uid: u32,
        home: String,
        argv0: String,
        lazy: bool,
    ) -> Result<u32, WireError> {
        let dir = dir.to_path_buf();
        // The restored tree's first process joins the job's cgroup before it creates the
        // others.
        let cg = self.cgroups.create(job);
        let opts = wisp_procmig::RestoreOptions {
            pid_mode: wisp_procmig::PidMode::NewNamespace,
            cgroup_procs: cg.as_ref().map(|c| c.procs_fds()).unwrap_or_default(),
            ..Default::default()
        };
        let restored = if lazy {
            wisp_procmig::restore_lazy(&dir, &opts).map(|(r, p)| (r, Some(p)))
        } else {
            wisp_procmig::restore_with(&dir, &opts).map(|r| (r, None))
        };
        let (r, pager) = match restored {
            Ok(x) => x,
            Err(e) => {
                if let Some(cg) = cg {
                    cg.remove();
                }
                return Err(err(libc::EIO, format!("cannot rebuild job {job}: {e}")));
            }
        };
        for w in &r.warnings {
            warn!(job, "restore: {w}");
        }
        let sb = wisp_procmig::Sandbox {
            init_pid: r.init_pid.unwrap_or(r.pid),
            pid: r.pid,
        };
        let cg = check_joined(job, sb.init_pid, cg);
        self.adopt(
            JobInfo {
                job,
                pid: r.pid as u32,
                uid,
                home,
                argv0,
                running: true,
            },
            sb,
            cg,
        );
        match pager {
            // The job runs already; its pages arrive from the swap file on demand and in the
            // background. Only when all are in is the swap file removed.
            Some(p) => {
                if let Some(j) = self.jobs.lock().unwrap().get_mut(&job) {
                    j.paging = true;
                }
                let d = dir.clone();
                let me = self.clone();
                std::thread::spawn(move || {
                    let r = p.wait();
                    if let Some(j) = me.jobs.lock().unwrap().get_mut(&job) {
                        j.paging = false;
                    }
                    me.changed.notify_all();
                    match r {
                        Ok(st) => {
                            me.stats
                                .pager_faults
                                .fetch_add(st.faults, Ordering::Relaxed);
                            me.stats
                                .pages_pushed
                                .fetch_add(st.pushed, Ordering::Relaxed);
                            info!(
                                job,
                                faults = st.faults,
                                pushed = st.pushed,
                                "all pages in; swap file removed"
                            )
                        }
                        Err(e) => warn!(job, "pager: {e}"),
                    }
                    let _ = std::fs::remove_dir_all(&d);
                });
            }
            // Every page is in: the swap file is no longer needed.
            None => {
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
        info!(
            job,
            pid = r.pid,
            processes = r.members.len() + 1,
            "job arrived"
        );
        self.stats.migrations_in.fetch_add(1, Ordering::Relaxed);
        Ok(r.pid as u32)
    }

    fn wait(&self, job: u64) -> Result<Response, WireError> {
        let deadline = Instant::now() + WAIT_SLICE;
        let mut jobs = self.jobs.lock().unwrap();
        loop {
            match jobs.get(&job) {
                None => return Err(err(libc::ESRCH, format!("no job {job} on this host"))),
                Some(Job {
                    moved: Some((host, addr)),
                    ..
                }) => {
                    return Ok(Response::Moved {
                        host: host.clone(),
                        addr: addr.clone(),
                    });
                }
                Some(Job {
                    exit: Some((code, signal)),
                    ..
                }) => {
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

    /// Signal `job` for `uid`: its owner or root only.
    fn signal(&self, job: u64, sig: i32, uid: u32) -> Result<Response, WireError> {
        if let Some(j) = self.jobs.lock().unwrap().get(&job) {
            if uid != 0 && uid != j.info.uid {
                self.stats.signals_refused.fetch_add(1, Ordering::Relaxed);
                return Err(err(
                    libc::EPERM,
                    format!(
                        "uid {uid} may not signal job {job}: it belongs to uid {}; only its owner or root may",
                        j.info.uid
                    ),
                ));
            }
        }
        let pid = match self.jobs.lock().unwrap().get(&job) {
            Some(Job {
                moved: Some((host, addr)),
                ..
            }) => {
                return Ok(Response::Moved {
                    host: host.clone(),
                    addr: addr.clone(),
                })
            }
            Some(j) if j.exit.is_none() => j.info.pid,
            Some(_) => return Ok(Response::Ok),
            None => return Err(err(libc::ESRCH, format!("no job {job} on this host"))),
        };
        // Like a terminal signalling its foreground process group: every process of the
        // job (its whole sandbox) gets the signal, so Ctrl-C of a make stops the compilers
        // its recipes started too.
        if signal_sandbox(pid as i32, sig) > 0 {
            return Ok(Response::Ok);
        }
        // SAFETY: kill(2) on the job's pid.
        if unsafe { libc::kill(pid as i32, sig) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(err(
                e.raw_os_error().unwrap_or(libc::EIO),
                format!("signal {sig} to job {job}: {e}"),
            ));
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
            Request::Exec(spec) => Ok(Response::Started {
                pid: self.0.exec(spec)?,
            }),
            Request::JobWait { job } => self.0.wait(job),
            Request::JobSignal { job, signal, uid } => self.0.signal(job, signal, uid),
            Request::JobList => Ok(Response::Jobs(self.0.jobs())),
            Request::MigrateOut {
                job,
                to_host,
                to_addr,
                mode,
            } => self.0.migrate_out(job, to_host, to_addr, mode),
            Request::MigrateIn {
                job,
                dir,
                uid,
                home,
                argv0,
                lazy,
            } => Ok(Response::Started {
                pid: self.0.migrate_in(job, &dir, uid, home, argv0, lazy)?,
            }),
            Request::JobStats => Ok(Response::JobStats(crate::ps::job_stats(&self.0))),
            Request::Evict { reason } => crate::evict::evict_request(&self.0, reason),
            other => Err(err(
                libc::EOPNOTSUPP,
                format!(
                    "the agent does not serve {:?}",
                    std::mem::discriminant(&other)
                ),
            )),
        }
    }
}

/// A job's init should be in its cgroup now (it joined before forking); if it is not
/// (the write failed), say so, and drop the cgroup rather than claim limits it lacks.
fn check_joined(
    job: u64,
    init: i32,
    cg: Option<crate::cgroup::JobCgroup>,
) -> Option<crate::cgroup::JobCgroup> {
    let cg = cg?;
    if cg.contains(init) {
        return Some(cg);
    }
    warn!(
        job,
        init, "the job did not join its cgroup: it runs without limits"
    );
    // Not removed: a process that is in it after all must not be killed for it.
    drop(cg);
    None
}

/// Send `sig` to every process in the pid namespace of `pid` (a job's sandbox); returns
/// how many got it.
pub(crate) fn signal_sandbox(pid: i32, sig: i32) -> usize {
    let Some(pids) = crate::ps::sandbox_pids(pid) else {
        warn!(
            pid,
            "job is not in a sandbox of its own; not signalling its namespace"
        );
        return 0;
    };
    pids.into_iter()
        // SAFETY: kill(2) on a process of the job's own pid namespace.
        .filter(|p| unsafe { libc::kill(*p, sig) } == 0)
        .count()
}

/// Pre-copy: copy memory while the job runs, in rounds, until the dirty set stops
/// shrinking (at most 8 rounds), then freeze for the rest.
fn precopy(pid: i32, dir: &Path) -> Result<wisp_procmig::DumpInfo, wisp_procmig::DumpError> {
    let mut pc = wisp_procmig::PreCopy::start(pid, dir)?;
    let mut last = u64::MAX;
    for _ in 0..8 {
        let n = pc.round()?;
        if n == 0 || n >= last {
            break;
        }
        last = n;
    }
    pc.finish()
}

/// The agent address of a host registered as `ip:port`.
pub fn agent_addr(host_addr: &str) -> String {
    let ip = host_addr
        .rsplit_once(':')
        .map(|(ip, _)| ip)
        .unwrap_or(host_addr);
    format!("{ip}:{}", crate::AGENT_PORT)
}
