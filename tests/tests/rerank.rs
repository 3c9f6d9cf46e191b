//! Rerank through real gRPC and `llama-cli rerank`, on reranker GGUFs written by
//! scripts/fetch-test-models.sh, against llama.cpp's own `llama-server --reranking` on the
//! same files (tests/fixtures/rerank.json, from scripts/make-rerank-fixture.sh).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::ClientError;
use llama_agent_tests::support::{
    model, model_md5, repo_root, run_ok, workspace_command, EmbedderStack, MINILM_FILE,
};
use llama_embedder::EmbedderConfig;
use tonic::Code;

/// A BERT cross-encoder: MiniLM's weights with a seeded random classification head.
const RERANKER_FILE: &str = "synth-reranker-minilm-F32.gguf";
const REPO: &str = "test/reranker-GGUF";
/// llama-server's scores and ours, each from its own packing of the pairs.
const TOLERANCE: f32 = 1e-3;

#[derive(serde::Deserialize)]
struct Fixture {
    models: BTreeMap<String, FixtureModel>,
}

#[derive(serde::Deserialize)]
struct FixtureModel {
    md5: String,
    cases: Vec<Case>,
}

#[derive(serde::Deserialize)]
struct Case {
    query: String,
    documents: Vec<String>,
    /// llama-server's answer, best first.
    results: Vec<Scored>,
    /// Each pair as llama-server tokenized it.
    pairs: Vec<Pair>,
}

#[derive(serde::Deserialize)]
struct Pair {
    index: u32,
    n_tokens: u32,
}

#[derive(serde::Deserialize, Clone, Copy, Debug)]
struct Scored {
    index: u32,
    relevance_score: f32,
}

fn fixture() -> Fixture {
    let path = repo_root().join("tests/fixtures/rerank.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Flash attention off, as the fixture's llama-server: it rounds K and V to F16, which moves
/// these heads' scores by up to ~5e-3 with the packing (seen: 4.3785 alone, 4.3833 packed).
fn config() -> EmbedderConfig {
    EmbedderConfig {
        threads: Some(2),
        flash_attention: false,
        ..Default::default()
    }
}

fn request(case: &Case) -> pb::RerankRequest {
    pb::RerankRequest {
        model: REPO.into(),
        query: case.query.clone(),
        documents: case.documents.clone(),
        ..Default::default()
    }
}

/// Same scores within the tolerance, and the same order wherever llama-server's own scores
/// are further apart than it.
fn assert_like_llama_server(got: &[(u32, f32)], want: &[Scored], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    let by_index: BTreeMap<u32, f32> = got.iter().copied().collect();
    for w in want {
        let g = by_index[&w.index];
        assert!(
            (g - w.relevance_score).abs() <= TOLERANCE,
            "{what}: document {} scored {g}, llama-server {}",
            w.index,
            w.relevance_score
        );
    }
    for (pos, (g, w)) in got.iter().zip(want).enumerate() {
        if g.0 != w.index {
            let theirs = by_index[&g.0];
            assert!(
                (theirs - w.relevance_score).abs() <= 2.0 * TOLERANCE,
                "{what}: place {pos} holds document {}, llama-server's holds {}",
                g.0,
                w.index
            );
        }
    }
}

async fn scores_match_llama_server(file: &str) {
    let fx = fixture();
    let Some(m) = fx.models.get(file) else {
        panic!("tests/fixtures/rerank.json has no {file}: rerun scripts/make-rerank-fixture.sh");
    };
    assert_eq!(
        m.md5,
        model_md5(file),
        "the fixture was made from another {file}: rerun scripts/make-rerank-fixture.sh"
    );
    let stack = EmbedderStack::start(config(), REPO, file).await.unwrap();
    let c = &stack.client;
    let info = c.model_info(REPO).await.unwrap();
    assert!(info.reranker, "{info:?}");
    assert_eq!(info.pooling, pb::Pooling::Rank as i32);
    for (k, case) in m.cases.iter().enumerate() {
        let r = c.rerank(request(case)).await.unwrap();
        assert_eq!(r.model_md5, m.md5);
        let got: Vec<(u32, f32)> = r.results.iter().map(|x| (x.index, x.score)).collect();
        assert_like_llama_server(&got, &case.results, &format!("{file} case {k}"));
        assert!(r.results.iter().all(|x| x.score == x.logit && !x.truncated));
        // Each pair is the sequence llama-server made of it (for a Qwen3-Reranker the
        // GGUF's rerank template around the query and the document).
        for p in &case.pairs {
            let x = r.results.iter().find(|x| x.index == p.index).unwrap();
            assert_eq!(x.tokens, p.n_tokens, "{file} case {k} document {}", p.index);
        }
        assert_eq!(
            r.prompt_tokens,
            r.results.iter().map(|x| x.tokens).sum::<u32>()
        );
        // The best three with their documents, and sigmoid scores.
        let top = c
            .rerank(pb::RerankRequest {
                top_n: Some(3),
                return_documents: true,
                sigmoid: true,
                ..request(case)
            })
            .await
            .unwrap();
        assert_eq!(top.results.len(), 3.min(case.documents.len()));
        for (t, full) in top.results.iter().zip(&r.results) {
            assert_eq!(t.index, full.index);
            assert_eq!(
                t.document.as_deref(),
                Some(case.documents[t.index as usize].as_str())
            );
            let sigmoid = 1.0 / (1.0 + (-t.logit).exp());
            assert!((t.score - sigmoid).abs() < 1e-6, "{t:?}");
        }
        // One document per request: one pair per batch, the same scores.
        for w in case.results.iter().take(3) {
            let one = c
                .rerank(pb::RerankRequest {
                    documents: vec![case.documents[w.index as usize].clone()],
                    ..request(case)
                })
                .await
                .unwrap();
            let s = one.results[0].score;
            assert!(
                (s - w.relevance_score).abs() <= TOLERANCE,
                "{file} case {k} document {} alone: {s} against {}",
                w.index,
                w.relevance_score
            );
        }
    }
    // Every case at once: their pairs share batches, the scores stay.
    let all = futures::future::join_all(m.cases.iter().map(|case| c.rerank(request(case)))).await;
    for (k, (r, case)) in all.into_iter().zip(&m.cases).enumerate() {
        let got: Vec<(u32, f32)> = r
            .unwrap()
            .results
            .iter()
            .map(|x| (x.index, x.score))
            .collect();
        assert_like_llama_server(&got, &case.results, &format!("{file} case {k}, concurrent"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bert_cross_encoder_scores_like_llama_server() {
    scores_match_llama_server(RERANKER_FILE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qwen3_style_reranker_scores_like_llama_server() {
    let fx = fixture();
    let file = "synth-qwen3-reranker-F32.gguf";
    if !fx.models.contains_key(file) {
        eprintln!("no Qwen3-Reranker-style model in the fixture; nothing to check");
        return;
    }
    scores_match_llama_server(file).await;
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (Code, String) {
    match r.unwrap_err() {
        ClientError::Status(s) => (s.code(), s.message().to_string()),
        other => panic!("expected a status, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_models_and_bad_requests_get_clear_codes() {
    let reranker = EmbedderStack::start(config(), REPO, RERANKER_FILE)
        .await
        .unwrap();
    let c = &reranker.client;
    let ok = pb::RerankRequest {
        model: REPO.into(),
        query: "what is a cat".into(),
        documents: vec!["a cat is a small animal".into()],
        ..Default::default()
    };
    // A reranker does not embed.
    let (code_, msg) = code(
        c.embed(pb::EmbedRequest {
            model: REPO.into(),
            texts: vec!["x".into()],
            options: None,
        })
        .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");
    assert!(msg.contains("reranker"), "{msg}");
    let cases = [
        (
            pb::RerankRequest {
                documents: vec![],
                ..ok.clone()
            },
            "no documents",
        ),
        (
            pb::RerankRequest {
                model: String::new(),
                ..ok.clone()
            },
            "model is required",
        ),
        (
            pb::RerankRequest {
                query: "q".repeat(20_000),
                ..ok.clone()
            },
            "the query has 20000 bytes",
        ),
        (
            pb::RerankRequest {
                documents: vec!["fine".into(), "word ".repeat(1000)],
                truncate: Some(false),
                ..ok.clone()
            },
            "document 1:",
        ),
        (
            pb::RerankRequest {
                query: "word ".repeat(600),
                ..ok.clone()
            },
            "leaving no room",
        ),
    ];
    for (req, want) in cases {
        let (code_, msg) = code(c.rerank(req).await);
        assert_eq!(code_, Code::InvalidArgument, "{msg}");
        assert!(msg.contains(want), "{msg:?} should say {want:?}");
        assert!(msg.len() < 300, "unbounded message: {}", msg.len());
    }
    // A long document is cut to the model's length by default, and says so.
    let info = c.model_info(REPO).await.unwrap();
    let r = c
        .rerank(pb::RerankRequest {
            documents: vec!["fine".into(), "word ".repeat(1000)],
            ..ok.clone()
        })
        .await
        .unwrap();
    let long = r.results.iter().find(|x| x.index == 1).unwrap();
    assert!(
        long.truncated && long.tokens == info.max_tokens_per_text,
        "{long:?}"
    );
    // Still serving.
    assert_eq!(c.rerank(ok.clone()).await.unwrap().results.len(), 1);

    // An embedding model does not rerank.
    let embedder = EmbedderStack::start(config(), "test/minilm-GGUF", MINILM_FILE)
        .await
        .unwrap();
    let (code_, msg) = code(
        embedder
            .client
            .rerank(pb::RerankRequest {
                model: "test/minilm-GGUF".into(),
                ..ok
            })
            .await,
    );
    assert_eq!(code_, Code::FailedPrecondition, "{msg}");
    assert!(
        msg.contains("not a reranker") && msg.contains("mean"),
        "{msg}"
    );
}

fn cli(cache: &Path) -> Command {
    let mut c = workspace_command("llama-cli");
    c.arg("--cache-dir").arg(cache).env("RUST_LOG", "warn");
    c
}

#[test]
fn cli_reranks_into_json_and_parquet() {
    let fx = fixture();
    let case = &fx.models[RERANKER_FILE].cases[0];
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("docs.jsonl");
    let lines: Vec<String> = case
        .documents
        .iter()
        .enumerate()
        .map(|(i, d)| serde_json::json!({"id": format!("doc-{i}"), "text": d}).to_string())
        .collect();
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let run = |extra: &[&str]| {
        run_ok(
            cli(&dir.path().join("cache"))
                .args([
                    "rerank",
                    "--threads",
                    "2",
                    "--flash-attention",
                    "false",
                    "--model",
                ])
                .arg(model(RERANKER_FILE))
                .args(["--query", &case.query, "--input"])
                .arg(&input)
                .args(extra),
        )
    };
    // --json: best first, index = position in the input, score = the raw logit.
    let stdout = run(&[
        "--json",
        "--top-n",
        "3",
        "--return-documents",
        "--batch-size",
        "2",
    ]);
    let got: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(got.len(), 3);
    let pairs: Vec<(u32, f32)> = got
        .iter()
        .map(|v| {
            (
                v["index"].as_u64().unwrap() as u32,
                v["score"].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_like_llama_server(&pairs, &case.results[..3], "llama-cli rerank --json");
    for v in &got {
        let i = v["index"].as_u64().unwrap() as usize;
        assert_eq!(v["document"].as_str(), Some(case.documents[i].as_str()));
    }

    // --output: every document, best first, read back by pyarrow.
    let output = dir.path().join("ranked.parquet");
    run(&["--output", output.to_str().unwrap()]);
    let script = r#"
import json, sys
import pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
t = f.read()
meta = {k.decode(): v.decode() for k, v in (f.metadata.metadata or {}).items() if not k.startswith(b"ARROW")}
print(json.dumps({
    "schema": {n: str(ty) for n, ty in zip(t.schema.names, t.schema.types)},
    "meta": meta,
    "rank": t.column("rank").to_pylist(),
    "index": t.column("index").to_pylist(),
    "id": t.column("id").to_pylist(),
    "score": t.column("score").to_pylist(),
    "document": t.column("document").to_pylist(),
}))
"#;
    let out = run_ok(
        Command::new(repo_root().join(".venv/bin/python"))
            .args(["-c", script])
            .arg(&output),
    );
    let s: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(s["schema"]["score"], "float");
    assert_eq!(s["schema"]["index"], "uint32");
    assert_eq!(s["meta"]["query"], case.query.as_str());
    assert_eq!(s["meta"]["model_md5"], model_md5(RERANKER_FILE).as_str());
    let n = case.documents.len();
    assert_eq!(s["rank"], serde_json::json!((0..n).collect::<Vec<_>>()));
    let pairs: Vec<(u32, f32)> = (0..n)
        .map(|k| {
            (
                s["index"][k].as_u64().unwrap() as u32,
                s["score"][k].as_f64().unwrap() as f32,
            )
        })
        .collect();
    assert_like_llama_server(&pairs, &case.results, "llama-cli rerank --output");
    for k in 0..n {
        let i = s["index"][k].as_u64().unwrap() as usize;
        assert_eq!(s["id"][k].as_str().unwrap(), format!("doc-{i}"));
        assert_eq!(s["document"][k].as_str(), Some(case.documents[i].as_str()));
    }

    // An embedding model is refused with the reason, and a non-zero exit.
    let out = cli(&dir.path().join("cache"))
        .args(["rerank", "--threads", "2", "--query", "q", "--model"])
        .arg(model(MINILM_FILE))
        .arg("--input")
        .arg(&input)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not a reranker"), "{stderr}");
}
