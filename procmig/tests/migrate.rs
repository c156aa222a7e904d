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
    assert!(uid.is_root(), "procmig tests need root (ptrace, pid namespaces, clone3 set_tid); running as uid {uid}");
    let gcc = std::process::Command::new("gcc").arg("--version").output();
    assert!(gcc.map(|o| o.status.success()).unwrap_or(false), "procmig tests need gcc to build their test programs");
}

fn compile(dir: &Path, name: &str, src: &str, extra: &[&str]) -> PathBuf {
    let c = dir.join(format!("{name}.c"));
    std::fs::write(&c, src).unwrap();
    let exe = dir.join(name);
    let out = std::process::Command::new("gcc").arg("-O1").arg("-o").arg(&exe).arg(&c).args(extra).output().unwrap();
    assert!(out.status.success(), "gcc failed for {name}: {}", String::from_utf8_lossy(&out.stderr));
    exe
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn lines(p: &Path) -> Vec<String> {
    std::fs::read_to_string(p).unwrap_or_default().lines().map(str::to_string).collect()
}

fn ns_pid_of(pid: i32) -> Vec<i32> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let l = st.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    l[6..].split_whitespace().map(|x| x.parse().unwrap()).collect()
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
    assert!(ls.len() >= min_lines, "only {} lines in {}", ls.len(), out.display());
    let mut f_prev = 0.0f64;
    for (i, l) in ls.iter().enumerate() {
        let w: Vec<&str> = l.split(' ').collect();
        assert_eq!(w.len(), 4, "line {i} is garbled: {l:?}");
        assert_eq!(w[0].parse::<usize>().unwrap(), i, "counter broke at line {i}: {l:?}");
        assert_eq!(w[1].parse::<i32>().unwrap(), want_pid, "getpid changed at line {i}: {l:?}");
        assert_eq!(w[2], "1", "heap checksum changed at line {i}");
        let f: f64 = w[3].parse().unwrap();
        assert!(f >= f_prev, "float state went backwards at line {i}: {f} < {f_prev}");
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
    let sb = run_sandboxed(&[exe.to_string_lossy().into(), out.to_string_lossy().into()], [Some(null), Some(null), Some(null)]).unwrap();
    assert_eq!(ns_pid_of(sb.pid).last(), Some(&2));
    wait_for("first output", Duration::from_secs(5), || lines(&out).len() >= 20);

    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let at_dump = lines(&out).len();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(lines(&out).len(), at_dump, "source kept running after dump");
    assert!(info.pages > 0);

    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    assert_eq!(r.ns_pid, Some(2));
    assert_eq!(ns_pid_of(r.pid).last(), Some(&2), "restored process has another pid in its namespace");
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);

    wait_for("restored output", Duration::from_secs(5), || lines(&out).len() >= at_dump + 30);
    check_counter(&out, 2, at_dump + 30);
    let exe_link = std::fs::read_link(format!("/proc/{}/exe", r.pid)).unwrap();
    assert_eq!(exe_link, exe);
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
    wait_for("first output", Duration::from_secs(5), || lines(&out).len() >= 10);
    let img = tmp.path().join("img");
    let info = dump(child.id() as i32, &img).unwrap();
    let at_dump = lines(&out).len();
    let r = restore_with(&img, &RestoreOptions { pid_mode: PidMode::Any, inherit_fds: vec![] }).unwrap();
    assert_eq!(r.ns_pid, None);
    info.frozen.kill().unwrap();
    let _ = child.wait();
    wait_for("restored output", Duration::from_secs(5), || lines(&out).len() >= at_dump + 20);
    // Lines before the dump carry the old pid, later ones the new one.
    let ls = lines(&out);
    for (i, l) in ls.iter().enumerate() {
        assert!(l.starts_with(&format!("{i} ")), "counter broke at line {i}: {l:?}");
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
  struct timespec ts = {1, 500000000};
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
    let sb = run_sandboxed(&[exe.to_string_lossy().into(), out.to_string_lossy().into()], [Some(null), Some(null), Some(null)]).unwrap();
    wait_for("ready line", Duration::from_secs(20), || lines(&out).first().is_some_and(|l| l.starts_with("ready")));
    std::thread::sleep(Duration::from_millis(200));
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    assert!(info.syscall_note.contains("sleep"), "expected to catch it in nanosleep: {:?}", info.syscall_note);
    assert!(info.pages >= 16384, "64 MiB buffer not in the image: {} pages", info.pages);
    let r = restore_with(&img, &RestoreOptions::default()).unwrap();
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    wait_for("sum line", Duration::from_secs(30), || lines(&out).len() >= 3);
    let ls = lines(&out);
    assert_eq!(ls[1], "woke rc=0 errno=0", "nanosleep did not complete normally after restore");
    let before = ls[0].strip_prefix("ready ").unwrap();
    let after = ls[2].strip_prefix("sum ").unwrap();
    assert_eq!(before, after, "64 MiB buffer checksum changed across migration");
    let init = r.init_pid.unwrap();
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None).unwrap();
    assert_eq!(st, nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(init), 0));
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
    std::fs::read_to_string(format!("/proc/{pid}/syscall")).map(|s| s.starts_with("0 ")).unwrap_or(false)
}

fn pipe_case(inherit: bool) {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "reader", PIPE_READER, &[]);
    let out = tmp.path().join("out.txt");
    let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    let rd_path = PathBuf::from(format!("/proc/self/fd/{}", rd.as_raw_fd()));
    let null = Path::new("/dev/null");
    let sb = run_sandboxed(&[exe.to_string_lossy().into(), out.to_string_lossy().into()], [Some(&rd_path), Some(null), Some(null)]).unwrap();
    wait_for("reader blocked in read", Duration::from_secs(5), || blocked_in_read(sb.pid));
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    assert!(info.syscall_note.contains("syscall 0"), "expected read to be interrupted: {:?}", info.syscall_note);
    let opts = RestoreOptions { pid_mode: PidMode::Auto, inherit_fds: if inherit { vec![(0, rd.as_raw_fd())] } else { vec![] } };
    let r = restore_with(&img, &opts).unwrap();
    info.frozen.kill().unwrap();
    kill_reap(sb.init_pid);
    drop(rd);
    wait_for("restored reader blocked in read", Duration::from_secs(5), || blocked_in_read(r.pid));
    let mut w = std::fs::File::from(wr);
    w.write_all(b"hello\n").unwrap();
    let init = r.init_pid.unwrap();
    let st = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None).unwrap();
    assert_eq!(st, nix::sys::wait::WaitStatus::Exited(nix::unistd::Pid::from_raw(init), 7));
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "waiting\ngot: hello\n");
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
    let sb = run_sandboxed(&[exe.to_string_lossy().into(), out.to_string_lossy().into()], [Some(null), Some(null), Some(null)]).unwrap();
    wait_for("first output", Duration::from_secs(5), || lines(&out).len() >= 10);
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();

    let meta = img.join("image.meta");
    let good = std::fs::read(&meta).unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n / 2] ^= 0x40;
    std::fs::write(&meta, &bad).unwrap();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("checksum mismatch") && e.to_string().contains("image.meta"), "{e}");

    std::fs::write(&meta, &good[..good.len() - 100]).unwrap();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("truncated"), "{e}");

    std::fs::write(&meta, &good).unwrap();
    let pages = img.join("pages.img");
    let pf = std::fs::OpenOptions::new().write(true).open(&pages).unwrap();
    let plen = pf.metadata().unwrap().len();
    pf.set_len(plen - 4096).unwrap();
    let e = restore_with(&img, &RestoreOptions::default()).unwrap_err();
    assert!(e.to_string().contains("pages file is"), "{e}");

    // Nothing lost: the source is still frozen and resumes where it was.
    let at_dump = lines(&out).len();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(lines(&out).len(), at_dump);
    info.frozen.resume().unwrap();
    wait_for("resumed output", Duration::from_secs(5), || lines(&out).len() >= at_dump + 20);
    check_counter(&out, 2, at_dump + 20);
    kill_reap(sb.init_pid);
}

const THREADED: &str = r#"
#include <pthread.h>
#include <unistd.h>
static void *f(void *a) { for (;;) pause(); return a; }
int main() { pthread_t t; pthread_create(&t, 0, f, 0); for (;;) pause(); }
"#;

#[test]
fn unsupported_processes_are_rejected_and_keep_running() {
    require_env();
    let tmp = tempfile::tempdir().unwrap();
    let exe = compile(tmp.path(), "threaded", THREADED, &["-pthread"]);
    let mut child = std::process::Command::new(&exe).spawn().unwrap();
    let pid = child.id() as i32;
    wait_for("second thread", Duration::from_secs(5), || {
        std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() == 2).unwrap_or(false)
    });
    let e = dump(pid, &tmp.path().join("img1")).unwrap_err();
    assert!(e.to_string().contains("unsupported") && e.to_string().contains("2 threads"), "{e}");
    let _ = child.kill();
    let _ = child.wait();

    // A socket on fd 0: rejected naming the fd, and the process is running again after.
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .stdin(std::os::fd::OwnedFd::from(std::os::unix::net::UnixStream::pair().unwrap().0))
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(Duration::from_millis(100));
    let e = dump(pid, &tmp.path().join("img2")).unwrap_err();
    assert!(e.to_string().contains("fd 0") && e.to_string().contains("socket"), "{e}");
    std::thread::sleep(Duration::from_millis(50));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let st = state.rsplit(')').next().unwrap().split_whitespace().next().unwrap().to_string();
    assert_eq!(st, "S", "source not left running after a failed dump");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap().contains("TracerPid:\t0"));
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
        .args(["run", "--stdin", "/dev/null", "--stdout", "/dev/null", "--stderr", "/dev/null", "--"])
        .arg(&exe)
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "run failed: {}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    let pid: i32 = s.split_whitespace().next().unwrap().parse().unwrap();
    wait_for("first output", Duration::from_secs(5), || lines(&out).len() >= 10);
    let img = tmp.path().join("img");
    let o = std::process::Command::new(bin).args(["dump", "--pid", &pid.to_string(), "--dir"]).arg(&img).output().unwrap();
    assert!(o.status.success(), "dump failed: {}", String::from_utf8_lossy(&o.stderr));
    // Left frozen in a stop after the CLI exited.
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    assert_eq!(st.rsplit(')').next().unwrap().split_whitespace().next(), Some("T"));
    let at_dump = lines(&out).len();
    let o = std::process::Command::new(bin).args(["restore", "--dir"]).arg(&img).output().unwrap();
    assert!(o.status.success(), "restore failed: {}", String::from_utf8_lossy(&o.stderr));
    let s = String::from_utf8(o.stdout).unwrap();
    let w: Vec<&str> = s.split_whitespace().collect();
    assert_eq!(w[1], "2");
    let o = std::process::Command::new(bin).args(["kill", "--pid", &pid.to_string()]).output().unwrap();
    assert!(o.status.success());
    wait_for("restored output", Duration::from_secs(5), || lines(&out).len() >= at_dump + 20);
    check_counter(&out, 2, at_dump + 20);
    let new_pid: i32 = w[0].parse().unwrap();
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(new_pid), nix::sys::signal::SIGKILL);

    // A corrupt image through the CLI: exit code 4 and a message naming the file.
    std::fs::write(img.join("image.meta"), b"WISPPMIGgarbage").unwrap();
    let o = std::process::Command::new(bin).args(["restore", "--dir"]).arg(&img).output().unwrap();
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("image.meta"));
}
