//! The `novasnap` command line: `serve` runs the worker, `reclaim` finds what dead work
//! left behind, `check-config` shows how the configuration is understood.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use novasnap::app::ConfigFormat;
use novasnap::config::oslo::{ConfigSelection, Given};

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

/// Where the configuration is, given as to Nova's services and read as oslo.config reads
/// it: later files override earlier ones, in the order given.
#[derive(Args)]
struct ConfigArgs {
    /// A nova.conf-style file (Nova's own works); repeatable. Without any: the first of
    /// ~/.nova/nova.conf, ~/nova.conf, /etc/nova/nova.conf, /etc/nova.conf, then novasnap.conf
    /// looked for in the same places.
    #[arg(long = "config-file", short = 'c', visible_alias = "config", env = "NOVASNAP_CONFIG", value_name = "PATH")]
    config_file: Vec<PathBuf>,
    /// A directory whose *.conf files are read in sorted order; repeatable. Without any: the
    /// nova.conf.d and novasnap.conf.d directories found in the same places, read before
    /// the files.
    #[arg(long = "config-dir", value_name = "DIR")]
    config_dir: Vec<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: consume the compute topic for `[DEFAULT] host` until SIGTERM/SIGINT,
    /// then stop taking casts, let in-flight snapshots finish (or hand them back), exit 0.
    /// Logs go where oslo.log sends Nova's ([DEFAULT] log_file, log_dir, use_stderr, else
    /// stdout; use_json, debug); NOVASNAP_LOG (an env filter) overrides the level.
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Find artefacts left by dead work (novasnap's disk snapshots, copies in Glance's pool
    /// whose image is gone or not active, temporary files) and remove them. Only what
    /// novasnap names as its own is ever touched.
    Reclaim {
        #[command(flatten)]
        config: ConfigArgs,
        /// List what would be removed, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Look at every disk and every image of Glance's pools, not only at the work the
        /// ledger notes: finds leftovers of novasnap versions that kept no such index.
        #[arg(long)]
        all: bool,
    },
    /// Read the configuration and print each option novasnap uses, `[section] option = value`
    /// with the file and line it came from (or default), then the options set that novasnap
    /// ignores. Secrets are hidden.
    CheckConfig {
        #[command(flatten)]
        config: ConfigArgs,
        #[arg(long, value_enum, default_value = "text")]
        format: ConfigFormat,
        /// Show passwords and the password in transport URLs.
        #[arg(long)]
        show_secrets: bool,
    },
}

impl ConfigArgs {
    /// `--config-file` and `--config-dir` in the order given (their positions among the
    /// arguments, from `matches`): oslo reads each as it comes.
    fn selection(&self, matches: &ArgMatches) -> ConfigSelection {
        let mut given = Vec::new();
        let mut collect = |id: &str, paths: &[PathBuf], make: fn(PathBuf) -> Given| {
            // A value from NOVASNAP_CONFIG has no position: it comes first.
            let indices = matches.indices_of(id).into_iter().flatten().chain(std::iter::repeat(0));
            given.extend(indices.zip(paths).map(|(index, path)| (index, make(path.clone()))));
        };
        collect("config_file", &self.config_file, Given::File);
        collect("config_dir", &self.config_dir, Given::Dir);
        given.sort_by_key(|(index, _)| *index);
        ConfigSelection { given: given.into_iter().map(|(_, g)| g).collect() }
    }
}

fn main() -> ExitCode {
    novasnap::map_large_allocations_apart();
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let matches = matches.subcommand().map(|(_, sub)| sub).expect("a subcommand is required");
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("novasnap: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve { config } => novasnap::app::serve(&config.selection(matches)).await,
            Command::Reclaim { config, dry_run, all } => {
                let scope = if all { novasnap::reclaim::Scope::Everything } else { novasnap::reclaim::Scope::Noted };
                novasnap::app::reclaim(&config.selection(matches), dry_run, scope).await
            }
            Command::CheckConfig { config, format, show_secrets } => {
                novasnap::app::check_config(&config.selection(matches), format, show_secrets)
            }
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
