//! wisp FUSE client: mounts one file server's domain at `/wisp` on a workstation.
//!
//! Every FUSE operation becomes one request to the file server over the authenticated rpc
//! connection ([`wisp_proto::rpc::RpcClient`]). FUSE requests are served by a pool of
//! threads, so one slow request (a big read, a server callback in progress) never stalls
//! other processes.
//!
//! Caching (Sprite-style, driven by server callbacks instead of timeouts): the kernel keeps
//! entries, attributes and file pages for as long as it likes ([`CACHE_TTL`], and
//! `FOPEN_KEEP_CACHE` on every open); the server remembers which clients may hold a cached
//! copy of each inode and directory, and before it answers a request that changes one, it
//! calls those clients back. The callback is applied to the kernel by a dedicated notifier
//! thread that holds no lock (fuser's invalidations can deadlock otherwise), and answered only
//! once the kernel has dropped the stale copy. Writes are sent through to the server at once.
//!
//! Architecture Invariant: this crate knows nothing of Raft, the registry or processes; it
//! speaks the file protocol of `wisp-proto` to one server.

mod fs;
mod notify;

pub use fs::{mount, MountError, MountOptions, Mounted};

use std::time::Duration;

/// How long the kernel may cache entries and attributes. Consistency does not depend on it:
/// the server's callbacks invalidate cached copies whenever they change.
pub const CACHE_TTL: Duration = Duration::from_secs(3600);
