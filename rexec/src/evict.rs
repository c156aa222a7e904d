//! Eviction: a workstation belongs to its owner. When the owner comes back, every foreign job
//! (one whose home is another host) leaves at once: all of them migrate in parallel, each to
//! an idle host the registry hands out, or else home (a home host always takes its own jobs
//! back, whatever its owner is doing). Writing their memory to the swap files in /wisp is
//! what frees the host; the targets page it in lazily. A job that cannot migrate is stopped
//! (SIGSTOP, every process of its sandbox), not killed, and reported; it runs on when the
//! owner leaves again. Jobs whose home is this host are never evicted.
//!
//! Every move is recorded twice: a registry event ([`JobEvent`], `wisp events`, `wisp top`)
//! and a structured log line, both with the reason and the timings.
//!
//! Policy ([`EvictPolicy`], wispd flags): a grace period (the owner must stay active that
//! long before jobs leave), a cap on foreign jobs per host (more are refused, and an excess
//! is migrated away), and what to do with a job that cannot migrate (suspend it, or let it
//! run). What counts as the owner's activity is wispd's business (`--evict-below`, the
//! input devices, the override file); this module is handed a predicate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};
use wisp_naming::registry::{EventKind, JobEvent, MovePhase};
use wisp_naming::RegistryClient;
use wisp_proto::msg::{EvictReport, JobInfo, MigrateMode, Response, WireError};

use crate::agent::{agent_addr, signal_sandbox, Agent};

/// What an agent does about foreign jobs.
#[derive(Debug, Clone)]
pub struct EvictPolicy {
    /// The owner must have been active this long before foreign jobs leave (0: at once).
    pub grace: Duration,
    /// Most foreign jobs this host runs at once (`None`: no limit). More are refused; an
    /// excess (e.g. jobs sent here by hand) is migrated away.
    pub max_foreign: Option<u32>,
    /// A job that cannot migrate away from an evicted host is stopped (true) or left
    /// running (false); either way it is reported.
    pub suspend_unmigratable: bool,
    /// While the owner is away, write foreign jobs' memory to their swap files ahead of
    /// time, then every this often only what they wrote since (`None`: off).
    pub preflush: Option<Duration>,
}

impl Default for EvictPolicy {
    fn default() -> Self {
        EvictPolicy {
            grace: Duration::ZERO,
            max_foreign: None,
            suspend_unmigratable: true,
            preflush: None,
        }
    }
}

/// The agent's eviction state shared with the RPC service.
#[derive(Default)]
pub(crate) struct Control {
    policy: Mutex<EvictPolicy>,
    /// `wisp evict` requests waiting for the eviction loop: (reason, where to answer).
    requests: Mutex<Vec<(String, std::sync::mpsc::Sender<EvictReport>)>>,
    wake: tokio::sync::Notify,
    /// Whether an eviction loop runs (else `wisp evict` is refused at once).
    looping: AtomicBool,
    /// Foreign jobs' memory written ahead of an eviction (`crate::preflush`).
    pub(crate) preflush: crate::preflush::Sessions,
}

/// What to do with a job that could not move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum OnFail {
    Suspend,
    Stay,
}

impl Agent {
    pub fn set_evict_policy(&self, p: EvictPolicy) {
        *self.evict.policy.lock().unwrap() = p;
    }

    pub fn evict_policy(&self) -> EvictPolicy {
        self.evict.policy.lock().unwrap().clone()
    }

    /// Refuse a foreign job (started or migrated here) beyond `max_foreign`.
    pub(crate) fn admit_foreign(&self, job: u64, home: &str) -> Result<(), WireError> {
        if home == self.cfg.host {
            return Ok(());
        }
        if self.cfg.no_foreign {
            self.stats
                .foreign_refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(WireError::new(
                libc::EPERM,
                format!(
                    "the owner of {} forbids foreign jobs here (wispd --no-foreign); job {job} from {home} refused",
                    self.cfg.host
                ),
            ));
        }
        let Some(max) = self.evict_policy().max_foreign else {
            return Ok(());
        };
        // Suspended jobs and jobs being moved still take room here.
        let n = self
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| {
                j.exit.is_none()
                    && j.moved.is_none()
                    && j.info.home != self.cfg.host
                    && j.info.job != job
            })
            .count();
        if n as u32 >= max {
            return Err(WireError::new(
                libc::EBUSY,
                format!(
                    "{} runs {n} foreign jobs already (at most {max})",
                    self.cfg.host
                ),
            ));
        }
        Ok(())
    }

    /// Foreign jobs running here that could move now: not ended, not moved, not being
    /// moved, not suspended.
    pub(crate) fn foreign_jobs(&self) -> Vec<JobInfo> {
        let mut v: Vec<JobInfo> = self
            .jobs
            .lock()
            .unwrap()
            .values()
            .filter(|j| {
                j.exit.is_none()
                    && j.moved.is_none()
                    && !j.migrating
                    && !j.suspended
                    && j.info.home != self.cfg.host
            })
            .map(|j| j.info.clone())
            .collect();
        v.sort_by_key(|j| j.job);
        v
    }
}

/// `Request::Evict`: hand the request to the eviction loop and wait for its report.
pub(crate) fn evict_request(agent: &Arc<Agent>, reason: String) -> Result<Response, WireError> {
    if !agent.evict.looping.load(Ordering::Relaxed) {
        return Err(WireError::new(
            libc::EOPNOTSUPP,
            "this agent runs no eviction loop",
        ));
    }
    let (tx, rx) = std::sync::mpsc::channel();
    agent.evict.requests.lock().unwrap().push((reason, tx));
    agent.evict.wake.notify_one();
    rx.recv_timeout(Duration::from_secs(600))
        .map(Response::Evicted)
        .map_err(|_| WireError::new(libc::ETIMEDOUT, "eviction did not finish in 600 s"))
}

/// Move one job from this host to `to` (agent at `to_addr`) as `kind` for `reason`: the
/// registry's Begin/Commit (or Abort), the migration itself, an event and a log line.
/// Returns (frozen ms, total ms since `t0`), or why it failed (the job then runs on here).
#[allow(clippy::too_many_arguments)]
pub(crate) async fn move_job(
    agent: &Arc<Agent>,
    reg: &RegistryClient,
    job: u64,
    to: &str,
    to_addr: &str,
    kind: EventKind,
    reason: &str,
    t0: Instant,
) -> Result<(u64, u64), String> {
    let me = agent.cfg.host.clone();
    let _ = reg.job_move(job, to, MovePhase::Begin).await;
    let (a, to2, addr2) = (agent.clone(), to.to_string(), agent_addr(to_addr));
    let r = tokio::task::spawn_blocking(move || a.migrate_out(job, to2, addr2, MigrateMode::Lazy))
        .await;
    let event = |kind, to: &str, reason: String, frozen_ms, total_ms, bytes| JobEvent {
        at_ms: 0,
        job,
        kind,
        from: me.clone(),
        to: to.to_string(),
        reason,
        frozen_ms,
        total_ms,
        bytes,
    };
    match r {
        Ok(Ok(Response::Migrated {
            frozen_ms, bytes, ..
        })) => {
            let total_ms = t0.elapsed().as_millis() as u64;
            let _ = reg.job_move(job, to, MovePhase::Commit).await;
            info!(
                job,
                event = kind.name(),
                from = %me,
                to = %to,
                reason,
                frozen_ms,
                total_ms,
                bytes,
                "{}",
                match kind {
                    EventKind::Evicted => "evicted: owner is back",
                    EventKind::Balanced => "balanced: moved to a less loaded host",
                    _ => "migrated",
                }
            );
            let ev = event(kind, to, reason.to_string(), frozen_ms, total_ms, bytes);
            if let Err(e) = reg.record_event(ev).await {
                warn!(job, "cannot record the move in the registry: {e}");
            }
            Ok((frozen_ms, total_ms))
        }
        other => {
            let _ = reg.job_move(job, to, MovePhase::Abort).await;
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                Ok(Ok(r)) => format!("unexpected reply {r:?}"),
                Err(e) => e.to_string(),
            };
            let total_ms = t0.elapsed().as_millis() as u64;
            warn!(job, event = "failed", from = %me, to = %to, reason, total_ms, "move failed: {why}");
            let ev = event(
                EventKind::Failed,
                to,
                format!("{reason}: {why}"),
                0,
                total_ms,
                0,
            );
            let _ = reg.record_event(ev).await;
            Err(why)
        }
    }
}

/// Where each job goes: idle hosts from the registry (one lease each, as rexec takes them),
/// then the job's home. `None` for a job with neither.
async fn targets(
    agent: &Agent,
    reg: &RegistryClient,
    jobs: &[JobInfo],
) -> Vec<Option<(String, String)>> {
    let hosts = match reg.hosts().await {
        Ok(h) => h,
        Err(e) => {
            warn!("eviction: registry unavailable: {e}");
            return vec![None; jobs.len()];
        }
    };
    let mut uids: Vec<u32> = jobs.iter().map(|j| j.uid).collect();
    uids.sort_unstable();
    uids.dedup();
    let mut leased: Vec<(u32, String, String)> = Vec::new();
    for uid in uids {
        let n = jobs.iter().filter(|j| j.uid == uid).count() as u32;
        if let Ok(v) = reg.allocate_hosts(uid, n, &agent.cfg.host, false).await {
            leased.extend(v.into_iter().map(|l| (uid, l.host, l.addr)));
        }
    }
    jobs.iter()
        .map(|j| {
            if let Some(i) = leased.iter().position(|(u, _, _)| *u == j.uid) {
                let (_, h, a) = leased.remove(i);
                return Some((h, a));
            }
            hosts
                .iter()
                .find(|h| h.name == j.home)
                .map(|h| (h.name.clone(), h.addr.clone()))
        })
        .collect()
}

/// Migrate `jobs` away from this host, all at once; the ones that cannot move are
/// suspended or left running as `on_fail` says.
async fn evict_jobs(
    agent: &Arc<Agent>,
    reg: &Arc<RegistryClient>,
    jobs: Vec<JobInfo>,
    reason: &str,
    on_fail: OnFail,
) -> EvictReport {
    let t0 = Instant::now();
    let mut report = EvictReport::default();
    if jobs.is_empty() {
        return report;
    }
    info!(jobs = jobs.len(), reason, "evicting foreign jobs");
    let dest = targets(agent, reg, &jobs).await;
    let mut tasks = Vec::new();
    for (j, d) in jobs.into_iter().zip(dest) {
        let (agent, reg, reason) = (agent.clone(), reg.clone(), reason.to_string());
        tasks.push(tokio::spawn(async move {
            let r = match &d {
                Some((to, addr)) => {
                    move_job(
                        &agent,
                        &reg,
                        j.job,
                        to,
                        addr,
                        EventKind::Evicted,
                        &reason,
                        t0,
                    )
                    .await
                }
                None => Err(format!(
                    "no idle host, and its home {} is unknown to the registry",
                    j.home
                )),
            };
            // Stopped at once, not after the other moves: the owner has the host back. A
            // job that another move (the balancer, `wisp migrate`) took first is left to it.
            let busy = matches!(&r, Err(why) if why.contains("already migrating"));
            if let Err(why) = &r {
                if on_fail == OnFail::Suspend && !busy {
                    suspend(&agent, &reg, &j, why).await;
                } else {
                    warn!(job = j.job, "cannot migrate ({why}); it runs on here");
                }
            }
            (j, d.map(|(h, _)| h).unwrap_or_default(), r)
        }));
    }
    for t in tasks {
        let Ok((j, to, r)) = t.await else { continue };
        match r {
            Ok((frozen, total)) => report.moved.push((j.job, to, frozen, total)),
            Err(why) if on_fail == OnFail::Suspend && !why.contains("already migrating") => {
                report.suspended.push((j.job, why))
            }
            Err(why) => report.stayed.push((j.job, why)),
        }
    }
    report.total_ms = t0.elapsed().as_millis() as u64;
    agent
        .stats
        .evictions
        .fetch_add(report.moved.len() as u64, Ordering::Relaxed);
    info!(
        moved = report.moved.len(),
        suspended = report.suspended.len(),
        stayed = report.stayed.len(),
        total_ms = report.total_ms,
        reason,
        "eviction done"
    );
    report
}

/// Stop every process of a job that cannot move, so the owner gets the machine.
async fn suspend(agent: &Arc<Agent>, reg: &RegistryClient, j: &JobInfo, why: &str) {
    let n = signal_sandbox(j.pid as i32, libc::SIGSTOP);
    if let Some(jj) = agent.jobs.lock().unwrap().get_mut(&j.job) {
        jj.suspended = true;
    }
    agent.stats.suspensions.fetch_add(1, Ordering::Relaxed);
    warn!(
        job = j.job,
        event = "suspended",
        processes = n,
        "suspended, not killed: cannot migrate ({why}); resumes when the owner is away"
    );
    let _ = reg
        .record_event(JobEvent {
            at_ms: 0,
            job: j.job,
            kind: EventKind::Suspended,
            from: agent.cfg.host.clone(),
            to: String::new(),
            reason: format!("cannot migrate: {why}"),
            frozen_ms: 0,
            total_ms: 0,
            bytes: 0,
        })
        .await;
}

/// The owner is away: suspended jobs run on.
async fn resume_all(agent: &Arc<Agent>, reg: &RegistryClient) {
    let resumed: Vec<(u64, i32)> = {
        let mut jobs = agent.jobs.lock().unwrap();
        jobs.iter_mut()
            .filter(|(_, j)| j.suspended && j.exit.is_none())
            .map(|(id, j)| {
                j.suspended = false;
                (*id, j.info.pid as i32)
            })
            .collect()
    };
    for (job, pid) in resumed {
        signal_sandbox(pid, libc::SIGCONT);
        info!(job, event = "resumed", "resumed: owner is away again");
        let _ = reg
            .record_event(JobEvent {
                at_ms: 0,
                job,
                kind: EventKind::Resumed,
                from: agent.cfg.host.clone(),
                to: String::new(),
                reason: "owner away again".into(),
                frozen_ms: 0,
                total_ms: 0,
                bytes: 0,
            })
            .await;
    }
}

/// Eviction: checked every `every`, and at once on a `wisp evict` request. While
/// `owner_active()` has held for the policy's grace period, every foreign job leaves (see
/// the module text); while it does not, suspended jobs run on and foreign jobs beyond
/// `max_foreign` are moved away.
pub async fn eviction_loop(
    agent: Arc<Agent>,
    reg: RegistryClient,
    owner_active: impl Fn() -> bool + Send + Sync + 'static,
    every: Duration,
) {
    let reg = Arc::new(reg);
    agent.evict.looping.store(true, Ordering::Relaxed);
    let mut active_since: Option<Instant> = None;
    // Jobs that could not move and were left running: not tried again until the owner's
    // state changes.
    let mut stayed: std::collections::HashSet<u64> = Default::default();
    let me = agent.cfg.host.clone();
    let movable = |stayed: &std::collections::HashSet<u64>| {
        let mut v = agent.foreign_jobs();
        v.retain(|j| !stayed.contains(&j.job));
        v
    };
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = agent.evict.wake.notified() => {}
        }
        let requests = std::mem::take(&mut *agent.evict.requests.lock().unwrap());
        for (reason, tx) in requests {
            let jobs = agent.foreign_jobs();
            let r = evict_jobs(&agent, &reg, jobs, &reason, OnFail::Stay).await;
            let _ = tx.send(r);
        }
        let policy = agent.evict_policy();
        if !owner_active() {
            if active_since.take().is_some() {
                stayed.clear();
            }
            resume_all(&agent, &reg).await;
            if let Some(every) = policy.preflush {
                crate::preflush::tick(&agent, every);
            }
            if let Some(max) = policy.max_foreign {
                let mut jobs = movable(&stayed);
                if jobs.len() > max as usize {
                    // Keep the oldest; the newest arrivals leave.
                    let extra = jobs.split_off(max as usize);
                    let reason = format!("more than {max} foreign jobs on {me}");
                    let r = evict_jobs(&agent, &reg, extra, &reason, OnFail::Stay).await;
                    stayed.extend(r.stayed.iter().map(|(j, _)| *j));
                }
            }
            continue;
        }
        let since = *active_since.get_or_insert_with(|| {
            stayed.clear();
            Instant::now()
        });
        if since.elapsed() < policy.grace {
            continue;
        }
        let jobs = movable(&stayed);
        if jobs.is_empty() {
            continue;
        }
        let on_fail = if policy.suspend_unmigratable {
            OnFail::Suspend
        } else {
            OnFail::Stay
        };
        let r = evict_jobs(
            &agent,
            &reg,
            jobs,
            &format!("owner active on {me}"),
            on_fail,
        )
        .await;
        stayed.extend(r.stayed.iter().map(|(j, _)| *j));
    }
}
