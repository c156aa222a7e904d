//! Multiplexed calls over one authenticated connection, both ways.
//!
//! Server: [`serve`] accepts connections (bounded by a semaphore), authenticates each with
//! [`crate::auth::server_handshake`], then decodes frames into [`Message`]s and runs every
//! call on the blocking pool through a [`Service`], so one slow request never stalls the
//! others on the same connection. Every frame after the handshake is sealed both ways (the
//! connection's writer task tags, its reader verifies; see [`crate::auth::seal`]): a frame
//! that fails authentication, or does not decode, closes that connection (and only that
//! one) with a log line naming the peer and the error, before postcard sees the payload. The service can call back
//! any connected client through its [`PeerHandle`].
//!
//! Client: [`RpcClient`] keeps one connection to a server, reconnects with backoff when it
//! drops, and gives each call a bounded wait ([`RpcClient::call_timeout`]): when the server
//! stays away longer, the call fails with ETIMEDOUT instead of hanging its caller forever.
//! A call whose connection dropped before the reply is sent again on the next connection,
//! so requests must be safe to repeat or tolerate a repeat (see docs/protocol.md).
//!
//! Lifetimes: when [`serve`]'s shutdown future completes, the listener closes and so does
//! every live connection (each connection task sees the shutdown signal, stops reading,
//! runs `Service::disconnected` and drops its socket), so clients notice at once and
//! reconnect to whatever serves the address next. An [`RpcClient`]'s background connection
//! task ends (and closes its socket) when the last clone of that client is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};
use tokio_util::codec::Framed;
use tracing::{debug, info, warn};

use crate::auth::seal::SealedCodec;
use crate::auth::{client_handshake, server_handshake};
use crate::key::ClusterKey;
use crate::msg::{Callback, Message, Request, Response, WireError};

/// Most connections a server accepts at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most calls in flight on one connection; one more is answered at once with EBUSY
/// (the reader never stops reading: callback replies must still get through).
pub const MAX_INFLIGHT: usize = 256;

/// errno EBUSY (Linux), for a call refused over [`MAX_INFLIGHT`].
const EBUSY: i32 = 16;

static REFUSED_CONNECTIONS: AtomicU64 = AtomicU64::new(0);
static REFUSED_CALLS: AtomicU64 = AtomicU64::new(0);

/// Connections this process's servers closed at once because they held
/// [`MAX_CONNECTIONS`] already.
pub fn refused_connections() -> u64 {
    REFUSED_CONNECTIONS.load(Ordering::Relaxed)
}

/// Calls this process's servers refused (EBUSY) because their connection had
/// [`MAX_INFLIGHT`] calls in flight.
pub fn refused_calls() -> u64 {
    REFUSED_CALLS.load(Ordering::Relaxed)
}
/// How long a server waits for a client to answer a callback before giving up on it.
pub const CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection on which nothing arrives for this long is closed: a client that was
/// killed without a FIN, or partitioned away, loses its opens and callbacks after it (its
/// lease), and a client stops waiting on a server that vanished. Live clients send a
/// [`Request::Ping`] every [`KEEPALIVE`].
pub const LEASE: Duration = Duration::from_secs(20);
/// How often a client proves it is alive when it has nothing else to say.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// Call id of keepalive pings (their replies are dropped).
const KEEPALIVE_ID: u64 = u64::MAX;

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
        self.callback_within(cb, CALLBACK_TIMEOUT).await
    }

    /// Send a callback and wait for the client's answer, at most `limit`. A client that is
    /// gone answers `ENOTCONN` (107); one that did not answer in time, `ETIMEDOUT` (110).
    pub async fn callback_within(&self, cb: Callback, limit: Duration) -> Result<(), WireError> {
        let id = self.next_cb.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        if self
            .tx
            .send(encode(&Message::Callback { id, cb }))
            .await
            .is_err()
        {
            self.pending.lock().unwrap().remove(&id);
            return Err(WireError::new(107, format!("client {} is gone", self.name)));
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(WireError::new(107, format!("client {} is gone", self.name))),
            Err(_) => {
                self.pending.lock().unwrap().remove(&id);
                Err(WireError::new(
                    110,
                    format!("client {} did not answer a callback", self.name),
                ))
            }
        }
    }

    /// [`PeerHandle::callback`] from a blocking-pool thread.
    pub fn callback_blocking(&self, cb: Callback) -> Result<(), WireError> {
        tokio::runtime::Handle::current().block_on(self.callback(cb))
    }
}

/// How long [`serve`] waits, after its shutdown, for connection tasks to wind down before
/// aborting them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Aborts a spawned task when dropped (a connection's writer must not outlive its reader).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serve `service` on `listener` until `shutdown` completes; then close the listener and
/// every live connection (see the module documentation) before returning.
pub async fn serve<S: Service>(
    listener: TcpListener,
    key: ClusterKey,
    service: Arc<S>,
    shutdown: impl Future<Output = ()>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let sessions = AtomicU64::new(1);
    // `true` once shutdown completed; every connection task watches it.
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Reap finished connection tasks so the set does not grow without bound.
        while conns.try_join_next().is_some() {}
        let (sock, addr) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => { warn!("accept failed: {e}"); tokio::time::sleep(Duration::from_millis(50)).await; continue; }
            },
        };
        // Over the limit, a connection is closed at once (its handshake fails) rather than
        // left waiting unanswered; counted and logged.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            REFUSED_CONNECTIONS.fetch_add(1, Ordering::Relaxed);
            warn!(%addr, "refusing connection: already serving {MAX_CONNECTIONS} connections");
            drop(sock);
            continue;
        };
        let _ = sock.set_nodelay(true);
        let session = sessions.fetch_add(1, Ordering::Relaxed);
        let key = key.clone();
        let service = service.clone();
        let mut stop = stop_rx.clone();
        conns.spawn(async move {
            let _permit = permit;
            let hs = tokio::select! {
                r = server_handshake(sock, &key, session) => r,
                _ = stop.wait_for(|s| *s) => return,
            };
            match hs {
                Ok((framed, peer)) => {
                    info!(peer = %peer.name, %addr, session, "client authenticated");
                    run_server_conn(framed, peer, addr, service, stop).await;
                }
                Err(e) => warn!(%addr, "dropping connection before any request: {e}"),
            }
        });
    }
    drop(listener);
    stop_tx.send_replace(true);
    let live = conns.len();
    if live > 0 {
        debug!(live, "closing live connections");
    }
    let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!(
            left = conns.len(),
            "connections still open {} ms after shutdown; aborting them",
            SHUTDOWN_GRACE.as_millis()
        );
        conns.shutdown().await;
    }
}

async fn run_server_conn<S: Service>(
    framed: Framed<TcpStream, SealedCodec>,
    peer: crate::auth::Peer,
    addr: std::net::SocketAddr,
    service: Arc<S>,
    mut stop: watch::Receiver<bool>,
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
    let wname = peer.name.clone();
    let writer = AbortOnDrop(tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if let Err(e) = sink.send(b).await {
                debug!(peer = %wname, "writing to client failed: {e}");
                break;
            }
        }
    }));
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT));
    loop {
        let frame = tokio::select! {
            f = tokio::time::timeout(LEASE, stream.next()) => match f {
                Ok(f) => f,
                Err(_) => {
                    warn!(peer = %peer.name, session = peer.session, %addr, "lease expired: nothing heard for {} s; dropping the client's opens", LEASE.as_secs());
                    break;
                }
            },
            _ = stop.wait_for(|s| *s) => {
                debug!(peer = %peer.name, "server shutting down: closing connection");
                break;
            }
        };
        let Some(frame) = frame else { break };
        let frame = match frame {
            Ok(f) => f,
            Err(e) if e.is_authentication() => {
                // Named in full: an injected or tampered frame on an authenticated connection.
                warn!(peer = %peer.name, session = peer.session, %addr, "closing connection: {e}");
                break;
            }
            Err(e) => {
                warn!(peer = %peer.name, session = peer.session, %addr, "closing connection: bad frame: {e}");
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
            // Keepalives are the rpc layer's own: answered here, never counted as requests.
            Message::Call {
                id,
                req: Request::Ping,
            } => {
                let _ = handle
                    .tx
                    .send(encode(&Message::Reply {
                        id,
                        resp: Ok(Response::Pong),
                    }))
                    .await;
            }
            Message::Call { id, req } => {
                let Ok(permit) = inflight.clone().try_acquire_owned() else {
                    REFUSED_CALLS.fetch_add(1, Ordering::Relaxed);
                    warn!(peer = %peer.name, "refusing a call: {MAX_INFLIGHT} calls already in flight on this connection");
                    let _ = handle
                        .tx
                        .send(encode(&Message::Reply {
                            id,
                            resp: Err(WireError::new(
                                EBUSY,
                                format!("server busy: {MAX_INFLIGHT} calls already in flight on this connection"),
                            )),
                        }))
                        .await;
                    continue;
                };
                let service = service.clone();
                let h = handle.clone();
                tokio::spawn(async move {
                    let h2 = h.clone();
                    let resp = tokio::task::spawn_blocking(move || service.call(&h2, req))
                        .await
                        .unwrap_or_else(|e| {
                            Err(WireError::new(5, format!("server task failed: {e}")))
                        });
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
    drop(writer);
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

/// A reconnecting, multiplexing client connection to one server. Clones share the
/// connection; it is closed when the last clone is dropped.
#[derive(Clone)]
pub struct RpcClient {
    inner: Arc<ClientInner>,
    rt: tokio::runtime::Handle,
    /// Dropped with the last clone: the connection task sees its receiver close and ends.
    _alive: Arc<oneshot::Sender<()>>,
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
        let (alive, closed) = oneshot::channel::<()>();
        rt.spawn(async move {
            let addr = i2.addr.clone();
            tokio::select! {
                // Only ever an error: the sender is never used, only dropped.
                _ = closed => debug!(%addr, "last client handle dropped: connection closed"),
                _ = connection_loop(i2, key, name, callbacks) => {}
            }
        });
        RpcClient {
            inner,
            rt,
            _alive: Arc::new(alive),
        }
    }

    pub fn addr(&self) -> &str {
        &self.inner.addr
    }

    /// How many times the connection was (re)established.
    pub fn connections(&self) -> u64 {
        self.inner.reconnects.load(Ordering::Relaxed)
    }

    /// Whether the connection is up now.
    pub fn is_up(&self) -> bool {
        matches!(*self.inner.state.borrow(), ConnState::Up { .. })
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
        let timeout = || RpcError::Timeout {
            addr: self.inner.addr.clone(),
            secs: self.inner.call_timeout.as_secs(),
        };
        let mut rx_state = self.inner.state.subscribe();
        loop {
            let tx = loop {
                let st = rx_state.borrow_and_update().clone();
                match st {
                    ConnState::Up { tx, .. } => break tx,
                    ConnState::Down => {
                        if tokio::time::timeout_at(deadline, rx_state.changed())
                            .await
                            .is_err()
                        {
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

async fn connection_loop(
    inner: Arc<ClientInner>,
    key: ClusterKey,
    name: String,
    callbacks: CallbackHandler,
) {
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
        let waddr = inner.addr.clone();
        let writer = AbortOnDrop(tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if let Err(e) = sink.send(b).await {
                    debug!(addr = %waddr, "writing to server failed: {e}");
                    break;
                }
            }
        }));
        inner.state.send_replace(ConnState::Up { tx: tx.clone() });
        let ktx = tx.clone();
        let _keepalive = AbortOnDrop(tokio::spawn(async move {
            let ping = encode(&Message::Call {
                id: KEEPALIVE_ID,
                req: Request::Ping,
            });
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                if ktx.send(ping.clone()).await.is_err() {
                    return;
                }
            }
        }));
        loop {
            let frame = match tokio::time::timeout(LEASE, stream.next()).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(_) => {
                    warn!(addr = %inner.addr, "nothing heard from the server for {} s; reconnecting", LEASE.as_secs());
                    break;
                }
            };
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    warn!(addr = %inner.addr, "closing connection to server: {e}");
                    break;
                }
            };
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
                            .unwrap_or_else(|e| {
                                Err(WireError::new(5, format!("callback failed: {e}")))
                            });
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
        drop(writer);
        // Wake every waiter: their calls are sent again on the next connection.
        inner.pending.lock().unwrap().clear();
        warn!(addr = %inner.addr, "connection to server lost; reconnecting");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Answers Ping, counts disconnects.
    struct Echo {
        gone: AtomicU64,
    }

    impl Service for Echo {
        fn call(&self, _peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError> {
            match req {
                Request::Ping => Ok(Response::Pong),
                _ => Err(WireError::new(38, "not implemented in this test")),
            }
        }
        fn disconnected(&self, _peer: &Arc<PeerHandle>) {
            self.gone.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn client(addr: &str, key: &ClusterKey) -> RpcClient {
        RpcClient::start(
            tokio::runtime::Handle::current(),
            addr.into(),
            key.clone(),
            "t".into(),
            Duration::from_secs(3),
            Arc::new(|_| Ok(())),
        )
    }

    /// Established connections of this process to `port` (either end), from /proc/net/tcp.
    fn established(port: u16) -> usize {
        let t = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let p = format!(":{port:04X}");
        t.lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[3] == "01" && (f[1].ends_with(&p) || f[2].ends_with(&p))
            })
            .count()
    }

    async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn shutdown_closes_live_connections() {
        let key = ClusterKey::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = Arc::new(Echo {
            gone: AtomicU64::new(0),
        });
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, key.clone(), svc.clone(), async {
            let _ = rx.await;
        }));
        let c = client(&addr.to_string(), &key);
        assert!(matches!(c.call(Request::Ping).await, Ok(Response::Pong)));
        assert_eq!(c.connections(), 1);
        tx.send(()).unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("serve returned after shutdown")
            .unwrap();
        // The live connection was closed by the server, not left to its client.
        assert_eq!(
            svc.gone.load(Ordering::SeqCst),
            1,
            "the connection was not closed at shutdown"
        );
        wait_until("no connection to the stopped server is left", || {
            established(addr.port()) == 0
        })
        .await;
        // A new server on the same port gets the client back.
        let listener = TcpListener::bind(addr).await.unwrap();
        let (_tx2, rx2) = oneshot::channel::<()>();
        tokio::spawn(serve(listener, key.clone(), svc.clone(), async {
            let _ = rx2.await;
        }));
        assert!(matches!(c.call(Request::Ping).await, Ok(Response::Pong)));
        assert_eq!(c.connections(), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_last_client_closes_its_connection() {
        let key = ClusterKey::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let svc = Arc::new(Echo {
            gone: AtomicU64::new(0),
        });
        tokio::spawn(serve(
            listener,
            key.clone(),
            svc.clone(),
            std::future::pending(),
        ));
        let c = client(&addr.to_string(), &key);
        let c2 = c.clone();
        assert!(matches!(c.call(Request::Ping).await, Ok(Response::Pong)));
        drop(c);
        // A clone is still alive: the connection stays.
        assert!(matches!(c2.call(Request::Ping).await, Ok(Response::Pong)));
        assert_eq!(svc.gone.load(Ordering::SeqCst), 0);
        drop(c2);
        wait_until("the server saw the client go", || {
            svc.gone.load(Ordering::SeqCst) == 1
        })
        .await;
        wait_until("no connection is left", || established(addr.port()) == 0).await;
    }
}
