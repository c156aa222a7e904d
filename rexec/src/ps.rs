//! What the jobs of this host use: CPU time and resident memory summed over every process
//! of each job's sandbox (its own pid namespace), for `wisp ps` and `wisp top`.

use std::collections::HashMap;
use std::sync::Arc;

use wisp_proto::msg::JobStat;

use crate::agent::Agent;

/// Every process in the pid namespace of `pid` (a job's sandbox), as pids of the host's
/// namespace; `None` when `pid` is gone or shares the agent's own namespace (then "the
/// sandbox" would be every process of the host).
pub(crate) fn sandbox_pids(pid: i32) -> Option<Vec<i32>> {
    let ns = std::fs::read_link(format!("/proc/{pid}/ns/pid")).ok()?;
    if std::fs::read_link("/proc/self/ns/pid").ok().as_ref() == Some(&ns) {
        return None;
    }
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{p}/ns/pid"))
            .ok()
            .as_ref()
            == Some(&ns)
        {
            out.push(p);
        }
    }
    Some(out)
}

/// User + system CPU ticks and resident pages of one process.
fn usage(pid: i32) -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime 15.
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages = statm.split_whitespace().nth(1)?.parse::<u64>().ok()?;
    Some((ticks, pages))
}

/// CPU, memory and state of every job running here (not the frozen copies of jobs that
/// moved away, nor jobs that ended).
pub fn job_stats(agent: &Arc<Agent>) -> Vec<JobStat> {
    // SAFETY: sysconf has no memory effects.
    let (hz, page) = unsafe {
        (
            libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64,
            libc::sysconf(libc::_SC_PAGESIZE).max(1) as u64,
        )
    };
    let jobs: HashMap<u64, (i32, String, bool)> = agent
        .jobs
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, j)| j.exit.is_none() && j.moved.is_none())
        .map(|(id, j)| (*id, (j.info.pid as i32, j.info.argv0.clone(), j.suspended)))
        .collect();
    let mut out: Vec<JobStat> = jobs
        .into_iter()
        .map(|(job, (pid, argv0, suspended))| {
            let pids = sandbox_pids(pid).unwrap_or_else(|| vec![pid]);
            let (mut ticks, mut pages) = (0, 0);
            let mut processes = 0;
            for p in pids {
                if let Some((t, r)) = usage(p) {
                    ticks += t;
                    pages += r;
                    processes += 1;
                }
            }
            JobStat {
                job,
                argv0,
                cpu_ms: ticks * 1000 / hz,
                rss_kb: pages * page / 1024,
                processes,
                suspended,
            }
        })
        .collect();
    out.sort_by_key(|s| s.job);
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn own_usage_parses() {
        let (ticks, pages) = super::usage(std::process::id() as i32).unwrap();
        assert!(pages > 0);
        let _ = ticks;
        assert!(super::sandbox_pids(std::process::id() as i32).is_none());
    }
}
