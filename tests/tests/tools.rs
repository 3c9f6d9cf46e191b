//! Tool calls through the generator's gRPC on the real Gemma 3 270M, with the real tool-use
//! chat templates of four model families (tests/fixtures/chat-templates). Gemma is a base
//! model: the calls come from the grammar (`required` or a named function), and every call
//! must name a tool and carry arguments valid against its schema.

use futures::StreamExt;
use llama_agent_client::proto::generator::v1 as pb;
use llama_agent_client::ClientError;
use llama_agent_tests::support::{repo_root, venv_bin, GeneratorStack, GEMMA_REPO};
use llama_generator::GeneratorConfig;
use serde_json::{json, Value};
use tonic::Code;

fn config() -> GeneratorConfig {
    GeneratorConfig {
        threads: Some(2),
        parallel: 2,
        ctx_size: 2048,
        queue_depth: 8,
        ..Default::default()
    }
}

fn template(name: &str) -> String {
    if name == "generic" {
        // A template that shows the tools but no call syntax of its own (as many do).
        return "{% if tools %}<|system|>Tools: {{ tools | tojson }}\n{% endif %}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}".into();
    }
    std::fs::read_to_string(repo_root().join(format!("tests/fixtures/chat-templates/{name}.jinja")))
        .unwrap()
}

/// Bounded strings: a base model left to write a free string may write until max_tokens.
fn weather_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "location": {"type": "string", "maxLength": 24},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}
        },
        "required": ["location", "unit"]
    })
}

fn tools() -> Vec<pb::Tool> {
    vec![
        pb::Tool {
            name: "get_current_weather".into(),
            description: "The weather in a city now".into(),
            parameters_json: weather_schema().to_string(),
        },
        pb::Tool {
            name: "get_time".into(),
            description: "The time in a timezone".into(),
            parameters_json: json!({
                "type": "object",
                "properties": {"timezone": {"type": "string", "enum": ["UTC", "Europe/Paris"]}},
                "required": ["timezone"]
            })
            .to_string(),
        },
    ]
}

fn user(text: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: "user".into(),
        content: text.into(),
        ..Default::default()
    }
}

fn choice(mode: pb::tool_choice::Mode, function: &str) -> Option<pb::ToolChoice> {
    Some(pb::ToolChoice {
        mode: mode as i32,
        function: function.into(),
    })
}

fn request(template: &str, messages: Vec<pb::ChatMessage>) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: GEMMA_REPO.into(),
        input: Some(pb::generate_request::Input::Chat(pb::ChatMessages {
            messages,
        })),
        chat_template_jinja: template.into(),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: 200,
        tools: tools(),
        ..Default::default()
    }
}

/// What one stream said: its text, each call's deltas joined (name, id, arguments), the end.
struct Streamed {
    text: String,
    calls: Vec<(String, String, String)>,
    done: pb::GenerateDone,
}

async fn stream(stack: &GeneratorStack, req: pb::GenerateRequest) -> Result<Streamed, ClientError> {
    let mut s = std::pin::pin!(stack.generator.generate_stream(req, None).await?);
    let mut out = Streamed {
        text: String::new(),
        calls: Vec::new(),
        done: Default::default(),
    };
    while let Some(msg) = s.next().await {
        match msg?.event {
            Some(pb::generate_response::Event::Chunk(c)) => out.text.push_str(&c.text),
            Some(pb::generate_response::Event::ToolCall(d)) => {
                let i = d.index as usize;
                if i == out.calls.len() {
                    assert!(
                        !d.id.is_empty() && !d.name.is_empty(),
                        "a call opens with id and name"
                    );
                    out.calls
                        .push((d.name.clone(), d.id.clone(), String::new()));
                }
                out.calls[i].2.push_str(&d.arguments_delta);
            }
            Some(pb::generate_response::Event::Done(d)) => {
                out.done = d;
                return Ok(out);
            }
            None => {}
        }
    }
    panic!("the stream ended without its final message")
}

/// Every call names a tool and its arguments hold what that tool's schema says; the
/// streamed deltas are the final message's calls.
fn assert_valid(s: &Streamed, what: &str) {
    assert_eq!(
        pb::FinishReason::try_from(s.done.finish_reason),
        Ok(pb::FinishReason::ToolCalls),
        "{what}: text {:?}",
        s.text
    );
    assert!(!s.done.tool_calls.is_empty(), "{what}");
    assert_eq!(s.done.tool_calls.len(), s.calls.len(), "{what}");
    for (call, (name, id, args)) in s.done.tool_calls.iter().zip(&s.calls) {
        assert_eq!((&call.name, &call.id), (name, id), "{what}");
        assert_eq!(call.arguments_json.trim(), args.trim(), "{what}");
        let a: Value = serde_json::from_str(&call.arguments_json)
            .unwrap_or_else(|e| panic!("{what}: arguments {:?}: {e}", call.arguments_json));
        match call.name.as_str() {
            "get_current_weather" => {
                let loc = a["location"].as_str().expect("location is a string");
                assert!(loc.chars().count() <= 24, "{what}: {loc:?}");
                assert!(["celsius", "fahrenheit"].contains(&a["unit"].as_str().unwrap()));
                assert_eq!(a.as_object().unwrap().len(), 2, "{what}: {a}");
            }
            "get_time" => {
                assert!(["UTC", "Europe/Paris"].contains(&a["timezone"].as_str().unwrap()))
            }
            other => panic!("{what}: a call of {other}, which is not a tool"),
        }
    }
    for syntax in [
        "<tool_call>",
        "[TOOL_CALLS]",
        "\"arguments\"",
        "\"parameters\"",
    ] {
        assert!(
            !s.text.contains(syntax),
            "{what}: call syntax in the text {:?}",
            s.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_calls_are_valid_in_every_format() {
    let stack = GeneratorStack::start(config()).await.unwrap();
    // Qwen 2.5 (Hermes <tool_call>), Llama 3.1 (bare JSON with "parameters"), Mistral Nemo
    // ([TOOL_CALLS] list), and a template that renders tools with no call syntax (the
    // generic JSON answer).
    for name in ["qwen2.5", "llama3.1", "mistral", "generic"] {
        let mut req = request(&template(name), vec![user("What is the weather in Paris?")]);
        req.tool_choice = choice(pb::tool_choice::Mode::Required, "");
        let s = stream(&stack, req).await.unwrap();
        assert_valid(&s, name);
        assert_eq!(
            s.done.tool_calls.len(),
            1,
            "{name}: one call unless parallel calls are asked for"
        );
        if name == "mistral" {
            assert!(s
                .done
                .tool_calls
                .iter()
                .all(|c| c.id.len() == 9 && c.id.chars().all(|c| c.is_ascii_alphanumeric())));
        } else {
            assert!(s.done.tool_calls.iter().all(|c| c.id.starts_with("call_")));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_are_bounded() {
    let stack = GeneratorStack::start(config()).await.unwrap();
    // A base model asked for several calls keeps opening them: the grammar ends the answer
    // after MAX_PARALLEL_CALLS.
    for name in ["qwen2.5", "mistral"] {
        let mut req = request(&template(name), vec![user("Weather in Paris and in Oslo?")]);
        req.tool_choice = choice(pb::tool_choice::Mode::Required, "");
        req.parallel_tool_calls = Some(true);
        req.max_tokens = 800;
        let s = stream(&stack, req).await.unwrap();
        assert_valid(&s, name);
        let n = s.done.tool_calls.len();
        assert!(
            (2..=llama_agent_engine::tools::MAX_PARALLEL_CALLS).contains(&n),
            "{name}: {n} calls"
        );
        let ids: std::collections::HashSet<_> = s.done.tool_calls.iter().map(|c| &c.id).collect();
        assert_eq!(ids.len(), n, "{name}: ids are unique");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_named_function_one_call_and_the_round_trip() {
    let stack = GeneratorStack::start(config()).await.unwrap();
    let qwen = template("qwen2.5");
    let mut req = request(&qwen, vec![user("What time is it in Paris?")]);
    req.tool_choice = choice(pb::tool_choice::Mode::Function, "get_time");
    let s = stream(&stack, req).await.unwrap();
    assert_valid(&s, "named");
    assert_eq!(s.done.tool_calls.len(), 1);
    assert_eq!(s.done.tool_calls[0].name, "get_time");

    // The call and its result go back in the conversation, as an agent loop sends them;
    // the template renders both, and the next turn may answer in text.
    let call = s.done.tool_calls[0].clone();
    let messages = vec![
        user("What time is it in Paris?"),
        pb::ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![call.clone()],
            ..Default::default()
        },
        pb::ChatMessage {
            role: "tool".into(),
            content: "{\"time\": \"12:00\"}".into(),
            tool_call_id: call.id.clone(),
            name: call.name.clone(),
            ..Default::default()
        },
    ];
    let rendered = stack
        .generator
        .apply_chat_template(pb::ApplyChatTemplateRequest {
            model: GEMMA_REPO.into(),
            chat: Some(pb::ChatMessages {
                messages: messages.clone(),
            }),
            chat_template_jinja: qwen.clone(),
            tools: tools(),
            ..Default::default()
        })
        .await
        .unwrap();
    let args: Value = serde_json::from_str(&call.arguments_json).unwrap();
    assert!(
        rendered.prompt.contains(&format!(
            "<tool_call>\n{{\"name\": \"get_time\", \"arguments\": {{\"timezone\": {}}}}}\n</tool_call>",
            args["timezone"]
        )),
        "{}",
        rendered.prompt
    );
    assert!(rendered
        .prompt
        .contains("<tool_response>\n{\"time\": \"12:00\"}\n</tool_response>"));
    let mut next = request(&qwen, messages);
    next.tool_choice = choice(pb::tool_choice::Mode::None, "");
    next.max_tokens = 8;
    let s = stream(&stack, next).await.unwrap();
    assert!(s.calls.is_empty() && s.done.tool_calls.is_empty());
    assert_ne!(
        pb::FinishReason::try_from(s.done.finish_reason),
        Ok(pb::FinishReason::ToolCalls)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_calls_when_the_model_opens_one() {
    let stack = GeneratorStack::start(config()).await.unwrap();
    // A base model copies the pattern in front of it: after two answered turns that called
    // get_time, it opens a third call, and the lazy grammar takes over from `<tool_call>`.
    let qwen = template("qwen2.5");
    let mut messages = Vec::new();
    for (i, tz) in ["UTC", "Europe/Paris"].iter().enumerate() {
        messages.push(user("What time is it?"));
        messages.push(pb::ChatMessage {
            role: "assistant".into(),
            tool_calls: vec![pb::ToolCall {
                id: format!("call_{i}"),
                name: "get_time".into(),
                arguments_json: json!({"timezone": tz}).to_string(),
            }],
            ..Default::default()
        });
        messages.push(pb::ChatMessage {
            role: "tool".into(),
            content: "12:00".into(),
            tool_call_id: format!("call_{i}"),
            ..Default::default()
        });
        messages.push(pb::ChatMessage {
            role: "assistant".into(),
            content: "It is 12:00.".into(),
            ..Default::default()
        });
    }
    messages.push(user("What time is it?"));
    let s = stream(&stack, request(&qwen, messages)).await.unwrap();
    assert_valid(&s, "auto");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tool_mistakes_are_invalid_argument() {
    let stack = GeneratorStack::start(config()).await.unwrap();
    let qwen = template("qwen2.5");
    let base = || request(&qwen, vec![user("hi")]);
    let cases: Vec<(&str, pb::GenerateRequest, &str)> = vec![
        (
            "unknown function",
            {
                let mut r = base();
                r.tool_choice = choice(pb::tool_choice::Mode::Function, "nope");
                r
            },
            "not one of the request's tools",
        ),
        (
            "bad name",
            {
                let mut r = base();
                r.tools[0].name = "has space".into();
                r
            },
            "letters, digits",
        ),
        (
            "bad schema",
            {
                let mut r = base();
                r.tools[0].parameters_json = "{\"type\": ".into();
                r
            },
            "not valid JSON",
        ),
        (
            "schema of a string",
            {
                let mut r = base();
                r.tools[0].parameters_json = "{\"type\": \"string\"}".into();
                r
            },
            "describe an object",
        ),
        (
            "twice",
            {
                let mut r = base();
                r.tools.push(r.tools[0].clone());
                r
            },
            "given twice",
        ),
        (
            "required without tools",
            {
                let mut r = base();
                r.tools.clear();
                r.tool_choice = choice(pb::tool_choice::Mode::Required, "");
                r
            },
            "needs tools",
        ),
        (
            "tools and a schema",
            {
                let mut r = base();
                r.constraint = Some(pb::generate_request::Constraint::JsonSchema("{}".into()));
                r
            },
            "cannot be combined",
        ),
        (
            "a plain prompt",
            {
                let mut r = base();
                r.input = Some(pb::generate_request::Input::Prompt("hi".into()));
                r
            },
            "need chat messages",
        ),
        (
            "a built-in template",
            {
                let mut r = base();
                r.chat_template_jinja.clear();
                r.chat_template = "chatml".into();
                r
            },
            "built-in template \"chatml\" does not render tools",
        ),
        (
            "a template without tools",
            {
                let mut r = base();
                r.chat_template_jinja = template("gemma");
                r
            },
            "chat_template_jinja does not render tools",
        ),
        (
            "the model has no template",
            {
                let mut r = base();
                r.chat_template_jinja.clear();
                r
            },
            "has no chat template",
        ),
        (
            "arguments that are not an object",
            {
                let mut r = base();
                let Some(pb::generate_request::Input::Chat(c)) = &mut r.input else {
                    unreachable!()
                };
                c.messages.push(pb::ChatMessage {
                    role: "assistant".into(),
                    tool_calls: vec![pb::ToolCall {
                        id: "a".into(),
                        name: "get_time".into(),
                        arguments_json: "[1]".into(),
                    }],
                    ..Default::default()
                });
                r
            },
            "not a JSON object",
        ),
    ];
    for (what, req, says) in cases {
        let e = match stream(&stack, req).await {
            Ok(_) => panic!("{what}: accepted"),
            Err(e) => e,
        };
        assert_eq!(e.code(), Code::InvalidArgument, "{what}: {e}");
        assert!(e.to_string().contains(says), "{what}: {e}");
        assert!(e.to_string().len() < 600, "{what}: {e}");
    }
    // The service still serves.
    let mut ok = base();
    ok.tool_choice = choice(pb::tool_choice::Mode::Required, "");
    assert_valid(&stream(&stack, ok).await.unwrap(), "after the errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_generation_stops_with_its_own_reason() {
    let stack = GeneratorStack::start(config()).await.unwrap();
    let looping = |stop: bool| pb::GenerateRequest {
        model: GEMMA_REPO.into(),
        input: Some(pb::generate_request::Input::Prompt(
            "la la la la la la la la la la la la la la la la".into(),
        )),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: 300,
        stop_on_repetition: stop,
        ..Default::default()
    };
    let s = stream(&stack, looping(true)).await.unwrap();
    assert_eq!(
        pb::FinishReason::try_from(s.done.finish_reason),
        Ok(pb::FinishReason::Repetition),
        "{:?}",
        s.text
    );
    let n = s.done.usage.unwrap().completion_tokens;
    assert!((32..300).contains(&n), "{n}");
    let s = stream(&stack, looping(false)).await.unwrap();
    assert_eq!(
        pb::FinishReason::try_from(s.done.finish_reason),
        Ok(pb::FinishReason::Length)
    );
}

/// The openai SDK (tests/openai_tools_client.py) against the HTTP front of a generator whose
/// served template renders tools: calls whole and streamed, the round trip, and 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_calls_tools() {
    let stack = GeneratorStack::start_with_http(GeneratorConfig {
        chat_template_file: Some(repo_root().join("tests/fixtures/chat-templates/qwen2.5.jinja")),
        ..config()
    })
    .await
    .unwrap();
    let openai_tools: Vec<Value> = tools()
        .iter()
        .map(|t| {
            json!({"type": "function", "function": {
                "name": t.name, "description": t.description,
                "parameters": serde_json::from_str::<Value>(&t.parameters_json).unwrap()}})
        })
        .collect();
    let http = stack.http_addr.unwrap();
    let out = tokio::process::Command::new(venv_bin("python"))
        .arg(repo_root().join("tests/openai_tools_client.py"))
        .args([
            format!("http://{http}/v1"),
            GEMMA_REPO.to_string(),
            Value::from(openai_tools).to_string(),
        ])
        .output()
        .await
        .expect("python venv: run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "openai_tools_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Value = serde_json::from_slice(&out.stdout).unwrap();
    let as_streamed = |v: &Value| Streamed {
        text: v["text"].as_str().unwrap_or_default().to_string(),
        calls: v["calls"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                let s = |k: &str| c[k].as_str().unwrap().to_string();
                (s("name"), s("id"), s("arguments"))
            })
            .collect(),
        done: pb::GenerateDone {
            finish_reason: match v["finish_reason"].as_str() {
                Some("tool_calls") => pb::FinishReason::ToolCalls as i32,
                _ => pb::FinishReason::Unspecified as i32,
            },
            tool_calls: v["calls"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| pb::ToolCall {
                    id: c["id"].as_str().unwrap().into(),
                    name: c["name"].as_str().unwrap().into(),
                    arguments_json: c["arguments"].as_str().unwrap().into(),
                })
                .collect(),
            ..Default::default()
        },
    };
    assert_valid(&as_streamed(&sdk["whole"]), "whole");
    assert_eq!(sdk["whole"]["content"], Value::Null);
    let streamed = as_streamed(&sdk["stream"]);
    assert_valid(&streamed, "stream");
    assert_eq!(streamed.calls[0].0, "get_time");
    assert_ne!(sdk["answer"]["finish_reason"], "tool_calls");
    assert_eq!(sdk["answer"]["tool_calls"], Value::Null);
    for (case, says) in [
        ("unknown_function", "not one of the request's tools"),
        ("bad_tool_type", "only \"function\" tools"),
        ("bad_schema", "describe an object"),
    ] {
        let e = &sdk["errors"][case];
        assert_eq!(e["status"], 400, "{case}: {e}");
        assert_eq!(e["type"], "invalid_request_error", "{case}: {e}");
        assert!(e["message"].as_str().unwrap().contains(says), "{case}: {e}");
    }
}
