//! Prompt-cache benchmark, side by side with llama-server (`cache_prompt`, its default) in one
//! run (see BENCHMARKS.md). Time to first token, measured by this client over loopback for both
//! (gRPC stream for ours, SSE for llama-server), on two workloads:
//! - a shared system prompt of about 1,500 tokens, then short questions after it;
//! - a 10-turn chat, each turn resending the whole conversation.
//!
//! Each side runs alone (its own process, started for its turn), and the pair runs `--rounds`
//! times alternating, so both see the same machine.
//!
//! Usage: bench-prompt-cache [--threads 2] [--parallel 2] [--rounds 2] [--ngl 99]
//!        [--llama-bin .bench/llama.cpp/build/bin] [--model FILE.gguf]

use std::path::PathBuf;
use std::time::Instant;

use anyhow::bail;
use clap::Parser;
use futures::StreamExt;
use llama_agent_client::proto::generator::v1 as pb;
use llama_agent_client::GeneratorClient;
use llama_agent_tests::peer::LlamaServer;
use llama_agent_tests::support::{
    model, repo_root, LoaderProcess, MirrorProcess, ServiceProcess, GEMMA_FILE,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Sequences (llama-server slots) on both sides.
    #[arg(long, default_value_t = 2)]
    parallel: usize,
    /// Times each side runs both workloads (alternating).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long)]
    llama_bin: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    /// Layers offloaded to the GPU on both sides.
    #[arg(long)]
    ngl: Option<u32>,
}

const REPO: &str = "bench/gemma-3-270m-GGUF";
const CTX_PER_SEQ: usize = 4096;
const QUESTIONS: usize = 5;
const TURNS: usize = 10;
/// Tokens answered per request: enough to see a real answer, short enough that TTFT dominates.
const ANSWER_TOKENS: u32 = 24;

/// About 1,500 Gemma tokens of instructions, as an agent's system prompt with tools would be.
fn system_prompt() -> String {
    let mut text =
        String::from("You are the support assistant of a weather service. Follow every rule.\n");
    for i in 1..=41 {
        text.push_str(&format!(
            "Rule {i}: when a user asks about station {i}, report its temperature in degrees Celsius, its wind in km/h and the time of the reading.\n"
        ));
    }
    text
}

fn question(i: usize) -> String {
    format!(
        "\nUser: What is the weather at station {}?\nAssistant:",
        7 * i + 3
    )
}

/// What one side measured, TTFT in ms.
#[derive(Default)]
struct Run {
    system_first: f64,
    system_later: Vec<f64>,
    system_cached: Vec<u32>,
    turns: Vec<f64>,
    prompt_tokens_first: u32,
}

trait Side {
    /// Streams a completion; returns (TTFT ms, text, cached prompt tokens, prompt tokens).
    async fn complete(&self, prompt: &str) -> anyhow::Result<(f64, String, u32, u32)>;
}

async fn workloads(side: &impl Side) -> anyhow::Result<Run> {
    let system = system_prompt();
    let mut run = Run::default();
    for i in 0..QUESTIONS {
        let (ttft, _, cached, prompt_tokens) =
            side.complete(&format!("{system}{}", question(i))).await?;
        if i == 0 {
            run.system_first = ttft;
            run.prompt_tokens_first = prompt_tokens;
        } else {
            run.system_later.push(ttft);
            run.system_cached.push(cached);
        }
    }
    let mut chat = String::from("A conversation between a user and the weather assistant.\n");
    for turn in 0..TURNS {
        chat.push_str(&question(100 + turn));
        let (ttft, text, _, _) = side.complete(&chat).await?;
        run.turns.push(ttft);
        chat.push_str(&text);
    }
    Ok(run)
}

struct Ours(GeneratorClient);

impl Side for Ours {
    async fn complete(&self, prompt: &str) -> anyhow::Result<(f64, String, u32, u32)> {
        let req = pb::GenerateRequest {
            model: REPO.into(),
            input: Some(pb::generate_request::Input::Prompt(prompt.into())),
            sampling: Some(pb::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            max_tokens: ANSWER_TOKENS,
            stop: vec!["\nUser:".into()],
            ..Default::default()
        };
        let t = Instant::now();
        let mut stream = std::pin::pin!(self.0.generate_stream(req, None).await?);
        let (mut ttft, mut text) = (None, String::new());
        while let Some(msg) = stream.next().await {
            match msg?.event {
                Some(pb::generate_response::Event::Chunk(c)) => {
                    ttft.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1000.0);
                    text.push_str(&c.text);
                }
                Some(pb::generate_response::Event::Done(d)) => {
                    let u = d.usage.unwrap_or_default();
                    let ttft = ttft.unwrap_or_else(|| t.elapsed().as_secs_f64() * 1000.0);
                    return Ok((ttft, text, u.cached_prompt_tokens, u.prompt_tokens));
                }
                // The benchmark's requests carry no tools.
                Some(pb::generate_response::Event::ToolCall(_)) | None => {}
            }
        }
        bail!("the stream ended without a final message")
    }
}

impl Side for LlamaServer {
    async fn complete(&self, prompt: &str) -> anyhow::Result<(f64, String, u32, u32)> {
        let body = serde_json::json!({
            "prompt": prompt, "n_predict": ANSWER_TOKENS, "temperature": 0, "stream": true,
            "cache_prompt": true, "stop": ["\nUser:"],
        });
        let t = Instant::now();
        let resp = self
            .http
            .post(format!("{}/completion", self.url))
            .json(&body)
            .send()
            .await?
            .error_for_status()?;
        let mut bytes = resp.bytes_stream();
        let (mut ttft, mut text, mut pending) = (None, String::new(), String::new());
        while let Some(chunk) = bytes.next().await {
            pending.push_str(&String::from_utf8_lossy(&chunk?));
            while let Some(end) = pending.find("\n\n") {
                let event: String = pending.drain(..end + 2).collect();
                let Some(data) = event.trim().strip_prefix("data: ") else {
                    continue;
                };
                let v: serde_json::Value = serde_json::from_str(data)?;
                if let Some(c) = v["content"].as_str().filter(|c| !c.is_empty()) {
                    ttft.get_or_insert_with(|| t.elapsed().as_secs_f64() * 1000.0);
                    text.push_str(c);
                }
                if v["stop"].as_bool() == Some(true) {
                    let ttft = ttft.unwrap_or_else(|| t.elapsed().as_secs_f64() * 1000.0);
                    let cached = v["timings"]["cache_n"].as_u64().unwrap_or(0) as u32;
                    let prompt_n = v["timings"]["prompt_n"].as_u64().unwrap_or(0) as u32;
                    return Ok((ttft, text, cached, cached + prompt_n));
                }
            }
        }
        bail!("llama-server's stream ended without stop")
    }
}

fn generator(loader: &str, args: &Args) -> anyhow::Result<ServiceProcess> {
    let mut flags = vec![
        "--loader-endpoint".to_string(),
        loader.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--parallel".into(),
        args.parallel.to_string(),
        "--ctx-size".into(),
        CTX_PER_SEQ.to_string(),
    ];
    if let Some(n) = args.ngl {
        flags.extend(["--n-gpu-layers".into(), n.to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    ServiceProcess::spawn("llama-generator", &flags)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    llama_agent_tests::support::leave_openmp_alone();
    let args = Args::parse();
    let bin = args
        .llama_bin
        .clone()
        .unwrap_or_else(|| repo_root().join(".bench/llama.cpp/build/bin"));
    let file = args.model.clone().unwrap_or_else(|| model(GEMMA_FILE));
    let mirror = MirrorProcess::spawn(REPO, &file)?;
    let cache = tempfile::tempdir()?;
    let loader = LoaderProcess::spawn(cache.path(), &mirror.base_url, &[])?;

    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..args.rounds {
        // Each side loads the model with a prompt that shares nothing but BOS with the
        // workloads, so both start from a cold KV cache.
        let g = generator(&loader.addr.to_string(), &args)?;
        let client = Ours(GeneratorClient::connect(&g.addr.to_string())?);
        client.complete("Hello").await?;
        ours.push(workloads(&client).await?);
        drop(g);
        let mut peer_args = vec![
            "-t".to_string(),
            args.threads.to_string(),
            "-np".into(),
            args.parallel.to_string(),
            "-c".into(),
            (CTX_PER_SEQ * args.parallel).to_string(),
        ];
        if let Some(n) = args.ngl {
            peer_args.extend(["-ngl".into(), n.to_string()]);
        }
        let server = LlamaServer::start(
            &bin,
            &file,
            &peer_args,
            "bench-prompt-cache-llama-server.log",
        )
        .await?;
        server.complete("Hello").await?;
        theirs.push(workloads(&server).await?);
    }

    println!(
        "model {}, {} threads, {} sequences, -ngl {:?}; TTFT in ms, measured by the client, median of {} rounds",
        file.display(),
        args.threads,
        args.parallel,
        args.ngl,
        args.rounds
    );
    let pick =
        |runs: &[Run], f: &dyn Fn(&Run) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let first = |r: &Run| r.system_first;
    let later = |r: &Run| median(&r.system_later);
    let turn2 = |r: &Run| r.turns[1];
    let turn10 = |r: &Run| r.turns[TURNS - 1];
    println!(
        "shared system prompt ({} prompt tokens), then {} questions:",
        ours[0].prompt_tokens_first,
        QUESTIONS - 1
    );
    println!("                          llama-agent   llama-server   ratio");
    for (name, f) in [
        ("first request", &first as &dyn Fn(&Run) -> f64),
        ("later requests", &later),
    ] {
        let (a, b) = (pick(&ours, f), pick(&theirs, f));
        println!("  {name:<22} {a:>11.1}   {b:>12.1}   {:.2}x", a / b);
    }
    println!(
        "  later / first: llama-agent {:.3} (target <= 0.15), llama-server {:.3}; cached prompt tokens: ours {:?}, llama-server {:?}",
        pick(&ours, &later) / pick(&ours, &first),
        pick(&theirs, &later) / pick(&theirs, &first),
        ours[0].system_cached,
        theirs[0].system_cached
    );
    println!("10-turn chat:");
    for (name, f) in [
        ("turn 2", &turn2 as &dyn Fn(&Run) -> f64),
        ("turn 10", &turn10),
    ] {
        let (a, b) = (pick(&ours, f), pick(&theirs, f));
        println!("  {name:<22} {a:>11.1}   {b:>12.1}   {:.2}x", a / b);
    }
    println!(
        "  turn 10 / turn 2: llama-agent {:.2} (target <= 1.5), llama-server {:.2}",
        pick(&ours, &turn10) / pick(&ours, &turn2),
        pick(&theirs, &turn10) / pick(&theirs, &turn2)
    );
    println!(
        "  every turn, llama-agent:  {:?}",
        ours[0].turns.iter().map(|t| t.round()).collect::<Vec<_>>()
    );
    println!(
        "  every turn, llama-server: {:?}",
        theirs[0]
            .turns
            .iter()
            .map(|t| t.round())
            .collect::<Vec<_>>()
    );
    Ok(())
}
