//! The packing loop: rows of every admitted request go into llama.cpp batches in arrival
//! order, as many sequences per batch as the token budget allows, so small requests share a
//! batch and a large one fills several.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::oneshot;

use super::layout::{output_positions, Layout, Part, Shape};
use super::pairs::{pair_error, PairFormat};
use super::request::{EmbedRequest, Embedded, Pooling, RerankRequest};
use super::vectors::{cap_tokens, l2_normalize, pool};
use crate::queue::SharedJobs;
use crate::EngineError;

pub(super) struct Job {
    work: Work,
    reply: oneshot::Sender<Result<Embedded, EngineError>>,
}

/// What a job asks: texts to embed, or documents to score against a query.
pub(super) enum Work {
    Embed(EmbedRequest),
    Rerank(RerankRequest),
}

impl Work {
    fn span(&self) -> &tracing::Span {
        match self {
            Work::Embed(r) => &r.span,
            Work::Rerank(r) => &r.span,
        }
    }

    fn deadline(&self) -> Option<Instant> {
        match self {
            Work::Embed(r) => r.deadline,
            Work::Rerank(r) => r.deadline,
        }
    }
}

impl Job {
    pub fn new(work: Work) -> (Self, oneshot::Receiver<Result<Embedded, EngineError>>) {
        let (reply, rx) = oneshot::channel();
        (Self { work, reply }, rx)
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
    /// How a reranker (pooling rank) joins a query and a document; `None` for embedders.
    pub pairs: Option<Arc<PairFormat>>,
    /// Whether only the token rows a sequence's pooling reads are output (its last for last
    /// pooling): llama.cpp then skips the rest of the last layer for the others and copies
    /// one row per sequence to the host, not one per token (8 MB per 2048-token batch of a
    /// 1024-wide model). Otherwise every token is output.
    pub select_outputs: bool,
    /// Every batch padded to one shape (see [`super::layout`]).
    pub pad: bool,
}

impl Limits {
    fn shape(&self) -> Shape {
        Shape {
            tokens: self.max_batch_tokens,
            seqs: self.max_seqs,
            select: self.select_outputs,
            pad: self.pad,
        }
    }
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
    out: Embedded,
}

impl Active {
    fn abandoned(&self) -> bool {
        self.reply.is_closed() || self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// Where one sequence of the current batch came from, and where its output rows are.
struct Seq {
    job: usize,
    row: usize,
    /// Its first output row among the batch's outputs, and how many it has.
    out_first: usize,
    out_len: usize,
}

/// The padding sequence's token: any id in the vocabulary does, as its rows are never read.
const PAD_TOKEN: LlamaToken = LlamaToken(0);

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
        let Job { work, reply } = job;
        let _entered = work.span().enter();
        let started = Instant::now();
        let prepared = match (&work, &self.limits.pairs) {
            (Work::Embed(req), None) => self.prepare(req),
            (Work::Rerank(req), Some(pairs)) => self.prepare_pairs(req, pairs),
            (Work::Embed(_), Some(_)) => Err(EngineError::Unsupported(
                "the model is a reranker (pooling rank): it scores query and document pairs \
                 with Rerank, it does not embed"
                    .into(),
            )),
            (Work::Rerank(_), None) => Err(EngineError::Unsupported(format!(
                "the model is not a reranker: its pooling is {}, not rank; rerank with a \
                 cross-encoder GGUF",
                self.limits.pooling.name()
            ))),
        };
        match prepared {
            Ok((tokens, out)) => {
                let waiting_tokens = tokens.iter().map(Vec::len).sum();
                tracing::debug!(
                    rows = tokens.len(),
                    tokens = waiting_tokens,
                    ms = started.elapsed().as_secs_f64() * 1000.0,
                    "admitted"
                );
                drop(_entered);
                self.active.push_back(Active {
                    reply,
                    deadline: work.deadline(),
                    span: work.span().clone(),
                    tokens,
                    next: 0,
                    waiting_tokens,
                    done: 0,
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

    /// Each document joined with the query as the model's rerank form says; a pair too long
    /// for one sequence has its document cut (when the request allows) or rejects the request.
    fn prepare_pairs(
        &self,
        req: &RerankRequest,
        pairs: &PairFormat,
    ) -> Result<(Vec<Vec<LlamaToken>>, Embedded), EngineError> {
        if req.documents.is_empty() {
            return Err(EngineError::InvalidRequest("no documents to rerank".into()));
        }
        let query_tokens = self
            .model
            .vocab()
            .tokenize(req.query.as_bytes(), false, false);
        let cap = self.limits.max_tokens_per_text;
        let n = req.documents.len();
        let (mut tokens, mut token_counts, mut truncated) = (
            Vec::with_capacity(n),
            Vec::with_capacity(n),
            Vec::with_capacity(n),
        );
        for (row, doc) in req.documents.iter().enumerate() {
            let (t, cut) = pairs
                .tokens(
                    self.model,
                    (&req.query, &query_tokens),
                    doc,
                    cap,
                    req.truncate,
                )
                .map_err(|e| pair_error(row, e))?;
            token_counts.push(t.len() as u32);
            truncated.push(cut);
            tokens.push(t);
        }
        let dim = self.limits.dim;
        let out = Embedded {
            dim,
            vectors: vec![0.0; dim * n],
            token_counts,
            truncated,
            pooling: Pooling::Rank,
            normalized: false,
        };
        Ok((tokens, out))
    }

    /// One llama.cpp batch: whole rows, oldest request first, up to the token and sequence
    /// budgets; then each sequence is pooled into its request and finished requests answered.
    fn step(&mut self) {
        let shape = self.limits.shape();
        let mut picked: Vec<(usize, usize)> = Vec::new();
        let mut parts: Vec<Part> = Vec::new();
        let mut n_tokens = 0usize;
        'fill: for (j, a) in self.active.iter_mut().enumerate() {
            while a.next < a.tokens.len() {
                let len = a.tokens[a.next].len();
                if n_tokens + len > shape.tokens || parts.len() == shape.real_seqs() {
                    break 'fill;
                }
                picked.push((j, a.next));
                parts.push(Part {
                    len,
                    needed: output_positions(a.out.pooling, len, shape.select),
                });
                n_tokens += len;
                a.waiting_tokens -= len;
                a.next += 1;
            }
        }
        if parts.is_empty() {
            return;
        }
        let layout = Layout::new(&parts, &shape);
        // Batch indices of the first and last output token.
        let (mut first_out, mut last_out) = (None, 0usize);
        let mut flag = |index: usize, output: bool| {
            if output {
                first_out.get_or_insert(index);
                last_out = index;
            }
            output
        };
        let seqs: Vec<Seq> = picked
            .iter()
            .enumerate()
            .map(|(i, &(job, row))| Seq {
                job,
                row,
                out_first: layout.out_first[i],
                out_len: parts[i].needed.len(),
            })
            .collect();
        self.batch.clear();
        // The real sequences, then the padding sequence (ids 0.., then parts.len()).
        let real = seqs.iter().enumerate().flat_map(|(i, s)| {
            let (parts, layout) = (&parts, &layout);
            self.active[s.job].tokens[s.row]
                .iter()
                .enumerate()
                .map(move |(pos, &tok)| (tok, pos, i, layout.is_output(parts, i, pos)))
        });
        let pad =
            (0..layout.pad_len).map(|pos| (PAD_TOKEN, pos, parts.len(), pos < layout.pad_outputs));
        let mut added = Ok(());
        for (index, (tok, pos, seq, output)) in real.chain(pad).enumerate() {
            // Room was checked above; llama.cpp's batch holds max_batch_tokens.
            added = self
                .batch
                .add(tok, pos as i32, &[seq as i32], flag(index, output));
            if added.is_err() {
                break;
            }
        }
        if let Err(e) = added {
            tracing::error!(error = %e, "batch add failed");
            return self.fail_batch(&seqs, "the batch could not be built");
        }
        let outputs = (first_out.unwrap_or(0), last_out, layout.n_outputs);
        let started = Instant::now();
        let decoded = self.ctx.decode(&mut self.batch);
        if let Err(e) = decoded {
            tracing::error!(error = %e, tokens = n_tokens, "embedding decode failed");
            self.fail_batch(&seqs, &format!("decode failed: {e}"));
            return;
        }
        let decoded_at = Instant::now();
        if let Err(e) = self.collect_all(&seqs, outputs) {
            self.fail_batch(&seqs, &e);
            return;
        }
        // Causal models keep KV cells per sequence; every batch starts from an empty cache.
        self.ctx.clear_kv_cache();
        crate::metrics::EMBED_BATCH_SEQUENCES.observe(seqs.len() as f64);
        crate::metrics::EMBED_BATCH_TOKENS.observe(n_tokens as f64);
        crate::metrics::EMBED_TEXTS.inc_by(seqs.len() as u64);
        crate::metrics::EMBED_TOKENS.inc_by(n_tokens as u64);
        // Where a batch's time goes: llama.cpp's decode (on a GPU: launching and waiting
        // for the kernels), then reading and pooling the output rows.
        tracing::debug!(
            seqs = seqs.len(),
            tokens = n_tokens,
            outputs = layout.n_outputs,
            padding = layout.pad_len,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            collect_ms = decoded_at.elapsed().as_secs_f64() * 1000.0,
            "embedding batch"
        );
        self.answer_finished();
    }

    /// Pools every sequence of the batch into its request's output rows; `outputs` are the
    /// batch indices of the first and last output token and the number of outputs.
    fn collect_all(&mut self, seqs: &[Seq], outputs: (usize, usize, usize)) -> Result<(), String> {
        let dim = self.limits.dim;
        if self.limits.pairs.is_some() {
            // llama.cpp ran the classification head: one row of scores per sequence.
            for (seq_id, s) in seqs.iter().enumerate() {
                let scores = self
                    .ctx
                    .embeddings_seq_ith(seq_id as i32)
                    .map_err(|e| format!("reading the scores of sequence {seq_id}: {e}"))?;
                if scores.len() < dim {
                    return Err(format!("the model gave {} scores, not {dim}", scores.len()));
                }
                store(&mut self.active[s.job], s.row, &scores[..dim]);
            }
            return Ok(());
        }
        let all = token_vectors(&self.ctx, outputs, dim)?;
        let mut rows: Vec<&[f32]> = Vec::new();
        for s in seqs {
            rows.clear();
            rows.extend(all[s.out_first * dim..][..s.out_len * dim].chunks_exact(dim));
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
    store(a, row, scratch);
}

/// Writes one finished row (a pooled vector, or a reranker's scores) into its request.
fn store(a: &mut Active, row: usize, v: &[f32]) {
    let dim = a.out.dim;
    let dst = &mut a.out.vectors[row * dim..(row + 1) * dim];
    dst.copy_from_slice(&v[..dim]);
    if a.out.normalized {
        l2_normalize(dst);
    }
    a.done += 1;
}

/// The output token vectors of the last batch, `n_outputs` rows of `dim` in batch order;
/// `first` and `last` are the batch indices of the first and last output token.
///
/// Each `embeddings_ith` call synchronises every backend (a CUDA stream sync, microseconds
/// each), so one call per token cost milliseconds per batch on a GPU. llama.cpp keeps the
/// output rows of a batch in one buffer in batch order; the first and last rows are read
/// through the API and the span between them is used only when it is exactly that.
fn token_vectors<'c>(
    ctx: &'c LlamaContext<'_>,
    (first, last, n_outputs): (usize, usize, usize),
    dim: usize,
) -> Result<&'c [f32], String> {
    let row = |i: usize| {
        ctx.embeddings_ith(i as i32)
            .map_err(|e| format!("reading token vector {i}: {e}"))
    };
    let (first, last) = (row(first)?, row(last)?);
    if first.len() < dim || last.len() < dim {
        return Err(format!("token vectors are narrower than {dim}"));
    }
    let span = (n_outputs - 1) * dim;
    if first.as_ptr().wrapping_add(span) != last.as_ptr() {
        return Err("llama.cpp's token vectors are not in batch order".into());
    }
    // SAFETY: `first` and `last` point into llama.cpp's one output buffer (rows of `dim`
    // floats), `last` exactly `n_outputs - 1` rows after `first`, so the whole span is
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
