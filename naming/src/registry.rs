//! The cluster registry as a pure, deterministic state machine.
//!
//! This is the state that Raft replicates: domains (path prefix -> file server), hosts (with
//! load, owner idleness and liveness), jobs (global ids and where they run) and host leases
//! handed out by [`Command::AllocateHosts`]. [`Registry::apply`] does no I/O and never reads
//! a clock: every command arrives wrapped in a [`Stamped`] that carries the time the leader
//! proposed it at, so every replica that applies the same log reaches the same state.
//!
//! A command that fails validation returns a [`RegistryError`] and leaves the registry
//! exactly as it was (apart from the time-driven expiry pass, which any command runs first:
//! hosts whose heartbeats stopped are marked down, leases past their expiry are dropped).
//!
//! Architecture Invariant: this module knows nothing of Raft, redb or the network.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::prefix::{longest_prefix, validate_prefix};

/// Milliseconds since the Unix epoch, as stamped by the proposing node.
pub type Millis = u64;
/// Global job id, unique in the cluster, handed out by the registry.
pub type JobId = u64;
/// Lease id, unique in the cluster.
pub type LeaseId = u64;

/// Longest host name accepted.
pub const MAX_HOST_NAME: usize = 64;
/// Most hosts one allocation may ask for.
pub const MAX_ALLOCATION: u32 = 1024;

/// What a host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// A workstation with an owner at its keyboard: lent out only while the owner is away.
    Workstation,
    /// A file server (and registry replica); never has an owner.
    Server,
}

/// Load as reported by a host: load averages and the number of runnable processes.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct Load {
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
    pub runnable: u32,
}

/// The rules that decide which hosts are idle, and the registry's timeouts.
/// Replicated with the registry (changed by [`Command::SetPolicy`]), so every replica
/// decides the same way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdlePolicy {
    /// The owner must have been away this long (Sprite: 30 s).
    pub min_owner_idle_secs: u64,
    /// Load averages must be strictly below these (Sprite: 0.75 / 1.0 / 1.5).
    pub max_load1: f64,
    pub max_load5: f64,
    pub max_load15: f64,
    /// A host with no heartbeat for this long is marked down.
    pub down_after_ms: Millis,
    /// A lease not renewed for this long expires and its host is free again.
    pub lease_ttl_ms: Millis,
    /// Finished jobs are forgotten this long after they end.
    pub done_job_retention_ms: Millis,
    /// Whether file servers may be handed out as compute hosts too.
    pub allocate_servers: bool,
}

impl Default for IdlePolicy {
    fn default() -> Self {
        IdlePolicy {
            min_owner_idle_secs: 30,
            max_load1: 0.75,
            max_load5: 1.0,
            max_load15: 1.5,
            down_after_ms: 10_000,
            lease_ttl_ms: 60_000,
            done_job_retention_ms: 600_000,
            allocate_servers: false,
        }
    }
}

/// One host known to the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    /// Address of the host's wispd, "ip:port".
    pub addr: String,
    pub role: Role,
    pub load: Load,
    /// When the owner last touched the keyboard or mouse (derived from reported idle time).
    pub owner_active_ms: Millis,
    pub last_heartbeat_ms: Millis,
    /// Set when heartbeats stop for [`IdlePolicy::down_after_ms`]; cleared by the next one.
    pub down: bool,
    /// Jobs running here whose home is another host.
    pub foreign_jobs: u32,
}

impl Host {
    /// Seconds the owner has been away at `now`.
    pub fn owner_idle_secs(&self, now: Millis) -> u64 {
        now.saturating_sub(self.owner_active_ms) / 1000
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobState {
    Running,
    /// Being moved to [`Job::migrating_to`]; `current_host` is still the source.
    Migrating,
    Done {
        exit_status: i32,
    },
}

/// A process started by rexec or migrated, known cluster-wide by its global id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    pub id: JobId,
    pub owner_uid: u32,
    pub home_host: String,
    pub current_host: String,
    /// Target of a migration in progress.
    pub migrating_to: Option<String>,
    pub state: JobState,
    pub started_ms: Millis,
    pub ended_ms: Option<Millis>,
    /// Completed moves to another host (committed [`MovePhase::Commit`]s).
    pub migrations: u32,
    /// When the last move committed (the job has been on `current_host` since).
    pub moved_ms: Option<Millis>,
}

/// Why a job moved or stopped; see [`JobEvent`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// Moved by hand (`wisp migrate`).
    Migrated,
    /// Moved away because the host's owner came back or `wisp evict` asked.
    Evicted,
    /// Moved by the load balancer (`wispd --balance`).
    Balanced,
    /// Could not move away from an evicted host: stopped there (SIGSTOP), not killed.
    Suspended,
    /// A suspended job runs on (its host's owner left again).
    Resumed,
    /// A move that failed; the job kept running where it was.
    Failed,
}

impl EventKind {
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::Migrated => "migrated",
            EventKind::Evicted => "evicted",
            EventKind::Balanced => "balanced",
            EventKind::Suspended => "suspended",
            EventKind::Resumed => "resumed",
            EventKind::Failed => "failed",
        }
    }
}

/// One migration, eviction or suspension, as its host reported it: what an operator reads
/// to see why a job moved (`wisp events`, `wisp top`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    /// When the registry recorded it (its clock); filled in by the registry.
    pub at_ms: Millis,
    pub job: JobId,
    pub kind: EventKind,
    pub from: String,
    /// Where the job went (empty when it did not move).
    pub to: String,
    /// Why, in words (e.g. "owner active on ws2", "wisp evict", "load 3 jobs > 2 slots").
    pub reason: String,
    /// How long the job was stopped by the move.
    pub frozen_ms: u64,
    /// From the decision to the job running on the target.
    pub total_ms: u64,
    /// Bytes of state written to the swap file.
    pub bytes: u64,
}

/// Events kept by the registry (the oldest are dropped first).
pub const MAX_EVENTS: usize = 1000;

/// A host lent to a user until `expires_ms` unless renewed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub id: LeaseId,
    pub host: String,
    /// Address of the host's wispd, so the caller can reach it at once.
    pub addr: String,
    pub user: u32,
    pub requester: String,
    pub granted_ms: Millis,
    pub expires_ms: Millis,
}

/// A user who asked for more hosts than were free: other users who already hold more
/// leases rank behind them until they are served or give up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Want {
    pub short: u32,
    pub since_ms: Millis,
}

/// Steps of moving a job to another host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MovePhase {
    /// The migration starts: the job is marked migrating to `to`.
    Begin,
    /// The target confirmed: the job now runs on `to`.
    Commit,
    /// The migration failed: the job keeps running where it was.
    Abort,
}

/// A change to the registry. Applied in log order on every replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Command {
    /// Add a host or update the address and role of a known one (a restarted wispd).
    RegisterHost {
        name: String,
        addr: String,
        role: Role,
    },
    /// Forget a host and the leases on it.
    UnregisterHost {
        name: String,
    },
    /// Periodic report from a host's wispd; brings a down host back up.
    Heartbeat {
        host: String,
        load: Load,
        owner_idle_secs: u64,
    },
    /// The owner's idle time changed outside the heartbeat period (e.g. they came back: 0).
    SetOwnerActivity {
        host: String,
        idle_secs: u64,
    },
    AddDomain {
        prefix: String,
        server: String,
    },
    RemoveDomain {
        prefix: String,
    },
    /// Atomically lease up to `n` distinct idle hosts to `user`.
    AllocateHosts {
        user: u32,
        n: u32,
        requester: String,
        include_requester: bool,
    },
    /// Push the expiry of the given leases forward by the lease TTL.
    RenewLeases {
        user: u32,
        leases: Vec<LeaseId>,
    },
    /// Give hosts back. Leases already expired or released are ignored (safe to repeat).
    ReleaseHosts {
        user: u32,
        leases: Vec<LeaseId>,
    },
    JobStart {
        owner_uid: u32,
        home: String,
        host: String,
    },
    JobMove {
        job: JobId,
        to: String,
        phase: MovePhase,
    },
    JobEnd {
        job: JobId,
        exit_status: i32,
    },
    SetPolicy(IdlePolicy),
    /// Append a migration/eviction record to [`Registry::events`].
    RecordEvent(JobEvent),
    /// No change but the time-driven expiry pass; the leader proposes one periodically so
    /// hosts are marked down even when nothing else happens.
    Tick,
}

/// Who sent a command: a client's random id and its request number. A command sent again
/// with the same origin (a retry after a lost answer) is not applied twice: the registry
/// answers it with the reply it gave the first time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    pub client: u64,
    pub seq: u64,
}

/// Replies remembered per client, for its most recent requests (more than one client keeps
/// in flight at once).
pub const SESSION_WINDOW: usize = 64;
/// A client silent this long is forgotten (its retries would then apply again).
pub const SESSION_TTL_MS: Millis = 600_000;

impl Command {
    /// Whether applying the command twice leaves the same state and reply as once (then its
    /// origin is not remembered: heartbeats from every host would fill the sessions).
    pub fn is_idempotent(&self) -> bool {
        matches!(
            self,
            Command::Tick
                | Command::Heartbeat { .. }
                | Command::SetOwnerActivity { .. }
                | Command::SetPolicy(_)
                | Command::RegisterHost { .. }
        )
    }
}

/// A command with the time the leader proposed it at (the only clock `apply` sees) and,
/// for client requests, its origin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stamped {
    pub now_ms: Millis,
    pub cmd: Command,
    pub origin: Option<Origin>,
}

/// The recent replies to one client.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ClientSession {
    pub last_ms: Millis,
    pub replies: BTreeMap<u64, Result<Reply, RegistryError>>,
}

/// The result of a successful command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    Done,
    /// Leases granted (possibly fewer than asked, possibly none).
    Leases(Vec<Lease>),
    /// Leases renewed, with their new expiry.
    Renewed(Vec<(LeaseId, Millis)>),
    /// How many leases a release gave back.
    Released(u32),
    Job(JobId),
}

/// Why a command was refused; the registry is unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RegistryError {
    #[error("unknown host {host}")]
    UnknownHost { host: String },
    #[error("bad host name {name:?}: {why}")]
    BadHostName { name: String, why: String },
    #[error("bad address {addr:?} for {what}: expected ip:port or name:port")]
    BadAddr { what: String, addr: String },
    #[error("bad load report from host {host}: {why}")]
    BadLoad { host: String, why: String },
    #[error("bad domain prefix {prefix:?}: {why}")]
    BadPrefix { prefix: String, why: String },
    #[error("unknown domain {prefix}")]
    UnknownDomain { prefix: String },
    #[error("unknown or expired lease {lease}")]
    UnknownLease { lease: LeaseId },
    #[error("lease {lease} on host {host} belongs to uid {owner}, not uid {user}")]
    LeaseNotYours {
        lease: LeaseId,
        host: String,
        owner: u32,
        user: u32,
    },
    #[error("allocation of {n} hosts for uid {user} exceeds the limit of {max}")]
    TooMany { user: u32, n: u32, max: u32 },
    #[error("unknown job {job}")]
    UnknownJob { job: JobId },
    #[error("job {job} is {state}, cannot {action}")]
    BadJobState {
        job: JobId,
        state: String,
        action: String,
    },
    #[error("host {host} is down, cannot {action}")]
    HostDown { host: String, action: String },
    #[error("bad policy: {why}")]
    BadPolicy { why: String },
    #[error("request {seq} of client {client:x} is older than the replies kept for it; it may have been applied")]
    StaleRequest { client: u64, seq: u64 },
}

/// The whole replicated registry.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Registry {
    pub policy: IdlePolicy,
    /// Latest time seen in any applied command (monotone).
    pub clock_ms: Millis,
    /// Path prefix -> file server address.
    pub domains: BTreeMap<String, String>,
    pub hosts: BTreeMap<String, Host>,
    pub jobs: BTreeMap<JobId, Job>,
    pub leases: BTreeMap<LeaseId, Lease>,
    /// Users left short by their last allocation, by uid.
    pub waiting: BTreeMap<u32, Want>,
    pub next_job: JobId,
    pub next_lease: LeaseId,
    /// Recent replies per client id, so retried requests apply once.
    pub sessions: BTreeMap<u64, ClientSession>,
    /// The latest migrations, evictions and suspensions, oldest first (at most
    /// [`MAX_EVENTS`]).
    pub events: Vec<JobEvent>,
}

fn check_host_name(name: &str) -> Result<(), RegistryError> {
    let bad = |why: &str| {
        Err(RegistryError::BadHostName {
            name: name.chars().take(80).collect(),
            why: why.into(),
        })
    };
    if name.is_empty() {
        return bad("empty");
    }
    if name.len() > MAX_HOST_NAME {
        return bad("longer than 64 bytes");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return bad("only letters, digits, '-', '.' and '_' are allowed");
    }
    Ok(())
}

/// Check an "ip:port" or "name:port" address.
pub fn check_addr(what: &str, addr: &str) -> Result<(), RegistryError> {
    let bad = || {
        Err(RegistryError::BadAddr {
            what: what.into(),
            addr: addr.chars().take(80).collect(),
        })
    };
    if addr.len() > 256 {
        return bad();
    }
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    match addr.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() && check_host_name(h).is_ok() => {
            Ok(())
        }
        _ => bad(),
    }
}

fn job_state_name(s: &JobState) -> String {
    match s {
        JobState::Running => "running".into(),
        JobState::Migrating => "migrating".into(),
        JobState::Done { exit_status } => format!("done (exit {exit_status})"),
    }
}

impl Registry {
    pub fn new(policy: IdlePolicy) -> Self {
        Registry {
            policy,
            next_job: 1,
            next_lease: 1,
            ..Default::default()
        }
    }

    /// Apply one command at the time it carries. Deterministic: same state and same
    /// command give the same result on every replica.
    pub fn apply(&mut self, s: &Stamped) -> Result<Reply, RegistryError> {
        let now = self.clock_ms.max(s.now_ms);
        self.clock_ms = now;
        self.expire(now);
        if self.next_job == 0 {
            self.next_job = 1;
        }
        if self.next_lease == 0 {
            self.next_lease = 1;
        }
        let Some(o) = s.origin.filter(|_| !s.cmd.is_idempotent()) else {
            return self.execute(now, &s.cmd);
        };
        if let Some(sess) = self.sessions.get_mut(&o.client) {
            sess.last_ms = now;
            if let Some(r) = sess.replies.get(&o.seq) {
                return r.clone();
            }
            let oldest = sess.replies.keys().next().copied().unwrap_or(0);
            if sess.replies.len() >= SESSION_WINDOW && o.seq < oldest {
                return Err(RegistryError::StaleRequest {
                    client: o.client,
                    seq: o.seq,
                });
            }
        }
        let r = self.execute(now, &s.cmd);
        let sess = self.sessions.entry(o.client).or_default();
        sess.last_ms = now;
        sess.replies.insert(o.seq, r.clone());
        while sess.replies.len() > SESSION_WINDOW {
            sess.replies.pop_first();
        }
        r
    }

    fn execute(&mut self, now: Millis, cmd: &Command) -> Result<Reply, RegistryError> {
        match cmd {
            Command::Tick => Ok(Reply::Done),
            Command::RegisterHost { name, addr, role } => {
                check_host_name(name)?;
                check_addr(&format!("host {name}"), addr)?;
                let h = self.hosts.entry(name.clone()).or_insert_with(|| Host {
                    name: name.clone(),
                    addr: addr.clone(),
                    role: *role,
                    load: Load::default(),
                    owner_active_ms: now,
                    last_heartbeat_ms: now,
                    down: false,
                    foreign_jobs: 0,
                });
                h.addr = addr.clone();
                h.role = *role;
                h.last_heartbeat_ms = now;
                h.down = false;
                Ok(Reply::Done)
            }
            Command::UnregisterHost { name } => {
                if self.hosts.remove(name).is_none() {
                    return Err(RegistryError::UnknownHost { host: name.clone() });
                }
                self.leases.retain(|_, l| &l.host != name);
                Ok(Reply::Done)
            }
            Command::Heartbeat {
                host,
                load,
                owner_idle_secs,
            } => {
                let h = self
                    .hosts
                    .get(host)
                    .ok_or_else(|| RegistryError::UnknownHost { host: host.clone() })?;
                let _ = h;
                for (what, v) in [
                    ("load1", load.load1),
                    ("load5", load.load5),
                    ("load15", load.load15),
                ] {
                    if !v.is_finite() || v < 0.0 {
                        return Err(RegistryError::BadLoad {
                            host: host.clone(),
                            why: format!("{what} is {v}"),
                        });
                    }
                }
                let h = self.hosts.get_mut(host).expect("checked above");
                h.load = *load;
                h.last_heartbeat_ms = now;
                h.down = false;
                h.owner_active_ms = now.saturating_sub(owner_idle_secs.saturating_mul(1000));
                Ok(Reply::Done)
            }
            Command::SetOwnerActivity { host, idle_secs } => {
                let h = self
                    .hosts
                    .get_mut(host)
                    .ok_or_else(|| RegistryError::UnknownHost { host: host.clone() })?;
                h.owner_active_ms = now.saturating_sub(idle_secs.saturating_mul(1000));
                Ok(Reply::Done)
            }
            Command::AddDomain { prefix, server } => {
                validate_prefix(prefix).map_err(|why| RegistryError::BadPrefix {
                    prefix: prefix.clone(),
                    why,
                })?;
                check_addr(&format!("domain {prefix}"), server)?;
                self.domains.insert(prefix.clone(), server.clone());
                Ok(Reply::Done)
            }
            Command::RemoveDomain { prefix } => {
                if self.domains.remove(prefix).is_none() {
                    return Err(RegistryError::UnknownDomain {
                        prefix: prefix.clone(),
                    });
                }
                Ok(Reply::Done)
            }
            Command::AllocateHosts {
                user,
                n,
                requester,
                include_requester,
            } => Ok(Reply::Leases(self.allocate(
                now,
                *user,
                *n,
                requester,
                *include_requester,
            )?)),
            Command::RenewLeases { user, leases } => {
                for id in leases {
                    let l = self
                        .leases
                        .get(id)
                        .ok_or(RegistryError::UnknownLease { lease: *id })?;
                    if l.user != *user {
                        return Err(RegistryError::LeaseNotYours {
                            lease: *id,
                            host: l.host.clone(),
                            owner: l.user,
                            user: *user,
                        });
                    }
                }
                let exp = now.saturating_add(self.policy.lease_ttl_ms);
                let mut out = Vec::new();
                for id in leases {
                    let l = self.leases.get_mut(id).expect("checked above");
                    l.expires_ms = exp;
                    out.push((*id, exp));
                }
                Ok(Reply::Renewed(out))
            }
            Command::ReleaseHosts { user, leases } => {
                for id in leases {
                    if let Some(l) = self.leases.get(id) {
                        if l.user != *user {
                            return Err(RegistryError::LeaseNotYours {
                                lease: *id,
                                host: l.host.clone(),
                                owner: l.user,
                                user: *user,
                            });
                        }
                    }
                }
                let mut n = 0;
                for id in leases {
                    if self.leases.remove(id).is_some() {
                        n += 1;
                    }
                }
                Ok(Reply::Released(n))
            }
            Command::JobStart {
                owner_uid,
                home,
                host,
            } => {
                if !self.hosts.contains_key(home) {
                    return Err(RegistryError::UnknownHost { host: home.clone() });
                }
                let h = self
                    .hosts
                    .get(host)
                    .ok_or_else(|| RegistryError::UnknownHost { host: host.clone() })?;
                if h.down {
                    return Err(RegistryError::HostDown {
                        host: host.clone(),
                        action: "start a job there".into(),
                    });
                }
                let id = self.next_job;
                self.next_job += 1;
                self.jobs.insert(
                    id,
                    Job {
                        id,
                        owner_uid: *owner_uid,
                        home_host: home.clone(),
                        current_host: host.clone(),
                        migrating_to: None,
                        state: JobState::Running,
                        started_ms: now,
                        ended_ms: None,
                        migrations: 0,
                        moved_ms: None,
                    },
                );
                if home != host {
                    self.bump_foreign(host, 1);
                }
                Ok(Reply::Job(id))
            }
            Command::JobMove { job, to, phase } => {
                let j = self
                    .jobs
                    .get(job)
                    .ok_or(RegistryError::UnknownJob { job: *job })?;
                let refuse = |action: &str| {
                    Err(RegistryError::BadJobState {
                        job: *job,
                        state: job_state_name(&j.state),
                        action: action.into(),
                    })
                };
                match phase {
                    MovePhase::Begin => {
                        if j.state != JobState::Running {
                            return refuse(&format!("begin a move to {to}"));
                        }
                        let t = self
                            .hosts
                            .get(to)
                            .ok_or_else(|| RegistryError::UnknownHost { host: to.clone() })?;
                        if t.down {
                            return Err(RegistryError::HostDown {
                                host: to.clone(),
                                action: format!("move job {job} there"),
                            });
                        }
                        let j = self.jobs.get_mut(job).expect("checked above");
                        j.state = JobState::Migrating;
                        j.migrating_to = Some(to.clone());
                    }
                    MovePhase::Commit | MovePhase::Abort => {
                        if !matches!(j.state, JobState::Migrating)
                            || j.migrating_to.as_deref() != Some(to.as_str())
                        {
                            return refuse(&format!("finish a move to {to}"));
                        }
                        let (home, from) = (j.home_host.clone(), j.current_host.clone());
                        let j = self.jobs.get_mut(job).expect("checked above");
                        j.state = JobState::Running;
                        j.migrating_to = None;
                        if *phase == MovePhase::Commit {
                            j.current_host = to.clone();
                            j.migrations += 1;
                            j.moved_ms = Some(now);
                            if from != home {
                                self.bump_foreign(&from, -1);
                            }
                            if *to != home {
                                self.bump_foreign(to, 1);
                            }
                        }
                    }
                }
                Ok(Reply::Done)
            }
            Command::JobEnd { job, exit_status } => {
                let j = self
                    .jobs
                    .get_mut(job)
                    .ok_or(RegistryError::UnknownJob { job: *job })?;
                if let JobState::Done { .. } = j.state {
                    return Err(RegistryError::BadJobState {
                        job: *job,
                        state: job_state_name(&j.state),
                        action: "end it again".into(),
                    });
                }
                j.state = JobState::Done {
                    exit_status: *exit_status,
                };
                j.migrating_to = None;
                j.ended_ms = Some(now);
                let (home, cur) = (j.home_host.clone(), j.current_host.clone());
                if home != cur {
                    self.bump_foreign(&cur, -1);
                }
                Ok(Reply::Done)
            }
            Command::SetPolicy(p) => {
                let ok = [p.max_load1, p.max_load5, p.max_load15]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0);
                if !ok || p.down_after_ms == 0 || p.lease_ttl_ms == 0 {
                    return Err(RegistryError::BadPolicy {
                        why: "load limits and timeouts must be positive".into(),
                    });
                }
                self.policy = p.clone();
                Ok(Reply::Done)
            }
            Command::RecordEvent(e) => {
                let mut e = e.clone();
                e.at_ms = now;
                e.reason = e.reason.chars().take(200).collect();
                self.events.push(e);
                if self.events.len() > MAX_EVENTS {
                    let extra = self.events.len() - MAX_EVENTS;
                    self.events.drain(..extra);
                }
                Ok(Reply::Done)
            }
        }
    }

    fn bump_foreign(&mut self, host: &str, d: i32) {
        if let Some(h) = self.hosts.get_mut(host) {
            h.foreign_jobs = (h.foreign_jobs as i64 + d as i64).max(0) as u32;
        }
    }

    /// The time-driven pass every command runs first.
    fn expire(&mut self, now: Millis) {
        let down_after = self.policy.down_after_ms;
        for h in self.hosts.values_mut() {
            if !h.down && now.saturating_sub(h.last_heartbeat_ms) > down_after {
                h.down = true;
            }
        }
        self.leases.retain(|_, l| l.expires_ms > now);
        let ttl = self.policy.lease_ttl_ms;
        self.waiting
            .retain(|_, w| now.saturating_sub(w.since_ms) <= ttl);
        let keep = self.policy.done_job_retention_ms;
        self.jobs.retain(|_, j| match j.ended_ms {
            Some(e) => now.saturating_sub(e) <= keep,
            None => true,
        });
        self.sessions
            .retain(|_, s| now.saturating_sub(s.last_ms) <= SESSION_TTL_MS);
    }

    /// Whether `h` may be lent out at `now` under the policy (ignoring leases).
    pub fn is_idle(&self, h: &Host, now: Millis) -> bool {
        let p = &self.policy;
        !h.down
            && (h.role == Role::Workstation || p.allocate_servers)
            && h.owner_idle_secs(now) >= p.min_owner_idle_secs
            && h.load.load1 < p.max_load1
            && h.load.load5 < p.max_load5
            && h.load.load15 < p.max_load15
    }

    /// Leases held by `user`.
    pub fn leases_of(&self, user: u32) -> usize {
        self.leases.values().filter(|l| l.user == user).count()
    }

    fn allocate(
        &mut self,
        now: Millis,
        user: u32,
        n: u32,
        requester: &str,
        include_requester: bool,
    ) -> Result<Vec<Lease>, RegistryError> {
        if n > MAX_ALLOCATION {
            return Err(RegistryError::TooMany {
                user,
                n,
                max: MAX_ALLOCATION,
            });
        }
        let leased: std::collections::BTreeSet<&str> =
            self.leases.values().map(|l| l.host.as_str()).collect();
        let mut eligible: Vec<&Host> = self
            .hosts
            .values()
            .filter(|h| self.is_idle(h, now))
            .filter(|h| include_requester || h.name != requester)
            .filter(|h| !leased.contains(h.name.as_str()))
            .collect();
        // Longest idle first; the name breaks ties so every replica picks the same hosts.
        eligible.sort_by(|a, b| {
            a.owner_active_ms
                .cmp(&b.owner_active_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        // Fairness: a user who already holds leases ranks behind waiting users who hold fewer.
        let held = self.leases_of(user);
        let reserved: usize = if held == 0 {
            0
        } else {
            self.waiting
                .iter()
                .filter(|(u, _)| **u != user && self.leases_of(**u) < held)
                .map(|(_, w)| w.short as usize)
                .sum()
        };
        let grant = (n as usize).min(eligible.len().saturating_sub(reserved));
        let exp = now.saturating_add(self.policy.lease_ttl_ms);
        let picked: Vec<(String, String)> = eligible[..grant]
            .iter()
            .map(|h| (h.name.clone(), h.addr.clone()))
            .collect();
        let mut out = Vec::with_capacity(grant);
        for (host, addr) in picked {
            let id = self.next_lease;
            self.next_lease += 1;
            let l = Lease {
                id,
                host,
                addr,
                user,
                requester: requester.to_string(),
                granted_ms: now,
                expires_ms: exp,
            };
            self.leases.insert(id, l.clone());
            out.push(l);
        }
        if grant < n as usize {
            let short = n - grant as u32;
            let since = self.waiting.get(&user).map(|w| w.since_ms).unwrap_or(now);
            self.waiting.insert(
                user,
                Want {
                    short,
                    since_ms: since,
                },
            );
        } else {
            self.waiting.remove(&user);
        }
        Ok(out)
    }

    /// The server of the domain holding `path` (longest matching prefix), if any.
    pub fn lookup_domain(&self, path: &str) -> Option<(&str, &str)> {
        longest_prefix(&self.domains, path).map(|(p, s)| (p, s.as_str()))
    }

    /// Hosts that an allocation at `now` could hand out, longest idle first (for `wisp hosts`).
    pub fn idle_hosts(&self, now: Millis) -> Vec<&Host> {
        let leased: std::collections::BTreeSet<&str> =
            self.leases.values().map(|l| l.host.as_str()).collect();
        let mut v: Vec<&Host> = self
            .hosts
            .values()
            .filter(|h| self.is_idle(h, now) && !leased.contains(h.name.as_str()))
            .collect();
        v.sort_by(|a, b| {
            a.owner_active_ms
                .cmp(&b.owner_active_ms)
                .then_with(|| a.name.cmp(&b.name))
        });
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Millis = 1_000_000_000;

    fn at(now_ms: Millis, cmd: Command) -> Stamped {
        Stamped {
            now_ms,
            cmd,
            origin: None,
        }
    }

    fn idle_load() -> Load {
        Load {
            load1: 0.1,
            load5: 0.2,
            load15: 0.3,
            runnable: 0,
        }
    }

    /// A registry with workstations ws0..wsN all idle for `idle[i]` seconds at T0.
    fn cluster(idle: &[u64]) -> Registry {
        let mut r = Registry::new(IdlePolicy::default());
        for (i, secs) in idle.iter().enumerate() {
            let name = format!("ws{i}");
            r.apply(&at(
                T0,
                Command::RegisterHost {
                    name: name.clone(),
                    addr: format!("10.0.0.{}:7000", i + 1),
                    role: Role::Workstation,
                },
            ))
            .unwrap();
            r.apply(&at(
                T0,
                Command::Heartbeat {
                    host: name,
                    load: idle_load(),
                    owner_idle_secs: *secs,
                },
            ))
            .unwrap();
        }
        r
    }

    fn alloc(r: &mut Registry, now: Millis, user: u32, n: u32, requester: &str) -> Vec<Lease> {
        match r
            .apply(&at(
                now,
                Command::AllocateHosts {
                    user,
                    n,
                    requester: requester.into(),
                    include_requester: false,
                },
            ))
            .unwrap()
        {
            Reply::Leases(l) => l,
            other => panic!("unexpected reply {other:?}"),
        }
    }

    fn names(l: &[Lease]) -> Vec<&str> {
        l.iter().map(|l| l.host.as_str()).collect()
    }

    /// A command stamped at the end of time (found by fuzzing) neither overflows nor
    /// panics: lease expiries saturate.
    #[test]
    fn far_future_time_stamps_saturate() {
        let mut r = Registry::new(IdlePolicy::default());
        // No host to grant: an error reply, but no panic.
        let _ = r.apply(&at(
            u64::MAX,
            Command::AllocateHosts {
                user: 1,
                n: 1,
                requester: "ws1".into(),
                include_requester: false,
            },
        ));
        let out = r.apply(&at(
            u64::MAX,
            Command::RenewLeases {
                user: 1,
                leases: vec![],
            },
        ));
        assert!(out.is_ok(), "{out:?}");
    }

    #[test]
    fn allocation_follows_sprite_rules_longest_idle_first() {
        // ws0 idle 10 s (too recent), ws1 idle 100 s, ws2 idle 50 s, ws3 idle 1000 s but loaded,
        // ws4 idle 500 s.
        let mut r = cluster(&[10, 100, 50, 1000, 500]);
        r.apply(&at(
            T0,
            Command::Heartbeat {
                host: "ws3".into(),
                load: Load {
                    load1: 0.8,
                    load5: 0.2,
                    load15: 0.2,
                    runnable: 1,
                },
                owner_idle_secs: 1000,
            },
        ))
        .unwrap();
        let got = alloc(&mut r, T0, 1000, 10, "ws9");
        assert_eq!(names(&got), vec!["ws4", "ws1", "ws2"]);
        assert!(got
            .iter()
            .all(|l| l.expires_ms == T0 + r.policy.lease_ttl_ms && l.user == 1000));
        // Everything idle is leased now: nothing more to give.
        assert!(alloc(&mut r, T0, 1001, 1, "ws9").is_empty());
    }

    #[test]
    fn load_thresholds_are_strict_and_configurable() {
        let mut r = cluster(&[100, 100, 100]);
        let loads = [(0.75, 0.1, 0.1), (0.1, 1.0, 0.1), (0.1, 0.1, 1.5)];
        for (i, (a, b, c)) in loads.iter().enumerate() {
            r.apply(&at(
                T0,
                Command::Heartbeat {
                    host: format!("ws{i}"),
                    load: Load {
                        load1: *a,
                        load5: *b,
                        load15: *c,
                        runnable: 0,
                    },
                    owner_idle_secs: 100,
                },
            ))
            .unwrap();
        }
        assert!(alloc(&mut r, T0, 1, 3, "x").is_empty());
        let p = IdlePolicy {
            max_load1: 2.5,
            max_load5: 2.75,
            max_load15: 3.0,
            ..IdlePolicy::default()
        };
        r.apply(&at(T0, Command::SetPolicy(p))).unwrap();
        assert_eq!(alloc(&mut r, T0, 1, 3, "x").len(), 3);
    }

    #[test]
    fn requester_excluded_unless_asked() {
        let mut r = cluster(&[100, 200]);
        assert_eq!(names(&alloc(&mut r, T0, 1, 2, "ws1")), vec!["ws0"]);
        let mut r = cluster(&[100, 200]);
        let got = r
            .apply(&at(
                T0,
                Command::AllocateHosts {
                    user: 1,
                    n: 2,
                    requester: "ws1".into(),
                    include_requester: true,
                },
            ))
            .unwrap();
        let Reply::Leases(got) = got else { panic!() };
        assert_eq!(names(&got), vec!["ws1", "ws0"]);
    }

    #[test]
    fn owner_return_makes_host_ineligible() {
        let mut r = cluster(&[100]);
        r.apply(&at(
            T0,
            Command::SetOwnerActivity {
                host: "ws0".into(),
                idle_secs: 0,
            },
        ))
        .unwrap();
        // The host stays up (heartbeats keep coming), its owner stays away.
        for t in [T0 + 8_000, T0 + 16_000, T0 + 24_000] {
            r.apply(&at(
                t,
                Command::Heartbeat {
                    host: "ws0".into(),
                    load: idle_load(),
                    owner_idle_secs: (t - T0) / 1000,
                },
            ))
            .unwrap();
        }
        assert!(alloc(&mut r, T0 + 29_999, 1, 1, "x").is_empty());
        assert_eq!(
            alloc(&mut r, T0 + 30_000, 1, 1, "x").len(),
            1,
            "idle for 30 s again"
        );
    }

    #[test]
    fn heartbeat_expiry_marks_down_and_heartbeat_revives() {
        let mut r = cluster(&[100, 100]);
        let down_after = r.policy.down_after_ms;
        // ws1 keeps beating, ws0 goes silent.
        r.apply(&at(
            T0 + down_after,
            Command::Heartbeat {
                host: "ws1".into(),
                load: idle_load(),
                owner_idle_secs: 200,
            },
        ))
        .unwrap();
        r.apply(&at(T0 + down_after, Command::Tick)).unwrap();
        assert!(!r.hosts["ws0"].down, "exactly at the limit is still up");
        r.apply(&at(T0 + down_after + 1, Command::Tick)).unwrap();
        assert!(r.hosts["ws0"].down);
        assert!(!r.hosts["ws1"].down);
        assert_eq!(
            names(&alloc(&mut r, T0 + down_after + 1, 1, 2, "x")),
            vec!["ws1"],
            "never a down host"
        );
        r.apply(&at(
            T0 + down_after + 2,
            Command::Heartbeat {
                host: "ws0".into(),
                load: idle_load(),
                owner_idle_secs: 100,
            },
        ))
        .unwrap();
        assert!(!r.hosts["ws0"].down);
    }

    #[test]
    fn leases_expire_unless_renewed() {
        let mut r = cluster(&[100, 100]);
        let ttl = r.policy.lease_ttl_ms;
        let got = alloc(&mut r, T0, 1, 2, "x");
        let (a, b) = (got[0].id, got[1].id);
        // Keep the hosts alive and renew only a.
        let half = T0 + ttl / 2;
        for h in ["ws0", "ws1"] {
            r.apply(&at(
                half,
                Command::Heartbeat {
                    host: h.into(),
                    load: idle_load(),
                    owner_idle_secs: 200,
                },
            ))
            .unwrap();
        }
        let Reply::Renewed(v) = r
            .apply(&at(
                half,
                Command::RenewLeases {
                    user: 1,
                    leases: vec![a],
                },
            ))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(v, vec![(a, half + ttl)]);
        let later = T0 + ttl + 1;
        for h in ["ws0", "ws1"] {
            r.apply(&at(
                later,
                Command::Heartbeat {
                    host: h.into(),
                    load: idle_load(),
                    owner_idle_secs: 300,
                },
            ))
            .unwrap();
        }
        assert!(r.leases.contains_key(&a));
        assert!(!r.leases.contains_key(&b));
        let e = r
            .apply(&at(
                later,
                Command::RenewLeases {
                    user: 1,
                    leases: vec![b],
                },
            ))
            .unwrap_err();
        assert_eq!(e, RegistryError::UnknownLease { lease: b });
        // b's host is free again.
        assert_eq!(alloc(&mut r, later, 2, 2, "x").len(), 1);
    }

    #[test]
    fn release_is_idempotent_and_checks_owner() {
        let mut r = cluster(&[100, 100]);
        let got = alloc(&mut r, T0, 1, 1, "x");
        let id = got[0].id;
        let before = r.clone();
        let e = r
            .apply(&at(
                T0,
                Command::ReleaseHosts {
                    user: 2,
                    leases: vec![id],
                },
            ))
            .unwrap_err();
        assert!(matches!(e, RegistryError::LeaseNotYours { .. }), "{e}");
        assert_eq!(r, before, "refused command changes nothing");
        assert_eq!(
            r.apply(&at(
                T0,
                Command::ReleaseHosts {
                    user: 1,
                    leases: vec![id]
                }
            ))
            .unwrap(),
            Reply::Released(1)
        );
        assert_eq!(
            r.apply(&at(
                T0,
                Command::ReleaseHosts {
                    user: 1,
                    leases: vec![id]
                }
            ))
            .unwrap(),
            Reply::Released(0)
        );
    }

    #[test]
    fn fairness_user_holding_leases_ranks_behind_one_holding_none() {
        let mut r = cluster(&[100, 200, 300, 400]);
        // Alice (1) takes three hosts; Bob (2) wants three and gets the last one.
        assert_eq!(alloc(&mut r, T0, 1, 3, "x").len(), 3);
        let bob = alloc(&mut r, T0, 2, 3, "x");
        assert_eq!(bob.len(), 1);
        // Alice gives one back, then asks again: Bob (holding fewer, still short by 2) ranks first.
        let alice_lease = r.leases.values().find(|l| l.user == 1).unwrap().id;
        r.apply(&at(
            T0,
            Command::ReleaseHosts {
                user: 1,
                leases: vec![alice_lease],
            },
        ))
        .unwrap();
        assert!(
            alloc(&mut r, T0, 1, 1, "x").is_empty(),
            "alice must wait behind bob"
        );
        assert_eq!(
            alloc(&mut r, T0, 2, 2, "x").len(),
            1,
            "bob gets the freed host"
        );
        // A user holding nothing is never held back.
        let mut r2 = cluster(&[100, 200]);
        alloc(&mut r2, T0, 1, 1, "x");
        assert_eq!(alloc(&mut r2, T0, 2, 5, "x").len(), 1);
        assert_eq!(alloc(&mut r2, T0, 3, 1, "x").len(), 0);
    }

    #[test]
    fn jobs_start_move_end_and_count_foreign() {
        let mut r = cluster(&[100, 100, 100]);
        let Reply::Job(j) = r
            .apply(&at(
                T0,
                Command::JobStart {
                    owner_uid: 7,
                    home: "ws0".into(),
                    host: "ws1".into(),
                },
            ))
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(r.hosts["ws1"].foreign_jobs, 1);
        let e = r
            .apply(&at(
                T0,
                Command::JobMove {
                    job: j,
                    to: "ws2".into(),
                    phase: MovePhase::Commit,
                },
            ))
            .unwrap_err();
        assert!(matches!(e, RegistryError::BadJobState { .. }), "{e}");
        r.apply(&at(
            T0,
            Command::JobMove {
                job: j,
                to: "ws2".into(),
                phase: MovePhase::Begin,
            },
        ))
        .unwrap();
        assert_eq!(r.jobs[&j].migrating_to.as_deref(), Some("ws2"));
        assert_eq!(
            r.jobs[&j].current_host, "ws1",
            "source stays current until the target confirms"
        );
        r.apply(&at(
            T0,
            Command::JobMove {
                job: j,
                to: "ws2".into(),
                phase: MovePhase::Commit,
            },
        ))
        .unwrap();
        assert_eq!(r.jobs[&j].current_host, "ws2");
        assert_eq!(
            (r.hosts["ws1"].foreign_jobs, r.hosts["ws2"].foreign_jobs),
            (0, 1)
        );
        assert_eq!(
            (r.jobs[&j].migrations, r.jobs[&j].moved_ms),
            (1, Some(T0)),
            "a committed move is counted"
        );
        // Move home: no longer foreign anywhere.
        r.apply(&at(
            T0,
            Command::JobMove {
                job: j,
                to: "ws0".into(),
                phase: MovePhase::Begin,
            },
        ))
        .unwrap();
        r.apply(&at(
            T0,
            Command::JobMove {
                job: j,
                to: "ws0".into(),
                phase: MovePhase::Abort,
            },
        ))
        .unwrap();
        assert_eq!(r.jobs[&j].current_host, "ws2");
        assert_eq!(r.jobs[&j].migrations, 1, "an aborted move is not counted");
        r.apply(&at(
            T0,
            Command::JobEnd {
                job: j,
                exit_status: 3,
            },
        ))
        .unwrap();
        assert_eq!(r.jobs[&j].state, JobState::Done { exit_status: 3 });
        assert_eq!(r.hosts["ws2"].foreign_jobs, 0);
        assert!(r
            .apply(&at(
                T0,
                Command::JobEnd {
                    job: j,
                    exit_status: 0
                }
            ))
            .is_err());
        // Forgotten after the retention period.
        r.apply(&at(T0 + r.policy.done_job_retention_ms + 1, Command::Tick))
            .unwrap();
        assert!(!r.jobs.contains_key(&j));
    }

    #[test]
    fn bad_input_is_refused_and_changes_nothing() {
        let mut r = cluster(&[100]);
        r.apply(&at(
            T0,
            Command::AddDomain {
                prefix: "/home".into(),
                server: "10.0.0.9:7000".into(),
            },
        ))
        .unwrap();
        let before = r.clone();
        let bad = vec![
            Command::Heartbeat {
                host: "nope".into(),
                load: idle_load(),
                owner_idle_secs: 1,
            },
            Command::Heartbeat {
                host: "ws0".into(),
                load: Load {
                    load1: f64::NAN,
                    ..idle_load()
                },
                owner_idle_secs: 1,
            },
            Command::RegisterHost {
                name: "".into(),
                addr: "1.2.3.4:5".into(),
                role: Role::Workstation,
            },
            Command::RegisterHost {
                name: "a b".into(),
                addr: "1.2.3.4:5".into(),
                role: Role::Workstation,
            },
            Command::RegisterHost {
                name: "ok".into(),
                addr: "no-port".into(),
                role: Role::Workstation,
            },
            Command::AddDomain {
                prefix: "relative".into(),
                server: "1.2.3.4:5".into(),
            },
            Command::AddDomain {
                prefix: "/a/../b".into(),
                server: "1.2.3.4:5".into(),
            },
            Command::RemoveDomain {
                prefix: "/nope".into(),
            },
            Command::JobEnd {
                job: 99,
                exit_status: 0,
            },
            Command::JobStart {
                owner_uid: 1,
                home: "ws0".into(),
                host: "ghost".into(),
            },
            Command::AllocateHosts {
                user: 1,
                n: MAX_ALLOCATION + 1,
                requester: "x".into(),
                include_requester: false,
            },
            Command::UnregisterHost {
                name: "ghost".into(),
            },
        ];
        for c in bad {
            let e = r.apply(&at(T0, c.clone())).unwrap_err();
            assert!(
                !e.to_string().is_empty() && e.to_string().chars().next().unwrap().is_lowercase(),
                "{e}"
            );
            assert_eq!(r, before, "{c:?} changed the registry");
        }
        assert_eq!(
            r.apply(&at(
                T0,
                Command::Heartbeat {
                    host: "nope".into(),
                    load: idle_load(),
                    owner_idle_secs: 1
                }
            ))
            .unwrap_err()
            .to_string(),
            "unknown host nope"
        );
    }

    #[test]
    fn apply_is_deterministic() {
        let cmds: Vec<Stamped> = (0..200u64)
            .map(|i| {
                let h = format!("ws{}", i % 7);
                let c = match i % 5 {
                    0 => Command::RegisterHost {
                        name: h,
                        addr: format!("10.1.0.{}:1", i % 7),
                        role: Role::Workstation,
                    },
                    1 => Command::Heartbeat {
                        host: h,
                        load: Load {
                            load1: (i % 3) as f64 * 0.4,
                            ..idle_load()
                        },
                        owner_idle_secs: i,
                    },
                    2 => Command::AllocateHosts {
                        user: (i % 3) as u32,
                        n: 2,
                        requester: h,
                        include_requester: false,
                    },
                    3 => Command::JobStart {
                        owner_uid: 1,
                        home: "ws0".into(),
                        host: h,
                    },
                    _ => Command::ReleaseHosts {
                        user: (i % 3) as u32,
                        leases: vec![i / 2],
                    },
                };
                Stamped {
                    now_ms: T0 + i * 700,
                    cmd: c,
                    origin: Some(Origin {
                        client: i % 2,
                        seq: i / 3,
                    }),
                }
            })
            .collect();
        let run = || {
            let mut r = Registry::new(IdlePolicy::default());
            let out: Vec<_> = cmds.iter().map(|c| r.apply(c)).collect();
            (r, out)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn domain_lookup_uses_longest_prefix() {
        let mut r = Registry::new(IdlePolicy::default());
        for (p, s) in [
            ("/", "10.0.0.1:1"),
            ("/home", "10.0.0.2:1"),
            ("/home/alice", "10.0.0.3:1"),
        ] {
            r.apply(&at(
                T0,
                Command::AddDomain {
                    prefix: p.into(),
                    server: s.into(),
                },
            ))
            .unwrap();
        }
        assert_eq!(
            r.lookup_domain("/home/alice/x"),
            Some(("/home/alice", "10.0.0.3:1"))
        );
        assert_eq!(r.lookup_domain("/home/bob"), Some(("/home", "10.0.0.2:1")));
        assert_eq!(r.lookup_domain("/homework"), Some(("/", "10.0.0.1:1")));
    }

    #[test]
    fn retried_request_applies_once() {
        let mut r = cluster(&[100, 200, 300]);
        let o = Origin {
            client: 0xabc,
            seq: 7,
        };
        let cmd = Command::AllocateHosts {
            user: 1,
            n: 1,
            requester: "x".into(),
            include_requester: false,
        };
        let first = r
            .apply(&Stamped {
                now_ms: T0,
                cmd: cmd.clone(),
                origin: Some(o),
            })
            .unwrap();
        let again = r
            .apply(&Stamped {
                now_ms: T0 + 5,
                cmd: cmd.clone(),
                origin: Some(o),
            })
            .unwrap();
        assert_eq!(first, again, "the retry gets the first answer");
        assert_eq!(r.leases.len(), 1, "and allocates nothing more");
        let other = r
            .apply(&Stamped {
                now_ms: T0,
                cmd: cmd.clone(),
                origin: Some(Origin { seq: 8, ..o }),
            })
            .unwrap();
        assert_ne!(other, first);
        assert_eq!(r.leases.len(), 2);
        // A refusal is remembered too.
        let bad = Command::RemoveDomain {
            prefix: "/x".into(),
        };
        let e1 = r
            .apply(&Stamped {
                now_ms: T0,
                cmd: bad.clone(),
                origin: Some(Origin { seq: 9, ..o }),
            })
            .unwrap_err();
        let e2 = r
            .apply(&Stamped {
                now_ms: T0,
                cmd: bad,
                origin: Some(Origin { seq: 9, ..o }),
            })
            .unwrap_err();
        assert_eq!(e1, e2);
        // Only a window of replies is kept; older requests are refused, not re-applied.
        for seq in 100..100 + SESSION_WINDOW as u64 {
            let cmd = Command::ReleaseHosts {
                user: 1,
                leases: vec![],
            };
            r.apply(&Stamped {
                now_ms: T0,
                cmd,
                origin: Some(Origin { seq, ..o }),
            })
            .unwrap();
        }
        // Idempotent commands are not remembered.
        let hb = Command::Heartbeat {
            host: "ws0".into(),
            load: idle_load(),
            owner_idle_secs: 100,
        };
        r.apply(&Stamped {
            now_ms: T0,
            cmd: hb,
            origin: Some(Origin { seq: 10_000, ..o }),
        })
        .unwrap();
        assert!(!r.sessions[&0xabc].replies.contains_key(&10_000));
        let e = r
            .apply(&Stamped {
                now_ms: T0,
                cmd: cmd.clone(),
                origin: Some(o),
            })
            .unwrap_err();
        assert_eq!(
            e,
            RegistryError::StaleRequest {
                client: 0xabc,
                seq: 7
            }
        );
        // Sessions of silent clients are forgotten.
        r.apply(&at(T0 + 5 + SESSION_TTL_MS + 1, Command::Tick))
            .unwrap();
        assert!(r.sessions.is_empty());
    }

    #[test]
    fn events_are_stamped_and_bounded() {
        let mut r = cluster(&[100]);
        let ev = |job| JobEvent {
            at_ms: 1,
            job,
            kind: EventKind::Evicted,
            from: "ws0".into(),
            to: "ws1".into(),
            reason: "x".repeat(500),
            frozen_ms: 5,
            total_ms: 9,
            bytes: 4096,
        };
        r.apply(&at(T0 + 7, Command::RecordEvent(ev(1)))).unwrap();
        assert_eq!(
            r.events[0].at_ms,
            T0 + 7,
            "the registry's clock, not the sender's"
        );
        assert_eq!(r.events[0].reason.len(), 200);
        for j in 2..=(MAX_EVENTS as u64 + 5) {
            r.apply(&at(T0 + 8, Command::RecordEvent(ev(j)))).unwrap();
        }
        assert_eq!(r.events.len(), MAX_EVENTS);
        assert_eq!(r.events[0].job, 6, "the oldest go first");
    }
}
