//! The agent loop: generate; when the answer is tool calls, run them (concurrently), add
//! their results as tool messages with the call ids, and generate again, until a final
//! answer or the step limit. The session holds the whole conversation, so the generator
//! stays stateless.

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use llama_agent_proto::generator::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::mcp::{McpTools, ToolOutcome};
use crate::session::{Session, ToolCall, ToolChoice};
use crate::{AgentError, GeneratorClient};

/// What the loop reports as it goes, in order.
#[derive(Clone, Debug, PartialEq)]
pub enum AgentEvent {
    /// Answer text as it streams.
    Text(String),
    /// A call the model made, about to run.
    ToolCall(ToolCall),
    /// A call's result (each as it completes; concurrent calls may finish in any order).
    ToolResult {
        id: String,
        name: String,
        outcome: ToolOutcome,
    },
}

/// How a task ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// The generator's reason for the final answer (stop, length, stop sequence, repetition).
    Generator(pb::FinishReason),
    /// The step limit was reached while the model was still calling tools.
    MaxSteps,
    /// The caller cancelled (Ctrl-C).
    Cancelled,
}

impl Finish {
    /// `STOP`, `LENGTH`, `STOP_SEQUENCE`, `REPETITION`, `MAX_STEPS`, `CANCELLED`.
    pub fn name(self) -> &'static str {
        match self {
            Finish::Generator(r) => r.as_str_name().trim_start_matches("FINISH_REASON_"),
            Finish::MaxSteps => "MAX_STEPS",
            Finish::Cancelled => "CANCELLED",
        }
    }
}

#[derive(Clone, Debug)]
pub struct AgentOutcome {
    /// The final answer's text (what was generated so far when cancelled).
    pub text: String,
    pub finish: Finish,
    /// Generations made.
    pub steps: u32,
    /// Tokens over all steps.
    pub prompt_tokens: u64,
    pub cached_prompt_tokens: u64,
    pub completion_tokens: u64,
}

pub struct Agent<'a> {
    pub generator: &'a GeneratorClient,
    pub tools: Option<&'a McpTools>,
    /// Generations per task at most.
    pub max_steps: u32,
}

/// One generation's answer.
struct Answer {
    text: String,
    calls: Vec<ToolCall>,
    finish: pb::FinishReason,
    usage: pb::Usage,
    cancelled: bool,
}

impl Agent<'_> {
    /// Answers the session's last user message, appending the assistant's messages and
    /// tool results to it. The session's tool choice holds for the first step; after tools
    /// ran, `required` becomes `auto` (the model may call more, or answer) and a named
    /// function becomes `none` (it was called: the model answers with its result), so a
    /// forced choice does not call tools forever.
    pub async fn run(
        &self,
        session: &mut Session,
        cancel: &CancellationToken,
        sink: &mut dyn FnMut(AgentEvent),
    ) -> Result<AgentOutcome, AgentError> {
        let mut choice = session.tool_choice.clone();
        let mut out = AgentOutcome {
            text: String::new(),
            finish: Finish::MaxSteps,
            steps: 0,
            prompt_tokens: 0,
            cached_prompt_tokens: 0,
            completion_tokens: 0,
        };
        while out.steps < self.max_steps {
            out.steps += 1;
            let answer = self.generate(session, &choice, cancel, sink).await?;
            out.prompt_tokens += u64::from(answer.usage.prompt_tokens);
            out.cached_prompt_tokens += u64::from(answer.usage.cached_prompt_tokens);
            out.completion_tokens += u64::from(answer.usage.completion_tokens);
            if answer.cancelled {
                // What the user saw stays in the history; calls half written do not.
                session.push_assistant(answer.text.clone(), Vec::new());
                out.text = answer.text;
                out.finish = Finish::Cancelled;
                return Ok(out);
            }
            if answer.calls.is_empty() {
                session.push_assistant(answer.text.clone(), Vec::new());
                out.text = answer.text;
                out.finish = Finish::Generator(answer.finish);
                return Ok(out);
            }
            session.push_assistant(answer.text, answer.calls.clone());
            let results = self.run_calls(&answer.calls, cancel, sink).await;
            for (call, outcome) in answer.calls.iter().zip(&results) {
                session.push_tool(&call.id, &call.name, &outcome.content);
            }
            if cancel.is_cancelled() {
                out.finish = Finish::Cancelled;
                return Ok(out);
            }
            choice = match choice {
                ToolChoice::Required => ToolChoice::Auto,
                ToolChoice::Function(_) => ToolChoice::None,
                other => other,
            };
        }
        Ok(out)
    }

    /// One streamed generation: text as it comes, calls assembled from their deltas.
    async fn generate(
        &self,
        session: &Session,
        choice: &ToolChoice,
        cancel: &CancellationToken,
        sink: &mut dyn FnMut(AgentEvent),
    ) -> Result<Answer, AgentError> {
        let request = session.request(choice);
        let mut answer = Answer {
            text: String::new(),
            calls: Vec::new(),
            finish: pb::FinishReason::Unspecified,
            usage: pb::Usage::default(),
            cancelled: false,
        };
        let stream = tokio::select! {
            s = self.generator.generate_stream(request, None) => s?,
            _ = cancel.cancelled() => {
                answer.cancelled = true;
                return Ok(answer);
            }
        };
        let mut stream = std::pin::pin!(stream);
        let mut calls: Vec<pb::ToolCall> = Vec::new();
        loop {
            // Dropping the stream on cancel cancels the generation on the server.
            let msg = tokio::select! {
                m = stream.next() => m,
                _ = cancel.cancelled() => {
                    answer.cancelled = true;
                    return Ok(answer);
                }
            };
            let Some(msg) = msg else {
                return Err(AgentError::Generate(crate::ClientError::Incomplete));
            };
            match msg?.event {
                Some(pb::generate_response::Event::Chunk(c)) if !c.text.is_empty() => {
                    answer.text.push_str(&c.text);
                    sink(AgentEvent::Text(c.text));
                }
                Some(pb::generate_response::Event::ToolCall(d)) => {
                    crate::generator::add_tool_call_delta(&mut calls, d)
                }
                Some(pb::generate_response::Event::Done(d)) => {
                    answer.finish = pb::FinishReason::try_from(d.finish_reason)
                        .unwrap_or(pb::FinishReason::Unspecified);
                    answer.usage = d.usage.unwrap_or_default();
                    if answer.finish == pb::FinishReason::ToolCalls {
                        answer.calls = calls
                            .into_iter()
                            .enumerate()
                            .map(|(i, c)| ToolCall {
                                id: if c.id.is_empty() {
                                    format!("call_{i}")
                                } else {
                                    c.id
                                },
                                name: c.name,
                                // Kept as text when it is not JSON: the tool result says so.
                                arguments: serde_json::from_str(&c.arguments_json)
                                    .unwrap_or(serde_json::Value::String(c.arguments_json)),
                            })
                            .collect();
                    }
                    return Ok(answer);
                }
                _ => {}
            }
        }
    }

    /// Runs the calls concurrently; results in call order, each reported as it completes.
    async fn run_calls(
        &self,
        calls: &[ToolCall],
        cancel: &CancellationToken,
        sink: &mut dyn FnMut(AgentEvent),
    ) -> Vec<ToolOutcome> {
        for call in calls {
            sink(AgentEvent::ToolCall(call.clone()));
        }
        let mut running: FuturesUnordered<_> = calls
            .iter()
            .enumerate()
            .map(|(i, call)| async move { (i, self.call(call).await) })
            .collect();
        let mut results: Vec<Option<ToolOutcome>> = vec![None; calls.len()];
        loop {
            let next = tokio::select! {
                n = running.next() => n,
                _ = cancel.cancelled() => break,
            };
            let Some((i, outcome)) = next else { break };
            sink(AgentEvent::ToolResult {
                id: calls[i].id.clone(),
                name: calls[i].name.clone(),
                outcome: outcome.clone(),
            });
            results[i] = Some(outcome);
        }
        // Every call gets an answer, so the conversation stays well formed when cancelled.
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| ToolOutcome::error("cancelled by the user")))
            .collect()
    }

    async fn call(&self, call: &ToolCall) -> ToolOutcome {
        if let serde_json::Value::String(text) = &call.arguments {
            return ToolOutcome::error(format!(
                "the arguments of `{}` are not JSON: {}",
                crate::mcp::shown(&call.name, 64),
                crate::mcp::shown(text, 200)
            ));
        }
        match self.tools {
            Some(tools) => tools.call(&call.name, &call.arguments).await,
            None => ToolOutcome::error(format!(
                "there is no tool named `{}`: no tools are connected",
                crate::mcp::shown(&call.name, 64)
            )),
        }
    }
}
