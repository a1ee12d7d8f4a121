//! What Nova, oslo.messaging, oslo.log and keystoneauth declare about the options novasnap
//! reads, beyond what the reading method says: a type other than the obvious one, the
//! values allowed, the deprecated names still honoured, whether the value is secret.
//! Checked against the real declarations by `tests/config_oslo.rs` (nova 34,
//! oslo.messaging 18.3, oslo.log 8.3, keystoneauth 5.18).
//!
//! Not here because upstream dropped them: `[DEFAULT] notification_driver`,
//! `notification_topics` and the `[DEFAULT] rabbit_*` names (oslo.messaging removed those
//! deprecated names); oslo.config ignores them, and so does novasnap.

/// How oslo converts a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Str,
    Bool,
    Int,
    Float,
    List,
    /// `MultiStrOpt`: every line in every file adds a value.
    Multi,
    /// `HostDomainOpt`.
    HostDomain,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Str => "string",
            Kind::Bool => "boolean",
            Kind::Int => "integer",
            Kind::Float => "float",
            Kind::List => "list",
            Kind::Multi => "multi",
            Kind::HostDomain => "hostdomain",
        }
    }
}

/// An upstream option's declaration, as far as it changes how novasnap reads it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Declared {
    pub kind: Option<Kind>,
    /// `deprecated_opts` / `deprecated_name` / `deprecated_group`: (group, name), `None`
    /// meaning the option's own group.
    pub deprecated: &'static [(Option<&'static str>, &'static str)],
    /// `choices` of a `StrOpt`.
    pub choices: &'static [&'static str],
    /// `min` of an `IntOpt`.
    pub min: Option<i64>,
    pub secret: bool,
}

const NONE: Declared = Declared { kind: None, deprecated: &[], choices: &[], min: None, secret: false };

/// The declaration of `[group] name`, or `None` for novasnap's own options.
pub fn declared(group: &str, name: &str) -> Option<Declared> {
    let d = match (group, name) {
        // nova/conf/netconf.py
        ("DEFAULT", "host") => Declared { kind: Some(Kind::HostDomain), ..NONE },
        // oslo_messaging/transport.py, rpc/client.py
        ("DEFAULT", "transport_url") => Declared { secret: true, ..NONE },
        ("DEFAULT", "rpc_response_timeout") => Declared { kind: Some(Kind::Int), ..NONE },
        // oslo_messaging/_drivers/impl_rabbit.py
        ("oslo_messaging_rabbit", "heartbeat_timeout_threshold") => Declared { kind: Some(Kind::Int), ..NONE },
        ("oslo_messaging_rabbit", "rabbit_transient_queues_ttl") => {
            Declared { kind: Some(Kind::Int), min: Some(0), ..NONE }
        }
        ("oslo_messaging_rabbit", "kombu_failover_strategy") => {
            Declared { choices: &["round-robin", "shuffle"], ..NONE }
        }
        ("oslo_messaging_rabbit", "rabbit_login_method") => {
            Declared { choices: &["PLAIN", "AMQPLAIN", "EXTERNAL", "RABBIT-CR-DEMO"], ..NONE }
        }
        ("oslo_messaging_rabbit", "rabbit_retry_interval" | "rabbit_interval_max") => {
            Declared { kind: Some(Kind::Int), min: Some(1), ..NONE }
        }
        ("oslo_messaging_rabbit", "kombu_missing_consumer_retry_timeout") => {
            Declared { kind: Some(Kind::Int), deprecated: &[(None, "kombu_reconnect_timeout")], ..NONE }
        }
        ("oslo_messaging_notifications", "retry") => Declared { kind: Some(Kind::Int), ..NONE },
        // oslo_messaging/notify/notifier.py
        ("oslo_messaging_notifications", "driver") => Declared { kind: Some(Kind::Multi), ..NONE },
        ("oslo_messaging_notifications", "transport_url") => Declared { secret: true, ..NONE },
        // nova/conf/notifications.py
        ("notifications", "notification_format") => Declared {
            deprecated: &[(Some("DEFAULT"), "notification_format")],
            choices: &["both", "versioned", "unversioned"],
            ..NONE
        },
        // nova/conf/libvirt.py
        ("libvirt", "images_type") => {
            Declared { choices: &["raw", "flat", "qcow2", "lvm", "rbd", "ploop", "default"], ..NONE }
        }
        ("libvirt", "snapshot_image_format") => Declared { choices: &["raw", "qcow2", "vmdk", "vdi"], ..NONE },
        // nova/conf/glance.py: deprecated_ksa_opts of register_session_conf_options
        ("glance", "cafile") => Declared { deprecated: &[(Some("ssl"), "ca_file")], ..NONE },
        ("glance", "certfile") => Declared { deprecated: &[(Some("ssl"), "cert_file")], ..NONE },
        ("glance", "keyfile") => Declared { deprecated: &[(Some("ssl"), "key_file")], ..NONE },
        ("glance", "insecure") => Declared { deprecated: &[(None, "api_insecure")], ..NONE },
        // novasnap's own, with choices
        ("novasnap", "image_layout") => Declared { choices: &["flattened", "on_base"], ..NONE },
        // oslo_log/_options.py
        ("DEFAULT", "log_file") => Declared { deprecated: &[(None, "logfile")], ..NONE },
        ("DEFAULT", "log_dir") => Declared { deprecated: &[(None, "logdir")], ..NONE },
        _ => return None,
    };
    Some(d)
}

/// keystoneauth's auth options (`loading/conf.py` and the password plugin's), in whichever
/// section they are read from.
pub fn keystoneauth(name: &str) -> Option<Declared> {
    let d = match name {
        "auth_type" => Declared { deprecated: &[(None, "auth_plugin")], ..NONE },
        "password" => Declared { secret: true, ..NONE },
        "username" => Declared { deprecated: &[(None, "user-name"), (None, "user_name")], ..NONE },
        "project_id" => Declared { deprecated: &[(None, "tenant-id"), (None, "tenant_id")], ..NONE },
        "project_name" => Declared { deprecated: &[(None, "tenant-name"), (None, "tenant_name")], ..NONE },
        _ => return None,
    };
    Some(d)
}
