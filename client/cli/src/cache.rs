//! `pull` and `cache ls|status|rm|verify`.

use clap::Subcommand;
use llama_agent_client::proto::common::v1::ModelInfo;
use llama_agent_client::proto::loader::v1::EnsureModelRequest;
use llama_agent_client::LoaderClient;
use serde_json::json;

use crate::progress::Reporter;

#[derive(Subcommand, Debug)]
pub enum CacheCommand {
    /// List cached models, most recently used first.
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Cache directory, bytes used of the cap, entries.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Remove a model from the cache.
    Rm {
        model: String,
        /// Remove even when a service holds a lease on it.
        #[arg(long)]
        force: bool,
    },
    /// Hash a cached model and compare with the MD5 recorded when it was downloaded.
    Verify {
        model: String,
        /// Download it again when the check fails.
        #[arg(long)]
        repair: bool,
    },
}

pub async fn pull(
    loader: &LoaderClient,
    model: &str,
    refresh: bool,
    as_json: bool,
) -> anyhow::Result<()> {
    let mut reporter = Reporter::new();
    let req = EnsureModelRequest {
        model: model.to_string(),
        refresh,
        ..Default::default()
    };
    let result = loader.ensure(req, |p| reporter.update(p)).await;
    reporter.finish();
    let ensured = result?;
    if as_json {
        println!("{}", model_json(&ensured.model));
    } else {
        eprintln!(
            "{} {} ({} bytes, md5 {})",
            if ensured.cache_hit {
                "cached"
            } else {
                "pulled"
            },
            ensured.model.reference,
            ensured.model.size_bytes,
            ensured.model.md5
        );
        println!("{}", ensured.model.local_path);
    }
    Ok(())
}

pub async fn run(loader: &LoaderClient, command: CacheCommand) -> anyhow::Result<()> {
    match command {
        CacheCommand::Ls { json: as_json } => {
            let models = loader.list_models().await?;
            if as_json {
                let rows: Vec<_> = models
                    .iter()
                    .map(|m| {
                        let mut v = model_json(m.model.as_ref().unwrap_or(&ModelInfo::default()));
                        v["last_used_unix_ms"] = json!(m.last_used_unix_ms);
                        v["leases"] = json!(m.leases.len());
                        v
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(rows));
            } else {
                println!(
                    "{:<64} {:>12} {:<32} {:>6}",
                    "MODEL", "SIZE", "MD5", "LEASES"
                );
                for m in &models {
                    let info = m.model.clone().unwrap_or_default();
                    println!(
                        "{:<64} {:>12} {:<32} {:>6}",
                        info.reference,
                        human_bytes(info.size_bytes),
                        info.md5,
                        m.leases.len()
                    );
                }
            }
        }
        CacheCommand::Status { json: as_json } => {
            let s = loader.cache_status().await?;
            if as_json {
                println!(
                    "{}",
                    json!({
                        "cache_dir": s.cache_dir, "bytes_used": s.bytes_used, "max_bytes": s.max_bytes,
                        "entries": s.entries, "leased_entries": s.leased_entries,
                        "downloads_in_flight": s.downloads_in_flight, "partial_bytes": s.partial_bytes,
                    })
                );
            } else {
                println!("cache dir:   {}", s.cache_dir);
                println!(
                    "used:        {} of {} ({} models, {} leased)",
                    human_bytes(s.bytes_used),
                    human_bytes(s.max_bytes),
                    s.entries,
                    s.leased_entries
                );
                println!(
                    "in flight:   {} downloads, {} in partial files",
                    s.downloads_in_flight,
                    human_bytes(s.partial_bytes)
                );
            }
        }
        CacheCommand::Rm { model, force } => {
            let r = loader.evict_model(&model, force).await?;
            println!("removed {} ({})", r.reference, human_bytes(r.bytes_freed));
        }
        CacheCommand::Verify { model, repair } => {
            let r = loader.verify_model(&model, repair).await?;
            let reference = r.model.map(|m| m.reference).unwrap_or(model);
            match (r.ok, r.repaired) {
                (true, _) => println!("ok {reference}"),
                (false, true) => println!("repaired {reference}: {}", r.detail),
                (false, false) => anyhow::bail!("{reference} is corrupt: {}", r.detail),
            }
        }
    }
    Ok(())
}

fn model_json(m: &ModelInfo) -> serde_json::Value {
    json!({
        "reference": m.reference, "local_path": m.local_path, "size_bytes": m.size_bytes,
        "md5": m.md5, "sha256": m.sha256, "repo": m.repo, "file": m.file,
        "revision": m.revision, "commit": m.commit,
        "files": m.files.iter().map(|f| json!({"name": f.name, "size_bytes": f.size_bytes, "md5": f.md5, "local_path": f.local_path})).collect::<Vec<_>>(),
    })
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}
