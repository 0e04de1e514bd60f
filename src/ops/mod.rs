//! deltadoc's own ONNX Runtime operators (domain [`DOMAIN`]), the DeltaNet half of Qwen3.5.
//!
//! - `CausalConv1dWithState(x, weight, past_state) -> (y, present_state)`
//! - `GatedDeltaRule(q, k, v, g, beta, past_state) -> (o, present_state)`
//!
//! and the attention half's long-context kernel:
//! - `CausalAttention` / `CausalAttentionF16(q, k, v, past_key, past_value) -> (out, present_key,
//!   present_value)`
//!
//! The op contract (shapes, attributes, state layout) is written down in onnx/README.md; the
//! numerical kernels live in the `deltadoc-kernels` crate ([`attention`], [`conv`],
//! [`gated_delta`]) and know nothing of ONNX Runtime.

use deltadoc_kernels::simd;
pub use deltadoc_kernels::{attention, conv, gated_delta};

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Mutex;

use ort::operator::{
    ComputeContext, Kernel, KernelContext, Operator, OperatorDomain, OperatorInput, OperatorOutput, ShapeInferenceContext,
};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use self::conv::Activation;
use self::gated_delta::{ChunkScratch, HeadInputs};

/// Custom-op domain of the exported graphs.
pub const DOMAIN: &str = "ai.deltadoc";
/// Version of [`DOMAIN`] the importer writes into `opset_import`.
pub const DOMAIN_VERSION: i64 = 1;

/// Builds the operator domain to register on every session that runs a deltadoc graph.
pub fn domain() -> ort::Result<OperatorDomain> {
    OperatorDomain::new(DOMAIN)?
        .add(CausalConv1dWithState)?
        .add(GatedDeltaRule)?
        .add(CausalAttention::<f32>::default())?
        .add(CausalAttention::<half::f16>::default())?
        .add(CausalAttention::<half::bf16>::default())
}

fn err(msg: impl Into<String>) -> ort::Error {
    ort::Error::new(msg.into())
}

/// Runs a kernel body and turns a panic into an ORT error: a panic unwinding through ORT's C
/// frames would abort the whole daemon (specs/rust-stack.md §2, pitfall 1).
fn guarded(name: &str, body: impl FnOnce() -> ort::Result<()>) -> ort::Result<()> {
    match catch_unwind(AssertUnwindSafe(body)) {
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

/// Causal depthwise conv over `x: [B, T, C]` with `weight: [C, K]` and `past_state: [B, C, K − 1]`.
pub struct CausalConv1dWithState;

/// Kernel of [`CausalConv1dWithState`] for one graph node.
pub struct ConvKernel {
    act: Activation,
}

impl Operator for CausalConv1dWithState {
    type Kernel<'a> = ConvKernel;

    fn name(&self) -> &str {
        "CausalConv1dWithState"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..3).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        (0..2).map(|_| OperatorOutput::required(TensorElementType::Float32))
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<ConvKernel> {
        let name = kctx.get::<String>("activation").unwrap_or_else(|| "silu".into());
        let act = Activation::parse(&name)
            .ok_or_else(|| err(format!("{DOMAIN}::CausalConv1dWithState: unknown activation {name:?}")))?;
        Ok(ConvKernel { act })
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        ctx.set_output(0, &inputs[0])?;
        ctx.set_output(1, &inputs[2])
    }
}

impl Kernel for ConvKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        guarded("CausalConv1dWithState", || {
            const OP: &str = "CausalConv1dWithState";
            inputs!(ctx, OP; (xs, x): f32 = 0 "x", (ws, w): f32 = 1 "weight", (ss, s): f32 = 2 "past_state");
            let (xd, wd, sd) = (dims(xs), dims(ws), dims(ss));
            if xd.len() != 3 || wd.len() != 2 || sd.len() != 3 {
                return Err(err(format!("{OP}: expected x [B,T,C], weight [C,K], state [B,C,K-1]; got {xd:?}, {wd:?}, {sd:?}")));
            }
            let (b, t, c) = (xd[0], xd[1], xd[2]);
            let k = wd[1];
            if wd[0] != c || sd != [b, c, k - 1] || k == 0 || k > conv::MAX_KERNEL {
                return Err(err(format!("{OP}: inconsistent shapes x {xd:?}, weight {wd:?}, state {sd:?}")));
            }
            let (mut y, mut ns) = (output(ctx, 0, xs.to_vec(), OP)?, output(ctx, 1, ss.to_vec(), OP)?);
            let (_, y) = y.try_extract_tensor_mut::<f32>()?;
            let (_, ns) = ns.try_extract_tensor_mut::<f32>()?;
            let (row, srow) = (t * c, c * (k - 1));
            if t == 1 {
                // Decode: microseconds of work, done in place of a prepared layout and a pool.
                for bi in 0..b {
                    let (rows, states) = (bi * c..(bi + 1) * c, bi * srow..(bi + 1) * srow);
                    conv::step(&x[rows.clone()], w, &s[states.clone()], &mut y[rows], &mut ns[states], self.act);
                }
                return Ok(());
            }
            ns.copy_from_slice(s);
            // Blocks of rows on ORT's pool: the conv and its activation are per-row independent.
            const BLOCK_ROWS: usize = 32;
            let blocks = t.div_ceil(BLOCK_ROWS);
            let yp = SharedMut(y.as_mut_ptr());
            for bi in 0..b {
                let xb = &x[bi * row..(bi + 1) * row];
                let prep = conv::Prepared::new(w, &s[bi * srow..(bi + 1) * srow], c);
                let act = self.act;
                ctx.par_for(blocks, blocks, |blk| {
                    let rows = blk * BLOCK_ROWS..((blk + 1) * BLOCK_ROWS).min(t);
                    // SAFETY: block `blk` writes only its own rows of batch row `bi`.
                    let out = unsafe { std::slice::from_raw_parts_mut(yp.at(bi * row + rows.start * c), rows.len() * c) };
                    prep.rows(xb, rows, out, act);
                })?;
                prep.next_state(xb, &mut ns[bi * srow..(bi + 1) * srow]);
            }
            Ok(())
        })
    }
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

/// Which gated-delta kernel a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKernel {
    /// Recurrent for single-token calls, chunked otherwise (what the reference does).
    Auto,
    /// Always the chunked kernel.
    Chunked,
    /// Always the token-by-token kernel.
    Recurrent,
}

/// Gated delta rule over packed heads: `q, k: [B, T, Hk·Dk]`, `v: [B, T, Hv·Dv]`,
/// `g, beta: [B, T, Hv]`, `past_state: [B, Hv, Dk, Dv]` (f32).
pub struct GatedDeltaRule;

/// Kernel of [`GatedDeltaRule`] for one graph node: its attributes.
pub struct RuleKernelImpl {
    num_k_heads: usize,
    num_v_heads: usize,
    scale: f32,
    l2norm: bool,
    kernel: RuleKernel,
}

/// Buffers of one rule call, reused from call to call (fresh multi-megabyte allocations every
/// call cost page faults).
#[derive(Default)]
struct RuleScratch {
    /// Normalised q and k per key head, `[B, Hk, T, Dk]`.
    qn: Vec<f32>,
    kn: Vec<f32>,
    /// One per (batch, value head).
    heads: Vec<HeadScratch>,
}

static RULE_SCRATCH: Pool<RuleScratch> = Pool::new();

/// Contiguous per-head inputs, output and chunk scratch of one value head.
#[derive(Default)]
struct HeadScratch {
    v: Vec<f32>,
    g: Vec<f32>,
    beta: Vec<f32>,
    out: Vec<f32>,
    chunk: ChunkScratch,
}

impl Operator for GatedDeltaRule {
    type Kernel<'a> = RuleKernelImpl;

    fn name(&self) -> &str {
        "GatedDeltaRule"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..6).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        (0..2).map(|_| OperatorOutput::required(TensorElementType::Float32))
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<RuleKernelImpl> {
        const OP: &str = "GatedDeltaRule";
        let heads = |name: &str| -> ort::Result<usize> {
            match kctx.get::<i64>(name) {
                Some(v) if v > 0 => Ok(v as usize),
                other => Err(err(format!("{DOMAIN}::{OP}: attribute {name} must be a positive int, got {other:?}"))),
            }
        };
        let num_k_heads = heads("num_k_heads")?;
        let num_v_heads = heads("num_v_heads")?;
        if !num_v_heads.is_multiple_of(num_k_heads) {
            return Err(err(format!("{DOMAIN}::{OP}: num_v_heads {num_v_heads} is not a multiple of num_k_heads {num_k_heads}")));
        }
        let kernel = match kctx.get::<String>("kernel").as_deref().unwrap_or("auto") {
            "auto" => RuleKernel::Auto,
            "chunked" => RuleKernel::Chunked,
            "recurrent" => RuleKernel::Recurrent,
            other => return Err(err(format!("{DOMAIN}::{OP}: unknown kernel {other:?}"))),
        };
        Ok(RuleKernelImpl {
            num_k_heads,
            num_v_heads,
            scale: kctx.get::<f32>("scale").unwrap_or(0.0),
            l2norm: kctx.get::<i64>("use_qk_l2norm").unwrap_or(1) != 0,
            kernel,
        })
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        ctx.set_output(0, &inputs[2])?;
        ctx.set_output(1, &inputs[5])
    }
}

impl Kernel for RuleKernelImpl {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        guarded("GatedDeltaRule", || self.run(ctx))
    }
}

impl RuleKernelImpl {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        const OP: &str = "GatedDeltaRule";
        inputs!(ctx, OP;
            (qs, q): f32 = 0 "q",
            (ks, k): f32 = 1 "k",
            (vs, v): f32 = 2 "v",
            (gs, g): f32 = 3 "g",
            (bs, beta): f32 = 4 "beta",
            (ss, s): f32 = 5 "past_state",
        );
        let (hk, hv) = (self.num_k_heads, self.num_v_heads);
        let sd = dims(ss);
        if sd.len() != 4 || sd[1] != hv {
            return Err(err(format!("{OP}: past_state must be [B, {hv}, Dk, Dv], got {sd:?}")));
        }
        let (b, dk, dv) = (sd[0], sd[2], sd[3]);
        let qd = dims(qs);
        if qd.len() != 3 || qd[0] != b {
            return Err(err(format!("{OP}: q must be [B, T, {hk}·Dk] with B = {b}, got {qd:?}")));
        }
        let t = qd[1];
        let expect = [
            ("q", dims(qs), [b, t, hk * dk]),
            ("k", dims(ks), [b, t, hk * dk]),
            ("v", dims(vs), [b, t, hv * dv]),
            ("g", dims(gs), [b, t, hv]),
            ("beta", dims(bs), [b, t, hv]),
        ];
        for (name, got, want) in &expect {
            if got.as_slice() != want {
                return Err(err(format!("{OP}: {name} has shape {got:?}, expected {want:?}")));
            }
        }
        let (mut o, mut ns) = (output(ctx, 0, vs.to_vec(), OP)?, output(ctx, 1, ss.to_vec(), OP)?);
        let (_, o) = o.try_extract_tensor_mut::<f32>()?;
        let (_, ns) = ns.try_extract_tensor_mut::<f32>()?;
        let scale = if self.scale > 0.0 { self.scale } else { (dk as f32).powf(-0.5) };
        let use_recurrent = match self.kernel {
            RuleKernel::Auto => t == 1,
            RuleKernel::Recurrent => true,
            RuleKernel::Chunked => false,
        };

        // Normalised q/k per key head, contiguous [B, Hk, T, D], shared by the value heads of a group.
        // Every element is overwritten below, so resizing never needs to clear.
        let mut scratch = RULE_SCRATCH.take();
        let sc = &mut *scratch;
        sc.qn.resize(b * hk * t * dk, 0.0);
        sc.kn.resize(b * hk * t * dk, 0.0);
        sc.heads.resize_with(b * hv, HeadScratch::default);
        let (qp, kp) = (SharedMut(sc.qn.as_mut_ptr()), SharedMut(sc.kn.as_mut_ptr()));
        let l2 = self.l2norm;
        ctx.par_for(b * hk, b * hk, |i| {
            let _flush = simd::FlushDenormals::new();
            let (bi, h) = (i / hk, i % hk);
            // SAFETY: worker i writes only rows [i·T·Dk, (i+1)·T·Dk) of qn and kn.
            let (qh, kh) = unsafe {
                (
                    std::slice::from_raw_parts_mut(qp.at(i * t * dk), t * dk),
                    std::slice::from_raw_parts_mut(kp.at(i * t * dk), t * dk),
                )
            };
            for ti in 0..t {
                let src = (bi * t + ti) * hk * dk + h * dk;
                qh[ti * dk..(ti + 1) * dk].copy_from_slice(&q[src..src + dk]);
                kh[ti * dk..(ti + 1) * dk].copy_from_slice(&k[src..src + dk]);
            }
            if l2 {
                gated_delta::prepare_qk(qh, dk, scale);
                gated_delta::prepare_qk(kh, dk, 1.0);
            } else {
                qh.iter_mut().for_each(|x| *x *= scale);
            }
        })?;

        let (op, sp) = (SharedMut(o.as_mut_ptr()), SharedMut(ns.as_mut_ptr()));
        let hp = SharedMut(sc.heads.as_mut_ptr());
        let (qn, kn) = (&sc.qn, &sc.kn);
        let group = hv / hk;
        ctx.par_for(b * hv, b * hv, |i| {
            let _flush = simd::FlushDenormals::new();
            let (bi, h) = (i / hv, i % hv);
            let kh = bi * hk + h / group;
            // SAFETY: worker i is the only one to touch head scratch i.
            let hs = unsafe { &mut *hp.at(i) };
            hs.v.resize(t * dv, 0.0);
            hs.g.resize(t, 0.0);
            hs.beta.resize(t, 0.0);
            hs.out.resize(t * dv, 0.0);
            for ti in 0..t {
                let row = bi * t + ti;
                hs.v[ti * dv..(ti + 1) * dv].copy_from_slice(&v[row * hv * dv + h * dv..row * hv * dv + (h + 1) * dv]);
                hs.g[ti] = g[row * hv + h];
                hs.beta[ti] = beta[row * hv + h];
            }
            let inp = HeadInputs {
                q: &qn[kh * t * dk..(kh + 1) * t * dk],
                k: &kn[kh * t * dk..(kh + 1) * t * dk],
                v: &hs.v,
                g: &hs.g,
                beta: &hs.beta,
                dk,
                dv,
            };
            // SAFETY: worker i owns state block i ([Dk, Dv]) and the columns of head h in the rows
            // of batch bi of `o`; no two workers share either.
            let state = unsafe { std::slice::from_raw_parts_mut(sp.at(i * dk * dv), dk * dv) };
            let past = &s[i * dk * dv..(i + 1) * dk * dv];
            if use_recurrent {
                gated_delta::recurrent(&inp, past, state, &mut hs.out);
            } else {
                state.copy_from_slice(past);
                gated_delta::chunked(&inp, state, &mut hs.out, &mut hs.chunk);
            }
            for ti in 0..t {
                let dst = (bi * t + ti) * hv * dv + h * dv;
                unsafe { std::slice::from_raw_parts_mut(op.at(dst), dv) }.copy_from_slice(&hs.out[ti * dv..(ti + 1) * dv]);
            }
        })?;
        Ok(())
    }
}

/// Causal grouped-query attention with a growing KV cache, computed blockwise
/// ([`attention`]): `q: [B, S, Hq, D]`, `k, v: [B, S, Hkv, D]` (f32, positions already rotated),
/// `past_key, past_value: [B, P, Hkv, D]` → `out: [B, S, Hq·D]` (f32) and `new_key, new_value:
/// [B, S, Hkv, D]`, this call's keys and values rounded to the cache's type. The caller appends
/// those to its cache: the cache is position-major so that appending never moves it, and the op
/// never copies it (ORT gives a custom op no way to update an input in place; returning the whole
/// grown cache cost a read and a write of it per call, two thirds of a decode step's attention
/// traffic). The cache is f32 for `CausalAttention`, f16 for `CausalAttentionF16` and bf16 for
/// `CausalAttentionBF16` (which computes in bf16 where the CPU can): ORT binds one element type
/// per input of a custom op.
pub struct CausalAttention<T>(std::marker::PhantomData<T>);

impl<T> Default for CausalAttention<T> {
    fn default() -> Self {
        Self(std::marker::PhantomData)
    }
}

/// The cache element types the operator is registered for.
pub trait CacheType: attention::CacheElem + ort::value::PrimitiveTensorElementType + std::fmt::Debug {
    /// Operator name for this cache type.
    const OP: &'static str;
}

impl CacheType for f32 {
    const OP: &'static str = "CausalAttention";
}

impl CacheType for half::f16 {
    const OP: &'static str = "CausalAttentionF16";
}

impl CacheType for half::bf16 {
    const OP: &'static str = "CausalAttentionBF16";
}

/// Kernel of [`CausalAttention`]: its attributes.
pub struct AttentionKernel<T> {
    q_heads: usize,
    kv_heads: usize,
    scale: f32,
    _cache: std::marker::PhantomData<T>,
}

/// One scratch per work item of an attention call.
static TILE_SCRATCH: Pool<Vec<attention::TileScratch>> = Pool::new();
/// One scratch per part and KV head of a split (decode) call.
static SPLIT_SCRATCH: Pool<Vec<Vec<attention::TileScratch>>> = Pool::new();
/// Parts of a split call at most: enough to keep every core of a large server busy; each part
/// costs a merge of its partial output.
const MAX_PARTS: usize = 16;

impl<T: CacheType> Operator for CausalAttention<T> {
    type Kernel<'a> = AttentionKernel<T>;

    fn name(&self) -> &str {
        T::OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(T::into_tensor_element_type()),
            OperatorInput::required(T::into_tensor_element_type()),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [
            OperatorOutput::required(TensorElementType::Float32),
            OperatorOutput::required(T::into_tensor_element_type()),
            OperatorOutput::required(T::into_tensor_element_type()),
        ]
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<AttentionKernel<T>> {
        let heads = |name: &str| -> ort::Result<usize> {
            match kctx.get::<i64>(name) {
                Some(v) if v > 0 => Ok(v as usize),
                other => Err(err(format!("{DOMAIN}::{}: attribute {name} must be a positive int, got {other:?}", T::OP))),
            }
        };
        let (q_heads, kv_heads) = (heads("num_heads")?, heads("kv_num_heads")?);
        if !q_heads.is_multiple_of(kv_heads) {
            return Err(err(format!("{DOMAIN}::{}: num_heads {q_heads} is not a multiple of kv_num_heads {kv_heads}", T::OP)));
        }
        Ok(AttentionKernel {
            q_heads,
            kv_heads,
            scale: kctx.get::<f32>("scale").unwrap_or(0.0),
            _cache: std::marker::PhantomData,
        })
    }
    // ORT cannot infer the outputs of a custom op; without ranks here the nodes after it (the
    // next layer's splits) fail type inference.
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        let (
            ValueType::Tensor { shape: qs, dimension_symbols: qsym, .. },
            ValueType::Tensor { ty: cache_ty, shape: ks, dimension_symbols: ksym },
        ) = (&inputs[0], &inputs[3])
        else {
            return Err(err(format!("{}: q and past_key must be tensors", T::OP)));
        };
        if qs.len() != 4 || ks.len() != 4 {
            return Err(err(format!("{}: q and past_key must have rank 4", T::OP)));
        }
        let width = if qs[2] > 0 && qs[3] > 0 { qs[2] * qs[3] } else { -1 };
        let out = ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape: Shape::new([qs[0], qs[1], width]),
            dimension_symbols: SymbolicDimensions::new([qsym[0].clone(), qsym[1].clone(), String::new()]),
        };
        let new_rows = ValueType::Tensor {
            ty: *cache_ty,
            shape: Shape::new([qs[0], qs[1], ks[2], ks[3]]),
            dimension_symbols: SymbolicDimensions::new([qsym[0].clone(), qsym[1].clone(), ksym[2].clone(), ksym[3].clone()]),
        };
        ctx.set_output(0, &out)?;
        ctx.set_output(1, &new_rows)?;
        ctx.set_output(2, &new_rows)
    }
}

impl<T: CacheType> Kernel for AttentionKernel<T> {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        guarded(T::OP, || self.run(ctx))
    }
}

impl<T: CacheType> AttentionKernel<T> {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = T::OP;
        inputs!(ctx, op;
            (qs, q): f32 = 0 "q",
            (ks, k): f32 = 1 "k",
            (vs, v): f32 = 2 "v",
            (pks, pk): T = 3 "past_key",
            (pvs, pv): T = 4 "past_value",
        );
        let (hq, hkv) = (self.q_heads, self.kv_heads);
        let qd = dims(qs);
        if qd.len() != 4 || qd[2] != hq {
            return Err(err(format!("{op}: q must be [B, S, {hq}, D], got {qd:?}")));
        }
        let (b, s, hd) = (qd[0], qd[1], qd[3]);
        let pd = dims(pks);
        if pd.len() != 4 || pd[0] != b || pd[2] != hkv || pd[3] != hd {
            return Err(err(format!("{op}: past_key must be [{b}, P, {hkv}, {hd}], got {pd:?}")));
        }
        let past = pd[1];
        let rows_shape = vec![b, s, hkv, hd];
        for (name, got, want) in [("k", dims(ks), &rows_shape), ("v", dims(vs), &rows_shape), ("past_value", dims(pvs), &pd)] {
            if got != *want {
                return Err(err(format!("{op}: {name} has shape {got:?}, expected {want:?}")));
            }
        }
        let scale = if self.scale > 0.0 { self.scale } else { (hd as f32).powf(-0.5) };
        let d = attention::Dims { q_heads: hq, kv_heads: hkv, head_dim: hd, past, new: s, scale };
        let rows_dims: Vec<i64> = rows_shape.iter().map(|&x| x as i64).collect();
        let mut out = output(ctx, 0, vec![b as i64, s as i64, (hq * hd) as i64], op)?;
        let mut nk = output(ctx, 1, rows_dims.clone(), op)?;
        let mut nv = output(ctx, 2, rows_dims, op)?;
        let (_, out) = out.try_extract_tensor_mut::<f32>()?;
        let (_, nk) = nk.try_extract_tensor_mut::<T>()?;
        let (_, nv) = nv.try_extract_tensor_mut::<T>()?;
        // Attention reads this call's rows back rounded, so a token sees the same keys whether it
        // was prefilled in this call or an earlier one.
        T::store(k, nk);
        T::store(v, nv);
        let (row_in, row_past) = (s * hkv * hd, past * hkv * hd);
        let (nk, nv): (&[T], &[T]) = (nk, nv);
        let group = hq / hkv;
        // Batch row bi's queries, KV head h's cache, and where query head g of KV head h at the
        // call's position pos goes in `out`.
        let queries = |bi: usize| &q[bi * s * hq * hd..(bi + 1) * s * hq * hd];
        let head_cache = |bi: usize, h: usize| {
            let (past_rows, new_rows) = (bi * row_past..(bi + 1) * row_past, bi * row_in..(bi + 1) * row_in);
            attention::HeadCache::new([&pk[past_rows.clone()], &pv[past_rows]], [&nk[new_rows.clone()], &nv[new_rows]], &d, h)
        };
        let out_at = |bi: usize, pos: usize, h: usize, g: usize| ((bi * s + pos) * hq + h * group + g) * hd;

        if attention::splits(&d) {
            // Decode over a long cache: threads take stretches of positions for every KV head
            // (flash-decoding) rather than a KV head each, so each reads the position-major
            // cache contiguously.
            let parts = attention::key_parts(&d, MAX_PARTS);
            let mut scratch = SPLIT_SCRATCH.take();
            scratch.resize_with(parts.len(), Vec::new);
            for heads in scratch.iter_mut() {
                heads.resize_with(hkv, Default::default);
            }
            for bi in 0..b {
                let kv: Vec<_> = (0..hkv).map(|h| head_cache(bi, h)).collect();
                let qb = queries(bi);
                let sp = SharedMut(scratch.as_mut_ptr());
                ctx.par_for(parts.len(), parts.len(), |i| {
                    // SAFETY: item i is the only user of part i's scratch.
                    let heads = unsafe { &mut *sp.at(i) };
                    attention::split_keys(qb, &kv, &d, parts[i].clone(), heads);
                })?;
                let (first, rest) = scratch.split_first_mut().expect("a split call has a part");
                for (h, sc) in first.iter_mut().enumerate() {
                    attention::merge_parts(sc, rest.iter().map(|p| &p[h]), hd);
                    for g in 0..group {
                        for pos in 0..s {
                            let at = out_at(bi, pos, h, g);
                            out[at..at + hd].copy_from_slice(sc.output(g, pos, hd));
                        }
                    }
                }
            }
            return Ok(());
        }

        let tiles_per_head = s.div_ceil(attention::QUERY_TILE);
        let items = b * hkv * tiles_per_head;
        let mut tiles = TILE_SCRATCH.take();
        tiles.resize_with(items, Default::default);
        let (tp, op_out) = (SharedMut(tiles.as_mut_ptr()), SharedMut(out.as_mut_ptr()));
        ctx.par_for(items, items, |i| {
            let (bi, h, t) = (i / (hkv * tiles_per_head), i / tiles_per_head % hkv, i % tiles_per_head);
            let rows = t * attention::QUERY_TILE..((t + 1) * attention::QUERY_TILE).min(s);
            // SAFETY: item i is the only user of scratch i.
            let sc = unsafe { &mut *tp.at(i) };
            attention::tile(queries(bi), head_cache(bi, h), &d, h, rows.clone(), sc);
            for g in 0..group {
                for (j, pos) in rows.clone().enumerate() {
                    let at = out_at(bi, pos, h, g);
                    // SAFETY: (batch row, position, query head) triples are disjoint across items.
                    unsafe { std::slice::from_raw_parts_mut(op_out.at(at), hd) }.copy_from_slice(sc.output(g, j, hd));
                }
            }
        })?;
        Ok(())
    }
}
