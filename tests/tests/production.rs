//! The three services as separate processes, the way operators run them: bearer-token auth with
//! health left open, grpcurl by reflection, Prometheus `/metrics` checked by promtool, one
//! OpenTelemetry trace from `llama-cli embed` through the embedder to the loader (received by a
//! real OTLP/gRPC receiver), overload answered RESOURCE_EXHAUSTED, SIGTERM drains a live
//! stream, and TLS.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llama_agent_client::proto::embedder::v1 as epb;
use llama_agent_client::proto::generator::v1 as gpb;
use llama_agent_client::{
    ClientError, ConnectOptions, EmbedderClient, GeneratorClient, LoaderClient, RetryPolicy,
};
use llama_agent_tests::http::{sample, scrape};
use llama_agent_tests::mirror::{Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{
    grpcurl, model, repo_root, run_ok, workspace_command, ServiceProcess, GEMMA_FILE, GEMMA_REPO,
    MINILM_FILE,
};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

const MINILM_REPO: &str = "test/all-MiniLM-L6-v2-GGUF";
const TOKEN: &str = "s3cret-token";

async fn mirror() -> Mirror {
    Mirror::start(
        MirrorConfig::new()
            .repo(RepoSpec::new(GEMMA_REPO).file(GEMMA_FILE, model(GEMMA_FILE)))
            .repo(RepoSpec::new(MINILM_REPO).file(MINILM_FILE, model(MINILM_FILE))),
    )
    .await
    .unwrap()
}

/// Loader, embedder and generator processes sharing one cache directory, all with the token,
/// a metrics port and a 20 s grace period; `env_over` goes to all three.
struct Deployment {
    _cache: tempfile::TempDir,
    loader: ServiceProcess,
    embedder: ServiceProcess,
    generator: ServiceProcess,
}

impl Deployment {
    fn start(mirror: &Mirror, env_over: &[(&str, &str)], generator_args: &[&str]) -> Self {
        let cache = tempfile::tempdir().unwrap();
        // The caller's variables come later and win (a drain test's longer grace period).
        let mut env = [
            ("LLAMA_AGENT_TOKEN", TOKEN),
            ("LLAMA_AGENT_GRACE_PERIOD", "20"),
        ]
        .to_vec();
        env.extend_from_slice(env_over);
        let common = ["--metrics-listen", "127.0.0.1:0"];
        let cache_dir = cache.path().display().to_string();
        let loader_args = [
            &common[..],
            &[
                "--cache-dir",
                &cache_dir,
                "--hf-endpoint",
                mirror.base_url(),
            ],
        ]
        .concat();
        let loader = ServiceProcess::spawn_env("llama-loader", &loader_args, &env).unwrap();
        let loader_url = format!("http://{}", loader.addr);
        let with_loader = [
            &common[..],
            &["--loader-endpoint", &loader_url, "--threads", "2"],
        ]
        .concat();
        let embedder = ServiceProcess::spawn_env("llama-embedder", &with_loader, &env).unwrap();
        let generator_args = [&with_loader[..], generator_args].concat();
        let generator =
            ServiceProcess::spawn_env("llama-generator", &generator_args, &env).unwrap();
        Self {
            _cache: cache,
            loader,
            embedder,
            generator,
        }
    }
}

fn authed() -> ConnectOptions {
    ConnectOptions {
        token: Some(TOKEN.into()),
        ..Default::default()
    }
}

fn url(p: &ServiceProcess) -> String {
    format!("http://{}", p.addr)
}

fn code<T: std::fmt::Debug>(r: Result<T, ClientError>) -> Code {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(ClientError::Status(s)) => s.code(),
        Err(e) => panic!("expected a status, got {e}"),
    }
}

fn embed_request(texts: &[&str]) -> epb::EmbedRequest {
    epb::EmbedRequest {
        model: MINILM_REPO.into(),
        texts: texts.iter().map(|t| t.to_string()).collect(),
        options: None,
    }
}

fn generate_request(max_tokens: u32) -> gpb::GenerateRequest {
    gpb::GenerateRequest {
        model: GEMMA_REPO.into(),
        input: Some(gpb::generate_request::Input::Prompt(
            "The history of the printing press".into(),
        )),
        sampling: Some(gpb::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_guards_every_rpc_but_health_and_grpcurl_calls_each_service() {
    let mirror = mirror().await;
    let d = Deployment::start(&mirror, &[], &[]);
    let g = grpcurl();
    let auth = format!("authorization: Bearer {TOKEN}");

    let services = [
        (&d.loader, "llama_agent.loader.v1.LoaderService"),
        (&d.embedder, "llama_agent.embedder.v1.EmbedderService"),
        (&d.generator, "llama_agent.generator.v1.GeneratorService"),
    ];
    for (p, service) in services {
        let addr = p.addr.to_string();
        // Health is open (probes cannot send headers): a real health client without a token.
        let probe = workspace_command("llama-health")
            .args([
                "--endpoint",
                &format!("http://{addr}"),
                "--service",
                service,
            ])
            .output()
            .unwrap();
        assert!(probe.status.success(), "{service}: {probe:?}");
        // grpcurl finds the health method through reflection, which needs the token.
        let health = run_ok(Command::new(&g).args([
            "-plaintext",
            "-H",
            &auth,
            &addr,
            "grpc.health.v1.Health/Check",
        ]));
        assert!(health.contains("SERVING"), "{service}: {health}");
        // Reflection is not: without the token `list` fails with UNAUTHENTICATED.
        let out = Command::new(&g)
            .args(["-plaintext", &addr, "list"])
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("Unauthenticated"), "{service}: {err}");
        let listed = run_ok(Command::new(&g).args(["-plaintext", "-H", &auth, &addr, "list"]));
        assert!(listed.lines().any(|l| l == service), "{listed}");
        let described =
            run_ok(Command::new(&g).args(["-plaintext", "-H", &auth, &addr, "describe", service]));
        assert!(described.contains("rpc "), "{described}");
    }

    let call = |p: &ServiceProcess, method: &str, body: String| {
        run_ok(Command::new(&g).args([
            "-plaintext",
            "-H",
            &auth,
            "-d",
            &body,
            &p.addr.to_string(),
            method,
        ]))
    };
    let ensured = call(
        &d.loader,
        "llama_agent.loader.v1.LoaderService/EnsureModel",
        format!("{{\"model\": \"{MINILM_REPO}\"}}"),
    );
    assert!(ensured.contains("localPath"), "{ensured}");
    let embedded = call(
        &d.embedder,
        "llama_agent.embedder.v1.EmbedderService/Embed",
        format!("{{\"model\": \"{MINILM_REPO}\", \"texts\": [\"hello\", \"world\"]}}"),
    );
    assert!(embedded.contains("\"dim\": 384"), "{embedded}");
    let generated = call(
        &d.generator,
        "llama_agent.generator.v1.GeneratorService/Generate",
        format!("{{\"model\": \"{GEMMA_REPO}\", \"prompt\": \"Hello\", \"max_tokens\": 4}}"),
    );
    assert!(generated.contains("FINISH_REASON_LENGTH"), "{generated}");

    // The client crate: no token, a wrong token, the right one.
    let none = EmbedderClient::connect_with(&url(&d.embedder), &ConnectOptions::default())
        .unwrap()
        .with_retry(RetryPolicy::none());
    assert_eq!(
        code(none.embed(embed_request(&["x"])).await),
        Code::Unauthenticated
    );
    let wrong = ConnectOptions {
        token: Some("guess".into()),
        ..Default::default()
    };
    let wrong = LoaderClient::connect_with(&url(&d.loader), &wrong).unwrap();
    assert_eq!(code(wrong.cache_status().await), Code::Unauthenticated);
    let right = LoaderClient::connect_with(&url(&d.loader), &authed()).unwrap();
    // MiniLM (grpcurl, embedder) and Gemma (generator).
    assert_eq!(right.cache_status().await.unwrap().entries, 2);
}

/// promtool as scripts/deploy-tools.sh provides it (the venv), or from PATH.
fn promtool() -> PathBuf {
    let p = repo_root().join(".venv/bin/promtool");
    if p.is_file() {
        return p;
    }
    assert!(
        Command::new("promtool").arg("--version").output().is_ok(),
        "promtool is missing: run scripts/deploy-tools.sh"
    );
    PathBuf::from("promtool")
}

fn promtool_check(text: &str, what: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool on {what}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_and_move_with_traffic() {
    let mirror = mirror().await;
    let d = Deployment::start(&mirror, &[], &[]);
    let embedder = EmbedderClient::connect_with(&url(&d.embedder), &authed()).unwrap();
    let generator = GeneratorClient::connect_with(&url(&d.generator), &authed()).unwrap();

    let ok_embeds = |t: &str| {
        sample(
            t,
            "llama_agent_grpc_requests_total",
            &[("method", "Embed"), ("code", "OK")],
        )
    };
    let before = scrape(&d.embedder);
    for _ in 0..3 {
        embedder
            .embed(embed_request(&["a", "b", "c"]))
            .await
            .unwrap();
    }
    let bad = embedder.embed(embed_request(&[])).await;
    assert_eq!(code(bad), Code::InvalidArgument);
    generator
        .generate(generate_request(8), |_| {})
        .await
        .unwrap();

    let after = scrape(&d.embedder);
    assert_eq!(ok_embeds(&after) - ok_embeds(&before), 3.0, "{after}");
    let invalid = &[("method", "Embed"), ("code", "INVALID_ARGUMENT")];
    assert_eq!(
        sample(&after, "llama_agent_grpc_requests_total", invalid),
        1.0
    );
    assert!(sample(&after, "llama_agent_embedder_texts_total", &[]) >= 9.0);
    assert!(sample(&after, "llama_agent_embedder_batch_sequences_count", &[]) >= 1.0);
    assert!(sample(&after, "llama_agent_model_load_seconds_count", &[]) >= 1.0);
    assert!(sample(&after, "process_resident_memory_bytes", &[]) > 0.0);

    let gen = scrape(&d.generator);
    assert_eq!(
        sample(&gen, "llama_agent_generator_tokens_generated_total", &[]),
        8.0
    );
    assert_eq!(
        sample(&gen, "llama_agent_generator_ttft_seconds_count", &[]),
        1.0
    );
    assert_eq!(
        sample(&gen, "llama_agent_generator_inter_token_seconds_count", &[]),
        7.0
    );

    serving_gauges_follow_a_stream(&d, &generator).await;

    let loader = scrape(&d.loader);
    assert_eq!(
        sample(
            &loader,
            "llama_agent_loader_cache_requests_total",
            &[("outcome", "miss")]
        ),
        2.0,
        "{loader}"
    );
    let bytes = std::fs::metadata(model(GEMMA_FILE)).unwrap().len()
        + std::fs::metadata(model(MINILM_FILE)).unwrap().len();
    assert_eq!(
        sample(&loader, "llama_agent_loader_downloaded_bytes_total", &[]),
        bytes as f64
    );

    for (p, what) in [
        (&d.loader, "loader"),
        (&d.embedder, "embedder"),
        (&d.generator, "generator"),
    ] {
        promtool_check(&scrape(p), what);
    }
}

/// The gauges Kubernetes' inference gateway and an autoscaler read: a stream holds one
/// sequence and its KV cells while it runs; once it is dropped nothing is running or waiting
/// and the cells its prompt left behind count as free (prompt cache, not load).
async fn serving_gauges_follow_a_stream(d: &Deployment, generator: &GeneratorClient) {
    let running = |t: &str| sample(t, "llama_agent_generator_requests_running", &[]);
    let waiting = |t: &str| {
        sample(
            t,
            "llama_agent_engine_queue_depth",
            &[("engine", "generate")],
        )
    };
    let usage = |t: &str| sample(t, "llama_agent_generator_kv_cache_usage_ratio", &[]);
    let total = |t: &str| {
        sample(
            t,
            "llama_agent_generator_kv_cache_cells",
            &[("state", "total")],
        )
    };
    // The grammar cannot end for hundreds of tokens: the stream still runs when it is read.
    let mut req = generate_request(0);
    req.constraint = Some(gpb::generate_request::Constraint::Grammar(
        "root ::= [a-z] root".into(),
    ));
    let mut stream = Box::pin(generator.generate_stream(req, None).await.unwrap());
    assert!(matches!(
        stream.next().await.unwrap().unwrap().event,
        Some(gpb::generate_response::Event::Chunk(_))
    ));
    let busy = scrape(&d.generator);
    assert_eq!(running(&busy), 1.0, "{busy}");
    assert_eq!(waiting(&busy), 0.0);
    assert!(total(&busy) > 0.0);
    assert!(usage(&busy) > 0.0 && usage(&busy) < 1.0, "{busy}");
    drop(stream);

    let deadline = Instant::now() + Duration::from_secs(30);
    let idle = loop {
        let t = scrape(&d.generator);
        if running(&t) == 0.0 || Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(running(&idle), 0.0, "the dropped stream still runs: {idle}");
    assert_eq!(usage(&idle), 0.0);
    assert_eq!(total(&idle), total(&busy));
}

/// `tests/otlp_receiver.py`: a real OTLP/gRPC trace receiver writing one JSON line per span.
struct Receiver {
    child: Child,
    endpoint: String,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let mut child = Command::new(repo_root().join(".venv/bin/python"))
            .arg(repo_root().join("tests/otlp_receiver.py"))
            .arg("--out")
            .arg(&out)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("python venv: run scripts/python-env.sh");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("otlp receiver listening on ")
            .unwrap_or_else(|| panic!("receiver said {line:?}"));
        Self {
            child,
            endpoint: format!("http://{addr}"),
            out,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_llama_cli_embed_is_one_trace_across_embedder_and_loader() {
    let receiver = Receiver::start();
    let mirror = mirror().await;
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint.as_str()),
        // Export within a fraction of a second instead of the default 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let d = Deployment::start(&mirror, &otel, &[]);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.txt");
    std::fs::write(&input, "first text\nsecond text\nthird text\n").unwrap();
    let output = dir.path().join("out.parquet");
    run_ok(
        workspace_command("llama-cli")
            .args(["embed", "--model", MINILM_REPO, "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(["--embedder-endpoint", &url(&d.embedder)])
            .env("LLAMA_AGENT_TOKEN", TOKEN)
            .envs(otel),
    );

    // The CLI flushed on exit; the services export on their 100 ms schedule.
    let deadline = Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let spans = receiver.spans();
        let root = spans
            .iter()
            .find(|s| s["service"] == "llama-cli" && s["parent_span_id"] == "");
        if let Some(root) = root {
            let id = root["trace_id"].as_str().unwrap().to_string();
            let in_trace: Vec<&serde_json::Value> = spans
                .iter()
                .filter(|s| s["trace_id"] == id.as_str())
                .collect();
            let services: HashSet<&str> = in_trace
                .iter()
                .filter_map(|s| s["service"].as_str())
                .collect();
            if ["llama-cli", "llama-embedder", "llama-loader"]
                .iter()
                .all(|s| services.contains(s))
            {
                break in_trace.into_iter().cloned().collect::<Vec<_>>();
            }
        }
        assert!(
            Instant::now() < deadline,
            "no complete trace; spans: {:#?}",
            receiver.spans()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Every span but the root has its parent in the same trace: one tree, not three.
    let ids: HashMap<&str, &serde_json::Value> = trace
        .iter()
        .map(|s| (s["span_id"].as_str().unwrap(), s))
        .collect();
    for s in &trace {
        let parent = s["parent_span_id"].as_str().unwrap();
        assert!(
            parent.is_empty() || ids.contains_key(parent),
            "span {s} has a parent outside the trace"
        );
    }
    let names: Vec<&str> = trace.iter().filter_map(|s| s["name"].as_str()).collect();
    assert!(
        names.contains(&"llama_agent.embedder.v1.EmbedderService/EmbedStream"),
        "{names:?}"
    );
    assert!(
        names.contains(&"llama_agent.loader.v1.LoaderService/EnsureModel"),
        "{names:?}"
    );
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_resource_exhausted_and_memory_stays_bounded() {
    let mirror = mirror().await;
    let d = Deployment::start(&mirror, &[], &["--parallel", "1", "--queue-depth", "2"]);
    let client = GeneratorClient::connect_with(&url(&d.generator), &authed())
        .unwrap()
        .with_retry(RetryPolicy::none());
    client.generate(generate_request(4), |_| {}).await.unwrap();
    let rss_loaded = rss_kib(d.generator.child.id());

    // 40 streams at once against 1 slot and 2 queue places: most are turned away at once.
    let calls = (0..40).map(|_| {
        let c = client.clone();
        async move { c.generate(generate_request(16), |_| {}).await }
    });
    let results = futures::future::join_all(calls).await;
    let mut codes: HashMap<String, usize> = HashMap::new();
    for r in &results {
        let k = match r {
            Ok(g) => format!("ok {:?}", g.done.finish_reason()),
            Err(ClientError::Status(s)) => format!("{:?}", s.code()),
            Err(e) => format!("{e}"),
        };
        *codes.entry(k).or_default() += 1;
    }
    let exhausted = codes.get("ResourceExhausted").copied().unwrap_or(0);
    let ok = codes.get("ok Length").copied().unwrap_or(0);
    assert!(exhausted >= 30, "{codes:?}");
    assert!(ok >= 1, "{codes:?}");
    assert_eq!(exhausted + ok, 40, "only these two outcomes: {codes:?}");
    let rss_after = rss_kib(d.generator.child.id());
    // Refused calls cost a few KiB each; 64 MiB covers allocator noise.
    assert!(
        rss_after < rss_loaded + 64 * 1024,
        "RSS grew from {rss_loaded} KiB to {rss_after} KiB"
    );
    // And it still serves.
    client.generate(generate_request(4), |_| {}).await.unwrap();
}

/// Drain tests: a grace period far longer than any stream here takes, however loaded the
/// machine, so a stream cut by the grace timer is a failure and not bad luck; the process must
/// then exit soon after its last stream ends (not when the grace period runs out).
const DRAIN_GRACE: (&str, &str) = ("LLAMA_AGENT_GRACE_PERIOD", "300");
const EXIT_AFTER_DRAIN: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_lets_the_stream_finish_then_exits_zero() {
    let mirror = mirror().await;
    let mut d = Deployment::start(&mirror, &[DRAIN_GRACE], &[]);
    let client = GeneratorClient::connect_with(&url(&d.generator), &authed()).unwrap();
    // A health watcher connected before the signal sees the drain (health needs no token).
    let channel = tonic::transport::Endpoint::from_shared(url(&d.generator))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut watch = Some(
        HealthClient::new(channel)
            .watch(HealthCheckRequest::default())
            .await
            .unwrap()
            .into_inner(),
    );
    let status = |m: Option<HealthCheckResponse>| m.expect("a health update").status();
    // "serving" is logged as the listener opens; health turns SERVING once the (empty)
    // warm-up has run, so the first update may still be NOT_SERVING.
    loop {
        let update = watch.as_mut().unwrap().message().await.unwrap();
        if status(update) == ServingStatus::Serving {
            break;
        }
    }
    let mut stream = std::pin::pin!(client
        .generate_stream(generate_request(48), None)
        .await
        .unwrap());
    let mut tokens = 0;
    let mut done = None;
    let mut signalled = false;
    while let Some(msg) = stream.next().await {
        match msg.unwrap().event {
            Some(gpb::generate_response::Event::Chunk(c)) => {
                tokens += c.token_ids.len();
                if !signalled {
                    d.generator.terminate();
                    signalled = true;
                    // Closing the watch after NOT_SERVING lets the drain end early: a watch
                    // never ends by itself.
                    if let Some(mut w) = watch.take() {
                        let drained = w.message().await.unwrap();
                        assert_eq!(status(drained), ServingStatus::NotServing);
                    }
                }
            }
            Some(gpb::generate_response::Event::Done(x)) => done = Some(x),
            Some(gpb::generate_response::Event::ToolCall(_)) | None => {}
        }
    }
    let done = done.expect("the stream ended with its done message");
    assert_eq!(done.finish_reason(), gpb::FinishReason::Length);
    assert_eq!(tokens, 48);
    assert_eq!(done.usage.map(|u| u.completion_tokens), Some(48));
    let status = wait_exit(&mut d.generator.child, EXIT_AFTER_DRAIN);
    assert!(status.success(), "exit status {status}");
    // A new call after the drain finds nobody.
    let late = GeneratorClient::connect_with(&url(&d.generator), &authed())
        .unwrap()
        .with_retry(RetryPolicy::none());
    assert_eq!(
        code(late.generate(generate_request(4), |_| {}).await),
        Code::Unavailable
    );
}

/// Several streams of different lengths, on two connections, all live when SIGTERM comes:
/// each ends with every token, its done message and its trailers (a connection closed under
/// a finished stream's last frames would fail it with a reset), then the process exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_live_stream_of_any_length_finish() {
    let mirror = mirror().await;
    let mut d = Deployment::start(&mirror, &[DRAIN_GRACE], &["--parallel", "6"]);
    let clients =
        [0, 1].map(|_| GeneratorClient::connect_with(&url(&d.generator), &authed()).unwrap());
    let lengths = [4u32, 12, 24, 40, 64, 96];
    // Every stream is admitted and producing before the signal.
    let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(lengths.len());
    let (signal_tx, signal_rx) = tokio::sync::watch::channel(false);
    let streams = lengths.iter().enumerate().map(|(i, &n)| {
        let client = clients[i % 2].clone();
        let started = started_tx.clone();
        let mut signalled = signal_rx.clone();
        tokio::spawn(async move {
            let mut stream =
                std::pin::pin!(client.generate_stream(generate_request(n), None).await?);
            let mut tokens = 0;
            let mut done = None;
            while let Some(msg) = stream.next().await {
                match msg?.event {
                    Some(gpb::generate_response::Event::Chunk(c)) => {
                        if tokens == 0 {
                            let _ = started.send(()).await;
                            // The rest of the stream is read during the drain.
                            let _ = signalled.wait_for(|s| *s).await;
                        }
                        tokens += c.token_ids.len();
                    }
                    Some(gpb::generate_response::Event::Done(x)) => done = Some(x),
                    Some(gpb::generate_response::Event::ToolCall(_)) | None => {}
                }
            }
            Ok::<_, ClientError>((n, tokens, done))
        })
    });
    let streams: Vec<_> = streams.collect();
    for _ in &lengths {
        started_rx.recv().await.expect("every stream starts");
    }
    d.generator.terminate();
    signal_tx.send(true).unwrap();
    for s in streams {
        let (n, tokens, done) = s.await.unwrap().expect("the stream ends cleanly");
        let done = done.expect("the stream ended with its done message");
        assert_eq!(done.finish_reason(), gpb::FinishReason::Length);
        assert_eq!(tokens, n as usize);
        assert_eq!(done.usage.map(|u| u.completion_tokens), Some(n));
    }
    let status = wait_exit(&mut d.generator.child, EXIT_AFTER_DRAIN);
    assert!(status.success(), "exit status {status}");
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(Instant::now() < deadline, "still running after {limit:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A CA, a server certificate for localhost and a client certificate, as PEM files.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let write = |name: &str, pem: String| std::fs::write(dir.path().join(name), pem).unwrap();
        write("ca.pem", ca_cert.pem());
        for (name, san) in [("server", "localhost"), ("client", "client.local")] {
            let key = KeyPair::generate().unwrap();
            let cert = CertificateParams::new(vec![san.to_string()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            write(&format!("{name}.pem"), cert.pem());
            write(&format!("{name}.key"), key.serialize_pem());
        }
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_client_certificates() {
    let pki = Pki::new();
    let cache = tempfile::tempdir().unwrap();
    let loader = ServiceProcess::spawn_env(
        "llama-loader",
        &[
            "--cache-dir",
            &cache.path().display().to_string(),
            "--tls-cert",
            &pki.path("server.pem"),
            "--tls-key",
            &pki.path("server.key"),
            "--tls-client-ca",
            &pki.path("ca.pem"),
        ],
        &[],
    )
    .unwrap();
    let https = format!("https://localhost:{}", loader.addr.port());
    let trusted = ConnectOptions {
        tls_ca: Some(pki.path("ca.pem").into()),
        tls_client_cert: Some(pki.path("client.pem").into()),
        tls_client_key: Some(pki.path("client.key").into()),
        ..Default::default()
    };
    let client = LoaderClient::connect_with(&https, &trusted).unwrap();
    assert_eq!(client.cache_status().await.unwrap().entries, 0);

    // Without a client certificate, or in plain text, there is no conversation.
    let no_cert = ConnectOptions {
        tls_ca: Some(pki.path("ca.pem").into()),
        ..Default::default()
    };
    let anonymous = LoaderClient::connect_with(&https, &no_cert)
        .unwrap()
        .with_retry(RetryPolicy::none());
    assert!(anonymous.cache_status().await.is_err());
    let plain = LoaderClient::connect_with(&format!("http://{}", loader.addr), &no_cert)
        .unwrap()
        .with_retry(RetryPolicy::none());
    assert!(plain.cache_status().await.is_err());

    // The probe binary speaks TLS too: refused without a client certificate, SERVING with one.
    let probe = |extra: &[String]| {
        workspace_command("llama-health")
            .args(["--endpoint", &https, "--tls-ca", &pki.path("ca.pem")])
            .args(extra)
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(probe(&[]), Some(2), "refused without a client certificate");
    let cert = [
        "--tls-client-cert".to_string(),
        pki.path("client.pem"),
        "--tls-client-key".to_string(),
        pki.path("client.key"),
    ];
    assert_eq!(probe(&cert), Some(0));
    drop(loader);
}

#[test]
fn llama_health_reports_serving_and_unreachable() {
    let cache = tempfile::tempdir().unwrap();
    let loader = ServiceProcess::spawn(
        "llama-loader",
        &["--cache-dir", &cache.path().display().to_string()],
    )
    .unwrap();
    let health = |endpoint: &str, service: &str| {
        workspace_command("llama-health")
            .args(["--endpoint", endpoint, "--service", service])
            .output()
            .unwrap()
            .status
            .code()
    };
    let up = format!("http://{}", loader.addr);
    assert_eq!(health(&up, ""), Some(0));
    assert_eq!(health(&up, "llama_agent.loader.v1.LoaderService"), Some(0));
    let addr: SocketAddr = loader.addr;
    drop(loader);
    assert_eq!(health(&format!("http://{addr}"), ""), Some(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_preload_stops_the_service_with_an_error() {
    let mirror = mirror().await;
    let cache = tempfile::tempdir().unwrap();
    let loader = ServiceProcess::loader(&mirror, cache.path(), &[]).unwrap();
    let loader_url = format!("http://{}", loader.addr);
    // It answers health (NOT_SERVING) while it preloads; the model does not exist.
    let mut embedder = ServiceProcess::spawn(
        "llama-embedder",
        &[
            "--loader-endpoint",
            &loader_url,
            "--preload",
            "test/no-such-model",
        ],
    )
    .unwrap();
    let status = wait_exit(&mut embedder.child, Duration::from_secs(20));
    assert!(!status.success(), "exit status {status}");
}
