//! Replicas behind one client endpoint, as separate processes on loopback: one loader, two
//! embedders, and `llama-cli embed --embedder-endpoint a,b`. The batches spread over both;
//! a replica killed -9 or drained (SIGTERM) mid-job costs no row; a loader that is down
//! ends the job with an error, not a hang.

use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use llama_agent_tests::http::{sample, scrape};
use llama_agent_tests::mirror::{Mirror, MirrorConfig, RepoSpec};
use llama_agent_tests::support::{
    model, repo_root, run_ok, workspace_command, ServiceProcess, MINILM_FILE,
};

const MINILM_REPO: &str = "test/all-MiniLM-L6-v2-GGUF";
/// Far longer than any step here takes; a step that reaches it is a hang.
const BOUND: Duration = Duration::from_secs(300);

async fn mirror() -> Mirror {
    Mirror::start(
        MirrorConfig::new().repo(RepoSpec::new(MINILM_REPO).file(MINILM_FILE, model(MINILM_FILE))),
    )
    .await
    .unwrap()
}

/// A loader and two embedders using it, each embedder with `/metrics`.
struct Topology {
    _cache: tempfile::TempDir,
    loader: Option<ServiceProcess>,
    embedders: Vec<ServiceProcess>,
}

impl Topology {
    fn start(mirror: &Mirror) -> Self {
        let cache = tempfile::tempdir().unwrap();
        let loader = ServiceProcess::loader(mirror, cache.path(), &[]).unwrap();
        let loader_url = format!("http://{}", loader.addr);
        // A drain waits for its streams far longer than the tests take, so a drained
        // replica that exits early shows its client let go of it.
        let env = [("LLAMA_AGENT_GRACE_PERIOD", "120")];
        let embedders = (0..2)
            .map(|_| {
                ServiceProcess::spawn_env(
                    "llama-embedder",
                    &[
                        "--loader-endpoint",
                        &loader_url,
                        "--threads",
                        "1",
                        "--metrics-listen",
                        "127.0.0.1:0",
                    ],
                    &env,
                )
                .unwrap()
            })
            .collect();
        Self {
            _cache: cache,
            loader: Some(loader),
            embedders,
        }
    }

    /// `http://a,http://b`.
    fn endpoint(&self) -> String {
        self.embedders
            .iter()
            .map(|e| format!("http://{}", e.addr))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Texts embedded by `e` so far, from its `/metrics`.
fn texts_served(e: &ServiceProcess) -> f64 {
    metric(e, "llama_agent_embedder_texts_total")
}

/// A metric's value from a service's `/metrics`; 0 when absent.
fn metric(p: &ServiceProcess, name: &str) -> f64 {
    sample(&scrape(p), name, &[])
}

fn write_input(path: &Path, n: usize) {
    let text: String = (1..=n)
        .map(|i| {
            format!(
                "Line {i}: a sentence about topic {} that the model reads to the end, {}.\n",
                i % 37,
                "with some words to read".repeat(1 + i % 4)
            )
        })
        .collect();
    std::fs::write(path, text).unwrap();
}

/// `llama-cli embed` of `input` over `endpoint` into `output`, started.
fn embed(endpoint: &str, input: &Path, output: &Path) -> Child {
    workspace_command("llama-cli")
        .args(["embed", "--model", MINILM_REPO, "--input"])
        .arg(input)
        .arg("--output")
        .arg(output)
        .args(["--batch-size", "8", "--embedder-endpoint", endpoint])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits (bounded) for `child` to end; its status and stderr (read as it comes, so a
/// chatty child never blocks on a full pipe).
async fn finish(mut child: Child) -> (ExitStatus, String) {
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut pipe, &mut err).map(|_| err)
    });
    let deadline = Instant::now() + BOUND;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, reader.join().unwrap().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("still running after {BOUND:?}: a hang");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls (bounded) until both embedders have served texts.
async fn until_both_served(t: &Topology) {
    let deadline = Instant::now() + BOUND;
    loop {
        let a = texts_served(&t.embedders[0]);
        let b = texts_served(&t.embedders[1]);
        if a > 0.0 && b > 0.0 {
            return;
        }
        assert!(Instant::now() < deadline, "served {a} and {b} texts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The ids of the Parquet file, in file order, as pyarrow reads them.
fn parquet_ids(path: &Path) -> Vec<String> {
    let script = "import json, sys, pyarrow.parquet as pq\n\
                  print(json.dumps(pq.read_table(sys.argv[1]).column('id').to_pylist()))";
    let out = run_ok(
        Command::new(repo_root().join(".venv/bin/python"))
            .args(["-c", script])
            .arg(path),
    );
    serde_json::from_str(&out).unwrap()
}

/// Every input line exactly once, in input order.
fn assert_every_row_once(output: &Path, n: usize) {
    let ids = parquet_ids(output);
    let want: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
    assert_eq!(ids.len(), n, "rows in the file");
    assert!(ids == want, "ids out of order or repeated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_spreads_batches_over_both_replicas() {
    let mirror = mirror().await;
    let t = Topology::start(&mirror);
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.txt"), dir.path().join("out.parquet"));
    let n = 400;
    write_input(&input, n);
    let (status, stderr) = finish(embed(&t.endpoint(), &input, &output)).await;
    assert!(status.success(), "{stderr}");
    let (a, b) = (texts_served(&t.embedders[0]), texts_served(&t.embedders[1]));
    assert!(a > 0.0 && b > 0.0, "served {a} and {b}");
    assert_eq!(a + b, n as f64, "each text embedded once");
    assert_every_row_once(&output, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_mid_job_costs_no_row() {
    let mirror = mirror().await;
    let mut t = Topology::start(&mirror);
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.txt"), dir.path().join("out.parquet"));
    let n = 4000;
    write_input(&input, n);
    let cli = embed(&t.endpoint(), &input, &output);
    until_both_served(&t).await;
    let mut victim = t.embedders.remove(0);
    victim.child.kill().unwrap();
    victim.child.wait().unwrap();
    let (status, stderr) = finish(cli).await;
    assert!(status.success(), "{stderr}");
    assert!(
        stderr.contains("sending its batches again"),
        "the kill landed after the job: {stderr}"
    );
    assert_every_row_once(&output, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_drained_mid_job_is_left_and_costs_no_row() {
    let mirror = mirror().await;
    let mut t = Topology::start(&mirror);
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.txt"), dir.path().join("out.parquet"));
    let n = 4000;
    write_input(&input, n);
    let cli = embed(&t.endpoint(), &input, &output);
    until_both_served(&t).await;
    let mut drained = t.embedders.remove(0);
    drained.terminate();
    // It exits long before its grace period ends: the client stopped sending to it and
    // half-closed its stream once its health said NOT_SERVING.
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        if let Some(s) = drained.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the drained replica still had a stream"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(exit.success(), "drained replica exit: {exit}");
    let (status, stderr) = finish(cli).await;
    assert!(status.success(), "{stderr}");
    assert_every_row_once(&output, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_is_down_fails_the_job_with_an_error_not_a_hang() {
    let mirror = mirror().await;
    let mut t = Topology::start(&mirror);
    drop(t.loader.take());
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.txt"), dir.path().join("out.parquet"));
    write_input(&input, 50);
    let (status, stderr) = finish(embed(&t.endpoint(), &input, &output)).await;
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("llama-cli: error:"), "{stderr}");
    assert!(stderr.to_lowercase().contains("loader"), "{stderr}");
    assert!(!output.exists(), "no output without rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotent_calls_move_off_a_replica_that_is_gone() {
    use llama_agent_client::proto::embedder::v1 as pb;
    use llama_agent_client::EmbedderClient;
    let mirror = mirror().await;
    let t = Topology::start(&mirror);
    // A port nothing listens on: every call there is refused (UNAVAILABLE).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let live = &t.embedders[0];
    let client = EmbedderClient::connect(&format!("http://{dead},http://{}", live.addr)).unwrap();
    assert_eq!(client.replica_count().await, 2);
    for i in 0..6 {
        let r = client
            .embed(pb::EmbedRequest {
                model: MINILM_REPO.into(),
                texts: vec![format!("text {i}")],
                options: None,
            })
            .await
            .unwrap();
        assert_eq!(r.embeddings.unwrap().count, 1);
        let tok = client
            .tokenize(pb::TokenizeRequest {
                model: MINILM_REPO.into(),
                text: "hello".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(!tok.ids.is_empty());
        let info = client.model_info(MINILM_REPO).await.unwrap();
        assert_eq!(info.dimensions, 384);
    }
    assert_eq!(texts_served(live), 6.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_stays_on_the_generator_that_holds_its_prefix() {
    use llama_agent_client::proto::generator::v1 as gpb;
    use llama_agent_client::GeneratorClient;
    use llama_agent_tests::support::{GEMMA_FILE, GEMMA_REPO};
    let mirror = Mirror::start(
        MirrorConfig::new().repo(RepoSpec::new(GEMMA_REPO).file(GEMMA_FILE, model(GEMMA_FILE))),
    )
    .await
    .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let loader = ServiceProcess::loader(&mirror, cache.path(), &[]).unwrap();
    let loader_url = format!("http://{}", loader.addr);
    let generators: Vec<ServiceProcess> = (0..2)
        .map(|_| {
            ServiceProcess::spawn(
                "llama-generator",
                &[
                    "--loader-endpoint",
                    &loader_url,
                    "--threads",
                    "1",
                    "--metrics-listen",
                    "127.0.0.1:0",
                ],
            )
            .unwrap()
        })
        .collect();
    // A refused replica in the list too: a Generate that fails before any answer moves on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let endpoint = format!(
        "http://{dead},http://{},http://{}",
        generators[0].addr, generators[1].addr
    );
    let client = GeneratorClient::connect(&endpoint).unwrap();
    let mut turns = vec![
        (
            "system".to_string(),
            "You answer in one short sentence.".to_string(),
        ),
        ("user".to_string(), "What is a printing press?".to_string()),
    ];
    let mut generated = 0.0;
    for next in ["And who built the first one?", "Where was that?"] {
        let req = gpb::GenerateRequest {
            model: GEMMA_REPO.into(),
            input: Some(gpb::generate_request::Input::Chat(gpb::ChatMessages {
                messages: turns
                    .iter()
                    .map(|(role, content)| gpb::ChatMessage {
                        role: role.clone(),
                        content: content.clone(),
                        ..Default::default()
                    })
                    .collect(),
            })),
            sampling: Some(gpb::SamplingParams {
                temperature: Some(0.0),
                ..Default::default()
            }),
            chat_template: "gemma".into(),
            max_tokens: 6,
            ..Default::default()
        };
        let out = client.generate(req, |_| {}).await.unwrap();
        let usage = out.done.usage.unwrap_or_default();
        generated += f64::from(usage.completion_tokens);
        if turns.len() > 2 {
            // The replica that served the opening still holds it in its prompt cache.
            assert!(usage.cached_prompt_tokens > 0, "{usage:?}");
        }
        turns.push(("assistant".into(), out.text));
        turns.push(("user".into(), next.into()));
    }
    let tokens = "llama_agent_generator_tokens_generated_total";
    let (a, b) = (
        metric(&generators[0], tokens),
        metric(&generators[1], tokens),
    );
    assert!(generated > 0.0);
    assert!(
        (a, b) == (generated, 0.0) || (a, b) == (0.0, generated),
        "one generator served the whole conversation: {a} and {b} of {generated} tokens"
    );
}
