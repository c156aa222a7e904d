//! End-to-end authorization (issue 10): the file server checks permissions itself, for the
//! uid, gid and groups a host asserts, squashes root from hosts it does not trust for root,
//! and keeps every request inside the domain; foreign jobs cannot see, signal or trace the
//! owner's processes; only a job's owner or root may signal it; an owner can forbid foreign
//! jobs.
//!
//! The client kernel's own check (`default_permissions`) is bypassed by a client that talks
//! the wire protocol directly from a workstation's network namespace with forged
//! credentials: what it gets is what the server alone decides.

use std::sync::Arc;
use std::time::{Duration, Instant};

use wisp_proto::msg::{Cred, Ino, OpenMode, Request, Response, SetAttrs, ROOT_INO};
use wisp_proto::rpc::{RpcClient, RpcError};
use wisp_tests::{sim_with, Sim};

fn who(uid: u32, gid: u32, groups: &[u32]) -> Cred {
    Cred {
        uid,
        gid,
        pid: 0,
        groups: groups.to_vec(),
    }
}

const READ: OpenMode = OpenMode {
    read: true,
    write: false,
    truncate: false,
    nonblock: false,
};
const WRITE: OpenMode = OpenMode {
    read: false,
    write: true,
    truncate: false,
    nonblock: false,
};

/// Send `reqs` to `addr` from `host`'s network namespace, authenticated as client `name`,
/// one after the other; returns each answer.
fn raw_calls(
    s: &Sim,
    host: &str,
    name: &str,
    addr: String,
    reqs: Vec<Request>,
) -> Vec<Result<Response, RpcError>> {
    let key = wisp_proto::key::ClusterKey::load(&s.key_file).unwrap();
    let name = name.to_string();
    s.in_netns(host, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let c = RpcClient::start(
            rt.handle().clone(),
            addr,
            key,
            name,
            Duration::from_secs(30),
            Arc::new(|_| Ok(())),
        );
        let out = reqs.into_iter().map(|r| rt.block_on(c.call(r))).collect();
        drop(c);
        out
    })
}

/// A raw file-server client on `host` named `name` (the name the server trusts or not).
struct Raw<'a> {
    s: &'a Sim,
    host: &'static str,
    name: &'static str,
}

impl Raw<'_> {
    fn call(&self, r: Request) -> Result<Response, RpcError> {
        raw_calls(self.s, self.host, self.name, self.s.server_addr(), vec![r])
            .pop()
            .unwrap()
    }

    fn lookup(&self, c: &Cred, parent: Ino, name: &str) -> Result<Ino, RpcError> {
        match self.call(Request::Lookup {
            cred: c.clone(),
            parent,
            name: name.as_bytes().to_vec(),
        })? {
            Response::Entry(a) => Ok(a.ino),
            o => panic!("lookup {name}: {o:?}"),
        }
    }

    /// Open for reading and read the first bytes, as `c`.
    fn read(&self, c: &Cred, ino: Ino) -> Result<Vec<u8>, RpcError> {
        self.call(Request::Open {
            cred: c.clone(),
            ino,
            mode: READ,
        })?;
        let r = self.call(Request::Read {
            cred: c.clone(),
            ino,
            offset: 0,
            size: 4096,
            nonblock: false,
        });
        let _ = self.call(Request::Close { ino, mode: READ });
        match r? {
            Response::Data(d) => Ok(d),
            o => panic!("read: {o:?}"),
        }
    }
}

fn errno_of<T: std::fmt::Debug>(r: Result<T, RpcError>, what: &str) -> i32 {
    match r {
        Err(e) => e.errno(),
        Ok(v) => panic!("{what}: allowed ({v:?}), expected a refusal"),
    }
}

const SETUP: &str = r#"set -e
mkdir -p /wisp/az && chmod 755 /wisp/az && cd /wisp/az
printf 'top secret\n' > secret && chown 1000:1000 secret && chmod 600 secret
printf 'group data\n' > grp && chown 1000:2000 grp && chmod 640 grp
mkdir private && printf 'hidden\n' > private/f && chown -R 1000:1000 private && chmod 700 private
mkdir tmp && chmod 1777 tmp && printf 'mine\n' > tmp/mine && chown 1000:1000 tmp/mine && chmod 666 tmp/mine
ln -s /etc/passwd pw && ln -s ../../../../../../etc/shadow up
sync"#;

/// Another user's 0600 file, read from any host, with the client kernel's check bypassed:
/// EACCES from the server. Groups and supplementary groups, search permission on every
/// directory, the sticky bit and setattr rules are the server's too; root from a host not
/// trusted for root is nobody there, through the real mount as well.
#[test]
fn the_server_enforces_permissions_and_squashes_untrusted_root() {
    // ws1 is trusted for root (it sets things up as root); ws2 is not.
    let s = sim_with("authz", 2, |sp| sp.trust_root = vec!["ws1".into()]);
    s.ok("ws1", SETUP);

    // Through the mount: the owner reads it; another user does not (the kernel's check).
    s.ok(
        "ws2",
        "test \"$(setpriv --reuid 1000 --regid 1000 --clear-groups cat /wisp/az/secret)\" = 'top secret'",
    );
    let (code, _, err) = s.run(
        "ws2",
        "setpriv --reuid 1001 --regid 1001 --clear-groups cat /wisp/az/secret",
    );
    assert!(
        code != 0 && err.contains("Permission denied"),
        "uid 1001 read another user's 0600 file through /wisp: {code} {err}"
    );

    // Root on ws2 (untrusted): the client kernel lets root through, the server does not.
    let (code, out, err) = s.run("ws2", "cat /wisp/az/secret");
    assert!(
        code != 0 && err.contains("Permission denied") && !out.contains("secret"),
        "root on an untrusted host read a 0600 file: {code} {out} {err}"
    );
    let (code, _, err) = s.run("ws2", "touch /wisp/az/by-untrusted-root");
    assert!(
        code != 0 && err.contains("Permission denied"),
        "root on an untrusted host created a file in a root-owned 0755 directory: {err}"
    );
    s.ok("ws2", "test ! -e /wisp/az/by-untrusted-root");
    // What an untrusted root may create (in a world-writable directory) belongs to nobody.
    s.ok("ws2", "touch /wisp/az/tmp/by-root");
    assert_eq!(
        s.ok("ws1", "stat -c %u:%g /wisp/az/tmp/by-root").trim(),
        "65534:65534"
    );
    // Root on ws1 (trusted) is root.
    assert_eq!(s.ok("ws1", "cat /wisp/az/secret"), "top secret\n");

    // The wire protocol from ws2's namespace, with forged credentials.
    let raw = Raw {
        s: &s,
        host: "ws2",
        name: "ws2",
    };
    let (owner, other) = (who(1000, 1000, &[]), who(1001, 1001, &[]));
    let az = raw.lookup(&other, ROOT_INO, "az").unwrap();
    let secret = raw.lookup(&other, az, "secret").unwrap();
    // Positive control: the owner's credentials read it.
    assert_eq!(raw.read(&owner, secret).unwrap(), b"top secret\n");
    assert_eq!(
        errno_of(
            raw.call(Request::Open {
                cred: other.clone(),
                ino: secret,
                mode: READ
            }),
            "open of another user's 0600 file"
        ),
        libc::EACCES
    );
    // Without an open (a client that skips it): every read and write is checked too.
    assert_eq!(
        errno_of(
            raw.call(Request::Read {
                cred: other.clone(),
                ino: secret,
                offset: 0,
                size: 100,
                nonblock: false
            }),
            "read of another user's 0600 file"
        ),
        libc::EACCES
    );
    assert_eq!(
        errno_of(
            raw.call(Request::Write {
                cred: other.clone(),
                ino: secret,
                offset: 0,
                data: b"overwritten".to_vec(),
                append: false,
                nonblock: false
            }),
            "write to another user's 0600 file"
        ),
        libc::EACCES
    );
    // Groups: the file's group reads it, as primary or supplementary group; others do not.
    let grp = raw.lookup(&other, az, "grp").unwrap();
    assert_eq!(
        raw.read(&who(1001, 2000, &[]), grp).unwrap(),
        b"group data\n"
    );
    assert_eq!(
        raw.read(&who(1001, 1001, &[5, 2000]), grp).unwrap(),
        b"group data\n"
    );
    assert_eq!(
        errno_of(
            raw.read(&who(1001, 1001, &[5]), grp),
            "read by a non-member"
        ),
        libc::EACCES
    );
    // Search permission on a directory: no lookup in a 0700 directory of another user,
    // no listing either.
    let private = raw.lookup(&other, az, "private").unwrap();
    assert_eq!(
        errno_of(
            raw.lookup(&other, private, "f"),
            "lookup in a 0700 directory"
        ),
        libc::EACCES
    );
    assert_eq!(
        errno_of(
            raw.call(Request::ReadDir {
                cred: other.clone(),
                ino: private,
                offset: 0,
                max: 10
            }),
            "listing of a 0700 directory"
        ),
        libc::EACCES
    );
    assert!(raw.lookup(&owner, private, "f").is_ok());
    // Sticky directory: another user's entry cannot be removed or renamed away.
    let tmp = raw.lookup(&other, az, "tmp").unwrap();
    assert_eq!(
        errno_of(
            raw.call(Request::Unlink {
                cred: other.clone(),
                parent: tmp,
                name: b"mine".to_vec()
            }),
            "unlink of another user's file in a sticky directory"
        ),
        libc::EPERM
    );
    assert_eq!(
        errno_of(
            raw.call(Request::Rename {
                cred: other.clone(),
                parent: tmp,
                name: b"mine".to_vec(),
                new_parent: tmp,
                new_name: b"stolen".to_vec(),
                flags: 0
            }),
            "rename of another user's file in a sticky directory"
        ),
        libc::EPERM
    );
    // No new names in a directory without write permission.
    assert_eq!(
        errno_of(
            raw.call(Request::Create {
                cred: other.clone(),
                parent: az,
                name: b"planted".to_vec(),
                mode: 0o644,
                excl: true,
                mode_open: WRITE
            }),
            "create in another user's 0755 directory"
        ),
        libc::EACCES
    );
    // setattr: chmod and utimes only by the owner, chown only by root.
    let setattr = |c: &Cred, f: fn(&mut SetAttrs)| {
        let mut set = SetAttrs::default();
        f(&mut set);
        raw.call(Request::SetAttr {
            cred: c.clone(),
            ino: secret,
            set,
        })
    };
    assert_eq!(
        errno_of(
            setattr(&other, |s| s.mode = Some(0o644)),
            "chmod by another user"
        ),
        libc::EPERM
    );
    assert_eq!(
        errno_of(
            setattr(&owner, |s| s.uid = Some(1001)),
            "chown by the owner"
        ),
        libc::EPERM
    );
    assert_eq!(
        errno_of(
            setattr(&other, |s| s.size = Some(0)),
            "truncate by another user"
        ),
        libc::EACCES
    );
    assert_eq!(
        errno_of(
            setattr(&other, |s| s.mtime =
                Some(wisp_proto::msg::SetTime::At(Default::default()))),
            "utimes by another user"
        ),
        libc::EPERM
    );
    // xattrs: trusted.* is root's.
    assert_eq!(
        errno_of(
            raw.call(Request::SetXattr {
                cred: owner.clone(),
                ino: secret,
                name: b"trusted.x".to_vec(),
                value: b"1".to_vec(),
                flags: 0
            }),
            "trusted xattr by a user"
        ),
        libc::EPERM
    );
    assert_eq!(
        errno_of(
            raw.call(Request::SetXattr {
                cred: other.clone(),
                ino: secret,
                name: b"user.x".to_vec(),
                value: b"1".to_vec(),
                flags: 0
            }),
            "user xattr on another user's 0600 file"
        ),
        libc::EACCES
    );
    // Root squash on the wire: uid 0 from ws2 is nobody; the same request named ws1 is root.
    assert_eq!(
        errno_of(raw.read(&Cred::ROOT, secret), "root from an untrusted host"),
        libc::EACCES
    );
    let trusted = Raw {
        s: &s,
        host: "ws1",
        name: "ws1",
    };
    assert_eq!(trusted.read(&Cred::ROOT, secret).unwrap(), b"top secret\n");
    // Nothing above changed the file.
    assert_eq!(
        s.ok("ws1", "cat /wisp/az/secret; stat -c %a:%u /wisp/az/secret"),
        "top secret\n600:1000\n"
    );
    s.ok(
        "ws1",
        "test -e /wisp/az/tmp/mine && test ! -e /wisp/az/tmp/stolen && test ! -e /wisp/az/planted",
    );

    // The refusals were counted.
    let metrics = s.ok(
        "srv1",
        "bash -c 'exec 3<>/dev/tcp/127.0.0.1/9465; printf \"GET /metrics HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'",
    );
    let denied: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wisp_server_denied_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no wisp_server_denied_total in\n{metrics}"));
    assert!(denied >= 10.0, "only {denied} refusals counted");
}

/// No request reaches outside the domain: names with `/`, NUL, `.`, `..` or too long are
/// refused, `..` of the root is the root, and symlinks are data the server never follows:
/// reading a symlink to /etc/shadow through the server gives an error, not the file.
#[test]
fn traversal_and_symlink_escapes_are_refused() {
    let s = sim_with("authz-esc", 2, |sp| sp.trust_root = vec!["ws1".into()]);
    s.ok("ws1", SETUP);
    let raw = Raw {
        s: &s,
        host: "ws2",
        name: "ws1",
    };
    let root = Cred::ROOT; // trusted: only the namespace rules stand in the way
    let az = raw.lookup(&root, ROOT_INO, "az").unwrap();
    for bad in ["../etc", "a/b", "/etc/passwd", "x\0y"] {
        assert_eq!(
            errno_of(raw.lookup(&root, az, bad), &format!("lookup {bad:?}")),
            libc::EINVAL,
            "{bad:?}"
        );
    }
    for bad in [".", "..", "../escape", "a/b", "x\0y", ""] {
        let e = errno_of(
            raw.call(Request::Create {
                cred: root.clone(),
                parent: az,
                name: bad.as_bytes().to_vec(),
                mode: 0o644,
                excl: true,
                mode_open: WRITE,
            }),
            &format!("create {bad:?}"),
        );
        assert_eq!(e, libc::EINVAL, "create {bad:?}");
        let e = errno_of(
            raw.call(Request::Mkdir {
                cred: root.clone(),
                parent: az,
                name: bad.as_bytes().to_vec(),
                mode: 0o755,
            }),
            &format!("mkdir {bad:?}"),
        );
        assert_eq!(e, libc::EINVAL, "mkdir {bad:?}");
    }
    let long = "n".repeat(300);
    assert_eq!(
        errno_of(raw.lookup(&root, az, &long), "lookup of a 300-byte name"),
        libc::ENAMETOOLONG
    );
    assert_eq!(
        errno_of(
            raw.call(Request::Rename {
                cred: root.clone(),
                parent: az,
                name: b"secret".to_vec(),
                new_parent: az,
                new_name: b"../../secret".to_vec(),
                flags: 0
            }),
            "rename to ../../secret"
        ),
        libc::EINVAL
    );
    // `..` of the domain's root is the root: nothing lies above it.
    assert_eq!(raw.lookup(&root, ROOT_INO, "..").unwrap(), ROOT_INO);
    // Symlinks: the server hands out the target, never the file it names.
    for link in ["pw", "up"] {
        let ino = raw.lookup(&root, az, link).unwrap();
        match raw.call(Request::ReadLink { ino }).unwrap() {
            Response::Data(t) => assert!(t.ends_with(b"etc/passwd") || t.ends_with(b"etc/shadow")),
            o => panic!("readlink: {o:?}"),
        }
        let r = raw.call(Request::Read {
            cred: root.clone(),
            ino,
            offset: 0,
            size: 4096,
            nonblock: false,
        });
        assert!(
            !matches!(&r, Ok(Response::Data(d)) if !d.is_empty()),
            "reading symlink {link} through the server returned data: {r:?}"
        );
    }
    // Through the mount, the link resolves on the client, to the client's own file (here
    // every simulated host shares one root file system, so it is the same file); the
    // server's data directory never appears in /wisp.
    s.ok("ws2", "test \"$(readlink /wisp/az/pw)\" = /etc/passwd");
    let data = s.data_root.display().to_string();
    s.ok(
        "ws2",
        &format!("! ls -aR /wisp 2>/dev/null | grep -q -e meta.redb -e '{data}'"),
    );
}

/// A C program that tries to ptrace-attach to a pid and says what happened.
const PTRACE_C: &str = r#"#include <stdio.h>
#include <stdlib.h>
#include <errno.h>
#include <string.h>
#include <sys/ptrace.h>
int main(int argc, char **argv) {
    long r = ptrace(PTRACE_ATTACH, atoi(argv[1]), 0, 0);
    if (r == 0) printf("ptrace-attached\n"); else printf("ptrace-refused %s\n", strerror(errno));
    return 0;
}
"#;

/// Prepare uid 1000's and uid 1001's keys (copies of the cluster key they may read) and a
/// world-writable sticky /wisp/.rexec for their jobs' pipes.
fn user_keys(s: &Sim) -> (String, String) {
    let k = s.key_file.display().to_string();
    let mut out = vec![];
    for uid in [1000, 1001] {
        let p = format!("/tmp/{}-key-{uid}", s.name);
        s.ok(
            "ws1",
            &format!("cp {k} {p} && chown {uid}:{uid} {p} && chmod 600 {p}"),
        );
        out.push(p);
    }
    s.ok(
        "ws1",
        "mkdir -p /wisp/.rexec /wisp/azj && chmod 1777 /wisp/.rexec /wisp/azj",
    );
    (out[0].clone(), out[1].clone())
}

fn as_user(uid: u32, key: &str, cmd: &str) -> String {
    format!("WISP_KEY={key} setpriv --reuid {uid} --regid {uid} --clear-groups -- {cmd}")
}

/// A foreign job, even one of the owner's own uid, cannot name the owner's processes: its
/// /proc shows only its own, kill and ptrace of an owner's pid fail. `wisp kill` is for the
/// job's owner and root only, enforced by the agent.
#[test]
fn foreign_jobs_cannot_see_signal_or_trace_the_owner_and_only_owners_kill() {
    let s = sim_with("authz-job", 2, |_| {});
    let (k1000, k1001) = user_keys(&s);
    std::fs::write(format!("/tmp/{}-pt.c", s.name), PTRACE_C).unwrap();
    s.ok(
        "ws1",
        &format!(
            "cc -o /wisp/azj/pt /tmp/{}-pt.c && chmod 755 /wisp/azj/pt",
            s.name
        ),
    );
    // The owner's process on ws2 (uid 1000, as the job will be).
    let owner_pid: i32 = s
        .ok(
            "ws2",
            "setsid setpriv --reuid 1000 --regid 1000 --clear-groups sleep 600 >/dev/null 2>&1 </dev/null & echo $!",
        )
        .trim()
        .parse()
        .unwrap();
    struct Reap(i32);
    impl Drop for Reap {
        fn drop(&mut self) {
            // SAFETY: kill(2) of the process this test started.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
    let _reap = Reap(owner_pid);
    s.lend(&["ws2"]);
    let script = format!(
        "kill -0 {owner_pid} 2>/dev/null && echo kill-delivered || echo kill-refused; \
         kill -0 $$ && echo self-ok; \
         test -e /proc/{owner_pid} && echo proc-visible || echo proc-hidden; \
         echo procs=$(ls /proc | grep -c '^[0-9][0-9]*$'); \
         /wisp/azj/pt {owner_pid}"
    );
    let out = s.ok(
        "ws1",
        &format!(
            "cd /wisp/azj && {}",
            as_user(1000, &k1000, &format!("rexec --host ws2 sh -c '{script}'"))
        ),
    );
    assert!(out.contains("kill-refused"), "{out}");
    assert!(out.contains("self-ok"), "{out}");
    assert!(out.contains("proc-hidden"), "{out}");
    assert!(out.contains("ptrace-refused"), "{out}");
    let procs: u32 = out
        .lines()
        .find_map(|l| l.strip_prefix("procs="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        procs <= 6,
        "the job's /proc lists {procs} processes:\n{out}"
    );
    // The owner's process never noticed.
    assert!(std::path::Path::new(&format!("/proc/{owner_pid}")).exists());

    // wisp kill: a job of uid 1000 on ws2.
    let c = s.c.clone();
    let k2 = k1000.clone();
    let job = std::thread::spawn(move || {
        c.sh(
            "ws1",
            &format!(
                "cd /wisp/azj && {}",
                as_user(1000, &k2, "rexec --host ws2 sleep 120")
            ),
        )
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let id = loop {
        if let Some((id, _, _, _)) = s.ps().into_iter().find(|(_, h, _, _)| h == "ws2") {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "the job never showed up in wisp ps"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let bin = s.bin_dir.join("wisp").display().to_string();
    let reg = s.registry_addrs();
    let (code, _, err) = s.run(
        "ws1",
        &as_user(
            1001,
            &k1001,
            &format!("{bin} kill --registry {reg} --key {k1001} {id}"),
        ),
    );
    assert!(
        code != 0 && err.contains("only its owner or root"),
        "uid 1001 killed uid 1000's job: {code} {err}"
    );
    // The agent itself refuses, whatever a client claims to have checked.
    let n: u64 = id.rsplit('.').next().unwrap().parse().unwrap();
    let agent = format!("{}:7071", s.host("ws2").unwrap().addr);
    let r = raw_calls(
        &s,
        "ws1",
        "ws1",
        agent.clone(),
        vec![
            Request::JobSignal {
                job: n,
                signal: libc::SIGKILL,
                uid: 1001,
            },
            Request::JobSignal {
                job: n,
                signal: 0,
                uid: 1000,
            },
        ],
    );
    match &r[0] {
        Err(e) if e.errno() == libc::EPERM && e.to_string().contains("only its owner or root") => {}
        other => panic!("the agent let uid 1001 signal uid 1000's job: {other:?}"),
    }
    assert!(
        matches!(r[1], Ok(Response::Ok)),
        "owner's signal 0: {:?}",
        r[1]
    );
    assert!(s.ps().iter().any(|(j, _, _, _)| *j == id), "the job died");
    // Its owner may.
    s.ok(
        "ws1",
        &as_user(
            1000,
            &k1000,
            &format!("{bin} kill --registry {reg} --key {k1000} {id}"),
        ),
    );
    let o = job.join().unwrap().unwrap();
    assert!(!o.status.success(), "the killed job exited 0");
}

/// `wispd --no-foreign`: the host is never lent out, and its agent refuses jobs from other
/// hosts (rexec --host, which skips placement) while it runs its own.
#[test]
fn an_owner_can_forbid_foreign_jobs() {
    let s = sim_with("authz-nof", 2, |sp| {
        sp.wispd_args.push("--no-foreign".into())
    });
    s.ok("ws1", "mkdir -p /wisp/nof");
    s.wisp("owner ws2 idle");
    let (code, _, err) = s.run("ws1", "cd /wisp/nof && rexec --host ws2 echo ran-foreign");
    assert!(
        code != 0 && err.contains("forbids foreign jobs"),
        "a foreign job ran on a --no-foreign host: {code} {err}"
    );
    assert_eq!(
        s.ok("ws2", "cd /wisp/nof && rexec --host ws2 echo ran-own")
            .trim(),
        "ran-own"
    );
    // Placement: the registry never sees ws2 idle, though its owner file says so (several
    // heartbeats, 2 s apart).
    let until = Instant::now() + Duration::from_secs(8);
    while Instant::now() < until {
        let hosts = s.wisp("hosts");
        assert!(
            !hosts.lines().any(|l| l.starts_with("ws2*")),
            "ws2 offered as idle:\n{hosts}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Without a host, rexec runs the command at home (ws1 is not idle either: --no-foreign).
    assert_eq!(
        s.ok(
            "ws1",
            "cd /wisp/nof && rexec -v sh -c 'cat /proc/sys/kernel/hostname' 2>&1; true"
        )
        .lines()
        .filter(|l| l.contains("ws2"))
        .count(),
        0,
        "a job was placed on ws2"
    );
}
