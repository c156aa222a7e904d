//! `wispd`: the workstation daemon. Mounts the cluster namespace with FUSE.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;

/// The wisp workstation daemon: mounts the cluster namespace at MOUNT.
///
/// Every file operation under MOUNT is served by the file server at ADDR, with caches kept
/// consistent by the server's callbacks: a write on any host is seen by a read on any other
/// at once. Unmounts on SIGTERM or SIGINT.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// File server address, e.g. 10.0.0.1:7070.
    #[arg(long, value_name = "ADDR")]
    server: String,
    /// Where to mount the namespace.
    #[arg(long, value_name = "DIR", default_value = "/wisp")]
    mount: PathBuf,
    /// Cluster key file (mode 0600).
    #[arg(long, value_name = "FILE")]
    key: PathBuf,
    /// This host's name (default: the kernel's host name).
    #[arg(long)]
    name: Option<String>,
    /// Seconds a file operation may wait for an unreachable server before failing with EIO.
    #[arg(long, default_value_t = 60)]
    timeout: u64,
    /// FUSE worker threads (requests served in parallel).
    #[arg(long, default_value_t = 16)]
    threads: usize,
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides).
    #[arg(long, default_value = "info")]
    log_level: String,
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "unknown".into())
}

fn main() -> Result<()> {
    let args = Args::parse();
    wisp::init_logging(&args.log_level);
    let key = wisp_proto::key::ClusterKey::load(&args.key)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    std::fs::create_dir_all(&args.mount).with_context(|| format!("cannot create mount point {}", args.mount.display()))?;
    let opts = wisp_fs_client::MountOptions {
        server: args.server.clone(),
        mountpoint: args.mount.clone(),
        key,
        host: args.name.clone().unwrap_or_else(hostname),
        call_timeout: Duration::from_secs(args.timeout),
        threads: args.threads,
    };
    let mounted = wisp_fs_client::mount(rt.handle().clone(), opts)
        .with_context(|| format!("cannot mount {} from {}", args.mount.display(), args.server))?;
    tracing::info!(mount = %args.mount.display(), server = %args.server, "wispd running");
    rt.block_on(wisp::terminated());
    tracing::info!("unmounting {}", args.mount.display());
    mounted.unmount().context("unmount")?;
    Ok(())
}
