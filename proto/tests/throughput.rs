//! Loopback throughput of the rpc layer: 1 GiB (by default) of 1 MiB write requests through
//! [`wisp_proto::rpc::serve`] and [`wisp_proto::rpc::RpcClient`], as the fs-client sends them.
//!
//! A benchmark, not a check: `#[ignore]`d, run it on a quiet machine with
//! `cargo nextest run --release -p wisp-proto --test throughput --run-ignored only --no-capture`
//! (or `cargo test --release -p wisp-proto --test throughput -- --ignored --nocapture`).
//! `WISP_BENCH_MIB` sets the volume in MiB (default 1024).
//!
//! - `rpc_write_throughput`: the production path, where every frame after the handshake is
//!   sealed (see `wisp_proto::auth::seal`), with 1 and 4 calls in flight.
//! - `frame_throughput_sealed_vs_plain`: the same write requests streamed one way over a
//!   loopback TCP connection, encoded and decoded down to [`Message`], once in plain
//!   length-delimited frames (the protocol before sealing) and once in sealed frames: the
//!   cost of sealing alone, A/B in one run.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::{Decoder, Encoder, Framed, LengthDelimitedCodec};
use wisp_proto::auth::seal::{SealedCodec, SessionKeys, Side};
use wisp_proto::key::ClusterKey;
use wisp_proto::msg::{Message, Request, Response, WireError};
use wisp_proto::rpc::{serve, PeerHandle, RpcClient, Service};
use wisp_proto::MAX_FRAME;

/// Accepts writes and counts their bytes; stores nothing.
struct Sink {
    bytes: AtomicU64,
}

impl Service for Sink {
    fn call(&self, _peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError> {
        match req {
            Request::Write { data, .. } => {
                self.bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
                Ok(Response::Ok)
            }
            Request::Ping => Ok(Response::Pong),
            _ => Err(WireError::new(38, "not implemented in this benchmark")),
        }
    }
}

fn mib() -> u64 {
    std::env::var("WISP_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn rpc_write_throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let key = ClusterKey::generate();
    let svc = Arc::new(Sink {
        bytes: AtomicU64::new(0),
    });
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(serve(
        listener,
        key.clone(),
        svc.clone(),
        std::future::pending(),
    ));
    let client = RpcClient::start(
        rt.handle().clone(),
        addr,
        key,
        "bench".into(),
        Duration::from_secs(30),
        Arc::new(|_| Ok(())),
    );
    let total = mib();
    let chunk = vec![0x5au8; 1 << 20];
    // Warm up (connect, allocate).
    rt.block_on(client.call(Request::Ping)).unwrap();
    for inflight in [1u64, 4] {
        let before = svc.bytes.load(Ordering::Relaxed);
        let start = Instant::now();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for t in 0..inflight {
                let c = client.clone();
                let chunk = chunk.clone();
                tasks.push(tokio::spawn(async move {
                    let mut i = t;
                    while i < total {
                        let req = Request::Write {
                            cred: wisp_proto::msg::Cred::ROOT,
                            ino: 2,
                            offset: i << 20,
                            data: chunk.clone(),
                            append: false,
                            nonblock: false,
                        };
                        c.call(req).await.unwrap();
                        i += inflight;
                    }
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let secs = start.elapsed().as_secs_f64();
        let moved = svc.bytes.load(Ordering::Relaxed) - before;
        assert_eq!(moved, total << 20);
        println!(
            "rpc_write_throughput: {total} MiB in 1 MiB writes, {inflight} in flight: {secs:.2} s, {:.0} MB/s",
            moved as f64 / secs / 1e6
        );
    }
}

/// Stream `total` MiB of 1 MiB write calls from a client codec to a server codec over
/// loopback TCP; the receiver decodes every frame down to a [`Message`]. Returns MB/s.
fn stream_writes<C>(rt: &tokio::runtime::Runtime, total: u64, client: C, server: C) -> f64
where
    C: Encoder<Bytes> + Decoder<Item = BytesMut> + Send + 'static,
    <C as Encoder<Bytes>>::Error: std::fmt::Debug + Send,
    <C as Decoder>::Error: std::fmt::Debug + Send,
{
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let rx = tokio::spawn(async move {
            let (sock, _) = listener.accept().await.unwrap();
            let mut f = Framed::new(sock, server);
            let mut bytes = 0u64;
            while let Some(frame) = f.next().await {
                let frame = frame.unwrap();
                match postcard::from_bytes::<Message>(&frame).unwrap() {
                    Message::Call {
                        req: Request::Write { data, .. },
                        ..
                    } => bytes += data.len() as u64,
                    other => panic!("unexpected {other:?}"),
                }
            }
            bytes
        });
        let sock = tokio::net::TcpStream::connect(addr).await.unwrap();
        sock.set_nodelay(true).unwrap();
        let mut f = Framed::new(sock, client);
        let chunk = vec![0x5au8; 1 << 20];
        let start = Instant::now();
        for i in 0..total {
            let req = Request::Write {
                cred: wisp_proto::msg::Cred::ROOT,
                ino: 2,
                offset: i << 20,
                data: chunk.clone(),
                append: false,
                nonblock: false,
            };
            let bytes = Bytes::from(postcard::to_allocvec(&Message::Call { id: i, req }).unwrap());
            f.send(bytes).await.unwrap();
        }
        drop(f);
        let moved = rx.await.unwrap();
        assert_eq!(moved, total << 20);
        moved as f64 / start.elapsed().as_secs_f64() / 1e6
    })
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn frame_throughput_sealed_vs_plain() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let total = mib();
    let plain = || {
        LengthDelimitedCodec::builder()
            .length_field_length(4)
            .max_frame_length(MAX_FRAME)
            .new_codec()
    };
    let keys = SessionKeys::derive(&ClusterKey::generate(), &[1; 32], &[2; 32], "bench");
    let sealed = |side| SealedCodec::new(&keys, side, MAX_FRAME);
    // Alternate, so that a change in machine load hits both alike.
    for round in 1..=2 {
        let p = stream_writes(&rt, total, plain(), plain());
        let s = stream_writes(&rt, total, sealed(Side::Client), sealed(Side::Server));
        println!(
            "frame_throughput_sealed_vs_plain round {round}: {total} MiB in 1 MiB writes: plain {p:.0} MB/s, sealed {s:.0} MB/s ({:+.0} %)",
            (s - p) / p * 100.0
        );
    }
}
