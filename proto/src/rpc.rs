//! Multiplexed calls over one authenticated connection, both ways.
//!
//! Server: [`serve`] accepts connections (bounded by a semaphore), authenticates each with
//! [`crate::auth::server_handshake`], then decodes frames into [`Message`]s and runs every
//! call on the blocking pool through a [`Service`], so one slow request never stalls the
//! others on the same connection. A frame that does not decode closes that connection (and
//! only that one) with a log line naming the peer and the error. The service can call back
//! any connected client through its [`PeerHandle`].
//!
//! Client: [`RpcClient`] keeps one connection to a server, reconnects with backoff when it
//! drops, and gives each call a bounded wait ([`RpcClient::call_timeout`]): when the server
//! stays away longer, the call fails with ETIMEDOUT instead of hanging its caller forever.
//! A call whose connection dropped before the reply is sent again on the next connection,
//! so requests must be safe to repeat or tolerate a repeat (see docs/protocol.md).

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tracing::{debug, info, warn};

use crate::auth::{client_handshake, server_handshake};
use crate::key::ClusterKey;
use crate::msg::{Callback, Message, Request, Response, WireError};

/// Most connections a server accepts at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most calls in flight on one connection; the reader waits when it is reached.
pub const MAX_INFLIGHT: usize = 256;
/// How long a server waits for a client to answer a callback before giving up on it.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);

fn encode(m: &Message) -> Bytes {
    Bytes::from(postcard::to_allocvec(m).expect("messages always encode"))
}

/// Errors of the rpc layer, as seen by callers.
#[derive(Debug, thiserror::Error)]
pub enum RpcError {
    #[error("no answer from {addr} within {secs} s (server down or unreachable)")]
    Timeout { addr: String, secs: u64 },
    #[error("{0}")]
    Remote(WireError),
}

impl RpcError {
    /// The errno a file system should return for this error.
    pub fn errno(&self) -> i32 {
        match self {
            RpcError::Timeout { .. } => libc_eio(),
            RpcError::Remote(w) => w.errno,
        }
    }
}

const fn libc_eio() -> i32 {
    5
}

// ----------------------------------------------------------------------------------------
// Server side

/// A request handler. `call` runs on tokio's blocking pool: it may do file and database I/O.
pub trait Service: Send + Sync + 'static {
    fn call(&self, peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError>;
    /// A client connection ended (closed, failed, or dropped for bad input).
    fn disconnected(&self, _peer: &Arc<PeerHandle>) {}
}

/// One authenticated client connection, as the server sees it.
pub struct PeerHandle {
    pub session: u64,
    pub name: String,
    tx: mpsc::Sender<Bytes>,
    next_cb: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<(), WireError>>>>,
}

impl std::fmt::Debug for PeerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer({}#{})", self.name, self.session)
    }
}

impl PeerHandle {
    /// Send a callback and wait for the client's answer (bounded by [`CALLBACK_TIMEOUT`]).
    pub async fn callback(&self, cb: Callback) -> Result<(), WireError> {
        let id = self.next_cb.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if self.tx.send(encode(&Message::Callback { id, cb })).await.is_err() {
            self.pending.lock().unwrap().remove(&id);
            return Err(WireError::new(107, format!("client {} is gone", self.name)));
        }
        match tokio::time::timeout(CALLBACK_TIMEOUT, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WireError::new(107, format!("client {} is gone", self.name))),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(WireError::new(110, format!("client {} did not answer a callback", self.name)))
            }
        }
    }

    /// [`PeerHandle::callback`] from a blocking-pool thread.
    pub fn callback_blocking(&self, cb: Callback) -> Result<(), WireError> {
        tokio::runtime::Handle::current().block_on(self.callback(cb))
    }
}

/// Serve `service` on `listener` until `shutdown` completes.
pub async fn serve<S: Service>(
    listener: TcpListener,
    key: ClusterKey,
    service: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sessions = AtomicU64::new(1);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => return,
            p = limit.clone().acquire_owned() => p.expect("semaphore never closed"),
        };
        let (sock, addr) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept failed: {e}"); tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        let _ = sock.set_nodelay(true);
        let session = sessions.fetch_add(1, Ordering::Relaxed);
        let key = key.clone();
        let service = service.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match server_handshake(sock, &key, session).await {
                Ok((framed, peer)) => {
                    info!(peer = %peer.name, %addr, session, "client authenticated");
                    run_server_conn(framed, peer, service).await;
                }
                Err(e) => warn!(%addr, "dropping connection before any request: {e}"),
            }
        });
    }
}

async fn run_server_conn<S: Service>(
    framed: tokio_util::codec::Framed<TcpStream, tokio_util::codec::LengthDelimitedCodec>,
    peer: crate::auth::Peer,
    service: Arc<S>,
) {
    let (mut sink, mut stream) = framed.split();
    let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
    let handle = Arc::new(PeerHandle {
        session: peer.session,
        name: peer.name.clone(),
        tx,
        next_cb: AtomicU64::new(1),
        pending: Mutex::new(HashMap::new()),
    });
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if sink.send(b).await.is_err() {
                break;
            }
        }
    });
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT));
    while let Some(frame) = stream.next().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                warn!(peer = %peer.name, "closing connection: bad frame: {e}");
                break;
            }
        };
        let msg: Message = match postcard::from_bytes(&frame) {
            Ok(m) => m,
            Err(e) => {
                warn!(peer = %peer.name, len = frame.len(), "closing connection: undecodable message: {e}");
                break;
            }
        };
        match msg {
            Message::Call { id, req } => {
                let permit = inflight.clone().acquire_owned().await.expect("never closed");
                let service = service.clone();
                let h = handle.clone();
                tokio::spawn(async move {
                    let h2 = h.clone();
                    let resp = tokio::task::spawn_blocking(move || service.call(&h2, req))
                        .await
                        .unwrap_or_else(|e| Err(WireError::new(5, format!("server task failed: {e}"))));
                    drop(permit);
                    let _ = h.tx.send(encode(&Message::Reply { id, resp })).await;
                });
            }
            Message::CallbackReply { id, resp } => {
                if let Some(tx) = handle.pending.lock().unwrap().remove(&id) {
                    let _ = tx.send(resp);
                }
            }
            other => {
                warn!(peer = %peer.name, "closing connection: client sent a server-only message {other:?}");
                break;
            }
        }
    }
    debug!(peer = %peer.name, "connection closed");
    handle.pending.lock().unwrap().clear();
    service.disconnected(&handle);
    writer.abort();
}

// ----------------------------------------------------------------------------------------
// Client side

/// Handles callbacks from the server on the client; runs on the blocking pool.
pub type CallbackHandler = Arc<dyn Fn(Callback) -> Result<(), WireError> + Send + Sync>;

#[derive(Clone)]
enum ConnState {
    Down,
    Up { tx: mpsc::Sender<Bytes> },
}

struct ClientInner {
    addr: String,
    state: watch::Sender<ConnState>,
    next_id: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Response, WireError>>>>,
    call_timeout: Duration,
    reconnects: AtomicU64,
}

/// A reconnecting, multiplexing client connection to one server.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<ClientInner>,
    rt: tokio::runtime::Handle,
}

impl RpcClient {
    /// Start connecting to `addr` in the background on runtime `rt`. Calls wait (bounded) for
    /// the connection to come up.
    pub fn start(
        rt: tokio::runtime::Handle,
        addr: String,
        key: ClusterKey,
        name: String,
        call_timeout: Duration,
        callbacks: CallbackHandler,
    ) -> Self {
        let (state, _) = watch::channel(ConnState::Down);
        let inner = Arc::new(ClientInner {
            addr,
            state,
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            call_timeout,
            reconnects: AtomicU64::new(0),
        });
        let i2 = inner.clone();
        rt.spawn(async move { connection_loop(i2, key, name, callbacks).await });
        RpcClient { inner, rt }
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// How many times the connection was (re)established.
    pub fn connections(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// The bound on how long one call may wait for the server.
    pub fn call_timeout(&self) -> Duration {
        self.inner.call_timeout
    }

    /// Make a call; retried on a new connection if the old one dropped; bounded in time.
    pub async fn call(&self, req: Request) -> Result<Response, RpcError> {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = encode(&Message::Call { id, req });
        let deadline = tokio::time::Instant::now() + self.inner.call_timeout;
        let timeout = || RpcError::Timeout { addr: self.inner.addr.clone(), secs: self.inner.call_timeout.as_secs() };
        let mut rx_state = self.inner.state.subscribe();
        loop {
            let tx = loop {
                let st = rx_state.borrow_and_update().clone();
                match st {
                    ConnState::Up { tx, .. } => break tx,
                    ConnState::Down => {
                        if tokio::time::timeout_at(deadline, rx_state.changed()).await.is_err() {
                            return Err(timeout());
                        }
                    }
                }
            };
            let (otx, orx) = oneshot::channel();
            self.inner.pending.lock().unwrap().insert(id, otx);
            if tx.send(bytes.clone()).await.is_err() {
                self.inner.pending.lock().unwrap().remove(&id);
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            match tokio::time::timeout_at(deadline, orx).await {
                Ok(Ok(r)) => return r.map_err(RpcError::Remote),
                Ok(Err(_)) => continue, // connection dropped; send again on the next one
                Err(_) => {
                    self.inner.pending.lock().unwrap().remove(&id);
                    return Err(timeout());
                }
            }
        }
    }

    /// [`RpcClient::call`] from a thread outside the runtime (FUSE worker threads).
    pub fn call_blocking(&self, req: Request) -> Result<Response, RpcError> {
        self.rt.block_on(self.call(req))
    }
}

async fn connection_loop(inner: Arc<ClientInner>, key: ClusterKey, name: String, callbacks: CallbackHandler) {
    let mut backoff = Duration::from_millis(50);
    let mut generation = 0u64;
    loop {
        let sock = match TcpStream::connect(&inner.addr).await {
            Ok(s) => s,
            Err(e) => {
                debug!(addr = %inner.addr, "connect failed: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let _ = sock.set_nodelay(true);
        let framed = match client_handshake(sock, &key, &name).await {
            Ok((f, _)) => f,
            Err(e) => {
                warn!(addr = %inner.addr, "handshake with server failed: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        generation += 1;
        inner.reconnects.fetch_add(1, Ordering::Relaxed);
        info!(addr = %inner.addr, generation, "connected to server");
        let (mut sink, mut stream) = framed.split();
        let (tx, mut rx) = mpsc::channel::<Bytes>(1024);
        let writer = tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if sink.send(b).await.is_err() {
                    break;
                }
            }
        });
        inner.state.send_replace(ConnState::Up { tx: tx.clone() });
        while let Some(frame) = stream.next().await {
            let Ok(frame) = frame else { break };
            let msg: Message = match postcard::from_bytes(&frame) {
                Ok(m) => m,
                Err(e) => {
                    warn!(addr = %inner.addr, "server sent an undecodable message, reconnecting: {e}");
                    break;
                }
            };
            match msg {
                Message::Reply { id, resp } => {
                    if let Some(otx) = inner.pending.lock().unwrap().remove(&id) {
                        let _ = otx.send(resp);
                    }
                }
                Message::Callback { id, cb } => {
                    let cbh = callbacks.clone();
                    let tx = tx.clone();
                    tokio::spawn(async move {
                        let resp = tokio::task::spawn_blocking(move || cbh(cb))
                            .await
                            .unwrap_or_else(|e| Err(WireError::new(5, format!("callback failed: {e}"))));
                        let _ = tx.send(encode(&Message::CallbackReply { id, resp })).await;
                    });
                }
                other => {
                    warn!("server sent a client-only message {other:?}; reconnecting");
                    break;
                }
            }
        }
        inner.state.send_replace(ConnState::Down);
        writer.abort();
        // Wake every waiter: their calls are sent again on the next connection.
        inner.pending.lock().unwrap().clear();
        warn!(addr = %inner.addr, "connection to server lost; reconnecting");
    }
}
