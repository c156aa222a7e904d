//! End-to-end: pseudo-devices and cluster-pipe streams on the simulated cluster.
//!
//! - the example counter device (`wisp pdev counter`), served from ws1, read from every
//!   workstation, each caller named by host and uid;
//! - a device server written in Python (the documented local protocol, standard library
//!   only), used from another host: O_NONBLOCK gets EAGAIN; poll, select and epoll wake
//!   when another process writes; a blocking read blocks until then; an ioctl carries the
//!   caller's identity;
//! - 20 readers blocked on it on one host do not wedge that host's mount (more than its 16
//!   FUSE workers);
//! - when the device server dies, the blocked readers wake with ENXIO, and a new open fails
//!   with ENXIO at once;
//! - the same poll/select/epoll/O_NONBLOCK cases on a cluster pipe between two hosts;
//! - 1 GiB through a cluster pipe from ws1 to ws2, checksums equal, daemons' memory bounded.

use std::time::{Duration, Instant};
use wisp_tests::sim;

const QUEUE: &str = include_str!("data/pdev_queue.py");
const CLIENT: &str = include_str!("data/stream_client.py");

/// Poll `f` until it returns Some, at most `secs` seconds.
fn until<T>(secs: u64, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn write_tmp(tag: &str, name: &str, body: &str) -> String {
    let p = format!("/tmp/wisp-{tag}-{name}");
    std::fs::write(&p, body).unwrap();
    p
}

/// Start `cmd` in the background on `host`; returns its pid.
fn background(s: &wisp_tests::Sim, host: &str, cmd: &str, log: &str) -> i32 {
    let out = s.ok(
        host,
        &format!("setsid nohup {cmd} >{log} 2>&1 </dev/null & echo $!"),
    );
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("no pid: {out:?}"))
}

fn assert_stream_cases(out: &str) {
    for want in [
        "nonblock_read: EAGAIN",
        "poll_empty: True",
        "poll_wakes: True b'poll'",
        "select_wakes: True b'select'",
        "epoll_wakes: True b'epoll'",
        "writable: True",
        "blocking_read: b'block'",
    ] {
        assert!(out.contains(want), "missing {want:?} in:\n{out}");
    }
}

#[test]
fn pseudo_devices_serve_every_host_and_fail_cleanly_when_their_server_dies() {
    let s = sim("pdev", 2);
    let tag = s.name.clone();
    let queue = write_tmp(&tag, "queue.py", QUEUE);
    let client = write_tmp(&tag, "client.py", CLIENT);
    let wisp = format!("{}/wisp", s.bin_dir.display());

    // The counter, served from ws1, read from both workstations.
    let counter_log = format!("/tmp/wisp-{tag}-counter.log");
    let counter = background(
        &s,
        "ws1",
        &format!("{wisp} pdev counter /wisp/counter"),
        &counter_log,
    );
    let mut seen = Vec::new();
    for host in ["ws1", "ws2", "ws2", "ws1"] {
        let line = until(60, "the counter to answer", || {
            let (code, out, _) = s.run(host, "timeout 20 cat /wisp/counter");
            (code == 0 && !out.is_empty()).then_some(out)
        });
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 3, "counter line {line:?}");
        assert_eq!(f[1], host, "the device names the caller's host: {line:?}");
        assert_eq!(f[2], "0", "and its uid: {line:?}");
        seen.push(f[0].parse::<u64>().unwrap());
    }
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(sorted.len(), 4, "each open got its own number: {seen:?}");
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");

    // The Python queue device, served from ws1, used from ws2.
    let qlog = format!("/tmp/wisp-{tag}-queue.log");
    let qpid = background(&s, "ws1", &format!("python3 {queue} /wisp/queue"), &qlog);
    until(60, "the python device to attach", || {
        std::fs::read_to_string(&qlog)
            .ok()
            .filter(|l| l.contains("attached"))
    });
    let out = s.ok(
        "ws2",
        &format!("timeout 120 python3 {client} /wisp/queue ioctl"),
    );
    assert_stream_cases(&out);
    let ioctl = out
        .lines()
        .find(|l| l.starts_with("ioctl:"))
        .unwrap_or_else(|| panic!("no ioctl line:\n{out}"));
    let f: Vec<&str> = ioctl.split_whitespace().collect();
    assert_eq!(f[1], "42", "the device's ioctl result: {ioctl}");
    assert_eq!(f[2], "ws2", "caller host: {ioctl}");
    assert_eq!(f[3], f[6], "caller pid: {ioctl}");
    assert_eq!(&f[4..6], ["0", "0"], "caller uid and gid: {ioctl}");

    // 20 blocked readers on ws2 (more than its 16 FUSE workers): the mount still answers.
    let rlog = format!("/tmp/wisp-{tag}-readers");
    std::fs::create_dir_all(&rlog).unwrap();
    let readers: Vec<i32> = (0..20)
        .map(|i| {
            background(
                &s,
                "ws2",
                &format!(
                    "python3 -c \"import os,sys\ntry:\n  print('read', os.read(os.open('/wisp/queue', os.O_RDONLY), 10))\nexcept OSError as e:\n  print('errno', e.errno)\""
                ),
                &format!("{rlog}/{i}"),
            )
        })
        .collect();
    until(60, "20 readers blocked in read", || {
        readers
            .iter()
            .all(|p| {
                // Blocked in read(2) (syscall 0 on x86-64).
                std::fs::read_to_string(format!("/proc/{p}/syscall"))
                    .is_ok_and(|w| w.starts_with("0 "))
            })
            .then_some(())
    });
    let t = Instant::now();
    let out = s.ok(
        "ws2",
        "timeout 30 ls /wisp >/dev/null && timeout 30 cat /wisp/counter && echo ok > /wisp/after-readers && cat /wisp/after-readers",
    );
    assert!(out.contains("ok"), "{out}");
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "the mount answered slowly with blocked readers: {:?}",
        t.elapsed()
    );

    // The device server dies: blocked readers wake with ENXIO, new opens fail at once.
    s.ok("ws1", &format!("kill -9 {qpid}"));
    until(60, "every blocked reader to wake with ENXIO", || {
        (0..20)
            .all(|i| {
                std::fs::read_to_string(format!("{rlog}/{i}"))
                    .is_ok_and(|o| o.contains(&format!("errno {}", libc::ENXIO)))
            })
            .then_some(())
    });
    let t = Instant::now();
    let (code, _, err) = s.run("ws2", "timeout 30 cat /wisp/queue");
    assert_ne!(code, 0);
    assert!(
        err.contains("No such device or address"),
        "a dead device's open names ENXIO: {err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    s.ok("ws1", &format!("kill {counter}; true"));
    let _ = std::fs::remove_dir_all(&rlog);
    for f in [queue, client, counter_log, qlog] {
        let _ = std::fs::remove_file(f);
    }
    eprintln!("pseudo-device cases passed; tearing the cluster down");
}

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[test]
fn cluster_pipes_poll_and_carry_a_gibibyte_between_hosts_in_bounded_memory() {
    let s = sim("pipestream", 2);
    let tag = s.name.clone();
    let client = write_tmp(&tag, "client.py", CLIENT);
    s.ok(
        "ws1",
        &format!(
            "{}/wisp mkpipe /wisp/p && {}/wisp mkpipe /wisp/big",
            s.bin_dir.display(),
            s.bin_dir.display()
        ),
    );
    let out = s.ok("ws2", &format!("timeout 120 python3 {client} /wisp/p"));
    assert_stream_cases(&out);

    // 1 GiB ws1 -> ws2; the daemons' resident memory is sampled meanwhile.
    let daemons: Vec<(String, u32)> = s
        .hosts
        .iter()
        .filter_map(|h| Some((h.name.clone(), h.daemon?)))
        .collect();
    let before: Vec<u64> = daemons.iter().map(|(_, p)| rss_kb(*p)).collect();
    let sink = format!("/tmp/wisp-{tag}-sink");
    let reader = background(&s, "ws2", "sh -c 'sha256sum < /wisp/big'", &sink);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        let pids: Vec<u32> = daemons.iter().map(|(_, p)| *p).collect();
        std::thread::spawn(move || {
            let mut peak = vec![0u64; pids.len()];
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for (i, p) in pids.iter().enumerate() {
                    peak[i] = peak[i].max(rss_kb(*p));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            peak
        })
    };
    let sent = s.ok(
        "ws1",
        "python3 -c \"import hashlib,os,sys\nh=hashlib.sha256()\nfd=os.open('/wisp/big',os.O_WRONLY)\nb=bytearray(1<<20)\nfor i in range(1024):\n  b[0:8]=i.to_bytes(8,'little'); b[-8:]=(i*7919).to_bytes(8,'little')\n  h.update(b); v=memoryview(b)\n  while v: v=v[os.write(fd,v):]\nprint(h.hexdigest())\"",
    );
    let got = until(600, "the reader's checksum", || {
        std::fs::read_to_string(&sink)
            .ok()
            .filter(|o| o.contains(" -") || o.contains("  -"))
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let _ = reader;
    assert_eq!(
        got.split_whitespace().next(),
        sent.split_whitespace().last(),
        "checksums differ: sent {sent} got {got}"
    );
    for (i, (name, _)) in daemons.iter().enumerate() {
        let grew = peak[i].saturating_sub(before[i]);
        eprintln!("{name}: RSS before {} KiB, peak {} KiB", before[i], peak[i]);
        assert!(
            grew < 256 * 1024,
            "{name}'s daemon grew by {grew} KiB while 1 GiB went through a pipe: not bounded"
        );
    }
    let _ = std::fs::remove_file(&sink);
    let _ = std::fs::remove_file(&client);
    eprintln!("cluster pipe cases passed; tearing the cluster down");
}

/// `producer | consumer` as two rexec jobs (each on an idle host, stdio through cluster
/// pipes), 1 GiB: the producer migrates mid-stream, then the consumer; the consumer's
/// checksum still equals the producer's.
#[test]
fn a_pipeline_keeps_its_bytes_when_producer_then_consumer_migrate() {
    let s = sim("pipemig", 3);
    s.lend(&["ws2", "ws3"]);
    s.ok("ws1", "mkdir -p /wisp/pm");
    const PRODUCER: &str = "import hashlib,os,sys\nh=hashlib.sha256()\nb=bytearray(1<<20)\nfor i in range(1024):\n  b[0:8]=i.to_bytes(8,'little'); b[-8:]=(i*7919).to_bytes(8,'little')\n  h.update(b); v=memoryview(b)\n  while v: v=v[os.write(1,v):]\nsys.stderr.write('sent '+h.hexdigest()+'\\n')";
    let prog = format!("/tmp/wisp-{}-producer.py", s.name);
    std::fs::write(&prog, PRODUCER).unwrap();
    s.ok("ws1", &format!("cp {prog} /wisp/pm/producer.py"));
    let runner = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh(
                "ws1",
                "cd /wisp/pm && rexec python3 /wisp/pm/producer.py | (sleep 3; rexec sha256sum)",
            )
            .unwrap()
        })
    };
    // The consumer starts 3 s after the producer: the first job is the producer.
    let ids = |n: usize| {
        until(90, &format!("{n} job(s) in `wisp jobs`"), || {
            let ps = s.ps();
            (ps.len() >= n).then(|| ps.into_iter().map(|j| j.0).collect::<Vec<_>>())
        })
    };
    let p = ids(1)[0].clone();
    let c = ids(2).into_iter().find(|j| *j != p).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    for job in [&p, &c] {
        let host = s
            .ps()
            .into_iter()
            .find(|j| &j.0 == job)
            .map(|j| j.1)
            .unwrap_or_default();
        let to = if host == "ws2" { "ws3" } else { "ws2" };
        let (ok, m, e) = s.wisp_status(&format!("migrate {job} --to {to}"));
        if !ok || !m.contains(&format!("-> {to}")) {
            let out = runner.join().unwrap();
            panic!(
                "migrate {job} --to {to}: {m}{e}\npipeline: {}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let out = runner.join().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stderr}");
    let sent = stderr
        .lines()
        .find_map(|l| l.strip_prefix("sent "))
        .unwrap_or_else(|| panic!("no producer checksum:\n{stderr}"));
    assert_eq!(
        stdout.split_whitespace().next(),
        Some(sent.trim()),
        "checksum changed across the migrations:\n{stdout}\n{stderr}"
    );
    let _ = std::fs::remove_file(&prog);
    eprintln!("pipeline migration passed; tearing the cluster down");
}
