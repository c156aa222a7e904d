//! Resource limits for foreign jobs: every job the agent runs (started here or migrated
//! in) lives in a cgroup of its own with a pids limit (a fork bomb is contained), a memory
//! limit (the OOM killer picks inside the job only) and a low CPU weight.
//!
//! Both cgroup layouts are supported, detected once when the agent starts:
//! - cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` exists): the jobs' cgroups go under
//!   `<agent's cgroup>/wisp-<host>/`; the pids, memory and cpu controllers are enabled in
//!   the `cgroup.subtree_control` files on the way (when the agent's own cgroup is not the
//!   root and holds processes, the agent first moves itself into a leaf `wispd` beside
//!   the jobs, as the "no internal processes" rule requires).
//! - cgroup v1 (per-controller hierarchies at `/sys/fs/cgroup/<controller>`): one directory
//!   per controller, `<mount>/<agent's cgroup there>/wisp-<host>/job-<id>`.
//!
//! The job joins its cgroups before it can fork: the sandbox's init (or the first restored
//! process) writes "0" to the `cgroup.procs` files the agent opened, right after it is
//! created and before it creates the job's first process (see
//! `wisp_procmig::run_sandboxed_in`). So no process of a job is ever outside the limits,
//! and the agent's own threads never change cgroup (moving the spawning thread around the
//! fork would race with the agent's other threads that fork, and does not exist in v2).
//!
//! With no usable controller the agent warns once and runs jobs without limits.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// Limits for each job's cgroup; `None` leaves that one unset.
#[derive(Debug, Clone, Copy, Default)]
pub struct JobLimits {
    /// At most this many processes and threads (`pids.max`).
    pub pids_max: Option<u64>,
    /// Memory limit in bytes (v2 `memory.max`, v1 `memory.limit_in_bytes`).
    pub memory_max: Option<u64>,
    /// CPU weight on the v2 scale 1..=10000 (100 = a normal process); v1 gets
    /// `cpu.shares` = weight * 1024 / 100.
    pub cpu_weight: Option<u32>,
}

const CONTROLLERS: [&str; 3] = ["pids", "memory", "cpu"];

#[derive(Debug)]
enum Layout {
    /// (controller, the agent's directory for jobs in that hierarchy).
    V1(Vec<(&'static str, PathBuf)>),
    /// The directory for jobs and the controllers enabled in it.
    V2(PathBuf, Vec<&'static str>),
    None,
}

/// The agent's cgroup setup.
#[derive(Debug)]
pub struct Cgroups {
    layout: Layout,
    limits: JobLimits,
}

/// A job's cgroup (one directory per v1 controller); removed by [`JobCgroup::remove`].
#[derive(Debug)]
pub struct JobCgroup {
    dirs: Vec<PathBuf>,
    procs: Vec<File>,
}

fn own_cgroup(hierarchy: impl Fn(&str, &str) -> bool) -> Option<String> {
    let s = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    s.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (id, ctl, path) = (f.next()?, f.next()?, f.next()?);
        hierarchy(id, ctl).then(|| path.trim_start_matches('/').to_string())
    })
}

fn write(path: &Path, v: &str) -> std::io::Result<()> {
    std::fs::write(path, v)
}

impl Cgroups {
    /// Detect the layout under `/sys/fs/cgroup` and prepare this host's directory.
    pub fn detect(host: &str, limits: JobLimits) -> Cgroups {
        Self::detect_at(Path::new("/sys/fs/cgroup"), host, limits)
    }

    fn detect_at(root: &Path, host: &str, limits: JobLimits) -> Cgroups {
        // The agent's pid in the name: several agents may share one cgroup tree (the
        // simulated cluster runs them all on one machine, with the same host names).
        let name = format!("wisp-{host}-{}", std::process::id());
        let layout = if root.join("cgroup.controllers").exists() {
            Self::v2(root, &name)
        } else {
            Self::v1(root, &name)
        };
        match &layout {
            Layout::V1(v) => info!(
                controllers = ?v.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
                dir = %v[0].1.display(),
                ?limits,
                "jobs run in cgroups (v1)"
            ),
            Layout::V2(d, c) => {
                info!(controllers = ?c, dir = %d.display(), ?limits, "jobs run in cgroups (v2)")
            }
            Layout::None => warn!(
                "no usable cgroup controller (pids, memory, cpu) found: jobs run WITHOUT resource limits"
            ),
        }
        Cgroups { layout, limits }
    }

    /// Remove the empty directories left by agents of this host that are gone.
    fn sweep(parent: &Path, name: &str) {
        let Some(prefix) = name.rsplit_once('-').map(|(p, _)| format!("{p}-")) else {
            return;
        };
        for e in std::fs::read_dir(parent).into_iter().flatten().flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = n.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            for j in std::fs::read_dir(e.path()).into_iter().flatten().flatten() {
                if j.path().is_dir() {
                    let _ = std::fs::remove_dir(j.path());
                }
            }
            let _ = std::fs::remove_dir(e.path());
        }
    }

    fn v1(root: &Path, name: &str) -> Layout {
        let mut dirs = Vec::new();
        for ctl in CONTROLLERS {
            let mount = root.join(ctl);
            if !mount.join("cgroup.procs").exists() {
                continue;
            }
            let own = own_cgroup(|_, c| c.split(',').any(|x| x == ctl)).unwrap_or_default();
            let dir = mount.join(own).join(name);
            Self::sweep(dir.parent().unwrap_or(&mount), name);
            match std::fs::create_dir_all(&dir) {
                Ok(()) => dirs.push((ctl, dir)),
                Err(e) => warn!(controller = ctl, dir = %dir.display(), "cannot use cgroup: {e}"),
            }
        }
        if dirs.is_empty() {
            Layout::None
        } else {
            Layout::V1(dirs)
        }
    }

    fn v2(root: &Path, name: &str) -> Layout {
        let own = own_cgroup(|id, _| id == "0").unwrap_or_default();
        let base = root.join(&own);
        let enable = |dir: &Path| -> Vec<&'static str> {
            let avail = std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
            CONTROLLERS
                .into_iter()
                .filter(|c| avail.split_whitespace().any(|a| a == *c))
                .filter(|c| {
                    let on = std::fs::read_to_string(dir.join("cgroup.subtree_control"))
                        .unwrap_or_default();
                    on.split_whitespace().any(|a| a == *c)
                        || write(&dir.join("cgroup.subtree_control"), &format!("+{c}")).is_ok()
                })
                .collect()
        };
        let mut on = enable(&base);
        if on.is_empty() && !own.is_empty() {
            // "No internal processes": a non-root cgroup with processes cannot delegate
            // controllers. Move the agent into a leaf beside the jobs' directory.
            let leaf = base.join("wispd");
            let pid = std::process::id().to_string();
            if std::fs::create_dir_all(&leaf).is_ok()
                && write(&leaf.join("cgroup.procs"), &pid).is_ok()
            {
                on = enable(&base);
            }
        }
        let dir = base.join(name);
        Self::sweep(&base, name);
        if let Err(e) = std::fs::create_dir_all(&dir) {
            warn!(dir = %dir.display(), "cannot create cgroup: {e}");
            return Layout::None;
        }
        let on: Vec<&'static str> = on
            .into_iter()
            .filter(|c| {
                let set =
                    std::fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
                set.split_whitespace().any(|a| a == *c)
                    || write(&dir.join("cgroup.subtree_control"), &format!("+{c}")).is_ok()
            })
            .collect();
        if on.is_empty() {
            let _ = std::fs::remove_dir(&dir);
            Layout::None
        } else {
            Layout::V2(dir, on)
        }
    }

    /// At exit: remove this agent's directories, and the jobs' cgroups in them that are
    /// empty (a job still running keeps its cgroup, and so its directory).
    pub fn release(&self) {
        let dirs: Vec<PathBuf> = match &self.layout {
            Layout::V1(v) => v.iter().map(|(_, d)| d.clone()).collect(),
            Layout::V2(d, _) => vec![d.clone()],
            Layout::None => vec![],
        };
        for d in dirs {
            for j in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                if j.path().is_dir() {
                    let _ = std::fs::remove_dir(j.path());
                }
            }
            let _ = std::fs::remove_dir(&d);
        }
    }

    /// Whether jobs get limits here.
    pub fn enabled(&self) -> bool {
        !matches!(self.layout, Layout::None)
    }

    /// "v1", "v2" or "none" (for metrics).
    pub fn version(&self) -> &'static str {
        match self.layout {
            Layout::V1(_) => "v1",
            Layout::V2(..) => "v2",
            Layout::None => "none",
        }
    }

    pub fn limits(&self) -> JobLimits {
        self.limits
    }

    /// Make job `job`'s cgroup with its limits set, its `cgroup.procs` files open. `None`
    /// (after a warning) when there are no cgroups here or making it failed: the job then
    /// runs without limits rather than not at all.
    pub fn create(&self, job: u64) -> Option<JobCgroup> {
        let leaf = format!("job-{job}");
        let l = self.limits;
        let mut cg = JobCgroup {
            dirs: Vec::new(),
            procs: Vec::new(),
        };
        let r: std::io::Result<()> = (|| {
            match &self.layout {
                Layout::None => return Ok(()),
                Layout::V1(dirs) => {
                    for (ctl, base) in dirs {
                        let d = base.join(&leaf);
                        mkdir_fresh(&d)?;
                        cg.dirs.push(d.clone());
                        match *ctl {
                            "pids" => {
                                if let Some(n) = l.pids_max {
                                    write(&d.join("pids.max"), &n.to_string())?;
                                }
                            }
                            "memory" => {
                                if let Some(b) = l.memory_max {
                                    write(&d.join("memory.limit_in_bytes"), &b.to_string())?;
                                    // No swapping the job out instead of killing it (where
                                    // swap accounting exists).
                                    let _ = write(
                                        &d.join("memory.memsw.limit_in_bytes"),
                                        &b.to_string(),
                                    );
                                    let _ = write(&d.join("memory.swappiness"), "0");
                                }
                            }
                            "cpu" => {
                                if let Some(w) = l.cpu_weight {
                                    let shares = (w as u64 * 1024 / 100).max(2);
                                    write(&d.join("cpu.shares"), &shares.to_string())?;
                                }
                            }
                            _ => {}
                        }
                        cg.procs.push(open_procs(&d)?);
                    }
                }
                Layout::V2(base, on) => {
                    let d = base.join(&leaf);
                    mkdir_fresh(&d)?;
                    cg.dirs.push(d.clone());
                    if on.contains(&"pids") {
                        if let Some(n) = l.pids_max {
                            write(&d.join("pids.max"), &n.to_string())?;
                        }
                    }
                    if on.contains(&"memory") {
                        if let Some(b) = l.memory_max {
                            write(&d.join("memory.max"), &b.to_string())?;
                            let _ = write(&d.join("memory.swap.max"), "0");
                            // The OOM killer ends the whole job, not one of its processes.
                            let _ = write(&d.join("memory.oom.group"), "1");
                        }
                    }
                    if on.contains(&"cpu") {
                        if let Some(w) = l.cpu_weight {
                            write(&d.join("cpu.weight"), &w.clamp(1, 10000).to_string())?;
                        }
                    }
                    cg.procs.push(open_procs(&d)?);
                }
            }
            Ok(())
        })();
        match r {
            Ok(()) if !cg.dirs.is_empty() => Some(cg),
            Ok(()) => None,
            Err(e) => {
                warn!(
                    job,
                    "cannot set up the job's cgroup, running it without limits: {e}"
                );
                cg.remove();
                None
            }
        }
    }
}

/// A leftover directory of the same name (an agent that died) is removed first.
fn mkdir_fresh(d: &Path) -> std::io::Result<()> {
    if d.exists() {
        kill_all(d);
        let _ = std::fs::remove_dir(d);
    }
    std::fs::create_dir(d)
}

fn open_procs(d: &Path) -> std::io::Result<File> {
    OpenOptions::new().write(true).open(d.join("cgroup.procs"))
}

fn pids_in(d: &Path) -> Vec<i32> {
    std::fs::read_to_string(d.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill_all(d: &Path) {
    for p in pids_in(d) {
        // SAFETY: kill(2) on a process of the job's own cgroup.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
}

impl JobCgroup {
    /// The `cgroup.procs` descriptors for `wisp_procmig::run_sandboxed_in` / restore.
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|f| f.as_raw_fd()).collect()
    }

    /// Whether process `pid` is in this cgroup (in every hierarchy).
    pub fn contains(&self, pid: i32) -> bool {
        self.dirs.iter().all(|d| pids_in(d).contains(&pid))
    }

    /// The directories (one per v1 controller, one for v2).
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Remove the cgroup once its processes are gone; any still in it (the job ended,
    /// so they are leftovers) are killed. Gives up after a few seconds with a warning.
    pub fn remove(mut self) {
        self.procs.clear();
        let deadline = Instant::now() + Duration::from_secs(5);
        for d in std::mem::take(&mut self.dirs) {
            loop {
                match std::fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                    Err(e) => {
                        if Instant::now() >= deadline {
                            warn!(dir = %d.display(), "cannot remove the job's cgroup: {e}");
                            break;
                        }
                        kill_all(&d);
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With no cgroup filesystem the agent runs jobs without limits instead of failing.
    #[test]
    fn no_cgroups_means_no_limits_not_failure() {
        let dir = std::env::temp_dir().join(format!("wisp-cg-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let limits = JobLimits {
            pids_max: Some(10),
            ..Default::default()
        };
        let cg = Cgroups::detect_at(&dir, "h", limits);
        assert!(!cg.enabled());
        assert_eq!(cg.version(), "none");
        assert!(cg.create(1).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
