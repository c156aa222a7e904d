//! `wispd`: the workstation daemon. Mounts the cluster namespace with FUSE, registers the
//! host with the cluster registry and reports its load and owner activity every few seconds.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use wisp::owner::{owner_file, OwnerMonitor, INPUT_DEVICES};
use wisp_naming::registry::{Load, RegistryError, Role};
use wisp_naming::{NamingError, RegistryClient};

/// The wisp workstation daemon: mounts the cluster namespace at MOUNT and keeps this host
/// known to the cluster registry.
///
/// Every file operation under MOUNT is served by the file server at ADDR, with caches kept
/// consistent by the server's callbacks: a write on any host is seen by a read on any other
/// at once.
///
/// Once mounted, wispd registers the host (name, address, role workstation) with the
/// registry and sends a heartbeat every --heartbeat seconds: load averages and runnable
/// processes from /proc/loadavg, and how long the owner has been away from keyboard and
/// mouse. Owner activity comes from, in this order: the override file written by
/// `wisp owner HOST active|idle` (--owner-file); the input devices (--input-devices), whose
/// key, button and motion events count as the owner; with no input device at all, the host
/// counts as idle since wispd started. A registry that cannot be reached is retried in the
/// background; the mount does not depend on it. A host whose heartbeats stop is marked
/// down by the registry (10 s by default).
///
/// Unmounts on SIGTERM or SIGINT.
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// Read flags from a TOML file first: each key is one of this command's flags by its
    /// long name (`key = "/etc/wisp/cluster.key"`, numbers as numbers, `true` for a flag
    /// without a value, lists for comma-separated flags). Flags given on the command line
    /// win. Example files are in docs/operations.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// File server address, e.g. 10.0.0.1:7070.
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// Where to mount the namespace.
    #[arg(long, value_name = "DIR", default_value = "/wisp")]
    mount: PathBuf,
    /// Cluster key file (mode 0600).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// This host's name (default: the kernel's host name).
    #[arg(long)]
    name: Option<String>,
    /// Seconds a file operation may wait for an unreachable server before failing with EIO.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// FUSE worker threads (requests served in parallel).
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Seconds a written block may stay on this host before it is written back to the
    /// file server (Sprite's delayed write); 0 writes through. fsync, another host opening
    /// the file and unmount write back at once.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    writeback_delay: u64,
    /// Most delayed-write data held in memory, in MiB (writers wait beyond it).
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    dirty_max: u64,
    /// Do not cache names and attributes on this host (every lookup asks the server;
    /// for comparison).
    #[arg(long)]
    no_name_cache: bool,
    /// Most names, attributes and extended attributes cached on this host.
    #[arg(long, value_name = "N", default_value_t = 200_000)]
    cache_entries: usize,
    /// Registry replicas (file servers running with --registry-id), comma separated
    /// (default: the --server address).
    #[arg(long, value_name = "ADDR[,ADDR...]", value_delimiter = ',')]
    registry: Vec<String>,
    /// Address recorded for this host in the registry (default: this host's address toward
    /// the registry, port 7071).
    #[arg(long, value_name = "IP:PORT")]
    advertise: Option<String>,
    /// Seconds between heartbeats.
    #[arg(long, value_name = "SECS", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=60))]
    heartbeat: u64,
    /// Input devices whose events mean the owner is at the keyboard: DIR/PREFIX*, or
    /// `none` (then the host counts as idle since wispd started).
    #[arg(long, value_name = "PATTERN", default_value = INPUT_DEVICES)]
    input_devices: String,
    /// Override file for owner activity (default: /run/wisp-owner/NAME), written by
    /// `wisp owner NAME active|idle`.
    #[arg(long, value_name = "FILE")]
    owner_file: Option<PathBuf>,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Prometheus metrics endpoint (GET /metrics); "none" to disable.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9464")]
    metrics: String,
    /// Do not accept foreign jobs on this host (the job agent is not started).
    #[arg(long)]
    no_agent: bool,
    /// The owner forbids foreign jobs here: the agent runs this host's own jobs but refuses
    /// every job from another host (rexec or migration, EPERM), and the host reports its
    /// owner as present, so the registry never lends it out and eviction sends foreign
    /// jobs away.
    #[arg(long)]
    no_foreign: bool,
    /// Nice value of foreign jobs, so the owner's own work keeps priority.
    #[arg(long, default_value_t = 10)]
    job_nice: i32,
    /// Each foreign job runs in a cgroup of its own: at most this many processes and
    /// threads in it (contains a fork bomb); 0 = no limit.
    #[arg(long, value_name = "N", default_value_t = 512)]
    job_pids_max: u64,
    /// Memory limit of each foreign job's cgroup: MiB, or a percentage of this host's RAM
    /// ("50%"); 0 = no limit. Past it the OOM killer acts inside the job only.
    #[arg(long, value_name = "MIB|PCT%", default_value = "50%")]
    job_memory_max: String,
    /// CPU weight of each foreign job's cgroup on the cgroup v2 scale (1..10000, 100 =
    /// normal; cgroup v1 gets cpu.shares = weight * 1024 / 100); 0 = leave as is.
    #[arg(long, value_name = "W", default_value_t = 20)]
    job_cpu_weight: u32,
    /// The owner counts as back (and foreign jobs are evicted) when idle for less than
    /// this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    evict_below: u64,
    /// The owner must stay active this many milliseconds before foreign jobs leave (so a
    /// bumped mouse does not evict anything).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    evict_grace: u64,
    /// Most foreign jobs this host runs at once: more are refused, an excess is migrated
    /// away (default: no limit).
    #[arg(long, value_name = "N")]
    max_foreign: Option<u32>,
    /// What happens to a foreign job that cannot migrate when the owner comes back:
    /// `suspend` (SIGSTOP until the owner leaves again) or `run` (it keeps running here).
    /// Either way it is reported (log, registry event), never killed.
    #[arg(long, value_name = "WHAT", default_value = "suspend", value_parser = ["suspend", "run"])]
    unmigratable: String,
    /// While the owner is away, write foreign jobs' memory to swap files in /wisp ahead of
    /// an eviction, then every SECS only what they wrote since; eviction then writes only
    /// the rest (off by default: it costs background copying).
    #[arg(long, value_name = "SECS")]
    preflush: Option<f64>,
    /// Balance load: while this host runs more jobs than --balance-slots, move its
    /// long-running jobs to idle hosts, one per round (MOSIX-like; off by default).
    #[arg(long)]
    balance: bool,
    /// Jobs this host runs before it counts as overloaded (default: its CPUs).
    #[arg(long, value_name = "N")]
    balance_slots: Option<usize>,
    /// Seconds between balancing rounds.
    #[arg(long, value_name = "SECS", default_value_t = 5)]
    balance_every: u64,
    /// Only jobs that have run this many seconds are moved by the balancer.
    #[arg(long, value_name = "SECS", default_value_t = 10)]
    balance_min_age: u64,
    /// A job that moved stays at least this many seconds before the balancer moves it again.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    balance_stay: u64,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Load averages and runnable scheduling entities from /proc/loadavg
/// ("0.08 0.03 0.01 2/345 6789").
fn read_load() -> Result<Load> {
    let t = std::fs::read_to_string("/proc/loadavg").context("cannot read /proc/loadavg")?;
    parse_loadavg(&t).with_context(|| format!("unexpected /proc/loadavg contents {t:?}"))
}

fn parse_loadavg(t: &str) -> Option<Load> {
    let f: Vec<&str> = t.split_whitespace().collect();
    let runnable = f.get(3)?.split('/').next()?.parse().ok()?;
    Some(Load {
        load1: f.first()?.parse().ok()?,
        load5: f.get(1)?.parse().ok()?,
        load15: f.get(2)?.parse().ok()?,
        runnable,
    })
}

/// This host's address on the way to `peer` (no packet is sent).
fn local_ip_toward(peer: &str) -> Result<std::net::IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").context("udp socket")?;
    s.connect(peer)
        .with_context(|| format!("no route to the registry at {peer}"))?;
    Ok(s.local_addr()?.ip())
}

/// Register, then heartbeat forever. Errors are logged (once per kind of error, and again
/// when things recover) and retried; the registry losing the host re-registers it.
async fn registry_loop(
    client: RegistryClient,
    name: String,
    addr: String,
    owner: std::sync::Arc<OwnerMonitor>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut registered = false;
    let mut last_err: Option<String> = None;
    let mut report = |r: Result<(), String>, what: &str| match r {
        Ok(()) => {
            if last_err.take().is_some() {
                tracing::info!("registry reachable again: {what} ok");
            }
        }
        Err(e) => {
            if last_err.as_deref() != Some(e.as_str()) {
                tracing::warn!(
                    "registry {what} failed (retrying every {} s): {e}",
                    every.as_secs()
                );
                last_err = Some(e);
            }
        }
    };
    loop {
        tick.tick().await;
        if !registered {
            match client.register_host(&name, &addr, Role::Workstation).await {
                Ok(()) => {
                    registered = true;
                    tracing::info!(host = %name, %addr, "registered with the cluster registry");
                }
                Err(e) => {
                    report(Err(e.to_string()), "registration");
                    continue;
                }
            }
        }
        let load = match read_load() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("{e:#}");
                Load::default()
            }
        };
        let (idle, source) = owner.idle_secs();
        tracing::debug!(idle, source, load1 = load.load1, "heartbeat");
        match client.heartbeat(&name, load, idle).await {
            Ok(()) => report(Ok(()), "heartbeat"),
            Err(NamingError::Registry(RegistryError::UnknownHost { .. })) => {
                tracing::warn!(host = %name, "the registry forgot this host; registering again");
                registered = false;
            }
            Err(e) => report(Err(e.to_string()), "heartbeat"),
        }
    }
}

fn main() -> Result<()> {
    let args = Args::parse_from(wisp::config::args_with_config()?);
    wisp::init_logging(&args.log_level);
    let key = wisp_proto::key::ClusterKey::load(&args.key)?;
    let name = args.name.clone().unwrap_or_else(hostname);
    if name.is_empty() {
        bail!("this host has no name: give --name");
    }
    let registry: Vec<String> = if args.registry.is_empty() {
        vec![args.server.clone()]
    } else {
        args.registry.clone()
    };
    for r in &registry {
        wisp_naming::registry::check_addr("--registry", r).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let advertise = match &args.advertise {
        Some(a) => a.clone(),
        None => {
            let ip = local_ip_toward(&registry[0])
                .context("cannot tell this host's address: give --advertise IP:PORT")?;
            format!("{ip}:{}", wisp::WISPD_PORT)
        }
    };
    wisp_naming::registry::check_addr("--advertise", &advertise)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let devices = match args.input_devices.as_str() {
        "none" | "" => None,
        p => Some(p),
    };
    let mut owner = OwnerMonitor::start(
        args.owner_file.clone().unwrap_or_else(|| owner_file(&name)),
        devices,
    )?;
    owner.no_foreign = args.no_foreign;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    std::fs::create_dir_all(&args.mount)
        .with_context(|| format!("cannot create mount point {}", args.mount.display()))?;
    // The domain table (prefix tables): read from the registry at mount and every 2 s by a
    // background thread of the client; short bounds, as an unreachable registry only
    // delays seeing a new domain.
    let domains_reg = std::sync::Arc::new(
        RegistryClient::new(
            rt.handle().clone(),
            registry.clone(),
            key.clone(),
            format!("{name}-domains"),
        )
        .with_timeouts(Duration::from_secs(2), Duration::from_secs(3)),
    );
    let domains_rt = rt.handle().clone();
    let domains: wisp_fs_client::DomainSource = std::sync::Arc::new(move || {
        domains_rt
            .block_on(domains_reg.domains())
            .map_err(|e| e.to_string())
    });
    let opts = wisp_fs_client::MountOptions {
        domains: Some(domains),
        call_timeout: Duration::from_secs(args.timeout),
        threads: args.threads,
        cache_names: !args.no_name_cache,
        cache_entries: args.cache_entries,
        writeback_delay: Duration::from_secs(args.writeback_delay),
        dirty_max: args.dirty_max << 20,
        ..wisp_fs_client::MountOptions::new(
            args.server.clone(),
            args.mount.clone(),
            key.clone(),
            name.clone(),
        )
    };
    let mounted = wisp_fs_client::mount(rt.handle().clone(), opts)
        .with_context(|| format!("cannot mount {} from {}", args.mount.display(), args.server))?;
    tracing::info!(mount = %args.mount.display(), server = %args.server, "wispd running");
    // Short per-replica bounds: a dead replica (its connection never comes up) costs one
    // call timeout before it is tried last, and a heartbeat must not stall longer than the
    // registry's down-after time (10 s by default) while a new leader is elected.
    let beat = Duration::from_secs(args.heartbeat);
    let client = RegistryClient::new(rt.handle().clone(), registry.clone(), key, name.clone())
        .with_timeouts(Duration::from_secs(3), beat * 2 + Duration::from_secs(4));
    tracing::info!(registry = %registry.join(","), addr = %advertise, "reporting to the cluster registry");
    let owner = std::sync::Arc::new(owner);
    let mut agent_handle = None;
    let mut agent_at_exit = None;
    if !args.no_agent {
        // The job agent: runs foreign jobs (rexec), migrates them, evicts them when the
        // owner comes back.
        let agent = wisp_rexec::agent::Agent::new(wisp_rexec::agent::AgentConfig {
            mount: args.mount.clone(),
            nice: args.job_nice,
            allow_root: true,
            no_foreign: args.no_foreign,
            key: wisp_proto::key::ClusterKey::load(&args.key)?,
            host: name.clone(),
            limits: wisp_rexec::cgroup::JobLimits {
                pids_max: (args.job_pids_max > 0).then_some(args.job_pids_max),
                memory_max: memory_limit(&args.job_memory_max)?,
                cpu_weight: (args.job_cpu_weight > 0).then_some(args.job_cpu_weight.min(10000)),
            },
        });
        agent.set_evict_policy(wisp_rexec::evict::EvictPolicy {
            grace: Duration::from_millis(args.evict_grace),
            max_foreign: args.max_foreign,
            suspend_unmigratable: args.unmigratable == "suspend",
            preflush: args
                .preflush
                .map(|s| Duration::from_secs_f64(s.clamp(0.1, 3600.0))),
        });
        let listen = format!(
            "0.0.0.0:{}",
            advertise.rsplit_once(':').map(|(_, p)| p).unwrap_or("7071")
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind(&listen))
            .with_context(|| format!("cannot listen for jobs on {listen}"))?;
        let svc = std::sync::Arc::new(wisp_rexec::agent::AgentService(agent.clone()));
        rt.spawn(wisp_proto::rpc::serve(
            listener,
            wisp_proto::key::ClusterKey::load(&args.key)?,
            svc,
            std::future::pending::<()>(),
        ));
        let (o2, below) = (owner.clone(), args.evict_below);
        // A registry client of its own for each policy loop (eviction, balancing).
        let loop_reg = |what: &str| -> Result<RegistryClient> {
            Ok(RegistryClient::new(
                rt.handle().clone(),
                registry.clone(),
                wisp_proto::key::ClusterKey::load(&args.key)?,
                format!("{name}-{what}"),
            )
            .with_timeouts(Duration::from_secs(3), Duration::from_secs(10)))
        };
        let evict_reg = loop_reg("evict")?;
        agent_handle = Some(agent.clone());
        agent_at_exit = Some(agent.clone());
        if args.balance {
            let slots = args.balance_slots.unwrap_or_else(|| {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            });
            let balance_reg = loop_reg("balance")?;
            rt.spawn(wisp_rexec::balance::balance_loop(
                agent.clone(),
                balance_reg,
                wisp_rexec::balance::BalanceConfig {
                    slots,
                    every: Duration::from_secs(args.balance_every.max(1)),
                    min_age: Duration::from_secs(args.balance_min_age),
                    stay: Duration::from_secs(args.balance_stay),
                },
            ));
        }
        // The owner's state is read every 100 ms (a small file or an atomic), so eviction
        // starts within 100 ms of the owner's return (plus --evict-grace).
        rt.spawn(wisp_rexec::evict::eviction_loop(
            agent,
            evict_reg,
            move || o2.idle_secs().0 < below,
            Duration::from_millis(100),
        ));
        tracing::info!(%listen, "accepting jobs");
    }
    if args.metrics != "none" {
        let cs = mounted.stats.clone();
        let samples = std::sync::Arc::new(move || {
            use std::sync::atomic::Ordering::Relaxed;
            let rpcs = cs.rpcs.load(Relaxed) as f64;
            let mut v: Vec<wisp::metrics::Sample> = vec![
                (
                    "wisp_client_rpcs_total",
                    "Requests sent to the file server",
                    "counter",
                    rpcs,
                ),
                (
                    "wisp_client_rpc_seconds_total",
                    "Time spent waiting for the file server",
                    "counter",
                    cs.rpc_micros.load(Relaxed) as f64 / 1e6,
                ),
                (
                    "wisp_client_callbacks_total",
                    "Consistency callbacks received from the server",
                    "counter",
                    cs.callbacks.load(Relaxed) as f64,
                ),
                (
                    "wisp_client_read_bytes_total",
                    "Bytes fetched from the server (kernel page-cache hits never reach wispd)",
                    "counter",
                    cs.bytes_read.load(Relaxed) as f64,
                ),
                (
                    "wisp_client_written_bytes_total",
                    "Bytes written to the server (through, or back after a delay)",
                    "counter",
                    cs.bytes_written.load(Relaxed) as f64,
                ),
                (
                    "wisp_client_written_back_bytes_total",
                    "Delayed-write bytes written back to the server",
                    "counter",
                    cs.written_back.load(Relaxed) as f64,
                ),
                (
                    "wisp_client_discarded_bytes_total",
                    "Delayed-write bytes never sent because the file was removed first",
                    "counter",
                    cs.discarded.load(Relaxed) as f64,
                ),
                (
                    "wisp_client_meta_hits_total",
                    "Lookups and attribute fetches answered from this host's cache",
                    "counter",
                    cs.meta_hits.load(Relaxed) as f64,
                ),
            ];
            if let Some(a) = &agent_handle {
                let st = &a.stats;
                v.extend([
                    ("wisp_agent_job_limits", "1 when foreign jobs run in cgroups with resource limits here, 0 when they run without", "gauge", if a.cgroups.enabled() { 1.0 } else { 0.0 }),
                    ("wisp_agent_jobs_running", "Jobs the agent runs here (suspended ones and a frozen copy mid-migration included)", "gauge", a.running() as f64),
                    ("wisp_agent_jobs_started_total", "Jobs started here by rexec", "counter", st.jobs_started.load(Relaxed) as f64),
                    ("wisp_agent_migrations_out_total", "Jobs migrated away from here", "counter", st.migrations_out.load(Relaxed) as f64),
                    ("wisp_agent_migrations_in_total", "Jobs migrated to here", "counter", st.migrations_in.load(Relaxed) as f64),
                    ("wisp_agent_migration_failures_total", "Migrations that failed (the job kept running here)", "counter", st.migration_failures.load(Relaxed) as f64),
                    ("wisp_agent_evictions_total", "Jobs evicted because the owner came back", "counter", st.evictions.load(Relaxed) as f64),
                    ("wisp_agent_pager_faults_total", "Page faults answered from swap files by the lazy pager", "counter", st.pager_faults.load(Relaxed) as f64),
                    ("wisp_agent_pages_pushed_total", "Pages pushed in the background by the lazy pager", "counter", st.pages_pushed.load(Relaxed) as f64),
                    ("wisp_agent_suspensions_total", "Jobs stopped because they could not migrate when the owner came back", "counter", st.suspensions.load(Relaxed) as f64),
                    ("wisp_agent_frozen_seconds_total", "Time jobs were stopped by migrations out of here", "counter", st.frozen_ms.load(Relaxed) as f64 / 1e3),
                    ("wisp_agent_signals_refused_total", "Job signals refused: the asking uid was neither the job's owner nor root", "counter", st.signals_refused.load(Relaxed) as f64),
                    ("wisp_agent_foreign_refused_total", "Foreign jobs refused because the owner forbids them (--no-foreign)", "counter", st.foreign_refused.load(Relaxed) as f64),
                    ("wisp_rpc_refused_connections_total", "Connections refused because a server of this process held its maximum", "counter", wisp_proto::rpc::refused_connections() as f64),
                    ("wisp_rpc_refused_calls_total", "Calls refused because their connection had its maximum in flight", "counter", wisp_proto::rpc::refused_calls() as f64),
                ]);
            }
            v
        });
        let addr = args.metrics.clone();
        rt.spawn(async move {
            if let Err(e) = wisp::metrics::serve(addr.clone(), samples).await {
                tracing::warn!("metrics endpoint {addr}: {e}");
            }
        });
    }
    rt.spawn(registry_loop(client, name, advertise, owner, beat));
    rt.block_on(wisp::terminated());
    if let Some(a) = &agent_at_exit {
        // Only what is empty: jobs still running keep their cgroups.
        a.cgroups.release();
    }
    tracing::info!("unmounting {}", args.mount.display());
    mounted.unmount().context("unmount")?;
    Ok(())
}

/// `--job-memory-max`: MiB, or a percentage of MemTotal; 0 = no limit.
fn memory_limit(v: &str) -> anyhow::Result<Option<u64>> {
    let v = v.trim();
    let bytes = if let Some(p) = v.strip_suffix('%') {
        let pct: f64 = p
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--job-memory-max {v:?}: not a percentage"))?;
        let total_kib: u64 = std::fs::read_to_string("/proc/meminfo")?
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no MemTotal in /proc/meminfo"))?;
        (total_kib as f64 * 1024.0 * pct.clamp(0.0, 100.0) / 100.0) as u64
    } else {
        let mib: u64 = v
            .parse()
            .map_err(|_| anyhow::anyhow!("--job-memory-max {v:?}: not MiB nor a percentage"))?;
        mib << 20
    };
    Ok((bytes > 0).then_some(bytes))
}

#[cfg(test)]
mod tests {
    use super::{memory_limit, parse_loadavg};

    #[test]
    fn job_memory_max() {
        assert_eq!(memory_limit("64").unwrap(), Some(64 << 20));
        assert_eq!(memory_limit("0").unwrap(), None);
        assert_eq!(memory_limit("0%").unwrap(), None);
        let half = memory_limit("50%").unwrap().unwrap();
        let all = memory_limit("100%").unwrap().unwrap();
        assert!(half > 0 && half.abs_diff(all / 2) < 4096, "{half} {all}");
        assert!(memory_limit("lots").is_err());
    }

    #[test]
    fn loadavg() {
        let l = parse_loadavg("0.08 0.03 1.50 2/345 6789\n").unwrap();
        assert_eq!(
            (l.load1, l.load5, l.load15, l.runnable),
            (0.08, 0.03, 1.5, 2)
        );
        assert!(parse_loadavg("0.08 0.03").is_none());
        assert!(parse_loadavg("a b c 1/2 3").is_none());
    }
}
