//! wisp-procmig: live migration of a Linux process (any number of threads) or of a whole
//! sandboxed process tree through files, with no kernel patch and no CRIU. The source is frozen over ptrace, its state and pages go to
//! an image directory (metadata + swap file, format in [`image`]), and the target rebuilds
//! the process by injecting system calls into a fresh child ([`restore()`]).
//!
//! # Flow
//! 1. [`run_sandboxed`] starts a job as pid 2 of its own pid + uts namespace, so its pid
//!    can be recreated anywhere.
//! 2. [`dump()`] (or [`PreCopy`] for iterative pre-copy, tracking writes with soft-dirty
//!    bits or, on kernels without them, a uffd-wp async userfaultfd + PAGEMAP_SCAN) writes
//!    `image.meta` + `pages.img` into a directory (on the cluster: `/wisp/.swap/<job>/`)
//!    and returns the source still frozen in a [`Frozen`].
//! 3. [`restore_with`] / [`restore_lazy`] recreate the process from the directory (same pid
//!    inside a fresh namespace via clone3 `set_tid`), eagerly or with userfaultfd demand
//!    paging ([`lazy`]).
//! 4. The caller kills the frozen source once the target runs ([`Frozen::kill`]), or
//!    resumes it if restore failed ([`Frozen::resume`]).
//!
//! # Invariants
//! - Architecture Invariant: a migration never ends with the process running twice or
//!   nowhere. A failed dump resumes the source itself; a successful one leaves it frozen
//!   until the caller decides; a failed restore kills only what it created.
//! - Architecture Invariant: bad input (corrupt, truncated, foreign or inconsistent image)
//!   is rejected by [`image::load`] with an error naming the file and the field, before
//!   any process is created.
//! - Architecture Invariant: raw system calls live in [`sys`] only; [`inject`] is the only
//!   way to act inside another process.
//! - Architecture Invariant: procmig reaches files by path only (the shared namespace); it
//!   knows nothing of the file server, Raft, or the wire protocol.
//! - API Boundary: [`dump()`], [`PreCopy`], [`Frozen`], [`restore()`], [`restore_with`],
//!   [`restore_lazy`], [`run_sandboxed`], and the `wisp-procmig` binary (thin CLI).
//!
//! # Process trees
//! When the dumped process is the main process of a pid namespace of its own
//! ([`run_sandboxed`]), every other process of that namespace but its init is frozen and
//! dumped too (`proc-<pid>/` subdirectories, listed by the root image) and recreated with
//! the same pid, parent, process group and session; pipes between them are recreated with
//! their unread data (copied with tee(2), not consumed), and descriptors that shared an
//! open file description share one again. Zombies and vfork children before exec are
//! refused after about a second of retries. [`PreCopy`] tracks every process of the tree
//! present at its start. See `docs/ARCHITECTURE.md`.
//!
//! # Limits (checked, with a clear `unsupported` error)
//! A process with children that is not the main process of its own pid namespace; a
//! threaded process or a tree is restored only into a new pid namespace, so that every
//! thread and process keeps its id; descriptors must be regular files or
//! directories, /dev/{null,zero,random,urandom,full}, or pipes (recreated with their data
//! when no process outside the job holds them; otherwise reconnected from descriptors the
//! caller passes, or on the same host from the frozen source); no sockets,
//! ttys, eventfd/epoll/signalfd/inotify, memfd or deleted files, POSIX timers, file locks
//! or seccomp filters; the target must run the
//! same kernel build (vdso checked) on a CPU with the same xstate layout, and see the
//! same mapped files (size and mtime checked; open descriptors only need their path).
//!
//! Module map: [`sys`] raw system calls; [`inject`] syscalls inside a tracee; [`procfs`]
//! /proc parsing; [`image`] the on-disk format; [`mod@dump`], [`mod@restore`], [`lazy`] and
//! [`sandbox`] the operations.

pub mod dump;
pub mod image;
pub mod inject;
pub mod lazy;
pub mod procfs;
pub mod restore;
pub mod sandbox;
pub mod swap;
pub mod sys;

pub use dump::{
    dump, dump_opts, kill_stopped, resume_stopped, tree_pids, DumpError, DumpInfo, DumpOptions,
    Frozen, PreCopy, Streamer,
};
pub use image::{ImageError, ImageMeta};
pub use lazy::{LazyError, LazyPager, LazyStats};
pub use restore::{
    restore, restore_lazy, restore_with, PidMode, RestoreError, RestoreOptions, Restored,
};
pub use sandbox::{run_sandboxed, run_sandboxed_in, run_sandboxed_tty, Sandbox, SandboxError};
pub use swap::{MacCheck, MacKey, SwapReader};
