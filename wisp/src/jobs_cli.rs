//! `wisp ps`, `wisp kill`, `wisp migrate`, `wisp evict`, `wisp events`, `wisp top`: one
//! view of every job in the cluster, and moving them.
//!
//! A job's global id is `HOME.N`: the host it was started from and the registry's number
//! for it. It never changes, wherever the job moves; every command takes it (or just N).

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use wisp_naming::registry::{Job, JobEvent, JobState, Registry, Role};
use wisp_proto::msg::{JobStat, Request, Response};
use wisp_proto::rpc::RpcClient;

use wisp_rexec::agent::agent_addr;

use crate::registry_cli::{connect, Conn, RegistryOpts};

/// Move a running job to another host while it runs.
///
/// The job's current host freezes it, writes its memory and state to a swap file under
/// /wisp/.swap/JOB.NONCE/ (one directory per move), and the target rebuilds it there; the job keeps its pid, its open
/// files in /wisp and its stdio pipes (a rexec waiting for it follows it). If the target
/// fails, the job resumes where it was. Without a HOST, the registry picks an idle one.
/// Prints how long the job was frozen; the move is recorded (`wisp events`).
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The job id, HOME.N or N (see `wisp ps`).
    pub job: String,
    /// Host to move the job to (default: an idle host the registry picks).
    #[arg(conflicts_with = "to")]
    pub host: Option<String>,
    /// Host to move the job to (same as HOST).
    #[arg(long)]
    pub to: Option<String>,
    /// Let the job run on the target before its memory arrives (demand paging over
    /// userfaultfd from the swap file; the rest streams in the background).
    #[arg(long, conflicts_with = "precopy")]
    pub lazy: bool,
    /// Copy memory while the job still runs, then freeze briefly for what changed
    /// (implies lazy paging on the target). Best for big jobs.
    #[arg(long)]
    pub precopy: bool,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

/// Every job in the cluster: global id, home, the host it runs on now, state, CPU time and
/// memory there, and how often it migrated (also: `wisp jobs`).
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Also list jobs that have ended.
    #[arg(long)]
    pub all: bool,
    /// Refresh every N seconds, like top (Ctrl-C to stop).
    #[arg(long, value_name = "N")]
    pub watch: Option<u64>,
    /// Leave out CPU and memory (no agent is asked; only the registry).
    #[arg(long)]
    pub no_usage: bool,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

/// Migrate every foreign job off HOST now, as if its owner had come back.
///
/// Each job goes to an idle host the registry picks, or home. Jobs that cannot migrate keep
/// running on HOST and are listed. Prints where each job went and how long it took.
#[derive(Args, Debug)]
pub struct EvictArgs {
    /// The workstation to clear.
    pub host: String,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

/// Recent migrations, evictions, suspensions and resumptions, oldest first, with the reason
/// and the timings.
#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only this job (HOME.N or N).
    #[arg(long)]
    pub job: Option<String>,
    /// At most this many (the newest).
    #[arg(short = 'n', long, default_value_t = 50)]
    pub last: usize,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

/// A live view of the cluster: hosts (load, owner, foreign jobs), every job, and the
/// latest migrations as they happen.
#[derive(Args, Debug)]
pub struct TopArgs {
    /// Seconds between refreshes.
    #[arg(short = 'd', long, default_value_t = 1.0)]
    pub delay: f64,
    /// Stop after this many screens (default: until Ctrl-C).
    #[arg(short = 'n', long)]
    pub iterations: Option<u64>,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

/// The global id of a job: `HOME.N`.
pub fn job_name(j: &Job) -> String {
    format!("{}.{}", j.home_host, j.id)
}

/// Parse `HOME.N` or `N`.
pub fn parse_job(s: &str) -> Result<(Option<String>, u64)> {
    let (home, n) = match s.rsplit_once('.') {
        Some((h, n)) => (Some(h.to_string()), n),
        None => (None, s),
    };
    let n = n
        .parse()
        .map_err(|_| anyhow!("bad job id {s:?}: expected HOME.N (see `wisp ps`) or N"))?;
    Ok((home, n))
}

/// The registry's record of job `id` (HOME.N or N), checking the home if given.
fn find_job<'a>(reg: &'a Registry, id: &str) -> Result<&'a Job> {
    let (home, n) = parse_job(id)?;
    let j = reg
        .jobs
        .get(&n)
        .ok_or_else(|| anyhow!("no job {id} in the registry (see `wisp ps`)"))?;
    if let Some(h) = home {
        if h != j.home_host {
            bail!("job {n} is {}, not {id}", job_name(j));
        }
    }
    Ok(j)
}

fn cluster_key(a: &RegistryOpts) -> Result<wisp_proto::key::ClusterKey> {
    Ok(wisp_proto::key::ClusterKey::load(
        &crate::registry_cli::key_path(a)?,
    )?)
}

fn agent_client(
    c: &Conn,
    key: &wisp_proto::key::ClusterKey,
    addr: &str,
    who: &str,
    t: Duration,
) -> RpcClient {
    RpcClient::start(
        c.rt.handle().clone(),
        agent_addr(addr),
        key.clone(),
        who.into(),
        t,
        Arc::new(|_| Ok(())),
    )
}

pub fn migrate(a: MigrateArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-migrate")?;
    let reg = c.run(c.client.read(true))?;
    let job = find_job(&reg, &a.job)?.clone();
    let name = job_name(&job);
    if job.ended_ms.is_some() {
        bail!("job {name} has ended");
    }
    let from = reg.hosts.get(&job.current_host).ok_or_else(|| {
        anyhow!(
            "job {name} runs on {}, which the registry does not know",
            job.current_host
        )
    })?;
    let (to_name, to_addr) = match a.host.or(a.to) {
        Some(h) => {
            let to = reg
                .hosts
                .get(&h)
                .ok_or_else(|| anyhow!("no host {h} (see `wisp hosts`)"))?;
            (to.name.clone(), to.addr.clone())
        }
        None => {
            let l = c
                .run(c.client.allocate_hosts(job.owner_uid, 1, &from.name, false))?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("no idle host to move job {name} to; name one"))?;
            (l.host, l.addr)
        }
    };
    if from.name == to_name {
        bail!("job {name} already runs on {to_name}");
    }
    let key = cluster_key(&a.reg)?;
    let t0 = std::time::Instant::now();
    c.run(
        c.client
            .job_move(job.id, &to_name, wisp_naming::registry::MovePhase::Begin),
    )?;
    // Longer than the source agent's own wait for the target (600 s), so the registry is
    // told the outcome the agents agreed on.
    let agent = agent_client(
        &c,
        &key,
        &from.addr,
        "wisp-migrate",
        Duration::from_secs(660),
    );
    let r = c.rt.block_on(agent.call(Request::MigrateOut {
        job: job.id,
        to_host: to_name.clone(),
        to_addr: agent_addr(&to_addr),
        mode: if a.precopy {
            wisp_proto::msg::MigrateMode::PreCopy
        } else if a.lazy {
            wisp_proto::msg::MigrateMode::Lazy
        } else {
            wisp_proto::msg::MigrateMode::Eager
        },
    }));
    let event = |kind, to: &str, reason: String, frozen_ms, bytes| JobEvent {
        at_ms: 0,
        job: job.id,
        kind,
        from: from.name.clone(),
        to: to.to_string(),
        reason,
        frozen_ms,
        total_ms: t0.elapsed().as_millis() as u64,
        bytes,
    };
    match r {
        Ok(Response::Migrated {
            pid,
            frozen_ms,
            bytes,
            total_ms,
        }) => {
            c.run(
                c.client
                    .job_move(job.id, &to_name, wisp_naming::registry::MovePhase::Commit),
            )?;
            let ev = event(
                wisp_naming::registry::EventKind::Migrated,
                &to_name,
                "wisp migrate".into(),
                frozen_ms,
                bytes,
            );
            if let Err(e) = c.run(c.client.record_event(ev)) {
                eprintln!("wisp: the move is not in the registry's events: {e:#}");
            }
            println!(
                "job {name} moved {} -> {to_name}: pid {pid} there, frozen {frozen_ms} ms, {:.1} MiB of state, {total_ms} ms in all",
                from.name,
                bytes as f64 / (1 << 20) as f64,
            );
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let _ = c.run(c.client.job_move(
                job.id,
                &to_name,
                wisp_naming::registry::MovePhase::Abort,
            ));
            let why = match other {
                Err(e) => e.to_string(),
                Ok(r) => format!("unexpected reply {r:?}"),
            };
            let ev = event(
                wisp_naming::registry::EventKind::Failed,
                &to_name,
                format!("wisp migrate: {why}"),
                0,
                0,
            );
            let _ = c.run(c.client.record_event(ev));
            Err(anyhow!("{why}")).context(format!("job {name} stays on {}", from.name))
        }
    }
}

/// The registry (a linearizable read, so every host sees the same) and, unless `usage` is
/// false, what each job's current host says about it.
fn snapshot(
    c: &Conn,
    key: &wisp_proto::key::ClusterKey,
    usage: bool,
) -> Result<(Registry, HashMap<u64, JobStat>)> {
    let reg = c.run(c.client.read(true))?;
    let mut stats = HashMap::new();
    if !usage {
        return Ok((reg, stats));
    }
    let hosts: Vec<_> = reg
        .hosts
        .values()
        .filter(|h| h.role == Role::Workstation && !h.down)
        .filter(|h| {
            reg.jobs
                .values()
                .any(|j| j.ended_ms.is_none() && j.current_host == h.name)
        })
        .collect();
    let calls: Vec<_> = hosts
        .iter()
        .map(|h| {
            let cl = agent_client(c, key, &h.addr, "wisp-ps", Duration::from_secs(2));
            async move { cl.call(Request::JobStats).await }
        })
        .collect();
    for r in c.rt.block_on(futures::future::join_all(calls)) {
        if let Ok(Response::JobStats(v)) = r {
            stats.extend(v.into_iter().map(|s| (s.job, s)));
        }
    }
    Ok((reg, stats))
}

fn state_name(j: &Job, st: Option<&JobStat>) -> String {
    match &j.state {
        JobState::Running if st.is_some_and(|s| s.suspended) => "suspended".into(),
        JobState::Running => "running".into(),
        JobState::Migrating => format!("->{}", j.migrating_to.clone().unwrap_or_default()),
        JobState::Done { exit_status } => format!("exit:{exit_status}"),
    }
}

fn job_table(reg: &Registry, stats: &HashMap<u64, JobStat>, all: bool, usage: bool) -> String {
    use std::fmt::Write;
    let mut out = format!(
        "{:<20} {:>6} {:<10} {:<10} {:<12} {:>8} {:>8} {:>4} CMD\n",
        "ID", "UID", "HOME", "HOST", "STATE", "CPU", "MEM", "MIGR"
    );
    for j in reg.jobs.values().filter(|j| all || j.ended_ms.is_none()) {
        let st = stats.get(&j.id).filter(|_| j.ended_ms.is_none());
        let (cpu, mem) = match st {
            Some(s) => (
                format!("{:.1}s", s.cpu_ms as f64 / 1e3),
                format!("{:.1}M", s.rss_kb as f64 / 1024.0),
            ),
            None if usage => ("?".into(), "?".into()),
            None => ("-".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<20} {:>6} {:<10} {:<10} {:<12} {:>8} {:>8} {:>4} {}",
            job_name(j),
            j.owner_uid,
            j.home_host,
            j.current_host,
            state_name(j, st),
            cpu,
            mem,
            j.migrations,
            st.map(|s| s.argv0.as_str()).unwrap_or("")
        );
    }
    out
}

fn event_line(reg: &Registry, e: &JobEvent) -> String {
    let name = reg
        .jobs
        .get(&e.job)
        .map(job_name)
        .unwrap_or_else(|| e.job.to_string());
    let secs = e.at_ms / 1000;
    let when = format!(
        "{:02}:{:02}:{:02}.{:03}",
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
        e.at_ms % 1000
    );
    let path = if e.to.is_empty() {
        e.from.clone()
    } else {
        format!("{} -> {}", e.from, e.to)
    };
    let timing = if e.total_ms > 0 || e.frozen_ms > 0 {
        format!(
            " frozen {} ms, {} ms in all, {:.1} MiB",
            e.frozen_ms,
            e.total_ms,
            e.bytes as f64 / (1 << 20) as f64
        )
    } else {
        String::new()
    };
    format!(
        "{when} {:<10} {:<16} {path}:{timing} ({})",
        e.kind.name(),
        name,
        e.reason
    )
}

pub fn jobs(a: JobsArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-jobs")?;
    let key = if a.no_usage {
        None
    } else {
        Some(cluster_key(&a.reg)?)
    };
    loop {
        let (reg, stats) = match &key {
            Some(k) => snapshot(&c, k, true)?,
            None => (c.run(c.client.read(true))?, HashMap::new()),
        };
        if a.watch.is_some() {
            print!("\x1b[H\x1b[2J");
        }
        print!("{}", job_table(&reg, &stats, a.all, key.is_some()));
        match a.watch {
            Some(n) => std::thread::sleep(Duration::from_secs(n.max(1))),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

pub fn events(a: EventsArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-events")?;
    let reg = c.run(c.client.read(true))?;
    let only = a.job.as_deref().map(parse_job).transpose()?.map(|(_, n)| n);
    let ev: Vec<&JobEvent> = reg
        .events
        .iter()
        .filter(|e| only.is_none_or(|n| e.job == n))
        .collect();
    if ev.is_empty() {
        println!("no migration, eviction or suspension recorded yet");
    }
    for e in &ev[ev.len().saturating_sub(a.last)..] {
        println!("{}", event_line(&reg, e));
    }
    Ok(ExitCode::SUCCESS)
}

pub fn evict(a: EvictArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-evict")?;
    let reg = c.run(c.client.read(false))?;
    let h = reg
        .hosts
        .get(&a.host)
        .ok_or_else(|| anyhow!("no host {} (see `wisp hosts`)", a.host))?;
    let key = cluster_key(&a.reg)?;
    let agent = agent_client(&c, &key, &h.addr, "wisp-evict", Duration::from_secs(660));
    let r =
        c.rt.block_on(agent.call(Request::Evict {
            reason: "wisp evict".into(),
        }))
        .map_err(|e| anyhow!("{e}"))
        .with_context(|| format!("evict {}", a.host))?;
    let Response::Evicted(r) = r else {
        bail!("unexpected reply {r:?}");
    };
    let reg = c.run(c.client.read(false))?;
    let name = |id: u64| {
        reg.jobs
            .get(&id)
            .map(job_name)
            .unwrap_or_else(|| id.to_string())
    };
    for (j, to, frozen, total) in &r.moved {
        println!(
            "job {} moved {} -> {to}: frozen {frozen} ms, {total} ms in all",
            name(*j),
            a.host
        );
    }
    for (j, why) in r.stayed.iter().chain(&r.suspended) {
        println!("job {} stays on {}: {why}", name(*j), a.host);
    }
    println!(
        "{}: {} foreign jobs moved, {} stayed, in {} ms",
        a.host,
        r.moved.len(),
        r.stayed.len() + r.suspended.len(),
        r.total_ms
    );
    Ok(if r.stayed.is_empty() && r.suspended.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn top(a: TopArgs) -> Result<ExitCode> {
    use std::fmt::Write;
    let c = connect(&a.reg, "wisp-top")?;
    let key = cluster_key(&a.reg)?;
    let mut n = 0;
    loop {
        let (reg, stats) = snapshot(&c, &key, true)?;
        let now = crate::registry_cli::now_ms().max(reg.clock_ms);
        let mut s = String::new();
        let running = reg.jobs.values().filter(|j| j.ended_ms.is_none()).count();
        let _ = writeln!(
            s,
            "wisp top: {} hosts, {running} jobs, {} moves recorded",
            reg.hosts.len(),
            reg.events.len()
        );
        let _ = writeln!(
            s,
            "\n{:<12} {:<5} {:<8} {:>6} {:>5} {:>7}",
            "HOST", "STATE", "OWNER", "LOAD1", "JOBS", "FOREIGN"
        );
        for h in reg.hosts.values().filter(|h| h.role == Role::Workstation) {
            let jobs = reg
                .jobs
                .values()
                .filter(|j| j.ended_ms.is_none() && j.current_host == h.name)
                .count();
            let _ = writeln!(
                s,
                "{:<12} {:<5} {:<8} {:>6.2} {:>5} {:>7}",
                h.name,
                if h.down { "down" } else { "up" },
                crate::registry_cli::owner_state(h.owner_idle_secs(now)),
                h.load.load1,
                jobs,
                h.foreign_jobs
            );
        }
        let _ = writeln!(s);
        s.push_str(&job_table(&reg, &stats, false, true));
        let _ = writeln!(s, "\nlatest moves:");
        for e in &reg.events[reg.events.len().saturating_sub(10)..] {
            let _ = writeln!(s, "  {}", event_line(&reg, e));
        }
        print!("\x1b[H\x1b[2J{s}");
        n += 1;
        if a.iterations.is_some_and(|m| n >= m) {
            return Ok(ExitCode::SUCCESS);
        }
        std::thread::sleep(Duration::from_secs_f64(a.delay.max(0.1)));
    }
}

/// Send a signal to a job wherever it runs now (default SIGTERM).
#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal number or name (TERM, INT, KILL, HUP, STOP, CONT, USR1, ...).
    #[arg(short = 's', long = "signal", default_value = "TERM")]
    pub signal: String,
    /// The job id, HOME.N or N (see `wisp ps`).
    pub job: String,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

fn signal_number(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        return Ok(n);
    }
    let name = s.trim_start_matches("SIG").to_ascii_uppercase();
    Ok(match name.as_str() {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "TERM" => libc::SIGTERM,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "STOP" => libc::SIGSTOP,
        "CONT" => libc::SIGCONT,
        "TSTP" => libc::SIGTSTP,
        "WINCH" => libc::SIGWINCH,
        "ALRM" => libc::SIGALRM,
        _ => bail!("unknown signal {s}; use a number or a name like TERM, INT, KILL"),
    })
}

pub fn kill(a: KillArgs) -> Result<ExitCode> {
    let sig = signal_number(&a.signal)?;
    let c = connect(&a.reg, "wisp-kill")?;
    let key = cluster_key(&a.reg)?;
    // A job may move between the lookup and the signal: follow it (a few hops at most).
    for _ in 0..5 {
        let reg = c.run(c.client.read(true))?;
        let job = find_job(&reg, &a.job)?;
        let name = job_name(job);
        if job.ended_ms.is_some() {
            bail!("job {name} has ended");
        }
        let h = reg
            .hosts
            .get(&job.current_host)
            .ok_or_else(|| anyhow!("job {name} runs on unknown host {}", job.current_host))?;
        // SAFETY: getuid(2) cannot fail.
        let uid = unsafe { libc::getuid() };
        if uid != 0 && uid != job.owner_uid {
            bail!(
                "permission denied: job {name} belongs to uid {}; only its owner or root may signal it (you are uid {uid})",
                job.owner_uid
            );
        }
        let agent = agent_client(&c, &key, &h.addr, "wisp-kill", Duration::from_secs(10));
        match c.rt.block_on(agent.call(Request::JobSignal {
            job: job.id,
            signal: sig,
            uid,
        })) {
            Ok(Response::Ok) => {
                println!("signal {sig} sent to job {name} on {}", h.name);
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Moved { .. }) => std::thread::sleep(Duration::from_millis(200)),
            Ok(other) => bail!("unexpected reply {other:?}"),
            Err(e) => {
                return Err(anyhow!("{e}")).context(format!("signal job {name} on {}", h.name))
            }
        }
    }
    bail!("job {} kept moving; try again", a.job)
}

#[cfg(test)]
mod tests {
    use super::parse_job;

    #[test]
    fn job_ids() {
        assert_eq!(parse_job("ws1.7").unwrap(), (Some("ws1".into()), 7));
        assert_eq!(parse_job("a.b.12").unwrap(), (Some("a.b".into()), 12));
        assert_eq!(parse_job("12").unwrap(), (None, 12));
        assert!(parse_job("ws1").is_err() && parse_job("ws1.x").is_err());
    }
}
