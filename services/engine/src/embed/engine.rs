//! The embedding engine: one named thread owns the model and an embedding context; requests
//! reach it through a bounded channel and get their vectors back on a oneshot.

use std::num::NonZeroU32;
use std::path::Path;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::oneshot;

use super::batcher::{Batcher, Job, Limits};
use super::request::{EmbedRequest, Embedded, Pooling};
use crate::model::{self, LoadOptions, ModelMeta};
use crate::queue::{or_report, Jobs, Queue, ReadyTx};
use crate::{init_backend, EngineError};

/// llama.cpp's limit on sequence ids in one context (LLAMA_MAX_SEQ).
pub const MAX_SEQS: u32 = 256;

#[derive(Clone, Debug)]
pub struct EmbeddingOptions {
    pub load: LoadOptions,
    /// Tokens per llama.cpp batch, summed over the sequences packed into it. A text never
    /// spans two batches (a non-causal encoder sees a sequence in one pass), so this is also
    /// the most tokens one text can have.
    pub max_batch_tokens: u32,
    /// Sequences per batch at most.
    pub max_seqs_per_batch: u32,
    /// Requests waiting for the engine before RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// llama.cpp's flash attention: about twice as fast on CPU for encoders, but it rounds K
    /// and V to F16, so results then depend on packing by up to ~2e-4 per value.
    pub flash_attention: bool,
}

pub type Reply = oneshot::Receiver<Result<Embedded, EngineError>>;

/// A loaded embedding model with its context, on its own thread.
pub struct EmbeddingEngine {
    jobs: Queue<Job>,
    meta: ModelMeta,
    dim: usize,
    pooling: Pooling,
    max_tokens_per_text: u32,
}

/// What the engine thread reports once the model and context are ready.
struct Ready {
    meta: ModelMeta,
    dim: usize,
    pooling: Pooling,
    max_tokens_per_text: u32,
}

impl EmbeddingEngine {
    /// Loads `path` on a new thread; returns once the model and context are ready.
    pub fn load(path: &Path, opts: EmbeddingOptions) -> Result<Self, EngineError> {
        if opts.max_batch_tokens == 0 || opts.queue == 0 {
            return Err(EngineError::InvalidRequest(
                "batch tokens and queue must be at least 1".into(),
            ));
        }
        if opts.max_seqs_per_batch == 0 || opts.max_seqs_per_batch > MAX_SEQS {
            return Err(EngineError::InvalidRequest(format!(
                "sequences per batch must be 1 to {MAX_SEQS}"
            )));
        }
        let (jobs, ready) = Queue::spawn(
            ("emb", "embed"),
            path,
            opts.queue,
            move |path, jobs, ready| run(path, opts, jobs, ready),
        )?;
        Ok(Self {
            jobs,
            meta: ready.meta,
            dim: ready.dim,
            pooling: ready.pooling,
            max_tokens_per_text: ready.max_tokens_per_text,
        })
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    /// Width of the model's vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The model's own pooling, used when a request names none.
    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Tokens one text may have: the model's training context or the batch budget.
    pub fn max_tokens_per_text(&self) -> u32 {
        self.max_tokens_per_text
    }

    /// Queues a request. Never blocks: a full queue is an error the caller turns into
    /// RESOURCE_EXHAUSTED.
    pub fn submit(&self, req: EmbedRequest) -> Result<Reply, EngineError> {
        let (job, rx) = Job::new(req);
        self.jobs.try_submit(job)?;
        Ok(rx)
    }

    /// Queues a request, waiting for room. For callers whose own backlog is already bounded
    /// (an admitted stream with a fixed number of batches in flight).
    pub async fn submit_waiting(&self, req: EmbedRequest) -> Result<Reply, EngineError> {
        let (job, rx) = Job::new(req);
        self.jobs.submit_waiting(job).await?;
        Ok(rx)
    }
}

fn run(path: &Path, opts: EmbeddingOptions, rx: Jobs<Job>, ready: ReadyTx<Ready>) {
    let Some(model) = or_report(model::load(path, &opts.load), &ready) else {
        return;
    };
    let meta = model::meta(&model);
    let Some(ctx) = or_report(new_context(&model, &opts), &ready) else {
        return;
    };
    let limits = Limits {
        max_batch_tokens: opts.max_batch_tokens as usize,
        max_seqs: opts.max_seqs_per_batch as usize,
        max_tokens_per_text: meta.n_ctx_train.min(opts.max_batch_tokens) as usize,
        dim: model.n_embd_out().max(0) as usize,
        pooling: model_pooling(&model, &meta.architecture),
        // BERT-style tokenizers close every text with [SEP]/EOS; a cut text keeps it.
        keep_last: model.vocab().should_add_eos() || model.vocab().should_add_sep(),
    };
    let info = Ready {
        meta,
        dim: limits.dim,
        pooling: limits.pooling,
        max_tokens_per_text: limits.max_tokens_per_text as u32,
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    Batcher::new(&model, ctx, limits).serve(rx);
}

// llama.h's llama_flash_attn_type (llama-cpp-2 does not re-export llama-cpp-sys-2).
const FLASH_ATTN_AUTO: i32 = -1;
const FLASH_ATTN_DISABLED: i32 = 0;

fn new_context<'m>(
    model: &'m LlamaModel,
    opts: &EmbeddingOptions,
) -> Result<LlamaContext<'m>, EngineError> {
    let params = LlamaContextParams::default()
        .with_embeddings(true)
        // Token vectors come out and are pooled here, so each request may pick its pooling.
        .with_pooling_type(LlamaPoolingType::None)
        .with_n_ctx(NonZeroU32::new(opts.max_batch_tokens))
        // A non-causal model must see a whole batch in one ubatch.
        .with_n_batch(opts.max_batch_tokens)
        .with_n_ubatch(opts.max_batch_tokens)
        .with_n_seq_max(opts.max_seqs_per_batch)
        .with_n_threads(opts.load.threads)
        .with_n_threads_batch(opts.load.threads)
        .with_type_k(opts.load.cache_type_k)
        .with_type_v(opts.load.cache_type_v)
        .with_kv_unified(true)
        .with_flash_attention_policy(if opts.flash_attention {
            FLASH_ATTN_AUTO
        } else {
            FLASH_ATTN_DISABLED
        });
    model
        .new_context(init_backend()?.llama(), params)
        .map_err(|e| EngineError::Llama(format!("creating the embedding context: {e}")))
}

/// The pooling the GGUF declares (`<arch>.pooling_type`); without one, mean for encoders and
/// last-token for causal models, as their embedding variants are trained.
fn model_pooling(model: &LlamaModel, arch: &str) -> Pooling {
    match model
        .meta_val_str(&format!("{arch}.pooling_type"))
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
    {
        Some(1) => Pooling::Mean,
        Some(2) => Pooling::Cls,
        Some(3) => Pooling::Last,
        _ => {
            let causal = model
                .meta_val_str(&format!("{arch}.attention.causal"))
                .map_or(true, |v| v.trim() != "false");
            if causal {
                Pooling::Last
            } else {
                Pooling::Mean
            }
        }
    }
}
