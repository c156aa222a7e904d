//! The simulated cluster: a whole wisp cluster on one machine, for tests and the demo.
//!
//! Every host (servers `srv1..srvM`, workstations `ws1..wsN`) gets its own network namespace
//! `wisp-<cluster>-<host>`, joined by a veth pair to a bridge that lives in a namespace of its
//! own (`wisp-<cluster>-br`), so the machine's own network never sees the cluster's addresses
//! (10.99.0.0/24, private to each cluster's bridge). Each host also gets a mount and uts
//! namespace, held open by an anchor process (`sleep infinity` under `unshare`); daemons and
//! commands join all three with `nsenter`. A workstation's `wispd` mounts `/wisp` inside its
//! host's mount namespace only.
//!
//! State (pids, addresses, key) is kept in `/run/wisp/<cluster>/state.json` so that
//! `wisp cluster exec|status|down` work from any shell. [`down`] leaves nothing behind: it
//! kills every process in the cluster's namespaces, deletes the namespaces and the state,
//! and works from the namespace names alone, so it also cleans up after a crashed test.
//!
//! The cluster registry: every server hosts a replica (`--registry-id i` on `srv<i>`, the
//! peers being every server's address; `srv1` alone gets `--init-registry`, which is a no-op
//! on its restarts). Once the servers are up, the harness registers the root domain `/` ->
//! srv1 and raises the idle policy's load limits with the `wisp` CLI, run on srv1 like an
//! operator would: simulated hosts share one kernel, hence one load average, so load cannot
//! tell them apart. Workstations run wispd with `--registry` naming every server and
//! `--input-devices none` (a simulated host has no keyboard of its own: its owner is played
//! with `wisp owner --cluster NAME HOST active|idle`, through the override file
//! [`Cluster::owner_file`], private to the cluster so that clusters run side by side).
//!
//! Architecture Invariant: the harness only starts the same binaries a real deployment runs,
//! with the same flags; nothing in wisp knows it runs simulated.

use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use wisp_proto::key::ClusterKey;

/// Port every file server listens on inside its host.
pub const SERVER_PORT: u16 = 7070;
/// Where workstations mount the namespace.
pub const MOUNTPOINT: &str = "/wisp";

/// Errors of the harness; each names the command or host involved.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("`{cmd}` failed: {stderr}")]
    Command { cmd: String, stderr: String },
    #[error("cannot run `{cmd}`: {source} (is it installed? the README's test command installs iproute2, util-linux and fuse3)")]
    Spawn { cmd: String, source: std::io::Error },
    #[error("no cluster named {0} is up (see `wisp cluster status`)")]
    NotUp(String),
    #[error("cluster {cluster} has no host {host}")]
    NoHost { cluster: String, host: String },
    #[error("binary {0} not found: build with `cargo build --release --bins` or set WISP_BIN_DIR")]
    NoBinary(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("host {host}: {what} did not come up within {secs} s; log: {log}")]
    Timeout {
        host: String,
        what: String,
        secs: u64,
        log: String,
    },
    #[error("bad state file {path}: {msg}")]
    State { path: PathBuf, msg: String },
}

type Result<T> = std::result::Result<T, ClusterError>;

/// What to bring up.
#[derive(Debug, Clone)]
pub struct Spec {
    pub name: String,
    pub servers: usize,
    pub workstations: usize,
    /// Where servers keep their data (default `/var/tmp/wisp/<name>`).
    pub data_root: Option<PathBuf>,
    /// Directory holding `wisp-server` and `wispd` (default: see [`bin_dir`]).
    pub bin_dir: Option<PathBuf>,
    /// Extra arguments for every wispd.
    pub wispd_args: Vec<String>,
    /// Extra arguments for every wisp-server.
    pub server_args: Vec<String>,
    /// Log filter for the daemons (RUST_LOG syntax).
    pub log: String,
    /// Hosts the servers trust for root (`wisp-server --trust-root`); root from any other
    /// host is squashed to nobody. Default: every workstation (their wispd writes
    /// migration images as root, and many tests act as root); tests of root squashing
    /// leave some out.
    pub trust_root: Vec<String>,
}

impl Spec {
    pub fn new(name: &str, servers: usize, workstations: usize) -> Self {
        Spec {
            name: name.into(),
            servers,
            workstations,
            data_root: None,
            bin_dir: None,
            wispd_args: vec![],
            server_args: vec![],
            log: "info".into(),
            trust_root: (1..=workstations).map(|i| format!("ws{i}")).collect(),
        }
    }
}

/// Role of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Server,
    Workstation,
}

/// One simulated host.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub role: Role,
    pub netns: String,
    pub addr: Ipv4Addr,
    /// Anchor process holding the host's mount and uts namespaces.
    pub anchor: u32,
    /// The host's daemon (wisp-server or wispd), if running.
    pub daemon: Option<u32>,
}

/// A running cluster, as recorded in its state file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Cluster {
    pub name: String,
    pub hosts: Vec<Host>,
    pub key_file: PathBuf,
    pub data_root: PathBuf,
    pub bin_dir: PathBuf,
    pub wispd_args: Vec<String>,
    pub server_args: Vec<String>,
    pub log: String,
}

fn state_dir(name: &str) -> PathBuf {
    PathBuf::from("/run/wisp").join(name)
}

fn run(cmd: &mut Command) -> Result<Output> {
    let desc = format!("{cmd:?}").replace('"', "");
    let out = cmd.output().map_err(|source| ClusterError::Spawn {
        cmd: desc.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            cmd: desc,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(|_| ())
}

/// Where the wisp binaries are: `$WISP_BIN_DIR`, else next to the running program (or its
/// parent, for test binaries in `target/*/deps`).
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("WISP_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    Ok(dir)
}

fn need_bin(dir: &Path, name: &str) -> Result<PathBuf> {
    let p = dir.join(name);
    if p.is_file() {
        Ok(p)
    } else {
        Err(ClusterError::NoBinary(p.display().to_string()))
    }
}

/// Check that this machine can host a simulated cluster; the error says what is missing.
pub fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(ClusterError::Command {
            cmd: "preflight".into(),
            stderr: "the simulated cluster needs root (namespaces, FUSE mounts)".into(),
        });
    }
    for tool in ["ip", "nsenter", "unshare"] {
        run(Command::new("sh").args(["-c", &format!("command -v {tool}")])).map_err(|_| {
            ClusterError::Spawn {
                cmd: tool.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{tool} not found"),
                ),
            }
        })?;
    }
    if !Path::new("/dev/fuse").exists() {
        return Err(ClusterError::Command {
            cmd: "preflight".into(),
            stderr: "/dev/fuse is missing: load the fuse module".into(),
        });
    }
    Ok(())
}

impl Cluster {
    /// Bring a cluster up: namespaces, network, servers, then workstations with `/wisp`
    /// mounted. On any failure everything made so far is torn down again.
    pub fn up(spec: &Spec) -> Result<Cluster> {
        preflight()?;
        let bin_dir = match &spec.bin_dir {
            Some(d) => d.clone(),
            None => bin_dir()?,
        };
        need_bin(&bin_dir, "wisp-server")?;
        need_bin(&bin_dir, "wispd")?;
        need_bin(&bin_dir, "wisp")?;
        if spec.name.is_empty()
            || spec.name.len() > 24
            || !spec
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ClusterError::Command {
                cmd: "cluster up".into(),
                stderr: format!(
                    "cluster name {:?} must be 1-24 letters, digits or '-'",
                    spec.name
                ),
            });
        }
        down(&spec.name)?; // leftovers of a crashed run with the same name
        let sd = state_dir(&spec.name);
        fs::create_dir_all(&sd)?;
        let key_file = sd.join("cluster.key");
        ClusterKey::generate()
            .save(&key_file)
            .map_err(|e| ClusterError::Command {
                cmd: "keygen".into(),
                stderr: e.to_string(),
            })?;
        let data_root = spec
            .data_root
            .clone()
            .unwrap_or_else(|| PathBuf::from("/var/tmp/wisp").join(&spec.name));
        let _ = fs::remove_dir_all(&data_root);
        fs::create_dir_all(&data_root)?;
        fs::create_dir_all(MOUNTPOINT)?;
        let mut c = Cluster {
            name: spec.name.clone(),
            hosts: vec![],
            key_file,
            data_root,
            bin_dir,
            wispd_args: spec.wispd_args.clone(),
            server_args: {
                let mut a = spec.server_args.clone();
                if !spec.trust_root.is_empty() {
                    a.push("--trust-root".into());
                    a.push(spec.trust_root.join(","));
                }
                a
            },
            log: spec.log.clone(),
        };
        match c.build(spec) {
            Ok(()) => Ok(c),
            Err(e) => {
                let _ = down(&spec.name);
                Err(e)
            }
        }
    }

    fn build(&mut self, spec: &Spec) -> Result<()> {
        let br = format!("wisp-{}-br", self.name);
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        ip(&["-n", &br, "link", "set", "lo", "up"])?;
        let mut names: Vec<(String, Role, u8)> = vec![];
        for i in 1..=spec.servers {
            names.push((format!("srv{i}"), Role::Server, 10 + i as u8));
        }
        for i in 1..=spec.workstations {
            names.push((format!("ws{i}"), Role::Workstation, 100 + i as u8));
        }
        for (name, role, octet) in names {
            let ns = format!("wisp-{}-{}", self.name, name);
            let addr = Ipv4Addr::new(10, 99, 0, octet);
            ip(&["netns", "add", &ns])?;
            let peer = format!("v-{name}");
            ip(&[
                "-n", &br, "link", "add", &peer, "type", "veth", "peer", "name", "eth0", "netns",
                &ns,
            ])?;
            ip(&["-n", &br, "link", "set", &peer, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            let anchor = spawn_anchor(&ns, &name)?;
            self.hosts.push(Host {
                name,
                role,
                netns: ns,
                addr,
                anchor,
                daemon: None,
            });
            self.save()?;
        }
        for i in 0..self.hosts.len() {
            if self.hosts[i].role == Role::Server {
                self.start_daemon(&self.hosts[i].name.clone())?;
            }
        }
        self.setup_registry()?;
        for i in 0..self.hosts.len() {
            if self.hosts[i].role == Role::Workstation {
                self.start_daemon(&self.hosts[i].name.clone())?;
            }
        }
        Ok(())
    }

    /// `ADDR:PORT` of every server (the registry replicas), comma separated.
    pub fn registry_addrs(&self) -> String {
        self.servers()
            .map(|h| format!("{}:{SERVER_PORT}", h.addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Run the `wisp` CLI on `host` against this cluster's registry; returns its stdout.
    pub fn wisp_cli(&self, host: &str, args: &[&str]) -> Result<String> {
        let wisp = self.bin_dir.join("wisp").display().to_string();
        let key = self.key_file.display().to_string();
        let reg = self.registry_addrs();
        let mut argv: Vec<&str> = vec![&wisp];
        argv.extend_from_slice(args);
        argv.extend_from_slice(&["--registry", &reg, "--key", &key]);
        let mut c = self.command(host, &argv)?;
        c.stdin(Stdio::null());
        let desc = argv.join(" ");
        let out = c.output().map_err(|source| ClusterError::Spawn {
            cmd: desc.clone(),
            source,
        })?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                cmd: format!("on {host}: {desc}"),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The root domain on srv1, and load limits that ignore the shared load average.
    fn setup_registry(&self) -> Result<()> {
        let Some(srv1) = self.servers().next() else {
            return Ok(());
        };
        let (name, root) = (srv1.name.clone(), self.server_addr());
        self.wisp_cli(&name, &["domains", "add", "/", &root])?;
        self.wisp_cli(
            &name,
            &["registry", "policy", "--max-load", "1000,1000,1000"],
        )?;
        Ok(())
    }

    fn save(&self) -> Result<()> {
        let p = state_dir(&self.name).join("state.json");
        let tmp = p.with_extension("tmp");
        fs::write(
            &tmp,
            serde_json::to_vec_pretty(self).expect("state encodes"),
        )?;
        fs::rename(tmp, p)?;
        Ok(())
    }

    /// Load the state of a cluster that is up.
    pub fn load(name: &str) -> Result<Cluster> {
        let p = state_dir(name).join("state.json");
        let bytes = fs::read(&p).map_err(|_| ClusterError::NotUp(name.into()))?;
        serde_json::from_slice(&bytes).map_err(|e| ClusterError::State {
            path: p,
            msg: e.to_string(),
        })
    }

    /// Names of the clusters with a state file.
    pub fn list() -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir("/run/wisp")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter(|e| e.path().join("state.json").exists())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn host(&self, name: &str) -> Result<&Host> {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .ok_or_else(|| ClusterError::NoHost {
                cluster: self.name.clone(),
                host: name.into(),
            })
    }

    pub fn servers(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| h.role == Role::Server)
    }

    pub fn workstations(&self) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(|h| h.role == Role::Workstation)
    }

    /// `ADDR:PORT` of the first file server.
    pub fn server_addr(&self) -> String {
        let s = self.servers().next().expect("a cluster has a server");
        format!("{}:{SERVER_PORT}", s.addr)
    }

    /// The owner-activity override file of workstation `host` (wispd --owner-file).
    pub fn owner_file(&self, host: &str) -> PathBuf {
        state_dir(&self.name).join("owner").join(host)
    }

    /// The registry replica id of server `host`: N for srvN.
    pub fn registry_id(&self, host: &str) -> Result<u64> {
        host.strip_prefix("srv")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ClusterError::NoHost {
                cluster: self.name.clone(),
                host: format!("{host} (not a server)"),
            })
    }

    /// The server whose registry replica has id `id`.
    pub fn server_of_replica(&self, id: u64) -> Option<&Host> {
        self.servers()
            .find(|h| self.registry_id(&h.name).ok() == Some(id))
    }

    pub fn log_path(&self, host: &str) -> PathBuf {
        state_dir(&self.name).join(format!("{host}.log"))
    }

    /// A command that runs `argv` on `host` (in its network, mount and uts namespaces).
    pub fn command(&self, host: &str, argv: &[&str]) -> Result<Command> {
        let h = self.host(host)?;
        let mut c = Command::new("nsenter");
        c.args(["-t", &h.anchor.to_string(), "-n", "-m", "-u", "--"]);
        c.args(argv);
        // What rexec and the wisp CLI need to find the cluster from inside a host.
        c.env("WISP_KEY", &self.key_file)
            .env("WISP_HOST", host)
            .env("WISP_REGISTRY", self.registry_addrs());
        c.env(
            "PATH",
            format!(
                "{}:{}",
                self.bin_dir.display(),
                std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into())
            ),
        );
        Ok(c)
    }

    /// Run a shell command line on `host`; returns its output (stdout, stderr, status).
    pub fn sh(&self, host: &str, script: &str) -> Result<Output> {
        let mut c = self.command(host, &["sh", "-c", script])?;
        c.stdin(Stdio::null());
        c.output().map_err(|source| ClusterError::Spawn {
            cmd: format!("sh on {host}"),
            source,
        })
    }

    /// Like [`Cluster::sh`] but fails unless the command succeeds; returns stdout.
    pub fn sh_ok(&self, host: &str, script: &str) -> Result<String> {
        let out = self.sh(host, script)?;
        if !out.status.success() {
            return Err(ClusterError::Command {
                cmd: format!("on {host}: {script}"),
                stderr: format!(
                    "{}\n{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Start the daemon of `host` (wisp-server on servers, wispd on workstations) and wait
    /// until it serves (a server accepts connections; a workstation has `/wisp` mounted).
    pub fn start_daemon(&mut self, host: &str) -> Result<u32> {
        let h = self.host(host)?.clone();
        if h.role == Role::Workstation && !h.daemon.map(pid_alive).unwrap_or(false) {
            // A wispd that was killed leaves its FUSE mount behind, dead ("transport endpoint
            // is not connected"): detach it so the new wispd can mount, and so readiness is
            // not mistaken from the stale entry.
            let _ = self.sh(
                host,
                &format!(
                    "grep -q ' {MOUNTPOINT} fuse' /proc/self/mounts && umount -l {MOUNTPOINT}"
                ),
            );
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(host))?;
        let key = self.key_file.display().to_string();
        let mut argv: Vec<String> = match h.role {
            Role::Server => {
                let data = self.data_root.join(host);
                let id = self.registry_id(host)?;
                let peers: Vec<String> = self
                    .servers()
                    .map(|s| {
                        Ok(format!(
                            "{}={}:{SERVER_PORT}",
                            self.registry_id(&s.name)?,
                            s.addr
                        ))
                    })
                    .collect::<Result<_>>()?;
                let mut v = vec![
                    self.bin_dir.join("wisp-server").display().to_string(),
                    "--data".into(),
                    data.display().to_string(),
                    "--listen".into(),
                    format!("{}:{SERVER_PORT}", h.addr),
                    "--key".into(),
                    key,
                    "--registry-id".into(),
                    id.to_string(),
                    "--registry-peers".into(),
                    peers.join(","),
                ];
                if id == 1 {
                    v.push("--init-registry".into());
                }
                v.extend(self.server_args.iter().cloned());
                v
            }
            Role::Workstation => {
                let mut v = vec![
                    self.bin_dir.join("wispd").display().to_string(),
                    "--server".into(),
                    self.server_addr(),
                    "--mount".into(),
                    MOUNTPOINT.into(),
                    "--key".into(),
                    key,
                    "--name".into(),
                    host.into(),
                    "--registry".into(),
                    self.registry_addrs(),
                    "--input-devices".into(),
                    "none".into(),
                    "--owner-file".into(),
                    self.owner_file(host).display().to_string(),
                ];
                v.extend(self.wispd_args.iter().cloned());
                v
            }
        };
        let refs: Vec<&str> = argv.iter_mut().map(|s| s.as_str()).collect();
        let mut cmd = self.command(host, &refs)?;
        cmd.env("RUST_LOG", &self.log)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // Own session: a signal to the caller's terminal does not reach the daemons.
        unsafe_setsid(&mut cmd);
        let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
            cmd: refs.join(" "),
            source,
        })?;
        let pid = child.id();
        std::mem::forget(child); // reaped by init when it exits; `down` kills it
        if let Some(hm) = self.hosts.iter_mut().find(|x| x.name == host) {
            hm.daemon = Some(pid);
        }
        self.save()?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = match h.role {
                // A listening socket on the server port in the host's own /proc/net/tcp.
                Role::Server => self
                    .sh(
                        host,
                        &format!("grep -q ':{SERVER_PORT:04X} 00000000:0000 0A' /proc/net/tcp"),
                    )
                    .map(|o| o.status.success())
                    .unwrap_or(false),
                Role::Workstation => self
                    .sh(
                        host,
                        &format!("grep -q ' {MOUNTPOINT} fuse' /proc/self/mounts"),
                    )
                    .map(|o| o.status.success())
                    .unwrap_or(false),
            };
            if ready {
                return Ok(pid);
            }
            if !pid_alive(pid) || Instant::now() > deadline {
                let log = fs::read_to_string(self.log_path(host)).unwrap_or_default();
                let tail: String = log
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect::<Vec<_>>()
                    .join("\n");
                return Err(ClusterError::Timeout {
                    host: host.into(),
                    what: "daemon".into(),
                    secs: 30,
                    log: tail,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Cut `host` off the cluster's network (its port on the bridge goes down), or join it
    /// back: a network partition of that one host. Its processes keep running.
    pub fn set_partitioned(&self, host: &str, partitioned: bool) -> Result<()> {
        self.host(host)?;
        let br = format!("wisp-{}-br", self.name);
        ip(&[
            "-n",
            &br,
            "link",
            "set",
            &format!("v-{host}"),
            if partitioned { "down" } else { "up" },
        ])
    }

    /// Kill a host's daemon with `signal` and wait until it is gone.
    pub fn kill_daemon(&mut self, host: &str, signal: i32) -> Result<()> {
        let pid = self.host(host)?.daemon;
        if let Some(pid) = pid {
            // SAFETY: kill(2) with a pid we started; a stale pid only yields ESRCH.
            unsafe { libc::kill(pid as i32, signal) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while pid_alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        if let Some(hm) = self.hosts.iter_mut().find(|x| x.name == host) {
            hm.daemon = None;
        }
        self.save()
    }

    /// One line per host: name, role, address, daemon state.
    pub fn status(&self) -> String {
        let mut s = format!("cluster {}\n", self.name);
        for h in &self.hosts {
            let d = match h.daemon {
                Some(p) if pid_alive(p) => format!("running (pid {p})"),
                Some(p) => format!("DEAD (pid {p})"),
                None => "stopped".into(),
            };
            s += &format!(
                "  {:<6} {:<12} {:<12} {}\n",
                h.name,
                format!("{:?}", h.role).to_lowercase(),
                h.addr,
                d
            );
        }
        s
    }
}

fn unsafe_setsid(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
}

fn pid_alive(pid: u32) -> bool {
    // A zombie still has a /proc entry: look at its state.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit(')')
            .next()
            .map(|r| !r.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Shell commands that mount this machine's cgroup filesystems again in a host's mount
/// namespace: `ip netns exec` mounts a fresh /sys there, which hides them, and the agents
/// put their jobs into cgroups. Mounting a v1 hierarchy with the same controllers attaches
/// the very same hierarchy, and cgroup2 is one tree, so every host sees the machine's
/// cgroups. Best effort: without them the agents run jobs without limits.
fn cgroup_mounts() -> String {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let mut cmds = vec![":".to_string()];
    let mut tmpfs = false;
    for l in mounts.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() < 4 || !f[1].starts_with("/sys/fs/cgroup") {
            continue;
        }
        let (dir, kind, opts) = (f[1], f[2], f[3]);
        if !dir
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/_,=.-".contains(c))
            || !opts
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_,=.-".contains(c))
        {
            continue;
        }
        match kind {
            "tmpfs" if dir == "/sys/fs/cgroup" => {
                tmpfs = true;
                cmds.push("mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup".into());
            }
            "cgroup" | "cgroup2" => {
                if dir != "/sys/fs/cgroup" && !tmpfs {
                    tmpfs = true;
                    cmds.push("mount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup".into());
                }
                cmds.push(format!(
                    "mkdir -p {dir}; mount -t {kind} -o {opts} {kind} {dir}"
                ));
            }
            _ => {}
        }
    }
    cmds.join("; ")
}

fn spawn_anchor(ns: &str, host: &str) -> Result<u32> {
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        ns,
        "unshare",
        "--mount",
        "--uts",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
    ])
    .arg(format!(
        "hostname {host} && {{ {}; }} 2>/dev/null; exec sleep infinity",
        cgroup_mounts()
    ))
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    unsafe_setsid(&mut cmd);
    let child = cmd.spawn().map_err(|source| ClusterError::Spawn {
        cmd: "ip netns exec ... unshare".into(),
        source,
    })?;
    let pid = child.id();
    std::mem::forget(child);
    // Wait until the anchor has its own uts namespace with the host name set.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(c) = fs::read_to_string(format!("/proc/{pid}/comm")) {
            if c.trim() == "sleep" {
                return Ok(pid);
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Err(ClusterError::Timeout {
        host: host.into(),
        what: "namespace anchor".into(),
        secs: 10,
        log: String::new(),
    })
}

/// Tear a cluster down completely: every process in its namespaces, the namespaces, the
/// state and the data. Works from namespace names alone (after a crash, with no state file).
pub fn down(name: &str) -> Result<()> {
    let prefix = format!("wisp-{name}-");
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    let list = String::from_utf8_lossy(&out.stdout);
    let nss: Vec<String> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&prefix))
        .map(String::from)
        .collect();
    let mut pids: Vec<i32> = Vec::new();
    if let Ok(c) = Cluster::load(name) {
        for h in &c.hosts {
            pids.push(h.anchor as i32);
            pids.extend(h.daemon.map(|d| d as i32));
        }
    }
    for ns in &nss {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
            pids.extend(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok()),
            );
        }
    }
    // Daemons first, gently (wispd unmounts on SIGTERM), then everything else.
    for sig in [libc::SIGTERM, libc::SIGKILL] {
        for p in &pids {
            // SAFETY: kill(2); a pid that is gone only yields ESRCH.
            unsafe { libc::kill(*p, sig) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while pids.iter().any(|p| pid_alive(*p as u32)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for ns in &nss {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    let _ = fs::remove_dir_all(state_dir(name));
    let _ = fs::remove_dir_all(PathBuf::from("/var/tmp/wisp").join(name));
    Ok(())
}
