//! Process trees migrate: a job of several processes (shell pipelines, a shell waiting for
//! its child) is dumped whole and restored with the same pids, parents, process groups,
//! pipes (with their unread data) and shared descriptors. Real processes, local restore
//! into a fresh pid namespace while the source is frozen. Needs root, gzip, sha256sum.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wisp_procmig::{dump, image, restore_with, run_sandboxed, PidMode, RestoreOptions};

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "procmig tree tests need root (ptrace, pid namespaces, clone3 set_tid)"
    );
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: i32, key: &str) -> Option<String> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    st.lines()
        .find_map(|l| l.strip_prefix(key).map(|v| v.trim().to_string()))
}

fn innermost(pid: i32, key: &str) -> i32 {
    status_field(pid, key)
        .and_then(|v| v.split_whitespace().last().map(|x| x.parse().unwrap()))
        .unwrap_or(-1)
}

/// Every process of the pid namespace whose init is `init` (host pid), as
/// (pid, ppid, pgid, sid, comm) seen inside the namespace, sorted.
fn tree(init: i32) -> Vec<(i32, i32, i32, i32, String)> {
    let ns = std::fs::read_link(format!("/proc/{init}/ns/pid")).unwrap();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if p == init || std::fs::read_link(format!("/proc/{p}/ns/pid")).ok() != Some(ns.clone()) {
            continue;
        }
        let Some(ppid) = status_field(p, "PPid:").and_then(|v| v.parse::<i32>().ok()) else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default();
        out.push((
            innermost(p, "NSpid:"),
            innermost(ppid, "NSpid:"),
            innermost(p, "NSpgid:"),
            innermost(p, "NSsid:"),
            comm.trim().to_string(),
        ));
    }
    out.sort();
    out
}

/// Kills the given processes (our children) when the test ends.
struct Reap(std::cell::RefCell<Vec<i32>>);
impl Drop for Reap {
    fn drop(&mut self) {
        for p in self.0.borrow().iter() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), nix::sys::signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(*p), None);
        }
    }
}

fn wait_exit(init: i32) -> i32 {
    match nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None).unwrap() {
        nix::sys::wait::WaitStatus::Exited(_, c) => c,
        other => panic!("init ended with {other:?}"),
    }
}

fn sh(script: &str) -> Vec<String> {
    vec!["/bin/sh".into(), "-c".into(), script.into()]
}

/// Dump the sandboxed job `pid`, restore it into a new namespace, kill the source; returns
/// the new init and the restore time.
fn migrate(pid: i32, src_init: i32, img: &Path, reap: &Reap) -> (i32, Duration) {
    let before = tree(src_init);
    let t = Instant::now();
    let info = dump(pid, img).unwrap_or_else(|e| panic!("dump: {e}"));
    let frozen_ms = info.frozen_ms;
    let opts = RestoreOptions {
        pid_mode: PidMode::NewNamespace,
        ..Default::default()
    };
    let r = restore_with(img, &opts).unwrap_or_else(|e| panic!("restore: {e}"));
    let took = t.elapsed();
    let init = r.init_pid.unwrap();
    reap.0.borrow_mut().push(init);
    info.frozen.kill().unwrap();
    eprintln!(
        "tree of {} processes: frozen {frozen_ms} ms for the dump, dump+restore {took:?}, {} pages",
        info.processes, info.image_pages
    );
    assert_eq!(info.processes, before.len(), "{before:?}");
    assert_eq!(r.members.len() + 1, before.len());
    let after = tree(init);
    assert_eq!(before, after, "pids, parents, groups or sessions changed");
    (init, took)
}

/// A shell blocked in wait4 for its `sleep` child migrates; the wait resumes on the
/// restored child and sees its real exit status; $$ and $PPID do not change.
#[test]
fn shell_waiting_for_its_child_migrates() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let script = format!(
        "echo \"start $$ $PPID\" > {o}; sh -c 'sleep 1.5; exit 7'; echo \"status $?\" >> {o}; \
         (sleep 0.5; exit 3) & wait $!; echo \"bg $?\" >> {o}; echo \"end $$ $PPID\" >> {o}",
        o = out.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("the sleep child", Duration::from_secs(5), || {
        tree(sb.init_pid).iter().any(|p| p.4 == "sleep")
    });
    std::thread::sleep(Duration::from_millis(300));
    let img = tmp.path().join("img");
    let (init, _) = migrate(sb.pid, sb.init_pid, &img, &reap);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(sb.init_pid), None);
    assert_eq!(wait_exit(init), 0);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "start 2 1\nstatus 7\nbg 3\nend 2 1\n"
    );
}

/// Pipes between processes of the job keep their unread data: once through a checkpoint
/// (dump, then the source resumes: the data must still be there), once through a restore.
#[test]
fn pipe_with_unread_data_between_two_processes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let script = format!(
        "{{ printf abc; sleep 2.5; printf def; }} | {{ sleep 1.5; cat > {}; }}",
        out.display()
    );
    for restore in [false, true] {
        let _ = std::fs::remove_file(&out);
        let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
        let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
        wait_for("both sleeps", Duration::from_secs(5), || {
            tree(sb.init_pid).iter().filter(|p| p.4 == "sleep").count() == 2
        });
        std::thread::sleep(Duration::from_millis(400));
        let img = tmp.path().join(format!("img-{restore}"));
        let init = if restore {
            let (init, _) = migrate(sb.pid, sb.init_pid, &img, &reap);
            let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(sb.init_pid), None);
            init
        } else {
            let info = dump(sb.pid, &img).unwrap();
            info.frozen.resume().unwrap();
            sb.init_pid
        };
        let meta = image::load(&img).unwrap();
        assert!(
            meta.pipes.iter().any(|p| p.data == b"abc" && !p.external),
            "unread pipe data not in the image: {:?}",
            meta.pipes
        );
        assert!(!meta.members.is_empty());
        assert_eq!(wait_exit(init), 0);
        assert_eq!(
            std::fs::read_to_string(&out).unwrap(),
            "abcdef",
            "restore={restore}"
        );
    }
}

fn big_file(dir: &Path) -> PathBuf {
    // 96 MiB of compressible but not trivial data.
    let p = dir.join("big");
    let mut data = Vec::with_capacity(96 << 20);
    let mut x: u64 = 0x1234_5678;
    while data.len() < 96 << 20 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let line = format!("line {} value {:x} {}\n", data.len(), x, x % 1000);
        data.extend_from_slice(line.as_bytes());
    }
    std::fs::write(&p, data).unwrap();
    p
}

/// `sh -c 'gzip -c < big | sha256sum > out'` migrated twice mid-run gives the output of an
/// unmigrated run.
#[test]
fn gzip_pipeline_migrates_mid_run() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let big = big_file(tmp.path());
    let script = |out: &Path| {
        format!(
            "gzip -c < {} | sha256sum > {}",
            big.display(),
            out.display()
        )
    };
    let want_out = tmp.path().join("want");
    let t = Instant::now();
    let st = std::process::Command::new("sh")
        .arg("-c")
        .arg(script(&want_out))
        .status()
        .unwrap();
    assert!(st.success());
    let unmigrated = t.elapsed();
    let want = std::fs::read_to_string(&want_out).unwrap();

    let out = tmp.path().join("out");
    let sb = run_sandboxed(&sh(&script(&out)), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("gzip and sha256sum", Duration::from_secs(5), || {
        let t = tree(sb.init_pid);
        t.iter().any(|p| p.4 == "gzip") && t.iter().any(|p| p.4 == "sha256sum")
    });
    std::thread::sleep(unmigrated / 4);
    let (mut init, mut pid) = (sb.init_pid, sb.pid);
    let mut times = Vec::new();
    for round in 0..2 {
        let img = tmp.path().join(format!("img{round}"));
        let (new_init, took) = migrate(pid, init, &img, &reap);
        times.push(took);
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None);
        init = new_init;
        pid = tree_host_root(init);
        std::thread::sleep(unmigrated / 4);
    }
    assert!(
        tree(init).iter().any(|p| p.4 == "gzip"),
        "gzip finished before the second migration; the test proves nothing"
    );
    assert_eq!(wait_exit(init), 0);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
    eprintln!("unmigrated run {unmigrated:?}, migrations {times:?}");
}

/// Host pid of the main process (pid 2) of the namespace whose init is `init`.
fn tree_host_root(init: i32) -> i32 {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if status_field(p, "PPid:").and_then(|v| v.parse::<i32>().ok()) == Some(init) {
            return p;
        }
    }
    panic!("no main process under init {init}");
}

/// Lazy restore of a tree: a shell holding 20 MB in a variable keeps forking subshells
/// that read it while its memory is still being paged in on demand (UFFD_EVENT_FORK:
/// each child gets its own pager); every child sees the whole variable.
#[test]
fn lazy_tree_restore_serves_children_forked_during_paging() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let script = format!(
        "x=$(head -c 20000000 /dev/zero | tr '\\0' a); sleep 30 & \
         i=0; while [ $i -lt 40 ]; do (echo \"$i ${{#x}}\") >> {o}; i=$((i+1)); sleep 0.1; done; kill $!",
        o = out.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("the loop", Duration::from_secs(20), || {
        std::fs::read_to_string(&out)
            .map(|s| s.lines().count() >= 3)
            .unwrap_or(false)
    });
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    assert!(
        info.processes >= 2,
        "expected a tree, got {}",
        info.processes
    );
    let opts = RestoreOptions {
        pid_mode: PidMode::NewNamespace,
        lazy_push_delay: Duration::from_secs(2),
        ..Default::default()
    };
    let (r, pager) = wisp_procmig::restore_lazy(&img, &opts).unwrap();
    let init = r.init_pid.unwrap();
    reap.0.borrow_mut().push(init);
    info.frozen.kill().unwrap();
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(sb.init_pid), None);
    assert_eq!(wait_exit(init), 0);
    let stats = pager.wait().unwrap();
    eprintln!("lazy tree: {stats:?}");
    assert!(stats.faults > 0, "nothing was demand-paged: {stats:?}");
    let text = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 40, "{text}");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(
            *l,
            format!("{i} 20000000"),
            "a forked child saw other memory"
        );
    }
}

/// A tree image with one member's pages file truncated is refused before any process is
/// created, and the frozen source tree resumes and finishes normally.
#[test]
fn truncated_member_image_is_refused_and_the_tree_resumes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let script = format!(
        "sleep 1; echo \"done $$\" > {}; sleep 0.2 | cat",
        out.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("the sleep child", Duration::from_secs(5), || {
        tree(sb.init_pid).iter().any(|p| p.4 == "sleep")
    });
    let before = tree(sb.init_pid);
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    let meta = image::load(&img).unwrap();
    let member = img.join(&meta.members[0].dir).join(image::PAGES_FILE);
    let len = std::fs::metadata(&member).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&member)
        .unwrap()
        .set_len(len - 1)
        .unwrap();
    let ours = |me: i32| {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("stat"))
                    .ok()
                    .and_then(|s| s.rsplit(')').next().map(|r| r.to_string()))
                    .and_then(|r| r.split_whitespace().nth(1).map(|p| p == me.to_string()))
                    .unwrap_or(false)
            })
            .count()
    };
    let me = std::process::id() as i32;
    let kids = ours(me);
    let opts = RestoreOptions {
        pid_mode: PidMode::NewNamespace,
        ..Default::default()
    };
    let e = restore_with(&img, &opts).unwrap_err().to_string();
    assert!(e.contains("proc-") && e.contains("pages file"), "{e}");
    assert_eq!(ours(me), kids, "a failed restore left a process behind");
    assert_eq!(before, tree(sb.init_pid), "the source tree changed");
    info.frozen.resume().unwrap();
    assert_eq!(wait_exit(sb.init_pid), 0);
    reap.0.borrow_mut().clear();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "done 2\n");
}

/// `make` running a recipe `gcc -O2 -c big.c` (make → gcc → cc1, then as) migrated twice
/// mid-compile produces the same object file as an unmigrated build.
#[test]
fn make_running_gcc_migrates_mid_compile() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let mut src = String::new();
    for i in 0..1200 {
        src.push_str(&format!(
            "int f{i}(int *a, int n) {{ int s = {i}; for (int k = 0; k < n; k++) {{ s += a[k] * {i} ^ (s >> 3); if (s % 7 == {}) s -= a[(k*{i})%n]; }} return s; }}\n",
            i % 7
        ));
    }
    let d = tmp.path();
    std::fs::write(d.join("big.c"), src).unwrap();
    std::fs::write(
        d.join("Makefile"),
        "big.o: big.c\n\tgcc -O2 -c big.c -o big.o\n",
    )
    .unwrap();
    let t = Instant::now();
    let st = std::process::Command::new("gcc")
        .args(["-O2", "-c", "big.c", "-o", "want.o"])
        .current_dir(d)
        .status()
        .unwrap();
    assert!(st.success());
    let unmigrated = t.elapsed();
    let make = vec![
        "/usr/bin/make".to_string(),
        "-s".into(),
        "-C".into(),
        d.to_string_lossy().into(),
    ];
    let sb = run_sandboxed(&make, [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("cc1", Duration::from_secs(10), || {
        tree(sb.init_pid).iter().any(|p| p.4 == "cc1")
    });
    std::thread::sleep(unmigrated / 4);
    let (mut init, mut pid) = (sb.init_pid, sb.pid);
    for round in 0..2 {
        let img = d.join(format!("img{round}"));
        let before = tree(init);
        assert!(
            before.iter().any(|p| p.4 == "cc1"),
            "cc1 finished before migration {round}; the test proves nothing: {before:?}"
        );
        let (new_init, took) = migrate(pid, init, &img, &reap);
        eprintln!("make tree migration {round}: {took:?}");
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(init), None);
        init = new_init;
        pid = tree_host_root(init);
        std::thread::sleep(unmigrated / 5);
    }
    assert_eq!(wait_exit(init), 0);
    assert_eq!(
        std::fs::read(d.join("big.o")).unwrap(),
        std::fs::read(d.join("want.o")).unwrap(),
        "the object file differs from an unmigrated build"
    );
    eprintln!("unmigrated compile {unmigrated:?}");
}

/// A file descriptor shared by a shell and its background child (one open file
/// description, no O_APPEND) stays shared: writes after the migration continue at the
/// common offset instead of overwriting each other.
#[test]
fn shared_open_file_description_keeps_one_offset() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("shared");
    let script = format!(
        "exec 3> {}; (echo child-a >&3; sleep 1.5; echo child-b >&3) & sleep 0.5; \
         echo parent-c >&3; wait; echo parent-d >&3",
        f.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("parent-c", Duration::from_secs(5), || {
        std::fs::read_to_string(&f).is_ok_and(|s| s.contains("parent-c"))
    });
    let img = tmp.path().join("img");
    let (init, _) = migrate(sb.pid, sb.init_pid, &img, &reap);
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(sb.init_pid), None);
    // Still one description in the restored tree.
    let meta = image::load(&img).unwrap();
    let sub = image::load(&img.join(&meta.members[0].dir)).unwrap();
    let desc = |m: &image::ImageMeta| m.fds.iter().find(|e| e.fd == 3).unwrap().desc;
    assert_eq!(desc(&meta), desc(&sub), "fd 3 was not seen as shared");
    let root = tree_host_root(init);
    let child = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .find(|p| status_field(*p, "PPid:").and_then(|v| v.parse().ok()) == Some(root))
        .unwrap();
    // SAFETY: kcmp(KCMP_FILE) takes no pointers; 0 means one open file description.
    let same = unsafe { libc::syscall(libc::SYS_kcmp, root, child, 0, 3, 3) };
    assert_eq!(
        same, 0,
        "fd 3 of the restored shell and child are not one description"
    );
    assert_eq!(wait_exit(init), 0);
    assert_eq!(
        std::fs::read_to_string(&f).unwrap(),
        "child-a\nparent-c\nchild-b\nparent-d\n"
    );
}

/// Pre-copy of a tree: every process's pages are copied while the pipeline runs, the final
/// freeze copies only what changed, and the restored pipeline finishes with the output of
/// an unmigrated run.
#[test]
fn gzip_pipeline_precopy() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let big = big_file(tmp.path());
    let want = {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("gzip -c < {} | sha256sum", big.display()))
            .output()
            .unwrap();
        String::from_utf8(o.stdout).unwrap()
    };
    let out = tmp.path().join("out");
    let script = format!(
        "gzip -c < {} | sha256sum > {}",
        big.display(),
        out.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("gzip and sha256sum", Duration::from_secs(5), || {
        let t = tree(sb.init_pid);
        t.iter().any(|p| p.4 == "gzip") && t.iter().any(|p| p.4 == "sha256sum")
    });
    std::thread::sleep(Duration::from_millis(300));
    let before = tree(sb.init_pid);
    let img = tmp.path().join("img");
    let mut pc = wisp_procmig::PreCopy::start(sb.pid, &img).unwrap();
    for _ in 0..2 {
        pc.round().unwrap();
    }
    let rounds = pc.rounds.clone();
    let info = pc.finish().unwrap();
    eprintln!(
        "tree pre-copy: rounds {rounds:?}, final freeze copied {} pages of {} in the image, frozen {} ms",
        info.pages, info.image_pages, info.frozen_ms
    );
    assert_eq!(info.processes, before.len());
    assert!(
        info.pages < info.image_pages,
        "the final freeze copied everything again ({} of {})",
        info.pages,
        info.image_pages
    );
    let opts = RestoreOptions {
        pid_mode: PidMode::NewNamespace,
        ..Default::default()
    };
    let r = restore_with(&img, &opts).unwrap();
    let init = r.init_pid.unwrap();
    reap.0.borrow_mut().push(init);
    info.frozen.kill().unwrap();
    let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(sb.init_pid), None);
    assert_eq!(before, tree(init));
    assert_eq!(wait_exit(init), 0);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), want);
}

/// A restore that fails late — in the rebuild of a member, after every process of the tree
/// was created and the root already rebuilt — kills everything it created; the frozen
/// source tree then resumes and finishes normally.
#[test]
fn late_member_failure_leaves_nothing_and_the_tree_resumes() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let wd = tmp.path().join("member-cwd-that-goes-away");
    std::fs::create_dir(&wd).unwrap();
    let script = format!(
        "(cd {} && sleep 1.5); echo \"done $$ $?\" > {}",
        wd.display(),
        out.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("the sleep", Duration::from_secs(5), || {
        tree(sb.init_pid).iter().any(|p| p.4 == "sleep")
    });
    let before = tree(sb.init_pid);
    let img = tmp.path().join("img");
    let info = dump(sb.pid, &img).unwrap();
    // sh and its subshell (which execs sleep, in the directory that goes away).
    assert_eq!(info.processes, 2, "{before:?}");
    std::fs::remove_dir(&wd).unwrap();
    let sleeping = || {
        std::fs::read_dir("/proc")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim() == "sleep")
                    && std::fs::read_to_string(e.path().join("cmdline"))
                        .is_ok_and(|c| c.contains("1.5"))
            })
            .count()
    };
    assert_eq!(sleeping(), 1);
    let opts = RestoreOptions {
        pid_mode: PidMode::NewNamespace,
        ..Default::default()
    };
    let e = restore_with(&img, &opts).unwrap_err().to_string();
    assert!(e.contains("member-cwd-that-goes-away"), "{e}");
    assert_eq!(sleeping(), 1, "a failed restore left a process behind");
    assert_eq!(before, tree(sb.init_pid), "the source tree changed");
    std::fs::create_dir(&wd).unwrap();
    info.frozen.resume().unwrap();
    assert_eq!(wait_exit(sb.init_pid), 0);
    reap.0.borrow_mut().clear();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "done 2 0\n");
}

/// A process group whose leader exited (its member lives on) cannot be recreated: the dump
/// says so and the job runs on untouched.
#[test]
fn process_group_without_leader_is_refused_clearly() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let script = format!(
        "perl -e 'setpgrp(0, 0); fork or do {{ sleep 2; exit 0 }}; exit 0'; sleep 0.5; echo ok > {}",
        out.display()
    );
    let sb = run_sandboxed(&sh(&script), [None, None, None]).unwrap();
    let reap = Reap(std::cell::RefCell::new(vec![sb.init_pid]));
    wait_for("the orphaned group member", Duration::from_secs(5), || {
        tree(sb.init_pid)
            .iter()
            .any(|p| p.4 == "perl" && p.1 == 1 && p.2 != 0 && p.2 != p.0)
    });
    let e = dump(sb.pid, &tmp.path().join("img"))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("process group") && e.contains("no leader"),
        "{e}"
    );
    assert_eq!(wait_exit(sb.init_pid), 0);
    reap.0.borrow_mut().clear();
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "ok\n");
}
