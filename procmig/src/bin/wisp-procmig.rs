//! `wisp-procmig`: thin CLI over the procmig library.
//!
//! ```text
//! wisp-procmig run [--stdin F] [--stdout F] [--stderr F] [--wait] -- CMD...
//!     start CMD as pid 2 of a new pid + uts namespace; prints "<pid> <init-pid>"
//! wisp-procmig dump --pid P --dir D [--leave-frozen | --kill | --resume] [--precopy-rounds N]
//!     write the image of P into D; by default P is left frozen (SIGSTOP) for the caller
//!     to kill once the target confirms, or to resume if restore failed
//! wisp-procmig restore --dir D [--any-pid] [--wait] [--lazy] [--inherit-fd N=FD]...
//!     restore the image in D; prints "<pid> <ns-pid|-> <init-pid|->"; with --lazy the
//!     command stays until all anonymous memory is paged in
//! wisp-procmig info --dir D
//!     validate the image in D and summarize it (exit 4 when it is corrupt)
//! wisp-procmig resume --pid P        wisp-procmig kill --pid P
//!     resolve a frozen source after a restore failed / succeeded
//! ```
//! Exit codes: 0 ok, 2 usage, 3 unsupported process, 4 bad image, 1 other errors.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(name = "wisp-procmig", about = "live process migration through files")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a command in a new pid + uts namespace sandbox.
    Run(RunArgs),
    /// Freeze a process and write its image.
    Dump(DumpArgs),
    /// Recreate a process from an image.
    Restore(RestoreArgs),
    /// Resume a source left frozen by `dump`.
    Resume(PidArgs),
    /// Validate an image and print a summary of it (exit 4 when it is bad).
    Info(InfoArgs),
    /// Kill a source left frozen by `dump`.
    Kill(PidArgs),
}

#[derive(Args)]
struct RunArgs {
    #[arg(long)]
    stdin: Option<PathBuf>,
    #[arg(long)]
    stdout: Option<PathBuf>,
    #[arg(long)]
    stderr: Option<PathBuf>,
    /// Wait for the command and exit with its status.
    #[arg(long)]
    wait: bool,
    #[arg(last = true, required = true)]
    cmd: Vec<String>,
}

#[derive(Args)]
struct DumpArgs {
    #[arg(long)]
    pid: i32,
    #[arg(long)]
    dir: PathBuf,
    /// Leave the source frozen in a SIGSTOP stop (the default).
    #[arg(long, conflicts_with_all = ["kill", "resume"])]
    leave_frozen: bool,
    /// Kill the source once the image is complete.
    #[arg(long, conflicts_with = "resume")]
    kill: bool,
    /// Let the source run on (checkpoint only).
    #[arg(long)]
    resume: bool,
    /// Pre-copy rounds (soft-dirty) while the process runs before the final freeze.
    #[arg(long, default_value_t = 0)]
    precopy_rounds: u32,
}

#[derive(Args)]
struct RestoreArgs {
    #[arg(long)]
    dir: PathBuf,
    /// Do not recreate the pid namespace; accept any pid.
    #[arg(long)]
    any_pid: bool,
    /// Wait for the restored process (its namespace init) and exit with its status.
    #[arg(long)]
    wait: bool,
    /// Give the restored process descriptor FD of this command as its fd N (pipe ends,
    /// e.g. cluster pipes held by the caller): `--inherit-fd N=FD`, repeatable.
    #[arg(long, value_parser = parse_inherit)]
    inherit_fd: Vec<(i32, i32)>,
    /// Post-copy: start at once and page anonymous memory in over userfaultfd; the command
    /// stays until every page is in the process.
    #[arg(long)]
    lazy: bool,
    /// With --lazy: only answer faults for this many milliseconds before pushing the rest.
    #[arg(long, default_value_t = 0, requires = "lazy")]
    lazy_push_delay_ms: u64,
}

#[derive(Args)]
struct InfoArgs {
    #[arg(long)]
    dir: PathBuf,
}

#[derive(Args)]
struct PidArgs {
    #[arg(long)]
    pid: i32,
}

fn parse_inherit(s: &str) -> Result<(i32, i32), String> {
    let (n, fd) = s
        .split_once('=')
        .ok_or_else(|| format!("expected N=FD, got {s:?}"))?;
    let n = n.parse().map_err(|_| format!("bad fd number {n:?}"))?;
    let fd = fd.parse().map_err(|_| format!("bad descriptor {fd:?}"))?;
    Ok((n, fd))
}

fn code_for(e: &anyhow::Error) -> u8 {
    for c in e.chain() {
        if let Some(wisp_procmig::DumpError::Unsupported { .. }) = c.downcast_ref() {
            return 3;
        }
        if c.downcast_ref::<wisp_procmig::ImageError>().is_some()
            || matches!(c.downcast_ref(), Some(wisp_procmig::RestoreError::Image(_)))
        {
            return 4;
        }
    }
    1
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.cmd {
        Cmd::Run(a) => {
            let sb = wisp_procmig::run_sandboxed(
                &a.cmd,
                [a.stdin.as_deref(), a.stdout.as_deref(), a.stderr.as_deref()],
            )
            .with_context(|| format!("cannot start {:?}", a.cmd))?;
            println!("{} {}", sb.pid, sb.init_pid);
            if a.wait {
                return Ok(sb.wait()?.clamp(0, 255) as u8);
            }
        }
        Cmd::Dump(a) => {
            let info = if a.precopy_rounds > 0 {
                let mut pc = wisp_procmig::PreCopy::start(a.pid, &a.dir).with_context(|| {
                    format!("pre-copy of pid {} into {}", a.pid, a.dir.display())
                })?;
                for _ in 1..a.precopy_rounds {
                    pc.round()
                        .with_context(|| format!("pre-copy round of pid {}", a.pid))?;
                }
                eprintln!(
                    "pre-copy with {} tracking, rounds (pages): {:?}",
                    pc.tracking(),
                    pc.rounds
                );
                pc.finish()
            } else {
                wisp_procmig::dump(a.pid, &a.dir)
            }
            .with_context(|| format!("dump of pid {} into {}", a.pid, a.dir.display()))?;
            eprintln!(
                "dumped pid {}: {} vmas, {} pages ({} bytes), {} fds, frozen {} ms{}",
                info.pid,
                info.vmas,
                info.pages,
                info.bytes,
                info.fds,
                info.frozen_ms,
                if info.syscall_note.is_empty() {
                    String::new()
                } else {
                    format!("; {}", info.syscall_note)
                }
            );
            if a.kill {
                info.frozen
                    .kill()
                    .with_context(|| format!("kill of pid {}", a.pid))?;
            } else if a.resume {
                info.frozen
                    .resume()
                    .with_context(|| format!("resume of pid {}", a.pid))?;
            } else {
                info.frozen
                    .release_stopped()
                    .with_context(|| format!("leaving pid {} frozen", a.pid))?;
            }
        }
        Cmd::Restore(a) => {
            let opts = wisp_procmig::RestoreOptions {
                pid_mode: if a.any_pid {
                    wisp_procmig::PidMode::Any
                } else {
                    wisp_procmig::PidMode::Auto
                },
                inherit_fds: a.inherit_fd.clone(),
                lazy_push_delay: std::time::Duration::from_millis(a.lazy_push_delay_ms),
                cgroup_procs: Vec::new(),
                ..Default::default()
            };
            let (r, pager) = if a.lazy {
                let (r, p) = wisp_procmig::restore_lazy(&a.dir, &opts)
                    .with_context(|| format!("restore from {}", a.dir.display()))?;
                (r, Some(p))
            } else {
                (
                    wisp_procmig::restore_with(&a.dir, &opts)
                        .with_context(|| format!("restore from {}", a.dir.display()))?,
                    None,
                )
            };
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            let show = |o: Option<i32>| o.map_or("-".to_string(), |p| p.to_string());
            println!("{} {} {}", r.pid, show(r.ns_pid), show(r.init_pid));
            use std::io::Write as _;
            let _ = std::io::stdout().flush();
            if let Some(p) = pager {
                let st = p
                    .wait()
                    .with_context(|| format!("lazy paging of pid {}", r.pid))?;
                eprintln!(
                    "lazy paging done: {} faults, {} pages pushed",
                    st.faults, st.pushed
                );
            }
            if a.wait {
                let waited = r.init_pid.unwrap_or(r.pid);
                let sb = wisp_procmig::Sandbox {
                    init_pid: waited,
                    pid: r.pid,
                };
                return Ok(sb.wait()?.clamp(0, 255) as u8);
            }
        }
        Cmd::Info(a) => {
            let m = wisp_procmig::image::load(&a.dir)
                .with_context(|| format!("image in {}", a.dir.display()))?;
            let pages: u64 = m.page_runs.iter().map(|r| r.npages).sum();
            println!(
                "pid {} (namespace pids {:?}) comm {:?} exe {}",
                m.pid, m.ns_pids, m.comm, m.exe
            );
            println!(
                "threads {}, vmas {}, stored pages {} ({} bytes), fds {}",
                m.threads.len() + 1,
                m.vmas.len(),
                pages,
                pages * 4096,
                m.fds.len()
            );
            for f in &m.fds {
                println!("  fd {} {:?} {} pos {}", f.fd, f.kind, f.path, f.pos);
            }
            println!(
                "host {} kernel {} cwd {}",
                m.hostname, m.kernel_release, m.cwd
            );
            if !m.syscall_note.is_empty() {
                println!("{}", m.syscall_note);
            }
            println!(
                "namespace ppid {} pgid {} sid {}",
                m.ns_ppid, m.ns_pgid, m.ns_sid
            );
            for mb in &m.members {
                let sub = wisp_procmig::image::load(&a.dir.join(&mb.dir))
                    .with_context(|| format!("member image {}", mb.dir))?;
                println!(
                    "  member pid {} ppid {} pgid {} sid {} comm {:?} in {}/",
                    mb.ns_pid, sub.ns_ppid, sub.ns_pgid, sub.ns_sid, sub.comm, mb.dir
                );
            }
            for p in &m.pipes {
                println!(
                    "  pipe {} capacity {}{} unread {} bytes",
                    p.ino,
                    p.size,
                    if p.external {
                        " (shared outside the job)"
                    } else {
                        ""
                    },
                    p.data.len()
                );
            }
        }
        Cmd::Resume(a) => wisp_procmig::resume_stopped(a.pid)
            .with_context(|| format!("resume of pid {}", a.pid))?,
        Cmd::Kill(a) => {
            wisp_procmig::kill_stopped(a.pid).with_context(|| format!("kill of pid {}", a.pid))?
        }
    }
    Ok(0)
}

/// The error chain on one line, without repeating a cause already quoted by its parent.
fn chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for c in e.chain() {
        let m = c.to_string();
        if out.contains(&m) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&m);
    }
    out
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match run(cli) {
        Ok(c) => ExitCode::from(c),
        Err(e) => {
            eprintln!("wisp-procmig: {}", chain(&e));
            ExitCode::from(code_for(&e))
        }
    }
}
