use serde_json::Value;

use super::*;
use crate::mirror::{FileSource, RepoSpec};

#[tokio::test]
async fn lists_files_with_lfs_metadata() {
    let m = mirror().await;
    let info = m.repo(REPO).unwrap();
    assert_eq!(info.commit.len(), 40);
    let url = format!(
        "{}/api/models/{REPO}/revision/main?blobs=true",
        m.base_url()
    );
    let body: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(body["id"], REPO);
    assert_eq!(body["modelId"], REPO);
    assert_eq!(body["sha"], info.commit.as_str());
    let siblings = body["siblings"].as_array().unwrap();
    let names: Vec<&str> = siblings
        .iter()
        .map(|s| s["rfilename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["sub/dir/nested.gguf", MODEL, OTHER]);
    let model = &siblings[1];
    assert_eq!(model["size"], MODEL_LEN as u64);
    assert_eq!(model["lfs"]["size"], MODEL_LEN as u64);
    assert_eq!(model["lfs"]["sha256"], sha256(&model_bytes()).as_str());
    assert_eq!(model["blobId"].as_str().unwrap().len(), 40);
    // "version https://git-lfs.github.com/spec/v1\n" (43) + "oid sha256:<64>\n" (76)
    // + "size 2109497\n" (13), as git-lfs writes it.
    assert_eq!(model["lfs"]["pointerSize"], 132);
    assert_eq!(m.stats().listings, 1);
}

#[tokio::test]
async fn lists_by_commit_and_without_blobs() {
    let m = mirror().await;
    let commit = m.repo(REPO).unwrap().commit;
    let url = format!("{}/api/models/{REPO}/revision/{commit}", m.base_url());
    let body: Value = reqwest::get(&url).await.unwrap().json().await.unwrap();
    assert_eq!(body["sha"], commit.as_str());
    assert!(body["siblings"][0].get("lfs").is_none());
}

#[tokio::test]
async fn unknown_repo_or_revision_is_repo_not_found() {
    let m = mirror().await;
    for path in [
        "acme/nope/revision/main",
        "acme/tiny/revision/refs%2Fpr%2F1",
        "acme/tiny/revision/0000000000000000000000000000000000000000",
    ] {
        let r = reqwest::get(format!("{}/api/models/{path}", m.base_url()))
            .await
            .unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(header(&r, "x-error-code"), "RepoNotFound");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "Repository not found");
    }
}

#[tokio::test]
async fn same_files_same_commit_and_replacing_moves_it() {
    let a = mirror().await;
    let b = mirror().await;
    let first = a.repo(REPO).unwrap().commit;
    assert_eq!(first, b.repo(REPO).unwrap().commit);
    let replaced = a
        .add_repo(RepoSpec::new(REPO).bytes(MODEL, b"v2".to_vec()))
        .await
        .unwrap();
    assert_ne!(replaced.commit, first);
    let old = reqwest::get(url(&a, &first, MODEL)).await.unwrap();
    assert_eq!(old.status(), 404);
    let new = reqwest::get(url(&a, &replaced.commit, MODEL))
        .await
        .unwrap();
    assert_eq!(new.bytes().await.unwrap().as_ref(), b"v2");
}

#[tokio::test]
async fn disk_files_are_served_under_their_basename() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("on-disk.gguf");
    std::fs::write(&path, b"from disk").unwrap();
    let spec = RepoSpec::disk_files("acme/disk", [&path]).unwrap();
    assert!(matches!(&spec.files[0], FileSource::Disk { name, .. } if name == "on-disk.gguf"));
    let m = Mirror::start(MirrorConfig::new().repo(spec)).await.unwrap();
    let r = reqwest::get(format!(
        "{}/acme/disk/resolve/main/on-disk.gguf",
        m.base_url()
    ))
    .await
    .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"from disk");
}

#[tokio::test]
async fn token_is_required_when_configured() {
    let m = mirror_with(MirrorConfig::new().require_token("s3cret")).await;
    let listing = format!("{}/api/models/{REPO}/revision/main", m.base_url());
    let client = reqwest::Client::new();
    for url in [listing.clone(), url(&m, "main", OTHER)] {
        assert_eq!(client.get(&url).send().await.unwrap().status(), 401);
        let wrong = client.get(&url).bearer_auth("nope").send().await.unwrap();
        assert_eq!(wrong.status(), 401);
        let right = client.get(&url).bearer_auth("s3cret").send().await.unwrap();
        assert_eq!(right.status(), 200);
    }
    assert_eq!(m.stats().unauthorized, 4);
}
