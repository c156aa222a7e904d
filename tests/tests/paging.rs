//! End-to-end: faults during demand paging (the demand-paging issue). A job migrated
//! lazily is still being paged in from its swap file in /wisp when the file server is
//! killed and restarted: the job stalls on its missing pages, then continues and gives the
//! same result as an unmigrated run; the swap directory is gone afterwards.
//!
//! The job writes its result to a file: its stdio are cluster pipes, whose buffers live on
//! the file server and do not survive its restart (docs/operations.md, "Limitations").

use std::time::{Duration, Instant};

use wisp_tests::sim;

const JOB: &str = r#"import hashlib, sys, time
n = int(sys.argv[1]) << 20
d = bytearray(n)
for j in range(0, n, 4096):
    d[j] = (j // 4096 * 7 + 3) % 251
time.sleep(float(sys.argv[2]))
with open(sys.argv[3] + ".tmp", "w") as f:
    f.write(hashlib.sha256(d).hexdigest() + "\n")
import os
os.rename(sys.argv[3] + ".tmp", sys.argv[3])
"#;

#[test]
fn lazy_paging_survives_a_file_server_restart() {
    let mut s = sim("pagingrestart", 3);
    s.lend(&["ws2", "ws3"]);
    s.ok("ws1", "mkdir -p /wisp/pg");
    std::fs::write("/tmp/wisp-paging-job.py", JOB).unwrap();
    let want = s.ok(
        "ws1",
        "python3 /tmp/wisp-paging-job.py 768 0 /tmp/wisp-paging-want && cat /tmp/wisp-paging-want",
    );
    let c = s.c.clone();
    let runner = std::thread::spawn(move || {
        c.sh(
            "ws1",
            "cd /wisp/pg && rexec --host ws2 python3 /tmp/wisp-paging-job.py 768 7 /wisp/pg/out",
        )
        .unwrap()
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let job = loop {
        if let Some(l) = s.wisp("jobs").lines().nth(1) {
            break l.split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "the job did not start");
        std::thread::sleep(Duration::from_millis(100));
    };
    std::thread::sleep(Duration::from_secs(3)); // memory filled; the job sleeps
                                                // The migration returns once the source has streamed every page into the swap file,
                                                // by which time the target may have paged it all in: the server is killed as soon as
                                                // the job runs on the target, while its pages are still being written and paged in.
    let cmd = format!(
        "{} migrate {job} --to ws3 --lazy --cluster {}",
        s.bin_dir.join("wisp").display(),
        s.name
    );
    let migrate = std::thread::spawn(move || {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&cmd)
            .output()
            .expect("run wisp migrate");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(s.log_path("ws3"))
        .unwrap_or_default()
        .contains("job arrived")
    {
        assert!(Instant::now() < deadline, "the job never arrived on ws3");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !std::fs::read_to_string(s.log_path("ws3"))
            .unwrap_or_default()
            .contains("all pages in"),
        "every page was in before the server could be killed"
    );
    s.kill_daemon("srv1", libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.start_daemon("srv1").unwrap();
    let m = migrate.join().unwrap();
    assert!(m.contains("-> ws3"), "{m}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let got = loop {
        let (code, out, _) = s.run("ws1", "cat /wisp/pg/out");
        if code == 0 {
            break out;
        }
        assert!(
            Instant::now() < deadline,
            "the job never finished after the server restart: {:?}\n--- ws2 (source) log:\n{}\n--- ws3 (target) log:\n{}",
            s.wisp("jobs"),
            log_tail(&s, "ws2"),
            log_tail(&s, "ws3")
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(
        got, want,
        "the job's memory changed across a lazy migration with a server restart"
    );
    let _ = runner.join();
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.ok("ws1", "ls -A /wisp/.swap 2>/dev/null | wc -l").trim() != "0" {
        assert!(
            Instant::now() < deadline,
            "swap files left behind after the lazy migration"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = std::fs::remove_file("/tmp/wisp-paging-job.py");
    let _ = std::fs::remove_file("/tmp/wisp-paging-want");
}

/// The last lines of a host's daemon log, for failure messages.
fn log_tail(s: &wisp_tests::Sim, host: &str) -> String {
    let text = std::fs::read_to_string(s.log_path(host)).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}
