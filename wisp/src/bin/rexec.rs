//! `rexec`: run a command on an idle host of the cluster, as if it ran here.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// Run a command on an idle host of the cluster, as if it ran here.
///
/// The command sees the same files (the current directory must be inside /wisp), the same
/// environment, umask, user and groups. Its stdin, stdout and stderr are connected to this
/// terminal through cluster pipes, signals sent to rexec (INT, TERM, HUP, QUIT, TSTP, CONT,
/// WINCH, USR1, USR2) reach it, and rexec exits with its exit status (128+N if signal N
/// killed it). The host comes from the cluster registry (idle owner, low load, never
/// oversubscribed); if none is free the command runs here (say so with -v), or rexec waits
/// with --wait.
///
/// As a make shell: `make -j16 SHELL=rexec` (make runs `rexec -c RECIPE`).
///
/// A terminal on stdin gives the command a terminal on its host (its stdout and stderr
/// both go to it, and this terminal is in raw mode meanwhile, as with ssh); not in shell
/// mode (-c) unless -t.
///
/// Exit status: the command's own status (0-255; 128+N when signal N ended it). rexec's
/// own failures, with the reason on stderr:
///   127  the command does not exist on the host ("CMD: command not found on HOST")
///   255  everything else (like ssh): the current directory is outside the namespace,
///        unknown host, the agent unreachable or the host lost while the job ran (its
///        agent silent for 10 s), registry errors, the stdio pipes cannot be made
///   2    bad usage, a missing key or no registry given
#[derive(Parser, Debug)]
#[command(
    version,
    about,
    long_about,
    trailing_var_arg = true,
    verbatim_doc_comment
)]
struct Args {
    /// Run on this host instead of asking the registry.
    #[arg(long)]
    host: Option<String>,
    /// When no host is idle, wait for one instead of running here.
    #[arg(long)]
    wait: bool,
    /// Say where the command runs and how it ended.
    #[arg(short, long)]
    verbose: bool,
    /// This host's identity directory (default $WISP_IDENTITY, else /var/lib/wisp/identity).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Registry servers, ADDR[,ADDR...] (default $WISP_REGISTRY).
    #[arg(long, value_name = "ADDRS")]
    registry: Option<String>,
    /// Where the cluster namespace is mounted.
    #[arg(long, default_value = "/wisp")]
    mount: PathBuf,
    /// Give the command a terminal whenever stdin is one (also in shell mode).
    #[arg(short = 't', conflicts_with = "no_tty")]
    tty: bool,
    /// Never give the command a terminal.
    #[arg(short = 'T')]
    no_tty: bool,
    /// Run `sh -c CMD` (how make calls its SHELL).
    #[arg(short = 'c', value_name = "CMD")]
    command: Option<OsString>,
    /// The command and its arguments.
    #[arg(allow_hyphen_values = true)]
    argv: Vec<OsString>,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// True when `cmd` (a recipe given with -c) runs make itself while a parent make shares its
/// jobserver with us (MAKEFLAGS names one).
fn recursive_make(cmd: &OsString) -> bool {
    let flags = std::env::var("MAKEFLAGS").unwrap_or_default();
    if !flags.contains("--jobserver") {
        return false;
    }
    let make = std::env::var("MAKE").unwrap_or_else(|_| "make".into());
    let cmd = cmd.to_string_lossy();
    cmd.split(|c: char| c.is_whitespace() || matches!(c, ';' | '&' | '|' | '(' | ')'))
        .any(|w| {
            w == make
                || std::path::Path::new(w)
                    .file_name()
                    .is_some_and(|f| f == "make")
        })
}

fn main() -> ExitCode {
    let a = Args::parse();
    wisp::init_logging("warn");
    let argv = match &a.command {
        Some(c) => {
            let mut v = vec![OsString::from("/bin/sh"), OsString::from("-c"), c.clone()];
            v.extend(a.argv.iter().cloned());
            v
        }
        None => a.argv.clone(),
    };
    if argv.is_empty() {
        eprintln!("rexec: no command given; try `rexec --help`");
        return ExitCode::from(2);
    }
    // A recursive make in a recipe (`$(MAKE) ...` under `make -j SHELL=rexec`) runs here:
    // it must share its parent's jobserver, whose pipe exists only on this host (on
    // another host the sub-make falls back to -j1 and the build goes serial). Its own
    // recipes still go through rexec. Running a command locally is always correct (the
    // files are the same everywhere), so a false match only costs distribution.
    if let Some(c) = &a.command {
        if a.host.is_none() && recursive_make(c) {
            use std::os::unix::process::CommandExt;
            let e = std::process::Command::new(&argv[0]).args(&argv[1..]).exec();
            eprintln!("rexec: cannot run /bin/sh here: {e}");
            return ExitCode::from(255);
        }
    }
    let key = match wisp::load_identity(a.identity.as_deref()) {
        Ok(k) => k,
        Err(e) => {
            eprintln!("rexec: {e}");
            return ExitCode::from(2);
        }
    };
    let registry: Vec<String> = a
        .registry
        .clone()
        .or_else(|| std::env::var("WISP_REGISTRY").ok())
        .map(|s| {
            s.split(',')
                .map(|x| x.trim().to_string())
                .filter(|x| !x.is_empty())
                .collect()
        })
        .unwrap_or_default();
    if registry.is_empty() {
        eprintln!("rexec: no registry given; pass --registry ADDR or set WISP_REGISTRY");
        return ExitCode::from(2);
    }
    let opts = wisp_rexec::client::Options {
        argv,
        host: a.host.clone(),
        wait: a.wait,
        verbose: a.verbose,
        key,
        registry,
        mount: a.mount.clone(),
        home: std::env::var("WISP_HOST").unwrap_or_else(|_| hostname()),
        pty: if a.tty {
            wisp_rexec::client::PtyMode::Always
        } else if a.no_tty {
            wisp_rexec::client::PtyMode::Never
        } else {
            wisp_rexec::client::PtyMode::Auto
        },
        shell_mode: a.command.is_some(),
    };
    match wisp_rexec::client::run(opts) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("rexec: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
