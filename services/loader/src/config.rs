//! Loader settings: flags with environment fallbacks, shared by `llama-loader` and the CLI's
//! in-process mode. Validated before anything binds or touches disk.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::error::LoaderError;
pub use llama_agent_common::options::parse_size;

/// More connections than this is no longer "a few per file" but a load on the hub.
const MAX_CONNECTIONS: u32 = 64;
/// Each piece costs a request round trip: smaller ones would spend more time asking than
/// receiving.
const MIN_PART_SIZE: u64 = 64 << 10;

#[derive(clap::Args, Clone, Debug)]
pub struct LoaderConfig {
    /// Model cache directory (default ~/.cache/llama-loader).
    #[arg(long, env = "LLAMA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,

    /// Cache size cap in bytes (suffixes K, M, G, T and KiB, MiB, GiB, TiB accepted).
    #[arg(long, env = "LLAMA_CACHE_MAX_SIZE", default_value = "50000000000", value_parser = parse_size)]
    pub cache_max_size: u64,

    /// Hugging Face Hub endpoint (a mirror works too).
    #[arg(long, env = "HF_ENDPOINT", default_value = "https://huggingface.co")]
    pub hf_endpoint: String,

    /// Hub token for private or gated repos. Never logged.
    #[arg(long, env = "HF_TOKEN", hide_env_values = true)]
    pub hf_token: Option<Secret>,

    /// Attempts per file before a download fails (each resumes where the last stopped).
    #[arg(long, env = "LLAMA_LOADER_DOWNLOAD_ATTEMPTS", default_value_t = 8)]
    pub download_attempts: u32,

    /// Connections per file: a large file is fetched as pieces over this many ranged requests
    /// at once (1 = one stream, as a plain HTTP download).
    #[arg(long, env = "LLAMA_LOADER_DOWNLOAD_CONNECTIONS", default_value_t = 8)]
    pub download_connections: u32,

    /// Bytes per ranged request when a file is fetched over several connections; files under
    /// two pieces use one connection (suffixes as --cache-max-size).
    #[arg(long, env = "LLAMA_LOADER_DOWNLOAD_PART_SIZE", default_value = "16MiB", value_parser = parse_size)]
    pub download_part_size: u64,

    /// Seconds without a byte before a transfer is dropped and resumed.
    #[arg(long, env = "LLAMA_LOADER_STALL_TIMEOUT", default_value_t = 30)]
    pub stall_timeout_secs: u64,

    /// Allow references to local paths (copied into the cache). Turn off on shared servers.
    #[arg(long, env = "LLAMA_LOADER_LOCAL_IMPORT", default_value_t = true, action = clap::ArgAction::Set)]
    pub local_import: bool,
}

/// A string that never shows in logs or debug output.
#[derive(Clone)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

impl LoaderConfig {
    /// Settings for tests and embedding: a cache dir and a hub endpoint, defaults elsewhere.
    pub fn new(cache_dir: PathBuf, hf_endpoint: impl Into<String>) -> Self {
        Self {
            cache_dir: Some(cache_dir),
            cache_max_size: 50_000_000_000,
            hf_endpoint: hf_endpoint.into(),
            hf_token: None,
            download_attempts: 8,
            download_connections: 8,
            download_part_size: 16 << 20,
            stall_timeout_secs: 30,
            local_import: true,
        }
    }

    pub fn resolved_cache_dir(&self) -> Result<PathBuf, LoaderError> {
        match &self.cache_dir {
            Some(d) => Ok(d.clone()),
            None => default_cache_dir(),
        }
    }

    pub fn stall_timeout(&self) -> Duration {
        Duration::from_secs(self.stall_timeout_secs)
    }

    pub fn validate(&self) -> Result<(), LoaderError> {
        let bad = |m: String| Err(LoaderError::InvalidArgument(m));
        if self.cache_max_size == 0 {
            return bad("--cache-max-size must be greater than 0".into());
        }
        if !(self.hf_endpoint.starts_with("http://") || self.hf_endpoint.starts_with("https://")) {
            return bad(format!(
                "--hf-endpoint '{}' must be an http:// or https:// URL",
                self.hf_endpoint
            ));
        }
        if self.download_attempts == 0 {
            return bad("--download-attempts must be at least 1".into());
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.download_connections) {
            return bad(format!(
                "--download-connections must be between 1 and {MAX_CONNECTIONS}, not {}",
                self.download_connections
            ));
        }
        if self.download_part_size < MIN_PART_SIZE {
            return bad(format!(
                "--download-part-size must be at least {MIN_PART_SIZE} bytes (64KiB), not {}",
                self.download_part_size
            ));
        }
        if self.stall_timeout_secs == 0 {
            return bad("--stall-timeout-secs must be at least 1".into());
        }
        self.resolved_cache_dir().map(|_| ())
    }
}

/// `~/.cache/llama-loader`, what `llama-cli cache-dir` prints when LLAMA_CACHE_DIR is unset.
pub fn default_cache_dir() -> Result<PathBuf, LoaderError> {
    let home = std::env::var_os("HOME").ok_or_else(|| {
        LoaderError::InvalidArgument("HOME is not set; give --cache-dir or LLAMA_CACHE_DIR".into())
    })?;
    Ok(PathBuf::from(home).join(".cache").join("llama-loader"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn download_connections_and_part_size_are_bounded() {
        let dir = std::env::temp_dir();
        let with = |connections: u32, part: u64| {
            let mut c = LoaderConfig::new(dir.clone(), "http://127.0.0.1:1");
            c.download_connections = connections;
            c.download_part_size = part;
            c.validate().map_err(|e| e.to_string())
        };
        assert!(with(1, 64 << 10).is_ok());
        assert!(with(64, 16 << 20).is_ok());
        for (n, part) in [(0, 16 << 20), (65, 16 << 20)] {
            let e = with(n, part).unwrap_err();
            assert!(
                e.contains("--download-connections must be between 1 and 64"),
                "{e}"
            );
        }
        let e = with(8, 1000).unwrap_err();
        assert!(
            e.contains("--download-part-size must be at least 65536"),
            "{e}"
        );
    }
}
