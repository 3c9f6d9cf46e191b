//! The generator's OpenAI-compatible HTTP API (`--http-listen`), with the official `openai`
//! Python SDK (tests/openai_generate_client.py) and curl as its clients, against the gRPC
//! answers of the same process: a loader and a generator as separate processes, with a
//! bearer token and the Gemma chat template.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llama_agent_client::proto::generator::v1 as pb;
use llama_agent_client::{ConnectOptions, GeneratorClient};
use llama_agent_tests::http::{assert_error, curl, sample, scrape};
use llama_agent_tests::mirror::{Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{model, repo_root, ServiceProcess, GEMMA_FILE, GEMMA_REPO};
use serde_json::{json, Value};

const TOKEN: &str = "openai-generator-token";
const PROMPT: &str = "The capital of France is";

struct Services {
    _cache: tempfile::TempDir,
    _mirror: Mirror,
    _loader: ServiceProcess,
    generator: ServiceProcess,
    http: SocketAddr,
    grpc: GeneratorClient,
}

async fn start() -> Services {
    let mirror = Mirror::start(
        MirrorConfig::new().repo(RepoSpec::new(GEMMA_REPO).file(GEMMA_FILE, model(GEMMA_FILE))),
    )
    .await
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let env = [("LLAMA_AGENT_TOKEN", TOKEN)];
    let loader = ServiceProcess::loader(&mirror, cache.path(), &env).unwrap();
    let loader_url = format!("http://{}", loader.addr);
    let template = repo_root().join("tests/fixtures/chat-templates/gemma.jinja");
    let generator = ServiceProcess::spawn_env(
        "llama-generator",
        &[
            "--loader-endpoint",
            &loader_url,
            "--http-listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--threads",
            "2",
            "--parallel",
            "2",
            "--ctx-size",
            "2048",
            "--chat-template-file",
            &template.display().to_string(),
        ],
        &env,
    )
    .unwrap();
    let http = generator.http.expect("the generator logs its HTTP address");
    let opts = ConnectOptions {
        token: Some(TOKEN.into()),
        ..Default::default()
    };
    let grpc = GeneratorClient::connect_with(&format!("http://{}", generator.addr), &opts).unwrap();
    Services {
        _cache: cache,
        _mirror: mirror,
        _loader: loader,
        generator,
        http,
        grpc,
    }
}

/// What the gRPC side answers to a greedy request of 16 tokens (the prompt evaluated whole,
/// as the SDK's requests ask): its text, usage and logprobs.
async fn grpc_answer(
    grpc: &GeneratorClient,
    input: pb::generate_request::Input,
) -> (String, pb::Usage, Vec<pb::TokenLogprob>) {
    let req = pb::GenerateRequest {
        model: GEMMA_REPO.into(),
        input: Some(input),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: 16,
        logprobs: true,
        top_logprobs: 3,
        cache_prompt: Some(false),
        ..Default::default()
    };
    let mut stream = Box::pin(grpc.generate_stream(req, None).await.unwrap());
    let (mut text, mut logprobs) = (String::new(), Vec::new());
    while let Some(ev) = stream.next().await {
        match ev.unwrap().event {
            Some(pb::generate_response::Event::Chunk(c)) => {
                text.push_str(&c.text);
                logprobs.extend(c.logprobs);
            }
            Some(pb::generate_response::Event::Done(d)) => {
                return (text, d.usage.unwrap(), logprobs)
            }
            Some(pb::generate_response::Event::ToolCall(_)) | None => {}
        }
    }
    panic!("the stream ended without its final message");
}

fn chat_input() -> pb::generate_request::Input {
    let m = |role: &str, content: &str| pb::ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    };
    pb::generate_request::Input::Chat(pb::ChatMessages {
        messages: vec![m("system", "Answer briefly."), m("user", PROMPT)],
    })
}

fn assert_usage(got: &Value, want: &pb::Usage, what: &str) {
    assert_eq!(got["prompt_tokens"], want.prompt_tokens, "{what}: {got}");
    assert_eq!(got["completion_tokens"], want.completion_tokens, "{what}");
    assert_eq!(
        got["total_tokens"],
        want.prompt_tokens + want.completion_tokens,
        "{what}"
    );
}

/// The SDK's text and chat completions, streamed and not, equal the gRPC answers to the same
/// greedy requests (text, finish reason, usage, logprobs); a JSON schema holds; the SDK
/// raises the right error class for an unknown model, n > 1, a bad role, tools, a bad
/// temperature and a wrong key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_sdk_generates_like_grpc() {
    let s = start().await;
    let out = Command::new(repo_root().join(".venv/bin/python"))
        .arg(repo_root().join("tests/openai_generate_client.py"))
        .args([&format!("http://{}/v1", s.http), TOKEN, GEMMA_REPO, PROMPT])
        .output()
        .expect("python venv: run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "openai_generate_client.py: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Value = serde_json::from_slice(&out.stdout).unwrap();

    let (text, usage, _) =
        grpc_answer(&s.grpc, pb::generate_request::Input::Prompt(PROMPT.into())).await;
    assert!(!text.is_empty());
    for key in ["text", "text_stream"] {
        assert_eq!(sdk[key]["text"], text, "{key}");
        assert_eq!(sdk[key]["finish_reason"], "length", "{key}");
        assert_usage(&sdk[key]["usage"], &usage, key);
    }
    assert_eq!(sdk["text"]["object"], "text_completion");
    assert!(sdk["text"]["id"].as_str().unwrap().starts_with("cmpl-"));
    assert!(sdk["text_stream"]["chunks"].as_u64().unwrap() > 1);

    let (chat, chat_usage, logprobs) = grpc_answer(&s.grpc, chat_input()).await;
    for key in ["chat", "chat_stream"] {
        assert_eq!(sdk[key]["text"], chat, "{key}");
        assert_eq!(sdk[key]["finish_reason"], "length", "{key}");
        assert_usage(&sdk[key]["usage"], &chat_usage, key);
    }
    assert_eq!(sdk["chat"]["role"], "assistant");
    assert_eq!(sdk["chat"]["object"], "chat.completion");
    assert_eq!(sdk["chat_stream"]["roles"], json!(["assistant"]));

    let sdk_lps = sdk["chat_logprobs"].as_array().unwrap();
    assert_eq!(sdk_lps.len(), logprobs.len());
    for (got, want) in sdk_lps.iter().zip(&logprobs) {
        assert_eq!(got["token"], want.token);
        assert_eq!(got["bytes"], json!(want.bytes));
        let d = (got["logprob"].as_f64().unwrap() - f64::from(want.logprob)).abs();
        assert!(d < 1e-3, "{got} vs {}", want.logprob);
        let top: Vec<&str> = want.top_logprobs.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(got["top"], json!(top));
    }

    let answer: Value = serde_json::from_str(sdk["json_schema"]["text"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{e}: {}", sdk["json_schema"]));
    assert!(
        ["red", "green", "blue"].contains(&answer["color"].as_str().unwrap()),
        "{answer}"
    );
    assert_eq!(answer.as_object().unwrap().len(), 1, "{answer}");
    // The loaded model, by the reference it resolved to.
    let models = sdk["models"].as_array().unwrap();
    assert_eq!(models.len(), 1, "{models:?}");
    assert!(
        models[0].as_str().unwrap().starts_with(GEMMA_REPO),
        "{models:?}"
    );

    let e = &sdk["errors"];
    let expect = [
        ("unknown_model", 404, "NotFoundError"),
        ("two_choices", 400, "BadRequestError"),
        ("bad_role", 400, "BadRequestError"),
        ("tools", 400, "BadRequestError"),
        ("bad_temperature", 400, "BadRequestError"),
        ("wrong_key", 401, "AuthenticationError"),
    ];
    for (case, status, class) in expect {
        assert_eq!(e[case]["status"], status, "{case}: {}", e[case]);
        assert_eq!(e[case]["class"], class, "{case}");
        let message = e[case]["message"].as_str().unwrap_or_default();
        assert!(
            !message.is_empty() && message.len() < 400,
            "{case}: {message}"
        );
    }
}

/// Raw server-sent events as curl sees them: `data:` lines of chunks with the role first
/// and `[DONE]` last; malformed bodies, a missing key and unknown paths get OpenAI-shaped
/// errors; a client that hangs up mid-stream frees its sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_streams_events_and_gets_openai_shaped_errors() {
    let s = start().await;
    let base = format!("http://{}/v1", s.http);
    let chat = format!("{base}/chat/completions");
    let body = json!({
        "model": GEMMA_REPO,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 8,
        "temperature": 0,
        "stream": true,
    });
    let out = Command::new("curl")
        .args(["-sSN", "-X", "POST", &chat, "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(body.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8(out.stdout).unwrap();
    let events: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert!(
        events.iter().all(|l| l.starts_with("data: ")),
        "not all events are data lines: {text}"
    );
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|l| serde_json::from_str(&l["data: ".len()..]).unwrap())
        .collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(chunks
        .iter()
        .all(|c| c["object"] == "chat.completion.chunk" && c["id"] == chunks[0]["id"]));
    let finishes: Vec<&Value> = chunks
        .iter()
        .map(|c| &c["choices"][0]["finish_reason"])
        .filter(|f| !f.is_null())
        .collect();
    assert_eq!(finishes, [&json!("length")]);

    let auth = Some(TOKEN);
    assert_error(
        &curl("POST", &chat, auth, Some("{not json")),
        400,
        "invalid_request_error",
        "a body that is not JSON",
    );
    assert_error(
        &curl(
            "POST",
            &chat,
            auth,
            Some(&json!({"model": GEMMA_REPO}).to_string()),
        ),
        400,
        "invalid_request_error",
        "no messages",
    );
    let parts = json!({"model": GEMMA_REPO, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]});
    assert_error(
        &curl("POST", &chat, auth, Some(&parts.to_string())),
        400,
        "invalid_request_error",
        "an image part",
    );
    let tokens = json!({"model": GEMMA_REPO, "prompt": [1, 2, 3]});
    assert_error(
        &curl(
            "POST",
            &format!("{base}/completions"),
            auth,
            Some(&tokens.to_string()),
        ),
        400,
        "invalid_request_error",
        "a prompt of token ids",
    );
    assert_error(
        &curl("POST", &chat, None, Some(&body.to_string())),
        401,
        "authentication_error",
        "no key",
    );
    assert_error(
        &curl("GET", &format!("{base}/nope"), auth, None),
        404,
        "not_found_error",
        "an unknown path",
    );

    hanging_up_frees_the_sequence(&s, &chat).await;
}

/// A stream whose grammar never ends (only the context does), its client killed after the
/// first event: the generator stops it between decode steps (the running gauge returns to 0).
async fn hanging_up_frees_the_sequence(s: &Services, chat: &str) {
    let running = |t: &str| sample(t, "llama_agent_generator_requests_running", &[]);
    let body = json!({
        "model": GEMMA_REPO,
        "messages": [{"role": "user", "content": PROMPT}],
        "grammar": "root ::= [a-z] root",
        "stream": true,
    });
    let mut curl = Command::new("curl")
        .args(["-sSN", "-X", "POST", chat, "-H"])
        .arg(format!("Authorization: Bearer {TOKEN}"))
        .args(["-H", "Content-Type: application/json", "--data-binary"])
        .arg(body.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(curl.stdout.take().unwrap()).lines();
    // The role chunk, then the first piece of text.
    for _ in 0..2 {
        let line = lines
            .by_ref()
            .find(|l| l.as_ref().is_ok_and(|l| !l.is_empty()));
        assert!(line.is_some_and(|l| l.unwrap().starts_with("data: {")));
    }
    assert_eq!(running(&scrape(&s.generator)), 1.0);
    curl.kill().unwrap();
    curl.wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let idle = loop {
        let t = scrape(&s.generator);
        if running(&t) == 0.0 || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(running(&idle), 0.0, "the abandoned stream still runs");
}
