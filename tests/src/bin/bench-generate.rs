//! Generator benchmark, side by side with the vendored llama.cpp in one run (see BENCHMARKS.md):
//! - single-stream decode tok/s and TTFT against `llama-bench` (same model, same threads);
//! - aggregate tok/s for 1, 4 and 8 concurrent streams (`--streams`) against `llama-server -np N`.
//!
//! Usage: bench-generate [--threads 2] [--tokens 128] [--llama-bin .bench/llama.cpp/build/bin]
//!        [--model FILE.gguf] [--streams 1,4,8] [--ngl 99] [--ctx-size 1024]
//! (scripts/gpu/bench.sh runs it on the GPU machine with `--ngl 99 --streams 1,16,64`.)

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use llama_agent_client::proto::generator::v1 as pb;
use llama_agent_client::GeneratorClient;
use llama_agent_tests::support::{
    model, repo_root, LoaderProcess, MirrorProcess, ServiceProcess, GEMMA_FILE,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Tokens generated per stream.
    #[arg(long, default_value_t = 128)]
    tokens: u32,
    /// Runs of each single-stream measurement (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    #[arg(long)]
    llama_bin: Option<PathBuf>,
    /// The model (default: the Gemma 3 270M test model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Concurrent stream counts to measure.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    streams: Vec<usize>,
    /// Layers offloaded to the GPU on both sides (ours defaults to all when a GPU is present).
    #[arg(long)]
    ngl: Option<u32>,
    /// Context per stream on both sides.
    #[arg(long, default_value_t = 1024)]
    ctx_size: usize,
}

const REPO: &str = "bench/gemma-3-270m-GGUF";
/// 16 tokens with Gemma's tokenizer, BOS included.
const PROMPT: &str = "Write a long story about a robot who learns to paint landscapes:";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    llama_agent_tests::support::leave_openmp_alone();
    let args = Args::parse();
    let bin = args
        .llama_bin
        .clone()
        .unwrap_or_else(|| repo_root().join(".bench/llama.cpp/build/bin"));
    let file = args.model.clone().unwrap_or_else(|| model(GEMMA_FILE));
    let threads = args.threads.to_string();
    let ngl: Vec<String> = args
        .ngl
        .map(|n| vec!["-ngl".to_string(), n.to_string()])
        .unwrap_or_default();

    // llama-bench: pp16 and tg for the same model and threads.
    let out = Command::new(bin.join("llama-bench"))
        .args(["-m"])
        .arg(&file)
        .args([
            "-t",
            &threads,
            "-p",
            "16",
            "-n",
            &args.tokens.to_string(),
            "-r",
            "3",
            "-o",
            "json",
        ])
        .args(&ngl)
        .stderr(Stdio::null())
        .output()
        .context("running llama-bench (scripts/build-llama-tools.sh builds it)")?;
    let rows: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("llama-bench json")?;
    let rate = |n_prompt: u64, n_gen: u64| -> anyhow::Result<f64> {
        rows.as_array()
            .and_then(|a| {
                a.iter()
                    .find(|r| r["n_prompt"] == n_prompt && r["n_gen"] == n_gen)
            })
            .and_then(|r| r["avg_ts"].as_f64())
            .context("llama-bench row")
    };
    let (pp16, tg) = (rate(16, 0)?, rate(0, u64::from(args.tokens))?);

    let mirror = MirrorProcess::spawn(REPO, &file)?;
    let cache = tempfile::tempdir()?;
    let loader = LoaderProcess::spawn(cache.path(), &mirror.base_url, &[])?;
    let loader_ep = loader.addr.to_string();

    // Single stream on a generator with one sequence slot, as llama-bench measures one.
    let single = generator(&loader_ep, &args, 1)?;
    let client = GeneratorClient::connect(&single.addr.to_string())?;
    client.generate(request(0, 4), |_| {}).await?; // load the model
    let mut decode = Vec::new();
    let mut ttft = Vec::new();
    for i in 0..args.runs {
        let g = client
            .generate(request(i as u64, args.tokens), |_| {})
            .await?;
        let t = g.done.timings.unwrap_or_default();
        decode.push(t.decode_tokens_per_second);
        ttft.push(t.ttft_ms);
    }
    drop(single);
    let (decode, ttft) = (median(decode), median(ttft));
    let bench_prompt_ms = 16.0 / pp16 * 1000.0;
    println!(
        "model {}, {threads} threads, {} tokens per stream, -ngl {:?}",
        file.display(),
        args.tokens,
        args.ngl
    );
    println!("single stream           llama-agent   llama-bench   ratio / delta");
    println!(
        "decode tok/s            {decode:>11.1}   {tg:>11.1}   {:.2}x (target >= 0.97x)",
        decode / tg
    );
    println!("TTFT vs pp16 time (ms)  {ttft:>11.1}   {bench_prompt_ms:>11.1}   {:+.1} ms (target <= +5 ms)", ttft - bench_prompt_ms);

    println!("concurrent streams      llama-agent   llama-server  ratio   (aggregate tok/s)");
    let mut ours_one = 0.0;
    let most = args.streams.iter().copied().max().unwrap_or(1);
    for &n in &args.streams {
        let g = generator(&loader_ep, &args, n)?;
        let client = GeneratorClient::connect(&g.addr.to_string())?;
        client.generate(request(0, 4), |_| {}).await?;
        let ours = aggregate_ours(&client, n, args.tokens).await?;
        drop(g);
        let server = LlamaServer::start(&bin, &file, &threads, n, args.ctx_size, &ngl)?;
        let theirs = server.aggregate(n, args.tokens).await?;
        drop(server);
        if n == 1 {
            ours_one = ours;
        }
        println!(
            "{n:>2} streams              {ours:>11.1}   {theirs:>11.1}   {:.2}x",
            ours / theirs
        );
        if n == most && n > 1 {
            println!(
                "{n} streams vs 1 stream (llama-agent): {:.2}x; vs llama-server -np {n}: {:.2}x",
                ours / ours_one,
                ours / theirs
            );
        }
    }
    Ok(())
}

fn request(i: u64, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: REPO.into(),
        input: Some(pb::generate_request::Input::Prompt(PROMPT.into())),
        // Sampled (not greedy) so streams differ, as real traffic does; seeded to be repeatable.
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.8),
            seed: Some(i),
            ..Default::default()
        }),
        max_tokens,
        ..Default::default()
    }
}

fn generator(loader: &str, args: &Args, parallel: usize) -> anyhow::Result<ServiceProcess> {
    let mut flags = vec![
        "--loader-endpoint".to_string(),
        loader.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--parallel".into(),
        parallel.to_string(),
        "--ctx-size".into(),
        args.ctx_size.to_string(),
        "--batch-size".into(),
        512.max(parallel).to_string(),
    ];
    if let Some(n) = args.ngl {
        flags.extend(["--n-gpu-layers".into(), n.to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ServiceProcess::spawn("llama-generator", &flags)
}

async fn aggregate_ours(client: &GeneratorClient, n: usize, tokens: u32) -> anyhow::Result<f64> {
    let t = Instant::now();
    let runs = (0..n).map(|i| {
        let c = client.clone();
        tokio::spawn(async move { c.generate(request(100 + i as u64, tokens), |_| {}).await })
    });
    let mut total = 0u64;
    for r in futures::future::join_all(runs).await {
        total += u64::from(r??.done.usage.unwrap_or_default().completion_tokens);
    }
    Ok(total as f64 / t.elapsed().as_secs_f64())
}

struct LlamaServer {
    child: Child,
    url: String,
}

impl LlamaServer {
    fn start(
        bin: &std::path::Path,
        model: &std::path::Path,
        threads: &str,
        np: usize,
        ctx_per_seq: usize,
        ngl: &[String],
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let child = Command::new(bin.join("llama-server"))
            .arg("-m")
            .arg(model)
            .args([
                "-t",
                threads,
                "-np",
                &np.to_string(),
                "-c",
                &(ctx_per_seq * np).to_string(),
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .args(ngl)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn aggregate(&self, n: usize, tokens: u32) -> anyhow::Result<f64> {
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !http
            .get(format!("{}/health", self.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if Instant::now() > deadline {
                bail!("llama-server did not become healthy");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let warm = serde_json::json!({"prompt": PROMPT, "n_predict": 4});
        http.post(format!("{}/completion", self.url))
            .json(&warm)
            .send()
            .await?;
        let t = Instant::now();
        let runs = (0..n).map(|i| {
            let http = http.clone();
            let url = format!("{}/completion", self.url);
            let body = serde_json::json!({"prompt": PROMPT, "n_predict": tokens, "temperature": 0.8, "seed": 100 + i, "cache_prompt": false});
            tokio::spawn(async move {
                let v: serde_json::Value = http.post(url).json(&body).send().await?.json().await?;
                anyhow::Ok(v["tokens_predicted"].as_u64().unwrap_or(0))
            })
        });
        let mut total = 0u64;
        for r in futures::future::join_all(runs).await {
            total += r??;
        }
        Ok(total as f64 / t.elapsed().as_secs_f64())
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
