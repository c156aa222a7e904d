//! Raft's network over wisp-proto: every Raft RPC is a [`NamingRequest`] inside an
//! authenticated `Request::Naming` call on an [`RpcClient`].
//!
//! [`ClientPool`] keeps one reconnecting `RpcClient` per peer address and is shared by the
//! Raft network, the forwarding of client requests to the leader, and [`crate::RegistryClient`].
//! A peer that answers "node stopped" (a replica shut down behind a live listener) has its
//! connection dropped, so the next call opens a fresh one to whatever serves that address now.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::BasicNode;
use wisp_proto::key::ClusterKey;
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
                    NetError::Unreachable { addr, .. } | NetError::BadReply { addr } => addr.clone(),
                    NetError::Decode { addr, .. } => addr.clone(),
                };
                NamingError::Rpc { addr, msg: other.to_string() }
            }
        }
    }
}

/// One `RpcClient` per address, created on first use.
pub struct ClientPool {
    rt: tokio::runtime::Handle,
    key: ClusterKey,
    name: String,
    call_timeout: Duration,
    clients: Mutex<HashMap<String, RpcClient>>,
}

impl ClientPool {
    pub fn new(rt: tokio::runtime::Handle, key: ClusterKey, name: String, call_timeout: Duration) -> Arc<Self> {
        Arc::new(ClientPool { rt, key, name, call_timeout, clients: Mutex::new(HashMap::new()) })
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
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).remove(addr);
    }

    /// One naming call to `addr`, bounded by `timeout` (and the pool's call timeout).
    pub async fn call(&self, addr: &str, req: &NamingRequest, timeout: Duration) -> Result<NamingResponse, NetError> {
        let c = self.client(addr);
        let payload = encode(req);
        let unreachable = |msg: String| NetError::Unreachable { addr: addr.to_string(), msg };
        let r = match tokio::time::timeout(timeout, c.call(Request::Naming(payload))).await {
            Err(_) => return Err(unreachable(format!("no answer within {} ms", timeout.as_millis()))),
            Ok(r) => r,
        };
        match r {
            Ok(Response::Naming(bytes)) => {
                match decode::<NamingResponse>(&bytes).map_err(|source| NetError::Decode { addr: addr.to_string(), source })? {
                    NamingResponse::Error(e @ NamingError::Stopped { .. }) => {
                        self.forget(addr);
                        Err(unreachable(e.to_string()))
                    }
                    r => Ok(r),
                }
            }
            Ok(_) => Err(NetError::BadReply { addr: addr.to_string() }),
            Err(RpcError::Remote(w)) if w.errno == ESHUTDOWN => {
                self.forget(addr);
                Err(unreachable(w.msg))
            }
            Err(e) => Err(unreachable(e.to_string())),
        }
    }
}

/// Creates a [`PeerNetwork`] per Raft peer.
#[derive(Clone)]
pub struct NetworkFactory {
    pub(crate) pool: Arc<ClientPool>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> PeerNetwork {
        PeerNetwork { pool: self.pool.clone(), target, addr: node.addr.clone() }
    }
}

/// Raft's connection to one peer.
pub struct PeerNetwork {
    pool: Arc<ClientPool>,
    target: NodeId,
    addr: String,
}

impl PeerNetwork {
    async fn rpc<E: std::error::Error>(
        &self,
        req: NamingRequest,
        option: &RPCOption,
    ) -> Result<NamingResponse, RPCError<NodeId, BasicNode, E>> {
        match self.pool.call(&self.addr, &req, option.hard_ttl()).await {
            Ok(r) => Ok(r),
            Err(e @ NetError::Unreachable { .. }) => Err(RPCError::Unreachable(Unreachable::new(&e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }

    fn unexpected<E: std::error::Error>(&self, r: NamingResponse) -> RPCError<NodeId, BasicNode, E> {
        let e = match r {
            NamingResponse::Error(e) => NetError::Decode { addr: self.addr.clone(), source: e },
            _ => NetError::BadReply { addr: self.addr.clone() },
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
            NamingResponse::AppendEntries(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>> {
        match self.rpc(NamingRequest::InstallSnapshot(rpc), &option).await? {
            NamingResponse::InstallSnapshot(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        match self.rpc(NamingRequest::Vote(rpc), &option).await? {
            NamingResponse::Vote(r) => r.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e))),
            other => Err(self.unexpected(other)),
        }
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
