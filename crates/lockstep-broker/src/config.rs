//! Broker settings, with the defaults `lockstep serve` uses.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = "./lockstep-data";
/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Default request body limit: 4 MiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
/// Default redb page cache: 64 MiB. Reads of a long log stream through it, so this caps the
/// memory the log takes however long it grows.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Default limit on one uploaded snapshot: 1 GiB.
pub const DEFAULT_MAX_SNAPSHOT_BYTES: usize = 1 << 30;

/// Default: a barrier every 10,000 events.
pub const DEFAULT_BARRIER_EVERY: u64 = 10_000;
/// Default: a barrier every 10 s while events arrive.
pub const DEFAULT_BARRIER_INTERVAL_MS: u64 = 10_000;

/// How the broker runs. Every field has a default; a TOML config file may set any of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the log lives (`log.redb` inside).
    pub data_dir: PathBuf,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Largest request body accepted, in bytes; larger ones get 413.
    pub max_body_bytes: usize,
    /// redb page cache size, in bytes.
    pub cache_bytes: usize,
    /// Append a barrier after this many events (0: never by count).
    pub barrier_every: u64,
    /// Append a barrier this often while events arrive, in milliseconds (0: never by time).
    pub barrier_interval_ms: u64,
    /// Largest snapshot a replica may upload, in bytes; larger ones get 413.
    pub max_snapshot_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            listen: DEFAULT_LISTEN
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 7700))),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            cache_bytes: DEFAULT_CACHE_BYTES,
            barrier_every: DEFAULT_BARRIER_EVERY,
            barrier_interval_ms: DEFAULT_BARRIER_INTERVAL_MS,
            max_snapshot_bytes: DEFAULT_MAX_SNAPSHOT_BYTES,
        }
    }
}

impl Config {
    /// Defaults with the log in `data_dir`.
    pub fn with_data_dir(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Parses a TOML config file's text. The error is one line, naming the line at fault.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| {
                let before = &text.as_bytes()[..span.start.min(text.len())];
                1 + before.iter().filter(|&&b| b == b'\n').count()
            });
            let message = e.message().trim().replace('\n', "; ");
            match line {
                Some(line) => format!("line {line}: {message}"),
                None => message,
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_overrides_and_refuses_unknown_keys() {
        let c = Config::from_toml("data_dir = \"/tmp/x\"\nmax_body_bytes = 10\n").unwrap();
        assert_eq!(c.data_dir, PathBuf::from("/tmp/x"));
        assert_eq!(c.max_body_bytes, 10);
        assert_eq!(c.listen.port(), 7700);
        assert!(
            Config::from_toml("colour = 1")
                .unwrap_err()
                .contains("colour")
        );
    }
}
