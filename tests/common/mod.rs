//! Helpers shared by the integration tests.

#![allow(dead_code)]

pub mod certs;
pub mod pg_cluster;
pub mod ports;
pub mod s3_server;
pub mod sandbox;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use deltadoc::generate::{Decoder, Logits};
use deltadoc::model::graph::{KvCache, LinearAttn};
use deltadoc::model::quant::Precision;
use deltadoc::model::{self, ExportOptions, ModelDir};
use safetensors::SafeTensors;

/// Repository root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where the test corpus (real documents, tests/corpus/MANIFEST.tsv) is: `$DELTADOC_CORPUS`,
/// `../shared/corpus` beside the checkout, or the cache folder tests/corpus/fetch.py fills
/// (`$DELTADOC_CORPUS_CACHE`, else `$XDG_CACHE_HOME` or `~/.cache`, then `deltadoc/corpus`).
fn find_corpus() -> Option<PathBuf> {
    let cache = std::env::var_os("DELTADOC_CORPUS_CACHE").map(PathBuf::from).or_else(|| {
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
        Some(base.join("deltadoc/corpus"))
    });
    let candidates = [std::env::var_os("DELTADOC_CORPUS").map(PathBuf::from), Some(root().join("../shared/corpus")), cache];
    candidates.into_iter().flatten().find(|p| p.join("MANIFEST.tsv").is_file())
}

/// The test corpus, or `None` after a loud notice naming the command that brings it (the test
/// then checks nothing). With `DELTADOC_CORPUS_REQUIRED=1`, as `.ci/run` sets, a missing
/// corpus fails the test instead.
pub fn corpus() -> Option<PathBuf> {
    let found = find_corpus();
    if found.is_none() {
        let msg = "test corpus not found ($DELTADOC_CORPUS, ../shared/corpus, ~/.cache/deltadoc/corpus): \
                   `python3 tests/corpus/fetch.py` brings it";
        assert!(std::env::var("DELTADOC_CORPUS_REQUIRED").as_deref() != Ok("1"), "{msg} (DELTADOC_CORPUS_REQUIRED=1)");
        // Past the test harness's capture, so that the skip shows even when the test passes.
        let _ = writeln!(std::io::stderr(), "\n*** SKIPPED: {msg} ***\n");
    }
    found
}

/// The corpus in a test that has already checked [`corpus`].
pub fn corpus_path() -> PathBuf {
    find_corpus().expect("the test checked common::corpus() first")
}

/// Folder of a fixture: a name under onnx/fixtures, or an absolute path.
pub fn fixture_dir(fixture: &str) -> PathBuf {
    let p = Path::new(fixture);
    if p.is_absolute() { p.to_path_buf() } else { root().join("onnx/fixtures").join(fixture) }
}

/// A temporary folder for the whole test binary, removed when the binary exits.
///
/// Statics are never dropped, so a `static TempDir` would leak one folder (hundreds of MB of
/// imported models) per run; libtest ends through `exit`, which runs `atexit` handlers.
pub fn scratch_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove() {
        if let Some(dir) = DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir").keep();
        // SAFETY: `remove` is a plain function that only reads an initialised static.
        unsafe { libc::atexit(remove) };
        dir
    })
}

/// Imports a committed fixture checkpoint once per (fixture, precision) and returns the folder
/// (deltadoc operators, exact f32 KV cache: what the parity tolerances assume).
pub fn imported(fixture: &str, precision: Precision) -> PathBuf {
    imported_with(
        fixture,
        ExportOptions { precision, quant_block: None, linear_attn: LinearAttn::Deltadoc, kv_cache: KvCache::F32 },
    )
}

/// [`imported`] with any export options.
pub fn imported_with(fixture: &str, opts: ExportOptions) -> PathBuf {
    type Imports = HashMap<(String, ExportOptions), PathBuf>;
    static CACHE: OnceLock<Mutex<Imports>> = OnceLock::new();
    let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(|p| p.into_inner());
    cache
        .entry((fixture.to_string(), opts))
        .or_insert_with(|| {
            let name =
                format!("{}-{}-{:?}-{:?}", fixture.replace('/', "_"), opts.precision.name(), opts.linear_attn, opts.kv_cache);
            let out = scratch_dir().join(name);
            let hf = fixture_dir(fixture).join("hf");
            model::import(&hf, &out, opts).unwrap_or_else(|e| panic!("import of {fixture} failed: {e:#}"));
            out
        })
        .clone()
}

pub fn open(dir: &Path) -> ModelDir {
    ModelDir::open(dir).unwrap()
}

/// Golden tensors written by onnx/make_goldens.py.
pub struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    pub fn load(fixture: &str) -> Self {
        Self::from_file(&fixture_dir(fixture).join("golden.safetensors"))
    }

    pub fn from_file(p: &Path) -> Self {
        Self { bytes: std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())) }
    }

    fn view(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("golden has no {name}"));
        (t.shape().to_vec(), t.data().to_vec())
    }

    pub fn f32(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let (s, d) = self.view(name);
        (s, d.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }

    pub fn u8(&self, name: &str) -> (Vec<usize>, Vec<u8>) {
        self.view(name)
    }

    pub fn i64(&self, name: &str) -> (Vec<usize>, Vec<i64>) {
        let (s, d) = self.view(name);
        (s, d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
    }

    pub fn ids(&self, name: &str) -> Vec<u32> {
        let (_, d) = self.view(name);
        d.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
    }

    pub fn has(&self, name: &str) -> bool {
        SafeTensors::deserialize(&self.bytes).unwrap().tensor(name).is_ok()
    }
}

/// Largest absolute difference.
pub fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Fraction of rows (of width `v`) whose argmax agrees.
pub fn top1_agreement(a: &[f32], b: &[f32], v: usize) -> f64 {
    let rows = a.len() / v;
    let same = (0..rows)
        .filter(|&r| deltadoc::generate::argmax(&a[r * v..(r + 1) * v]) == deltadoc::generate::argmax(&b[r * v..(r + 1) * v]))
        .count();
    same as f64 / rows as f64
}

/// Logits of every position, feeding `ids` in calls of `chunk` tokens.
pub fn logits_in_chunks(dec: &mut Decoder, ids: &[u32], chunk: usize) -> Vec<f32> {
    let mut out = Vec::new();
    for part in ids.chunks(chunk) {
        out.extend(dec.forward(part, Logits::All).unwrap().iter().copied());
    }
    out
}

/// Logits of every position: the first `k` tokens prefilled in calls of `chunk`, the rest fed
/// one at a time through the decode path.
pub fn prefill_then_decode(dec: &mut Decoder, ids: &[u32], k: usize, chunk: usize) -> Vec<f32> {
    let mut got = logits_in_chunks(dec, &ids[..k], chunk);
    for &t in &ids[k..] {
        got.extend(dec.forward(&[t], Logits::All).unwrap().iter().copied());
    }
    got
}

/// Runs the `deltadoc` binary (logging at warn) and returns its output, whatever the status.
pub fn deltadoc_output(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_deltadoc")).args(args).env("DELTADOC_LOG", "warn").output().unwrap()
}

/// Runs the `deltadoc` binary and fails the test, with its stderr, unless it succeeds.
pub fn deltadoc(args: &[&str]) -> std::process::Output {
    let out = deltadoc_output(args);
    assert!(out.status.success(), "deltadoc {args:?} failed: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}
