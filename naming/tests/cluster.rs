//! Registry replicas on 127.0.0.1 in one process: real TCP through wisp-proto's
//! authenticated `rpc::serve`, real redb files in temp dirs, real openraft.
//!
//! Each replica sits behind a tiny `Service` that routes `Request::Naming` to its
//! `NamingNode`, the way wisp-server's service does. "Killing" a replica shuts down its Raft
//! and its listener; the slot then answers ESHUTDOWN on connections still open, so nothing
//! reaches the dead replica. Restarting opens the same redb directory on the same port.
//!
//! The tests run one at a time (a 2-core machine; elections need the CPU on time): each
//! holds the `SERIAL` guard for its whole run, across awaits, on purpose.
#![allow(clippy::await_holding_lock)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::oneshot;
use wisp_naming::network::{Faults, ESHUTDOWN};
use wisp_naming::registry::{Command, IdlePolicy, Load, Origin, Registry, Reply, Role};
use wisp_naming::wire::{decode, NamingRequest, NamingResponse};
use wisp_naming::{
    NamingConfig, NamingError, NamingNode, NodeId, PrefixTable, RegistryClient, RegistryError,
};
use wisp_proto::identity::Identity;
use wisp_proto::msg::{Request, Response, WireError};
use wisp_proto::rpc::{self, PeerHandle, RpcClient, Service};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// What wisp-server's Service does with naming requests.
struct Slot {
    node: RwLock<Option<Arc<NamingNode>>>,
}

impl Service for Slot {
    fn call(&self, _peer: &Arc<PeerHandle>, req: Request) -> Result<Response, WireError> {
        match req {
            Request::Ping => Ok(Response::Pong),
            Request::Naming(bytes) => {
                let node = self.node.read().unwrap().clone();
                match node {
                    Some(n) => Ok(Response::Naming(n.handle(bytes))),
                    None => Err(WireError::new(ESHUTDOWN, "registry replica stopped")),
                }
            }
            _ => Err(WireError::new(38, "not a file server")),
        }
    }
}

struct Replica {
    id: NodeId,
    addr: String,
    dir: PathBuf,
    slot: Arc<Slot>,
    stop: Option<oneshot::Sender<()>>,
    faults: Option<Arc<Faults>>,
}

fn test_config_with(faults: Option<Arc<Faults>>) -> NamingConfig {
    NamingConfig {
        faults,
        ..test_config()
    }
}

fn test_config() -> NamingConfig {
    NamingConfig {
        heartbeat_ms: 100,
        election_min_ms: 600,
        election_max_ms: 1200,
        snapshot_after_logs: 40,
        logs_kept_after_snapshot: 5,
        tick_interval: Duration::from_millis(300),
        write_timeout: Duration::from_secs(3),
        peer_timeout: Duration::from_secs(1),
        faults: None,
    }
}

impl Replica {
    async fn start(id: NodeId, addr: Option<&str>, dir: &Path, key: &Identity) -> Replica {
        Replica::start_with(id, addr, dir, key, None).await
    }

    async fn start_with(
        id: NodeId,
        addr: Option<&str>,
        dir: &Path,
        key: &Identity,
        faults: Option<Arc<Faults>>,
    ) -> Replica {
        let listener = TcpListener::bind(addr.unwrap_or("127.0.0.1:0"))
            .await
            .expect("bind 127.0.0.1");
        let addr = listener.local_addr().unwrap().to_string();
        let node = NamingNode::start(
            id,
            addr.clone(),
            dir,
            key.clone(),
            test_config_with(faults.clone()),
        )
        .await
        .expect("start replica");
        let slot = Arc::new(Slot {
            node: RwLock::new(Some(node)),
        });
        let mut r = Replica {
            id,
            addr,
            dir: dir.to_path_buf(),
            slot,
            stop: None,
            faults,
        };
        r.serve(listener, key);
        r
    }

    fn serve(&mut self, listener: TcpListener, key: &Identity) {
        let (tx, rx) = oneshot::channel::<()>();
        let slot = self.slot.clone();
        let key = key.clone();
        tokio::spawn(async move {
            rpc::serve(listener, key, slot, async {
                let _ = rx.await;
            })
            .await
        });
        self.stop = Some(tx);
    }

    fn node(&self) -> Arc<NamingNode> {
        self.slot
            .node
            .read()
            .unwrap()
            .clone()
            .expect("replica is running")
    }

    async fn kill(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        let node = self.slot.node.write().unwrap().take();
        if let Some(n) = node {
            n.shutdown().await.expect("shutdown");
        }
    }

    /// Start again from the same directory on the same address.
    async fn restart(&mut self, key: &Identity) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(&self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    eprintln!("rebinding {}: {e}", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("cannot rebind {}: {e}", self.addr),
            }
        };
        let node = NamingNode::start(
            self.id,
            self.addr.clone(),
            &self.dir,
            key.clone(),
            test_config_with(self.faults.clone()),
        )
        .await
        .expect("restart replica");
        *self.slot.node.write().unwrap() = Some(node);
        self.serve(listener, key);
    }
}

struct Cluster {
    _tmp: tempfile::TempDir,
    key: Identity,
    replicas: Vec<Replica>,
}

impl Cluster {
    /// `n` replicas, ids 1..=n, initialized as one registry.
    async fn start(n: u64) -> Cluster {
        Cluster::start_with((1..=n).map(|_| None).collect()).await
    }

    /// One replica per entry of `faults`, ids 1..=n.
    async fn start_with(faults: Vec<Option<Arc<Faults>>>) -> Cluster {
        let tmp = tempfile::tempdir().unwrap();
        let key = wisp_proto::identity::throwaway("srv");
        let mut replicas = Vec::new();
        for (i, f) in faults.into_iter().enumerate() {
            let id = i as u64 + 1;
            replicas.push(
                Replica::start_with(id, None, &tmp.path().join(format!("r{id}")), &key, f).await,
            );
        }
        let members: BTreeMap<NodeId, String> =
            replicas.iter().map(|r| (r.id, r.addr.clone())).collect();
        replicas[0]
            .node()
            .initialize(members)
            .await
            .expect("initialize");
        let c = Cluster {
            _tmp: tmp,
            key,
            replicas,
        };
        c.leader().await;
        c
    }

    fn addrs(&self) -> Vec<String> {
        self.replicas.iter().map(|r| r.addr.clone()).collect()
    }

    fn client(&self, name: &str) -> RegistryClient {
        RegistryClient::new(
            tokio::runtime::Handle::current(),
            self.addrs(),
            self.key.clone(),
            name.into(),
        )
        .with_timeouts(Duration::from_secs(4), Duration::from_secs(20))
    }

    fn running(&self) -> impl Iterator<Item = &Replica> {
        self.replicas
            .iter()
            .filter(|r| r.slot.node.read().unwrap().is_some())
    }

    /// Wait until every running replica agrees on one running leader; its index.
    async fn leader(&self) -> usize {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let seen: BTreeSet<Option<NodeId>> =
                self.running().map(|r| r.node().status().leader).collect();
            if seen.len() == 1 {
                if let Some(Some(l)) = seen.into_iter().next() {
                    if let Some(i) = self
                        .replicas
                        .iter()
                        .position(|r| r.id == l && r.slot.node.read().unwrap().is_some())
                    {
                        return i;
                    }
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no agreed leader within 20 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Wait until `check` holds on every running replica's local copy.
    async fn converge(&self, what: &str, check: impl Fn(&Registry) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if self.running().all(|r| check(&r.node().read_local())) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "replicas did not converge on: {what}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn idle() -> Load {
    Load {
        load1: 0.05,
        load5: 0.1,
        load15: 0.1,
        runnable: 0,
    }
}

async fn add_idle_hosts(c: &RegistryClient, names: &[String]) {
    for (i, h) in names.iter().enumerate() {
        c.register_host(h, &format!("127.0.0.1:{}", 20000 + i), Role::Workstation)
            .await
            .unwrap();
        c.heartbeat(h, idle(), 600).await.unwrap();
    }
}

fn hosts(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A lenient policy so slow test machines never mark hosts down by accident.
fn relaxed_policy() -> IdlePolicy {
    IdlePolicy {
        down_after_ms: 120_000,
        lease_ttl_ms: 600_000,
        ..IdlePolicy::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_replicate_fail_over_and_catch_up() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let client = c.client("ws-test");
    client.set_policy(relaxed_policy()).await.unwrap();
    for (p, s) in [
        ("/", "127.0.0.1:7001"),
        ("/home", "127.0.0.1:7002"),
        ("/scratch", "127.0.0.1:7003"),
    ] {
        client.add_domain(p, s).await.unwrap();
    }
    let names = hosts("ws", 8);
    add_idle_hosts(&client, &names).await;
    let first = client.allocate_hosts(1000, 3, "ws0", false).await.unwrap();
    assert_eq!(first.len(), 3);
    assert!(
        first.iter().all(|l| l.host != "ws0"),
        "the requester is never handed out"
    );
    c.converge("3 domains, 8 hosts, 3 leases", |r| {
        r.domains.len() == 3 && r.hosts.len() == 8 && r.leases.len() == 3
    })
    .await;

    // A linearizable read through a follower is forwarded to the leader.
    let li = c.leader().await;
    let follower = (li + 1) % 3;
    let lin = c.replicas[follower]
        .node()
        .read_linearizable()
        .await
        .unwrap();
    assert_eq!(lin.leases.len(), 3);
    assert_eq!(
        lin.lookup_domain("/home/alice/x"),
        Some(("/home", "127.0.0.1:7002"))
    );
    // A write sent to a follower node is forwarded too.
    c.replicas[follower]
        .node()
        .write(Command::AddDomain {
            prefix: "/proj".into(),
            server: "127.0.0.1:7004".into(),
        })
        .await
        .unwrap();

    // Kill the leader.
    let old_leader = c.replicas[li].id;
    let killed_applied = c.replicas[li].node().status().last_applied;
    c.replicas[li].kill().await;
    let ni = c.leader().await;
    assert_ne!(
        c.replicas[ni].id, old_leader,
        "a new leader among the survivors"
    );

    // Allocations keep working, distinct from the leases already out, nothing lost.
    let second = client.allocate_hosts(1001, 3, "ws0", false).await.unwrap();
    assert_eq!(second.len(), 3);
    let all: BTreeSet<&str> = first
        .iter()
        .chain(second.iter())
        .map(|l| l.host.as_str())
        .collect();
    assert_eq!(
        all.len(),
        6,
        "no host handed out twice across the fail-over"
    );
    let job = client
        .job_start(1000, "ws0", &second[0].host)
        .await
        .unwrap();
    client
        .register_host("ws-late", "127.0.0.1:21000", Role::Workstation)
        .await
        .unwrap();
    let lin = client.read(true).await.unwrap();
    assert_eq!(lin.domains.len(), 4, "{:?}", lin.domains);
    assert_eq!(lin.leases.len(), 6);
    assert!(lin.jobs.contains_key(&job));

    // Enough writes for snapshots and log purges, so the dead replica's log falls behind
    // the leader's first kept entry and it must catch up from a snapshot.
    for i in 0..60u64 {
        client
            .heartbeat(&names[(i % 8) as usize], idle(), 600 + i)
            .await
            .unwrap();
    }
    let leader_node = c.replicas[ni].node();
    // Snapshots and purges run in the background: keep writing until the purge shows.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut i = 0u64;
    loop {
        let purged = leader_node.raft().metrics().borrow().purged;
        if purged
            .map(|p| Some(p.index) > killed_applied)
            .unwrap_or(false)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "leader never purged past the dead replica ({purged:?} vs {killed_applied:?})"
        );
        client
            .heartbeat(&names[(i % 8) as usize], idle(), 700 + i)
            .await
            .unwrap();
        i += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Restart the killed replica from its directory: it comes back with what it had...
    c.replicas[li].restart(&c.key).await;
    let back = c.replicas[li].node();
    assert!(
        back.read_local().domains.len() >= 3,
        "state reloaded from redb on restart"
    );
    // ... and catches up with everything written while it was down.
    c.converge("restarted replica caught up", |r| {
        r.jobs.contains_key(&job) && r.hosts.contains_key("ws-late") && r.leases.len() == 6
    })
    .await;
    let target = leader_node.status().last_applied;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while back.status().last_applied < target {
        assert!(
            tokio::time::Instant::now() < deadline,
            "restarted replica stuck at {:?} < {target:?}",
            back.status().last_applied
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let snap = back.raft().metrics().borrow().snapshot;
    assert!(snap.is_some(), "the restarted replica installed a snapshot");
    // It serves again: a write through it lands.
    back.write(Command::AddDomain {
        prefix: "/after".into(),
        server: "127.0.0.1:7005".into(),
    })
    .await
    .unwrap();
    c.converge("write after restart", |r| r.domains.contains_key("/after"))
        .await;
    for r in &mut c.replicas {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocations_are_atomic_and_distinct() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let admin = c.client("admin");
    admin.set_policy(relaxed_policy()).await.unwrap();
    let names = hosts("ws", 10);
    add_idle_hosts(&admin, &names).await;

    // 8 tasks, each with its own client (to different first replicas), ask for 3 hosts each.
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let mut addrs = c.addrs();
        addrs.rotate_left(t as usize % 3);
        let cl = RegistryClient::new(
            tokio::runtime::Handle::current(),
            addrs,
            c.key.clone(),
            format!("task{t}"),
        );
        tasks.push(tokio::spawn(async move {
            cl.allocate_hosts(2000 + t, 3, "nobody", false)
                .await
                .unwrap()
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    let distinct: BTreeSet<&str> = got.iter().map(|l| l.host.as_str()).collect();
    assert_eq!(
        got.len(),
        10,
        "all 10 idle hosts handed out, no more: {got:?}"
    );
    assert_eq!(distinct.len(), 10, "no host twice");

    // Give everything back; then 100 requests from 8 tasks race for 4 idle hosts.
    for l in &got {
        admin.release_hosts(l.user, vec![l.id]).await.unwrap();
    }
    for h in &names[4..] {
        admin.set_owner_activity(h, 0).await.unwrap();
    }
    let mut tasks = Vec::new();
    for t in 0..8u32 {
        let mut addrs = c.addrs();
        addrs.rotate_left(t as usize % 3);
        let cl = RegistryClient::new(
            tokio::runtime::Handle::current(),
            addrs,
            c.key.clone(),
            format!("racer{t}"),
        );
        let n_req = if t < 4 { 13 } else { 12 };
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            for _ in 0..n_req {
                mine.extend(
                    cl.allocate_hosts(3000 + t, 1, "nobody", false)
                        .await
                        .unwrap(),
                );
            }
            mine
        }));
    }
    let mut got = Vec::new();
    for t in tasks {
        got.extend(t.await.unwrap());
    }
    let distinct: BTreeSet<&str> = got.iter().map(|l| l.host.as_str()).collect();
    assert_eq!(got.len(), 4, "100 requests, 4 idle hosts: {got:?}");
    assert_eq!(distinct, names[..4].iter().map(String::as_str).collect());
    for r in &mut c.replicas {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn heartbeat_expiry_marks_host_down_everywhere() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let client = c.client("ws-test");
    client
        .set_policy(IdlePolicy {
            down_after_ms: 1500,
            ..relaxed_policy()
        })
        .await
        .unwrap();
    let names = hosts("ws", 2);
    add_idle_hosts(&client, &names).await;
    // ws1 keeps beating; ws0 falls silent. The leader's periodic Tick marks it down.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline {
        client.heartbeat("ws1", idle(), 600).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    c.converge("ws0 down, ws1 up", |r| {
        r.hosts["ws0"].down && !r.hosts["ws1"].down
    })
    .await;
    let got = client.allocate_hosts(1, 2, "nobody", false).await.unwrap();
    assert_eq!(
        got.iter().map(|l| l.host.as_str()).collect::<Vec<_>>(),
        vec!["ws1"],
        "never a down host"
    );
    client.heartbeat("ws0", idle(), 600).await.unwrap();
    c.converge("ws0 back up", |r| !r.hosts["ws0"].down).await;
    for r in &mut c.replicas {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_three_down_stops_writes_clearly_then_resumes() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let client = c
        .client("ws-test")
        .with_timeouts(Duration::from_secs(4), Duration::from_secs(6));
    client.add_domain("/", "127.0.0.1:7001").await.unwrap();
    let li = c.leader().await;
    let (a, b) = ((li + 1) % 3, (li + 2) % 3);
    c.replicas[a].kill().await;
    c.replicas[b].kill().await;
    let e = client
        .add_domain("/home", "127.0.0.1:7002")
        .await
        .unwrap_err();
    assert!(matches!(e, NamingError::Unavailable { .. }), "{e}");
    let msg = e.to_string();
    eprintln!("with 2 of 3 replicas down: {msg}");
    assert!(
        msg.starts_with("no registry replica could serve the request: "),
        "{msg}"
    );
    assert!(
        msg.contains("no quorum of replicas reachable"),
        "the surviving leader says why: {msg}"
    );
    // Hint reads still answer from the surviving copy.
    assert_eq!(client.domains().await.unwrap().len(), 1);
    c.replicas[a].restart(&c.key).await;
    let client = c.client("ws-test2");
    client
        .add_domain("/scratch", "127.0.0.1:7003")
        .await
        .unwrap();
    let r = client.read(true).await.unwrap();
    assert!(
        r.domains.contains_key("/") && r.domains.contains_key("/scratch"),
        "{:?}",
        r.domains
    );
    for r in &mut c.replicas {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_are_added_and_removed_at_run_time() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let key = wisp_proto::identity::throwaway("srv");
    let mut r1 = Replica::start(1, None, &tmp.path().join("r1"), &key).await;
    r1.node()
        .initialize(BTreeMap::from([(1, r1.addr.clone())]))
        .await
        .unwrap();
    r1.node()
        .wait_for_leader(Duration::from_secs(10))
        .await
        .unwrap();
    let client = RegistryClient::new(
        tokio::runtime::Handle::current(),
        vec![r1.addr.clone()],
        key.clone(),
        "admin".into(),
    );
    client.add_domain("/", "127.0.0.1:7001").await.unwrap();
    let mut r2 = Replica::start(2, None, &tmp.path().join("r2"), &key).await;
    let mut r3 = Replica::start(3, None, &tmp.path().join("r3"), &key).await;
    let st = client.add_replica(2, &r2.addr).await.unwrap();
    assert_eq!(st.voters, BTreeSet::from([1, 2]));
    // Adding through a replica that is not the leader is forwarded.
    let via2 = RegistryClient::new(
        tokio::runtime::Handle::current(),
        vec![r2.addr.clone()],
        key.clone(),
        "admin2".into(),
    );
    let st = via2.add_replica(3, &r3.addr).await.unwrap();
    assert_eq!(st.voters, BTreeSet::from([1, 2, 3]));
    assert_eq!(
        r3.node().read_local().domains.len(),
        1,
        "new replica caught up"
    );
    let st = client.remove_replica(3).await.unwrap();
    assert_eq!(st.voters, BTreeSet::from([1, 2]));
    assert!(!st.nodes.contains_key(&3));
    // Removing the leader itself: it commits its own removal and the other replica leads.
    let both = RegistryClient::new(
        tokio::runtime::Handle::current(),
        vec![r1.addr.clone(), r2.addr.clone()],
        key.clone(),
        "admin3".into(),
    );
    let st = both.remove_replica(1).await.unwrap();
    assert_eq!(st.voters, BTreeSet::from([2]));
    both.add_domain("/after-removal", "127.0.0.1:7002")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while r2.node().status().leader != Some(2) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "replica 2 never took over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(r2
        .node()
        .read_local()
        .domains
        .contains_key("/after-removal"));
    // Bad input: a malformed naming payload gets a clear error, the registry is unchanged.
    let raw = RpcClient::start(
        tokio::runtime::Handle::current(),
        r2.addr.clone(),
        key.clone(),
        "fuzz".into(),
        Duration::from_secs(5),
        Arc::new(|_| Ok(())),
    );
    let client = RegistryClient::new(
        tokio::runtime::Handle::current(),
        vec![r2.addr.clone()],
        key.clone(),
        "admin4".into(),
    );
    let before = r2.node().read_local();
    let Response::Naming(bytes) = raw.call(Request::Naming(vec![0xff; 40])).await.unwrap() else {
        panic!("not a naming reply")
    };
    match decode::<NamingResponse>(&bytes).unwrap() {
        NamingResponse::Error(NamingError::Malformed(m)) => assert!(m.contains("40 bytes"), "{m}"),
        other => panic!("unexpected {other:?}"),
    }
    let e = client.heartbeat("ghost", idle(), 1).await.unwrap_err();
    assert_eq!(
        e,
        NamingError::Registry(RegistryError::UnknownHost {
            host: "ghost".into()
        })
    );
    assert_eq!(e.to_string(), "unknown host ghost");
    let e = client.remove_domain("/nowhere").await.unwrap_err();
    assert_eq!(e.to_string(), "unknown domain /nowhere");
    let after = r2.node().read_local();
    assert_eq!((before.domains, before.hosts), (after.domains, after.hosts));
    for r in [&mut r1, &mut r2, &mut r3] {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn single_replica_survives_restart() {
    let _g = serial();
    let tmp = tempfile::tempdir().unwrap();
    let key = wisp_proto::identity::throwaway("srv");
    let mut r1 = Replica::start(1, None, &tmp.path().join("r1"), &key).await;
    r1.node()
        .initialize(BTreeMap::from([(1, r1.addr.clone())]))
        .await
        .unwrap();
    let client = RegistryClient::new(
        tokio::runtime::Handle::current(),
        vec![r1.addr.clone()],
        key.clone(),
        "admin".into(),
    );
    add_idle_hosts(&client, &hosts("ws", 3)).await;
    let leases = client.allocate_hosts(5, 2, "x", false).await.unwrap();
    // Past a snapshot (40 entries in the test config) and then some.
    for i in 0..50 {
        client
            .add_domain(&format!("/d{i}"), "127.0.0.1:7001")
            .await
            .unwrap();
    }
    let before = r1.node().read_local();
    r1.kill().await;
    r1.restart(&key).await;
    let n = r1.node();
    // The snapshot and the log are back at once; entries past the last durable commit
    // pointer are applied again as soon as the replica leads again.
    assert!(
        n.read_local().domains.len() >= 40,
        "snapshot reloaded from redb"
    );
    n.wait_for_leader(Duration::from_secs(10)).await.unwrap();
    let lin = n.read_linearizable().await.unwrap();
    assert_eq!(
        lin.domains, before.domains,
        "nothing lost across the restart"
    );
    assert_eq!(lin.leases.len(), 2);
    let more = client.allocate_hosts(6, 5, "x", false).await.unwrap();
    assert_eq!(more.len(), 1, "only the third host is left");
    assert!(!leases.iter().any(|l| l.host == more[0].host));
    r1.kill().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_survives_drops_delays_and_a_partition() {
    let _g = serial();
    let faults: Vec<Arc<Faults>> = (1..=3u64)
        .map(|i| Faults::new(0x9e37_79b9_7f4a_7c15u64.wrapping_mul(i)))
        .collect();
    let mut c = Cluster::start_with(faults.iter().cloned().map(Some).collect()).await;
    let admin = c.client("admin");
    admin.set_policy(relaxed_policy()).await.unwrap();
    let names = hosts("ws", 12);
    add_idle_hosts(&admin, &names).await;

    // 10 % of Raft messages lost (half of them after delivery), up to 30 ms of delay each.
    for f in &faults {
        f.set_drop(100);
        f.set_delay(30);
    }
    let mut tasks = Vec::new();
    for t in 0..4u32 {
        let cl = c.client(&format!("writer{t}"));
        let names = names.clone();
        tasks.push(tokio::spawn(async move {
            let mut leases = Vec::new();
            let mut jobs = Vec::new();
            for k in 0..8u32 {
                leases.extend(
                    cl.allocate_hosts(100 + t, 1, "nobody", false)
                        .await
                        .unwrap(),
                );
                let j = cl
                    .job_start(100 + t, "ws0", &names[((t * 3 + k) % 12) as usize])
                    .await
                    .unwrap();
                cl.job_end(j, k as i32).await.unwrap();
                jobs.push(j);
                cl.heartbeat(&names[((t + k) % 12) as usize], idle(), 600)
                    .await
                    .unwrap();
            }
            (leases, jobs)
        }));
    }
    let (mut leases, mut jobs) = (Vec::new(), Vec::new());
    for t in tasks {
        let (l, j) = t.await.unwrap();
        leases.extend(l);
        jobs.extend(j);
    }
    let lost: u64 = faults.iter().map(|f| f.dropped()).sum();
    assert!(lost > 0, "the fault injection dropped nothing");
    let distinct: BTreeSet<&str> = leases.iter().map(|l| l.host.as_str()).collect();
    assert_eq!(
        distinct.len(),
        leases.len(),
        "a host handed out twice under message loss: {leases:?}"
    );
    assert_eq!(
        BTreeSet::from_iter(jobs.iter()).len(),
        32,
        "32 distinct job ids"
    );
    let truth = admin.read(true).await.unwrap();
    assert_eq!(
        truth.leases.len(),
        leases.len(),
        "exactly one lease per granted host, no duplicate from retries"
    );
    c.converge("replicas identical after message loss", |r| {
        r.hosts == truth.hosts && r.jobs == truth.jobs && r.leases == truth.leases
    })
    .await;

    // Cut the leader off from the others.
    for f in &faults {
        f.heal();
    }
    let li = c.leader().await;
    let lid = c.replicas[li].id;
    let ids: Vec<NodeId> = c.replicas.iter().map(|r| r.id).collect();
    for (f, id) in faults.iter().zip(&ids) {
        if *id == lid {
            ids.iter().filter(|o| **o != lid).for_each(|o| f.block(*o));
        } else {
            f.block(lid);
        }
    }
    // The old leader cannot commit anything on its own.
    let old = c.replicas[li].node();
    let e = old
        .write(Command::AddDomain {
            prefix: "/lost".into(),
            server: "127.0.0.1:7009".into(),
        })
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            NamingError::NoQuorum { .. } | NamingError::NotLeader { .. }
        ),
        "{e}"
    );
    // The majority elects a leader and keeps serving.
    let majority: Vec<String> = c
        .replicas
        .iter()
        .filter(|r| r.id != lid)
        .map(|r| r.addr.clone())
        .collect();
    let mc = RegistryClient::new(
        tokio::runtime::Handle::current(),
        majority,
        c.key.clone(),
        "majority".into(),
    );
    mc.add_domain("/kept", "127.0.0.1:7008").await.unwrap();
    let more = mc.allocate_hosts(999, 1, "nobody", false).await.unwrap();
    // Heal: the old leader steps down, drops its uncommitted entry and catches up.
    for f in &faults {
        f.heal();
    }
    c.converge("partition healed", |r| {
        r.domains.contains_key("/kept") && !r.domains.contains_key("/lost")
    })
    .await;
    let nl = c.leader().await;
    let final_state = c.client("check").read(true).await.unwrap();
    assert!(!final_state.domains.contains_key("/lost"));
    for l in &more {
        assert!(final_state.leases.contains_key(&l.id));
    }
    assert_ne!(c.replicas[nl].node().status().term, 0);
    for r in &mut c.replicas {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repeated_write_is_applied_once_whichever_replica_gets_it() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let admin = c.client("admin");
    admin.set_policy(relaxed_policy()).await.unwrap();
    add_idle_hosts(&admin, &hosts("ws", 4)).await;
    let origin = Origin {
        client: 0x5eed,
        seq: 1,
    };
    let req = NamingRequest::Write {
        cmd: Command::AllocateHosts {
            user: 1,
            n: 2,
            requester: "x".into(),
            include_requester: false,
        },
        origin: Some(origin),
        forwarded: false,
    };
    let mut replies = Vec::new();
    for r in &c.replicas {
        // Each replica in turn, as a client retrying after lost answers would.
        let one = RegistryClient::new(
            tokio::runtime::Handle::current(),
            vec![r.addr.clone()],
            c.key.clone(),
            "retry".into(),
        );
        match one.request(req.clone()).await.unwrap() {
            NamingResponse::Write(Ok(Reply::Leases(l))) => replies.push(l),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(replies[0].len(), 2);
    assert!(
        replies.iter().all(|l| *l == replies[0]),
        "every retry gets the first answer"
    );
    assert_eq!(
        admin.read(true).await.unwrap().leases.len(),
        2,
        "two hosts leased, not six"
    );
    for r in &mut c.replicas {
        r.kill().await;
    }
}

/// Measurement, not a check: `cargo test --release -p wisp-naming --test cluster -- --ignored
/// --nocapture bench`. 1,000 simulated hosts each send a heartbeat every 2 s for 20 s through
/// 20 clients to 3 replicas; prints latency percentiles (the goal is p99 under 50 ms).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn bench_heartbeats_from_1000_hosts() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let admin = c.client("admin");
    admin.set_policy(relaxed_policy()).await.unwrap();
    let names = Arc::new(hosts("sim", 1000));
    let clients: Vec<Arc<RegistryClient>> = (0..20)
        .map(|i| {
            let mut addrs = c.addrs();
            addrs.rotate_left(i % 3);
            Arc::new(RegistryClient::new(
                tokio::runtime::Handle::current(),
                addrs,
                c.key.clone(),
                format!("wispd{i}"),
            ))
        })
        .collect();
    let mut reg = Vec::new();
    for (i, cl) in clients.iter().enumerate() {
        let (cl, names) = (cl.clone(), names.clone());
        reg.push(tokio::spawn(async move {
            for h in names.iter().skip(i).step_by(20) {
                cl.register_host(h, "127.0.0.1:9", Role::Workstation)
                    .await
                    .unwrap();
            }
        }));
    }
    for r in reg {
        r.await.unwrap();
    }
    let secs = 20u64;
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let mut tasks = Vec::new();
    for (i, h) in names.iter().enumerate() {
        let cl = clients[i % 20].clone();
        let h = h.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u32;
            let mut next = start + Duration::from_millis((i as u64 * 2000) / 1000);
            while next < start + Duration::from_secs(secs) {
                tokio::time::sleep_until(next).await;
                let t = std::time::Instant::now();
                match cl.heartbeat(&h, idle(), 100).await {
                    Ok(()) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
                next += Duration::from_secs(2);
            }
            (lat, errors)
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await.unwrap();
        lat.extend(l);
        errors += e;
    }
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    eprintln!(
        "heartbeats: {} ok, {errors} failed in {secs} s ({:.0}/s); latency p50 {:?} p90 {:?} p99 {:?} max {:?}",
        lat.len(),
        lat.len() as f64 / secs as f64,
        pct(0.5),
        pct(0.9),
        pct(0.99),
        lat[lat.len() - 1]
    );
    assert_eq!(errors, 0);
    for r in &mut c.replicas {
        r.kill().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prefix_table_follows_a_moved_domain_from_a_fuse_style_thread() {
    let _g = serial();
    let mut c = Cluster::start(3).await;
    let client = Arc::new(c.client("ws-fuse"));
    client.add_domain("/", "127.0.0.1:7001").await.unwrap();
    client.add_domain("/home", "127.0.0.1:7002").await.unwrap();
    let table = Arc::new(PrefixTable::with_source(client.domain_source()));
    // FUSE worker threads are plain threads outside the runtime.
    let t = table.clone();
    let first = std::thread::spawn(move || t.resolve("/home/alice/notes.txt"))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(
        (
            first.prefix.as_str(),
            first.server.as_str(),
            first.rest.as_str()
        ),
        ("/home", "127.0.0.1:7002", "alice/notes.txt")
    );
    // The domain moves; the stale hint fails at the old server and is re-resolved.
    client.add_domain("/home", "127.0.0.1:7012").await.unwrap();
    c.converge("/home moved", |r| {
        r.domains.get("/home").map(String::as_str) == Some("127.0.0.1:7012")
    })
    .await;
    let t = table.clone();
    let f2 = first.clone();
    let moved = std::thread::spawn(move || {
        assert_eq!(
            t.lookup("/home/alice/notes.txt").unwrap().server,
            "127.0.0.1:7002",
            "hints stay until they fail"
        );
        t.reroute(&f2, "/home/alice/notes.txt")
    })
    .join()
    .unwrap()
    .unwrap();
    assert_eq!(moved.server, "127.0.0.1:7012");
    assert_eq!(
        table.lookup("/etc/passwd").unwrap().server,
        "127.0.0.1:7001"
    );
    for r in &mut c.replicas {
        r.kill().await;
    }
}
