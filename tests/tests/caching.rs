//! End-to-end: the client caches of the consistency issue — names and attributes cached by
//! wispd and called back by the server, delayed writes (Sprite's write-back), and leases.

use std::time::{Duration, Instant};

use wisp_tests::{sim, sim_with, Sim};

fn sha(s: &Sim, host: &str, path: &str) -> String {
    s.ok(host, &format!("sha256sum {path} | cut -d' ' -f1"))
}

/// A file written and removed within the write-back delay never reaches the server; one
/// that stays is written back the moment another host looks at it.
#[test]
fn delayed_writes_stay_on_the_client_until_someone_needs_them() {
    let s = sim("wb", 2);
    s.ok("ws1", "mkdir /wisp/t");
    let before = s.server_stats();
    // Short-lived: 8 MiB written, read back, removed.
    s.ok(
        "ws1",
        "head -c 8M /dev/urandom > /wisp/t/tmp && sha256sum /wisp/t/tmp >/dev/null && rm /wisp/t/tmp",
    );
    let mid = s.server_stats();
    assert_eq!(
        mid.bytes_written - before.bytes_written,
        0,
        "a file written and deleted within the delay reached the server"
    );
    assert!(!s.ok("ws1", "ls /wisp/t").contains("tmp"));

    // Kept: written and closed, not fsynced; still only on ws1.
    s.ok("ws1", "head -c 4M /dev/urandom > /wisp/t/keep");
    let want = sha(&s, "ws1", "/wisp/t/keep");
    assert_eq!(s.ok("ws1", "stat -c %s /wisp/t/keep"), "4194304\n");
    let held = s.server_stats();
    assert_eq!(
        held.bytes_written - before.bytes_written,
        0,
        "closing a file wrote it through"
    );
    // Another host sees the size and the bytes at once: the server calls ws1 back first.
    assert_eq!(s.ok("ws2", "stat -c %s /wisp/t/keep"), "4194304\n");
    assert_eq!(sha(&s, "ws2", "/wisp/t/keep"), want);
    let after = s.server_stats();
    assert!(
        after.bytes_written - before.bytes_written >= 4 << 20,
        "only {} bytes reached the server",
        after.bytes_written - before.bytes_written
    );

    // Random overwrites held on ws1, read back there through the overlay after the kernel
    // dropped its pages, then seen by ws2.
    s.ok(
        "ws1",
        "for i in $(seq 1 50); do head -c 3000 /dev/urandom | dd of=/wisp/t/keep bs=1 seek=$((i * 77777)) conv=notrunc status=none; done",
    );
    s.ok("ws1", "echo 3 > /proc/sys/vm/drop_caches");
    let mixed = sha(&s, "ws1", "/wisp/t/keep");
    assert_ne!(mixed, want);
    assert_eq!(sha(&s, "ws2", "/wisp/t/keep"), mixed);
}

/// Old delayed writes go back on their own; fsync returns only when the server has them.
#[test]
fn write_back_after_the_delay_and_on_fsync() {
    let s = sim_with("wbage", 1, |sp| {
        sp.wispd_args = vec!["--writeback-delay".into(), "2".into()]
    });
    let before = s.server_stats();
    s.ok(
        "ws1",
        "head -c 1M /dev/urandom | dd of=/wisp/synced bs=64k conv=fsync status=none",
    );
    let synced = s.server_stats();
    assert!(
        synced.bytes_written - before.bytes_written >= 1 << 20,
        "fsync returned before the data reached the server"
    );
    s.ok("ws1", "head -c 1M /dev/urandom > /wisp/aged");
    let t0 = Instant::now();
    assert_eq!(s.server_stats().bytes_written, synced.bytes_written);
    loop {
        let now = s.server_stats();
        if now.bytes_written - synced.bytes_written >= 1 << 20 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "delayed writes not written back 10 s after a 2 s delay"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client killed with delayed writes loses only what it never fsynced; the other hosts
/// go on, and the killed host comes back.
#[test]
fn a_killed_client_loses_only_unsynced_writes() {
    let mut s = sim("wbkill", 2);
    s.ok(
        "ws1",
        "head -c 2M /dev/urandom > /tmp/a && dd if=/tmp/a of=/wisp/a conv=fsync status=none",
    );
    let want = sha(&s, "ws1", "/tmp/a");
    s.ok("ws1", "head -c 2M /dev/urandom > /wisp/b");
    s.kill_daemon("ws1", libc::SIGKILL).unwrap();
    assert_eq!(sha(&s, "ws2", "/wisp/a"), want, "fsynced data was lost");
    // /wisp/b exists (creates are synchronous) with at most what was written back.
    let size: u64 = s.ok("ws2", "stat -c %s /wisp/b").trim().parse().unwrap();
    assert!(size <= 2 << 20);
    s.ok("ws2", "echo still-working > /wisp/c && cat /wisp/c");
    s.start_daemon("ws1").unwrap();
    assert_eq!(s.ok("ws1", "cat /wisp/c"), "still-working\n");
}

/// Delayed writes survive a server restart: the client writes them back when it
/// reconnects, and a reader on another host waits for that (the recovery window).
#[test]
fn delayed_writes_survive_a_server_restart() {
    let mut s = sim("wbrestart", 2);
    // The create is made durable first: an un-fsynced create may be lost in a server
    // crash (as on any POSIX file system); the delayed data then must not be.
    s.ok("ws1", "dd of=/wisp/r conv=fsync status=none </dev/null");
    s.ok("ws1", "head -c 1M /dev/urandom > /wisp/r");
    let want = sha(&s, "ws1", "/wisp/r");
    s.kill_daemon("srv1", libc::SIGKILL).unwrap();
    s.start_daemon("srv1").unwrap();
    assert_eq!(sha(&s, "ws2", "/wisp/r"), want);
}

/// Names and attributes are answered from wispd's cache, and a create, rename or unlink on
/// one host is seen by the other at once — including names the other had cached as absent.
#[test]
fn cached_names_are_called_back() {
    let s = sim("names", 2);
    s.ok("ws1", "mkdir -p /wisp/d && touch /wisp/d/a");
    for round in 0..100 {
        // ws2 caches "x" as absent and "a" as present.
        assert_eq!(s.run("ws2", "stat /wisp/d/x").0, 1, "round {round}");
        s.ok("ws2", "stat /wisp/d/a >/dev/null");
        s.ok("ws1", "touch /wisp/d/x && mv /wisp/d/a /wisp/d/b");
        assert_eq!(
            s.ok("ws2", "stat -c %n /wisp/d/x; ls /wisp/d | tr '\\n' ' '"),
            "/wisp/d/x\nb x ",
            "round {round}"
        );
        assert_eq!(s.run("ws2", "stat /wisp/d/a").0, 1, "round {round}");
        s.ok(
            "ws1",
            "rm /wisp/d/x && mv /wisp/d/b /wisp/d/a && chmod 0600 /wisp/d/a",
        );
        assert_eq!(
            s.ok("ws2", "stat -c %a /wisp/d/a; ls /wisp/d"),
            "600\na\n",
            "round {round}"
        );
        s.ok("ws1", "chmod 0644 /wisp/d/a");
    }
    // Extended attributes are cached too (the kernel asks for one before every write),
    // and called back the same way.
    let getx = "python3 -c \"import os; print(os.getxattr('/wisp/d/a', 'user.k').decode())\"";
    assert_ne!(s.run("ws2", getx).0, 0);
    s.ok(
        "ws1",
        "python3 -c \"import os; os.setxattr('/wisp/d/a', 'user.k', b'v1')\"",
    );
    assert_eq!(s.ok("ws2", getx), "v1\n");
    s.ok(
        "ws1",
        "python3 -c \"import os; os.setxattr('/wisp/d/a', 'user.k', b'v2')\"",
    );
    assert_eq!(s.ok("ws2", getx), "v2\n");
    // Effectiveness: 40 paths looked up 20 times each cost one round of lookups.
    s.ok(
        "ws1",
        "mkdir -p /wisp/e/f/g && for i in $(seq 1 40); do touch /wisp/e/f/g/n$i; done",
    );
    let stat_all = "for r in $(seq 1 20); do for i in $(seq 1 40); do stat -c %s /wisp/e/f/g/n$i /wisp/e/f/g/missing$i 2>/dev/null; done; done | wc -l";
    s.ok("ws2", "stat /wisp/e/f/g >/dev/null");
    let before = s.server_stats();
    assert_eq!(s.ok("ws2", stat_all), "800\n");
    let after = s.server_stats();
    let used = after.requests - before.requests;
    assert!(
        used <= 200,
        "1,600 stats of 80 names made {used} server requests"
    );
}

/// A build tree read twice on one host: the second pass fetches no data and asks the
/// server only to open and close (Sprite's open-time consistency check).
#[test]
fn a_tree_reread_is_served_locally() {
    let s = sim("tree", 1);
    s.ok(
        "ws1",
        "mkdir -p /wisp/src && for i in $(seq 1 100); do head -c $((i * 300)) /dev/urandom > /wisp/src/f$i.c; done && sync",
    );
    s.ok("ws1", "cat /wisp/src/*.c | sha256sum");
    let before = s.server_stats();
    s.ok("ws1", "cat /wisp/src/*.c | sha256sum");
    let after = s.server_stats();
    assert_eq!(
        after.bytes_read - before.bytes_read,
        0,
        "cached pages were fetched again"
    );
    assert!(
        after.requests - before.requests <= 2 * 100 + 20,
        "re-reading 100 files made {} requests",
        after.requests - before.requests
    );
}

/// A partitioned client loses its opens after its lease: an unlinked file it held open is
/// reclaimed by the server.
#[test]
fn a_partitioned_client_loses_its_opens_after_the_lease() {
    let s = sim("lease", 1);
    s.ok("ws1", "head -c 100000 /dev/urandom > /wisp/held");
    // Objects live in fan-out directories under objects/.
    let objects = |s: &Sim| -> usize {
        std::fs::read_dir(s.data_root.join("srv1").join("objects"))
            .map(|d| {
                d.flatten()
                    .map(|e| std::fs::read_dir(e.path()).map(|d| d.count()).unwrap_or(1))
                    .sum()
            })
            .unwrap_or(0)
    };
    // Held open by a background process on ws1, then unlinked: the object must stay.
    let c = s.c.clone();
    let holder = std::thread::spawn(move || {
        let _ = c.sh(
            "ws1",
            "echo $$ > /tmp/wisp-lease-holder; exec 3</wisp/held; rm /wisp/held; exec sleep 60",
        );
    });
    let t0 = Instant::now();
    while s.run("ws1", "test -e /wisp/held").0 == 0 {
        assert!(t0.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let held = objects(&s);
    assert!(held >= 1, "the open file's object is gone too early");
    s.set_partitioned("ws1", true).unwrap();
    let t0 = Instant::now();
    while objects(&s) >= held {
        assert!(
            t0.elapsed() < Duration::from_secs(45),
            "the server kept a partitioned client's open file for 45 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let waited = t0.elapsed();
    let log = std::fs::read_to_string(s.log_path("srv1")).unwrap();
    assert!(log.contains("lease expired"), "{log}");
    s.set_partitioned("ws1", false).unwrap();
    let pid: i32 = std::fs::read_to_string("/tmp/wisp-lease-holder")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file("/tmp/wisp-lease-holder");
    // SAFETY: kill(2) of the holder process this test started (a positive pid).
    unsafe { libc::kill(pid.max(2), libc::SIGKILL) };
    let _ = holder.join();
    eprintln!(
        "opens dropped {:.1} s after the partition",
        waited.as_secs_f64()
    );
}
