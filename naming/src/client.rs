//! The registry client used by wispd (heartbeats, job records), rexec (host allocation) and
//! the CLI (`wisp hosts`, `wisp domains`, `wisp registry add|remove`).
//!
//! It knows a list of registry replicas (the file servers) and sends each request to the
//! last one that answered, falling back to the others; a replica that is not the leader
//! forwards the request itself, and when it cannot it answers with a leader hint that the
//! client follows. Retryable failures (no leader yet, replica down, no quorum) are retried
//! across the replicas until [`RegistryClient::with_timeouts`]'s `retry_for` runs out; a
//! refusal by the registry itself ([`NamingError::Registry`]) is returned at once.
//!
//! Every write carries an [`Origin`] (this client's random id and a request number), so a
//! write whose answer was lost (a replica died after committing it, a connection dropped) is
//! sent again safely: the registry applies it once and answers the retry with the first
//! reply.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wisp_proto::identity::Identity;

use crate::network::ClientPool;
use crate::prefix::DomainSource;
use crate::registry::{
    Command, Host, IdlePolicy, Job, JobEvent, JobId, Lease, LeaseId, Load, Millis, MovePhase,
    Origin, Registry, Reply, Role,
};
use crate::wire::{NamingError, NamingRequest, NamingResponse, NodeId, NodeStatus};

/// A client of the replicated registry.
pub struct RegistryClient {
    rt: tokio::runtime::Handle,
    servers: Mutex<Vec<String>>,
    preferred: Mutex<Option<String>>,
    /// Replicas that failed last time: tried after the others.
    suspect: Mutex<std::collections::BTreeSet<String>>,
    pool: Arc<ClientPool>,
    call_timeout: Duration,
    retry_for: Duration,
    client_id: u64,
    next_seq: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for RegistryClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RegistryClient({:?})",
            self.servers.lock().unwrap_or_else(|e| e.into_inner())
        )
    }
}

fn response_error(r: &NamingResponse) -> Option<&NamingError> {
    match r {
        NamingResponse::Error(e) => Some(e),
        NamingResponse::Write(Err(e))
        | NamingResponse::Read(Err(e))
        | NamingResponse::Membership(Err(e)) => Some(e),
        _ => None,
    }
}

/// A client id unlikely to collide with any other client's: std's per-process random hash
/// keys, mixed with the time and the process id.
fn random_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.write_u32(std::process::id());
    h.finish()
}

fn unexpected(what: &str) -> NamingError {
    NamingError::Malformed(format!("unexpected reply to {what}"))
}

impl RegistryClient {
    /// A client of the registry replicas at `servers` ("ip:port" of their wisp-proto
    /// listeners), authenticating with `key` under the name `name` (the host name).
    pub fn new(
        rt: tokio::runtime::Handle,
        servers: Vec<String>,
        key: Identity,
        name: String,
    ) -> Self {
        // Past a replica's own write timeout (5 s) plus one forwarding hop.
        let call_timeout = Duration::from_secs(8);
        RegistryClient {
            pool: ClientPool::new(rt.clone(), key, name, call_timeout),
            rt,
            servers: Mutex::new(servers),
            preferred: Mutex::new(None),
            suspect: Mutex::new(Default::default()),
            call_timeout,
            retry_for: Duration::from_secs(20),
            client_id: random_id(),
            next_seq: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Bound one call to one replica by `call`, and keep retrying across replicas for
    /// `retry_for` in all. `call` should exceed the replicas' write timeout (5 s by default)
    /// plus a forwarding hop, so that their own "no quorum" answer arrives. A replica that
    /// does not answer costs up to `call` once; it is then tried last until it answers again.
    pub fn with_timeouts(mut self, call: Duration, retry_for: Duration) -> Self {
        self.call_timeout = call;
        self.retry_for = retry_for;
        self
    }

    /// The replicas this client knows (including leaders it learned of).
    pub fn servers(&self) -> Vec<String> {
        self.servers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn order(&self) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(p) = self
            .preferred
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            v.push(p);
        }
        for s in self.servers() {
            if !v.contains(&s) {
                v.push(s);
            }
        }
        let suspect = self
            .suspect
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (bad, mut good): (Vec<String>, Vec<String>) =
            v.into_iter().partition(|a| suspect.contains(a));
        good.extend(bad);
        good
    }

    fn mark(&self, addr: &str, ok: bool) {
        let mut s = self.suspect.lock().unwrap_or_else(|e| e.into_inner());
        if ok {
            s.remove(addr);
        } else {
            s.insert(addr.to_string());
        }
    }

    fn prefer(&self, addr: &str) {
        *self.preferred.lock().unwrap_or_else(|e| e.into_inner()) = Some(addr.to_string());
        let mut s = self.servers.lock().unwrap_or_else(|e| e.into_inner());
        if !s.iter().any(|x| x == addr) {
            s.push(addr.to_string());
        }
    }

    /// Send `req` to some replica, following leader hints and retrying what can be retried.
    pub async fn request(&self, req: NamingRequest) -> Result<NamingResponse, NamingError> {
        let deadline = tokio::time::Instant::now() + self.retry_for;
        // Last failure of each replica tried, in the order first tried.
        let mut errors: Vec<(String, String)> = Vec::new();
        let mut note = |addr: &str, e: String| match errors.iter_mut().find(|(a, _)| a == addr) {
            Some(slot) => slot.1 = e,
            None => errors.push((addr.to_string(), e)),
        };
        loop {
            let mut hinted = false;
            for addr in self.order() {
                match self.pool.call(&addr, &req, self.call_timeout).await {
                    Err(e) => {
                        self.mark(&addr, false);
                        note(&addr, e.to_string());
                    }
                    Ok(r) => match response_error(&r) {
                        None => {
                            self.mark(&addr, true);
                            self.prefer(&addr);
                            return Ok(r);
                        }
                        Some(e) if !e.is_retryable() => return Err(e.clone()),
                        Some(NamingError::NotLeader {
                            leader: Some((_, l)),
                            ..
                        }) if *l != addr => {
                            self.mark(l, true);
                            note(&addr, format!("not the leader, sent on to {l}"));
                            self.prefer(l);
                            hinted = true;
                            break;
                        }
                        Some(e) => note(&addr, e.to_string()),
                    },
                }
                if tokio::time::Instant::now() >= deadline {
                    break;
                }
            }
            if tokio::time::Instant::now() >= deadline {
                if errors.is_empty() {
                    errors.push(("(none)".into(), "no registry replica configured".into()));
                }
                return Err(NamingError::Unavailable {
                    errors: errors
                        .into_iter()
                        .map(|(a, e)| format!("{a}: {e}"))
                        .collect(),
                });
            }
            if !hinted {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Commit one registry command (exactly once, however often it has to be sent).
    pub async fn write(&self, cmd: Command) -> Result<Reply, NamingError> {
        let seq = self
            .next_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let origin = Origin {
            client: self.client_id,
            seq,
        };
        match self
            .request(NamingRequest::Write {
                cmd,
                origin: Some(origin),
                forwarded: false,
            })
            .await?
        {
            NamingResponse::Write(r) => r,
            _ => Err(unexpected("a write")),
        }
    }

    async fn write_done(&self, cmd: Command) -> Result<(), NamingError> {
        self.write(cmd).await.map(|_| ())
    }

    pub async fn register_host(
        &self,
        name: &str,
        addr: &str,
        role: Role,
    ) -> Result<(), NamingError> {
        self.write_done(Command::RegisterHost {
            name: name.into(),
            addr: addr.into(),
            role,
        })
        .await
    }

    pub async fn unregister_host(&self, name: &str) -> Result<(), NamingError> {
        self.write_done(Command::UnregisterHost { name: name.into() })
            .await
    }

    pub async fn heartbeat(
        &self,
        host: &str,
        load: Load,
        owner_idle_secs: u64,
    ) -> Result<(), NamingError> {
        self.write_done(Command::Heartbeat {
            host: host.into(),
            load,
            owner_idle_secs,
        })
        .await
    }

    pub async fn set_owner_activity(&self, host: &str, idle_secs: u64) -> Result<(), NamingError> {
        self.write_done(Command::SetOwnerActivity {
            host: host.into(),
            idle_secs,
        })
        .await
    }

    pub async fn add_domain(&self, prefix: &str, server: &str) -> Result<(), NamingError> {
        self.write_done(Command::AddDomain {
            prefix: prefix.into(),
            server: server.into(),
        })
        .await
    }

    pub async fn remove_domain(&self, prefix: &str) -> Result<(), NamingError> {
        self.write_done(Command::RemoveDomain {
            prefix: prefix.into(),
        })
        .await
    }

    /// Lease up to `n` distinct idle hosts to `user` (never `requester` unless
    /// `include_requester`); possibly fewer, possibly none.
    pub async fn allocate_hosts(
        &self,
        user: u32,
        n: u32,
        requester: &str,
        include_requester: bool,
    ) -> Result<Vec<Lease>, NamingError> {
        match self
            .write(Command::AllocateHosts {
                user,
                n,
                requester: requester.into(),
                include_requester,
            })
            .await?
        {
            Reply::Leases(l) => Ok(l),
            _ => Err(unexpected("an allocation")),
        }
    }

    pub async fn renew_leases(
        &self,
        user: u32,
        leases: Vec<LeaseId>,
    ) -> Result<Vec<(LeaseId, Millis)>, NamingError> {
        match self.write(Command::RenewLeases { user, leases }).await? {
            Reply::Renewed(v) => Ok(v),
            _ => Err(unexpected("a lease renewal")),
        }
    }

    pub async fn release_hosts(&self, user: u32, leases: Vec<LeaseId>) -> Result<u32, NamingError> {
        match self.write(Command::ReleaseHosts { user, leases }).await? {
            Reply::Released(n) => Ok(n),
            _ => Err(unexpected("a release")),
        }
    }

    pub async fn job_start(
        &self,
        owner_uid: u32,
        home: &str,
        host: &str,
    ) -> Result<JobId, NamingError> {
        match self
            .write(Command::JobStart {
                owner_uid,
                home: home.into(),
                host: host.into(),
            })
            .await?
        {
            Reply::Job(j) => Ok(j),
            _ => Err(unexpected("a job start")),
        }
    }

    pub async fn job_move(
        &self,
        job: JobId,
        to: &str,
        phase: MovePhase,
    ) -> Result<(), NamingError> {
        self.write_done(Command::JobMove {
            job,
            to: to.into(),
            phase,
        })
        .await
    }

    pub async fn job_end(&self, job: JobId, exit_status: i32) -> Result<(), NamingError> {
        self.write_done(Command::JobEnd { job, exit_status }).await
    }

    /// Record a migration, eviction or suspension (the registry stamps its time).
    pub async fn record_event(&self, event: JobEvent) -> Result<(), NamingError> {
        self.write_done(Command::RecordEvent(event)).await
    }

    pub async fn set_policy(&self, policy: IdlePolicy) -> Result<(), NamingError> {
        self.write_done(Command::SetPolicy(policy)).await
    }

    /// The whole registry: `linearizable` for decisions, otherwise any replica's copy (hint).
    pub async fn read(&self, linearizable: bool) -> Result<Registry, NamingError> {
        match self
            .request(NamingRequest::Read {
                linearizable,
                forwarded: false,
            })
            .await?
        {
            NamingResponse::Read(Ok(r)) => Ok(*r),
            _ => Err(unexpected("a read")),
        }
    }

    /// Hosts as some replica knows them (`wisp hosts`).
    pub async fn hosts(&self) -> Result<Vec<Host>, NamingError> {
        Ok(self.read(false).await?.hosts.into_values().collect())
    }

    /// Domain table, prefix -> server (`wisp domains`, prefix table refresh).
    pub async fn domains(&self) -> Result<BTreeMap<String, String>, NamingError> {
        Ok(self.read(false).await?.domains)
    }

    pub async fn jobs(&self) -> Result<Vec<Job>, NamingError> {
        Ok(self.read(false).await?.jobs.into_values().collect())
    }

    /// `wisp registry add ID ADDR`.
    pub async fn add_replica(&self, id: NodeId, addr: &str) -> Result<NodeStatus, NamingError> {
        match self
            .request(NamingRequest::AddMember {
                id,
                addr: addr.into(),
                forwarded: false,
            })
            .await?
        {
            NamingResponse::Membership(r) => r,
            _ => Err(unexpected("a membership change")),
        }
    }

    /// `wisp registry remove ID`.
    pub async fn remove_replica(&self, id: NodeId) -> Result<NodeStatus, NamingError> {
        match self
            .request(NamingRequest::RemoveMember {
                id,
                forwarded: false,
            })
            .await?
        {
            NamingResponse::Membership(r) => r,
            _ => Err(unexpected("a membership change")),
        }
    }

    /// What the replica at `addr` says about itself (`wisp registry status`).
    pub async fn status_of(&self, addr: &str) -> Result<NodeStatus, NamingError> {
        match self
            .pool
            .call(addr, &NamingRequest::Status, self.call_timeout)
            .await?
        {
            NamingResponse::Status(s) => Ok(s),
            NamingResponse::Error(e) => Err(e),
            _ => Err(unexpected("a status request")),
        }
    }

    /// A [`DomainSource`] for a [`crate::PrefixTable`] used from threads outside the runtime
    /// (FUSE workers): each refresh blocks on [`RegistryClient::domains`].
    pub fn domain_source(self: &Arc<Self>) -> impl DomainSource + 'static {
        let me = self.clone();
        move || me.rt.block_on(me.domains()).map_err(|e| e.to_string())
    }
}
