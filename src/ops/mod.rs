//! deltadoc's own ONNX Runtime operators (domain [`DOMAIN`]), the DeltaNet half of Qwen3.5.
//!
//! - `CausalConv1dWithState(x, weight, past_state) -> (y, present_state)`
//! - `GatedDeltaRule(q, k, v, g, beta, past_state) -> (o, present_state)`
//!
//! and the attention half's long-context kernel:
//! - `CausalAttention` / `CausalAttentionF16(q, k, v, past_key, past_value) -> (out, present_key,
//!   present_value)`
//!
//! and the matmul of block-quantised weights, packed in panels at import:
//! - `QuantMatMul(x, packed[, rows]) -> y`
//!
//! The op contract (shapes, attributes, state layout) is written down in onnx/README.md; the
//! numerical kernels live in the `deltadoc-kernels` crate ([`attention`], [`conv`],
//! [`gated_delta`], [`quant_matmul`]) and know nothing of ONNX Runtime.

pub use deltadoc_kernels::{attention, conv, gated_delta, quant_matmul};

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use ort::operator::{ComputeContext, OperatorDomain};

pub use causal_attention::{AttentionKernel, CacheType, CausalAttention};
pub use causal_conv::{CausalConv1dWithState, ConvKernel};
pub use delta_rule::{GatedDeltaRule, RuleAlgorithm, RuleKernel};
pub use quant_linear::{QuantMatMul, QuantMatMulKernel};

use op_time::OpKind;

/// Custom-op domain of the exported graphs.
pub const DOMAIN: &str = "ai.deltadoc";
/// Version of [`DOMAIN`] the importer writes into `opset_import`.
pub const DOMAIN_VERSION: i64 = 1;

/// Builds the operator domain to register on every session that runs a deltadoc graph, one
/// whose intra-op pool has `threads` threads.
pub fn domain(threads: usize) -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(CausalConv1dWithState)?
        .add(GatedDeltaRule)?
        .add(CausalAttention::<f32>::default())?
        .add(CausalAttention::<half::f16>::default())?
        .add(CausalAttention::<half::bf16>::default())?
        .add(QuantMatMul { threads })
}

fn err(msg: impl Into<String>) -> ort::Error {
    ort::Error::new(msg.into())
}

/// Runs a kernel body of the operator `name` (of `kind`), counts its time ([`op_time`]) and
/// turns a panic into an ORT error: a panic unwinding through ORT's C frames would abort the whole
/// daemon (docs/model.md, "Operators").
fn guarded(name: &str, kind: OpKind, body: impl FnOnce() -> ort::Result<()>) -> ort::Result<()> {
    let since = Instant::now();
    let result = catch_unwind(AssertUnwindSafe(body));
    op_time::record(kind, since);
    match result {
        Ok(r) => r,
        Err(p) => {
            let what = p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            Err(err(format!("{DOMAIN}::{name} panicked: {what}")))
        }
    }
}

/// Runs `task(i)` for every `i` in `0..n` on the session's intra-op pool, the calling thread
/// included. Every operator parallelises through here, so that [`op_time`] counts each section
/// beside its tasks' own time: on the 2-vCPU machine a section costs 5-12 µs more than its
/// tasks shared evenly (the other thread starts ~5 µs late and reports its end ~2 µs late),
/// 1.2-1.5 ms of a 0.8B decode step's 139 sections (benches/RESULTS.md, "The pool's cost").
fn parallel(ctx: &ComputeContext, kind: OpKind, n: usize, task: impl Fn(usize) + Sync + Send) -> ort::Result<()> {
    let since = Instant::now();
    let busy = AtomicU64::new(0);
    ctx.par_for(n, n, |i| {
        let start = Instant::now();
        task(i);
        busy.fetch_add(start.elapsed().as_nanos() as u64, Relaxed);
    })?;
    op_time::section(kind, since, busy.into_inner());
    Ok(())
}

/// A raw pointer shared by the parallel workers; each worker touches a disjoint region.
struct SharedMut<T>(*mut T);
// Manual impls: a derive would require `T: Copy`.
impl<T> Clone for SharedMut<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SharedMut<T> {}
// SAFETY: used only to reach disjoint elements from `par_for` workers while the owning buffer
// outlives the parallel loop.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer; a method so closures capture the whole `Sync` wrapper, not the raw field.
    fn at(self, offset: usize) -> *mut T {
        // SAFETY: callers stay within the allocation the pointer came from.
        unsafe { self.0.add(offset) }
    }
}

fn input<'a>(ctx: &'a ComputeContext, idx: usize, op: &str, what: &str) -> ort::Result<ort::value::ValueRef<'a>> {
    ctx.input(idx)?.ok_or_else(|| err(format!("{DOMAIN}::{op}: missing input {idx} ({what})")))
}

/// Input `idx` where the node has one there and it is not left empty ("").
fn optional_input<'a>(ctx: &'a ComputeContext, idx: usize) -> ort::Result<Option<ort::value::ValueRef<'a>>> {
    if ctx.num_inputs()? > idx { ctx.input(idx) } else { Ok(None) }
}

/// Binds `(shape, data)` of inputs 0, 1, … in order, as element type `$ty`; a missing input or
/// another element type is an error naming the op and the input. A macro because the data
/// borrows from a value that must live in the caller's scope.
macro_rules! inputs {
    ($ctx:expr, $op:expr; $(($shape:ident, $data:ident): $ty:ty = $idx:literal $what:literal),+ $(,)?) => {
        $(
            let value = input($ctx, $idx, $op, $what)?;
            let ($shape, $data) = value.try_extract_tensor::<$ty>()?;
        )+
    };
}

fn output<'a>(ctx: &'a ComputeContext, idx: usize, shape: Vec<i64>, op: &str) -> ort::Result<ort::value::ValueRefMut<'a>> {
    ctx.output(idx, shape)?.ok_or_else(|| err(format!("{DOMAIN}::{op}: output {idx} not requested")))
}

fn dims(shape: &[i64]) -> Vec<usize> {
    shape.iter().map(|&d| d.max(0) as usize).collect()
}

/// Buffers shared by every node of one operator type. A graph runs its layers one after another,
/// so one set serves all of them; kept per node, the rule's alone held 16 MB in each of the 18
/// DeltaNet layers at the 0.8B shape with 512-token calls. Calls that do run at the same time
/// (several sessions) each take a set of their own.
struct Pool<T>(Mutex<Vec<T>>);

impl<T: Default> Pool<T> {
    const fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    /// A free set of buffers (a new one if none is free), handed back when the guard drops.
    fn take(&'static self) -> Pooled<T> {
        let item = self.0.lock().unwrap_or_else(|p| p.into_inner()).pop().unwrap_or_default();
        Pooled { pool: self, item: Some(item) }
    }
}

/// A set of buffers taken from a [`Pool`].
struct Pooled<T: 'static> {
    pool: &'static Pool<T>,
    /// `Some` until dropped.
    item: Option<T>,
}

impl<T> std::ops::Deref for Pooled<T> {
    type Target = T;
    fn deref(&self) -> &T {
        self.item.as_ref().expect("present until drop")
    }
}

impl<T> std::ops::DerefMut for Pooled<T> {
    fn deref_mut(&mut self) -> &mut T {
        self.item.as_mut().expect("present until drop")
    }
}

impl<T> Drop for Pooled<T> {
    fn drop(&mut self) {
        if let Some(item) = self.item.take() {
            self.pool.0.lock().unwrap_or_else(|p| p.into_inner()).push(item);
        }
    }
}

// After `inputs!`, which they use.
mod causal_attention;
mod causal_conv;
mod delta_rule;
pub mod op_time;
mod quant_linear;
