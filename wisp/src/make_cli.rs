//! `wisp make`: make with every recipe on hosts reserved for this build.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use wisp_naming::RegistryClient;
use wisp_rexec::build::{self, BuildHost};

/// Run make with its recipes on idle hosts, reserved for this build while it runs.
///
/// Leases idle hosts from the registry (at most --hosts; a leased host serves this build
/// only, so two builds never share a host), asks each how many CPUs it has, and runs
/// `make -j N SHELL=rexec ARGS...` with N the sum of those CPUs (or -j). Each recipe's rexec
/// goes to the reserved host with the most free CPUs; a host that fails to start a job is
/// skipped for the rest of the build, and one whose owner comes back gets no new jobs. With
/// no idle host, make runs here with -j this host's CPUs. The leases are renewed while
/// make runs and given back when it ends; the exit status is make's.
///
/// Run it inside /wisp (like rexec), with WISP_REGISTRY and WISP_IDENTITY set or --registry
/// and --identity given.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct MakeArgs {
    /// Reserve at most this many hosts (default: every idle host).
    #[arg(long, value_name = "N")]
    hosts: Option<u32>,
    /// Parallel jobs (default: the reserved hosts' CPUs).
    #[arg(short = 'j', value_name = "N")]
    jobs: Option<u32>,
    /// Say which hosts were reserved, and pass -v to every rexec.
    #[arg(short = 'v', long)]
    verbose: bool,
    /// Registry servers, ADDR[,ADDR...] (default $WISP_REGISTRY).
    #[arg(long, value_name = "ADDRS")]
    registry: Option<String>,
    /// This host's identity directory (default $WISP_IDENTITY, else /var/lib/wisp/identity).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Arguments for make (targets, variables, flags).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    args: Vec<OsString>,
}

fn home() -> String {
    std::env::var("WISP_HOST").unwrap_or_else(|_| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    })
}

/// The rexec binary next to this one, else the one in PATH.
fn rexec_path() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("rexec")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("rexec"))
}

/// CPUs of `host`, as a job there sees them (its CPU affinity: a pinned host counts the
/// CPUs it is pinned to); None when the host cannot run the probe.
fn probe_cpus(rexec: &PathBuf, host: &str, key: &PathBuf, registry: &str) -> Result<u32, String> {
    let out = std::process::Command::new(rexec)
        .args(["-T", "--host", host, "--identity"])
        .arg(key)
        .args(["--registry", registry, "nproc"])
        .env_remove(build::BUILD_ENV)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", rexec.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    match (out.status.success(), text.trim().parse::<u32>()) {
        (true, Ok(n)) if n > 0 => Ok(n),
        _ => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
    }
}

pub fn make(a: MakeArgs) -> Result<ExitCode> {
    let key_path = crate::identity_dir(a.identity.as_deref());
    let key = crate::load_identity(Some(&key_path))?;
    let registry = a
        .registry
        .clone()
        .or_else(|| std::env::var("WISP_REGISTRY").ok())
        .unwrap_or_default();
    let servers: Vec<String> = registry
        .split(',')
        .map(|x| x.trim().to_string())
        .filter(|x| !x.is_empty())
        .collect();
    if servers.is_empty() {
        bail!("no registry given; pass --registry ADDR or set WISP_REGISTRY");
    }
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    if !cwd.starts_with("/wisp") {
        bail!(
            "the current directory {} is not inside /wisp: recipes run on other hosts, which see only the cluster namespace",
            cwd.display()
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let home = home();
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let reg = std::sync::Arc::new(
        RegistryClient::new(
            rt.handle().clone(),
            servers.clone(),
            key,
            format!("make@{home}"),
        )
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(10)),
    );
    let leases = rt
        .block_on(reg.allocate_hosts(uid, a.hosts.unwrap_or(64), &home, false))
        .unwrap_or_else(|e| {
            eprintln!("wisp make: registry unavailable ({e}); building here");
            vec![]
        });
    let rexec = rexec_path();
    // Ask every reserved host for its CPUs at once.
    let probes: Vec<_> = leases
        .iter()
        .map(|l| {
            let (rexec, host, key, registry) = (
                rexec.clone(),
                l.host.clone(),
                key_path.clone(),
                registry.clone(),
            );
            std::thread::spawn(move || probe_cpus(&rexec, &host, &key, &registry))
        })
        .collect();
    let mut hosts = Vec::new();
    for (l, p) in leases.iter().zip(probes) {
        match p.join().unwrap_or_else(|_| Err("probe panicked".into())) {
            Ok(cpus) => hosts.push(BuildHost {
                name: l.host.clone(),
                agent: wisp_rexec::agent::agent_addr(&l.addr),
                cpus,
            }),
            Err(e) => eprintln!(
                "wisp make: {} could not start a job ({e}); skipping it",
                l.host
            ),
        }
    }
    let lease_ids: Vec<u64> = leases.iter().map(|l| l.id).collect();
    let local_cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let dir = std::env::temp_dir().join(format!(
        "wisp-make.{}.{:x}",
        std::process::id(),
        rand_suffix()
    ));
    let mut cmd = std::process::Command::new("make");
    if hosts.is_empty() {
        let j = a.jobs.unwrap_or(local_cpus);
        eprintln!("wisp make: no idle host; building here with -j{j}");
        cmd.arg(format!("-j{j}"));
    } else {
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
        build::write_hosts(&dir, &hosts)?;
        let j = a.jobs.unwrap_or_else(|| hosts.iter().map(|h| h.cpus).sum());
        if a.verbose {
            let list: Vec<String> = hosts
                .iter()
                .map(|h| format!("{} ({} CPUs)", h.name, h.cpus))
                .collect();
            eprintln!("wisp make: reserved {}; make -j{j}", list.join(", "));
        }
        let mut shell = rexec.as_os_str().to_owned();
        if a.verbose {
            shell.push(" -v");
        }
        let mut sh = OsString::from("SHELL=");
        sh.push(&shell);
        cmd.arg(format!("-j{j}"))
            .arg(sh)
            .env(build::BUILD_ENV, &dir);
    }
    cmd.args(&a.args);
    // Keep the hosts while make runs: renew the leases, and stop sending jobs to a host
    // whose owner came back (or that went down).
    let keeper = {
        let (reg, ids, dir, names) = (
            reg.clone(),
            lease_ids.clone(),
            dir.clone(),
            hosts.iter().map(|h| h.name.clone()).collect::<Vec<_>>(),
        );
        rt.spawn(async move {
            let mut n = 0u64;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                n += 1;
                if n % 15 == 0 && !ids.is_empty() {
                    let _ = reg.renew_leases(uid, ids.clone()).await;
                }
                if let Ok(r) = reg.read(false).await {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    for name in &names {
                        let away = r.hosts.get(name).is_none_or(|h| {
                            h.down || h.owner_idle_secs(now) < r.policy.min_owner_idle_secs
                        });
                        build::set_away(&dir, name, away);
                    }
                }
            }
        })
    };
    // Ctrl-C goes to make (same process group); we only wait for it to finish.
    let _signals = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        [
            SignalKind::interrupt(),
            SignalKind::terminate(),
            SignalKind::quit(),
            SignalKind::hangup(),
        ]
        .map(|k| signal(k).ok())
    });
    let status = cmd.status().context("cannot run make");
    keeper.abort();
    if !lease_ids.is_empty() {
        let _ = rt.block_on(reg.release_hosts(uid, lease_ids));
    }
    let _ = std::fs::remove_dir_all(&dir);
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0)
}
