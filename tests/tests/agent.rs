//! `llama-cli agent` end to end on real parts: the gemma test model in the CLI's own
//! generator, a Hermes/Qwen-style Jinja template that renders `tools`, and mcp-server-time
//! from PyPI. The model is a base model, so the first step names the function
//! (`--tool-choice get_current_time`): the generator's grammar makes it write a call whose
//! arguments validate against the server's own schema; the agent runs it over MCP, adds the
//! result as a tool message, and the model answers.

use std::process::Command;

use llama_agent_client::{McpOptions, McpTools, ServerSpec};
use llama_agent_tests::support::{model, repo_root, venv_bin, workspace_command, GEMMA_FILE};
use serde_json::Value;

fn time_server() -> String {
    format!("{} --local-timezone UTC", venv_bin("mcp-server-time"))
}

/// The Qwen2.5 template (tests/fixtures/chat-templates/README.md): tools in the system
/// turn, calls in `<tool_call>` tags, results in `<tool_response>` tags.
fn qwen_template() -> std::path::PathBuf {
    repo_root().join("tests/fixtures/chat-templates/qwen2.5.jinja")
}

fn cli(cache: &std::path::Path) -> Command {
    let mut c = workspace_command("llama-cli");
    c.env_remove("LLAMA_LOADER_ENDPOINT")
        .env_remove("LLAMA_GENERATOR_ENDPOINT")
        .env_remove("RUST_LOG")
        .env("LLAMA_CACHE_DIR", cache);
    c
}

/// `instance` validates against `schema` (Python's jsonschema, pinned in the venv).
fn assert_valid(instance: &Value, schema: &Value) {
    let out = Command::new(venv_bin("python"))
        .args([
            "-c",
            "import json, sys, jsonschema; jsonschema.validate(json.loads(sys.argv[1]), json.loads(sys.argv[2]))",
            &instance.to_string(),
            &schema.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{instance} does not validate against {schema}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn llama_cli_agent_calls_a_pypi_tool_over_mcp_and_answers() {
    // The server's own schema, as it lists it.
    let tools = McpTools::connect(&[ServerSpec::Stdio(time_server())], McpOptions::default())
        .await
        .unwrap();
    let schema = tools
        .tool_specs()
        .into_iter()
        .find(|t| t.name == "get_current_time")
        .expect("get_current_time")
        .parameters;
    tools.close().await;

    let tmp = tempfile::tempdir().unwrap();
    let out = cli(&tmp.path().join("cache"))
        .args(["agent", "--model"])
        .arg(model(GEMMA_FILE))
        .arg("--chat-template-file")
        .arg(qwen_template())
        .args([
            "--mcp-server",
            &time_server(),
            "--tool-choice",
            "get_current_time",
            "--prompt",
            "What time is it in Tokyo right now?",
            "--max-steps",
            "3",
            "--max-tokens",
            "64",
            "--temperature",
            "0",
            "--stop",
            "<|im_end|>",
            "--json",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();

    let call = &lines[0];
    assert_eq!(call["type"], "tool_call", "{stdout}");
    assert_eq!(call["name"], "get_current_time");
    assert!(call["id"].as_str().is_some_and(|id| !id.is_empty()));
    assert_valid(&call["arguments"], &schema);

    let result = lines
        .iter()
        .find(|l| l["type"] == "tool_result" && l["id"] == call["id"])
        .unwrap_or_else(|| panic!("a result for the call: {stdout}"));
    assert_eq!(result["name"], "get_current_time");
    let is_error = result["is_error"].as_bool().expect("is_error is a bool");
    let content = result["content"].as_str().expect("content is text");
    if !is_error {
        // The server answered for the timezone the model asked about.
        let answer: Value = serde_json::from_str(content).unwrap();
        assert_eq!(answer["timezone"], call["arguments"]["timezone"]);
    }

    let last = lines.last().unwrap();
    assert_eq!(last["type"], "final", "{stdout}");
    assert!(last["text"].is_string());
    let finish = last["finish_reason"].as_str().unwrap();
    assert!(
        ["STOP", "STOP_SEQUENCE", "LENGTH", "REPETITION"].contains(&finish),
        "{finish}"
    );
    assert!(last["steps"].as_u64().unwrap() >= 2, "{last}");
    // Every line is one of the three kinds.
    for l in &lines {
        assert!(
            ["tool_call", "tool_result", "final"].contains(&l["type"].as_str().unwrap()),
            "{l}"
        );
    }
}

#[test]
fn bad_agent_input_is_a_clear_message_and_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let gemma = model(GEMMA_FILE).display().to_string();
    let long = "x".repeat(5000);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--max-steps", "0", "--prompt", "hi"],
            "--max-steps must be at least 1",
        ),
        (
            vec!["--tool-choice", "required", "--prompt", "hi"],
            "--tool-choice required needs tools",
        ),
        (
            vec!["--mcp-url", "https://example.invalid/mcp", "--prompt", "hi"],
            "only http:// is supported",
        ),
        (
            vec!["--mcp-url", &long, "--prompt", "hi"],
            "not an http:// URL",
        ),
        (
            vec!["--mcp-server", "/nonexistent/server", "--prompt", "hi"],
            "could not be started",
        ),
    ];
    for (args, expected) in cases {
        let out = cli(&tmp.path().join("cache"))
            .args(["agent", "--model", &gemma])
            .args(&args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        // User input is never echoed whole.
        assert!(stderr.len() < 2000, "{args:?}: {} bytes", stderr.len());
    }
    // A named function that no server offers.
    let out = cli(&tmp.path().join("cache"))
        .args(["agent", "--model", &gemma, "--mcp-server", &time_server()])
        .args(["--tool-choice", "get_weather", "--prompt", "hi"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--tool-choice get_weather: no tool has that name")
            && stderr.contains("get_current_time"),
        "{stderr}"
    );
}

/// Without tools the loop is a chat: one step per turn, the session grows by the answers,
/// and the second turn, which resends the first, finds it in the generator's prompt cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resent_each_turn_is_answered_from_the_prompt_cache() {
    use llama_agent_client::session::{Role, Session};
    use llama_agent_client::{Agent, AgentEvent, Finish};
    use llama_agent_tests::support::{GeneratorStack, GEMMA_REPO};

    let stack = GeneratorStack::start(llama_generator::GeneratorConfig {
        threads: Some(2),
        parallel: 1,
        ctx_size: 1024,
        ..Default::default()
    })
    .await
    .unwrap();
    let mut session = Session::new(GEMMA_REPO);
    session.chat_template = Some("gemma".into());
    session.sampling.temperature = Some(0.0);
    session.max_tokens = 12;
    session.push_system("You are a helpful assistant who answers in one sentence.");
    let agent = Agent {
        generator: &stack.generator,
        tools: None,
        max_steps: 4,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let mut outcomes = Vec::new();
    for question in ["What is the capital of France?", "And of Italy?"] {
        session.push_user(question);
        let mut streamed = String::new();
        let mut sink = |e: AgentEvent| match e {
            AgentEvent::Text(t) => streamed.push_str(&t),
            other => panic!("no tools, yet {other:?}"),
        };
        let out = agent.run(&mut session, &cancel, &mut sink).await.unwrap();
        assert_eq!(out.steps, 1);
        assert_eq!(out.text, streamed, "the final text is what streamed");
        assert!(
            matches!(out.finish, Finish::Generator(_)),
            "{:?}",
            out.finish
        );
        outcomes.push(out);
    }
    let roles: Vec<Role> = session.messages.iter().map(|m| m.role).collect();
    use Role::*;
    assert_eq!(roles, [System, User, Assistant, User, Assistant]);
    assert_eq!(session.messages[4].content, outcomes[1].text);
    // Turn 2 resent turn 1 whole: the cache held all of it but what follows.
    assert!(
        outcomes[1].cached_prompt_tokens >= outcomes[0].prompt_tokens,
        "turn 1: {} prompt tokens; turn 2: {} of {} cached",
        outcomes[0].prompt_tokens,
        outcomes[1].cached_prompt_tokens,
        outcomes[1].prompt_tokens
    );
}
