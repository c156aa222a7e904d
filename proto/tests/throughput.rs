//! Loopback throughput of the rpc layer: 1 GiB (by default) of 1 MiB write requests through
//! [`wisp_proto::rpc::serve`] and [`wisp_proto::rpc::RpcClient`], as the fs-client sends them.
//!
//! A benchmark, not a check: `#[ignore]`d, run it on a quiet machine with
//! `cargo nextest run --release -p wisp-proto --test throughput --run-ignored only --no-capture`
//! (or `cargo test --release -p wisp-proto --test throughput -- --ignored --nocapture`).
//! `WISP_BENCH_MIB` sets the volume in MiB (default 1024). Every frame after the handshake is
//! sealed (see `wisp_proto::auth::seal`); the frame-level A/B comparison of sealed and plain
//! frames is `frame_throughput_sealed_vs_plain` in `seal.rs`'s sibling test file `frames.rs`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wisp_proto::key::ClusterKey;
use wisp_proto::msg::{Request, Response, WireError};
use wisp_proto::rpc::{serve, PeerHandle, RpcClient, Service};

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
    std::env::var("WISP_BENCH_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024)
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn rpc_write_throughput() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let key = ClusterKey::generate();
    let svc = Arc::new(Sink { bytes: AtomicU64::new(0) });
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    rt.spawn(serve(listener, key.clone(), svc.clone(), std::future::pending()));
    let client = RpcClient::start(rt.handle().clone(), addr, key, "bench".into(), Duration::from_secs(30), Arc::new(|_| Ok(())));
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
                        let req = Request::Write { ino: 2, offset: i << 20, data: chunk.clone(), append: false, nonblock: false };
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
