//! The embedder through real gRPC on ephemeral ports, on the real all-MiniLM-L6-v2 GGUF
//! (served by the hub mirror through a real loader), against vectors computed without
//! llama.cpp (tests/fixtures/minilm-reference.json, from scripts/make-embedding-reference.py);
//! a Qwen3-Embedding-style causal decoder against llama.cpp's own llama-server on the same GGUF
//! (tests/fixtures/decoder-embedding-qwen3.json, from scripts/make-decoder-embedding-fixture.sh);
//! and `llama-cli embed` into Parquet, read back with pyarrow.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use futures::StreamExt;
use llama_agent_client::embedder::decode_vectors;
use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::{ClientError, EmbedderClient, RetryPolicy};
use llama_agent_tests::support::{
    model, model_md5, repo_root, workspace_command, EmbedderStack, MINILM_F32_FILE, MINILM_FILE,
};
use llama_embedder::EmbedderConfig;
use tonic::Code;

const MINILM_REPO: &str = "test/all-MiniLM-L6-v2-GGUF";
const DIM: usize = 384;
/// A qwen3 decoder with last-token pooling and the end-of-text token appended, random weights
/// (scripts/fetch-test-models.sh).
const QWEN_REPO: &str = "test/synth-qwen3-embedding-GGUF";
const QWEN_FILE: &str = "synth-qwen3-embedding-F32.gguf";

/// Mirror → loader → embedder, all in this process on 127.0.0.1:0.
struct Stack;

impl Stack {
    async fn start(config: EmbedderConfig) -> EmbedderStack {
        Self::start_with(config, MINILM_FILE).await
    }

    /// The repo holds one GGUF, `file`, so the repo reference resolves to it.
    async fn start_with(config: EmbedderConfig, file: &str) -> EmbedderStack {
        Self::start_repo(config, MINILM_REPO, file).await
    }

    async fn start_repo(config: EmbedderConfig, repo: &str, file: &str) -> EmbedderStack {
        EmbedderStack::start(config, repo, file).await.unwrap()
    }
}

fn config() -> EmbedderConfig {
    EmbedderConfig {
        threads: Some(2),
        ..Default::default()
    }
}

#[derive(serde::Deserialize)]
struct Reference {
    dim: usize,
    rows: Vec<RefRow>,
}

#[derive(serde::Deserialize)]
struct RefRow {
    text: String,
    token_ids: Vec<i32>,
    vector: Vec<f32>,
}

fn reference() -> Reference {
    let path = repo_root().join("tests/fixtures/minilm-reference.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

fn request(texts: &[String], options: pb::EmbedOptions) -> pb::EmbedRequest {
    request_for(MINILM_REPO, texts, options)
}

fn request_for(model: &str, texts: &[String], options: pb::EmbedOptions) -> pb::EmbedRequest {
    pb::EmbedRequest {
        model: model.into(),
        texts: texts.to_vec(),
        options: Some(options),
    }
}

/// Vectors as rows.
fn rows(r: &pb::EmbedResponse) -> Vec<Vec<f32>> {
    let e = r.embeddings.as_ref().unwrap();
    let flat = decode_vectors(e).expect("well-formed vectors");
    flat.chunks(e.dim as usize).map(<[f32]>::to_vec).collect()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

/// How close two packings of the same texts come. With exact attention on F32 weights only the
/// order of float additions changes, and the issue's 1e-4 holds. As served (F16 weights, flash
/// attention, which rounds K and V to F16), where a sequence sits in a batch flips single F16
/// roundings: measured on MiniLM F16, batch 1 or 8 vs 64 differ by up to 1.5e-4 and one
/// sequence per batch vs packed by 1.9e-4, so that bound is 2.5e-4. Both add cosine >= 0.99999.
const F32_TOLERANCE: f32 = 1e-4;
const F16_TOLERANCE: f32 = 2.5e-4;

fn assert_same_vectors(got: &[Vec<f32>], want: &[Vec<f32>], tolerance: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: row count");
    let d = max_abs_diff(got, want);
    eprintln!("{what}: max difference {d}");
    assert!(d < tolerance, "{what}: max difference {d}");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        let c = cosine(a, b);
        assert!(c >= 0.99999, "{what}: row {i} cosine {c}");
    }
}

fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    a.iter()
        .flatten()
        .zip(b.iter().flatten())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> (Code, String) {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(ClientError::Status(s)) => (s.code(), s.message().to_string()),
        Err(e) => (e.code(), e.to_string()),
    }
}

/// Texts of every length class, for batching tests.
fn corpus(n: usize) -> Vec<String> {
    let refs = reference();
    (0..n)
        .map(|i| {
            let base = &refs.rows[i % refs.rows.len()].text;
            format!("{base} #{i}")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vectors_match_the_numpy_reference() {
    let stack = Stack::start(config()).await;
    let refs = reference();
    assert_eq!(refs.dim, DIM);
    let texts: Vec<String> = refs.rows.iter().map(|r| r.text.clone()).collect();
    let r = stack
        .client
        .embed(request(&texts, pb::EmbedOptions::default()))
        .await
        .unwrap();
    assert_eq!(r.model_md5, model_md5(MINILM_FILE));
    assert_eq!(r.pooling, pb::Pooling::Mean as i32, "the GGUF says mean");
    assert!(r.normalized);
    let e = r.embeddings.as_ref().unwrap();
    assert_eq!((e.dim as usize, e.count as usize), (DIM, texts.len()));
    assert_eq!(e.data.len(), DIM * texts.len() * 4);
    for (i, (got, want)) in rows(&r).iter().zip(&refs.rows).enumerate() {
        let c = cosine(got, &want.vector);
        assert!(c >= 0.999, "row {i} {:?}: cosine {c}", want.text);
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "row {i} norm {norm}");
        assert_eq!(
            e.token_counts[i] as usize,
            want.token_ids.len(),
            "row {i} {:?}: llama.cpp and the reference tokenizer disagree",
            want.text
        );
        assert!(!e.truncated[i]);
    }
}

/// tests/fixtures/decoder-embedding-qwen3.json: llama-server's vectors for `QWEN_FILE`.
#[derive(serde::Deserialize)]
struct DecoderFixture {
    model_md5: String,
    dim: usize,
    eos_token_id: i32,
    made_by: DecoderMadeBy,
    cases: Vec<DecoderCase>,
}

#[derive(serde::Deserialize)]
struct DecoderMadeBy {
    /// The highest cosine between two different texts' vectors: how close a wrong row can come.
    highest_cosine_between_different_texts: f64,
}

#[derive(serde::Deserialize)]
struct DecoderCase {
    text: String,
    /// The cut asked for (EmbedOptions.max_length); 0: the engine's own limit, 512 tokens.
    max_length: u32,
    /// As llama.cpp tokenizes the whole text: no BOS, the end-of-text token last.
    token_ids: Vec<i32>,
    n_tokens: u32,
    truncated: bool,
    vector: Vec<f32>,
}

impl DecoderCase {
    /// The text's start, for messages.
    fn short(&self) -> String {
        self.text.chars().take(40).collect()
    }

    /// Whether a request cut at `cap` tokens embeds this case's tokens exactly.
    fn fits(&self, cap: u32) -> bool {
        let own = if self.max_length == 0 {
            DECODER_TOKENS_PER_TEXT
        } else {
            self.max_length
        };
        own == cap || self.token_ids.len() as u32 <= own.min(cap)
    }
}

/// The engine's limit per text for a decoder on a CPU: its 512-token batch.
const DECODER_TOKENS_PER_TEXT: u32 = 512;

fn decoder_fixture() -> DecoderFixture {
    let path = repo_root().join("tests/fixtures/decoder-embedding-qwen3.json");
    serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap()
}

/// Embeds `cases` in one request cut at `cap` and checks every row against llama.cpp's vector:
/// cosine >= 0.999, closer to its own text's vector than to any other's (the texts' vectors
/// are near each other, the end-of-text token's row dominating them all), and the tokens
/// embedded and cut. Returns the lowest cosine.
async fn embed_like_llama_cpp(
    c: &EmbedderClient,
    cases: &[&DecoderCase],
    all: &[DecoderCase],
    cap: u32,
    what: &str,
) -> f64 {
    let texts: Vec<String> = cases.iter().map(|c| c.text.clone()).collect();
    let options = pb::EmbedOptions {
        max_length: if cap == DECODER_TOKENS_PER_TEXT {
            0
        } else {
            cap
        },
        ..Default::default()
    };
    let r = c
        .embed(request_for(QWEN_REPO, &texts, options))
        .await
        .unwrap();
    assert_eq!(r.pooling, pb::Pooling::Last as i32, "the GGUF says last");
    assert!(r.normalized);
    let e = r.embeddings.as_ref().unwrap();
    let mut lowest = 1.0f64;
    for (i, (got, want)) in rows(&r).iter().zip(cases).enumerate() {
        let name = format!("{what}: row {i} {:?}", want.short());
        let own = cosine(got, &want.vector);
        assert!(own >= 0.999, "{name}: cosine {own}");
        for other in all.iter().filter(|o| o.text != want.text) {
            let c = cosine(got, &other.vector);
            assert!(
                c < own,
                "{name}: nearer {:?} ({c}) than its own ({own})",
                other.short()
            );
        }
        let norm: f32 = got.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "{name}: norm {norm}");
        assert_eq!(e.token_counts[i], want.n_tokens, "{name}: tokens embedded");
        assert_eq!(e.truncated[i], want.truncated, "{name}: truncated");
        lowest = lowest.min(own);
    }
    eprintln!("{what}: lowest cosine with llama.cpp {lowest}");
    lowest
}

/// A Qwen3-Embedding-style decoder (qwen3, causal, last-token pooling, end-of-text token
/// appended) embeds as llama.cpp's llama-server does on the same GGUF: short texts, texts cut
/// to the engine's 512-token limit and to a max_length (the end-of-text token kept), and
/// mixed lengths packed into one batch, where each sequence's own last row must be read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoder_last_token_pooling_matches_llama_cpp() {
    let fx = decoder_fixture();
    assert_eq!(
        fx.model_md5,
        model_md5(QWEN_FILE),
        "the fixture was made from another {QWEN_FILE}: rerun scripts/make-decoder-embedding-fixture.sh"
    );
    let between = fx.made_by.highest_cosine_between_different_texts;
    assert!(
        between < 0.999,
        "the texts' vectors cannot be told apart ({between})"
    );
    let stack = Stack::start_repo(config(), QWEN_REPO, QWEN_FILE).await;
    let c = &stack.client;

    // Tokens as llama.cpp makes them: no BOS, the end-of-text token appended as the GGUF says.
    for case in &fx.cases {
        let t = c
            .tokenize(pb::TokenizeRequest {
                model: QWEN_REPO.into(),
                text: case.text.clone(),
                add_special: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(t.ids, case.token_ids, "{:?}", case.short());
        assert_eq!(t.ids.last(), Some(&fx.eos_token_id));
    }
    let info = c.model_info(QWEN_REPO).await.unwrap();
    assert_eq!(
        (info.dimensions as usize, info.causal),
        (fx.dim, true),
        "{info:?}"
    );
    assert_eq!(info.pooling, pb::Pooling::Last as i32);
    assert_eq!(info.max_tokens_per_text, DECODER_TOKENS_PER_TEXT);

    // Packed: all texts but the one cut at 16 in one request; the 11 uncut ones (432 tokens)
    // share one llama.cpp batch, the one cut to 512 fills another. Then a request cut at 16
    // tokens: that text with the 8 that 16 leaves whole, all in one batch.
    let mut lowest = 1.0f64;
    for cap in [DECODER_TOKENS_PER_TEXT, 16] {
        let cases: Vec<&DecoderCase> = fx.cases.iter().filter(|c| c.fits(cap)).collect();
        assert!(cases.len() >= 8 && cases.iter().any(|c| c.truncated));
        let what = format!("{} texts packed, max_length {cap}", cases.len());
        lowest = lowest.min(embed_like_llama_cpp(c, &cases, &fx.cases, cap, &what).await);
    }
    // Singly: one text per request, one after another, so one sequence per batch.
    for case in &fx.cases {
        let cap = match case.max_length {
            0 => DECODER_TOKENS_PER_TEXT,
            n => n,
        };
        let what = format!("alone, max_length {cap}");
        lowest = lowest.min(embed_like_llama_cpp(c, &[case], &fx.cases, cap, &what).await);
    }
    eprintln!("lowest cosine with llama.cpp over all: {lowest}");

    // Last pooling outputs one row per sequence from llama.cpp, mean every row, cls the first:
    // requests of all three sent at once (sharing batches) read their own rows, as alone.
    let whole: Vec<&DecoderCase> = fx
        .cases
        .iter()
        .filter(|c| c.max_length == 0 && !c.truncated)
        .collect();
    let texts: Vec<String> = whole.iter().map(|c| c.text.clone()).collect();
    let embed_on = |c: &EmbedderClient, texts: Vec<String>, pooling: pb::Pooling| {
        let c = c.clone();
        async move {
            let options = pb::EmbedOptions {
                pooling: pooling as i32,
                ..Default::default()
            };
            let r = c
                .embed(request_for(QWEN_REPO, &texts, options))
                .await
                .unwrap();
            assert_eq!(r.pooling, pooling as i32);
            rows(&r)
        }
    };
    let embed = |texts: Vec<String>, pooling: pb::Pooling| embed_on(c, texts, pooling);
    let poolings = [pb::Pooling::Mean, pb::Pooling::Cls, pb::Pooling::Last];
    let (mean, cls, last) = tokio::join!(
        embed(texts.clone(), poolings[0]),
        embed(texts.clone(), poolings[1]),
        embed(texts.clone(), poolings[2]),
    );
    for (pooling, together) in poolings.iter().zip([&mean, &cls, &last]) {
        for (i, text) in texts.iter().enumerate() {
            let alone = embed(vec![text.clone()], *pooling).await;
            let c = cosine(&together[i], &alone[0]);
            assert!(
                c >= 0.9999,
                "{pooling:?} row {i}: packed vs alone cosine {c}"
            );
        }
    }
    // A text of one token reads the same row whatever the pooling.
    for i in (0..texts.len()).filter(|&i| whole[i].n_tokens > 1) {
        assert!(
            max_abs_diff(&[mean[i].clone()], &[last[i].clone()]) > 1e-3,
            "row {i}"
        );
        assert!(
            max_abs_diff(&[cls[i].clone()], &[last[i].clone()]) > 1e-3,
            "row {i}"
        );
    }

    // Batches padded to one shape (the default on a GPU, where CUDA graphs need it): the
    // padding sequence's rows, and the rows flagged only to keep the output count fixed, are
    // never read. Mean pooling next to last makes every row of a padded batch an output.
    let padded = Stack::start_repo(
        EmbedderConfig {
            pad_batches: Some(true),
            ..config()
        },
        QWEN_REPO,
        QWEN_FILE,
    )
    .await;
    for cap in [DECODER_TOKENS_PER_TEXT, 16] {
        let cases: Vec<&DecoderCase> = fx.cases.iter().filter(|c| c.fits(cap)).collect();
        let what = format!("padded: {} texts packed, max_length {cap}", cases.len());
        embed_like_llama_cpp(&padded.client, &cases, &fx.cases, cap, &what).await;
    }
    let p = &padded.client;
    let (padded_mean, padded_last) = tokio::join!(
        embed_on(p, texts.clone(), pb::Pooling::Mean),
        embed_on(p, texts.clone(), pb::Pooling::Last),
    );
    for (what, got, want) in [("mean", &padded_mean, &mean), ("last", &padded_last, &last)] {
        for i in 0..texts.len() {
            let c = cosine(&got[i], &want[i]);
            assert!(c >= 0.9999, "{what} row {i}: padded vs unpadded cosine {c}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenizer_matches_the_reference_and_model_info_describes_the_model() {
    let stack = Stack::start(config()).await;
    let c = &stack.client;
    // The reference ids come from the model's own vocab.txt through the Python reference
    // tokenizer (scripts/make-embedding-reference.py); [CLS]/[SEP] are the special tokens.
    for row in reference().rows {
        let t = c
            .tokenize(pb::TokenizeRequest {
                model: MINILM_REPO.into(),
                text: row.text.clone(),
                add_special: true,
                with_pieces: true,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(t.ids, row.token_ids, "{:?}", row.text);
        assert_eq!(t.pieces.len(), t.ids.len());
        let d = c
            .detokenize(pb::DetokenizeRequest {
                model: MINILM_REPO.into(),
                ids: t.ids,
                render_special: true,
            })
            .await
            .unwrap();
        assert!(
            d.text.starts_with("[CLS]") && d.text.ends_with("[SEP]"),
            "{}",
            d.text
        );
    }
    let info = c.model_info(MINILM_REPO).await.unwrap();
    let m = info.model.unwrap();
    assert!(m.was_loaded, "the tokenize calls loaded it");
    assert_eq!(m.md5, model_md5(MINILM_FILE));
    assert_eq!(
        (m.architecture.as_str(), m.quantization.as_str()),
        ("bert", "F16")
    );
    assert_eq!(
        (m.vocab_size, m.layers, m.embedding_length),
        (30_522, 6, DIM as u32)
    );
    assert_eq!((info.dimensions as usize, info.causal), (DIM, false));
    assert_eq!(info.pooling, pb::Pooling::Mean as i32);
    assert_eq!(info.max_tokens_per_text, 512);
    // An encoder on a CPU: 512-token batches of at most 64 texts, one context.
    assert_eq!(
        (
            info.max_batch_tokens,
            info.max_texts_per_batch,
            info.contexts
        ),
        (512, 64, 1)
    );
    assert_eq!(m.placement, "CPU");
    let bad = pb::DetokenizeRequest {
        model: MINILM_REPO.into(),
        ids: vec![-1],
        render_special: false,
    };
    assert_eq!(
        c.detokenize(bad).await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instruction_and_prefix_go_before_each_text() {
    let stack = Stack::start(config()).await;
    let texts: Vec<String> = reference().rows.iter().map(|r| r.text.clone()).collect();
    let embed = |texts: Vec<String>, instruction: &str, prefix: &str| {
        let options = pb::EmbedOptions {
            instruction: instruction.into(),
            prefix: prefix.into(),
            ..Default::default()
        };
        let req = request(&texts, options);
        let c = stack.client.clone();
        async move { rows(&c.embed(req).await.unwrap()) }
    };
    let task = "Given a question, find passages that answer it";
    let instructed = embed(texts.clone(), task, "").await;
    let spelled: Vec<String> = texts
        .iter()
        .map(|t| format!("Instruct: {task}\nQuery:{t}"))
        .collect();
    let by_hand = embed(spelled, "", "").await;
    assert_same_vectors(
        &instructed,
        &by_hand,
        F16_TOLERANCE,
        "instruction vs spelled out",
    );
    let plain = embed(texts.clone(), "", "").await;
    assert!(plain[0]
        .iter()
        .zip(&instructed[0])
        .any(|(a, b)| (a - b).abs() > 1e-3));
    let prefixed = embed(texts.clone(), "", "query: ").await;
    let spelled: Vec<String> = texts.iter().map(|t| format!("query: {t}")).collect();
    let by_hand = embed(spelled, "", "").await;
    assert_same_vectors(&prefixed, &by_hand, F16_TOLERANCE, "prefix vs spelled out");
    let huge = pb::EmbedOptions {
        instruction: "x".repeat(5000),
        ..Default::default()
    };
    let err = stack.client.embed(request(&texts, huge)).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.to_string().contains("instruction has 5000 bytes"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_size_and_packing_change_nothing() {
    // Exact attention on F32 weights: what is left is the engine's packing itself.
    let exact = EmbedderConfig {
        flash_attention: false,
        ..config()
    };
    packings_agree(exact, MINILM_F32_FILE, F32_TOLERANCE).await;
    // The defaults on the F16 model, as served.
    packings_agree(config(), MINILM_FILE, F16_TOLERANCE).await;
}

async fn packings_agree(config: EmbedderConfig, file: &str, tolerance: f32) {
    let texts = corpus(64);
    let packed = Stack::start_with(config.clone(), file).await;
    let whole = rows(
        &packed
            .client
            .embed(request(&texts, Default::default()))
            .await
            .unwrap(),
    );
    for size in [1usize, 8] {
        // Concurrent requests of `size` texts: the engine packs them into shared batches.
        let calls = texts
            .chunks(size)
            .map(|c| packed.client.embed(request(c, Default::default())));
        let parts = futures::future::try_join_all(calls).await.unwrap();
        let got: Vec<Vec<f32>> = parts.iter().flat_map(rows).collect();
        assert_same_vectors(
            &got,
            &whole,
            tolerance,
            &format!("{file}: batch {size} vs 64"),
        );
    }
    // One sequence per llama.cpp batch, and a small token budget: other packings entirely.
    let single = Stack::start_with(
        EmbedderConfig {
            max_seqs_per_batch: Some(1),
            ..config.clone()
        },
        file,
    )
    .await;
    let unpacked = rows(
        &single
            .client
            .embed(request(&texts, Default::default()))
            .await
            .unwrap(),
    );
    let what = format!("{file}: one sequence per batch vs packed");
    assert_same_vectors(&unpacked, &whole, tolerance, &what);
    let small = Stack::start_with(
        EmbedderConfig {
            max_batch_tokens: Some(256),
            ..config.clone()
        },
        file,
    )
    .await;
    let budget = rows(
        &small
            .client
            .embed(request(&texts, Default::default()))
            .await
            .unwrap(),
    );
    let what = format!("{file}: 256-token batches vs 512");
    assert_same_vectors(&budget, &whole, tolerance, &what);
    // Three contexts of the model take the concurrent requests between them.
    let several = Stack::start_with(
        EmbedderConfig {
            contexts: Some(3),
            ..config.clone()
        },
        file,
    )
    .await;
    let calls = texts
        .chunks(8)
        .map(|c| several.client.embed(request(c, Default::default())));
    let parts = futures::future::try_join_all(calls).await.unwrap();
    let spread: Vec<Vec<f32>> = parts.iter().flat_map(rows).collect();
    let what = format!("{file}: 8-text requests over 3 contexts vs one batch");
    assert_same_vectors(&spread, &whole, tolerance, &what);
    // Every batch padded to 512 tokens (the default on a GPU): the padding's rows unread.
    let padded = Stack::start_with(
        EmbedderConfig {
            pad_batches: Some(true),
            ..config
        },
        file,
    )
    .await;
    let calls = texts
        .chunks(8)
        .map(|c| padded.client.embed(request(c, Default::default())));
    let parts = futures::future::try_join_all(calls).await.unwrap();
    let got: Vec<Vec<f32>> = parts.iter().flat_map(rows).collect();
    let what = format!("{file}: padded batches vs one batch");
    assert_same_vectors(&got, &whole, tolerance, &what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_stream_keeps_order() {
    let stack = Stack::start(config()).await;
    let texts = corpus(150);
    let want = rows(
        &stack
            .client
            .embed(request(&texts, pb::EmbedOptions::default()))
            .await
            .unwrap(),
    );
    // Batches of uneven sizes, so short and long ones finish out of step inside the engine.
    let sizes = [1usize, 17, 3, 40, 2, 29, 8, 50];
    let mut batches = Vec::new();
    let mut at = 0;
    for s in sizes.iter().cycle() {
        if at >= texts.len() {
            break;
        }
        let end = (at + s).min(texts.len());
        batches.push(
            (at..end)
                .map(|i| pb::TextItem {
                    id: format!("row-{i}"),
                    text: texts[i].clone(),
                })
                .collect::<Vec<_>>(),
        );
        at = end;
    }
    let first = pb::EmbedStreamRequest {
        model: MINILM_REPO.into(),
        options: None,
        items: batches[0].clone(),
    };
    let (sender, responses) = stack.client.embed_stream(first).await.unwrap();
    let rest = batches[1..].to_vec();
    let feeding = tokio::spawn(async move {
        for b in rest {
            sender.send(b).await.unwrap();
        }
    });
    let mut ids = Vec::new();
    let mut got = Vec::new();
    let mut responses = std::pin::pin!(responses);
    while let Some(r) = responses.next().await {
        let r = r.unwrap();
        assert_eq!(r.model_md5, model_md5(MINILM_FILE));
        let e = r.embeddings.as_ref().unwrap();
        let flat = decode_vectors(e).unwrap();
        got.extend(flat.chunks(DIM).map(<[f32]>::to_vec));
        ids.extend(r.ids);
    }
    feeding.await.unwrap();
    let expected: Vec<String> = (0..texts.len()).map(|i| format!("row-{i}")).collect();
    assert_eq!(ids, expected);
    assert_same_vectors(&got, &want, F16_TOLERANCE, "EmbedStream vs Embed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn options_truncation_pooling_dimensions_and_dtype() {
    let stack = Stack::start(config()).await;
    let c = &stack.client;
    let long = reference().rows.last().unwrap().text.clone();
    let texts = vec!["short text".to_string(), long.clone(), String::new()];

    // Truncation is on by default and reported per row; the closing [SEP] stays.
    let r = c
        .embed(request(
            &texts,
            pb::EmbedOptions {
                max_length: 32,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let e = r.embeddings.as_ref().unwrap();
    assert_eq!(e.truncated, [false, true, false]);
    assert_eq!(e.token_counts[1], 32);
    // The empty string is embedded as [CLS] [SEP], like sentence-transformers does.
    assert_eq!(e.token_counts[2], 2);

    // Refused when truncation is off, naming the row.
    let (code_, msg) = code(
        c.embed(request(
            &texts,
            pb::EmbedOptions {
                max_length: 32,
                truncate: Some(false),
                ..Default::default()
            },
        ))
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);
    assert!(msg.contains("text 1") && msg.contains("32"), "{msg}");

    // Matryoshka: fewer dimensions, renormalized; more than the model has is refused.
    let r = c
        .embed(request(
            &texts[..1],
            pb::EmbedOptions {
                dimensions: 128,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    let v = &rows(&r)[0];
    assert_eq!(v.len(), 128);
    assert!((v.iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() < 1e-4);
    let (code_, msg) = code(
        c.embed(request(
            &texts[..1],
            pb::EmbedOptions {
                dimensions: 1000,
                ..Default::default()
            },
        ))
        .await,
    );
    assert_eq!(code_, Code::InvalidArgument);
    assert!(msg.contains("1000") && msg.contains("384"), "{msg}");

    // Per-request pooling; raw (unnormalized) vectors; f16 close to f32.
    let mean = rows(
        &c.embed(request(&texts[..1], Default::default()))
            .await
            .unwrap(),
    );
    let cls = c
        .embed(request(
            &texts[..1],
            pb::EmbedOptions {
                pooling: pb::Pooling::Cls as i32,
                normalize: Some(false),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(cls.pooling, pb::Pooling::Cls as i32);
    assert!(!cls.normalized);
    let cls = rows(&cls);
    assert!(
        cosine(&cls[0], &mean[0]) < 0.999,
        "CLS pooling is not mean pooling"
    );
    assert!((cls[0].iter().map(|x| x * x).sum::<f32>().sqrt() - 1.0).abs() > 1e-3);
    let half = c
        .embed(request(
            &texts[..1],
            pb::EmbedOptions {
                dtype: pb::DType::F16 as i32,
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    assert_eq!(half.embeddings.as_ref().unwrap().data.len(), DIM * 2);
    assert!(max_abs_diff(&rows(&half), &mean) < 1e-3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_codes() {
    let stack = Stack::start(config()).await;
    let c = &stack.client;
    let one = vec!["x".to_string()];

    let (code_, msg) = code(c.embed(request(&[], Default::default())).await);
    assert_eq!(code_, Code::InvalidArgument);
    assert!(msg.contains("no texts"), "{msg}");

    let mut r = request(&one, Default::default());
    r.model = String::new();
    assert_eq!(code(c.embed(r).await).0, Code::InvalidArgument);

    let mut r = request(&one, Default::default());
    r.model = "test/no-such-repo".into();
    assert_eq!(code(c.embed(r).await).0, Code::NotFound);

    let bad_pooling = pb::EmbedOptions {
        pooling: 42,
        ..Default::default()
    };
    assert_eq!(
        code(c.embed(request(&one, bad_pooling)).await).0,
        Code::InvalidArgument
    );

    let too_many = vec!["x".to_string(); llama_embedder::MAX_TEXTS + 1];
    assert_eq!(
        code(c.embed(request(&too_many, Default::default())).await).0,
        Code::InvalidArgument
    );

    // A stream must name its model; a later bad batch fails the stream in its place.
    let no_model = pb::EmbedStreamRequest {
        items: vec![pb::TextItem {
            id: "a".into(),
            text: "x".into(),
        }],
        ..Default::default()
    };
    assert_eq!(
        code(c.embed_stream(no_model).await.map(|_| ())).0,
        Code::InvalidArgument
    );
    let first = pb::EmbedStreamRequest {
        model: MINILM_REPO.into(),
        items: vec![pb::TextItem {
            id: "a".into(),
            text: "x".into(),
        }],
        ..Default::default()
    };
    let (sender, responses) = c.embed_stream(first).await.unwrap();
    sender.send(Vec::new()).await.unwrap();
    let got: Vec<_> = responses.collect().await;
    assert!(got[0].is_ok());
    let err = got[1].as_ref().unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.to_string().contains("message 1"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passed_deadline_ends_the_call_and_the_engine_moves_on() {
    let stack = Stack::start(config()).await;
    // ~4000 texts take seconds here; 300 ms is long enough to start and far too short to end.
    let texts = corpus(4000);
    let hurried = stack
        .client
        .clone()
        .with_deadline(std::time::Duration::from_millis(300))
        .with_retry(RetryPolicy::none());
    let (c, msg) = code(hurried.embed(request(&texts, Default::default())).await);
    assert_eq!(c, Code::DeadlineExceeded, "{msg}");
    // The engine dropped what was left of it: the next request is served, and right.
    let got = rows(
        &stack
            .client
            .embed(request(&texts[..8], Default::default()))
            .await
            .unwrap(),
    );
    assert_eq!(got.len(), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_resource_exhausted() {
    let stack = Stack::start(EmbedderConfig {
        queue_depth: 1,
        ..config()
    })
    .await;
    // Load the model first, so every call below meets a loaded engine.
    stack
        .client
        .embed(request(&corpus(1), Default::default()))
        .await
        .unwrap();
    // No retries, and no deadline that a busy machine could hit before the admitted ones end.
    let client = stack
        .client
        .clone()
        .with_retry(RetryPolicy::none())
        .with_deadline(std::time::Duration::from_secs(600));
    // Each request alone is more than a batch's token budget, so the engine holds one and the
    // channel one more; the rest find it full.
    let texts = corpus(400);
    // How many requests overlap depends on how busy the machine is, so a round where none
    // was refused is tried again (bounded): every round must be all OK or RESOURCE_EXHAUSTED.
    let mut exhausted = 0;
    for _ in 0..10 {
        let calls = (0..8).map(|_| client.embed(request(&texts, Default::default())));
        let results = futures::future::join_all(calls).await;
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(e) if e.code() == Code::ResourceExhausted))
            .count();
        let ok = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(ok + refused, results.len(), "{results:?}");
        exhausted += refused;
        if exhausted > 0 {
            break;
        }
    }
    assert!(
        exhausted >= 1,
        "no RESOURCE_EXHAUSTED in 10 rounds of 8 concurrent requests"
    );
    // With retries the same load all succeeds.
    let patient = stack
        .client
        .clone()
        .with_deadline(std::time::Duration::from_secs(600))
        .with_retry(RetryPolicy {
            max_attempts: 100,
            initial_backoff: std::time::Duration::from_millis(20),
            max_backoff: std::time::Duration::from_millis(200),
        });
    let calls = (0..4).map(|_| patient.embed(request(&texts[..50], Default::default())));
    for r in futures::future::join_all(calls).await {
        r.unwrap();
    }
    assert!(stack.addr.port() > 0);
}

// --- llama-cli embed --------------------------------------------------------------------

fn cli(cache: &Path) -> Command {
    let mut c = workspace_command("llama-cli");
    c.arg("--cache-dir").arg(cache).env("RUST_LOG", "warn");
    c
}

/// What pyarrow sees in a Parquet file.
fn pyarrow_summary(path: &Path) -> serde_json::Value {
    let script = r#"
import hashlib, json, sys
import pyarrow.parquet as pq
f = pq.ParquetFile(sys.argv[1])
t = f.read()
meta = {k.decode(): v.decode() for k, v in (f.metadata.metadata or {}).items() if not k.startswith(b"ARROW")}
ids = t.column("id").to_pylist()
emb = t.column("embedding")
print(json.dumps({
    "schema": {n: str(ty) for n, ty in zip(t.schema.names, t.schema.types)},
    "rows": t.num_rows, "row_groups": f.num_row_groups, "meta": meta,
    "ids": ids, "unique_ids": len(set(ids)),
    "n_tokens": t.column("n_tokens").to_pylist(),
    "truncated": t.column("truncated").to_pylist(),
    "first": emb[0].as_py() if t.num_rows else None,
    "text_md5_matches": "text" in t.schema.names and all(
        hashlib.md5(x.encode()).hexdigest() == m
        for x, m in zip(t.column("text").to_pylist(), t.column("text_md5").to_pylist())),
}))
"#;
    let out = Command::new(repo_root().join(".venv/bin/python"))
        .args(["-c", script])
        .arg(path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyarrow: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A .txt input of `n` lines cycling through the reference texts (one line with bad UTF-8
/// at `bad_line` when given).
fn write_input(path: &Path, n: usize, bad_line: Option<usize>) -> Vec<String> {
    let refs = reference();
    let mut f = std::fs::File::create(path).unwrap();
    let mut texts = Vec::new();
    for i in 1..=n {
        if Some(i) == bad_line {
            f.write_all(b"broken \xff\xfe bytes\n").unwrap();
            continue;
        }
        let t = refs.rows[i % refs.rows.len()]
            .text
            .replace(['\n', '\r'], " ");
        let t = format!("{t} {i}");
        writeln!(f, "{t}").unwrap();
        texts.push(t);
    }
    texts
}

#[test]
fn cli_embeds_into_parquet_that_pyarrow_reads() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.txt");
    let output = dir.path().join("out.parquet");
    write_input(&input, 300, Some(7));
    let out = cli(&dir.path().join("cache"))
        .args(["embed", "--model"])
        .arg(model(MINILM_FILE))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args([
            "--batch-size",
            "16",
            "--row-group-rows",
            "100",
            "--threads",
            "2",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("line 7: not valid UTF-8"), "{stderr}");
    let s = pyarrow_summary(&output);
    assert_eq!(s["rows"], 299);
    assert_eq!(s["unique_ids"], 299);
    assert_eq!(s["row_groups"], 3);
    assert_eq!(s["schema"]["id"], "string");
    assert_eq!(s["schema"]["text"], "string");
    assert_eq!(
        s["schema"]["embedding"],
        "fixed_size_list<item: float not null>[384]"
    );
    assert_eq!(s["schema"]["n_tokens"], "int32");
    assert_eq!(s["schema"]["truncated"], "bool");
    assert_eq!(s["schema"]["text_md5"], "string");
    assert_eq!(
        s["text_md5_matches"], true,
        "text_md5 is Python's md5 of each text"
    );
    assert_eq!(s["meta"]["model_md5"], model_md5(MINILM_FILE));
    assert_eq!(s["meta"]["pooling"], "mean");
    assert_eq!(s["meta"]["normalized"], "true");
    for k in ["model", "created_at", "tool_version"] {
        assert!(
            s["meta"][k].as_str().is_some_and(|v| !v.is_empty()),
            "{k}: {s}"
        );
    }
    assert_eq!(s["ids"][6], "8", "line 7 was skipped, ids are line numbers");
    assert!(!output.with_extension("parquet.progress").exists());

    // --strict stops at the bad line; --no-text leaves the column out.
    let strict = cli(&dir.path().join("cache"))
        .args(["embed", "--strict", "--no-text", "--model"])
        .arg(model(MINILM_FILE))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("strict.parquet"))
        .output()
        .unwrap();
    assert!(!strict.status.success());
    assert!(String::from_utf8_lossy(&strict.stderr).contains("line 7"));
}

/// Runs `llama-cli embed` on `input`, kills it -9 once a row group is on disk (it says so
/// in its debug log), resumes, and returns pyarrow's view of the result.
fn kill_and_resume(dir: &Path, input: &Path, output: &Path) -> serde_json::Value {
    let cache = dir.join("cache");
    let args = |c: &mut Command| {
        c.args(["embed", "--model"])
            .arg(model(MINILM_FILE))
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(output)
            .args([
                "--batch-size",
                "8",
                "--row-group-rows",
                "64",
                "--threads",
                "2",
            ]);
    };
    let mut c = cli(&cache);
    args(&mut c);
    let mut child = c
        .env("RUST_LOG", "llama_cli=debug")
        .args(["--log-format", "json"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut groups = 0;
    for line in lines.map_while(Result::ok) {
        if line.contains("row group written") {
            groups += 1;
            if groups == 2 {
                break;
            }
        }
    }
    assert_eq!(groups, 2, "the run ended before writing two row groups");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        Path::new(&format!("{}.progress", output.display())).exists(),
        "an interrupted run leaves its progress file"
    );
    let mut c = cli(&cache);
    args(&mut c);
    let out = c.arg("--resume").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resumed after"), "{stderr}");
    pyarrow_summary(output)
}

#[test]
fn cli_killed_half_way_resumes_with_every_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("data.txt");
    let output = dir.path().join("out.parquet");
    let n = 600;
    write_input(&input, n, None);
    let s = kill_and_resume(dir.path(), &input, &output);
    assert_eq!(s["rows"], n);
    assert_eq!(s["unique_ids"], n);
    let ids: Vec<String> = serde_json::from_value(s["ids"].clone()).unwrap();
    let want: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    assert_eq!(ids, want, "every line once, in input order");

    // A second --resume finds nothing to do; another input is refused.
    let again = cli(&dir.path().join("cache"))
        .args(["embed", "--resume", "--model"])
        .arg(model(MINILM_FILE))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .args(["--batch-size", "8", "--row-group-rows", "64"])
        .output()
        .unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("nothing to resume"));
}

#[test]
fn cli_tokenizes_and_describes_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let row = &reference().rows[0];
    let out = cli(&dir.path().join("cache"))
        .args([
            "tokenize",
            "--embedder",
            "--add-special",
            "--json",
            "--model",
        ])
        .arg(model(MINILM_FILE))
        .args(["--text", &row.text])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["ids"], serde_json::json!(row.token_ids));
    let out = cli(&dir.path().join("cache"))
        .args(["info", "--embedder", "--json", "--model"])
        .arg(model(MINILM_FILE))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["md5"], model_md5(MINILM_FILE));
    assert_eq!(
        (info["dimensions"].as_u64(), info["pooling"].as_str()),
        (Some(384), Some("mean"))
    );
    // Neither text nor file: a message and a failure, not a guess.
    let out = cli(&dir.path().join("cache"))
        .args(["tokenize", "--embedder", "--model"])
        .arg(model(MINILM_FILE))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--text or --file"));
}
