//! Shared plumbing of the wisp binaries: logging setup and signal waiting, plus the modules
//! the binaries share: [`owner`] (owner activity on a workstation, for wispd's heartbeats)
//! and [`registry_cli`] (`wisp hosts|domains|registry|owner`).
//!
//! Architecture Invariant: binaries are thin. Each command parses its flags (one clap struct
//! per subcommand) and calls library code; no mechanism lives here.

pub mod config;
pub mod demo;
pub mod jobs_cli;
pub mod make_cli;
pub mod metrics;
pub mod owner;
pub mod pdev;
pub mod registry_cli;

/// The port a workstation's wispd is recorded at in the registry (`wispd --advertise`
/// defaults to its address toward the registry on this port): where its job agent
/// (`wisp_rexec::AGENT_PORT`) is reached by rexec and migration.
pub const WISPD_PORT: u16 = 7071;

/// Start structured logging at `level` (RUST_LOG, if set, wins).
pub fn init_logging(level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Resolve when SIGTERM or SIGINT arrives.
pub async fn terminated() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

pub use wisp_rexec::client::mkpipe;

/// Where a host keeps its identity (host key, certificate, authority key, revocation list)
/// unless told otherwise: `$WISP_IDENTITY`, else this.
pub const DEFAULT_IDENTITY: &str = "/var/lib/wisp/identity";

/// The identity directory: `dir` if given, else `$WISP_IDENTITY`, else [`DEFAULT_IDENTITY`].
pub fn identity_dir(dir: Option<&std::path::Path>) -> std::path::PathBuf {
    dir.map(std::path::Path::to_path_buf)
        .or_else(|| std::env::var_os("WISP_IDENTITY").map(std::path::PathBuf::from))
        .unwrap_or_else(|| std::path::PathBuf::from(DEFAULT_IDENTITY))
}

/// Load this host's enrolled identity (see [`identity_dir`]); the error says how to enroll.
pub fn load_identity(
    dir: Option<&std::path::Path>,
) -> Result<wisp_proto::identity::Identity, wisp_proto::identity::IdentityError> {
    wisp_proto::identity::Identity::load(&identity_dir(dir))
}
