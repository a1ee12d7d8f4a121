//! oslo.config's file dialect, reproduced: which files are read and in what order, how a
//! file is split into sections and values, which value of an option wins, how `$name`
//! is substituted and how a value becomes a bool, a number or a list.
//!
//! No crate reads this dialect: INI crates interpret backslash escapes, take `#` after a
//! value as a comment, keep only the first of repeated sections or the first value of a
//! repeated key, know nothing of continuation lines or of oslo's section-name folding.
//! Every rule here cites the Python it follows (oslo.config 10.7).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// Where a value came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Origin {
    /// A line of a configuration file, and the `[section] key` it was written as there
    /// (another one than the option's own when a deprecated name was used).
    File { path: PathBuf, line: usize, section: String, key: String },
    /// oslo.config's environment source, `OS_<GROUP>__<OPTION>`.
    Environment(String),
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::File { path, line, .. } => write!(f, "{}:{line}", path.display()),
            Origin::Environment(name) => write!(f, "environment {name}"),
        }
    }
}

/// One value as written, with where it was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Found {
    pub text: String,
    pub origin: Origin,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// `ConfigFilesNotFoundError`, `ConfigFilesPermissionDeniedError` and other I/O errors.
    #[error("cannot read config file {file}: {reason}")]
    Read { file: PathBuf, reason: String },
    /// `iniparser.ParseError`: oslo refuses the whole file.
    #[error("{file}:{line}: {reason}: {text:?}")]
    Parse { file: PathBuf, line: usize, reason: &'static str, text: String },
    /// `ConfigDirNotFoundError` (only for a directory given on the command line).
    #[error("config directory {0} does not exist")]
    DirNotFound(PathBuf),
}

/// One parsed file: `ConfigParser` with its `_normalized` sections.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    /// Section (normalized: lowercase, but `DEFAULT`) → key → every value in file order.
    sections: BTreeMap<String, BTreeMap<String, Vec<(String, usize)>>>,
}

/// `cfg._normalize_group_name`: `[Glance]` is `[glance]`, but only `[DEFAULT]` is DEFAULT.
pub fn normalize_section(name: &str) -> String {
    if name == "DEFAULT" {
        name.to_string()
    } else {
        name.to_lowercase()
    }
}

/// Python's `str.isspace()`, which `strip()` uses: Unicode White_Space plus the ASCII
/// separators U+001C–U+001F, which Rust's `char::is_whitespace` leaves out.
pub fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

pub fn py_strip(s: &str) -> &str {
    s.trim_matches(is_py_space)
}

impl ConfigFile {
    pub fn read(path: &Path) -> Result<Self, SourceError> {
        let bytes =
            std::fs::read(path).map_err(|e| SourceError::Read { file: path.to_owned(), reason: e.to_string() })?;
        let text = String::from_utf8(bytes)
            .map_err(|e| SourceError::Read { file: path.to_owned(), reason: format!("not UTF-8: {e}") })?;
        Self::parse(path, &text)
    }

    /// `iniparser.BaseParser.parse` with `cfg.ConfigParser`'s callbacks. Values are literal:
    /// no escapes; `#` and `;` start a comment only at the start of a line; an indented line
    /// continues the previous value (joined with `\n`) and a blank line ends it; a value wholly
    /// in matching quotes loses them; a key is split at the first `=` or `:`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, SourceError> {
        let mut file = ConfigFile { path: path.to_owned(), sections: BTreeMap::new() };
        let error = |line: usize, reason: &'static str, text: &str| SourceError::Parse {
            file: path.to_owned(),
            line,
            reason,
            text: text.to_string(),
        };
        let mut section: Option<String> = None;
        // The assignment being read: key, its value lines, its line number.
        let mut pending: Option<(String, Vec<String>, usize)> = None;
        let flush = |pending: &mut Option<(String, Vec<String>, usize)>,
                     section: &Option<String>,
                     file: &mut ConfigFile|
         -> Result<(), SourceError> {
            if let Some((key, value, line)) = pending.take() {
                let Some(section) = section else {
                    return Err(error(line, "Section must be started before assignment", &key));
                };
                let values = file.sections.entry(normalize_section(section)).or_default().entry(key).or_default();
                values.push((value.join("\n"), line));
            }
            Ok(())
        };
        for (index, raw) in universal_lines(text).enumerate() {
            let lineno = index + 1;
            let line = raw.trim_end_matches(is_py_space);
            if line.is_empty() {
                flush(&mut pending, &section, &mut file)?;
                continue;
            }
            if line.starts_with([' ', '\t']) {
                match pending.as_mut() {
                    Some((_, value, _)) => value.push(line.trim_start_matches(is_py_space).to_string()),
                    None => return Err(error(lineno, "Unexpected continuation line", line)),
                }
                continue;
            }
            flush(&mut pending, &section, &mut file)?;
            if line.starts_with('[') {
                if !line.ends_with(']') {
                    return Err(error(lineno, "Invalid section (must end with ])", line));
                }
                if line.chars().count() <= 2 {
                    return Err(error(lineno, "Empty section name", line));
                }
                let name = &line[1..line.len() - 1];
                file.sections.entry(normalize_section(name)).or_default();
                section = Some(name.to_string());
            } else if !line.starts_with(['#', ';']) {
                let (key, value) =
                    split_key_value(line).ok_or_else(|| error(lineno, "No ':' or '=' found in assignment", line))?;
                if key.is_empty() {
                    return Err(error(lineno, "Key cannot be empty", line));
                }
                pending = Some((key.to_string(), vec![value.to_string()], lineno));
            }
        }
        flush(&mut pending, &section, &mut file)?;
        Ok(file)
    }

    /// Every `(section, key)` the file sets, with the line of its first value.
    pub fn keys(&self) -> impl Iterator<Item = (&str, &str, usize)> {
        self.sections.iter().flat_map(|(section, keys)| {
            keys.iter().map(move |(key, values)| (section.as_str(), key.as_str(), values[0].1))
        })
    }

    fn values(&self, section: &str, key: &str) -> Option<&Vec<(String, usize)>> {
        self.sections.get(section).and_then(|keys| keys.get(key))
    }
}

/// Python's text-mode `readlines()`: `\n`, `\r\n` and a lone `\r` all end a line.
fn universal_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        match rest.find(['\r', '\n']) {
            Some(at) => {
                let line = &rest[..at];
                let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[at + skip..];
                Some(line)
            }
            None => Some(std::mem::take(&mut rest)),
        }
    })
}

/// `BaseParser._split_key_value`.
fn split_key_value(line: &str) -> Option<(&str, &str)> {
    let at = match (line.find(':'), line.find('=')) {
        (None, None) => return None,
        (Some(colon), Some(equal)) => colon.min(equal),
        (Some(at), None) | (None, Some(at)) => at,
    };
    let (key, value) = (py_strip(&line[..at]), py_strip(&line[at + 1..]));
    let mut chars = value.chars();
    let value = match (chars.next(), chars.next_back()) {
        (Some(first @ ('"' | '\'')), Some(last)) if first == last => &value[1..value.len() - 1],
        // One quote alone: Python's `value[1:-1]` of it is empty.
        (Some('"' | '\''), None) => "",
        _ => value,
    };
    Some((key, value))
}

/// What to read, as the command line said it: `--config-file` and `--config-dir` in their
/// order (oslo parses each as argparse meets it, so a later one overrides an earlier one).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSelection {
    pub given: Vec<Given>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Given {
    File(PathBuf),
    Dir(PathBuf),
}

/// oslo looks for `<project>.conf` and `<prog>.conf`: Nova's files, then novasnap's own.
pub const PROJECT: &str = "nova";
pub const PROG: &str = "novasnap";

impl ConfigSelection {
    pub fn file(path: &Path) -> Self {
        Self { given: vec![Given::File(path.to_owned())] }
    }

    /// `ConfigOpts._parse_config_files`: without `--config-file`, the default files
    /// (`find_config_files`); without `--config-dir`, the default directories that exist
    /// (`find_config_dirs`); then what the command line gives, in its order. A default
    /// directory is read even when files are given, and before them.
    pub fn files(&self) -> Result<Vec<PathBuf>, SourceError> {
        let mut files = Vec::new();
        if !self.given.iter().any(|g| matches!(g, Given::File(_))) {
            files.extend(find_config(".conf"));
        }
        if !self.given.iter().any(|g| matches!(g, Given::Dir(_))) {
            for dir in find_config(".conf.d") {
                files.extend(conf_files_in(&dir));
            }
        }
        for given in &self.given {
            match given {
                Given::File(path) => files.push(absolute(&expand_user(path))),
                Given::Dir(dir) => {
                    let dir = expand_user(dir);
                    if !dir.exists() {
                        return Err(SourceError::DirNotFound(dir));
                    }
                    files.extend(conf_files_in(&dir));
                }
            }
        }
        Ok(files)
    }
}

/// `cfg._get_config_dirs("nova")` searched by `cfg._search_dirs` for `nova<ext>` and then
/// `novasnap<ext>`: for each name, the first of `~/.nova/`, `~/`, `/etc/nova/`, `/etc/`,
/// `$SNAP_COMMON/etc/nova/`, `$SNAP/etc/nova/` where it exists.
fn find_config(extension: &str) -> Vec<PathBuf> {
    let home = expand_user(Path::new("~"));
    let mut dirs = vec![home.join(format!(".{PROJECT}")), home, Path::new("/etc").join(PROJECT), "/etc".into()];
    for snap in ["SNAP_COMMON", "SNAP"] {
        if let Some(root) = std::env::var_os(snap).filter(|r| !r.is_empty()) {
            dirs.push(Path::new(&root).join("etc").join(PROJECT));
        }
    }
    [PROJECT, PROG]
        .iter()
        .filter_map(|name| dirs.iter().map(|d| d.join(format!("{name}{extension}"))).find(|p| p.exists()))
        .map(|p| absolute(&p))
        .collect()
}

/// `sorted(glob.glob(os.path.join(dir, '*.conf')))`: hidden files excluded, as glob's `*` does.
fn conf_files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.file_name())
        .filter(|name| {
            let name = name.to_string_lossy();
            name.ends_with(".conf") && !name.starts_with('.')
        })
        .map(|name| absolute(&dir.join(name)))
        .collect();
    files.sort();
    files
}

/// `os.path.expanduser` for a leading `~` (from `$HOME`).
fn expand_user(path: &Path) -> PathBuf {
    match path.strip_prefix("~") {
        Ok(rest) => {
            let home = std::env::var_os("HOME").map(PathBuf::from).or_else(std::env::home_dir).unwrap_or_default();
            if rest.as_os_str().is_empty() {
                home
            } else {
                home.join(rest)
            }
        }
        Err(_) => path.to_owned(),
    }
}

/// `os.path.abspath`: relative to the working directory, `.` and `..` folded.
fn absolute(path: &Path) -> PathBuf {
    let joined = std::env::current_dir().map(|cwd| cwd.join(path)).unwrap_or_else(|_| path.to_owned());
    let mut out = PathBuf::new();
    for part in joined.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Every source of values, merged as `cfg._Namespace` merges them.
#[derive(Debug, Clone, Default)]
pub struct Namespace {
    /// In the order read: a later file overrides an earlier one.
    pub files: Vec<ConfigFile>,
    /// `OS_<GROUP>__<OPTION>` variables (oslo.config's environment source).
    environment: BTreeMap<String, String>,
}

impl Namespace {
    pub fn load(selection: &ConfigSelection) -> Result<Self, SourceError> {
        let files = selection.files()?.iter().map(|p| ConfigFile::read(p)).collect::<Result<_, _>>()?;
        Ok(Self::new(files, std::env::vars()))
    }

    pub fn new(files: Vec<ConfigFile>, environment: impl IntoIterator<Item = (String, String)>) -> Self {
        let environment = environment.into_iter().filter(|(k, _)| k.starts_with("OS_") && k.contains("__")).collect();
        Self { files, environment }
    }

    /// `EnvironmentConfigurationSource.get`: it wins over every file (`ConfigOpts._do_get`).
    pub fn environment(&self, group: &str, name: &str) -> Option<Found> {
        let variable = format!("OS_{}__{}", group.to_uppercase(), name.to_uppercase());
        self.environment.get(&variable).map(|text| Found { text: text.clone(), origin: Origin::Environment(variable) })
    }

    /// `_Namespace._get_file_value` for a single-valued option: the last file that sets any
    /// of `names` decides; in it, the first of `names` it sets (the option's own name before
    /// its deprecated ones), and of that key its last value.
    pub fn file_value(&self, names: &[(String, String)]) -> Option<Found> {
        self.files.iter().rev().find_map(|file| {
            names.iter().find_map(|(section, key)| {
                let (text, line) = file.values(section, key)?.last()?;
                Some(Found { text: text.clone(), origin: origin(file, section, key, *line) })
            })
        })
    }

    /// `_get_file_value(multi=True)`: every value of every name, files in order; within a
    /// file, a later name's values before an earlier one's (`rvalue = val + rvalue`).
    pub fn file_values(&self, names: &[(String, String)]) -> Vec<Found> {
        let mut found = Vec::new();
        for file in &self.files {
            for (section, key) in names.iter().rev() {
                for (text, line) in file.values(section, key).into_iter().flatten() {
                    found.push(Found { text: text.clone(), origin: origin(file, section, key, *line) });
                }
            }
        }
        found
    }

    /// Every `(section, key)` set in a file that is not among `used`, with where it is set.
    pub fn unused(&self, used: &HashSet<(String, String)>) -> BTreeMap<String, BTreeMap<String, Origin>> {
        let mut unused: BTreeMap<String, BTreeMap<String, Origin>> = BTreeMap::new();
        for file in &self.files {
            for (section, key, line) in file.keys() {
                if !used.contains(&(section.to_string(), key.to_string())) {
                    unused
                        .entry(section.to_string())
                        .or_default()
                        .entry(key.to_string())
                        .or_insert_with(|| origin(file, section, key, line));
                }
            }
        }
        unused
    }
}

fn origin(file: &ConfigFile, section: &str, key: &str, line: usize) -> Origin {
    Origin::File { path: file.path.clone(), line, section: section.to_string(), key: key.to_string() }
}

/// A piece of a value as `string.Template` reads it (oslo's `ConfigOpts.Template`, whose
/// identifiers may hold dots: `$group.option`).
#[derive(Debug, PartialEq)]
pub enum Piece {
    Text(String),
    /// `$name` or `${name}`.
    Reference(String),
}

/// `ConfigOpts._substitute`: `\$` is first made `$$`; then `$$` is `$`, `$name` / `${name}`
/// a reference (`[_a-z][._a-z0-9]*`, any case), and any other `$` stays itself.
pub fn template(value: &str) -> Vec<Piece> {
    let value = value.replace("\\$", "$$");
    let bytes = value.as_bytes();
    let identifier_end = |from: usize| {
        let mut end = from;
        while let Some(&b) = bytes.get(end) {
            let first = end == from;
            if !(b == b'_' || b.is_ascii_alphabetic() || (!first && (b == b'.' || b.is_ascii_digit()))) {
                break;
            }
            end += 1;
        }
        end
    };
    let mut pieces = Vec::new();
    let mut text = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'$' {
            let next = value[i..].find('$').map_or(bytes.len(), |at| i + at);
            text.push_str(&value[i..next]);
            i = next;
            continue;
        }
        if bytes.get(i + 1) == Some(&b'$') {
            text.push('$');
            i += 2;
            continue;
        }
        let named = identifier_end(i + 1);
        let braced = if bytes.get(i + 1) == Some(&b'{') { identifier_end(i + 2) } else { i + 2 };
        let (name, next) = if named > i + 1 {
            (&value[i + 1..named], named)
        } else if braced > i + 2 && bytes.get(braced) == Some(&b'}') {
            (&value[i + 2..braced], braced + 1)
        } else {
            text.push('$');
            i += 1;
            continue;
        };
        if !text.is_empty() {
            pieces.push(Piece::Text(std::mem::take(&mut text)));
        }
        pieces.push(Piece::Reference(name.to_string()));
        i = next;
    }
    if !text.is_empty() {
        pieces.push(Piece::Text(text));
    }
    pieces
}

/// A typed value, as an oslo option type returns it.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// `None`: an unset option without default, or an empty number.
    None,
    Str(String),
    Bool(bool),
    Int(i64),
    Float(f64),
    List(Vec<String>),
}

impl Value {
    /// Python's `str(value)`, which is what `$name` stands for in another value.
    pub fn to_python_str(&self) -> String {
        match self {
            Value::None => String::new(),
            Value::Str(s) => s.clone(),
            Value::Bool(true) => "True".into(),
            Value::Bool(false) => "False".into(),
            Value::Int(i) => i.to_string(),
            Value::Float(f) => python_float_repr(*f),
            Value::List(items) => {
                format!("[{}]", items.iter().map(|i| python_str_repr(i)).collect::<Vec<_>>().join(", "))
            }
        }
    }
}

/// `types.Boolean`: not stripped, any case.
pub fn to_bool(text: &str) -> Result<bool, String> {
    match text.to_lowercase().as_str() {
        "true" | "1" | "on" | "yes" => Ok(true),
        "false" | "0" | "off" | "no" => Ok(false),
        _ => Err(format!("Unexpected boolean value {}", python_str_repr(text))),
    }
}

/// `types.Integer`: Python's `int()` (surrounding whitespace, a sign, `_` between digits);
/// blank is None.
pub fn to_int(text: &str) -> Result<Value, String> {
    let s = py_strip(text);
    if s.is_empty() {
        return Ok(Value::None);
    }
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    if !python_digits(digits) {
        return Err(format!("invalid literal for int() with base 10: {}", python_str_repr(text)));
    }
    s.replace('_', "").parse::<i64>().map(Value::Int).map_err(|e| format!("{}: {e}", python_str_repr(text)))
}

/// `types.Float`: Python's `float()`; blank is None.
pub fn to_float(text: &str) -> Result<Value, String> {
    let s = py_strip(text);
    if s.is_empty() {
        return Ok(Value::None);
    }
    let unsigned = s.strip_prefix(['+', '-']).unwrap_or(s).to_ascii_lowercase();
    let special = matches!(unsigned.as_str(), "inf" | "infinity" | "nan");
    let (mantissa, exponent) = match unsigned.split_once('e') {
        Some((m, e)) => (m, Some(e.strip_prefix(['+', '-']).unwrap_or(e))),
        None => (unsigned.as_str(), None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let well_formed = (!whole.is_empty() || !fraction.is_empty())
        && (whole.is_empty() || python_digits(whole))
        && (fraction.is_empty() || python_digits(fraction))
        && exponent.is_none_or(python_digits);
    if !special && !well_formed {
        return Err(format!("could not convert string to float: {}", python_str_repr(text)));
    }
    s.replace('_', "").parse::<f64>().map(Value::Float).map_err(|e| e.to_string())
}

/// ASCII digits with single underscores between them, as Python's numeric parsers take.
fn python_digits(s: &str) -> bool {
    !s.is_empty() && s.split('_').all(|group| !group.is_empty() && group.bytes().all(|b| b.is_ascii_digit()))
}

/// `types.List` of `types.String`: stripped, trailing commas dropped, split on commas, each
/// item stripped (empty items are kept).
pub fn to_list(text: &str) -> Vec<String> {
    let s = py_strip(text).trim_end_matches(',');
    if s.is_empty() {
        return Vec::new();
    }
    s.split(',').map(|item| py_strip(item).to_string()).collect()
}

/// `types.HostDomain`: an IPv4 or IPv6 address, else a host name whose labels match
/// `(?!-)[A-Z0-9-_]{1,63}(?<!-)$` (any case) and whose last label holds a letter or `-`; a
/// trailing dot is dropped.
pub fn to_host_domain(text: &str) -> Result<String, String> {
    let invalid = || format!("{text} is not a valid host address");
    if text.parse::<std::net::Ipv4Addr>().is_ok() || text.parse::<std::net::Ipv6Addr>().is_ok() {
        return Ok(text.to_string());
    }
    if text.is_empty() || text.chars().count() > 253 {
        return Err(invalid());
    }
    let name = text.strip_suffix('.').unwrap_or(text);
    let last = name.rsplit('.').next().unwrap_or("");
    if !last.chars().any(|c| c.is_ascii_alphabetic() || c == '-') {
        return Err(invalid());
    }
    let label_ok = |label: &str| {
        let len = label.chars().count();
        (1..=63).contains(&len)
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    };
    if name.split('.').all(label_ok) {
        Ok(name.to_string())
    } else {
        Err(invalid())
    }
}

/// Python's `repr()` of a str, for error messages and `str()` of lists.
fn python_str_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    let mut out = String::from(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

/// Python's `repr()` of a float: the shortest digits that read back, in positional notation
/// for exponents -4 to 15 (with at least `.0`), else as `1.5e+16`.
fn python_float_repr(f: f64) -> String {
    if f.is_nan() {
        return "nan".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "inf".into() } else { "-inf".into() };
    }
    let scientific = format!("{f:e}");
    let (mantissa, exponent) = scientific.split_once('e').expect("{:e} has an exponent");
    let exponent: i32 = exponent.parse().expect("{:e} exponent is a number");
    let (sign, mantissa) = mantissa.strip_prefix('-').map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    if !(-4..16).contains(&exponent) {
        let mantissa = if digits.len() > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits };
        return format!("{sign}{mantissa}e{}{:02}", if exponent < 0 { '-' } else { '+' }, exponent.abs());
    }
    let point = exponent + 1;
    let positional = if point <= 0 {
        format!("0.{}{digits}", "0".repeat((-point) as usize))
    } else if point as usize >= digits.len() {
        format!("{digits}{}.0", "0".repeat(point as usize - digits.len()))
    } else {
        format!("{}.{}", &digits[..point as usize], &digits[point as usize..])
    };
    format!("{sign}{positional}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ConfigFile {
        ConfigFile::parse(Path::new("t.conf"), text).unwrap()
    }

    fn get(file: &ConfigFile, section: &str, key: &str) -> Vec<String> {
        file.values(section, key).into_iter().flatten().map(|(v, _)| v.clone()).collect()
    }

    #[test]
    fn values_are_literal_and_comments_only_start_lines() {
        let f = parse("[DEFAULT]\npath = C:\\new\\x # not a comment\n  # indented: continues\n; a comment\n");
        assert_eq!(get(&f, "DEFAULT", "path"), ["C:\\new\\x # not a comment\n# indented: continues"]);
        let f = parse("[s]\n# c\nk = v\n\n  \nq: \"quoted\"\nr = 'half\"\ne=\n");
        assert_eq!(get(&f, "s", "k"), ["v"]);
        assert_eq!(get(&f, "s", "q"), ["quoted"]);
        assert_eq!(get(&f, "s", "r"), ["'half\""]);
        assert_eq!(get(&f, "s", "e"), [""]);
    }

    #[test]
    fn repeated_sections_merge_and_keys_keep_every_value() {
        let f = parse("[DEFAULT]\na = 1\n[Glance]\nx = 1\n[DEFAULT]\na = 2\n[glance]\nx = 2\n[default]\na = 3\n");
        assert_eq!(get(&f, "DEFAULT", "a"), ["1", "2"]);
        assert_eq!(get(&f, "glance", "x"), ["1", "2"], "section names fold to lowercase");
        assert_eq!(get(&f, "default", "a"), ["3"], "but [default] is not [DEFAULT]");
    }

    #[test]
    fn continuation_lines_and_line_endings() {
        let f = parse("[s]\r\nk = a\r\n\tb\r\n   c\rj=1\n");
        assert_eq!(get(&f, "s", "k"), ["a\nb\nc"]);
        assert_eq!(get(&f, "s", "j"), ["1"]);
        assert_eq!(f.values("s", "k").unwrap()[0].1, 2, "the key's line");
    }

    #[test]
    fn what_oslo_refuses_is_refused_with_the_line() {
        for (text, reason) in [
            ("k = v\n", "Section must be started before assignment"),
            ("[s]\n  v\n", "Unexpected continuation line"),
            ("[s\n", "Invalid section (must end with ])"),
            ("[]\n", "Empty section name"),
            ("[s]\njust words\n", "No ':' or '=' found in assignment"),
            ("[s]\n= v\n", "Key cannot be empty"),
            ("[s]\n# a comment ends the value\n  v\n", "Unexpected continuation line"),
        ] {
            match ConfigFile::parse(Path::new("t.conf"), text) {
                Err(SourceError::Parse { reason: r, .. }) => assert_eq!(r, reason, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_last_file_decides_and_its_own_name_before_a_deprecated_one() {
        let a = parse("[DEFAULT]\nlogfile = a.log\nlog_file = own.log\n");
        let b = parse("[DEFAULT]\nlogfile = b.log\nlogfile = b2.log\n");
        let names = [("DEFAULT".to_string(), "log_file".to_string()), ("DEFAULT".to_string(), "logfile".to_string())];
        let ns = Namespace::new(vec![a.clone()], []);
        assert_eq!(ns.file_value(&names).unwrap().text, "own.log");
        let ns = Namespace::new(vec![a, b], []);
        assert_eq!(ns.file_value(&names).unwrap().text, "b2.log");
        let texts: Vec<_> = ns.file_values(&names).into_iter().map(|f| f.text).collect();
        assert_eq!(texts, ["a.log", "own.log", "b.log", "b2.log"]);
    }

    #[test]
    fn templates() {
        let text = |s: &str| Piece::Text(s.into());
        let reference = |s: &str| Piece::Reference(s.into());
        assert_eq!(template("a$$b"), [text("a$b")]);
        assert_eq!(template("\\$x \\\\$y"), [text("$x \\$y")], "\\$ is $$");
        assert_eq!(template("$\\$x"), [text("$"), reference("x")], "made $$$x first");
        assert_eq!(
            template("${host}-$libvirt.pool./"),
            [reference("host"), text("-"), reference("libvirt.pool."), text("/")]
        );
        assert_eq!(template("5$ ${x y} $1 ${}"), [text("5$ ${x y} $1 ${}")]);
    }

    #[test]
    fn python_conversions() {
        assert_eq!(to_int(" +1_000 "), Ok(Value::Int(1000)));
        assert_eq!(to_int(""), Ok(Value::None));
        assert!(to_int("1.5").is_err() && to_int("1__0").is_err() && to_int("0x10").is_err());
        assert_eq!(to_float("1.e1"), Ok(Value::Float(10.0)));
        assert_eq!(to_float("-Infinity"), Ok(Value::Float(f64::NEG_INFINITY)));
        assert!(to_float("1.5f").is_err() && to_float(".").is_err() && to_float("e5").is_err());
        assert_eq!(to_bool("ON"), Ok(true));
        assert!(to_bool(" true").is_err());
        assert_eq!(to_list(" a,,b , ,,"), ["a", "", "b", ""]);
        assert_eq!(to_list(" , "), Vec::<String>::new());
        assert_eq!(to_host_domain("cmp1."), Ok("cmp1".into()));
        assert_eq!(to_host_domain("a_b.example"), Ok("a_b.example".into()));
        assert!(to_host_domain("10.0.0").is_err() && to_host_domain("-a").is_err() && to_host_domain("a@b").is_err());
        assert_eq!(Value::Float(1e16).to_python_str(), "1e+16");
        assert_eq!(Value::Float(1.5e-5).to_python_str(), "1.5e-05");
        assert_eq!(Value::Float(30.0).to_python_str(), "30.0");
        assert_eq!(Value::Float(0.25).to_python_str(), "0.25");
        assert_eq!(Value::List(vec!["a".into(), "it's".into()]).to_python_str(), "['a', \"it's\"]");
    }
}
