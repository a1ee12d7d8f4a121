//! What `check-config` shows: each option novasnap uses as `[section] option = value`, where
//! the value came from, and the options the files set that novasnap ignores.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{json, Value as Json};

use super::declared::Kind;
use super::oslo::{Namespace, Origin, Value};

/// One option as novasnap read it.
#[derive(Debug, Clone)]
pub struct Setting {
    pub section: String,
    pub option: String,
    pub kind: Kind,
    pub value: Value,
    pub default: Value,
    /// Where the value was written; empty for the default. A multi-valued option has one
    /// per value.
    pub origins: Vec<Origin>,
    /// Declared `secret` upstream: shown hidden unless asked.
    pub secret: bool,
    /// The values a string option takes, when it takes only some.
    pub choices: &'static [&'static str],
}

#[derive(Debug, Clone)]
pub struct Report {
    /// The files read, in order.
    pub files: Vec<PathBuf>,
    /// Each option once, by section.
    pub settings: Vec<Setting>,
    /// Section → key → where it is (first) set, for what the files set and novasnap ignores.
    pub unused: BTreeMap<String, BTreeMap<String, Origin>>,
}

impl Report {
    pub fn new(namespace: &Namespace, settings: Vec<Setting>, looked_up: &HashSet<(String, String)>) -> Self {
        let mut seen = HashSet::new();
        let mut settings: Vec<Setting> =
            settings.into_iter().filter(|s| seen.insert((s.section.clone(), s.option.clone()))).collect();
        // By section, [DEFAULT] first, as nova.conf is laid out; read order within one.
        settings.sort_by_key(|s| (s.section != "DEFAULT", s.section.clone()));
        Self {
            files: namespace.files.iter().map(|f| f.path.clone()).collect(),
            settings,
            unused: namespace.unused(looked_up),
        }
    }

    pub fn text(&self, show_secrets: bool) -> String {
        let mut out = String::new();
        if self.files.is_empty() {
            out.push_str("No configuration file found: every option has its default.\n");
        } else {
            out.push_str("Files read, in this order (a later one overrides an earlier one):\n");
            for file in &self.files {
                let _ = writeln!(out, "  {}", file.display());
            }
        }
        out.push_str("\nOptions novasnap uses:\n");
        for s in &self.settings {
            let value = display(&shown(s, &s.value, show_secrets));
            let _ = writeln!(out, "  [{}] {} = {value}  ({})", s.section, s.option, origins(s));
        }
        if !self.unused.is_empty() {
            let count: usize = self.unused.values().map(BTreeMap::len).sum();
            let _ = writeln!(out, "\nOptions set that novasnap does not use ({count}; novasnap ignores them):");
            for (section, keys) in &self.unused {
                let keys: Vec<&str> = keys.keys().map(String::as_str).collect();
                let _ = writeln!(out, "  [{section}] {}", keys.join(", "));
            }
        }
        out
    }

    pub fn json(&self, show_secrets: bool) -> Json {
        let options: Vec<Json> = self
            .settings
            .iter()
            .map(|s| {
                json!({
                    "section": s.section,
                    "option": s.option,
                    "type": s.kind.name(),
                    "value": to_json(&shown(s, &s.value, show_secrets)),
                    "default": to_json(&shown(s, &s.default, show_secrets)),
                    "sources": s.origins.iter().map(origin_json).collect::<Vec<_>>(),
                    "secret": s.secret,
                    "choices": s.choices,
                })
            })
            .collect();
        let unused: Vec<Json> = self
            .unused
            .iter()
            .flat_map(|(section, keys)| {
                keys.iter().map(move |(key, origin)| {
                    let mut entry = origin_json(origin);
                    entry["section"] = json!(section);
                    entry["option"] = json!(key);
                    entry
                })
            })
            .collect();
        json!({ "files": self.files, "options": options, "unused": unused })
    }
}

/// A secret's value hidden: the password of each host of a URL (`transport_url`), or all of it.
fn shown(setting: &Setting, value: &Value, show_secrets: bool) -> Value {
    match value {
        Value::Str(s) if setting.secret && !show_secrets && !s.is_empty() => Value::Str(hide_secret(s)),
        other => other.clone(),
    }
}

fn hide_secret(value: &str) -> String {
    let Some((scheme, rest)) = value.split_once("://") else { return "***".into() };
    let (hosts, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    let hosts: Vec<String> = hosts
        .split(',')
        .map(|host| match host.rsplit_once('@') {
            Some((userinfo, hostport)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
                format!("{user}:***@{hostport}")
            }
            None => host.to_string(),
        })
        .collect();
    format!("{scheme}://{}{path}", hosts.join(","))
}

fn display(value: &Value) -> String {
    match value {
        Value::None => "(none)".into(),
        Value::Str(s) if s.is_empty() || s.trim() != s || s.contains('\n') => format!("{s:?}"),
        Value::Str(s) => s.clone(),
        Value::Bool(b) => b.to_string(),
        Value::List(items) if items.is_empty() => "(empty)".into(),
        Value::List(items) => items.join(", "),
        number => number.to_python_str(),
    }
}

fn origins(setting: &Setting) -> String {
    if setting.origins.is_empty() {
        return "default".into();
    }
    let shown: Vec<String> = setting
        .origins
        .iter()
        .map(|origin| match origin {
            Origin::File { section, key, .. }
                if *key != setting.option || *section != super::oslo::normalize_section(&setting.section) =>
            {
                format!("{origin}, as [{section}] {key}")
            }
            origin => origin.to_string(),
        })
        .collect();
    shown.join("; ")
}

fn to_json(value: &Value) -> Json {
    match value {
        Value::None => Json::Null,
        Value::Str(s) => json!(s),
        Value::Bool(b) => json!(b),
        Value::Int(i) => json!(i),
        Value::Float(f) if f.is_finite() => json!(f),
        Value::Float(f) => json!(Value::Float(*f).to_python_str()),
        Value::List(items) => json!(items),
    }
}

fn origin_json(origin: &Origin) -> Json {
    match origin {
        Origin::File { path, line, section, key } => {
            json!({ "file": path, "line": line, "written_as": format!("[{section}] {key}") })
        }
        Origin::Environment(variable) => json!({ "environment": variable }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_all_but_their_passwords() {
        assert_eq!(
            hide_secret("rabbit://nova:s3cret@10.0.0.1:5672,nova:p@ss@[::1]:5672/nova?ssl=1"),
            "rabbit://nova:***@10.0.0.1:5672,nova:***@[::1]:5672/nova?ssl=1"
        );
        assert_eq!(hide_secret("rabbit://h1:5672/"), "rabbit://h1:5672/");
        assert_eq!(hide_secret("plain password"), "***");
    }
}
