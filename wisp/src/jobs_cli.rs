//! `wisp jobs` and `wisp migrate`: where jobs run, and moving them.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use wisp_proto::msg::{Request, Response};
use wisp_proto::rpc::RpcClient;

use wisp_rexec::agent::agent_addr;

use crate::registry_cli::{connect, RegistryOpts};

/// Move a running job to another host while it runs.
///
/// The job's current host freezes it, writes its memory and state to a swap file under
/// /wisp/.swap/JOB.NONCE/ (one directory per move), and the target rebuilds it there; the job keeps its pid, its open
/// files in /wisp and its stdio pipes (a rexec waiting for it follows it). If the target
/// fails, the job resumes where it was. Prints how long the job was frozen.
#[derive(Args, Debug)]
pub struct MigrateArgs {
    /// The job id (see `wisp jobs`).
    pub job: u64,
    /// Host to move the job to.
    #[arg(long)]
    pub to: String,
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

/// Jobs started by rexec (or migrated), with the host each runs on now.
#[derive(Args, Debug)]
pub struct JobsArgs {
    /// Also list jobs that have ended.
    #[arg(long)]
    pub all: bool,
    /// Refresh every N seconds, like top (Ctrl-C to stop).
    #[arg(long, value_name = "N")]
    pub watch: Option<u64>,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

pub fn migrate(a: MigrateArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-migrate")?;
    let jobs = c.run(c.client.jobs())?;
    let job = jobs
        .iter()
        .find(|j| j.id == a.job)
        .ok_or_else(|| anyhow!("no job {} in the registry (see `wisp jobs`)", a.job))?;
    let hosts = c.run(c.client.hosts())?;
    let from = hosts
        .iter()
        .find(|h| h.name == job.current_host)
        .ok_or_else(|| {
            anyhow!(
                "job {} runs on {}, which the registry does not know",
                a.job,
                job.current_host
            )
        })?;
    let to = hosts
        .iter()
        .find(|h| h.name == a.to)
        .ok_or_else(|| anyhow!("no host {} (see `wisp hosts`)", a.to))?;
    if from.name == to.name {
        bail!("job {} already runs on {}", a.job, to.name);
    }
    let key = wisp_proto::key::ClusterKey::load(&crate::registry_cli::key_path(&a.reg)?)?;
    c.run(
        c.client
            .job_move(a.job, &to.name, wisp_naming::registry::MovePhase::Begin),
    )?;
    // Longer than the source agent's own wait for the target (600 s), so the registry is
    // told the outcome the agents agreed on.
    let agent = RpcClient::start(
        c.rt.handle().clone(),
        agent_addr(&from.addr),
        key,
        "wisp-migrate".into(),
        Duration::from_secs(660),
        Arc::new(|_| Ok(())),
    );
    let r = c.rt.block_on(agent.call(Request::MigrateOut {
        job: a.job,
        to_host: to.name.clone(),
        to_addr: agent_addr(&to.addr),
        mode: if a.precopy {
            wisp_proto::msg::MigrateMode::PreCopy
        } else if a.lazy {
            wisp_proto::msg::MigrateMode::Lazy
        } else {
            wisp_proto::msg::MigrateMode::Eager
        },
    }));
    match r {
        Ok(Response::Migrated {
            pid,
            frozen_ms,
            bytes,
            total_ms,
        }) => {
            c.run(
                c.client
                    .job_move(a.job, &to.name, wisp_naming::registry::MovePhase::Commit),
            )?;
            println!(
                "job {} moved {} -> {}: pid {} there, frozen {} ms, {:.1} MiB of state, {} ms in all",
                a.job,
                from.name,
                to.name,
                pid,
                frozen_ms,
                bytes as f64 / (1 << 20) as f64,
                total_ms
            );
            Ok(ExitCode::SUCCESS)
        }
        other => {
            let _ = c.run(c.client.job_move(
                a.job,
                &to.name,
                wisp_naming::registry::MovePhase::Abort,
            ));
            let why = match other {
                Err(e) => e.to_string(),
                Ok(r) => format!("unexpected reply {r:?}"),
            };
            Err(anyhow!("{why}")).context(format!("job {} stays on {}", a.job, from.name))
        }
    }
}

pub fn jobs(a: JobsArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-jobs")?;
    loop {
        let jobs = c.run(c.client.jobs())?;
        if a.watch.is_some() {
            print!("\x1b[H\x1b[2J");
        }
        println!(
            "{:<20} {:>6} {:<8} {:<8} {:<10} MIGRATING",
            "JOB", "UID", "HOME", "HOST", "STATE"
        );
        for j in jobs.iter().filter(|j| a.all || j.ended_ms.is_none()) {
            println!(
                "{:<20} {:>6} {:<8} {:<8} {:<10} {}",
                j.id,
                j.owner_uid,
                j.home_host,
                j.current_host,
                match &j.state {
                    wisp_naming::registry::JobState::Running => "running".to_string(),
                    wisp_naming::registry::JobState::Migrating => "migrating".to_string(),
                    wisp_naming::registry::JobState::Done { exit_status } =>
                        format!("exit:{exit_status}"),
                },
                j.migrating_to.clone().unwrap_or_default()
            );
        }
        match a.watch {
            Some(n) => std::thread::sleep(Duration::from_secs(n.max(1))),
            None => return Ok(ExitCode::SUCCESS),
        }
    }
}

/// Send a signal to a job wherever it runs now (default SIGTERM).
#[derive(Args, Debug)]
pub struct KillArgs {
    /// Signal number or name (TERM, INT, KILL, HUP, STOP, CONT, USR1, ...).
    #[arg(short = 's', long = "signal", default_value = "TERM")]
    pub signal: String,
    /// The job id (see `wisp jobs`).
    pub job: u64,
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
    let key = wisp_proto::key::ClusterKey::load(&crate::registry_cli::key_path(&a.reg)?)?;
    // A job may move between the lookup and the signal: follow it (a few hops at most).
    for _ in 0..5 {
        let jobs = c.run(c.client.jobs())?;
        let job = jobs
            .iter()
            .find(|j| j.id == a.job && j.ended_ms.is_none())
            .ok_or_else(|| anyhow!("no running job {} (see `wisp jobs`)", a.job))?;
        let hosts = c.run(c.client.hosts())?;
        let h = hosts
            .iter()
            .find(|h| h.name == job.current_host)
            .ok_or_else(|| anyhow!("job {} runs on unknown host {}", a.job, job.current_host))?;
        let agent = RpcClient::start(
            c.rt.handle().clone(),
            agent_addr(&h.addr),
            key.clone(),
            "wisp-kill".into(),
            Duration::from_secs(10),
            Arc::new(|_| Ok(())),
        );
        match c.rt.block_on(agent.call(Request::JobSignal {
            job: a.job,
            signal: sig,
        })) {
            Ok(Response::Ok) => {
                println!("signal {sig} sent to job {} on {}", a.job, h.name);
                return Ok(ExitCode::SUCCESS);
            }
            Ok(Response::Moved { .. }) => std::thread::sleep(Duration::from_millis(200)),
            Ok(other) => bail!("unexpected reply {other:?}"),
            Err(e) => {
                return Err(anyhow!("{e}")).context(format!("signal job {} on {}", a.job, h.name))
            }
        }
    }
    bail!("job {} kept moving; try again", a.job)
}
