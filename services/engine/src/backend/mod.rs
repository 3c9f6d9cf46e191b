//! The process-wide llama.cpp backend, set up once, whoever asks first: llama.cpp's logs routed
//! into `tracing`, then its modules loaded at run time (llama.cpp is built with
//! `GGML_BACKEND_DL`): GPU modules found beside the executable (`libggml-cuda.so`, ...), and
//! the one CPU module this machine runs best (see [`cpu`]).

mod cpu;
mod log;

pub(crate) use log::take_first_error;

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::{list_llama_ggml_backend_devices, LlamaBackendDeviceType};

use crate::EngineError;

/// GPU backends ggml can load as modules, in ggml's own order (devices are numbered by it).
const GPU_MODULES: &[&str] = &[
    "cuda", "hip", "musa", "vulkan", "sycl", "opencl", "cann", "metal",
];

/// What this process runs llama.cpp on.
pub struct Backend {
    llama: LlamaBackend,
    /// The CPU module loaded (`zen4`, `haswell`, ...).
    pub cpu_variant: String,
    pub devices: Vec<Device>,
}

#[derive(Clone, Debug)]
pub struct Device {
    /// ggml's name (`CUDA0`, `CPU`).
    pub name: String,
    pub description: String,
    pub gpu: bool,
    pub memory_total: u64,
    pub memory_free: u64,
}

impl Backend {
    pub fn llama(&self) -> &LlamaBackend {
        &self.llama
    }

    /// True when a GPU (or other accelerator) module loaded and found a device.
    pub fn has_gpu(&self) -> bool {
        self.devices.iter().any(|d| d.gpu)
    }
}

static BACKEND: OnceLock<Result<Backend, String>> = OnceLock::new();

/// The backend, set up on first use.
pub fn init_backend() -> Result<&'static Backend, EngineError> {
    BACKEND
        .get_or_init(set_up)
        .as_ref()
        .map_err(|e| EngineError::Backend(e.clone()))
}

fn set_up() -> Result<Backend, String> {
    log::install();
    let dir = module_dir().ok_or_else(|| {
        format!(
            "no llama.cpp CPU module (libggml-cpu-*.so) beside the executable{}",
            llama_cpp_sys_2::BACKENDS_DIR
                .map(|d| format!(" or in {d}"))
                .unwrap_or_default()
        )
    })?;
    load_gpu_modules(&dir);
    let mut modules = cpu::modules_in(&dir);
    // A pinned module (reproducing another build's numerics, or ruling one out), still
    // subject to the OS and CPU checks.
    if let Ok(only) = std::env::var("LLAMA_AGENT_CPU_VARIANT") {
        modules.retain(|m| m.variant == only.trim());
    }
    let os = cpu::OsSupport::detect();
    let (chosen, skipped) = cpu::choose(&modules, os);
    for (variant, why) in &skipped {
        tracing::debug!(variant, ?why, "CPU module passed over");
    }
    let chosen = chosen.ok_or_else(|| {
        format!(
            "none of the {} CPU modules in {} runs on this machine",
            modules.len(),
            dir.display()
        )
    })?;
    if !load_module(&chosen.path) {
        return Err(format!("loading {} failed", chosen.path.display()));
    }
    let llama = LlamaBackend::init().map_err(|e| e.to_string())?;
    let devices = devices();
    let shown: Vec<String> = devices
        .iter()
        .map(|d| {
            format!(
                "{} ({}, {:.1} GiB)",
                d.name,
                d.description,
                d.memory_total as f64 / (1u64 << 30) as f64
            )
        })
        .collect();
    tracing::info!(
        cpu = %chosen.variant,
        avx512 = os.avx512,
        amx = os.amx,
        devices = %shown.join(", "),
        modules = %dir.display(),
        "llama.cpp backends loaded"
    );
    crate::metrics::CPU_VARIANT
        .with_label_values(&[chosen.variant.as_str()])
        .set(1);
    record_memory(&devices);
    Ok(Backend {
        llama,
        cpu_variant: chosen.variant,
        devices,
    })
}

/// The devices llama.cpp sees now (free memory as of this call).
pub fn devices() -> Vec<Device> {
    list_llama_ggml_backend_devices()
        .into_iter()
        .map(|d| Device {
            gpu: matches!(
                d.device_type,
                LlamaBackendDeviceType::Gpu | LlamaBackendDeviceType::IntegratedGpu
            ),
            name: d.name,
            description: d.description.trim().to_string(),
            memory_total: d.memory_total as u64,
            memory_free: d.memory_free as u64,
        })
        .collect()
}

/// Sets the device memory gauges from `devices`.
pub fn record_memory(devices: &[Device]) {
    for d in devices {
        for (kind, bytes) in [("total", d.memory_total), ("free", d.memory_free)] {
            crate::metrics::DEVICE_MEMORY
                .with_label_values(&[d.name.as_str(), d.description.as_str(), kind])
                .set(bytes as i64);
        }
    }
}

/// Where the modules are: beside the executable (the dist layout, images), else where the
/// build put them (`cargo run`, `cargo test`).
fn module_dir() -> Option<PathBuf> {
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    beside_exe
        .into_iter()
        .chain(llama_cpp_sys_2::BACKENDS_DIR.map(PathBuf::from))
        .find(|d| !cpu::modules_in(d).is_empty())
}

/// GPU modules present in `dir` (and `GGML_BACKEND_PATH`); `GGML_CUDA=0` leaves CUDA out.
fn load_gpu_modules(dir: &Path) {
    let cuda_off = std::env::var("GGML_CUDA").is_ok_and(|v| v.trim() == "0");
    for name in GPU_MODULES {
        let path = dir.join(format!("libggml-{name}.so"));
        if !path.is_file() {
            continue;
        }
        if *name == "cuda" && cuda_off {
            tracing::info!("GGML_CUDA=0: the CUDA module is not loaded; running on the CPU");
            continue;
        }
        if !load_module(&path) {
            // Typically its runtime (libcudart, libcublas) is missing: run on the CPU.
            tracing::warn!(module = %path.display(), "GPU module did not load; running on the CPU (RUST_LOG=llama.cpp=debug says why)");
        }
    }
    if let Some(extra) = std::env::var_os("GGML_BACKEND_PATH") {
        let extra = PathBuf::from(extra);
        if !load_module(&extra) {
            tracing::warn!(module = %extra.display(), "GGML_BACKEND_PATH module did not load");
        }
    }
}

fn load_module(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: a NUL-terminated path; ggml registers the module or returns null.
    !unsafe { llama_cpp_sys_2::ggml_backend_load(c.as_ptr()) }.is_null()
}
