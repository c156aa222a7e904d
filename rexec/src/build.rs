//! Per-build host reservation (`wisp make`): the hosts one build holds for its whole run,
//! and the CPU slots its `rexec`s take on them.
//!
//! `wisp make` leases idle hosts from the registry (a lease is exclusive: a host serves one
//! build at a time, so two concurrent builds never interleave on a host), asks each how
//! many CPUs it has, and writes a build directory on the home host:
//!
//! - `hosts`: one line per reserved host, `NAME AGENT_ADDR CPUS`;
//! - `slot.NAME.I` (I < CPUS): lock files; a `rexec` of the build holds one (flock) for as
//!   long as its job runs on NAME;
//! - `bad.NAME`: NAME failed to start a job; the build's later `rexec`s skip it;
//! - `away.NAME`: NAME's owner is back (or it is down); no new job goes there.
//!
//! Its path is passed to every recipe's `rexec` in `$WISP_BUILD`. A `rexec` places its job
//! on the host with the most free slots (jobs spread by free CPUs).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The environment variable naming the build directory.
pub const BUILD_ENV: &str = "WISP_BUILD";

/// One host reserved for the build.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildHost {
    pub name: String,
    /// The host's agent, ip:port.
    pub agent: String,
    pub cpus: u32,
}

/// Write the `hosts` file of a build directory.
pub fn write_hosts(dir: &Path, hosts: &[BuildHost]) -> std::io::Result<()> {
    let text: String = hosts
        .iter()
        .map(|h| format!("{} {} {}\n", h.name, h.agent, h.cpus))
        .collect();
    std::fs::write(dir.join("hosts"), text)
}

/// Read the `hosts` file of a build directory.
pub fn read_hosts(dir: &Path) -> std::io::Result<Vec<BuildHost>> {
    let text = std::fs::read_to_string(dir.join("hosts"))?;
    text.lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f[..] {
                [name, agent, cpus] => Ok(BuildHost {
                    name: name.into(),
                    agent: agent.into(),
                    cpus: cpus.parse().map_err(|_| bad_line(dir, l))?,
                }),
                _ => Err(bad_line(dir, l)),
            }
        })
        .collect()
}

fn bad_line(dir: &Path, l: &str) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!("{}: bad line {l:?}", dir.join("hosts").display()),
    )
}

/// Mark `host` as one that failed to start a job (the build skips it from now on).
pub fn mark_bad(dir: &Path, host: &str, why: &str) {
    let _ = std::fs::write(dir.join(format!("bad.{host}")), why);
}

/// Mark `host` as unavailable (owner back, or down) or available again.
pub fn set_away(dir: &Path, host: &str, away: bool) {
    let p = dir.join(format!("away.{host}"));
    if away {
        let _ = std::fs::write(p, "");
    } else {
        let _ = std::fs::remove_file(p);
    }
}

/// A CPU slot on a reserved host, held while a job runs there.
#[derive(Debug)]
pub struct Slot {
    pub host: BuildHost,
    _lock: File,
}

fn try_lock(p: &PathBuf) -> Option<File> {
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(p)
        .ok()?;
    // SAFETY: flock on a descriptor we own.
    (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(f)
}

/// What a free slot search found.
#[derive(Debug)]
pub enum Pick {
    Slot(Slot),
    /// Every usable host's slots are taken: ask again shortly.
    Busy,
    /// No usable host is left (all failed or are away).
    None,
}

/// Take a free slot on the usable host with the most free slots.
pub fn pick(dir: &Path) -> std::io::Result<Pick> {
    let hosts = read_hosts(dir)?;
    let mut best: Option<(usize, BuildHost, File)> = None;
    let mut usable = false;
    for h in hosts {
        if dir.join(format!("bad.{}", h.name)).exists()
            || dir.join(format!("away.{}", h.name)).exists()
        {
            continue;
        }
        usable = true;
        // Count the free slots by taking them; keep one, let the others go.
        let mut got: Vec<File> = (0..h.cpus)
            .filter_map(|i| try_lock(&dir.join(format!("slot.{}.{i}", h.name))))
            .collect();
        let free = got.len();
        if free > 0 && best.as_ref().map(|b| free > b.0).unwrap_or(true) {
            best = Some((free, h, got.swap_remove(0)));
        }
    }
    Ok(match best {
        Some((_, host, lock)) => Pick::Slot(Slot { host, _lock: lock }),
        None if usable => Pick::Busy,
        None => Pick::None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_by_free_slots_and_skips_bad_hosts() {
        let d = std::env::temp_dir().join(format!("wisp-build-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let h = |n: &str, c| BuildHost {
            name: n.into(),
            agent: "10.0.0.1:7071".into(),
            cpus: c,
        };
        write_hosts(&d, &[h("a", 1), h("b", 2)]).unwrap();
        let take = || match pick(&d).unwrap() {
            Pick::Slot(s) => s,
            other => panic!("no slot: {other:?}"),
        };
        let s1 = take();
        assert_eq!(s1.host.name, "b", "b has the most free CPUs");
        let s2 = take();
        let s3 = take();
        let mut names = vec![s2.host.name.clone(), s3.host.name.clone()];
        names.sort();
        assert_eq!(names, ["a", "b"]);
        assert!(matches!(pick(&d).unwrap(), Pick::Busy));
        drop(s2);
        drop(s3);
        mark_bad(&d, "b", "test");
        drop(s1);
        assert_eq!(take().host.name, "a");
        set_away(&d, "a", true);
        assert!(matches!(pick(&d).unwrap(), Pick::None));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
