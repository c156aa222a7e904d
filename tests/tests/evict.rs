//! End-to-end: eviction when owners come back, the global process view (`wisp ps`, `wisp
//! kill`, `wisp migrate`, `wisp evict`, `wisp events`) and load balancing.

use std::time::{Duration, Instant};

use wisp_tests::{sim, sim_with, Sim};

/// A single-process job printing `tick I` every 0.1 s, N times, then exiting with `code`;
/// on SIGUSR1 it prints `got usr1`.
fn ticker(n: u32, code: i32) -> String {
    format!(
        r#"perl -e '$|=1; $SIG{{USR1}} = sub {{ print "got usr1\n" }}; for my $i (0..{}) {{ print "tick $i\n"; select(undef, undef, undef, 0.1) }} exit {code}'"#,
        n - 1
    )
}

/// Start `cmd` on `host` in /wisp/DIR on a thread; returns its output when it ends.
fn spawn(
    s: &Sim,
    host: &str,
    dir: &str,
    cmd: &str,
) -> std::thread::JoinHandle<std::process::Output> {
    let (c, host, script) = (
        s.c.clone(),
        host.to_string(),
        format!("mkdir -p /wisp/{dir} && cd /wisp/{dir} && {cmd}"),
    );
    std::thread::spawn(move || c.sh(&host, &script).unwrap())
}

/// Wait until `n` jobs run; their (id, host), in id order.
fn wait_jobs(s: &Sim, n: usize) -> Vec<(String, String)> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = s.ps();
        if v.len() >= n {
            return v.into_iter().map(|(id, h, _, _)| (id, h)).collect();
        }
        assert!(Instant::now() < deadline, "{n} jobs did not start: {v:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn host_of(s: &Sim, id: &str) -> (String, String, u32) {
    s.ps()
        .into_iter()
        .find(|j| j.0 == id)
        .map(|j| (j.1, j.2, j.3))
        .unwrap_or_default()
}

/// A cluster whose wispds get `args` too.
fn sim_wispd(tag: &str, workstations: usize, args: &[&str]) -> Sim {
    sim_with(tag, workstations, |sp| {
        sp.wispd_args = args.iter().map(|a| a.to_string()).collect()
    })
}

/// Poll `f` every 100 ms until it gives a value; panics with `what` after `secs`.
fn wait_for<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A job that holds a TCP connection to `srv` (so it cannot migrate) and ticks 40 times,
/// then prints its peer's address.
fn socket_job(srv: &str) -> String {
    format!(
        r#"perl -MIO::Socket::INET -e '$|=1; my $s = IO::Socket::INET->new(PeerAddr => "{srv}") or die "connect: $!"; for my $i (0..39) {{ print "tick $i\n"; select(undef, undef, undef, 0.1) }} print "peer ", $s->peerhost, "\n"; exit 0'"#
    )
}

/// Scheduler states (R, S, T, ...) of the processes of `host`'s jobs.
fn job_states(s: &Sim, host: &str) -> Vec<String> {
    s.job_processes(host)
        .iter()
        .filter_map(|p| {
            let st = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            Some(
                st.rsplit(')')
                    .next()?
                    .split_whitespace()
                    .next()?
                    .to_string(),
            )
        })
        .collect()
}

fn assert_exit(out: &std::process::Output, code: i32) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `tick 0` .. `tick n-1`, each once, in order (extra lines allowed).
fn check_ticks(out: &std::process::Output, n: u32) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let ticks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tick")).collect();
    let want: Vec<String> = (0..n).map(|i| format!("tick {i}")).collect();
    assert_eq!(
        ticks,
        want,
        "output lost or repeated; stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A job moved twice (`wisp migrate` to a host the registry picks, then `wisp evict` of
/// that host) is still reached by `wisp kill` wherever it is, `wisp ps` says the same on
/// every host (its global id, home, host, state and 2 migrations), and both moves are in
/// `wisp events` with their timings.
#[test]
fn kill_reaches_a_job_that_moved_twice_and_every_host_agrees() {
    let s = sim("kill2", 3);
    s.lend(&["ws2", "ws3"]);
    let runner = spawn(&s, "ws1", "k", &format!("rexec {}", ticker(600, 0)));
    let (id, from) = wait_jobs(&s, 1).remove(0);
    assert!(id.starts_with("ws1."), "global id is HOME.N: {id}");
    std::thread::sleep(Duration::from_secs(1));

    let m = s.wisp(&format!("migrate {id}"));
    let (mid, _, n) = host_of(&s, &id);
    assert!(mid != from && !mid.is_empty(), "{m}");
    assert_eq!(n, 1);
    assert!(m.contains(&format!("{from} -> {mid}")), "{m}");

    let e = s.wisp(&format!("evict {mid}"));
    assert!(e.contains("1 foreign jobs moved, 0 stayed"), "{e}");
    let (to, state, n) = host_of(&s, &id);
    assert!(to != mid && !to.is_empty(), "{e}");
    assert_eq!((state.as_str(), n), ("running", 2));
    assert!(
        s.job_processes(&mid).is_empty(),
        "processes left on {mid} after wisp evict"
    );

    // Every host's view is the same.
    let views: Vec<String> = ["ws1", "ws2", "ws3"]
        .iter()
        .map(|h| s.c.wisp_cli(h, &["ps", "--no-usage"]).unwrap())
        .collect();
    for (h, v) in ["ws2", "ws3"].iter().zip(&views[1..]) {
        assert_eq!(*v, views[0], "wisp ps on {h} disagrees with ws1");
    }
    let line = views[0]
        .lines()
        .find(|l| l.starts_with(&format!("{id} ")))
        .unwrap_or_else(|| panic!("{id} not in {}", views[0]));
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        (f[2], f[3], f[4], f[7]),
        ("ws1", to.as_str(), "running", "2"),
        "{line}"
    );
    // With usage: CPU time and memory from the job's current host.
    let full = s.wisp("ps");
    let line = full
        .lines()
        .find(|l| l.starts_with(&format!("{id} ")))
        .unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(
        f[5].ends_with('s') && f[6].ends_with('M') && f[8] == "perl",
        "no CPU/memory for the job: {line}"
    );
    let mem: f64 = f[6].trim_end_matches('M').parse().unwrap();
    assert!(mem > 0.0, "{line}");

    let ev = s.wisp(&format!("events --job {id}"));
    let lines: Vec<&str> = ev.lines().collect();
    assert_eq!(lines.len(), 2, "{ev}");
    assert!(
        lines[0].contains("migrated") && lines[0].contains(&format!("{from} -> {mid}")),
        "{ev}"
    );
    assert!(
        lines[1].contains("evicted")
            && lines[1].contains(&format!("{mid} -> {to}"))
            && lines[1].contains("wisp evict")
            && lines[1].contains("frozen"),
        "{ev}"
    );

    // `wisp top`, one screen: hosts, the job, the moves.
    let top = s.wisp("top -n 1");
    assert!(
        top.contains("HOST") && top.contains(&format!("{id} ")) && top.contains("latest moves"),
        "{top}"
    );
    assert!(
        top.lines().filter(|l| l.contains(&id)).count() >= 3,
        "{top}"
    );

    s.wisp(&format!("kill -USR1 {id}"));
    std::thread::sleep(Duration::from_millis(500));
    let k = s.wisp(&format!("kill -9 {id}"));
    assert!(k.contains(&format!("on {to}")), "{k}");
    let out = runner.join().unwrap();
    assert_eq!(out.status.code(), Some(137), "killed job's status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("got usr1"), "SIGUSR1 did not reach the job");
    let ticks: Vec<&str> = stdout.lines().filter(|l| l.starts_with("tick")).collect();
    for (i, t) in ticks.iter().enumerate() {
        assert_eq!(*t, format!("tick {i}"), "output lost or repeated");
    }
}

/// Every owner comes back at once: with no idle host left, each foreign job goes home (a
/// home always takes its own jobs back, its owner active or not), and on its home host a
/// job is not foreign: it stays there.
#[test]
fn all_owners_active_send_jobs_home_and_home_keeps_its_own() {
    let s = sim("home", 3);
    s.lend(&["ws2", "ws3"]);
    let t = ticker(100, 3);
    let a = spawn(&s, "ws1", "h1", &format!("rexec --host ws2 {t}"));
    let b = spawn(&s, "ws1", "h2", &format!("rexec --host ws3 {t}"));
    let c = spawn(&s, "ws2", "h3", &format!("rexec --host ws3 {t}"));
    let jobs = wait_jobs(&s, 3);
    std::thread::sleep(Duration::from_secs(1));
    // The registry hears first (so no host is handed out as idle), then every wispd.
    for h in ["ws1", "ws2", "ws3"] {
        s.wisp(&format!(
            "owner {h} active --owner-file /tmp/wisp-test-{}-{h}",
            s.name
        ));
    }
    for h in ["ws1", "ws2", "ws3"] {
        std::fs::write(s.c.owner_file(h), "active\n").unwrap();
    }
    let t0 = Instant::now();
    let home = |id: &str| id.split('.').next().unwrap().to_string();
    loop {
        let now = s.ps();
        if now.len() == 3 && now.iter().all(|j| j.1 == home(&j.0)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "jobs did not go home: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("all jobs home after {:?}", t0.elapsed());
    assert!(
        s.job_processes("ws3").is_empty(),
        "foreign processes left on ws3"
    );
    // Home hosts with active owners keep their own jobs.
    let before = s.ps();
    std::thread::sleep(Duration::from_secs(2));
    let after = s.ps();
    assert_eq!(
        before, after,
        "a job left its home while the owner was active"
    );
    for (id, host, state, n) in &after {
        assert_eq!(
            (host.as_str(), state.as_str()),
            (home(id).as_str(), "running")
        );
        assert!(*n >= 1, "{id} never moved");
    }
    for r in [a, b, c] {
        let out = r.join().unwrap();
        assert_exit(&out, 3);
        check_ticks(&out, 100);
    }
    let ev = s.wisp("events");
    for (id, _) in &jobs {
        assert!(
            ev.lines().any(|l| l.contains(id.as_str())
                && l.contains("evicted")
                && l.contains("owner active on")),
            "no eviction of {id} recorded:\n{ev}"
        );
    }
}

/// A job holding a TCP connection cannot migrate: when its host's owner comes back it is
/// suspended (every process stopped), reported (`wisp ps` state, `wisp events`), not
/// killed, and runs to completion, connection intact, once the owner is away again.
#[test]
fn job_holding_a_tcp_connection_is_suspended_reported_and_resumed() {
    let s = sim("tcp", 2);
    s.lend(&["ws2"]);
    let srv = s.c.server_addr();
    let runner = spawn(&s, "ws1", "tcp", &format!("rexec {}", socket_job(&srv)));
    let (id, host) = wait_jobs(&s, 1).remove(0);
    assert_eq!(host, "ws2");
    std::thread::sleep(Duration::from_millis(800));
    s.wisp("owner ws2 active");
    let t0 = Instant::now();
    loop {
        let full = s.wisp("ps");
        if full
            .lines()
            .any(|l| l.starts_with(&format!("{id} ")) && l.contains(" suspended "))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "job was not suspended:\n{full}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let states = job_states(&s, "ws2");
    assert!(!states.is_empty(), "the job was killed");
    assert!(
        states.iter().all(|st| st == "T"),
        "processes of the job are not stopped: {states:?}"
    );
    let ev = s.wisp(&format!("events --job {id}"));
    assert!(
        ev.contains("suspended") && ev.contains("cannot migrate") && ev.contains("socket"),
        "{ev}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert!(!runner.is_finished(), "a suspended job finished");
    assert_eq!(host_of(&s, &id).0, "ws2");
    s.wisp("owner ws2 idle");
    let out = runner.join().unwrap();
    assert_exit(&out, 0);
    check_ticks(&out, 40);
    let ip = srv.split(':').next().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("peer {ip}")),
        "the connection did not survive"
    );
    assert!(s.wisp(&format!("events --job {id}")).contains("resumed"));
}

/// The policy knobs: `--max-foreign 1` refuses a second foreign job; `--evict-grace`
/// keeps a job in place while the owner has been back for less than the grace period;
/// `--unmigratable run` leaves a job that cannot migrate running (reported, not stopped).
#[test]
fn eviction_policy_max_foreign_grace_and_unmigratable_run() {
    let s = sim_wispd(
        "policy",
        3,
        &[
            "--max-foreign",
            "1",
            "--evict-grace",
            "2000",
            "--unmigratable",
            "run",
        ],
    );
    s.lend(&["ws2", "ws3"]);
    let a = spawn(
        &s,
        "ws1",
        "p1",
        &format!("rexec --host ws2 {}", ticker(80, 0)),
    );
    let (id, host) = wait_jobs(&s, 1).remove(0);
    assert_eq!(host, "ws2");
    // A second foreign job on ws2 is refused.
    let (code, _, err) = s.run(
        "ws1",
        &format!(
            "mkdir -p /wisp/p2 && cd /wisp/p2 && rexec --host ws2 {}",
            ticker(5, 0)
        ),
    );
    assert_ne!(code, 0, "a second foreign job was accepted on ws2");
    assert!(err.contains("at most 1"), "{err}");
    // A job holding a socket on ws3, which cannot migrate.
    let srv = s.c.server_addr();
    let b = spawn(
        &s,
        "ws1",
        "p3",
        &format!("rexec --host ws3 {}", socket_job(&srv)),
    );
    let jobs = wait_jobs(&s, 2);
    let tcp = jobs.iter().find(|j| j.1 == "ws3").unwrap().0.clone();
    std::thread::sleep(Duration::from_millis(500));
    // Grace: the owner of ws2 is back, but the job stays for 2 s.
    let t0 = Instant::now();
    s.wisp("owner ws2 active");
    s.wisp("owner ws3 active");
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(host_of(&s, &id).0, "ws2", "evicted within the grace period");
    wait_for(8, "not evicted after the grace period", || {
        (host_of(&s, &id).0 != "ws2").then_some(())
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "evicted before the grace period"
    );
    // The job with the socket: reported, still running on ws3, not stopped.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.wisp(&format!("events --job {tcp}")).contains("failed") {
        assert!(
            Instant::now() < deadline,
            "the failed move was not recorded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (h, state, _) = host_of(&s, &tcp);
    assert_eq!((h.as_str(), state.as_str()), ("ws3", "running"));
    let full = s.wisp("ps");
    assert!(
        full.lines()
            .any(|l| l.starts_with(&format!("{tcp} ")) && l.contains(" running ")),
        "{full}"
    );
    let states = job_states(&s, "ws3");
    assert!(
        !states.is_empty() && states.iter().all(|st| st != "T"),
        "the job was stopped (or is gone): {states:?}"
    );
    // Both finish while the owners are still active.
    for (r, n) in [(a, 80), (b, 40)] {
        let out = r.join().unwrap();
        assert_exit(&out, 0);
        check_ticks(&out, n);
    }
}

/// `wispd --preflush`: a job's memory is written to its swap file while the owner is
/// away, so the eviction writes only the pages it dirtied since, not its 64 MiB.
#[test]
fn preflushed_job_is_evicted_writing_only_what_it_dirtied() {
    let s = sim_wispd("pre", 3, &["--preflush", "0.5"]);
    s.lend(&["ws2", "ws3"]);
    let job = r#"perl -e '$|=1; my $h = "h" x (64 << 20); for my $i (0..59) { print "tick $i\n"; select(undef, undef, undef, 0.1) }'"#;
    let r = spawn(&s, "ws1", "pre", &format!("rexec --host ws2 {job}"));
    let (id, _) = wait_jobs(&s, 1).remove(0);
    std::thread::sleep(Duration::from_secs(3));
    s.wisp("owner ws2 active");
    wait_for(10, "not evicted", || {
        (host_of(&s, &id).0 != "ws2").then_some(())
    });
    let ev = s.wisp(&format!("events --job {id}"));
    let mib: f64 = ev
        .split(" MiB")
        .next()
        .and_then(|x| x.rsplit(' ').next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no size in {ev}"));
    assert!(
        ev.contains("evicted") && mib < 16.0,
        "wrote {mib} MiB at eviction: {ev}"
    );
    let out = r.join().unwrap();
    assert_exit(&out, 0);
    check_ticks(&out, 60);
}

/// `wispd --balance`: a host running more jobs than its slots moves a long-running one to
/// an idle host, once (the moved job stays; the host left is no longer overloaded).
#[test]
fn balancer_moves_a_long_running_job_off_an_overloaded_host() {
    let s = sim_wispd(
        "bal",
        3,
        &[
            "--balance",
            "--balance-slots",
            "1",
            "--balance-every",
            "1",
            "--balance-min-age",
            "2",
            "--balance-stay",
            "600",
        ],
    );
    s.lend(&["ws2", "ws3"]);
    let t = ticker(120, 0);
    let a = spawn(&s, "ws1", "b1", &format!("rexec --host ws2 {t}"));
    let b = spawn(&s, "ws1", "b2", &format!("rexec --host ws2 {t}"));
    wait_jobs(&s, 2);
    let t0 = Instant::now();
    let moved = wait_for(15, "no job was balanced away from ws2", || {
        s.ps().into_iter().find(|j| j.1 != "ws2")
    });
    assert!(
        t0.elapsed() >= Duration::from_secs(1),
        "moved before --balance-min-age"
    );
    std::thread::sleep(Duration::from_secs(3));
    let v = s.ps();
    assert_eq!(
        v.iter().map(|j| j.3).collect::<Vec<_>>(),
        if v[0].0 == moved.0 {
            vec![1, 0]
        } else {
            vec![0, 1]
        },
        "exactly one move: {v:?}"
    );
    let ev = s.wisp("events");
    assert!(
        ev.contains("balanced") && ev.contains("2 jobs on ws2 > 1 slots"),
        "{ev}"
    );
    for r in [a, b] {
        let out = r.join().unwrap();
        assert_exit(&out, 0);
        check_ticks(&out, 120);
    }
}

/// The issue's acceptance scenario. Three workstations are busy: a `make -j SHELL=rexec`
/// build from ws1 and two long-running jobs (on ws2 and ws3). The owner of ws2 comes back:
/// within the eviction time measured here no foreign process is left on ws2, every job
/// continues elsewhere, the build completes with correct artifacts and the long jobs'
/// outputs are byte-identical to unmigrated runs.
///
/// Build recipes are process trees (sh, cc, cc1, as): they migrate whole.
#[test]
fn owner_returns_during_a_build_and_long_jobs() {
    let s = sim("accept", 3);
    s.lend(&["ws2", "ws3"]);
    s.ok("ws1", &wisp_tests::c_project("/wisp/acc", 24, "sleep 2; "));
    // The long jobs: deterministic output, about 8 s each.
    let long = r#"perl -e '$|=1; my $h = 0; for my $i (0..79) { $h = ($h * 31 + $i * 7919) % 1000000007; my @m = map { ($h + $_) % 977 } 0..100000; print "$i $h $m[$i * 1000]\n"; select(undef, undef, undef, 0.1) }'"#;
    let want = s.ok("ws1", long);
    let build = spawn(&s, "ws1", "acc", "make -s -j6 SHELL=rexec && ./app");
    let l1 = spawn(&s, "ws1", "acc", &format!("rexec --host ws2 {long}"));
    let l2 = spawn(&s, "ws1", "acc", &format!("rexec --host ws3 {long}"));
    // The owner comes back just after a build recipe started on ws2 (in its `sleep 2`).
    let mut seen: Vec<String> = vec![];
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ps = s.wisp("ps");
        let fresh = ps.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 8 && f[3] == "ws2" && f[8] == "/bin/sh" && !seen.iter().any(|x| x == f[0])
        });
        if fresh && !seen.is_empty() {
            break;
        }
        seen.extend(
            ps.lines()
                .skip(1)
                .filter_map(|l| l.split_whitespace().next().map(String::from)),
        );
        assert!(
            Instant::now() < deadline,
            "no build recipe started on ws2:\n{ps}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!s.job_processes("ws2").is_empty(), "nothing runs on ws2");
    eprintln!("before:\n{}", s.wisp("ps"));
    let t0 = Instant::now();
    s.wisp("owner ws2 active");
    loop {
        if s.job_processes("ws2").is_empty() {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "foreign processes left on ws2: {:?}\n{}",
            s.job_processes("ws2"),
            s.wisp("ps")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "ws2 free of foreign processes {:?} after its owner came back",
        t0.elapsed()
    );
    eprintln!("{}", s.wisp("events"));
    let out = build.join().unwrap();
    assert_exit(&out, 0);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "300\n");
    for l in [l1, l2] {
        let out = l.join().unwrap();
        assert_exit(&out, 0);
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            want,
            "long job output differs"
        );
    }
    assert!(s.job_processes("ws2").is_empty());
}
