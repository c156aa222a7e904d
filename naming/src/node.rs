//! A registry replica: openraft over the redb store, reachable through wisp-proto.
//!
//! [`NamingNode`] is what a file server embeds. The server's `rpc::Service` hands every
//! `Request::Naming(bytes)` to [`NamingNode::handle`] (it runs on the blocking pool, as
//! `Service::call` does) and answers `Response::Naming` with the bytes it returns.
//!
//! Writes are linearizable: they are committed through the leader; a replica that is not the
//! leader forwards a client's write (or linearizable read, or membership change) to the
//! leader once. Each write is stamped with the leader's clock when it is proposed, so the
//! state machine never reads a clock ([`crate::registry`]). The leader also proposes a
//! `Tick` every [`NamingConfig::tick_interval`] so hosts whose heartbeats stop are marked down
//! even when nothing else is written.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use openraft::error::{ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, Raft, SnapshotPolicy};
use wisp_proto::identity::Identity;

use crate::network::{ClientPool, Faults, NetworkFactory};
use crate::registry::{Command, Origin, Registry, Reply, Stamped};
use crate::store::{open_db, LogStore, SmState, StateMachineStore, StoreError, MAX_SNAPSHOT};
use crate::wire::{
    decode, encode, NamingError, NamingRequest, NamingResponse, NodeId, NodeStatus, TypeConfig,
};

/// Timing and sizing of a replica.
#[derive(Debug, Clone)]
pub struct NamingConfig {
    pub heartbeat_ms: u64,
    pub election_min_ms: u64,
    pub election_max_ms: u64,
    /// Build a snapshot (and let the log be purged) after this many applied entries.
    pub snapshot_after_logs: u64,
    /// Log entries kept behind a snapshot, for followers that lag a little.
    pub logs_kept_after_snapshot: u64,
    /// How often the leader proposes a `Tick` (heartbeat expiry, lease expiry).
    pub tick_interval: Duration,
    /// How long a write, linearizable read or forwarded request may take before it fails.
    pub write_timeout: Duration,
    /// Bound on one call to another replica.
    pub peer_timeout: Duration,
    /// Failure injection on this replica's outgoing Raft traffic (tests, chaos drills).
    pub faults: Option<Arc<Faults>>,
}

impl Default for NamingConfig {
    fn default() -> Self {
        NamingConfig {
            heartbeat_ms: 150,
            election_min_ms: 750,
            election_max_ms: 1500,
            snapshot_after_logs: 5000,
            logs_kept_after_snapshot: 1000,
            tick_interval: Duration::from_secs(2),
            write_timeout: Duration::from_secs(5),
            peer_timeout: Duration::from_secs(2),
            faults: None,
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One registry replica.
pub struct NamingNode {
    id: NodeId,
    addr: String,
    dir: PathBuf,
    cfg: NamingConfig,
    raft: Raft<TypeConfig>,
    state: Arc<RwLock<SmState>>,
    pool: Arc<ClientPool>,
    rt: tokio::runtime::Handle,
    stopped: AtomicBool,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for NamingNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NamingNode({} at {})", self.id, self.addr)
    }
}

fn store_err(dir: &Path, e: StoreError) -> NamingError {
    NamingError::Storage {
        path: dir.display().to_string(),
        msg: e.to_string(),
    }
}

impl NamingNode {
    /// Open (or create) the replica's database in `dir` and start Raft. `addr` is where this
    /// replica's wisp-proto listener is reached by the others. The node does nothing until it
    /// is part of a membership: call [`NamingNode::initialize`] on one node of a new
    /// registry, or add it from the leader ([`NamingNode::add_member`]).
    /// Must be called inside a tokio multi-thread runtime.
    pub async fn start(
        id: NodeId,
        addr: String,
        dir: &Path,
        key: Identity,
        cfg: NamingConfig,
    ) -> Result<Arc<Self>, NamingError> {
        // A previous incarnation in this process may still be letting go of the file.
        let mut tries = 0;
        let db = loop {
            match open_db(dir) {
                Ok(db) => break db,
                Err(StoreError::Open { msg, .. }) if msg.contains("already open") && tries < 50 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(store_err(dir, e)),
            }
        };
        let sm = StateMachineStore::open(db.clone(), dir.to_path_buf())
            .map_err(|e| store_err(dir, e))?;
        let state = sm.state.clone();
        let log = LogStore::new(db);
        let pool = ClientPool::new(
            tokio::runtime::Handle::current(),
            key,
            format!("registry-{id}"),
            cfg.peer_timeout,
        );
        let config = openraft::Config {
            cluster_name: "wisp-registry".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_min_ms,
            election_timeout_max: cfg.election_max_ms,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_after_logs),
            max_in_snapshot_log_to_keep: cfg.logs_kept_after_snapshot,
            snapshot_max_chunk_size: 1024 * 1024,
            install_snapshot_timeout: 2000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| NamingError::Raft {
            node: id,
            msg: format!("bad raft configuration: {e}"),
        })?;
        let raft = Raft::new(
            id,
            Arc::new(config),
            NetworkFactory {
                pool: pool.clone(),
                faults: cfg.faults.clone(),
            },
            log,
            sm,
        )
        .await
        .map_err(|e| NamingError::Raft {
            node: id,
            msg: e.to_string(),
        })?;
        let node = Arc::new(NamingNode {
            id,
            addr,
            dir: dir.to_path_buf(),
            cfg: cfg.clone(),
            raft,
            state,
            pool,
            rt: tokio::runtime::Handle::current(),
            stopped: AtomicBool::new(false),
            ticker: Mutex::new(None),
        });
        let weak = Arc::downgrade(&node);
        let tick = cfg.tick_interval;
        let h = tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(n) = weak.upgrade() else { return };
                if n.stopped.load(Ordering::Relaxed) {
                    return;
                }
                if n.raft.metrics().borrow().current_leader == Some(n.id) {
                    if let Err(e) = n.write_inner(Command::Tick, None, true).await {
                        tracing::debug!(node = n.id, "tick not committed: {e}");
                    }
                }
            }
        });
        *node.ticker.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        tracing::info!(node = id, dir = %dir.display(), "registry replica started");
        Ok(node)
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The underlying openraft handle (metrics, tests).
    pub fn raft(&self) -> &Raft<TypeConfig> {
        &self.raft
    }

    fn check_running(&self) -> Result<(), NamingError> {
        if self.stopped.load(Ordering::Relaxed) {
            Err(NamingError::Stopped { node: self.id })
        } else {
            Ok(())
        }
    }

    fn raft_err(&self, e: impl std::fmt::Display) -> NamingError {
        NamingError::Raft {
            node: self.id,
            msg: e.to_string(),
        }
    }

    /// Make a new registry of `members` (id -> address). Call once, on one node; calling it
    /// again on an initialized node is a no-op.
    pub async fn initialize(&self, members: BTreeMap<NodeId, String>) -> Result<(), NamingError> {
        self.check_running()?;
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .into_iter()
            .map(|(i, a)| (i, BasicNode::new(a)))
            .collect();
        match self.raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
            Err(e) => Err(self.raft_err(e)),
        }
    }

    /// This replica's view of the cluster.
    pub fn status(&self) -> NodeStatus {
        let m = self.raft.metrics().borrow().clone();
        let mem = m.membership_config.membership();
        NodeStatus {
            id: self.id,
            addr: self.addr.clone(),
            leader: m.current_leader,
            term: m.current_term,
            last_applied: m.last_applied.map(|l| l.index),
            voters: mem.voter_ids().collect(),
            nodes: mem.nodes().map(|(i, n)| (*i, n.addr.clone())).collect(),
        }
    }

    /// Wait until some replica is known as leader (by this one); returns its id.
    pub async fn wait_for_leader(&self, timeout: Duration) -> Result<NodeId, NamingError> {
        let mut rx = self.raft.metrics();
        let fut = async {
            loop {
                if let Some(l) = rx.borrow_and_update().current_leader {
                    return Ok(l);
                }
                if rx.changed().await.is_err() {
                    return Err(NamingError::Stopped { node: self.id });
                }
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .unwrap_or(Err(NamingError::Raft {
                node: self.id,
                msg: format!("no leader elected within {} ms", timeout.as_millis()),
            }))
    }

    fn leader_hint(
        &self,
        leader_id: Option<NodeId>,
        leader_node: Option<BasicNode>,
    ) -> Option<(NodeId, String)> {
        let id = leader_id?;
        let addr = match leader_node {
            Some(n) => n.addr,
            None => self.status().nodes.get(&id)?.clone(),
        };
        Some((id, addr))
    }

    /// Commit a registry command (linearizable) and return its result. Not deduplicated:
    /// use [`NamingNode::write_once`] for a command that may be sent again.
    pub async fn write(&self, cmd: Command) -> Result<Reply, NamingError> {
        self.write_inner(cmd, None, false).await
    }

    /// [`NamingNode::write`] with an origin: sent again with the same origin, the command is
    /// applied once and the retry gets the first reply.
    pub async fn write_once(&self, cmd: Command, origin: Origin) -> Result<Reply, NamingError> {
        self.write_inner(cmd, Some(origin), false).await
    }

    async fn write_inner(
        &self,
        cmd: Command,
        origin: Option<Origin>,
        forwarded: bool,
    ) -> Result<Reply, NamingError> {
        self.check_running()?;
        let stamped = Stamped {
            now_ms: now_ms(),
            cmd,
            origin,
        };
        let res = match tokio::time::timeout(
            self.cfg.write_timeout,
            self.raft.client_write(stamped.clone()),
        )
        .await
        {
            Err(_) => {
                return Err(NamingError::NoQuorum {
                    node: self.id,
                    ms: self.cfg.write_timeout.as_millis() as u64,
                })
            }
            Ok(r) => r,
        };
        match res {
            Ok(resp) => resp.data.map_err(NamingError::Registry),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                let hint = self.leader_hint(f.leader_id, f.leader_node);
                match hint {
                    Some((lid, addr)) if !forwarded && lid != self.id => {
                        let req = NamingRequest::Write {
                            cmd: stamped.cmd,
                            origin,
                            forwarded: true,
                        };
                        match self
                            .pool
                            .call(&addr, &req, self.cfg.write_timeout + Duration::from_secs(1))
                            .await?
                        {
                            NamingResponse::Write(r) => r,
                            NamingResponse::Error(e) => Err(e),
                            _ => Err(NamingError::Rpc {
                                addr,
                                msg: "unexpected reply to a forwarded write".into(),
                            }),
                        }
                    }
                    hint => Err(NamingError::NotLeader {
                        node: self.id,
                        leader: hint,
                    }),
                }
            }
            Err(e) => Err(self.raft_err(e)),
        }
    }

    /// This replica's copy of the registry: possibly a little stale, good for hints.
    pub fn read_local(&self) -> Registry {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .registry
            .clone()
    }

    /// The registry as of a moment after this call started (confirms leadership with a
    /// quorum; forwarded to the leader when this replica is not it).
    pub async fn read_linearizable(&self) -> Result<Registry, NamingError> {
        self.read_lin_inner(false).await
    }

    async fn read_lin_inner(&self, forwarded: bool) -> Result<Registry, NamingError> {
        self.check_running()?;
        let res =
            match tokio::time::timeout(self.cfg.write_timeout, self.raft.ensure_linearizable())
                .await
            {
                Err(_) => {
                    return Err(NamingError::NoQuorum {
                        node: self.id,
                        ms: self.cfg.write_timeout.as_millis() as u64,
                    })
                }
                Ok(r) => r,
            };
        match res {
            Ok(_) => Ok(self.read_local()),
            Err(RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f))) => {
                match self.leader_hint(f.leader_id, f.leader_node) {
                    Some((lid, addr)) if !forwarded && lid != self.id => {
                        let req = NamingRequest::Read {
                            linearizable: true,
                            forwarded: true,
                        };
                        match self
                            .pool
                            .call(&addr, &req, self.cfg.write_timeout + Duration::from_secs(1))
                            .await?
                        {
                            NamingResponse::Read(r) => r.map(|b| *b),
                            NamingResponse::Error(e) => Err(e),
                            _ => Err(NamingError::Rpc {
                                addr,
                                msg: "unexpected reply to a forwarded read".into(),
                            }),
                        }
                    }
                    hint => Err(NamingError::NotLeader {
                        node: self.id,
                        leader: hint,
                    }),
                }
            }
            Err(e) => Err(self.raft_err(e)),
        }
    }

    /// Leader only: add a non-voting replica and wait until it has caught up.
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<(), NamingError> {
        self.check_running()?;
        let fut = self.raft.add_learner(id, BasicNode::new(addr), true);
        match tokio::time::timeout(self.cfg.write_timeout * 4, fut).await {
            Err(_) => Err(NamingError::NoQuorum {
                node: self.id,
                ms: (self.cfg.write_timeout * 4).as_millis() as u64,
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.membership_err(e)),
        }
    }

    /// Leader only: apply a membership change (joint consensus, committed like a write).
    pub async fn change_membership(
        &self,
        changes: ChangeMembers<NodeId, BasicNode>,
        retain: bool,
    ) -> Result<(), NamingError> {
        self.check_running()?;
        let fut = self.raft.change_membership(changes, retain);
        match tokio::time::timeout(self.cfg.write_timeout * 2, fut).await {
            Err(_) => Err(NamingError::NoQuorum {
                node: self.id,
                ms: (self.cfg.write_timeout * 2).as_millis() as u64,
            }),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(self.membership_err(e)),
        }
    }

    fn membership_err(
        &self,
        e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>,
    ) -> NamingError {
        match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => NamingError::NotLeader {
                node: self.id,
                leader: self.leader_hint(f.leader_id, f.leader_node),
            },
            e => self.raft_err(e),
        }
    }

    /// `wisp registry add`: add replica `id` at `addr` as a learner, then make it a voter.
    /// Forwarded to the leader when needed.
    pub async fn add_member(&self, id: NodeId, addr: String) -> Result<NodeStatus, NamingError> {
        self.member_inner(NamingRequest::AddMember {
            id,
            addr,
            forwarded: false,
        })
        .await
    }

    /// `wisp registry remove`: take replica `id` out of the registry. Forwarded to the leader.
    pub async fn remove_member(&self, id: NodeId) -> Result<NodeStatus, NamingError> {
        self.member_inner(NamingRequest::RemoveMember {
            id,
            forwarded: false,
        })
        .await
    }

    async fn member_inner(&self, req: NamingRequest) -> Result<NodeStatus, NamingError> {
        self.check_running()?;
        let (forwarded, res) = match &req {
            NamingRequest::AddMember {
                id,
                addr,
                forwarded,
            } => {
                let r = async {
                    let st = self.status();
                    if !st.nodes.contains_key(id) {
                        self.add_learner(*id, addr.clone()).await?;
                    }
                    if !self.status().voters.contains(id) {
                        self.change_membership(
                            ChangeMembers::AddVoterIds(BTreeSet::from([*id])),
                            false,
                        )
                        .await?;
                    }
                    Ok(self.status())
                }
                .await;
                (*forwarded, r)
            }
            NamingRequest::RemoveMember { id, forwarded } => {
                let r = async {
                    let st = self.status();
                    if st.voters.contains(id) {
                        self.change_membership(
                            ChangeMembers::RemoveVoters(BTreeSet::from([*id])),
                            false,
                        )
                        .await?;
                    } else if st.nodes.contains_key(id) {
                        self.change_membership(
                            ChangeMembers::RemoveNodes(BTreeSet::from([*id])),
                            false,
                        )
                        .await?;
                    }
                    Ok(self.status())
                }
                .await;
                (*forwarded, r)
            }
            _ => return Err(NamingError::Malformed("not a membership request".into())),
        };
        match res {
            Err(NamingError::NotLeader {
                leader: Some((lid, addr)),
                ..
            }) if !forwarded && lid != self.id => {
                let fwd = match req {
                    NamingRequest::AddMember { id, addr, .. } => NamingRequest::AddMember {
                        id,
                        addr,
                        forwarded: true,
                    },
                    NamingRequest::RemoveMember { id, .. } => NamingRequest::RemoveMember {
                        id,
                        forwarded: true,
                    },
                    other => other,
                };
                match self
                    .pool
                    .call(&addr, &fwd, self.cfg.write_timeout * 6)
                    .await?
                {
                    NamingResponse::Membership(r) => r,
                    NamingResponse::Error(e) => Err(e),
                    _ => Err(NamingError::Rpc {
                        addr,
                        msg: "unexpected reply to a forwarded membership change".into(),
                    }),
                }
            }
            r => r,
        }
    }

    /// Handle one `Request::Naming` payload and return the `Response::Naming` payload.
    /// Blocking: call it from `rpc::Service::call` (tokio's blocking pool), never from async
    /// code (use [`NamingNode::handle_async`] there).
    pub fn handle(&self, payload: Vec<u8>) -> Vec<u8> {
        self.rt.block_on(self.handle_async(payload))
    }

    /// [`NamingNode::handle`] for async callers.
    pub async fn handle_async(&self, payload: Vec<u8>) -> Vec<u8> {
        encode(&self.dispatch(&payload).await)
    }

    async fn dispatch(&self, payload: &[u8]) -> NamingResponse {
        let req: NamingRequest = match decode(payload) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(node = self.id, "refusing naming request: {e}");
                return NamingResponse::Error(e);
            }
        };
        if let Err(e) = self.check_running() {
            return NamingResponse::Error(e);
        }
        match req {
            NamingRequest::AppendEntries(r) => {
                NamingResponse::AppendEntries(self.raft.append_entries(r).await)
            }
            NamingRequest::Vote(r) => NamingResponse::Vote(self.raft.vote(r).await),
            NamingRequest::InstallSnapshot(r) => {
                let end = r.offset.saturating_add(r.data.len() as u64);
                if end > MAX_SNAPSHOT as u64 {
                    return NamingResponse::Error(NamingError::Malformed(format!(
                        "snapshot chunk from node {} ends at byte {end}, beyond the limit of {MAX_SNAPSHOT}",
                        r.vote.leader_id().voted_for().unwrap_or_default()
                    )));
                }
                NamingResponse::InstallSnapshot(self.raft.install_snapshot(r).await)
            }
            NamingRequest::Write {
                cmd,
                origin,
                forwarded,
            } => NamingResponse::Write(self.write_inner(cmd, origin, forwarded).await),
            NamingRequest::Read {
                linearizable: false,
                ..
            } => NamingResponse::Read(Ok(Box::new(self.read_local()))),
            NamingRequest::Read {
                linearizable: true,
                forwarded,
            } => NamingResponse::Read(self.read_lin_inner(forwarded).await.map(Box::new)),
            r @ (NamingRequest::AddMember { .. } | NamingRequest::RemoveMember { .. }) => {
                NamingResponse::Membership(self.member_inner(r).await)
            }
            NamingRequest::Status => NamingResponse::Status(self.status()),
        }
    }

    /// Stop this replica: it refuses every request from now on and Raft stops. The database
    /// is released once Raft's tasks have ended.
    pub async fn shutdown(&self) -> Result<(), NamingError> {
        if self.stopped.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        if let Some(h) = self.ticker.lock().unwrap_or_else(|e| e.into_inner()).take() {
            h.abort();
        }
        self.raft
            .shutdown()
            .await
            .map_err(|e| self.raft_err(format!("shutdown: {e}")))?;
        tracing::info!(node = self.id, "registry replica stopped");
        Ok(())
    }
}
