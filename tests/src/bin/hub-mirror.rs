//! Serves files as a local Hugging Face Hub until killed, for benchmarks and out-of-process
//! tests. Prints `listening on http://127.0.0.1:PORT` as its first stdout line.

use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use llama_agent_tests::mirror::{Fault, FaultScope, Mirror, MirrorConfig, RepoSpec};

#[derive(Parser)]
#[command(
    name = "hub-mirror",
    about = "A local Hugging Face Hub mirror (listing + resolve with Range) with fault injection",
    after_help = "Each file is served under its basename: \
        --repo acme/tiny=/data/tiny-Q4_K_M.gguf,/data/tiny-Q8_0.gguf serves \
        /acme/tiny/resolve/main/tiny-Q4_K_M.gguf and .../tiny-Q8_0.gguf. \
        Repeating --repo with the same id adds files to it.\n\n\
        Fault flags apply from the first request, to --fault-file or else to every file. \
        At run time: POST /_mirror/faults {\"file\": NAME?, \"drop_after\": N?, \"stall_after\": N?, \"corrupt\": BOOL?, \
        \"bytes_per_sec\": N?, \"ignore_range\": BOOL?, \"fail_status\": CODE?, \"times\": K?}, DELETE /_mirror/faults; \
        counters: GET /_mirror/stats (DELETE resets). The control paths need no token."
)]
struct Args {
    /// OWNER/REPO=PATH[,PATH...]: serve these disk files (names = basenames) in that repo.
    #[arg(long = "repo", value_name = "OWNER/REPO=PATHS", required = true)]
    repos: Vec<String>,
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Require `Authorization: Bearer TOKEN` on every hub request (401 otherwise).
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Limit the fault flags to this file name (default: all files).
    #[arg(long, value_name = "NAME")]
    fault_file: Option<String>,
    /// Close the connection after N body bytes of each faulted response.
    #[arg(long, value_name = "N")]
    drop_after: Option<u64>,
    /// Send N body bytes of each faulted response, then hold the connection open silently.
    #[arg(long, value_name = "N")]
    stall_after: Option<u64>,
    /// Flip bits in faulted responses (same length, wrong SHA-256).
    #[arg(long)]
    corrupt: bool,
    /// Throttle faulted response bodies to about N bytes per second.
    #[arg(long, value_name = "N")]
    bytes_per_sec: Option<u64>,
    /// Answer faulted ranged GETs with 200 and the whole file (no Range support).
    #[arg(long)]
    ignore_range: bool,
    /// Answer faulted resolve GETs with this HTTP status instead.
    #[arg(long, value_name = "CODE")]
    fail_status: Option<u16>,
    /// Number of resolve GETs the fault applies to (0 = all of them).
    #[arg(long, value_name = "K", default_value_t = 0)]
    fault_times: u32,
}

fn repo_specs(args: &[String]) -> Result<Vec<RepoSpec>> {
    let mut specs: Vec<RepoSpec> = Vec::new();
    for arg in args {
        let Some((id, paths)) = arg.split_once('=') else {
            bail!("--repo {arg:?}: expected OWNER/REPO=PATH[,PATH...]");
        };
        let paths: Vec<PathBuf> = paths
            .split(',')
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .collect();
        if paths.is_empty() {
            bail!("--repo {arg:?}: no files");
        }
        let more = RepoSpec::disk_files(id, &paths)?;
        match specs.iter_mut().find(|s| s.id == id) {
            Some(spec) => spec.files.extend(more.files),
            None => specs.push(more),
        }
    }
    Ok(specs)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let fault = Fault {
        drop_after: args.drop_after,
        stall_after: args.stall_after,
        corrupt: args.corrupt,
        bytes_per_sec: args.bytes_per_sec,
        ignore_range: args.ignore_range,
        fail_status: args.fail_status,
        times: args.fault_times,
    };
    let scope = args
        .fault_file
        .clone()
        .map_or(FaultScope::All, FaultScope::File);
    let config = MirrorConfig {
        repos: repo_specs(&args.repos)?,
        require_token: args.token.clone(),
        faults: vec![(scope, fault)],
        addr: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, args.port))),
    };
    let ids: Vec<String> = config.repos.iter().map(|r| r.id.clone()).collect();
    let mirror = Mirror::start(config).await?;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {}", mirror.base_url())?;
    stdout.flush()?;
    drop(stdout);
    for id in ids {
        let repo = mirror.repo(&id).context("repo vanished")?;
        eprintln!("{} @ {}", repo.id, repo.commit);
        for f in repo.files {
            eprintln!("  {} {} bytes sha256 {}", f.name, f.size, f.sha256);
        }
    }

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    mirror.shutdown().await;
    Ok(())
}
