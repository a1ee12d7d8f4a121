//! Every option novasnap reads, in one place, read as oslo.config reads them.
//!
//! An operator points novasnap at the nova.conf they already have (or lets it find Nova's
//! files, as Nova's services do): the options Nova, oslo.messaging, oslo.log and
//! keystoneauth define keep their sections, names, deprecated names, types and defaults;
//! novasnap's own live in `[novasnap]`. How files are found, merged and substituted is
//! [`oslo`]'s; what upstream declares beyond the obvious is [`declared`]'s. Options set but
//! not read are listed by `check-config`; a value that does not convert is an error naming
//! file, line, section and key.

pub mod declared;
pub mod oslo;
pub mod report;

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;

use crate::retry::RetryPolicy;
use declared::{Declared, Kind};
use oslo::{ConfigSelection, Namespace, Origin, Piece, Value};
pub use report::{Report, Setting};

mod oslo_messaging;
pub use oslo_messaging::{
    BrokerEndpoint, Compression, FailoverStrategy, LoginMethod, NotificationDriver, QueueOptions, RabbitConfig,
    RabbitTls, ReconnectPolicy, TlsVersions,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Source(#[from] oslo::SourceError),
    /// `location` is `file:line`, `environment OS_…` or `default`.
    #[error("{location}: [{section}] {key} = {value:?}: {reason}")]
    Invalid { location: String, section: String, key: String, value: String, reason: String },
}

#[derive(Debug, Clone)]
pub struct Config {
    /// `[DEFAULT] host`: the compute host whose `compute.<host>` queue novasnap serves.
    pub host: String,
    pub messaging: MessagingConfig,
    pub notifications: NotificationConfig,
    pub libvirt: LibvirtConfig,
    pub rbd: RbdConfig,
    pub glance: GlanceConfig,
    pub identity: IdentityConfig,
    pub worker: WorkerConfig,
    pub logging: LoggingConfig,
}

#[derive(Debug, Clone)]
pub struct MessagingConfig {
    /// `[DEFAULT] transport_url` and the `[oslo_messaging_rabbit]` options it sees: the RPC
    /// transport (compute and conductor queues, novasnap's own queues).
    pub transport: RabbitConfig,
    /// `[DEFAULT] control_exchange`; Nova sets `nova`.
    pub control_exchange: String,
    /// Dead-letter exchange for casts novasnap cannot accept (`[novasnap] dead_letter_exchange`).
    pub dead_letter_exchange: String,
    /// Queue bound to the dead-letter exchange, so rejected casts are kept (`[novasnap] dead_letter_queue`).
    pub dead_letter_queue: String,
    /// Bodies larger than this are dead-lettered unread (`[novasnap] max_message_bytes`).
    pub max_message_bytes: usize,
    /// `[novasnap] dead_letter_max_length`: the dead-letter queue keeps at most this many
    /// messages (the oldest are dropped first), so hostile input cannot fill the broker.
    pub dead_letter_max_length: u32,
    /// `[novasnap] dead_letter_ttl` (seconds): how long a dead letter is kept.
    pub dead_letter_ttl: Duration,
    /// `[novasnap] consumer_priority`: novasnap's `x-priority` on `compute.<host>`, above
    /// nova-compute's (0), so the broker hands it every message while it has room.
    pub consumer_priority: i32,
    /// `[novasnap] relay_prefetch`: messages of `compute.<host>` novasnap holds at once while
    /// it passes them on. It keeps its priority only while it has room (RabbitMQ gives the
    /// rest to nova-compute), and memory is bounded by this many messages.
    pub relay_prefetch: u16,
    /// `[novasnap] serve_whole_host`: novasnap alone serves `compute.<host>` (no nova-compute
    /// beside it, or one without a `compute-alt` server): what is not a snapshot is refused.
    pub serve_whole_host: bool,
    /// `[novasnap] confirm_timeout` (seconds): bound on waiting for a publisher confirm; a
    /// broker under a memory or disk alarm blocks publishers until it clears.
    pub confirm_timeout: Duration,
    /// `[DEFAULT] rpc_response_timeout` (oslo.messaging): how long a call to Nova's conductor
    /// waits for its reply.
    pub rpc_response_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationFormat {
    Versioned,
    Unversioned,
    Both,
}

#[derive(Debug, Clone)]
pub struct NotificationConfig {
    /// `[oslo_messaging_notifications] driver`, every line: each driver gets every
    /// notification (`messaging` in format 1.0, `messagingv2` in the 2.0 envelope, `log`
    /// to the log). Empty (or only `noop`): notifications are off.
    pub drivers: Vec<NotificationDriver>,
    /// `[oslo_messaging_notifications] transport_url` (else `[DEFAULT] transport_url`) and
    /// the `[oslo_messaging_rabbit]` options it sees.
    pub transport: RabbitConfig,
    /// `[oslo_messaging_notifications] retry`: tries after the first to publish one
    /// notification; None (oslo's -1) retries until it is published.
    pub retry: Option<u32>,
    /// `[novasnap] notification_exchange`: a separate exchange, so subscribers of novasnap
    /// events need not share nova-compute's.
    pub exchange: String,
    /// `[notifications] notification_format`
    pub format: NotificationFormat,
    /// `[oslo_messaging_notifications] topics`: where legacy notifications go.
    pub legacy_topics: Vec<String>,
    /// `[notifications] versioned_notifications_topics`
    pub versioned_topics: Vec<String>,
    /// Minimum time between two progress notifications of one snapshot
    /// (`[novasnap] progress_interval`, seconds).
    pub progress_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct LibvirtConfig {
    /// `[libvirt] connection_uri` (Nova's default, empty, means `qemu:///system`).
    pub connection_uri: String,
    /// `[libvirt] images_type`
    pub images_type: String,
    /// `[libvirt] snapshot_image_format`: None means "same as the source".
    pub snapshot_image_format: Option<String>,
    /// `[libvirt] snapshots_directory`: where the standard path may put temporary files.
    pub snapshots_directory: PathBuf,
    /// `[workarounds] disable_libvirt_livesnapshot`
    pub disable_live_snapshot: bool,
    /// `[ephemeral_storage_encryption] enabled`: encrypted disks are never snapshotted live.
    pub ephemeral_encryption: bool,
    /// `[novasnap] block_copy_timeout`: bound on one live block copy (seconds).
    pub block_copy_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct RbdConfig {
    /// `[libvirt] images_rbd_pool`
    pub pool: String,
    /// `[libvirt] images_rbd_ceph_conf` (empty means librados' default search).
    pub ceph_conf: Option<PathBuf>,
    /// `[libvirt] rbd_user`
    pub user: Option<String>,
    /// `[novasnap] state_pool`: pool holding novasnap's own RADOS objects (duplicate
    /// `_unique_id`s, per-instance leases). Defaults to `images_rbd_pool`.
    pub state_pool: String,
    /// `[novasnap] glance_pools`: the pools Glance stores images in, where reclamation
    /// looks for copies novasnap made (only those it marked as its own).
    pub glance_pools: Vec<String>,
    /// `[novasnap] rados_osd_op_timeout`: bound on one librados/librbd operation on an OSD
    /// (a dead or full OSD answers with ETIMEDOUT instead of never), set on the connection
    /// whatever ceph.conf says.
    pub osd_op_timeout: Duration,
    /// `[novasnap] rados_mon_op_timeout`: the same for calls to the monitors.
    pub mon_op_timeout: Duration,
    /// `[novasnap] client_mount_timeout`: bound on connecting to the cluster.
    pub mount_timeout: Duration,
    /// `[novasnap] concurrent_flattens`: flattens running at once in this worker; more wait
    /// their turn. Each holds up to `rbd_concurrent_management_ops` whole objects in memory.
    /// Defaults to `max_concurrent_snapshots` (no turns): on the bench's two cores, eight
    /// snapshots at once took ~1 s longer in all with 2 turns, for ~70 MiB less at the peak.
    pub concurrent_flattens: usize,
}

#[derive(Debug, Clone)]
pub struct GlanceConfig {
    /// `[glance] api_servers` (Nova: deprecated, no default), tried in turn. Empty means
    /// `endpoint_override`, else Keystone's catalog, as Nova's `get_api_servers` does.
    pub api_servers: Vec<String>,
    /// `[glance]` keystoneauth Adapter options (Nova's `register_ksa_opts`).
    pub adapter: AdapterConfig,
    /// `[glance]` keystoneauth Session options: TLS towards Glance.
    pub session: SessionConfig,
    /// Bound on one HTTP request that is not an upload: `[glance] timeout` when set, else
    /// `[novasnap] glance_timeout` (keystoneauth's own default, none, would wait forever).
    pub request_timeout: Duration,
}

/// keystoneauth's Adapter options as Nova registers them for a service's section
/// (`nova/conf/utils.py` `get_ksa_adapter_opts`, without the version options).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `service_type`: Nova's default for `[glance]` is `image`.
    pub service_type: String,
    /// `valid_interfaces`, in order of preference: Nova's default is `internal,public`.
    pub valid_interfaces: Vec<String>,
    /// `region_name`: None takes the first endpoint of any region.
    pub region_name: Option<String>,
    /// `endpoint_override`: used instead of the catalog when set.
    pub endpoint_override: Option<String>,
}

/// keystoneauth's Session options (`ks_loading.register_session_conf_options`), read from
/// the section of the service they reach (`[glance]`) or authenticate with (`[service_user]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionConfig {
    /// `cafile`: PEM bundle trusted instead of the system CA store, as keystoneauth
    /// (requests' `verify=<cafile>`) does.
    pub cafile: Option<PathBuf>,
    /// `certfile`: PEM client certificate (may hold the key too).
    pub certfile: Option<PathBuf>,
    /// `keyfile`: PEM key of `certfile`.
    pub keyfile: Option<PathBuf>,
    /// `insecure`: server certificates are not verified.
    pub insecure: bool,
    /// `timeout` (seconds); None when unset.
    pub timeout: Option<Duration>,
}

/// Who novasnap is towards Keystone.
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// `[service_user]` (`nova/conf/service_token.py`): Nova's service user, whose token
    /// travels as `X-Service-Token` beside the user's.
    pub service_user: ServiceUserConfig,
    /// `[novasnap_service_user]` (novasnap's own section, same keystoneauth option names):
    /// the credentials of work without a user context (reclamation, cleanup), and of
    /// Keystone catalog lookups. None when the section has no `auth_type`: then
    /// `[service_user]`'s credentials serve.
    pub novasnap_service_user: Option<PasswordAuthConfig>,
}

#[derive(Debug, Clone)]
pub struct ServiceUserConfig {
    /// `[service_user] send_service_user_token` (Nova's default: false).
    pub send_service_user_token: bool,
    /// The section's keystoneauth auth options; None without `auth_type`, as keystoneauth's
    /// `load_auth_from_conf_options` returns no plugin then.
    pub auth: Option<PasswordAuthConfig>,
}

/// keystoneauth's `password` (generic) or `v3password` plugin options from one section
/// (`keystoneauth1/loading/identity.py`, `_plugins/identity/generic.py`), Keystone v3.
/// The password is a [`SecretString`]: printed configs show `[REDACTED]`.
#[derive(Debug, Clone)]
pub struct PasswordAuthConfig {
    /// The section this came from, for error messages.
    pub section: String,
    /// `auth_url`: Keystone, versioned (`…/v3`) or not (`/v3` is then appended).
    pub auth_url: String,
    /// `user_id`, else `username` in `user_domain_id` / `user_domain_name`.
    pub user_id: Option<String>,
    pub username: Option<String>,
    pub user_domain_id: Option<String>,
    pub user_domain_name: Option<String>,
    pub password: SecretString,
    /// The scope: `project_id`, or `project_name` in `project_domain_id` /
    /// `project_domain_name`; else `domain_id` / `domain_name`; else `system_scope` (`all`).
    pub project_id: Option<String>,
    pub project_name: Option<String>,
    pub project_domain_id: Option<String>,
    pub project_domain_name: Option<String>,
    pub domain_id: Option<String>,
    pub domain_name: Option<String>,
    pub system_scope: Option<String>,
    /// The section's keystoneauth Session options: TLS and timeout towards Keystone.
    pub session: SessionConfig,
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// `[novasnap] max_concurrent_snapshots` (Nova's `max_concurrent_snapshots`, 5).
    pub max_concurrent_snapshots: usize,
    /// `[novasnap] direct_snapshot`: false forces the standard path (benchmarks, or a
    /// Glance that must own its bytes).
    pub direct_snapshot: bool,
    /// `[novasnap] image_layout`: how a direct snapshot's image holds its bytes.
    pub image_layout: ImageLayout,
    /// `[novasnap] retry_*`: the one retry policy for transient faults.
    pub retry: RetryPolicy,
    /// `[novasnap] reclaim_interval`: how often dead work's leftovers are looked for.
    pub reclaim_interval: Duration,
    /// `[novasnap] state_directory`: where the work ledger lives when there is no Ceph.
    pub state_directory: PathBuf,
    /// `[novasnap] instance_lease`: seconds an instance lease lasts unless renewed, i.e.
    /// how long a dead replica's snapshot blocks the next one of that instance, and how long
    /// a stalled one may go unrenewed before it counts its lease lost. At least 1 s.
    pub instance_lease: Duration,
    /// `[novasnap] done_horizon`: how long a finished cast's `_unique_id` is remembered. It
    /// must exceed the longest a copy of a cast can wait to be delivered (queued behind
    /// others, or held unacknowledged up to RabbitMQ's `consumer_timeout`) after the first
    /// one finished; a copy coming later finds its image active and only repeats the end.
    pub done_horizon: Duration,
    /// `[novasnap] snapshot_timeout`: how long one cast may take, from the worker taking it
    /// (the wait for the instance lease included) to its end; past it, the snapshot fails
    /// cleanly. Kept under RabbitMQ's `consumer_timeout` (see the README).
    pub snapshot_timeout: Duration,
    /// `[novasnap] max_freeze_seconds`: the longest a live snapshot keeps a guest's
    /// filesystems frozen through its guest agent, from the freeze to the thaw. A disk
    /// snapshot that takes longer is finished with the guest thawed (crash-consistent; a
    /// failure under `os_require_quiesce`), so no guest waits on a slow Ceph for its writes.
    pub max_freeze: Duration,
    /// `[novasnap] shutdown_grace`: on SIGTERM, how long in-flight snapshots may run on
    /// before their casts are handed back to the broker.
    pub shutdown_grace: Duration,
    /// `[novasnap] nova_writeback`: save task_state, power_state, instance action events and
    /// faults in Nova's database through nova-conductor, as nova-compute does. Off only for
    /// a deployment with no Nova conductor to reach.
    pub nova_writeback: bool,
}

impl Config {
    /// One file, as `--config-file PATH` gives it (with Nova's default directories, as oslo).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_from(&ConfigSelection::file(path))
    }

    /// The config one file's `text` gives (unit tests).
    #[cfg(test)]
    pub(crate) fn from_text(text: &str) -> Result<Self, ConfigError> {
        let file = oslo::ConfigFile::parse(Path::new("nova.conf"), text).expect("readable as a file");
        Ok(Self::read(&Namespace::new(vec![file], []))?.0)
    }

    pub fn load_from(selection: &ConfigSelection) -> Result<Self, ConfigError> {
        Ok(Self::read(&Namespace::load(selection)?)?.0)
    }

    /// The config and how each option was read. Two passes, as oslo registers options
    /// before it reads any: the first learns every option's type and default, so that a
    /// `$name` in the second can stand for an option not set in any file.
    pub fn read(namespace: &Namespace) -> Result<(Self, Report), ConfigError> {
        let registering = Reader::new(None);
        Self::build(&registering)?;
        let registry = registering.registry();
        let reader = Reader::new(Some((namespace, &registry)));
        let config = Self::build(&reader)?;
        if let Some(error) = reader.deferred.take() {
            return Err(error);
        }
        Ok((config, reader.report(namespace)))
    }

    fn build(r: &Reader) -> Result<Self, ConfigError> {
        let host = r.string("DEFAULT", "host", &hostname())?;

        // oslo.messaging's default (`transport._transport_opts`): guest on localhost.
        let transport_url = r.string("DEFAULT", "transport_url", "rabbit://")?;
        let messaging = MessagingConfig {
            transport: oslo_messaging::rabbit_config(r, "DEFAULT", "transport_url", &transport_url)?,
            control_exchange: r.string("DEFAULT", "control_exchange", "nova")?,
            dead_letter_exchange: r.string("novasnap", "dead_letter_exchange", "novasnap.dead_letter")?,
            dead_letter_queue: r.string("novasnap", "dead_letter_queue", "novasnap.dead_letter")?,
            max_message_bytes: r.parse("novasnap", "max_message_bytes", 1024 * 1024)?,
            dead_letter_max_length: r.parse("novasnap", "dead_letter_max_length", 10_000)?,
            dead_letter_ttl: r.seconds("novasnap", "dead_letter_ttl", 7 * 24 * 3600)?,
            consumer_priority: r.parse("novasnap", "consumer_priority", 10)?,
            relay_prefetch: r.parse("novasnap", "relay_prefetch", 500)?,
            serve_whole_host: r.parse("novasnap", "serve_whole_host", false)?,
            confirm_timeout: r.seconds("novasnap", "confirm_timeout", 30)?,
            rpc_response_timeout: r.seconds("DEFAULT", "rpc_response_timeout", 60)?,
        };
        if messaging.relay_prefetch == 0 {
            return Err(r.invalid(
                "novasnap",
                "relay_prefetch",
                "0",
                "must be at least 1: unlimited would let a flood of messages fill novasnap's memory".into(),
            ));
        }

        let notification_transport = match r.optional("oslo_messaging_notifications", "transport_url") {
            Some(url) => oslo_messaging::rabbit_config(r, "oslo_messaging_notifications", "transport_url", &url)?,
            None => messaging.transport.clone(),
        };
        let retry: i64 = r.parse("oslo_messaging_notifications", "retry", -1)?;
        let format = match r.string("notifications", "notification_format", "unversioned")?.as_str() {
            "both" => NotificationFormat::Both,
            "versioned" => NotificationFormat::Versioned,
            "unversioned" => NotificationFormat::Unversioned,
            other => {
                return Err(r.invalid(
                    "notifications",
                    "notification_format",
                    other,
                    "expected both, versioned or unversioned".into(),
                ))
            }
        };
        let notifications = NotificationConfig {
            drivers: oslo_messaging::notification_drivers(r)?,
            transport: notification_transport,
            // oslo: None or below 0 retries forever.
            retry: u32::try_from(retry).ok(),
            exchange: r.string("novasnap", "notification_exchange", "nova_notifications")?,
            format,
            legacy_topics: r.list("oslo_messaging_notifications", "topics", &["notifications"])?,
            versioned_topics: r.list(
                "notifications",
                "versioned_notifications_topics",
                &["versioned_notifications"],
            )?,
            progress_interval: r.seconds("novasnap", "progress_interval", 3)?,
        };

        // Read for what `snapshots_directory`'s default stands for: `$instances_path`, whose
        // default is `$state_path/instances`. Nova's `state_path` default is `$pybasedir`,
        // where its Python code is installed; distributions set `/var/lib/nova`, novasnap's.
        r.string("DEFAULT", "state_path", "/var/lib/nova")?;
        r.string("DEFAULT", "instances_path", "$state_path/instances")?;
        let connection_uri = r.string("libvirt", "connection_uri", "")?;
        // Nova's choices (`raw`, `qcow2`, `vmdk`, `vdi`) are checked as the value is read.
        let snapshot_image_format = r.optional("libvirt", "snapshot_image_format");
        let libvirt = LibvirtConfig {
            connection_uri: if connection_uri.is_empty() { "qemu:///system".into() } else { connection_uri },
            images_type: r.string("libvirt", "images_type", "default")?,
            snapshot_image_format,
            // Nova's defaults, substituted as oslo substitutes them.
            snapshots_directory: PathBuf::from(r.string(
                "libvirt",
                "snapshots_directory",
                "$instances_path/snapshots",
            )?),
            disable_live_snapshot: r.parse("workarounds", "disable_libvirt_livesnapshot", false)?,
            ephemeral_encryption: r.parse("ephemeral_storage_encryption", "enabled", false)?,
            block_copy_timeout: r.seconds("novasnap", "block_copy_timeout", 3600)?,
        };

        let max_concurrent_snapshots: usize = r.parse("novasnap", "max_concurrent_snapshots", 5)?;
        if max_concurrent_snapshots == 0 {
            return Err(r.invalid("novasnap", "max_concurrent_snapshots", "0", "must be at least 1".into()));
        }
        let pool = r.string("libvirt", "images_rbd_pool", "rbd")?;
        let ceph_conf = r.string("libvirt", "images_rbd_ceph_conf", "")?;
        let rbd_user = r.string("libvirt", "rbd_user", "")?;
        let rbd = RbdConfig {
            state_pool: r.optional("novasnap", "state_pool").unwrap_or_else(|| pool.clone()),
            glance_pools: r.list("novasnap", "glance_pools", &["images"])?,
            pool,
            ceph_conf: Some(PathBuf::from(ceph_conf)).filter(|p| !p.as_os_str().is_empty()),
            user: Some(rbd_user).filter(|u| !u.is_empty()),
            osd_op_timeout: r.positive_seconds("novasnap", "rados_osd_op_timeout", 30)?,
            mon_op_timeout: r.positive_seconds("novasnap", "rados_mon_op_timeout", 30)?,
            mount_timeout: r.positive_seconds("novasnap", "client_mount_timeout", 30)?,
            concurrent_flattens: r.parse("novasnap", "concurrent_flattens", max_concurrent_snapshots)?,
        };
        if rbd.concurrent_flattens == 0 {
            return Err(r.invalid("novasnap", "concurrent_flattens", "0", "must be at least 1".into()));
        }

        let api_servers = r.list("glance", "api_servers", &[])?;
        for server in &api_servers {
            url::Url::parse(server).map_err(|e| r.invalid("glance", "api_servers", server, e.to_string()))?;
        }
        let session = r.session("glance")?;
        let glance = GlanceConfig {
            api_servers,
            adapter: r.adapter("glance", "image")?,
            request_timeout: match session.timeout {
                Some(timeout) => timeout,
                None => r.seconds("novasnap", "glance_timeout", 60)?,
            },
            session,
        };
        let identity = IdentityConfig {
            service_user: ServiceUserConfig {
                send_service_user_token: r.parse("service_user", "send_service_user_token", false)?,
                auth: r.password_auth("service_user")?,
            },
            novasnap_service_user: r.password_auth("novasnap_service_user")?,
        };

        let instance_lease = r.seconds("novasnap", "instance_lease", 30)?;
        if instance_lease < Duration::from_secs(1) {
            // RADOS takes a lock of 0 s as one that never expires.
            let value = instance_lease.as_secs_f64().to_string();
            return Err(r.invalid("novasnap", "instance_lease", &value, "must be at least 1 second".into()));
        }
        let worker = WorkerConfig {
            max_concurrent_snapshots,
            direct_snapshot: r.parse("novasnap", "direct_snapshot", true)?,
            // Its choices (declared.rs) are checked as it is read.
            image_layout: match r.string("novasnap", "image_layout", "flattened")?.as_str() {
                "on_base" => ImageLayout::OnBase,
                _ => ImageLayout::Flattened,
            },
            retry: RetryPolicy {
                initial_delay: Duration::from_millis(r.parse("novasnap", "retry_initial_delay_ms", 500)?),
                max_delay: r.seconds("novasnap", "retry_max_delay", 30)?,
                max_retries: r.parse("novasnap", "retry_max_retries", 8)?,
            },
            reclaim_interval: r.seconds("novasnap", "reclaim_interval", 300)?,
            state_directory: PathBuf::from(r.string("novasnap", "state_directory", "/var/lib/novasnap")?),
            instance_lease,
            snapshot_timeout: r.positive_seconds("novasnap", "snapshot_timeout", 1500)?,
            done_horizon: r.positive_seconds("novasnap", "done_horizon", 7 * 24 * 3600)?,
            max_freeze: r.positive_seconds("novasnap", "max_freeze_seconds", 10)?,
            shutdown_grace: r.seconds("novasnap", "shutdown_grace", 120)?,
            nova_writeback: r.parse("novasnap", "nova_writeback", true)?,
        };

        let logging = LoggingConfig::read(r)?;

        Ok(Self { host, messaging, notifications, libvirt, rbd, glance, identity, worker, logging })
    }
}

/// oslo.log's options (`oslo_log/_options.py`), as `_setup_logging_from_conf` uses them.
#[derive(Debug, Clone, PartialEq)]
pub struct LoggingConfig {
    /// `[DEFAULT] debug`: DEBUG instead of INFO (`NOVASNAP_LOG` overrides both).
    pub debug: bool,
    /// `log_file` / `log_dir` as `_get_log_file_path` joins them; None: no file.
    pub file: Option<PathBuf>,
    /// `[DEFAULT] use_json`: one JSON object a line.
    pub json: bool,
    /// `[DEFAULT] use_stderr`: also to stderr. With neither a file nor stderr, oslo logs to
    /// stdout.
    pub stderr: bool,
}

impl LoggingConfig {
    fn read(r: &Reader) -> Result<Self, ConfigError> {
        let (file, dir) = (r.optional("DEFAULT", "log_file"), r.optional("DEFAULT", "log_dir"));
        Ok(Self {
            debug: r.parse("DEFAULT", "debug", false)?,
            // `os.path.join(log_dir, log_file)`: an absolute log_file ignores log_dir; alone,
            // log_dir holds `<binary>.log`.
            file: match (file, dir) {
                (Some(file), Some(dir)) => Some(Path::new(&dir).join(file)),
                (Some(file), None) => Some(file.into()),
                (None, Some(dir)) => Some(Path::new(&dir).join(format!("{}.log", oslo::PROG))),
                (None, None) => None,
            },
            json: r.parse("DEFAULT", "use_json", false)?,
            stderr: r.parse("DEFAULT", "use_stderr", false)?,
        })
    }
}

/// An option's type and default, learnt in the registering pass.
#[derive(Debug, Clone)]
struct Registered {
    group: String,
    name: String,
    kind: Kind,
    default: Value,
    declared: Declared,
}

type Registry = HashMap<(String, String), Registered>;

/// Reads typed options from the merged files, recording what it read and from where.
/// Without a namespace it registers: every read gives its default, unsubstituted.
struct Reader<'a> {
    sources: Option<(&'a Namespace, &'a Registry)>,
    settings: RefCell<Vec<Setting>>,
    /// Every (section, key) looked up, deprecated names included.
    looked_up: RefCell<HashSet<(String, String)>>,
    declarations: RefCell<Vec<Registered>>,
    /// The first error of a read that cannot return one (`optional`).
    deferred: RefCell<Option<ConfigError>>,
}

impl<'a> Reader<'a> {
    fn new(sources: Option<(&'a Namespace, &'a Registry)>) -> Self {
        Self {
            sources,
            settings: RefCell::default(),
            looked_up: RefCell::default(),
            declarations: RefCell::default(),
            deferred: RefCell::default(),
        }
    }

    /// What `$name` may stand for: every option read, under its own and deprecated names
    /// (`ConfigOpts._find_deprecated_opts`).
    fn registry(&self) -> Registry {
        let mut registry = Registry::new();
        for option in self.declarations.borrow().iter() {
            for (group, name) in names(&option.group, &option.name, &option.declared) {
                registry.entry((group, name)).or_insert_with(|| option.clone());
            }
        }
        registry
    }

    fn report(&self, namespace: &Namespace) -> Report {
        Report::new(namespace, self.settings.take(), &self.looked_up.borrow())
    }

    /// `ConfigOpts._do_get`: the environment, else the files, else the default; substituted,
    /// then converted by the option's type.
    fn value(
        &self,
        section: &str,
        key: &str,
        kind: Kind,
        default: Value,
        declared: Option<Declared>,
    ) -> Result<Value, ConfigError> {
        let declared = declared.unwrap_or_default();
        let kind = declared.kind.unwrap_or(kind);
        self.looked_up.borrow_mut().extend(names(section, key, &declared));
        self.declarations.borrow_mut().push(Registered {
            group: section.into(),
            name: key.into(),
            kind,
            default: default.clone(),
            declared,
        });
        let (value, origins) = match self.sources {
            None => (default.clone(), Vec::new()),
            Some(_) => self.resolve(section, key, kind, &declared, &default, &mut Vec::new())?,
        };
        self.settings.borrow_mut().push(Setting {
            section: section.into(),
            option: key.into(),
            kind,
            value: value.clone(),
            default,
            origins,
            secret: declared.secret,
            choices: declared.choices,
        });
        Ok(value)
    }

    fn resolve(
        &self,
        section: &str,
        key: &str,
        kind: Kind,
        declared: &Declared,
        default: &Value,
        stack: &mut Vec<(String, String)>,
    ) -> Result<(Value, Vec<Origin>), ConfigError> {
        let (namespace, _) = self.sources.expect("resolving needs sources");
        let names = names(section, key, declared);
        let found = match namespace.environment(section, key) {
            Some(variable) => vec![variable],
            None if kind == Kind::Multi => namespace.file_values(&names),
            None => namespace.file_value(&names).into_iter().collect(),
        };
        let origins = found.iter().map(|f| f.origin.clone()).collect();
        if found.is_empty() {
            let location = || "default".to_string();
            let value = match default {
                Value::Str(text) => Value::Str(self.substitute(text, section, key, &location, stack)?),
                Value::List(items) => Value::List(
                    items
                        .iter()
                        .map(|i| self.substitute(i, section, key, &location, stack))
                        .collect::<Result<_, _>>()?,
                ),
                other => other.clone(),
            };
            return Ok((value, origins));
        }
        let mut texts = Vec::new();
        for f in &found {
            let location = || f.origin.to_string();
            let text = self.substitute(&f.text, section, key, &location, stack)?;
            texts.push((text, location()));
        }
        let value = if kind == Kind::Multi {
            Value::List(texts.into_iter().map(|(text, _)| text).collect())
        } else {
            let (text, location) = texts.pop().expect("found one");
            convert(kind, &text, declared).map_err(|reason| ConfigError::Invalid {
                location,
                section: section.into(),
                key: key.into(),
                value: text,
                reason,
            })?
        };
        Ok((value, origins))
    }

    /// `ConfigOpts._substitute` with `StrSubWrapper`: `$name` is the option `name` of the
    /// same group, else of `[DEFAULT]`; `$group.name` names the group.
    fn substitute(
        &self,
        text: &str,
        section: &str,
        key: &str,
        location: &dyn Fn() -> String,
        stack: &mut Vec<(String, String)>,
    ) -> Result<String, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid {
            location: location(),
            section: section.into(),
            key: key.into(),
            value: text.into(),
            reason,
        };
        let mut out = String::new();
        for piece in oslo::template(text) {
            match piece {
                Piece::Text(t) => out.push_str(&t),
                Piece::Reference(name) => {
                    let candidates = match name.split_once('.') {
                        // `_get_group("DEFAULT")` fails: DEFAULT is not a group to oslo.
                        Some(("DEFAULT", _)) => Vec::new(),
                        Some((group, option)) => vec![(group.to_string(), option.to_string())],
                        None => vec![(section.to_string(), name.clone()), ("DEFAULT".to_string(), name.clone())],
                    };
                    let mut resolved = None;
                    for (group, option) in candidates {
                        if stack.contains(&(group.clone(), option.clone())) {
                            return Err(invalid(format!("${name} refers to itself")));
                        }
                        stack.push((group.clone(), option.clone()));
                        let value = self.reference(&group, &option, stack);
                        stack.pop();
                        if let Some(value) = value? {
                            resolved = Some(value);
                            break;
                        }
                    }
                    let value = resolved.ok_or_else(|| {
                        invalid(format!(
                            "${name}: no such option (novasnap resolves the options it reads, and others only where a file sets them)"
                        ))
                    })?;
                    out.push_str(&value);
                }
            }
        }
        Ok(out)
    }

    /// What `$group.option` stands for: Python's `str()` of a registered option's value;
    /// for an option novasnap does not read (Nova has hundreds), the value a file sets.
    fn reference(
        &self,
        group: &str,
        option: &str,
        stack: &mut Vec<(String, String)>,
    ) -> Result<Option<String>, ConfigError> {
        let (namespace, registry) = self.sources.expect("resolving needs sources");
        // oslo finds a group by its exact name: `$LIBVIRT.x` names no group.
        if oslo::normalize_section(group) != group {
            return Ok(None);
        }
        if let Some(r) = registry.get(&(group.to_string(), option.to_string())) {
            let (value, _) = self.resolve(&r.group, &r.name, r.kind, &r.declared, &r.default, stack)?;
            return Ok(Some(value.to_python_str()));
        }
        let set = namespace
            .environment(group, option)
            .or_else(|| namespace.file_value(&[(oslo::normalize_section(group), option.to_string())]));
        match set {
            Some(found) => {
                let location = || found.origin.to_string();
                Ok(Some(self.substitute(&found.text, group, option, &location, stack)?))
            }
            None => Ok(None),
        }
    }

    fn invalid(&self, section: &str, key: &str, value: &str, reason: String) -> ConfigError {
        let location = self
            .settings
            .borrow()
            .iter()
            .rev()
            .find(|s| s.section == section && s.option == key)
            .and_then(|s| s.origins.last().map(Origin::to_string))
            .unwrap_or_else(|| "default".into());
        ConfigError::Invalid { location, section: section.into(), key: key.into(), value: value.into(), reason }
    }

    fn string(&self, section: &str, key: &str, default: &str) -> Result<String, ConfigError> {
        match self.value(section, key, Kind::Str, Value::Str(default.into()), declared::declared(section, key))? {
            Value::Str(s) => Ok(s),
            other => Ok(other.to_python_str()),
        }
    }

    fn list(&self, section: &str, key: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        self.strings(section, key, Kind::List, default)
    }

    /// A `MultiStrOpt`: every line of every file adds a value.
    fn multi(&self, section: &str, key: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        self.strings(section, key, Kind::Multi, default)
    }

    fn strings(&self, section: &str, key: &str, kind: Kind, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        let default = Value::List(default.iter().map(|s| s.to_string()).collect());
        match self.value(section, key, kind, default, declared::declared(section, key))? {
            Value::List(items) => Ok(items),
            other => Err(self.invalid(section, key, &other.to_python_str(), "expected a list".into())),
        }
    }

    fn parse<T: ConfigValue>(&self, section: &str, key: &str, default: T) -> Result<T, ConfigError> {
        let value = self.value(section, key, T::KIND, default.into_value(), declared::declared(section, key))?;
        T::from_value(&value).map_err(|reason| self.invalid(section, key, &value.to_python_str(), reason))
    }

    /// A value that is set and not empty.
    fn optional(&self, section: &str, key: &str) -> Option<String> {
        self.optional_declared(section, key, declared::declared(section, key))
    }

    fn optional_declared(&self, section: &str, key: &str, declared: Option<Declared>) -> Option<String> {
        match self.value(section, key, Kind::Str, Value::None, declared) {
            Ok(Value::Str(s)) if !s.is_empty() => Some(s),
            Ok(_) => None,
            Err(e) => {
                self.deferred.borrow_mut().get_or_insert(e);
                None
            }
        }
    }

    /// A keystoneauth auth option of `section` (its deprecated names, its secrecy).
    fn auth_option(&self, section: &str, key: &str) -> Option<String> {
        self.optional_declared(section, key, declared::keystoneauth(key))
    }

    fn optional_seconds(&self, section: &str, key: &str) -> Result<Option<Duration>, ConfigError> {
        let value = self.value(section, key, Kind::Float, Value::None, declared::declared(section, key))?;
        match value {
            Value::None => Ok(None),
            value => self.duration(section, key, &value).map(Some),
        }
    }

    /// keystoneauth Session options of `section`.
    fn session(&self, section: &str) -> Result<SessionConfig, ConfigError> {
        Ok(SessionConfig {
            cafile: self.optional(section, "cafile").map(PathBuf::from),
            certfile: self.optional(section, "certfile").map(PathBuf::from),
            keyfile: self.optional(section, "keyfile").map(PathBuf::from),
            insecure: self.parse(section, "insecure", false)?,
            timeout: self.optional_seconds(section, "timeout")?,
        })
    }

    /// keystoneauth Adapter options of `section`, with Nova's defaults.
    fn adapter(&self, section: &str, service_type: &str) -> Result<AdapterConfig, ConfigError> {
        let mut valid_interfaces = Vec::new();
        for interface in self.list(section, "valid_interfaces", &["internal", "public"])? {
            // keystoneauth also takes the v2 catalog's spelling (`publicURL`).
            let name = interface.strip_suffix("URL").unwrap_or(&interface).to_ascii_lowercase();
            if !matches!(name.as_str(), "public" | "internal" | "admin") {
                return Err(self.invalid(
                    section,
                    "valid_interfaces",
                    &interface,
                    "expected public, internal or admin".into(),
                ));
            }
            valid_interfaces.push(name);
        }
        let endpoint_override = self.optional(section, "endpoint_override");
        if let Some(url) = &endpoint_override {
            url::Url::parse(url).map_err(|e| self.invalid(section, "endpoint_override", url, e.to_string()))?;
        }
        Ok(AdapterConfig {
            service_type: self.string(section, "service_type", service_type)?,
            valid_interfaces,
            region_name: self.optional(section, "region_name"),
            endpoint_override,
        })
    }

    /// keystoneauth auth options of `section`, or of the section its `auth_section` names
    /// (`loading/conf.py` `load_from_conf_options`); None without `auth_type`. keystoneauth's
    /// generic `default_domain_id` / `default_domain_name` stand in for unset user and
    /// project domains. The session options stay `section`'s, as Nova loads them.
    fn password_auth(&self, section: &str) -> Result<Option<PasswordAuthConfig>, ConfigError> {
        let session_section = section;
        let auth_section = self.auth_option(section, "auth_section");
        let section = auth_section.as_deref().unwrap_or(section);
        let Some(auth_type) = self.auth_option(section, "auth_type") else { return Ok(None) };
        if !matches!(auth_type.as_str(), "password" | "v3password") {
            return Err(self.invalid(
                section,
                "auth_type",
                &auth_type,
                "novasnap supports the password and v3password plugins".into(),
            ));
        }
        let required = |key: &str| {
            self.auth_option(section, key)
                .ok_or_else(|| self.invalid(section, key, "", format!("required with auth_type = {auth_type}")))
        };
        let auth_url = required("auth_url")?;
        url::Url::parse(&auth_url).map_err(|e| self.invalid(section, "auth_url", &auth_url, e.to_string()))?;
        let password = SecretString::from(required("password")?);
        let (user_id, username) = (self.auth_option(section, "user_id"), self.auth_option(section, "username"));
        if user_id.is_none() && username.is_none() {
            return Err(self.invalid(section, "username", "", "username or user_id is required".into()));
        }
        let default_domain_id = self.auth_option(section, "default_domain_id");
        let default_domain_name = self.auth_option(section, "default_domain_name");
        let domain = |id: &str, name: &str| {
            let (id, name) = (self.auth_option(section, id), self.auth_option(section, name));
            match (id, name) {
                (None, None) => (default_domain_id.clone(), default_domain_name.clone()),
                set => set,
            }
        };
        let (user_domain_id, user_domain_name) = domain("user_domain_id", "user_domain_name");
        if user_id.is_none() && user_domain_id.is_none() && user_domain_name.is_none() {
            return Err(self.invalid(
                section,
                "user_domain_name",
                "",
                "a username needs user_domain_name or user_domain_id".into(),
            ));
        }
        let (project_domain_id, project_domain_name) = domain("project_domain_id", "project_domain_name");
        Ok(Some(PasswordAuthConfig {
            section: section.into(),
            auth_url,
            user_id,
            username,
            user_domain_id,
            user_domain_name,
            password,
            project_id: self.auth_option(section, "project_id"),
            project_name: self.auth_option(section, "project_name"),
            project_domain_id,
            project_domain_name,
            domain_id: self.auth_option(section, "domain_id"),
            domain_name: self.auth_option(section, "domain_name"),
            system_scope: self.auth_option(section, "system_scope"),
            session: self.session(session_section)?,
        }))
    }

    /// A number of seconds: a `FloatOpt` unless upstream declares an `IntOpt`.
    fn seconds(&self, section: &str, key: &str, default: u64) -> Result<Duration, ConfigError> {
        let declared = declared::declared(section, key);
        let default = match declared.and_then(|d| d.kind) {
            Some(Kind::Int) => Value::Int(default as i64),
            _ => Value::Float(default as f64),
        };
        let value = self.value(section, key, Kind::Float, default, declared)?;
        self.duration(section, key, &value)
    }

    fn duration(&self, section: &str, key: &str, value: &Value) -> Result<Duration, ConfigError> {
        let secs =
            f64::from_value(value).map_err(|reason| self.invalid(section, key, &value.to_python_str(), reason))?;
        if !secs.is_finite() || secs < 0.0 {
            return Err(self.invalid(
                section,
                key,
                &value.to_python_str(),
                "expected a non-negative number of seconds".into(),
            ));
        }
        Ok(Duration::from_secs_f64(secs))
    }

    /// Seconds that must not be 0: librados takes 0 as "no bound at all".
    fn positive_seconds(&self, section: &str, key: &str, default: u64) -> Result<Duration, ConfigError> {
        let value = self.seconds(section, key, default)?;
        if value.is_zero() {
            return Err(self.invalid(section, key, "0", "must be more than 0 (0 means no bound)".into()));
        }
        Ok(value)
    }
}

/// How a direct snapshot's image holds its bytes (`[novasnap] image_layout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageLayout {
    /// `flattened` (the default, Nova's): the image holds every byte of the disk and
    /// depends on nothing.
    Flattened,
    /// `on_base` (opt-in): for an instance disk Nova cloned from a Glance image, the image is
    /// a clone of that same base image holding only what the instance wrote; Ceph writes
    /// only those bytes and the image is usable at once whatever the disk's size. The base
    /// image then cannot be deleted from Glance while such images exist, as it cannot while
    /// instances built from it do; the instance disk can be deleted at any time.
    OnBase,
}

/// The names an option is looked up by: its own, then its deprecated ones
/// (`Opt._get_from_namespace`), sections normalized as oslo normalizes them.
fn names(section: &str, key: &str, declared: &Declared) -> Vec<(String, String)> {
    std::iter::once((section, key))
        .chain(declared.deprecated.iter().map(|(group, name)| (group.unwrap_or(section), *name)))
        .map(|(group, name)| (oslo::normalize_section(group), name.to_string()))
        .collect()
}

/// The option's type applied to its (substituted) text.
fn convert(kind: Kind, text: &str, declared: &Declared) -> Result<Value, String> {
    match kind {
        Kind::Str if !declared.choices.is_empty() && !declared.choices.contains(&text) => {
            Err(format!("Valid values are [{}], but found {text:?}", declared.choices.join(", ")))
        }
        Kind::Str | Kind::Multi => Ok(Value::Str(text.to_string())),
        Kind::HostDomain => oslo::to_host_domain(text).map(Value::Str),
        Kind::Bool => oslo::to_bool(text).map(Value::Bool),
        Kind::Int => match oslo::to_int(text)? {
            Value::Int(i) if declared.min.is_some_and(|min| i < min) => {
                Err(format!("Should be greater than or equal to {}", declared.min.unwrap_or_default()))
            }
            value => Ok(value),
        },
        Kind::Float => oslo::to_float(text),
        Kind::List => Ok(Value::List(oslo::to_list(text))),
    }
}

/// A Rust type an option is read into, and the oslo type that reads it.
trait ConfigValue: Sized {
    const KIND: Kind;
    fn into_value(self) -> Value;
    fn from_value(value: &Value) -> Result<Self, String>;
}

impl ConfigValue for bool {
    const KIND: Kind = Kind::Bool;
    fn into_value(self) -> Value {
        Value::Bool(self)
    }
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Bool(b) => Ok(*b),
            other => Err(format!("expected true or false, not {}", other.to_python_str())),
        }
    }
}

impl ConfigValue for f64 {
    const KIND: Kind = Kind::Float;
    fn into_value(self) -> Value {
        Value::Float(self)
    }
    fn from_value(value: &Value) -> Result<Self, String> {
        match value {
            Value::Float(f) => Ok(*f),
            Value::Int(i) => Ok(*i as f64),
            // oslo reads an empty number as None, which Nova's code would not take either.
            Value::None => Err("empty: a number is needed".into()),
            other => Err(format!("expected a number, not {}", other.to_python_str())),
        }
    }
}

impl ConfigValue for String {
    const KIND: Kind = Kind::Str;
    fn into_value(self) -> Value {
        Value::Str(self)
    }
    fn from_value(value: &Value) -> Result<Self, String> {
        Ok(value.to_python_str())
    }
}

macro_rules! integer_value {
    ($($t:ty),*) => {$(
        impl ConfigValue for $t {
            const KIND: Kind = Kind::Int;
            fn into_value(self) -> Value {
                Value::Int(i64::try_from(self).expect("defaults fit in an i64"))
            }
            fn from_value(value: &Value) -> Result<Self, String> {
                match value {
                    Value::Int(i) => <$t>::try_from(*i).map_err(|_| format!("{i} is out of range")),
                    Value::None => Err("empty: a number is needed".into()),
                    other => Err(format!("expected an integer, not {}", other.to_python_str())),
                }
            }
        }
    )*};
}
integer_value!(i32, i64, u16, u32, u64, usize);

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text)
    }

    #[test]
    fn a_real_nova_conf_with_unknown_options_loads() {
        let c = load(
            "[DEFAULT]\ntransport_url = rabbit://nova:s3cret@10.0.0.1:5672,nova:s3cret@10.0.0.2:5672/nova\nhost = cmp1\nmy_ip = 10.0.0.9\n\
             [libvirt]\nimages_type = rbd\nimages_rbd_pool = vms\nvirt_type = kvm\n\
             [glance]\napi_servers = http://10.0.0.5:9292\n\
             [oslo_messaging_notifications]\ndriver = messagingv2\n\
             [placement]\nauth_type = password\n",
        )
        .unwrap();
        assert_eq!(c.host, "cmp1");
        let brokers = &c.messaging.transport.brokers;
        assert_eq!(brokers.len(), 2);
        assert_eq!((brokers[1].host.as_str(), brokers[1].vhost.as_str()), ("10.0.0.2", "nova"));
        assert_eq!(brokers[0].address(), "10.0.0.1:5672");
        assert!(!format!("{c:?}").contains("s3cret"), "printed configs hide broker passwords");
        assert_eq!(c.rbd.pool, "vms");
        assert_eq!(c.rbd.state_pool, "vms");
        assert_eq!(c.notifications.drivers, [NotificationDriver::MessagingV2]);
        assert_eq!(c.worker.max_concurrent_snapshots, 5);
        assert_eq!(c.rbd.concurrent_flattens, 5, "as many flattens as snapshots unless set");
        assert_eq!(c.libvirt.connection_uri, "qemu:///system");
        assert_eq!(c.libvirt.snapshots_directory, PathBuf::from("/var/lib/nova/instances/snapshots"));
    }

    #[test]
    fn invalid_values_name_file_section_and_key() {
        let err = load("[novasnap]\nmax_concurrent_snapshots = lots\n").unwrap_err().to_string();
        assert!(err.contains("nova.conf") && err.contains("[novasnap] max_concurrent_snapshots"), "{err}");
        let c = load("[novasnap]\nmax_concurrent_snapshots = 8\n").unwrap();
        assert_eq!(c.rbd.concurrent_flattens, 8);
        let c = load("[novasnap]\nmax_concurrent_snapshots = 8\nconcurrent_flattens = 2\n").unwrap();
        assert_eq!(c.rbd.concurrent_flattens, 2);
        let err = load("[novasnap]\nconcurrent_flattens = 0\n").unwrap_err().to_string();
        assert!(err.contains("[novasnap] concurrent_flattens") && err.contains("at least 1"), "{err}");
        let err = load("[workarounds]\ndisable_libvirt_livesnapshot = maybe\n").unwrap_err().to_string();
        assert!(err.contains("[workarounds] disable_libvirt_livesnapshot"), "{err}");
        let err = load("[DEFAULT]\ntransport_url = kafka://x\n").unwrap_err().to_string();
        assert!(err.contains("transport_url"), "{err}");
    }

    /// What the stack's nova-compute runs from (`scripts/stack`), which has no `[glance]`.
    const NOVA_CPU_CONF: &str = "[DEFAULT]\nhost = compute1\n\
        [placement]\nauth_type = password\nauth_url = http://127.0.0.1:5000/v3\nusername = placement\npassword = p1\n\
        [service_user]\nsend_service_user_token = True\nauth_type = password\nauth_url = http://127.0.0.1:5000/v3\n\
        username = nova\npassword = s3cret\nproject_name = service\nuser_domain_name = Default\n\
        project_domain_name = Default\nregion_name = RegionOne\n";

    #[test]
    fn nova_s_glance_and_service_user_options_with_nova_s_defaults() {
        let c = load(NOVA_CPU_CONF).unwrap();
        assert!(c.glance.api_servers.is_empty(), "no api_servers: the catalog is used, as in Nova");
        let adapter = AdapterConfig {
            service_type: "image".into(),
            valid_interfaces: vec!["internal".into(), "public".into()],
            region_name: None,
            endpoint_override: None,
        };
        assert_eq!(c.glance.adapter, adapter);
        assert_eq!(c.glance.session, SessionConfig::default());
        assert_eq!(c.glance.request_timeout, Duration::from_secs(60));
        assert!(c.identity.service_user.send_service_user_token);
        let auth = c.identity.service_user.auth.as_ref().unwrap();
        assert_eq!((auth.section.as_str(), auth.auth_url.as_str()), ("service_user", "http://127.0.0.1:5000/v3"));
        assert_eq!((auth.username.as_deref(), auth.user_domain_name.as_deref()), (Some("nova"), Some("Default")));
        assert_eq!(
            (auth.project_name.as_deref(), auth.project_domain_name.as_deref()),
            (Some("service"), Some("Default"))
        );
        assert_eq!(auth.password.expose_secret(), "s3cret");
        assert!(c.identity.novasnap_service_user.is_none(), "falls back to [service_user]");
        assert!(!format!("{c:?}").contains("s3cret"), "printed configs hide service passwords");

        let c = load("").unwrap();
        assert!(!c.identity.service_user.send_service_user_token && c.identity.service_user.auth.is_none());
    }

    #[test]
    fn novasnap_s_own_service_user_and_glance_s_keystoneauth_options() {
        let c = load(
            "[glance]\nendpoint_override = https://glance.example:9292\nregion_name = RegionTwo\n\
             valid_interfaces = publicURL, admin\nservice_type = image2\ncafile = /etc/ssl/ca.pem\n\
             certfile = /etc/ssl/c.pem\nkeyfile = /etc/ssl/k.pem\ninsecure = true\ntimeout = 5.5\n\
             [novasnap_service_user]\nauth_type = v3password\nauth_url = https://keystone.example/identity\n\
             user_id = 1234\npassword = x\nsystem_scope = all\ninsecure = yes\n\
             [service_user]\nauth_type = password\nauth_url = http://k/v3\nusername = nova\npassword = y\n\
             default_domain_id = default\nproject_name = service\n",
        )
        .unwrap();
        let g = &c.glance;
        assert_eq!(g.adapter.endpoint_override.as_deref(), Some("https://glance.example:9292"));
        assert_eq!(g.adapter.region_name.as_deref(), Some("RegionTwo"));
        assert_eq!(g.adapter.valid_interfaces, ["public", "admin"]);
        assert_eq!(g.adapter.service_type, "image2");
        let session = SessionConfig {
            cafile: Some("/etc/ssl/ca.pem".into()),
            certfile: Some("/etc/ssl/c.pem".into()),
            keyfile: Some("/etc/ssl/k.pem".into()),
            insecure: true,
            timeout: Some(Duration::from_millis(5500)),
        };
        assert_eq!(g.session, session);
        assert_eq!(g.request_timeout, Duration::from_millis(5500), "[glance] timeout bounds requests");
        let own = c.identity.novasnap_service_user.as_ref().unwrap();
        assert_eq!((own.user_id.as_deref(), own.system_scope.as_deref()), (Some("1234"), Some("all")));
        assert!(own.session.insecure && own.project_name.is_none());
        let nova = c.identity.service_user.auth.as_ref().unwrap();
        assert_eq!(nova.user_domain_id.as_deref(), Some("default"), "default_domain_id fills the user domain");
        assert_eq!(nova.project_domain_id.as_deref(), Some("default"), "and the project domain");
    }

    #[test]
    fn unusable_service_credentials_name_section_and_key() {
        let base = "auth_url = http://k/v3\nusername = u\nuser_domain_name = Default\npassword = p\n";
        let cases = [
            ("[service_user]\nauth_type = token\n", "[service_user] auth_type"),
            ("[service_user]\nauth_type = password\nauth_url = http://k/v3\nusername = u\n", "[service_user] password"),
            (
                &format!("[novasnap_service_user]\nauth_type = password\n{}", base.replace("username = u\n", "")),
                "[novasnap_service_user] username",
            ),
            (
                &format!("[service_user]\nauth_type = password\n{}", base.replace("user_domain_name = Default\n", "")),
                "[service_user] user_domain_name",
            ),
            ("[glance]\nvalid_interfaces = internal, private\n", "[glance] valid_interfaces"),
            ("[glance]\nendpoint_override = not a url\n", "[glance] endpoint_override"),
            ("[glance]\ninsecure = sometimes\n", "[glance] insecure"),
        ];
        for (text, expected) in cases {
            let err = load(text).unwrap_err().to_string();
            assert!(err.contains(expected), "{text:?}: {err}");
        }
        assert!(load(&format!("[service_user]\nauth_type = password\n{base}")).is_ok());
    }

    #[test]
    fn an_instance_lease_under_a_second_is_refused() {
        // RADOS would take it as a lock that never expires: a dead replica's lease would
        // block the instance's snapshots for good.
        let err = load("[novasnap]\ninstance_lease = 0.5\n").unwrap_err().to_string();
        assert!(err.contains("[novasnap] instance_lease") && err.contains("at least 1 second"), "{err}");
        assert_eq!(
            load("[novasnap]\ninstance_lease = 1.5\n").unwrap().worker.instance_lease,
            Duration::from_millis(1500)
        );
    }

    #[test]
    fn noop_driver_disables_notifications() {
        let c = load("[oslo_messaging_notifications]\ndriver = noop\n").unwrap();
        assert!(c.notifications.drivers.is_empty());
        let c = load("[oslo_messaging_notifications]\ndriver = messaging\n").unwrap();
        assert_eq!(c.notifications.drivers, [NotificationDriver::Messaging]);
    }

    fn read_files(texts: &[&str], env: &[(&str, &str)]) -> Result<(Config, Report), ConfigError> {
        let files = texts
            .iter()
            .enumerate()
            .map(|(i, text)| oslo::ConfigFile::parse(Path::new(&format!("/etc/nova/{i}.conf")), text).unwrap())
            .collect();
        Config::read(&Namespace::new(files, env.iter().map(|(k, v)| (k.to_string(), v.to_string()))))
    }

    #[test]
    fn files_and_repeated_blocks_merge_as_oslo_merges_them() {
        let (c, report) = read_files(
            &[
                "[DEFAULT]\nhost = first\n[libvirt]\nimages_rbd_pool = a\n[DEFAULT]\nhost = second\n\
                 [oslo_messaging_notifications]\ndriver = messagingv2\n",
                "[LIBVIRT]\nimages_rbd_pool = b\nimages_rbd_pool = c\n[oslo_messaging_notifications]\ndriver = log\n\
                 driver = messaging\n[default]\nhost = ignored\n",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.host, "second", "the last value of the files that set it");
        assert_eq!(c.rbd.pool, "c", "a later file wins, its last value; [LIBVIRT] is [libvirt]");
        use oslo_messaging::NotificationDriver::*;
        assert_eq!(c.notifications.drivers, [MessagingV2, Log, Messaging], "every driver line counts");
        let driver = report.settings.iter().find(|s| s.option == "driver").unwrap();
        assert_eq!(driver.value, Value::List(vec!["messagingv2".into(), "log".into(), "messaging".into()]));
        assert_eq!(driver.origins.len(), 3);
        assert_eq!(report.unused["default"].keys().collect::<Vec<_>>(), ["host"], "[default] is not [DEFAULT]");
    }

    #[test]
    fn deprecated_names_are_read_and_the_current_name_wins_in_a_file() {
        let (c, _) = read_files(
            &[
                "[ssl]\nca_file = /ca.pem\n[glance]\napi_insecure = true\n[DEFAULT]\nnotification_format = versioned\n\
                 logfile = old.log\n[service_user]\nauth_plugin = password\nauth_url = http://k/v3\nuser_name = nova\n\
                 password = p\nuser_domain_id = default\ntenant_name = service\n",
                "[DEFAULT]\nlog_file = new.log\nlogfile = deprecated-loses.log\n",
            ],
            &[],
        )
        .unwrap();
        assert_eq!(c.glance.session.cafile, Some(PathBuf::from("/ca.pem")));
        assert!(c.glance.session.insecure);
        assert_eq!(c.notifications.format, NotificationFormat::Versioned);
        assert_eq!(c.logging.file, Some(PathBuf::from("new.log")));
        let auth = c.identity.service_user.auth.unwrap();
        assert_eq!((auth.username.as_deref(), auth.project_name.as_deref()), (Some("nova"), Some("service")));
    }

    #[test]
    fn values_are_substituted_as_oslo_substitutes_them() {
        let (c, _) = read_files(
            &["[DEFAULT]\nstate_path = /srv/nova\nmy_ip = 10.0.0.9\nhost = ${my_ip}\n\
               [libvirt]\nimages_rbd_pool = $host-pool\nrbd_user = a$$b\\$c\\x\n\
               [novasnap]\nstate_directory = $state_path/$rpc_response_timeout/$debug/$libvirt.images_rbd_pool\n"],
            &[],
        )
        .unwrap();
        assert_eq!(c.host, "10.0.0.9", "a Nova option novasnap does not read, as the file sets it");
        assert_eq!(c.rbd.pool, "10.0.0.9-pool");
        assert_eq!(c.rbd.user.as_deref(), Some("a$b$c\\x"), "$$ and \\$ are $; other backslashes are kept");
        assert_eq!(c.libvirt.snapshots_directory, PathBuf::from("/srv/nova/instances/snapshots"), "defaults too");
        assert_eq!(c.worker.state_directory, PathBuf::from("/srv/nova/60/False/10.0.0.9-pool"), "Python's str()");
        for (text, expected) in [
            ("[libvirt]\nrbd_user = $nosuch\n", "$nosuch: no such option"),
            ("[libvirt]\nrbd_user = $DEFAULT.host\n", "$DEFAULT.host: no such option"),
            ("[libvirt]\nrbd_user = $images_rbd_pool\nimages_rbd_pool = $rbd_user\n", "refers to itself"),
        ] {
            let err = read_files(&[text], &[]).unwrap_err().to_string();
            assert!(err.contains("/etc/nova/0.conf:") && err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn the_environment_wins_over_every_file() {
        let (c, report) =
            read_files(&["[libvirt]\nimages_rbd_pool = file\n"], &[("OS_LIBVIRT__IMAGES_RBD_POOL", "env-$host")])
                .unwrap();
        assert_eq!(c.rbd.pool, format!("env-{}", c.host));
        let pool = report.settings.iter().find(|s| s.option == "images_rbd_pool").unwrap();
        assert_eq!(pool.origins, [Origin::Environment("OS_LIBVIRT__IMAGES_RBD_POOL".into())]);
    }

    #[test]
    fn auth_section_moves_the_credentials_but_not_the_session() {
        let (c, _) = read_files(
            &["[service_user]\nauth_section = keystone_authtoken\ninsecure = true\n\
               [keystone_authtoken]\nauth_type = password\nauth_url = http://k/v3\nuser_id = 42\npassword = p\n"],
            &[],
        )
        .unwrap();
        let auth = c.identity.service_user.auth.unwrap();
        assert_eq!((auth.section.as_str(), auth.user_id.as_deref()), ("keystone_authtoken", Some("42")));
        assert!(auth.session.insecure, "Nova loads the session from [service_user]");
    }

    #[test]
    fn numbers_are_read_with_their_upstream_types() {
        let err = read_files(&["[DEFAULT]\nrpc_response_timeout = 1.5\n"], &[]).unwrap_err().to_string();
        assert!(err.contains("[DEFAULT] rpc_response_timeout") && err.contains("int()"), "an IntOpt: {err}");
        let err = read_files(&["[oslo_messaging_rabbit]\nrabbit_transient_queues_ttl = -1\n"], &[]).unwrap_err();
        assert!(err.to_string().contains("greater than or equal to 0"), "{err}");
        let err = read_files(&["[novasnap]\nconfirm_timeout =\n"], &[]).unwrap_err().to_string();
        assert!(err.contains("empty"), "oslo's None is no number: {err}");
        let (c, _) = read_files(&["[novasnap]\nconfirm_timeout = 1_5\nrelay_prefetch = \" +7 \"\n"], &[]).unwrap();
        assert_eq!((c.messaging.confirm_timeout, c.messaging.relay_prefetch), (Duration::from_secs(15), 7));
    }

    #[test]
    fn logs_go_where_oslo_log_would_put_them() {
        let logging = |text: &str| read_files(&[text], &[]).unwrap().0.logging;
        assert_eq!(logging("").file, None);
        assert_eq!(logging("[DEFAULT]\nlog_dir = /var/log/nova\n").file, Some("/var/log/nova/novasnap.log".into()));
        let both = logging("[DEFAULT]\nlog_dir = /var/log/nova\nlog_file = n.log\ndebug = yes\nuse_json = 1\n");
        assert_eq!(
            both,
            LoggingConfig { debug: true, file: Some("/var/log/nova/n.log".into()), json: true, stderr: false }
        );
        assert_eq!(logging("[DEFAULT]\nlog_dir = /x\nlog_file = /abs.log\n").file, Some("/abs.log".into()));
    }

    #[test]
    fn check_config_shows_sources_hides_secrets_and_lists_what_it_ignores() {
        let (_, report) = read_files(
            &[
                "[DEFAULT]\ntransport_url = rabbit://nova:s3cret@h1:5672,nova:s3cret@h2:5672/\nmy_ip = 1.2.3.4\n\
                 [placement]\nauth_type = password\n[ssl]\nca_file = /ca.pem\n",
                "[novasnap_service_user]\nauth_type = password\nauth_url = http://k/v3\nuser_id = 1\npassword = hunter2\n",
            ],
            &[],
        )
        .unwrap();
        let text = report.text(false);
        assert!(!text.contains("s3cret") && !text.contains("hunter2"), "{text}");
        assert!(text
            .contains("[DEFAULT] transport_url = rabbit://nova:***@h1:5672,nova:***@h2:5672/  (/etc/nova/0.conf:2)"));
        assert!(text.contains("[glance] cafile = /ca.pem  (/etc/nova/0.conf:7, as [ssl] ca_file)"), "{text}");
        assert!(text.contains("[libvirt] images_rbd_pool = rbd  (default)"), "{text}");
        assert!(text.contains("[DEFAULT] my_ip\n") && text.contains("[placement] auth_type\n"), "{text}");
        assert!(report.text(true).contains("hunter2"));
        let json = report.json(false);
        let password = json["options"].as_array().unwrap().iter().find(|o| o["option"] == "password").unwrap();
        assert_eq!((password["value"].as_str(), password["secret"].as_bool()), (Some("***"), Some(true)));
    }
}
