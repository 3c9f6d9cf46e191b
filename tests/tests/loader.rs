//! The loader through real gRPC on an ephemeral port, downloading with real hf-hub from the
//! hub mirror: references, progress, single flight, integrity, eviction and leases.

use std::sync::Arc;

use llama_agent_client::proto::loader::v1 as pb;
use llama_agent_client::{ClientError, LoaderClient};
use llama_agent_tests::mirror::{parse_range, Fault, FaultScope, Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{fake_gguf, model, model_md5, InProcessLoader, GEMMA_FILE};
use llama_loader::LoaderConfig;
use tonic::Code;

const GEMMA_REPO: &str = "test/gemma-3-270m-GGUF";
const Q8_FILE: &str = "gemma-3-270m-Q8_0.gguf";

async fn gemma_mirror() -> Mirror {
    let repo = RepoSpec::new(GEMMA_REPO)
        .file(GEMMA_FILE, model(GEMMA_FILE))
        .bytes(Q8_FILE, fake_gguf(300_000, 8))
        .bytes("README.md", b"# test repo\n".to_vec());
    Mirror::start(MirrorConfig::new().repo(repo))
        .await
        .expect("mirror")
}

async fn loader(mirror: &Mirror, dir: &tempfile::TempDir, max: u64) -> InProcessLoader {
    loader_with(mirror, dir, |c| c.cache_max_size = max).await
}

async fn loader_with(
    mirror: &Mirror,
    dir: &tempfile::TempDir,
    set: impl FnOnce(&mut LoaderConfig),
) -> InProcessLoader {
    let mut config = LoaderConfig::new(dir.path().to_path_buf(), mirror.base_url());
    set(&mut config);
    InProcessLoader::start(config).await.expect("loader")
}

fn ensure_req(model: &str) -> pb::EnsureModelRequest {
    pb::EnsureModelRequest {
        model: model.to_string(),
        ..Default::default()
    }
}

/// Ensures a model, returning the final answer and every progress event seen.
async fn ensure(
    client: &LoaderClient,
    req: pb::EnsureModelRequest,
) -> Result<(llama_agent_client::loader::Ensured, Vec<pb::Progress>), ClientError> {
    let mut events = Vec::new();
    let done = client.ensure(req, |p| events.push(p.clone())).await?;
    Ok((done, events))
}

fn code(r: Result<impl std::fmt::Debug, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pulls_by_repo_quant_and_file_with_progress() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 50_000_000_000).await;

    // By repo: the default preference picks Q4_K_M.
    let (done, progress) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert!(!done.cache_hit);
    assert_eq!(done.model.file, GEMMA_FILE);
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    assert_eq!(
        done.model.size_bytes,
        std::fs::metadata(model(GEMMA_FILE)).unwrap().len()
    );
    assert_eq!(done.model.repo, GEMMA_REPO);
    assert_eq!(done.model.revision, "main");
    assert_eq!(done.model.commit, mirror.repo(GEMMA_REPO).unwrap().commit);
    assert_eq!(done.model.sha256.len(), 64);
    assert!(done
        .model
        .local_path
        .starts_with(dir.path().to_str().unwrap()));
    let on_disk = std::fs::read(&done.model.local_path).unwrap();
    assert_eq!(on_disk.len() as u64, done.model.size_bytes);
    let downloading: Vec<_> = progress
        .iter()
        .filter(|p| p.stage == pb::Stage::Downloading as i32)
        .collect();
    assert!(
        !downloading.is_empty(),
        "no download progress in {progress:?}"
    );
    assert!(downloading
        .iter()
        .all(|p| p.bytes_total == done.model.size_bytes));
    assert!(downloading
        .windows(2)
        .all(|w| w[0].bytes_done <= w[1].bytes_done));

    // By quant, then by file: the file names the entry the quant already brought.
    let (q8, _) = ensure(&l.client, ensure_req(&format!("{GEMMA_REPO}:q8_0")))
        .await
        .unwrap();
    assert_eq!(q8.model.file, Q8_FILE);
    assert_eq!(q8.model.size_bytes, 300_000);
    let (by_file, progress) = ensure(&l.client, ensure_req(&format!("{GEMMA_REPO}/{Q8_FILE}")))
        .await
        .unwrap();
    assert!(by_file.cache_hit);
    assert!(progress.is_empty());
    assert_eq!(by_file.model.md5, q8.model.md5);

    // A repeat of the first is a cache hit with no network.
    mirror.reset_stats();
    let (again, _) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.model.local_path, done.model.local_path);
    assert_eq!(mirror.stats().listings, 0);

    // GetModel resolves from the cache only; ListModels and CacheStatus see both.
    assert_eq!(
        l.client.get_model(GEMMA_REPO).await.unwrap().md5,
        done.model.md5
    );
    assert_eq!(
        code(l.client.get_model(&format!("{GEMMA_REPO}:F16")).await),
        Code::NotFound
    );
    let listed = l.client.list_models().await.unwrap();
    assert_eq!(listed.len(), 2);
    let status = l.client.cache_status().await.unwrap();
    assert_eq!(status.entries, 2);
    assert_eq!(status.bytes_used, done.model.size_bytes + 300_000);
    assert_eq!(status.cache_dir, dir.path().to_str().unwrap());
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_pulls_make_one_download() {
    let mirror = gemma_mirror().await;
    // Slow enough that all eight requests arrive while the first download runs.
    mirror.set_faults(FaultScope::file(GEMMA_FILE), Fault::throttle(200_000_000));
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 50_000_000_000).await;

    let client = Arc::new(l.client.clone());
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let c = Arc::clone(&client);
            tokio::spawn(async move { ensure(&c, ensure_req(GEMMA_REPO)).await })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap().unwrap());
    }
    // One download: each 16 MiB piece asked for once, every byte sent once.
    let stats = mirror.file_stats(GEMMA_FILE);
    let size = results[0].0.model.size_bytes;
    assert_eq!(stats.gets(), size.div_ceil(16 << 20), "{stats:?}");
    assert_eq!(stats.body_bytes, size);
    for (done, progress) in &results {
        assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
        assert_eq!(done.model.local_path, results[0].0.model.local_path);
        assert!(!progress.is_empty(), "every caller sees progress");
    }
    let followers = results
        .iter()
        .filter(|(_, p)| p.iter().any(|e| e.stage == pb::Stage::Waiting as i32))
        .count();
    assert_eq!(followers, 7, "one leads, seven follow");
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_resume_and_corrupt_transfers_are_refetched() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    // One connection: the plain stream, resumed from where it broke.
    let l = loader_with(&mirror, &dir, |c| c.download_connections = 1).await;

    // Cut twice mid-file: the fetcher resumes with Range and the result is identical.
    mirror.set_faults(
        FaultScope::file(GEMMA_FILE),
        Fault::drop_after(40_000_000).times(2),
    );
    let (done, progress) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!(
        stats.ranges,
        ["bytes=40000000-", "bytes=80000000-"],
        "{stats:?}"
    );
    assert_eq!(stats.peak_in_flight, 1);
    assert!(progress.iter().any(|p| p.resumed_from == 0));

    // Corrupt bytes fail the hub's SHA-256 and are fetched again, never published.
    mirror.reset_stats();
    mirror.set_faults(FaultScope::file(Q8_FILE), Fault::corrupt().times(1));
    let (q8, _) = ensure(&l.client, ensure_req(&format!("{GEMMA_REPO}:Q8_0")))
        .await
        .unwrap();
    assert_eq!(q8.model.md5, hex_md5(&fake_gguf(300_000, 8)));
    assert_eq!(mirror.file_stats(Q8_FILE).full_gets, 2);

    // Corrupt every time: DATA_LOSS, and nothing lands in the cache.
    let q8_ref = format!("{GEMMA_REPO}:Q8_0");
    l.client.evict_model(&q8_ref, false).await.unwrap();
    mirror.set_faults(FaultScope::file(Q8_FILE), Fault::corrupt());
    assert_eq!(
        code(ensure(&l.client, ensure_req(&q8_ref)).await),
        Code::DataLoss
    );
    assert_eq!(code(l.client.get_model(&q8_ref).await), Code::NotFound);
    assert!(!std::path::Path::new(&q8.model.local_path).exists());
    l.stop().await;
}

/// Pieces of this size make the 253 MB model 61 ranged requests over 8 connections.
const PIECE: u64 = 4 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_run_in_parallel_and_resume_each_on_its_own() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader_with(&mirror, &dir, |c| c.download_part_size = PIECE).await;
    let size = std::fs::metadata(model(GEMMA_FILE)).unwrap().len();
    let pieces = size.div_ceil(PIECE);

    // Paced so that every connection is mid-piece at once: 8 bodies in flight, every one a
    // bounded range except the last piece, each piece asked for once, the bytes identical.
    mirror.set_faults(FaultScope::file(GEMMA_FILE), Fault::throttle(40_000_000));
    let (done, progress) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!(stats.peak_in_flight, 8, "{:?}", stats.peak_in_flight);
    assert_eq!((stats.full_gets, stats.range_gets), (0, pieces));
    assert_eq!(stats.body_bytes, size);
    let mut spans: Vec<(u64, u64)> = stats.ranges.iter().map(|r| parse_range(r, size)).collect();
    spans.sort();
    assert!(spans
        .iter()
        .enumerate()
        .all(|(i, &(a, _))| a == i as u64 * PIECE));
    let last = format!("bytes={}-", (pieces - 1) * PIECE);
    assert!(
        stats
            .ranges
            .iter()
            .all(|r| (*r == last) == r.ends_with('-')),
        "{:?}",
        stats.ranges
    );
    let downloading: Vec<u64> = progress
        .iter()
        .filter(|p| p.stage == pb::Stage::Downloading as i32)
        .map(|p| p.bytes_done)
        .collect();
    assert!(
        downloading.windows(2).all(|w| w[0] <= w[1]),
        "progress is the sum of the pieces"
    );
    assert_eq!(downloading.last(), Some(&size));

    // Three pieces cut 1 MB in, three answered 503: each resumes or retries alone, mid-piece
    // where it broke, and not one byte is fetched twice.
    l.client.evict_model(GEMMA_REPO, false).await.unwrap();
    mirror.reset_stats();
    mirror.set_faults(
        FaultScope::file(GEMMA_FILE),
        Fault::drop_after(1_000_000).times(3),
    );
    let (done, _) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!(stats.body_bytes, size, "{stats:?}");
    assert_eq!(stats.range_gets, pieces + 3);
    let mid_piece = stats
        .ranges
        .iter()
        .filter(|r| parse_range(r, size).0 % PIECE == 1_000_000)
        .count();
    assert_eq!(mid_piece, 3, "{:?}", stats.ranges);

    l.client.evict_model(GEMMA_REPO, false).await.unwrap();
    mirror.reset_stats();
    mirror.set_faults(FaultScope::file(GEMMA_FILE), Fault::status(503).times(3));
    let (done, _) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!((stats.range_gets, stats.body_bytes), (pieces + 3, size));
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_pieces_are_given_up_on_and_resumed_alone() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader_with(&mirror, &dir, |c| {
        c.download_part_size = PIECE;
        c.stall_timeout_secs = 1;
    })
    .await;
    let size = std::fs::metadata(model(GEMMA_FILE)).unwrap().len();
    // Two responses go silent 500 kB in, their connections held open.
    mirror.set_faults(
        FaultScope::file(GEMMA_FILE),
        Fault::stall_after(500_000).times(2),
    );
    let (done, _) = ensure(&l.client, ensure_req(GEMMA_REPO)).await.unwrap();
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!(stats.body_bytes, size, "{stats:?}");
    assert_eq!(stats.range_gets, size.div_ceil(PIECE) + 2);
    let resumed: Vec<&String> = stats
        .ranges
        .iter()
        .filter(|r| parse_range(r, size).0 % PIECE == 500_000)
        .collect();
    assert_eq!(resumed.len(), 2, "{:?}", stats.ranges);
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_pieces_are_never_published_and_range_refusals_fall_back_to_one_stream() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    // 64 KiB pieces: the 300 KB Q8 file is five of them.
    let l = loader_with(&mirror, &dir, |c| c.download_part_size = 64 << 10).await;
    let q8_ref = format!("{GEMMA_REPO}:Q8_0");
    let q8_bytes = fake_gguf(300_000, 8);

    // One corrupt piece fails the SHA-256 of the whole; the file is fetched again.
    mirror.set_faults(FaultScope::file(Q8_FILE), Fault::corrupt().times(1));
    let (q8, _) = ensure(&l.client, ensure_req(&q8_ref)).await.unwrap();
    assert_eq!(q8.model.md5, hex_md5(&q8_bytes));
    let stats = mirror.file_stats(Q8_FILE);
    assert_eq!(
        (stats.range_gets, stats.body_bytes),
        (10, 600_000),
        "{stats:?}"
    );

    // Corrupt every time: DATA_LOSS, nothing published, no partial file left.
    l.client.evict_model(&q8_ref, false).await.unwrap();
    mirror.set_faults(FaultScope::file(Q8_FILE), Fault::corrupt());
    assert_eq!(
        code(ensure(&l.client, ensure_req(&q8_ref)).await),
        Code::DataLoss
    );
    assert_eq!(code(l.client.get_model(&q8_ref).await), Code::NotFound);
    assert!(!std::path::Path::new(&q8.model.local_path).exists());
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        0
    );

    // A server that answers ranged requests with the whole file: one stream from zero.
    mirror.reset_stats();
    mirror.set_faults(FaultScope::file(Q8_FILE), Fault::ignore_range());
    let (q8, _) = ensure(&l.client, ensure_req(&q8_ref)).await.unwrap();
    assert_eq!(std::fs::read(&q8.model.local_path).unwrap(), q8_bytes);
    let stats = mirror.file_stats(Q8_FILE);
    assert_eq!(stats.full_gets, 1, "{stats:?}");
    assert!((1..=5).contains(&stats.range_gets), "{stats:?}");
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_changed_since_the_partial_download_starts_again() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader_with(&mirror, &dir, |c| {
        c.download_part_size = 64 << 10;
        c.download_attempts = 1;
    })
    .await;
    let q8_ref = format!("{GEMMA_REPO}/{Q8_FILE}");

    // Every piece is cut short: the download fails with part of each piece on disk.
    mirror.set_faults(FaultScope::file(Q8_FILE), Fault::drop_after(10_000));
    assert_eq!(
        code(ensure(&l.client, ensure_req(&q8_ref)).await),
        Code::Unavailable
    );
    assert_eq!(
        std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
        2,
        "part + sidecar"
    );

    // The repo is replaced with other bytes of the same length: a new commit and SHA-256, so
    // nothing of the old partial file is kept.
    let new_bytes = fake_gguf(300_000, 99);
    mirror
        .add_repo(
            RepoSpec::new(GEMMA_REPO)
                .file(GEMMA_FILE, model(GEMMA_FILE))
                .bytes(Q8_FILE, new_bytes.clone()),
        )
        .await
        .unwrap();
    mirror.clear_faults();
    mirror.reset_stats();
    let (q8, progress) = ensure(&l.client, ensure_req(&q8_ref)).await.unwrap();
    assert_eq!(std::fs::read(&q8.model.local_path).unwrap(), new_bytes);
    assert!(progress.iter().all(|p| p.resumed_from == 0));
    let stats = mirror.file_stats(Q8_FILE);
    assert_eq!(stats.body_bytes, 300_000, "{stats:?}");
    assert!(stats
        .ranges
        .iter()
        .all(|r| parse_range(r, 300_000).0.is_multiple_of(64 << 10)));
    l.stop().await;
}

fn hex_md5(bytes: &[u8]) -> String {
    use md5::Digest;
    format!("{:x}", md5::Md5::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_cache_file_is_detected_and_repaired() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 50_000_000_000).await;
    let reference = format!("{GEMMA_REPO}:Q8_0");
    let (done, _) = ensure(&l.client, ensure_req(&reference)).await.unwrap();
    assert!(l.client.verify_model(&reference, false).await.unwrap().ok);

    // Flip one byte in place: same size, new mtime.
    flip_byte(&done.model.local_path, 1000);
    let v = l.client.verify_model(&reference, false).await.unwrap();
    assert!(!v.ok);
    assert!(v.detail.contains("md5"), "{}", v.detail);

    // EnsureModel sees the mtime moved, re-hashes, and fetches it again.
    mirror.reset_stats();
    let (fixed, _) = ensure(&l.client, ensure_req(&reference)).await.unwrap();
    assert!(!fixed.cache_hit);
    assert_eq!(fixed.model.md5, done.model.md5);
    assert_eq!(mirror.file_stats(Q8_FILE).full_gets, 1);
    assert_eq!(
        std::fs::read(&fixed.model.local_path).unwrap(),
        fake_gguf(300_000, 8)
    );

    // VerifyModel with repair does the same on request.
    flip_byte(&done.model.local_path, 5);
    let v = l.client.verify_model(&reference, true).await.unwrap();
    assert!(!v.ok && v.repaired);
    assert!(l.client.verify_model(&reference, false).await.unwrap().ok);
    l.stop().await;
}

fn flip_byte(path: &str, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0xff;
    std::fs::write(path, bytes).unwrap();
}

/// Three 1 MB models in a cache that holds two.
async fn small_models_mirror() -> Mirror {
    let mut config = MirrorConfig::new();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        config = config.repo(
            RepoSpec::new(format!("test/{name}"))
                .bytes(format!("{name}-Q4_K_M.gguf"), fake_gguf(1_000_000, i as u8)),
        );
    }
    Mirror::start(config).await.expect("mirror")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_recently_used_models_are_evicted_under_the_cap() {
    let mirror = small_models_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 2_500_000).await;
    let (a, _) = ensure(&l.client, ensure_req("test/a")).await.unwrap();
    let (b, _) = ensure(&l.client, ensure_req("test/b")).await.unwrap();
    // Touch a: b becomes the least recently used.
    assert!(
        ensure(&l.client, ensure_req("test/a"))
            .await
            .unwrap()
            .0
            .cache_hit
    );
    let (c, _) = ensure(&l.client, ensure_req("test/c")).await.unwrap();

    assert!(std::path::Path::new(&a.model.local_path).is_file());
    assert!(std::path::Path::new(&c.model.local_path).is_file());
    assert!(!std::path::Path::new(&b.model.local_path).exists());
    assert_eq!(code(l.client.get_model("test/b").await), Code::NotFound);
    let status = l.client.cache_status().await.unwrap();
    assert_eq!((status.entries, status.bytes_used), (2, 2_000_000));
    // Most recently used first.
    let names: Vec<String> = l
        .client
        .list_models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.model.unwrap().repo)
        .collect();
    assert_eq!(names, ["test/c", "test/a"]);
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leased_models_are_never_evicted() {
    let mirror = small_models_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 2_500_000).await;

    // a is leased with the ensure itself; b is leased afterwards.
    let (a, _) = ensure(
        &l.client,
        pb::EnsureModelRequest {
            lease_ttl_seconds: 300,
            lease_holder: "generator-0".into(),
            ..ensure_req("test/a")
        },
    )
    .await
    .unwrap();
    let lease_a = a.lease.expect("lease with the result");
    assert_eq!(lease_a.holder, "generator-0");
    ensure(&l.client, ensure_req("test/b")).await.unwrap();
    // a is older, but leased: c evicts b.
    let (_c, _) = ensure(&l.client, ensure_req("test/c")).await.unwrap();
    assert!(std::path::Path::new(&a.model.local_path).is_file());
    assert_eq!(code(l.client.get_model("test/b").await), Code::NotFound);

    // With a and c both leased there is no room for d: RESOURCE_EXHAUSTED, saying why.
    let lease_c = l
        .client
        .lease_model("test/c", 300, "embedder-0")
        .await
        .unwrap()
        .lease
        .unwrap();
    let err = ensure(&l.client, ensure_req("test/d")).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(err.to_string().contains("leased"), "{err}");
    assert_eq!(
        code(l.client.evict_model("test/a", false).await),
        Code::FailedPrecondition
    );
    let listed = l.client.list_models().await.unwrap();
    assert!(listed.iter().all(|m| m.leases.len() == 1));

    // Released, c can go; renewing a keeps it pinned.
    l.client.renew_lease(&lease_a.lease_id, 600).await.unwrap();
    l.client.release_lease(&lease_c.lease_id).await.unwrap();
    assert_eq!(
        code(l.client.release_lease(&lease_c.lease_id).await),
        Code::NotFound
    );
    ensure(&l.client, ensure_req("test/d")).await.unwrap();
    assert_eq!(code(l.client.get_model("test/c").await), Code::NotFound);
    assert!(l.client.get_model("test/a").await.is_ok());

    // Forced eviction drops the lease too.
    assert_eq!(
        l.client
            .evict_model("test/a", true)
            .await
            .unwrap()
            .bytes_freed,
        1_000_000
    );
    assert_eq!(
        code(l.client.renew_lease(&lease_a.lease_id, 60).await),
        Code::NotFound
    );
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_references_and_unknown_models_get_the_right_codes() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 50_000_000_000).await;
    for bad in [
        "",
        "no-slash",
        "a/b/../../../etc/passwd.gguf",
        "test/gemma-3-270m-GGUF/../x.gguf",
        "test/gemma-3-270m-GGUF/x.bin",
        "test/gemma-3-270m-GGUF/a b.gguf",
        "test/gemma-3-270m-GGUF:Q4 K M",
        "test/gemma-3-270m-GGUF@../../x",
        "te st/repo",
    ] {
        let err = ensure(&l.client, ensure_req(bad)).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err}");
    }
    for unknown in [
        "nobody/nothing",
        "test/gemma-3-270m-GGUF:Q2_K",
        "test/gemma-3-270m-GGUF/missing.gguf",
        "test/gemma-3-270m-GGUF@v9",
    ] {
        let err = ensure(&l.client, ensure_req(unknown)).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound, "{unknown:?}: {err}");
    }
    let err = ensure(&l.client, ensure_req("test/gemma-3-270m-GGUF:Q2_K"))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains(GEMMA_FILE),
        "lists what is there: {err}"
    );
    assert_eq!(
        code(ensure(&l.client, ensure_req("/does/not/exist.gguf")).await),
        Code::NotFound
    );
    // A local file that is not a GGUF is refused before it is copied.
    let not_gguf = dir.path().join("notes.gguf");
    std::fs::write(&not_gguf, b"hello").unwrap();
    assert_eq!(
        code(ensure(&l.client, ensure_req(not_gguf.to_str().unwrap())).await),
        Code::DataLoss
    );
    assert_eq!(
        code(l.client.lease_model("test/a", 10 * 24 * 3600, "x").await),
        Code::InvalidArgument
    );
    assert_eq!(
        code(l.client.evict_model("nobody/nothing", false).await),
        Code::NotFound
    );
    assert_eq!(l.client.cache_status().await.unwrap().entries, 0);
    l.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_files_are_imported_once() {
    let mirror = gemma_mirror().await;
    let dir = tempfile::tempdir().unwrap();
    let l = loader(&mirror, &dir, 50_000_000_000).await;
    let src = dir.path().join("mine-Q8_0.gguf");
    std::fs::write(&src, fake_gguf(123_456, 3)).unwrap();
    let (done, progress) = ensure(&l.client, ensure_req(src.to_str().unwrap()))
        .await
        .unwrap();
    assert!(progress
        .iter()
        .any(|p| p.stage == pb::Stage::Importing as i32));
    assert_eq!(done.model.md5, hex_md5(&fake_gguf(123_456, 3)));
    assert_ne!(done.model.local_path, src.to_str().unwrap());
    assert!(
        ensure(&l.client, ensure_req(src.to_str().unwrap()))
            .await
            .unwrap()
            .0
            .cache_hit
    );
    // A changed source is imported again.
    std::fs::write(&src, fake_gguf(2_000, 4)).unwrap();
    let (again, _) = ensure(&l.client, ensure_req(src.to_str().unwrap()))
        .await
        .unwrap();
    assert!(!again.cache_hit);
    assert_eq!(again.model.size_bytes, 2_000);
    l.stop().await;
}
