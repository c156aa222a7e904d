//! The notifier thread: applies server callbacks to the kernel's caches.
//!
//! fuser's `Notifier` writes to /dev/fuse and may block until the kernel has taken the inode
//! or directory lock; calling it from a FUSE request thread, or with a lock held, can
//! deadlock. So every invalidation goes through this one thread, which holds nothing, and the
//! callback waits (bounded) for it to finish before acknowledging the server.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::time::Duration;

use fuser::{INodeNo, Notifier};
use tracing::debug;
use wisp_proto::msg::{Callback, WireError};

pub(crate) struct Job {
    pub cb: Callback,
    pub done: SyncSender<()>,
}

/// Start the thread; it stops when every sender is dropped.
pub(crate) fn start(notifier: Notifier) -> SyncSender<Job> {
    let (tx, rx) = sync_channel::<Job>(1024);
    std::thread::Builder::new()
        .name("wisp-notifier".into())
        .spawn(move || run(notifier, rx))
        .expect("spawn notifier thread");
    tx
}

fn run(n: Notifier, rx: Receiver<Job>) {
    while let Ok(job) = rx.recv() {
        // ENOENT means the kernel holds no copy: nothing to drop.
        let r = match &job.cb {
            Callback::InvalidateInode { ino } => n.inval_inode(INodeNo(*ino), 0, 0),
            Callback::InvalidateEntry { parent, name } => {
                n.inval_entry(INodeNo(*parent), OsStr::from_bytes(name))
            }
            // Handled by the client's own cache (cache.rs); nothing of the kernel's to drop.
            Callback::WriteBack { .. } => Ok(()),
        };
        if let Err(e) = r {
            debug!("invalidation {:?}: {e}", job.cb);
        }
        let _ = job.done.send(());
    }
}

/// Run one callback through the notifier thread and wait for it (at most `limit`).
pub(crate) fn apply(tx: &SyncSender<Job>, cb: Callback, limit: Duration) -> Result<(), WireError> {
    let (done, wait) = sync_channel(1);
    tx.send(Job { cb, done })
        .map_err(|_| WireError::new(libc::ESHUTDOWN, "client is unmounting"))?;
    wait.recv_timeout(limit)
        .map_err(|_| WireError::new(libc::ETIMEDOUT, "kernel invalidation timed out"))
}
