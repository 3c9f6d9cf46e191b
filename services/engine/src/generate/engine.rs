//! The generation engine thread and its continuous-batching loop.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::token::LlamaToken;
use tokio::sync::mpsc;

use super::chat::ChatRenderer;
use super::gauges::Gauges;
use super::prompt_cache::{Busy, Plan, PromptCache};
use super::request::{FinishReason, GenEvent, GenRequest, Prompt};
use super::sample::{pick_all, Picked, Picker};
use super::slot::{Phase, Slot};
use super::TokenLogprob;
use crate::model::{self, LoadOptions, ModelMeta};
use crate::queue::{or_report, Jobs, Queue, ReadyTx};
use crate::tools::{ToolChoice, ToolGrammar, ToolParser};
use crate::{init_backend, EngineError, Tokenizer};

/// A request made ready for a sequence: its prompt tokens, its sampler, its tool-call parser.
type Prepared = (Vec<LlamaToken>, Picker, Option<ToolParser>);

/// Events buffered per request before the engine coalesces text for a slow reader.
const EVENTS_PER_REQUEST: usize = 32;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub load: LoadOptions,
    /// Context per sequence (0 = the model's training context, at most 4096).
    pub ctx_per_seq: u32,
    /// Sequences decoded together.
    pub parallel: u32,
    /// Tokens per decode call (prompt chunks + one per generating sequence).
    pub n_batch: u32,
    /// Requests waiting for a free sequence before RESOURCE_EXHAUSTED.
    pub queue: usize,
    /// A Jinja chat template that replaces the model's own (`--chat-template-file`).
    pub chat_template: Option<String>,
}

struct Job {
    req: GenRequest,
    events: mpsc::Sender<GenEvent>,
    submitted: Instant,
}

/// A loaded model with its context, on its own thread.
pub struct GenerationEngine {
    // Dropped before `jobs`: see `Tokenizer`.
    tokenizer: Tokenizer,
    chat: ChatRenderer,
    jobs: Queue<Job>,
    meta: ModelMeta,
    ctx_per_seq: u32,
    parallel: u32,
    load: Arc<Occupancy>,
}

/// What the engine thread holds now, for model info: written after every step.
#[derive(Default)]
struct Occupancy {
    slots_in_use: AtomicU32,
    kv_cells_used: AtomicU64,
}

/// Slots and KV cells of a generation engine.
#[derive(Clone, Copy, Debug)]
pub struct GenOccupancy {
    pub slots_total: u32,
    pub slots_in_use: u32,
    pub ctx_per_seq: u32,
    pub kv_cells_used: u64,
    pub kv_cells_total: u64,
}

struct Ready {
    meta: ModelMeta,
    ctx_per_seq: u32,
    tokenizer: Tokenizer,
    chat: ChatRenderer,
}

impl GenerationEngine {
    /// Loads `path` on a new thread; returns once the model and context are ready.
    pub fn load(path: &Path, opts: GenerateOptions) -> Result<Self, EngineError> {
        if opts.parallel == 0 || opts.n_batch == 0 || opts.queue == 0 {
            return Err(EngineError::InvalidRequest(
                "parallel, batch size and queue must be at least 1".into(),
            ));
        }
        let parallel = opts.parallel;
        let load = Arc::new(Occupancy::default());
        let shared = Arc::clone(&load);
        let (jobs, ready) = Queue::spawn(
            ("gen", "generate"),
            path,
            opts.queue,
            move |path, jobs, ready| run(path, opts, jobs, ready, shared),
        )?;
        Ok(Self {
            tokenizer: ready.tokenizer,
            jobs,
            meta: ready.meta,
            ctx_per_seq: ready.ctx_per_seq,
            parallel,
            load,
            chat: ready.chat,
        })
    }

    /// Renders chats as this engine's requests are rendered, on any thread.
    pub fn chat(&self) -> &ChatRenderer {
        &self.chat
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// Slots and KV cells in use as of the engine's last step.
    pub fn occupancy(&self) -> GenOccupancy {
        GenOccupancy {
            slots_total: self.parallel,
            slots_in_use: self.load.slots_in_use.load(Ordering::Relaxed),
            ctx_per_seq: self.ctx_per_seq,
            kv_cells_used: self.load.kv_cells_used.load(Ordering::Relaxed),
            kv_cells_total: u64::from(self.parallel) * u64::from(self.ctx_per_seq),
        }
    }

    pub fn meta(&self) -> &ModelMeta {
        &self.meta
    }

    pub fn ctx_per_seq(&self) -> u32 {
        self.ctx_per_seq
    }

    /// Queues a request. Never blocks: a full queue is an error the caller turns into
    /// RESOURCE_EXHAUSTED. Events end with exactly one `Done` or `Failed`.
    pub fn submit(&self, req: GenRequest) -> Result<mpsc::Receiver<GenEvent>, EngineError> {
        let (events, rx) = mpsc::channel(EVENTS_PER_REQUEST);
        let job = Job {
            req,
            events,
            submitted: Instant::now(),
        };
        self.jobs.try_submit(job)?;
        Ok(rx)
    }
}

fn run(
    path: &Path,
    opts: GenerateOptions,
    rx: Jobs<Job>,
    ready: ReadyTx<Ready>,
    load: Arc<Occupancy>,
) {
    let Some(model) = or_report(model::load(path, &opts.load), &ready) else {
        return;
    };
    let model = Arc::new(model);
    let meta = model::meta(&model, &opts.load);
    let ctx_per_seq = match opts.ctx_per_seq {
        0 => meta.n_ctx_train.min(4096),
        n => n.min(meta.n_ctx_train),
    };
    let Some(ctx) = or_report(new_context(&model, &opts, ctx_per_seq), &ready) else {
        return;
    };
    let Some(chat) = or_report(
        ChatRenderer::new(Arc::clone(&model), opts.chat_template.as_deref()),
        &ready,
    ) else {
        return;
    };
    let info = Ready {
        meta,
        ctx_per_seq,
        tokenizer: Tokenizer::new(Arc::clone(&model)),
        chat: chat.clone(),
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    let mut engine = Engine {
        model: &model,
        ctx,
        batch: LlamaBatch::new(opts.n_batch as usize, opts.parallel as i32),
        slots: (0..opts.parallel).map(|_| None).collect(),
        n_batch: opts.n_batch as usize,
        ctx_per_seq: ctx_per_seq as usize,
        sampling_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        load,
        gauges: Gauges::new(u64::from(opts.parallel) * u64::from(ctx_per_seq)),
        cache: PromptCache::new(opts.parallel as usize, sliding_window(&model)),
        chat,
    };
    engine.serve(rx);
}

/// The model's sliding attention window, 0 when it has none.
fn sliding_window(model: &LlamaModel) -> usize {
    let arch = model
        .meta_val_str("general.architecture")
        .unwrap_or_default();
    model
        .meta_val_str(&format!("{arch}.attention.sliding_window"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

fn new_context<'m>(
    model: &'m LlamaModel,
    opts: &GenerateOptions,
    ctx_per_seq: u32,
) -> Result<LlamaContext<'m>, EngineError> {
    let n_ctx = ctx_per_seq * opts.parallel;
    let threads = model::threads(model, &opts.load);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(n_ctx))
        .with_n_batch(opts.n_batch)
        .with_n_ubatch(opts.n_batch.min(512))
        .with_n_seq_max(opts.parallel)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_type_k(opts.load.cache_type_k)
        .with_type_v(opts.load.cache_type_v)
        // A KV stream per sequence, not one pool: no sequence may outgrow ctx_per_seq anyway,
        // and each token's attention then spans its own cells only (64 streams of a 1B model
        // on an H200: 5.5k tok/s against 4.3k with one pool).
        .with_kv_unified(false);
    model
        .new_context(init_backend()?.llama(), params)
        .map_err(|e| EngineError::Llama(format!("creating the context: {e}")))
}

struct Engine<'m> {
    model: &'m LlamaModel,
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    slots: Vec<Option<Slot>>,
    n_batch: usize,
    ctx_per_seq: usize,
    /// Threads that may pick tokens at once when many sequences generate.
    sampling_threads: usize,
    load: Arc<Occupancy>,
    gauges: Gauges,
    /// What each sequence's KV cells hold, for reuse by the next requests.
    cache: PromptCache,
    chat: ChatRenderer,
}

impl Engine<'_> {
    fn serve(&mut self, mut rx: Jobs<Job>) {
        loop {
            // Admit waiting requests into free sequences; sleep when there is nothing to do.
            while self.slots.iter().any(Option::is_none) {
                let job = if self.slots.iter().all(Option::is_none) {
                    match rx.wait() {
                        Some(j) => j,
                        None => return,
                    }
                } else {
                    match rx.next() {
                        Some(j) => j,
                        None => break,
                    }
                };
                self.admit(job);
            }
            self.retire();
            self.take_shared_prefixes();
            self.publish_occupancy();
            if self
                .slots
                .iter()
                .flatten()
                .any(|s| !matches!(s.phase, Phase::Draining))
            {
                self.step();
            } else if self.slots.iter().any(Option::is_some) {
                // Only slow readers left: wait a little for them instead of spinning.
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
    }

    fn publish_occupancy(&mut self) {
        let running = self.slots.iter().flatten().count();
        self.load
            .slots_in_use
            .store(running as u32, Ordering::Relaxed);
        self.load
            .kv_cells_used
            .store(self.cache.cells(), Ordering::Relaxed);
        // Cells of idle sequences are only prompt cache, free for the next request to take.
        let held = self
            .slots
            .iter()
            .flatten()
            .map(|s| self.cache.tokens(s.seq as usize).len() as u64)
            .sum();
        self.gauges.publish(running, held);
    }

    fn admit(&mut self, job: Job) {
        let span = job.req.span.clone();
        let _entered = span.enter();
        let started = Instant::now();
        let (prompt, picker, tools) = match self.prepare(&job.req) {
            Ok(p) => p,
            Err(e) => {
                let _ = job.events.try_send(GenEvent::Failed(e));
                return;
            }
        };
        let Some(plan) = self.plan(&prompt) else {
            // Unreachable: admit runs only while a sequence is free.
            let _ = job.events.try_send(GenEvent::Failed(EngineError::Stopped));
            return;
        };
        let Plan { seq, keep, share } = match job.req.cache_prompt {
            true => plan,
            false => Plan {
                keep: 0,
                share: None,
                ..plan
            },
        };
        let keep = self.keep_prefix(seq, keep);
        let max_tokens = match job.req.max_tokens {
            0 => u32::MAX,
            n => n,
        };
        tracing::debug!(
            seq,
            prompt_tokens = prompt.len(),
            cached = keep,
            ?share,
            "sequence admitted"
        );
        crate::metrics::PROMPT_TOKENS.inc_by(prompt.len() as u64);
        crate::metrics::PROMPT_TOKENS_CACHED.inc_by(keep as u64);
        self.slots[seq] = Some(Slot {
            seq: seq as i32,
            prompt,
            n_past: keep,
            cached: keep,
            phase: match share {
                Some(s) => Phase::Waiting {
                    src: s.src,
                    upto: s.upto,
                },
                None => Phase::Prefill,
            },
            picker,
            max_tokens,
            generated: 0,
            deadline: job.req.deadline,
            span: job.req.span.clone(),
            events: job.events,
            utf8: Default::default(),
            stops: crate::text::StopMatcher::new(job.req.stop.clone()),
            tools,
            repetition: job.req.stop_on_repetition.then(Default::default),
            out_text: String::new(),
            out_tokens: Vec::new(),
            out_logprobs: Vec::new(),
            out_calls: Default::default(),
            done: None,
            submitted: job.submitted,
            started,
            first_token: None,
            last_token: None,
        });
    }

    /// Where `prompt` goes: the free sequence with the longest cached prefix, and a busy one
    /// to copy a longer prefix from.
    fn plan(&mut self, prompt: &[LlamaToken]) -> Option<Plan> {
        let free: Vec<usize> = (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .collect();
        let busy: Vec<Busy<'_>> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let s = s.as_ref()?;
                let evaluating = matches!(s.phase, Phase::Prefill | Phase::Waiting { .. })
                    .then_some(&s.prompt[..]);
                Some(Busy { seq: i, evaluating })
            })
            .collect();
        let ctx = &self.ctx;
        self.cache.plan(prompt, &free, &busy, |seq| {
            ctx.kv_cache_seq_pos_min(seq as i32)
        })
    }

    /// Drops `seq`'s cells past its first `keep` tokens; returns how many it keeps (none when
    /// llama.cpp cannot cut this model's memory there, as for recurrent layers).
    fn keep_prefix(&mut self, seq: usize, keep: usize) -> usize {
        if keep < self.cache.tokens(seq).len()
            && self
                .ctx
                .kv_cache_seq_rm(seq as i32, Some(keep as u32), None)
                .is_err()
        {
            self.free_kv(seq);
            return 0;
        }
        self.cache.truncate(seq, keep);
        keep
    }

    /// Sequences waiting for a prefix another sequence evaluates: copy it once it is there
    /// (or take what there is when that sequence stopped), then evaluate the rest.
    fn take_shared_prefixes(&mut self) {
        for dst in 0..self.slots.len() {
            let Some(Slot {
                phase: Phase::Waiting { src, upto },
                ..
            }) = self.slots[dst]
            else {
                continue;
            };
            let src_busy = self.slots[src]
                .as_ref()
                .is_some_and(|s| matches!(s.phase, Phase::Prefill | Phase::Waiting { .. }));
            let slot = self.slots[dst].as_ref().expect("matched above");
            let ctx = &self.ctx;
            let have = self.cache.usable(src, &slot.prompt, &|seq| {
                ctx.kv_cache_seq_pos_min(seq as i32)
            });
            if have < upto && src_busy {
                continue;
            }
            let from = slot.n_past;
            let copied = have >= from + super::prompt_cache::MIN_COPY_TOKENS
                && self.copy_prefix(src, dst, have);
            let slot = self.slots[dst].as_mut().expect("matched above");
            if copied {
                slot.n_past = have;
                slot.cached = have;
                crate::metrics::PROMPT_TOKENS_CACHED.inc_by((have - from) as u64);
            }
            tracing::debug!(parent: &slot.span, seq = dst, src, copied = copied.then_some(have), "shared prefix");
            slot.phase = Phase::Prefill;
        }
    }

    /// Makes `dst` hold `src`'s first `len` tokens. llama.cpp copies a sequence to another
    /// KV stream only whole, so the copy's tail is dropped after.
    fn copy_prefix(&mut self, src: usize, dst: usize, len: usize) -> bool {
        self.free_kv(dst);
        let copied = self
            .ctx
            .kv_cache_seq_cp(src as i32, dst as i32, None, None)
            .is_ok()
            && self
                .ctx
                .kv_cache_seq_rm(dst as i32, Some(len as u32), None)
                .is_ok();
        if copied {
            self.cache.copy(src, dst, len);
        } else {
            self.free_kv(dst);
        }
        copied
    }

    /// Renders and tokenizes the prompt, checks it fits, builds the sampler chain (and the
    /// tool-call grammar and parser when the request has tools).
    fn prepare(&self, req: &GenRequest) -> Result<Prepared, EngineError> {
        let (text, format) = match &req.prompt {
            Prompt::Text(t) => (t.clone(), None),
            Prompt::Chat { messages, template } => {
                self.chat
                    .render_with_tools(messages, template, req.tools.as_ref())?
            }
        };
        // As llama.cpp's server: BOS when the model wants one, special tokens parsed.
        let prompt = self.model.vocab().tokenize(text.as_bytes(), true, true);
        if prompt.is_empty() {
            return Err(EngineError::InvalidRequest("the prompt is empty".into()));
        }
        if prompt.len() >= self.ctx_per_seq {
            return Err(EngineError::InvalidRequest(format!(
                "the prompt has {} tokens but the context holds {} per sequence (at least one must be left to generate)",
                prompt.len(),
                self.ctx_per_seq
            )));
        }
        let mut picker = Picker::new(&req.sampling, self.model.n_vocab());
        if let Some(c) = &req.constraint {
            picker = picker.with_grammar(c.sampler(self.model)?);
        }
        let mut parser = None;
        if let (Some(spec), Some(format)) = (&req.tools, format) {
            if let Some(g) = ToolGrammar::new(spec, format)? {
                picker = picker.with_grammar(g.sampler(self.model)?);
            }
            if spec.choice != ToolChoice::None {
                parser = Some(ToolParser::new(format));
            }
        }
        if let Some(top) = req.logprobs {
            picker = picker.with_logprobs(top as usize);
        }
        picker.remember(&prompt);
        Ok((prompt, picker, parser))
    }

    /// Stops sequences whose client left or whose deadline passed, and frees slots that
    /// delivered everything.
    fn retire(&mut self) {
        for i in 0..self.slots.len() {
            let Some(slot) = &mut self.slots[i] else {
                continue;
            };
            // The cells of a sequence that ends stay: they are the prompt cache.
            let gone = slot.client_gone();
            if gone && !matches!(slot.phase, Phase::Draining) {
                slot.finish(FinishReason::Cancelled);
                tracing::debug!(parent: &slot.span, seq = slot.seq, "client gone; sequence cancelled");
            }
            if !slot.flush() || slot.drained() || gone {
                self.slots[i] = None;
            }
        }
    }

    fn free_kv(&mut self, seq: usize) {
        if let Err(e) = self.ctx.clear_kv_cache_seq(Some(seq as u32), None, None) {
            tracing::warn!(seq, error = %e, "freeing KV cells");
        }
        self.cache.truncate(seq, 0);
    }

    /// One decode call: a token for each generating sequence, then prompt chunks while the
    /// batch has room (a long prompt takes several steps, so others keep generating and a
    /// cancelled prompt stops between chunks).
    fn step(&mut self) {
        self.batch.clear();
        let mut logit_rows: Vec<(usize, i32)> = Vec::new();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            if let Phase::Decode(token) = slot.phase {
                let row = self.batch.n_tokens();
                if self
                    .batch
                    .add(token, slot.n_past as i32, &[slot.seq], true)
                    .is_err()
                {
                    break;
                }
                self.cache.push(i, token);
                slot.n_past += 1;
                logit_rows.push((i, row));
            }
        }
        for (i, slot) in self.slots.iter_mut().enumerate() {
            let Some(slot) = slot else { continue };
            if !matches!(slot.phase, Phase::Prefill) {
                continue;
            }
            let room = self.n_batch.saturating_sub(self.batch.n_tokens() as usize);
            if room == 0 {
                break;
            }
            let end = (slot.n_past + room).min(slot.prompt.len());
            for pos in slot.n_past..end {
                let last = pos + 1 == slot.prompt.len();
                let row = self.batch.n_tokens();
                if self
                    .batch
                    .add(slot.prompt[pos], pos as i32, &[slot.seq], last)
                    .is_err()
                {
                    break;
                }
                if last {
                    logit_rows.push((i, row));
                }
                self.cache.push(i, slot.prompt[pos]);
                slot.n_past = pos + 1;
            }
        }
        if self.batch.n_tokens() == 0 {
            return;
        }
        if let Err(e) = self.ctx.decode(&mut self.batch) {
            // The KV pool is exhausted (or llama.cpp failed): fail the sequences in this batch.
            tracing::error!(error = %e, "decode failed");
            for i in 0..self.slots.len() {
                if let Some(slot) = &self.slots[i] {
                    if !matches!(slot.phase, Phase::Draining) {
                        self.fail(i, EngineError::Llama(format!("decode failed: {e}")));
                        self.free_kv(i);
                    }
                }
            }
            return;
        }
        // One row per sequence; in slot order, so rows pair with the slots as they are walked.
        logit_rows.sort_unstable_by_key(|&(i, _)| i);
        let tokens = {
            let ctx = &self.ctx;
            let mut rows = logit_rows.iter().copied().peekable();
            let work = self
                .slots
                .iter_mut()
                .enumerate()
                .filter_map(|(i, slot)| {
                    let row = rows.next_if(|&(at, _)| at == i)?.1;
                    Some((&mut slot.as_mut()?.picker, ctx.get_logits_ith(row)))
                })
                .collect();
            pick_all(work, self.sampling_threads)
        };
        for ((i, _), picked) in logit_rows.into_iter().zip(tokens) {
            match picked {
                Some(picked) => self.advance(i, picked),
                None => self.fail(
                    i,
                    EngineError::InvalidRequest(
                        "the grammar allows no token at this point of the output".into(),
                    ),
                ),
            }
        }
    }

    /// Ends a sequence with an error.
    fn fail(&mut self, i: usize, e: EngineError) {
        if let Some(slot) = &mut self.slots[i] {
            let _ = slot.events.try_send(GenEvent::Failed(e));
            self.slots[i] = None;
        }
    }

    /// Takes a sequence's new token: timings, text, and whether it ends the sequence.
    fn advance(&mut self, i: usize, picked: Picked) {
        let token = picked.token;
        let model = self.model;
        let ctx_per_seq = self.ctx_per_seq;
        let Some(slot) = self.slots[i].as_mut() else {
            return;
        };
        slot.generated += 1;
        let now = Instant::now();
        match slot.last_token {
            None => {
                slot.first_token = Some(now);
                crate::metrics::TTFT.observe((now - slot.submitted).as_secs_f64());
            }
            Some(last) => crate::metrics::INTER_TOKEN.observe((now - last).as_secs_f64()),
        }
        slot.last_token = Some(now);
        crate::metrics::TOKENS_GENERATED.inc();
        let vocab = model.vocab();
        let finish = if vocab.is_eog(token) {
            Some(FinishReason::Stop)
        } else {
            // A format's special tokens (`[TOOL_CALLS]`, `<|python_tag|>`) are its call
            // syntax: the tool-call parser reads them.
            let bytes = vocab.token_to_piece(token, slot.tools.is_some(), None);
            let logprob = picked.logprobs.map(|(logprob, top)| {
                let piece = |id: i32| vocab.token_to_piece(LlamaToken(id), true, None);
                TokenLogprob {
                    id: token.0,
                    bytes: piece(token.0),
                    logprob,
                    top: top
                        .into_iter()
                        .map(|(id, lp)| (id, piece(id), lp))
                        .collect(),
                }
            });
            if slot.push_token(token.0, &bytes, logprob) {
                Some(FinishReason::StopSequence)
            } else if slot.looping(token.0) {
                Some(FinishReason::Repetition)
            } else if slot.generated >= slot.max_tokens || slot.n_past + 1 >= ctx_per_seq {
                Some(FinishReason::Length)
            } else {
                None
            }
        };
        match finish {
            Some(reason) => slot.finish(reason),
            None => slot.phase = Phase::Decode(token),
        }
    }
}
