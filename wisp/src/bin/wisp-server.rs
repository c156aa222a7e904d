//! `wisp-server`: serves one domain of the wisp namespace to the cluster's workstations, and
//! optionally hosts a replica of the cluster registry (naming crate) on the same listener.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Parser;
use wisp_naming::{NamingConfig, NamingNode, NodeId};

/// Serve a domain of the /wisp namespace, and optionally a replica of the cluster registry.
///
/// Metadata lives in DIR/meta.redb, file contents in DIR/objects/. Every connection must
/// prove it holds the cluster key before any request is read. Writes a client fsyncs are on
/// disk before the reply. Stop with SIGTERM or SIGINT.
///
/// The cluster registry (hosts, domains, jobs; replicated with Raft) runs on the file
/// servers: give each replica a distinct --registry-id and the same --registry-peers, and
/// pass --init-registry to (at least) one of them the first time. Registry traffic shares
/// the file server's port and key. Without --registry-id this server hosts no replica.
///
/// Example, three servers (run on each with its own id):
///
///   wisp-server --data /srv/wisp --key /etc/wisp/cluster.key --listen 10.0.0.1:7070
///     --registry-id 1 --registry-peers 1=10.0.0.1:7070,2=10.0.0.2:7070,3=10.0.0.3:7070
///     --init-registry
///
/// Later membership changes go through `wisp registry add|remove`, not through the flags:
/// --registry-peers only seeds a registry that is new.
#[derive(Parser, Debug)]
#[command(version, about, long_about, verbatim_doc_comment)]
struct Args {
    /// Read flags from a TOML file first: each key is one of this command's flags by its
    /// long name (`key = "/etc/wisp/cluster.key"`, numbers as numbers, `true` for a flag
    /// without a value, lists for comma-separated flags). Flags given on the command line
    /// win. Example files are in docs/operations.md.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Directory holding the domain's data (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7070")]
    listen: String,
    /// Cluster key file (make one with `wisp keygen FILE`; mode 0600).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Host a registry replica with this id (a positive integer, stable across restarts).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    registry_id: Option<NodeId>,
    /// The initial registry replicas, ID=ADDR,ID=ADDR,... including this one; ADDR is where
    /// the others reach that replica's wisp-server (ip:port). Used by --init-registry, and
    /// to find this replica's own address.
    #[arg(long, value_name = "ID=ADDR,...", requires = "registry_id")]
    registry_peers: Option<String>,
    /// Where the replica keeps its Raft log and state (default: DATA/registry).
    #[arg(long, value_name = "DIR", requires = "registry_id")]
    registry_dir: Option<PathBuf>,
    /// Create the registry from --registry-peers if it is new. Harmless when it already
    /// exists (a restart, or another replica initialized it first).
    #[arg(long, requires = "registry_peers")]
    init_registry: bool,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides; openraft's own
    /// logs stay at warn unless RUST_LOG names openraft).
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Prometheus metrics endpoint (GET /metrics); "none" to disable.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:9465")]
    metrics: String,
    /// Hosts whose root (uid 0) is root on this server, by the name they authenticate with
    /// (HOST,HOST,...; `*` for every host). Root from any other host is squashed to nobody
    /// (uid and gid 65534). Hosts whose wispd migrates jobs or makes domain mount points
    /// need it. Default: none.
    #[arg(long, value_name = "HOST,...", value_delimiter = ',')]
    trust_root: Vec<String>,
}

/// Parse `1=10.0.0.1:7070,2=10.0.0.2:7070`.
fn parse_peers(s: &str) -> Result<BTreeMap<NodeId, String>> {
    let mut m = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|x| !x.is_empty()) {
        let Some((id, addr)) = item.split_once('=') else {
            bail!("bad --registry-peers entry {item:?}: expected ID=ADDR, e.g. 1=10.0.0.1:7070");
        };
        let id: NodeId = id.trim().parse().ok().filter(|i| *i > 0).with_context(|| {
            format!("bad --registry-peers entry {item:?}: the id must be a positive integer")
        })?;
        let addr = addr.trim();
        wisp_naming::registry::check_addr("--registry-peers", addr)
            .map_err(|e| anyhow::anyhow!("bad --registry-peers entry {item:?}: {e}"))?;
        if m.insert(id, addr.to_string()).is_some() {
            bail!("--registry-peers names replica {id} twice");
        }
    }
    if m.is_empty() {
        bail!(
            "--registry-peers is empty: list every initial replica as ID=ADDR, this one included"
        );
    }
    Ok(m)
}

/// The logging filter: the level (or RUST_LOG), with openraft held at warn unless asked for.
fn init_logging(level: &str) {
    let base = std::env::var("RUST_LOG")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| level.to_string());
    let spec = if base.contains("openraft") {
        base
    } else {
        format!("{base},openraft=warn")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&spec)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

struct Replica {
    id: NodeId,
    addr: String,
    dir: PathBuf,
    init: Option<BTreeMap<NodeId, String>>,
}

fn replica_plan(args: &Args) -> Result<Option<Replica>> {
    let Some(id) = args.registry_id else {
        return Ok(None);
    };
    let dir = args
        .registry_dir
        .clone()
        .unwrap_or_else(|| args.data.join("registry"));
    let peers = args
        .registry_peers
        .as_deref()
        .map(parse_peers)
        .transpose()?;
    let addr = match peers.as_ref().and_then(|p| p.get(&id)) {
        Some(a) => a.clone(),
        None if peers.is_some() => bail!("--registry-peers does not list this replica's own id {id}: add {id}=ADDR (this server's reachable address)"),
        None => {
            // A replica added later with `wisp registry add`: its address is the listen
            // address, which must then be a concrete one.
            if args.listen.starts_with("0.0.0.0:") || args.listen.starts_with("[::]:") {
                bail!("replica {id} needs its reachable address: give --registry-peers {id}=ADDR (or --listen with a concrete address)");
            }
            args.listen.clone()
        }
    };
    let init = if args.init_registry { peers } else { None };
    Ok(Some(Replica {
        id,
        addr,
        dir,
        init,
    }))
}

fn main() -> Result<()> {
    let args = Args::parse_from(wisp::config::args_with_config()?);
    init_logging(&args.log_level);
    let key = wisp_proto::key::ClusterKey::load(&args.key)?;
    let plan = replica_plan(&args)?;
    let server = Arc::new(wisp_fs_server::FsServer::open(&args.data)?);
    let trusted: Vec<String> = args
        .trust_root
        .iter()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect();
    for h in &trusted {
        if h != "*"
            && !h
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            bail!("bad --trust-root host {h:?}: a host name (letters, digits, - _ .) or *");
        }
    }
    tracing::info!(hosts = ?trusted, "trusted for root (root from any other host is squashed to nobody)");
    server.set_trusted_root(trusted);
    server.start_flusher();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(256)
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let node = match plan {
            None => None,
            Some(r) => {
                std::fs::create_dir_all(&r.dir).with_context(|| format!("cannot create registry directory {}", r.dir.display()))?;
                let node = NamingNode::start(r.id, r.addr.clone(), &r.dir, key.clone(), NamingConfig::default())
                    .await
                    .with_context(|| format!("cannot start registry replica {} in {}", r.id, r.dir.display()))?;
                let n2 = node.clone();
                server.set_naming_handler(Arc::new(move |payload| Ok(n2.handle(payload))));
                if let Some(members) = r.init {
                    // The peers may not be up yet: initialize only writes the first
                    // membership locally; the election happens once a quorum answers.
                    node.initialize(members.clone())
                        .await
                        .with_context(|| format!("cannot initialize the registry with {members:?}"))?;
                }
                tracing::info!(id = r.id, addr = %r.addr, dir = %r.dir.display(), "registry replica serving");
                Some(node)
            }
        };
        tracing::info!(listen = %args.listen, data = %args.data.display(), "wisp-server serving");
        if args.metrics != "none" {
            let s2 = server.clone();
            let samples = Arc::new(move || {
                let st = s2.stats();
                vec![
                    ("wisp_server_requests_total", "File system requests served (registry traffic not counted)", "counter", st.requests as f64),
                    ("wisp_server_read_bytes_total", "File bytes read by clients", "counter", st.bytes_read as f64),
                    ("wisp_server_written_bytes_total", "File bytes written by clients", "counter", st.bytes_written as f64),
                    ("wisp_server_callbacks_total", "Consistency callbacks sent to clients", "counter", st.callbacks as f64),
                    ("wisp_server_clients", "Connected clients", "gauge", st.clients as f64),
                    ("wisp_server_denied_total", "Requests refused by the server's permission checks (EACCES/EPERM)", "counter", s2.denied() as f64),
                    ("wisp_rpc_refused_connections_total", "Connections refused because the server held its maximum", "counter", wisp_proto::rpc::refused_connections() as f64),
                    ("wisp_rpc_refused_calls_total", "Calls refused because their connection had its maximum in flight", "counter", wisp_proto::rpc::refused_calls() as f64),
                ]
            });
            let addr = args.metrics.clone();
            tokio::spawn(async move {
                if let Err(e) = wisp::metrics::serve(addr.clone(), samples).await {
                    tracing::warn!("metrics endpoint {addr}: {e}");
                }
            });
        }
        wisp_fs_server::run(server.clone(), listener, key, wisp::terminated()).await;
        if let Err(e) = server.flush() {
            tracing::warn!("final metadata sync: {e}");
        }
        if let Some(n) = node {
            if let Err(e) = n.shutdown().await {
                tracing::warn!("registry replica shutdown: {e}");
            }
        }
        tracing::info!("wisp-server stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_peers;

    #[test]
    fn peers_parse_and_refuse_bad_input() {
        let m = parse_peers("1=10.0.0.1:7070, 2=10.0.0.2:7070").unwrap();
        assert_eq!(m.len(), 2);
        assert_eq!(m[&2], "10.0.0.2:7070");
        for bad in [
            "",
            "1",
            "0=10.0.0.1:7070",
            "x=10.0.0.1:7070",
            "1=nope",
            "1=10.0.0.1:7070,1=10.0.0.2:7070",
        ] {
            assert!(parse_peers(bad).is_err(), "{bad:?} accepted");
        }
    }
}
