//! wisp FUSE client: mounts one file server's domain at `/wisp` on a workstation.
//!
//! Every FUSE operation becomes one request to the file server over the authenticated rpc
//! connection ([`wisp_proto::rpc::RpcClient`]). FUSE requests are served by a pool of
//! threads, so one slow request (a big read, a server callback in progress) never stalls
//! other processes.
//!
//! Caching (Sprite-style, driven by server callbacks instead of timeouts): the kernel keeps
//! attributes and file pages for as long as it likes ([`CACHE_TTL`], and `FOPEN_KEEP_CACHE`
//! on every open); the server remembers which clients may hold a cached copy of each inode,
//! and before it answers a request that changes one, it calls those clients back. Names are
//! not cached ([`ENTRY_TTL`] is zero), as Sprite clients did not cache directories: every
//! lookup asks the server, so a create, rename or unlink is seen everywhere at once. A file
//! open for writing on one host and open on another is write-shared: opens made then bypass
//! the page cache (`FOPEN_DIRECT_IO`), and the earlier holders are called back. The callback is applied to the kernel by a dedicated notifier
//! thread that holds no lock (fuser's invalidations can deadlock otherwise), and answered only
//! once the kernel has dropped the stale copy. Writes are sent through to the server at once.
//!
//! Architecture Invariant: this crate knows nothing of Raft, the registry or processes; it
//! speaks the file protocol of `wisp-proto` to one server.

mod cache;
mod domains;
mod fs;
mod notify;
mod stream;

pub use domains::DomainSource;
pub use fs::{mount, MountError, MountOptions, Mounted};

use std::time::Duration;

/// How long the kernel may cache entries and attributes. Consistency does not depend on it:
/// the server's callbacks invalidate cached copies whenever they change.
pub const CACHE_TTL: Duration = Duration::from_secs(3600);

/// How long the kernel may cache a name: not at all (see the crate doc).
pub const ENTRY_TTL: Duration = Duration::ZERO;
