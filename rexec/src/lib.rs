//! Remote execution: run a command on another host as if it ran here.
//!
//! - [`agent`]: the job service inside `wispd` (port [`AGENT_PORT`]). It starts a job as the
//!   submitting user, in the submitted working directory (inside `/wisp`) with the submitted
//!   environment and umask, niced so the owner's own work keeps priority, with fds 0-2 opened
//!   on cluster pipes in `/wisp`; it reports the exit status and delivers signals.
//! - [`client`]: what the `rexec` command does: choose a host (through the registry, or the
//!   one named), make three cluster pipes for stdio, ask the host's agent to start the job,
//!   copy stdio between this process and the pipes, forward signals, and return the job's
//!   exit status.
//!
//! - [`evict`]: eviction when a host's owner comes back (and `wisp evict`), with its
//!   policy; [`preflush`]: foreign jobs' memory written to their swap files ahead of an
//!   eviction; [`balance`]: optional load balancing (`wispd --balance`); [`ps`]: the CPU and
//!   memory of each job, for `wisp ps`.
//!
//! Because a job's stdio are cluster pipes served by the file server, not a connection to
//! the submitting host, the job can later move between hosts without losing them.
//!
//! Architecture Invariant: this crate reaches files only through the mounted namespace and
//! hosts only through the registry client and the agent protocol; it knows nothing of FUSE
//! or Raft internals.

pub mod agent;
pub mod balance;
pub mod build;
pub mod cgroup;
pub mod client;
pub mod evict;
pub mod preflush;
pub mod ps;

/// Port every workstation agent listens on.
pub const AGENT_PORT: u16 = 7071;
