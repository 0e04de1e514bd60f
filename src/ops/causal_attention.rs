//! `CausalAttention` (f32, f16 and bf16 caches): blockwise causal grouped-query attention over
//! a position-major KV cache the caller appends to, either of prepared queries and keys or
//! straight from the attention layer's projection (its norms, rotary and output gate done here).

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::attention;
use super::{DOMAIN, OpKind, Pool, SharedMut, dims, err, guarded, input, optional_input, output, parallel};
use deltadoc_kernels::simd;

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
///
/// The graph's form gives instead of `q, k, v` the attention layer's whole projection `qgkv: [B,
/// S, Hq·2D + 2·Hkv·D]` (each query head's D values then its D gate values, then the keys, then
/// the values; `k` and `v` left empty) and after the cache `q_norm, k_norm: [D]` and `cos, sin:
/// [B, S, 1, R]`: the op RMS-normalises each query and key head (attribute `epsilon`), rotates
/// its first R values (NeoX halves) and multiplies the output by `σ(gate)`. These were 21 ONNX
/// nodes per layer, 126 of a 0.8B decode step, each a few microseconds of ORT's own cost on a
/// few kilobytes (benches/RESULTS.md, "Attention's small nodes inside the operator").
///
/// A batch of sequences of different lengths shares one call through the optional last input
/// `past_lengths: [B]` (int64): the cache then holds `P` rows per batch row of which row `b`'s
/// first `past_lengths[b]` are its sequence's (the rest are never read), so each sequence keeps
/// its own positions in one padded buffer. Without it every batch row has all `P`.
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
    /// RMSNorm epsilon of the graph's form.
    epsilon: f32,
    _cache: std::marker::PhantomData<T>,
}

/// Input of the graph's form whose presence selects it; `k_norm`, `cos` and `sin` follow.
const Q_NORM: usize = 5;

/// Input of each batch row's cache length, after `sin`.
const PAST_LENGTHS: usize = 9;

/// Tokens of one task when a long call of the graph's form prepares its heads or gates its
/// output; a decode step's one token stays on the calling thread.
const PREPARE_TOKENS: usize = 32;

/// The queries, keys and values a call of the graph's form prepares; one set for all layers.
#[derive(Default)]
struct Prepared {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
}
static PREPARED: Pool<Prepared> = Pool::new();

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
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::required(T::into_tensor_element_type()),
            OperatorInput::required(T::into_tensor_element_type()),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Int64),
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
            epsilon: kctx.get::<f32>("epsilon").unwrap_or(1e-6),
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
        // Rank 3: the graph's form, whose output is Hq·D wide.
        let width = match (qs.len(), ks.len()) {
            (4, 4) if qs[2] > 0 && qs[3] > 0 => qs[2] * qs[3],
            (3, 4) if ks[3] > 0 => ctx.attr::<i64>("num_heads")? * ks[3],
            (3 | 4, 4) => -1,
            _ => return Err(err(format!("{}: q (or qgkv) must have rank 4 (3) and past_key rank 4", T::OP))),
        };
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
        guarded(T::OP, OpKind::CausalAttention, || self.run(ctx))
    }
}

/// Sizes of one call.
struct Call {
    batch: usize,
    /// `past` is the cache's rows per batch row (its stride), `lengths` what each row reads.
    dims: attention::Dims,
    lengths: Vec<usize>,
}

impl<T: CacheType> AttentionKernel<T> {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        let op = T::OP;
        inputs!(ctx, op;
            (qs, q): f32 = 0 "q",
            (pks, pk): T = 3 "past_key",
            (pvs, pv): T = 4 "past_value",
        );
        let Some(q_norm) = optional_input(ctx, Q_NORM)? else {
            inputs!(ctx, op; (ks, k): f32 = 1 "k", (vs, v): f32 = 2 "v");
            let c = self.sizes(ctx, [&qs[..], &ks[..], &vs[..], &pks[..], &pvs[..]])?;
            return self.attend(ctx, &c, [q, k, v], [pk, pv], None);
        };
        inputs!(ctx, op; (_kns, k_norm): f32 = 6 "k_norm", (_coss, cos): f32 = 7 "cos", (_sins, sin): f32 = 8 "sin");
        let (_, q_norm) = q_norm.try_extract_tensor::<f32>()?;
        let pd = dims(pks);
        let (hq, hkv) = (self.q_heads, self.kv_heads);
        let xd = dims(qs);
        // The head width comes from the cache, so the cache's shape is checked before the
        // projection's width is judged by it.
        let hd = match pd[..] {
            [_, _, heads, hd] if heads == hkv && hd > 0 => hd,
            _ => return Err(err(format!("{op}: past_key must be [B, P, {hkv}, D] with D > 0, got {pd:?}"))),
        };
        if xd.len() != 3 || xd[2] != (2 * hq + 2 * hkv) * hd {
            return Err(err(format!("{op}: qgkv must be [B, S, {}] for head width {hd}, got {xd:?}", (2 * hq + 2 * hkv) * hd)));
        }
        let (b, s) = (xd[0], xd[1]);
        let rot = cos.len().checked_div(b * s).unwrap_or(0);
        if q_norm.len() != hd
            || k_norm.len() != hd
            || sin.len() != cos.len()
            || cos.len() != b * s * rot
            || rot % 2 == 1
            || rot > hd
        {
            return Err(err(format!(
                "{op}: q_norm, k_norm must be [{hd}] and cos, sin [{b}, {s}, 1, R] with R even and at most {hd}; got {}, {}, {}, {} values",
                q_norm.len(),
                k_norm.len(),
                cos.len(),
                sin.len()
            )));
        }
        let mut p = PREPARED.take();
        let heads = Heads { x: q, hq, hkv, hd, rot, norms: [q_norm, k_norm], rope: [cos, sin], epsilon: self.epsilon };
        heads.prepare(ctx, b * s, &mut p)?;
        let (q4, k4) = ([b as i64, s as i64, hq as i64, hd as i64], [b as i64, s as i64, hkv as i64, hd as i64]);
        let c = self.sizes(ctx, [&q4, &k4, &k4, &pks[..], &pvs[..]])?;
        self.attend(ctx, &c, [&p.q, &p.k, &p.v], [pk, pv], Some(&heads))
    }

    /// Attention of prepared `q, k, v` over the cache `[pk, pv]`; the output gated by `gate`'s
    /// projection where the call has the graph's form.
    fn attend(
        &self,
        ctx: &ComputeContext,
        c: &Call,
        [q, k, v]: [&[f32]; 3],
        [pk, pv]: [&[T]; 2],
        gate: Option<&Heads>,
    ) -> ort::Result<()> {
        let op = T::OP;
        let (b, d) = (c.batch, &c.dims);
        let (s, hq, hkv, hd) = (d.new, d.q_heads, d.kv_heads, d.head_dim);
        let rows_dims = vec![b as i64, s as i64, hkv as i64, hd as i64];
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
        let call = Layout { q, cache: [pk, pv], new: [nk, nv], batch: b, d, lengths: &c.lengths };
        call.attend(ctx, out)?;
        match gate {
            Some(heads) => heads.gate(ctx, b * s, out),
            None => Ok(()),
        }
    }

    /// The call's sizes, once every input's shape agrees with them and each batch row's cache
    /// length (all `P` without `past_lengths`) lies within the cache.
    fn sizes(&self, ctx: &ComputeContext, [qs, ks, vs, pks, pvs]: [&[i64]; 5]) -> ort::Result<Call> {
        let (op, hq, hkv) = (T::OP, self.q_heads, self.kv_heads);
        let qd = dims(qs);
        if qd.len() != 4 || qd[2] != hq {
            return Err(err(format!("{op}: q must be [B, S, {hq}, D], got {qd:?}")));
        }
        let (b, s, hd) = (qd[0], qd[1], qd[3]);
        let pd = dims(pks);
        if pd.len() != 4 || pd[0] != b || pd[2] != hkv || pd[3] != hd {
            return Err(err(format!("{op}: past_key must be [{b}, P, {hkv}, {hd}], got {pd:?}")));
        }
        let rows_shape = vec![b, s, hkv, hd];
        for (name, got, want) in [("k", dims(ks), &rows_shape), ("v", dims(vs), &rows_shape), ("past_value", dims(pvs), &pd)] {
            if got != *want {
                return Err(err(format!("{op}: {name} has shape {got:?}, expected {want:?}")));
            }
        }
        let lengths = match optional_input(ctx, PAST_LENGTHS)? {
            None => vec![pd[1]; b],
            Some(v) => {
                let (_, lengths) = v.try_extract_tensor::<i64>()?;
                if lengths.len() != b || lengths.iter().any(|&l| l < 0 || l as usize > pd[1]) {
                    return Err(err(format!(
                        "{op}: past_lengths must hold {b} lengths of at most the cache's {} rows, got {lengths:?}",
                        pd[1]
                    )));
                }
                lengths.iter().map(|&l| l as usize).collect()
            }
        };
        let scale = if self.scale > 0.0 { self.scale } else { (hd as f32).powf(-0.5) };
        let dims = attention::Dims { q_heads: hq, kv_heads: hkv, head_dim: hd, past: pd[1], new: s, scale };
        Ok(Call { batch: b, dims, lengths })
    }
}

/// A call of the graph's form: its projection rows and what prepares them.
struct Heads<'a> {
    /// `[tokens, Hq·2D + 2·Hkv·D]`.
    x: &'a [f32],
    hq: usize,
    hkv: usize,
    hd: usize,
    /// Rotated values at the start of each head.
    rot: usize,
    /// RMSNorm scales of query and key heads.
    norms: [&'a [f32]; 2],
    /// `[tokens, rot]` each.
    rope: [&'a [f32]; 2],
    epsilon: f32,
}

impl Heads<'_> {
    fn width(&self) -> usize {
        (2 * self.hq + 2 * self.hkv) * self.hd
    }

    /// Runs `task(tokens)` over every token of the call, in stretches of [`PREPARE_TOKENS`]
    /// across the threads when there is more than one stretch.
    fn over_tokens(ctx: &ComputeContext, tokens: usize, task: impl Fn(std::ops::Range<usize>) + Sync + Send) -> ort::Result<()> {
        let parts = tokens.div_ceil(PREPARE_TOKENS);
        if parts <= 1 {
            task(0..tokens);
            return Ok(());
        }
        parallel(ctx, OpKind::CausalAttention, parts, |i| task(i * PREPARE_TOKENS..((i + 1) * PREPARE_TOKENS).min(tokens)))
    }

    /// Fills `p` with the call's queries and keys (normalised and rotated) and values, `[tokens,
    /// heads, D]` each.
    fn prepare(&self, ctx: &ComputeContext, tokens: usize, p: &mut Prepared) -> ort::Result<()> {
        let (hq, hkv, hd) = (self.hq, self.hkv, self.hd);
        p.q.resize(tokens * hq * hd, 0.0);
        p.k.resize(tokens * hkv * hd, 0.0);
        p.v.resize(tokens * hkv * hd, 0.0);
        let (q, k, v) = (SharedMut(p.q.as_mut_ptr()), SharedMut(p.k.as_mut_ptr()), SharedMut(p.v.as_mut_ptr()));
        Self::over_tokens(ctx, tokens, |range| {
            for t in range {
                let row = &self.x[t * self.width()..(t + 1) * self.width()];
                let (keys, values) = row[2 * hq * hd..].split_at(hkv * hd);
                // SAFETY: token t's rows of q, k and v are written by this task alone.
                let (qt, kt, vt) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(q.at(t * hq * hd), hq * hd),
                        std::slice::from_raw_parts_mut(k.at(t * hkv * hd), hkv * hd),
                        std::slice::from_raw_parts_mut(v.at(t * hkv * hd), hkv * hd),
                    )
                };
                for (h, out) in qt.chunks_exact_mut(hd).enumerate() {
                    self.norm_and_rotate(t, &row[2 * h * hd..(2 * h + 1) * hd], self.norms[0], out);
                }
                for (src, out) in keys.chunks_exact(hd).zip(kt.chunks_exact_mut(hd)) {
                    self.norm_and_rotate(t, src, self.norms[1], out);
                }
                vt.copy_from_slice(values);
            }
        })
    }

    /// One head of token `t`: RMS-normalised by `scale`, its first `rot` values rotated by the
    /// token's angles (NeoX: value i pairs with value i + rot/2), `x·cos + rotate_half(x)·sin`.
    fn norm_and_rotate(&self, t: usize, src: &[f32], scale: &[f32], out: &mut [f32]) {
        simd::rms_norm(src, scale, self.epsilon, out);
        let (half, rot) = (self.rot / 2, self.rot);
        let (cos, sin) = (&self.rope[0][t * rot..(t + 1) * rot], &self.rope[1][t * rot..(t + 1) * rot]);
        for i in 0..half {
            let (a, b) = (out[i], out[i + half]);
            out[i] = a * cos[i] + -b * sin[i];
            out[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }

    /// `out [tokens, Hq·D]` times σ of each query head's gate.
    fn gate(&self, ctx: &ComputeContext, tokens: usize, out: &mut [f32]) -> ort::Result<()> {
        let (hq, hd) = (self.hq, self.hd);
        let out = SharedMut(out.as_mut_ptr());
        Self::over_tokens(ctx, tokens, |range| {
            for t in range {
                let row = &self.x[t * self.width()..];
                // SAFETY: token t's output row is gated by this task alone.
                let o = unsafe { std::slice::from_raw_parts_mut(out.at(t * hq * hd), hq * hd) };
                for (h, oh) in o.chunks_exact_mut(hd).enumerate() {
                    simd::sigmoid_gate(&row[(2 * h + 1) * hd..(2 * h + 2) * hd], oh);
                }
            }
        })
    }
}

/// Where one call's queries, cache and new rows are, and where its outputs go.
struct Layout<'a, T> {
    q: &'a [f32],
    cache: [&'a [T]; 2],
    new: [&'a [T]; 2],
    batch: usize,
    /// `past` is the cache's stride per batch row.
    d: &'a attention::Dims,
    /// Cache rows each batch row reads.
    lengths: &'a [usize],
}

impl<T: CacheType> Layout<'_, T> {
    /// Batch row `bi`'s queries.
    fn queries(&self, bi: usize) -> &[f32] {
        let n = self.d.new * self.d.q_heads * self.d.head_dim;
        &self.q[bi * n..(bi + 1) * n]
    }

    /// Batch row `bi`'s sizes: its own cache length.
    fn dims(&self, bi: usize) -> attention::Dims {
        attention::Dims { past: self.lengths[bi], ..*self.d }
    }

    /// KV head `h`'s cache and new rows in batch row `bi`.
    fn head_cache(&self, bi: usize, h: usize) -> attention::HeadCache<'_, T> {
        let d = self.d;
        let (row_past, row_in) = (d.past * d.kv_heads * d.head_dim, d.new * d.kv_heads * d.head_dim);
        let (past, new) = (bi * row_past..(bi + 1) * row_past, bi * row_in..(bi + 1) * row_in);
        let ([pk, pv], [nk, nv]) = (self.cache, self.new);
        attention::HeadCache::new([&pk[past.clone()], &pv[past]], [&nk[new.clone()], &nv[new]], &self.dims(bi), h)
    }

    /// Where query head `g` of KV head `h` at the call's position `pos` of batch row `bi` goes.
    fn out_at(&self, bi: usize, pos: usize, h: usize, g: usize) -> usize {
        let d = self.d;
        ((bi * d.new + pos) * d.q_heads + h * (d.q_heads / d.kv_heads) + g) * d.head_dim
    }

    /// Every batch row the way it is attended alone, by its own cache length: split where that
    /// is long, tiled otherwise. The two paths sum in different orders, so choosing by the
    /// longest row would give a short row other logits beside a long one than alone.
    fn attend(&self, ctx: &ComputeContext, out: &mut [f32]) -> ort::Result<()> {
        let (long, short): (Vec<usize>, Vec<usize>) = (0..self.batch).partition(|&bi| attention::splits(&self.dims(bi)));
        if !long.is_empty() {
            self.split(ctx, out, &long)?;
        }
        if !short.is_empty() {
            self.tiled(ctx, out, &short)?;
        }
        Ok(())
    }

    /// Decode over a long cache (batch rows `rows`): threads take stretches of positions for
    /// every KV head (flash-decoding) rather than a KV head each, so each reads the
    /// position-major cache contiguously.
    fn split(&self, ctx: &ComputeContext, out: &mut [f32], rows: &[usize]) -> ort::Result<()> {
        let (hd, group) = (self.d.head_dim, self.d.q_heads / self.d.kv_heads);
        let mut scratch = SPLIT_SCRATCH.take();
        for &bi in rows {
            let d = &self.dims(bi);
            let parts = attention::key_parts(d, MAX_PARTS);
            scratch.resize_with(parts.len(), Vec::new);
            for heads in scratch.iter_mut() {
                heads.resize_with(d.kv_heads, Default::default);
            }
            let kv: Vec<_> = (0..d.kv_heads).map(|h| self.head_cache(bi, h)).collect();
            let qb = self.queries(bi);
            let parts_ptr = SharedMut(scratch.as_mut_ptr());
            parallel(ctx, OpKind::CausalAttention, parts.len(), |i| {
                // SAFETY: item i is the only user of part i's scratch.
                let heads = unsafe { &mut *parts_ptr.at(i) };
                attention::split_keys(qb, &kv, d, parts[i].clone(), heads);
            })?;
            let (first, rest) = scratch.split_first_mut().expect("a split call has a part");
            for (h, sc) in first.iter_mut().enumerate() {
                attention::merge_parts(sc, rest.iter().map(|p| &p[h]), hd);
                for g in 0..group {
                    for pos in 0..d.new {
                        let at = self.out_at(bi, pos, h, g);
                        out[at..at + hd].copy_from_slice(sc.output(g, pos, hd));
                    }
                }
            }
        }
        Ok(())
    }

    /// Prefill, and decode over a short cache (batch rows `batch_rows`): tiles of queries per KV
    /// head, each tile on a worker of its own.
    fn tiled(&self, ctx: &ComputeContext, out: &mut [f32], batch_rows: &[usize]) -> ort::Result<()> {
        let d = self.d;
        let (s, hkv, hd, group) = (d.new, d.kv_heads, d.head_dim, d.q_heads / d.kv_heads);
        let tiles_per_head = s.div_ceil(attention::QUERY_TILE);
        let items = batch_rows.len() * hkv * tiles_per_head;
        let mut tiles = TILE_SCRATCH.take();
        tiles.resize_with(items, Default::default);
        let (tiles_ptr, out_ptr) = (SharedMut(tiles.as_mut_ptr()), SharedMut(out.as_mut_ptr()));
        parallel(ctx, OpKind::CausalAttention, items, |i| {
            let (bi, h, t) = (batch_rows[i / (hkv * tiles_per_head)], i / tiles_per_head % hkv, i % tiles_per_head);
            let rows = t * attention::QUERY_TILE..((t + 1) * attention::QUERY_TILE).min(s);
            // SAFETY: item i is the only user of scratch i.
            let sc = unsafe { &mut *tiles_ptr.at(i) };
            attention::tile(self.queries(bi), self.head_cache(bi, h), &self.dims(bi), h, rows.clone(), sc);
            for g in 0..group {
                for (j, pos) in rows.clone().enumerate() {
                    let at = self.out_at(bi, pos, h, g);
                    // SAFETY: (batch row, position, query head) triples are disjoint across items.
                    unsafe { std::slice::from_raw_parts_mut(out_ptr.at(at), hd) }.copy_from_slice(sc.output(g, j, hd));
                }
            }
        })
    }
}
