//! `llama-cli embed`: texts from a .txt/.jsonl file (or stdin) through EmbedStream into a
//! Parquet file. Reading, embedding and writing overlap and each holds a few batches at
//! most, so memory stays flat whatever the input size; `--resume` continues an interrupted
//! run after its last complete row group. Over several embedder replicas the batches spread
//! (see `lanes`) and are written back in input order.

pub(crate) mod input;
mod lanes;
mod meter;
mod output;

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use llama_agent_client::embedder::decode_vectors;
use llama_agent_client::proto::embedder::v1 as pb;
use llama_agent_client::{EmbedderClient, LoaderClient};
use llama_embedder::EmbedderConfig;
use tokio::sync::mpsc;

use input::{Input, InputArgs, Item, Row};
use meter::Meter;
use output::{Checkpoint, FileMeta, Output, RunIdentity};

/// Batches read ahead of the embedder: enough to keep the stream fed.
const READ_AHEAD: usize = 4;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum PoolingArg {
    Mean,
    Cls,
    Last,
}

#[derive(clap::Args, Debug)]
pub struct EmbedArgs {
    /// Model reference (`owner/repo`, `owner/repo:Q8_0`, a file, a local path).
    #[arg(long)]
    model: String,
    #[command(flatten)]
    source: InputArgs,
    /// The Parquet file to write.
    #[arg(long)]
    output: PathBuf,
    /// Texts per request batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Tokens per text at most; longer texts are cut (and flagged) unless --no-truncate.
    #[arg(long, default_value_t = 512)]
    max_length: u32,
    /// Reject (fail) a text longer than --max-length instead of cutting it.
    #[arg(long)]
    no_truncate: bool,
    /// Leave the text column out.
    #[arg(long)]
    no_text: bool,
    /// Continue an interrupted run on the same input and model.
    #[arg(long)]
    resume: bool,
    /// Pooling instead of the model's own.
    #[arg(long, value_enum)]
    pooling: Option<PoolingArg>,
    /// Keep raw vectors (no L2 normalization).
    #[arg(long)]
    no_normalize: bool,
    /// Keep the first N dimensions (Matryoshka models), renormalized.
    #[arg(long, default_value_t = 0)]
    dimensions: u32,
    /// Task of an instruction-tuned embedder (Qwen3-Embedding): each text is embedded as
    /// `Instruct: TASK\nQuery:TEXT`. For queries; embed documents without it.
    #[arg(long, default_value = "")]
    instruction: String,
    /// Literal text before each text (`query: ` for E5, `search_query: ` for nomic-embed).
    #[arg(long, default_value = "")]
    prefix: String,
    /// Rows per Parquet row group (and per resume checkpoint).
    #[arg(long, default_value_t = 4096)]
    row_group_rows: usize,
    /// Embedder service (`host:port`), or its replicas: a comma-separated list, or a DNS name
    /// with several addresses. Batches spread over the replicas, one stream each; a replica
    /// that fails or drains mid-job has its unanswered batches sent again to another.
    /// Without it the embedder runs inside this process.
    #[arg(long, env = "LLAMA_EMBEDDER_ENDPOINT")]
    embedder_endpoint: Option<String>,
    /// Settings of the in-process embedder (ignored with --embedder-endpoint).
    #[command(flatten)]
    engine: EmbedderConfig,
}

impl EmbedArgs {
    fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.batch_size > llama_embedder::MAX_TEXTS {
            bail!("--batch-size must be 1 to {}", llama_embedder::MAX_TEXTS);
        }
        if self.row_group_rows == 0 {
            bail!("--row-group-rows must be at least 1");
        }
        if self.resume && self.source.is_stdin() {
            bail!("--resume needs an input file (stdin cannot be read again)");
        }
        if self.source.input == self.output {
            bail!("--input and --output are the same file");
        }
        if self.embedder_endpoint.is_none() {
            self.engine.validate().map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    fn options(&self) -> pb::EmbedOptions {
        let pooling = match self.pooling {
            None => pb::Pooling::Unspecified,
            Some(PoolingArg::Mean) => pb::Pooling::Mean,
            Some(PoolingArg::Cls) => pb::Pooling::Cls,
            Some(PoolingArg::Last) => pb::Pooling::Last,
        };
        pb::EmbedOptions {
            normalize: Some(!self.no_normalize),
            max_length: self.max_length,
            truncate: Some(!self.no_truncate),
            pooling: pooling as i32,
            dimensions: self.dimensions,
            dtype: pb::DType::F32 as i32,
            instruction: self.instruction.clone(),
            prefix: self.prefix.clone(),
        }
    }

    /// The run as `--resume` must find it again.
    fn identity(&self) -> anyhow::Result<RunIdentity> {
        let (input, input_len) = if self.source.is_stdin() {
            ("-".to_string(), 0)
        } else {
            let canon = std::fs::canonicalize(&self.source.input)
                .with_context(|| self.source.input.display().to_string())?;
            let len = std::fs::metadata(&canon)?.len();
            (canon.display().to_string(), len)
        };
        let settings = format!(
            "model={} options={:?} text={} fields={}/{} format={:?}",
            self.model,
            self.options(),
            !self.no_text,
            self.source.text_field,
            self.source.id_field,
            self.source.format
        );
        Ok(RunIdentity {
            input,
            input_len,
            settings,
        })
    }
}

pub async fn run(
    args: EmbedArgs,
    loader: impl AsyncFn() -> anyhow::Result<LoaderClient>,
) -> anyhow::Result<()> {
    args.validate()?;
    let identity = args.identity()?;
    let resume = match (args.resume, Checkpoint::read(&args.output)?) {
        (true, Some(cp)) if cp.identity != identity => bail!(
            "{} was written from another input or with other options; start again without --resume",
            args.output.display()
        ),
        (true, Some(cp)) if cp.rows > 0 => Some(cp),
        (true, None) if output::is_complete(&args.output) => {
            eprintln!("nothing to resume: {} is complete", args.output.display());
            return Ok(());
        }
        _ => {
            // A fresh run: stale state of an earlier one goes.
            let _ = std::fs::remove_file(output::prev_path(&args.output));
            None
        }
    };

    let mut input = args.source.open()?;
    let total_bytes = (!args.source.is_stdin()).then_some(identity.input_len);
    let skip = resume.as_ref().map_or(0, |cp| cp.lines);
    let bytes_read = Arc::new(AtomicU64::new(0));
    let skipped = Arc::new(AtomicU64::new(0));
    let (batch_tx, mut batch_rx) = mpsc::channel::<anyhow::Result<Vec<Row>>>(READ_AHEAD);
    {
        let (bytes_read, skipped, strict, size) = (
            Arc::clone(&bytes_read),
            Arc::clone(&skipped),
            args.source.strict,
            args.batch_size,
        );
        std::thread::Builder::new()
            .name("embed-input".into())
            .spawn(move || {
                read_batches(
                    &mut input,
                    skip,
                    size,
                    strict,
                    &batch_tx,
                    &bytes_read,
                    &skipped,
                )
            })?;
    }

    let client = match &args.embedder_endpoint {
        Some(ep) => EmbedderClient::connect(ep)?,
        None => {
            EmbedderClient::new(llama_embedder::in_process(&args.engine, loader().await?).await?)
        }
    };
    let Some(first) = batch_rx.recv().await.transpose()? else {
        return finish_without_rows(&args, resume);
    };
    // One stream per replica of the endpoint (one for a single server or in-process).
    let streams = client.replica_count().await;
    let job = lanes::Job {
        model: args.model.clone(),
        options: args.options(),
    };
    let mut meter = Meter::new(total_bytes);
    let mut out: Option<Output> = None;
    let written = lanes::run(&client, &job, streams, first, batch_rx, |rows, resp| {
        let e = resp
            .embeddings
            .as_ref()
            .context("the embedder sent no vectors")?;
        let vectors = decode_vectors(e).context("the embedder sent malformed vectors")?;
        if out.is_none() {
            out = Some(open_output(
                &args,
                &resp,
                e.dim as usize,
                identity.clone(),
                resume.as_ref(),
            )?);
        }
        if let Some(o) = out.as_mut() {
            o.write(&rows, vectors, &e.token_counts, &e.truncated)?;
        }
        meter.update(rows.len() as u64, bytes_read.load(Ordering::Relaxed));
        Ok(())
    })
    .await;
    // A failed read (--strict) ends the job early: the file stays resumable, not closed.
    written?;
    meter.finish();
    let out = out.context("the embedder closed the stream without answering")?;
    let rows = out.finish()?;
    eprintln!(
        "embedded {rows} texts into {} ({} lines skipped, {:.0} texts/s)",
        args.output.display(),
        skipped.load(Ordering::Relaxed),
        meter.rate()
    );
    Ok(())
}

/// The output file, created on the first answer (which tells the width and the model's MD5);
/// a resumed run first brings back the rows of the interrupted one.
fn open_output(
    args: &EmbedArgs,
    resp: &pb::EmbedStreamResponse,
    dim: usize,
    identity: RunIdentity,
    resume: Option<&Checkpoint>,
) -> anyhow::Result<Output> {
    if let Some(cp) = resume {
        if cp.model_md5 != resp.model_md5 {
            bail!(
                "{} was written with another model file (md5 {}, now {}); start again without --resume",
                args.output.display(),
                cp.model_md5,
                resp.model_md5
            );
        }
    }
    let prev = resume.map(|cp| cp.recover(&args.output)).transpose()?;
    let pooling = pb::Pooling::try_from(resp.pooling)
        .map_or("unknown", |p| p.as_str_name())
        .trim_start_matches("POOLING_")
        .to_ascii_lowercase();
    let meta = FileMeta {
        model: args.model.clone(),
        model_md5: resp.model_md5.clone(),
        pooling,
        normalized: resp.normalized,
        dim,
    };
    let mut out = Output::create(
        &args.output,
        &meta,
        !args.no_text,
        args.row_group_rows,
        identity,
    )?;
    if let (Some(prev), Some(cp)) = (prev, resume) {
        out.copy_rows(&prev, cp)?;
        eprintln!(
            "resumed after {} rows (input line {})",
            out.rows(),
            cp.lines
        );
    }
    Ok(out)
}

/// Nothing left to embed: a resumed run whose rows were all written is closed; otherwise the
/// input had no texts.
fn finish_without_rows(args: &EmbedArgs, resume: Option<Checkpoint>) -> anyhow::Result<()> {
    let Some(cp) = resume else {
        bail!("{}: no texts to embed", args.source.input.display());
    };
    let prev = cp.recover(&args.output)?;
    let meta = FileMeta::read(&prev)?;
    let mut out = Output::create(
        &args.output,
        &meta,
        !args.no_text,
        args.row_group_rows,
        cp.identity.clone(),
    )?;
    out.copy_rows(&prev, &cp)?;
    let rows = out.finish()?;
    eprintln!(
        "embedded {rows} texts into {} (all rows were already there)",
        args.output.display()
    );
    Ok(())
}

/// The input thread: rows in batches of `size`; bad lines reported (or, with `strict`, the
/// end of the run).
fn read_batches(
    input: &mut Input,
    skip: u64,
    size: usize,
    strict: bool,
    tx: &mpsc::Sender<anyhow::Result<Vec<Row>>>,
    bytes_read: &AtomicU64,
    skipped: &AtomicU64,
) {
    if let Err(e) = input.skip(skip) {
        let _ = tx.blocking_send(Err(e.into()));
        return;
    }
    let mut batch = Vec::with_capacity(size);
    loop {
        let item = match input.next_item() {
            Ok(i) => i,
            Err(e) => {
                let _ = tx.blocking_send(Err(anyhow::anyhow!("reading the input: {e}")));
                return;
            }
        };
        bytes_read.store(input.bytes, Ordering::Relaxed);
        match item {
            None => break,
            Some(Item::Row(r)) => batch.push(r),
            Some(Item::Bad { line, reason }) if strict => {
                let _ = tx.blocking_send(Err(anyhow::anyhow!("line {line}: {reason} (--strict)")));
                return;
            }
            Some(Item::Bad { line, reason }) => {
                eprintln!("llama-cli: warning: line {line}: {reason}; skipped");
                skipped.fetch_add(1, Ordering::Relaxed);
            }
        }
        if batch.len() == size
            && tx
                .blocking_send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(size))))
                .is_err()
        {
            return;
        }
    }
    if !batch.is_empty() {
        let _ = tx.blocking_send(Ok(batch));
    }
}
