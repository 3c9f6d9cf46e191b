//! llama.cpp's own `llama-server`, the peer that benchmarks run side by side with ours.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

pub struct LlamaServer {
    child: Child,
    pub url: String,
    pub http: reqwest::Client,
}

impl LlamaServer {
    /// Starts `bin/llama-server -m model ARGS` on a free loopback port and waits for /health.
    /// Its log goes to `log` (a file in the temp folder, named by the caller).
    pub async fn start(
        bin: &Path,
        model: &Path,
        args: &[String],
        log: &str,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let log = std::fs::File::create(std::env::temp_dir().join(log))?;
        let child = Command::new(bin.join("llama-server"))
            .arg("-m")
            .arg(model)
            .args(args)
            .args(["--host", "127.0.0.1", "--port", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("llama-server (scripts/build-llama-tools.sh builds it)")?;
        let server = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            // A connection per request: llama-server's HTTP library closes a kept-alive
            // connection after a few requests, and a request sent on it then fails.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()?,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        while !server
            .http
            .get(format!("{}/health", server.url))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
        {
            if Instant::now() > deadline {
                bail!("llama-server did not become healthy");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(server)
    }

    /// POST /completion without streaming; the whole JSON answer.
    pub async fn completion(&self, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        Ok(self
            .http
            .post(format!("{}/completion", self.url))
            .json(body)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
