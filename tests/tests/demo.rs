//! End-to-end: the README's first command — `wisp demo` — succeeds, stays within its time
//! budget and leaves nothing behind (namespaces, mounts, state, processes).

use std::time::{Duration, Instant};

#[test]
fn demo_runs_and_leaves_nothing_behind() {
    let bin = wisp_cluster::bin_dir().expect("bin dir").join("wisp");
    assert!(
        bin.is_file(),
        "build the binaries first: cargo build --release --bins"
    );
    let name = format!("tdemo{}", std::process::id() % 100000);
    let t0 = Instant::now();
    let out = std::process::Command::new(&bin)
        .args(["demo", "--name", &name])
        .output()
        .expect("run wisp demo");
    let took = t0.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wisp demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        took < Duration::from_secs(300),
        "the demo took {took:?} (budget: 5 minutes)"
    );
    for step in [
        "one namespace",
        "parallel build",
        "migration",
        "eviction",
        "report",
        "moved",
        "evicted",
    ] {
        assert!(
            stdout.contains(step),
            "the demo did not show {step:?}:\n{stdout}"
        );
    }
    let netns = String::from_utf8_lossy(
        &std::process::Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned();
    assert!(
        !netns.contains(&format!("wisp-{name}-")),
        "namespaces left behind: {netns}"
    );
    assert!(
        !std::path::Path::new(&format!("/run/wisp/{name}")).exists(),
        "state left behind"
    );
    assert!(
        !std::path::Path::new(&format!("/var/tmp/wisp/{name}")).exists(),
        "data left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
    assert!(
        !mounts.contains(&format!("wisp-{name}")),
        "mounts left behind"
    );
}
