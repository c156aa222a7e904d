//! Helpers for the end-to-end tests: a cluster guard that always tears down, running code
//! inside a host's network namespace, and shell helpers that fail loudly.

use std::sync::atomic::{AtomicU32, Ordering};

pub use wisp_cluster::{Cluster, Spec};

/// A simulated cluster that is torn down when dropped (also when the test panics).
pub struct Sim {
    pub c: Cluster,
}

impl std::ops::Deref for Sim {
    type Target = Cluster;
    fn deref(&self) -> &Cluster {
        &self.c
    }
}

impl std::ops::DerefMut for Sim {
    fn deref_mut(&mut self) -> &mut Cluster {
        &mut self.c
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        if std::env::var_os("WISP_KEEP_CLUSTER").is_none() {
            let _ = wisp_cluster::down(&self.c.name);
        }
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// Bring up a cluster with a name unique to this test process.
pub fn sim(tag: &str, workstations: usize) -> Sim {
    sim_with(tag, workstations, |_| {})
}

/// Like [`sim`], letting the caller adjust the spec.
pub fn sim_with(tag: &str, workstations: usize, f: impl FnOnce(&mut Spec)) -> Sim {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let name = format!("t{}{}-{tag}", std::process::id() % 100000, n);
    let name: String = name.chars().take(24).collect();
    let mut spec = Spec::new(&name, 1, workstations);
    f(&mut spec);
    match Cluster::up(&spec) {
        Ok(c) => Sim { c },
        Err(e) => panic!("cannot bring up the simulated cluster (tests need root, iproute2, util-linux, /dev/fuse and `cargo build --release --bins`): {e}"),
    }
}

impl Sim {
    /// Run a shell script on `host`; panics with its output unless it succeeds.
    pub fn ok(&self, host: &str, script: &str) -> String {
        match self.c.sh_ok(host, script) {
            Ok(s) => s,
            Err(e) => panic!("{e}"),
        }
    }

    /// The file server's counters (`wisp status --json`, asked from ws1).
    pub fn server_stats(&self) -> wisp_proto::msg::ServerStats {
        let out = self.ok(
            "ws1",
            &format!(
                "{}/wisp status --server {} --key {} --json",
                self.bin_dir.display(),
                self.server_addr(),
                self.key_file.display()
            ),
        );
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad stats {out:?}: {e}"))
    }

    /// Run a shell script on `host`; returns (exit code, stdout, stderr).
    pub fn run(&self, host: &str, script: &str) -> (i32, String, String) {
        let o = self.c.sh(host, script).expect("spawn on host");
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stdout).into(),
            String::from_utf8_lossy(&o.stderr).into(),
        )
    }

    /// Run `f` on a thread that has joined `host`'s network namespace (to open raw TCP
    /// connections to the cluster's addresses from the test process).
    pub fn in_netns<T: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let anchor = self.c.host(host).expect("host").anchor;
        let host = host.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(format!("/proc/{anchor}/ns/net")).expect("open netns");
            use std::os::unix::io::AsRawFd;
            // SAFETY: setns on this thread only, with a valid namespace fd.
            let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                r,
                0,
                "setns into {host}'s network namespace: {}",
                std::io::Error::last_os_error()
            );
            f()
        })
        .join()
        .expect("netns thread")
    }
}
