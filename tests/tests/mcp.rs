//! The client's MCP tools on real servers: mcp-server-time and mcp-server-sqlite from PyPI
//! (the venv), and our own rmcp server (`mcp-test-server`) for the fault cases: a slow tool
//! against the call timeout, a failing tool, a server that exits or is killed (restarted and
//! the call retried), streamable HTTP, names offered twice, bad commands.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use llama_agent_client::{AgentError, McpOptions, McpTools, ServerSpec};
use llama_agent_tests::support::{venv_bin, workspace_bin};
use serde_json::json;

fn test_server() -> String {
    workspace_bin("mcp-test-server").display().to_string()
}

fn options(call_timeout: Duration) -> McpOptions {
    McpOptions {
        call_timeout,
        ..McpOptions::default()
    }
}

async fn connect(specs: &[ServerSpec]) -> McpTools {
    McpTools::connect(specs, options(Duration::from_secs(30)))
        .await
        .unwrap_or_else(|e| panic!("connecting {specs:?}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_server_from_pypi_lists_and_answers() {
    let spec = ServerSpec::Stdio(format!(
        "{} --local-timezone UTC",
        venv_bin("mcp-server-time")
    ));
    let tools = connect(&[spec]).await;
    let specs = tools.tool_specs();
    let get = specs
        .iter()
        .find(|t| t.name == "get_current_time")
        .expect("get_current_time is listed");
    // The server's inputSchema is what the model gets.
    assert_eq!(get.parameters["type"], "object");
    assert_eq!(get.parameters["required"], json!(["timezone"]));
    assert_eq!(get.parameters["properties"]["timezone"]["type"], "string");
    assert!(!get.description.is_empty());

    let out = tools
        .call("get_current_time", &json!({"timezone": "Europe/Paris"}))
        .await;
    assert!(!out.is_error, "{}", out.content);
    let answer: serde_json::Value = serde_json::from_str(&out.content).unwrap();
    assert_eq!(answer["timezone"], "Europe/Paris");
    assert!(answer["datetime"].as_str().unwrap().contains('T'));

    // The server's own error for a bad argument comes back as an error result.
    let bad = tools
        .call("get_current_time", &json!({"timezone": "Nowhere/City"}))
        .await;
    assert!(bad.is_error);
    assert!(bad.content.contains("Nowhere/City"), "{}", bad.content);

    // A tool nobody offers is an error result naming the tools there are.
    let unknown = tools.call("get_weather", &json!({})).await;
    assert!(unknown.is_error);
    assert!(
        unknown.content.contains("get_weather") && unknown.content.contains("get_current_time"),
        "{}",
        unknown.content
    );
    // Arguments that are not an object are refused before the server sees them.
    let not_object = tools.call("get_current_time", &json!([1, 2])).await;
    assert!(not_object.is_error);
    assert!(
        not_object.content.contains("JSON object"),
        "{}",
        not_object.content
    );
    tools.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_server_from_pypi_writes_and_reads_a_table() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("test.db");
    let spec = ServerSpec::Stdio(format!(
        "{} --db-path '{}'",
        venv_bin("mcp-server-sqlite"),
        db.display()
    ));
    let time = ServerSpec::Stdio(venv_bin("mcp-server-time"));
    // Two servers, one namespace.
    let tools = connect(&[spec, time]).await;
    let names: Vec<String> = tools.tool_specs().into_iter().map(|t| t.name).collect();
    for name in [
        "read_query",
        "write_query",
        "create_table",
        "list_tables",
        "get_current_time",
    ] {
        assert!(names.iter().any(|n| n == name), "{name} in {names:?}");
    }
    let ok = |o: llama_agent_client::ToolOutcome| {
        assert!(!o.is_error, "{}", o.content);
        o.content
    };
    ok(tools
        .call(
            "create_table",
            &json!({"query": "CREATE TABLE cities (name TEXT, tz TEXT)"}),
        )
        .await);
    ok(tools
        .call(
            "write_query",
            &json!({"query": "INSERT INTO cities VALUES ('Paris', 'Europe/Paris')"}),
        )
        .await);
    let rows = ok(tools
        .call(
            "read_query",
            &json!({"query": "SELECT tz FROM cities WHERE name = 'Paris'"}),
        )
        .await);
    assert!(rows.contains("Europe/Paris"), "{rows}");
    let tables = ok(tools.call("list_tables", &json!({})).await);
    assert!(tables.contains("cities"), "{tables}");
    tools.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_failing_tools_are_error_results_and_the_server_goes_on() {
    let tools = McpTools::connect(
        &[ServerSpec::Stdio(test_server())],
        options(Duration::from_secs(1)),
    )
    .await
    .unwrap();
    let slow = tools.call("slow", &json!({"seconds": 30})).await;
    assert!(slow.is_error);
    assert!(
        slow.content.contains("no answer within 1 s"),
        "{}",
        slow.content
    );

    let fail = tools
        .call("fail", &json!({"message": "disk on fire"}))
        .await;
    assert!(fail.is_error);
    assert_eq!(fail.content, "disk on fire");

    // The same server still answers after both.
    let echo = tools.call("echo", &json!({"text": "still here"})).await;
    assert_eq!(
        (echo.is_error, echo.content.as_str()),
        (false, "still here")
    );

    // Several calls at once on one server.
    let calls = (0..4).map(|i| {
        let tools = &tools;
        async move { tools.call("echo", &json!({"text": format!("n{i}")})).await }
    });
    let outs = futures::future::join_all(calls).await;
    let texts: Vec<_> = outs.iter().map(|o| o.content.as_str()).collect();
    assert_eq!(texts, ["n0", "n1", "n2", "n3"]);
    tools.close().await;
}

fn pid_of(out: &llama_agent_client::ToolOutcome) -> u32 {
    assert!(!out.is_error, "{}", out.content);
    out.content.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_died_is_restarted_and_the_call_retried_once() {
    let tools = connect(&[ServerSpec::Stdio(test_server())]).await;
    let first = pid_of(&tools.call("pid", &json!({})).await);

    // Killed from outside between calls: the next call restarts it and succeeds.
    let status = Command::new("kill")
        .args(["-9", &first.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let second = pid_of(&tools.call("pid", &json!({})).await);
    assert_ne!(first, second, "a new process answers");

    // A tool that kills its server: restarted, retried once, which kills it again; the
    // call is an error result saying so, not a crash.
    let exit = tools.call("exit", &json!({})).await;
    assert!(exit.is_error);
    assert!(exit.content.contains("restarted"), "{}", exit.content);
    // And the next call finds a server again.
    let third = pid_of(&tools.call("pid", &json!({})).await);
    assert_ne!(third, second);
    tools.close().await;
}

/// `mcp-test-server --http 127.0.0.1:0`, and its URL from its first line.
struct HttpServer {
    child: Child,
    url: String,
}

impl HttpServer {
    fn start() -> Self {
        let mut child = Command::new(test_server())
            .args(["--http", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("banner: {line}"))
            .to_string();
        Self { child, url }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamable_http_servers_list_and_answer() {
    let server = HttpServer::start();
    let tools = connect(&[ServerSpec::Http(server.url.clone())]).await;
    let mut names: Vec<String> = tools.tool_specs().into_iter().map(|t| t.name).collect();
    names.sort();
    assert_eq!(names, ["echo", "exit", "fail", "pid", "slow"]);
    let echo = tools.call("echo", &json!({"text": "over http"})).await;
    assert_eq!((echo.is_error, echo.content.as_str()), (false, "over http"));
    let fail = tools.call("fail", &json!({"message": "nope"})).await;
    assert!(fail.is_error);
    // Its schema comes from the server (schemars), with the field's doc comment.
    let echo_spec = tools
        .tool_specs()
        .into_iter()
        .find(|t| t.name == "echo")
        .unwrap();
    assert_eq!(echo_spec.parameters["required"], json!(["text"]));
    tools.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clashing_names_and_bad_servers_are_refused_clearly() {
    let a = ServerSpec::Stdio(test_server());
    let b = ServerSpec::Stdio(format!("{} ", test_server()));
    let e = McpTools::connect(&[a, b], McpOptions::default())
        .await
        .err()
        .expect("a clash");
    assert!(matches!(e, AgentError::ToolNameClash { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("tool `echo` is offered by two MCP servers"),
        "{msg}"
    );

    let missing = ServerSpec::Stdio("/nonexistent/mcp-server --flag".into());
    let e = McpTools::connect(&[missing], McpOptions::default())
        .await
        .err()
        .expect("no such program");
    assert!(
        e.to_string().contains("could not be started") && e.to_string().contains("/nonexistent"),
        "{e}"
    );

    let unterminated = ServerSpec::Stdio("server 'open".into());
    let e = McpTools::connect(&[unterminated], McpOptions::default())
        .await
        .err()
        .expect("bad quoting");
    assert!(e.to_string().contains("quote is not closed"), "{e}");

    // A program that is not an MCP server: it exits, and its stderr explains why.
    let not_mcp = ServerSpec::Stdio("sh -c 'echo broken config >&2; exit 2'".into());
    let e = McpTools::connect(&[not_mcp], McpOptions::default())
        .await
        .err()
        .expect("not a server");
    assert!(matches!(e, AgentError::McpServer { .. }), "{e}");

    // Nobody listening at a URL.
    let nobody = ServerSpec::Http("http://127.0.0.1:9/mcp".into());
    let e = McpTools::connect(
        &[nobody],
        McpOptions {
            connect_timeout: Duration::from_secs(10),
            ..McpOptions::default()
        },
    )
    .await
    .err()
    .expect("nobody there");
    assert!(e.to_string().contains("127.0.0.1:9"), "{e}");
}
