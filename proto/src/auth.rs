//! Mutual authentication of a fresh connection with the two hosts' enrolled keys, an
//! ephemeral X25519 key agreement, and the session keys that seal every frame after it.
//!
//! ```text
//! client -> server  ClientHello { magic "WISP", version, nonce_c[32], eph_c[32] (X25519),
//!                                 host, label, cert_c, plaintext }
//! server -> client  ServerHello::Ok { core = { magic, version, nonce_s[32], eph_s[32], host,
//!                                     cert_s, plaintext }, sig_s = Sign_s("wisp-server" | T) }
//!                 | ServerHello::Refused { version, reason }
//! client -> server  ClientProof::Ok { sig_c = Sign_c("wisp-client" | T) }
//!                 | ClientProof::Refused { reason }
//! server -> client  Welcome { session }                       (sealed: frame 0 server -> client)
//!
//! T = SHA-256("wisp-handshake" | ClientHello bytes | core bytes)
//! ```
//! Each host signs the whole transcript: both nonces, both ephemeral public keys, the protocol
//! version and both host names and certificates ([`crate::identity`]). Each end checks the
//! other's certificate (issued by the cluster's enrollment authority, for the name it claims,
//! not revoked) before it signs anything itself, and refuses with a reason the other end
//! reports: an unenrolled, revoked or misnamed host is told why, and so is the log of the
//! host refusing it. Nonces and ephemeral keys are fresh per connection, so a recorded
//! handshake replayed later fails: its signature covers the old server nonce and ephemeral
//! key, not the new ones. Until the proof checks out, frames are capped at
//! [`HANDSHAKE_MAX_FRAME`] bytes and only these small messages are decoded.
//!
//! The session keys come from the X25519 shared secret and T ([`seal::SessionKeys::derive`]):
//! forward secrecy, since the ephemeral private keys are never stored, so a host key stolen
//! later does not open recorded traffic. Every frame from the `Welcome` on is sealed
//! ([`seal`]): the handshake functions return a [`Framed`] over a [`seal::SealedCodec`].
//!
//! `plaintext`: a client whose identity was made with
//! [`Identity::with_plaintext_for_benchmarks_only`] asks for unencrypted frames; only a server
//! whose identity was made the same way grants it, every other server refuses the connection.
//! The handshake is authenticated either way.

pub mod seal;

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;
use ring::signature::{UnparsedPublicKey as SigKey, ED25519};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};

use crate::identity::{Certificate, Identity, MAX_HOST_NAME};
use crate::{MAX_FRAME, PROTOCOL_VERSION};
use seal::{SealError, SealedCodec, SessionKeys, Side};

/// Frame cap while the peer is not yet authenticated.
pub const HANDSHAKE_MAX_FRAME: usize = 1024;
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
    /// The peer's signature over this handshake does not verify: it does not hold the host
    /// key its certificate names, or the handshake was replayed or altered.
    #[error("peer's signature over the handshake does not verify (not the enrolled key of the host it claims to be, or a replayed handshake)")]
    BadKey,
    /// The peer refused us, with its reason.
    #[error("peer refused the connection: {0}")]
    Refused(String),
    /// We refused the peer.
    #[error("refused the peer: {0}")]
    Rejected(String),
    #[error("handshake timed out after {0:?}")]
    Timeout(Duration),
    /// The sealed `Welcome` did not verify (or a sealed frame could not be written).
    #[error("{0}")]
    Seal(#[from] SealError),
}

/// Longest client label, in bytes.
pub const MAX_NAME: usize = 64;

#[derive(Serialize, Deserialize)]
struct ClientHello {
    magic: [u8; 4],
    version: u32,
    nonce: [u8; 32],
    eph: [u8; 32],
    host: String,
    label: String,
    cert: Option<Certificate>,
    plaintext: bool,
}

#[derive(Serialize, Deserialize)]
struct ServerCore {
    magic: [u8; 4],
    version: u32,
    nonce: [u8; 32],
    eph: [u8; 32],
    host: String,
    cert: Certificate,
    plaintext: bool,
}

#[derive(Serialize, Deserialize)]
enum ServerHello {
    Ok {
        core: ServerCore,
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
    Refused {
        version: u32,
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
enum ClientProof {
    Ok {
        #[serde(with = "serde_bytes")]
        sig: Vec<u8>,
    },
    Refused {
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct Welcome {
    session: u64,
}

/// What one end learns about the other.
#[derive(Debug, Clone)]
pub struct Peer {
    /// The label the client gave (a program name such as "rexec@ws1"); not authenticated,
    /// for logs only. On the client side, the server's host name.
    pub name: String,
    /// The peer's enrolled host name, authenticated by its certificate and signature.
    pub host: String,
    /// The peer's certificate, to re-check against the revocation list while connected.
    pub cert: Certificate,
    /// Server-assigned session number, unique per server process.
    pub session: u64,
    /// Whether frames travel unencrypted (benchmark mode, both ends asked for it).
    pub plaintext: bool,
}

fn transcript(hello: &[u8], core: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"wisp-handshake");
    h.update((hello.len() as u32).to_le_bytes());
    h.update(hello);
    h.update(core);
    h.finalize().into()
}

fn signed(label: &[u8], t: &[u8; 32]) -> Vec<u8> {
    let mut v = label.to_vec();
    v.extend_from_slice(t);
    v
}

fn verify_sig(cert: &Certificate, label: &[u8], t: &[u8; 32], sig: &[u8]) -> bool {
    SigKey::new(&ED25519, cert.host_key)
        .verify(&signed(label, t), sig)
        .is_ok()
}

fn nonce() -> [u8; 32] {
    use rand::RngCore;
    let mut n = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut n);
    n
}

/// A fresh X25519 key pair for one handshake.
fn ephemeral() -> Result<(EphemeralPrivateKey, [u8; 32]), AuthError> {
    let rng = SystemRandom::new();
    let private = EphemeralPrivateKey::generate(&X25519, &rng)
        .map_err(|_| AuthError::Malformed("cannot generate an ephemeral key".into()))?;
    let public = private
        .compute_public_key()
        .map_err(|_| AuthError::Malformed("cannot compute an ephemeral key".into()))?;
    let public: [u8; 32] = public
        .as_ref()
        .try_into()
        .map_err(|_| AuthError::Malformed("ephemeral key is not 32 bytes".into()))?;
    Ok((private, public))
}

fn session_keys(
    private: EphemeralPrivateKey,
    peer: &[u8; 32],
    t: &[u8; 32],
) -> Result<SessionKeys, AuthError> {
    agree_ephemeral(private, &UnparsedPublicKey::new(&X25519, peer), |shared| {
        SessionKeys::derive(shared, t)
    })
    .map_err(|_| AuthError::Malformed("peer's ephemeral key is not a valid X25519 key".into()))
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

async fn recv_raw<T, C>(f: &mut Framed<T, C>) -> Result<BytesMut, AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Decoder<Item = BytesMut>,
    AuthError: From<C::Error>,
{
    Ok(f.next().await.ok_or(AuthError::Closed)??)
}

fn decode<M: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<M, AuthError> {
    postcard::from_bytes(frame).map_err(|e| AuthError::Malformed(e.to_string()))
}

async fn recv<T, C, M>(f: &mut Framed<T, C>) -> Result<M, AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Decoder<Item = BytesMut>,
    AuthError: From<C::Error>,
    M: for<'de> Deserialize<'de>,
{
    decode(&recv_raw(f).await?)
}

fn encode<M: Serialize>(m: &M) -> Result<Vec<u8>, AuthError> {
    postcard::to_allocvec(m).map_err(|e| AuthError::Malformed(e.to_string()))
}

async fn send<T, C, M>(f: &mut Framed<T, C>, m: &M) -> Result<(), AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
    C: Encoder<Bytes>,
    AuthError: From<<C as Encoder<Bytes>>::Error>,
    M: Serialize,
{
    f.send(Bytes::from(encode(m)?)).await?;
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

fn sealed<T>(
    f: Framed<T, LengthDelimitedCodec>,
    keys: &SessionKeys,
    side: Side,
    plaintext: bool,
) -> Framed<T, SealedCodec> {
    f.map_codec(|_| {
        if plaintext {
            SealedCodec::plaintext_for_benchmarks_only(HANDSHAKE_MAX_FRAME)
        } else {
            SealedCodec::new(keys, side, HANDSHAKE_MAX_FRAME)
        }
    })
}

/// Tell the server why we refuse it (best effort); returns the reason.
async fn refuse_server<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, LengthDelimitedCodec>,
    reason: String,
) -> String {
    let _ = send(
        f,
        &ClientProof::Refused {
            reason: reason.clone(),
        },
    )
    .await;
    reason
}

/// Tell the client why we refuse it (best effort); returns the reason.
async fn refuse_client<T: AsyncRead + AsyncWrite + Unpin>(
    f: &mut Framed<T, LengthDelimitedCodec>,
    reason: String,
) -> String {
    let _ = send(
        f,
        &ServerHello::Refused {
            version: PROTOCOL_VERSION,
            reason: reason.clone(),
        },
    )
    .await;
    reason
}

/// Client side: present our certificate, check the server's certificate and signature, sign
/// the transcript, switch to sealed frames and raise the frame cap. `label` (cut to
/// [`MAX_NAME`] bytes) only names the program in the server's logs.
pub async fn client_handshake<T>(
    io: T,
    id: &Identity,
    label: &str,
) -> Result<(Framed<T, SealedCodec>, Peer), AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut f = new_framed(io);
        let (private, eph) = ephemeral()?;
        let hello = encode(&ClientHello {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            nonce: nonce(),
            eph,
            host: id.name().to_string(),
            label: clip_name(label),
            cert: id.certificate().cloned(),
            plaintext: id.plaintext(),
        })?;
        f.send(Bytes::from(hello.clone())).await?;
        let (core, sig) = match recv::<_, _, ServerHello>(&mut f).await? {
            ServerHello::Refused { reason, .. } => return Err(AuthError::Refused(reason)),
            ServerHello::Ok { core, sig } => (core, sig),
        };
        if core.magic != MAGIC {
            return Err(AuthError::BadMagic);
        }
        if core.version != PROTOCOL_VERSION {
            return Err(AuthError::Version {
                ours: PROTOCOL_VERSION,
                theirs: core.version,
            });
        }
        let t = transcript(&hello, &encode(&core)?);
        if let Err(why) = id.check_peer(Some(&core.cert), &core.host) {
            return Err(AuthError::Rejected(
                refuse_server(&mut f, format!("server {why}")).await,
            ));
        }
        if !verify_sig(&core.cert, b"wisp-server", &t, &sig) {
            let _ = refuse_server(&mut f, "server signature does not verify".into()).await;
            return Err(AuthError::BadKey);
        }
        if core.plaintext != id.plaintext() {
            return Err(AuthError::Rejected(
                refuse_server(
                    &mut f,
                    "server offers unencrypted frames the client did not ask for".into(),
                )
                .await,
            ));
        }
        send(
            &mut f,
            &ClientProof::Ok {
                sig: id.sign(&signed(b"wisp-client", &t)).to_vec(),
            },
        )
        .await?;
        let keys = session_keys(private, &core.eph, &t)?;
        let mut f = sealed(f, &keys, Side::Client, core.plaintext);
        let w: Welcome = recv(&mut f).await?;
        f.codec_mut().set_max_payload(MAX_FRAME);
        Ok((
            f,
            Peer {
                name: core.host.clone(),
                host: core.host,
                cert: core.cert,
                session: w.session,
                plaintext: core.plaintext,
            },
        ))
    })
    .await
    .map_err(|_| AuthError::Timeout(HANDSHAKE_TIMEOUT))?
}

/// Server side: check the client's certificate and its signature over the transcript before
/// anything else is read, then switch to sealed frames and raise the frame cap.
pub async fn server_handshake<T>(
    io: T,
    id: &Identity,
    session: u64,
) -> Result<(Framed<T, SealedCodec>, Peer), AuthError>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        let mut f = new_framed(io);
        let raw = recv_raw(&mut f).await?;
        let hello: ClientHello = decode(&raw)?;
        if hello.magic != MAGIC {
            return Err(AuthError::BadMagic);
        }
        if hello.version != PROTOCOL_VERSION {
            let _ = refuse_client(&mut f, format!(
                "server speaks protocol version {PROTOCOL_VERSION}, client {}; upgrade the older side",
                hello.version
            ))
            .await;
            return Err(AuthError::Version {
                ours: PROTOCOL_VERSION,
                theirs: hello.version,
            });
        }
        if hello.label.len() > MAX_NAME || hello.host.len() > MAX_HOST_NAME {
            return Err(AuthError::Malformed(format!(
                "client label or host name longer than {MAX_NAME} bytes"
            )));
        }
        if let Err(why) = id.check_peer(hello.cert.as_ref(), &hello.host) {
            return Err(AuthError::Rejected(refuse_client(&mut f, why).await));
        }
        if hello.plaintext && !id.plaintext() {
            return Err(AuthError::Rejected(
                refuse_client(
                    &mut f,
                    "client asked for unencrypted frames (benchmark mode) but this server requires encryption"
                        .into(),
                )
                .await,
            ));
        }
        let Some(my_cert) = id.certificate().cloned() else {
            return Err(AuthError::Rejected(
                refuse_client(&mut f, "server is not enrolled".into()).await,
            ));
        };
        let (private, eph) = ephemeral()?;
        let core = ServerCore {
            magic: MAGIC,
            version: PROTOCOL_VERSION,
            nonce: nonce(),
            eph,
            host: id.name().to_string(),
            cert: my_cert,
            plaintext: hello.plaintext,
        };
        let t = transcript(&raw, &encode(&core)?);
        let sig = id.sign(&signed(b"wisp-server", &t)).to_vec();
        send(&mut f, &ServerHello::Ok { core, sig }).await?;
        let sig = match recv::<_, _, ClientProof>(&mut f).await? {
            ClientProof::Refused { reason } => return Err(AuthError::Refused(reason)),
            ClientProof::Ok { sig } => sig,
        };
        let cert = hello.cert.expect("checked above");
        if !verify_sig(&cert, b"wisp-client", &t, &sig) {
            return Err(AuthError::BadKey);
        }
        let keys = session_keys(private, &hello.eph, &t)?;
        let mut f = sealed(f, &keys, Side::Server, hello.plaintext);
        send(&mut f, &Welcome { session }).await?;
        f.codec_mut().set_max_payload(MAX_FRAME);
        Ok((
            f,
            Peer {
                name: hello.label,
                host: hello.host,
                cert,
                session,
                plaintext: hello.plaintext,
            },
        ))
    })
    .await
    .map_err(|_| AuthError::Timeout(HANDSHAKE_TIMEOUT))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{enroll, load_or_create_host_key, revoke};
    use crate::key::ClusterKey;
    use std::path::Path;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    struct Hosts {
        dir: tempfile::TempDir,
        key: ClusterKey,
    }

    impl Hosts {
        fn new() -> Self {
            Hosts {
                dir: tempfile::tempdir().unwrap(),
                key: ClusterKey::generate(),
            }
        }
        fn path(&self, name: &str) -> std::path::PathBuf {
            self.dir.path().join(name)
        }
        fn enrolled(&self, name: &str) -> Identity {
            enroll(&self.path(name), name, &self.key).unwrap();
            Identity::load(&self.path(name)).unwrap()
        }
    }

    /// Run both ends over an in-memory pipe.
    async fn pair(
        server: &Identity,
        client: &Identity,
    ) -> (Result<Peer, AuthError>, Result<Peer, AuthError>) {
        let (a, b) = tokio::io::duplex(1 << 16);
        let s2 = server.clone();
        let s = tokio::spawn(async move { server_handshake(b, &s2, 7).await.map(|(_, p)| p) });
        let c = client_handshake(a, client, "test").await.map(|(_, p)| p);
        (s.await.unwrap(), c)
    }

    #[tokio::test]
    async fn enrolled_hosts_authenticate_each_other() {
        let h = Hosts::new();
        let (srv, ws) = (h.enrolled("srv1"), h.enrolled("ws1"));
        let (s, c) = pair(&srv, &ws).await;
        let (s, c) = (s.unwrap(), c.unwrap());
        assert_eq!(
            (s.host.as_str(), s.name.as_str(), s.session),
            ("ws1", "test", 7)
        );
        assert_eq!((c.host.as_str(), c.session), ("srv1", 7));
        assert!(!s.plaintext && !c.plaintext);
    }

    #[tokio::test]
    async fn another_clusters_host_is_refused_at_both_ends() {
        let h = Hosts::new();
        let srv = h.enrolled("srv1");
        let other = Hosts::new().enrolled("ws1");
        let (s, c) = pair(&srv, &other).await;
        let (s, c) = (s.unwrap_err(), c.unwrap_err());
        assert!(matches!(s, AuthError::Rejected(_)), "{s}");
        assert!(s.to_string().contains("not enrolled"), "{s}");
        assert!(matches!(c, AuthError::Refused(_)), "{c}");
        assert!(c.to_string().contains("not enrolled"), "{c}");
        // And a client refuses a server it knows to be revoked, telling it why.
        let ws2 = h.enrolled("ws2");
        revoke(&h.path("ws2").join("revoked"), "srv1", &h.key).unwrap();
        let (s, c) = pair(&srv, &ws2).await;
        let (s, c) = (s.unwrap_err(), c.unwrap_err());
        assert!(
            matches!(c, AuthError::Rejected(_)) && c.to_string().contains("revoked"),
            "{c}"
        );
        assert!(
            matches!(s, AuthError::Refused(_)) && s.to_string().contains("revoked"),
            "{s}"
        );
    }

    #[tokio::test]
    async fn unenrolled_and_revoked_hosts_are_refused() {
        let h = Hosts::new();
        let srv = h.enrolled("srv1");
        load_or_create_host_key(&h.path("ws9")).unwrap();
        let un = Identity::load_unenrolled(&h.path("ws9")).unwrap();
        let (s, c) = pair(&srv, &un).await;
        assert!(s.unwrap_err().to_string().contains("not enrolled"));
        assert!(c.unwrap_err().to_string().contains("not enrolled"));

        let ws = h.enrolled("ws1");
        revoke(&h.path("srv1").join("revoked"), "ws1", &h.key).unwrap();
        let (s, c) = pair(&srv, &ws).await;
        assert!(s.unwrap_err().to_string().contains("revoked"));
        let c = c.unwrap_err();
        assert!(
            matches!(c, AuthError::Refused(_)) && c.to_string().contains("revoked"),
            "{c}"
        );
    }

    /// A host presenting another host's certificate (it has not that host's key) fails on
    /// its signature.
    #[tokio::test]
    async fn a_host_claiming_another_hosts_name_is_refused() {
        let h = Hosts::new();
        let srv = h.enrolled("srv1");
        h.enrolled("ws1");
        h.enrolled("ws2");
        // ws2 steals ws1's certificate.
        std::fs::copy(
            h.path("ws1").join("host.cert"),
            h.path("ws2").join("host.cert"),
        )
        .unwrap();
        let e = Identity::load(&h.path("ws2")).unwrap_err();
        assert!(e.to_string().contains("another host key"), "{e}");
        // Forced past the local check: the server refuses the signature.
        let thief = steal_identity(&h.path("ws2"), &h.path("ws1"));
        let (s, c) = pair(&srv, &thief).await;
        assert!(matches!(s.unwrap_err(), AuthError::BadKey));
        assert!(c.is_err());
    }

    /// ws2's key with ws1's certificate (what a thief of the certificate alone has).
    fn steal_identity(own: &Path, victim: &Path) -> Identity {
        let d = tempfile::tempdir().unwrap().keep();
        std::fs::copy(own.join("host.key"), d.join("host.key")).unwrap();
        std::fs::copy(victim.join("authority.pub"), d.join("authority.pub")).unwrap();
        std::fs::copy(victim.join("host.cert"), d.join("host.cert")).unwrap();
        Identity::load_unenrolled(&d).unwrap()
    }

    /// Record a genuine client's handshake bytes, replay them on a new connection: the
    /// server's fresh nonce and ephemeral key make the recorded signature worthless.
    #[tokio::test]
    async fn a_replayed_handshake_is_refused() {
        let h = Hosts::new();
        let srv = h.enrolled("srv1");
        let ws = h.enrolled("ws1");
        // Record: a relay between client and server that keeps what the client sent.
        let (client_end, mut relay_c) = tokio::io::duplex(1 << 16);
        let (mut relay_s, server_end) = tokio::io::duplex(1 << 16);
        let s2 = srv.clone();
        let server =
            tokio::spawn(async move { server_handshake(server_end, &s2, 1).await.map(|_| ()) });
        let client = tokio::spawn({
            let ws = ws.clone();
            async move { client_handshake(client_end, &ws, "test").await.map(|_| ()) }
        });
        let mut recorded = vec![];
        let mut buf = vec![0u8; 1 << 16];
        let mut sbuf = vec![0u8; 1 << 16];
        loop {
            tokio::select! {
                n = relay_c.read(&mut buf) => {
                    let n = n.unwrap();
                    if n == 0 { break; }
                    recorded.extend_from_slice(&buf[..n]);
                    relay_s.write_all(&buf[..n]).await.unwrap();
                }
                n = relay_s.read(&mut sbuf) => {
                    let n = n.unwrap();
                    if n == 0 { break; }
                    relay_c.write_all(&sbuf[..n]).await.unwrap();
                }
                _ = tokio::time::sleep(Duration::from_millis(300)) => break,
            }
        }
        server.await.unwrap().unwrap();
        client.await.unwrap().unwrap();
        // Replay everything the client sent to a fresh server connection.
        let (mut evil, server_end) = tokio::io::duplex(1 << 16);
        let server =
            tokio::spawn(async move { server_handshake(server_end, &srv, 2).await.map(|_| ()) });
        evil.write_all(&recorded).await.unwrap();
        let e = server.await.unwrap().unwrap_err();
        assert!(matches!(e, AuthError::BadKey), "{e}");
    }

    #[tokio::test]
    async fn plaintext_only_when_both_ends_ask() {
        let h = Hosts::new();
        let srv = h.enrolled("srv1");
        let ws = h.enrolled("ws1");
        let (psrv, pws) = (
            srv.with_plaintext_for_benchmarks_only(),
            ws.with_plaintext_for_benchmarks_only(),
        );
        let (s, c) = pair(&psrv, &pws).await;
        assert!(s.unwrap().plaintext && c.unwrap().plaintext);
        // A server allowing plaintext still encrypts for a client that did not ask.
        let (s, c) = pair(&psrv, &ws).await;
        assert!(!s.unwrap().plaintext && !c.unwrap().plaintext);
        // A client asking for plaintext is refused by a normal server.
        let (s, c) = pair(&srv, &pws).await;
        assert!(s.unwrap_err().to_string().contains("requires encryption"));
        assert!(c.unwrap_err().to_string().contains("requires encryption"));
    }

    #[tokio::test]
    async fn oversized_handshake_frame_is_rejected() {
        let h = Hosts::new();
        let srv = h.enrolled("srv1");
        let (mut a, b) = tokio::io::duplex(1 << 20);
        let s = tokio::spawn(async move { server_handshake(b, &srv, 1).await.map(|(_, p)| p) });
        a.write_all(&(1u32 << 20).to_be_bytes()).await.unwrap();
        a.write_all(&vec![0u8; 4096]).await.unwrap();
        let e = s.await.unwrap().unwrap_err();
        assert!(matches!(e, AuthError::Io(_)), "{e}");
    }
}
