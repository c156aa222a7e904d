//! End-to-end failure injection for migration (the procmig issue): the target's agent
//! killed mid-migration, and the swap file's disk full. Either way the job is still
//! running on the source afterwards, `wisp migrate` fails with a clear error, and the job's
//! output goes on without a gap.

use std::time::{Duration, Instant};

use wisp_tests::{sim_with, Sim};

/// Ticks every 100 ms after filling MiB of memory; prints the tick count.
const TICKER: &str = r#"import sys, time
d = bytearray(int(sys.argv[1]) << 20)
for j in range(0, len(d), 4096):
    d[j] = 1
i = 0
while True:
    print(i, flush=True)
    i += 1
    time.sleep(0.1)
"#;

/// Start the ticker on ws2 from ws1; returns (the rexec thread, the job id).
fn start_ticker(
    s: &Sim,
    mib: u32,
    tag: &str,
) -> (std::thread::JoinHandle<std::process::Output>, String) {
    std::fs::write(format!("/tmp/wisp-migfail-{tag}.py"), TICKER).unwrap();
    s.ok("ws1", "mkdir -p /wisp/mf");
    let c = s.c.clone();
    let script =
        format!("cd /wisp/mf && rexec --host ws2 python3 /tmp/wisp-migfail-{tag}.py {mib}");
    let runner = std::thread::spawn(move || c.sh("ws1", &script).unwrap());
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        if let Some(l) = s.wisp("jobs").lines().nth(1) {
            break l.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the job did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(2)); // memory filled, ticking
    (runner, job)
}

/// The job is on ws2, running (not stopped), and its ticks continue without a gap.
fn still_running_on_source(
    s: &Sim,
    job: &str,
    tag: &str,
    runner: std::thread::JoinHandle<std::process::Output>,
) {
    // Never two copies: one ticker on the whole machine (all hosts share its /proc).
    let copies = std::process::Command::new("pgrep")
        .args(["-fc", &format!("^[^ ]*python3 /tmp/wisp-migfail-{tag}.py")])
        .output()
        .unwrap();
    let listed = std::process::Command::new("sh")
        .args(["-c", "ps -eo pid,ppid,stat,args | grep '[w]isp-migfail-'"])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&copies.stdout).trim(),
        "1",
        "not exactly one copy of the job after a failed migration:\n{}",
        String::from_utf8_lossy(&listed.stdout)
    );
    let ps = s.wisp("jobs");
    let line = ps
        .lines()
        .find(|l| l.starts_with(job))
        .unwrap_or_else(|| panic!("job {job} gone after a failed migration:\n{ps}"));
    assert!(
        line.contains("ws2"),
        "job {job} is not on ws2 any more: {line}"
    );
    std::thread::sleep(Duration::from_secs(2));
    s.wisp(&format!("kill {job}"));
    let out = runner.join().unwrap();
    let ticks: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert!(ticks.len() > 30, "too few ticks: {ticks:?}");
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "ticks lost or repeated across the failed migration: {ticks:?}"
    );
    let _ = std::fs::remove_file(format!("/tmp/wisp-migfail-{tag}.py"));
}

#[test]
fn target_agent_killed_during_the_migration_leaves_the_job_on_the_source() {
    let mut s = sim_with("migkill", 3, |_| {});
    s.lend(&["ws2", "ws3"]);
    let (runner, job) = start_ticker(&s, 300, "kill");
    // Kill ws3's wispd (its agent) while the move is under way.
    let (tx, rx) = std::sync::mpsc::channel();
    let name = s.name.clone();
    let bin = s.bin_dir.clone();
    let j2 = job.clone();
    std::thread::spawn(move || {
        let out = std::process::Command::new(bin.join("wisp"))
            .args(["migrate", &j2, "--to", "ws3", "--cluster", &name])
            .output()
            .unwrap();
        let _ = tx.send(out);
    });
    std::thread::sleep(Duration::from_millis(300));
    s.kill_daemon("ws3", libc::SIGKILL).unwrap();
    let out = rx.recv_timeout(Duration::from_secs(120)).unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the migration to a dead agent succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(!err.trim().is_empty(), "no reason given");
    eprintln!("wisp migrate said: {}", err.trim());
    still_running_on_source(&s, &job, "kill", runner);
}

#[test]
fn a_full_swap_disk_leaves_the_job_on_the_source() {
    // The servers' data on a 160 MiB tmpfs: a 300 MiB job's swap file cannot fit.
    let disk = std::path::PathBuf::from(format!("/tmp/wisp-smalldisk-{}", std::process::id()));
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(
        mounted.success(),
        "cannot mount a small tmpfs at {}",
        disk.display()
    );
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
            let _ = std::fs::remove_dir(&self.0);
        }
    }
    let _unmount = Unmount(disk.clone());
    let d2 = disk.clone();
    let s = sim_with("migfull", 3, move |sp| sp.data_root = Some(d2));
    s.lend(&["ws2", "ws3"]);
    let (runner, job) = start_ticker(&s, 300, "full");
    let out = std::process::Command::new(s.bin_dir.join("wisp"))
        .args(["migrate", &job, "--to", "ws3", "--cluster", &s.name])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the migration fitted on a full disk");
    assert!(
        err.contains("No space left") || err.contains("ENOSPC") || err.contains("space"),
        "the error does not say the disk is full: {err}"
    );
    eprintln!("wisp migrate said: {}", err.trim());
    still_running_on_source(&s, &job, "full", runner);
    // The partial swap directory is removed when the disk lets it (on a full disk the
    // server's metadata commit for the removal can itself fail with ENOSPC): not checked.
    drop(s);
}
