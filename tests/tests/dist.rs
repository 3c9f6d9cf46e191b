//! The relocatable folder `scripts/dist.sh` lays out, run as users run it: copied somewhere
//! else, without LD_LIBRARY_PATH, `llama-cli` generates and embeds on the test models with the
//! CPU module it chose at run time, frees its engines before it exits, and exits 0.

use std::path::{Path, PathBuf};
use std::process::Command;

use llama_agent_tests::support::{model, repo_root, GEMMA_FILE, MINILM_FILE};

fn dist() -> PathBuf {
    let dir = std::env::var_os("LLAMA_AGENT_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("dist/llama-agent"));
    assert!(
        dir.join("bin/llama-cli").is_file(),
        "{} has no bin/llama-cli: run scripts/dist.sh first",
        dir.display()
    );
    dir
}

/// A copy of the dist folder in `to` (symlinks kept, as `cp -a` and tar do).
fn relocate(from: &Path, to: &Path) -> PathBuf {
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to.join("moved"))
        .status()
        .unwrap();
    assert!(status.success());
    to.join("moved")
}

/// `llama-cli` from the copy, with nothing from the build tree on the library path.
fn cli(bin: &Path, cache: &Path) -> Command {
    let mut c = Command::new(bin.join("llama-cli"));
    c.env_remove("LD_LIBRARY_PATH")
        .env("RUST_LOG", "info")
        .env("OMP_WAIT_POLICY", "passive")
        .env("LLAMA_CACHE_DIR", cache)
        .env("LLAMA_LOG_FORMAT", "json");
    c
}

/// The message and fields of each JSON log line.
fn logs(stderr: &[u8]) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|v| v["fields"].clone())
        .collect()
}

fn find<'a>(logs: &'a [serde_json::Value], message: &str) -> Option<&'a serde_json::Value> {
    logs.iter().find(|f| f["message"] == message)
}

/// AMX tiles usable here: the kernel lists them only when the OS has enabled them.
fn amx_enabled() -> bool {
    std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|c| c.contains(" amx_tile"))
}

#[test]
fn a_relocated_dist_folder_generates_and_embeds_then_exits_cleanly() {
    let tmp = tempfile::tempdir().unwrap();
    let moved = relocate(&dist(), tmp.path());
    let bin = moved.join("bin");
    let cache = tmp.path().join("cache");

    let out = cli(&bin, &cache)
        .args(["generate", "--model"])
        .arg(model(GEMMA_FILE))
        .args([
            "--prompt",
            "The history of the printing press",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--json",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "generate failed: {stderr}");
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(done["completion_tokens"], 8, "{done}");

    let lines = logs(&out.stderr);
    let backends = find(&lines, "llama.cpp backends loaded").expect("the backend line");
    let variant = backends["cpu"].as_str().unwrap();
    assert!(
        bin.join(format!("libggml-cpu-{variant}.so")).is_file(),
        "{variant} is not a module of the copy"
    );
    if !amx_enabled() {
        assert_ne!(variant, "sapphirerapids", "an AMX module without AMX");
    }
    let loaded = find(&lines, "model loaded").expect("one model load line");
    assert_eq!(loaded["file"], GEMMA_FILE);
    assert_eq!(loaded["cpu"], variant);
    assert_eq!(loaded["device"], "CPU");
    // The engine freed its model before the process ended (a GPU runtime torn down first
    // aborts the exit).
    assert!(
        find(&lines, "generate engine stopped; model freed").is_some(),
        "{stderr}"
    );
    // llama.cpp's own lines are at debug, not among these.
    assert!(
        !stderr.contains("llama_model_loader"),
        "llama.cpp internals at info"
    );

    let input = tmp.path().join("in.txt");
    std::fs::write(&input, "a first text\na second text\na third one\n").unwrap();
    let parquet = tmp.path().join("out.parquet");
    let out = cli(&bin, &cache)
        .args(["embed", "--model"])
        .arg(model(MINILM_FILE))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&parquet)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "embed failed: {stderr}");
    assert!(
        find(&logs(&out.stderr), "embed engine stopped; model freed").is_some(),
        "{stderr}"
    );
    let rows = Command::new(repo_root().join(".venv/bin/python"))
        .args([
            "-c",
            "import sys, pyarrow.parquet as pq; print(pq.read_table(sys.argv[1]).num_rows)",
        ])
        .arg(&parquet)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&rows.stdout).trim(), "3");
}
