//! `wisp-server`: serves one domain of the wisp namespace to the cluster's workstations.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;

/// Serve a domain of the /wisp namespace.
///
/// Metadata lives in DIR/meta.redb, file contents in DIR/objects/. Every connection must
/// prove it holds the cluster key before any request is read. Writes a client fsyncs are on
/// disk before the reply. Stop with SIGTERM or SIGINT.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Directory holding the domain's data (created if missing).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Address to listen on, e.g. 0.0.0.0:7070.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7070")]
    listen: String,
    /// Cluster key file (make one with `wisp keygen FILE`; mode 0600).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn main() -> Result<()> {
    let args = Args::parse();
    wisp::init_logging(&args.log_level);
    let key = wisp_proto::key::ClusterKey::load(&args.key)?;
    let server = Arc::new(wisp_fs_server::FsServer::open(&args.data)?);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().max_blocking_threads(256).build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %args.listen, data = %args.data.display(), "wisp-server serving");
        wisp_fs_server::run(server, listener, key, wisp::terminated()).await;
        tracing::info!("wisp-server stopped");
        Ok(())
    })
}
