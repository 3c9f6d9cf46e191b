//! The mirror against a real HTTP client, one file per concern.

mod compat;
mod faults;
mod listing;
mod resolve;

use sha2::{Digest, Sha256};

use super::{Mirror, MirrorConfig, RepoSpec};

const REPO: &str = "acme/tiny";
const MODEL: &str = "tiny-Q4_K_M.gguf";
const OTHER: &str = "tiny-Q8_0.gguf";
/// Spans several read blocks, so block boundaries are exercised.
const MODEL_LEN: usize = 2 * super::body::BLOCK + 12_345;

/// Bytes that differ at every offset mod 251, so an off-by-one range shows up.
fn model_bytes() -> Vec<u8> {
    (0..MODEL_LEN).map(|i| (i % 251) as u8).collect()
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

async fn mirror() -> Mirror {
    mirror_with(MirrorConfig::new()).await
}

async fn mirror_with(config: MirrorConfig) -> Mirror {
    let spec = RepoSpec::new(REPO)
        .bytes(MODEL, model_bytes())
        .bytes(OTHER, b"small second file".to_vec())
        .bytes("sub/dir/nested.gguf", b"nested".to_vec());
    Mirror::start(config.repo(spec)).await.unwrap()
}

fn url(m: &Mirror, rev: &str, file: &str) -> String {
    format!("{}/{REPO}/resolve/{rev}/{file}", m.base_url())
}

fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .unwrap_or_else(|| panic!("no {name} header"))
        .to_str()
        .unwrap()
}
