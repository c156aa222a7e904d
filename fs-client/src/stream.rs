//! Streams: opens of cluster pipes and pseudo-devices. Their reads, writes, ioctls and
//! polls run as tasks on the client's runtime that answer the kernel when done, so a
//! blocked reader holds no FUSE worker thread (16 blocked readers do not wedge the mount).
//!
//! A blocking operation is a sequence of bounded waits: the server (pipe) or the serving
//! host's wispd (device) waits up to a few seconds for the operation to be possible, then
//! answers EAGAIN, and the task asks again. No polling loop runs while nothing changes.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use fuser::PollNotifier;
use wisp_proto::msg::{OpenMode, PdevCall, PdevCaller, PdevOp, Request as Rq, Response as Rs};
use wisp_proto::rpc::{RpcClient, RpcError};

use crate::domains::Domains;

/// An open pseudo-device: the serving host's wispd, the device and the open it gave.
#[derive(Clone)]
pub(crate) struct DevOpen {
    pub agent: RpcClient,
    pub dev: u64,
    pub open: u64,
}

/// What a stream operation goes to.
#[derive(Clone)]
pub(crate) enum Target {
    Pipe { ino: u64, mode: OpenMode },
    Dev(DevOpen),
}

/// One stream operation.
#[derive(Clone)]
pub(crate) enum Op {
    Read {
        size: u32,
        nonblock: bool,
    },
    Write {
        data: Vec<u8>,
        nonblock: bool,
    },
    Ioctl {
        cmd: u32,
        data: Vec<u8>,
        out_size: u32,
    },
    Poll {
        events: u32,
        wait: bool,
    },
}

/// Per-open state of a stream's poll waiter.
#[derive(Default)]
pub(crate) struct PollState {
    /// Events a waiter task waits for (0: none runs).
    pub wanted: AtomicU32,
    /// The kernel's latest poll handle for this file.
    pub notifier: Mutex<Option<PollNotifier>>,
    /// The open was released: waiters stop.
    pub closed: AtomicBool,
}

pub(crate) async fn call(
    domains: &Domains,
    t: &Target,
    caller: &PdevCaller,
    op: Op,
) -> Result<Rs, RpcError> {
    match t {
        Target::Pipe { ino, mode } => {
            let r = match op {
                Op::Read { size, nonblock } => Rq::Read {
                    ino: *ino,
                    offset: 0,
                    size,
                    nonblock,
                },
                Op::Write { data, nonblock } => Rq::Write {
                    ino: *ino,
                    offset: 0,
                    data,
                    append: false,
                    nonblock,
                },
                Op::Poll { events, wait } => Rq::PipePoll {
                    ino: *ino,
                    mode: *mode,
                    events,
                    wait,
                },
                Op::Ioctl { .. } => {
                    return Err(RpcError::Remote(wisp_proto::msg::WireError::new(
                        libc::ENOTTY,
                        "a cluster pipe has no ioctls",
                    )))
                }
            };
            domains.call(r).await
        }
        Target::Dev(d) => {
            let op = match op {
                Op::Read { size, nonblock } => PdevOp::Read { size, nonblock },
                Op::Write { data, nonblock } => PdevOp::Write { data, nonblock },
                Op::Ioctl {
                    cmd,
                    data,
                    out_size,
                } => PdevOp::Ioctl {
                    cmd,
                    data,
                    out_size,
                },
                Op::Poll { events, wait } => PdevOp::Poll { events, wait },
            };
            d.agent
                .call(Rq::Pdev(PdevCall {
                    dev: d.dev,
                    open: d.open,
                    caller: caller.clone(),
                    op,
                }))
                .await
        }
    }
}

/// Ask until the operation is done, while a blocking one answers EAGAIN ("still waiting").
pub(crate) async fn call_blocking(
    domains: &Domains,
    t: &Target,
    caller: &PdevCaller,
    op: Op,
    blocking: bool,
) -> Result<Rs, RpcError> {
    loop {
        match call(domains, t, caller, op.clone()).await {
            Err(RpcError::Remote(w)) if blocking && w.errno == libc::EAGAIN => continue,
            other => return other,
        }
    }
}

/// Wait in the background (bounded waits, asked again) until one of the wanted events
/// holds, or the stream fails or is closed, then tell the kernel to poll again.
pub(crate) async fn poll_waiter(
    domains: &Domains,
    t: Target,
    caller: PdevCaller,
    st: Arc<PollState>,
) {
    let hup = (libc::POLLERR | libc::POLLHUP) as u32;
    loop {
        if st.closed.load(Ordering::Relaxed) {
            return;
        }
        let events = st.wanted.load(Ordering::Relaxed);
        let r = call(domains, &t, &caller, Op::Poll { events, wait: true }).await;
        let ready = match r {
            Ok(Rs::Ready(r)) => r & (events | hup) != 0,
            _ => true, // an error: the kernel's next poll sees it
        };
        if ready {
            st.wanted.store(0, Ordering::Relaxed);
            if let Some(n) = st.notifier.lock().unwrap().clone() {
                let _ = n.notify();
            }
            return;
        }
    }
}
