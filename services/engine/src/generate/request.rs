//! What a generation request says and what comes back.

use std::time::Instant;

#[derive(Clone, Debug, Default)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// An assistant message's calls (arguments: a JSON object as text).
    pub tool_calls: Vec<crate::tools::ToolCall>,
    /// A tool message: the call it answers and the tool's name (empty = not given).
    pub tool_call_id: String,
    pub name: String,
}

#[derive(Clone, Debug)]
pub enum Prompt {
    /// Tokenized as is, with BOS when the model asks for one.
    Text(String),
    /// Rendered with a chat template.
    Chat {
        messages: Vec<ChatMessage>,
        template: TemplateChoice,
    },
}

/// Which chat template renders a conversation.
#[derive(Clone, Debug, Default)]
pub enum TemplateChoice {
    /// The engine's template file if it has one, else the model's own (Jinja, from the GGUF).
    #[default]
    Served,
    /// A llama.cpp built-in template, by name (`chatml`, `gemma`, `llama3`, ...).
    Builtin(String),
    /// A Jinja template sent with the request.
    Jinja(String),
}

/// Sampling settings, already validated. llama.cpp's defaults where a request is silent.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f32,
    /// 0 = off.
    pub top_k: i32,
    /// 1 = off.
    pub top_p: f32,
    /// 0 = off.
    pub min_p: f32,
    /// 1 = off.
    pub repeat_penalty: f32,
    pub repeat_last_n: i32,
    pub seed: u32,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            repeat_last_n: 64,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct GenRequest {
    pub prompt: Prompt,
    pub sampling: Sampling,
    /// 0 = until the sequence's context is full.
    pub max_tokens: u32,
    pub stop: Vec<String>,
    /// Structured output: the text must match this schema or grammar.
    pub constraint: Option<super::Constraint>,
    /// Report each token's log-probability, with this many alternatives.
    pub logprobs: Option<u32>,
    /// Reuse cached KV cells of the prompt's prefix (the prompt cache).
    pub cache_prompt: bool,
    /// Functions the model may call (chat prompts only).
    pub tools: Option<crate::tools::ToolSpec>,
    /// End a generation that loops on the same tokens (FinishReason::Repetition).
    pub stop_on_repetition: bool,
    /// Past this instant the sequence stops (gRPC deadline).
    pub deadline: Option<Instant>,
    /// The request's span, entered on the engine thread while it works for this request.
    pub span: tracing::Span,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    /// The model produced an end-of-generation token.
    Stop,
    Length,
    StopSequence,
    Cancelled,
    /// The answer is tool calls (`GenDone::tool_calls`).
    ToolCalls,
    /// The same tokens kept repeating (`stop_on_repetition`).
    Repetition,
}

#[derive(Clone, Debug)]
pub struct GenDone {
    pub finish: FinishReason,
    pub prompt_tokens: u32,
    /// Prompt tokens whose KV cells were reused, not evaluated.
    pub cached_prompt_tokens: u32,
    pub completion_tokens: u32,
    pub queue_ms: f64,
    pub ttft_ms: f64,
    pub prompt_ms: f64,
    pub decode_ms: f64,
    /// The answer's tool calls, whole.
    pub tool_calls: Vec<crate::tools::ToolCall>,
}

impl GenDone {
    /// Tokens per second after the first token.
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.decode_ms > 0.0 && self.completion_tokens > 1 {
            (self.completion_tokens - 1) as f64 * 1000.0 / self.decode_ms
        } else {
            0.0
        }
    }
}

#[derive(Clone, Debug)]
pub enum GenEvent {
    Chunk {
        text: String,
        tokens: Vec<i32>,
        /// One per token when the request asked for log-probabilities, else empty.
        logprobs: Vec<super::TokenLogprob>,
    },
    /// Part of a tool call, as it forms.
    ToolCall(crate::tools::ToolCallDelta),
    Done(GenDone),
    Failed(crate::EngineError),
}
