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
use wisp_proto::key::ClusterKey;
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// How to run one command.
#[derive(Debug, Clone)]
pub struct Options {
    pub argv: Vec<OsString>,
    /// Run on this host; otherwise ask the registry for an idle one.
    pub host: Option<String>,
    /// When no host is idle: wait for one (true) or run here (false).
    pub wait: bool,
    pub verbose: bool,
    pub key: ClusterKey,
    pub registry: Vec<String>,
    pub mount: PathBuf,
    /// This host's name (the job's home).
    pub home: String,
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
    let reg = RegistryClient::new(
        rt.handle().clone(),
        opts.registry.clone(),
        opts.key.clone(),
        format!("rexec@{}", opts.home),
    )
    .with_timeouts(Duration::from_secs(5), Duration::from_secs(10));
    // Choose the host.
    let mut lease = None;
    let (host, addr) = loop {
        if let Some(h) = &opts.host {
            let hosts = rt
                .block_on(reg.hosts())
                .map_err(|e| RexecError::Registry(e.to_string()))?;
            let hh = hosts
                .into_iter()
                .find(|x| &x.name == h)
                .ok_or_else(|| RexecError::UnknownHost(h.clone()))?;
            break (hh.name, hh.addr);
        }
        match rt.block_on(reg.allocate_hosts(uid, 1, &opts.home, false)) {
            Ok(mut v) if !v.is_empty() => {
                let l = v.remove(0);
                let r = (l.host.clone(), l.addr.clone());
                lease = Some(l.id);
                break r;
            }
            Ok(_) if opts.wait => {
                say(opts.verbose, "no idle host; waiting");
                std::thread::sleep(Duration::from_secs(1));
            }
            Ok(_) => {
                say(opts.verbose, "no idle host; running locally");
                return run_locally(&opts.argv);
            }
            Err(e) => {
                eprintln!("rexec: registry unavailable ({e}); running locally");
                return run_locally(&opts.argv);
            }
        }
    };
    let agent_addr = crate::agent::agent_addr(&addr);
    say(opts.verbose, &format!("running on {host} ({agent_addr})"));
    let job = match rt.block_on(reg.job_start(uid, &opts.home, &host)) {
        Ok(j) => j,
        Err(e) => {
            debug!("job_start: {e}");
            rand::random::<u64>() >> 1
        }
    };
    // Keep the host's lease while the job runs (leases expire unless renewed, so a host
    // whose rexec died is lent out again).
    let reg = Arc::new(reg);
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
    let result = run_on(&rt, &opts, job, &host, &agent_addr, &cwd, uid, gid);
    if let Some(r) = renewer {
        r.abort();
    }
    let code = match &result {
        Ok(c) => *c,
        Err(_) => 255,
    };
    let _ = rt.block_on(reg.job_end(job, code));
    if let Some(l) = lease {
        let _ = rt.block_on(reg.release_hosts(uid, vec![l]));
    }
    result
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
) -> Result<i32, RexecError> {
    let dir = opts.mount.join(".rexec").join(format!("{job:x}"));
    let pipes_err = |source| RexecError::Pipes {
        dir: dir.clone(),
        source,
    };
    std::fs::create_dir_all(&dir).map_err(pipes_err)?;
    let (pin, pout, perr) = (dir.join("stdin"), dir.join("stdout"), dir.join("stderr"));
    for p in [&pin, &pout, &perr] {
        mkpipe(p).map_err(pipes_err)?;
    }
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
    };
    let agent_err = |source| RexecError::Agent {
        host: host.to_string(),
        source,
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
    match rt.block_on(agent.call(Request::Exec(spec))) {
        Ok(Response::Started { pid }) => debug!(job, pid, host, "started"),
        Ok(other) => {
            abandon(&dir);
            return Err(agent_err(RpcError::Remote(
                wisp_proto::msg::WireError::new(libc::EIO, format!("unexpected reply {other:?}")),
            )));
        }
        Err(e) => {
            abandon(&dir);
            return Err(agent_err(e));
        }
    }
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
                let agent = current.lock().unwrap().clone();
                // SAFETY: getuid(2) cannot fail.
                let uid = unsafe { libc::getuid() };
                let req = Request::JobSignal {
                    job,
                    signal: s,
                    uid,
                };
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
        match rt.block_on(agent.call(Request::JobWait { job })) {
            Ok(Response::Exited { code, signal }) => break (code, signal),
            Err(RpcError::Remote(w)) if w.errno == libc::EAGAIN => continue,
            Ok(Response::Moved { host: h, addr }) => {
                say(opts.verbose, &format!("job {job} moved from {host} to {h}"));
                host = h;
                *current.lock().unwrap() = connect(&addr);
                continue;
            }
            Ok(other) => {
                fwd.abort();
                return Err(agent_err(RpcError::Remote(
                    wisp_proto::msg::WireError::new(
                        libc::EIO,
                        format!("unexpected reply {other:?}"),
                    ),
                )));
            }
            Err(e) => {
                fwd.abort();
                return Err(agent_err(e));
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
