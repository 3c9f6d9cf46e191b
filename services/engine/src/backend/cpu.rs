//! Which CPU module to load. ggml ships one `libggml-cpu-<variant>.so` per x86 generation and
//! scores them by CPUID alone ("this does not check for OS support"), so a VM whose CPUID
//! reports AMX while the hypervisor leaves its registers disabled gets the sapphirerapids module
//! and dies with SIGILL on the first tile instruction. Here a variant is a candidate only when
//! the OS has enabled every register state its instructions need (XCR0, and the per-process
//! permission Linux requires for AMX tiles); the best-scoring candidate is loaded.
//!
//! The AMX module also needs `LLAMA_AGENT_CPU_AMX=1`: on the H200 machine's VM (2026-11-30)
//! CPUID, XCR0 and the kernel all granted AMX, a standalone `ldtilecfg`/`tilezero` ran, and
//! still ggml's AMX kernels died with SIGILL on `tilezero` (a tile used unconfigured on a
//! worker thread) during Q4_K generation. zen4 (AVX-512 with BF16 and VNNI) runs there.

use std::path::{Path, PathBuf};

/// Register state a variant's instructions need, by XCR0 bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Needs {
    /// SSE only: always enabled on x86-64.
    Sse,
    /// YMM state (AVX, AVX2, FMA, AVX-VNNI).
    Avx,
    /// ZMM and opmask state (AVX-512).
    Avx512,
    /// AVX-512 plus AMX tile state and Linux's permission to use it.
    Amx,
}

/// The variants ggml builds for x86 (ggml/src/CMakeLists.txt) and what each needs. A variant
/// not listed is never loaded: its instructions are unknown here.
const VARIANTS: &[(&str, Needs)] = &[
    ("x64", Needs::Sse),
    ("sse42", Needs::Sse),
    ("sandybridge", Needs::Avx),
    ("ivybridge", Needs::Avx),
    ("piledriver", Needs::Avx),
    ("haswell", Needs::Avx),
    ("alderlake", Needs::Avx),
    ("skylakex", Needs::Avx512),
    ("cannonlake", Needs::Avx512),
    ("cascadelake", Needs::Avx512),
    ("icelake", Needs::Avx512),
    ("cooperlake", Needs::Avx512),
    ("zen4", Needs::Avx512),
    ("sapphirerapids", Needs::Amx),
];

const MODULE_PREFIX: &str = "libggml-cpu-";

/// A CPU module found on disk.
#[derive(Clone, Debug)]
pub struct CpuModule {
    pub variant: String,
    pub path: PathBuf,
}

/// The CPU modules in `dir`.
pub fn modules_in(dir: &Path) -> Vec<CpuModule> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<CpuModule> = rd
        .filter_map(|d| d.ok())
        .filter_map(|d| {
            let name = d.file_name().into_string().ok()?;
            let variant = name.strip_prefix(MODULE_PREFIX)?.strip_suffix(".so")?;
            Some(CpuModule {
                variant: variant.to_string(),
                path: d.path(),
            })
        })
        .collect();
    found.sort_by(|a, b| a.variant.cmp(&b.variant));
    found
}

/// What the OS lets this process execute.
#[derive(Clone, Copy, Debug)]
pub struct OsSupport {
    pub avx: bool,
    pub avx512: bool,
    pub amx: bool,
}

impl OsSupport {
    pub fn detect() -> Self {
        let xcr0 = xcr0();
        let avx = xcr0 & 0b110 == 0b110;
        let avx512 = avx && xcr0 & 0xe0 == 0xe0;
        // Tile config and tile data (bits 17, 18), the operator's opt-in (see the module
        // docs), then Linux's per-process permission.
        let amx = avx512
            && xcr0 & (0b11 << 17) == 0b11 << 17
            && std::env::var("LLAMA_AGENT_CPU_AMX").is_ok_and(|v| v.trim() == "1")
            && request_amx();
        Self { avx, avx512, amx }
    }

    fn allows(&self, needs: Needs) -> bool {
        match needs {
            Needs::Sse => true,
            Needs::Avx => self.avx,
            Needs::Avx512 => self.avx512,
            Needs::Amx => self.amx,
        }
    }
}

/// Why a module was not chosen, for the log.
#[derive(Debug, PartialEq, Eq)]
pub enum Skipped {
    Unknown,
    OsDisabled,
    Unsupported,
    Unloadable(String),
}

/// The best module the CPU and the OS can run, and why each other one was passed over.
pub fn choose(modules: &[CpuModule], os: OsSupport) -> (Option<CpuModule>, Vec<(String, Skipped)>) {
    let mut best: Option<(i32, &CpuModule)> = None;
    let mut skipped = Vec::new();
    for m in modules {
        let Some(needs) = VARIANTS
            .iter()
            .find(|(v, _)| *v == m.variant)
            .map(|(_, n)| *n)
        else {
            skipped.push((m.variant.clone(), Skipped::Unknown));
            continue;
        };
        if !os.allows(needs) {
            skipped.push((m.variant.clone(), Skipped::OsDisabled));
            continue;
        }
        match score(&m.path) {
            Ok(0) => skipped.push((m.variant.clone(), Skipped::Unsupported)),
            Ok(s) => {
                if best.is_none_or(|(b, _)| s > b) {
                    best = Some((s, m));
                }
            }
            Err(e) => skipped.push((m.variant.clone(), Skipped::Unloadable(e))),
        }
    }
    (best.map(|(_, m)| m.clone()), skipped)
}

/// The module's own CPUID score (0: this CPU lacks its instructions).
fn score(path: &Path) -> Result<i32, String> {
    // SAFETY: ggml CPU modules are built to be opened this way (ggml does the same to score
    // them); the score function only reads CPUID. Only variants whose register state the OS
    // enables get here, so their initialisers cannot fault.
    unsafe {
        let lib = libloading::Library::new(path).map_err(|e| e.to_string())?;
        let f: libloading::Symbol<unsafe extern "C" fn() -> i32> = lib
            .get(b"ggml_backend_score\0")
            .map_err(|e| e.to_string())?;
        Ok(f())
    }
}

#[cfg(target_arch = "x86_64")]
fn xcr0() -> u64 {
    use std::arch::x86_64::__cpuid;
    // CPUID.1:ECX.OSXSAVE: the OS uses XSAVE, so XGETBV may be executed.
    let osxsave = __cpuid(1).ecx & (1 << 27) != 0;
    if !osxsave {
        return 0b11;
    }
    #[target_feature(enable = "xsave")]
    unsafe fn xgetbv0() -> u64 {
        std::arch::x86_64::_xgetbv(0)
    }
    // SAFETY: OSXSAVE is set, so XGETBV is enabled.
    unsafe { xgetbv0() }
}

#[cfg(not(target_arch = "x86_64"))]
fn xcr0() -> u64 {
    0
}

/// Asks Linux for AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM), as ggml's AMX code would;
/// false when the kernel or the hypervisor refuses.
#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request_amx() -> bool {
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request_amx() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(v: &str) -> CpuModule {
        CpuModule {
            variant: v.into(),
            path: PathBuf::from(format!("/nonexistent/{MODULE_PREFIX}{v}.so")),
        }
    }

    /// Variants whose state the OS has not enabled, or that are unknown, are never opened.
    #[test]
    fn disabled_and_unknown_variants_are_never_opened() {
        let os = OsSupport {
            avx: true,
            avx512: false,
            amx: false,
        };
        let modules = [
            module("sapphirerapids"),
            module("zen4"),
            module("future9000"),
        ];
        let (best, skipped) = choose(&modules, os);
        assert!(best.is_none());
        assert_eq!(
            skipped,
            [
                ("sapphirerapids".to_string(), Skipped::OsDisabled),
                ("zen4".to_string(), Skipped::OsDisabled),
                ("future9000".to_string(), Skipped::Unknown),
            ]
        );
    }

    #[test]
    fn every_variant_ggml_builds_is_known() {
        for v in [
            "x64",
            "haswell",
            "skylakex",
            "icelake",
            "zen4",
            "alderlake",
            "sapphirerapids",
        ] {
            assert!(VARIANTS.iter().any(|(k, _)| *k == v), "{v}");
        }
    }
}
