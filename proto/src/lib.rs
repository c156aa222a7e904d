//! The wisp wire protocol: every byte that crosses the network between wisp daemons.
//!
//! Layers, bottom up:
//! - [`key`]: the cluster key file that every host of one cluster shares.
//! - [`auth`]: the handshake. Both ends prove they hold the cluster key (HMAC-SHA256
//!   challenge-response over fresh nonces from both sides) before a single request frame is
//!   accepted; frames are bounded to [`auth::HANDSHAKE_MAX_FRAME`] until then.
//! - [`msg`]: the messages (file system requests and replies, server callbacks), encoded with
//!   postcard inside length-delimited frames of at most [`MAX_FRAME`] bytes.
//! - [`rpc`]: multiplexed calls over one connection in both directions (client calls,
//!   server callbacks), with reconnection and bounded waits on the client side.
//!
//! Architecture Invariant: this crate knows nothing of FUSE, redb, Raft or processes; it
//! only moves typed, authenticated, bounded messages.

pub mod auth;
pub mod identity;
pub mod key;
pub mod msg;
pub mod rpc;

/// Protocol version carried in the handshake; a peer with another version is refused.
pub const PROTOCOL_VERSION: u32 = 4;

/// Largest frame payload accepted after the handshake, in bytes (the 4-byte length
/// prefix comes on top).
/// Reads and writes are capped at [`MAX_IO`] so every legal message fits.
pub const MAX_FRAME: usize = 4 * 1024 * 1024;

/// Largest read or write payload carried by one request.
pub const MAX_IO: usize = 2 * 1024 * 1024;
