//! End-to-end: the global file system on a simulated cluster (issue: foundation).
//! Every test brings up its own cluster (one server, real FUSE mounts on workstations in
//! their own namespaces, real TCP between them) and tears it down afterwards.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use wisp_tests::sim;

/// A tree of files from 0 B to 100 MiB, a sparse file with data past 4 GiB, a symlink, a
/// hard link and a setuid mode, written on ws1, reads back identically on ws2.
#[test]
fn tree_written_on_one_host_reads_identically_on_another() {
    let s = sim("tree", 2);
    s.ok(
        "ws1",
        r#"set -e
        src=$(mktemp -d /tmp/wisp-tree.XXXXXX)
        for n in 0 1 4095 4096 4097 65537 1048579 104857600; do head -c $n /dev/urandom > $src/f$n; done
        mkdir -p /wisp/tree/sub/deeper
        cp $src/f* /wisp/tree/
        cp $src/f4097 /wisp/tree/sub/deeper/x
        truncate -s 10G /wisp/tree/sparse
        printf 'past4g' | dd of=/wisp/tree/sparse bs=1 seek=5368709120 conv=notrunc status=none
        ln -s ../f1 /wisp/tree/sub/link
        ln /wisp/tree/f4096 /wisp/tree/hard
        chmod 4751 /wisp/tree/f1
        (cd $src && sha256sum f*) > /tmp/wisp-tree.sums
        rm -rf $src"#,
    );
    let listing = "cd /wisp/tree && find . | sort | while read p; do stat -c '%n %s %a %h %F %u %g' \"$p\"; done";
    let a = s.ok("ws1", listing);
    let b = s.ok("ws2", listing);
    assert_eq!(a, b, "metadata differs between hosts");
    assert!(b.contains("./sparse 10737418240 644 1 regular file"), "{b}");
    assert!(b.contains("./f1 1 4751 1 regular file"), "{b}");
    assert!(b.contains("./hard 4096 644 2 regular file"), "{b}");
    assert!(b.contains("./sub/link 5 777 1 symbolic link"), "{b}");
    let want = std::fs::read_to_string("/tmp/wisp-tree.sums").expect("sums");
    let got = s.ok("ws2", "cd /wisp/tree && sha256sum f*");
    assert_eq!(got, want, "file contents differ on the reading host");
    assert_eq!(
        s.ok(
            "ws2",
            "dd if=/wisp/tree/sparse bs=1 skip=5368709120 count=6 status=none"
        ),
        "past4g"
    );
    assert_eq!(
        s.ok(
            "ws2",
            "readlink /wisp/tree/sub/link; cat /wisp/tree/sub/link | wc -c"
        ),
        "../f1\n1\n"
    );
    // The sparse file stays sparse on the server: far fewer blocks than its size.
    let blocks: u64 = s
        .ok("ws2", "stat -c %b /wisp/tree/sparse")
        .trim()
        .parse()
        .unwrap();
    assert!(blocks < 1024, "sparse file allocated {blocks} blocks");

    // Changes made on ws2 are seen on ws1 at once.
    s.ok("ws2", "cd /wisp/tree && mv f0 sub/moved && ln f1 sub/f1link && ln -sf f4095 sym && chmod 600 f65537 && rm f4097 && mv sub renamed");
    let v = s.ok("ws1", "cd /wisp/tree && ls; stat -c '%a %h' f65537 renamed/f1link; readlink sym; test ! -e f4097 && echo gone");
    assert!(v.contains("renamed") && !v.contains("\nsub\n"), "{v}");
    assert!(v.contains("600 1\n4751 2\nf4095\ngone"), "{v}");
    std::fs::remove_file("/tmp/wisp-tree.sums").ok();
}

/// A real program suite gives the same results in /wisp as on the local disk.
#[test]
fn program_suite_matches_local_ext4() {
    for tool in ["gcc", "make", "git", "sqlite3", "tar", "perl"] {
        assert!(
            std::process::Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .status()
                .unwrap()
                .success(),
            "{tool} is not installed; run scripts/test.sh (it installs the test dependencies)"
        );
    }
    let s = sim("suite", 1);
    let suite = r#"set -e
        D=$1; rm -rf $D; mkdir -p $D; cd $D
        mkdir proj
        cat > proj/util.c <<'C'
int add(int a, int b) { return a + b; }
C
        cat > proj/main.c <<'C'
#include <stdio.h>
int add(int, int);
int main(void) { int s = 0; for (int i = 0; i < 1000; i++) s = add(s, i); printf("sum=%d\n", s); return 0; }
C
        printf 'app: main.o util.o\n\t$(CC) -o app main.o util.o\n%%.o: %%.c\n\t$(CC) -O2 -c $<\nclean:\n\trm -f app *.o\n' > proj/Makefile
        tar czf proj.tar.gz proj && rm -rf proj
        tar xzf proj.tar.gz
        make -s -C proj -j4
        ./proj/app
        cd proj
        git init -q . && git config user.email t@t && git config user.name t
        git add -A && git commit -qm first && echo change >> util.c && git commit -qam second
        git log --format=%s
        git fsck --no-progress 2>&1 | grep -v '^Checking' || true
        cd ..
        sqlite3 db.sqlite 'create table t(a integer, b text); begin; ' \
          "$(for i in $(seq 1 500); do printf "insert into t values($i,'row$i');"; done)" 'commit;' \
          'select count(*), sum(a) from t; select b from t where a = 250;'
        sqlite3 db.sqlite 'pragma integrity_check;'
        find . -path ./proj/.git -prune -o -type f -print | sort
        tar cf - proj/*.c proj/Makefile | tar tf - | sort
        du -sb --apparent-size proj/main.c proj/util.c
        "#;
    std::fs::write("/tmp/wisp-suite.sh", suite).unwrap();
    let local = s.ok("ws1", "sh /tmp/wisp-suite.sh /tmp/wisp-suite-local");
    let wisp = s.ok("ws1", "sh /tmp/wisp-suite.sh /wisp/suite");
    assert_eq!(
        wisp, local,
        "program suite differs between /wisp and the local disk"
    );
    assert!(
        wisp.contains("sum=499500")
            && wisp.contains("second\nfirst")
            && wisp.contains("500|125250\nrow250\nok"),
        "{wisp}"
    );
    // The other host sees the built program and can run it.
    assert_eq!(s.ok("ws1", "/wisp/suite/proj/app"), "sum=499500\n");
    let _ = std::fs::remove_dir_all("/tmp/wisp-suite-local");
}

/// SIGKILL the server, restart it: every fsync'd byte is there and clients carry on.
#[test]
fn server_sigkill_keeps_fsynced_data() {
    let mut s = sim("kill", 2);
    s.ok(
        "ws1",
        r#"set -e
        mkdir /wisp/durable
        for i in 1 2 3 4 5; do head -c $((i * 300000)) /dev/urandom > /tmp/wisp-dur-$i; dd if=/tmp/wisp-dur-$i of=/wisp/durable/f$i bs=64k conv=fsync status=none; done
        perl -e 'open(F, ">", "/wisp/durable/meta") or die; print F "created-and-fsynced\n"; F->flush; use IO::Handle; F->sync or die "fsync: $!"; close F'
        (cd /tmp && sha256sum wisp-dur-*) | sed 's/wisp-dur-/f/' > /tmp/wisp-dur.sums"#,
    );
    s.kill_daemon("srv1", libc::SIGKILL).unwrap();
    // A client call while the server is down waits (bounded) and succeeds once it is back.
    let waiting = s
        .command("ws2", &["cat", "/wisp/durable/meta"])
        .unwrap()
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    std::thread::sleep(Duration::from_millis(300));
    s.start_daemon("srv1").unwrap();
    let out = waiting.unwrap().wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "read across the restart failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = std::fs::read_to_string("/tmp/wisp-dur.sums").unwrap();
    assert_eq!(
        s.ok("ws2", "cd /wisp/durable && sha256sum f1 f2 f3 f4 f5"),
        want
    );
    assert_eq!(
        s.ok("ws1", "cat /wisp/durable/meta"),
        "created-and-fsynced\n"
    );
    s.ok(
        "ws1",
        "echo after-restart > /wisp/durable/new && rm /tmp/wisp-dur-*",
    );
    assert_eq!(s.ok("ws2", "cat /wisp/durable/new"), "after-restart\n");
}

fn read_until_closed(mut sock: TcpStream) -> std::io::Result<usize> {
    sock.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut buf = [0u8; 4096];
    let mut total = 0;
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return Ok(total),
            Ok(n) => total += n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(total),
            Err(e) => return Err(e),
        }
    }
}

/// Garbage, truncated and oversized frames, a wrong key, an over-long name and a rename of a
/// directory into its own child all get a clear error; the server stays up for everyone.
#[test]
fn bad_input_is_rejected_and_the_server_stays_up() {
    let s = sim("bad", 1);
    let addr = s.server_addr();
    let log = s.log_path("srv1");
    s.in_netns("ws1", move || {
        // Garbage where a handshake should be.
        let mut g = TcpStream::connect(&addr).unwrap();
        g.write_all(&[0, 0, 0, 16]).unwrap();
        g.write_all(b"this is not wisp").unwrap();
        read_until_closed(g).unwrap();
        // An oversized frame header before authentication.
        let mut o = TcpStream::connect(&addr).unwrap();
        o.write_all(&(64u32 << 20).to_be_bytes()).unwrap();
        let _ = o.write_all(&[7u8; 1024]);
        read_until_closed(o).unwrap();
        // A truncated frame, then the peer goes away.
        let mut t = TcpStream::connect(&addr).unwrap();
        t.write_all(&[0, 0, 1, 0, 1, 2, 3]).unwrap();
        drop(t);
        // A client with the wrong key is refused.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let e = rt
            .block_on(async {
                let sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
                wisp_proto::auth::client_handshake(
                    sock,
                    &wisp_proto::identity::throwaway("ws1"),
                    "intruder",
                )
                .await
            })
            .err()
            .expect("a host of another cluster must not authenticate");
        assert!(e.to_string().contains("not enrolled"), "{e}");
    });
    // The server logged each rejection, named, and is still serving.
    std::thread::sleep(Duration::from_millis(200));
    let l = std::fs::read_to_string(&log).unwrap();
    assert!(l.contains("dropping connection before any request"), "{l}");
    assert!(
        l.contains("bad magic") || l.contains("malformed handshake"),
        "{l}"
    );
    s.ok("ws1", "echo still-up > /wisp/ok && cat /wisp/ok");
    let (code, _, err) = s.run("ws1", &format!("touch /wisp/{}", "n".repeat(256)));
    assert_ne!(code, 0);
    assert!(err.contains("File name too long"), "{err}");
    s.ok("ws1", &format!("touch /wisp/{}", "n".repeat(255)));
    s.ok("ws1", "mkdir -p /wisp/d/sub");
    let (code, _, err) = s.run("ws1", "mv /wisp/d /wisp/d/sub/");
    assert_ne!(code, 0);
    assert!(
        err.contains("Invalid argument") || err.contains("subdirectory of itself"),
        "{err}"
    );
    assert_eq!(s.ok("ws1", "ls /wisp/d"), "sub\n");
    assert_eq!(s.ok("ws1", "cat /wisp/ok"), "still-up\n");
}
