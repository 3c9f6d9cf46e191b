//! Loader benchmark, side by side with curl in one run (see BENCHMARKS.md):
//! - cold pull throughput from the loopback hub mirror: `llama-loader` EnsureModel (MD5 and
//!   SHA-256 in the same pass, fsync, atomic publish) against `curl -o` of the same file;
//! - cache-hit EnsureModel latency over gRPC;
//! - with `--throttle BYTES_PER_SEC`, instead: cold pulls over a mirror that paces every
//!   response (so every connection) to that rate, one connection against
//!   `--connections N`, taking turns.
//!
//! Usage: bench-loader [--runs N] [--hits N] [--model PATH] [--throttle B/S [--connections N]]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use llama_agent_client::proto::loader::v1::EnsureModelRequest;
use llama_agent_tests::support::{median, model, ms, LoaderProcess, MirrorProcess, GEMMA_FILE};

#[derive(Parser)]
struct Args {
    /// Cold pulls per tool (interleaved, so drift hits both alike).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Cache-hit EnsureModel calls to time.
    #[arg(long, default_value_t = 2000)]
    hits: usize,
    /// File to serve (default: the Gemma 3 270M test model).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Pace each mirror response to this many bytes a second and compare connection counts.
    #[arg(long)]
    throttle: Option<u64>,
    /// Connections of the parallel side with --throttle.
    #[arg(long, default_value_t = 8)]
    connections: u32,
}

const REPO: &str = "bench/model-GGUF";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    llama_agent_tests::support::leave_openmp_alone();
    let args = Args::parse();
    let file = args.model.clone().unwrap_or_else(|| model(GEMMA_FILE));
    let name = file
        .file_name()
        .and_then(|n| n.to_str())
        .context("file name")?
        .to_string();
    let size = std::fs::metadata(&file)?.len();
    if let Some(rate) = args.throttle {
        return parallel_parts(&args, &file, &name, size, rate).await;
    }

    let mirror = MirrorProcess::spawn(REPO, &file)?;
    let base = mirror.base_url.clone();
    let url = format!("{base}/{REPO}/resolve/main/{name}");
    let work = tempfile::tempdir()?;
    let loader = LoaderProcess::spawn(&work.path().join("cache"), &base, &[])?;
    let client = loader.client();
    let reference = format!("{REPO}/{name}");
    let req = EnsureModelRequest {
        model: reference.clone(),
        ..Default::default()
    };

    let mut curl_s = Vec::new();
    let mut loader_s = Vec::new();
    for _ in 0..args.runs {
        let out = work.path().join("curl.gguf");
        let t = Instant::now();
        let status = Command::new("curl")
            .args(["-sS", "-o"])
            .arg(&out)
            .arg(&url)
            .status()?;
        curl_s.push(t.elapsed());
        if !status.success() || std::fs::metadata(&out)?.len() != size {
            bail!("curl failed");
        }
        std::fs::remove_file(&out)?;

        let t = Instant::now();
        let done = client.ensure(req.clone(), |_| {}).await?;
        loader_s.push(t.elapsed());
        if done.cache_hit || done.model.size_bytes != size {
            bail!("expected a cold download");
        }
        client.evict_model(&reference, false).await?;
    }

    client.ensure(req.clone(), |_| {}).await?;
    let mut hits = Vec::with_capacity(args.hits);
    for _ in 0..args.hits {
        let t = Instant::now();
        let done = client.ensure(req.clone(), |_| {}).await?;
        hits.push(t.elapsed());
        if !done.cache_hit {
            bail!("expected a cache hit");
        }
    }

    let mb = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    let (curl_med, loader_med) = (median(&mut curl_s), median(&mut loader_s));
    println!(
        "file: {name} ({size} bytes), {} cold runs each, interleaved",
        args.runs
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "cold pull (loopback mirror)", "median", "best", "MB/s"
    );
    println!(
        "{:<34} {:>8.0}ms {:>8.0}ms {:>10.0}",
        "curl -o",
        ms(curl_med),
        ms(curl_s[0]),
        mb(curl_med)
    );
    println!(
        "{:<34} {:>8.0}ms {:>8.0}ms {:>10.0}",
        "llama-loader EnsureModel (md5+sha)",
        ms(loader_med),
        ms(loader_s[0]),
        mb(loader_med)
    );
    println!(
        "throughput ratio loader/curl: {:.2}x (target >= 0.8x)",
        curl_med.as_secs_f64() / loader_med.as_secs_f64()
    );
    hits.sort();
    let pct = |p: f64| hits[((hits.len() as f64 * p) as usize).min(hits.len() - 1)];
    println!(
        "cache-hit EnsureModel over gRPC, {} calls: p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms (target p50 <= 2 ms)",
        hits.len(),
        ms(pct(0.5)),
        ms(pct(0.9)),
        ms(pct(0.99))
    );
    Ok(())
}

/// One connection against several over a per-connection throttle: the case parallel pieces
/// exist for (hub connections are capped far below the link).
async fn parallel_parts(
    args: &Args,
    file: &std::path::Path,
    name: &str,
    size: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let mirror = MirrorProcess::spawn_with(REPO, file, &["--bytes-per-sec", &rate.to_string()])?;
    let work = tempfile::tempdir()?;
    let many = args.connections.to_string();
    let sides = [("1", "1".to_string()), ("N", many)];
    let mut loaders = Vec::new();
    for (label, n) in &sides {
        let cache = work.path().join(format!("cache-{label}"));
        let loader =
            LoaderProcess::spawn(&cache, &mirror.base_url, &["--download-connections", n])?;
        loaders.push(loader);
    }
    let reference = format!("{REPO}/{name}");
    let req = EnsureModelRequest {
        model: reference.clone(),
        ..Default::default()
    };
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    for run in 0..args.runs {
        // Alternate which side goes first, so drift hits both alike.
        let order = if run % 2 == 0 { [0, 1] } else { [1, 0] };
        for side in order {
            let client = loaders[side].client();
            let t = Instant::now();
            let done = client.ensure(req.clone(), |_| {}).await?;
            times[side].push(t.elapsed());
            if done.cache_hit || done.model.size_bytes != size {
                bail!("expected a cold download");
            }
            client.evict_model(&reference, false).await?;
        }
    }
    let mb = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    println!(
        "file: {name} ({size} bytes), mirror paced to {rate} B/s per response, {} cold runs each, alternating",
        args.runs
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}",
        "cold pull (paced mirror)", "median", "best", "MB/s"
    );
    let mut medians = Vec::new();
    for (side, label) in [
        (0, "1 connection".to_string()),
        (1, format!("{} connections", args.connections)),
    ] {
        let med = median(&mut times[side]);
        medians.push(med);
        println!(
            "{:<34} {:>8.0}ms {:>8.0}ms {:>10.1}",
            label,
            ms(med),
            ms(times[side][0]),
            mb(med)
        );
    }
    println!(
        "speed-up {} connections / 1: {:.2}x (target >= 4x with 8)",
        args.connections,
        medians[0].as_secs_f64() / medians[1].as_secs_f64()
    );
    Ok(())
}
