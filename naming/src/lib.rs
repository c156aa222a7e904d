//! wisp naming: prefix tables and the replicated cluster registry.
//!
//! - [`prefix`]: longest-prefix routing of paths to file servers, with hints that are
//!   refreshed on error. Used by the fs-client; knows nothing of Raft.
//! - [`registry`]: the registry state machine (domains, hosts, jobs, leases): pure and
//!   deterministic, the time comes from the command.
pub mod prefix;
pub mod registry;
pub mod store;
pub mod wire;
pub mod network;
pub mod node;
pub mod client;

pub use client::RegistryClient;
pub use node::{NamingConfig, NamingNode};
pub use prefix::{longest_prefix, PrefixTable, Route};
pub use registry::{Command, Registry, RegistryError, Reply};
pub use wire::{NamingError, NodeId, NodeStatus};
