//! End-to-end: Sprite-style consistency of cached data and metadata between hosts.

use rand::Rng;
use wisp_tests::sim;

/// Host A writes and closes, host B opens and reads at once: new bytes every time.
#[test]
fn sequential_write_sharing_1000_rounds() {
    let s = sim("seq", 2);
    s.ok("ws1", "head -c 200000 /dev/urandom > /wisp/shared");
    s.ok("ws2", "sha256sum /wisp/shared"); // ws2 now has the file cached
    let mut rng = rand::thread_rng();
    for round in 0..1000 {
        let off: u64 = rng.gen_range(0..300_000);
        let len: u64 = rng.gen_range(1..20_000);
        let (writer, reader) = if round % 2 == 0 {
            ("ws1", "ws2")
        } else {
            ("ws2", "ws1")
        };
        let want = s.ok(writer, &format!("head -c {len} /dev/urandom | dd of=/wisp/shared bs={len} seek={off} oflag=seek_bytes conv=notrunc iflag=fullblock status=none && sha256sum < /wisp/shared"));
        let got = s.ok(reader, "sha256sum < /wisp/shared");
        assert_eq!(
            got, want,
            "round {round}: {reader} read stale data after {writer} wrote {len} bytes at {off}"
        );
    }
}

/// A and B hold the file open; A writes, B reads through its already-open descriptor and
/// sees the write at once. Both append to one log with O_APPEND: no record lost or torn.
#[test]
fn concurrent_write_sharing_and_append() {
    let s = sim("conc", 2);
    s.ok(
        "ws1",
        "printf 'old-old-old\\n' > /wisp/f; mkdir -p /tmp/wisp-conc",
    );
    // ws2 opens the file, reads it (caching it), waits for ws1 to write, then reads again
    // through the same descriptor.
    let reader = std::thread::spawn({
        let c = s.c.clone();
        move || {
            c.sh_ok(
                "ws2",
                r#"perl -e 'open(F, "<", "/wisp/f") or die; my $a = <F>; print "first:$a"; open(R, ">", "/wisp/ready"); close R;
                   for (1..400) { last if -e "/wisp/written"; select(undef, undef, undef, 0.025) }
                   -e "/wisp/written" or die "writer never finished";
                   seek(F, 0, 0); my $b = <F>; print "second:$b";'"#,
            )
            .unwrap()
        }
    });
    s.ok("ws1", "for i in $(seq 1 400); do [ -e /wisp/ready ] && break; sleep 0.025; done; [ -e /wisp/ready ]");
    s.ok("ws1", "perl -e 'open(F, \"+<\", \"/wisp/f\") or die; print F \"new-new-new\\n\"; close F' && touch /wisp/written");
    let out = reader.join().unwrap();
    assert_eq!(
        out, "first:old-old-old\nsecond:new-new-new\n",
        "the open descriptor on ws2 did not see ws1's write"
    );

    // Concurrent O_APPEND from both hosts.
    let script = |host: &str| {
        format!(
            r#"perl -e 'use Fcntl; sysopen(F, "/wisp/log", O_WRONLY|O_APPEND|O_CREAT) or die "$!"; for my $i (1..2000) {{ my $r = sprintf("%s-%05d-%s\n", "{host}", $i, "x" x 80); syswrite(F, $r) == length($r) or die "short write"; }}'"#
        )
    };
    let a = {
        let c = s.c.clone();
        let sc = script("ws1");
        std::thread::spawn(move || c.sh_ok("ws1", &sc).unwrap())
    };
    s.ok("ws2", &script("ws2"));
    a.join().unwrap();
    let log = s.ok("ws1", "cat /wisp/log");
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 4000, "records lost or torn");
    for host in ["ws1", "ws2"] {
        let mine: Vec<&str> = lines
            .iter()
            .copied()
            .filter(|l| l.starts_with(host))
            .collect();
        assert_eq!(mine.len(), 2000, "{host} records missing");
        for (i, l) in mine.iter().enumerate() {
            assert_eq!(
                *l,
                format!("{host}-{:05}-{}", i + 1, "x".repeat(80)),
                "torn or reordered record"
            );
        }
    }
}

/// A creates, renames, unlinks; B's stat and ls reflect each step at once.
#[test]
fn metadata_changes_are_seen_at_once() {
    let s = sim("meta", 2);
    s.ok("ws1", "mkdir /wisp/m");
    s.ok("ws2", "ls /wisp/m; stat /wisp/m >/dev/null"); // B caches the directory
    for i in 0..50 {
        s.ok("ws1", &format!("echo {i} > /wisp/m/f{i}"));
        assert_eq!(
            s.ok("ws2", &format!("cat /wisp/m/f{i}; ls /wisp/m | wc -l")),
            format!("{i}\n1\n")
        );
        s.ok("ws1", &format!("mv /wisp/m/f{i} /wisp/m/g{i}"));
        assert_eq!(
            s.ok(
                "ws2",
                &format!("ls /wisp/m; test ! -e /wisp/m/f{i} && echo nof")
            ),
            format!("g{i}\nnof\n")
        );
        s.ok("ws1", &format!("chmod 640 /wisp/m/g{i}"));
        assert_eq!(s.ok("ws2", &format!("stat -c %a /wisp/m/g{i}")), "640\n");
        s.ok("ws1", &format!("echo more >> /wisp/m/g{i}"));
        assert_eq!(
            s.ok("ws2", &format!("stat -c %s /wisp/m/g{i}")),
            format!("{}\n", format!("{i}\n").len() + 5)
        );
        s.ok("ws1", &format!("rm /wisp/m/g{i}"));
        assert_eq!(
            s.ok(
                "ws2",
                &format!("ls -A /wisp/m | wc -l; test ! -e /wisp/m/g{i} && echo gone")
            ),
            "0\ngone\n"
        );
    }
}

/// Re-reading a cached 1 GiB file costs no data traffic to the server.
#[test]
fn cached_reread_costs_no_server_traffic() {
    let s = sim("cache", 2);
    s.ok(
        "ws1",
        "dd if=/dev/urandom of=/wisp/big bs=1M count=1024 status=none",
    );
    let first = s.ok("ws2", "sha256sum < /wisp/big");
    // ws1's delayed writes were written back before ws2 could look: same bytes.
    assert_eq!(first, s.ok("ws1", "sha256sum < /wisp/big"));
    let before = s.server_stats();
    let second = s.ok("ws2", "sha256sum < /wisp/big");
    let after = s.server_stats();
    assert_eq!(first, second);
    // The kernel may reclaim some clean pages between the two reads (this machine runs a
    // proactive reclaimer, kdamond, and other tests run in parallel); anything beyond 5 %
    // would mean the cache was not kept across opens (an uncached read fetches 100 %).
    let refetched = after.bytes_read - before.bytes_read;
    assert!(
        refetched < (1 << 30) / 20,
        "a cached re-read fetched {refetched} bytes from the server"
    );
    // Open, close and the status probe's own calls, plus at most one read per page the
    // kernel dropped (scattered single pages come back one read each); an uncached read
    // of 1 GiB takes over 4,000 reads of 256 KiB.
    let requests = after.requests - before.requests;
    assert!(
        requests <= 64 + refetched / 4096,
        "a cached re-read made {requests} requests for {refetched} bytes re-fetched"
    );
}

/// The server is killed and restarted in the middle of sharing: it forgot which clients
/// cache what, so each client drops its cached copies when it reconnects, and a write made
/// after the restart is still seen by the other host at once (no stale cached page).
#[test]
fn sharing_stays_consistent_across_a_server_restart() {
    let mut s = sim("restart", 2);
    // fsync'd: a metadata change nobody fsynced may be lost in a crash (POSIX), this one not.
    s.ok(
        "ws1",
        "printf 'before-restart\\n' | dd of=/wisp/r conv=fsync status=none",
    );
    // Both hosts read it, so both kernels cache its pages and attributes.
    assert_eq!(s.ok("ws2", "cat /wisp/r"), "before-restart\n");
    assert_eq!(s.ok("ws1", "cat /wisp/r"), "before-restart\n");
    // An open descriptor on ws2 must survive too.
    let holder = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh_ok("ws2", "exec 3</wisp/r; touch /tmp/wisp-restart-held; sleep 4; cat <&3 >/dev/null; echo held").unwrap()
        })
    };
    while !std::path::Path::new("/tmp/wisp-restart-held").exists() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = std::fs::remove_file("/tmp/wisp-restart-held");
    s.kill_daemon("srv1", libc::SIGKILL).unwrap();
    s.start_daemon("srv1").unwrap();
    // ws1 writes new contents of a different length after the restart.
    s.ok("ws1", "printf 'after-the-restart\\n' > /wisp/r");
    for _ in 0..3 {
        assert_eq!(
            s.ok("ws2", "cat /wisp/r"),
            "after-the-restart\n",
            "ws2 read a stale cached copy after the server restarted"
        );
    }
    assert_eq!(holder.join().unwrap(), "held\n");
    let log = std::fs::read_to_string(s.log_path("ws2")).unwrap();
    assert!(
        log.contains("reconnected: open files registered again"),
        "{log}"
    );
}
