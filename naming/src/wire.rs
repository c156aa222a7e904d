//! The naming crate's messages, carried opaquely in `Request::Naming` / `Response::Naming`.
//!
//! Each payload is one postcard-encoded [`NamingRequest`] or [`NamingResponse`]. The outer
//! wisp-proto frame is already authenticated and bounded to `wisp_proto::MAX_FRAME`; decoding
//! here never panics and a payload that does not decode gets [`NamingError::Malformed`].
//!
//! Raft traffic (AppendEntries, Vote, InstallSnapshot) flows between registry replicas;
//! client traffic (Write, Read, membership, Status) comes from wispd, rexec and the CLI, and
//! may reach any replica: a follower forwards it to the leader once (`forwarded` marks the
//! forwarded copy so it is never forwarded again).

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::{Deserialize, Serialize};

use crate::registry::{Command, Origin, Registry, RegistryError, Reply, Stamped};

/// A registry replica's id (stable across restarts; part of the Raft membership).
pub type NodeId = u64;

openraft::declare_raft_types!(
    /// The Raft types of the registry: log entries carry [`Stamped`] commands, the state
    /// machine answers with the command's result.
    pub TypeConfig:
        D = Stamped,
        R = Result<Reply, RegistryError>,
        NodeId = NodeId,
        Node = BasicNode,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The public error of registry operations (node API, client API and wire).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NamingError {
    /// The command was refused by the registry; nothing changed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("registry node {node} is not the leader (leader: {})", leader.as_ref().map(|(i, a)| format!("node {i} at {a}")).unwrap_or_else(|| "unknown".into()))]
    NotLeader {
        node: NodeId,
        leader: Option<(NodeId, String)>,
    },
    #[error("registry node {node} is shut down")]
    Stopped { node: NodeId },
    #[error("registry write not committed by node {node} within {ms} ms: no quorum of replicas reachable?")]
    NoQuorum { node: NodeId, ms: u64 },
    #[error("registry node {node}: {msg}")]
    Raft { node: NodeId, msg: String },
    #[error("registry storage in {path}: {msg}")]
    Storage { path: String, msg: String },
    #[error("malformed naming message: {0}")]
    Malformed(String),
    /// Every replica tried failed; `errors` holds each one's last failure, "addr: error".
    #[error("no registry replica could serve the request: {}", errors.join("; "))]
    Unavailable { errors: Vec<String> },
    #[error("registry replica {addr}: {msg}")]
    Rpc { addr: String, msg: String },
}

impl NamingError {
    /// Whether trying again (elsewhere or later) may succeed.
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            NamingError::Registry(_) | NamingError::Malformed(_) | NamingError::Storage { .. }
        )
    }
}

/// What a replica says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub addr: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_applied: Option<u64>,
    /// Voters of the current membership.
    pub voters: BTreeSet<NodeId>,
    /// Every node of the membership (voters and learners) and its address.
    pub nodes: BTreeMap<NodeId, String>,
}

/// Requests between registry replicas and from registry clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum NamingRequest {
    AppendEntries(AppendEntriesRequest<TypeConfig>),
    Vote(VoteRequest<NodeId>),
    InstallSnapshot(InstallSnapshotRequest<TypeConfig>),
    /// A registry command, committed through the leader. With an `origin`, a repeat of the
    /// same request is answered from the registry's memory instead of applied again.
    Write {
        cmd: Command,
        origin: Option<Origin>,
        forwarded: bool,
    },
    /// The whole registry; `linearizable` confirms leadership first (forwarded to the leader),
    /// otherwise the receiving replica answers from its own copy (a hint).
    Read {
        linearizable: bool,
        forwarded: bool,
    },
    /// Add a replica: first as a learner (it catches up), then as a voter.
    AddMember {
        id: NodeId,
        addr: String,
        forwarded: bool,
    },
    /// Remove a replica from the voters and the membership.
    RemoveMember {
        id: NodeId,
        forwarded: bool,
    },
    Status,
}

/// Answers to [`NamingRequest`], variant for variant.
#[derive(Debug, Serialize, Deserialize)]
pub enum NamingResponse {
    AppendEntries(Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>),
    Vote(Result<VoteResponse<NodeId>, RaftError<NodeId>>),
    InstallSnapshot(
        Result<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>,
    ),
    Write(Result<Reply, NamingError>),
    Read(Result<Box<Registry>, NamingError>),
    Membership(Result<NodeStatus, NamingError>),
    Status(NodeStatus),
    /// The request could not be handled at all (malformed, node stopped).
    Error(NamingError),
}

pub fn encode<T: Serialize>(m: &T) -> Vec<u8> {
    postcard::to_allocvec(m).expect("naming messages always encode")
}

pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, NamingError> {
    postcard::from_bytes(b).map_err(|e| NamingError::Malformed(format!("{} bytes: {e}", b.len())))
}
