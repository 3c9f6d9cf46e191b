//! llama.cpp's and ggml's own log lines, into `tracing` under the target `llama.cpp`: at debug
//! (errors at warn), since a run prints over a hundred lines of internals that a person reading
//! `RUST_LOG=info` does not want; `RUST_LOG=llama.cpp=debug` shows them.

use std::cell::RefCell;
use std::ffi::{c_char, c_void, CStr};

use llama_cpp_sys_2::{ggml_log_level, GGML_LOG_LEVEL_CONT, GGML_LOG_LEVEL_ERROR};

/// Routes both libraries' logs here; call before anything is loaded.
pub fn install() {
    // SAFETY: `forward` is a plain function that lives as long as the process.
    unsafe {
        llama_cpp_sys_2::llama_log_set(Some(forward), std::ptr::null_mut());
        llama_cpp_sys_2::ggml_log_set(Some(forward), std::ptr::null_mut());
    }
}

thread_local! {
    /// A line arrives in pieces (CONT); it is logged whole, once it ends.
    static LINE: RefCell<(String, bool)> = const { RefCell::new((String::new(), false)) };
    /// The first error line logged on this thread since `take_first_error`: llama.cpp reports
    /// why it refused something (a grammar that does not parse) only in its log, synchronously
    /// on the caller's thread, and returns null.
    static FIRST_ERROR: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Longest error line kept: llama.cpp's messages may quote the rest of a caller's input.
const MAX_ERROR_BYTES: usize = 300;

/// The first error llama.cpp logged on this thread since the last call, then forgets it.
pub fn take_first_error() -> Option<String> {
    FIRST_ERROR.with_borrow_mut(Option::take)
}

unsafe extern "C" fn forward(level: ggml_log_level, text: *const c_char, _: *mut c_void) {
    if text.is_null() {
        return;
    }
    // SAFETY: llama.cpp passes a NUL-terminated string valid for this call.
    let piece = unsafe { CStr::from_ptr(text) }.to_string_lossy();
    LINE.with_borrow_mut(|(line, error)| {
        if level != GGML_LOG_LEVEL_CONT {
            *error = level == GGML_LOG_LEVEL_ERROR;
        }
        line.push_str(&piece);
        if line.ends_with('\n') {
            let text = line.trim_end();
            if !text.is_empty() {
                if *error {
                    tracing::warn!(target: "llama.cpp", "{text}");
                    FIRST_ERROR.with_borrow_mut(|first| {
                        first.get_or_insert_with(|| crate::text::truncate(text, MAX_ERROR_BYTES));
                    });
                } else {
                    tracing::debug!(target: "llama.cpp", "{text}");
                }
            }
            line.clear();
        }
    });
}
