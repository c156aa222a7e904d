//! Pseudo-devices: files in `/wisp` whose operations are served by code instead of stored
//! bytes. Built so far: the cluster pipe ([`pipe::Pipe`]), a FIFO that processes on any hosts
//! share with local-FIFO semantics.
//!
//! Where the buffer lives: a cluster pipe's buffer is kept by the file server that serves the
//! pipe's name, never by a workstation. A process that migrates keeps its pipe descriptors
//! working because the only host it depends on is that file server (Sprite's rule: no
//! residual dependency on any host but the file server). If that server goes, bytes in the
//! buffer go with it: readers see EOF-free EIO after the rpc bound, as with any file on it.
//!
//! Not built yet: the general framework in which a user-level process on any host attaches
//! to a path and serves its opens, reads, writes and ioctls (Sprite's pdev); see the issue.
//!
//! Architecture Invariant: this crate knows nothing of FUSE or the network; it is the
//! semantics of the device, driven by whichever server hosts it.

pub mod device;
pub mod hub;
pub mod pipe;
pub mod wire;
