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
                "{}/wisp status --server {} --json",
                self.bin_dir.display(),
                self.server_addr(),
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

impl Sim {
    /// Run the `wisp` CLI against this cluster from the test machine; panics with its
    /// stderr unless it succeeds. `args` is split by a shell.
    pub fn wisp(&self, args: &str) -> String {
        let (ok, out, err) = self.wisp_status(args);
        assert!(ok, "wisp {args}: {err}");
        out
    }

    /// Like [`Sim::wisp`], returning (success, stdout, stderr).
    pub fn wisp_status(&self, args: &str) -> (bool, String, String) {
        let cli = self.bin_dir.join("wisp");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{} {args} --cluster {}", cli.display(), self.name))
            .output()
            .expect("run wisp");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Lend `hosts` out (their owners away for an hour) and wait until the registry sees
    /// them idle.
    pub fn lend(&self, hosts: &[&str]) {
        // A workstation may not be registered yet right after the cluster came up.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        for h in hosts {
            loop {
                match self.wisp_status(&format!("owner {h} idle")) {
                    (true, _, _) => break,
                    (false, _, e)
                        if e.contains("unknown host") && std::time::Instant::now() < deadline =>
                    {
                        std::thread::sleep(std::time::Duration::from_millis(100))
                    }
                    (false, _, e) => panic!("wisp owner {h} idle: {e}"),
                }
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let out = self.wisp("hosts");
            if hosts
                .iter()
                .all(|h| out.lines().any(|l| l.starts_with(&format!("{h}*"))))
            {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "hosts never became idle:\n{out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    /// Running jobs from `wisp ps --no-usage`: (global id, host it runs on, state,
    /// migrations).
    pub fn ps(&self) -> Vec<(String, String, String, u32)> {
        self.wisp("ps --no-usage")
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() >= 8).then(|| {
                    (
                        f[0].to_string(),
                        f[3].to_string(),
                        f[4].to_string(),
                        f[7].parse().unwrap_or(u32::MAX),
                    )
                })
            })
            .collect()
    }

    /// Processes of jobs run by `host`'s agent: descendants of its wispd in a pid
    /// namespace other than wispd's (the sandboxes; frozen copies being migrated count).
    pub fn job_processes(&self, host: &str) -> Vec<i32> {
        let Some(daemon) = self.c.host(host).ok().and_then(|h| h.daemon) else {
            return vec![];
        };
        let ns = |p: i32| std::fs::read_link(format!("/proc/{p}/ns/pid")).ok();
        let ppid = |p: i32| -> Option<i32> {
            let s = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
            s[s.rfind(')')? + 2..]
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        let home_ns = ns(daemon as i32);
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if ns(p) == home_ns || ns(p).is_none() {
                continue;
            }
            let mut q = p;
            for _ in 0..64 {
                match ppid(q) {
                    Some(pp) if pp == daemon as i32 => {
                        out.push(p);
                        break;
                    }
                    Some(pp) if pp > 1 => q = pp,
                    _ => break,
                }
            }
        }
        out
    }
}

/// A shell script that writes a C project of `n` files into `dir` (made if missing): `app`
/// prints the sum 1 + 2 + ... + n. Each `.o` recipe runs `pre` first (e.g. `sleep 1; `).
pub fn c_project(dir: &str, n: u32, pre: &str) -> String {
    format!(
        r#"set -e; mkdir -p {dir} && cd {dir}
        for i in $(seq 1 {n}); do printf 'int f%d(int x) {{ return x + %d; }}\n' $i $i > f$i.c; done
        {{ echo '#include <stdio.h>'; for i in $(seq 1 {n}); do echo "int f$i(int);"; done
          echo 'int main(void) {{ int s = 0;'; for i in $(seq 1 {n}); do echo "s = f$i(s);"; done; printf '%s\n' 'printf("%d\n", s); return 0; }}'; }} > main.c
        printf 'OBJS := $(patsubst %%.c,%%.o,$(wildcard *.c))\napp: $(OBJS)\n\tcc -o $@ $(OBJS)\n%%.o: %%.c\n\t{pre}cc -O2 -c $< -o $@\n' > Makefile"#
    )
}
