//! What the `rexec` command does, as a library.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tracing::debug;
use wisp_naming::RegistryClient;
use wisp_proto::identity::Identity;
use wisp_proto::msg::{ExecSpec, Request, Response, PIPE_XATTR};
use wisp_proto::rpc::{RpcClient, RpcError};

/// Errors of rexec; each says what to do next.
#[derive(Debug, thiserror::Error)]
pub enum RexecError {
    #[error("the current directory {0} is not inside {1}; cd into the cluster namespace first (or run the command without rexec)")]
    CwdOutside(PathBuf, PathBuf),
    #[error("cannot read the current directory: {0}")]
    Cwd(std::io::Error),
    #[error("host {0} is not in the registry (see `wisp hosts`)")]
    UnknownHost(String),
    #[error("registry: {0}")]
    Registry(String),
    #[error("agent on {host}: {source}")]
    Agent { host: String, source: RpcError },
    #[error("cannot make the job's stdio pipes in {dir}: {source}")]
    Pipes {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot run locally: {0}")]
    Local(std::io::Error),
    #[error("{cmd}: command not found on {host}")]
    NotFound { cmd: String, host: String },
    #[error("lost {host} while job {job} ran there: {why} (the host or its wispd is down); the job's outcome is unknown")]
    HostLost { host: String, job: u64, why: String },
    #[error("build directory {dir} (from $WISP_BUILD): {source}")]
    Build {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl RexecError {
    /// rexec's exit status for this failure: 127 for a command that does not exist (as a
    /// shell says), 255 for everything else (like ssh).
    pub fn exit_code(&self) -> u8 {
        match self {
            RexecError::NotFound { .. } => 127,
            _ => 255,
        }
    }

    /// Whether another host might start the job where this one failed to.
    fn other_host_may_work(&self) -> bool {
        match self {
            RexecError::Agent { source, .. } => match source {
                RpcError::Remote(w) => {
                    ![libc::EXDEV, libc::EPERM, libc::EINVAL, libc::ENOENT].contains(&w.errno)
                }
                _ => true,
            },
            RexecError::HostLost { .. } => true,
            _ => false,
        }
    }
}

/// When the job gets a terminal on its host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PtyMode {
    /// When stdin is a terminal and rexec runs in its foreground, except in shell mode
    /// (`-c`, how make calls its SHELL: parallel recipes must not fight over the terminal).
    Auto,
    Always,
    Never,
}

/// How long an agent may be unreachable before rexec gives its host (and the job) up.
const AGENT_GONE_AFTER: Duration = Duration::from_secs(10);

/// How to run one command.
#[derive(Debug, Clone)]
pub struct Options {
    pub argv: Vec<OsString>,
    /// Run on this host; otherwise ask the registry for an idle one.
    pub host: Option<String>,
    /// When no host is idle: wait for one (true) or run here (false).
    pub wait: bool,
    pub verbose: bool,
    pub key: Identity,
    pub registry: Vec<String>,
    pub mount: PathBuf,
    /// This host's name (the job's home).
    pub home: String,
    pub pty: PtyMode,
    /// Called as `rexec -c CMD`.
    pub shell_mode: bool,
}

/// Make a cluster pipe at `path`: an empty file in a wisp mount marked with the pipe
/// attribute (the file server turns it into a pipe).
pub fn mkpipe(path: &Path) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    let p = std::ffi::CString::new(path.as_os_str().as_bytes())?;
    let name = std::ffi::CString::new(PIPE_XATTR).expect("no NUL in the name");
    // SAFETY: both pointers are valid NUL-terminated strings; the value is a 1-byte buffer.
    let r = unsafe { libc::setxattr(p.as_ptr(), name.as_ptr(), b"1".as_ptr().cast(), 1, 0) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        let _ = std::fs::remove_file(path);
        return Err(std::io::Error::new(
            e.kind(),
            format!("{e} (is {} inside a wisp mount?)", path.display()),
        ));
    }
    Ok(())
}

fn say(verbose: bool, msg: &str) {
    if verbose {
        eprintln!("rexec: {msg}");
    }
}

fn run_locally(argv: &[OsString]) -> Result<i32, RexecError> {
    use std::os::unix::process::ExitStatusExt;
    let st = std::process::Command::new(&argv[0])
        .args(&argv[1..])
        .status()
        .map_err(RexecError::Local)?;
    Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
}

fn current_umask() -> u32 {
    // SAFETY: umask(2) cannot fail; we put the old value straight back.
    unsafe {
        let m = libc::umask(0o022);
        libc::umask(m);
        m as u32
    }
}

fn groups() -> Vec<u32> {
    // SAFETY: first call asks for the count; the second fills a buffer of that size.
    unsafe {
        let n = libc::getgroups(0, std::ptr::null_mut());
        if n <= 0 {
            return vec![];
        }
        let mut v = vec![0 as libc::gid_t; n as usize];
        let n = libc::getgroups(n, v.as_mut_ptr());
        v.truncate(n.max(0) as usize);
        v
    }
}

/// Run the command; returns the exit status to exit with.
pub fn run(opts: Options) -> Result<i32, RexecError> {
    let cwd = std::env::current_dir().map_err(RexecError::Cwd)?;
    if !cwd.starts_with(&opts.mount) {
        return Err(RexecError::CwdOutside(cwd, opts.mount.clone()));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let reg = Arc::new(
        RegistryClient::new(
            rt.handle().clone(),
            opts.registry.clone(),
            opts.key.clone(),
            format!("rexec@{}", opts.home),
        )
        .with_timeouts(Duration::from_secs(5), Duration::from_secs(10)),
    );
    // Inside `wisp make`: the build's reserved hosts, by free CPU slots.
    let build = match (&opts.host, std::env::var_os(crate::build::BUILD_ENV)) {
        (None, Some(d)) if !d.is_empty() => Some(PathBuf::from(d)),
        _ => None,
    };
    // Leases of hosts that failed to start the job are kept until the end, so the next
    // allocation does not hand the same host out again.
    let mut leases: Vec<u64> = Vec::new();
    let release = |leases: &[u64]| {
        if !leases.is_empty() {
            let _ = rt.block_on(reg.release_hosts(uid, leases.to_vec()));
        }
    };
    let mut tries = 0;
    let result = loop {
        tries += 1;
        let mut slot = None;
        let mut lease = None;
        let (host, agent_addr) = if let Some(h) = &opts.host {
            let hosts = rt
                .block_on(reg.hosts())
                .map_err(|e| RexecError::Registry(e.to_string()))?;
            let hh = hosts
                .into_iter()
                .find(|x| &x.name == h)
                .ok_or_else(|| RexecError::UnknownHost(h.clone()))?;
            (hh.name, crate::agent::agent_addr(&hh.addr))
        } else if let Some(d) = &build {
            let build_err = |source| RexecError::Build {
                dir: d.clone(),
                source,
            };
            loop {
                match crate::build::pick(d).map_err(build_err)? {
                    crate::build::Pick::Slot(s) => {
                        let r = (s.host.name.clone(), s.host.agent.clone());
                        slot = Some(s);
                        break r;
                    }
                    crate::build::Pick::Busy => std::thread::sleep(Duration::from_millis(20)),
                    crate::build::Pick::None => {
                        say(
                            opts.verbose,
                            "no usable host left in this build; running locally",
                        );
                        release(&leases);
                        return run_locally(&opts.argv);
                    }
                }
            }
        } else {
            match rt.block_on(reg.allocate_hosts(uid, 1, &opts.home, false)) {
                Ok(mut v) if !v.is_empty() => {
                    let l = v.remove(0);
                    lease = Some(l.id);
                    leases.push(l.id);
                    (l.host.clone(), crate::agent::agent_addr(&l.addr))
                }
                Ok(_) if opts.wait => {
                    say(opts.verbose, "no idle host; waiting");
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
                Ok(_) => {
                    say(opts.verbose, "no idle host; running locally");
                    release(&leases);
                    return run_locally(&opts.argv);
                }
                Err(e) => {
                    eprintln!("rexec: registry unavailable ({e}); running locally");
                    release(&leases);
                    return run_locally(&opts.argv);
                }
            }
        };
        say(opts.verbose, &format!("running on {host} ({agent_addr})"));
        let job = match rt.block_on(reg.job_start(uid, &opts.home, &host)) {
            Ok(j) => j,
            Err(e) => {
                debug!("job_start: {e}");
                rand::random::<u64>() >> 1
            }
        };
        // Keep the host's lease while the job runs (leases expire unless renewed, so a
        // host whose rexec died is lent out again).
        let renewer = lease.map(|l| {
            let reg = reg.clone();
            rt.spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(15)).await;
                    if let Err(e) = reg.renew_leases(uid, vec![l]).await {
                        debug!("lease renewal: {e}");
                    }
                }
            })
        });
        let r = run_on(&rt, &opts, job, &host, &agent_addr, &cwd, uid, gid);
        if let Some(r) = renewer {
            r.abort();
        }
        let code = match &r {
            Ok(c) => *c,
            Err(e) => e.error().exit_code() as i32,
        };
        let _ = rt.block_on(reg.job_end(job, code));
        drop(slot);
        match r {
            Err(Failure::NotStarted(e))
                if opts.host.is_none() && e.other_host_may_work() && tries < 4 =>
            {
                eprintln!("rexec: {host} could not start the job ({e}); skipping it");
                if let Some(d) = &build {
                    crate::build::mark_bad(d, &host, &e.to_string());
                }
            }
            other => break other.map_err(Failure::into_error),
        }
    };
    release(&leases);
    result
}

/// How a run on one host failed.
enum Failure {
    /// Before the job started (another host may do).
    NotStarted(RexecError),
    /// After it started.
    Started(RexecError),
}

impl Failure {
    fn error(&self) -> &RexecError {
        match self {
            Failure::NotStarted(e) | Failure::Started(e) => e,
        }
    }
    fn into_error(self) -> RexecError {
        match self {
            Failure::NotStarted(e) | Failure::Started(e) => e,
        }
    }
}

/// The local terminal in raw mode while a job runs on a remote terminal (keys go to the
/// remote line discipline, as with ssh); restored when dropped.
struct RawTerminal(libc::termios);

impl RawTerminal {
    fn enter() -> Option<RawTerminal> {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a termios we own.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            let saved = t;
            libc::cfmakeraw(&mut t);
            (libc::tcsetattr(0, libc::TCSADRAIN, &t) == 0).then_some(RawTerminal(saved))
        }
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restoring the settings read from fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &self.0) };
    }
}

/// The size of the terminal on fd 0, if it is one.
fn winsize() -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ fills a winsize we own.
    unsafe {
        let mut ws: libc::winsize = std::mem::zeroed();
        (libc::ioctl(0, libc::TIOCGWINSZ, &mut ws) == 0).then_some((ws.ws_row, ws.ws_col))
    }
}

/// Whether the job gets a terminal.
fn wants_pty(opts: &Options) -> bool {
    // SAFETY: isatty/tcgetpgrp/getpgrp only read.
    let (tty, fg) = unsafe { (libc::isatty(0) == 1, libc::tcgetpgrp(0) == libc::getpgrp()) };
    match opts.pty {
        PtyMode::Always => tty,
        PtyMode::Never => false,
        PtyMode::Auto => tty && fg && !opts.shell_mode,
    }
}

/// `call`, given up (`Err(None)`) when the agent stays unreachable for
/// [`AGENT_GONE_AFTER`]. `was_up` is set when the connection was up at some point of the
/// call (the request may have reached the agent).
async fn call_watching(
    agent: &RpcClient,
    req: Request,
    was_up: &std::sync::atomic::AtomicBool,
) -> Result<Response, Option<RpcError>> {
    use std::sync::atomic::Ordering::Relaxed;
    let gone = async {
        let mut down_since: Option<std::time::Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if agent.is_up() {
                was_up.store(true, Relaxed);
                down_since = None;
            } else if down_since
                .get_or_insert_with(std::time::Instant::now)
                .elapsed()
                >= AGENT_GONE_AFTER
            {
                return;
            }
        }
    };
    let r = tokio::select! {
        r = agent.call(req) => r.map_err(Some),
        _ = gone => Err(None),
    };
    if agent.is_up() || r.is_ok() {
        was_up.store(true, Relaxed);
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn run_on(
    rt: &tokio::runtime::Runtime,
    opts: &Options,
    job: u64,
    host: &str,
    agent_addr: &str,
    cwd: &Path,
    uid: u32,
    gid: u32,
) -> Result<i32, Failure> {
    let dir = opts.mount.join(".rexec").join(format!("{job:x}"));
    let pipes_err = |source| {
        Failure::NotStarted(RexecError::Pipes {
            dir: dir.clone(),
            source,
        })
    };
    std::fs::create_dir_all(&dir).map_err(pipes_err)?;
    let (pin, pout, perr) = (dir.join("stdin"), dir.join("stdout"), dir.join("stderr"));
    for p in [&pin, &pout, &perr] {
        mkpipe(p).map_err(pipes_err)?;
    }
    let pty = wants_pty(opts).then(|| winsize().unwrap_or((24, 80)));
    let cleanup = |d: &Path| {
        for n in ["stdin", "stdout", "stderr"] {
            let _ = std::fs::remove_file(d.join(n));
        }
        let _ = std::fs::remove_dir(d);
    };
    // The other ends of the job's stdio, opened (blocking until the job opens its ends) and
    // copied on threads of their own.
    let tin_opened = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tin = {
        let (p, opened) = (pin.clone(), tin_opened.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut w = std::fs::OpenOptions::new().write(true).open(&p)?;
            opened.store(true, std::sync::atomic::Ordering::Relaxed);
            let mut buf = vec![0u8; 65536];
            let mut stdin = std::io::stdin().lock();
            loop {
                let n = stdin.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                if let Err(e) = w.write_all(&buf[..n]) {
                    // The job closed its stdin: stop copying, like a local pipe would.
                    return if e.kind() == std::io::ErrorKind::BrokenPipe {
                        Ok(())
                    } else {
                        Err(e)
                    };
                }
            }
        })
    };
    let copy_out = |p: PathBuf, to_err: bool| {
        std::thread::spawn(move || -> std::io::Result<()> {
            let mut r = std::fs::File::open(&p)?;
            let mut buf = vec![0u8; 65536];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                if to_err {
                    let mut e = std::io::stderr().lock();
                    e.write_all(&buf[..n])?;
                    e.flush()?;
                } else {
                    let mut o = std::io::stdout().lock();
                    o.write_all(&buf[..n])?;
                    o.flush()?;
                }
            }
        })
    };
    let tout = copy_out(pout.clone(), false);
    let terr = copy_out(perr.clone(), true);
    let connect = |addr: &str| {
        RpcClient::start(
            rt.handle().clone(),
            addr.to_string(),
            opts.key.clone(),
            format!("rexec@{}", opts.home),
            Duration::from_secs(30),
            Arc::new(|_| Ok(())),
        )
    };
    let agent = connect(agent_addr);
    // Where the job runs now: it may migrate while we wait.
    let current = Arc::new(std::sync::Mutex::new(agent.clone()));
    let spec = ExecSpec {
        job,
        argv: opts.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env: std::env::vars_os()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect(),
        cwd: cwd.as_os_str().as_bytes().to_vec(),
        uid,
        gid,
        groups: groups(),
        umask: current_umask(),
        stdin: pin.as_os_str().as_bytes().to_vec(),
        stdout: pout.as_os_str().as_bytes().to_vec(),
        stderr: perr.as_os_str().as_bytes().to_vec(),
        home: opts.home.clone(),
        pty,
    };
    let agent_err = |source| RexecError::Agent {
        host: host.to_string(),
        source,
    };
    let lost = |e: Option<RpcError>| RexecError::HostLost {
        host: host.to_string(),
        job,
        why: match e {
            Some(e) => format!("its agent at {agent_addr}: {e}"),
            None => format!(
                "its agent at {agent_addr} has been unreachable for {} s",
                AGENT_GONE_AFTER.as_secs()
            ),
        },
    };
    // The job never started: the copy threads wait in open() for its ends of the pipes.
    // Open those ends here (non-blocking) and close them, until every thread is past its
    // open (a thread left waiting in open() on /wisp would keep this process from exiting).
    let abandon = |d: &Path| {
        for _ in 0..150 {
            let mut waiting = false;
            let ends = [
                (
                    "stdin",
                    false,
                    tin_opened.load(std::sync::atomic::Ordering::Relaxed),
                ),
                ("stdout", true, tout.is_finished()),
                ("stderr", true, terr.is_finished()),
            ];
            for (n, write, done) in ends {
                if !done {
                    waiting = true;
                    let _ = std::fs::OpenOptions::new()
                        .read(!write)
                        .write(write)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(d.join(n));
                }
            }
            if !waiting {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        cleanup(d);
    };
    let argv0 = String::from_utf8_lossy(&spec.argv[0]).into_owned();
    let reached = std::sync::atomic::AtomicBool::new(false);
    match rt.block_on(call_watching(&agent, Request::Exec(spec), &reached)) {
        Ok(Response::Started { pid }) => debug!(job, pid, host, "started"),
        Ok(other) => {
            abandon(&dir);
            return Err(Failure::NotStarted(agent_err(RpcError::Remote(
                wisp_proto::msg::WireError::new(libc::EIO, format!("unexpected reply {other:?}")),
            ))));
        }
        Err(Some(RpcError::Remote(w))) if w.errno == libc::ENOENT => {
            abandon(&dir);
            return Err(Failure::NotStarted(RexecError::NotFound {
                cmd: argv0,
                host: host.to_string(),
            }));
        }
        Err(Some(e @ RpcError::Remote(_))) => {
            abandon(&dir);
            return Err(Failure::NotStarted(agent_err(e)));
        }
        Err(e) => {
            abandon(&dir);
            // The connection was up: the job may have started there, and must not be
            // started a second time elsewhere.
            return Err(if reached.load(std::sync::atomic::Ordering::Relaxed) {
                Failure::Started(lost(e))
            } else {
                Failure::NotStarted(e.map(agent_err).unwrap_or_else(|| lost(None)))
            });
        }
    }
    // Keys go to the remote terminal while the job runs there.
    let raw = pty.and_then(|_| RawTerminal::enter());
    // Forward the signals a user sends to rexec.
    let fwd = {
        let current = current.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let sigs = [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGHUP,
                libc::SIGQUIT,
                libc::SIGTSTP,
                libc::SIGCONT,
                libc::SIGWINCH,
                libc::SIGUSR1,
                libc::SIGUSR2,
            ];
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<i32>();
            for s in sigs {
                let mut st = match signal(SignalKind::from_raw(s)) {
                    Ok(st) => st,
                    Err(_) => continue,
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    while st.recv().await.is_some() {
                        let _ = tx.send(s);
                    }
                });
            }
            while let Some(s) = rx.recv().await {
                // On a terminal, a new size is set there (the kernel signals the job).
                let req = match (s, pty.and(winsize())) {
                    (libc::SIGWINCH, Some((rows, cols))) => Request::JobWinsize { job, rows, cols },
                    _ => Request::JobSignal { job, signal: s },
                };
                let agent = current.lock().unwrap().clone();
                if let Ok(Response::Moved { .. }) = agent.call(req.clone()).await {
                    // Raced with a migration: the waiter below switches hosts; try once more.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let agent = current.lock().unwrap().clone();
                    let _ = agent.call(req).await;
                }
            }
        })
    };
    let mut host = host.to_string();
    let (code, signal) = loop {
        let agent = current.lock().unwrap().clone();
        let failed = |e: RexecError| {
            fwd.abort();
            Err(Failure::Started(e))
        };
        let reached = std::sync::atomic::AtomicBool::new(true);
        match rt.block_on(call_watching(&agent, Request::JobWait { job }, &reached)) {
            Ok(Response::Exited { code, signal }) => break (code, signal),
            Err(Some(RpcError::Remote(w))) if w.errno == libc::EAGAIN => continue,
            Ok(Response::Moved { host: h, addr }) => {
                say(opts.verbose, &format!("job {job} moved from {host} to {h}"));
                host = h;
                *current.lock().unwrap() = connect(&addr);
                continue;
            }
            Ok(other) => {
                return failed(agent_err(RpcError::Remote(
                    wisp_proto::msg::WireError::new(
                        libc::EIO,
                        format!("unexpected reply {other:?}"),
                    ),
                )));
            }
            Err(Some(e @ RpcError::Remote(_))) => return failed(agent_err(e)),
            Err(e) => {
                return failed(RexecError::HostLost {
                    host: host.clone(),
                    job,
                    why: match e {
                        Some(e) => format!("its agent: {e}"),
                        None => format!(
                            "its agent has been unreachable for {} s",
                            AGENT_GONE_AFTER.as_secs()
                        ),
                    },
                })
            }
        }
    };
    fwd.abort();
    // Drain what the job wrote; a background child still holding the pipes must not keep
    // us forever.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    for t in [tout, terr] {
        while !t.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if t.is_finished() {
            if let Ok(Err(e)) = t.join() {
                debug!("stdio copy: {e}");
            }
        }
    }
    drop(tin); // may still be blocked reading our stdin; it dies with the process
    drop(raw);
    cleanup(&dir);
    say(
        opts.verbose,
        &format!(
            "job {job} on {host} exited with {code}{}",
            if signal != 0 {
                format!(" (signal {signal})")
            } else {
                String::new()
            }
        ),
    );
    Ok(code)
}

/// Turn `rexec -c CMD` (how make calls its SHELL) into `sh -c CMD`.
pub fn shell_argv(args: Vec<OsString>) -> Vec<OsString> {
    if args.first().map(|a| a == OsStr::new("-c")).unwrap_or(false) {
        let mut v = vec![OsString::from("/bin/sh")];
        v.extend(args);
        v
    } else {
        args
    }
}
