//! End-to-end: every foreign job runs in a cgroup of its own with resource limits (a fork
//! bomb is contained by the pids limit, a memory hog is OOM-killed inside its job only, a
//! migrated job lands in a cgroup on the target).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wisp_tests::{sim_with, Sim};

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// The cgroup directory of `pid` holding its pids limit (v1: the pids hierarchy; v2: its
/// only cgroup).
fn pids_cgroup(pid: i32) -> Option<PathBuf> {
    cgroup_of(pid, "pids")
}

/// The cgroup directory of `pid` for controller `ctl` (v1), or its only cgroup (v2).
fn cgroup_of(pid: i32, ctl: &str) -> Option<PathBuf> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let root = Path::new("/sys/fs/cgroup");
    if !root.join("cgroup.controllers").exists() {
        let l = s.lines().find(|l| {
            l.split(':')
                .nth(1)
                .is_some_and(|c| c.split(',').any(|c| c == ctl))
        })?;
        let p = l.splitn(3, ':').nth(2)?;
        return Some(root.join(ctl).join(p.trim_start_matches('/')));
    }
    let p = s.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(root.join(p.trim_start_matches('/')))
}

fn read(p: &Path, f: &str) -> String {
    std::fs::read_to_string(p.join(f))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// The global id of the job running on `host`, from `wisp ps`.
fn job_on(s: &Sim, host: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(j) = s.ps().into_iter().find(|j| j.1 == host) {
            return j.0;
        }
        assert!(Instant::now() < deadline, "no job appeared on {host}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Kills the bomb whatever happens to the test: by job, then every process of its cgroup.
struct BombGuard<'a> {
    s: &'a Sim,
    job: Option<String>,
    cgroup: Option<PathBuf>,
}

impl Drop for BombGuard<'_> {
    fn drop(&mut self) {
        if let Some(j) = &self.job {
            let _ = self.s.wisp_status(&format!("kill -9 {j}"));
        }
        if let Some(cg) = &self.cgroup {
            for _ in 0..200 {
                let procs = read(cg, "cgroup.procs");
                if procs.is_empty() {
                    break;
                }
                for p in procs.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) on a process of the bomb's cgroup.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// A fork bomb run with rexec is held at the job's pids limit: the host and its agent stay
/// responsive (a shell, a second job), and `wisp kill` clears it all, cgroup included.
#[test]
fn fork_bomb_is_contained_by_the_pids_limit() {
    let s = sim_with("bomb", 2, |sp| {
        sp.wispd_args = args(&["--job-pids-max", "32", "--job-memory-max", "512"])
    });
    s.lend(&["ws2"]);
    s.ok("ws1", "mkdir -p /wisp/lim");
    // First, that jobs do get the limit here (the bomb must never run without it).
    let pre = s.ok(
        "ws1",
        r#"cd /wisp/lim && rexec --host ws2 sh -c 'cat /proc/self/cgroup; d=$(grep -m1 -E ":pids:|^0::" /proc/self/cgroup | cut -d: -f3); if [ -d /sys/fs/cgroup/pids ]; then d=/sys/fs/cgroup/pids$d; else d=/sys/fs/cgroup$d; fi; echo max=$(cat $d/pids.max)'"#,
    );
    assert!(
        pre.contains("/wisp-ws2-") && pre.contains("/job-") && pre.contains("max=32"),
        "job not in a limited cgroup:\n{pre}"
    );

    let mut guard = BombGuard {
        s: &s,
        job: None,
        cgroup: None,
    };
    // Every process forks 4 children, retrying while fork fails, and each child does the
    // same, 6 levels deep: 5461 processes uncontained (bounded as a second safety net),
    // and it keeps pushing at the limit when contained (a shell bomb would collapse, as
    // dash exits when a fork fails).
    let runner = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh(
                "ws1",
                "cd /wisp/lim && rexec --host ws2 perl -e 'my $d = 6; my $k = 0; while ($d > 0 && $k < 4) { my $p = fork; if (!defined $p) { select(undef, undef, undef, 0.02); next } if ($p == 0) { $d--; $k = 0; next } $k++ } sleep 600' 2>/wisp/lim/err",
            )
            .unwrap()
        })
    };
    let job = job_on(&s, "ws2");
    guard.job = Some(job.clone());
    let deadline = Instant::now() + Duration::from_secs(20);
    let cg = loop {
        if let Some(cg) = s.job_processes("ws2").into_iter().find_map(pids_cgroup) {
            break cg;
        }
        assert!(Instant::now() < deadline, "no process of the bomb found");
        std::thread::sleep(Duration::from_millis(50));
    };
    guard.cgroup = Some(cg.clone());
    assert!(cg.to_string_lossy().contains("/job-"), "{}", cg.display());
    assert_eq!(read(&cg, "pids.max"), "32");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if read(&cg, "pids.current") == "32" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pids.current never reached the limit: {}; processes {:?}; stderr {}",
            read(&cg, "pids.current"),
            s.job_processes("ws2")
                .iter()
                .map(|p| std::fs::read_to_string(format!("/proc/{p}/cmdline")).unwrap_or_default())
                .collect::<Vec<_>>(),
            s.ok("ws1", "head -c 2000 /wisp/lim/err")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let n = s.job_processes("ws2").len();
    assert!(n <= 32, "{n} processes of the bomb");

    // The host and its agent still answer.
    let t = Instant::now();
    s.ok("ws2", "true");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "shell took {:?}",
        t.elapsed()
    );
    let t = Instant::now();
    let out = s.ok("ws1", "cd /wisp/lim && rexec --host ws2 echo second-job");
    assert!(out.contains("second-job"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "second job took {:?}",
        t.elapsed()
    );
    assert_eq!(
        read(&cg, "pids.current"),
        "32",
        "the bomb stopped by itself?"
    );

    eprintln!(
        "bomb held at pids.current {} of {} in {}; {n} processes",
        read(&cg, "pids.current"),
        read(&cg, "pids.max"),
        cg.display()
    );
    s.wisp(&format!("kill -9 {job}"));
    let out = runner.join().unwrap();
    assert_eq!(out.status.code(), Some(137), "killed bomb's status");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s.job_processes("ws2").is_empty() || cg.exists() {
        assert!(
            Instant::now() < deadline,
            "left after kill: processes {:?}, cgroup {}",
            s.job_processes("ws2"),
            if cg.exists() { "still there" } else { "gone" }
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(guard);
}

/// A job that allocates past the memory limit is OOM-killed inside its cgroup (rexec
/// reports SIGKILL, exit 137); the agent goes on running jobs.
#[test]
fn memory_hog_is_oom_killed_in_its_job_only() {
    let s = sim_with("oom", 2, |sp| {
        sp.wispd_args = args(&["--job-memory-max", "64", "--job-pids-max", "64"])
    });
    s.lend(&["ws2"]);
    s.ok("ws1", "mkdir -p /wisp/oom");
    let t = Instant::now();
    // tail keeps the whole line, and /dev/zero has no newline: it grows without end.
    let (code, _, err) = s.run("ws1", "cd /wisp/oom && rexec --host ws2 tail /dev/zero");
    assert_eq!(code, 137, "memory hog's status; stderr: {err}");
    assert!(
        t.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t.elapsed()
    );
    let out = s.ok("ws1", "cd /wisp/oom && rexec --host ws2 echo agent-alive");
    assert!(out.contains("agent-alive"), "{out}");
    assert!(s.job_processes("ws2").is_empty());
}

/// A job migrated to another host runs there in a cgroup of the target's agent.
#[test]
fn migrated_job_lands_in_a_cgroup() {
    let s = sim_with("cgmig", 3, |sp| {
        sp.wispd_args = args(&["--job-pids-max", "64", "--job-memory-max", "512"])
    });
    s.lend(&["ws2", "ws3"]);
    s.ok("ws1", "mkdir -p /wisp/cgmig");
    let runner = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh(
                "ws1",
                "cd /wisp/cgmig && rexec --host ws2 perl -e 'for (1..60) { select(undef, undef, undef, 0.1) } exit 5'",
            )
            .unwrap()
        })
    };
    let job = job_on(&s, "ws2");
    std::thread::sleep(Duration::from_millis(500));
    let before: Vec<PathBuf> = s
        .job_processes("ws2")
        .into_iter()
        .filter_map(pids_cgroup)
        .collect();
    assert!(
        !before.is_empty()
            && before
                .iter()
                .all(|p| p.to_string_lossy().contains("/wisp-ws2-")),
        "{before:?}"
    );
    let m = s.wisp(&format!("migrate {job} --to ws3"));
    assert!(m.contains("-> ws3"), "{m}");
    let procs = s.job_processes("ws3");
    assert!(!procs.is_empty(), "no process of the job on ws3");
    for p in &procs {
        let cg = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap_or_default();
        let dir = pids_cgroup(*p).unwrap_or_default();
        assert!(
            dir.to_string_lossy().contains("/wisp-ws3-") && dir.to_string_lossy().contains("/job-"),
            "restored process {p} not in a job cgroup of ws3:\n{cg}"
        );
        assert_eq!(read(&dir, "pids.max"), "64");
        // The memory limit and the low CPU weight too.
        if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            assert_eq!(read(&dir, "memory.max"), (512u64 << 20).to_string());
            assert_eq!(read(&dir, "cpu.weight"), "20");
        } else {
            let mem = cgroup_of(*p, "memory").unwrap_or_default();
            assert_eq!(
                read(&mem, "memory.limit_in_bytes"),
                (512u64 << 20).to_string()
            );
            let cpu = cgroup_of(*p, "cpu").unwrap_or_default();
            assert_eq!(read(&cpu, "cpu.shares"), "204");
        }
    }
    let out = runner.join().unwrap();
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Both cgroups are gone with the job.
    let deadline = Instant::now() + Duration::from_secs(10);
    while before.iter().any(|d| d.exists()) {
        assert!(Instant::now() < deadline, "source cgroup left: {before:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
