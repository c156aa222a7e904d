//! End-to-end: cluster pipes, rexec on idle hosts, live migration and eviction.

use std::time::{Duration, Instant};

use wisp_tests::{sim, Sim};

fn wisp(s: &Sim, args: &str) -> String {
    s.wisp(args)
}

fn lend(s: &Sim, hosts: &[&str]) {
    s.lend(hosts)
}

/// The host a job runs on now, from the registry.
fn job_host(s: &Sim, job: &str) -> String {
    let out = wisp(s, "jobs");
    out.lines()
        .find(|l| l.split_whitespace().next() == Some(job))
        .and_then(|l| l.split_whitespace().nth(3))
        .unwrap_or_default()
        .to_string()
}

fn only_job(s: &Sim) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = wisp(s, "jobs");
        if let Some(l) = out.lines().nth(1) {
            return l.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "no job appeared in the registry");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A cluster pipe carries 1 GiB between processes on two hosts, intact, with EOF at the end;
/// a reader that goes away early gives the writer SIGPIPE.
#[test]
fn cluster_pipe_between_hosts() {
    let s = sim("pipe", 2);
    s.ok("ws1", "wisp mkpipe /wisp/p && wisp mkpipe /wisp/q");
    let consumer = {
        let c = s.c.clone();
        std::thread::spawn(move || c.sh_ok("ws2", "sha256sum < /wisp/p").unwrap())
    };
    let produced = s.ok(
        "ws1",
        "head -c 1073741824 /dev/urandom | tee /wisp/p | sha256sum",
    );
    let consumed = consumer.join().unwrap();
    assert_eq!(consumed, produced, "bytes changed in the cluster pipe");
    // Early reader exit: the writer gets SIGPIPE (exit 141 from the shell's view).
    let reader = {
        let c = s.c.clone();
        std::thread::spawn(move || c.sh_ok("ws2", "head -c 10 /wisp/q | wc -c").unwrap())
    };
    let (code, _, _) = s.run(
        "ws1",
        "yes wisp > /wisp/q; echo $? > /tmp/wisp-pipe-code; exit 0",
    );
    assert_eq!(code, 0);
    assert_eq!(reader.join().unwrap().trim(), "10");
    assert_eq!(
        std::fs::read_to_string("/tmp/wisp-pipe-code")
            .unwrap()
            .trim(),
        "141",
        "writer did not get SIGPIPE"
    );
}

/// rexec runs the command on an idle host with the same cwd, environment, umask and stdio,
/// and returns its exit status; with no idle host it runs locally; outside /wisp it refuses.
#[test]
fn rexec_runs_on_an_idle_host_as_if_local() {
    let s = sim("rexec", 3);
    lend(&s, &["ws2"]);
    s.ok("ws1", "mkdir -p /wisp/work/sub");
    let (code, out, err) = s.run(
        "ws1",
        "cd /wisp/work/sub && umask 027 && echo input-line | WISP_TEST_VAR=hello rexec -v sh -c \
         'echo cwd=$(pwd) var=$WISP_TEST_VAR umask=$(umask) uts=$(uname -n) ip=$(ip -o -4 addr show dev eth0 | awk \"{print \\$4}\"); read l; echo got=$l; echo to-stderr >&2; touch made-here; exit 7'",
    );
    assert_eq!(code, 7, "exit status not passed back; stderr: {err}");
    assert!(
        out.contains("cwd=/wisp/work/sub var=hello umask=0027 uts=ws1 ip=10.99.0.102/24"),
        "{out}"
    );
    assert!(out.contains("got=input-line"), "{out}");
    assert!(
        err.contains("to-stderr") && err.contains("running on ws2"),
        "{err}"
    );
    assert_eq!(s.ok("ws1", "stat -c %a /wisp/work/sub/made-here"), "640\n");

    // Outside /wisp: a clear refusal.
    let (code, _, err) = s.run("ws1", "cd /tmp && rexec true");
    assert_ne!(code, 0);
    assert!(err.contains("not inside /wisp"), "{err}");

    // Signals reach the job: SIGINT to rexec ends the remote sleep with 130.
    let t0 = Instant::now();
    let (code, _, err) = s.run(
        "ws1",
        "cd /wisp/work && rexec sleep 30 & sleep 2; kill -INT $!; wait $!",
    );
    assert_eq!(code, 130, "{err}");
    assert!(t0.elapsed() < Duration::from_secs(20));

    // No idle host: runs here, and says so.
    wisp(&s, "owner ws2 active");
    std::thread::sleep(Duration::from_secs(3));
    let (code, out, err) = s.run(
        "ws1",
        "cd /wisp/work && rexec -v sh -c 'ip -o -4 addr show dev eth0'",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("running locally") && out.contains("10.99.0.101"),
        "{out}{err}"
    );
}

/// make -j SHELL=rexec builds a project with every recipe on an idle host.
#[test]
fn parallel_make_with_rexec() {
    let s = sim("make", 3);
    lend(&s, &["ws2", "ws3"]);
    s.ok("ws1", &wisp_tests::c_project("/wisp/proj", 12, ""));
    s.ok("ws1", "cd /wisp/proj && make -s -j4 SHELL=rexec");
    assert_eq!(s.ok("ws2", "/wisp/proj/app"), "78\n");
    let jobs = wisp(&s, "jobs --all");
    let on: Vec<&str> = jobs
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    // One lease per idle host (never oversubscribed): recipes beyond that run on ws1.
    assert!(on.len() >= 2, "expected recipes to run remotely:\n{jobs}");
    assert!(
        on.iter().all(|h| *h == "ws2" || *h == "ws3"),
        "a recipe ran on a busy host:\n{jobs}"
    );
    assert!(
        on.contains(&"ws2") && on.contains(&"ws3"),
        "both idle hosts should have taken work:\n{jobs}"
    );
}

const TICKER: &str = r#"cd /wisp/mig && rexec -v perl -e '$|=1; use POSIX; open(my $log, ">>", "/wisp/mig/log") or die; $log->autoflush(1); my $heap = "h" x 50_000_000; for my $i (0..70) { printf("tick %d pid %d uts %s heap %d\n", $i, $$, (POSIX::uname())[1], length $heap); print $log "$i\n"; select(undef, undef, undef, 0.1) } exit 5'"#;

/// A cluster with ws2 and ws3 lent out and the ticker job from ws1 running on one of
/// them for 2 s: (cluster, the rexec's thread, job id, host it runs on).
fn start_ticker(
    tag: &str,
) -> (
    Sim,
    std::thread::JoinHandle<std::process::Output>,
    String,
    String,
) {
    let s = sim(tag, 3);
    lend(&s, &["ws2", "ws3"]);
    s.ok("ws1", "mkdir -p /wisp/mig");
    let runner = {
        let c = s.c.clone();
        std::thread::spawn(move || c.sh("ws1", TICKER).unwrap())
    };
    let job = only_job(&s);
    std::thread::sleep(Duration::from_secs(2));
    let from = job_host(&s, &job);
    (s, runner, job, from)
}

fn check_ticks(out: &str) {
    let ticks: Vec<&str> = out.lines().filter(|l| l.starts_with("tick")).collect();
    assert_eq!(ticks.len(), 71, "output lost or duplicated:\n{out}");
    for (i, l) in ticks.iter().enumerate() {
        assert_eq!(
            *l,
            format!("tick {i} pid 2 uts ws1 heap 50000000"),
            "bad tick line"
        );
    }
}

/// A running job moves between hosts: same pid, same host name, memory intact, output and
/// an open /wisp file continue with nothing lost or repeated, exit status arrives.
#[test]
fn running_job_migrates_between_hosts() {
    let (s, runner, job, from) = start_ticker("mig");
    let to = if from == "ws2" { "ws3" } else { "ws2" };
    let m = wisp(&s, &format!("migrate {job} --to {to}"));
    assert!(m.contains(&format!("-> {to}")), "{m}");
    assert_eq!(job_host(&s, &job), to);
    let out = runner.join().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(
        stderr.contains(&format!("moved from {from} to {to}")),
        "{stderr}"
    );
    check_ticks(&stdout);
    let log = s.ok("ws2", "cat /wisp/mig/log");
    assert_eq!(
        log,
        (0..=70).map(|i| format!("{i}\n")).collect::<String>(),
        "the open file lost or repeated writes"
    );
    // Nothing left behind: the swap directory is gone once the target has every page.
    assert_eq!(s.ok("ws1", "ls -A /wisp/.swap 2>/dev/null | wc -l"), "0\n");
}

/// The owner of `from` comes back: `job` must leave it within `within`, then run to the
/// end with exit status `code`; returns its rexec's output.
fn owner_returns(
    s: &Sim,
    job: &str,
    from: &str,
    runner: std::thread::JoinHandle<std::process::Output>,
    within: Duration,
    code: i32,
) -> std::process::Output {
    let t0 = Instant::now();
    wisp(s, &format!("owner {from} active"));
    loop {
        let h = job_host(s, job);
        if !h.is_empty() && h != from {
            break;
        }
        assert!(t0.elapsed() < within, "job was not evicted from {from}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = runner.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(code),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// When the owner comes back, the foreign job leaves at once and keeps running elsewhere.
#[test]
fn owner_return_evicts_foreign_jobs() {
    let (s, runner, job, from) = start_ticker("evict");
    let out = owner_returns(&s, &job, &from, runner, Duration::from_secs(5), 5);
    check_ticks(&String::from_utf8_lossy(&out.stdout));
    let log = s.c.log_path(&from);
    assert!(std::fs::read_to_string(log)
        .unwrap()
        .contains("evicted: owner is back"));
}

/// A job with child processes (a shell loop with a background child and a `sleep` per
/// iteration) is migrated whole when the owner comes back, and finishes elsewhere with
/// nothing lost or repeated.
#[test]
fn job_with_children_is_evicted_whole() {
    let s = sim("evtree", 2);
    lend(&s, &["ws2"]);
    s.ok("ws1", "mkdir -p /wisp/evtree");
    let runner = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh("ws1", "cd /wisp/evtree && rexec sh -c 'sleep 60 & for i in $(seq 1 30); do echo $i; sleep 0.1; done; kill $!; wait $!; echo bg=$?'").unwrap()
        })
    };
    let job = only_job(&s);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(job_host(&s, &job), "ws2");
    let out = owner_returns(&s, &job, "ws2", runner, Duration::from_secs(10), 0);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        (1..=30).map(|i| format!("{i}\n")).collect::<String>() + "bg=143\n"
    );
    let log = std::fs::read_to_string(s.c.log_path("ws2")).unwrap();
    assert!(log.contains("evicted: owner is back"), "{log}");
    assert!(!log.contains("suspended, not killed"), "{log}");
}

/// A job that cannot migrate (it holds a TCP socket) is suspended, not killed, when the
/// owner comes back, and runs on to completion when the owner leaves again.
#[test]
fn unmigratable_job_is_suspended_then_resumed() {
    let s = sim("suspend", 2);
    lend(&s, &["ws2"]);
    s.ok("ws1", "mkdir -p /wisp/susp");
    let runner = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh("ws1", "cd /wisp/susp && rexec python3 -c 'import socket, time  # wisp-tcp-holder\ns = socket.socket(); s.bind((\"127.0.0.1\", 0)); s.listen()\nfor i in range(1, 31): print(i, flush=True); time.sleep(0.1)'").unwrap()
        })
    };
    let job = only_job(&s);
    std::thread::sleep(Duration::from_millis(800));
    wisp(&s, "owner ws2 active");
    let log = s.c.log_path("ws2");
    let t0 = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap()
        .contains("suspended, not killed")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "job {job} was not suspended"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        std::fs::read_to_string(&log).unwrap().contains("socket"),
        "the suspension should say why (a socket)"
    );
    // Stopped: every process of the job is in state T, and the output pauses.
    // The job's processes: in a pid namespace other than the host's, running its command.
    let states = s.ok(
        "ws2",
        r#"me=$(readlink /proc/self/ns/pid); for d in /proc/[0-9]*; do
             [ "$(readlink $d/ns/pid 2>/dev/null)" != "$me" ] || continue
             tr '\0' ' ' < $d/cmdline 2>/dev/null | grep -q 'wisp-tcp-holder' && awk '{print $3}' $d/stat
           done | sort -u"#,
    );

    assert!(
        states.trim() == "T" || states.trim().is_empty(),
        "processes not stopped: {states}"
    );
    assert!(!runner.is_finished());
    std::thread::sleep(Duration::from_secs(2));
    assert!(!runner.is_finished(), "a suspended job finished");
    wisp(&s, "owner ws2 idle");
    let out = runner.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        (1..=30).map(|i| format!("{i}\n")).collect::<String>()
    );
    assert!(std::fs::read_to_string(&log)
        .unwrap()
        .contains("resumed: owner is away again"));
}

/// Ctrl-C of a `make -j SHELL=rexec` stops every remote job: nothing is left running on
/// any host.
#[test]
fn interrupting_make_stops_every_remote_job() {
    let s = sim("intr", 3);
    lend(&s, &["ws2", "ws3"]);
    s.ok("ws1", "mkdir -p /wisp/intr && cd /wisp/intr && printf 'all: a b\\na:\\n\\tsh -c \"sleep 41; echo a\"\\nb:\\n\\tsh -c \"sleep 41; echo b\"\\n' > Makefile");
    let t0 = Instant::now();
    // setsid: make leads its own process group, which gets the "Ctrl-C".
    let (code, out, _) = s.run("ws1", "cd /wisp/intr && setsid make -j2 SHELL=rexec >/dev/null 2>&1 & sleep 3; pgrep -fc '^sleep 41$'; kill -INT -$(pgrep -xo make); wait $!");
    assert_eq!(
        out.trim(),
        "2",
        "both recipes should be running remotely before the Ctrl-C"
    );
    assert_ne!(code, 0, "make should fail when interrupted");
    let jobs = wisp(&s, "jobs --all");
    assert!(jobs.contains("ws2") && jobs.contains("ws3"), "{jobs}");
    let left = |h: &str| s.ok(h, "pgrep -fc '^sleep 41$' || true").trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (a, b) = (left("ws2"), left("ws3"));
        if a == "0" && b == "0" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "remote jobs still running after Ctrl-C: ws2 {a}, ws3 {b}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(t0.elapsed() < Duration::from_secs(30));
}
