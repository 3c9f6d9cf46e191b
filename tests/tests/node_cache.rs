//! Models without a shared volume: a loader process and embedders that cannot see its cache
//! (each in a mount namespace where an empty tmpfs covers the loader's directory), each with a
//! node-local `--model-cache-dir`. Models are streamed from the loader (ReadModelFile),
//! verified, published, served, and evicted least recently used under the cap; a node streams
//! a model once however many requests (or processes sharing the directory) ask; a partial copy
//! resumes, a wrong one starts over.

use std::path::{Path, PathBuf};

use futures::StreamExt;
use llama_agent_client::embedder::decode_vectors;
use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::{EmbedderClient, LoaderClient};
use llama_agent_tests::http::{sample, scrape};
use llama_agent_tests::mirror::{Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{model, model_md5, ServiceProcess, MINILM_F32_FILE, MINILM_FILE};
use tonic::Code;

const F16_REPO: &str = "test/all-MiniLM-L6-v2-GGUF";
const F32_REPO: &str = "test/all-MiniLM-L6-v2-F32-GGUF";

async fn mirror() -> Mirror {
    Mirror::start(
        MirrorConfig::new()
            .repo(RepoSpec::new(F16_REPO).file(MINILM_FILE, model(MINILM_FILE)))
            .repo(RepoSpec::new(F32_REPO).file(MINILM_F32_FILE, model(MINILM_F32_FILE))),
    )
    .await
    .unwrap()
}

fn size_of(file: &str) -> u64 {
    std::fs::metadata(model(file)).unwrap().len()
}

struct Loader {
    cache: tempfile::TempDir,
    process: ServiceProcess,
}

impl Loader {
    fn start(mirror: &Mirror) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let env = [("LLAMA_AGENT_METRICS_LISTEN", "127.0.0.1:0")];
        let process = ServiceProcess::loader(mirror, cache.path(), &env).unwrap();
        Self { cache, process }
    }

    fn url(&self) -> String {
        format!("http://{}", self.process.addr)
    }

    fn client(&self) -> LoaderClient {
        LoaderClient::connect(&self.url()).unwrap()
    }

    fn streamed(&self) -> u64 {
        sample(
            &scrape(&self.process),
            "llama_agent_loader_streamed_bytes_total",
            &[],
        ) as u64
    }

    /// Downloads `repo` into the loader's cache (the services then only stream it).
    async fn pull(&self, repo: &str) {
        let req = llama_agent_client::proto::loader::v1::EnsureModelRequest {
            model: repo.into(),
            ..Default::default()
        };
        self.client().ensure(req, |_| {}).await.unwrap();
    }
}

/// An embedder on "another node": the loader's cache directory is hidden from it.
fn embedder(loader: &Loader, cache_dir: &Path, max_size: u64) -> ServiceProcess {
    let args = embedder_args(loader, cache_dir, max_size);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ServiceProcess::spawn_hiding("llama-embedder", loader.cache.path(), &args, &[]).unwrap()
}

fn embedder_args(loader: &Loader, cache_dir: &Path, max_size: u64) -> Vec<String> {
    [
        "--loader-endpoint",
        &loader.url(),
        "--threads",
        "1",
        "--metrics-listen",
        "127.0.0.1:0",
        "--model-cache-dir",
        &cache_dir.display().to_string(),
        "--model-cache-max-size",
        &max_size.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

fn client(e: &ServiceProcess) -> EmbedderClient {
    EmbedderClient::connect(&format!("http://{}", e.addr)).unwrap()
}

fn texts() -> Vec<String> {
    ["A cat sat on the mat.", "Streaming a model to a node."]
        .map(String::from)
        .to_vec()
}

async fn embed(
    e: &ServiceProcess,
    repo: &str,
) -> Result<Vec<f32>, llama_agent_client::ClientError> {
    let r = client(e)
        .embed(pb::EmbedRequest {
            model: repo.into(),
            texts: texts(),
            options: None,
        })
        .await?;
    Ok(decode_vectors(r.embeddings.as_ref().unwrap()).unwrap())
}

/// The same model gives the same vectors, up to the ~2e-4 that flash attention's packing of
/// concurrent requests makes (README, LLAMA_EMBEDDER_FLASH_ATTENTION); the copy itself is
/// checked byte for byte by MD5.
fn assert_close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst < 2e-3, "vectors differ by up to {worst}");
}

fn node_metric(e: &ServiceProcess, name: &str, labels: &[(&str, &str)]) -> u64 {
    sample(&scrape(e), name, labels) as u64
}

fn streamed_outcomes(e: &ServiceProcess) -> u64 {
    node_metric(
        e,
        "llama_agent_node_cache_requests_total",
        &[("outcome", "streamed")],
    )
}

/// The published copies in a node cache: model directory names (MD5s).
fn published(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir.join("models"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn md5_of(path: &Path) -> String {
    use md5::{Digest, Md5};
    hex::encode(Md5::digest(std::fs::read(path).unwrap()))
}

/// Vectors from an embedder that opens the loader's own file (a shared volume).
async fn reference_vectors(loader: &Loader, repo: &str) -> Vec<f32> {
    let shared = tempfile::tempdir().unwrap();
    let args = embedder_args(loader, shared.path(), 20_000_000_000);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let e = ServiceProcess::spawn("llama-embedder", &args).unwrap();
    let v = embed(&e, repo).await.unwrap();
    // It saw the loader's file: nothing was streamed, nothing copied.
    assert_eq!(
        node_metric(
            &e,
            "llama_agent_node_cache_requests_total",
            &[("outcome", "shared")]
        ),
        1
    );
    assert_eq!(streamed_outcomes(&e), 0);
    assert!(published(shared.path()).is_empty());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_stream_verify_serve_and_evict() {
    let mirror = mirror().await;
    let loader = Loader::start(&mirror);
    loader.pull(F16_REPO).await;
    loader.pull(F32_REPO).await;
    let (f16, f32) = (size_of(MINILM_FILE), size_of(MINILM_F32_FILE));
    let expected = reference_vectors(&loader, F16_REPO).await;

    // Room for the bigger model, not for both.
    let cap = f32 + f16 / 2;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let replicas: Vec<ServiceProcess> = dirs
        .iter()
        .map(|d| embedder(&loader, d.path(), cap))
        .collect();

    // Four concurrent requests per replica: each replica streams the model once.
    let mut calls = Vec::new();
    for r in &replicas {
        for _ in 0..4 {
            calls.push(embed(r, F16_REPO));
        }
    }
    for v in futures::future::join_all(calls).await {
        assert_close(&v.unwrap(), &expected);
    }
    assert_eq!(loader.streamed(), 2 * f16, "one stream per replica");
    for (r, d) in replicas.iter().zip(&dirs) {
        assert_eq!(streamed_outcomes(r), 1);
        assert_eq!(
            node_metric(r, "llama_agent_node_cache_streamed_bytes_total", &[]),
            f16
        );
        let md5 = model_md5(MINILM_FILE);
        assert_eq!(published(d.path()), vec![md5.clone()]);
        let copy = d.path().join("models").join(&md5).join(MINILM_FILE);
        assert_eq!(
            md5_of(&copy),
            md5,
            "the published copy is the model, byte for byte"
        );
        assert!(std::fs::read_dir(d.path().join("partial"))
            .unwrap()
            .next()
            .is_none());
    }

    // The F32 model on replica 0: F16 is unloaded (one model at a time), so its copy is free
    // to go, and must, to fit under the cap.
    let (r0, d0) = (&replicas[0], dirs[0].path());
    embed(r0, F32_REPO).await.unwrap();
    assert_eq!(published(d0), vec![model_md5(MINILM_F32_FILE)]);
    assert_eq!(
        node_metric(r0, "llama_agent_node_cache_evictions_total", &[]),
        1
    );
    assert!(node_metric(r0, "llama_agent_node_cache_bytes", &[]) <= cap);
    // And back: F16 is streamed again, F32 evicted in turn.
    assert_close(&embed(r0, F16_REPO).await.unwrap(), &expected);
    assert_eq!(published(d0), vec![model_md5(MINILM_FILE)]);
    assert_eq!(streamed_outcomes(r0), 3);
    assert_eq!(loader.streamed(), 3 * f16 + f32);

    // A cap below the model's size: RESOURCE_EXHAUSTED naming both sizes; still serving.
    let small = tempfile::tempdir().unwrap();
    let tiny = embedder(&loader, small.path(), f16 / 2);
    let err = embed(&tiny, F16_REPO).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains(&f16.to_string()) && msg.contains(&(f16 / 2).to_string()),
        "{msg}"
    );
    assert!(published(small.path()).is_empty());
    assert_close(&embed(&replicas[1], F16_REPO).await.unwrap(), &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processes_sharing_a_node_directory_stream_once() {
    let mirror = mirror().await;
    let loader = Loader::start(&mirror);
    loader.pull(F16_REPO).await;
    let f16 = size_of(MINILM_FILE);
    // One hostPath-like directory, two processes.
    let shared = tempfile::tempdir().unwrap();
    loader.pull(F32_REPO).await;
    let f32 = size_of(MINILM_F32_FILE);
    // Room for either model, not both.
    let cap = f32 + f16 / 2;
    let a = embedder(&loader, shared.path(), cap);
    let b = embedder(&loader, shared.path(), cap);
    let (va, vb) = tokio::join!(embed(&a, F16_REPO), embed(&b, F16_REPO));
    assert_close(&va.unwrap(), &vb.unwrap());
    assert_eq!(loader.streamed(), f16, "the node streamed the model once");
    assert_eq!(streamed_outcomes(&a) + streamed_outcomes(&b), 1);
    let hits = |e: &ServiceProcess| {
        node_metric(
            e,
            "llama_agent_node_cache_requests_total",
            &[("outcome", "hit")],
        )
    };
    assert_eq!(
        hits(&a) + hits(&b),
        1,
        "the other process used the published copy"
    );

    // B moves on to F32 and lets go of F16, but A still has F16 loaded: its copy is pinned,
    // so there is no room, and B says so rather than pull the file from under A.
    let err = embed(&b, F32_REPO).await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(published(shared.path()), vec![model_md5(MINILM_FILE)]);
    assert!(embed(&a, F16_REPO).await.is_ok());
    // Once A is gone (its lock with it), B can make room.
    drop(a);
    embed(&b, F32_REPO).await.unwrap();
    assert_eq!(published(shared.path()), vec![model_md5(MINILM_F32_FILE)]);
}

/// The partial copy a stopped service left behind: `have` bytes of the model (or garbage).
fn seed_partial(dir: &Path, file: &str, bytes: &[u8]) -> PathBuf {
    let partial = dir.join("partial").join(model_md5(file));
    std::fs::create_dir_all(&partial).unwrap();
    let path = partial.join(file);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn partial_copies_resume_and_wrong_ones_start_over() {
    let mirror = mirror().await;
    let loader = Loader::start(&mirror);
    loader.pull(F16_REPO).await;
    let whole = std::fs::read(model(MINILM_FILE)).unwrap();
    let f16 = whole.len() as u64;
    let half = whole.len() / 2;
    let expected = reference_vectors(&loader, F16_REPO).await;

    // Resumed: only the missing half crosses the wire.
    let dir = tempfile::tempdir().unwrap();
    seed_partial(dir.path(), MINILM_FILE, &whole[..half]);
    let e = embedder(&loader, dir.path(), 10 * f16);
    assert_close(&embed(&e, F16_REPO).await.unwrap(), &expected);
    assert_eq!(loader.streamed(), f16 - half as u64);
    assert_eq!(published(dir.path()), vec![model_md5(MINILM_FILE)]);
    drop(e);

    // Wrong bytes before the resume point: the MD5 at the end catches them; the copy starts
    // over and is right.
    let before = loader.streamed();
    let dir = tempfile::tempdir().unwrap();
    let mut wrong = whole[..half].to_vec();
    wrong[1000] ^= 0xff;
    seed_partial(dir.path(), MINILM_FILE, &wrong);
    let e = embedder(&loader, dir.path(), 10 * f16);
    assert_close(&embed(&e, F16_REPO).await.unwrap(), &expected);
    assert_eq!(loader.streamed() - before, f16 - half as u64 + f16);
    let copy = dir
        .path()
        .join("models")
        .join(model_md5(MINILM_FILE))
        .join(MINILM_FILE);
    assert_eq!(md5_of(&copy), model_md5(MINILM_FILE));
}

#[tokio::test]
async fn read_model_file_answers_ranges_and_refuses_bad_requests() {
    let mirror = mirror().await;
    let loader = Loader::start(&mirror);
    loader.pull(F16_REPO).await;
    let whole = std::fs::read(model(MINILM_FILE)).unwrap();
    let c = loader.client();

    // From an offset: the tail, then the whole file's MD5 (not the tail's).
    let offset = whole.len() as u64 - 3_000_000;
    let mut stream = std::pin::pin!(c.read_model_file(F16_REPO, "", offset).await.unwrap());
    let (mut got, mut md5) = (Vec::new(), String::new());
    while let Some(msg) = stream.next().await {
        let msg = msg.unwrap();
        assert_eq!(msg.size_bytes, whole.len() as u64);
        assert!(msg.data.len() <= 1 << 20);
        assert!(md5.is_empty(), "nothing after the MD5");
        got.extend_from_slice(&msg.data);
        md5 = msg.md5;
    }
    assert_eq!(got, whole[offset as usize..]);
    assert_eq!(md5, model_md5(MINILM_FILE));

    let code = |r: Result<_, llama_agent_client::ClientError>| match r {
        Ok(_) => panic!("accepted"),
        Err(e) => (e.code(), e.to_string()),
    };
    let past = whole.len() as u64 + 1;
    let (c1, m1) = code(c.read_model_file(F16_REPO, "", past).await.map(|_| ()));
    assert_eq!(c1, Code::OutOfRange, "{m1}");
    let (c2, m2) = code(
        c.read_model_file("test/not-cached", "", 0)
            .await
            .map(|_| ()),
    );
    assert_eq!(c2, Code::NotFound, "{m2}");
    let long = "x".repeat(10_000);
    let (c3, m3) = code(c.read_model_file(F16_REPO, &long, 0).await.map(|_| ()));
    assert_eq!(c3, Code::NotFound, "{m3}");
    assert!(
        m3.len() < 500,
        "the file name is not echoed whole: {} bytes",
        m3.len()
    );
    // The loader still serves.
    let mut again = std::pin::pin!(c
        .read_model_file(F16_REPO, MINILM_FILE, past - 2)
        .await
        .unwrap());
    assert_eq!(again.next().await.unwrap().unwrap().data.len(), 1);
}
