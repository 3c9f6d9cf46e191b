//! A binary's life around its engines. `exit()` tears down what the process holds in no set
//! order: an engine thread still freeing its model or context then (a detached thread, woken
//! when the runtime's tasks drop its queue) races the GPU runtime's own teardown, and CUDA
//! aborts with "driver shutting down" after the work is done. So the runtime goes first, then
//! the engines are waited for, and only then does the process exit.

use std::future::Future;
use std::time::Duration;

/// Longest wait for engine threads at exit: each finishes its current decode step, sees its
/// work cancelled (the tasks holding the receivers are gone) and frees model and context.
const ENGINE_STOP: Duration = Duration::from_secs(60);

/// Runs `main` on a multi-threaded Tokio runtime; then drops the runtime, with every task still
/// holding an engine, and waits for the engine threads to free their models and contexts.
pub fn run<F: Future>(main: F) -> std::io::Result<F::Output> {
    let runtime = tokio::runtime::Runtime::new()?;
    let out = runtime.block_on(main);
    drop(runtime);
    if !crate::queue::wait_engines_stopped(ENGINE_STOP) {
        tracing::warn!(
            secs = ENGINE_STOP.as_secs(),
            "engine threads still running at exit"
        );
    }
    Ok(out)
}
