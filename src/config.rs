//! Every option novasnap reads, in one place.
//!
//! The file is nova.conf-style INI, so an operator can point novasnap at the nova.conf
//! they already have: the options Nova defines keep Nova's sections, names and defaults;
//! novasnap's own live in `[novasnap]`. Unknown sections and keys are ignored (a real
//! nova.conf has hundreds); a value that does not parse is an error naming file, section
//! and key.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ini::Ini;
use secrecy::SecretString;

use crate::retry::RetryPolicy;

mod oslo_messaging;
pub use oslo_messaging::{
    BrokerEndpoint, Compression, FailoverStrategy, LoginMethod, NotificationDriver, QueueOptions, RabbitConfig,
    RabbitTls, ReconnectPolicy, TlsVersions,
};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {file}: {reason}")]
    Read { file: PathBuf, reason: String },
    #[error("{file}: [{section}] {key} = {value:?}: {reason}")]
    Invalid { file: PathBuf, section: String, key: String, value: String, reason: String },
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
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let ini = Ini::load_from_file(path)
            .map_err(|e| ConfigError::Read { file: path.to_owned(), reason: e.to_string() })?;
        Self::from_ini(&ini, path)
    }

    pub fn from_ini(ini: &Ini, file: &Path) -> Result<Self, ConfigError> {
        let r = Reader { ini, file };
        let host = r.string("DEFAULT", "host", "")?;
        let host = if host.is_empty() { hostname() } else { host };

        // oslo.messaging's default (`transport._transport_opts`): guest on localhost.
        let transport_url = r.string("DEFAULT", "transport_url", "rabbit://")?;
        let messaging = MessagingConfig {
            transport: oslo_messaging::rabbit_config(&r, "DEFAULT", "transport_url", &transport_url)?,
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
            Some(url) => oslo_messaging::rabbit_config(&r, "oslo_messaging_notifications", "transport_url", &url)?,
            None => messaging.transport.clone(),
        };
        let retry: i64 = r.parse("oslo_messaging_notifications", "retry", -1)?;
        let format = match r.string("notifications", "notification_format", "both")?.as_str() {
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
            drivers: oslo_messaging::notification_drivers(&r)?,
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

        let instances_path = r.string("DEFAULT", "instances_path", "/var/lib/nova/instances")?;
        let connection_uri = r.string("libvirt", "connection_uri", "")?;
        let snapshot_image_format = r.string("libvirt", "snapshot_image_format", "")?;
        if !matches!(snapshot_image_format.as_str(), "" | "raw" | "qcow2" | "vmdk" | "vdi" | "ploop") {
            return Err(r.invalid(
                "libvirt",
                "snapshot_image_format",
                &snapshot_image_format,
                "expected raw, qcow2, vmdk, vdi or ploop".into(),
            ));
        }
        let libvirt = LibvirtConfig {
            connection_uri: if connection_uri.is_empty() { "qemu:///system".into() } else { connection_uri },
            images_type: r.string("libvirt", "images_type", "default")?,
            snapshot_image_format: Some(snapshot_image_format).filter(|f| !f.is_empty()),
            snapshots_directory: PathBuf::from(
                r.string("libvirt", "snapshots_directory", "$instances_path/snapshots")?
                    .replace("$instances_path", &instances_path),
            ),
            disable_live_snapshot: r.parse("workarounds", "disable_libvirt_livesnapshot", false)?,
            ephemeral_encryption: r.parse("ephemeral_storage_encryption", "enabled", false)?,
            block_copy_timeout: r.seconds("novasnap", "block_copy_timeout", 3600)?,
        };

        let pool = r.string("libvirt", "images_rbd_pool", "rbd")?;
        let ceph_conf = r.string("libvirt", "images_rbd_ceph_conf", "")?;
        let rbd_user = r.string("libvirt", "rbd_user", "")?;
        let rbd = RbdConfig {
            state_pool: r.string("novasnap", "state_pool", &pool)?,
            glance_pools: r.list("novasnap", "glance_pools", &["images"])?,
            pool,
            ceph_conf: Some(PathBuf::from(ceph_conf)).filter(|p| !p.as_os_str().is_empty()),
            user: Some(rbd_user).filter(|u| !u.is_empty()),
            osd_op_timeout: r.positive_seconds("novasnap", "rados_osd_op_timeout", 30)?,
            mon_op_timeout: r.positive_seconds("novasnap", "rados_mon_op_timeout", 30)?,
            mount_timeout: r.positive_seconds("novasnap", "client_mount_timeout", 30)?,
        };

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

        let max_concurrent_snapshots: usize = r.parse("novasnap", "max_concurrent_snapshots", 5)?;
        if max_concurrent_snapshots == 0 {
            return Err(r.invalid("novasnap", "max_concurrent_snapshots", "0", "must be at least 1".into()));
        }
        let instance_lease = r.seconds("novasnap", "instance_lease", 30)?;
        if instance_lease < Duration::from_secs(1) {
            // RADOS takes a lock of 0 s as one that never expires.
            let value = instance_lease.as_secs_f64().to_string();
            return Err(r.invalid("novasnap", "instance_lease", &value, "must be at least 1 second".into()));
        }
        let worker = WorkerConfig {
            max_concurrent_snapshots,
            direct_snapshot: r.parse("novasnap", "direct_snapshot", true)?,
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

        Ok(Self { host, messaging, notifications, libvirt, rbd, glance, identity, worker })
    }
}

struct Reader<'a> {
    ini: &'a Ini,
    file: &'a Path,
}

impl Reader<'_> {
    fn raw(&self, section: &str, key: &str) -> Option<&str> {
        self.ini.section(Some(section)).and_then(|s| s.get(key)).map(str::trim)
    }

    fn invalid(&self, section: &str, key: &str, value: &str, reason: String) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_owned(),
            section: section.into(),
            key: key.into(),
            value: value.into(),
            reason,
        }
    }

    fn string(&self, section: &str, key: &str, default: &str) -> Result<String, ConfigError> {
        Ok(self.raw(section, key).unwrap_or(default).to_owned())
    }

    /// Every value of a key set on several lines (oslo.config's MultiStrOpt).
    fn multi(&self, section: &str, key: &str) -> Vec<String> {
        self.ini
            .section(Some(section))
            .map(|s| s.get_all(key).map(|v| v.trim().to_owned()).collect())
            .unwrap_or_default()
    }

    fn list(&self, section: &str, key: &str, default: &[&str]) -> Result<Vec<String>, ConfigError> {
        Ok(match self.raw(section, key) {
            Some(v) => v.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect(),
            None => default.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn parse<T: ConfigValue>(&self, section: &str, key: &str, default: T) -> Result<T, ConfigError> {
        match self.raw(section, key) {
            None => Ok(default),
            Some(v) => T::parse(v).map_err(|reason| self.invalid(section, key, v, reason)),
        }
    }

    /// A value that is set and not empty.
    fn optional(&self, section: &str, key: &str) -> Option<String> {
        self.raw(section, key).filter(|v| !v.is_empty()).map(String::from)
    }

    fn optional_seconds(&self, section: &str, key: &str) -> Result<Option<Duration>, ConfigError> {
        self.raw(section, key).filter(|v| !v.is_empty()).map(|_| self.seconds(section, key, 0)).transpose()
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

    /// keystoneauth auth options of `section`; None without `auth_type`. keystoneauth's
    /// generic `default_domain_id` / `default_domain_name` stand in for unset user and
    /// project domains.
    fn password_auth(&self, section: &str) -> Result<Option<PasswordAuthConfig>, ConfigError> {
        let Some(auth_type) = self.optional(section, "auth_type") else { return Ok(None) };
        if !matches!(auth_type.as_str(), "password" | "v3password") {
            return Err(self.invalid(
                section,
                "auth_type",
                &auth_type,
                "novasnap supports the password and v3password plugins".into(),
            ));
        }
        let required = |key: &str| {
            self.optional(section, key)
                .ok_or_else(|| self.invalid(section, key, "", format!("required with auth_type = {auth_type}")))
        };
        let auth_url = required("auth_url")?;
        url::Url::parse(&auth_url).map_err(|e| self.invalid(section, "auth_url", &auth_url, e.to_string()))?;
        let password = SecretString::from(required("password")?);
        let (user_id, username) = (self.optional(section, "user_id"), self.optional(section, "username"));
        if user_id.is_none() && username.is_none() {
            return Err(self.invalid(section, "username", "", "username or user_id is required".into()));
        }
        let default_domain_id = self.optional(section, "default_domain_id");
        let default_domain_name = self.optional(section, "default_domain_name");
        let domain = |id: &str, name: &str| {
            let (id, name) = (self.optional(section, id), self.optional(section, name));
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
            project_id: self.optional(section, "project_id"),
            project_name: self.optional(section, "project_name"),
            project_domain_id,
            project_domain_name,
            domain_id: self.optional(section, "domain_id"),
            domain_name: self.optional(section, "domain_name"),
            system_scope: self.optional(section, "system_scope"),
            session: self.session(section)?,
        }))
    }

    fn seconds(&self, section: &str, key: &str, default: u64) -> Result<Duration, ConfigError> {
        let secs: f64 = self.parse(section, key, default as f64)?;
        if !secs.is_finite() || secs < 0.0 {
            return Err(self.invalid(
                section,
                key,
                &secs.to_string(),
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

/// How a value is written in an oslo.config file.
trait ConfigValue: Sized {
    fn parse(s: &str) -> Result<Self, String>;
}

impl ConfigValue for bool {
    fn parse(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" => Ok(false),
            _ => Err("expected true or false".into()),
        }
    }
}

macro_rules! from_str_value {
    ($($t:ty),*) => {$(
        impl ConfigValue for $t {
            fn parse(s: &str) -> Result<Self, String> {
                <$t>::from_str(s).map_err(|e| e.to_string())
            }
        }
    )*};
}
from_str_value!(i32, i64, u16, u32, u64, usize, f64, String);

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
        Config::from_ini(&Ini::load_from_str(text).unwrap(), Path::new("nova.conf"))
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
        assert_eq!(c.libvirt.connection_uri, "qemu:///system");
        assert_eq!(c.libvirt.snapshots_directory, PathBuf::from("/var/lib/nova/instances/snapshots"));
    }

    #[test]
    fn invalid_values_name_file_section_and_key() {
        let err = load("[novasnap]\nmax_concurrent_snapshots = lots\n").unwrap_err().to_string();
        assert!(err.contains("nova.conf") && err.contains("[novasnap] max_concurrent_snapshots"), "{err}");
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
}
