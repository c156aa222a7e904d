//! `wisp`: the command-line front end (keys, the simulated cluster, the demo, benchmarks).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use wisp_cluster::{Cluster, Spec};

/// wisp: make a set of Linux workstations behave like one machine.
///
/// One namespace (/wisp, consistent on every host), remote execution on idle hosts, and
/// process migration. See README.md and docs/ for the whole story.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Write a new random cluster key to FILE (mode 0600): the cluster's enrollment secret.
    /// Keep it with the administrator; a host needs it only to enroll (`wisp enroll`).
    Keygen(Keygen),
    /// Print this host's public key (making its key pair, mode 0600, if there is none yet).
    Hostkey(HostkeyArgs),
    /// Enroll this host with the cluster: the cluster key signs a certificate binding the
    /// host's name to its public key. Afterwards the host no longer needs the cluster key.
    Enroll(EnrollArgs),
    /// Revoke HOST: every certificate issued to it so far stops working; new connections are
    /// refused and open ones closed within 2 s on every host that sees the revocation list.
    Revoke(RevokeArgs),
    /// Run a simulated cluster on this machine (needs root).
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Check a file server's health: round trip, clients, request and byte counters.
    Status(ServerStatus),
    /// Make a cluster pipe at PATH (in /wisp): a FIFO that processes on any hosts can share,
    /// with local FIFO semantics (blocking, back-pressure, EOF, EPIPE, atomic PIPE_BUF writes).
    Mkpipe(Mkpipe),
    /// Serve an example pseudo-device at PATH (in /wisp) from this host, until killed:
    /// `wisp pdev counter PATH` (each open reads the next number, the reader's host and uid).
    Pdev(PdevArgs),
    /// Run the demo: a simulated cluster on this machine showing the shared namespace,
    /// rexec builds, live migration and eviction, then a report; leaves nothing behind.
    Demo(DemoArgs),
    /// Move a running job to another host while it runs (see `wisp migrate --help`).
    Migrate(wisp::jobs_cli::MigrateArgs),
    /// Every job in the cluster: id, home, current host, state, CPU, memory, migrations
    /// (also: `wisp jobs`).
    #[command(alias = "jobs")]
    Ps(wisp::jobs_cli::JobsArgs),
    /// make with every recipe on hosts reserved for this build (see `wisp make --help`).
    Make(wisp::make_cli::MakeArgs),
    /// Send a signal to a job wherever it runs now: `wisp kill [-SIG] ID`.
    Kill(wisp::jobs_cli::KillArgs),
    /// Migrate every foreign job off a host now, as if its owner had come back.
    Evict(wisp::jobs_cli::EvictArgs),
    /// Recent migrations, evictions and suspensions, with why and how long.
    Events(wisp::jobs_cli::EventsArgs),
    /// A live view of hosts, jobs and migrations as they happen.
    Top(wisp::jobs_cli::TopArgs),
    // The registry commands: their help text lives with their flags in wisp::registry_cli.
    Hosts(wisp::registry_cli::HostsArgs),
    Domains(wisp::registry_cli::DomainsArgs),
    Registry(wisp::registry_cli::RegistryArgs),
    Owner(wisp::registry_cli::OwnerArgs),
}

#[derive(Parser, Debug)]
struct DemoArgs {
    /// Name of the simulated cluster the demo makes (and removes).
    #[arg(long, default_value = "demo")]
    name: String,
}

#[derive(Parser, Debug)]
struct PdevArgs {
    /// Which example device: `counter`.
    #[arg(value_parser = ["counter"])]
    kind: String,
    /// Path to attach to (in /wisp); made if missing.
    path: PathBuf,
}

#[derive(Parser, Debug)]
struct Mkpipe {
    /// Path of the new pipe; must be inside a wisp mount and must not exist.
    path: PathBuf,
}

#[derive(Parser, Debug)]
struct ServerStatus {
    /// File server address.
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// This host's identity directory (default $WISP_IDENTITY, else /var/lib/wisp/identity).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
    /// Print the counters as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Parser, Debug)]
struct HostkeyArgs {
    /// Identity directory (default $WISP_IDENTITY, else /var/lib/wisp/identity).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
}

#[derive(Parser, Debug)]
struct EnrollArgs {
    /// The cluster key file (the enrollment secret; delete it from this host afterwards).
    #[arg(long, value_name = "FILE")]
    cluster_key: PathBuf,
    /// The name to enroll this host under (default: the kernel's host name).
    #[arg(long)]
    name: Option<String>,
    /// Identity directory (default $WISP_IDENTITY, else /var/lib/wisp/identity).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
}

#[derive(Parser, Debug)]
struct RevokeArgs {
    /// The host to revoke.
    host: String,
    /// The cluster key file (only the enrollment authority may revoke).
    #[arg(long, value_name = "FILE")]
    cluster_key: PathBuf,
    /// The revocation list to append to (default: `revoked` in the identity directory;
    /// copy it to every host, or share it, for the revocation to take effect there).
    #[arg(long, value_name = "FILE")]
    list: Option<PathBuf>,
    /// Identity directory (default $WISP_IDENTITY, else /var/lib/wisp/identity).
    #[arg(long, value_name = "DIR")]
    identity: Option<PathBuf>,
}

#[derive(Parser, Debug)]
struct Keygen {
    /// Where to write the key; the file must not exist yet.
    file: PathBuf,
}

#[derive(Subcommand, Debug)]
enum ClusterCmd {
    /// Bring up servers srv1..srvM and workstations ws1..wsN, each in its own network,
    /// mount and uts namespace, with /wisp mounted on every workstation.
    Up(Up),
    /// Tear a cluster down: processes, mounts, namespaces, state. Safe after a crash.
    Down(Down),
    /// Run a command on a host of the cluster, e.g. `wisp cluster exec ws1 -- ls /wisp`.
    Exec(Exec),
    /// List the clusters and their hosts.
    Status(Status),
}

#[derive(Parser, Debug)]
struct Up {
    /// Cluster name (namespaces are called wisp-NAME-HOST).
    #[arg(long, default_value = "sim")]
    name: String,
    /// Number of workstations.
    #[arg(long, default_value_t = 3)]
    workstations: usize,
    /// Number of file servers.
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// An extra argument for every wispd (repeat for more), e.g. `--wispd-arg=--preflush
    /// --wispd-arg=2`.
    #[arg(long = "wispd-arg", value_name = "ARG", allow_hyphen_values = true)]
    wispd_args: Vec<String>,
    /// An extra argument for every wisp-server (repeat for more).
    #[arg(long = "server-arg", value_name = "ARG", allow_hyphen_values = true)]
    server_args: Vec<String>,
}

#[derive(Parser, Debug)]
struct Down {
    /// Cluster name.
    #[arg(long, default_value = "sim")]
    name: String,
}

#[derive(Parser, Debug)]
struct Exec {
    /// Cluster name.
    #[arg(long, default_value = "sim")]
    name: String,
    /// Host to run on (srv1, ws1, ...).
    host: String,
    /// The command and its arguments.
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(Parser, Debug)]
struct Status {
    /// Only this cluster.
    #[arg(long)]
    name: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse_from(kill_signal_arg(std::env::args_os().collect()));
    wisp::init_logging("warn");
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("wisp: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// `wisp kill -9 ID` and `wisp kill -KILL ID`, as kill(1) spells them: `-s 9`, `-s KILL`.
fn kill_signal_arg(mut args: Vec<std::ffi::OsString>) -> Vec<std::ffi::OsString> {
    if args.get(1).is_some_and(|a| a == "kill") {
        if let Some(sig) = args.get(2).and_then(|a| a.to_str()).and_then(|a| {
            let s = a.strip_prefix('-')?;
            (!s.is_empty() && s != "s" && s != "h" && s.chars().all(|c| c.is_ascii_alphanumeric()))
                .then(|| s.to_string())
        }) {
            args.splice(2..3, ["-s".into(), sig.into()]);
        }
    }
    args
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Keygen(k) => {
            wisp_proto::key::ClusterKey::generate().save(&k.file)?;
            println!(
                "wrote a new cluster key to {}; copy it (mode 0600) to every host",
                k.file.display()
            );
        }
        Cmd::Hostkey(h) => {
            let dir = wisp::identity_dir(h.identity.as_deref());
            let (public, made) = wisp_proto::identity::host_public_key(&dir)?;
            if made {
                eprintln!("made a new host key in {}", dir.display());
            }
            println!("ed25519:{}", wisp_proto::identity::hex(&public));
        }
        Cmd::Enroll(e) => {
            let dir = wisp::identity_dir(e.identity.as_deref());
            let key = wisp_proto::key::ClusterKey::load(&e.cluster_key)?;
            let name = match e.name {
                Some(n) => n,
                None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .context("cannot read this host's name; give --name")?
                    .trim()
                    .to_string(),
            };
            let cert = wisp_proto::identity::enroll(&dir, &name, &key)?;
            println!(
                "enrolled {name} (ed25519:{}) in {}; this host no longer needs {}",
                wisp_proto::identity::hex(&cert.host_key),
                dir.display(),
                e.cluster_key.display()
            );
        }
        Cmd::Revoke(r) => {
            let key = wisp_proto::key::ClusterKey::load(&r.cluster_key)?;
            let list = r
                .list
                .unwrap_or_else(|| wisp::identity_dir(r.identity.as_deref()).join("revoked"));
            wisp_proto::identity::revoke(&list, &r.host, &key)?;
            println!(
                "revoked {}: hosts reading {} refuse it from now on",
                r.host,
                list.display()
            );
        }
        Cmd::Cluster(ClusterCmd::Up(u)) => {
            let mut spec = Spec::new(&u.name, u.servers, u.workstations);
            spec.wispd_args = u.wispd_args;
            spec.server_args = u.server_args;
            let c = Cluster::up(&spec).context("cluster up")?;
            print!("{}", c.status());
            println!(
                "run commands with: wisp cluster exec --name {} ws1 -- ls {}",
                c.name,
                wisp_cluster::MOUNTPOINT
            );
        }
        Cmd::Cluster(ClusterCmd::Down(d)) => {
            wisp_cluster::down(&d.name)?;
            println!("cluster {} is down", d.name);
        }
        Cmd::Cluster(ClusterCmd::Exec(e)) => {
            let c = Cluster::load(&e.name)?;
            let argv: Vec<&str> = e.argv.iter().map(|s| s.as_str()).collect();
            let status = c
                .command(&e.host, &argv)?
                .status()
                .with_context(|| format!("run on {}", e.host))?;
            return Ok(ExitCode::from(status.code().unwrap_or(128) as u8));
        }
        Cmd::Mkpipe(m) => {
            wisp::mkpipe(&m.path)
                .with_context(|| format!("cannot make a cluster pipe at {}", m.path.display()))?;
        }
        Cmd::Pdev(p) => {
            let dev = wisp::pdev::Counter::default();
            let at = wisp_pseudodev::device::Attached::attach(&p.path)?;
            eprintln!(
                "serving a {} at {} (device {})",
                p.kind,
                p.path.display(),
                at.dev
            );
            at.serve(&dev)?;
        }
        Cmd::Status(st) => {
            let key = wisp::load_identity(st.identity.as_deref())?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let rpc = wisp_proto::rpc::RpcClient::start(
                rt.handle().clone(),
                st.server.clone(),
                key,
                "wisp-status".into(),
                std::time::Duration::from_secs(5),
                std::sync::Arc::new(|_| Ok(())),
            );
            let t0 = std::time::Instant::now();
            rt.block_on(rpc.call(wisp_proto::msg::Request::Ping))
                .with_context(|| format!("file server {} is not answering", st.server))?;
            let rtt = t0.elapsed();
            let stats = match rt.block_on(rpc.call(wisp_proto::msg::Request::Stats))? {
                wisp_proto::msg::Response::Stats(s) => s,
                other => bail!("unexpected reply {other:?}"),
            };
            if st.json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "server {} up, round trip {:.2} ms",
                    st.server,
                    rtt.as_secs_f64() * 1e3
                );
                println!(
                    "  clients {}  requests {}  bytes read {}  bytes written {}  callbacks {}",
                    stats.clients,
                    stats.requests,
                    stats.bytes_read,
                    stats.bytes_written,
                    stats.callbacks
                );
            }
        }
        Cmd::Demo(a) => wisp::demo::run(&a.name)?,
        Cmd::Migrate(a) => return wisp::jobs_cli::migrate(a),
        Cmd::Ps(a) => return wisp::jobs_cli::jobs(a),
        Cmd::Kill(a) => return wisp::jobs_cli::kill(a),
        Cmd::Make(a) => return wisp::make_cli::make(a),
        Cmd::Evict(a) => return wisp::jobs_cli::evict(a),
        Cmd::Events(a) => return wisp::jobs_cli::events(a),
        Cmd::Top(a) => return wisp::jobs_cli::top(a),
        Cmd::Hosts(a) => return wisp::registry_cli::hosts(a),
        Cmd::Domains(a) => return wisp::registry_cli::domains(a),
        Cmd::Registry(a) => return wisp::registry_cli::registry(a),
        Cmd::Owner(a) => return wisp::registry_cli::owner(a),
        Cmd::Cluster(ClusterCmd::Status(s)) => {
            let names = match s.name {
                Some(n) => vec![n],
                None => Cluster::list(),
            };
            if names.is_empty() {
                println!("no cluster is up; start one with `wisp cluster up`");
            }
            for n in names {
                match Cluster::load(&n) {
                    Ok(c) => print!("{}", c.status()),
                    Err(e) => bail!("{e}"),
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::kill_signal_arg;

    fn k(v: &[&str]) -> Vec<String> {
        kill_signal_arg(v.iter().map(|s| s.into()).collect())
            .into_iter()
            .map(|s| s.into_string().unwrap())
            .collect()
    }

    #[test]
    fn kill_dash_signal() {
        assert_eq!(
            k(&["wisp", "kill", "-9", "ws1.3"]),
            ["wisp", "kill", "-s", "9", "ws1.3"]
        );
        assert_eq!(
            k(&["wisp", "kill", "-KILL", "3"]),
            ["wisp", "kill", "-s", "KILL", "3"]
        );
        assert_eq!(
            k(&["wisp", "kill", "-s", "INT", "3"]),
            ["wisp", "kill", "-s", "INT", "3"]
        );
        assert_eq!(k(&["wisp", "kill", "--help"]), ["wisp", "kill", "--help"]);
        assert_eq!(k(&["wisp", "ps", "-9"]), ["wisp", "ps", "-9"]);
    }
}
