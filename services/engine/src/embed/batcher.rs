//! The packing loop: rows of every admitted request go into llama.cpp batches in arrival
//! order, as many sequences per batch as the token budget allows, so small requests share a
//! batch and a large one fills several.

use std::collections::VecDeque;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::request::{EmbedRequest, Embedded, Pooling};
use super::vectors::{cap_tokens, l2_normalize, pool};
use crate::queue::SharedJobs;
use crate::EngineError;

pub(super) struct Job {
    req: EmbedRequest,
    reply: oneshot::Sender<Result<Embedded, EngineError>>,
}

impl Job {
    pub fn new(req: EmbedRequest) -> (Self, oneshot::Receiver<Result<Embedded, EngineError>>) {
        let (reply, rx) = oneshot::channel();
        (Self { req, reply }, rx)
    }
}

#[derive(Clone)]
pub(super) struct Limits {
    pub max_batch_tokens: usize,
    pub max_seqs: usize,
    pub max_tokens_per_text: usize,
    pub dim: usize,
    pub pooling: Pooling,
    pub keep_last: bool,
}

/// An admitted request: its texts tokenized, its vectors filling in.
struct Active {
    reply: oneshot::Sender<Result<Embedded, EngineError>>,
    deadline: Option<Instant>,
    span: tracing::Span,
    tokens: Vec<Vec<LlamaToken>>,
    /// Next row to put in a batch.
    next: usize,
    /// Tokens of rows not yet in a batch.
    waiting_tokens: usize,
    done: usize,
    normalize: bool,
    out: Embedded,
}

impl Active {
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Where one sequence of the current batch came from.
struct Seq {
    job: usize,
    row: usize,
    first: i32,
    len: usize,
}

pub(super) struct Batcher<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    limits: Limits,
    active: VecDeque<Active>,
    /// Pooled full-width vector of one sequence, reused.
    scratch: Vec<f32>,
}

impl<'m> Batcher<'m> {
    pub fn new(model: &'m LlamaModel, ctx: LlamaContext<'m>, limits: Limits) -> Self {
        Self {
            model,
            ctx,
            batch: LlamaBatch::new(limits.max_batch_tokens, 1),
            scratch: vec![0.0; limits.dim],
            limits,
            active: VecDeque::new(),
        }
    }

    pub fn serve(&mut self, rx: &SharedJobs<Job>) {
        loop {
            if self.active.is_empty() {
                match rx.wait() {
                    Some(job) => self.admit(job),
                    None => return,
                }
            }
            // Take more requests while less than a full batch waits, so concurrent requests
            // share batches; the rest stay in the bounded channel.
            while self.waiting_tokens() < self.limits.max_batch_tokens {
                match rx.next() {
                    Some(job) => self.admit(job),
                    None => break,
                }
            }
            // A dropped client or a passed deadline stops the work left for it.
            self.active.retain(|a| !a.abandoned());
            if !self.active.is_empty() {
                self.step();
            }
        }
    }

    fn waiting_tokens(&self) -> usize {
        self.active.iter().map(|a| a.waiting_tokens).sum()
    }

    /// Tokenizes a request; a text that is empty of tokens or too long (and not to be cut)
    /// rejects the whole request, naming the row, before any work is done for it.
    fn admit(&mut self, job: Job) {
        let Job { req, reply } = job;
        let _entered = req.span.enter();
        match self.prepare(&req) {
            Ok((tokens, out)) => {
                let waiting_tokens = tokens.iter().map(Vec::len).sum();
                drop(_entered);
                self.active.push_back(Active {
                    reply,
                    deadline: req.deadline,
                    span: req.span,
                    tokens,
                    next: 0,
                    waiting_tokens,
                    done: 0,
                    normalize: req.params.normalize,
                    out,
                });
            }
            Err(e) => {
                tracing::debug!(error = %e, "embedding request rejected");
                let _ = reply.send(Err(e));
            }
        }
    }

    fn prepare(&self, req: &EmbedRequest) -> Result<(Vec<Vec<LlamaToken>>, Embedded), EngineError> {
        let p = &req.params;
        if req.texts.is_empty() {
            return Err(EngineError::InvalidRequest("no texts to embed".into()));
        }
        let dim = match p.dimensions as usize {
            0 => self.limits.dim,
            d if d <= self.limits.dim => d,
            d => {
                return Err(EngineError::InvalidRequest(format!(
                    "dimensions {d} is more than the model's {}",
                    self.limits.dim
                )))
            }
        };
        let cap = match p.max_length as usize {
            0 => self.limits.max_tokens_per_text,
            n => n.min(self.limits.max_tokens_per_text),
        };
        let vocab = self.model.vocab();
        let mut tokens = Vec::with_capacity(req.texts.len());
        let mut token_counts = Vec::with_capacity(req.texts.len());
        let mut truncated = Vec::with_capacity(req.texts.len());
        for (row, text) in req.texts.iter().enumerate() {
            // Special-token text in user input stays text ("[SEP]" is not a separator).
            let mut t = if p.prefix.is_empty() {
                vocab.tokenize(text.as_bytes(), true, false)
            } else {
                let whole = format!("{}{text}", p.prefix);
                vocab.tokenize(whole.as_bytes(), true, false)
            };
            if t.is_empty() {
                return Err(EngineError::InvalidRequest(format!(
                    "text {row} has no tokens for this model"
                )));
            }
            if t.len() > cap && !p.truncate {
                return Err(EngineError::InvalidRequest(format!(
                    "text {row} has {} tokens, more than the {cap} allowed ({}); set truncate to cut it",
                    t.len(),
                    limit_reason(p.max_length as usize, self.limits.max_tokens_per_text)
                )));
            }
            truncated.push(cap_tokens(&mut t, cap, self.limits.keep_last));
            token_counts.push(t.len() as u32);
            tokens.push(t);
        }
        let out = Embedded {
            dim,
            vectors: vec![0.0; dim * req.texts.len()],
            token_counts,
            truncated,
            pooling: p.pooling.unwrap_or(self.limits.pooling),
            normalized: p.normalize,
        };
        Ok((tokens, out))
    }

    /// One llama.cpp batch: whole rows, oldest request first, up to the token and sequence
    /// budgets; then each sequence is pooled into its request and finished requests answered.
    fn step(&mut self) {
        self.batch.clear();
        let mut seqs: Vec<Seq> = Vec::new();
        let mut n_tokens = 0usize;
        'fill: for (j, a) in self.active.iter_mut().enumerate() {
            while a.next < a.tokens.len() {
                let t = &a.tokens[a.next];
                if n_tokens + t.len() > self.limits.max_batch_tokens
                    || seqs.len() == self.limits.max_seqs
                {
                    break 'fill;
                }
                let seq_id = seqs.len() as i32;
                for (pos, tok) in t.iter().enumerate() {
                    // Room was checked above; llama.cpp's batch holds max_batch_tokens.
                    if let Err(e) = self.batch.add(*tok, pos as i32, &[seq_id], true) {
                        tracing::error!(error = %e, "batch add failed");
                        break 'fill;
                    }
                }
                seqs.push(Seq {
                    job: j,
                    row: a.next,
                    first: n_tokens as i32,
                    len: t.len(),
                });
                n_tokens += t.len();
                a.waiting_tokens -= t.len();
                a.next += 1;
            }
        }
        if seqs.is_empty() {
            return;
        }
        let started = Instant::now();
        let decoded = self.ctx.decode(&mut self.batch);
        if let Err(e) = decoded {
            tracing::error!(error = %e, tokens = n_tokens, "embedding decode failed");
            self.fail_batch(&seqs, &format!("decode failed: {e}"));
            return;
        }
        if let Err(e) = self.collect_all(&seqs, n_tokens) {
            self.fail_batch(&seqs, &e);
            return;
        }
        // Causal models keep KV cells per sequence; every batch starts from an empty cache.
        self.ctx.clear_kv_cache();
        crate::metrics::EMBED_BATCH_SEQUENCES.observe(seqs.len() as f64);
        crate::metrics::EMBED_BATCH_TOKENS.observe(n_tokens as f64);
        crate::metrics::EMBED_TEXTS.inc_by(seqs.len() as u64);
        crate::metrics::EMBED_TOKENS.inc_by(n_tokens as u64);
        tracing::debug!(
            seqs = seqs.len(),
            tokens = n_tokens,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "embedding batch"
        );
        self.answer_finished();
    }

    /// Pools every sequence of the batch into its request's output rows.
    fn collect_all(&mut self, seqs: &[Seq], n_tokens: usize) -> Result<(), String> {
        let dim = self.limits.dim;
        let all = token_vectors(&self.ctx, n_tokens, dim)?;
        let mut rows: Vec<&[f32]> = Vec::new();
        for s in seqs {
            rows.clear();
            rows.extend(all[s.first as usize * dim..][..s.len * dim].chunks_exact(dim));
            let a = &mut self.active[s.job];
            collect(a, s.row, &rows, &mut self.scratch);
        }
        Ok(())
    }

    fn fail_batch(&mut self, seqs: &[Seq], reason: &str) {
        self.ctx.clear_kv_cache();
        let mut jobs: Vec<usize> = seqs.iter().map(|s| s.job).collect();
        jobs.dedup();
        for j in jobs.into_iter().rev() {
            if let Some(a) = self.active.remove(j) {
                let _ = a.reply.send(Err(EngineError::Llama(reason.to_string())));
            }
        }
    }

    fn answer_finished(&mut self) {
        let mut i = 0;
        while i < self.active.len() {
            if self.active[i].done == self.active[i].tokens.len() {
                if let Some(a) = self.active.remove(i) {
                    let _e = a.span.enter();
                    tracing::debug!(rows = a.done, "embedded");
                    let _ = a.reply.send(Ok(a.out));
                }
            } else {
                i += 1;
            }
        }
    }
}

/// Pools one sequence's token vectors into row `row` of its request.
fn collect(a: &mut Active, row: usize, tokens: &[&[f32]], scratch: &mut [f32]) {
    pool(a.out.pooling, tokens, scratch);
    let dim = a.out.dim;
    let v = &mut a.out.vectors[row * dim..(row + 1) * dim];
    v.copy_from_slice(&scratch[..dim]);
    if a.normalize {
        l2_normalize(v);
    }
    a.done += 1;
}

/// The token vectors of the last batch, `n_tokens` rows of `dim`, in batch order.
///
/// Each `embeddings_ith` call synchronises every backend (a CUDA stream sync, microseconds
/// each), so one call per token cost milliseconds per batch on a GPU. llama.cpp keeps the
/// rows of an all-output batch in one buffer in batch order; the first and last rows are
/// read through the API and the span between them is used only when it is exactly that.
fn token_vectors<'c>(
    ctx: &'c LlamaContext<'_>,
    n_tokens: usize,
    dim: usize,
) -> Result<&'c [f32], String> {
    let row = |i: usize| {
        ctx.embeddings_ith(i as i32)
            .map_err(|e| format!("reading token vector {i}: {e}"))
    };
    let (first, last) = (row(0)?, row(n_tokens - 1)?);
    if first.len() < dim || last.len() < dim {
        return Err(format!("token vectors are narrower than {dim}"));
    }
    let span = (n_tokens - 1) * dim;
    if first.as_ptr().wrapping_add(span) != last.as_ptr() {
        return Err("llama.cpp's token vectors are not in batch order".into());
    }
    // SAFETY: `first` and `last` point into llama.cpp's one output buffer (rows of `dim`
    // floats), `last` exactly `n_tokens - 1` rows after `first`, so the whole span is
    // initialised floats of that allocation; it lives until the next decode, which needs
    // `&mut` of the context this borrow holds.
    Ok(unsafe { std::slice::from_raw_parts(first.as_ptr(), span + dim) })
}

fn limit_reason(max_length: usize, per_text: usize) -> String {
    if max_length > 0 && max_length <= per_text {
        format!("max_length {max_length}")
    } else {
        format!("the engine takes {per_text} tokens per text")
    }
}
