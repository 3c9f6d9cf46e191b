use reqwest::header::{IF_RANGE, RANGE};

use super::*;

#[tokio::test]
async fn full_get_carries_hub_headers() {
    let m = mirror().await;
    let info = m.repo(REPO).unwrap();
    let etag = format!("\"{}\"", sha256(&model_bytes()));
    for rev in ["main", info.commit.as_str()] {
        let r = reqwest::get(url(&m, rev, MODEL)).await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "etag"), etag);
        assert_eq!(header(&r, "x-linked-etag"), etag);
        assert_eq!(header(&r, "x-repo-commit"), info.commit);
        assert_eq!(header(&r, "x-linked-size"), MODEL_LEN.to_string());
        assert_eq!(header(&r, "accept-ranges"), "bytes");
        assert_eq!(header(&r, "content-length"), MODEL_LEN.to_string());
        assert_eq!(r.bytes().await.unwrap(), model_bytes());
    }
    let s = m.file_stats(MODEL);
    assert_eq!((s.full_gets, s.range_gets), (2, 0));
    assert_eq!(s.body_bytes, 2 * MODEL_LEN as u64);
    assert_eq!(m.stats().body_bytes, 2 * MODEL_LEN as u64);
}

#[tokio::test]
async fn nested_paths_resolve() {
    let m = mirror().await;
    let r = reqwest::get(url(&m, "main", "sub/dir/nested.gguf"))
        .await
        .unwrap();
    assert_eq!(r.bytes().await.unwrap().as_ref(), b"nested");
}

#[tokio::test]
async fn ranges_answer_206_with_content_range() {
    let m = mirror().await;
    let client = reqwest::Client::new();
    let all = model_bytes();
    let total = MODEL_LEN;
    // Across a read-block boundary, open-ended, and the one-byte probe hf-hub sends.
    let cases = [
        (format!("bytes={}-", total - 10), total - 10, total - 1),
        ("bytes=1048570-1048590".to_string(), 1_048_570, 1_048_590),
        ("bytes=0-0".to_string(), 0, 0),
    ];
    for (range, start, end) in &cases {
        let r = client
            .get(url(&m, "main", MODEL))
            .header(RANGE, range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 206, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            format!("bytes {start}-{end}/{total}")
        );
        assert_eq!(header(&r, "content-length"), (end - start + 1).to_string());
        assert_eq!(r.bytes().await.unwrap(), all[*start..=*end], "{range}");
    }
    let s = m.file_stats(MODEL);
    assert_eq!((s.full_gets, s.range_gets), (0, 3));
    let seen: Vec<&str> = cases.iter().map(|c| c.0.as_str()).collect();
    assert_eq!(s.ranges, seen);
}

#[tokio::test]
async fn if_range_match_resumes_and_mismatch_sends_everything() {
    let m = mirror().await;
    let client = reqwest::Client::new();
    let etag = format!("\"{}\"", sha256(&model_bytes()));
    let get = |validator: String| {
        client
            .get(url(&m, "main", MODEL))
            .header(RANGE, "bytes=100-")
            .header(IF_RANGE, validator)
            .send()
    };
    let hit = get(etag).await.unwrap();
    assert_eq!(hit.status(), 206);
    assert_eq!(hit.bytes().await.unwrap(), model_bytes()[100..]);
    let miss = get(format!("\"{}\"", "0".repeat(64))).await.unwrap();
    assert_eq!(miss.status(), 200);
    assert!(miss.headers().get("content-range").is_none());
    assert_eq!(miss.bytes().await.unwrap(), model_bytes());
}

#[tokio::test]
async fn range_past_the_end_is_416() {
    let m = mirror().await;
    let r = reqwest::Client::new()
        .get(url(&m, "main", MODEL))
        .header(RANGE, format!("bytes={MODEL_LEN}-"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 416);
    assert_eq!(header(&r, "content-range"), format!("bytes */{MODEL_LEN}"));
}

#[tokio::test]
async fn unknown_repo_revision_or_file_is_404() {
    let m = mirror().await;
    let base = m.base_url();
    let cases = [
        (
            format!("{base}/acme/nope/resolve/main/{MODEL}"),
            "RepoNotFound",
        ),
        (
            format!("{base}/{REPO}/resolve/refs%2Fpr%2F1/{MODEL}"),
            "RevisionNotFound",
        ),
        (
            format!("{base}/{REPO}/resolve/main/missing.gguf"),
            "EntryNotFound",
        ),
    ];
    for (url, code) in cases {
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.status(), 404, "{url}");
        assert_eq!(header(&r, "x-error-code"), code, "{url}");
    }
}

#[tokio::test]
async fn head_has_headers_but_no_body() {
    let m = mirror().await;
    let r = reqwest::Client::new()
        .head(url(&m, "main", MODEL))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-length"), MODEL_LEN.to_string());
    assert_eq!(
        header(&r, "x-linked-etag"),
        format!("\"{}\"", sha256(&model_bytes()))
    );
    assert!(r.bytes().await.unwrap().is_empty());
    let s = m.file_stats(MODEL);
    assert_eq!((s.heads, s.full_gets, s.body_bytes), (1, 0, 0));
}
