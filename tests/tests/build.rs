//! A real third-party C project built across the cluster: zstd 1.5.4 (Debian's source
//! package libzstd 1.5.4+dfsg2, downloaded by scripts/deps.sh as pinned in
//! scripts/sources.txt), its library and `zstd` program built from ws1 with `wisp make`
//! (every recipe through rexec) on three lent workstations, compared with a local build.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wisp_tests::sim;

const TARBALL: &str = "libzstd_1.5.4+dfsg2.orig.tar.xz";
const SHA256: &str = "8cf4bbb65e77ec348d052c8d6230eba66d435bddf64c8b5be2fcb16880c19953";
/// The same make variables for both builds (no optional compression libraries, so the
/// result does not depend on what is installed).
const MAKE_VARS: &str = "zstd HAVE_ZLIB=0 HAVE_LZMA=0 HAVE_LZ4=0";

/// The zstd source tarball, checked against its pinned sha256.
fn tarball() -> PathBuf {
    let dir = std::env::var_os("WISP_SOURCES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/wisp-sources"));
    let f = dir.join(TARBALL);
    assert!(
        f.is_file(),
        "{} is missing: run scripts/deps.sh, which downloads the sources pinned in scripts/sources.txt",
        f.display()
    );
    let out = std::process::Command::new("sha256sum")
        .arg(&f)
        .output()
        .expect("sha256sum");
    let sum = String::from_utf8_lossy(&out.stdout);
    assert!(
        sum.starts_with(SHA256),
        "{} does not match its sha256 in scripts/sources.txt: {sum}",
        f.display()
    );
    f
}

/// sha256 of every object file and of the `zstd` binary, relative to `programs/`.
const DIGESTS: &str =
    "cd zstd-1.5.4/programs && { find obj -name '*.o' | LC_ALL=C sort; echo zstd; } | xargs sha256sum";

#[test]
fn zstd_built_across_three_workstations_matches_a_local_build() {
    let src = tarball();
    // The reference: a local build of the same tree on this machine's own disk.
    let local = std::env::temp_dir().join(format!("wisp-zstd-local-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&local);
    std::fs::create_dir_all(&local).unwrap();
    let sh = |script: &str| {
        let o = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&local)
            .output()
            .expect("sh");
        assert!(
            o.status.success(),
            "{script}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    sh(&format!(
        "tar -xJf {} && make -s -C zstd-1.5.4/programs -j2 {MAKE_VARS} >/dev/null",
        src.display()
    ));
    let want = sh(DIGESTS);
    assert!(want.lines().count() > 40, "too few objects:\n{want}");

    let s = sim("zstd", 4);
    s.lend(&["ws2", "ws3", "ws4"]);
    s.ok(
        "ws1",
        &format!(
            "mkdir -p /wisp/z && cd /wisp/z && tar -xJf {}",
            src.display()
        ),
    );
    // While the build runs, the registry is polled for where its jobs run.
    let done = Arc::new(AtomicBool::new(false));
    let seen = {
        let (c, done) = (s.c.clone(), done.clone());
        let cli = s.bin_dir.join("wisp");
        std::thread::spawn(move || {
            let mut hosts = BTreeSet::new();
            while !done.load(Ordering::Relaxed) {
                if let Ok(o) = std::process::Command::new(&cli)
                    .args(["ps", "--no-usage", "--cluster", &c.name])
                    .output()
                {
                    for l in String::from_utf8_lossy(&o.stdout).lines().skip(1) {
                        if let Some(h) = l.split_whitespace().nth(3) {
                            hosts.insert(h.to_string());
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            hosts
        })
    };
    let (code, _, err) = s.run(
        "ws1",
        &format!("cd /wisp/z/zstd-1.5.4/programs && wisp make -v {MAKE_VARS} >/dev/null"),
    );
    done.store(true, Ordering::Relaxed);
    let seen = seen.join().unwrap();
    assert_eq!(code, 0, "the cluster build failed:\n{err}");
    assert!(err.contains("reserved"), "{err}");
    for h in ["ws2", "ws3", "ws4"] {
        assert!(
            seen.contains(h),
            "the registry never showed a job on {h} (saw {seen:?}):\n{err}"
        );
    }
    assert!(
        !seen.contains("ws1"),
        "a recipe ran on ws1 (saw {seen:?}):\n{err}"
    );
    // Bit-identical objects and binary.
    let got = s.ok("ws2", &format!("cd /wisp/z && {DIGESTS}"));
    assert_eq!(got, want, "the cluster build differs from the local one");
    // The built zstd works, on another host: round trips, integrity test, and the same
    // compressed bytes as the locally built one.
    s.ok(
        "ws3",
        "set -e; mkdir -p /wisp/zt && cd /wisp/zt && z=/wisp/z/zstd-1.5.4/programs/zstd
         head -c 3000000 /dev/urandom > random; seq 1 300000 > text; cp $z binary
         for f in random text binary; do
           $z -q -f -3 $f -o $f.zst; $z -q -t $f.zst; $z -q -d -f $f.zst -o $f.out; cmp $f $f.out
           $z -q -f -19 $f -o $f.19.zst; $z -q -d -f $f.19.zst -o $f.19.out; cmp $f $f.19.out
         done
         test $(stat -c %s text.19.zst) -lt $(($(stat -c %s text) / 5))",
    );
    s.ok(
        "ws3",
        &format!(
            "cd /wisp/zt && {}/zstd-1.5.4/programs/zstd -q -c -19 text | cmp - text.19.zst",
            local.display()
        ),
    );
    let _ = std::fs::remove_dir_all(&local);
}
