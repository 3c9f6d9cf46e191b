//! The Hugging Face Hub, through the `hf-hub` crate: its API client (endpoint, token, user agent),
//! its repo-info request and its resolve URLs. The byte transfer itself is `fetch.rs`, because
//! hf-hub 0.4 writes chunks out of order and so cannot hash the file in the same pass.

use hf_hub::api::tokio::{Api, ApiBuilder};
use hf_hub::{Repo, RepoType};
use serde::Deserialize;

use crate::error::{LoaderError, Result};
use crate::reference::{FileSelector, HubRef};

/// Quants tried in order when a reference names none: the usual llama.cpp sweet spot first,
/// then the near-lossless one, then everything else from better to smaller.
pub const QUANT_PREFERENCE: &[&str] = &[
    "Q4_K_M", "Q8_0", "Q5_K_M", "Q6_K", "Q4_K_S", "Q5_K_S", "Q4_0", "IQ4_XS", "Q3_K_M", "Q3_K_L",
    "Q2_K", "F16", "BF16", "F32",
];

#[derive(Clone)]
pub struct Hub {
    api: Api,
    endpoint: String,
}

/// One file the hub lists, with what it says about it.
#[derive(Clone, Debug, Deserialize)]
pub struct Sibling {
    pub rfilename: String,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub lfs: Option<LfsInfo>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct LfsInfo {
    pub sha256: String,
    pub size: u64,
}

#[derive(Clone, Debug, Deserialize)]
struct RepoInfo {
    sha: String,
    #[serde(default)]
    siblings: Vec<Sibling>,
}

/// What a reference resolved to on the hub: the commit and the files to fetch.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub commit: String,
    pub files: Vec<RemoteFile>,
}

#[derive(Clone, Debug)]
pub struct RemoteFile {
    pub name: String,
    pub url: String,
    pub size: u64,
    pub sha256: Option<String>,
}

impl Hub {
    pub fn new(endpoint: &str, token: Option<String>) -> Result<Self> {
        let endpoint = endpoint.trim_end_matches('/').to_string();
        let api = ApiBuilder::new()
            .with_endpoint(endpoint.clone())
            .with_token(token)
            .with_progress(false)
            .with_user_agent("llama-agent", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| LoaderError::Hub(format!("building the hub client: {e}")))?;
        Ok(Self { api, endpoint })
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The authenticated HTTP client hf-hub built (token and user agent already set).
    pub fn client(&self) -> &reqwest::Client {
        self.api.client()
    }

    fn repo(&self, repo: &str, revision: &str) -> hf_hub::api::tokio::ApiRepo {
        self.api.repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ))
    }

    /// Lists the repo at the revision and picks the files the reference names.
    pub async fn resolve(&self, r: &HubRef) -> Result<Resolved> {
        let response = self
            .repo(&r.repo, &r.revision)
            .info_request()
            .query(&[("blobs", "true")])
            .send()
            .await
            .map_err(|e| LoaderError::Hub(format!("{}: {e}", self.endpoint)))?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(LoaderError::RepoNotFound {
                repo: r.repo.clone(),
                revision: r.revision.clone(),
                endpoint: self.endpoint.clone(),
            });
        }
        if !status.is_success() {
            return Err(LoaderError::Hub(format!(
                "listing {} answered {status}",
                r.repo
            )));
        }
        let info: RepoInfo = response
            .json()
            .await
            .map_err(|e| LoaderError::Hub(format!("reading the listing of {}: {e}", r.repo)))?;
        let chosen = select_files(&info.siblings, &r.selector).map_err(|why| {
            LoaderError::FileNotFound(format!("{}@{}: {why}", r.repo, r.revision))
        })?;
        // Files come from the listed commit, so every shard of a split model matches.
        let pinned = self.repo(&r.repo, &info.sha);
        let files = chosen
            .into_iter()
            .map(|s| RemoteFile {
                url: pinned.url(&s.rfilename),
                size: s.lfs.as_ref().map(|l| l.size).or(s.size).unwrap_or(0),
                sha256: s.lfs.as_ref().map(|l| l.sha256.to_ascii_lowercase()),
                name: s.rfilename,
            })
            .collect();
        Ok(Resolved {
            commit: info.sha,
            files,
        })
    }
}

/// Picks the files a selector names: one file, or every shard of a split model.
pub fn select_files(siblings: &[Sibling], selector: &FileSelector) -> Result<Vec<Sibling>, String> {
    let mut ggufs: Vec<&Sibling> = siblings
        .iter()
        .filter(|s| {
            let lower = s.rfilename.to_ascii_lowercase();
            lower.ends_with(".gguf") && !lower.contains("mmproj")
        })
        .collect();
    ggufs.sort_by(|a, b| a.rfilename.cmp(&b.rfilename));
    let available = || {
        let names: Vec<&str> = ggufs.iter().map(|s| s.rfilename.as_str()).collect();
        if names.is_empty() {
            "the repository has no .gguf files".to_string()
        } else {
            format!("available: {}", names.join(", "))
        }
    };
    let first = match selector {
        FileSelector::File(f) => siblings
            .iter()
            .find(|s| &s.rfilename == f)
            .ok_or_else(|| format!("no file '{f}' ({})", available()))?,
        FileSelector::Quant(q) => *ggufs
            .iter()
            .find(|s| quant_matches(&s.rfilename, q))
            .ok_or_else(|| format!("no {q} file ({})", available()))?,
        FileSelector::Auto => QUANT_PREFERENCE
            .iter()
            .find_map(|q| ggufs.iter().find(|s| quant_matches(&s.rfilename, q)))
            .or(ggufs.first())
            .copied()
            .ok_or_else(available)?,
    };
    match shard_of(&first.rfilename) {
        None => Ok(vec![first.clone()]),
        Some((prefix, _, count)) => {
            let mut shards = Vec::with_capacity(count as usize);
            for i in 1..=count {
                let name = format!("{prefix}-{i:05}-of-{count:05}.gguf");
                let s = siblings
                    .iter()
                    .find(|s| s.rfilename == name)
                    .ok_or_else(|| format!("split model is missing shard '{name}'"))?;
                shards.push(s.clone());
            }
            Ok(shards)
        }
    }
}

/// `model-Q4_K_M.gguf` matches `Q4_K_M` but `model-Q4_K_M.gguf` does not match `Q4_K`.
fn quant_matches(name: &str, quant: &str) -> bool {
    let base = name.rsplit('/').next().unwrap_or(name).to_ascii_uppercase();
    let quant = quant.to_ascii_uppercase();
    base.match_indices(&quant).any(|(i, _)| {
        let before = base[..i].chars().next_back();
        let after = base[i + quant.len()..].chars().next();
        before.is_none_or(|c| !c.is_ascii_alphanumeric())
            && after.is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_')
    })
}

/// `x-00001-of-00003.gguf` → (`x`, 1, 3).
pub fn shard_of(name: &str) -> Option<(&str, u32, u32)> {
    let stem = name.strip_suffix(".gguf")?;
    let (rest, count) = stem.rsplit_once("-of-")?;
    let (prefix, index) = rest.rsplit_once('-')?;
    if index.len() != 5 || count.len() != 5 {
        return None;
    }
    Some((prefix, index.parse().ok()?, count.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sib(names: &[&str]) -> Vec<Sibling> {
        names
            .iter()
            .map(|n| Sibling {
                rfilename: n.to_string(),
                size: Some(1),
                lfs: None,
            })
            .collect()
    }

    fn pick(names: &[&str], sel: FileSelector) -> Result<Vec<String>, String> {
        select_files(&sib(names), &sel).map(|v| v.into_iter().map(|s| s.rfilename).collect())
    }

    #[test]
    fn quant_boundaries() {
        assert!(quant_matches("m-Q4_K_M.gguf", "Q4_K_M"));
        assert!(quant_matches(
            "qwen2.5-7b-instruct-q4_k_m-00001-of-00002.gguf",
            "Q4_K_M"
        ));
        assert!(!quant_matches("m-Q4_K_M.gguf", "Q4_K"));
        assert!(!quant_matches("m-Q4_0_4_4.gguf", "Q4_0"));
        assert!(quant_matches("m_Q8_0.gguf", "Q8_0"));
    }

    #[test]
    fn auto_prefers_q4_k_m_then_q8_0() {
        let files = [
            "README.md",
            "m-F16.gguf",
            "m-Q8_0.gguf",
            "m-Q4_K_M.gguf",
            "mmproj-Q4_K_M.gguf",
        ];
        assert_eq!(pick(&files, FileSelector::Auto).unwrap(), ["m-Q4_K_M.gguf"]);
        assert_eq!(
            pick(&files[..3], FileSelector::Auto).unwrap(),
            ["m-Q8_0.gguf"]
        );
        assert_eq!(pick(&["x.gguf"], FileSelector::Auto).unwrap(), ["x.gguf"]);
        assert!(pick(&["README.md"], FileSelector::Auto).is_err());
    }

    #[test]
    fn split_models_bring_every_shard() {
        let files = [
            "m-q4_k_m-00002-of-00002.gguf",
            "m-q4_k_m-00001-of-00002.gguf",
            "m-q8_0.gguf",
        ];
        assert_eq!(
            pick(&files, FileSelector::Quant("Q4_K_M".into())).unwrap(),
            [
                "m-q4_k_m-00001-of-00002.gguf",
                "m-q4_k_m-00002-of-00002.gguf"
            ]
        );
        assert!(pick(&files[..2], FileSelector::Quant("Q8_0".into()))
            .unwrap_err()
            .contains("available"));
        assert!(pick(&files[1..], FileSelector::Quant("Q4_K_M".into()))
            .unwrap_err()
            .contains("missing shard"));
    }
}
