//! Configuration: one TOML file (`weir.toml`) overridden by `WEIR_*` environment variables.
//!
//! Every setting has a documented default in code, so no file is needed at all. Environment
//! variables name a key path with `__` between levels: `WEIR_ROUTER__LISTEN=0.0.0.0:50051` sets
//! `[router] listen`. Invalid configuration fails at start-up with a message naming the key.

use std::path::{Path, PathBuf};

use figment::{
    Figment,
    providers::{Env, Format, Toml},
};
use serde::de::DeserializeOwned;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "WEIR_";
/// Separator between key levels in environment overrides.
pub const ENV_SPLIT: &str = "__";
/// Environment variable naming the config file when `--config` is not given.
pub const CONFIG_PATH_ENV: &str = "WEIR_CONFIG";

/// A configuration error, naming the file or key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` or `WEIR_CONFIG` does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// A key has the wrong type or an unknown name.
    #[error("invalid configuration: `{key}`: {message} (in {source_name})")]
    Parse {
        /// The key path, e.g. `router.listen`.
        key: String,
        /// What is wrong.
        message: String,
        /// Where the value came from: the file, or the `WEIR_` environment.
        source_name: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid configuration: `{key}`: {message}")]
    Invalid {
        /// The key path, e.g. `models.sim-small.context_window`.
        key: String,
        /// What is wrong and what is expected.
        message: String,
    },
}

impl ConfigError {
    /// An invalid value at `key`.
    pub fn invalid(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl ConfigError {
    /// Converts a figment error found while reading the table at `section`. (figment appends the
    /// table name after the inner key, so the path is put back in order here.)
    fn from_figment(section: &str, error: figment::Error) -> Self {
        let mut path = error.path.clone();
        if path.last().is_some_and(|last| last == section) {
            path.pop();
        }
        if path.first().is_none_or(|first| first != section) {
            path.insert(0, section.to_string());
        }
        let key = path
            .iter()
            .map(|part| part.to_ascii_lowercase())
            .collect::<Vec<_>>()
            .join(".");
        let source_name = error
            .metadata
            .as_ref()
            .map(|m| match &m.source {
                Some(source) => format!("{} {source}", m.name),
                None => m.name.to_string(),
            })
            .unwrap_or_else(|| "configuration".to_string());
        Self::Parse {
            key,
            message: error.kind.to_string(),
            source_name,
        }
    }
}

/// The layered configuration source: the TOML file (if any), then `WEIR_*` variables.
#[derive(Debug, Clone)]
pub struct Source {
    figment: Figment,
}

impl Source {
    /// Loads `path`, or the file named by `WEIR_CONFIG`, or nothing (all defaults); then applies
    /// `WEIR_*` environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os(CONFIG_PATH_ENV).map(PathBuf::from));
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed(ENV_PREFIX)
                .split(ENV_SPLIT)
                .ignore(&["CONFIG"]),
        );
        Ok(Self { figment })
    }

    /// A source from TOML text (no environment), for tests and embedding.
    pub fn from_toml(text: &str) -> Self {
        Self {
            figment: Figment::new().merge(Toml::string(text)),
        }
    }

    /// Deserializes the table at `key` (e.g. `"router"`), or `T::default()` if it is absent.
    /// Types use `#[serde(default)]` so a partial table keeps the defaults of what it omits.
    pub fn section<T: DeserializeOwned + Default>(&self, key: &str) -> Result<T, ConfigError> {
        if self.figment.find_value(key).is_err() {
            return Ok(T::default());
        }
        self.figment
            .extract_inner(key)
            .map_err(|error| ConfigError::from_figment(key, error))
    }
}

/// Serde for an optional listen address: `""` is `None` (the endpoint is off), anything else
/// must parse as a socket address such as `127.0.0.1:9464`. Use with
/// `#[serde(with = "weir_mesh::config::optional_addr")]` on an `Option<SocketAddr>`.
pub mod optional_addr {
    use std::net::SocketAddr;

    use serde::{Deserialize, Deserializer, Serializer};

    /// Writes `None` as `""`.
    pub fn serialize<S: Serializer>(addr: &Option<SocketAddr>, s: S) -> Result<S::Ok, S::Error> {
        match addr {
            Some(addr) => s.collect_str(addr),
            None => s.serialize_str(""),
        }
    }

    /// Reads `""` (or blanks) as `None`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
        let text = String::deserialize(d)?;
        let text = text.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|error| {
            serde::de::Error::custom(format!(
                "{text:?} is not an address such as 127.0.0.1:9464 ({error}); use \"\" to turn \
                 the endpoint off"
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Demo {
        listen: String,
        #[serde(with = "humantime_serde")]
        grace: std::time::Duration,
    }

    #[test]
    fn absent_section_is_default() {
        let source = Source::from_toml("");
        assert_eq!(source.section::<Demo>("demo").ok(), Some(Demo::default()));
    }

    #[test]
    fn partial_section_keeps_defaults_and_parses_durations() {
        let source = Source::from_toml("[demo]\ngrace = \"250ms\"\n");
        let demo: Demo = source.section("demo").unwrap_or_default();
        assert_eq!(demo.grace, std::time::Duration::from_millis(250));
        assert_eq!(demo.listen, "");
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let source = Source::from_toml("[demo]\nlisten_addr = \"x\"\n");
        let error = source.section::<Demo>("demo").err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("listen_addr")),
            "{error:?}"
        );
    }

    #[test]
    fn bad_value_names_the_full_key_in_order() {
        let source = Source::from_toml("[demo]\ngrace = \"soon\"\n");
        let error = source.section::<Demo>("demo").err().map(|e| e.to_string());
        assert!(
            error.as_deref().is_some_and(|e| e.contains("`demo.grace`")),
            "{error:?}"
        );
    }

    #[test]
    fn missing_file_is_an_error() {
        let error = Source::load(Some(Path::new("/nonexistent/weir.toml"))).err();
        assert!(matches!(error, Some(ConfigError::Missing(_))));
    }
}
