//! Frames after the handshake: the sealed codec's length prefix and tag check on raw wire
//! bytes, the message decoder (`postcard` into `Message`) on any payload that verifies, and a
//! seal/open round trip of the input as a payload.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use wisp_proto::auth::seal::{SealedCodec, SessionKeys, Side};
use wisp_proto::msg::Message;
use wisp_proto::MAX_FRAME;

fn keys() -> SessionKeys {
    SessionKeys::derive(&[7; 32], b"fuzz transcript")
}

fuzz_target!(|data: &[u8]| {
    let keys = keys();
    // Raw wire bytes from an unauthenticated peer: every outcome must be a clean error.
    let mut server = SealedCodec::new(&keys, Side::Server, MAX_FRAME);
    let mut buf = BytesMut::from(data);
    for _ in 0..16 {
        match server.decode(&mut buf) {
            Ok(Some(frame)) => {
                let _ = postcard::from_bytes::<Message>(&frame);
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The message decoder on the input as a verified payload; whatever decodes re-encodes.
    if let Ok(m) = postcard::from_bytes::<Message>(data) {
        postcard::to_allocvec(&m).expect("a decoded message encodes again");
    }
    // Sealing round trip: what one side seals, the other opens unchanged; one flipped bit
    // is refused.
    let mut client = SealedCodec::new(&keys, Side::Client, MAX_FRAME);
    let wire = client.seal_frame(data).expect("payload under the cap seals");
    let mut server = SealedCodec::new(&keys, Side::Server, MAX_FRAME);
    assert_eq!(server.open_frame(&wire).expect("own frame opens"), data);
    if let Some(&b) = data.first() {
        let mut bad = wire.clone();
        let at = 4 + (b as usize % (bad.len() - 4));
        bad[at] ^= 1 << (b % 8);
        let mut server = SealedCodec::new(&keys, Side::Server, MAX_FRAME);
        assert!(server.open_frame(&bad).is_err(), "an altered frame opened");
    }
});
