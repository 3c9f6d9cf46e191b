//! Shared plumbing of the integration tests and benchmarks: test models, release binaries,
//! loaders on ephemeral ports (in this process, or as a child process to kill -9).

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};
use llama_agent_client::LoaderClient;
use llama_agent_common::options::Plumbing;
use llama_loader::LoaderConfig;
use tokio::sync::oneshot;

pub const GEMMA_FILE: &str = "gemma-3-270m-Q4_K_M.gguf";
pub const MINILM_FILE: &str = "all-MiniLM-L6-v2-F16.gguf";
/// The same weights unrounded (F32 throughout).
pub const MINILM_F32_FILE: &str = "all-MiniLM-L6-v2-F32.gguf";

/// Where `scripts/fetch-test-models.sh` put the test models.
pub fn models_dir() -> PathBuf {
    std::env::var_os("LLAMA_AGENT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("models"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repo root")
        .to_path_buf()
}

/// A test model, or a clear failure telling how to get it.
pub fn model(file: &str) -> PathBuf {
    let p = models_dir().join(file);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-test-models.sh",
        p.display()
    );
    p
}

/// The MD5 the fetch script recorded next to a test model.
pub fn model_md5(file: &str) -> String {
    let sidecar = models_dir().join(format!("{file}.md5"));
    let text =
        std::fs::read_to_string(&sidecar).unwrap_or_else(|e| panic!("{}: {e}", sidecar.display()));
    text.split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A binary of the workspace, built in the same profile as the running test.
/// A workspace binary as a command. Its OpenMP threads wait passively (unless the caller's
/// environment says otherwise): the suite runs several llama.cpp processes at once on two
/// cores, and spinning OpenMP teams of different processes starve each other (a 48-token
/// stream took over 20 s that way, against 4 s alone).
/// Benchmarks call [`leave_openmp_alone`]: they run alone, beside peers started as they are.
pub fn workspace_command(name: &str) -> Command {
    with_openmp_policy(Command::new(workspace_bin(name)))
}

/// A workspace binary that cannot see `hidden` (an empty tmpfs covers it in a mount namespace
/// of its own): a service on "another node" that shares no volume with the loader. Root only
/// (CI and this machine run as root); the process is the service itself (`exec`).
pub fn workspace_command_hiding(name: &str, hidden: &Path) -> Command {
    let mut c = Command::new("unshare");
    c.args([
        "--mount",
        "--",
        "sh",
        "-c",
        r#"mount -t tmpfs tmpfs "$0" && exec "$@""#,
    ])
    .arg(hidden)
    .arg(workspace_bin(name));
    with_openmp_policy(c)
}

fn with_openmp_policy(mut c: Command) -> Command {
    let as_is = OPENMP_AS_IS.load(std::sync::atomic::Ordering::Relaxed);
    if !as_is && std::env::var_os("OMP_WAIT_POLICY").is_none() {
        c.env("OMP_WAIT_POLICY", "passive");
    }
    c
}

static OPENMP_AS_IS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Processes started from now on keep llama.cpp's OpenMP defaults (for benchmarks).
pub fn leave_openmp_alone() {
    OPENMP_AS_IS.store(true, std::sync::atomic::Ordering::Relaxed);
}

pub fn workspace_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    let mut dir = exe.parent().expect("target layout");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target layout");
    }
    let bin = dir.join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo build --release --workspace --bins` first",
        bin.display()
    );
    bin
}

/// A synthetic GGUF file: the magic, then deterministic filler.
pub fn fake_gguf(len: usize, seed: u8) -> Vec<u8> {
    let mut v: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    v[..4].copy_from_slice(b"GGUF");
    v
}

/// A service's `run` on 127.0.0.1:0 inside the test process, shut down by `stop` or by
/// dropping it (the shutdown future resolves once its sender is gone).
pub struct InProcessServer {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessServer {
    /// `run(listener, shutdown)` is a service's `run` with its other arguments bound; an error
    /// from it fails the test.
    pub async fn start<Fut, E>(
        name: &'static str,
        run: impl FnOnce(tokio::net::TcpListener, futures::future::BoxFuture<'static, ()>) -> Fut,
    ) -> anyhow::Result<Self>
    where
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let served = run(
            listener,
            Box::pin(async {
                let _ = stopped.await;
            }),
        );
        let task = tokio::spawn(async move {
            if let Err(e) = served.await {
                panic!("{name} failed: {e}");
            }
        });
        Ok(Self { addr, stop, task })
    }

    /// Shuts it down and waits until it has stopped.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A loader served by `llama_loader::run` on 127.0.0.1:0 inside the test process.
pub struct InProcessLoader {
    pub addr: SocketAddr,
    pub client: LoaderClient,
    server: InProcessServer,
}

impl InProcessLoader {
    pub async fn start(config: LoaderConfig) -> anyhow::Result<Self> {
        let server = InProcessServer::start("loader", |listener, shutdown| {
            llama_loader::run(config, Plumbing::plain(), listener, shutdown)
        })
        .await?;
        let client = LoaderClient::connect(&format!("http://{}", server.addr))?;
        Ok(Self {
            addr: server.addr,
            client,
            server,
        })
    }

    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// `llama-loader` as a child process (so a test can kill -9 it), on an ephemeral port read
/// back from its JSON start-up log.
pub struct LoaderProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl LoaderProcess {
    pub fn spawn(cache_dir: &Path, hf_endpoint: &str, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = workspace_command("llama-loader")
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(["--hf-endpoint", hf_endpoint])
            .args(extra)
            // LLAMA_TEST_RUST_LOG (with LLAMA_TEST_ECHO_LOGS) looks inside a failing test.
            .env(
                "RUST_LOG",
                std::env::var("LLAMA_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning llama-loader")?;
        let lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let addr = read_addrs(lines, &mut child, "llama-loader")?.grpc;
        Ok(Self { child, addr })
    }

    pub fn client(&self) -> LoaderClient {
        LoaderClient::connect(&format!("http://{}", self.addr)).expect("valid endpoint")
    }

    /// SIGKILL: no destructor, no flush, no chance to clean up.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LoaderProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads a service's JSON log until its `serving` line (noting the `metrics listening` line
/// before it), then keeps draining (echoed to our stderr with LLAMA_TEST_ECHO_LOGS set) so the
/// child never blocks on a full pipe.
/// The addresses a service logs before it serves: gRPC, then `/metrics` and the OpenAI HTTP
/// API when it listens on them.
struct Addrs {
    grpc: SocketAddr,
    metrics: Option<SocketAddr>,
    http: Option<SocketAddr>,
}

fn read_addrs(
    mut lines: std::io::Lines<BufReader<std::process::ChildStderr>>,
    child: &mut Child,
    name: &str,
) -> anyhow::Result<Addrs> {
    let (mut metrics, mut http) = (None, None);
    let grpc = loop {
        let Some(line) = lines.next() else {
            let status = child.wait()?;
            bail!("{name} exited ({status}) before serving");
        };
        let line = line?;
        if let Some(addr) = logged_addr(&line, " serving") {
            break addr;
        }
        if let Some(addr) = logged_addr(&line, "metrics listening") {
            metrics = Some(addr);
        }
        if let Some(addr) = logged_addr(&line, "http listening") {
            http = Some(addr);
        }
    };
    let echo = std::env::var_os("LLAMA_TEST_ECHO_LOGS").is_some();
    let name = name.to_string();
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if echo {
                eprintln!("[{name}] {line}");
            }
        }
    });
    Ok(Addrs {
        grpc,
        metrics,
        http,
    })
}

/// The address in a service's JSON log line whose message ends with `suffix`.
fn logged_addr(line: &str, suffix: &str) -> Option<SocketAddr> {
    let v: serde_json::Value = serde_json::from_str(line).ok()?;
    let fields = v.get("fields")?;
    if !fields.get("message")?.as_str()?.ends_with(suffix) {
        return None;
    }
    fields.get("addr")?.as_str()?.parse().ok()
}

/// A hub mirror whose `repo` holds the test model `file`, and a loader with an empty cache
/// downloading from it.
async fn mirrored_loader(
    repo: &str,
    file: &str,
) -> anyhow::Result<(crate::mirror::Mirror, tempfile::TempDir, InProcessLoader)> {
    let repo = crate::mirror::RepoSpec::new(repo).file(file, model(file));
    let mirror =
        crate::mirror::Mirror::start(crate::mirror::MirrorConfig::new().repo(repo)).await?;
    let cache = tempfile::tempdir()?;
    let loader = InProcessLoader::start(LoaderConfig::new(
        cache.path().to_path_buf(),
        mirror.base_url(),
    ))
    .await?;
    Ok((mirror, cache, loader))
}

/// Mirror + loader + generator, all on ephemeral ports in this process: what a generator
/// test needs to reach a real model through the real download path.
pub struct GeneratorStack {
    // Dropped first: the generator stops before its loader and mirror.
    _server: InProcessServer,
    pub mirror: crate::mirror::Mirror,
    pub loader: Option<InProcessLoader>,
    pub generator: llama_agent_client::GeneratorClient,
    pub generator_addr: SocketAddr,
    /// The OpenAI-compatible HTTP front, when started with it.
    pub http_addr: Option<SocketAddr>,
    _cache: tempfile::TempDir,
}

pub const GEMMA_REPO: &str = "test/gemma-3-270m-GGUF";

impl GeneratorStack {
    pub async fn start(config: llama_generator::GeneratorConfig) -> anyhow::Result<Self> {
        Self::launch(config, false).await
    }

    /// With the OpenAI-compatible HTTP front on another ephemeral port.
    pub async fn start_with_http(config: llama_generator::GeneratorConfig) -> anyhow::Result<Self> {
        Self::launch(config, true).await
    }

    async fn launch(config: llama_generator::GeneratorConfig, http: bool) -> anyhow::Result<Self> {
        let (mirror, cache, loader) = mirrored_loader(GEMMA_REPO, GEMMA_FILE).await?;
        let loader_client = loader.client.clone();
        let http = match http {
            true => Some(tokio::net::TcpListener::bind("127.0.0.1:0").await?),
            false => None,
        };
        let http_addr = http.as_ref().map(|l| l.local_addr()).transpose()?;
        let server = InProcessServer::start("generator", |listener, shutdown| {
            llama_generator::run(
                config,
                Plumbing::plain(),
                loader_client,
                listener,
                http,
                shutdown,
            )
        })
        .await?;
        let generator_addr = server.addr;
        let generator =
            llama_agent_client::GeneratorClient::connect(&format!("http://{generator_addr}"))?;
        Ok(Self {
            mirror,
            loader: Some(loader),
            generator,
            generator_addr,
            http_addr,
            _cache: cache,
            _server: server,
        })
    }

    /// Stops the loader (the generator keeps running).
    pub async fn stop_loader(&mut self) {
        if let Some(l) = self.loader.take() {
            l.stop().await;
        }
    }
}

/// Mirror + loader + embedder, all in this process on 127.0.0.1:0, the mirror's repo holding
/// one GGUF so the repo reference resolves to it.
pub struct EmbedderStack {
    // Dropped first: the embedder stops before its loader and mirror.
    _server: InProcessServer,
    _mirror: crate::mirror::Mirror,
    _loader: InProcessLoader,
    _cache: tempfile::TempDir,
    pub client: llama_agent_client::EmbedderClient,
    pub addr: SocketAddr,
}

impl EmbedderStack {
    pub async fn start(
        config: llama_embedder::EmbedderConfig,
        repo: &str,
        file: &str,
    ) -> anyhow::Result<Self> {
        let (mirror, cache, loader) = mirrored_loader(repo, file).await?;
        let loader_client = loader.client.clone();
        let server = InProcessServer::start("embedder", |listener, shutdown| {
            llama_embedder::run(
                config,
                Plumbing::plain(),
                loader_client,
                listener,
                None,
                shutdown,
            )
        })
        .await?;
        let addr = server.addr;
        let client = llama_agent_client::EmbedderClient::connect(&format!("http://{addr}"))?;
        Ok(Self {
            _mirror: mirror,
            _loader: loader,
            _cache: cache,
            client,
            addr,
            _server: server,
        })
    }
}

/// A workspace service binary (`llama-generator`, `llama-embedder`) as a child process on an
/// ephemeral port, read back from its JSON `<name> serving` log line.
pub struct ServiceProcess {
    pub child: Child,
    pub addr: SocketAddr,
    /// Where `/metrics` listens, when `--metrics-listen` was given.
    pub metrics: Option<SocketAddr>,
    /// Where the OpenAI-compatible HTTP API listens, when `--http-listen` was given.
    pub http: Option<SocketAddr>,
}

impl ServiceProcess {
    /// A loader downloading from `mirror` into `cache`.
    pub fn loader(
        mirror: &crate::mirror::Mirror,
        cache: &Path,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let cache_dir = cache.display().to_string();
        let args = [
            "--cache-dir",
            &cache_dir,
            "--hf-endpoint",
            mirror.base_url(),
        ];
        Self::spawn_env("llama-loader", &args, env)
    }

    pub fn spawn(bin: &str, args: &[&str]) -> anyhow::Result<Self> {
        Self::spawn_env(bin, args, &[])
    }

    /// With extra environment variables (tokens, OTLP endpoints).
    pub fn spawn_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<Self> {
        Self::spawn_command(workspace_command(bin), bin, args, env)
    }

    /// A service that cannot see `hidden` (see [`workspace_command_hiding`]).
    pub fn spawn_hiding(
        bin: &str,
        hidden: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        Self::spawn_command(workspace_command_hiding(bin, hidden), bin, args, env)
    }

    fn spawn_command(
        mut command: Command,
        bin: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let mut child = command
            .args(["--listen", "127.0.0.1:0", "--log-format", "json"])
            .args(args)
            // LLAMA_TEST_RUST_LOG (with LLAMA_TEST_ECHO_LOGS) looks inside a failing test.
            .env(
                "RUST_LOG",
                std::env::var("LLAMA_TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawning {bin}"))?;
        let lines = BufReader::new(child.stderr.take().expect("piped")).lines();
        let addrs = read_addrs(lines, &mut child, bin)?;
        Ok(Self {
            child,
            addr: addrs.grpc,
            metrics: addrs.metrics,
            http: addrs.http,
        })
    }

    /// SIGTERM, as Kubernetes sends it.
    pub fn terminate(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `hub-mirror` binary as a child process (benchmarks: a mirror that does not share the
/// measuring process's runtime), serving `repo` with `file`.
pub struct MirrorProcess {
    child: Child,
    pub base_url: String,
}

impl MirrorProcess {
    pub fn spawn(repo: &str, file: &Path) -> anyhow::Result<Self> {
        Self::spawn_with(repo, file, &[])
    }

    /// With more `hub-mirror` flags (faults: `--bytes-per-sec N` throttles every response).
    pub fn spawn_with(repo: &str, file: &Path, extra: &[&str]) -> anyhow::Result<Self> {
        let mut child = workspace_command("hub-mirror")
            .arg("--repo")
            .arg(format!("{repo}={}", file.display()))
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
        let base_url = line
            .trim()
            .strip_prefix("listening on ")
            .context("mirror banner")?
            .to_string();
        Ok(Self { child, base_url })
    }
}

impl Drop for MirrorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// grpcurl from the venv (or `$GRPCURL`).
pub fn grpcurl() -> String {
    let g = std::env::var("GRPCURL")
        .unwrap_or_else(|_| repo_root().join(".venv/bin/grpcurl").display().to_string());
    assert!(
        Path::new(&g).is_file(),
        "{g} is missing: run scripts/python-env.sh"
    );
    g
}

/// Runs `cmd`, asserting success; its stdout.
/// A program of the project's Python venv (the PyPI MCP servers, python itself).
pub fn venv_bin(name: &str) -> String {
    let p = repo_root().join(".venv/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/python-env.sh",
        p.display()
    );
    p.display().to_string()
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The median of benchmark timings (sorts them).
pub fn median(v: &mut [std::time::Duration]) -> std::time::Duration {
    v.sort();
    v[v.len() / 2]
}

pub fn ms(d: std::time::Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
