//! rexec's failure modes and placement: a host that dies under a running job, a terminal
//! on stdin, rexec's own exit codes, hosts that refuse jobs, and `wisp make`'s per-build
//! host reservation.

use std::time::{Duration, Instant};

use wisp_tests::{c_project, sim, Sim};

/// Wait until the registry shows a running job; returns (id, host).
fn running_job(s: &Sim) -> (String, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some((id, host, _, _)) = s.ps().into_iter().next() {
            return (id, host);
        }
        assert!(Instant::now() < deadline, "no job appeared in the registry");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The host running a job dies (its wispd SIGKILLed, the job's processes killed): rexec
/// exits 255 naming the host and the reason, and make stops (its next target never runs).
#[test]
fn host_dying_under_a_job_fails_rexec_and_stops_make() {
    let mut s = sim("hostdie", 2);
    s.lend(&["ws2"]);
    s.ok(
        "ws1",
        "mkdir -p /wisp/die && cd /wisp/die && printf 'all: first second\\nfirst:\\n\\techo first-started; touch started; sleep 120\\nsecond:\\n\\ttouch second-ran\\n' > Makefile",
    );
    let make = {
        let c = s.c.clone();
        std::thread::spawn(move || c.sh("ws1", "cd /wisp/die && make SHELL=rexec").unwrap())
    };
    let (_, host) = running_job(&s);
    assert_eq!(host, "ws2");
    // The job really runs there before the host dies.
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.run("ws1", "test -e /wisp/die/started").0 != 0 {
        assert!(Instant::now() < deadline, "the job never started on ws2");
        std::thread::sleep(Duration::from_millis(100));
    }
    let procs = s.job_processes("ws2");
    let t0 = Instant::now();
    s.c.kill_daemon("ws2", libc::SIGKILL).unwrap();
    for p in procs {
        // SAFETY: kill(2) on a process of the cluster this test made.
        unsafe { libc::kill(p, libc::SIGKILL) };
    }
    let out = make.join().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0), "make should fail: {err}");
    assert!(
        err.contains("lost ws2 while job") && err.contains("the host or its wispd is down"),
        "rexec should say the host was lost: {err}"
    );
    assert!(
        err.contains("Error 255"),
        "make should see rexec's 255: {err}"
    );
    assert!(
        t0.elapsed() < Duration::from_secs(90),
        "took {:?}",
        t0.elapsed()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("first-started"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (code, _, _) = s.run("ws1", "test -e /wisp/die/second-ran");
    assert_ne!(code, 0, "make went on to the next target");
}

/// A terminal on rexec's stdin gives the job a terminal on its host: `tty` names a pty,
/// `test -t 0` holds, the size is the local one and follows a resize (SIGWINCH), keys
/// typed reach it; without a terminal, there is none.
#[test]
fn terminal_on_stdin_gets_a_remote_pty() {
    let s = sim("pty", 2);
    s.lend(&["ws2"]);
    s.ok(
        "ws1",
        r#"mkdir -p /wisp/pty && cat > /wisp/pty/t.py <<'PY'
import fcntl, os, pty, select, struct, sys, termios, time
job = r"""trap 'echo WINCH-GOT' WINCH; tty; test -t 0 && echo STDIN-IS-TTY; stty size; echo READY
n=0; while [ "$(stty size)" != "40 120" ] && [ $n -lt 600 ]; do sleep 0.1; n=$((n+1)); done
echo SIZE-NOW $(stty size); read line; echo GOT=$line; exit 3"""
pid, fd = pty.fork()
if pid == 0:
    fcntl.ioctl(0, termios.TIOCSWINSZ, struct.pack("HHHH", 33, 101, 0, 0))
    os.execvp("rexec", ["rexec", "sh", "-c", job])
out = b""
def until(word, secs=90):
    global out
    end = time.time() + secs
    while word not in out:
        if time.time() > end:
            sys.exit("timed out waiting for %r; got %r" % (word, out))
        r, _, _ = select.select([fd], [], [], 0.5)
        if r:
            try:
                b = os.read(fd, 4096)
            except OSError:
                b = b""
            if not b:
                sys.exit("terminal closed before %r; got %r" % (word, out))
            out += b
until(b"READY")
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
until(b"SIZE-NOW")
os.write(fd, b"hello\r")
until(b"GOT=hello")
_, st = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace").replace("\r", ""))
print("EXIT", os.waitstatus_to_exitcode(st))
PY"#,
    );
    let out = s.ok("ws1", "cd /wisp/pty && python3 t.py");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("/dev/pts/")),
        "tty should name a pty:\n{out}"
    );
    for want in [
        "STDIN-IS-TTY",
        "33 101",
        "WINCH-GOT",
        "SIZE-NOW 40 120",
        "GOT=hello",
        "EXIT 3",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in:\n{out}");
    }
    // Without a terminal: none on the remote side either.
    let (code, out, err) = s.run(
        "ws1",
        "cd /wisp/pty && rexec -v sh -c 'tty; test -t 0 && echo TTY || echo NO-TTY' </dev/null",
    );
    assert!(err.contains("running on ws2"), "{err}");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("not a tty") && out.contains("NO-TTY"), "{out}");
}

/// rexec's own failures have their own exit codes and say what was wrong.
#[test]
fn rexec_exit_codes_for_its_own_failures() {
    let s = sim("rxcodes", 2);
    s.lend(&["ws2"]);
    s.ok("ws1", "mkdir -p /wisp/codes");
    let (code, _, err) = s.run("ws1", "cd /wisp/codes && rexec no-such-command-xyz");
    assert_eq!(code, 127, "{err}");
    assert!(
        err.contains("no-such-command-xyz: command not found on ws2"),
        "{err}"
    );
    let (code, _, err) = s.run("ws1", "cd /tmp && rexec true");
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("/tmp is not inside /wisp"), "{err}");
    let (code, _, err) = s.run("ws1", "cd /wisp/codes && rexec --host ws9 true");
    assert_eq!(code, 255, "{err}");
    assert!(err.contains("host ws9 is not in the registry"), "{err}");
    let (code, _, err) = s.run("ws1", "cd /wisp/codes && rexec");
    assert_eq!(code, 2, "{err}");
    // The command's own status passes through, 127 from a shell included.
    let (code, _, _) = s.run("ws1", "cd /wisp/codes && rexec sh -c 'exit 254'");
    assert_eq!(code, 254);
}

/// Restart `host`'s wispd so that its agent refuses every foreign job (--max-foreign 0),
/// and lend it out.
fn refusing_host(s: &mut Sim, host: &str) {
    s.c.kill_daemon(host, libc::SIGTERM).unwrap();
    s.c.wispd_args = vec!["--max-foreign".into(), "0".into()];
    s.c.start_daemon(host).unwrap();
    s.c.wispd_args.clear();
    s.lend(&[host]);
}

/// A host that fails to start a job is skipped: by rexec (it tries another host, here
/// none, so it runs locally), and by `wisp make` for the whole build.
#[test]
fn a_host_that_fails_a_job_start_is_skipped() {
    let mut s = sim("skip", 3);
    refusing_host(&mut s, "ws3");
    let (code, out, err) = s.run(
        "ws1",
        "mkdir -p /wisp/skip && cd /wisp/skip && rexec -v sh -c 'ip -o -4 addr show dev eth0'",
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("ws3 could not start the job") && err.contains("skipping it"),
        "{err}"
    );
    assert!(
        err.contains("running locally") && out.contains("10.99.0.101"),
        "{out}{err}"
    );
    s.lend(&["ws2"]);
    s.ok("ws1", &c_project("/wisp/skip/p", 8, ""));
    let (code, _, err) = s.run("ws1", "cd /wisp/skip/p && wisp make -v -s");
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("ws3 could not start a job") && err.contains("reserved ws2"),
        "{err}"
    );
    assert_eq!(s.ok("ws2", "/wisp/skip/p/app"), "36\n");
    let jobs = s.wisp("jobs --all");
    // Refused starts are recorded too (state exit:255 on ws3); count only jobs that ran.
    let hosts: Vec<&str> = jobs
        .lines()
        .skip(1)
        .filter(|l| l.split_whitespace().nth(4) == Some("exit:0"))
        .filter_map(|l| l.split_whitespace().nth(3))
        .collect();
    assert!(hosts.contains(&"ws2"), "{jobs}");
    assert!(
        !hosts.contains(&"ws3"),
        "a job ran on the refusing host:\n{jobs}"
    );
}

/// Two builds at once, each reserving one host: every job of a build runs on its own
/// reserved host, never on the other build's.
#[test]
fn concurrent_builds_reserve_hosts_of_their_own() {
    let s = sim("reserve", 4);
    s.lend(&["ws3", "ws4"]);
    s.ok("ws1", &c_project("/wisp/ra", 10, "sleep 0.3; "));
    s.ok("ws2", &c_project("/wisp/rb", 10, "sleep 0.3; "));
    let a = {
        let c = s.c.clone();
        std::thread::spawn(move || {
            c.sh("ws1", "cd /wisp/ra && wisp make -v --hosts 1 -s")
                .unwrap()
        })
    };
    let (code, _, err_b) = s.run("ws2", "cd /wisp/rb && wisp make -v --hosts 1 -s");
    let out_a = a.join().unwrap();
    let err_a = String::from_utf8_lossy(&out_a.stderr);
    assert_eq!(code, 0, "{err_b}");
    assert_eq!(out_a.status.code(), Some(0), "{err_a}");
    assert_eq!(s.ok("ws3", "/wisp/ra/app && /wisp/rb/app"), "55\n55\n");
    // Which build reserved which host.
    let jobs = s.wisp("jobs --all");
    let hosts_of = |home: &str| -> std::collections::BTreeSet<String> {
        jobs.lines()
            .skip(1)
            .filter(|l| l.split_whitespace().nth(2) == Some(home))
            .filter_map(|l| l.split_whitespace().nth(3).map(String::from))
            .collect()
    };
    let (ha, hb) = (hosts_of("ws1"), hosts_of("ws2"));
    // Both builds started together; one may have found no host left and built locally,
    // but hosts are never shared.
    assert!(
        !ha.is_empty() || !hb.is_empty(),
        "no remote job at all:\n{jobs}\n{err_a}\n{err_b}"
    );
    assert!(
        ha.len() <= 1 && hb.len() <= 1,
        "a build used more than its one host:\n{jobs}"
    );
    assert!(ha.is_disjoint(&hb), "two builds shared a host:\n{jobs}");
}
