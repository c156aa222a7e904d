//! Mutual authentication of a fresh connection with the cluster key, and the session keys
//! that seal every frame after it.
//!
//! ```text
//! client -> server  ClientHello { magic "WISP", version, client_nonce[32], name }
//! server -> client  ServerHello { magic, version, server_nonce[32],
//!                                 mac = HMAC(key, "wisp-server" | version | client_nonce | server_nonce | name) }
//! client -> server  ClientProof { mac = HMAC(key, "wisp-client" | version | server_nonce | client_nonce | name) }
//! server -> client  Welcome { session }                       (sealed: frame 0 server -> client)
//! ```
//! Both nonces are fresh per connection, so a recorded handshake replayed later proves
//! nothing. Until the proof checks out, frames are capped at [`HANDSHAKE_MAX_FRAME`] bytes and
//! only these four small messages are decoded: a peer without the key never gets a request
//! parsed. A peer speaking another protocol version is refused with a message saying so.
//!
//! From the `Welcome` on, both ends hold per-direction session keys derived from the cluster
//! key, both nonces and the client name, and every frame carries a tag over its direction,
//! its implicit sequence number and its payload ([`seal`]): the handshake functions return a
//! [`Framed`] over a [`seal::SealedCodec`], so whoever reads or writes on it gets sealing
//! without asking for it, and an injected, altered, replayed, reordered or dropped frame is
//! refused before postcard sees it.

pub mod seal;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

use crate::key::ClusterKey;
use crate::{MAX_FRAME, PROTOCOL_VERSION};
use seal::{SealError, SealedCodec, SessionKeys, Side};

/// Frame cap while the peer is not yet authenticated.
pub const HANDSHAKE_MAX_FRAME: usize = 512;
/// A handshake that takes longer than this is abandoned.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

const MAGIC: [u8; 4] = *b"WISP";

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("connection closed during the handshake")]
    Closed,
    #[error("i/o error during the handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("malformed handshake message: {0}")]
    Malformed(String),
    #[error("peer is not a wisp daemon (bad magic)")]
    BadMagic,
    #[error(
        "peer speaks protocol version {theirs}, this build speaks {ours}; upgrade the older side"
    )]
    Version { ours: u32, theirs: u32 },
    #[error("peer does not hold the cluster key (proof rejected)")]
    BadKey,
    #[error("peer refused the connection: {0}")]
    Refused(String),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The sealed `Welcome` did not verify (or a sealed frame could not be written).
    #[error("{0}")]
    Seal(#[from] SealError),
}

/// Longest client name, in bytes.
pub const MAX_NAME: usize = 64;

#[derive(Serialize, Deserialize)]
struct ClientHello {
    magic: [u8; 4],
    version: u32,
    nonce: [u8; 32],
    name: String,
}

#[derive(Serialize, Deserialize)]
enum ServerHello {
    Ok {
        magic: [u8; 4],
        version: u32,
        nonce: [u8; 32],
        mac: [u8; 32],
    },
    Refused {
        version: u32,
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct ClientProof {
    mac: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    session: u64,
}

/// What the server learns about an authenticated client.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The name the client gave (its host name); authenticated only as "holds the key".
    pub name: String,
    /// Server-assigned session number, unique per server process.
    pub session: u64,
}

fn mac(key: &ClusterKey, label: &[u8], a: &[u8; 32], b: &[u8; 32], name: &str) -> [u8; 32] {
    let mut m = Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("hmac takes any key length");
    m.update(label);
    m.update(&PROTOCOL_VERSION.to_le_bytes());
    m.update(a);
    m.update(b);
    m.update(name.as_bytes());
    m.finalize().into_bytes().into()
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

/// A length-delimited framing with the handshake's tiny cap; raised by the handshake
/// functions once the peer is authenticated.
pub fn new_framed<T: AsyncRead + AsyncWrite>(io: T) -> Framed<T, LengthDelimitedCodec> {
    let codec = LengthDelimitedCodec::builder()
        .max_frame_length(HANDSHAKE_MAX_FRAME)
        .length_field_length(4)
        .new_codec();
    Framed::new(io, codec)
}

async fn recv<T, C, M>(f: &mut Framed<T, C>) -> Result<M, AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Decoder<Item = BytesMut>,
    AuthError: From<C::Error>,
    M: for<'de> Deserialize<'de>,
{
    let frame = f.next().await.ok_or(AuthError::Closed)??;
    postcard::from_bytes(&frame).map_err(|e| AuthError::Malformed(e.to_string()))
}

async fn send<T, C, M>(f: &mut Framed<T, C>, m: &M) -> Result<(), AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Encoder<Bytes>,
    AuthError: From<<C as Encoder<Bytes>>::Error>,
    M: Serialize,
{
    let bytes = postcard::to_allocvec(m).map_err(|e| AuthError::Malformed(e.to_string()))?;
    f.send(Bytes::from(bytes)).await?;
    Ok(())
}

/// `name` cut to at most [`MAX_NAME`] bytes, on a character boundary.
fn clip_name(name: &str) -> String {
    let mut end = name.len().min(MAX_NAME);
    while !name.is_char_boundary(end) {
        end -= 1;
    }
    name[..end].to_string()
}

/// Client side: prove the key, check the server's proof, switch to sealed frames and raise
/// the frame cap. The name is cut to [`MAX_NAME`] bytes.
pub async fn client_handshake<T>(
    io: T,
    key: &ClusterKey,
    name: &str,
) -> Result<(Framed<T, SealedCodec>, u64), AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut f = new_framed(io);
        let cn = nonce();
        let name = clip_name(name);
        send(
            &mut f,
            &ClientHello {
                magic: MAGIC,
                version: PROTOCOL_VERSION,
                nonce: cn,
                name: name.clone(),
            },
        )
        .await?;
        let (sn, smac) = match recv::<_, _, ServerHello>(&mut f).await? {
            ServerHello::Refused { reason, .. } => return Err(AuthError::Refused(reason)),
            ServerHello::Ok {
                magic,
                version,
                nonce,
                mac,
            } => {
                if magic != MAGIC {
                    return Err(AuthError::BadMagic);
                }
                if version != PROTOCOL_VERSION {
                    return Err(AuthError::Version {
                        ours: PROTOCOL_VERSION,
                        theirs: version,
                    });
                }
                (nonce, mac)
            }
        };
        let expect = mac(key, b"wisp-server", &cn, &sn, &name);
        if !bool::from(expect.ct_eq(&smac)) {
            return Err(AuthError::BadKey);
        }
        send(
            &mut f,
            &ClientProof {
                mac: mac(key, b"wisp-client", &sn, &cn, &name),
            },
        )
        .await?;
        let keys = SessionKeys::derive(key, &cn, &sn, &name);
        let mut f = f.map_codec(|_| SealedCodec::new(&keys, Side::Client, HANDSHAKE_MAX_FRAME));
        let w: Welcome = recv(&mut f).await?;
        f.codec_mut().set_max_payload(MAX_FRAME);
        Ok((f, w.session))
    })
    .await
    .map_err(|_| AuthError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Server side: check the client's proof before anything else is read, then switch to
/// sealed frames and raise the frame cap.
pub async fn server_handshake<T>(
    io: T,
    key: &ClusterKey,
    session: u64,
) -> Result<(Framed<T, SealedCodec>, Peer), AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut f = new_framed(io);
        let hello: ClientHello = recv(&mut f).await?;
        if hello.magic != MAGIC {
            return Err(AuthError::BadMagic);
        }
        if hello.version != PROTOCOL_VERSION {
            let reason = format!(
                "server speaks protocol version {PROTOCOL_VERSION}, client {}; upgrade the older side",
                hello.version
            );
            let _ = send(&mut f, &ServerHello::Refused { version: PROTOCOL_VERSION, reason }).await;
            return Err(AuthError::Version { ours: PROTOCOL_VERSION, theirs: hello.version });
        }
        if hello.name.len() > MAX_NAME {
            return Err(AuthError::Malformed(format!("client name longer than {MAX_NAME} bytes")));
        }
        let sn = nonce();
        let smac = mac(key, b"wisp-server", &hello.nonce, &sn, &hello.name);
        send(&mut f, &ServerHello::Ok { magic: MAGIC, version: PROTOCOL_VERSION, nonce: sn, mac: smac }).await?;
        let proof: ClientProof = recv(&mut f).await?;
        let expect = mac(key, b"wisp-client", &sn, &hello.nonce, &hello.name);
        if !bool::from(expect.ct_eq(&proof.mac)) {
            return Err(AuthError::BadKey);
        }
        let keys = SessionKeys::derive(key, &hello.nonce, &sn, &hello.name);
        let mut f = f.map_codec(|_| SealedCodec::new(&keys, Side::Server, HANDSHAKE_MAX_FRAME));
        send(&mut f, &Welcome { session }).await?;
        f.codec_mut().set_max_payload(MAX_FRAME);
        Ok((f, Peer { name: hello.name, session }))
    })
    .await
    .map_err(|_| AuthError::Timeout(HANDSHAKE_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn good_key_passes_and_bad_key_fails() {
        let k = ClusterKey::generate();
        let (a, b) = tokio::io::duplex(4096);
        let k2 = k.clone();
        let s = tokio::spawn(async move { server_handshake(b, &k2, 7).await.map(|(_, p)| p) });
        let (_, session) = client_handshake(a, &k, "ws1").await.unwrap();
        assert_eq!(session, 7);
        assert_eq!(s.await.unwrap().unwrap().name, "ws1");

        let (a, b) = tokio::io::duplex(4096);
        let k3 = k.clone();
        let s = tokio::spawn(async move { server_handshake(b, &k3, 8).await.map(|(_, p)| p) });
        let bad = ClusterKey::generate();
        let e = client_handshake(a, &bad, "evil").await.unwrap_err();
        assert!(matches!(e, AuthError::BadKey), "{e}");
        assert!(s.await.unwrap().is_err());
    }

    /// A server from before sealing sends a plain `Welcome`: the client refuses it with a
    /// frame authentication error instead of running unsealed.
    #[tokio::test]
    async fn an_unsealed_welcome_is_refused() {
        let k = ClusterKey::generate();
        let (a, b) = tokio::io::duplex(4096);
        let k2 = k.clone();
        let old_server = tokio::spawn(async move {
            let mut f = new_framed(b);
            let hello: ClientHello = recv(&mut f).await.unwrap();
            let sn = nonce();
            let smac = mac(&k2, b"wisp-server", &hello.nonce, &sn, &hello.name);
            send(
                &mut f,
                &ServerHello::Ok {
                    magic: MAGIC,
                    version: PROTOCOL_VERSION,
                    nonce: sn,
                    mac: smac,
                },
            )
            .await
            .unwrap();
            let _: ClientProof = recv(&mut f).await.unwrap();
            send(&mut f, &Welcome { session: 1 }).await.unwrap();
            f
        });
        let e = client_handshake(a, &k, "ws1").await.unwrap_err();
        assert!(matches!(e, AuthError::Seal(_)), "{e}");
        assert!(e.to_string().contains("frame authentication failed"), "{e}");
        drop(old_server.await.unwrap());
    }

    #[tokio::test]
    async fn oversized_handshake_frame_is_rejected() {
        use tokio::io::AsyncWriteExt;
        let k = ClusterKey::generate();
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let s = tokio::spawn(async move { server_handshake(b, &k, 1).await.map(|(_, p)| p) });
        a.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        a.write_all(&vec![0u8; 4096]).await.unwrap();
        let e = s.await.unwrap().unwrap_err();
        assert!(matches!(e, AuthError::Io(_)), "{e}");
    }
}
