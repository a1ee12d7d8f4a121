//! The commands: each loads the config, connects the boundaries it needs and runs.
//!
//! This is the only place that knows which implementation sits behind each trait.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::oslo::{ConfigSelection, Namespace};
use crate::config::{Config, ConfigError, Report};
use crate::hypervisor::libvirt::LibvirtHypervisor;
use crate::identity::Identity;
use crate::image::glance::GlanceClient;
use crate::logging;
use crate::messaging::{consumer, notifier::AmqpNotifier, rpc::RpcClient};
use crate::nova::{conductor::Conductor, InstanceRecord, Unrecorded};
use crate::pipeline::{Boundaries, PipelineSettings, SnapshotPipeline};
use crate::reclaim::{Reclaimer, Scope};
use crate::storage::ledger::{FileLedger, RadosLedger};
use crate::storage::rbd::CephRbd;
use crate::storage::{BlockStorage, WorkLedger};
use crate::worker::Worker;

fn read(selection: &ConfigSelection) -> Result<(Config, Report), ConfigError> {
    Config::read(&Namespace::load(selection)?)
}

/// The files a config was read from, for the start-up line.
fn files(report: &Report) -> String {
    report.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")
}

/// Ceph, when instance disks are on RBD (`[libvirt] images_type = rbd`).
async fn connect_storage(config: &Config) -> anyhow::Result<Option<Arc<CephRbd>>> {
    if config.libvirt.images_type != "rbd" {
        return Ok(None);
    }
    let rbd = CephRbd::connect(&config.rbd).await.context("connecting to the Ceph cluster")?;
    Ok(Some(Arc::new(rbd)))
}

/// The work ledger: in the state pool with Ceph, in a local directory without.
async fn open_ledger(config: &Config, ceph: Option<&CephRbd>) -> anyhow::Result<Arc<dyn WorkLedger>> {
    Ok(match ceph {
        Some(ceph) => Arc::new(
            RadosLedger::open(
                ceph,
                &config.rbd.state_pool,
                config.worker.instance_lease,
                &format!("novasnap on {} (pid {})", config.host, std::process::id()),
                config.worker.done_horizon,
            )
            .await
            .context("opening the work ledger in the state pool")?,
        ),
        None => Arc::new(FileLedger::open(&config.worker.state_directory).context("opening the local work ledger")?),
    })
}

/// Glance, reached through Keystone as Nova reaches it.
fn glance(config: &Config) -> anyhow::Result<Arc<GlanceClient>> {
    let identity = Identity::new(&config.identity).context("configuring the Keystone credentials")?;
    Ok(Arc::new(GlanceClient::new(&config.glance, &identity).context("configuring the Glance client")?))
}

fn reclaimer(
    config: &Config,
    storage: Option<Arc<dyn BlockStorage>>,
    images: Arc<GlanceClient>,
    ledger: Arc<dyn WorkLedger>,
) -> Reclaimer {
    Reclaimer {
        storage,
        images,
        ledger,
        disk_pool: config.rbd.pool.clone(),
        glance_pools: config.rbd.glance_pools.clone(),
        snapshots_directory: config.libvirt.snapshots_directory.clone(),
    }
}

pub async fn serve(selection: &ConfigSelection) -> anyhow::Result<()> {
    let (config, report) = read(selection)?;
    let _logs = logging::init(&config.logging, logging::Stream::Stdout)?;
    info!(host = %config.host, config = %files(&report), "novasnap starting");
    let ceph = connect_storage(&config).await?;
    let ledger = open_ledger(&config, ceph.as_deref()).await?;
    let storage = ceph.map(|c| c as Arc<dyn BlockStorage>);
    let images = glance(&config)?;
    let hypervisor = Arc::new(LibvirtHypervisor::connect(&config.libvirt).await.context("connecting to libvirt")?);
    let notifier = Arc::new(AmqpNotifier::connect(&config).await.context("connecting the notifier")?);

    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    tokio::spawn(reclaim_periodically(
        reclaimer(&config, storage.clone(), images.clone(), ledger.clone()),
        config.worker.reclaim_interval,
        shutdown.clone(),
    ));

    let nova: Arc<dyn InstanceRecord> = if config.worker.nova_writeback {
        Arc::new(Conductor::new(RpcClient::new(&config), &config.host))
    } else {
        info!("[novasnap] nova_writeback is off: Nova's database is not told of snapshots");
        Arc::new(Unrecorded)
    };
    let boundaries =
        Boundaries { hypervisor, storage, images, notifier: notifier.clone(), ledger: ledger.clone(), nova };
    let pipeline = SnapshotPipeline::new(boundaries, PipelineSettings::from_config(&config));
    let worker = Arc::new(Worker::new(pipeline, ledger, config.worker.snapshot_timeout));
    consumer::serve(&config, worker, shutdown).await.context("consuming casts")?;
    // The last notifications (the end of a snapshot that finished during the grace period).
    notifier.flush(std::time::Duration::from_secs(10)).await;
    info!("novasnap stopped");
    Ok(())
}

/// SIGTERM (what service managers send) or SIGINT ends the worker gracefully.
async fn stop_on_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        warn!("cannot install signal handlers; stop novasnap with SIGKILL");
        return;
    };
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: no new casts; finishing the ones in flight"),
        _ = int.recv() => info!("SIGINT: no new casts; finishing the ones in flight"),
    }
    shutdown.cancel();
}

/// At start-up and every `interval`: dead work's leftovers are removed.
async fn reclaim_periodically(reclaimer: Reclaimer, interval: std::time::Duration, shutdown: CancellationToken) {
    loop {
        match reclaimer.run(false, Scope::Noted).await {
            Ok(findings) => info!(found = findings.len(), "reclamation pass done"),
            Err(e) => warn!(error = %e, "reclamation pass failed; trying again next interval"),
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

pub async fn reclaim(selection: &ConfigSelection, dry_run: bool, scope: Scope) -> anyhow::Result<()> {
    let (config, _) = read(selection)?;
    // Its findings go to stdout; its logs where oslo.log says, else stderr.
    let _logs = logging::init(&config.logging, logging::Stream::Stderr)?;
    let ceph = connect_storage(&config).await?;
    let ledger = open_ledger(&config, ceph.as_deref()).await?;
    let storage = ceph.map(|c| c as Arc<dyn BlockStorage>);
    let images = glance(&config)?;
    let findings = reclaimer(&config, storage, images, ledger).run(dry_run, scope).await?;
    if findings.is_empty() {
        println!("nothing left behind by novasnap");
    }
    for finding in &findings {
        println!("{}{finding}", if dry_run { "would " } else { "" });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ConfigFormat {
    /// `[section] option = value  (file:line)`, for people.
    Text,
    /// One JSON object: files, options (value, default, type, sources), unused options; on
    /// failure `{"error": …}`.
    Json,
}

pub fn check_config(selection: &ConfigSelection, format: ConfigFormat, show_secrets: bool) -> anyhow::Result<()> {
    let result = read(selection);
    match (format, &result) {
        (ConfigFormat::Text, Ok((_, report))) => print!("{}", report.text(show_secrets)),
        (ConfigFormat::Json, Ok((_, report))) => println!("{}", report.json(show_secrets)),
        (ConfigFormat::Json, Err(e)) => println!("{}", error_json(e)),
        (ConfigFormat::Text, Err(_)) => {}
    }
    result.map(|_| ()).map_err(anyhow::Error::from)
}

fn error_json(error: &ConfigError) -> serde_json::Value {
    let mut json = serde_json::json!({ "message": error.to_string() });
    if let ConfigError::Invalid { location, section, key, .. } = error {
        json["location"] = location.as_str().into();
        json["section"] = section.as_str().into();
        json["option"] = key.as_str().into();
    }
    serde_json::json!({ "error": json })
}
