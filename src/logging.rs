//! Logs where oslo.log would write Nova's (`oslo_log/log.py` `_setup_logging_from_conf`):
//! to `log_file` (in `log_dir`) when set, to stderr when `use_stderr`, both when both, and to
//! the command's own stream when neither; text, or one JSON object a line with `use_json`;
//! DEBUG with `debug`, else INFO. `NOVASNAP_LOG` (an env filter) overrides the level.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value as Json};
use tracing::{Event, Subscriber};
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_log::NormalizeEvent;
use tracing_subscriber::fmt::format::{JsonFields, Writer};
use tracing_subscriber::fmt::writer::{BoxMakeWriter, MakeWriterExt};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

use crate::config::LoggingConfig;

/// Where logs go when neither a file nor `use_stderr` is configured: oslo's stdout for the
/// worker; stderr for a command whose stdout is its answer.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the log file {path}: {source}")]
    File { path: PathBuf, source: io::Error },
    #[error("cannot set up logging: {0}")]
    Init(String),
}

/// Keeps the file writer's thread until the command ends, so that its last lines are written.
#[must_use = "logs to a file stop when this is dropped"]
pub struct LogGuard {
    _worker: Option<WorkerGuard>,
}

pub fn init(config: &LoggingConfig, stream: Stream) -> Result<LogGuard, LogError> {
    let level = if config.debug { "info,novasnap=debug" } else { "info" };
    let filter = EnvFilter::try_from_env("NOVASNAP_LOG").unwrap_or_else(|_| EnvFilter::new(level));
    let mut guard = None;
    let mut writer: Option<BoxMakeWriter> = None;
    if let Some(path) = &config.file {
        let file = WatchedFile::open(path).map_err(|source| LogError::File { path: path.clone(), source })?;
        // Off the async threads: the file is checked (stat) before each line, as oslo's is.
        let (file, worker) = NonBlockingBuilder::default().lossy(false).finish(file);
        guard = Some(worker);
        writer = Some(BoxMakeWriter::new(file));
    }
    if config.stderr {
        writer = Some(match writer {
            Some(file) => BoxMakeWriter::new(file.and(io::stderr)),
            None => BoxMakeWriter::new(io::stderr),
        });
    }
    // Colour only when a terminal is the one destination: files and journals stay greppable.
    let (writer, ansi) = match (writer, stream) {
        (Some(writer), _) => (writer, config.file.is_none() && io::stderr().is_terminal()),
        (None, Stream::Stdout) => (BoxMakeWriter::new(io::stdout), io::stdout().is_terminal()),
        (None, Stream::Stderr) => (BoxMakeWriter::new(io::stderr), io::stderr().is_terminal()),
    };
    let registry = tracing_subscriber::registry().with(filter);
    let result = if config.json {
        let layer =
            tracing_subscriber::fmt::layer().fmt_fields(JsonFields::new()).event_format(JsonLine).with_writer(writer);
        registry.with(layer).try_init()
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_ansi(ansi).with_writer(writer)).try_init()
    };
    result.map_err(|e| LogError::Init(e.to_string()))?;
    Ok(LogGuard { _worker: guard })
}

/// One JSON object a line: time, level, target, then the fields of every span the event is
/// in (the snapshot's `request_id`, `instance`, `image`) and of the event itself, all at the
/// top level; an event's field wins over a span's of the same name.
struct JsonLine;

impl<S, N> FormatEvent<S, N> for JsonLine
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'w> FormatFields<'w> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        // Records of the `log` crate (rustls, …) carry their own target in `log.*` fields.
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        let mut line = Map::new();
        line.insert("timestamp".into(), chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true).into());
        line.insert("level".into(), metadata.level().as_str().into());
        line.insert("target".into(), metadata.target().into());
        for span in ctx.event_scope().into_iter().flat_map(|scope| scope.from_root()) {
            if let Some(fields) = span.extensions().get::<FormattedFields<N>>() {
                merge(&mut line, fields);
            }
        }
        let mut fields = String::new();
        ctx.format_fields(Writer::new(&mut fields), event)?;
        merge(&mut line, &fields);
        if normalized.is_some() {
            line.retain(|key, _| !key.starts_with("log."));
        }
        writeln!(writer, "{}", Json::Object(line))
    }
}

/// Fields formatted by `JsonFields` (a JSON object), added to `line`.
fn merge(line: &mut Map<String, Json>, fields: &str) {
    if let Ok(Json::Object(fields)) = serde_json::from_str(fields) {
        line.extend(fields);
    }
}

/// `logging.handlers.WatchedFileHandler`, oslo.log's file handler: before each write, a file
/// that was moved or removed (logrotate) is reopened at its path, so no signal is needed.
struct WatchedFile {
    path: PathBuf,
    file: File,
    identity: (u64, u64),
}

impl WatchedFile {
    fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let metadata = file.metadata()?;
        Ok(Self { path: path.to_owned(), file, identity: (metadata.dev(), metadata.ino()) })
    }
}

impl Write for WatchedFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let at_path = std::fs::metadata(&self.path).ok().map(|m| (m.dev(), m.ino()));
        if at_path != Some(self.identity) {
            *self = Self::open(&self.path)?;
        }
        self.file.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotated_log_file_is_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("novasnap.log");
        let mut file = WatchedFile::open(&path).unwrap();
        file.write_all(b"one\n").unwrap();
        std::fs::rename(&path, dir.path().join("novasnap.log.1")).unwrap();
        file.write_all(b"two\n").unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("novasnap.log.1")).unwrap(), "one\n");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two\n");
    }

    #[test]
    fn json_lines_carry_span_fields_at_the_top_level() {
        let (writer, lines) = Capture::new();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer().fmt_fields(JsonFields::new()).event_format(JsonLine).with_writer(writer),
        );
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("snapshot", request_id = "req-1", instance = "i-1", image = "img-1");
            let _entered = span.enter();
            tracing::info!(step = "flatten", "progress");
            tracing::info!(image = "old", "deleting rotated-out backup");
        });
        let lines: Vec<Json> =
            lines.lock().unwrap().lines().map(|l| serde_json::from_str(l).expect("one JSON object a line")).collect();
        assert_eq!(lines[0]["request_id"], "req-1");
        assert_eq!((lines[0]["instance"].as_str(), lines[0]["image"].as_str()), (Some("i-1"), Some("img-1")));
        assert_eq!((lines[0]["message"].as_str(), lines[0]["step"].as_str()), (Some("progress"), Some("flatten")));
        assert_eq!((lines[0]["level"].as_str(), lines[0]["target"].as_str()), (Some("INFO"), Some(module_path!())));
        assert_eq!(lines[1]["image"], "old", "the event's own field wins");
    }

    /// A writer into a string the test reads.
    #[derive(Clone)]
    struct Capture(std::sync::Arc<std::sync::Mutex<String>>);

    impl Capture {
        fn new() -> (Self, std::sync::Arc<std::sync::Mutex<String>>) {
            let lines = std::sync::Arc::default();
            (Self(std::sync::Arc::clone(&lines)), lines)
        }
    }

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().push_str(&String::from_utf8_lossy(buf));
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Capture {
        type Writer = Capture;
        fn make_writer(&'a self) -> Capture {
            self.clone()
        }
    }
}
