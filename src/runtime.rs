//! The ONNX Runtime environment of the process and the sessions that run deltadoc graphs.
//!
//! The shared library is located once per process: `DELTADOC_ORT_LIB`, then `ORT_DYLIB_PATH`,
//! else the pinned PyPI wheel through `crate::fetch`. ort allows a single environment per
//! process, so it lives in a `OnceLock`.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use anyhow::{Context, Result, anyhow};
use ort::environment::Environment;
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;

static ENV: OnceLock<std::result::Result<Environment, String>> = OnceLock::new();
/// ONNX Runtime races when several threads register the same custom domain for the first time
/// (onnxruntime#22663); sessions with our domain are therefore committed one at a time.
static COMMIT: Mutex<()> = Mutex::new(());

/// Path of the ONNX Runtime shared library this process uses, fetching it if needed.
pub fn library_path() -> Result<PathBuf> {
    for var in ["DELTADOC_ORT_LIB", "ORT_DYLIB_PATH"] {
        if let Some(p) = std::env::var_os(var) {
            let p = PathBuf::from(p);
            if !p.is_file() {
                return Err(anyhow!("{var}={} does not name a file", p.display()));
            }
            return Ok(p);
        }
    }
    crate::fetch::ensure(&crate::fetch::ONNXRUNTIME)
}

/// The process-wide ONNX Runtime environment.
pub fn environment() -> Result<&'static Environment> {
    let env = ENV.get_or_init(|| {
        let init = || -> Result<Environment> {
            let lib = library_path()?;
            tracing::debug!("loading ONNX Runtime from {}", lib.display());
            let builder = ort::init_from(&lib).map_err(|e| anyhow!("cannot load ONNX Runtime from {}: {e}", lib.display()))?;
            builder.with_name("deltadoc").build().map_err(|e| anyhow!("cannot create the ONNX Runtime environment: {e}"))
        };
        init().map_err(|e| format!("{e:#}"))
    });
    env.as_ref().map_err(|e| anyhow!("{e}"))
}

/// How a session runs.
#[derive(Clone, Debug)]
pub struct SessionOptions {
    /// Intra-op threads; also the pool our custom kernels parallelise on. 0 = every core.
    pub threads: usize,
    /// Where ONNX Runtime writes its own profile (every node's time in every run, as Chrome
    /// trace JSON) when the session closes: this path plus the date and `.json`.
    pub profile: Option<PathBuf>,
}

impl Default for SessionOptions {
    fn default() -> Self {
        Self { threads: default_threads(), profile: None }
    }
}

impl SessionOptions {
    /// `threads` intra-op threads, 0 meaning every core (the `--threads` and `threads:` setting).
    pub fn with_threads(threads: usize) -> Self {
        let mut o = Self::default();
        if threads > 0 {
            o.threads = threads;
        }
        o
    }
}

/// Number of cores available to this process.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Whether ONNX Runtime may copy constant weights into its packed GEMM layout at load.
///
/// Measured on the 0.8B shape (benches/RESULTS.md): for f32 `MatMul` weights prepacking costs
/// ~1 GiB of RAM and 4–6 s of load and made prefill and decode *slower*; ORT's `MatMulNBits`
/// needs it for its fast path (decode 0.3 tok/s without it against 7–14 with it), which matters
/// only where a graph runs it: the operator tests and benchmarks that compare it with deltadoc's
/// `QuantMatMul`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prepack {
    /// Let ORT prepack constant weights (its default).
    Yes,
    /// Keep weights where they are (mapped from the external data file).
    No,
}

/// Asks the kernel to read the graph's external weights (`<graph>.data`) into the page cache now.
/// ORT maps that file and reads some tensors in place for the whole session: the embedding table
/// always, every f32 weight when prepacking is off. Pages it does not touch at load fault in from
/// disk one at a time later: on a cold cache, the embedding row of every token id seen for the
/// first time cost 2–5 ms in a 40 ms int4 decode step (0.8B shape, ORT's profiler).
fn prefetch_weights(graph: &Path) {
    use std::os::fd::AsRawFd;
    let mut data = graph.as_os_str().to_owned();
    data.push(".data");
    if let Ok(file) = std::fs::File::open(&data) {
        // SAFETY: an advisory call on a descriptor that stays open for its duration; a failure
        // only means no read-ahead, so its result is not checked.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

/// Opens a graph written by the importer, with deltadoc's operators registered.
pub fn open_session(model: &Path, opts: &SessionOptions) -> Result<Session> {
    open_session_with(model, opts, Prepack::Yes)
}

/// [`open_session`] with an explicit weight-prepacking choice.
pub fn open_session_with(model: &Path, opts: &SessionOptions, prepack: Prepack) -> Result<Session> {
    prefetch_weights(model);
    let env = environment()?;
    let threads = if opts.threads == 0 { default_threads() } else { opts.threads };
    let domain =
        crate::ops::domain(threads).map_err(|e| anyhow!("cannot build the {} operator domain: {e}", crate::ops::DOMAIN))?;
    let build = || -> std::result::Result<Session, ort::Error> {
        let mut b = Session::builder(env)?
            .with_operators(domain)?
            .with_optimization_level(GraphOptimizationLevel::All)?
            .with_intra_threads(threads)?
            .with_inter_threads(1)?
            // The pool's threads spin between the ops of a run instead of sleeping, and stop when
            // the run returns, so an idle session burns nothing: waking a sleeping thread for each
            // of a decode step's ~200 ops made the step 1.12x (int8) and 1.17x (int4) as slow on
            // the 0.8B shape (benches/RESULTS.md, "Decode step").
            .with_intra_op_spinning(true)?
            .with_config_entry("session.force_spinning_stop", "1")?
            .with_memory_pattern(false)?
            // Subnormal floats (from the DeltaNet decays) cost x86 ~100× per operation; ORT's own
            // kernels get the same flush as deltadoc's (simd::FlushDenormals).
            .with_config_entry("session.set_denormal_as_zero", "1")?;
        if let Some(prefix) = &opts.profile {
            b = b.with_profiling(prefix)?;
        }
        if prepack == Prepack::No {
            b = b.with_config_entry("session.disable_prepacking", "1")?;
        }
        let _guard = COMMIT.lock().unwrap_or_else(|p| p.into_inner());
        b.commit_from_file(model)
    };
    build().map_err(|e| anyhow!("{e}")).with_context(|| format!("{}: cannot open the ONNX graph", model.display()))
}
