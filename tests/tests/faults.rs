//! End-to-end: the fault matrix of the security and fault-tolerance issue
//! (docs/faults.md). Each case injects one failure on a real simulated cluster and checks
//! that nothing acknowledged (fsynced) was lost and that nothing hung: every wait in these
//! tests is bounded, and so is every command they run (`timeout`), so a hang fails the test
//! with a message instead of stalling it.
//!
//! Partitions here are a workstation's own link going down (`ip link set eth0 down` in its
//! network namespace, then up): its sockets see no route, its peers see silence.

use std::time::{Duration, Instant};

use wisp_tests::{sim, sim_with, Sim};

fn sha(s: &Sim, host: &str, path: &str) -> String {
    s.ok(
        host,
        &format!("timeout 60 sha256sum {path} | cut -d' ' -f1"),
    )
}

/// The last lines of `host`'s daemon log, for failure messages.
fn log_tail(s: &Sim, host: &str) -> String {
    let log = std::fs::read_to_string(s.log_path(host)).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Take `host`'s network link down (or up) inside its namespace.
fn link(s: &Sim, host: &str, up: bool) {
    s.ok(
        host,
        &format!("ip link set eth0 {}", if up { "up" } else { "down" }),
    );
}

/// Poll `f` until it gives a value; panic naming `what` after `limit`.
fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let t0 = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(t0.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Run `script` on `host` on a thread; the handle gives (exit code, stdout, stderr, time).
fn spawn(
    s: &Sim,
    host: &str,
    script: &str,
) -> std::thread::JoinHandle<(i32, String, String, Duration)> {
    let c = s.c.clone();
    let (host, script) = (host.to_string(), script.to_string());
    std::thread::spawn(move || {
        let t0 = Instant::now();
        let o = c.sh(&host, &script).expect("spawn on host");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            t0.elapsed(),
        )
    })
}

/// Join a spawned script, failing if it has not finished within `limit`.
fn join_within(
    h: std::thread::JoinHandle<(i32, String, String, Duration)>,
    limit: Duration,
    what: &str,
) -> (i32, String, String, Duration) {
    let t0 = Instant::now();
    while !h.is_finished() {
        assert!(t0.elapsed() < limit, "{what} hung for more than {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    h.join().expect("script thread")
}

/// A file of `mib` random MiB written on `host` with fsync; returns its sha256.
fn synced_file(s: &Sim, host: &str, path: &str, mib: u32) -> String {
    let src = format!("/tmp/wisp-faults-{}-src", s.name);
    s.ok(
        host,
        &format!(
            "head -c {mib}M /dev/urandom > {src} && timeout 60 dd if={src} of={path} bs=1M conv=fsync status=none"
        ),
    );
    let want = sha(s, host, &src);
    let _ = std::fs::remove_file(&src);
    want
}

/// The file server killed with SIGKILL and restarted while `make -j SHELL=rexec` builds on
/// /wisp: the build ends (success or a clean failure, never a hang), a second make gives a
/// correct program, and every fsynced file is intact.
#[test]
fn server_sigkill_during_a_rexec_build() {
    let mut s = sim("fbuild", 3);
    s.lend(&["ws2", "ws3"]);
    let kept = synced_file(&s, "ws1", "/wisp/kept", 4);
    s.ok("ws1", &wisp_tests::c_project("/wisp/fb", 16, "sleep 1; "));
    s.ok("ws1", "sync /wisp/fb/Makefile /wisp/fb/main.c");
    let build = spawn(
        &s,
        "ws1",
        "cd /wisp/fb && timeout 240 make -j6 SHELL=rexec 2>&1",
    );
    // Some objects built, others in flight: now the server dies.
    wait_for("first objects built", Duration::from_secs(90), || {
        let n: usize = s
            .ok("ws1", "ls /wisp/fb | grep -c '\\.o$' || true")
            .trim()
            .parse()
            .unwrap_or(0);
        (n >= 2).then_some(())
    });
    s.kill_daemon("srv1", libc::SIGKILL).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    s.start_daemon("srv1").unwrap();
    let (code, out, _, took) = join_within(build, Duration::from_secs(300), "the build");
    assert_ne!(
        code, 124,
        "the build hung until timeout(1) killed it:\n{out}"
    );
    eprintln!(
        "build across the server restart: exit {code} after {:.1} s",
        took.as_secs_f64()
    );
    // Whatever the first make left behind, a second one finishes the job correctly.
    // Objects a failed recipe may have left half-written are its to rebuild: make deletes
    // the target of a failed recipe, and a complete one was written back.
    let (code, out, err) = s.run(
        "ws1",
        "cd /wisp/fb && timeout 240 make -j6 SHELL=rexec 2>&1 && ./app",
    );
    assert_eq!(code, 0, "the re-run of make failed:\n{out}{err}");
    assert_eq!(
        out.lines().last(),
        Some("136"),
        "the rebuilt program is wrong:\n{out}"
    );
    assert_eq!(sha(&s, "ws2", "/wisp/kept"), kept, "fsynced data was lost");
}

/// A workstation's link goes down for a few seconds while it writes with fsync: every
/// chunk whose fsync succeeded is intact, the writer gets success or a clear error (never
/// a hang past the call bound), and once the link is back the client reconnects at once
/// (not after the 20 s lease).
#[test]
fn workstation_partitioned_during_a_write() {
    let s = sim("fwrite", 2);
    let log = format!("/tmp/wisp-faults-{}-write.log", s.name);
    let src = format!("/tmp/wisp-faults-{}-wsrc", s.name);
    s.ok("ws1", &format!("head -c 24M /dev/urandom > {src}"));
    let writer = spawn(
        &s,
        "ws1",
        &format!(
            "for i in $(seq 0 23); do \
               timeout 120 dd if={src} of=/wisp/pw bs=1M count=1 skip=$i seek=$i conv=notrunc,fsync status=none \
                 || {{ echo \"fail $i $?\" >> {log}; exit 1; }}; \
               echo \"ok $i\" >> {log}; sleep 0.3; done"
        ),
    );
    wait_for("three chunks written", Duration::from_secs(60), || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|l| l.lines().count() >= 3)
    });
    link(&s, "ws1", false);
    std::thread::sleep(Duration::from_secs(4));
    link(&s, "ws1", true);
    let back = Instant::now();
    // The bound of a remote wait (docs/faults.md): the writer finishes or fails within it.
    let (code, _, err, _) = join_within(writer, Duration::from_secs(150), "the writer");
    let lines = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    eprintln!(
        "writer exit {code} {:.1} s after the link came back:\n{lines}{err}",
        back.elapsed().as_secs_f64()
    );
    // Every acknowledged chunk is on the server, as ws2 sees it.
    for l in lines.lines() {
        if let Some(i) = l.strip_prefix("ok ") {
            let i: u32 = i.trim().parse().unwrap();
            let got = s.ok(
                "ws2",
                &format!("timeout 60 dd if=/wisp/pw bs=1M skip={i} count=1 status=none | sha256sum | cut -d' ' -f1"),
            );
            let want = s.ok(
                "ws2",
                &format!(
                    "dd if={src} bs=1M skip={i} count=1 status=none | sha256sum | cut -d' ' -f1"
                ),
            );
            assert_eq!(got, want, "fsynced chunk {i} lost across the partition");
        }
    }
    assert!(
        code == 0 || lines.contains("fail"),
        "the writer ended with {code} without saying why: {err}"
    );
    let _ = std::fs::remove_file(&src);
    // Reconnection is prompt: a fresh fsynced write from ws1 after the link is back.
    let t0 = Instant::now();
    s.ok(
        "ws1",
        "echo after > /wisp/after && timeout 60 dd if=/wisp/after of=/wisp/after2 conv=fsync status=none",
    );
    let took = t0.elapsed();
    assert_eq!(s.ok("ws2", "timeout 60 cat /wisp/after2"), "after\n");
    assert!(
        took < Duration::from_secs(8),
        "ws1 needed {:.1} s to write after its link came back",
        took.as_secs_f64()
    );
}

/// Ticks every 100 ms after filling MiB of memory; writes each tick to the file it is given
/// (fsynced), so the output survives whatever happens to the job's stdio.
const TICKER: &str = r#"import os, sys, time
d = bytearray(int(sys.argv[1]) << 20)
for j in range(0, len(d), 4096):
    d[j] = (j // 4096 * 7 + 3) % 251
f = open(sys.argv[2], "a")
for i in range(int(sys.argv[3])):
    f.write("%d\n" % i); f.flush(); os.fsync(f.fileno())
    time.sleep(0.1)
import hashlib
f.write("sum %s\n" % hashlib.sha256(d).hexdigest()); f.flush(); os.fsync(f.fileno())
"#;

/// Start the ticker on ws2 from ws1; returns (the rexec thread, the job id).
fn start_ticker(
    s: &Sim,
    tag: &str,
    mib: u32,
    ticks: u32,
) -> (
    std::thread::JoinHandle<(i32, String, String, Duration)>,
    String,
) {
    let prog = format!("/tmp/wisp-faults-{}-{tag}.py", s.name);
    std::fs::write(&prog, TICKER).unwrap();
    s.ok("ws1", "mkdir -p /wisp/ft");
    let runner = spawn(
        s,
        "ws1",
        &format!("cd /wisp/ft && rexec --host ws2 python3 {prog} {mib} /wisp/ft/{tag} {ticks}"),
    );
    let job = wait_for("the job started", Duration::from_secs(60), || {
        s.wisp("jobs")
            .lines()
            .nth(1)
            .map(|l| l.split_whitespace().next().unwrap().to_string())
    });
    wait_for("the job ticking", Duration::from_secs(60), || {
        let (c, out, _) = s.run("ws1", &format!("timeout 30 cat /wisp/ft/{tag}"));
        (c == 0 && out.lines().count() >= 5).then_some(())
    });
    (runner, job)
}

/// The ticks in the job's output: consecutive from 0 (none lost, none repeated), and the
/// memory checksum an unmigrated run gives.
fn check_ticks(s: &Sim, tag: &str, mib: u32, ticks: u32) {
    let out = s.ok("ws1", &format!("timeout 60 cat /wisp/ft/{tag}"));
    let got: Vec<u32> = out.lines().filter_map(|l| l.parse().ok()).collect();
    assert_eq!(
        got,
        (0..ticks).collect::<Vec<_>>(),
        "ticks lost or repeated:\n{out}"
    );
    let prog = format!("/tmp/wisp-faults-{}-{tag}.py", s.name);
    let want = s.ok(
        "ws1",
        &format!("rm -f /tmp/{tag}.want; python3 {prog} {mib} /tmp/{tag}.want 0 && tail -1 /tmp/{tag}.want; rm -f /tmp/{tag}.want"),
    );
    assert_eq!(
        out.lines().last().unwrap_or(""),
        want.trim(),
        "the job's memory changed"
    );
}

/// Processes of the ticker `tag` on the whole machine (every simulated host shares /proc).
fn copies(s: &Sim, tag: &str) -> usize {
    let o = std::process::Command::new("pgrep")
        .args([
            "-f",
            &format!("^[^ ]*python3 /tmp/wisp-faults-{}-{tag}.py", s.name),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).lines().count()
}

/// The source workstation's link goes down while a migration flushes the job's image to
/// the swap file: the migration succeeds or fails, but exactly one copy of the job lives on
/// and its output has no gap.
#[test]
fn workstation_partitioned_during_a_migration_flush() {
    let s = sim("fmigflush", 3);
    s.lend(&["ws2", "ws3"]);
    let (runner, job) = start_ticker(&s, "flush", 300, 250);
    let migrate = {
        let (bin, name, job) = (s.bin_dir.clone(), s.name.clone(), job.clone());
        std::thread::spawn(move || {
            let t0 = Instant::now();
            let o = std::process::Command::new("timeout")
                .arg("200")
                .arg(bin.join("wisp"))
                .args(["migrate", &job, "--to", "ws3", "--cluster", &name])
                .output()
                .unwrap();
            (
                o.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
                t0.elapsed(),
            )
        })
    };
    // The flush of 300 MiB is under way: cut the source off for 4 s.
    std::thread::sleep(Duration::from_millis(800));
    link(&s, "ws2", false);
    std::thread::sleep(Duration::from_secs(4));
    link(&s, "ws2", true);
    let (code, out, err, _) = join_within(migrate, Duration::from_secs(240), "wisp migrate");
    assert_ne!(code, 124, "wisp migrate hung: {out}{err}");
    eprintln!("wisp migrate: exit {code}: {out}{err}");
    // Exactly one copy runs (a frozen copy on the source may linger only until the
    // migration is decided).
    wait_for(
        "exactly one copy of the job",
        Duration::from_secs(60),
        || (copies(&s, "flush") == 1).then_some(()),
    );
    let (code, out, err, _) = join_within(runner, Duration::from_secs(200), "the job");
    assert_eq!(code, 0, "the job failed: {out}{err}");
    assert_eq!(copies(&s, "flush"), 0);
    check_ticks(&s, "flush", 300, 250);
}

/// The target workstation's link goes down while a lazily migrated job pages in from its
/// swap file: the job stalls and then continues with its memory intact (never a zero
/// page), or fails with a clear error.
#[test]
fn workstation_partitioned_during_lazy_paging() {
    let s = sim("flazy", 3);
    s.lend(&["ws2", "ws3"]);
    let (runner, job) = start_ticker(&s, "lazy", 400, 150);
    let (ok, m, err) = s.wisp_status(&format!("migrate {job} --to ws3 --lazy"));
    assert!(
        ok && m.contains("-> ws3"),
        "wisp migrate: {m}{err}\njobs: {}\nws2 log:\n{}",
        s.wisp("jobs"),
        log_tail(&s, "ws2")
    );
    // The job runs on ws3 and faults its pages in from /wisp: cut ws3 off for 4 s.
    link(&s, "ws3", false);
    std::thread::sleep(Duration::from_secs(4));
    link(&s, "ws3", true);
    let (code, out, err, _) = join_within(runner, Duration::from_secs(240), "the job");
    if code != 0 {
        // A failure must say what went wrong, and no copy may be left running.
        assert!(
            !err.trim().is_empty(),
            "the job failed (exit {code}) without a reason: {out}"
        );
        eprintln!("the lazily paged job failed across the partition: {err}");
        assert_eq!(copies(&s, "lazy"), 0);
        return;
    }
    check_ticks(&s, "lazy", 400, 150);
    assert_eq!(copies(&s, "lazy"), 0);
}

/// One of three registry replicas loses its link: writes go on through the other two, and
/// the replica catches up when it is back.
#[test]
fn registry_replica_partitioned() {
    let s = sim_with("freg", 2, |sp| sp.servers = 3);
    s.lend(&["ws2"]);
    // Cut off a replica that is not ws1's file server.
    link(&s, "srv3", false);
    let t0 = Instant::now();
    s.wisp("owner ws1 idle");
    s.lend(&["ws1"]);
    s.wisp("owner ws2 active");
    wait_for(
        "ws2 active in the registry",
        Duration::from_secs(30),
        || {
            let out = s.wisp("hosts");
            out.lines()
                .any(|l| l.starts_with("ws2 ") || l.starts_with("ws2\t"))
                .then_some(())
        },
    );
    eprintln!(
        "registry writes with a replica partitioned: {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    // rexec still leases hosts through the registry.
    let out = s.ok(
        "ws1",
        "cd /wisp && timeout 60 rexec --host ws1 echo through-the-registry",
    );
    assert_eq!(out, "through-the-registry\n");
    link(&s, "srv3", true);
    let out = s.ok("ws2", "cd /wisp && timeout 60 rexec echo after");
    assert_eq!(out, "after\n");
}

/// The server's disk fills up under ordinary file writes: the writer gets ENOSPC, nothing
/// fsynced before is lost, and once space is freed the file system works on, also across
/// a server restart (its metadata store was never wedged).
#[test]
fn server_disk_full() {
    let disk =
        std::path::PathBuf::from(format!("/var/tmp/wisp-faults-full-{}", std::process::id()));
    std::fs::create_dir_all(&disk).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=96m", "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(mounted.success(), "cannot mount a small tmpfs at {disk:?}");
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
    let mut s = sim_with("ffull", 2, move |sp| sp.data_root = Some(d2));
    s.ok("ws1", "mkdir /wisp/d");
    let a = synced_file(&s, "ws1", "/wisp/d/a", 8);
    // Fill the disk with fsynced writes until the server refuses.
    let (code, _, err) = s.run(
        "ws1",
        "timeout 120 dd if=/dev/zero of=/wisp/d/fill bs=1M count=200 conv=fsync status=none",
    );
    assert_ne!(code, 0, "200 MiB fitted on a 96 MiB disk");
    assert_ne!(code, 124, "the filling writer hung");
    assert!(
        err.contains("No space left"),
        "the writer was not told the disk is full: {err}"
    );
    // The metadata store still takes small changes (the reserve), and reads work.
    s.ok(
        "ws2",
        "timeout 60 mkdir /wisp/d/sub && timeout 60 touch /wisp/d/sub/x",
    );
    assert_eq!(
        sha(&s, "ws2", "/wisp/d/a"),
        a,
        "fsynced data lost on a full disk"
    );
    // A second writer on another host is refused too, and does not hang.
    let (code, _, err) = s.run(
        "ws2",
        "head -c 16M /dev/urandom | timeout 120 dd of=/wisp/d/more bs=1M conv=fsync status=none",
    );
    assert!(
        code != 0 && err.contains("No space left"),
        "a write to a full disk: exit {code}: {err}\nsrv1 log:\n{}",
        log_tail(&s, "srv1")
    );
    // Space freed: writes go on.
    s.ok("ws1", "timeout 60 rm -f /wisp/d/fill /wisp/d/more");
    let b = wait_for(
        "a write after space was freed",
        Duration::from_secs(60),
        || {
            let src = format!("/tmp/wisp-faults-{}-b", s.name);
            let (code, _, _) = s.run(
            "ws1",
            &format!("head -c 8M /dev/urandom > {src} && timeout 60 dd if={src} of=/wisp/d/b bs=1M conv=fsync status=none"),
        );
            let sum = sha(&s, "ws1", &src);
            let _ = std::fs::remove_file(&src);
            (code == 0).then_some(sum)
        },
    );
    // And the metadata is consistent across a crash and restart.
    s.kill_daemon("srv1", libc::SIGKILL).unwrap();
    s.start_daemon("srv1").unwrap();
    assert_eq!(sha(&s, "ws2", "/wisp/d/a"), a);
    assert_eq!(sha(&s, "ws2", "/wisp/d/b"), b);
    let names = s.ok("ws2", "timeout 60 ls /wisp/d");
    assert_eq!(names, "a\nb\nsub\n");
    assert_eq!(s.ok("ws2", "timeout 60 ls /wisp/d/sub"), "x\n");
}
