//! The embedder's OpenAI-compatible HTTP API (`--http-listen`), with the official `openai`
//! Python SDK (tests/openai_client.py) and curl as its clients, against the gRPC answers of the
//! same process: a loader and an embedder as separate processes, with a bearer token.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::{ConnectOptions, EmbedderClient};
use llama_agent_tests::http::{assert_error, curl};
use llama_agent_tests::mirror::{Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{model, repo_root, ServiceProcess, MINILM_FILE};
use serde_json::{json, Value};

const MINILM_REPO: &str = "test/all-MiniLM-L6-v2-GGUF";
const RERANKER_REPO: &str = "test/reranker-GGUF";
const RERANKER_FILE: &str = "synth-reranker-minilm-F32.gguf";
const TOKEN: &str = "openai-test-token";

struct Services {
    _cache: tempfile::TempDir,
    _mirror: Mirror,
    _loader: ServiceProcess,
    embedder: ServiceProcess,
    http: SocketAddr,
    grpc: EmbedderClient,
}

async fn start() -> Services {
    let mirror = Mirror::start(
        MirrorConfig::new()
            .repo(RepoSpec::new(MINILM_REPO).file(MINILM_FILE, model(MINILM_FILE)))
            .repo(RepoSpec::new(RERANKER_REPO).file(RERANKER_FILE, model(RERANKER_FILE))),
    )
    .await
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env = [("LLAMA_AGENT_TOKEN", TOKEN)];
    let loader = ServiceProcess::loader(&mirror, cache.path(), &env).unwrap();
    let loader_url = format!("http://{}", loader.addr);
    // Without flash attention the same request packs and embeds the same way every time, so
    // the HTTP and gRPC answers to it can be compared value by value.
    let embedder = ServiceProcess::spawn_env(
        "llama-embedder",
        &[
            "--loader-endpoint",
            &loader_url,
            "--http-listen",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--flash-attention",
            "false",
            "--max-models",
            "2",
        ],
        &env,
    )
    .unwrap();
    let http = embedder.http.expect("the embedder logs its HTTP address");
    let opts = ConnectOptions {
        token: Some(TOKEN.into()),
        ..Default::default()
    };
    let grpc = EmbedderClient::connect_with(&format!("http://{}", embedder.addr), &opts).unwrap();
    Services {
        _cache: cache,
        _mirror: mirror,
        _loader: loader,
        embedder,
        http,
        grpc,
    }
}

fn rows(r: &pb::EmbedResponse) -> Vec<Vec<f32>> {
    let e = r.embeddings.as_ref().unwrap();
    let flat = llama_agent_client::embedder::decode_vectors(e).unwrap();
    flat.chunks_exact(e.dim as usize)
        .map(<[f32]>::to_vec)
        .collect()
}

fn max_diff(a: &[Vec<f32>], b: &Value) -> f32 {
    let b: Vec<Vec<f32>> = serde_json::from_value(b.clone()).unwrap();
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The SDK's embeddings (base64, its default, and float) equal the gRPC ones; `dimensions`,
/// usage and `/v1/models` are OpenAI's; the SDK raises the right error class for an unknown
/// model, an empty input, token ids, a bad `dimensions` and a wrong key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_embeds_like_grpc() {
    let s = start().await;
    let texts: Vec<String> = [
        "The quick brown fox jumps over the lazy dog.",
        "Embeddings map text to vectors.",
        "",
        "naïve café — 東京",
        "a somewhat longer sentence about rivers, mountains and the weather in spring",
    ]
    .iter()
    .map(|t| t.to_string())
    .collect();

    let mut child = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/openai_client.py"))
        .args([&format!("http://{}/v1", s.http), TOKEN, MINILM_REPO])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python venv: run scripts/python-env.sh");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(serde_json::to_string(&texts).unwrap().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openai_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Value = serde_json::from_slice(&out.stdout).unwrap();

    let request = |texts: &[String], dimensions: u32| pb::EmbedRequest {
        model: MINILM_REPO.into(),
        texts: texts.to_vec(),
        options: Some(pb::EmbedOptions {
            dimensions,
            ..Default::default()
        }),
    };
    let want = s.grpc.embed(request(&texts, 0)).await.unwrap();
    let want_rows = rows(&want);
    assert_eq!(want_rows[0].len(), 384);
    let d = max_diff(&want_rows, &sdk["base64"]);
    assert!(d < 1e-5, "base64 (the SDK's default) vs gRPC: {d}");
    // One text alone is another packing than five together: compared with the same request.
    let one = s.grpc.embed(request(&texts[..1], 0)).await.unwrap();
    let d = max_diff(&rows(&one), &json!([sdk["float_one"]]));
    assert!(d < 1e-5, "float vs gRPC: {d}");
    assert_eq!(sdk["indexes"], json!([0, 1, 2, 3, 4]));
    let tokens: u32 = want.embeddings.as_ref().unwrap().token_counts.iter().sum();
    assert_eq!(sdk["usage"]["prompt_tokens"], tokens);
    assert_eq!(sdk["usage"]["total_tokens"], tokens);
    assert_eq!(sdk["model"], MINILM_REPO);

    let cut = s.grpc.embed(request(&texts[..2], 128)).await.unwrap();
    let d = max_diff(&rows(&cut), &sdk["dimensions"]);
    assert!(d < 1e-5, "dimensions 128 vs gRPC: {d}");

    let models = sdk["models"].as_array().unwrap();
    assert!(
        models
            .iter()
            .any(|m| m.as_str().unwrap().contains(MINILM_FILE)),
        "{models:?}"
    );

    let e = &sdk["errors"];
    let expect = [
        ("unknown_model", 404, "NotFoundError"),
        ("empty_input", 400, "BadRequestError"),
        ("token_ids", 400, "BadRequestError"),
        ("bad_dimensions", 400, "BadRequestError"),
        ("wrong_key", 401, "AuthenticationError"),
    ];
    for (case, status, class) in expect {
        assert_eq!(e[case]["status"], status, "{case}: {}", e[case]);
        assert_eq!(e[case]["class"], class, "{case}: {}", e[case]);
    }
    assert!(e["token_ids"]["message"]
        .as_str()
        .unwrap()
        .contains("token ids"));
    drop(s.embedder);
}

/// `/v1/rerank` in llama.cpp's server's shape (curl), equal to the gRPC Rerank; malformed
/// bodies, unknown routes, a model of the wrong kind and a missing key get OpenAI-shaped errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_reranks_and_gets_openai_shaped_errors() {
    let s = start().await;
    let base = format!("http://{}", s.http);
    let docs = [
        "Rivers form where rain and melting snow gather into channels.",
        "The stock market closed higher on Friday.",
        "Erosion by water carves valleys over millions of years.",
    ];
    let body = json!({"model": RERANKER_REPO, "query": "how do rivers form", "documents": docs,
                      "top_n": 2, "return_documents": true})
    .to_string();
    let (code, got) = curl(
        "POST",
        &format!("{base}/v1/rerank"),
        Some(TOKEN),
        Some(&body),
    );
    assert_eq!(code, 200, "{got}");
    let want = s
        .grpc
        .rerank(pb::RerankRequest {
            model: RERANKER_REPO.into(),
            query: "how do rivers form".into(),
            documents: docs.iter().map(|d| d.to_string()).collect(),
            top_n: Some(2),
            return_documents: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let results = got["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for (g, w) in results.iter().zip(&want.results) {
        assert_eq!(g["index"], w.index);
        let score = g["relevance_score"].as_f64().unwrap() as f32;
        assert!((score - w.logit).abs() < 1e-6, "{g} vs {w:?}");
        assert_eq!(g["document"]["text"], docs[w.index as usize]);
    }
    assert_eq!(got["usage"]["prompt_tokens"], want.prompt_tokens);

    let url = format!("{base}/v1/embeddings");
    assert_error(
        &curl("POST", &url, Some(TOKEN), Some("{\"model\": ")),
        400,
        "invalid_request_error",
        "truncated JSON",
    );
    assert_error(
        &curl("POST", &url, Some(TOKEN), Some("{\"input\": \"x\"}")),
        400,
        "invalid_request_error",
        "no model",
    );
    let huge = json!({"model": "x".repeat(10_000), "input": "hi"}).to_string();
    assert_error(
        &curl("POST", &url, Some(TOKEN), Some(&huge)),
        400,
        "invalid_request_error",
        "a 10 KB model reference",
    );
    let reranker_embeds = json!({"model": RERANKER_REPO, "input": "hi"}).to_string();
    assert_error(
        &curl("POST", &url, Some(TOKEN), Some(&reranker_embeds)),
        400,
        "invalid_request_error",
        "embedding with a reranker",
    );
    let bad_format = json!({"model": MINILM_REPO, "input": "hi", "encoding_format": "int8"});
    assert_error(
        &curl("POST", &url, Some(TOKEN), Some(&bad_format.to_string())),
        400,
        "invalid_request_error",
        "encoding_format int8",
    );
    assert_error(
        &curl("POST", &url, None, Some(&reranker_embeds)),
        401,
        "authentication_error",
        "no key",
    );
    assert_error(
        &curl("GET", &format!("{base}/v1/nothing-here"), Some(TOKEN), None),
        404,
        "not_found_error",
        "unknown route",
    );
    // Still serving after all of that.
    let ok = json!({"model": MINILM_REPO, "input": ["one", "two"]}).to_string();
    let (code, got) = curl("POST", &url, Some(TOKEN), Some(&ok));
    assert_eq!(code, 200, "{got}");
    assert_eq!(got["data"].as_array().unwrap().len(), 2);
    drop(s.embedder);
}
