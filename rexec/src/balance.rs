//! Load balancing in the manner of MOSIX (`wispd --balance`, off by default): a host that
//! runs more jobs than it has slots moves its long-running jobs, one per round, to idle
//! hosts the registry hands out.
//!
//! Load here is the number of jobs the agent runs (each one a process tree started by
//! rexec), not the load average: the load average counts the owner's own work too, which is
//! eviction's business, and on the simulated cluster every host shares one kernel and so
//! one load average. Hysteresis keeps jobs from bouncing: only a job that has run for
//! `min_age` is a candidate, and a job that moved stays where it is for `stay` (both from
//! the registry's job record: `started_ms`, `moved_ms`). Each move is recorded like an
//! eviction (registry event `balanced`, log line with the timings).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tracing::{debug, info};
use wisp_naming::registry::EventKind;
use wisp_naming::RegistryClient;

use crate::agent::Agent;

/// When a host counts as overloaded, and how long jobs stay put.
#[derive(Debug, Clone)]
pub struct BalanceConfig {
    /// Jobs this host runs without counting as overloaded.
    pub slots: usize,
    /// Time between rounds (each round moves one job at most).
    pub every: Duration,
    /// Only jobs that have run this long move ("long-running").
    pub min_age: Duration,
    /// A job that moved stays at least this long.
    pub stay: Duration,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One round: if overloaded, move the candidate that has been here longest to an idle host.
/// Returns the job moved and where.
pub async fn balance_once(
    agent: &Arc<Agent>,
    reg: &RegistryClient,
    cfg: &BalanceConfig,
) -> Option<(u64, String)> {
    let me = agent.cfg.host.clone();
    let here: Vec<(u64, u32)> = {
        let jobs = agent.jobs.lock().unwrap();
        jobs.values()
            .filter(|j| j.exit.is_none() && j.moved.is_none() && !j.migrating && !j.suspended)
            .map(|j| (j.info.job, j.info.uid))
            .collect()
    };
    if here.len() <= cfg.slots {
        return None;
    }
    let registry = reg
        .read(false)
        .await
        .map_err(|e| debug!("balance: registry unavailable: {e}"))
        .ok()?;
    let now = now_ms().max(registry.clock_ms);
    let min_age = cfg.min_age.as_millis() as u64;
    let stay = cfg.stay.as_millis() as u64;
    // (job, uid, ms on this host)
    let mut cands: Vec<(u64, u32, u64)> = here
        .iter()
        .filter_map(|(id, uid)| {
            let r = registry.jobs.get(id)?;
            if r.current_host != me || r.ended_ms.is_some() {
                return None;
            }
            let age = now.saturating_sub(r.started_ms);
            let here_for = now.saturating_sub(r.moved_ms.unwrap_or(r.started_ms));
            let settled = r.moved_ms.is_none() || here_for >= stay;
            (age >= min_age && settled).then_some((*id, *uid, here_for))
        })
        .collect();
    cands.sort_by_key(|c| std::cmp::Reverse(c.2));
    let (job, uid, _) = *cands.first()?;
    let lease = reg
        .allocate_hosts(uid, 1, &me, false)
        .await
        .ok()?
        .into_iter()
        .next()?;
    let reason = format!("{} jobs on {me} > {} slots", here.len(), cfg.slots);
    let r = crate::evict::move_job(
        agent,
        reg,
        job,
        &lease.host,
        &lease.addr,
        EventKind::Balanced,
        &reason,
        Instant::now(),
    )
    .await;
    r.ok().map(|_| (job, lease.host))
}

/// Balance forever (`wispd --balance`).
pub async fn balance_loop(agent: Arc<Agent>, reg: RegistryClient, cfg: BalanceConfig) {
    info!(
        slots = cfg.slots,
        every_ms = cfg.every.as_millis() as u64,
        "load balancing on"
    );
    loop {
        tokio::time::sleep(cfg.every).await;
        balance_once(&agent, &reg, &cfg).await;
    }
}
