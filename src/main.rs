//! The `novasnap` command line: `serve` runs the worker, `reclaim` finds what dead work
//! left behind, `check-config` shows how a config file is understood.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Takes over OpenStack Nova's instance snapshots: consumes nova-api's `snapshot_instance`
/// and `backup_instance` casts from RabbitMQ, snapshots the libvirt guest (Ceph RBD
/// clone-and-flatten where possible, extract-and-upload otherwise), stores the result as a
/// Glance image and publishes Nova-style notifications.
#[derive(Parser)]
#[command(name = "novasnap", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume the compute topic for `[DEFAULT] host` until SIGTERM/SIGINT,
    /// then stop taking casts, let in-flight snapshots finish (or hand them back), exit 0.
    Serve {
        /// nova.conf-style file; Nova's own nova.conf works (unknown options are ignored).
        #[arg(long, short, env = "NOVASNAP_CONFIG")]
        config: PathBuf,
    },
    /// Find artefacts left by dead work (novasnap's disk snapshots, copies in Glance's pool
    /// whose image is gone or not active, temporary files) and remove them. Only what
    /// novasnap names as its own is ever touched.
    Reclaim {
        #[arg(long, short, env = "NOVASNAP_CONFIG")]
        config: PathBuf,
        /// List what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Look at every disk and every image of Glance's pools, not only at the work the
        /// ledger notes: finds leftovers of novasnap versions that kept no such index.
        #[arg(long)]
        all: bool,
    },
    /// Parse the config file and print the settings novasnap would use (passwords hidden).
    CheckConfig {
        #[arg(long, short, env = "NOVASNAP_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_env("NOVASNAP_LOG").unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        // Colour only on a terminal: logs that go to files and journals stay greppable.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("novasnap: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => novasnap::app::serve(&config).await,
            Command::Reclaim { config, dry_run, all } => {
                let scope = if all { novasnap::reclaim::Scope::Everything } else { novasnap::reclaim::Scope::Noted };
                novasnap::app::reclaim(&config, dry_run, scope).await
            }
            Command::CheckConfig { config } => novasnap::app::check_config(&config),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("novasnap: {e:#}");
            ExitCode::FAILURE
        }
    }
}
