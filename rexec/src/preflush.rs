//! Pre-flushing (`wispd --preflush SECS`, off by default): while the owner is away, the
//! memory of every foreign job is written to a swap file of its own in /wisp ahead of time
//! (procmig's [`PreCopy`]: a first full copy while the job runs, then, every SECS, only the
//! pages it wrote since). When the owner comes back, eviction then writes only what the
//! job dirtied since the last round (`migrate_out` takes the session: `PreCopy::finish`),
//! so giving the host back no longer costs writing every page, only the recently written
//! ones. The price is the background copying while the owner is away, and a swap file per
//! foreign job in /wisp/.swap/ (`<job>.pre`) for as long as it runs here.
//!
//! A job that cannot be pre-copied (children, sockets, ...) is not tried again; it is
//! evicted (or suspended) as usual. Sessions of jobs that ended or left are dropped and
//! their swap files removed.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use tracing::{debug, info};
use wisp_procmig::PreCopy;

use crate::agent::Agent;

enum Slot {
    /// A session between rounds, its image directory, and when its last round ended.
    Idle(Box<PreCopy>, PathBuf, Instant),
    /// A round runs on a blocking thread.
    Busy,
}

/// The agent's pre-flush sessions, by job.
#[derive(Default)]
pub(crate) struct Sessions {
    slots: Mutex<HashMap<u64, Slot>>,
    changed: Condvar,
    /// Jobs that cannot be pre-copied (procmig says unsupported).
    refused: Mutex<HashSet<u64>>,
    /// Since when each foreign job has run its current program (`/proc/PID/exe`): a
    /// session starts once that is the job's own command (or has not changed for 5 s). A
    /// job still in its start-up exec chain (sh, nice, env, then the command) would
    /// replace its memory under the session, and a round then fails (it starts over).
    seen: Mutex<HashMap<u64, (Instant, Option<PathBuf>)>>,
}

impl Agent {
    /// Take job `job`'s pre-flush session, waiting for a round in progress to end; `None`
    /// when there is none.
    pub(crate) fn take_preflush(&self, job: u64) -> Option<(PreCopy, PathBuf)> {
        let s = &self.evict.preflush;
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut slots = s.slots.lock().unwrap();
        loop {
            match slots.remove(&job) {
                Some(Slot::Idle(pc, dir, _)) => return Some((*pc, dir)),
                Some(Slot::Busy) => {
                    slots.insert(job, Slot::Busy);
                    let now = Instant::now();
                    if now >= deadline {
                        return None;
                    }
                    slots = s.changed.wait_timeout(slots, deadline - now).unwrap().0;
                }
                None => return None,
            }
        }
    }
}

fn put_back(agent: &Agent, job: u64, slot: Option<Slot>) {
    let s = &agent.evict.preflush;
    let mut slots = s.slots.lock().unwrap();
    match slot {
        Some(x) => slots.insert(job, x),
        None => slots.remove(&job),
    };
    s.changed.notify_all();
}

/// One pass (from the eviction loop while the owner is away): start sessions for foreign
/// jobs that have none, run a round for sessions older than `every`, drop the sessions of
/// jobs no longer here. Rounds run on blocking threads; this returns at once.
pub(crate) fn tick(agent: &Arc<Agent>, every: Duration) {
    let jobs = agent.foreign_jobs();
    let argv0: HashMap<u64, String> = jobs.iter().map(|j| (j.job, j.argv0.clone())).collect();
    let here: HashMap<u64, i32> = jobs.into_iter().map(|j| (j.job, j.pid as i32)).collect();
    let s = &agent.evict.preflush;
    let mut slots = s.slots.lock().unwrap();
    // Jobs that ended, moved, or are being moved or suspended: their sessions and swap files
    // go (a migration takes its job's session before it marks the job migrating... or
    // after; either way it then finds none and dumps the whole job).
    let gone: Vec<u64> = slots
        .iter()
        .filter(|(j, v)| !here.contains_key(j) && matches!(v, Slot::Idle(..)))
        .map(|(j, _)| *j)
        .collect();
    for j in gone {
        if let Some(Slot::Idle(_, dir, _)) = slots.remove(&j) {
            tokio::task::spawn_blocking(move || {
                let _ = std::fs::remove_dir_all(&dir);
            });
        }
    }
    let refused = s.refused.lock().unwrap().clone();
    let mut seen = s.seen.lock().unwrap();
    seen.retain(|j, _| here.contains_key(j));
    for (job, pid) in here {
        if refused.contains(&job) {
            continue;
        }
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let e = seen
            .entry(job)
            .or_insert_with(|| (Instant::now(), exe.clone()));
        if e.1 != exe {
            *e = (Instant::now(), exe);
        }
        let since = e.0;
        // Its own program runs (the exec chain is over), or at least one that has run for
        // a second.
        let settled = match (&e.1, argv0.get(&job).and_then(|a| program(a))) {
            (Some(exe), Some(want)) => *exe == want,
            _ => false,
        };
        let due = match slots.get(&job) {
            None => settled || since.elapsed() >= every.max(Duration::from_secs(5)),
            Some(Slot::Idle(_, _, t)) => t.elapsed() >= every,
            Some(Slot::Busy) => false,
        };
        if !due {
            continue;
        }
        let prev = slots.insert(job, Slot::Busy);
        let prev_was_idle = prev.is_some();
        let a = agent.clone();
        tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let r = match prev {
                Some(Slot::Idle(mut pc, dir, _)) => pc.round().map(|n| (pc, dir, n)),
                _ => {
                    let dir = a.cfg.mount.join(".swap").join(format!("{job:x}.pre"));
                    let _ = std::fs::remove_dir_all(&dir);
                    std::fs::create_dir_all(&dir)
                        .map_err(|e| wisp_procmig::DumpError::Write {
                            path: dir.clone(),
                            source: e,
                        })
                        .and_then(|_| PreCopy::start(pid, &dir))
                        .map(|pc| {
                            let n = pc.rounds.first().copied().unwrap_or(0);
                            (Box::new(pc), dir, n)
                        })
                }
            };
            match r {
                Ok((pc, dir, pages)) => {
                    let ms = t0.elapsed().as_millis() as u64;
                    if prev_was_idle {
                        debug!(job, pages, ms, "pre-flush round");
                    } else {
                        info!(
                            job,
                            pages, ms, "pre-flushed: memory written to its swap file"
                        );
                    }
                    put_back(&a, job, Some(Slot::Idle(pc, dir, Instant::now())));
                }
                Err(e) => {
                    // Unsupported: never; anything else (the job exec'd, exited): later.
                    if matches!(e, wisp_procmig::DumpError::Unsupported { .. }) {
                        info!(job, "not pre-flushed: {e}");
                        a.evict.preflush.refused.lock().unwrap().insert(job);
                    } else {
                        info!(job, "pre-flush round failed, starting over: {e}");
                    }
                    let _ = std::fs::remove_dir_all(
                        a.cfg.mount.join(".swap").join(format!("{job:x}.pre")),
                    );
                    put_back(&a, job, None);
                }
            }
        });
    }
}

/// The file a job's command runs: `argv0` as the shell finds it (a name without '/' in the
/// usual directories), symbolic links resolved, as `/proc/PID/exe` shows it.
fn program(argv0: &str) -> Option<PathBuf> {
    let p = if argv0.contains('/') {
        PathBuf::from(argv0)
    } else {
        ["/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(|d| std::path::Path::new(d).join(argv0))
            .find(|p| p.exists())?
    };
    std::fs::canonicalize(p).ok()
}
