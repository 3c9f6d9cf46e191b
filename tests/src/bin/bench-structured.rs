//! What a JSON Schema costs, side by side with llama-server's `json_schema` in one run (see
//! BENCHMARKS.md): decode tok/s of greedy generation constrained by each schema of
//! tests/fixtures/schemas, against free text from the same prompt, on both sides, each side
//! alone on the machine in its turn.
//!
//! Usage: bench-structured [--threads 2] [--rounds 2] [--ngl 99]
//!        [--llama-bin .bench/llama.cpp/build/bin] [--model FILE.gguf]

use std::path::PathBuf;

use clap::Parser;
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
    /// Times each side runs every schema (alternating sides).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    #[arg(long)]
    llama_bin: Option<PathBuf>,
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long)]
    ngl: Option<u32>,
}

const REPO: &str = "bench/gemma-3-270m-GGUF";
const PROMPT: &str = "Here is the record as JSON:\n";
const MAX_TOKENS: u32 = 200;
/// Free text runs this long (the base model rarely stops on its own).
const FREE_TOKENS: u32 = 64;

/// (decode tok/s, tokens) of one greedy generation.
type Run = (f64, u32);

async fn ours(client: &GeneratorClient, schema: Option<&str>) -> anyhow::Result<Run> {
    let req = pb::GenerateRequest {
        model: REPO.into(),
        input: Some(pb::generate_request::Input::Prompt(PROMPT.into())),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: if schema.is_some() {
            MAX_TOKENS
        } else {
            FREE_TOKENS
        },
        constraint: schema.map(|s| pb::generate_request::Constraint::JsonSchema(s.into())),
        cache_prompt: Some(false),
        ..Default::default()
    };
    let g = client.generate(req, |_| {}).await?;
    let usage = g.done.usage.unwrap_or_default();
    let t = g.done.timings.unwrap_or_default();
    Ok((t.decode_tokens_per_second, usage.completion_tokens))
}

async fn theirs(server: &LlamaServer, schema: Option<&str>) -> anyhow::Result<Run> {
    let mut body = serde_json::json!({
        "prompt": PROMPT, "temperature": 0, "cache_prompt": false,
        "n_predict": if schema.is_some() { MAX_TOKENS } else { FREE_TOKENS },
    });
    if let Some(s) = schema {
        body["json_schema"] = serde_json::from_str(s)?;
    }
    let v = server.completion(&body).await?;
    let t = &v["timings"];
    Ok((
        t["predicted_per_second"].as_f64().unwrap_or(0.0),
        t["predicted_n"].as_u64().unwrap_or(0) as u32,
    ))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
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
    let dir = repo_root().join("tests/fixtures/schemas");
    let mut schemas: Vec<(String, String)> = std::fs::read_dir(&dir)?
        .map(|e| {
            let path = e?.path();
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            Ok((name, std::fs::read_to_string(&path)?))
        })
        .collect::<anyhow::Result<_>>()?;
    schemas.sort();

    let mirror = MirrorProcess::spawn(REPO, &file)?;
    let cache = tempfile::tempdir()?;
    let loader = LoaderProcess::spawn(cache.path(), &mirror.base_url, &[])?;
    let mut flags = vec![
        "--loader-endpoint".to_string(),
        loader.addr.to_string(),
        "--threads".into(),
        args.threads.to_string(),
        "--parallel".into(),
        "1".into(),
    ];
    let mut peer_args = vec![
        "-t".to_string(),
        args.threads.to_string(),
        "-np".into(),
        "1".into(),
    ];
    if let Some(n) = args.ngl {
        flags.extend(["--n-gpu-layers".into(), n.to_string()]);
        peer_args.extend(["-ngl".into(), n.to_string()]);
    }
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();

    // [side][schema or free] -> runs
    let n = schemas.len();
    let mut ours_rates = vec![Vec::new(); n + 1];
    let mut theirs_rates = vec![Vec::new(); n + 1];
    let mut tokens = vec![(0, 0); n];
    for _ in 0..args.rounds {
        let g = ServiceProcess::spawn("llama-generator", &flags)?;
        let client = GeneratorClient::connect(&g.addr.to_string())?;
        ours(&client, None).await?; // load the model
        for (i, (_, s)) in schemas.iter().enumerate() {
            let (rate, n_tokens) = ours(&client, Some(s)).await?;
            ours_rates[i].push(rate);
            tokens[i].0 = n_tokens;
        }
        ours_rates[n].push(ours(&client, None).await?.0);
        drop(g);
        let server =
            LlamaServer::start(&bin, &file, &peer_args, "bench-structured-llama-server.log")
                .await?;
        theirs(&server, None).await?;
        for (i, (_, s)) in schemas.iter().enumerate() {
            let (rate, n_tokens) = theirs(&server, Some(s)).await?;
            theirs_rates[i].push(rate);
            tokens[i].1 = n_tokens;
        }
        theirs_rates[n].push(theirs(&server, None).await?.0);
    }

    println!(
        "model {}, {} threads, -ngl {:?}; greedy decode tok/s, mean of {} rounds",
        file.display(),
        args.threads,
        args.ngl,
        args.rounds
    );
    println!("schema          tokens (ours/theirs)   llama-agent   llama-server   ratio");
    let (free_ours, free_theirs) = (mean(&ours_rates[n]), mean(&theirs_rates[n]));
    for (i, (name, _)) in schemas.iter().enumerate() {
        let (a, b) = (mean(&ours_rates[i]), mean(&theirs_rates[i]));
        println!(
            "{name:<15} {:>8} / {:<8}          {a:>9.1}   {b:>12.1}   {:.2}x",
            tokens[i].0,
            tokens[i].1,
            a / b
        );
    }
    let all_ours = mean(&ours_rates[..n].iter().map(|r| mean(r)).collect::<Vec<_>>());
    let all_theirs = mean(
        &theirs_rates[..n]
            .iter()
            .map(|r| mean(r))
            .collect::<Vec<_>>(),
    );
    println!(
        "free text ({FREE_TOKENS} tokens)                  {free_ours:>9.1}   {free_theirs:>12.1}   {:.2}x",
        free_ours / free_theirs
    );
    println!(
        "schema / free text: llama-agent {:.2}, llama-server {:.2}; schemas, llama-agent vs llama-server: {:.2}x",
        all_ours / free_ours,
        all_theirs / free_theirs,
        all_ours / all_theirs
    );
    Ok(())
}
