//! Robustness of every decoder that sees network bytes, standing in for coverage-guided
//! fuzzing (cargo-fuzz needs a nightly toolchain, which this machine cannot install): tens of
//! thousands (hundreds of thousands in all) of random byte strings and mutations of genuine encodings are fed to
//!
//! - the sealed frame decoder ([`SealedCodec`]): no panic, never a frame that is not the
//!   genuine next one, and oversized length prefixes refused from the prefix alone;
//! - the message decoder (`postcard::from_bytes::<Message>`): no panic, a clear error;
//! - both handshake decoders (through [`server_handshake`] and [`client_handshake`] on
//!   in-memory pipes): no panic, a clear error, never an authenticated session, no hang;
//!
//! each within a bounded time. `WISP_FUZZ_SEED` replays a run (the seed is printed) and
//! `WISP_FUZZ_SCALE` multiplies the number of cases (default 1).

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::codec::{Decoder, Encoder};
use wisp_proto::auth::seal::{SealError, SealedCodec, SessionKeys, Side, TAG_LEN};
use wisp_proto::auth::{client_handshake, server_handshake, HANDSHAKE_MAX_FRAME};
use wisp_proto::key::ClusterKey;
use wisp_proto::msg::*;
use wisp_proto::MAX_FRAME;

fn rng(what: &str) -> StdRng {
    let seed = std::env::var("WISP_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("{what}: WISP_FUZZ_SEED={seed}");
    StdRng::seed_from_u64(seed)
}

fn scale(n: usize) -> usize {
    n * std::env::var("WISP_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1usize)
}

fn random_bytes(r: &mut StdRng, max: usize) -> Vec<u8> {
    let mut v = vec![0u8; r.gen_range(0..=max)];
    r.fill_bytes(&mut v);
    v
}

/// One to four random edits: bit flips, interesting bytes, truncation, insertion, deletion,
/// duplication.
fn mutate(r: &mut StdRng, v: &mut Vec<u8>) {
    for _ in 0..r.gen_range(1..=4) {
        if v.is_empty() {
            v.push(r.gen());
            continue;
        }
        let at = r.gen_range(0..v.len());
        match r.gen_range(0..7) {
            0 => v[at] ^= 1 << r.gen_range(0..8),
            1 => v[at] = r.gen(),
            2 => v[at] = [0x00, 0x01, 0x7f, 0x80, 0xff][r.gen_range(0..5)],
            3 => v.truncate(at),
            4 => {
                let extra = random_bytes(r, 16);
                v.splice(at..at, extra);
            }
            5 => {
                let end = r.gen_range(at..=v.len().min(at + 16));
                v.drain(at..end);
            }
            _ => {
                let end = r.gen_range(at..=v.len().min(at + 16));
                let dup = v[at..end].to_vec();
                v.splice(at..at, dup);
            }
        }
    }
}

fn attr(ino: Ino) -> Attr {
    Attr {
        ino,
        kind: Kind::File,
        perm: 0o644,
        nlink: 1,
        uid: 1000,
        gid: 1000,
        rdev: 0,
        size: 4096,
        blocks: 8,
        atime: Time::now(),
        mtime: Time::now(),
        ctime: Time::now(),
        version: 3,
    }
}

/// Genuine messages of many shapes, as seeds for mutation.
fn samples() -> Vec<Message> {
    let cred = Cred {
        uid: 1000,
        gid: 1000,
        pid: 42,
        groups: vec![27, 100],
    };
    let mode = OpenMode {
        read: true,
        write: true,
        truncate: false,
        nonblock: false,
    };
    vec![
        Message::Call {
            id: 1,
            req: Request::Ping,
        },
        Message::Call {
            id: 2,
            req: Request::Lookup {
                cred: cred.clone(),
                parent: ROOT_INO,
                name: b"etc".to_vec(),
            },
        },
        Message::Call {
            id: 3,
            req: Request::Write {
                cred: cred.clone(),
                ino: 9,
                offset: 1 << 40,
                data: vec![7; 300],
                append: false,
                nonblock: true,
            },
        },
        Message::Call {
            id: 4,
            req: Request::SetAttr {
                cred: cred.clone(),
                ino: 9,
                set: SetAttrs {
                    mode: Some(0o600),
                    size: Some(0),
                    mtime: Some(SetTime::Now),
                    ..Default::default()
                },
            },
        },
        Message::Call {
            id: 5,
            req: Request::Create {
                cred,
                parent: 1,
                name: b"f".to_vec(),
                mode: 0o644,
                excl: true,
                mode_open: mode,
            },
        },
        Message::Call {
            id: 6,
            req: Request::Exec(ExecSpec {
                job: 77,
                argv: vec![b"make".to_vec(), b"-j4".to_vec()],
                env: vec![(b"PATH".to_vec(), b"/usr/bin".to_vec())],
                cwd: b"/wisp/src".to_vec(),
                uid: 1000,
                gid: 1000,
                groups: vec![1000, 27],
                umask: 0o22,
                stdin: b"/wisp/.pipes/0".to_vec(),
                stdout: b"/wisp/.pipes/1".to_vec(),
                stderr: b"/wisp/.pipes/2".to_vec(),
                home: "ws1".into(),
            }),
        },
        Message::Call {
            id: 7,
            req: Request::MigrateOut {
                job: 77,
                to_host: "ws2".into(),
                to_addr: "10.0.0.3:7000".into(),
                mode: MigrateMode::PreCopy,
            },
        },
        Message::Call {
            id: 8,
            req: Request::Naming(vec![1, 2, 3, 4]),
        },
        Message::Reply {
            id: 2,
            resp: Ok(Response::Entry(attr(5))),
        },
        Message::Reply {
            id: 9,
            resp: Ok(Response::Entries(vec![
                DirEntry {
                    name: b"a".to_vec(),
                    cookie: 1,
                    attr: attr(10),
                },
                DirEntry {
                    name: b"b".to_vec(),
                    cookie: 2,
                    attr: attr(11),
                },
            ])),
        },
        Message::Reply {
            id: 10,
            resp: Err(WireError::new(13, "permission denied")),
        },
        Message::Reply {
            id: 11,
            resp: Ok(Response::Data(vec![1; 100])),
        },
        Message::Reply {
            id: 12,
            resp: Ok(Response::Stats(ServerStats::default())),
        },
        Message::Callback {
            id: 1,
            cb: Callback::InvalidateEntry {
                parent: 1,
                name: b"x".to_vec(),
            },
        },
        Message::CallbackReply {
            id: 1,
            resp: Err(WireError::new(5, "eio")),
        },
    ]
}

#[test]
fn message_decoder_survives_random_and_mutated_input() {
    let mut r = rng("message decoder");
    let start = Instant::now();
    let seeds: Vec<Vec<u8>> = samples()
        .iter()
        .map(|m| postcard::to_allocvec(m).unwrap())
        .collect();
    for s in &seeds {
        postcard::from_bytes::<Message>(s).expect("every sample decodes");
    }
    let (mut ok, mut err) = (0usize, 0usize);
    for i in 0..scale(200_000) {
        let input = if i % 2 == 0 {
            random_bytes(&mut r, 512)
        } else {
            let mut v = seeds[r.gen_range(0..seeds.len())].clone();
            mutate(&mut r, &mut v);
            v
        };
        match postcard::from_bytes::<Message>(&input) {
            // A mutation may still be a valid message (another id, another byte of data).
            Ok(m) => {
                ok += 1;
                let _ = format!("{m:?}");
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty(), "an empty error for {input:?}");
            }
        }
    }
    println!(
        "message decoder: {ok} decoded, {err} refused in {:?}",
        start.elapsed()
    );
    assert!(
        err > ok,
        "most garbage must be refused ({ok} decoded, {err} refused)"
    );
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "decoding took {:?}",
        start.elapsed()
    );
}

/// Hostile lengths inside a message (a 2^60-element vector in a few bytes) fail quickly
/// without allocating what they claim.
#[test]
fn message_decoder_does_not_trust_inner_lengths() {
    let start = Instant::now();
    // Message::Reply (1) id 1, Ok (0), Response::Entries (6), length varint 2^60.
    let mut v = vec![1u8, 1, 0, 6];
    let mut n: u64 = 1 << 60;
    while n >= 0x80 {
        v.push((n as u8) | 0x80);
        n >>= 7;
    }
    v.push(n as u8);
    assert!(postcard::from_bytes::<Message>(&v).is_err());
    // The same for a byte string (Response::Data, 4) claiming 4 GiB.
    let w = [1u8, 1, 0, 4, 0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3];
    assert!(postcard::from_bytes::<Message>(&w).is_err());
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
}

/// Decode `wire` in random chunks; returns the payloads accepted and whether an error ended it.
fn decode_chunked(
    r: &mut StdRng,
    codec: &mut SealedCodec,
    wire: &[u8],
) -> (Vec<Vec<u8>>, Option<SealError>) {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut rest = wire;
    while !rest.is_empty() {
        let n = r.gen_range(1..=rest.len().min(700));
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => out.push(f.to_vec()),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
    }
    (out, None)
}

#[test]
fn frame_decoder_accepts_only_the_genuine_frames_in_order() {
    let mut r = rng("frame decoder");
    let start = Instant::now();
    let keys = SessionKeys::derive(&ClusterKey::generate(), &[1; 32], &[2; 32], "ws1");
    let max = 4096;
    let payloads: Vec<Vec<u8>> = samples()
        .iter()
        .take(4)
        .map(|m| postcard::to_allocvec(m).unwrap())
        .collect();
    let mut sender = SealedCodec::new(&keys, Side::Client, max);
    let mut genuine = BytesMut::new();
    for p in &payloads {
        sender.encode(Bytes::from(p.clone()), &mut genuine).unwrap();
    }
    let genuine = genuine.to_vec();
    let (mut accepted, mut refused, mut pending) = (0usize, 0usize, 0usize);
    for i in 0..scale(100_000) {
        let wire = match i % 4 {
            0 => random_bytes(&mut r, 2048),
            // A plausible length prefix in front of random bytes: exercises the tag check.
            1 => {
                let body = random_bytes(&mut r, 600);
                [(body.len() as u32).to_be_bytes().to_vec(), body].concat()
            }
            _ => {
                let mut v = genuine.clone();
                mutate(&mut r, &mut v);
                v
            }
        };
        let mut receiver = SealedCodec::new(&keys, Side::Server, max);
        let (got, e) = decode_chunked(&mut r, &mut receiver, &wire);
        // Whatever was accepted is the genuine stream's prefix, unaltered and in order.
        assert!(got.len() <= payloads.len());
        for (k, g) in got.iter().enumerate() {
            assert_eq!(
                g, &payloads[k],
                "case {i}: frame {k} accepted although altered"
            );
        }
        accepted += got.len();
        match e {
            Some(e) => {
                refused += 1;
                let msg = e.to_string();
                assert!(!msg.is_empty());
                if e.is_authentication() {
                    assert!(msg.contains("frame authentication failed"), "{msg}");
                }
            }
            None => pending += 1,
        }
    }
    println!("frame decoder: {accepted} genuine frames accepted, {refused} streams refused, {pending} left incomplete, in {:?}", start.elapsed());
    assert!(refused > 0 && accepted > 0);
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "decoding took {:?}",
        start.elapsed()
    );
}

#[test]
fn frame_decoder_refuses_oversized_prefixes_before_reading() {
    let keys = SessionKeys::derive(&ClusterKey::generate(), &[1; 32], &[2; 32], "ws1");
    for len in [MAX_FRAME + TAG_LEN + 1, 64 << 20, u32::MAX as usize] {
        let mut c = SealedCodec::new(&keys, Side::Server, MAX_FRAME);
        let mut buf = BytesMut::from(&(len as u32).to_be_bytes()[..]);
        let e = c.decode(&mut buf).unwrap_err();
        assert!(matches!(e, SealError::Io(_)), "{e}");
    }
    // The largest legal frame is still awaited, not refused.
    let mut c = SealedCodec::new(&keys, Side::Server, MAX_FRAME);
    let mut buf = BytesMut::from(&((MAX_FRAME + TAG_LEN) as u32).to_be_bytes()[..]);
    assert!(c.decode(&mut buf).unwrap().is_none());
}

/// A genuine first frame of each side of a handshake: (ClientHello, ServerHello).
async fn genuine_hellos() -> (Vec<u8>, Vec<u8>) {
    let key = ClusterKey::generate();
    let (mut us, them) = tokio::io::duplex(4096);
    let k = key.clone();
    let client = tokio::spawn(async move { client_handshake(them, &k, "ws1").await.map(|_| ()) });
    let hello = read_frame(&mut us).await.unwrap();
    drop(us);
    let _ = client.await;
    let (mut us, them) = tokio::io::duplex(4096);
    let server = tokio::spawn(async move { server_handshake(them, &key, 1).await.map(|_| ()) });
    us.write_all(&hello).await.unwrap();
    let server_hello = read_frame(&mut us).await.unwrap();
    drop(us);
    let _ = server.await;
    (hello, server_hello)
}

async fn read_frame(io: &mut tokio::io::DuplexStream) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    io.read_exact(&mut len).await.ok()?;
    let n = u32::from_be_bytes(len) as usize;
    if n > HANDSHAKE_MAX_FRAME {
        return None;
    }
    let mut body = vec![0u8; n];
    io.read_exact(&mut body).await.ok()?;
    Some([len.to_vec(), body].concat())
}

#[test]
fn handshake_decoders_survive_random_and_mutated_input() {
    let mut r = rng("handshake decoders");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let start = Instant::now();
    let (hello, server_hello) = rt.block_on(genuine_hellos());
    let key = ClusterKey::generate();
    let mut kinds = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..scale(20_000) {
        let to_server = i % 2 == 0;
        let seed = if to_server { &hello } else { &server_hello };
        let input = match i % 6 {
            0 | 1 => {
                // Random body behind a length prefix that fits, so the decoder sees it.
                let body = random_bytes(&mut r, HANDSHAKE_MAX_FRAME);
                [(body.len() as u32).to_be_bytes().to_vec(), body].concat()
            }
            _ => {
                // Mutate the body only, keeping the prefix right (else the codec refuses it
                // before the decoder runs, which the other cases already cover).
                let mut body = seed[4..].to_vec();
                mutate(&mut r, &mut body);
                body.truncate(HANDSHAKE_MAX_FRAME);
                [(body.len() as u32).to_be_bytes().to_vec(), body].concat()
            }
        };
        let key = key.clone();
        let sent = input.clone();
        let res = rt.block_on(async move {
            let (mut us, them) = tokio::io::duplex(4096);
            let peer = if to_server {
                tokio::spawn(async move { server_handshake(them, &key, 1).await.map(|_| ()) })
            } else {
                tokio::spawn(async move { client_handshake(them, &key, "ws1").await.map(|_| ()) })
            };
            if !to_server {
                // Let the client say hello first.
                let _ = read_frame(&mut us).await;
            }
            let _ = us.write_all(&sent).await;
            // Then go away: whatever the peer decoded, it can never finish the handshake.
            drop(us);
            tokio::time::timeout(Duration::from_secs(5), peer).await
        });
        let e = match res {
            Err(_) => panic!("case {i}: a handshake hung on {input:?}"),
            Ok(Err(join)) => panic!("case {i}: a handshake panicked on {input:?}: {join}"),
            Ok(Ok(Ok(()))) => {
                panic!("case {i}: a handshake succeeded without the key on {input:?}")
            }
            Ok(Ok(Err(e))) => e,
        };
        let msg = e.to_string();
        assert!(!msg.is_empty());
        *kinds
            .entry(
                msg.split([':', '('])
                    .next()
                    .unwrap_or("")
                    .chars()
                    .take(28)
                    .collect(),
            )
            .or_default() += 1;
    }
    println!(
        "handshake decoders: refused as {kinds:?} in {:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "took {:?}",
        start.elapsed()
    );
}
