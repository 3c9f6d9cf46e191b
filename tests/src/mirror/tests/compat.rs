//! The client the loader actually uses, end to end.

use hf_hub::api::tokio::ApiBuilder;
use hf_hub::{Repo, RepoType};

use super::*;

#[tokio::test]
async fn hf_hub_lists_and_downloads() {
    let m = mirror().await;
    let cache = tempfile::tempdir().unwrap();
    let api = ApiBuilder::new()
        .with_endpoint(m.base_url().to_string())
        .with_cache_dir(cache.path().to_path_buf())
        .with_progress(false)
        .build()
        .unwrap();
    let repo = api.repo(Repo::with_revision(
        REPO.to_string(),
        RepoType::Model,
        "main".to_string(),
    ));
    let info = repo.info().await.unwrap();
    assert_eq!(info.sha, m.repo(REPO).unwrap().commit);
    assert_eq!(info.siblings.len(), 3);
    // hf-hub probes with `bytes=0-0`, then fetches in parallel ranges.
    let path = repo.download(MODEL).await.unwrap();
    assert_eq!(std::fs::read(path).unwrap(), model_bytes());
    assert!(m
        .file_stats(MODEL)
        .ranges
        .contains(&"bytes=0-0".to_string()));
}
