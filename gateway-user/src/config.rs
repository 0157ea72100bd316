//! The gateway's config: one TOML file, one serde tree (`model`), validated into the
//! [`Settings`] the proxy runs on (`validate`). Errors and warnings name the file, the line and
//! the key, and say what is allowed; `gateway check-config` prints them.
//!
//! The smallest useful file uses the layout most gateways document:
//!
//! ```toml
//! [router]
//! listener_port = 8080
//!
//! [router.upstream]
//! endpoints = ["10.0.0.5:8080"]
//!
//! [router.upstream.timeouts]
//! connect_timeout_ms = 6000
//! ```
//!
//! Durations are always integers in milliseconds, in keys ending in `_ms`.

pub mod model;
pub mod settings;
mod source;
mod validate;

#[cfg(test)]
mod balancing_tests;
#[cfg(test)]
mod edge_tests;
#[cfg(test)]
mod route_tests;
#[cfg(test)]
mod shadow_tests;
#[cfg(test)]
mod test_util;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tls_tests;

use std::{
    fmt,
    path::{Path, PathBuf},
    process::ExitCode,
};

use thiserror::Error;

pub use self::{
    model::{Config, ObserverMode},
    settings::*,
    source::{KeyPath, Position},
    validate::{Invalid, Warning},
};
use self::{source::Source, validate::At};

/// A config that passed validation, and what it warned about.
#[derive(Clone, Debug)]
pub struct Loaded {
    pub settings: Settings,
    pub warnings: Vec<Located<Warning>>,
}

/// A finding tied to a place in the file.
#[derive(Clone, Debug, PartialEq)]
pub struct Located<T> {
    pub file: PathBuf,
    /// `None` when the finding is about a default nobody wrote and no parent table exists.
    pub position: Option<Position>,
    pub key: KeyPath,
    /// The file's line at `position`, shown under the message.
    pub line_text: Option<String>,
    pub what: T,
}

impl<T: fmt::Display> fmt::Display for Located<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(p) = self.position {
            write!(f, ":{}:{}", p.line, p.column)?;
        }
        if !self.key.is_root() {
            write!(f, ": key `{}`", self.key)?;
        }
        write!(f, ": {}", self.what)?;
        if let (Some(p), Some(text)) = (self.position, &self.line_text) {
            write!(f, "\n  {:>4} | {}", p.line, text)?;
        }
        Ok(())
    }
}

/// Why a config was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {source}", file.display())]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or TOML that does not fit the schema (unknown key, wrong type).
    #[error("{0}")]
    Parse(Box<Located<ParseProblem>>),
    /// Well-formed but refused by `validate`; every problem found, in file order.
    #[error("{}", display_all(.0))]
    Invalid(Vec<Located<Invalid>>),
}

/// The `toml` parser's or serde's own message, e.g. "unknown field `conect_timeout_ms`,
/// expected one of `connect_timeout_ms`, ...".
#[derive(Clone, Debug, Error, PartialEq)]
#[error("{message}")]
pub struct ParseProblem {
    pub message: String,
}

fn display_all<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads, parses and validates a config file.
pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
    let text = read(path).map_err(|source| ConfigError::Read {
        file: path.to_owned(),
        source,
    })?;
    load_str(&text, path)
}

/// The most a config file may hold: far above any real one (thousands of routes), and a
/// bound on what a wrong path (`/dev/zero`, a log file) makes the process read.
pub const MAX_CONFIG_BYTES: u64 = 16 * 1024 * 1024;

/// A config file's text, of at most [`MAX_CONFIG_BYTES`], in UTF-8: a regular file, or a pipe
/// (`check-config <(envsubst < gateway.toml.in)`, `… | check-config /dev/stdin`). Opened
/// without waiting, so that a FIFO nobody writes to reads as empty, not a hang; a device
/// (`/dev/zero`) or a directory is refused.
fn read(path: &Path) -> std::io::Result<String> {
    use std::{io::Read as _, os::fd::AsRawFd as _, os::unix::fs::OpenOptionsExt as _};
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    let kind = meta.file_type();
    let too_large = || {
        std::io::Error::other(format!(
            "larger than {} MiB: not a config file",
            MAX_CONFIG_BYTES >> 20
        ))
    };
    if kind.is_file() {
        if meta.len() > MAX_CONFIG_BYTES {
            return Err(too_large());
        }
    } else if std::os::unix::fs::FileTypeExt::is_fifo(&kind) {
        // Waits for what the writer sends from here on (none left: the end, at once).
        // SAFETY: fcntl(2) on the descriptor `file` owns.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, 0) };
    } else {
        let what = if kind.is_dir() {
            "a directory"
        } else {
            "a device or a socket"
        };
        return Err(std::io::Error::other(format!(
            "it is {what}, not a file or a pipe"
        )));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_BYTES + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_CONFIG_BYTES {
        return Err(too_large());
    }
    Ok(text)
}

/// Parses and validates config text; `file` is only used in messages.
pub fn load_str(text: &str, file: &Path) -> Result<Loaded, ConfigError> {
    let mut src = Source { text, doc: None };
    let doc = match toml::de::DeTable::parse(text) {
        Ok(doc) => doc,
        Err(e) => return Err(parse_error(&src, file, KeyPath::root(), &e)),
    };
    src.doc = Some(doc.clone());
    let de = toml::de::Deserializer::from(doc);
    let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = KeyPath::from_serde(e.path());
        parse_error(&src, file, key, e.inner())
    })?;
    match validate::validate(&cfg, file.parent()) {
        Ok((settings, warnings)) => Ok(Loaded {
            settings,
            warnings: warnings
                .into_iter()
                .map(|w| locate(&src, file, w))
                .collect(),
        }),
        Err(problems) => {
            let mut problems: Vec<_> = problems
                .into_iter()
                .map(|p| locate(&src, file, p))
                .collect();
            problems.sort_by_key(|p| p.position.map(|p| (p.line, p.column)));
            Err(ConfigError::Invalid(problems))
        }
    }
}

fn parse_error(src: &Source<'_>, file: &Path, key: KeyPath, e: &toml::de::Error) -> ConfigError {
    let position = e
        .span()
        .map(|s| src.position(s.start))
        .or_else(|| src.position_of(&key));
    ConfigError::Parse(Box::new(Located {
        file: file.to_owned(),
        position,
        line_text: position
            .and_then(|p| src.line_text(p.line))
            .map(str::to_owned),
        key,
        what: ParseProblem {
            message: with_example(e.message().trim()),
        },
    }))
}

/// serde's message, with what was expected when it says only that the text was not it:
/// `"localhost:8080"` or `":8080"` got "invalid socket address syntax" alone.
fn with_example(message: &str) -> String {
    if message == "invalid socket address syntax" {
        return format!(
            "{message}: expected an IP address and a port, e.g. \"0.0.0.0:8080\", \"127.0.0.1:8080\" or \"[::]:8080\" (a listener binds an address, not a host name)"
        );
    }
    message.to_owned()
}

fn locate<T>(src: &Source<'_>, file: &Path, at: At<T>) -> Located<T> {
    let position = src.position_of(&at.key);
    Located {
        file: file.to_owned(),
        position,
        line_text: position
            .and_then(|p| src.line_text(p.line))
            .map(str::to_owned),
        key: at.key,
        what: at.what,
    }
}

/// `gateway check-config FILE`: exit 0 with a summary (and warnings on stderr), or an error
/// naming file, line and key.
pub fn cli_check(path: &Path) -> anyhow::Result<ExitCode> {
    let loaded = load(path)?;
    crate::logging::check_env()?;
    for w in &loaded.warnings {
        eprintln!("warning: {w}");
    }
    let s = &loaded.settings;
    let listen: Vec<String> = s.listen.iter().map(ToString::to_string).collect();
    let https = s.https.as_ref().map_or_else(String::new, |h| {
        let a: Vec<String> = h.listen.iter().map(ToString::to_string).collect();
        format!(", https {}", a.join(" "))
    });
    println!(
        "{}: ok: listen {}{https}, {} route(s), {} cluster(s), {} warning(s)",
        path.display(),
        listen.join(" "),
        s.routes.len(),
        s.clusters.len(),
        loaded.warnings.len()
    );
    Ok(ExitCode::SUCCESS)
}
