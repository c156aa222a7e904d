//! End-to-end: real programs migrated mid-run, back and forth between hosts, give the
//! same output as unmigrated runs (issue procmig's acceptance): single processes, and
//! process trees (shell pipelines, a shell waiting for its command).

use std::time::{Duration, Instant};

use wisp_tests::{sim, Sim};

fn wisp(s: &Sim, args: &str) -> Result<String, String> {
    match s.wisp_status(args) {
        (true, out, _) => Ok(out),
        (false, _, err) => Err(err),
    }
}

const PYTHON: &str = r#"import hashlib, time
d = bytearray(200 << 20)
for i in range(40):
    for j in range(0, len(d), 1 << 20):
        d[j] = (d[j] + i + j // 4096) % 256
    time.sleep(0.1)
print(hashlib.sha256(d).hexdigest())
"#;

/// Wait until the registry lists `n` jobs; returns their ids.
fn wait_for_jobs(s: &Sim, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = wisp(s, "jobs").unwrap();
        let v: Vec<String> = out
            .lines()
            .skip(1)
            .filter(|l| l.split_whitespace().count() >= 4)
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
        if v.len() == n {
            return v;
        }
        assert!(Instant::now() < deadline, "jobs did not start: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rounds of moving every job still running to the other of ws2/ws3, one round per
/// entry of `modes` (extra `wisp migrate` flags); returns how often each job moved.
fn move_back_and_forth(
    s: &Sim,
    jobs: &[String],
    modes: &[&str],
) -> std::collections::HashMap<String, usize> {
    let mut moves = std::collections::HashMap::new();
    for (round, mode) in modes.iter().enumerate() {
        for job in jobs {
            let now = wisp(s, "jobs").unwrap();
            let Some(host) = now
                .lines()
                .find(|l| l.starts_with(&format!("{job} ")))
                .and_then(|l| l.split_whitespace().nth(3))
            else {
                continue; // already finished
            };
            let to = if host == "ws2" { "ws3" } else { "ws2" };
            let t = Instant::now();
            match wisp(s, &format!("migrate {job} --to {to} {mode}")) {
                Ok(m) => {
                    eprintln!("round {round} {mode}: {} ({:?})", m.trim(), t.elapsed());
                    *moves.entry(job.clone()).or_insert(0) += 1;
                }
                Err(e) if e.contains("no longer running") || e.contains("no job") => {}
                Err(e) => panic!("round {round}: migrating job {job} to {to}: {e}"),
            }
        }
    }
    moves
}

/// The stdout of a finished rexec, which must have succeeded.
fn output_of(h: std::thread::JoinHandle<std::process::Output>) -> String {
    let o = h.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn real_programs_migrate_back_and_forth() {
    for tool in ["bc", "python3", "sha256sum"] {
        assert!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .status()
                .unwrap()
                .success(),
            "{tool} is not installed; run scripts/deps.sh"
        );
    }
    let s = sim("progs", 3);
    s.lend(&["ws2", "ws3"]);
    s.ok(
        "ws1",
        "mkdir -p /wisp/p && head -c 2147483648 /dev/zero > /wisp/p/big",
    );
    std::fs::write("/tmp/wisp-prog.py", PYTHON).unwrap();
    // Unmigrated reference outputs, computed on ws1 itself.
    let want_sha = s.ok(
        "ws1",
        "head -c 2147483648 /dev/zero | sha256sum | cut -d' ' -f1",
    );
    let want_bc = s.ok("ws1", "echo 'scale=2500; 4*a(1)' | BC_LINE_LENGTH=0 bc -l");
    let want_py = s.ok("ws1", "python3 /tmp/wisp-prog.py");

    let start = |script: &'static str| {
        let c = s.c.clone();
        std::thread::spawn(move || c.sh("ws1", script).unwrap())
    };
    let sha = start("cd /wisp/p && rexec --host ws2 sha256sum /wisp/p/big | cut -d' ' -f1");
    let bc =
        start("cd /wisp/p && echo 'scale=2500; 4*a(1)' | BC_LINE_LENGTH=0 rexec --host ws3 bc -l");
    let py = start("cd /wisp/p && rexec --host ws2 python3 /tmp/wisp-prog.py");
    let jobs = wait_for_jobs(&s, 3);
    // Let each job get past its start-up (the sandbox's exec chain).
    std::thread::sleep(Duration::from_millis(700));
    // Move every job to the other host and back while it runs.
    let moved: usize = move_back_and_forth(&s, &jobs, &["", ""]).values().sum();
    assert!(
        moved >= 4,
        "only {moved} migrations happened mid-run; the programs finished too soon"
    );
    assert_eq!(
        output_of(sha),
        want_sha,
        "sha256sum of a 2 GiB /wisp file changed by migration"
    );
    assert_eq!(
        output_of(bc),
        want_bc,
        "bc's digits of pi changed by migration"
    );
    assert_eq!(
        output_of(py),
        want_py,
        "python's 200 MiB state changed by migration"
    );
    let _ = std::fs::remove_file("/tmp/wisp-prog.py");
}

/// Jobs of several processes — `sh -c 'gzip | sha256sum'` and a shell running `sort` of a
/// large file into /wisp — moved between ws2 and ws3 while they run (eagerly, lazily,
/// with pre-copy) give byte-identical output to unmigrated runs.
#[test]
fn process_trees_migrate_back_and_forth() {
    let s = sim("ptrees", 3);
    s.lend(&["ws2", "ws3"]);
    s.ok(
        "ws1",
        "mkdir -p /wisp/t && seq 1 30000000 > /wisp/t/nums && awk 'BEGIN{for(i=0;i<6000000;i++) printf \"%08x %d\\n\", (i*2654435761)%4294967296, i}' > /wisp/t/lines",
    );
    // Unmigrated reference outputs, computed on ws1 itself.
    let t = Instant::now();
    let want_gz = s.ok("ws1", "gzip -9 -c < /wisp/t/nums | sha256sum");
    let gz_alone = t.elapsed();
    let t = Instant::now();
    let want_sort = s.ok(
        "ws1",
        "sort -S 1G --parallel=1 /wisp/t/lines > /wisp/t/want && sha256sum < /wisp/t/want",
    );
    eprintln!(
        "unmigrated: gzip pipeline {gz_alone:?}, sort {:?}",
        t.elapsed()
    );

    let start = |script: &'static str| {
        let c = s.c.clone();
        std::thread::spawn(move || c.sh("ws1", script).unwrap())
    };
    let gz = start(
        "cd /wisp/t && rexec --host ws2 sh -c 'gzip -9 -c < /wisp/t/nums | sha256sum; echo \"pids $$ $PPID\"'",
    );
    let sort = start(
        "cd /wisp/t && rexec --host ws3 sh -c 'sort -S 1G --parallel=1 /wisp/t/lines > /wisp/t/sorted; echo \"sorted $?\"'",
    );
    let jobs = wait_for_jobs(&s, 2);
    // Let the shells start their pipelines.
    std::thread::sleep(Duration::from_millis(1500));
    // Eager, then lazy (a tree's processes forking during the paging get pagers of their
    // own), then pre-copy (which freezes a tree whole).
    let moves = move_back_and_forth(&s, &jobs, &["", "--lazy", "--precopy"]);
    assert_eq!(
        output_of(gz),
        format!("{want_gz}pids 2 1\n"),
        "the gzip | sha256sum pipeline's output changed by migration"
    );
    assert_eq!(output_of(sort), "sorted 0\n");
    assert_eq!(
        s.ok("ws1", "sha256sum < /wisp/t/sorted"),
        want_sort,
        "sort's output in /wisp changed by migration"
    );
    assert!(
        jobs.iter().all(|j| moves.get(j).copied().unwrap_or(0) >= 2),
        "each job should have moved there and back mid-run: {moves:?}"
    );
}

const BIG: &str = r#"import hashlib, sys, time
n = int(sys.argv[1]) << 20
d = bytearray(n)
for j in range(0, n, 4096):
    d[j] = (j // 4096) % 251
print("ready", flush=True)
for i in range(80):
    for j in range(0, n, 1 << 22):
        d[j + 1] = (d[j + 1] + i) % 256
    time.sleep(0.1)
print(hashlib.sha256(d).hexdigest(), flush=True)
"#;

/// A job with 2 GiB of dirty memory migrated lazily runs on the target at once (demand
/// paging from the swap file in /wisp), finishes with the same result, and the swap file
/// is gone afterwards; pre-copy does the same for 512 MiB with a shorter freeze.
#[test]
fn big_jobs_migrate_lazily_and_with_precopy() {
    let s = sim("lazy", 3);
    s.lend(&["ws2", "ws3"]);
    std::fs::write("/tmp/wisp-big.py", BIG).unwrap();
    s.ok("ws1", "mkdir -p /wisp/big");
    for (mib, mode) in [(2048u64, "--lazy"), (512, "--precopy")] {
        let want = s.ok("ws1", &format!("python3 /tmp/wisp-big.py {mib}"));
        let c = s.c.clone();
        let runner = std::thread::spawn(move || {
            c.sh(
                "ws1",
                &format!("cd /wisp/big && rexec --host ws2 python3 /tmp/wisp-big.py {mib}"),
            )
            .unwrap()
        });
        // Wait for the job and for it to have filled its memory.
        let deadline = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let out = wisp(&s, "jobs").unwrap();
            if let Some(l) = out.lines().nth(1) {
                break l.split_whitespace().next().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "job did not start");
            std::thread::sleep(Duration::from_millis(100));
        };
        std::thread::sleep(Duration::from_secs(if mib > 1024 { 4 } else { 2 }));
        let t = Instant::now();
        let m = wisp(&s, &format!("migrate {job} --to ws3 {mode}"))
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        let took = t.elapsed();
        eprintln!("{mib} MiB {mode}: {} ({took:?})", m.trim());
        assert!(m.contains("-> ws3"), "{m}");
        let o = runner.join().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            want,
            "{mib} MiB job's memory changed by a {mode} migration"
        );
        // The pager removes the swap directory once every page is in.
        let deadline = Instant::now() + Duration::from_secs(60);
        while s.ok("ws1", "ls -A /wisp/.swap 2>/dev/null | wc -l").trim() != "0" {
            assert!(
                Instant::now() < deadline,
                "swap files left behind after a {mode} migration"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        // The target's pager did the paging: its metrics say so.
        let m = s.ok("ws3", "bash -c 'exec 3<>/dev/tcp/127.0.0.1/9464; printf \"GET /metrics HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3' | grep -E '^wisp_agent_(pager_faults|pages_pushed)_total'");
        let paged: f64 = m
            .lines()
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            .sum();
        assert!(
            paged > 0.0,
            "no page went through the lazy pager on ws3: {m}"
        );
    }
    let _ = std::fs::remove_file("/tmp/wisp-big.py");
}
