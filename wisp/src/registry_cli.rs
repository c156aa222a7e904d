//! `wisp hosts`, `wisp domains`, `wisp registry status|add|remove|policy` and `wisp owner`:
//! the command-line face of the cluster registry (naming crate), one clap struct per
//! subcommand and one thin function each over [`wisp_naming::RegistryClient`].
//!
//! Every command finds the registry through [`RegistryOpts`]: `--registry ADDR[,ADDR...]`
//! (the file servers hosting replicas), or `--cluster NAME` for a simulated cluster made by
//! `wisp cluster up` (its servers, its key; the command then joins the cluster's network
//! namespace first, which needs root, because the simulated addresses exist only there).
//! Without either, the command says so and stops.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use wisp_naming::registry::{Host, IdlePolicy, RegistryError, Role};
use wisp_naming::{NamingError, NodeStatus, RegistryClient};

use crate::owner::{now_secs, owner_file, write_override, Override};

/// How to reach the registry (shared by every registry command).
#[derive(Args, Debug, Clone)]
pub struct RegistryOpts {
    /// Registry replicas to ask: the file servers started with --registry-id, as ip:port,
    /// comma separated. Any one that answers will do; the others are fallbacks.
    #[arg(
        long,
        value_name = "ADDR[,ADDR...]",
        value_delimiter = ',',
        global = true
    )]
    pub registry: Vec<String>,
    /// Use the simulated cluster NAME (from `wisp cluster up`): its servers are the registry
    /// and its key is the key. Joins the cluster's network namespace (needs root).
    #[arg(long, value_name = "NAME", global = true)]
    pub cluster: Option<String>,
    /// This host's identity directory (default: $WISP_IDENTITY, else /var/lib/wisp/identity;
    /// with --cluster, the simulated cluster's srv1).
    #[arg(long, value_name = "DIR", global = true)]
    pub identity: Option<PathBuf>,
}

/// Hosts known to the cluster registry: state, load, owner idle time, foreign jobs.
///
/// One line per host: name, role, address of its wispd, state (up, or down when its
/// heartbeats stopped), load averages (1/5/15 min) and runnable processes, how long its
/// owner has been away from keyboard and mouse, jobs from other hosts running there, and
/// the age of its last heartbeat. Read from the first replica that answers (a hint: it
/// may lag the leader by a heartbeat or two).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct HostsArgs {
    #[command(flatten)]
    pub reg: RegistryOpts,
    /// Only the hosts an allocation could hand out now: up, owner away long enough, load
    /// under the limits (see `wisp registry policy`), not leased already. Longest idle first.
    #[arg(long)]
    pub idle: bool,
    /// Ask the leader (a linearizable read) instead of the first replica that answers.
    #[arg(long)]
    pub fresh: bool,
    /// Print JSON (one array of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The domain table: which file server serves each part of the namespace.
///
/// Each entry maps a path prefix under /wisp to the file server serving it; a path belongs
/// to the longest prefix that matches it. Without a subcommand, lists the table.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct DomainsArgs {
    #[command(subcommand)]
    pub cmd: Option<DomainsCmd>,
    #[command(flatten)]
    pub reg: RegistryOpts,
    /// Print JSON (an object prefix -> server) instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum DomainsCmd {
    /// List the domains (the default).
    List,
    /// Serve the tree under PREFIX from the file server at SERVER (ip:port), e.g.
    /// `wisp domains add /home 10.0.0.2:7070`. Replaces an existing entry for PREFIX.
    Add {
        /// Absolute path prefix, e.g. / or /home.
        prefix: String,
        /// The file server's address, ip:port.
        server: String,
    },
    /// Forget the domain PREFIX (its files stay on its server).
    Remove {
        /// The prefix exactly as listed by `wisp domains`.
        prefix: String,
    },
}

/// The cluster registry: its replicas (on the file servers) and its idle-host policy.
///
/// The registry (hosts, domains, jobs) is replicated with Raft on the file servers that run
/// with --registry-id; it keeps working while a majority of its voters are up.
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct RegistryArgs {
    #[command(subcommand)]
    pub cmd: RegistryCmd,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

#[derive(Subcommand, Debug)]
pub enum RegistryCmd {
    /// Show every replica: role (leader, follower, learner), term, last applied log index.
    /// Exits 1 when no leader answers (fewer than a quorum of replicas up?).
    Status {
        /// Print JSON: one object per replica asked, with its status or its error.
        #[arg(long)]
        json: bool,
    },
    /// Add replica ID, served by the wisp-server at ADDR (started with --registry-id ID):
    /// it joins as a learner, catches up, then becomes a voter.
    Add {
        /// The new replica's id (what its wisp-server has as --registry-id).
        id: u64,
        /// Its wisp-server's address, ip:port.
        addr: String,
    },
    /// Take replica ID out of the registry (it stops voting; its server keeps serving
    /// files). Keep an odd number of voters: 3 survive one failure, 5 survive two.
    Remove {
        /// The replica's id, as listed by `wisp registry status`.
        id: u64,
    },
    /// Show the idle-host policy, or change the parts given.
    Policy(PolicyArgs),
    /// Load test (for a test cluster only): register HOSTS simulated hosts named
    /// bench-N, have each send a heartbeat every PERIOD seconds for SECS seconds, print
    /// the write rate and heartbeat latency (p50, p99, max), then unregister them.
    Bench {
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        #[arg(long, value_name = "SECS", default_value_t = 2.0)]
        period: f64,
        #[arg(long, value_name = "SECS", default_value_t = 20)]
        secs: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
}

/// Idle-host policy changes; fields not given stay as they are.
#[derive(Args, Debug)]
pub struct PolicyArgs {
    /// Seconds the owner must be away before a workstation is lent out (Sprite: 30).
    #[arg(long, value_name = "SECS")]
    pub min_owner_idle: Option<u64>,
    /// Load limits, 1, 5 and 15 minute averages, each strictly above the host's load
    /// (Sprite: 0.75,1,1.5).
    #[arg(long, value_name = "L1,L5,L15", value_delimiter = ',')]
    pub max_load: Option<Vec<f64>>,
    /// Seconds without a heartbeat after which a host is marked down.
    #[arg(long, value_name = "SECS")]
    pub down_after: Option<u64>,
    /// Seconds a host lease lasts unless renewed.
    #[arg(long, value_name = "SECS")]
    pub lease_ttl: Option<u64>,
    /// Whether file servers may be lent out as compute hosts too.
    #[arg(long, value_name = "BOOL")]
    pub allocate_servers: Option<bool>,
}

/// Say whether a workstation's owner is at it: active, idle, or auto (measured).
///
/// `active`: the owner is back; HOST stops being lent out (jobs from other hosts are
/// evicted by the migration layer). `idle`: the owner is away (for --away seconds, so
/// HOST can be lent out at once). `auto`: drop the override; HOST's wispd measures its
/// input devices again.
///
/// Two things happen: the registry is told at once (SetOwnerActivity), and the override
/// file /run/wisp-owner/HOST is written, which HOST's wispd reads before every heartbeat,
/// so the setting lasts. The file is written only where HOST's wispd can see it: when
/// HOST is this machine, at --owner-file, or with --cluster in the simulated cluster's
/// own override file (/run/wisp/NAME/owner/HOST, which its wispds are started with). Otherwise only the registry is told, and HOST's own wispd
/// reports its measured owner activity again at its next heartbeat (within seconds).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct OwnerArgs {
    /// The workstation, as listed by `wisp hosts`.
    pub host: String,
    /// active, idle or auto.
    #[arg(value_enum)]
    pub state: OwnerState,
    /// With idle: how many seconds ago the owner left.
    #[arg(long, value_name = "SECS", default_value_t = 3600)]
    pub away: u64,
    /// Write the override here instead of /run/wisp-owner/HOST (wispd --owner-file).
    #[arg(long, value_name = "FILE")]
    pub owner_file: Option<PathBuf>,
    #[command(flatten)]
    pub reg: RegistryOpts,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnerState {
    Active,
    Idle,
    Auto,
}

/// A connected registry client and the runtime it runs on.
pub(crate) struct Conn {
    pub(crate) rt: tokio::runtime::Runtime,
    pub(crate) client: RegistryClient,
    servers: Vec<String>,
    /// The simulated cluster, with --cluster.
    cluster: Option<wisp_cluster::Cluster>,
}

impl Conn {
    pub(crate) fn run<T>(
        &self,
        f: impl std::future::Future<Output = Result<T, NamingError>>,
    ) -> Result<T> {
        self.rt.block_on(f).map_err(|e| explain(e, &self.servers))
    }
}

/// Turn a registry error into one that says what to do next.
fn explain(e: NamingError, servers: &[String]) -> anyhow::Error {
    match &e {
        // Some replica answered, but none could commit or knew a leader: no quorum.
        NamingError::Unavailable { errors } if errors.iter().any(|x| x.contains("no quorum") || x.contains("(leader: unknown)")) => {
            let down = errors.iter().filter(|x| x.contains("unreachable")).count();
            anyhow!(
                "{e}\nno quorum: {} of {} registry replicas answer, and no leader can be elected without a majority. \
                 Writes wait until enough wisp-servers are back (start the stopped ones); nothing committed is lost, and reads still answer",
                errors.len() - down,
                errors.len()
            )
        }
        NamingError::Unavailable { .. } => anyhow!(
            "{e}\nno registry replica answered at {}: check that the wisp-servers run with --registry-id and are up \
             (`wisp registry status`), that --registry lists their addresses, and that the key is the cluster's",
            servers.join(",")
        ),
        NamingError::NoQuorum { .. } => anyhow!("{e}\nfewer than a quorum of registry replicas are up: start the stopped wisp-servers; nothing is lost meanwhile"),
        NamingError::Registry(RegistryError::UnknownHost { .. }) => anyhow!("{e} (see `wisp hosts` for the known hosts)"),
        NamingError::Registry(RegistryError::UnknownDomain { .. }) => anyhow!("{e} (see `wisp domains`)"),
        _ => anyhow!("{e}"),
    }
}

/// Enter the network namespace of a host of the simulated cluster, so its addresses are
/// reachable: the first host (servers, then workstations) from which every replica in
/// `servers` accepts a connection, else the one that reaches the most (a host may be
/// partitioned or stopped). Returns the replicas reachable from there, in the order given.
/// Must run before any thread is started: threads started later inherit the namespace.
fn enter_cluster_netns(c: &wisp_cluster::Cluster, servers: &[String]) -> Result<Vec<String>> {
    use std::os::unix::io::AsRawFd;
    let join = |anchor: u32| -> Result<()> {
        let path = format!("/proc/{anchor}/ns/net");
        let f = std::fs::File::open(&path).with_context(|| {
            format!(
                "cannot open {path} (is cluster {} still up? are you root?)",
                c.name
            )
        })?;
        // SAFETY: setns on the calling thread with a valid namespace fd; no other thread
        // exists yet in this process that could be confused by the switch.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!(
                "cannot join the network namespace of cluster {}: {} (run as root)",
                c.name,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    };
    let mut best: Option<(Vec<String>, u32)> = None;
    for h in c.servers().chain(c.workstations()) {
        join(h.anchor)?;
        let up: Vec<String> = servers.iter().filter(|a| reachable(a)).cloned().collect();
        if up.len() == servers.len() {
            return Ok(up);
        }
        if best
            .as_ref()
            .map(|(b, _)| up.len() > b.len())
            .unwrap_or(true)
        {
            best = Some((up, h.anchor));
        }
    }
    match best {
        Some((up, anchor)) => join(anchor).map(|()| up),
        None => bail!("simulated cluster {} has no host", c.name),
    }
}

/// Whether `addr` accepts a TCP connection within 300 ms.
fn reachable(addr: &str) -> bool {
    use std::net::ToSocketAddrs;
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut it| it.next())
        .map(|sa| std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)).is_ok())
        .unwrap_or(false)
}

pub(crate) fn connect(o: &RegistryOpts, name: &str) -> Result<Conn> {
    let mut servers: Vec<String> = o
        .registry
        .iter()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .collect();
    let mut key = o.identity.clone();
    let mut cluster = None;
    let mut up_here: Option<Vec<String>> = None;
    if let Some(cn) = &o.cluster {
        let c = wisp_cluster::Cluster::load(cn).map_err(|e| anyhow!("{e}"))?;
        if servers.is_empty() {
            servers = c
                .servers()
                .map(|h| format!("{}:{}", h.addr, wisp_cluster::SERVER_PORT))
                .collect();
        }
        key.get_or_insert(c.admin_identity());
        let up = enter_cluster_netns(&c, &servers)?;
        up_here = Some(up);
        cluster = Some(c);
    }
    if servers.is_empty() {
        bail!("which registry? give --registry ADDR[,ADDR...] (the file servers running with --registry-id), or --cluster NAME for a simulated cluster");
    }
    for s in &servers {
        wisp_naming::registry::check_addr("--registry", s).map_err(|e| anyhow!("{e}"))?;
    }
    let key = crate::load_identity(key.as_deref())
        .map_err(|e| anyhow!("{e} (give --identity DIR, this host's enrolled identity)"))?;
    // The replicas that answer first (known already with --cluster).
    let servers = match up_here {
        Some(up) => {
            let rest: Vec<String> = servers
                .iter()
                .filter(|a| !up.contains(a))
                .cloned()
                .collect();
            up.into_iter().chain(rest).collect()
        }
        None => reachable_first(servers),
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    // Past a replica's own write timeout (5 s) so its "no quorum" answer arrives.
    let client = RegistryClient::new(rt.handle().clone(), servers.clone(), key, name.to_string())
        .with_timeouts(Duration::from_secs(6), Duration::from_secs(20));
    Ok(Conn {
        rt,
        client,
        servers,
        cluster,
    })
}

/// The replicas that accept a TCP connection first: a dead one would otherwise cost a whole
/// call timeout (its connection never comes up) before the next one is tried.
fn reachable_first(servers: Vec<String>) -> Vec<String> {
    let (mut good, bad): (Vec<String>, Vec<String>) =
        servers.into_iter().partition(|a| reachable(a));
    good.extend(bad);
    good
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// "42s", "3m05s", "2h10m", "3d4h".
pub fn human_secs(s: u64) -> String {
    match s {
        0..=59 => format!("{s}s"),
        60..=3599 => format!("{}m{:02}s", s / 60, s % 60),
        3600..=86399 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
    }
}

/// "active" while the owner counts as back (idle under wispd's default --evict-below,
/// 5 s), else how long they have been away.
pub(crate) fn owner_state(idle_secs: u64) -> String {
    if idle_secs < 5 {
        "active".into()
    } else {
        human_secs(idle_secs)
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Workstation => "workstation",
        Role::Server => "server",
    }
}

fn host_json(h: &Host, now: u64, idle: bool) -> serde_json::Value {
    serde_json::json!({
        "name": h.name,
        "role": role_name(h.role),
        "addr": h.addr,
        "state": if h.down { "down" } else { "up" },
        "load1": h.load.load1,
        "load5": h.load.load5,
        "load15": h.load.load15,
        "runnable": h.load.runnable,
        "owner_idle_secs": h.owner_idle_secs(now),
        "foreign_jobs": h.foreign_jobs,
        "last_heartbeat_ms": h.last_heartbeat_ms,
        "heartbeat_age_secs": now.saturating_sub(h.last_heartbeat_ms) / 1000,
        "eligible": idle,
    })
}

/// `wisp hosts`.
pub fn hosts(a: HostsArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-hosts")?;
    let reg = c.run(c.client.read(a.fresh))?;
    // The registry's own clock only moves with commands; the local clock is what a reader
    // means by "now" (hosts of one cluster keep their clocks in step, e.g. with NTP).
    let now = now_ms().max(reg.clock_ms);
    let idle: Vec<String> = reg.idle_hosts(now).iter().map(|h| h.name.clone()).collect();
    let mut list: Vec<&Host> = reg.hosts.values().collect();
    if a.idle {
        list = idle.iter().filter_map(|n| reg.hosts.get(n)).collect();
    }
    if a.json {
        let v: Vec<serde_json::Value> = list
            .iter()
            .map(|h| host_json(h, now, idle.contains(&h.name)))
            .collect();
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(ExitCode::SUCCESS);
    }
    if list.is_empty() {
        if a.idle {
            println!("no idle host: every host is down, in use by its owner, loaded or leased (`wisp hosts` shows why)");
        } else {
            println!("no host registered yet: hosts appear when their wispd starts and reaches the registry");
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<16} {:<11} {:<21} {:<5} {:<20} {:>10} {:>7} {:>9}",
        "HOST", "ROLE", "ADDR", "STATE", "LOAD 1/5/15 (RUN)", "OWNER IDLE", "FOREIGN", "HEARTBEAT"
    );
    for h in list {
        let load = format!(
            "{:.2}/{:.2}/{:.2} ({})",
            h.load.load1, h.load.load5, h.load.load15, h.load.runnable
        );
        let mark = if idle.contains(&h.name) { "*" } else { "" };
        println!(
            "{:<16} {:<11} {:<21} {:<5} {:<20} {:>10} {:>7} {:>9}",
            format!("{}{mark}", h.name),
            role_name(h.role),
            h.addr,
            if h.down { "down" } else { "up" },
            load,
            owner_state(h.owner_idle_secs(now)),
            h.foreign_jobs,
            format!(
                "{} ago",
                human_secs(now.saturating_sub(h.last_heartbeat_ms) / 1000)
            ),
        );
    }
    if !a.idle {
        println!("(* idle: could be lent out now)");
    }
    Ok(ExitCode::SUCCESS)
}

/// `wisp domains [list|add|remove]`.
pub fn domains(a: DomainsArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-domains")?;
    match a.cmd.unwrap_or(DomainsCmd::List) {
        DomainsCmd::List => {
            let d = c.run(c.client.domains())?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&d)?);
            } else if d.is_empty() {
                println!("no domain yet: add the root with `wisp domains add / SERVER:7070`");
            } else {
                println!("{:<32} SERVER", "PREFIX");
                for (p, s) in d {
                    println!("{p:<32} {s}");
                }
            }
        }
        DomainsCmd::Add { prefix, server } => {
            c.run(c.client.add_domain(&prefix, &server))?;
            println!("domain {prefix} -> {server}");
        }
        DomainsCmd::Remove { prefix } => {
            c.run(c.client.remove_domain(&prefix))?;
            println!("domain {prefix} removed");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What each replica says about itself: those given, then any other member they name.
fn status_all(c: &Conn) -> Vec<(String, Result<NodeStatus, NamingError>)> {
    let ask = |addrs: Vec<String>| -> Vec<(String, Result<NodeStatus, NamingError>)> {
        c.rt.block_on(async {
            // Concurrently, each bounded: a dead replica must not hold the whole table up.
            let futs = addrs.iter().map(|a| async move {
                let r = tokio::time::timeout(Duration::from_secs(3), c.client.status_of(a)).await;
                let r = r.unwrap_or_else(|_| {
                    Err(NamingError::Rpc {
                        addr: a.clone(),
                        msg: "no answer within 3 s".into(),
                    })
                });
                (a.clone(), r)
            });
            join_all(futs.collect()).await
        })
    };
    let mut out = ask(c.servers.clone());
    // Replicas named by the membership but not given on the command line.
    let mut more: Vec<String> = Vec::new();
    for (_, r) in &out {
        if let Ok(s) = r {
            for a in s.nodes.values() {
                if !c.servers.contains(a) && !more.contains(a) {
                    more.push(a.clone());
                }
            }
        }
    }
    if !more.is_empty() {
        out.extend(ask(more));
    }
    out.sort_by_key(|(a, r)| (r.as_ref().map(|s| s.id).unwrap_or(u64::MAX), a.clone()));
    out
}

/// Await futures concurrently on the current task (no `futures` dependency needed).
async fn join_all<F: std::future::Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<std::pin::Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = (0..futs.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in futs.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter()
        .map(|v| v.expect("every future finished"))
        .collect()
}

/// `wisp registry ...`.
pub fn registry(a: RegistryArgs) -> Result<ExitCode> {
    let c = connect(&a.reg, "wisp-registry")?;
    match a.cmd {
        RegistryCmd::Status { json } => {
            let all = status_all(&c);
            // The leader as a replica that answered says it is.
            let leader = all
                .iter()
                .find_map(|(_, r)| r.as_ref().ok().filter(|s| s.leader == Some(s.id)));
            if json {
                let v: Vec<serde_json::Value> = all
                    .iter()
                    .map(|(addr, r)| match r {
                        Ok(s) => serde_json::json!({"addr": addr, "status": s, "is_leader": s.leader == Some(s.id)}),
                        Err(e) => serde_json::json!({"addr": addr, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                match leader {
                    Some(l) => println!(
                        "registry: leader {} at {}, term {}, voters {}",
                        l.id,
                        l.addr,
                        l.term,
                        l.voters.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(",")
                    ),
                    None => println!("registry: NO LEADER answering (fewer than a quorum of replicas up, or an election in progress)"),
                }
                println!(
                    "{:<4} {:<21} {:<9} {:>6} {:>9}  LEADER",
                    "ID", "ADDR", "ROLE", "TERM", "APPLIED"
                );
                for (addr, r) in &all {
                    match r {
                        Ok(s) => {
                            let role = if s.leader == Some(s.id) {
                                "leader"
                            } else if s.voters.contains(&s.id) {
                                "follower"
                            } else if s.nodes.contains_key(&s.id) {
                                "learner"
                            } else {
                                "removed"
                            };
                            let applied = s
                                .last_applied
                                .map(|x| x.to_string())
                                .unwrap_or_else(|| "-".into());
                            let ld = s
                                .leader
                                .map(|x| x.to_string())
                                .unwrap_or_else(|| "?".into());
                            println!(
                                "{:<4} {:<21} {:<9} {:>6} {:>9}  {}",
                                s.id, addr, role, s.term, applied, ld
                            );
                        }
                        Err(e) => println!("{:<4} {:<21} {:<9} {}", "?", addr, "DOWN", e),
                    }
                }
            }
            if leader.is_none() {
                return Ok(ExitCode::from(1));
            }
        }
        RegistryCmd::Add { id, addr } => {
            wisp_naming::registry::check_addr("the new replica", &addr)
                .map_err(|e| anyhow!("{e}"))?;
            let s = c.run(c.client.add_replica(id, &addr)).with_context(|| {
                format!("replica {id} at {addr} could not join: is its wisp-server running with --registry-id {id} and the cluster key?")
            })?;
            println!(
                "replica {id} at {addr} added; voters now {}",
                s.voters
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        RegistryCmd::Remove { id } => {
            let s = c.run(c.client.remove_replica(id))?;
            println!(
                "replica {id} removed; voters now {}",
                s.voters
                    .iter()
                    .map(|v| v.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            );
            if s.voters.len() % 2 == 0 {
                println!("note: {} voters survive no more failures than {}; add or remove one to make the count odd", s.voters.len(), s.voters.len() - 1);
            }
        }
        RegistryCmd::Bench {
            hosts,
            period,
            secs,
            json,
        } => {
            return bench(
                &c,
                hosts,
                Duration::from_secs_f64(period.max(0.01)),
                secs,
                json,
            )
        }
        RegistryCmd::Policy(p) => {
            let reg = c.run(c.client.read(true))?;
            let mut pol: IdlePolicy = reg.policy.clone();
            let changed = p.min_owner_idle.is_some()
                || p.max_load.is_some()
                || p.down_after.is_some()
                || p.lease_ttl.is_some()
                || p.allocate_servers.is_some();
            if let Some(v) = p.min_owner_idle {
                pol.min_owner_idle_secs = v;
            }
            if let Some(l) = p.max_load {
                if l.len() != 3 {
                    bail!("--max-load takes three limits, L1,L5,L15 (e.g. 0.75,1,1.5)");
                }
                (pol.max_load1, pol.max_load5, pol.max_load15) = (l[0], l[1], l[2]);
            }
            if let Some(v) = p.down_after {
                pol.down_after_ms = v.saturating_mul(1000);
            }
            if let Some(v) = p.lease_ttl {
                pol.lease_ttl_ms = v.saturating_mul(1000);
            }
            if let Some(v) = p.allocate_servers {
                pol.allocate_servers = v;
            }
            if changed {
                c.run(c.client.set_policy(pol.clone()))?;
            }
            println!(
                "min owner idle {} s, max load {}/{}/{}, down after {} s, lease ttl {} s, allocate servers {}",
                pol.min_owner_idle_secs,
                pol.max_load1,
                pol.max_load5,
                pol.max_load15,
                pol.down_after_ms / 1000,
                pol.lease_ttl_ms / 1000,
                pol.allocate_servers
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `wisp owner HOST active|idle|auto`.
pub fn owner(a: OwnerArgs) -> Result<ExitCode> {
    let local = this_host();
    let c = connect(&a.reg, "wisp-owner")?;
    let file = match (&a.owner_file, &c.cluster) {
        (Some(f), _) => Some(f.clone()),
        (None, Some(sim)) => Some(sim.owner_file(&a.host)),
        (None, None) => (a.host == local).then(|| owner_file(&a.host)),
    };
    let now = now_secs();
    let ov = match a.state {
        OwnerState::Active => Some(Override::Active),
        OwnerState::Idle => Some(Override::IdleSince(now.saturating_sub(a.away))),
        OwnerState::Auto => None,
    };
    // Check the host exists before leaving a file behind for it.
    let reg = c.run(c.client.read(false))?;
    if !reg.hosts.contains_key(&a.host) {
        return Err(explain(
            NamingError::Registry(RegistryError::UnknownHost {
                host: a.host.clone(),
            }),
            &c.servers,
        ));
    }
    match (&file, ov) {
        (Some(f), Some(o)) => write_override(f, o)
            .with_context(|| format!("cannot write the owner override for {}", a.host))?,
        (Some(f), None) => match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(anyhow!("cannot remove {}: {e}", f.display())),
        },
        (None, _) => {}
    }
    if let Some(o) = ov {
        // The file first: a heartbeat after this write already reports the new state.
        c.run(c.client.set_owner_activity(&a.host, o.idle_secs(now)))?;
    }
    let what = match a.state {
        OwnerState::Active => "owner active (not lent out)".to_string(),
        OwnerState::Idle => format!("owner away for {} (may be lent out)", human_secs(a.away)),
        OwnerState::Auto => "owner activity measured by its wispd again".to_string(),
    };
    match &file {
        Some(f) => println!("{}: {what}; override in {}", a.host, f.display()),
        None if ov.is_some() => println!(
            "{}: {what} in the registry only; {}'s wispd reports its own measure at its next heartbeat \
             (run `wisp owner` on {} itself, or give --owner-file, to make it last)",
            a.host, a.host, a.host
        ),
        None => println!("{}: nothing to undo here: the override file lives on {} (run `wisp owner {} auto` there)", a.host, a.host, a.host),
    }
    Ok(ExitCode::SUCCESS)
}

/// The identity these options point at (for talking to agents as well as the registry).
pub(crate) fn identity(o: &RegistryOpts) -> Result<wisp_proto::identity::Identity> {
    let dir = match (&o.identity, &o.cluster) {
        (Some(d), _) => Some(d.clone()),
        (None, Some(cn)) => Some(
            wisp_cluster::Cluster::load(cn)
                .map_err(|e| anyhow!("{e}"))?
                .admin_identity(),
        ),
        (None, None) => None,
    };
    crate::load_identity(dir.as_deref()).map_err(|e| anyhow!("{e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_times() {
        assert_eq!(human_secs(5), "5s");
        assert_eq!(human_secs(185), "3m05s");
        assert_eq!(human_secs(7800), "2h10m");
        assert_eq!(human_secs(90000), "1d1h");
    }

    #[tokio::test]
    async fn join_all_keeps_order() {
        let futs: Vec<_> = (0..5u64)
            .map(|i| async move {
                tokio::time::sleep(Duration::from_millis(50 - i * 10)).await;
                i
            })
            .collect();
        assert_eq!(join_all(futs).await, vec![0, 1, 2, 3, 4]);
    }
}

/// `wisp registry bench`: heartbeats from many simulated hosts, as one process.
fn bench(c: &Conn, hosts: usize, period: Duration, secs: u64, json: bool) -> Result<ExitCode> {
    use futures::future::join_all;
    use std::time::Instant;
    let names: Vec<String> = (0..hosts).map(|i| format!("bench-{i}")).collect();
    let client = &c.client;
    let t0 = Instant::now();
    for chunk in names.chunks(100) {
        let regs = chunk.iter().enumerate().map(|(i, n)| {
            let addr = format!("10.250.{}.{}:7071", (i / 250) % 250, i % 250 + 1);
            async move { client.register_host(n, &addr, Role::Workstation).await }
        });
        for r in c.rt.block_on(join_all(regs)) {
            r.map_err(|e| anyhow!("registering the simulated hosts: {e}"))?;
        }
    }
    let registered = t0.elapsed();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let load = wisp_naming::registry::Load {
        load1: 0.1,
        load5: 0.1,
        load15: 0.1,
        runnable: 0,
    };
    let beats = names.iter().enumerate().map(|(i, n)| {
        async move {
            // Spread the hosts over the period, as real ones drift apart.
            let offset = period.mul_f64(i as f64 / hosts.max(1) as f64);
            let mut next = tokio::time::Instant::now() + offset;
            let (mut lat, mut errors, mut first_err) = (Vec::new(), 0u64, None);
            loop {
                tokio::time::sleep_until(next).await;
                if Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match client.heartbeat(n, load, 600).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(e) => {
                        errors += 1;
                        first_err.get_or_insert_with(|| e.to_string());
                    }
                }
                next += period;
            }
            (lat, errors, first_err)
        }
    });
    let results = c.rt.block_on(join_all(beats));
    let mut lat: Vec<Duration> = results
        .iter()
        .flat_map(|(l, _, _)| l.iter().copied())
        .collect();
    let errors: u64 = results.iter().map(|(_, e, _)| e).sum();
    if let Some(e) = results.iter().find_map(|(_, _, e)| e.clone()) {
        eprintln!("registry bench: first error: {e}");
    }
    lat.sort();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        lat[i].as_secs_f64() * 1e3
    };
    // Over the measured interval (heartbeats start spread over the first period).
    let rate = lat.len() as f64 / secs.max(1) as f64;
    for chunk in names.chunks(100) {
        let unregs = chunk.iter().map(|n| client.unregister_host(n));
        c.rt.block_on(join_all(unregs));
    }
    let replicas = c.servers.len();
    if json {
        println!(
            "{}",
            serde_json::json!({
                "hosts": hosts, "period_s": period.as_secs_f64(), "secs": secs,
                "replicas_asked": replicas, "writes": lat.len(), "writes_per_s": rate,
                "errors": errors, "p50_ms": pct(0.5), "p99_ms": pct(0.99),
                "max_ms": pct(1.0), "register_s": registered.as_secs_f64(),
            })
        );
    } else {
        println!(
            "registry bench: {hosts} hosts, a heartbeat every {:.1} s each, {secs} s, {replicas} replica address(es) given",
            period.as_secs_f64()
        );
        println!(
            "  {} heartbeats ({rate:.0}/s), {errors} errors; latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; registering took {:.1} s",
            lat.len(),
            pct(0.5),
            pct(0.99),
            pct(1.0),
            registered.as_secs_f64()
        );
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
