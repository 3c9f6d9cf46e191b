//! Embedder benchmark, side by side in one run (see BENCHMARKS.md), all on one model (the
//! MiniLM F16 test model unless `--model` says otherwise) with the same threads:
//! - `llama-cli embed` end to end (input file → in-process gRPC embedder → Parquet);
//! - llama.cpp's `llama-server --embeddings` (POST /v1/embeddings, `batch` inputs a request);
//! - llama.cpp's `llama-embedding` (all texts in one run; it packs by tokens on its own);
//! - a bare llama-cpp-2 loop with the embedder's packing (token budget, sequences per batch);
//!   texts/s for 1k and 10k short texts at batch 16, 32, 64, 128; then the CLI's peak RSS.
//!
//! Usage: bench-embed [--threads 2] [--counts 1000,10000] [--batches 16,32,64,128]
//!        [--rss-counts 1000,10000,100000] [--model FILE --pooling last]

use std::io::{BufRead, BufReader, Write};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context};
use clap::Parser;
use llama_agent_tests::support::{model, repo_root, workspace_bin, MINILM_FILE};
use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::model::LlamaModel;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2)]
    threads: i32,
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    counts: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "16,32,64,128")]
    batches: Vec<usize>,
    #[arg(long, value_delimiter = ',', default_value = "1000,10000,100000")]
    rss_counts: Vec<usize>,
    /// The embedder's token budget and sequences per llama.cpp batch (the bare loop's too).
    #[arg(long, default_value_t = 512)]
    max_batch_tokens: u32,
    #[arg(long, default_value_t = 64)]
    max_seqs: u32,
    /// A GGUF (a path, or a file of the test models folder).
    #[arg(long, default_value = MINILM_FILE)]
    model: String,
    /// The model's pooling, given to llama-server and the bare loop (ours reads the GGUF).
    #[arg(long, value_enum, default_value_t = PoolingArg::Mean)]
    pooling: PoolingArg,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PoolingArg {
    Mean,
    Cls,
    Last,
}

impl PoolingArg {
    fn name(self) -> &'static str {
        match self {
            PoolingArg::Mean => "mean",
            PoolingArg::Cls => "cls",
            PoolingArg::Last => "last",
        }
    }

    fn llama(self) -> LlamaPoolingType {
        match self {
            PoolingArg::Mean => LlamaPoolingType::Mean,
            PoolingArg::Cls => LlamaPoolingType::Cls,
            PoolingArg::Last => LlamaPoolingType::Last,
        }
    }
}

const WORDS: &[&str] = &[
    "the", "model", "reads", "a", "short", "sentence", "about", "cats", "and", "dogs", "while",
    "rain", "falls", "on", "quiet", "streets", "of", "old", "towns", "near", "blue", "rivers",
    "people", "write", "code", "for", "fast", "machines", "that", "learn", "from", "data",
];

/// Short texts (10 to 17 words, about 14 to 22 tokens), the same every run.
fn texts(n: usize) -> Vec<String> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = 10 + (x % 8) as usize;
            let words: Vec<&str> = (0..len)
                .map(|k| WORDS[((x >> (k * 2)) as usize + k) % WORDS.len()])
                .collect();
            format!("{} {i}", words.join(" "))
        })
        .collect()
}

fn write_lines(path: &Path, texts: &[String]) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for t in texts {
        writeln!(f, "{t}")?;
    }
    Ok(f.flush()?)
}

/// Wall seconds and peak RSS (KiB) of a command, through /usr/bin/time.
fn timed(cmd: &mut Command) -> anyhow::Result<(f64, u64)> {
    let out = cmd.stdout(Stdio::null()).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        bail!("{cmd:?} failed: {stderr}");
    }
    let last = stderr.lines().last().context("no /usr/bin/time line")?;
    let mut it = last.split_whitespace();
    let secs: f64 = it.next().context("time")?.parse()?;
    let rss: u64 = it.next().context("rss")?.parse()?;
    Ok((secs, rss))
}

struct Bench {
    args: Args,
    model: PathBuf,
    work: tempfile::TempDir,
    llama_bin: PathBuf,
}

impl Bench {
    fn cli(&self, input: &Path, batch: usize) -> anyhow::Result<(f64, u64)> {
        let out = self.work.path().join("out.parquet");
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%e %M"])
            .arg(workspace_bin("llama-cli"))
            .arg("--cache-dir")
            .arg(self.work.path().join("cache"))
            .args(["embed", "--model"])
            .arg(&self.model)
            .arg("--input")
            .arg(input)
            .arg("--output")
            .arg(&out)
            .args(["--batch-size", &batch.to_string()])
            .args(["--threads", &self.args.threads.to_string()])
            .args([
                "--max-batch-tokens",
                &self.args.max_batch_tokens.to_string(),
            ])
            .args(["--max-seqs-per-batch", &self.args.max_seqs.to_string()]);
        timed(&mut c)
    }

    fn llama_embedding(&self, input: &Path) -> anyhow::Result<f64> {
        let b = self.args.max_batch_tokens.to_string();
        let mut c = Command::new("/usr/bin/time");
        c.args(["-f", "%e %M"])
            .arg(self.llama_bin.join("llama-embedding"))
            .arg("-m")
            .arg(&self.model)
            .arg("-f")
            .arg(input)
            .args([
                "-t",
                &self.args.threads.to_string(),
                "-c",
                &b,
                "-b",
                &b,
                "-ub",
                &b,
            ])
            .args(["--pooling", self.args.pooling.name()])
            .args(["--embd-normalize", "2", "--log-disable"]);
        Ok(timed(&mut c)?.0)
    }
}

/// `llama-server --embeddings` on an ephemeral port; its base URL once it says it listens.
fn start_server(b: &Bench) -> anyhow::Result<(std::process::Child, String)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let n = b.args.max_batch_tokens.to_string();
    let mut child = Command::new(b.llama_bin.join("llama-server"))
        .arg("-m")
        .arg(&b.model)
        .args([
            "--embeddings",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            "--pooling",
            b.args.pooling.name(),
        ])
        .args([
            "-t",
            &b.args.threads.to_string(),
            "-tb",
            &b.args.threads.to_string(),
        ])
        .args([
            "-c",
            &(b.args.max_batch_tokens * 4).to_string(),
            "-b",
            &n,
            "-ub",
            &n,
            "-np",
            "4",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let mut lines = BufReader::new(stderr).lines();
    loop {
        let line = lines
            .next()
            .context("llama-server exited before listening")??;
        if line.contains("listening") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines.map_while(Result::ok) {});
    Ok((child, format!("http://127.0.0.1:{port}")))
}

async fn server_rate(url: &str, texts: &[String], batch: usize) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    let t = Instant::now();
    for chunk in texts.chunks(batch) {
        let r: serde_json::Value = http
            .post(format!("{url}/v1/embeddings"))
            .json(&serde_json::json!({ "input": chunk, "model": "minilm" }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        if r["data"].as_array().map(Vec::len) != Some(chunk.len()) {
            bail!("llama-server answered {r}");
        }
    }
    Ok(texts.len() as f64 / t.elapsed().as_secs_f64())
}

/// A bare llama-cpp-2 loop: texts packed into batches of at most `max_batch_tokens` tokens
/// and `max_seqs` sequences, pooled in llama.cpp's graph, normalized here.
fn bare_rate(
    args: &Args,
    backend: &LlamaBackend,
    model: &LlamaModel,
    texts: &[String],
) -> anyhow::Result<f64> {
    let params = LlamaContextParams::default()
        .with_embeddings(true)
        .with_pooling_type(args.pooling.llama())
        .with_n_ctx(NonZeroU32::new(args.max_batch_tokens))
        .with_n_batch(args.max_batch_tokens)
        .with_n_ubatch(args.max_batch_tokens)
        .with_n_seq_max(args.max_seqs)
        .with_n_threads(args.threads)
        .with_n_threads_batch(args.threads)
        .with_kv_unified(true);
    let mut ctx = model.new_context(backend, params)?;
    let t = Instant::now();
    let mut batch = LlamaBatch::new(args.max_batch_tokens as usize, 1);
    let mut seqs = 0;
    let mut sink = 0.0f32;
    let mut flush = |batch: &mut LlamaBatch, seqs: &mut i32| -> anyhow::Result<()> {
        ctx.decode(batch)?;
        for s in 0..*seqs {
            let v = ctx.embeddings_seq_ith(s)?;
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            sink += v[0] / norm;
        }
        // A causal model's KV cells stay behind; each batch starts from an empty cache.
        ctx.clear_kv_cache();
        batch.clear();
        *seqs = 0;
        Ok(())
    };
    for text in texts {
        let tokens = model.vocab().tokenize(text.as_bytes(), true, false);
        if batch.n_tokens() as usize + tokens.len() > args.max_batch_tokens as usize
            || seqs == args.max_seqs as i32
        {
            flush(&mut batch, &mut seqs)?;
        }
        for (pos, tok) in tokens.iter().enumerate() {
            batch.add(*tok, pos as i32, &[seqs], true)?;
        }
        seqs += 1;
    }
    if seqs > 0 {
        flush(&mut batch, &mut seqs)?;
    }
    std::hint::black_box(sink);
    Ok(texts.len() as f64 / t.elapsed().as_secs_f64())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    llama_agent_tests::support::leave_openmp_alone();
    let args = Args::parse();
    let path = PathBuf::from(&args.model);
    let bench = Bench {
        model: if path.is_file() {
            path
        } else {
            model(&args.model)
        },
        work: tempfile::tempdir()?,
        llama_bin: repo_root().join(".bench/llama.cpp/build/bin"),
        args,
    };
    for tool in ["llama-server", "llama-embedding"] {
        if !bench.llama_bin.join(tool).is_file() {
            bail!("{tool} is missing: run scripts/build-llama-tools.sh");
        }
    }
    let a = &bench.args;
    // Warm-up: the CLI's cache imports the model once; the page cache holds it for everyone.
    let warm = bench.work.path().join("warm.txt");
    write_lines(&warm, &texts(100))?;
    bench.cli(&warm, 32)?;
    let (mut server, url) = start_server(&bench)?;
    // The engine's backend: the same CPU module choice (and logs routed to debug).
    let backend = llama_agent_engine::init_backend()?.llama();
    let bare_model =
        LlamaModel::load_from_file(backend, &bench.model, &LlamaModelParams::default())?;

    println!(
        "model {}, {} pooling, {} threads, embedder packing: {} tokens / {} sequences per batch",
        bench.model.display(),
        a.pooling.name(),
        a.threads,
        a.max_batch_tokens,
        a.max_seqs
    );
    println!(
        "{:>6} {:>6} | {:>12} {:>12} {:>12} {:>12} | {:>10} {:>10}",
        "texts",
        "batch",
        "llama-cli",
        "llama-server",
        "llama-embed",
        "bare loop",
        "cli/server",
        "cli/bare"
    );
    for &n in &a.counts {
        let corpus = texts(n);
        let input = bench.work.path().join(format!("texts-{n}.txt"));
        write_lines(&input, &corpus)?;
        let embedding = n as f64 / bench.llama_embedding(&input)?;
        let bare = bare_rate(a, backend, &bare_model, &corpus)?;
        for &b in &a.batches {
            let (secs, _) = bench.cli(&input, b)?;
            let cli = n as f64 / secs;
            let srv = server_rate(&url, &corpus, b).await?;
            println!(
                "{n:>6} {b:>6} | {cli:>12.1} {srv:>12.1} {embedding:>12.1} {bare:>12.1} | {:>9.2}x {:>9.2}x",
                cli / srv,
                cli / bare
            );
        }
    }
    let _ = server.kill();
    let _ = server.wait();

    println!(
        "peak RSS of llama-cli embed (batch 128), model file {} MB:",
        std::fs::metadata(&bench.model)?.len() / 1_000_000
    );
    let mut rss = Vec::new();
    for &n in &a.rss_counts {
        let input = bench.work.path().join(format!("rss-{n}.txt"));
        write_lines(&input, &texts(n))?;
        let (secs, kib) = bench.cli(&input, 128)?;
        println!(
            "{n:>7} texts: {:>7.1} MB peak RSS, {:.1} texts/s",
            kib as f64 / 1024.0,
            n as f64 / secs
        );
        rss.push((n, kib));
    }
    if let (Some(first), Some(last)) = (rss.iter().find(|(n, _)| *n == 10_000), rss.last()) {
        println!(
            "RSS ratio {} / {} texts: {:.2}x (target <= 1.1x)",
            last.0,
            first.0,
            last.1 as f64 / first.1 as f64
        );
    }
    Ok(())
}
