//! The application log (`tracing`) of every command, on stderr: `text` (`key=value` fields,
//! colour only on a terminal) or `json` (one object per line, the event's fields at the top
//! level), and its level. `gateway run` writes it through a queue ([`output`]): a stderr that
//! stalls loses lines, counted, and never holds the proxy.
//!
//! Which level applies, first match wins:
//!
//! 1. `RUST_LOG`, when set and not empty. An invalid value is an error that stops the command
//!    (a typo must not silently log at another level, or not at all);
//! 2. `gateway run`: `[log] level` of the config, checked by `check-config` like any key;
//! 3. the command's default (`info`; `gateway diagnose`: `warn`).
//!
//! A level is an `EnvFilter` directive list: `info`, `warn,gateway::proxy=debug`. A bare word
//! that is not a level (`warning`, `verbose`) is refused: `tracing` would read it as a target
//! name and turn every other log line off. Write `TARGET=LEVEL` for a target.
//!
//! `gateway run` can change the level while it runs: `PUT /logging` on the admin listener
//! (loopback clients only, see `proxy::admin`), which calls [`set_level`]. SIGHUP applies the
//! config's level again (unless `RUST_LOG` set it, which always wins).

pub mod output;
pub mod panic;
pub mod std_stream;

use std::sync::{Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tracing_subscriber::{
    EnvFilter, Layer, Registry, filter::LevelFilter, fmt::writer::BoxMakeWriter,
    layer::SubscriberExt as _, reload, util::SubscriberInitExt as _,
};

/// `[log] format`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// `2026-11-20T10:00:00.000Z  WARN gateway::proxy: endpoint ejected cluster=api …`
    #[default]
    Text,
    /// `{"timestamp":"…","level":"WARN","message":"endpoint ejected","cluster":"api",…,"target":"…"}`
    Json,
}

/// The level names `tracing` knows, for messages.
pub const LEVELS: &str = "trace, debug, info, warn, error, off";

/// Why a level (directive list) was refused.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum LevelError {
    #[error("the level is empty; use one of {LEVELS}, or e.g. `info,gateway::proxy=debug`")]
    Empty,
    #[error(
        "`{word}` is not a level ({LEVELS}); for a target write `{word}=LEVEL`, e.g. `info,gateway::proxy=debug`"
    )]
    BareWord { word: String },
    #[error("`{directive}`: {reason}; use one of {LEVELS}, or e.g. `info,gateway::proxy=debug`")]
    Invalid { directive: String, reason: String },
}

/// Parses a directive list strictly (see the module doc).
pub fn parse_level(text: &str) -> Result<EnvFilter, LevelError> {
    let directives: Vec<&str> = text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(LevelError::Empty);
    }
    for d in &directives {
        if !d.contains('=') && !d.contains('[') && d.parse::<LevelFilter>().is_err() {
            return Err(LevelError::BareWord {
                word: (*d).to_owned(),
            });
        }
        if let Err(e) = EnvFilter::builder().parse(d) {
            return Err(LevelError::Invalid {
                directive: (*d).to_owned(),
                reason: e.to_string(),
            });
        }
    }
    EnvFilter::builder()
        .parse(directives.join(","))
        .map_err(|e| LevelError::Invalid {
            directive: text.to_owned(),
            reason: e.to_string(),
        })
}

/// Why logging could not start.
#[derive(Debug, Error)]
pub enum LogError {
    #[error(
        "RUST_LOG={value:?} is invalid: {source}. Fix it or unset it (the config's [log] level, or the default, then applies)"
    )]
    Env { value: String, source: LevelError },
    #[error("RUST_LOG is not valid UTF-8")]
    EnvNotUnicode,
}

/// Where the level in force came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    Env,
    Config,
    Default,
    /// `PUT /logging` on the admin listener.
    Admin,
}

impl Source {
    pub const fn name(self) -> &'static str {
        match self {
            Source::Env => "RUST_LOG",
            Source::Config => "the config's [log] level",
            Source::Default => "the default",
            Source::Admin => "the admin API",
        }
    }
}

/// The level in force and where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Level {
    pub directives: String,
    pub source: Source,
}

struct Control {
    handle: reload::Handle<EnvFilter, Registry>,
    level: Mutex<Level>,
    default: &'static str,
}

static CONTROL: OnceLock<Control> = OnceLock::new();

/// Whether `RUST_LOG` is one `gateway run` starts with (`check-config` asks: a value that
/// passed it stopped `run`).
pub fn check_env() -> Result<(), LogError> {
    env_level().map(|_| ())
}

/// `RUST_LOG`, checked: `None` when unset or empty.
fn env_level() -> Result<Option<(String, EnvFilter)>, LogError> {
    match std::env::var("RUST_LOG") {
        Ok(v) if v.trim().is_empty() => Ok(None),
        Ok(v) => match parse_level(&v) {
            Ok(f) => Ok(Some((v, f))),
            Err(source) => Err(LogError::Env { value: v, source }),
        },
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(LogError::EnvNotUnicode),
    }
}

/// Starts logging on stderr in `format`, at `RUST_LOG`, else `configured` (already validated),
/// else `default`. Fails only on an invalid `RUST_LOG`. When a subscriber is already installed
/// (tests running several commands in one process) it leaves it in place.
///
/// The commands a person runs and watches write each line in place, in order with what they
/// print; `gateway run` uses [`init_queued`].
pub fn init(
    format: LogFormat,
    configured: Option<&str>,
    default: &'static str,
) -> Result<(), LogError> {
    install(
        format,
        (configured, default),
        BoxMakeWriter::new(std::io::stderr),
    )
    .map(drop)
}

/// [`init`] for `gateway run`: the lines go to stderr through a queue and a thread of their
/// own ([`output`]), so a stderr that stalls never holds a worker. The thread starts with
/// [`output::Guard::start_writer`]; until then lines wait in the queue. Keep the guard until
/// the end: its drop writes out what is still queued. `None` when a subscriber was already
/// installed.
pub fn init_queued(
    format: LogFormat,
    configured: Option<&str>,
    default: &'static str,
) -> Result<Option<output::Guard>, LogError> {
    let (queue, guard) = output::queue(Box::new(std_stream::StdStream::stderr()));
    let installed = install(format, (configured, default), BoxMakeWriter::new(queue))?;
    Ok(installed.then_some(guard))
}

/// Installs the subscriber writing to `writer`; `false` when one was already installed.
fn install(
    format: LogFormat,
    (configured, default): (Option<&str>, &'static str),
    writer: BoxMakeWriter,
) -> Result<bool, LogError> {
    let (level, filter) = match env_level()? {
        Some((v, f)) => (
            Level {
                directives: v,
                source: Source::Env,
            },
            f,
        ),
        None => pick(configured, default),
    };
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt: Box<dyn Layer<_> + Send + Sync> = match format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(writer)
            .with_ansi(ansi)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(writer)
            .boxed(),
    };
    let installed = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .is_ok();
    if installed {
        let _ = CONTROL.set(Control {
            handle,
            level: Mutex::new(level),
            default,
        });
    }
    Ok(installed)
}

/// The configured level (valid: `check-config` refused anything else), else the default.
fn pick(configured: Option<&str>, default: &'static str) -> (Level, EnvFilter) {
    if let Some(c) = configured
        && let Ok(f) = parse_level(c)
    {
        let level = Level {
            directives: c.to_owned(),
            source: Source::Config,
        };
        return (level, f);
    }
    let level = Level {
        directives: default.to_owned(),
        source: Source::Default,
    };
    (level, EnvFilter::new(default))
}

/// The level in force; `None` when this process's log was not started by [`init`].
pub fn current() -> Option<Level> {
    let c = CONTROL.get()?;
    Some(c.level.lock().unwrap_or_else(|p| p.into_inner()).clone())
}

/// Why the level could not be changed.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SetLevelError {
    #[error("{0}")]
    Invalid(LevelError),
    #[error("this process's log is not run by gateway (embedded), so its level cannot be changed")]
    NotControlled,
}

/// Changes the level at once (the admin API). Returns the level it replaced.
pub fn set_level(directives: &str) -> Result<Level, SetLevelError> {
    let c = CONTROL.get().ok_or(SetLevelError::NotControlled)?;
    let filter = parse_level(directives).map_err(SetLevelError::Invalid)?;
    apply(
        c,
        filter,
        Level {
            directives: directives.trim().to_owned(),
            source: Source::Admin,
        },
    )
}

/// After a config reload: the config's level (or the default) again, or `RUST_LOG`'s when it
/// is set, which wins over the config also after the admin API changed the level (that
/// change lasts until the reload, whatever set the level before it). Returns the level now in
/// force.
pub fn apply_config(configured: Option<&str>) -> Option<Level> {
    let c = CONTROL.get()?;
    let (level, filter) = match env_level() {
        Ok(Some((directives, filter))) => (
            Level {
                directives,
                source: Source::Env,
            },
            filter,
        ),
        _ => pick(configured, c.default),
    };
    let _ = apply(c, filter, level);
    current()
}

fn apply(c: &Control, filter: EnvFilter, level: Level) -> Result<Level, SetLevelError> {
    c.handle
        .reload(filter)
        .map_err(|_| SetLevelError::NotControlled)?;
    let mut now = c.level.lock().unwrap_or_else(|p| p.into_inner());
    Ok(std::mem::replace(&mut *now, level))
}

/// The error and its causes, `: `-separated: what `main` prints, and the observer's reason for
/// running without it. A cause is left out when the text before already has it: most of our
/// errors say their source in their own message, some with a hint after it, and `{err:#}`
/// printed `cannot listen on …: Address already in use (os error 98): Address already in use
/// (os error 98)`.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = err.to_string();
    for cause in err.chain().skip(1) {
        let cause = cause.to_string();
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_and_target_directives_parse() {
        for ok in [
            "info",
            "WARN",
            "debug,hyper=info",
            "warn,gateway::proxy=debug",
            " info , gateway=trace ",
            "off",
            "gateway[request]=debug",
        ] {
            assert!(parse_level(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn typos_are_refused_with_a_hint() {
        assert_eq!(
            parse_level("warning").unwrap_err(),
            LevelError::BareWord {
                word: "warning".into()
            }
        );
        assert!(
            parse_level("info,verbose")
                .unwrap_err()
                .to_string()
                .contains("`verbose` is not a level (trace, debug, info, warn, error, off)")
        );
        assert!(matches!(
            parse_level("gateway=loud"),
            Err(LevelError::Invalid { .. })
        ));
        assert_eq!(parse_level(" , ").unwrap_err(), LevelError::Empty);
    }
}
