//! The embedding engine: one named thread owns the model and an embedding context; requests
//! reach it through a bounded channel and get their vectors back on a oneshot.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::Arc;

use llama_cpp_2::context::params::{LlamaContextParams, LlamaPoolingType};
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::model::LlamaModel;
use tokio::sync::oneshot;

use super::batcher::{Batcher, Job, Limits, Work};
use super::pairs::PairFormat;
use super::request::{EmbedRequest, Embedded, Pooling, RerankRequest};
use crate::model::{self, LoadOptions, ModelMeta};
use crate::queue::{or_report, Jobs, Queue, ReadyTx, SharedJobs};
use crate::{init_backend, EngineError, Tokenizer};

/// llama.cpp's limit on sequence ids in one context (LLAMA_MAX_SEQ).
pub const MAX_SEQS: u32 = 256;

/// Contexts of one model at most: each holds its own compute buffers and thread.
pub const MAX_CONTEXTS: u32 = 8;

/// Contexts of a model that is wholly on a GPU. One thread launches a batch's kernels and
/// waits for them, and for small models that, not the GPU, is the limit: on the H200, 100k
/// short texts with MiniLM took 10.4 s with 1 context, 6.6 s with 2, 4.3 s with 4 (3.7 s
/// with 6); the Qwen3-Embedding-0.6B shape 42.6 s, 30.3 s and 26.1 s.
const GPU_CONTEXTS: u32 = 4;

#[derive(Clone, Debug)]
pub struct EmbeddingOptions {
    pub load: LoadOptions,
    /// Tokens per llama.cpp batch, summed over the sequences packed into it. A text never
    /// spans two batches (a non-causal encoder sees a sequence in one pass), so this is also
    /// the most tokens one text can have. `None`: see [`BatchShape`].
    pub max_batch_tokens: Option<u32>,
    /// Sequences per batch at most. `None`: see [`BatchShape`].
    pub max_seqs_per_batch: Option<u32>,
    /// Contexts embedding batches at the same time, each on its own thread. `None`:
    /// [`GPU_CONTEXTS`] when every layer is on a GPU, else one.
    pub contexts: Option<u32>,
    /// Requests waiting for the engine before RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// llama.cpp's flash attention: about twice as fast on CPU for encoders, but it rounds K
    /// and V to F16, so results then depend on packing by up to ~2e-4 per value.
    pub flash_attention: bool,
    /// Every batch padded to the full batch shape, so the CUDA backend replays one captured
    /// CUDA graph per context (see [`super::layout`]). `None`: for an encoder wholly on a
    /// GPU. On the H200, 100k texts with MiniLM took 3.7-4.0 s padded against 4.5 s (3.5
    /// against 3.9 s with 8 contexts), while the Qwen3-Embedding-0.6B shape, whose batches
    /// keep the GPU's arithmetic busy, took 21.8 s padded against 20.9 s: padding is then
    /// only work.
    pub pad_batches: Option<bool>,
}

pub type Reply = oneshot::Receiver<Result<Embedded, EngineError>>;

/// A loaded embedding model with its contexts, on their own threads.
pub struct EmbeddingEngine {
    // Dropped before `jobs`: see `Tokenizer`.
    tokenizer: Tokenizer,
    jobs: Queue<Job>,
    meta: ModelMeta,
    dim: usize,
    pooling: Pooling,
    max_tokens_per_text: u32,
    serving: Serving,
}

/// How an embedding model is served: its batch shape and contexts.
#[derive(Clone, Copy, Debug)]
pub struct Serving {
    pub causal: bool,
    pub max_batch_tokens: u32,
    pub max_seqs_per_batch: u32,
    pub contexts: u32,
}

/// What the engine thread reports once the model and contexts are ready.
struct Ready {
    meta: ModelMeta,
    dim: usize,
    pooling: Pooling,
    max_tokens_per_text: u32,
    serving: Serving,
    tokenizer: Tokenizer,
}

impl EmbeddingEngine {
    /// Loads `path` on a new thread; returns once the model and context are ready.
    pub fn load(path: &Path, opts: EmbeddingOptions) -> Result<Self, EngineError> {
        if opts.max_batch_tokens == Some(0) || opts.queue == 0 {
            return Err(EngineError::InvalidRequest(
                "batch tokens and queue must be at least 1".into(),
            ));
        }
        if opts
            .max_seqs_per_batch
            .is_some_and(|n| n == 0 || n > MAX_SEQS)
        {
            return Err(EngineError::InvalidRequest(format!(
                "sequences per batch must be 1 to {MAX_SEQS}"
            )));
        }
        if opts.contexts.is_some_and(|n| n == 0 || n > MAX_CONTEXTS) {
            return Err(EngineError::InvalidRequest(format!(
                "contexts must be 1 to {MAX_CONTEXTS}"
            )));
        }
        let (jobs, ready) = Queue::spawn(
            ("emb", "embed"),
            path,
            opts.queue,
            move |path, jobs, ready| run(path, opts, jobs, ready),
        )?;
        Ok(Self {
            tokenizer: ready.tokenizer,
            jobs,
            meta: ready.meta,
            dim: ready.dim,
            pooling: ready.pooling,
            max_tokens_per_text: ready.max_tokens_per_text,
            serving: ready.serving,
        })
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn serving(&self) -> Serving {
        self.serving
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
        self.submit_work(Work::Embed(req))
    }

    /// Queues a reranking: the reply's rows are each document's scores (the first is the
    /// score), in request order. A model that is not a reranker is refused here.
    pub fn rerank(&self, req: RerankRequest) -> Result<Reply, EngineError> {
        if self.pooling != Pooling::Rank {
            return Err(EngineError::Unsupported(format!(
                "the model is not a reranker: its pooling is {}, not rank; rerank with a \
                 cross-encoder GGUF (pooling_type rank)",
                self.pooling.name()
            )));
        }
        self.submit_work(Work::Rerank(req))
    }

    fn submit_work(&self, work: Work) -> Result<Reply, EngineError> {
        let (job, rx) = Job::new(work);
        self.jobs.try_submit(job)?;
        Ok(rx)
    }

    /// Queues a request, waiting for room. For callers whose own backlog is already bounded
    /// (an admitted stream with a fixed number of batches in flight).
    pub async fn submit_waiting(&self, req: EmbedRequest) -> Result<Reply, EngineError> {
        let (job, rx) = Job::new(Work::Embed(req));
        self.jobs.submit_waiting(job).await?;
        Ok(rx)
    }
}

/// How llama.cpp batches are cut, when the options leave it open.
#[derive(Clone, Copy, Debug)]
struct BatchShape {
    tokens: u32,
    seqs: u32,
}

impl BatchShape {
    /// An encoder attends across its whole packed batch (other texts masked out), so the
    /// cost of a batch of short texts grows with its square: 512 tokens measured as fast as
    /// 2048 on CPU with a third less memory. A causal decoder's cost grows with its length
    /// alone, and on a GPU fewer, bigger batches pay fewer per-batch costs: on the H200, 100k
    /// texts with the Qwen3-Embedding-0.6B shape took 20.9 s with 2048 tokens and 23.2 s with
    /// 1024 (4 contexts), 28.9 s with 512 (8 contexts). On a CPU decoders keep the encoders'
    /// 512 (BENCHMARKS.md has the 2-core measurement).
    fn for_model(opts: &EmbeddingOptions, causal: bool, on_gpu: bool) -> Self {
        let (tokens, seqs) = if causal && on_gpu {
            (2048, 256)
        } else {
            (512, 64)
        };
        Self {
            tokens: opts.max_batch_tokens.unwrap_or(tokens),
            seqs: opts.max_seqs_per_batch.unwrap_or(seqs),
        }
    }
}

fn run(path: &Path, opts: EmbeddingOptions, rx: Jobs<Job>, ready: ReadyTx<Ready>) {
    let Some(model) = or_report(model::load(path, &opts.load), &ready) else {
        return;
    };
    let model = Arc::new(model);
    let meta = model::meta(&model, &opts.load);
    let causal = is_causal(&model, &meta.architecture);
    let on_gpu = model::all_on_gpu(&model, &opts.load);
    let shape = BatchShape::for_model(&opts, causal, on_gpu);
    let contexts = opts
        .contexts
        .unwrap_or(if on_gpu { GPU_CONTEXTS } else { 1 });
    let pooling = model_pooling(&model, &meta.architecture, causal);
    let rank = pooling == Pooling::Rank;
    let limits = Limits {
        max_batch_tokens: shape.tokens as usize,
        max_seqs: shape.seqs as usize,
        max_tokens_per_text: meta.n_ctx_train.min(shape.tokens) as usize,
        // A reranker's rows are its classification head's outputs.
        dim: if rank {
            model.n_cls_out() as usize
        } else {
            model.n_embd_out().max(0) as usize
        },
        pooling,
        // BERT-style tokenizers close every text with [SEP]/EOS; a cut text keeps it.
        keep_last: model.vocab().should_add_eos() || model.vocab().should_add_sep(),
        pairs: rank.then(|| Arc::new(PairFormat::for_model(&model))),
        // llama.cpp decodes a causal model (an encoder is encoded, every token out) and, with
        // its own pooling off, honours the batch's output flags (llama.cpp-patches/apply.cmake).
        select_outputs: causal && !rank,
        // Padding positions run up to the batch size, which the model must have room for.
        pad: opts.pad_batches.unwrap_or(on_gpu && !causal)
            && !rank
            && shape.tokens <= meta.n_ctx_train,
    };
    let info = Ready {
        meta,
        dim: limits.dim,
        pooling: limits.pooling,
        max_tokens_per_text: limits.max_tokens_per_text as u32,
        serving: Serving {
            causal,
            max_batch_tokens: shape.tokens,
            max_seqs_per_batch: shape.seqs,
            contexts,
        },
        tokenizer: Tokenizer::new(Arc::clone(&model)),
    };
    tracing::debug!(
        ?shape,
        contexts,
        causal,
        pad = limits.pad,
        "embedding engine"
    );
    let jobs = SharedJobs::new(rx);
    // Every context takes whole requests from the one queue. A context is not `Send`, so
    // each is made on the thread that uses it; the engine is ready once all of them exist.
    std::thread::scope(|scope| {
        let (made_tx, made_rx) = std::sync::mpsc::channel();
        for i in 1..contexts {
            let made = made_tx.clone();
            let (model, opts, jobs, limits) = (&*model, &opts, &jobs, limits.clone());
            let spawned = std::thread::Builder::new()
                .name(helper_name(i))
                .spawn_scoped(scope, move || match new_context(model, opts, shape, rank) {
                    Ok(ctx) => {
                        let _ = made.send(Ok(()));
                        drop(made);
                        Batcher::new(model, ctx, limits).serve(jobs);
                    }
                    Err(e) => {
                        let _ = made.send(Err(e));
                    }
                });
            if let Err(e) = spawned {
                let _ = ready.send(Err(EngineError::Backend(e.to_string())));
                return;
            }
        }
        drop(made_tx);
        let Some(ctx) = or_report(new_context(&model, &opts, shape, rank), &ready) else {
            return;
        };
        for _ in 1..contexts {
            // A failed helper fails the load; the others stop when the queue closes.
            let made = made_rx.recv().unwrap_or(Err(EngineError::Stopped));
            if or_report(made, &ready).is_none() {
                return;
            }
        }
        if ready.send(Ok(info)).is_ok() {
            Batcher::new(&model, ctx, limits).serve(&jobs);
        }
    });
}

/// `llama-emb-<file>-<i>`: the engine thread's name (at most Linux's 15 bytes) with a suffix.
fn helper_name(i: u32) -> String {
    let base = std::thread::current()
        .name()
        .unwrap_or("llama-emb")
        .to_string();
    let suffix = format!("-{i}");
    let keep = 15usize.saturating_sub(suffix.len()).min(base.len());
    let cut = (0..=keep)
        .rev()
        .find(|&k| base.is_char_boundary(k))
        .unwrap_or(0);
    format!("{}{suffix}", &base[..cut])
}

// llama.h's llama_flash_attn_type (llama-cpp-2 does not re-export llama-cpp-sys-2).
const FLASH_ATTN_AUTO: i32 = -1;
const FLASH_ATTN_DISABLED: i32 = 0;

fn new_context<'m>(
    model: &'m LlamaModel,
    opts: &EmbeddingOptions,
    shape: BatchShape,
    rank: bool,
) -> Result<LlamaContext<'m>, EngineError> {
    let threads = model::threads(model, &opts.load);
    let params = LlamaContextParams::default()
        .with_embeddings(true)
        // Token vectors come out and are pooled here, so each request may pick its pooling;
        // a reranker's classification head runs in llama.cpp's graph.
        .with_pooling_type(if rank {
            LlamaPoolingType::Rank
        } else {
            LlamaPoolingType::None
        })
        .with_n_ctx(NonZeroU32::new(shape.tokens))
        // A non-causal model must see a whole batch in one ubatch.
        .with_n_batch(shape.tokens)
        .with_n_ubatch(shape.tokens)
        .with_n_seq_max(shape.seqs)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
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

/// Whether the model attends only to earlier tokens: the GGUF's `<arch>.attention.causal`,
/// else true but for the BERT family (bert, nomic-bert, jina-bert-v2, modern-bert, ...).
fn is_causal(model: &LlamaModel, arch: &str) -> bool {
    match model.meta_val_str(&format!("{arch}.attention.causal")) {
        Ok(v) => v.trim() != "false",
        Err(_) => !arch.contains("bert"),
    }
}

/// The pooling the GGUF declares (`<arch>.pooling_type`); without one, mean for encoders and
/// last-token for causal models, as their embedding variants are trained.
fn model_pooling(model: &LlamaModel, arch: &str, causal: bool) -> Pooling {
    match model
        .meta_val_str(&format!("{arch}.pooling_type"))
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
    {
        Some(1) => Pooling::Mean,
        Some(2) => Pooling::Cls,
        Some(3) => Pooling::Last,
        Some(4) => Pooling::Rank,
        _ if causal => Pooling::Last,
        _ => Pooling::Mean,
    }
}
