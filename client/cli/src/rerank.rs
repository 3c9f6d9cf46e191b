//! `llama-cli rerank`: documents from a .txt/.jsonl file (or stdin) scored against a query by
//! a reranker, printed best first (or as JSON, or into a Parquet file). Documents go to the
//! embedder in batches, a few at a time, and the scores are merged here.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::{
    ArrayRef, BooleanArray, Float32Array, Int32Array, RecordBatch, StringArray, UInt32Array,
};
use arrow_schema::{DataType, Field, Schema};
use futures::{StreamExt, TryStreamExt};
use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::{EmbedderClient, LoaderClient};
use llama_embedder::EmbedderConfig;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde_json::json;

use crate::embed::input::{InputArgs, Item, Row};

/// Requests in flight at once: enough to keep the embedder's batches full.
const IN_FLIGHT: usize = 4;

/// Documents held in memory at most: every score is kept to sort them all.
const MAX_DOCUMENTS: usize = 1_000_000;

#[derive(clap::Args, Debug)]
pub struct RerankArgs {
    /// A reranker (a cross-encoder GGUF with pooling type rank).
    #[arg(long)]
    model: String,
    /// The query every document is scored against.
    #[arg(long)]
    query: String,
    #[command(flatten)]
    source: InputArgs,
    /// Keep the best K.
    #[arg(long)]
    top_n: Option<usize>,
    /// Write the results (best first) to this Parquet file.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Print `[{"index", "score", "document"?}]`, best first (score: the raw logit).
    #[arg(long)]
    json: bool,
    /// Put each document's text in the printed results.
    #[arg(long)]
    return_documents: bool,
    /// Also print sigmoid(score), a probability-like value in 0..1.
    #[arg(long)]
    sigmoid: bool,
    /// Fail on a document too long to score with the query instead of cutting it.
    #[arg(long)]
    no_truncate: bool,
    /// Documents per request.
    #[arg(long, default_value_t = 128)]
    batch_size: usize,
    /// Embedder service (`host:port`), or its replicas (a comma-separated list, or a DNS
    /// name with several addresses). Without it the embedder runs inside this process.
    #[arg(long, env = "LLAMA_EMBEDDER_ENDPOINT")]
    embedder_endpoint: Option<String>,
    /// Settings of the in-process embedder (ignored with --embedder-endpoint).
    #[command(flatten)]
    engine: EmbedderConfig,
}

/// One scored document.
struct Scored {
    index: usize,
    result: pb::RerankResult,
}

pub async fn run(
    args: RerankArgs,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    if args.batch_size == 0 || args.batch_size > llama_embedder::MAX_TEXTS {
        bail!("--batch-size must be 1 to {}", llama_embedder::MAX_TEXTS);
    }
    if args.top_n == Some(0) {
        bail!("--top-n must be at least 1");
    }
    if args.embedder_endpoint.is_none() {
        args.engine.validate().map_err(anyhow::Error::msg)?;
    }
    let rows = read_documents(&args)?;
    if rows.is_empty() {
        bail!("{}: no documents to rerank", args.source.input.display());
    }
    let client = match &args.embedder_endpoint {
        Some(ep) => EmbedderClient::connect(ep)?,
        None => {
            EmbedderClient::new(llama_embedder::in_process(&args.engine, loader().await?).await?)
        }
    };
    let (mut scored, model_md5) = score(&client, &args, &rows).await?;
    // Best first; equal scores keep input order.
    scored.sort_by(|a, b| b.result.logit.total_cmp(&a.result.logit));
    if let Some(n) = args.top_n {
        scored.truncate(n);
    }
    if let Some(path) = &args.output {
        write_parquet(path, &args, &model_md5, &scored, &rows)?;
        eprintln!("wrote {} results to {}", scored.len(), path.display());
    }
    if args.json {
        let out: Vec<_> = scored
            .iter()
            .map(|s| {
                let mut o = json!({"index": s.index, "score": s.result.logit});
                if args.sigmoid {
                    o["sigmoid"] = json!(sigmoid(s.result.logit));
                }
                if args.return_documents {
                    o["document"] = json!(rows[s.index].text);
                }
                o
            })
            .collect();
        println!("{}", serde_json::Value::Array(out));
    } else if args.output.is_none() {
        for s in &scored {
            let mut line = format!("{}\t{:.6}", s.index, s.result.logit);
            if args.sigmoid {
                line.push_str(&format!("\t{:.6}", sigmoid(s.result.logit)));
            }
            if args.return_documents {
                line.push('\t');
                line.push_str(&rows[s.index].text);
            }
            println!("{line}");
        }
    }
    Ok(())
}

fn read_documents(args: &RerankArgs) -> anyhow::Result<Vec<Row>> {
    let mut input = args.source.open()?;
    let mut rows = Vec::new();
    while let Some(item) = input.next_item().context("reading the input")? {
        match item {
            Item::Row(r) => rows.push(r),
            Item::Bad { line, reason } if args.source.strict => {
                bail!("line {line}: {reason} (--strict)")
            }
            Item::Bad { line, reason } => {
                eprintln!("llama-cli: warning: line {line}: {reason}; skipped")
            }
        }
        if rows.len() > MAX_DOCUMENTS {
            bail!("more than {MAX_DOCUMENTS} documents; split the input");
        }
    }
    Ok(rows)
}

/// Every document's score, in input order, and the model's MD5.
async fn score(
    client: &EmbedderClient,
    args: &RerankArgs,
    rows: &[Row],
) -> anyhow::Result<(Vec<Scored>, String)> {
    let chunks = rows.chunks(args.batch_size).enumerate().map(|(k, chunk)| {
        let req = pb::RerankRequest {
            model: args.model.clone(),
            query: args.query.clone(),
            documents: chunk.iter().map(|r| r.text.clone()).collect(),
            top_n: None,
            return_documents: false,
            sigmoid: false,
            truncate: Some(!args.no_truncate),
        };
        let first = k * args.batch_size;
        async move {
            let resp = client
                .rerank(req)
                .await
                .with_context(|| format!("documents {first} onwards"))?;
            anyhow::Ok((first, resp))
        }
    });
    let answers: Vec<_> = futures::stream::iter(chunks)
        .buffered(IN_FLIGHT)
        .try_collect()
        .await?;
    let mut md5 = String::new();
    let mut scored = Vec::with_capacity(rows.len());
    for (first, resp) in answers {
        if !md5.is_empty() && md5 != resp.model_md5 {
            bail!(
                "the model file changed during the run (md5 {md5}, then {})",
                resp.model_md5
            );
        }
        md5 = resp.model_md5;
        for result in resp.results {
            scored.push(Scored {
                index: first + result.index as usize,
                result,
            });
        }
    }
    if scored.len() != rows.len() {
        bail!(
            "the embedder scored {} of {} documents",
            scored.len(),
            rows.len()
        );
    }
    scored.sort_by_key(|s| s.index);
    Ok((scored, md5))
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// One row per result, best first: rank, the document's index and id, raw score and sigmoid,
/// tokens scored, whether the document was cut, and its text. The file's metadata names the
/// model and the query.
fn write_parquet(
    path: &PathBuf,
    args: &RerankArgs,
    model_md5: &str,
    scored: &[Scored],
    rows: &[Row],
) -> anyhow::Result<()> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("rank", DataType::UInt32, false),
        Field::new("index", DataType::UInt32, false),
        Field::new("id", DataType::Utf8, false),
        Field::new("score", DataType::Float32, false),
        Field::new("sigmoid", DataType::Float32, false),
        Field::new("n_tokens", DataType::Int32, false),
        Field::new("truncated", DataType::Boolean, false),
        Field::new("document", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(UInt32Array::from_iter_values(0..scored.len() as u32)),
        Arc::new(UInt32Array::from_iter_values(
            scored.iter().map(|s| s.index as u32),
        )),
        Arc::new(StringArray::from_iter_values(
            scored.iter().map(|s| rows[s.index].id.as_str()),
        )),
        Arc::new(Float32Array::from_iter_values(
            scored.iter().map(|s| s.result.logit),
        )),
        Arc::new(Float32Array::from_iter_values(
            scored.iter().map(|s| sigmoid(s.result.logit)),
        )),
        Arc::new(Int32Array::from_iter_values(
            scored.iter().map(|s| s.result.tokens as i32),
        )),
        Arc::new(BooleanArray::from(
            scored
                .iter()
                .map(|s| s.result.truncated)
                .collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from_iter_values(
            scored.iter().map(|s| rows[s.index].text.as_str()),
        )),
    ];
    let batch = RecordBatch::try_new(Arc::clone(&schema), columns)?;
    let props = WriterProperties::builder()
        .set_compression(Compression::SNAPPY)
        .set_key_value_metadata(Some(vec![
            KeyValue::new("model".into(), args.model.clone()),
            KeyValue::new("model_md5".into(), model_md5.to_string()),
            KeyValue::new("query".into(), args.query.clone()),
            KeyValue::new(
                "tool_version".into(),
                format!("llama-cli {}", env!("CARGO_PKG_VERSION")),
            ),
        ]))
        .build();
    // Written beside the target and renamed, so a failed run leaves no half file.
    let tmp = path.with_extension("parquet.tmp");
    let file = File::create(&tmp).with_context(|| tmp.display().to_string())?;
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    Ok(())
}
