//! The loader as an operator runs it: a separate `llama-loader` process (killed with -9 mid-
//! download and restarted), grpcurl through reflection, and `llama-cli` against it or alone.

use std::path::Path;
use std::process::Command;

use futures::StreamExt;
use llama_agent_client::proto::loader::v1::{self as pb, ensure_model_response::Event};
use llama_agent_tests::mirror::{parse_range, Fault, FaultScope, Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{
    grpcurl, model, model_md5, run_ok, workspace_command, LoaderProcess, GEMMA_FILE,
};

const REPO: &str = "test/gemma-3-270m-GGUF";

async fn mirror() -> Mirror {
    Mirror::start(MirrorConfig::new().repo(RepoSpec::new(REPO).file(GEMMA_FILE, model(GEMMA_FILE))))
        .await
        .expect("mirror")
}

fn parts_in(cache: &Path) -> Vec<(std::path::PathBuf, u64)> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "part"))
                .map(|p| {
                    let n = std::fs::metadata(&p).unwrap().len();
                    (p, n)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What the partial file's sidecar says is on disk (fsynced): `[start, end)` ranges.
fn recorded(part: &Path) -> Vec<(u64, u64)> {
    let mut meta = part.as_os_str().to_owned();
    meta.push(".json");
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
    serde_json::from_value(meta["written"].clone()).unwrap()
}

/// Starts a pull on a fresh `llama-loader` and kills it -9 once `kill_at` bytes are in; the
/// ranges its partial file's sidecar records.
async fn pull_and_kill(
    mirror: &Mirror,
    cache: &Path,
    flags: &[&str],
    kill_at: u64,
) -> Vec<(u64, u64)> {
    let first = LoaderProcess::spawn(cache, mirror.base_url(), flags).unwrap();
    let client = first.client();
    let mut stream = Box::pin(client.ensure_stream(ensure_req()).await.unwrap());
    while let Some(ev) = stream.next().await {
        if let Some(Event::Progress(p)) = ev.unwrap().event {
            if p.bytes_done >= kill_at {
                break;
            }
        }
    }
    first.kill9();
    drop(stream);
    let parts = parts_in(cache);
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(
        !cache.join("models/hf").join(REPO).exists(),
        "nothing published"
    );
    recorded(&parts[0].0)
}

fn ensure_req() -> pb::EnsureModelRequest {
    pb::EnsureModelRequest {
        model: REPO.into(),
        ..Default::default()
    }
}

/// Resumes on a second process without faults: what it resumed from, and the result.
async fn resume(
    mirror: &Mirror,
    cache: &Path,
    flags: &[&str],
) -> (
    LoaderProcess,
    Option<u64>,
    llama_agent_client::loader::Ensured,
) {
    mirror.clear_faults();
    mirror.reset_stats();
    let second = LoaderProcess::spawn(cache, mirror.base_url(), flags).unwrap();
    let mut resumed_from = None;
    let done = second
        .client()
        .ensure(ensure_req(), |p| {
            if p.resumed_from > 0 {
                resumed_from = Some(p.resumed_from);
            }
        })
        .await
        .unwrap();
    assert_eq!(done.model.md5, model_md5(GEMMA_FILE));
    assert!(parts_in(cache).is_empty());
    (second, resumed_from, done)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_download_then_restart_resumes_to_identical_bytes() {
    let mirror = mirror().await;
    // ~8 s for the whole file on one connection: the kill lands well inside it.
    mirror.set_faults(FaultScope::file(GEMMA_FILE), Fault::throttle(30_000_000));
    let cache = tempfile::tempdir().unwrap();
    let one = ["--download-connections", "1"];
    let kept = pull_and_kill(&mirror, cache.path(), &one, 60_000_000).await;
    // One stream: a prefix, recorded after fsync (at most a second behind the kill).
    assert_eq!(kept.len(), 1, "{kept:?}");
    let (start, kept) = kept[0];
    assert_eq!(start, 0);
    assert!(kept > 0);

    let (second, resumed_from, done) = resume(&mirror, cache.path(), &one).await;
    // The new process asked only for what was missing, and the result is byte-identical.
    assert_eq!(resumed_from, Some(kept));
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!(stats.ranges, [format!("bytes={kept}-")]);
    assert_eq!(stats.body_bytes, done.model.size_bytes - kept);

    // The manifest survives kill -9 too: a third process serves it from the cache.
    second.kill9();
    mirror.reset_stats();
    let third = LoaderProcess::spawn(cache.path(), mirror.base_url(), &[]).unwrap();
    let again = third.client().ensure(ensure_req(), |_| {}).await.unwrap();
    assert!(again.cache_hit);
    assert_eq!(again.model.md5, done.model.md5);
    assert_eq!(mirror.stats().listings, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_parallel_download_resumes_every_piece() {
    let mirror = mirror().await;
    // 8 connections of 4 MB/s each: ~8 s for the file, each 4 MiB piece about a second.
    mirror.set_faults(FaultScope::file(GEMMA_FILE), Fault::throttle(4_000_000));
    let cache = tempfile::tempdir().unwrap();
    let piece: u64 = 4 << 20;
    let flags = ["--download-part-size", "4MiB"];
    let kept = pull_and_kill(&mirror, cache.path(), &flags, 60_000_000).await;
    assert_eq!(mirror.file_stats(GEMMA_FILE).peak_in_flight, 8);
    // Pieces in flight at the last checkpoint left holes: more than a prefix is on disk.
    assert!(kept.len() >= 2, "{kept:?}");
    let kept_bytes: u64 = kept.iter().map(|(a, b)| b - a).sum();

    let (_second, resumed_from, done) = resume(&mirror, cache.path(), &flags).await;
    let size = done.model.size_bytes;
    assert_eq!(resumed_from, Some(kept_bytes));
    // Only the holes were asked for, each byte once, and pieces cut mid-way resumed mid-way.
    let stats = mirror.file_stats(GEMMA_FILE);
    assert_eq!(stats.full_gets, 0);
    assert_eq!(stats.body_bytes, size - kept_bytes, "{stats:?}");
    let asked: u64 = stats
        .ranges
        .iter()
        .map(|r| parse_range(r, size))
        .map(|(a, b)| b - a)
        .sum();
    assert_eq!(asked, size - kept_bytes);
    // Every hole was asked for from where it starts, pieces cut mid-way included.
    let starts: Vec<u64> = stats
        .ranges
        .iter()
        .map(|r| parse_range(r, size).0)
        .collect();
    let mut at = 0;
    let mut mid_piece = 0;
    for &(a, b) in kept.iter().chain([(size, size)].iter()) {
        if a > at {
            assert!(
                starts.contains(&at),
                "hole at {at} not asked: {:?}",
                stats.ranges
            );
            mid_piece += usize::from(at % piece != 0);
        }
        at = b;
    }
    assert!(mid_piece >= 2, "{kept:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_and_calls_the_loader_by_reflection() {
    let mirror = mirror().await;
    let cache = tempfile::tempdir().unwrap();
    let loader = LoaderProcess::spawn(cache.path(), mirror.base_url(), &[]).unwrap();
    let addr = loader.addr.to_string();
    let g = grpcurl();

    let listed = run_ok(Command::new(&g).args(["-plaintext", &addr, "list"]));
    let services: Vec<&str> = listed.lines().collect();
    for s in [
        "llama_agent.loader.v1.LoaderService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(services.contains(&s), "{s} not in {services:?}");
    }
    assert!(
        !listed.contains("GeneratorService"),
        "the loader lists only its own service"
    );

    let described = run_ok(Command::new(&g).args([
        "-plaintext",
        &addr,
        "describe",
        "llama_agent.loader.v1.LoaderService",
    ]));
    assert!(described.contains("rpc EnsureModel"), "{described}");

    let health =
        run_ok(Command::new(&g).args(["-plaintext", &addr, "grpc.health.v1.Health/Check"]));
    assert!(health.contains("SERVING"), "{health}");

    let body = format!("{{\"model\": \"{REPO}\"}}");
    let ensured = run_ok(Command::new(&g).args([
        "-plaintext",
        "-d",
        &body,
        &addr,
        "llama_agent.loader.v1.LoaderService/EnsureModel",
    ]));
    assert!(ensured.contains(&model_md5(GEMMA_FILE)), "{ensured}");
    let status = run_ok(Command::new(&g).args([
        "-plaintext",
        &addr,
        "llama_agent.loader.v1.LoaderService/CacheStatus",
    ]));
    assert!(status.contains("\"entries\": 1"), "{status}");

    // A bad reference is a clean INVALID_ARGUMENT for grpcurl users too.
    let out = Command::new(&g)
        .args([
            "-plaintext",
            "-d",
            "{\"model\": \"a/b/../../etc/passwd.gguf\"}",
            &addr,
            "llama_agent.loader.v1.LoaderService/GetModel",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("InvalidArgument"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn cli() -> Command {
    let mut c = workspace_command("llama-cli");
    c.env_remove("LLAMA_LOADER_ENDPOINT")
        .env_remove("LLAMA_CACHE_DIR")
        .env_remove("HF_ENDPOINT")
        .env_remove("RUST_LOG");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cli_pulls_and_manages_the_cache_remote_and_in_process() {
    let mirror = mirror().await;
    let md5 = model_md5(GEMMA_FILE);

    // Against a loader service.
    let cache = tempfile::tempdir().unwrap();
    let loader = LoaderProcess::spawn(cache.path(), mirror.base_url(), &[]).unwrap();
    let ep = loader.addr.to_string();
    let path = run_ok(cli().args(["--loader-endpoint", &ep, "pull", REPO]));
    assert!(
        path.trim().starts_with(cache.path().to_str().unwrap()),
        "{path}"
    );
    let ls: serde_json::Value = serde_json::from_str(&run_ok(cli().args([
        "--loader-endpoint",
        &ep,
        "cache",
        "ls",
        "--json",
    ])))
    .unwrap();
    assert_eq!(ls[0]["md5"], md5.as_str());
    let status: serde_json::Value = serde_json::from_str(&run_ok(
        cli()
            .env("LLAMA_LOADER_ENDPOINT", &ep)
            .args(["cache", "status", "--json"]),
    ))
    .unwrap();
    assert_eq!(status["entries"], 1);
    assert_eq!(
        run_ok(cli().args(["--loader-endpoint", &ep, "cache-dir"])).trim(),
        cache.path().to_str().unwrap()
    );
    assert!(
        run_ok(cli().args(["--loader-endpoint", &ep, "cache", "verify", REPO])).starts_with("ok")
    );
    assert!(
        run_ok(cli().args(["--loader-endpoint", &ep, "cache", "rm", REPO])).starts_with("removed")
    );
    let out = cli()
        .args(["--loader-endpoint", &ep, "pull", "a/b/../../x.gguf"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"));
    let out = cli()
        .args(["--loader-endpoint", &ep, "cache", "verify", REPO])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("NOT_FOUND"));

    // In-process: same commands, no server, settings from the environment.
    let local = tempfile::tempdir().unwrap();
    let in_proc = || {
        let mut c = cli();
        c.env("LLAMA_CACHE_DIR", local.path())
            .env("HF_ENDPOINT", mirror.base_url());
        c
    };
    assert_eq!(
        run_ok(in_proc().arg("cache-dir")).trim(),
        local.path().to_str().unwrap()
    );
    let pulled: serde_json::Value =
        serde_json::from_str(&run_ok(in_proc().args(["pull", REPO, "--json"]))).unwrap();
    assert_eq!(pulled["md5"], md5.as_str());
    assert!(Path::new(pulled["local_path"].as_str().unwrap()).is_file());
    let ls = run_ok(in_proc().args(["cache", "ls"]));
    assert!(ls.contains(&md5), "{ls}");

    // With nothing set, the cache is ~/.cache/llama-loader.
    let home = tempfile::tempdir().unwrap();
    let dir = run_ok(cli().env("HOME", home.path()).arg("cache-dir"));
    assert_eq!(
        dir.trim(),
        home.path().join(".cache/llama-loader").to_str().unwrap()
    );
}
