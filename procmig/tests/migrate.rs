//! End-to-end migration tests on real processes: small C programs compiled with gcc into a
//! temp dir, started in a sandbox, dumped, restored, and checked for continuity. These
//! need root (ptrace, pid namespaces, clone3 set_tid) and gcc; without them they fail with
//! a message saying what is missing.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wisp_procmig::{dump, restore_with, run_sandboxed, PidMode, RestoreOptions};

fn require_env() {
    // SAFETY-free check: geteuid has no preconditions.
    let uid = nix::unistd::geteuid();
    assert!(
        uid.is_root(),
        "procmig tests need root (ptrace, pid namespaces, clone3 set_tid); running as uid {uid}"
    );
    let gcc = std::process::Command::new("gcc").arg("--version").output();
    assert!(
        gcc.map(|o| o.status.success()).unwrap_or(false),
        "procmig tests need gcc to build their test programs"
    );
}

fn compile(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let exe = dir.join(name);
    let out = std::process::Command::new("gcc")
        .arg("-O1")
        .arg("-o")
        .arg(&exe)
        .arg(&c)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "gcc failed for {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Complete lines of a file (a last line still being written is left out).
fn lines(p: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete.lines().map(str::to_string).collect()
}

fn ns_pid_of(pid: i32) -> Vec<i32> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = st.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    l[6..]
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect()
}

/// Kills (and reaps) the listed children when a test ends, passing or failing, so that no
/// test program outlives its test. Only pids that are still our children are touched.
struct Reap(std::cell::RefCell<Vec<i32>>);

impl Reap {
    fn new() -> Self {
        Reap(std::cell::RefCell::new(Vec::new()))
    }
    fn add(&self, pid: i32) {
        self.0.borrow_mut().push(pid);
    }
}

impl Drop for Reap {
    fn drop(&mut self) {
        let me = std::process::id().to_string();
        for pid in self.0.borrow().iter() {
            let Ok(st) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let ppid = st
                .rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().nth(1))
                .unwrap_or("");
            if ppid == me {
                kill_reap(*pid);
            }
        }
    }
}

fn kill_reap(pid: i32) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
}

const COUNTER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
int main(int argc, char **argv) {
  int fd = open(argv[1], O_WRONLY|O_CREAT|O_TRUNC, 0644);
  char *heap = malloc(4096);
  for (int k = 0; k < 4095; k++) heap[k] = 'a' + k % 26;
  heap[4095] = 0;
  unsigned long sum0 = 0; for (int k = 0; k < 4095; k++) sum0 = sum0 * 31 + heap[k];
  volatile double f = 1.0;
  for (long i = 0;; i++) {
    unsigned long sum = 0; for (int k = 0; k < 4095; k++) sum = sum * 31 + heap[k];
    f = f * 1.0000001;
    char buf[160];
    int n = snprintf(buf, sizeof buf, "%ld %d %d %.7f\n", i, getpid(), sum == sum0, (double)f);
    if (write(fd, buf, n) != n) return 3;
    struct timespec ts = {0, 5000000};
    while (nanosleep(&ts, &ts) == -1) ;
  }
}
"#;

/// Check a counter output: consecutive numbers from 0, one pid, heap intact, and the
/// floating point value continuing (xstate restored).
fn check_counter(out: &Path, want_pid: i32, min_lines: usize) {
    let ls = lines(out);
    assert!(
        ls.len() >= min_lines,
        "only {} lines in {}",
        ls.len(),
        out.display()
    );
    let mut f_prev = 0.0f64;
    for (i, l) in ls.iter().enumerate() {
        let w: Vec<&str> = l.split(' ').collect();
        assert_eq!(w.len(), 4, "line {i} is garbled: {l:?}");
        assert_eq!(
            w[0].parse::<usize>().unwrap(),
            i,
            "counter broke at line {i}: {l:?}"
        );
        assert_eq!(
            w[1].parse::<i32>().unwrap(),
            want_pid,
            "getpid changed at line {i}: {l:?}"
        );
        assert_eq!(w[2], "1", "heap checksum changed at line {i}");
        let f: f64 = w[3].parse().unwrap();
        assert!(
            f >= f_prev,
            "float state went backwards at line {i}: {f} < {f_prev}"
        );
        f_prev = f;
    }
}

#[test]
fn counter_migrates_with_same_pid_offset_and_heap() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    assert_eq!(ns_pid_of(sb.pid).last(), Some(&2));
    wait_for("first output", Duration::from_secs(5), || {
        lines(&out).len() >= 20
    });

    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let at_dump = lines(&out).len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(lines(&out).len(), at_dump, "source kept running after dump");
    assert!(info.pages > 0);
    for f in ["image.meta", "pages.img"] {
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(img.join(f)).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{f} must be private");
    }

    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    assert_eq!(r.ns_pid, Some(2));
    assert_eq!(
        ns_pid_of(r.pid).last(),
        Some(&2),
        "restored process has another pid in its namespace"
    );
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);

    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 30
    });
    check_counter(&out, 2, at_dump + 30);
    let exe_link = std::fs::read_link(format!("/proc/{}/exe", r.pid)).unwrap();
    assert_eq!(exe_link, exe);
    // The namespace init keeps no copy of the restorer's memory: one code page (+ vsyscall).
    let init_maps = std::fs::read_to_string(format!("/proc/{}/maps", r.init_pid.unwrap())).unwrap();
    assert!(
        init_maps.lines().count() <= 2,
        "init still maps the restorer's memory:\n{init_maps}"
    );
    kill_reap(r.init_pid.unwrap());
}

#[test]
fn restore_without_namespace_gets_new_pid_and_continues() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let mut child = std::process::Command::new(&exe)
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reap = Reap::new();
    reap.add(child.id() as i32);
    wait_for("first output", Duration::from_secs(5), || {
        lines(&out).len() >= 10
    });
    let img = tmp.path().join("img");
    let info = dump(child.id() as i32, &img).unwrap();
    let at_dump = lines(&out).len();
    let r = restore_with(
        &img,
        &RestoreOptions {
            pid_mode: PidMode::Any,
            ..Default::default()
        },
    )
    .unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    assert_eq!(r.ns_pid, None);
    info.frozen.kill().unwrap();
    let _ = child.wait();
    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 20
    });
    // Lines before the dump carry the old pid, later ones the new one.
    let ls = lines(&out);
    for (i, l) in ls.iter().enumerate() {
        assert!(
            l.starts_with(&format!("{i} ")),
            "counter broke at line {i}: {l:?}"
        );
    }
    assert!(ls[at_dump + 5].split(' ').nth(1).unwrap() == r.pid.to_string());
    kill_reap(r.pid);
}

const BIGMEM: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#define SZ (64UL << 20)
static unsigned long sum(unsigned long *b) { unsigned long s = 0; for (unsigned long i = 0; i < SZ / 8; i++) s = s * 1000003 + b[i]; return s; }
int main(int argc, char **argv) {
  FILE *o = fopen(argv[1], "w"); setvbuf(o, NULL, _IONBF, 0);
  unsigned long *b = malloc(SZ);
  unsigned long x = 88172645463325252UL;
  for (unsigned long i = 0; i < SZ / 8; i++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; b[i] = x; }
  fprintf(o, "ready %lu\n", sum(b));
  struct timespec t0, t1; clock_gettime(CLOCK_MONOTONIC, &t0);
  struct timespec ts = {3, 0};   /* long enough to be caught asleep even on a loaded CI */
  int rc = nanosleep(&ts, &ts);
  int e = errno;
  clock_gettime(CLOCK_MONOTONIC, &t1);
  fprintf(o, "woke rc=%d errno=%d\n", rc, rc ? e : 0);
  fprintf(o, "sum %lu\n", sum(b));
  return 0;
}
"#;

#[test]
fn big_memory_and_nanosleep_survive() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "bigmem", BIGMEM, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("ready line", Duration::from_secs(20), || {
        lines(&out).first().is_some_and(|l| l.starts_with("ready"))
    });
    std::thread::sleep(Duration::from_millis(200));
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    assert!(
        info.syscall_note.contains("sleep"),
        "expected to catch it in nanosleep: {:?}",
        info.syscall_note
    );
    assert!(
        info.pages >= 16384,
        "64 MiB buffer not in the image: {} pages",
        info.pages
    );
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    wait_for("sum line", Duration::from_secs(30), || {
        lines(&out).len() >= 3
    });
    let ls = lines(&out);
    assert_eq!(
        ls[1], "woke rc=0 errno=0",
        "nanosleep did not complete normally after restore"
    );
    let before = ls[0].strip_prefix("ready ").unwrap();
    let after = ls[2].strip_prefix("sum ").unwrap();
    assert_eq!(
        before, after,
        "64 MiB buffer checksum changed across migration"
    );
    let init = r.init_pid.unwrap();
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None).unwrap();
    assert_eq!(
        st,
        nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(init), 0)
    );
}

const PIPE_READER: &str = r#"
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <fcntl.h>
int main(int argc, char **argv) {
  int o = open(argv[1], O_WRONLY|O_CREAT|O_TRUNC, 0644);
  write(o, "waiting\n", 8);
  char buf[100]; int n = read(0, buf, sizeof buf);
  if (n < 0) { write(o, "error\n", 6); return 2; }
  write(o, "got: ", 5); write(o, buf, n);
  return 7;
}
"#;

fn blocked_in_read(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/syscall"))
        .map(|s| s.starts_with("0 "))
        .unwrap_or(false)
}

fn pipe_case(inherit: bool) {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "reader", PIPE_READER, &[]);
    let out = tmp.path().join("out.txt");
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let rd_path = PathBuf::from(format!("/proc/self/fd/{}", rd.as_raw_fd()));
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(&rd_path), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("reader blocked in read", Duration::from_secs(5), || {
        blocked_in_read(sb.pid)
    });
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    assert!(
        info.syscall_note.contains("syscall 0"),
        "expected read to be interrupted: {:?}",
        info.syscall_note
    );
    let opts = RestoreOptions {
        pid_mode: PidMode::Auto,
        inherit_fds: if inherit {
            vec![(0, rd.as_raw_fd())]
        } else {
            vec![]
        },
        ..Default::default()
    };
    let r = restore_with(&img, &opts).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    drop(rd);
    wait_for(
        "restored reader blocked in read",
        Duration::from_secs(5),
        || blocked_in_read(r.pid),
    );
    let mut w = std::fs::File::from(wr);
    w.write_all(b"hello\n").unwrap();
    let init = r.init_pid.unwrap();
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None).unwrap();
    assert_eq!(
        st,
        nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(init), 7)
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "waiting\ngot: hello\n"
    );
}

#[test]
fn blocked_pipe_read_with_inherited_fd() {
    pipe_case(true);
}

#[test]
fn blocked_pipe_read_reopened_from_frozen_source() {
    pipe_case(false);
}

#[test]
fn corrupt_image_fails_clearly_and_source_resumes() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("first output", Duration::from_secs(5), || {
        lines(&out).len() >= 10
    });
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();

    let meta = img.join("image.meta");
    let good = std::fs::read(&meta).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x40;
    std::fs::write(&meta, &bad).unwrap();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains("checksum mismatch") && e.to_string().contains("image.meta"),
        "{e}"
    );

    std::fs::write(&meta, &good[..good.len() - 100]).unwrap();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");

    std::fs::write(&meta, &good).unwrap();
    let pages = img.join("pages.img");
    let pf = std::fs::OpenOptions::new()
        .write(true)
        .open(&pages)
        .unwrap();
    let plen = pf.metadata().unwrap().len();
    pf.set_len(plen - 4096).unwrap();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("pages file is"), "{e}");

    // Nothing lost: the source is still frozen and resumes where it was.
    let at_dump = lines(&out).len();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lines(&out).len(), at_dump);
    info.frozen.resume().unwrap();
    wait_for("resumed output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 20
    });
    check_counter(&out, 2, at_dump + 20);
    kill_reap(sb.init_pid);
}

const THREADED_IDLE: &str = r#"
#include <pthread.h>
#include <unistd.h>
static void *f(void *a) { for (;;) pause(); return a; }
int main() { pthread_t t; pthread_create(&t, 0, f, 0); for (;;) pause(); }
"#;

#[test]
fn unsupported_processes_are_rejected_and_keep_running() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    // A threaded process outside a pid namespace: dumped, but restore refuses to change
    // its tids (glibc caches them), and says so before creating anything.
    let exe = compile(tmp.path(), "threaded", THREADED_IDLE, &["-pthread"]);
    let mut child = std::process::Command::new(&exe).spawn().unwrap();
    let pid = child.id() as i32;
    wait_for("second thread", Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| d.count() == 2)
            .unwrap_or(false)
    });
    let info = dump(pid, &tmp.path().join("img1")).unwrap();
    let e = restore_with(&tmp.path().join("img1"), &RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("new pid namespace"), "{e}");
    info.frozen.resume().unwrap();
    let _ = child.kill();
    let _ = child.wait();

    // A socket on fd 0: rejected naming the fd, and the process is running again after.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::os::fd::OwnedFd::from(
            std::os::unix::net::UnixStream::pair().unwrap().0,
        ))
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    let e = dump(pid, &tmp.path().join("img2")).unwrap_err();
    assert!(
        e.to_string().contains("fd 0") && e.to_string().contains("socket"),
        "{e}"
    );
    std::thread::sleep(Duration::from_millis(50));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let st = state
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(st, "S", "source not left running after a failed dump");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .contains("TracerPid:\t0"));
    let _ = child.kill();
    let _ = child.wait();

    // A process with children: process trees are rejected.
    let mut child = std::process::Command::new("sh")
        .args(["-c", "sleep 30 & wait"])
        .stdin(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    wait_for("shell child", Duration::from_secs(5), || {
        !wisp_procmig::procfs::children_of(pid).is_empty()
    });
    let grandchild = wisp_procmig::procfs::children_of(pid)[0];
    let e = dump(pid, &tmp.path().join("img3")).unwrap_err();
    assert!(e.to_string().contains("child processes"), "{e}");
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(grandchild),
        nix::sys::signal::SIGKILL,
    );
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn cli_run_dump_restore() {
    require_env();
    let bin = env!("CARGO_BIN_EXE_wisp-procmig");
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let o = std::process::Command::new(bin)
        .args([
            "run",
            "--stdin",
            "/dev/null",
            "--stdout",
            "/dev/null",
            "--stderr",
            "/dev/null",
            "--",
        ])
        .arg(&exe)
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "run failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = String::from_utf8(o.stdout).unwrap();
    let pid: i32 = s.split_whitespace().next().unwrap().parse().unwrap();
    wait_for("first output", Duration::from_secs(5), || {
        lines(&out).len() >= 10
    });
    let img = tmp.path().join("img");
    let o = std::process::Command::new(bin)
        .args(["dump", "--pid", &pid.to_string(), "--dir"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "dump failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    // Left frozen in a stop after the CLI exited.
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert_eq!(
        st.rsplit(')').next().unwrap().split_whitespace().next(),
        Some("T")
    );
    let at_dump = lines(&out).len();
    let o = std::process::Command::new(bin)
        .args(["restore", "--dir"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "restore failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let s = String::from_utf8(o.stdout).unwrap();
    let w: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(w[1], "2");
    let o = std::process::Command::new(bin)
        .args(["kill", "--pid", &pid.to_string()])
        .output()
        .unwrap();
    assert!(o.status.success());
    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 20
    });
    check_counter(&out, 2, at_dump + 20);
    let new_pid: i32 = w[0].parse().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(new_pid),
        nix::sys::signal::SIGKILL,
    );

    // A corrupt image through the CLI: exit code 4 and a message naming the file.
    std::fs::write(img.join("image.meta"), b"WISPPMIGgarbage").unwrap();
    let o = std::process::Command::new(bin)
        .args(["restore", "--dir"])
        .arg(&img)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("image.meta"));
}

const STATEFUL: &str = r#"
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/time.h>
#include <sys/prctl.h>
static volatile sig_atomic_t usr1, alrm;
static void on_usr1(int s) { (void)s; usr1++; }
static void on_alrm(int s) { (void)s; alrm++; }
static char altstack_mem[65536];
int main(int argc, char **argv) {
  FILE *o = fopen(argv[1], "w"); setvbuf(o, NULL, _IONBF, 0);
  int app = open(argv[2], O_WRONLY|O_CREAT|O_APPEND, 0600);
  int shf = open(argv[3], O_RDWR|O_CREAT|O_TRUNC, 0600); ftruncate(shf, 8192);
  char *sh = mmap(0, 8192, PROT_READ|PROT_WRITE, MAP_SHARED, shf, 0);
  char *ro = mmap(0, 3 * 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0);
  strcpy(ro, "read-only data"); strcpy(ro + 4096, "no access data"); strcpy(ro + 8192, "exec data");
  mprotect(ro, 4096, PROT_READ); mprotect(ro + 4096, 4096, PROT_NONE); mprotect(ro + 8192, 4096, PROT_READ|PROT_EXEC);
  struct sigaction sa = {0}; sa.sa_handler = on_usr1; sa.sa_flags = SA_RESTART | SA_ONSTACK; sigaction(SIGUSR1, &sa, 0);
  sa.sa_handler = on_alrm; sigaction(SIGALRM, &sa, 0);
  signal(SIGHUP, SIG_IGN);
  stack_t ss = { .ss_sp = altstack_mem, .ss_size = sizeof altstack_mem, .ss_flags = 0 }; sigaltstack(&ss, 0);
  sigset_t m; sigemptyset(&m); sigaddset(&m, SIGUSR2); sigprocmask(SIG_BLOCK, &m, 0);
  umask(0027);
  mkdir(argv[4], 0755); chdir(argv[4]);
  struct rlimit rl = { 200, 4096 }; setrlimit(RLIMIT_NOFILE, &rl);
  struct itimerval it = { {0, 50000}, {0, 50000} }; setitimer(ITIMER_REAL, &it, 0);
  prctl(PR_SET_NAME, "stateful-x");
  strcpy(sh, "shared-before");
  long round = 0; int last_alrm = 0;
  for (;;) {
    while (usr1 == round) pause();
    round = usr1;
    mprotect(ro + 4096, 4096, PROT_READ);
    char cwd[256]; getcwd(cwd, sizeof cwd);
    mode_t um = umask(0); umask(um);
    getrlimit(RLIMIT_NOFILE, &rl);
    sigset_t cur; sigprocmask(SIG_BLOCK, 0, &cur);
    stack_t cs; sigaltstack(0, &cs);
    struct sigaction q; sigaction(SIGHUP, 0, &q);
    char name[32] = {0}; prctl(PR_GET_NAME, name);
    dprintf(app, "round %ld\n", round);
    fprintf(o, "r=%ld cwd=%s umask=%o nofile=%ld/%ld usr2blocked=%d alt=%d hup_ign=%d name=%s ro=%s na=%s ex=%s sh=%s alarms=%d pid=%d\n",
      round, strrchr(cwd, '/'), um, (long)rl.rlim_cur, (long)rl.rlim_max, sigismember(&cur, SIGUSR2),
      cs.ss_sp == altstack_mem && cs.ss_size == sizeof altstack_mem, q.sa_handler == SIG_IGN, name, ro, ro + 4096, ro + 8192, sh, alrm != last_alrm, getpid());
    last_alrm = alrm;
    mprotect(ro + 4096, 4096, PROT_NONE);
    strcpy(sh, "shared-after");
  }
}
"#;

#[test]
fn process_state_survives() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "stateful", STATEFUL, &[]);
    let out = tmp.path().join("out.txt");
    let app = tmp.path().join("append.txt");
    let shm = tmp.path().join("shared.bin");
    let wd = tmp.path().join("workdir");
    let null = Path::new("/dev/null");
    let args: Vec<String> = [&exe, &out, &app, &shm, &wd]
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let sb = run_sandboxed(&args, [Some(null), Some(null), Some(null)]).unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    let usr1 = |pid: i32| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGUSR1).unwrap()
    };
    std::thread::sleep(Duration::from_millis(200));
    usr1(sb.pid);
    wait_for("first report", Duration::from_secs(5), || {
        !lines(&out).is_empty()
    });
    let before = lines(&out)[0].clone();
    assert!(before.contains("r=1 cwd=/workdir umask=27 nofile=200/4096 usr2blocked=1 alt=1 hup_ign=1 name=stateful-x"), "{before}");
    assert!(
        before.contains(
            "ro=read-only data na=no access data ex=exec data sh=shared-before alarms=1 pid=2"
        ),
        "{before}"
    );

    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    std::thread::sleep(Duration::from_millis(200));
    usr1(r.pid);
    wait_for("report after restore", Duration::from_secs(5), || {
        lines(&out).len() >= 2
    });
    let after = lines(&out)[1].clone();
    let expect = before
        .replace("r=1", "r=2")
        .replace("sh=shared-before", "sh=shared-after");
    assert_eq!(after, expect);
    assert_eq!(std::fs::read_to_string(&app).unwrap(), "round 1\nround 2\n");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{}/comm", r.pid)).unwrap(),
        "stateful-x\n"
    );
    kill_reap(r.init_pid.unwrap());
}

const DIRTIER: &str = r#"
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <unistd.h>
#define SZ (64UL << 20)
#define WORDS (SZ / 8)
static volatile sig_atomic_t check;
static void on_usr1(int s) { (void)s; check = 1; }
static unsigned long pat(unsigned long i) { return i * 2654435761UL ^ 0x5bd1e995UL; }
/* Every step writes one more word, in order, and never rewrites it: a write lost by a
   migration stays visible to the self-check (nothing heals it). */
int main(int argc, char **argv) {
  FILE *o = fopen(argv[1], "w"); setvbuf(o, NULL, _IONBF, 0);
  signal(SIGUSR1, on_usr1);
  unsigned long *b = malloc(SZ);
  for (unsigned long i = 0; i < WORDS; i++) b[i] = pat(i);
  fprintf(o, "ready\n");
  for (unsigned long c = 0;; c++) {
    if (c * 7 < WORDS) b[c * 7] = ~c;   /* a new word every step, ~73 steps per page */
    if (check) {
      check = 0;
      unsigned long bad = 0;
      for (unsigned long i = 0; i < WORDS; i++) {
        unsigned long want = (i % 7 == 0 && i / 7 <= c) ? ~(i / 7) : pat(i);
        if (b[i] != want) bad++;
      }
      fprintf(o, "check c=%lu bad=%lu\n", c, bad);
    }
    usleep(100);
  }
}
"#;

#[test]
fn precopy_tracks_writes_and_freezes_only_dirty_pages() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "dirtier", DIRTIER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("ready", Duration::from_secs(20), || {
        lines(&out).first().is_some_and(|l| l == "ready")
    });
    let usr1 = |pid: i32| {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGUSR1).unwrap()
    };
    usr1(sb.pid);
    wait_for("self-check before", Duration::from_secs(10), || {
        lines(&out).len() >= 2
    });
    assert!(
        lines(&out)[1].ends_with(" bad=0"),
        "self-check broken before migration: {}",
        lines(&out)[1]
    );

    let img = tmp.path().join("img");
    let mut pc = wisp_procmig::PreCopy::start(sb.pid, &img).unwrap();
    eprintln!("pre-copy tracking with {}", pc.tracking());
    std::thread::sleep(Duration::from_millis(50));
    pc.round().unwrap();
    std::thread::sleep(Duration::from_millis(50));
    pc.round().unwrap();
    let rounds = pc.rounds.clone();
    assert!(
        rounds[0] >= 16384,
        "first round copied only {} pages",
        rounds[0]
    );
    let info = pc.finish().unwrap();
    let (info_pages, info_image_pages) = (info.pages, info.image_pages);
    eprintln!(
        "pre-copy rounds {rounds:?}, frozen pass {info_pages} pages, frozen {} ms",
        info.frozen_ms
    );
    assert!(
        info.pages < 1000,
        "frozen pass copied {} pages, pre-copy did not help (rounds {rounds:?})",
        info.pages
    );
    assert!(info.image_pages >= 16384);

    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    usr1(r.pid);
    wait_for("self-check after", Duration::from_secs(10), || {
        lines(&out).len() >= 3
    });
    let l = lines(&out)[2].clone();
    assert!(
        l.ends_with(" bad=0"),
        "memory differs after pre-copy migration: {l} (rounds {rounds:?}, frozen pass {} pages, image {} pages)",
        info_pages,
        info_image_pages
    );
    kill_reap(r.init_pid.unwrap());
}

#[test]
fn lazy_restore_pages_in_over_userfaultfd() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "bigmem", BIGMEM, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("ready line", Duration::from_secs(20), || {
        lines(&out).first().is_some_and(|l| l.starts_with("ready"))
    });
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let (r, pager) = wisp_procmig::restore_lazy(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    let stats = pager.wait().unwrap();
    assert!(
        stats.faults + stats.pushed >= 16384,
        "pager moved too few pages: {stats:?}"
    );
    // The image can go away now: the process depends on nothing but itself.
    std::fs::remove_dir_all(&img).unwrap();
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", r.pid)).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" um")),
        "userfaultfd ranges left registered"
    );
    wait_for("sum line", Duration::from_secs(30), || {
        lines(&out).len() >= 3
    });
    let ls = lines(&out);
    assert_eq!(ls[1], "woke rc=0 errno=0");
    assert_eq!(
        ls[0].strip_prefix("ready ").unwrap(),
        ls[2].strip_prefix("sum ").unwrap(),
        "checksum changed across lazy migration"
    );
    let init = r.init_pid.unwrap();
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None).unwrap();
    assert_eq!(
        st,
        nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(init), 0)
    );
}

#[test]
fn lazy_restore_serves_faults_of_a_running_process() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "dirtier", DIRTIER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("ready", Duration::from_secs(20), || {
        lines(&out).first().is_some_and(|l| l == "ready")
    });
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    // Pure demand paging for 5 s: the self-check below must fault its pages in (the pager
    // ends as soon as every page is in, so the delay costs nothing when it works).
    let opts = RestoreOptions {
        lazy_push_delay: Duration::from_millis(5000),
        ..Default::default()
    };
    let (r, pager) = wisp_procmig::restore_lazy(&img, &opts).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), nix::sys::signal::SIGUSR1).unwrap();
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    let stats = pager.wait().unwrap();
    eprintln!("lazy stats: {stats:?}");
    assert!(
        stats.faults > 8000,
        "the self-check did not fault its memory in: {stats:?}"
    );
    wait_for("self-check after", Duration::from_secs(10), || {
        lines(&out).len() >= 2
    });
    let l = lines(&out)[1].clone();
    assert!(
        l.ends_with(" bad=0"),
        "memory differs after lazy migration: {l}"
    );
    kill_reap(r.init_pid.unwrap());
}

const RUST_COUNTER: &str = r#"
use std::io::Write;
fn main() {
    let path = std::env::args().nth(1).unwrap();
    let mut f = std::fs::OpenOptions::new().create(true).write(true).truncate(true).open(path).unwrap();
    let v: Vec<u64> = (0..1_000_000u64).map(|i| i * 7).collect();
    let want: u64 = v.iter().sum();
    let mut map = std::collections::HashMap::new();
    for i in 0u64.. {
        map.insert(i % 1000, i);
        let sum: u64 = v.iter().sum();
        writeln!(f, "{} {} {}", i, std::process::id(), (sum == want) as u8 + (map.len() as u64 == (i + 1).min(1000)) as u8).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}
"#;

#[test]
fn rust_program_migrates() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("rc.rs");
    std::fs::write(&src, RUST_COUNTER).unwrap();
    let exe = tmp.path().join("rc");
    let o = std::process::Command::new("rustc")
        .args(["-O", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("rustc is needed to build the Rust test program");
    assert!(
        o.status.success(),
        "rustc failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("first output", Duration::from_secs(10), || {
        lines(&out).len() >= 10
    });
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let at_dump = lines(&out).len();
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    wait_for("restored output", Duration::from_secs(10), || {
        lines(&out).len() >= at_dump + 20
    });
    for (i, l) in lines(&out).iter().enumerate() {
        assert_eq!(l, &format!("{i} 2 2"), "line {i} wrong");
    }
    kill_reap(r.init_pid.unwrap());
}

#[test]
fn migrates_again_and_again() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    let (mut pid, mut init) = (sb.pid, sb.init_pid);
    for hop in 0..4 {
        let n = lines(&out).len();
        wait_for("progress", Duration::from_secs(5), || {
            lines(&out).len() >= n + 5
        });
        let img = tmp.path().join(format!("img{hop}"));
        let info = dump(pid, &img).unwrap();
        let r = restore_with(&img, &RestoreOptions::default()).unwrap();
        reap.add(r.init_pid.unwrap());
        info.frozen.kill().unwrap();
        kill_reap(init);
        pid = r.pid;
        init = r.init_pid.unwrap();
    }
    let n = lines(&out).len();
    wait_for(
        "progress after the last hop",
        Duration::from_secs(5),
        || lines(&out).len() >= n + 10,
    );
    check_counter(&out, 2, n + 10);
}

#[test]
fn unprivileged_process_keeps_its_credentials() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let setpriv = "/usr/bin/setpriv";
    assert!(
        Path::new(setpriv).exists(),
        "this test needs setpriv (util-linux) to drop privileges"
    );
    let args: Vec<String> = [
        setpriv,
        "--reuid=65534",
        "--regid=65534",
        "--groups=65534,100",
        "--no-new-privs",
        "--",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        exe.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    ])
    .collect();
    let sb = run_sandboxed(&args, [Some(null), Some(null), Some(null)]).unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("first output", Duration::from_secs(5), || {
        lines(&out).len() >= 10
    });
    let creds = |pid: i32| -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .filter(|l| {
                l.starts_with("Uid:")
                    || l.starts_with("NoNewPrivs:")
                    || l.starts_with("Gid:")
                    || l.starts_with("Groups:")
                    || l.starts_with("CapEff:")
            })
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let before = creds(sb.pid);
    assert!(
        before.contains(&"Uid: 65534 65534 65534 65534".to_string()),
        "{before:?}"
    );
    assert!(before.contains(&"NoNewPrivs: 1".to_string()), "{before:?}");
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let at_dump = lines(&out).len();
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap());
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    assert_eq!(creds(r.pid), before);
    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 10
    });
    check_counter(&out, 2, at_dump + 10);
}

#[test]
fn precopy_then_resume_leaves_source_intact() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "dirtier", DIRTIER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("ready", Duration::from_secs(20), || {
        lines(&out).first().is_some_and(|l| l == "ready")
    });
    let img = tmp.path().join("img");
    let mut pc = wisp_procmig::PreCopy::start(sb.pid, &img).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    pc.round().unwrap();
    let info = pc.finish().unwrap();
    // Restore "failed": the source goes on, with no tracking left behind.
    info.frozen.resume().unwrap();
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{}/fd", sb.pid))
        .unwrap()
        .map(|e| {
            std::fs::read_link(e.unwrap().path())
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert!(
        !fds.iter().any(|l| l.contains("userfaultfd")),
        "tracking descriptor left in the source: {fds:?}"
    );
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", sb.pid)).unwrap();
    assert!(
        !smaps
            .lines()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" uw")),
        "source still registered for uffd-wp"
    );
    std::thread::sleep(Duration::from_millis(100));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sb.pid),
        nix::sys::signal::SIGUSR1,
    )
    .unwrap();
    wait_for("self-check", Duration::from_secs(10), || {
        lines(&out).len() >= 2
    });
    let l = lines(&out)[1].clone();
    assert!(
        l.ends_with(" bad=0"),
        "source memory damaged by pre-copy: {l}"
    );
}

const THREADS: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <signal.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
static __thread long tls_id;
static pthread_mutex_t m = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long shared, ticks[3], woken;
static int go;
static volatile long tids[3], tid0[3];
static volatile sig_atomic_t usr1;
static void on_usr1(int s) { (void)s; usr1 = 1; }
static void *worker(void *a) {
  long id = (long)a; tls_id = id * 100;
  char name[16]; snprintf(name, sizeof name, "worker%ld", id); pthread_setname_np(pthread_self(), name);
  tid0[id] = syscall(SYS_gettid);
  for (;;) {
    pthread_mutex_lock(&m); shared++; ticks[id]++; pthread_mutex_unlock(&m);
    if (tls_id != id * 100) abort();
    tids[id] = syscall(SYS_gettid);
    struct timespec ts = {0, 2000000}; nanosleep(&ts, 0);
  }
}
static void *waiter(void *a) {
  (void)a; pthread_mutex_lock(&m); while (!go) pthread_cond_wait(&cv, &m); woken = 1; pthread_mutex_unlock(&m); return 0;
}
int main(int argc, char **argv) {
  FILE *o = fopen(argv[1], "w"); setvbuf(o, NULL, _IOLBF, 0);
  signal(SIGUSR1, on_usr1);
  pthread_t t1, t2, w;
  pthread_create(&t1, 0, worker, (void *)1); pthread_create(&t2, 0, worker, (void *)2); pthread_create(&w, 0, waiter, 0);
  /* Both workers have run once (tids set) before the first line, so "tids unchanged" means
     just that, however slowly the workers start on a busy machine. */
  while (!tids[1] || !tids[2]) { struct timespec ts = {0, 1000000}; nanosleep(&ts, 0); }
  for (long i = 0;; i++) {
    if (usr1) { usr1 = 0; pthread_mutex_lock(&m); go = 1; pthread_cond_broadcast(&cv); pthread_mutex_unlock(&m); pthread_join(w, 0); }
    pthread_mutex_lock(&m); long s = shared, a = ticks[1], b = ticks[2], wk = woken; pthread_mutex_unlock(&m);
    int tidok = tids[1] == tid0[1] && tids[2] == tid0[2];
    fprintf(o, "%ld %ld %ld %ld %d %ld %d\n", i, s, a, b, tidok, wk, getpid());
    struct timespec ts = {0, 5000000}; nanosleep(&ts, 0);
  }
}
"#;

#[test]
fn threads_migrate_with_their_tids_tls_and_locks() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "threads", THREADS, &["-pthread"]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("output", Duration::from_secs(5), || lines(&out).len() >= 20);
    let task_names = |pid: i32| -> Vec<(i32, String)> {
        let mut v: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .map(|e| {
                let tid: i32 = e.unwrap().file_name().to_str().unwrap().parse().unwrap();
                let st = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap();
                let ns = st
                    .lines()
                    .find(|l| l.starts_with("NSpid:"))
                    .unwrap()
                    .split_whitespace()
                    .last()
                    .unwrap()
                    .parse()
                    .unwrap();
                (
                    ns,
                    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let before = task_names(sb.pid);
    assert_eq!(before.len(), 4);
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let at_dump = lines(&out).len();
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap());
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    assert_eq!(
        task_names(r.pid),
        before,
        "threads, their tids or names changed"
    );
    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 30
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(r.pid), nix::sys::signal::SIGUSR1).unwrap();
    wait_for("waiter woken", Duration::from_secs(5), || {
        lines(&out)
            .last()
            .is_some_and(|l| l.split(' ').nth(5) == Some("1"))
    });
    let ls = lines(&out);
    let mut prev = (0i64, 0i64, 0i64);
    for (i, l) in ls.iter().enumerate() {
        let w: Vec<i64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
        assert_eq!(w[0], i as i64, "main thread counter broke at line {i}: {l}");
        assert!(
            w[1] >= prev.0 && w[2] >= prev.1 && w[3] >= prev.2,
            "counters went back at line {i}: {l}"
        );
        assert_eq!(w[4], 1, "a worker's tid changed (line {i}: {l})");
        assert_eq!(w[6], 2, "getpid changed (line {i})");
        prev = (w[1], w[2], w[3]);
    }
    let last: Vec<i64> = ls
        .last()
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let at: Vec<i64> = ls[at_dump].split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(
        last[2] > at[2] + 5 && last[3] > at[3] + 5,
        "workers stopped after restore: {at:?} -> {last:?}"
    );
}

#[test]
fn threaded_process_precopy_and_lazy_restore() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "threads", THREADS, &["-pthread"]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("output", Duration::from_secs(5), || lines(&out).len() >= 10);
    let img = tmp.path().join("img");
    let mut pc = wisp_procmig::PreCopy::start(sb.pid, &img).unwrap();
    assert_eq!(
        pc.tracking(),
        "uffd-wp",
        "threaded pre-copy must use the atomic tracker"
    );
    std::thread::sleep(Duration::from_millis(30));
    pc.round().unwrap();
    let info = pc.finish().unwrap();
    let at_dump = lines(&out).len();
    let (r, pager) = wisp_procmig::restore_lazy(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap());
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    pager.wait().unwrap();
    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 30
    });
    let ls = lines(&out);
    for (i, l) in ls.iter().enumerate() {
        let w: Vec<i64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
        assert_eq!(w[0], i as i64, "main thread counter broke at line {i}: {l}");
        assert_eq!(w[4], 1, "a worker's tid changed (line {i}: {l})");
    }
    let last: Vec<i64> = ls
        .last()
        .unwrap()
        .split(' ')
        .map(|x| x.parse().unwrap())
        .collect();
    let at: Vec<i64> = ls[at_dump].split(' ').map(|x| x.parse().unwrap()).collect();
    assert!(
        last[2] > at[2] + 5 && last[3] > at[3] + 5,
        "workers stopped after restore: {at:?} -> {last:?}"
    );
}

const RAISER: &str = r#"
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
static volatile sig_atomic_t got;
static void on_usr2(int s) { (void)s; got++; }
int main(int argc, char **argv) {
  FILE *o = fopen(argv[1], "w"); setvbuf(o, NULL, _IOLBF, 0);
  signal(SIGUSR2, on_usr2);
  pthread_mutexattr_t a; pthread_mutexattr_init(&a); pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
  pthread_mutex_t m; pthread_mutex_init(&m, &a);
  for (long i = 0;; i++) {
    raise(SIGUSR2);
    /* an error-checking mutex records its owner from glibc's cached tid */
    pthread_mutex_lock(&m);
    int owner_ok = m.__data.__owner == syscall(SYS_gettid);
    pthread_mutex_unlock(&m);
    fprintf(o, "%ld %d %d %d\n", i, (int)got, owner_ok, getpid());
    struct timespec ts = {0, 5000000}; nanosleep(&ts, 0);
  }
}
"#;

#[test]
fn glibc_tid_cache_follows_a_new_pid() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "raiser", RAISER, &[]);
    let out = tmp.path().join("out.txt");
    let mut child = std::process::Command::new(&exe)
        .arg(&out)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reap = Reap::new();
    reap.add(child.id() as i32);
    wait_for("output", Duration::from_secs(5), || lines(&out).len() >= 10);
    let img = tmp.path().join("img");
    let info = dump(child.id() as i32, &img).unwrap();
    let at_dump = lines(&out).len();
    let r = restore_with(
        &img,
        &RestoreOptions {
            pid_mode: PidMode::Any,
            ..Default::default()
        },
    )
    .unwrap();
    reap.add(r.pid);
    info.frozen.kill().unwrap();
    let _ = child.wait();
    wait_for("restored output", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 20
    });
    for (i, l) in lines(&out).iter().enumerate() {
        let w: Vec<i64> = l.split(' ').map(|x| x.parse().unwrap()).collect();
        assert_eq!(
            (w[0], w[1]),
            (i as i64, i as i64 + 1),
            "raise() lost a signal at line {i}: {l}"
        );
        assert_eq!(w[2], 1, "glibc's cached tid is stale at line {i}: {l}");
    }
}

const SPARSE: &str = r#"
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <sys/mman.h>
int main(int argc, char **argv) {
  FILE *o = fopen(argv[1], "w"); setvbuf(o, NULL, _IOLBF, 0);
  size_t big = 256UL << 30;   /* a 256 GiB reservation, like language runtimes make */
  char *r = mmap(0, big, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (r == MAP_FAILED) { fprintf(o, "mmap failed\n"); return 1; }
  char *mid = r + (100UL << 30);
  mprotect(mid, 1 << 20, PROT_READ | PROT_WRITE);
  strcpy(mid + 12345, "deep in the reservation");
  /* 64 GiB writable, no commit charge: restorable only if MAP_NORESERVE is kept */
  char *rw = mmap(0, 64UL << 30, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
  if (rw == MAP_FAILED) { fprintf(o, "mmap rw failed\n"); return 1; }
  for (int k = 0; k < 64; k++) rw[(size_t)k * (1UL << 30)] = (char)(k + 1);
  for (long i = 0;; i++) {
    int ok = strcmp(mid + 12345, "deep in the reservation") == 0;
    for (int k = 0; k < 64; k++) ok &= rw[(size_t)k * (1UL << 30)] == (char)(k + 1);
    fprintf(o, "%ld %d\n", i, ok);
    struct timespec ts = {0, 5000000}; nanosleep(&ts, 0);
  }
}
"#;

#[test]
fn huge_sparse_mappings_migrate_quickly() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "sparse", SPARSE, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("output", Duration::from_secs(10), || lines(&out).len() >= 5);
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    eprintln!(
        "sparse dump: {} pages, frozen {} ms",
        info.pages, info.frozen_ms
    );
    assert!(
        info.pages < 1000,
        "{} pages stored for a sparse process",
        info.pages
    );
    let at_dump = lines(&out).len();
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    reap.add(r.init_pid.unwrap());
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    wait_for("restored output", Duration::from_secs(10), || {
        lines(&out).len() >= at_dump + 10
    });
    for (i, l) in lines(&out).iter().enumerate() {
        assert_eq!(l, &format!("{i} 1"), "line {i}");
    }
}

#[test]
fn late_restore_failure_leaves_nothing_and_source_resumes() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let wd = tmp.path().join("cwd-that-goes-away");
    std::fs::create_dir(&wd).unwrap();
    let null = Path::new("/dev/null");
    let script = format!(
        "cd {} && exec {} {}",
        wd.display(),
        exe.display(),
        out.display()
    );
    let sb = run_sandboxed(
        &["/bin/sh".into(), "-c".into(), script],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("output", Duration::from_secs(5), || lines(&out).len() >= 10);
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    std::fs::remove_dir(&wd).unwrap();
    // Everything checks out until the injected chdir, deep into the rebuild.
    let t = std::time::Instant::now();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "failed restore took {:?}",
        t.elapsed()
    );
    assert!(e.to_string().contains("cwd-that-goes-away"), "{e}");
    // The half-built copy (its exe link was already set when chdir failed) is gone: the
    // only live process running this test's program is the frozen source.
    let live: Vec<i32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|p| {
            std::fs::read_link(format!("/proc/{p}/exe")).ok().as_deref() == Some(exe.as_path())
        })
        .filter(|p| {
            !matches!(
                wisp_procmig::dump::process_state(*p),
                Some('Z') | Some('X') | None
            )
        })
        .collect();
    assert_eq!(live, vec![sb.pid], "a failed restore left a copy running");
    let at_dump = lines(&out).len();
    info.frozen.resume().unwrap();
    wait_for("source resumed", Duration::from_secs(5), || {
        lines(&out).len() >= at_dump + 10
    });
    check_counter(&out, 2, at_dump + 10);
}

const TIMER_AND_LOCK: &str = r#"
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/file.h>
int main(int argc, char **argv) {
  if (argv[1][0] == 't') {
    timer_t t; struct sigevent ev; memset(&ev, 0, sizeof ev); ev.sigev_notify = SIGEV_NONE;
    timer_create(CLOCK_MONOTONIC, &ev, &t);
  } else {
    int fd = open(argv[2], O_RDWR | O_CREAT, 0600); flock(fd, LOCK_EX);
  }
  for (;;) pause();
}
"#;

#[test]
fn state_that_would_not_move_is_refused() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "tl", TIMER_AND_LOCK, &["-lrt"]);
    for (mode, want) in [("t", "POSIX timers"), ("l", "file lock")] {
        let mut child = std::process::Command::new(&exe)
            .arg(mode)
            .arg(tmp.path().join("lockfile"))
            .stdin(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let reap = Reap::new();
        reap.add(child.id() as i32);
        let pid = child.id() as i32;
        wait_for("pause", Duration::from_secs(5), || {
            std::fs::read_to_string(format!("/proc/{pid}/syscall"))
                .map(|s| s.starts_with("34 "))
                .unwrap_or(false)
        });
        let e = dump(pid, &tmp.path().join(format!("img-{mode}"))).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert!(std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .contains("TracerPid:\t0"));
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A streamed lazy migration: the target process runs before its memory is written (the
/// stream starts only after it runs, slowly), faults wait for their chunk, and the result
/// is byte-identical; every chunk is checked against the migration key.
#[test]
fn streamed_lazy_restore_runs_before_its_pages_are_written() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "bigmem", BIGMEM, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("ready line", Duration::from_secs(20), || {
        lines(&out).first().is_some_and(|l| l.starts_with("ready"))
    });
    let img = tmp.path().join("img");
    let opts = wisp_procmig::DumpOptions {
        stream: true,
        tag: "job 7".into(),
    };
    let mut info = wisp_procmig::dump_opts(sb.pid, &img, &opts).unwrap();
    assert!(
        info.deferred_bytes >= 60 << 20,
        "the heap was not deferred: {} bytes",
        info.deferred_bytes
    );
    let stream = info.stream.take().unwrap();
    let ropts = RestoreOptions {
        mac: Some(wisp_procmig::MacCheck {
            key: info.mac_key,
            tag: "job 7".into(),
        }),
        ..Default::default()
    };
    // The restore starts before a single deferred page is in the swap file; the stream
    // starts a moment later (as the source agent does it, in parallel).
    let streamer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        stream.run().unwrap()
    });
    let (r, pager) = wisp_procmig::restore_lazy(&img, &ropts).unwrap();
    reap.add(r.init_pid.unwrap_or(r.pid));
    let written = streamer.join().unwrap();
    assert!(written >= 60 << 20, "{written}");
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    let stats = pager.wait().unwrap();
    assert!(
        stats.faults + stats.pushed >= 16384,
        "pager moved too few pages: {stats:?}"
    );
    wait_for("sum line", Duration::from_secs(60), || {
        lines(&out).len() >= 3
    });
    let ls = lines(&out);
    assert_eq!(
        ls[0].strip_prefix("ready ").unwrap(),
        ls[2].strip_prefix("sum ").unwrap(),
        "checksum changed across a streamed lazy migration"
    );
    kill_reap(r.init_pid.unwrap());
}

/// Migration images are private to their owner and tagged: a flipped byte in the swap
/// file, a restore with the wrong key or for another job, are refused with a clear
/// message, and the frozen source resumes with nothing lost.
#[test]
fn altered_or_foreign_images_are_refused_and_the_source_resumes() {
    require_env();
    use std::os::unix::fs::{FileExt, PermissionsExt};
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "counter", COUNTER, &[]);
    let out = tmp.path().join("out.txt");
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(
        &[exe.to_string_lossy().into(), out.to_string_lossy().into()],
        [Some(null), Some(null), Some(null)],
    )
    .unwrap();
    let reap = Reap::new();
    reap.add(sb.init_pid);
    wait_for("first output", Duration::from_secs(10), || {
        lines(&out).len() >= 10
    });
    let img = tmp.path().join("img");
    let opts = wisp_procmig::DumpOptions {
        stream: false,
        tag: "job 1".into(),
    };
    let info = wisp_procmig::dump_opts(sb.pid, &img, &opts).unwrap();
    // Readable by the owner only.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&img), 0o700);
    for f in ["image.meta", "pages.img", "pages.sum"] {
        assert_eq!(mode(&img.join(f)), 0o600, "{f}");
    }
    let check = |tag: &str, key: [u8; 32]| RestoreOptions {
        pid_mode: PidMode::NewNamespace,
        mac: Some(wisp_procmig::MacCheck {
            key,
            tag: tag.into(),
        }),
        ..Default::default()
    };
    // Job 1's image presented for job 2.
    let e = restore_with(&img, &check("job 2", info.mac_key)).unwrap_err();
    assert!(
        e.to_string()
            .contains("belongs to \"job 1\", not to \"job 2\""),
        "{e}"
    );
    // Another migration's key.
    let e = restore_with(&img, &check("job 1", [9u8; 32])).unwrap_err();
    assert!(e.to_string().contains("altered"), "{e}");
    // One byte of the swap file flipped.
    let pages = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img.join("pages.img"))
        .unwrap();
    let at = pages.metadata().unwrap().len() - 100;
    let mut b = [0u8; 1];
    pages.read_exact_at(&mut b, at).unwrap();
    pages.write_all_at(&[b[0] ^ 1], at).unwrap();
    let e = restore_with(&img, &check("job 1", info.mac_key)).unwrap_err();
    assert!(
        e.to_string().contains("altered") && e.to_string().contains("pages.img"),
        "{e}"
    );
    // Nothing lost: the source is still frozen and resumes where it was.
    let at_dump = lines(&out).len();
    info.frozen.resume().unwrap();
    wait_for("resumed output", Duration::from_secs(10), || {
        lines(&out).len() >= at_dump + 20
    });
    check_counter(&out, 2, at_dump + 20);
    kill_reap(sb.init_pid);
}
