//! What the config's unit tests share: a config loaded from text as the file `gw.toml`.

use std::path::Path;

use super::*;

pub(super) fn load(text: &str) -> Result<Loaded, ConfigError> {
    load_str(text, Path::new("gw.toml"))
}

/// The error a config that must be refused gets.
pub(super) fn err(text: &str) -> String {
    match load(text) {
        Ok(_) => panic!("config was accepted:\n{text}"),
        Err(e) => e.to_string(),
    }
}
