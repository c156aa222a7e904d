//! wisp naming: prefix tables and the cluster registry, replicated with Raft.
//!
//! Sprite located file servers with prefix tables and kept its idle-host database in one
//! central daemon. wisp keeps the prefix tables and replaces the daemon with a registry
//! replicated by openraft on the file servers (1, 3 or 5 replicas), log and state in redb,
//! so losing a server (a minority of them) loses nothing and stops nothing.
//!
//! Layers, bottom up:
//! - [`prefix`]: longest-prefix routing of paths to file servers; entries are hints
//!   refreshed from a [`prefix::DomainSource`] on error. Used by the fs-client.
//! - [`registry`]: the registry state machine (domains, hosts, jobs, leases, client
//!   sessions): pure and deterministic, time comes from the command.
//! - [`store`]: the Raft log, vote and snapshots in one redb file per replica.
//! - [`wire`]: the postcard messages carried in `Request::Naming` / `Response::Naming`,
//!   the Raft type configuration and [`NamingError`].
//! - [`network`]: Raft RPCs over wisp-proto's authenticated `RpcClient`, with optional
//!   fault injection.
//! - [`node`]: [`NamingNode`], one replica (what wisp-server embeds).
//! - [`client`]: [`RegistryClient`], used by wispd, rexec and the CLI.
//!
//! Architecture Invariant: [`prefix`] knows nothing of Raft, the registry or the network;
//! the fs-client depends on it alone (plus a `DomainSource` it is handed).
//!
//! Architecture Invariant: [`registry`] does no I/O and reads no clock; every replica that
//! applies the same log reaches the same state. Only [`node`] stamps time on commands
//! (the leader's clock, when it proposes them).
//!
//! Architecture Invariant: every byte from the network is authenticated and size-bounded by
//! wisp-proto before this crate decodes it; decoding never panics (bad input gets
//! [`NamingError::Malformed`]); snapshots are checksummed and capped at
//! [`store::MAX_SNAPSHOT`].
//!
//! API Boundary: a file server embeds a [`NamingNode`] and routes every `Request::Naming`
//! payload to [`NamingNode::handle`] (from `rpc::Service::call`, on the blocking pool),
//! answering `Response::Naming` with the returned bytes. Everything else talks to the
//! registry through [`RegistryClient`].
//!
//! Consistency: writes are linearizable (committed through the leader; followers forward);
//! [`NamingNode::read_linearizable`] / `RegistryClient::read(true)` confirm leadership with a
//! quorum first; `read_local` / `RegistryClient::hosts|domains|jobs` answer from any
//! replica's copy (hints: possibly a little stale). Client writes carry an origin (client id,
//! request number), so a retried write is applied once.

pub mod client;
pub mod network;
pub mod node;
pub mod prefix;
pub mod registry;
pub mod store;
pub mod wire;

pub use client::RegistryClient;
pub use node::{NamingConfig, NamingNode};
pub use prefix::{longest_prefix, PrefixTable, Route};
pub use registry::{Command, Registry, RegistryError, Reply};
pub use wire::{NamingError, NodeId, NodeStatus};
