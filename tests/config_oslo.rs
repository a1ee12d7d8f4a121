//! novasnap reads configuration as oslo.config does: generated configurations (repeated
//! sections and keys, MultiStrOpt lines, `$var` / `${var}` / `$$` / `\$`, backslashes,
//! quotes, continuation lines, comments, empty values, section-name case, deprecated names,
//! unknown options, several `--config-file`s and a `--config-dir`, Nova's default files,
//! `OS_<GROUP>__<OPTION>` variables) read by oslo.config with Nova's, oslo.messaging's,
//! oslo.log's and keystoneauth's real options (`tests/peer/oslo_config_values.py`, in the
//! stack's peer venv) and by `novasnap check-config --format json` give the same value for
//! every option novasnap reads, or fail alike. `CONFIG_CASES` cases (default 256).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use serde_json::{json, Value};

/// The oslo.config peer, started once and asked one line at a time.
struct Peer {
    _child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn ask(&mut self, request: &Value) -> Value {
        writeln!(self.stdin, "{request}").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("peer answered {line:?}: {e}"))
    }
}

fn peer() -> &'static Mutex<Peer> {
    static PEER: OnceLock<Mutex<Peer>> = OnceLock::new();
    PEER.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peer/oslo_config_values.py");
        let mut child = Command::new(common::env("NOVASNAP_PEER_PYTHON"))
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let (stdin, stdout) = (child.stdin.take().unwrap(), BufReader::new(child.stdout.take().unwrap()));
        Mutex::new(Peer { _child: child, stdin, stdout })
    })
}

/// Complete credentials in the sections novasnap authenticates from (and one an
/// `auth_section` may name), the two options whose defaults novasnap does not take from
/// Nova (`state_path`: Nova's is where its Python code lives; `transport_url`), and `my_ip`,
/// a Nova option novasnap does not read, for `$my_ip`.
const BASE: &str = "[DEFAULT]\nstate_path = /var/lib/nova-test\n\
    transport_url = rabbit://nova:s3cret@10.0.0.1:5672/\nmy_ip = 10.0.0.9\n\
    [service_user]\nauth_type = password\nauth_url = http://k:5000/v3\nusername = nova\npassword = pw\n\
    user_domain_name = Default\nproject_name = service\nproject_domain_name = Default\n\
    [novasnap_service_user]\nauth_type = v3password\nauth_url = http://k:5000/v3\nusername = novasnap\n\
    password = pw2\nuser_domain_name = Default\nproject_name = service\nproject_domain_name = Default\n\
    [ks_creds]\nauth_type = password\nauth_url = https://k.example/identity\nuser_id = 42\npassword = pw3\n";

/// `novasnap check-config --format json --show-secrets` with `args`, `HOME` and `env` only.
fn novasnap(args: &[String], home: &Path, env: &[(String, String)]) -> Result<Value, Value> {
    let out = Command::new(env!("CARGO_BIN_EXE_novasnap"))
        .args(["check-config", "--format", "json", "--show-secrets"])
        .args(args)
        .env_clear()
        .env("HOME", home)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .unwrap();
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!("{e}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    });
    if out.status.success() {
        Ok(json)
    } else {
        Err(json["error"].clone())
    }
}

/// What the peer is told of an option: how novasnap declares it.
fn declaration(option: &Value) -> Value {
    json!({
        "section": option["section"], "option": option["option"], "type": option["type"],
        "default": option["default"], "choices": option["choices"],
    })
}

/// Every option novasnap reads, from the base configuration, with upstream's declaration.
struct Catalog {
    options: Vec<Value>,
    upstream: Vec<Value>,
}

fn catalog() -> &'static Catalog {
    static CATALOG: OnceLock<Catalog> = OnceLock::new();
    CATALOG.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.conf");
        std::fs::write(&base, BASE).unwrap();
        let dump = novasnap(&["--config-file".into(), base.display().to_string()], dir.path(), &[]).unwrap();
        let options: Vec<Value> = dump["options"].as_array().unwrap().clone();
        let describe = json!({ "describe": options.iter().map(declaration).collect::<Vec<_>>() });
        let upstream = peer().lock().unwrap().ask(&describe)["options"].as_array().unwrap().clone();
        Catalog { options, upstream }
    })
}

#[test]
fn every_upstream_option_is_read_with_its_upstream_type_and_secrecy() {
    let catalog = catalog();
    let mut checked = 0;
    for (ours, theirs) in catalog.options.iter().zip(&catalog.upstream) {
        if theirs["upstream"] == true {
            let name = format!("[{}] {}", ours["section"], ours["option"]);
            assert_eq!(ours["type"], theirs["kind"], "{name}: type");
            assert_eq!(ours["secret"], theirs["secret"], "{name}: secret");
            checked += 1;
        }
    }
    assert!(checked > 60, "only {checked} upstream options");
}

/// An option the generator writes, by any of its names.
#[derive(Debug, Clone)]
struct Target {
    section: String,
    key: String,
    valid: Vec<String>,
    invalid: Vec<String>,
    /// Free text: continuation lines may be added.
    free: bool,
}

const FREE_TEXT: &[&str] = &[
    "plain",
    "two words",
    "p@ss:w=rd",
    "C:\\new\\x",
    "trailing\\",
    "\\x41 \\n stays",
    "# not a comment",
    "; nor this",
    "ünïcödé",
    "$$dollar",
    "\\$escaped",
    "\\\\$escaped too",
    "a$ b$",
    "${my_ip}-x",
    "$my_ip.",
    "$host",
    "/srv/$state_path/y",
    "${state_path}",
    "x $rpc_response_timeout",
    // Not `$debug`: in [glance] it is Nova's `[glance] debug`, which novasnap does not read.
    "$use_json",
    "$libvirt.images_rbd_pool/z",
    "$progress_interval",
    "'inner' \"quotes\"",
    "",
];
const BAD_TEXT: &[&str] = &["$nosuch", "${nosuch}", "$DEFAULT.host", "$nosuchgroup.x", "$LIBVIRT.images_rbd_pool"];

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

/// Valid and invalid values for an option: anything of its type where novasnap only
/// passes the value on, values novasnap can use where it checks more than oslo does.
fn values(section: &str, option: &str, kind: &str, upstream: &Value) -> (Vec<String>, Vec<String>, bool) {
    let choices: Vec<String> =
        upstream["choices"].as_array().into_iter().flatten().map(|c| c.as_str().unwrap().to_string()).collect();
    let (valid, invalid, free): (&[&str], &[&str], bool) = match (section, option) {
        ("DEFAULT" | "oslo_messaging_notifications", "transport_url") => {
            (&["rabbit://nova:s3cret@10.0.0.1:5672/", "rabbit://u:p$$w@h1:5672,u:p$$w@h2:5672/nova"], &[], false)
        }
        ("DEFAULT", "host") => {
            (&["cmp1", "cmp-2.example.org.", "10.0.0.7", "a_b", "${my_ip}"], &["-bad", "1.2.3", ""], false)
        }
        ("glance", "api_servers") => (&["http://g1:9292", "http://g1:9292, https://g2:9292,", ""], &[], false),
        ("glance", "endpoint_override") => (&["http://g:9292/", ""], &[], false),
        ("glance", "valid_interfaces") => (&["internal,public", "publicURL, admin", " public ,"], &[], false),
        (_, "auth_url") => (&["http://k:5000/v3", "https://k.example/identity"], &[], false),
        (_, "auth_type") => (&["password", "v3password"], &[], false),
        (_, "auth_section") => (&["ks_creds", ""], &[], false),
        (_, "password" | "username" | "user_domain_name") => {
            (&["nova", "n$$v", "two words", "$host", "\\$x"], &["$nosuch"], false)
        }
        (_, "driver") => (&["messagingv2", "messaging", "noop", "log", ""], &[], false),
        // What novasnap refuses at start-up where oslo would fail later (at the first
        // publish or declare), or not at all: only values both take.
        ("oslo_messaging_rabbit", "kombu_compression") => (&["", "gzip", "zlib", "bzip2", "bzip"], &[], false),
        ("oslo_messaging_rabbit", "ssl_version") => (&["", "TLSv1_2", "tlsv1_2", "SSLv23"], &[], false),
        ("oslo_messaging_rabbit", "rabbit_ha_queues" | "rabbit_stream_fanout") => {
            (&["false", "No", "0"], &["maybe"], false)
        }
        // EXTERNAL is refused at start-up without TLS and a client certificate.
        ("oslo_messaging_rabbit", "rabbit_login_method") => {
            (&["PLAIN", "AMQPLAIN", "RABBIT-CR-DEMO"], &["plain", "bogus", ""], false)
        }
        _ => match kind {
            "boolean" => (&["true", "False", "1", "0", "yes", "NO", "on", "Off"], &["maybe", "", "$nosuch"], false),
            // novasnap's own numbers are counts and bounds: 0 is refused where oslo takes it.
            "integer" if section == "novasnap" => (&["1", "30", "1_0", "+5", "\" 7\""], &["1.5", "abc", ""], false),
            "integer" => (&["0", "30", "1_0", "+5", "\" 7\""], &["1.5", "abc", ""], false),
            "float" if section == "novasnap" => (&["1", "2.5", "1e1", "3_0", "7.0"], &["abc", "", "1__0"], false),
            "float" => (&["1.5", "10", "1e1", ""], &["abc"], false),
            "list" => (&["a,b", " a , b ,", "", ",x", "x"], &[], false),
            "string" if !choices.is_empty() => (&[], &["bogus", ""], false),
            _ => (FREE_TEXT, BAD_TEXT, true),
        },
    };
    let mut valid = strings(valid);
    let mut invalid = strings(invalid);
    if !choices.is_empty() && option != "rabbit_login_method" {
        valid.extend(choices.iter().cloned());
        invalid.push(choices[0].to_uppercase());
    }
    (valid, invalid, free)
}

/// Every name the generator may write, grouped by the section it is written in.
fn targets() -> Vec<Target> {
    let catalog = catalog();
    let mut targets = Vec::new();
    for (ours, theirs) in catalog.options.iter().zip(&catalog.upstream) {
        let (section, option) = (ours["section"].as_str().unwrap(), ours["option"].as_str().unwrap());
        let (valid, invalid, free) = values(section, option, ours["type"].as_str().unwrap(), theirs);
        let mut names = vec![(section.to_string(), option.to_string())];
        for d in theirs["deprecated"].as_array().unwrap() {
            names.push((d[0].as_str().unwrap().to_string(), d[1].as_str().unwrap().to_string()));
        }
        for (section, key) in names {
            targets.push(Target { section, key, valid: valid.clone(), invalid: invalid.clone(), free });
        }
    }
    // Options novasnap does not read: `my_ip` (Nova's, for `$my_ip`), unknown ones, and a
    // key that differs from one novasnap reads only by case.
    for (section, key) in
        [("DEFAULT", "my_ip"), ("DEFAULT", "Host"), ("glance", "unknown_option"), ("placement", "auth_type")]
    {
        targets.push(Target {
            section: section.into(),
            key: key.into(),
            valid: strings(FREE_TEXT),
            invalid: vec![],
            free: true,
        });
    }
    targets
}

#[derive(Debug, Clone)]
enum Line {
    Assign {
        target: usize,
        value: String,
        separator: &'static str,
        quote: Option<char>,
        continued: Option<&'static str>,
    },
    Comment(&'static str),
    Blank(&'static str),
}

#[derive(Debug, Clone)]
struct Block {
    /// How the section name is written: as declared, capitalized, upper case (oslo folds
    /// them) or, for DEFAULT, `default` (which oslo does not take for DEFAULT).
    header_case: u8,
    lines: Vec<Line>,
}

#[derive(Debug, Clone)]
struct File {
    blocks: Vec<Block>,
    crlf: bool,
}

#[derive(Debug, Clone)]
struct Case {
    files: Vec<File>,
    dir: Option<Vec<File>>,
    /// Where `--config-dir` comes among the `--config-file`s.
    dir_position: usize,
    /// Nova's default files (`~/.nova/nova.conf`, `novasnap.conf`, `nova.conf.d/`) instead
    /// of the command line.
    discovery: bool,
    /// Variables `OS_<GROUP>__<OPTION>` (a target and a value).
    env: Vec<(usize, String)>,
    /// novasnap is given `--config` (today's name) instead of `--config-file`.
    alias: bool,
    missing_file: bool,
}

fn line(targets: &'static [Target], section: String) -> impl Strategy<Value = Line> {
    let here: Vec<usize> = (0..targets.len()).filter(|&i| targets[i].section == section).collect();
    let assign = proptest::sample::select(here).prop_flat_map(move |target| {
        let t = &targets[target];
        let value = if t.invalid.is_empty() {
            proptest::sample::select(t.valid.clone()).boxed()
        } else {
            prop_oneof![40 => proptest::sample::select(t.valid.clone()), 1 => proptest::sample::select(t.invalid.clone())].boxed()
        };
        let continued = if t.free { proptest::option::weighted(0.2, proptest::sample::select(vec!["  ", "\t"])).boxed() } else { Just(None).boxed() };
        (
            value,
            proptest::sample::select(vec![" = ", "=", " : ", ":", "   =\t"]),
            proptest::option::weighted(0.15, proptest::sample::select(vec!['"', '\''])),
            continued,
        )
            .prop_map(move |(value, separator, quote, continued)| Line::Assign { target, value, separator, quote, continued })
    });
    prop_oneof![
        8 => assign,
        1 => proptest::sample::select(vec!["# a comment", "; a comment", "#host = commented-out"]).prop_map(Line::Comment),
        1 => proptest::sample::select(vec!["", "   "]).prop_map(Line::Blank),
    ]
}

fn block(targets: &'static [Target]) -> impl Strategy<Value = Block> {
    let mut sections: Vec<String> = targets.iter().map(|t| t.section.clone()).collect();
    sections.sort();
    sections.dedup();
    (proptest::sample::select(sections), 0u8..4).prop_flat_map(move |(section, header_case)| {
        proptest::collection::vec(line(targets, section), 1..5).prop_map(move |lines| Block { header_case, lines })
    })
}

fn file(targets: &'static [Target]) -> impl Strategy<Value = File> {
    (proptest::collection::vec(block(targets), 1..5), proptest::bool::weighted(0.2))
        .prop_map(|(blocks, crlf)| File { blocks, crlf })
}

fn case(targets: &'static [Target]) -> impl Strategy<Value = Case> {
    // Not for `driver`: oslo takes a variable for a multi-valued option as a list of its
    // characters (`convert(env_val)` iterates the string); novasnap takes it as one value.
    let single: Vec<usize> = (0..targets.len()).filter(|&t| targets[t].key != "driver").collect();
    let env = proptest::collection::vec(
        proptest::sample::select(single)
            .prop_flat_map(move |t| (Just(t), proptest::sample::select(targets[t].valid.clone()))),
        0..2,
    );
    (
        proptest::collection::vec(file(targets), 0..3),
        proptest::option::weighted(0.4, proptest::collection::vec(file(targets), 1..4)),
        0usize..3,
        proptest::bool::weighted(0.2),
        prop_oneof![4 => Just(Vec::new()), 1 => env],
        proptest::bool::ANY,
        proptest::bool::weighted(0.03),
    )
        .prop_map(|(files, dir, dir_position, discovery, env, alias, missing_file)| Case {
            dir_position: dir_position.min(files.len()),
            files,
            dir,
            discovery,
            env,
            alias,
            missing_file,
        })
}

fn render(targets: &[Target], file: &File) -> String {
    let mut lines = Vec::new();
    for block in &file.blocks {
        let Some(first) = block.lines.iter().find_map(|l| match l {
            Line::Assign { target, .. } => Some(&targets[*target].section),
            _ => None,
        }) else {
            lines.extend(block.lines.iter().map(|_| "# only comments".to_string()));
            continue;
        };
        let header = match (block.header_case, first.as_str()) {
            (3, "DEFAULT") => "default".to_string(),
            (1, s) => s[..1].to_uppercase() + &s[1..],
            (2, s) => s.to_uppercase(),
            (_, s) => s.to_string(),
        };
        lines.push(format!("[{header}]"));
        for line in &block.lines {
            match line {
                Line::Assign { target, value, separator, quote, continued } => {
                    let key = &targets[*target].key;
                    match (continued, value.split_once(' ')) {
                        (Some(indent), Some((head, tail))) => {
                            lines.push(format!("{key}{separator}{head}"));
                            lines.push(format!("{indent}{tail}"));
                        }
                        _ => match quote {
                            Some(q) => lines.push(format!("{key}{separator}{q}{value}{q}")),
                            None => lines.push(format!("{key}{separator}{value}")),
                        },
                    }
                }
                Line::Comment(c) => lines.push(c.to_string()),
                Line::Blank(b) => lines.push(b.to_string()),
            }
        }
    }
    let newline = if file.crlf { "\r\n" } else { "\n" };
    lines.join(newline) + newline
}

/// The case written under `dir`: the files, and the arguments novasnap and oslo get.
fn write(targets: &[Target], case: &Case, dir: &Path) -> (Vec<String>, Vec<String>, Vec<(String, String)>) {
    let write = |path: PathBuf, text: &str| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    };
    let confd = |at: &Path, files: &[File]| {
        for (i, f) in files.iter().enumerate() {
            // 10-, 20-, 3-: sorted as strings, as oslo sorts them.
            write(at.join(["10-a.conf", "20-b.conf", "3-c.conf"][i]), &render(targets, f));
        }
        write(at.join(".hidden.conf"), "[DEFAULT]\nhost = hidden-never-read\n");
        write(at.join("README"), "not a config file\n");
    };
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    if case.discovery {
        let home = dir.join(".nova");
        write(home.join("nova.conf"), BASE);
        // ~/.nova/nova.conf is found first: ~/nova.conf is never read.
        write(dir.join("nova.conf"), "[broken\n");
        if let Some(first) = case.files.first() {
            write(home.join("novasnap.conf"), &render(targets, first));
        }
        if let Some(files) = &case.dir {
            confd(&home.join("nova.conf.d"), files);
        }
    } else {
        let mut args: Vec<(bool, String)> = Vec::new();
        let base = dir.join("base.conf");
        write(base.clone(), BASE);
        args.push((true, base.display().to_string()));
        for (i, f) in case.files.iter().enumerate() {
            if i == case.dir_position {
                if let Some(files) = &case.dir {
                    confd(&dir.join("conf.d"), files);
                    args.push((false, dir.join("conf.d").display().to_string()));
                }
            }
            let path = dir.join(format!("file{i}.conf"));
            write(path.clone(), &render(targets, f));
            args.push((true, path.display().to_string()));
        }
        if case.dir_position >= case.files.len() {
            if let Some(files) = &case.dir {
                confd(&dir.join("conf.d"), files);
                args.push((false, dir.join("conf.d").display().to_string()));
            }
        }
        if case.missing_file {
            args.push((true, dir.join("missing.conf").display().to_string()));
        }
        for (is_file, path) in args {
            let flag = if is_file { "--config-file" } else { "--config-dir" };
            theirs.extend([flag.to_string(), path.clone()]);
            ours.extend([if is_file && case.alias { "--config".to_string() } else { flag.to_string() }, path]);
        }
    }
    let env = case
        .env
        .iter()
        .map(|(t, value)| {
            let t = &targets[*t];
            (format!("OS_{}__{}", t.section.to_uppercase(), t.key.to_uppercase()), value.clone())
        })
        .collect();
    (ours, theirs, env)
}

/// Same value: equal JSON, numbers equal as numbers, and novasnap's empty default for an
/// option whose upstream default is None (`rbd_user`, `api_servers`, …).
fn same(ours: &Value, theirs: &Value) -> bool {
    let value = &ours["value"];
    match (value, theirs) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::String(s), Value::Null) if s.is_empty() => ours["sources"] == json!([]),
        (Value::Array(a), Value::Null) if a.is_empty() => ours["sources"] == json!([]),
        _ => value == theirs,
    }
}

fn check(targets: &[Target], case: &Case) -> Result<usize, TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs, env) = write(targets, case, dir.path());
    let files: String = walk(dir.path())
        .into_iter()
        .map(|p| format!("--- {}\n{}", p.display(), std::fs::read_to_string(&p).unwrap_or_default()))
        .collect();
    let context = || format!("novasnap {ours:?}\noslo {theirs:?}\nenv {env:?}\n{files}");
    let mut peer = peer().lock().unwrap();
    let ask = |peer: &mut Peer, options: Vec<Value>| {
        let env: serde_json::Map<String, Value> = env.iter().map(|(k, v)| (k.clone(), json!(v))).collect();
        peer.ask(&json!({ "argv": theirs, "home": dir.path(), "env": env, "options": options }))
    };
    match novasnap(&ours, dir.path(), &env) {
        Ok(dump) => {
            let options: Vec<Value> = dump["options"].as_array().unwrap().clone();
            let answer = ask(&mut peer, options.iter().map(declaration).collect());
            prop_assert!(
                answer["error"].is_null(),
                "oslo failed, novasnap did not: {}\n{}",
                answer["error"],
                context()
            );
            for (option, theirs) in options.iter().zip(answer["values"].as_array().unwrap()) {
                let name = format!("[{}] {}", option["section"], option["option"]);
                prop_assert!(
                    theirs.get("error").is_none(),
                    "{name}: oslo: {}, novasnap: {}\n{}",
                    theirs["error"],
                    option["value"],
                    context()
                );
                prop_assert!(
                    same(option, &theirs["value"]),
                    "{name}: novasnap {} oslo {}\n{}",
                    option["value"],
                    theirs["value"],
                    context()
                );
            }
            Ok(options.len())
        }
        Err(error) => {
            // The option novasnap names; one it does not read (a `$my_ip` that refers to
            // itself) fails what refers to it in oslo: then any option will do.
            let named = catalog()
                .options
                .iter()
                .find(|o| o["option"] == error["option"] && (o["section"] == error["section"] || o["option"] != "auth_url"))
                .map(|o| json!({ "section": error["section"], "option": error["option"], "type": o["type"], "default": o["default"], "choices": o["choices"] }));
            let options: Vec<Value> = match (named, error["option"].is_string()) {
                (Some(named), _) => vec![named],
                (None, true) => catalog().options.iter().map(declaration).collect(),
                (None, false) => Vec::new(),
            };
            let answer = ask(&mut peer, options.clone());
            let agreed = !answer["error"].is_null()
                || answer["values"].as_array().unwrap().iter().zip(&options).any(|(theirs, option)| {
                    theirs.get("error").is_some()
                        // oslo reads an empty number as None; novasnap refuses it.
                        || (theirs["value"].is_null() && matches!(option["type"].as_str(), Some("integer" | "float")))
                });
            prop_assert!(agreed, "novasnap failed ({}), oslo did not: {answer}\n{}", error["message"], context());
            Ok(0)
        }
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files.sort();
    files
}

#[test]
fn generated_configurations_read_as_oslo_reads_them() {
    let targets: &'static [Target] = Box::leak(targets().into_boxed_slice());
    let cases = std::env::var("CONFIG_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256);
    let mut runner = TestRunner::new(RunnerConfig { cases, failure_persistence: None, ..RunnerConfig::default() });
    // Configurations read (shrinking included), option values compared, configurations
    // both refused.
    let counts = Mutex::new((0, 0, 0));
    let result = runner.run(&case(targets), |case| {
        let compared = check(targets, &case)?;
        let mut counts = counts.lock().unwrap();
        *counts = (counts.0 + 1, counts.1 + compared, counts.2 + usize::from(compared == 0));
        Ok(())
    });
    let (read, compared, refused) = counts.into_inner().unwrap();
    eprintln!("{read} configurations: {compared} option values compared; {refused} refused by both");
    if let Err(e) = result {
        panic!("{e}");
    }
}
