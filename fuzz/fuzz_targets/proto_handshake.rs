//! The handshake, both sides: the first input byte picks the side under test, the rest is
//! everything the peer sends (then the peer stops writing). Each run must end in a clean
//! `AuthError` (or success), without a panic and without waiting (the input is all there).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;
use wisp_proto::auth::{client_handshake, server_handshake};
use std::sync::OnceLock;
use wisp_proto::identity::{throwaway, Identity};

/// One enrolled identity for every run (making one writes a key pair to a temp dir).
fn id() -> &'static Identity {
    static ID: OnceLock<Identity> = OnceLock::new();
    ID.get_or_init(|| throwaway("fuzz"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&side, peer_bytes)) = data.split_first() else {
        return;
    };
    // The duplex buffer holds the whole input, so writing it never waits for the reader.
    let peer_bytes = &peer_bytes[..peer_bytes.len().min(60_000)];
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let key = id();
        let (mut peer, ours) = tokio::io::duplex(1 << 16);
        peer.write_all(peer_bytes).await.expect("buffered");
        peer.shutdown().await.expect("shutdown");
        if side & 1 == 0 {
            let _ = server_handshake(ours, key, 1).await;
        } else {
            let _ = client_handshake(ours, key, "fuzz").await;
        }
        drop(peer);
    });
});
