//! Node-local cache benchmark, side by side with `cp` in one run (see BENCHMARKS.md): a model
//! streamed from a `llama-loader` process over loopback gRPC into a node cache (ReadModelFile,
//! MD5 of the assembled file, fsync, publish by rename) against `cp` of the loader's file,
//! against `cp` followed by `sync FILE` (fsync of the copy: the same durability), and against
//! `cp`, `md5sum` and `sync FILE` of the copy (the same durability and the same check). The
//! wire alone (bytes received and dropped) is timed too. Runs alternate.
//!
//! Usage: bench-node-cache [--runs N] [--model PATH]

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use llama_agent_client::proto::loader::v1::EnsureModelRequest;
use llama_agent_models::node_cache::{NodeCache, NodeCacheConfig, Plan};
use llama_agent_tests::support::{median, model, ms, LoaderProcess, MirrorProcess, GEMMA_FILE};

#[derive(Parser)]
struct Args {
    /// Copies per way (interleaved, so drift hits all alike).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// File to serve (default: the Gemma 3 270M test model).
    #[arg(long)]
    model: Option<PathBuf>,
}

const REPO: &str = "bench/model-GGUF";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let file = args.model.clone().unwrap_or_else(|| model(GEMMA_FILE));
    let size = std::fs::metadata(&file)?.len();
    let mirror = MirrorProcess::spawn(REPO, &file)?;
    let work = tempfile::tempdir()?;
    let loader = LoaderProcess::spawn(&work.path().join("cache"), &mirror.base_url, &[])?;
    let client = loader.client();
    let name = file.file_name().and_then(|n| n.to_str()).context("name")?;
    let ensured = client
        .ensure(
            EnsureModelRequest {
                model: format!("{REPO}/{name}"),
                ..Default::default()
            },
            |_| {},
        )
        .await?;
    let plan = Plan::of(&ensured.model)?;
    let source = PathBuf::from(&ensured.model.local_path);

    let (mut cp_s, mut cp_sync_s, mut stream_s) = (Vec::new(), Vec::new(), Vec::new());
    let (mut wire_s, mut verified_s) = (Vec::new(), Vec::new());
    for run in 0..args.runs {
        let dest = work.path().join("cp.gguf");
        let t = Instant::now();
        copy(&source, &dest, false)?;
        cp_s.push(t.elapsed());
        std::fs::remove_file(&dest)?;

        let t = Instant::now();
        copy(&source, &dest, true)?;
        cp_sync_s.push(t.elapsed());
        std::fs::remove_file(&dest)?;

        let t = Instant::now();
        copy(&source, &dest, false)?;
        let out = Command::new("md5sum").arg(&dest).output()?;
        if !String::from_utf8_lossy(&out.stdout).starts_with(&plan.id) {
            bail!("md5sum disagrees with the loader");
        }
        if !Command::new("sync").arg(&dest).status()?.success() {
            bail!("sync failed");
        }
        verified_s.push(t.elapsed());
        std::fs::remove_file(&dest)?;

        // The wire alone: every byte received and dropped.
        let t = Instant::now();
        let mut stream = std::pin::pin!(client.read_model_file(&plan.reference, "", 0).await?);
        let mut got = 0;
        while let Some(msg) = futures::StreamExt::next(&mut stream).await {
            got += msg?.data.len() as u64;
        }
        wire_s.push(t.elapsed());
        if got != size {
            bail!("the stream was short");
        }

        let dir = work.path().join(format!("node-{run}"));
        let config = NodeCacheConfig {
            model_cache_dir: Some(dir.clone()),
            model_cache_max_size: 2 * size,
        };
        let cache = NodeCache::open(&config, client.clone())
            .map_err(anyhow::Error::msg)?
            .context("a cache dir was given")?;
        let t = Instant::now();
        let local = cache.local_copy(&plan).await?;
        stream_s.push(t.elapsed());
        if std::fs::metadata(&local.path)?.len() != size {
            bail!("the copy has the wrong size");
        }
        drop(local);
        std::fs::remove_dir_all(&dir)?;
    }

    let mb = |d: Duration| size as f64 / d.as_secs_f64() / 1e6;
    println!(
        "file: {name} ({size} bytes), {} runs each, interleaved",
        args.runs
    );
    println!(
        "{:<44} {:>10} {:>10} {:>8}",
        "copy", "median", "best", "MB/s"
    );
    for (label, v) in [
        ("cp", &mut cp_s),
        ("cp + sync FILE (fsync)", &mut cp_sync_s),
        ("cp + md5sum + sync FILE", &mut verified_s),
        ("ReadModelFile alone (bytes dropped)", &mut wire_s),
        ("node cache: ReadModelFile + md5 + fsync", &mut stream_s),
    ] {
        let med = median(v);
        println!(
            "{label:<44} {:>8.0}ms {:>8.0}ms {:>8.0}",
            ms(med),
            ms(v[0]),
            mb(med)
        );
    }
    let stream = median(&mut stream_s).as_secs_f64();
    let ratio = |v: &mut Vec<Duration>| median(v).as_secs_f64() / stream;
    println!(
        "throughput ratio node cache / cp: {:.2}x (target >= 0.8x); / cp + sync: {:.2}x; / cp + md5sum + sync: {:.2}x",
        ratio(&mut cp_s),
        ratio(&mut cp_sync_s),
        ratio(&mut verified_s)
    );
    Ok(())
}

/// `cp SRC DEST`, then (`sync`) `sync DEST`, an fsync of the copy, as the cache makes its own.
fn copy(src: &std::path::Path, dest: &std::path::Path, sync: bool) -> anyhow::Result<()> {
    if !Command::new("cp").arg(src).arg(dest).status()?.success() {
        bail!("cp failed");
    }
    if sync && !Command::new("sync").arg(dest).status()?.success() {
        bail!("sync failed");
    }
    Ok(())
}
