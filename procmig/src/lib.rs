//! wisp-procmig: live migration of a single-threaded Linux process through files, with
//! no kernel patch and no CRIU: the source is frozen over ptrace, its state and pages go to
//! an image directory (metadata + swap file, see [`image`]), and the target rebuilds the
//! process by injecting system calls into a fresh child ([`restore`]).
//!
//! Invariant: a migration never ends with the process running twice or nowhere. The
//! source stays frozen ([`Frozen`]) until the caller kills it after the target is up, or
//! resumes it when restore failed; a failed dump resumes the source itself.
//!
//! Module map: [`sys`] is the only place with raw system calls; [`inject`] runs syscalls
//! inside a tracee; [`procfs`] parses /proc; [`dump`], [`restore`] and [`sandbox`] are the
//! operations; the binary `wisp-procmig` is a thin CLI over them.

pub mod dump;
pub mod image;
pub mod inject;
pub mod procfs;
pub mod restore;
pub mod sandbox;
pub mod sys;

pub use dump::{dump, kill_stopped, resume_stopped, DumpError, DumpInfo, Frozen};
pub use image::{ImageError, ImageMeta};
pub use restore::{restore, restore_with, PidMode, RestoreError, RestoreOptions, Restored};
pub use sandbox::{run_sandboxed, Sandbox, SandboxError};
