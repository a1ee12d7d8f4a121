//! oslo.messaging's options, read as its rabbit driver reads them (oslo.messaging 18.3.1):
//! a transport URL (`transport.py` `TransportURL.parse`) whose query overrides the
//! `[oslo_messaging_rabbit]` options of that transport (`_drivers/common.py`
//! `ConfigOptsProxy`), and `[oslo_messaging_notifications]` (`notify/notifier.py`).
//!
//! What novasnap cannot do as oslo does is refused here, naming the option, so a worker
//! never starts with a setting it would silently ignore.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use percent_encoding::percent_decode_str;

use super::{convert, declared, ConfigError, ConfigValue, Reader};

/// The section of the rabbit driver's options.
const RABBIT: &str = "oslo_messaging_rabbit";

/// Every option of `[oslo_messaging_rabbit]` (`impl_rabbit.rabbit_opts`, `amqp.amqp_opts`):
/// the only names a transport URL's query may carry. oslo refuses any other when the
/// driver loads (`ConfigOptsProxy._validate_query`: `NoSuchOptError`).
const RABBIT_OPTIONS: &[&str] = &[
    "amqp_auto_delete",
    "amqp_durable_queues",
    "conn_pool_min_size",
    "conn_pool_ttl",
    "direct_mandatory_flag",
    "enable_cancel_on_failover",
    "heartbeat_rate",
    "heartbeat_timeout_threshold",
    "hostname",
    "kombu_compression",
    "kombu_failover_strategy",
    "kombu_missing_consumer_retry_timeout",
    "kombu_reconnect_delay",
    "kombu_reconnect_splay",
    "processname",
    "rabbit_ha_queues",
    "rabbit_interval_max",
    "rabbit_login_method",
    "rabbit_qos_prefetch_count",
    "rabbit_quorum_delivery_limit",
    "rabbit_quorum_max_memory_bytes",
    "rabbit_quorum_max_memory_length",
    "rabbit_quorum_queue",
    "rabbit_retry_backoff",
    "rabbit_retry_interval",
    "rabbit_stream_fanout",
    "rabbit_transient_queues_ttl",
    "rabbit_transient_quorum_queue",
    "rpc_conn_pool_size",
    "ssl",
    "ssl_ca_file",
    "ssl_cert_file",
    "ssl_enforce_fips_mode",
    "ssl_enforce_hostname_verification",
    "ssl_key_file",
    "ssl_version",
    "use_queue_manager",
];

/// One broker of a transport URL.
#[derive(Clone, PartialEq, Eq)]
pub struct BrokerEndpoint {
    /// Host name or IP address, IPv6 without brackets.
    pub host: String,
    pub port: u16,
    pub username: String,
    pub password: String,
    pub vhost: String,
}

impl BrokerEndpoint {
    /// `host:port` (`[v6]:port`), for log lines: the endpoint without its credentials.
    pub fn address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Shows the endpoint without its credentials: configs are printed and logged.
impl std::fmt::Debug for BrokerEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BrokerEndpoint({} vhost {:?} user {:?})", self.address(), self.vhost, self.username)
    }
}

/// The SASL mechanism of `rabbit_login_method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginMethod {
    /// oslo's default: RabbitMQ's legacy `AMQPLAIN`.
    AmqPlain,
    Plain,
    /// The TLS client certificate names the user (RabbitMQ's `rabbitmq_auth_mechanism_ssl`).
    External,
    RabbitCrDemo,
}

/// `kombu_failover_strategy`: which broker is tried next when one fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverStrategy {
    /// kombu's `roundrobin_failover`: the next host of the list, in turn.
    RoundRobin,
    /// kombu's `shufflecycle`: a host drawn at random each time.
    Shuffle,
}

/// `kombu_compression`: how kombu compresses published bodies (`kombu/compression.py`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// `gzip` / `zlib`: zlib's format (RFC 1950), header `compression: application/x-gzip`.
    Zlib,
    /// `bzip2` / `bzip`: header `compression: application/x-bz2`.
    Bzip2,
}

impl Compression {
    /// The `compression` header kombu sets, and reads back on delivery.
    pub fn content_type(self) -> &'static str {
        match self {
            Self::Zlib => "application/x-gzip",
            Self::Bzip2 => "application/x-bz2",
        }
    }

    /// The method a `compression` header names; None for one novasnap cannot decompress.
    pub fn from_content_type(content_type: &str) -> Option<Self> {
        [Self::Zlib, Self::Bzip2].into_iter().find(|c| c.content_type() == content_type)
    }
}

/// The highest TLS version oslo may pin with `ssl_version` that novasnap can speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersions {
    /// Empty or `SSLv23`: whatever both ends support (TLS 1.2 and 1.3 here).
    Negotiated,
    /// `TLSv1_2`.
    Tls12Only,
}

/// `ssl` and its options (`Connection._fetch_ssl_params`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitTls {
    /// `ssl_ca_file`: the only CAs trusted, and the broker's name checked against its
    /// certificate. Without it, the system's CA store, and no name check, as py-amqp's
    /// `_wrap_socket_sni` does when oslo passes no `server_hostname`.
    pub ca_file: Option<PathBuf>,
    /// `ssl_cert_file` and `ssl_key_file`: the client certificate.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub versions: TlsVersions,
}

/// How queues are declared (`Connection.__init__`, `_get_queue_arguments`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueOptions {
    /// `amqp_durable_queues`
    pub durable: bool,
    /// `amqp_auto_delete`
    pub auto_delete: bool,
    /// `rabbit_quorum_queue`: topic queues (and notification queues) are quorum queues.
    pub quorum: bool,
    /// `rabbit_transient_quorum_queue`: reply (and fanout) queues are quorum queues.
    pub transient_quorum: bool,
    /// `rabbit_quorum_delivery_limit`, `rabbit_quorum_max_memory_length`,
    /// `rabbit_quorum_max_memory_bytes` (`x-delivery-limit`, `x-max-in-memory-*`); 0 unset.
    pub quorum_delivery_limit: i64,
    pub quorum_max_memory_length: i64,
    pub quorum_max_memory_bytes: i64,
    /// `rabbit_ha_queues`: `x-ha-policy: all`.
    pub ha: bool,
    /// `rabbit_transient_queues_ttl` in seconds: reply queues' `x-expires`; 0 sets none.
    pub transient_ttl_seconds: i64,
    /// `enable_cancel_on_failover`: consumers ask for `x-cancel-on-ha-failover`.
    pub cancel_on_failover: bool,
}

impl QueueOptions {
    /// oslo's `Connection.durable`: quorum queues are durable whatever
    /// `amqp_durable_queues` says.
    pub fn durable(&self) -> bool {
        self.durable || self.quorum
    }
}

/// When and how often a lost broker is tried again (`Connection.ensure_connection`,
/// `Connection.ensure`, kombu `retry_over_time`).
#[derive(Debug, Clone, PartialEq)]
pub struct ReconnectPolicy {
    /// `rabbit_retry_interval`: the first wait after every broker failed once.
    pub interval_start: Duration,
    /// `rabbit_retry_backoff`: added to the wait after each further round (linear).
    pub interval_step: Duration,
    /// `rabbit_interval_max`: the longest wait.
    pub interval_max: Duration,
    /// `kombu_reconnect_delay`: waited first when an established connection is lost.
    pub reconnect_delay: Duration,
    /// `kombu_reconnect_splay`: at most this much more, drawn at random.
    pub reconnect_splay: Duration,
}

/// One transport: a transport URL and the `[oslo_messaging_rabbit]` options it sees.
#[derive(Debug, Clone)]
pub struct RabbitConfig {
    pub brokers: Vec<BrokerEndpoint>,
    /// `ssl` and the `ssl_*` options; None without TLS.
    pub tls: Option<RabbitTls>,
    /// `rabbit_login_method`
    pub login_method: LoginMethod,
    /// `heartbeat_timeout_threshold`; None (0 or less) disables heartbeats.
    pub heartbeat: Option<Duration>,
    /// `kombu_failover_strategy`
    pub failover: FailoverStrategy,
    pub reconnect: ReconnectPolicy,
    pub queues: QueueOptions,
    /// `kombu_compression`: bodies novasnap publishes are compressed so.
    pub compression: Option<Compression>,
    /// `rabbit_qos_prefetch_count`: the prefetch of oslo's listening connections, which
    /// novasnap applies to its reply queue (0: no `basic.qos`).
    pub qos_prefetch_count: u16,
}

/// A notification driver of `[oslo_messaging_notifications] driver` (stevedore's
/// `oslo.messaging.notify.drivers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotificationDriver {
    /// `messaging`: message format 1.0, no envelope.
    Messaging,
    /// `messagingv2`: the 2.0 envelope.
    MessagingV2,
    /// `log`: each notification logged (`notify/_impl_log.py`).
    Log,
}

/// A transport URL as `TransportURL.parse` splits it.
#[derive(Debug)]
struct TransportUrl {
    hosts: Vec<BrokerEndpoint>,
    query: BTreeMap<String, String>,
}

/// Reads `transport_url` (its section and key given for errors) and the
/// `[oslo_messaging_rabbit]` options it overrides.
pub(super) fn rabbit_config(r: &Reader, section: &str, key: &str, url: &str) -> Result<RabbitConfig, ConfigError> {
    let parsed = parse_transport_url(url).map_err(|reason| r.invalid(section, key, url, reason))?;
    let o = RabbitOptions { r, query: &parsed.query, section, key };
    for name in parsed.query.keys() {
        if !RABBIT_OPTIONS.contains(&name.as_str()) {
            return Err(r.invalid(
                section,
                key,
                url,
                format!("query parameter {name:?} is not an [{RABBIT}] option (oslo.messaging refuses it too)"),
            ));
        }
    }

    let quorum: bool = o.get("rabbit_quorum_queue", false)?;
    let ha: bool = o.get("rabbit_ha_queues", false)?;
    if quorum && ha {
        // `_get_queue_arguments` raises the same at the first declare.
        return Err(o.invalid("rabbit_ha_queues", "true", "rabbit_quorum_queue and rabbit_ha_queues are both enabled"));
    }
    let transient_quorum: bool = o.get("rabbit_transient_quorum_queue", false)?;
    let qos: i64 = o.get("rabbit_qos_prefetch_count", 0)?;
    if o.get("rabbit_stream_fanout", false)? {
        // `Connection.__init__` refuses these combinations.
        if qos <= 0 {
            return Err(o.invalid("rabbit_stream_fanout", "true", "needs rabbit_qos_prefetch_count above 0"));
        }
        if !transient_quorum {
            return Err(o.invalid("rabbit_stream_fanout", "true", "needs rabbit_transient_quorum_queue = true"));
        }
    }
    let transient_ttl_seconds: i64 = o.get("rabbit_transient_queues_ttl", 1800)?;
    if transient_ttl_seconds < 0 {
        return Err(o.invalid("rabbit_transient_queues_ttl", &transient_ttl_seconds.to_string(), "must be at least 0"));
    }
    let queues = QueueOptions {
        durable: o.get("amqp_durable_queues", false)?,
        auto_delete: o.get("amqp_auto_delete", false)?,
        quorum,
        transient_quorum,
        quorum_delivery_limit: o.get("rabbit_quorum_delivery_limit", 0)?,
        quorum_max_memory_length: o.get("rabbit_quorum_max_memory_length", 0)?,
        quorum_max_memory_bytes: o.get("rabbit_quorum_max_memory_bytes", 0)?,
        ha,
        transient_ttl_seconds,
        cancel_on_failover: o.get("enable_cancel_on_failover", false)?,
    };

    let heartbeat: i64 = o.get("heartbeat_timeout_threshold", 60)?;
    // Read for its type only: lapin sends a heartbeat every half of the negotiated timeout
    // whatever oslo's rate of checks (see the README).
    let _: i64 = o.get("heartbeat_rate", 3)?;
    // `_heartbeat_supported_and_enabled`: 0 or less turns heartbeats off.
    let heartbeat = match u16::try_from(heartbeat) {
        Ok(seconds) => Some(Duration::from_secs(seconds.into())).filter(|d| !d.is_zero()),
        Err(_) if heartbeat < 0 => None,
        Err(_) => {
            return Err(o.invalid("heartbeat_timeout_threshold", &heartbeat.to_string(), "at most 65535 seconds"))
        }
    };

    let login_method = match o.get::<String>("rabbit_login_method", "AMQPLAIN".into())?.as_str() {
        "AMQPLAIN" => LoginMethod::AmqPlain,
        "PLAIN" => LoginMethod::Plain,
        "EXTERNAL" => LoginMethod::External,
        "RABBIT-CR-DEMO" => LoginMethod::RabbitCrDemo,
        other => {
            return Err(o.invalid("rabbit_login_method", other, "expected PLAIN, AMQPLAIN, EXTERNAL or RABBIT-CR-DEMO"))
        }
    };
    let failover = match o.get::<String>("kombu_failover_strategy", "round-robin".into())?.as_str() {
        "round-robin" => FailoverStrategy::RoundRobin,
        "shuffle" => FailoverStrategy::Shuffle,
        other => return Err(o.invalid("kombu_failover_strategy", other, "expected round-robin or shuffle")),
    };
    let compression = match o.get::<String>("kombu_compression", String::new())?.as_str() {
        "" => None,
        // kombu's names and aliases (`kombu.compression._aliases`).
        "gzip" | "zlib" | "application/x-gzip" => Some(Compression::Zlib),
        "bzip2" | "bzip" | "application/x-bz2" => Some(Compression::Bzip2),
        "bz2" => {
            // oslo.messaging's help names it, but kombu 5.7 knows no such alias: oslo then
            // fails every publish ("Unable to connect to AMQP server ... 'bz2'").
            return Err(o.invalid(
                "kombu_compression",
                "bz2",
                "kombu knows bz2 as bzip2 (or bzip); bz2 fails every publish",
            ));
        }
        other => {
            return Err(o.invalid(
                "kombu_compression",
                other,
                "novasnap compresses with gzip (zlib) or bzip2 only; lzma, brotli and zstd are not supported",
            ))
        }
    };

    let reconnect = ReconnectPolicy {
        interval_start: o.whole_seconds("rabbit_retry_interval", 1, 1)?,
        interval_step: o.whole_seconds("rabbit_retry_backoff", 2, 0)?,
        interval_max: o.whole_seconds("rabbit_interval_max", 30, 1)?,
        reconnect_delay: o.bounded_seconds("kombu_reconnect_delay", 1.0, 4.5)?,
        reconnect_splay: o.bounded_seconds("kombu_reconnect_splay", 0.0, f64::MAX)?,
    };

    let tls = if o.get("ssl", false)? {
        let versions = match o.get::<String>("ssl_version", String::new())?.to_ascii_lowercase().as_str() {
            "" | "sslv23" => TlsVersions::Negotiated,
            "tlsv1_2" => TlsVersions::Tls12Only,
            other @ ("tlsv1" | "tlsv1_1") => {
                return Err(o.invalid(
                    "ssl_version",
                    other,
                    "TLS 1.0 and 1.1 are not supported (rustls speaks 1.2 and 1.3)",
                ))
            }
            // `validate_ssl_version`: "Invalid SSL version".
            other => return Err(o.invalid("ssl_version", other, "expected TLSv1_2 or SSLv23")),
        };
        let path = |name: &str| -> Result<Option<PathBuf>, ConfigError> {
            Ok(Some(o.get::<String>(name, String::new())?).filter(|p| !p.is_empty()).map(PathBuf::from))
        };
        Some(RabbitTls {
            ca_file: path("ssl_ca_file")?,
            cert_file: path("ssl_cert_file")?,
            key_file: path("ssl_key_file")?,
            versions,
        })
    } else {
        None
    };
    // Deprecated and without effect in oslo.messaging 18.3.1; read for their type only.
    let _: bool = o.get("ssl_enforce_fips_mode", false)?;
    let _: bool = o.get("ssl_enforce_hostname_verification", true)?;
    if tls.is_none() && login_method == LoginMethod::External {
        return Err(o.invalid("rabbit_login_method", "EXTERNAL", "EXTERNAL needs ssl = true and a client certificate"));
    }

    Ok(RabbitConfig {
        brokers: parsed.hosts,
        tls,
        login_method,
        heartbeat,
        failover,
        reconnect,
        queues,
        compression,
        qos_prefetch_count: u16::try_from(qos.max(0))
            .map_err(|_| o.invalid("rabbit_qos_prefetch_count", &qos.to_string(), "at most 65535"))?,
    })
}

/// `[oslo_messaging_notifications] driver`, every line of it (a MultiStrOpt), each line
/// possibly a comma-free name. Empty: notifications off, as oslo's `Notifier.is_enabled`.
pub(super) fn notification_drivers(r: &Reader) -> Result<Vec<NotificationDriver>, ConfigError> {
    const SECTION: &str = "oslo_messaging_notifications";
    let mut drivers = Vec::new();
    for name in r.multi(SECTION, "driver", &[])? {
        let driver = match name.as_str() {
            "messaging" => NotificationDriver::Messaging,
            "messagingv2" => NotificationDriver::MessagingV2,
            "log" => NotificationDriver::Log,
            // `noop` sends nothing; `test` keeps notifications in the Python process's memory.
            "noop" | "test" | "" => continue,
            "routing" => {
                return Err(r.invalid(
                    SECTION,
                    "driver",
                    &name,
                    "the routing driver (routing_config YAML) is not supported: list the drivers themselves".into(),
                ))
            }
            other => {
                return Err(r.invalid(
                    SECTION,
                    "driver",
                    other,
                    "expected messaging, messagingv2, log, noop or test".into(),
                ))
            }
        };
        if !drivers.contains(&driver) {
            drivers.push(driver);
        }
    }
    Ok(drivers)
}

/// `[oslo_messaging_rabbit]` as one transport sees it: its URL's query first.
struct RabbitOptions<'a> {
    r: &'a Reader<'a>,
    query: &'a BTreeMap<String, String>,
    /// Where the transport URL was read, for errors about its query.
    section: &'a str,
    key: &'a str,
}

impl RabbitOptions<'_> {
    fn get<T: ConfigValue>(&self, name: &str, default: T) -> Result<T, ConfigError> {
        match self.query.get(name) {
            Some(value) => {
                let declared = declared::declared(RABBIT, name).unwrap_or_default();
                let read = convert(declared.kind.unwrap_or(T::KIND), value, &declared).and_then(|v| T::from_value(&v));
                read.map_err(|reason| {
                    self.r.invalid(
                        self.section,
                        self.key,
                        &format!("?{name}={value}"),
                        format!("query parameter {name}: {reason}"),
                    )
                })
            }
            None => self.r.parse(RABBIT, name, default),
        }
    }

    /// Where `name` was set, for an error about its value.
    fn invalid(&self, name: &str, value: &str, reason: &str) -> ConfigError {
        match self.query.contains_key(name) {
            true => self.r.invalid(self.section, self.key, &format!("?{name}={value}"), reason.into()),
            false => self.r.invalid(RABBIT, name, value, reason.into()),
        }
    }

    /// An IntOpt of seconds with oslo's `min`.
    fn whole_seconds(&self, name: &str, default: i64, min: i64) -> Result<Duration, ConfigError> {
        let value: i64 = self.get(name, default)?;
        if value < min {
            return Err(self.invalid(name, &value.to_string(), &format!("must be at least {min}")));
        }
        Ok(Duration::from_secs(value as u64))
    }

    /// A FloatOpt of seconds with oslo's `min` 0 and `max`.
    fn bounded_seconds(&self, name: &str, default: f64, max: f64) -> Result<Duration, ConfigError> {
        let value: f64 = self.get(name, default)?;
        if !(0.0..=max).contains(&value) {
            return Err(self.invalid(name, &value.to_string(), &format!("must be between 0 and {max}")));
        }
        Ok(Duration::from_secs_f64(value))
    }
}

/// Splits a transport URL as oslo's `TransportURL.parse` does, then as the rabbit driver
/// turns each host into kombu's URL (`Connection._transform_transport_url`): `rabbit://`
/// (or its alias `kombu://`) only; hosts separated by commas, each with its own
/// credentials (none: kombu's `guest`/`guest`), IPv6 in brackets, port 5672 by default
/// (with TLS too); no host at all means `localhost`; the vhost percent-decoded (by oslo,
/// then once more by kombu), `/` when empty; the query kept for the options it overrides.
fn parse_transport_url(url: &str) -> Result<TransportUrl, String> {
    let (scheme, rest) = url.split_once("://").ok_or("no scheme: expected rabbit://")?;
    if !matches!(scheme, "rabbit" | "kombu") {
        return Err(format!("the {scheme:?} driver is not supported: novasnap speaks rabbit:// only"));
    }
    let rest = rest.split('#').next().unwrap_or_default();
    let (rest, query_text) = rest.split_once('?').unwrap_or((rest, ""));
    let (netloc, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let decode = |s: &str| percent_decode_str(s).decode_utf8().map(|c| c.into_owned()).map_err(|e| e.to_string());
    let vhost = match path.strip_prefix('/') {
        Some(v) if !v.is_empty() => decode(&decode(v)?)?,
        _ => "/".to_string(),
    };
    let mut query = BTreeMap::new();
    for (key, value) in url::form_urlencoded::parse(query_text.as_bytes()) {
        // `parse_qs` drops blank values and joins a repeated key's values with commas.
        if value.is_empty() {
            continue;
        }
        query
            .entry(key.into_owned())
            .and_modify(|v: &mut String| *v = format!("{v},{value}"))
            .or_insert(value.into_owned());
    }
    let mut hosts = Vec::new();
    for host in netloc.split(',').filter(|h| !h.is_empty()) {
        let (credentials, hostport) = match host.rsplit_once('@') {
            Some((c, h)) => (Some(c), h),
            None => (None, host),
        };
        let (username, password) = match credentials.map(|c| c.split_once(':').unwrap_or((c, ""))) {
            Some((u, p)) if !u.is_empty() => (decode(u)?, decode(p)?),
            _ => ("guest".to_string(), "guest".to_string()),
        };
        let (hostname, port) = split_host_port(hostport)?;
        hosts.push(BrokerEndpoint {
            host: if hostname.is_empty() { "localhost".into() } else { hostname },
            port: port.unwrap_or(5672),
            username,
            password,
            vhost: vhost.clone(),
        });
    }
    if hosts.is_empty() {
        hosts.push(BrokerEndpoint {
            host: "localhost".into(),
            port: 5672,
            username: "guest".into(),
            password: "guest".into(),
            vhost,
        });
    }
    Ok(TransportUrl { hosts, query })
}

/// `oslo_utils.netutils.parse_host_port`: `host`, `host:port`, `[v6]`, `[v6]:port`, or a
/// bare IPv6 address (no port).
fn split_host_port(text: &str) -> Result<(String, Option<u16>), String> {
    let port = |p: &str| p.parse::<u16>().map(Some).map_err(|_| format!("bad port {p:?} in {text:?}"));
    if let Some(rest) = text.strip_prefix('[') {
        let (host, after) = rest.split_once(']').ok_or_else(|| format!("unclosed [ in {text:?}"))?;
        return match after.strip_prefix(':') {
            Some(p) => Ok((host.to_string(), port(p)?)),
            None if after.is_empty() => Ok((host.to_string(), None)),
            None => Err(format!("unexpected {after:?} after ] in {text:?}")),
        };
    }
    match text.matches(':').count() {
        0 => Ok((text.to_string(), None)),
        1 => {
            let (host, p) = text.split_once(':').expect("one colon");
            Ok((host.to_string(), port(p)?))
        }
        _ => Ok((text.to_string(), None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(url: &str) -> Vec<(String, u16, String, String, String)> {
        parse_transport_url(url)
            .unwrap()
            .hosts
            .into_iter()
            .map(|b| (b.host, b.port, b.username, b.password, b.vhost))
            .collect()
    }

    fn h(host: &str, port: u16, user: &str, password: &str, vhost: &str) -> (String, u16, String, String, String) {
        (host.into(), port, user.into(), password.into(), vhost.into())
    }

    #[test]
    fn hosts_as_oslo_splits_them() {
        assert_eq!(
            hosts("rabbit://nova:s%40c@10.0.0.1:5671,other:pw@10.0.0.2/nova"),
            [h("10.0.0.1", 5671, "nova", "s@c", "nova"), h("10.0.0.2", 5672, "other", "pw", "nova")]
        );
        // A host without credentials gets kombu's defaults, not its neighbour's.
        assert_eq!(hosts("rabbit://u:p@a,b/")[1], h("b", 5672, "guest", "guest", "/"));
        assert_eq!(hosts("rabbit://")[0], h("localhost", 5672, "guest", "guest", "/"));
        assert_eq!(hosts("kombu://u:p@[::1]:5673/%2F")[0], h("::1", 5673, "u", "p", "/"));
        assert_eq!(hosts("rabbit://u:p@[fd00::5]/")[0], h("fd00::5", 5672, "u", "p", "/"));
        assert_eq!(hosts("rabbit://u:p@h/v%252Fx")[0].4, "v/x", "oslo and kombu each decode once");
    }

    #[test]
    fn the_query_is_kept_for_the_options_it_overrides() {
        let url = parse_transport_url("rabbit://u:p@h:5671/?ssl=1&ssl_ca_file=/etc/ca.pem&empty=").unwrap();
        assert_eq!(url.query.get("ssl").map(String::as_str), Some("1"));
        assert_eq!(url.query.get("ssl_ca_file").map(String::as_str), Some("/etc/ca.pem"));
        assert!(!url.query.contains_key("empty"), "parse_qs drops blank values");
    }

    #[test]
    fn other_drivers_and_bad_ports_are_refused() {
        assert!(parse_transport_url("kafka://h:9092").unwrap_err().contains("kafka"));
        assert!(parse_transport_url("amqp://h").unwrap_err().contains("amqp"));
        assert!(parse_transport_url("rabbit://h:huge/").unwrap_err().contains("port"));
        assert!(parse_transport_url("rabbit://[::1/").unwrap_err().contains("["));
    }
}

#[cfg(test)]
mod options {
    use super::*;
    use crate::config::Config;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_text(text)
    }

    fn error(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn oslo_s_defaults() {
        let t = load("").unwrap().messaging.transport;
        assert_eq!(t.brokers[0].address(), "localhost:5672");
        assert_eq!(t.tls, None);
        assert_eq!(t.login_method, LoginMethod::AmqPlain);
        assert_eq!(t.heartbeat, Some(Duration::from_secs(60)));
        assert_eq!(t.failover, FailoverStrategy::RoundRobin);
        assert_eq!(t.compression, None);
        assert_eq!(t.qos_prefetch_count, 0);
        assert_eq!(t.queues.transient_ttl_seconds, 1800);
        assert!(!t.queues.durable() && !t.queues.quorum && !t.queues.ha);
        let r = &t.reconnect;
        assert_eq!((r.interval_start, r.interval_step, r.interval_max), (secs(1), secs(2), secs(30)));
        assert_eq!((r.reconnect_delay, r.reconnect_splay), (secs(1), secs(0)));
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn the_url_s_query_overrides_the_section() {
        let c = load(
            "[DEFAULT]\ntransport_url = rabbit://u:p@[::1]:5671/?ssl=1&ssl_ca_file=/q/ca.pem&heartbeat_timeout_threshold=0\n\
             [oslo_messaging_rabbit]\nssl = false\nssl_ca_file = /s/ca.pem\nssl_cert_file = /s/c.pem\n\
             ssl_key_file = /s/k.pem\nssl_version = TLSv1_2\nrabbit_quorum_queue = true\n\
             rabbit_quorum_delivery_limit = 5\nkombu_compression = bzip2\nkombu_failover_strategy = shuffle\n\
             rabbit_login_method = PLAIN\nrabbit_retry_backoff = 0\nkombu_reconnect_delay = 0.5\n",
        )
        .unwrap();
        let t = c.messaging.transport;
        let tls = t.tls.expect("?ssl=1 wins over ssl = false");
        assert_eq!(tls.ca_file, Some(PathBuf::from("/q/ca.pem")));
        assert_eq!(tls.cert_file, Some(PathBuf::from("/s/c.pem")));
        assert_eq!(tls.versions, TlsVersions::Tls12Only);
        assert_eq!(t.heartbeat, None, "heartbeat_timeout_threshold=0 means no heartbeats");
        assert_eq!(t.brokers[0].address(), "[::1]:5671");
        assert!(t.queues.quorum && t.queues.durable() && t.queues.quorum_delivery_limit == 5);
        assert_eq!(t.compression, Some(Compression::Bzip2));
        assert_eq!((t.failover, t.login_method), (FailoverStrategy::Shuffle, LoginMethod::Plain));
        assert_eq!(t.reconnect.interval_step, Duration::ZERO);
        assert_eq!(t.reconnect.reconnect_delay, Duration::from_millis(500));
    }

    #[test]
    fn notifications_have_their_own_transport_drivers_and_retry() {
        let c = load(
            "[DEFAULT]\ntransport_url = rabbit://u:p@rpc:5672/\n\
             [oslo_messaging_notifications]\ntransport_url = rabbit://n:q@notify:5671/?amqp_durable_queues=true\n\
             driver = messagingv2\ndriver = log\ndriver = noop\nretry = 3\n",
        )
        .unwrap();
        let n = &c.notifications;
        assert_eq!(n.drivers, [NotificationDriver::MessagingV2, NotificationDriver::Log]);
        assert_eq!(n.transport.brokers[0].host, "notify");
        assert!(
            n.transport.queues.durable && !c.messaging.transport.queues.durable,
            "the query is its transport's own"
        );
        assert_eq!(n.retry, Some(3));
        let c = load("[DEFAULT]\ntransport_url = rabbit://u:p@rpc:5672/\n").unwrap();
        assert_eq!(c.notifications.transport.brokers[0].host, "rpc");
        assert_eq!(c.notifications.retry, None, "oslo's -1: until published");
        assert!(c.notifications.drivers.is_empty());
    }

    #[test]
    fn what_novasnap_cannot_honour_is_refused_naming_the_option() {
        let cases = [
            ("[DEFAULT]\ntransport_url = rabbit://h/?nonsense=1\n", "[DEFAULT] transport_url"),
            ("[DEFAULT]\ntransport_url = rabbit://h/?ssl=maybe\n", "query parameter ssl"),
            ("[oslo_messaging_rabbit]\nssl = true\nssl_version = TLSv1\n", "[oslo_messaging_rabbit] ssl_version"),
            ("[oslo_messaging_rabbit]\nssl = true\nssl_version = SSLv3\n", "[oslo_messaging_rabbit] ssl_version"),
            ("[oslo_messaging_rabbit]\nkombu_compression = lzma\n", "[oslo_messaging_rabbit] kombu_compression"),
            ("[oslo_messaging_rabbit]\nkombu_compression = bz2\n", "[oslo_messaging_rabbit] kombu_compression"),
            ("[oslo_messaging_rabbit]\nrabbit_login_method = KERBEROS\n", "rabbit_login_method"),
            ("[oslo_messaging_rabbit]\nrabbit_login_method = EXTERNAL\n", "rabbit_login_method"),
            ("[oslo_messaging_rabbit]\nkombu_failover_strategy = random\n", "kombu_failover_strategy"),
            ("[oslo_messaging_rabbit]\nrabbit_quorum_queue = true\nrabbit_ha_queues = true\n", "rabbit_ha_queues"),
            ("[oslo_messaging_rabbit]\nrabbit_stream_fanout = true\n", "rabbit_stream_fanout"),
            ("[oslo_messaging_rabbit]\nrabbit_transient_queues_ttl = -1\n", "rabbit_transient_queues_ttl"),
            ("[oslo_messaging_rabbit]\nrabbit_transient_queues_ttl = 1.5\n", "rabbit_transient_queues_ttl"),
            ("[oslo_messaging_rabbit]\nrabbit_retry_interval = 0\n", "rabbit_retry_interval"),
            ("[oslo_messaging_rabbit]\nkombu_reconnect_delay = 5\n", "kombu_reconnect_delay"),
            ("[oslo_messaging_notifications]\ndriver = routing\n", "[oslo_messaging_notifications] driver"),
            ("[oslo_messaging_notifications]\ndriver = kafka\n", "[oslo_messaging_notifications] driver"),
            (
                "[oslo_messaging_notifications]\ntransport_url = kafka://k:9092\n",
                "[oslo_messaging_notifications] transport_url",
            ),
        ];
        for (text, expected) in cases {
            let err = error(text);
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn transient_ttl_0_declares_no_expiry_and_deprecated_ssl_options_are_accepted() {
        let c = load(
            "[oslo_messaging_rabbit]\nrabbit_transient_queues_ttl = 0\nssl_enforce_fips_mode = true\n\
             ssl_enforce_hostname_verification = false\ndirect_mandatory_flag = false\nheartbeat_rate = 2\n",
        )
        .unwrap();
        assert_eq!(c.messaging.transport.queues.transient_ttl_seconds, 0);
    }
}
