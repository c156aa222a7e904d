//! Sealed frames: confidentiality, integrity, authenticity and order of every frame after
//! the handshake.
//!
//! The handshake ([`crate::auth`]) proves that both ends are enrolled hosts; without more,
//! anyone on the path could then read the traffic, or inject, alter, replay, drop or
//! reorder the frames of that authenticated connection. So each connection derives two
//! session keys from the handshake ([`SessionKeys::derive`]), one per direction, and every
//! frame after it is encrypted and authenticated with AES-256-GCM (`ring`):
//!
//! ```text
//! frame   = len: u32 big-endian | ciphertext | tag[16]     (len = payload length + 16)
//! (ciphertext, tag) = AES-256-GCM(k_dir, nonce, aad = "", payload)
//! nonce   = dir: u8 | 0 0 0 | seq: u64 big-endian
//! k_c2s   = HMAC-SHA256(x25519_shared_secret, "wisp-session-key" | "client->server" | version
//!                       | T)           (T: the handshake transcript hash, see crate::auth)
//! k_s2c   = the same with "server->client"
//! ```
//!
//! `dir` is one byte (1 client -> server, 2 server -> client) and `seq` counts the frames
//! already sent in that direction, from 0 (the server's `Welcome` is frame 0 server ->
//! client). The sequence number is never sent: both ends count, so a replayed, reordered,
//! dropped, truncated or altered frame, or one copied from another connection or the other
//! direction, fails verification. Each (key, nonce) pair is used once: the keys are fresh
//! per connection (ephemeral X25519 keys and both nonces of the handshake go into them) and `seq` never repeats. The
//! tag is checked before the payload reaches postcard; a failure poisons the decoder, so
//! nothing later on that connection is accepted either, and the caller closes the
//! connection.
//!
//! Bounds: the length prefix is checked against `max_payload + TAG_LEN` before the frame is
//! read or hashed, and the encoder refuses a payload over `max_payload` without touching its
//! sequence number or the output.
//!
//! The handshake frames themselves travel in clear (nonces, ephemeral public keys, host
//! names, certificates).
//!
//! [`SealedCodec::plaintext_for_benchmarks_only`]: the same framing without encryption or
//! tags, for measuring what encryption costs; only a handshake in which both ends asked for
//! it uses it (see [`crate::auth`]).

use bytes::{BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};
use sha2::Sha256;
use tokio_util::codec::{Decoder, Encoder, LengthDelimitedCodec};

use crate::PROTOCOL_VERSION;

/// Bytes of the tag appended to every sealed frame (AES-GCM's tag).
pub const TAG_LEN: usize = 16;

/// Which way a frame travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    ClientToServer,
    ServerToClient,
}

impl Direction {
    fn label(self) -> &'static [u8] {
        match self {
            Direction::ClientToServer => b"client->server",
            Direction::ServerToClient => b"server->client",
        }
    }

    fn byte(self) -> u8 {
        match self {
            Direction::ClientToServer => 1,
            Direction::ServerToClient => 2,
        }
    }
}

/// Which end of the connection a codec serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client,
    Server,
}

/// The two per-direction keys of one connection. Debug output never shows them.
#[derive(Clone)]
pub struct SessionKeys {
    c2s: [u8; 32],
    s2c: [u8; 32],
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl SessionKeys {
    /// Keys for a connection whose key agreement gave `shared` and whose handshake
    /// transcript hashes to `transcript`. Both ends compute the same keys; nobody without
    /// one of the ephemeral private keys can.
    pub fn derive(shared: &[u8], transcript: &[u8]) -> Self {
        let one = |d: Direction| -> [u8; 32] {
            let mut m = Hmac::<Sha256>::new_from_slice(shared).expect("hmac takes any key length");
            m.update(b"wisp-session-key");
            m.update(d.label());
            m.update(&PROTOCOL_VERSION.to_le_bytes());
            m.update(transcript);
            m.finalize().into_bytes().into()
        };
        SessionKeys {
            c2s: one(Direction::ClientToServer),
            s2c: one(Direction::ServerToClient),
        }
    }
}

/// Why a sealed frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The frame's tag does not match: altered, forged, replayed, reordered or dropped
    /// frames all end here. The connection must be closed.
    #[error("frame authentication failed (frame {seq} from the peer: {detail})")]
    Authentication { seq: u64, detail: &'static str },
    /// A payload too large to send; nothing was written.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    /// I/O error, or a length prefix over the limit (refused before the frame is read).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl SealError {
    /// Whether this is a failed frame authentication (rather than an I/O error).
    pub fn is_authentication(&self) -> bool {
        matches!(self, SealError::Authentication { .. })
    }
}

/// One direction's state: its AEAD key (expanded once) and the next sequence number.
struct DirState {
    /// `None`: benchmark-only plaintext mode (no encryption, no tag).
    key: Option<LessSafeKey>,
    dir: Direction,
    seq: u64,
}

impl DirState {
    fn new(key: &[u8; 32], dir: Direction) -> Self {
        DirState {
            key: Some(LessSafeKey::new(
                UnboundKey::new(&AES_256_GCM, key).expect("AES-256 takes a 32-byte key"),
            )),
            dir,
            seq: 0,
        }
    }

    fn tag_len(&self) -> usize {
        if self.key.is_some() {
            TAG_LEN
        } else {
            0
        }
    }

    /// The frame's nonce: direction and sequence number, never repeated under one key.
    fn nonce(&self) -> Nonce {
        let mut n = [0u8; 12];
        n[0] = self.dir.byte();
        n[4..].copy_from_slice(&self.seq.to_be_bytes());
        Nonce::assume_unique_for_key(n)
    }
}

/// Length-delimited frames with a tag each: seals on encode, verifies on decode (see the
/// module documentation). Decoded items are the payloads without their tags.
pub struct SealedCodec {
    sealer: FrameSealer,
    opener: FrameOpener,
}

/// The sending half of a [`SealedCodec`]: tags each payload.
struct FrameSealer {
    max_payload: usize,
    send: DirState,
}

/// The receiving half of a [`SealedCodec`]: verifies and strips tags.
struct FrameOpener {
    inner: LengthDelimitedCodec,
    max_payload: usize,
    recv: DirState,
    /// Set by the first failed verification; every later decode fails too.
    failed: bool,
}

impl std::fmt::Debug for SealedCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealedCodec")
            .field("max_payload", &self.opener.max_payload)
            .field("sent", &self.sealer.send.seq)
            .field("received", &self.opener.recv.seq)
            .field("failed", &self.opener.failed)
            .finish()
    }
}

impl SealedCodec {
    /// A codec for `side` of a connection with these keys, accepting and sending payloads
    /// of at most `max_payload` bytes.
    pub fn new(keys: &SessionKeys, side: Side, max_payload: usize) -> Self {
        let (send, recv) = match side {
            Side::Client => (
                DirState::new(&keys.c2s, Direction::ClientToServer),
                DirState::new(&keys.s2c, Direction::ServerToClient),
            ),
            Side::Server => (
                DirState::new(&keys.s2c, Direction::ServerToClient),
                DirState::new(&keys.c2s, Direction::ClientToServer),
            ),
        };
        let mut c = SealedCodec {
            sealer: FrameSealer {
                max_payload: 0,
                send,
            },
            opener: FrameOpener {
                inner: LengthDelimitedCodec::builder()
                    .length_field_length(4)
                    .new_codec(),
                max_payload: 0,
                recv,
                failed: false,
            },
        };
        c.set_max_payload(max_payload);
        c
    }

    /// Length-delimited frames with neither encryption nor tags: for benchmarking the cost
    /// of encryption only. Never used unless both ends of a handshake asked for it.
    pub fn plaintext_for_benchmarks_only(max_payload: usize) -> Self {
        let mut c = SealedCodec::new(
            &SessionKeys {
                c2s: [0; 32],
                s2c: [0; 32],
            },
            Side::Client,
            max_payload,
        );
        c.sealer.send.key = None;
        c.opener.recv.key = None;
        c.set_max_payload(max_payload);
        c
    }

    /// Change the largest payload accepted and sent (the tag comes on top).
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.sealer.max_payload = max_payload;
        self.opener.max_payload = max_payload;
        let tag = self.opener.recv.tag_len();
        self.opener.inner.set_max_frame_length(max_payload + tag);
    }

    pub fn max_payload(&self) -> usize {
        self.opener.max_payload
    }

    /// Seal one payload into a complete wire frame (length prefix, payload, tag), as the
    /// [`Encoder`] would; for code that drives a socket by hand (tests, tools).
    pub fn seal_frame(&mut self, payload: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut out = BytesMut::new();
        self.sealer
            .encode(Bytes::copy_from_slice(payload), &mut out)?;
        Ok(out.to_vec())
    }

    /// Verify one complete wire frame (length prefix included) and return its payload, as
    /// the [`Decoder`] would. Bytes past the first frame are an error.
    pub fn open_frame(&mut self, wire: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut buf = BytesMut::from(wire);
        let incomplete = || {
            SealError::Io(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "incomplete frame",
            ))
        };
        let payload = self.opener.decode(&mut buf)?.ok_or_else(incomplete)?;
        if !buf.is_empty() {
            return Err(SealError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "bytes after the frame",
            )));
        }
        Ok(payload.to_vec())
    }

    /// Frames sealed so far.
    pub fn sent(&self) -> u64 {
        self.sealer.send.seq
    }

    /// Frames verified so far.
    pub fn received(&self) -> u64 {
        self.opener.recv.seq
    }
}

impl FrameOpener {
    fn refuse(&mut self, detail: &'static str) -> SealError {
        self.failed = true;
        SealError::Authentication {
            seq: self.recv.seq,
            detail,
        }
    }
}

impl Decoder for FrameOpener {
    type Item = BytesMut;
    type Error = SealError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, SealError> {
        if self.failed {
            return Err(SealError::Authentication {
                seq: self.recv.seq,
                detail: "an earlier frame failed",
            });
        }
        // The inner codec refuses an oversized length prefix before buffering the frame.
        let Some(mut frame) = self.inner.decode(src)? else {
            return Ok(None);
        };
        let Some(key) = &self.recv.key else {
            self.recv.seq += 1;
            return Ok(Some(frame));
        };
        if frame.len() < TAG_LEN {
            return Err(self.refuse("frame shorter than its tag"));
        }
        let nonce = self.recv.nonce();
        let len = match key.open_in_place(nonce, Aad::empty(), &mut frame[..]) {
            Ok(plain) => plain.len(),
            Err(_) => {
                return Err(self.refuse("altered, forged, replayed, reordered or out of sequence"))
            }
        };
        frame.truncate(len);
        self.recv.seq = match self.recv.seq.checked_add(1) {
            Some(s) => s,
            None => return Err(self.refuse("sequence numbers exhausted")),
        };
        Ok(Some(frame))
    }
}

impl Encoder<Bytes> for FrameSealer {
    type Error = SealError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), SealError> {
        if payload.len() > self.max_payload {
            return Err(SealError::TooLarge {
                len: payload.len(),
                max: self.max_payload,
            });
        }
        let next =
            self.send.seq.checked_add(1).ok_or_else(|| {
                SealError::Io(std::io::Error::other("sequence numbers exhausted"))
            })?;
        let Some(key) = &self.send.key else {
            dst.reserve(4 + payload.len());
            dst.put_u32(payload.len() as u32);
            dst.extend_from_slice(&payload);
            self.send.seq = next;
            return Ok(());
        };
        dst.reserve(4 + payload.len() + TAG_LEN);
        dst.put_u32((payload.len() + TAG_LEN) as u32);
        let start = dst.len();
        dst.extend_from_slice(&payload);
        let tag = key
            .seal_in_place_separate_tag(self.send.nonce(), Aad::empty(), &mut dst[start..])
            .map_err(|_| SealError::Io(std::io::Error::other("encryption failed")))?;
        dst.extend_from_slice(tag.as_ref());
        self.send.seq = next;
        Ok(())
    }
}

impl Decoder for SealedCodec {
    type Item = BytesMut;
    type Error = SealError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<BytesMut>, SealError> {
        self.opener.decode(src)
    }
}

impl Encoder<Bytes> for SealedCodec {
    type Error = SealError;

    fn encode(&mut self, payload: Bytes, dst: &mut BytesMut) -> Result<(), SealError> {
        self.sealer.encode(payload, dst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> SessionKeys {
        SessionKeys::derive(&[7; 32], b"test transcript")
    }

    fn pair(keys: &SessionKeys) -> (SealedCodec, SealedCodec) {
        (
            SealedCodec::new(keys, Side::Client, 1024),
            SealedCodec::new(keys, Side::Server, 1024),
        )
    }

    fn seal(c: &mut SealedCodec, payload: &[u8]) -> BytesMut {
        let mut out = BytesMut::new();
        c.encode(Bytes::copy_from_slice(payload), &mut out).unwrap();
        out
    }

    fn open(c: &mut SealedCodec, wire: &[u8]) -> Result<Option<BytesMut>, SealError> {
        let mut b = BytesMut::from(wire);
        c.decode(&mut b)
    }

    #[track_caller]
    fn assert_auth_failure(r: Result<Option<BytesMut>, SealError>) {
        match r {
            Err(e @ SealError::Authentication { .. }) => {
                assert!(e.to_string().contains("frame authentication failed"), "{e}")
            }
            other => panic!("expected a frame authentication failure, got {other:?}"),
        }
    }

    #[test]
    fn sealed_frames_round_trip_in_order_both_ways() {
        let (mut c, mut s) = pair(&keys());
        for i in 0..5u8 {
            let w = seal(&mut c, &[i; 10]);
            assert_eq!(w.len(), 4 + 10 + TAG_LEN);
            assert_eq!(&open(&mut s, &w).unwrap().unwrap()[..], &[i; 10]);
            let w = seal(&mut s, &[i + 100; 3]);
            assert_eq!(&open(&mut c, &w).unwrap().unwrap()[..], &[i + 100; 3]);
        }
        let w = seal(&mut c, b"");
        assert_eq!(&open(&mut s, &w).unwrap().unwrap()[..], b"");
        // The by-hand helpers agree with the codec and keep the same count.
        let w = c.seal_frame(b"by hand").unwrap();
        assert_eq!(s.open_frame(&w).unwrap(), b"by hand");
        assert!(
            s.open_frame(&w[..w.len() - 1]).is_err(),
            "an incomplete frame is an error"
        );
        let (mut c, mut s) = pair(&keys());
        let w = seal(&mut c, b"x");
        assert_eq!(&open(&mut s, &w).unwrap().unwrap()[..], b"x");
        assert_eq!(
            (c.sent(), s.received(), s.sent(), c.received()),
            (1, 1, 0, 0)
        );
    }

    #[test]
    fn a_frame_split_across_reads_is_verified_once_complete() {
        let (mut c, mut s) = pair(&keys());
        let w = seal(&mut c, b"split me");
        let mut buf = BytesMut::from(&w[..7]);
        assert!(s.decode(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&w[7..]);
        assert_eq!(&s.decode(&mut buf).unwrap().unwrap()[..], b"split me");
    }

    #[test]
    fn a_flipped_bit_anywhere_is_rejected() {
        let k = keys();
        let (mut c, _) = pair(&k);
        let w = seal(&mut c, b"write 4096 bytes at offset 0 of inode 17");
        for bit in 0..w.len() * 8 {
            let (_, mut s) = pair(&k);
            let mut bad = w.clone();
            bad[bit / 8] ^= 1 << (bit % 8);
            let mut buf = bad.clone();
            match s.decode(&mut buf) {
                // A longer length prefix: the frame is not complete yet, nothing accepted.
                Ok(None) => assert!(
                    bit < 32,
                    "bit {bit}: payload bit flip left the frame pending"
                ),
                // A much longer one: refused as oversized before it is read.
                Err(SealError::Io(e)) => assert!(bit < 32, "bit {bit}: {e}"),
                r => assert_auth_failure(r),
            }
        }
        // The untouched frame still verifies.
        let (_, mut s) = pair(&k);
        assert!(open(&mut s, &w).unwrap().is_some());
    }

    #[test]
    fn payloads_travel_encrypted() {
        let k = keys();
        let (mut c, mut srv) = pair(&k);
        let secret = b"the contents of /wisp/home/alice/diary.txt, twice: diary diary";
        let wire = seal(&mut c, secret);
        assert!(
            !wire.windows(8).any(|w| secret.windows(8).any(|x| x == w)),
            "8 plaintext bytes in a row on the wire"
        );
        // The same payload sealed again looks different (a new nonce).
        let again = seal(&mut c, secret);
        assert_ne!(wire[4..], again[4..]);
        assert_eq!(&open(&mut srv, &wire).unwrap().unwrap()[..], secret);
        assert_eq!(&open(&mut srv, &again).unwrap().unwrap()[..], secret);
    }

    #[test]
    fn a_replayed_frame_is_rejected() {
        let (mut c, mut s) = pair(&keys());
        let w = seal(&mut c, b"unlink /wisp/a");
        assert!(open(&mut s, &w).unwrap().is_some());
        assert_auth_failure(open(&mut s, &w));
    }

    #[test]
    fn a_reordered_pair_is_rejected() {
        let (mut c, mut s) = pair(&keys());
        let first = seal(&mut c, b"mkdir /wisp/d");
        let second = seal(&mut c, b"rmdir /wisp/d");
        assert_auth_failure(open(&mut s, &second));
        // The codec is poisoned: not even the right frame is accepted after a failure.
        assert_auth_failure(open(&mut s, &first));
    }

    #[test]
    fn a_dropped_frame_is_noticed_at_the_next_one() {
        let (mut c, mut s) = pair(&keys());
        let _lost = seal(&mut c, b"one");
        let next = seal(&mut c, b"two");
        assert_auth_failure(open(&mut s, &next));
    }

    #[test]
    fn a_truncated_tag_is_rejected() {
        let k = keys();
        let (mut c, _) = pair(&k);
        let w = seal(&mut c, b"hello");
        for cut in 1..=TAG_LEN {
            // Shorten the frame and fix up its length prefix, as an attacker would.
            let body = &w[4..w.len() - cut];
            let mut bad = BytesMut::new();
            bad.put_u32(body.len() as u32);
            bad.extend_from_slice(body);
            let (_, mut s) = pair(&k);
            assert_auth_failure(open(&mut s, &bad));
        }
        // Shorter than a tag altogether.
        let (_, mut s) = pair(&k);
        assert_auth_failure(open(&mut s, &[0, 0, 0, 3, 1, 2, 3]));
    }

    #[test]
    fn a_frame_reflected_back_or_from_another_connection_is_rejected() {
        let k = keys();
        let (mut c, mut s) = pair(&k);
        // The client's own frame 0 sent back to it as if from the server.
        let w = seal(&mut c, b"ping");
        assert_auth_failure(open(&mut c, &w));
        // A frame of another connection (other nonces), same cluster key, same sequence.
        let other = SessionKeys::derive(&[3; 32], b"another transcript");
        let (mut c2, _) = pair(&other);
        let w = seal(&mut c2, b"ping");
        assert_auth_failure(open(&mut s, &w));
    }

    #[test]
    fn plaintext_mode_has_no_tag_and_round_trips() {
        let mut c = SealedCodec::plaintext_for_benchmarks_only(1024);
        let mut s = SealedCodec::plaintext_for_benchmarks_only(1024);
        let w = seal(&mut c, b"hello");
        assert_eq!(&w[..], b"\0\0\0\x05hello");
        assert_eq!(&open(&mut s, &w).unwrap().unwrap()[..], b"hello");
        // A sealed peer does not accept it.
        let (_, mut sealed) = pair(&keys());
        assert!(open(&mut sealed, &w).is_err());
    }

    #[test]
    fn sizes_are_bounded_both_ways() {
        let (mut c, mut s) = pair(&keys());
        // Sending: over the limit is refused, nothing written, sequence unchanged.
        let mut out = BytesMut::new();
        let e = c
            .encode(Bytes::from(vec![0u8; 1025]), &mut out)
            .unwrap_err();
        assert!(
            matches!(
                e,
                SealError::TooLarge {
                    len: 1025,
                    max: 1024
                }
            ),
            "{e}"
        );
        assert!(out.is_empty());
        assert_eq!(c.sent(), 0);
        // The largest legal payload goes through.
        let w = seal(&mut c, &[9u8; 1024]);
        assert_eq!(open(&mut s, &w).unwrap().unwrap().len(), 1024);
        // Receiving: a length prefix over limit + tag is refused from the prefix alone.
        let mut buf = BytesMut::new();
        buf.put_u32((1024 + TAG_LEN + 1) as u32);
        let e = s.decode(&mut buf).unwrap_err();
        assert!(matches!(e, SealError::Io(_)), "{e}");
    }

    #[test]
    fn keys_depend_on_every_input() {
        let base = SessionKeys::derive(&[1; 32], b"transcript");
        let variants = [
            SessionKeys::derive(&[2; 32], b"transcript"),
            SessionKeys::derive(&[1; 32], b"transcripT"),
        ];
        assert_ne!(base.c2s, base.s2c);
        for v in variants {
            assert_ne!(v.c2s, base.c2s);
            assert_ne!(v.s2c, base.s2c);
        }
        assert_eq!(format!("{base:?}"), "SessionKeys(..)");
    }
}
