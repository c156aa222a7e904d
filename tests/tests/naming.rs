//! End-to-end: the replicated cluster registry in the running system (issue 4).
//!
//! Every test brings up its own simulated cluster of three file servers (each hosting a
//! registry replica, ids 1..3) and three workstations (each wispd registering and sending
//! heartbeats), and drives it with the real `wisp` CLI (`--cluster NAME`) and, for host
//! allocation, a `RegistryClient` running inside a workstation's network namespace.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use wisp_naming::RegistryClient;
use wisp_tests::{sim_with, Sim};

const BEAT: Duration = Duration::from_secs(2);

fn cluster(tag: &str) -> Sim {
    sim_with(tag, 3, |sp| sp.servers = 3)
}

/// Run `wisp ARGS --cluster NAME` from the test process; (exit code, stdout, stderr).
fn wisp(s: &Sim, args: &[&str]) -> (i32, String, String) {
    let bin = s.bin_dir.join("wisp");
    let out = Command::new(&bin)
        .args(args)
        .args(["--cluster", &s.name])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// `wisp ARGS` that must succeed; returns stdout.
fn wisp_ok(s: &Sim, args: &[&str]) -> String {
    let (code, out, err) = wisp(s, args);
    assert_eq!(code, 0, "wisp {args:?} failed:\n{out}\n{err}");
    out
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// `wisp hosts --json` as host name -> object.
fn hosts(s: &Sim) -> std::collections::BTreeMap<String, Value> {
    let v = json(&wisp_ok(s, &["hosts", "--json"]));
    v.as_array()
        .expect("an array")
        .iter()
        .map(|h| (h["name"].as_str().unwrap().to_string(), h.clone()))
        .collect()
}

fn idle_hosts(s: &Sim) -> Vec<String> {
    let v = json(&wisp_ok(s, &["hosts", "--idle", "--json"]));
    v.as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect()
}

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {} s waiting until {what}",
            timeout.as_secs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The replicas' statuses (`wisp registry status --json`): addr -> status or error; and the
/// leader's id if one answered.
fn status(s: &Sim) -> (Vec<Value>, Option<u64>) {
    let (code, out, err) = wisp(s, &["registry", "status", "--json"]);
    let v = serde_json::from_str::<Value>(&out).unwrap_or_else(|e| {
        panic!("registry status (exit {code}) is not JSON ({e}): {out}\n{err}")
    });
    let all = v.as_array().unwrap().clone();
    let leader = all
        .iter()
        .find(|r| r["is_leader"] == Value::Bool(true))
        .and_then(|r| r["status"]["id"].as_u64());
    (all, leader)
}

fn applied_of(all: &[Value], id: u64) -> Option<u64> {
    all.iter()
        .find(|r| r["status"]["id"].as_u64() == Some(id))
        .and_then(|r| r["status"]["last_applied"].as_u64())
}

/// Lease up to `n` hosts for a test user through the registry (as rexec will), from inside
/// ws1's network namespace; release them at once; returns the hosts granted.
fn allocate(s: &Sim, n: u32) -> Vec<String> {
    let servers: Vec<String> = s.registry_addrs().split(',').map(String::from).collect();
    let key = wisp_proto::identity::Identity::load(&s.identity_dir("ws1")).expect("cluster key");
    s.in_netns("ws1", move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = RegistryClient::new(rt.handle().clone(), servers, key, "e2e-alloc".into());
        rt.block_on(async {
            let leases = c
                .allocate_hosts(4242, n, "e2e", false)
                .await
                .expect("allocation");
            let ids = leases.iter().map(|l| l.id).collect();
            let got: Vec<String> = leases.into_iter().map(|l| l.host).collect();
            c.release_hosts(4242, ids).await.expect("release");
            got
        })
    })
}

/// Wait until ws1..ws3 are registered, up, and have sent a heartbeat recently.
fn wait_registered(s: &Sim) -> std::collections::BTreeMap<String, Value> {
    wait_until(
        "ws1..ws3 are registered and up",
        Duration::from_secs(20),
        || {
            let h = hosts(s);
            let ok = ["ws1", "ws2", "ws3"]
                .iter()
                .all(|n| h.get(*n).map(|x| x["state"] == "up").unwrap_or(false));
            ok.then_some(h)
        },
    )
}

#[test]
fn workstations_register_and_heartbeat() {
    let s = cluster("reghb");
    let first = wait_registered(&s);
    for (i, n) in ["ws1", "ws2", "ws3"].iter().enumerate() {
        let h = &first[*n];
        assert_eq!(h["role"], "workstation", "{h}");
        assert_eq!(h["addr"], format!("10.99.0.{}:7071", 101 + i), "{h}");
        assert!(
            h["load1"].as_f64().unwrap() >= 0.0 && h["runnable"].as_u64().is_some(),
            "{h}"
        );
    }
    // Servers are not workstations: they do not register as hosts.
    assert!(!first.contains_key("srv1"), "{first:?}");
    // Heartbeats keep coming: every host's last heartbeat moves on, load is reported.
    std::thread::sleep(BEAT * 2 + Duration::from_millis(500));
    let later = hosts(&s);
    for n in ["ws1", "ws2", "ws3"] {
        let (a, b) = (
            first[n]["last_heartbeat_ms"].as_u64().unwrap(),
            later[n]["last_heartbeat_ms"].as_u64().unwrap(),
        );
        assert!(
            b >= a + 1500,
            "{n}: no heartbeat in {} ms ({a} -> {b})",
            (BEAT * 2).as_millis()
        );
        assert_eq!(later[n]["state"], "up");
        // No input device in a simulated host: the owner is idle since wispd started.
        assert!(
            later[n]["owner_idle_secs"].as_u64().unwrap() >= 3,
            "{}",
            later[n]
        );
    }
    // The table a person reads.
    let table = wisp_ok(&s, &["hosts"]);
    assert!(
        table.starts_with("HOST") && table.contains("OWNER IDLE") && table.contains("HEARTBEAT"),
        "{table}"
    );
    for n in ["ws1", "ws2", "ws3"] {
        assert!(
            table
                .lines()
                .any(|l| l.starts_with(n) && l.contains(" up ")),
            "{n} missing or not up:\n{table}"
        );
    }
    // The harness registered the root domain on srv1.
    let d = json(&wisp_ok(&s, &["domains", "--json"]));
    assert_eq!(d["/"], "10.99.0.11:7070", "{d}");
    // Domain commands, and bad input that gets a clear error and changes nothing.
    wisp_ok(&s, &["domains", "add", "/home", "10.99.0.12:7070"]);
    let (code, _, err) = wisp(&s, &["domains", "add", "relative", "10.99.0.12:7070"]);
    assert!(code != 0 && err.contains("bad domain prefix"), "{err}");
    let (code, _, err) = wisp(&s, &["domains", "remove", "/nope"]);
    assert!(code != 0 && err.contains("unknown domain /nope"), "{err}");
    let d = json(&wisp_ok(&s, &["domains", "--json"]));
    assert_eq!(d.as_object().unwrap().len(), 2, "{d}");
    assert_eq!(d["/home"], "10.99.0.12:7070");
    let (code, _, err) = wisp(&s, &["owner", "ws9", "active"]);
    assert!(code != 0 && err.contains("unknown host ws9"), "{err}");
    // Without a registry to ask, the CLI says what to give it.
    let out = Command::new(s.bin_dir.join("wisp"))
        .args(["hosts"])
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("give --registry"),
        "{out:?}"
    );
}

#[test]
fn owner_activity_decides_eligibility() {
    let s = cluster("owner");
    wait_registered(&s);
    wisp_ok(&s, &["owner", "ws2", "idle"]);
    wait_until("ws2 is idle (eligible)", Duration::from_secs(10), || {
        idle_hosts(&s).contains(&"ws2".to_string()).then_some(())
    });
    let got = allocate(&s, 3);
    assert!(
        got.contains(&"ws2".to_string()),
        "an idle ws2 was not allocated: {got:?}"
    );

    // The owner comes back: ws2 is no longer lent out, and stays so across heartbeats
    // (its wispd reads the override file and reports the owner active).
    let out = wisp_ok(&s, &["owner", "ws2", "active"]);
    assert!(out.contains("owner active"), "{out}");
    wait_until("ws2 is not idle", Duration::from_secs(10), || {
        (!idle_hosts(&s).contains(&"ws2".to_string())).then_some(())
    });
    std::thread::sleep(BEAT * 2 + Duration::from_millis(500));
    let h = hosts(&s);
    assert!(
        h["ws2"]["owner_idle_secs"].as_u64().unwrap() <= 2,
        "wispd does not report the owner active: {}",
        h["ws2"]
    );
    assert_eq!(h["ws2"]["eligible"], false);
    for _ in 0..3 {
        let got = allocate(&s, 3);
        assert!(
            !got.contains(&"ws2".to_string()),
            "ws2 allocated while its owner is active: {got:?}"
        );
    }

    // Away again: eligible again.
    wisp_ok(&s, &["owner", "ws2", "idle"]);
    wait_until("ws2 is idle again", Duration::from_secs(10), || {
        idle_hosts(&s).contains(&"ws2".to_string()).then_some(())
    });
    std::thread::sleep(BEAT * 2);
    assert!(
        idle_hosts(&s).contains(&"ws2".to_string()),
        "ws2 fell back to active after heartbeats"
    );
    let got = allocate(&s, 3);
    assert!(
        got.contains(&"ws2".to_string()),
        "ws2 not allocated after its owner left: {got:?}"
    );

    // auto: the override is dropped and wispd's own measure (idle since start) is back.
    wisp_ok(&s, &["owner", "ws2", "auto"]);
    assert!(!s.owner_file("ws2").exists());
    wait_until(
        "ws2 reports its own measure",
        Duration::from_secs(10),
        || {
            let h = hosts(&s);
            (h["ws2"]["owner_idle_secs"].as_u64().unwrap() < 600).then_some(())
        },
    );
}

#[test]
fn registry_survives_leader_sigkill_and_it_catches_up() {
    let mut s = cluster("leader");
    wait_registered(&s);
    let (_, leader) = status(&s);
    let leader = leader.expect("a leader");
    let srv = s
        .server_of_replica(leader)
        .expect("leader's server")
        .name
        .clone();
    s.kill_daemon(&srv, libc::SIGKILL).unwrap();
    let killed = Instant::now();
    // Another replica takes over.
    let new_leader = wait_until(
        "a new leader is elected",
        Duration::from_secs(20),
        || match status(&s) {
            (_, Some(l)) if l != leader => Some(l),
            _ => None,
        },
    );
    assert_ne!(new_leader, leader);
    // Writes work: the owner of ws1 is declared away, through the surviving replicas.
    wisp_ok(&s, &["owner", "ws1", "idle"]);
    // Heartbeats continue, and no workstation is marked down meanwhile.
    let before = hosts(&s);
    let mut seen_fresh = std::collections::BTreeSet::new();
    while killed.elapsed() < Duration::from_secs(14) {
        let h = hosts(&s);
        for n in ["ws1", "ws2", "ws3"] {
            assert_eq!(
                h[n]["state"], "up",
                "{n} marked down after the leader died: {}",
                h[n]
            );
            if h[n]["last_heartbeat_ms"].as_u64() > before[n]["last_heartbeat_ms"].as_u64() {
                seen_fresh.insert(n);
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(
        seen_fresh.len(),
        3,
        "heartbeats did not all continue: {seen_fresh:?}"
    );
    assert!(idle_hosts(&s).contains(&"ws1".to_string()));
    // The killed replica comes back and catches up with what it missed.
    s.start_daemon(&srv).unwrap();
    wait_until(
        "the restarted replica catches up",
        Duration::from_secs(30),
        || {
            let (all, l) = status(&s);
            let l = l?;
            let (mine, theirs) = (applied_of(&all, leader)?, applied_of(&all, l)?);
            let st = all
                .iter()
                .find(|r| r["status"]["id"].as_u64() == Some(leader))?;
            (st["status"]["leader"].as_u64() == Some(l) && mine + 3 >= theirs && mine > 0)
                .then_some(())
        },
    );
    // It holds the state written while it was away.
    // (`wisp hosts` without --fresh is answered from the asked replica's own copy.)
    let local = s.ok(
        &srv,
        &format!(
            "{} hosts --json --registry {}:7070",
            s.bin_dir.join("wisp").display(),
            s.host(&srv).unwrap().addr,
        ),
    );
    assert!(local.contains("\"ws1\""), "{local}");
    // The file system is back too (the killed server may have been the root domain's).
    s.ok(
        "ws2",
        "echo back > /wisp/after-restart && cat /wisp/after-restart",
    );
}

#[test]
fn dead_workstation_is_marked_down() {
    let mut s = cluster("down");
    wait_registered(&s);
    s.kill_daemon("ws3", libc::SIGKILL).unwrap();
    let t0 = Instant::now();
    wait_until("ws3 is marked down", Duration::from_secs(25), || {
        (hosts(&s)["ws3"]["state"] == "down").then_some(())
    });
    let took = t0.elapsed();
    // Not before the heartbeat expiry (10 s by default).
    assert!(
        took >= Duration::from_secs(8),
        "ws3 marked down after only {took:?}"
    );
    let h = hosts(&s);
    assert_eq!(h["ws1"]["state"], "up");
    assert_eq!(h["ws2"]["state"], "up");
    // A down host is never lent out.
    wisp_ok(&s, &["owner", "ws3", "idle"]);
    assert!(!idle_hosts(&s).contains(&"ws3".to_string()));
    assert!(!allocate(&s, 3).contains(&"ws3".to_string()));
    let table = wisp_ok(&s, &["hosts"]);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ws3") && l.contains(" down ")),
        "{table}"
    );
    // A new wispd brings it back up, with heartbeats, and its owner override still applies.
    let t = hosts(&s)["ws3"]["last_heartbeat_ms"].as_u64().unwrap();
    s.start_daemon("ws3").unwrap();
    wait_until("ws3 is up again", Duration::from_secs(15), || {
        let h = hosts(&s);
        (h["ws3"]["state"] == "up" && h["ws3"]["last_heartbeat_ms"].as_u64().unwrap() > t)
            .then_some(())
    });
    wait_until("ws3 is idle again", Duration::from_secs(10), || {
        idle_hosts(&s).contains(&"ws3".to_string()).then_some(())
    });
    s.ok("ws3", "ls /wisp >/dev/null");
}

#[test]
fn replicas_removed_and_added_at_run_time() {
    let s = cluster("member");
    wait_registered(&s);
    let (_, leader) = status(&s);
    let leader = leader.expect("a leader");
    let victim = (1..=3).find(|i| *i != leader).unwrap();
    let vaddr = format!("{}:7070", s.server_of_replica(victim).unwrap().addr);
    let out = wisp_ok(&s, &["registry", "remove", &victim.to_string()]);
    assert!(out.contains("removed"), "{out}");
    let (all, l) = status(&s);
    let st = &all
        .iter()
        .find(|r| r["status"]["id"].as_u64() == l)
        .unwrap()["status"];
    let voters: Vec<u64> = st["voters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert!(
        !voters.contains(&victim) && voters.len() == 2,
        "voters after remove: {voters:?}"
    );
    // The registry keeps working with two voters: writes and heartbeats.
    wisp_ok(&s, &["owner", "ws1", "idle"]);
    let t = hosts(&s)["ws2"]["last_heartbeat_ms"].as_u64().unwrap();
    wait_until("heartbeats go on", Duration::from_secs(10), || {
        (hosts(&s)["ws2"]["last_heartbeat_ms"].as_u64().unwrap() > t).then_some(())
    });
    // Bad input: a clear error, nothing changed.
    let (code, _, err) = wisp(&s, &["registry", "add", "7", "not-an-address"]);
    assert!(code != 0 && err.contains("bad address"), "{err}");
    // Add it back at run time: it catches up and votes again.
    let out = wisp_ok(&s, &["registry", "add", &victim.to_string(), &vaddr]);
    assert!(out.contains("added"), "{out}");
    wait_until(
        "the re-added replica votes and has caught up",
        Duration::from_secs(30),
        || {
            let (all, l) = status(&s);
            let l = l?;
            let st = &all.iter().find(|r| r["status"]["id"].as_u64() == Some(l))?["status"];
            let voters: Vec<u64> = st["voters"]
                .as_array()?
                .iter()
                .filter_map(|v| v.as_u64())
                .collect();
            let (mine, theirs) = (applied_of(&all, victim)?, applied_of(&all, l)?);
            (voters.len() == 3 && voters.contains(&victim) && mine + 3 >= theirs).then_some(())
        },
    );
    let table = wisp_ok(&s, &["registry", "status"]);
    assert!(
        table.contains("leader") && table.lines().filter(|l| l.contains("follower")).count() == 2,
        "{table}"
    );
}

#[test]
fn registry_survives_a_partition_and_stops_cleanly_without_quorum() {
    let mut s = cluster("quorum");
    wait_registered(&s);
    // Partition the leader's server off the network: the other two elect a leader and
    // carry on; writes and heartbeats keep working.
    let (_, leader) = status(&s);
    let leader = leader.expect("a leader");
    let cut = s.server_of_replica(leader).unwrap().name.clone();
    s.set_partitioned(&cut, true).unwrap();
    let cut_at = Instant::now();
    let new_leader = wait_until(
        "a leader on the majority side",
        Duration::from_secs(20),
        || match status(&s) {
            (_, Some(l)) if l != leader => Some(l),
            _ => None,
        },
    );
    wisp_ok(&s, &["owner", "ws3", "idle"]);
    while cut_at.elapsed() < Duration::from_secs(12) {
        let h = hosts(&s);
        for n in ["ws1", "ws2", "ws3"] {
            assert_eq!(
                h[n]["state"], "up",
                "{n} marked down during the partition: {}",
                h[n]
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(idle_hosts(&s).contains(&"ws3".to_string()));
    // Heal: the cut replica follows the new leader and catches up.
    s.set_partitioned(&cut, false).unwrap();
    wait_until(
        "the partitioned replica rejoins and catches up",
        Duration::from_secs(30),
        || {
            let (all, l) = status(&s);
            let l = l?;
            let st = all
                .iter()
                .find(|r| r["status"]["id"].as_u64() == Some(leader))?;
            let (mine, theirs) = (applied_of(&all, leader)?, applied_of(&all, l)?);
            (st["status"]["leader"].as_u64() == Some(l) && mine + 3 >= theirs).then_some(())
        },
    );
    let _ = new_leader;

    // Kill two of three: writes stop with a clear error; reads still answer; nothing is lost.
    let alive = "srv1";
    for srv in ["srv2", "srv3"] {
        s.kill_daemon(srv, libc::SIGKILL).unwrap();
    }
    let t0 = Instant::now();
    let (code, out, err) = wisp(&s, &["owner", "ws3", "active"]);
    assert_ne!(code, 0, "a write succeeded without a quorum: {out}");
    assert!(
        err.contains("quorum"),
        "unclear error without a quorum: {err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(40),
        "the write took {:?} to fail",
        t0.elapsed()
    );
    let h = hosts(&s);
    assert!(
        ["ws1", "ws2", "ws3"].iter().all(|n| h.contains_key(*n)),
        "hosts lost: {h:?}"
    );
    assert_eq!(
        json(&wisp_ok(&s, &["domains", "--json"]))["/"],
        "10.99.0.11:7070"
    );
    let _ = alive;
    // One comes back: writes resume, heartbeats resume, and the state is intact.
    s.start_daemon("srv2").unwrap();
    wait_until("writes resume", Duration::from_secs(40), || {
        (wisp(&s, &["owner", "ws3", "active"]).0 == 0).then_some(())
    });
    let t = hosts(&s)["ws1"]["last_heartbeat_ms"].as_u64().unwrap();
    wait_until(
        "heartbeats resume and every host is up",
        Duration::from_secs(20),
        || {
            let h = hosts(&s);
            let ok = h["ws1"]["last_heartbeat_ms"].as_u64().unwrap() > t
                && ["ws1", "ws2", "ws3"].iter().all(|n| h[*n]["state"] == "up");
            ok.then_some(())
        },
    );
    wait_until("ws3's owner is active", Duration::from_secs(10), || {
        (!idle_hosts(&s).contains(&"ws3".to_string())).then_some(())
    });
    s.start_daemon("srv3").unwrap();
}

#[test]
fn concurrent_allocations_never_hand_a_host_out_twice() {
    let s = cluster("alloc");
    wait_registered(&s);
    for n in ["ws1", "ws2", "ws3"] {
        wisp_ok(&s, &["owner", n, "idle"]);
    }
    wait_until(
        "all three workstations are idle",
        Duration::from_secs(10),
        || (idle_hosts(&s).len() == 3).then_some(()),
    );
    // 100 users ask for one host each, at once, through all three replicas.
    let servers: Vec<String> = s.registry_addrs().split(',').map(String::from).collect();
    let key = wisp_proto::identity::Identity::load(&s.identity_dir("ws1")).expect("cluster key");
    let granted: Vec<(u32, String)> = s.in_netns("ws1", move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut set = tokio::task::JoinSet::new();
            for i in 0..100u32 {
                let mut sv = servers.clone();
                sv.rotate_left(i as usize % 3);
                let c = RegistryClient::new(
                    tokio::runtime::Handle::current(),
                    sv,
                    key.clone(),
                    format!("e2e-user{i}"),
                );
                set.spawn(async move {
                    let l = c
                        .allocate_hosts(5000 + i, 1, "e2e", false)
                        .await
                        .expect("allocation");
                    l.into_iter()
                        .map(|l| (5000 + i, l.host))
                        .collect::<Vec<_>>()
                });
            }
            let mut all = Vec::new();
            while let Some(r) = set.join_next().await {
                all.extend(r.expect("allocation task"));
            }
            all
        })
    });
    let mut hosts_granted: Vec<&String> = granted.iter().map(|(_, h)| h).collect();
    hosts_granted.sort();
    let n = hosts_granted.len();
    hosts_granted.dedup();
    assert_eq!(
        hosts_granted.len(),
        n,
        "a host was handed out twice: {granted:?}"
    );
    assert_eq!(
        n, 3,
        "three idle hosts, 100 requests: all three should be granted, once: {granted:?}"
    );
}

/// Three servers, each serving a domain (`/`, `/home`, `/scratch`): a workstation sees one
/// tree, files land on the server of their domain, a rename across domains is EXDEV (as
/// across a mount boundary; `mv` then copies), and callbacks work in every domain.
#[test]
fn three_domains_appear_as_one_tree() {
    let s = sim_with("domains3", 2, |sp| sp.servers = 3);
    let (srv2, srv3) = (
        format!("{}:7070", s.host("srv2").unwrap().addr),
        format!("{}:7070", s.host("srv3").unwrap().addr),
    );
    s.wisp_cli("ws1", &["domains", "add", "/home", &srv2])
        .unwrap();
    s.wisp_cli("ws1", &["domains", "add", "/scratch", &srv3])
        .unwrap();
    // Each workstation picks the table up within its refresh period (2 s): the domain
    // roots then carry a domain number in the top byte of their inode numbers.
    for ws in ["ws1", "ws2"] {
        let t0 = std::time::Instant::now();
        loop {
            let ino = s.ok(
                ws,
                "stat -c %i /wisp/home /wisp/scratch 2>/dev/null || true",
            );
            if ino.lines().count() == 2 && ino.lines().all(|l| l.trim().len() >= 17) {
                break;
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(15),
                "{ws} never saw the domains: {ino}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    s.ok(
        "ws1",
        "echo in-root-domain > /wisp/top.txt && echo in-home-domain > /wisp/home/a.txt && mkdir /wisp/scratch/d && echo in-scratch-domain > /wisp/scratch/d/b.txt && sync",
    );
    // Written back (delayed writes) once another host reads them.
    assert_eq!(
        s.ok(
            "ws2",
            "cat /wisp/top.txt /wisp/home/a.txt /wisp/scratch/d/b.txt; ls /wisp | grep -c -e '^home$' -e '^scratch$'"
        ),
        "in-root-domain\nin-home-domain\nin-scratch-domain\n2\n"
    );
    let on = |srv: &str, what: &str| -> bool {
        let dir = s.data_root.join(srv).join("objects");
        std::process::Command::new("grep")
            .args(["-rlq", what])
            .arg(&dir)
            .status()
            .unwrap()
            .success()
    };
    for (srv, what) in [
        ("srv1", "in-root-domain"),
        ("srv2", "in-home-domain"),
        ("srv3", "in-scratch-domain"),
    ] {
        assert!(on(srv, what), "{what} is not on {srv}");
        for other in ["srv1", "srv2", "srv3"] {
            if other != srv {
                assert!(!on(other, what), "{what} is also on {other}");
            }
        }
    }
    // rename(2) and link(2) across domains: EXDEV.
    let (code, _, err) = s.run(
        "ws1",
        "python3 -c \"import os; os.rename('/wisp/home/a.txt', '/wisp/scratch/a.txt')\"",
    );
    assert_ne!(code, 0);
    assert!(err.contains("Invalid cross-device link"), "{err}");
    let (code, _, err) = s.run("ws1", "ln /wisp/home/a.txt /wisp/top-link");
    assert_ne!(code, 0);
    assert!(err.contains("cross-device"), "{err}");
    // Within a domain, rename works; mv across domains copies.
    s.ok(
        "ws1",
        "mv /wisp/home/a.txt /wisp/home/a2.txt && mv /wisp/home/a2.txt /wisp/scratch/moved.txt",
    );
    assert_eq!(
        s.ok("ws2", "cat /wisp/scratch/moved.txt; ls /wisp/home | wc -l"),
        "in-home-domain\n0\n"
    );
    // Consistency inside another domain: ws2 has it cached, ws1 changes it.
    s.ok("ws1", "echo v1 > /wisp/home/c.txt");
    assert_eq!(s.ok("ws2", "cat /wisp/home/c.txt"), "v1\n");
    s.ok("ws1", "echo version-two > /wisp/home/c.txt");
    assert_eq!(s.ok("ws2", "cat /wisp/home/c.txt"), "version-two\n");
}
