//! Raft's network over wisp-proto: every Raft RPC is a [`NamingRequest`] inside an
//! authenticated `Request::Naming` call on an [`RpcClient`].
//!
//! [`ClientPool`] keeps one reconnecting `RpcClient` per peer address and is shared by the
//! Raft network, the forwarding of client requests to the leader, and [`crate::RegistryClient`].
//! A peer that answers "node stopped" (a replica shut down behind a live listener) has its
//! connection dropped, so the next call opens a fresh one to whatever serves that address now.
//!
//! [`Faults`] injects failures into one replica's outgoing Raft traffic (drops before or
//! after delivery, random delays that reorder concurrent messages, partitions from chosen
//! peers), from a seeded generator: tests of replication under a bad network, and chaos
//! drills on a real cluster. Client traffic is never touched.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use wisp_proto::identity::Identity;
use wisp_proto::msg::{Request, Response};
use wisp_proto::rpc::{RpcClient, RpcError};

use crate::wire::{decode, encode, NamingError, NamingRequest, NamingResponse, NodeId, TypeConfig};

/// errno a stopped replica answers with (ESHUTDOWN).
pub const ESHUTDOWN: i32 = 108;

/// Why one naming call to one address failed.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("registry replica {addr} unreachable: {msg}")]
    Unreachable { addr: String, msg: String },
    #[error("registry replica {addr} answered with something else than a naming reply")]
    BadReply { addr: String },
    #[error("registry replica {addr}: {source}")]
    Decode { addr: String, source: NamingError },
}

impl From<NetError> for NamingError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Decode { source, .. } => source,
            other => {
                let addr = match &other {
                    NetError::Unreachable { addr, .. } | NetError::BadReply { addr } => {
                        addr.clone()
                    }
                    NetError::Decode { addr, .. } => addr.clone(),
                };
                NamingError::Rpc {
                    addr,
                    msg: other.to_string(),
                }
            }
        }
    }
}

/// One `RpcClient` per address, created on first use.
pub struct ClientPool {
    rt: tokio::runtime::Handle,
    key: Identity,
    name: String,
    call_timeout: Duration,
    clients: Mutex<HashMap<String, RpcClient>>,
}

impl ClientPool {
    pub fn new(
        rt: tokio::runtime::Handle,
        key: Identity,
        name: String,
        call_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(ClientPool {
            rt,
            key,
            name,
            call_timeout,
            clients: Mutex::new(HashMap::new()),
        })
    }

    fn client(&self, addr: &str) -> RpcClient {
        let mut m = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        m.entry(addr.to_string())
            .or_insert_with(|| {
                RpcClient::start(
                    self.rt.clone(),
                    addr.to_string(),
                    self.key.clone(),
                    self.name.clone(),
                    self.call_timeout,
                    Arc::new(|_cb| Ok(())),
                )
            })
            .clone()
    }

    fn forget(&self, addr: &str) {
        self.clients
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(addr);
    }

    /// One naming call to `addr`, bounded by `timeout` (and the pool's call timeout).
    pub async fn call(
        &self,
        addr: &str,
        req: &NamingRequest,
        timeout: Duration,
    ) -> Result<NamingResponse, NetError> {
        let c = self.client(addr);
        let payload = encode(req);
        let unreachable = |msg: String| NetError::Unreachable {
            addr: addr.to_string(),
            msg,
        };
        let r = match tokio::time::timeout(timeout, c.call(Request::Naming(payload))).await {
            Err(_) => {
                return Err(unreachable(format!(
                    "no answer within {} ms",
                    timeout.as_millis()
                )))
            }
            Ok(r) => r,
        };
        match r {
            Ok(Response::Naming(bytes)) => {
                match decode::<NamingResponse>(&bytes).map_err(|source| NetError::Decode {
                    addr: addr.to_string(),
                    source,
                })? {
                    NamingResponse::Error(e @ NamingError::Stopped { .. }) => {
                        self.forget(addr);
                        Err(unreachable(e.to_string()))
                    }
                    r => Ok(r),
                }
            }
            Ok(_) => Err(NetError::BadReply {
                addr: addr.to_string(),
            }),
            Err(RpcError::Remote(w)) if w.errno == ESHUTDOWN => {
                self.forget(addr);
                Err(unreachable(w.msg))
            }
            Err(e) => Err(unreachable(e.to_string())),
        }
    }
}

/// What happens to one outgoing Raft message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    Deliver {
        delay_ms: u64,
    },
    /// Lost on the way: the peer never sees it.
    DropRequest,
    /// Delivered and handled, but the answer is lost.
    DropReply {
        delay_ms: u64,
    },
}

#[derive(Debug)]
struct FaultState {
    drop_per_mille: u32,
    max_delay_ms: u64,
    blocked: BTreeSet<NodeId>,
    rng: u64,
    dropped: u64,
}

/// Failure injection for one replica's outgoing Raft messages.
#[derive(Debug)]
pub struct Faults {
    st: Mutex<FaultState>,
}

impl Faults {
    /// No faults yet; `seed` drives every random choice.
    pub fn new(seed: u64) -> Arc<Self> {
        Arc::new(Faults {
            st: Mutex::new(FaultState {
                drop_per_mille: 0,
                max_delay_ms: 0,
                blocked: BTreeSet::new(),
                rng: seed | 1,
                dropped: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, FaultState> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lose this share of messages (per mille), half before and half after delivery.
    pub fn set_drop(&self, per_mille: u32) {
        self.lock().drop_per_mille = per_mille.min(1000);
    }

    /// Delay each message by a random time up to `ms` (so concurrent messages reorder).
    pub fn set_delay(&self, ms: u64) {
        self.lock().max_delay_ms = ms;
    }

    /// Cut this replica off from `peer` (messages to it are lost).
    pub fn block(&self, peer: NodeId) {
        self.lock().blocked.insert(peer);
    }

    /// Undo every fault.
    pub fn heal(&self) {
        let mut st = self.lock();
        st.blocked.clear();
        st.drop_per_mille = 0;
        st.max_delay_ms = 0;
    }

    /// Messages lost so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }

    /// Decide the fate of one message to `target`.
    pub fn decide(&self, target: NodeId) -> Fate {
        let mut st = self.lock();
        // xorshift64*
        let mut next = || {
            st.rng ^= st.rng >> 12;
            st.rng ^= st.rng << 25;
            st.rng ^= st.rng >> 27;
            st.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        let (roll, delay_roll) = (next(), next());
        let delay_ms = if st.max_delay_ms == 0 {
            0
        } else {
            delay_roll % (st.max_delay_ms + 1)
        };
        if st.blocked.contains(&target) {
            st.dropped += 1;
            return Fate::DropRequest;
        }
        let r = (roll % 2000) as u32;
        if r < st.drop_per_mille {
            st.dropped += 1;
            return Fate::DropRequest;
        }
        if r >= 1000 && r - 1000 < st.drop_per_mille {
            st.dropped += 1;
            return Fate::DropReply { delay_ms };
        }
        Fate::Deliver { delay_ms }
    }
}

/// Creates a [`PeerNetwork`] per Raft peer.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) pool: Arc<ClientPool>,
    pub(crate) faults: Option<Arc<Faults>>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork {
            pool: self.pool.clone(),
            target,
            addr: node.addr.clone(),
            faults: self.faults.clone(),
        }
    }
}

/// Raft's connection to one peer.
pub struct PeerNetwork {
    pool: Arc<ClientPool>,
    target: NodeId,
    addr: String,
    faults: Option<Arc<Faults>>,
}

impl PeerNetwork {
    async fn rpc<E: std::error::Error>(
        &self,
        req: NamingRequest,
        option: &RPCOption,
    ) -> Result<NamingResponse, RPCError<NodeId, BasicNode, E>> {
        let fate = self
            .faults
            .as_ref()
            .map(|f| f.decide(self.target))
            .unwrap_or(Fate::Deliver { delay_ms: 0 });
        let lost = || {
            let e = NetError::Unreachable {
                addr: self.addr.clone(),
                msg: "message lost (fault injection)".into(),
            };
            RPCError::Unreachable(Unreachable::new(&e))
        };
        match fate {
            Fate::DropRequest => {
                tokio::time::sleep(Duration::from_millis(5)).await;
                return Err(lost());
            }
            Fate::Deliver { delay_ms } | Fate::DropReply { delay_ms } if delay_ms > 0 => {
                tokio::time::sleep(Duration::from_millis(delay_ms)).await
            }
            _ => {}
        }
        let res = self.pool.call(&self.addr, &req, option.hard_ttl()).await;
        if matches!(fate, Fate::DropReply { .. }) {
            return Err(lost());
        }
        match res {
            Ok(r) => Ok(r),
            Err(e @ NetError::Unreachable { .. }) => {
                Err(RPCError::Unreachable(Unreachable::new(&e)))
            }
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(
        &self,
        r: NamingResponse,
    ) -> RPCError<NodeId, BasicNode, E> {
        let e = match r {
            NamingResponse::Error(e) => NetError::Decode {
                addr: self.addr.clone(),
                source: e,
            },
            _ => NetError::BadReply {
                addr: self.addr.clone(),
            },
        };
        RPCError::Network(NetworkError::new(&e))
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.rpc(NamingRequest::AppendEntries(rpc), &option).await? {
            NamingResponse::AppendEntries(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>,
    > {
        match self
            .rpc(NamingRequest::InstallSnapshot(rpc), &option)
            .await?
        {
            NamingResponse::InstallSnapshot(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.rpc(NamingRequest::Vote(rpc), &option).await? {
            NamingResponse::Vote(r) => {
                r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
            }
            other => Err(self.unexpected(other)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
