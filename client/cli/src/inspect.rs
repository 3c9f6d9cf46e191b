//! `llama-cli info` and `llama-cli tokenize`: what a served model is, and its tokenizer, from
//! the generator (default) or the embedder (`--embedder`), remote or in this process.

use std::path::PathBuf;

use anyhow::{bail, Context};
use clap::Parser;
use llama_agent_client::proto::common::v1 as common;
use llama_agent_client::proto::{embedder::v1 as epb, generator::v1 as gpb};
use llama_agent_client::{EmbedderClient, GeneratorClient, LoaderClient};
use llama_embedder::EmbedderConfig;
use llama_generator::GeneratorConfig;
use serde_json::{json, Value};

/// Which service answers.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// Model reference (`owner/repo`, `owner/repo:Q8_0`, a local path).
    #[arg(long)]
    model: String,
    /// Ask the embedder (its model settings) instead of the generator.
    #[arg(long)]
    embedder: bool,
    /// Generator service (`host:port`, or replicas: `a:50052,b:50052`); without it one runs
    /// in this process.
    #[arg(long, env = "LLAMA_GENERATOR_ENDPOINT")]
    generator_endpoint: Option<String>,
    /// Embedder service (`host:port`, or replicas: `a:50053,b:50053`); without it one runs
    /// in this process.
    #[arg(long, env = "LLAMA_EMBEDDER_ENDPOINT")]
    embedder_endpoint: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct InfoArgs {
    #[command(flatten)]
    target: Target,
    /// The whole answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct TokenizeArgs {
    #[command(flatten)]
    target: Target,
    /// The text to tokenize.
    #[arg(long, conflicts_with = "file")]
    text: Option<String>,
    /// Tokenize the contents of a file (`-`: stdin).
    #[arg(long)]
    file: Option<PathBuf>,
    /// Add BOS/EOS/SEP as the model does for its input.
    #[arg(long)]
    add_special: bool,
    /// Special-token text (`<start_of_turn>`) becomes the special token.
    #[arg(long)]
    parse_special: bool,
    /// Print each token's text too.
    #[arg(long)]
    pieces: bool,
    /// `{"ids": [...], "pieces": [...]}` instead of one id per line.
    #[arg(long)]
    json: bool,
}

/// The in-process services take their settings from the environment (LLAMA_GENERATOR_*,
/// LLAMA_EMBEDDER_*, LLAMA_N_GPU_LAYERS...), as the services themselves do.
#[derive(Parser)]
struct GenEnv {
    #[command(flatten)]
    config: GeneratorConfig,
}

#[derive(Parser)]
struct EmbEnv {
    #[command(flatten)]
    config: EmbedderConfig,
}

enum Client {
    Generator(GeneratorClient),
    Embedder(EmbedderClient),
}

impl Target {
    async fn client(
        &self,
        loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
    ) -> anyhow::Result<Client> {
        Ok(if self.embedder {
            Client::Embedder(match &self.embedder_endpoint {
                Some(ep) => EmbedderClient::connect(ep)?,
                None => {
                    let config = EmbEnv::try_parse_from(["llama-cli"])?.config;
                    EmbedderClient::new(llama_embedder::in_process(&config, loader().await?).await?)
                }
            })
        } else {
            Client::Generator(match &self.generator_endpoint {
                Some(ep) => GeneratorClient::connect(ep)?,
                None => {
                    let config = GenEnv::try_parse_from(["llama-cli"])?.config;
                    GeneratorClient::new(
                        llama_generator::in_process(&config, loader().await?).await?,
                    )
                }
            })
        })
    }
}

pub async fn info(
    args: InfoArgs,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    let model = &args.target.model;
    let (served, extra) = match args.target.client(loader).await? {
        Client::Generator(c) => {
            let i = c.model_info(model).await?;
            let extra = json!({
                "has_chat_template": i.has_chat_template,
                "slots_total": i.slots_total,
                "slots_in_use": i.slots_in_use,
                "context_length_served": i.context_length_served,
                "kv_cells_used": i.kv_cells_used,
                "kv_cells_total": i.kv_cells_total,
            });
            (i.model.unwrap_or_default(), extra)
        }
        Client::Embedder(c) => {
            let i = c.model_info(model).await?;
            let pooling = epb::Pooling::try_from(i.pooling)
                .map(|p| p.as_str_name())
                .unwrap_or("POOLING_UNSPECIFIED");
            let extra = json!({
                "dimensions": i.dimensions,
                "pooling": pooling.trim_start_matches("POOLING_").to_lowercase(),
                "max_tokens_per_text": i.max_tokens_per_text,
                "causal": i.causal,
                "max_batch_tokens": i.max_batch_tokens,
                "max_texts_per_batch": i.max_texts_per_batch,
                "contexts": i.contexts,
                "reranker": i.reranker,
            });
            (i.model.unwrap_or_default(), extra)
        }
    };
    let mut all = served_json(&served);
    if let (Value::Object(a), Value::Object(b)) = (&mut all, extra) {
        a.extend(b);
    }
    if args.json {
        println!("{all}");
        return Ok(());
    }
    let Value::Object(fields) = all else {
        unreachable!("served_json returns an object")
    };
    for (k, v) in fields {
        match v {
            Value::String(s) => println!("{k:<24} {s}"),
            other => println!("{k:<24} {other}"),
        }
    }
    Ok(())
}

fn served_json(m: &common::ServedModel) -> Value {
    let s = m.special_tokens.unwrap_or_default();
    json!({
        "reference": m.reference,
        "file": m.file,
        "md5": m.md5,
        "architecture": m.architecture,
        "parameters": m.parameters,
        "size_bytes": m.size_bytes,
        "quantization": m.quantization,
        "context_length_trained": m.context_length_trained,
        "vocab_size": m.vocab_size,
        "embedding_length": m.embedding_length,
        "layers": m.layers,
        "special_tokens": {
            "bos": s.bos, "eos": s.eos, "eot": s.eot, "sep": s.sep, "nl": s.nl, "pad": s.pad,
            "add_bos": s.add_bos, "add_eos": s.add_eos,
        },
        "was_loaded": m.was_loaded,
        "placement": m.placement,
        "gpu_layers": m.gpu_layers,
        "cpu_variant": m.cpu_variant,
        "threads": m.threads,
        "devices": m.devices.iter().map(|d| json!({
            "name": d.name,
            "description": d.description,
            "gpu": d.gpu,
            "memory_total_bytes": d.memory_total_bytes,
            "memory_free_bytes": d.memory_free_bytes,
        })).collect::<Vec<_>>(),
    })
}

pub async fn tokenize(
    args: TokenizeArgs,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    let text = match (&args.text, &args.file) {
        (Some(t), None) => t.clone(),
        (None, Some(f)) if f.as_os_str() == "-" => {
            std::io::read_to_string(std::io::stdin()).context("reading stdin")?
        }
        (None, Some(f)) => std::fs::read_to_string(f)
            .with_context(|| format!("reading {} (UTF-8 text)", f.display()))?,
        _ => bail!("give the text with --text or --file"),
    };
    let model = args.target.model.clone();
    let (ids, pieces) = match args.target.client(loader).await? {
        Client::Generator(c) => {
            let r = c
                .tokenize(gpb::TokenizeRequest {
                    model,
                    text,
                    add_special: args.add_special,
                    parse_special: args.parse_special,
                    with_pieces: args.pieces,
                })
                .await?;
            (r.ids, r.pieces)
        }
        Client::Embedder(c) => {
            let r = c
                .tokenize(epb::TokenizeRequest {
                    model,
                    text,
                    add_special: args.add_special,
                    parse_special: args.parse_special,
                    with_pieces: args.pieces,
                })
                .await?;
            (r.ids, r.pieces)
        }
    };
    let pieces: Vec<String> = pieces
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    if args.json {
        let mut out = json!({ "ids": ids });
        if args.pieces {
            out["pieces"] = json!(pieces);
        }
        println!("{out}");
    } else if args.pieces {
        for (id, p) in ids.iter().zip(&pieces) {
            println!("{id}\t{}", serde_json::to_string(p)?);
        }
    } else {
        for id in ids {
            println!("{id}");
        }
    }
    Ok(())
}
