//! `CausalAttention` (f32, f16 and bf16 caches): blockwise causal grouped-query attention over
//! a position-major KV cache the caller appends to.

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::attention;
use super::{DOMAIN, OpKind, Pool, SharedMut, dims, err, guarded, input, output, parallel};

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
        guarded(T::OP, OpKind::CausalAttention, || self.run(ctx))
    }
}

/// Sizes of one call.
struct Call {
    batch: usize,
    dims: attention::Dims,
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
        let c = self.sizes([&qs[..], &ks[..], &vs[..], &pks[..], &pvs[..]])?;
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
        let call = Layout { q, cache: [pk, pv], new: [nk, nv], batch: b, d };
        if attention::splits(d) { call.split(ctx, out) } else { call.tiled(ctx, out) }
    }

    /// The call's sizes, once every input's shape agrees with them.
    fn sizes(&self, [qs, ks, vs, pks, pvs]: [&[i64]; 5]) -> ort::Result<Call> {
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
        let scale = if self.scale > 0.0 { self.scale } else { (hd as f32).powf(-0.5) };
        Ok(Call { batch: b, dims: attention::Dims { q_heads: hq, kv_heads: hkv, head_dim: hd, past: pd[1], new: s, scale } })
    }
}

/// Where one call's queries, cache and new rows are, and where its outputs go.
struct Layout<'a, T> {
    q: &'a [f32],
    cache: [&'a [T]; 2],
    new: [&'a [T]; 2],
    batch: usize,
    d: &'a attention::Dims,
}

impl<T: CacheType> Layout<'_, T> {
    /// Batch row `bi`'s queries.
    fn queries(&self, bi: usize) -> &[f32] {
        let n = self.d.new * self.d.q_heads * self.d.head_dim;
        &self.q[bi * n..(bi + 1) * n]
    }

    /// KV head `h`'s cache and new rows in batch row `bi`.
    fn head_cache(&self, bi: usize, h: usize) -> attention::HeadCache<'_, T> {
        let d = self.d;
        let (row_past, row_in) = (d.past * d.kv_heads * d.head_dim, d.new * d.kv_heads * d.head_dim);
        let (past, new) = (bi * row_past..(bi + 1) * row_past, bi * row_in..(bi + 1) * row_in);
        let ([pk, pv], [nk, nv]) = (self.cache, self.new);
        attention::HeadCache::new([&pk[past.clone()], &pv[past]], [&nk[new.clone()], &nv[new]], d, h)
    }

    /// Where query head `g` of KV head `h` at the call's position `pos` of batch row `bi` goes.
    fn out_at(&self, bi: usize, pos: usize, h: usize, g: usize) -> usize {
        let d = self.d;
        ((bi * d.new + pos) * d.q_heads + h * (d.q_heads / d.kv_heads) + g) * d.head_dim
    }

    /// Decode over a long cache: threads take stretches of positions for every KV head
    /// (flash-decoding) rather than a KV head each, so each reads the position-major cache
    /// contiguously.
    fn split(&self, ctx: &ComputeContext, out: &mut [f32]) -> ort::Result<()> {
        let d = self.d;
        let (hd, group) = (d.head_dim, d.q_heads / d.kv_heads);
        let parts = attention::key_parts(d, MAX_PARTS);
        let mut scratch = SPLIT_SCRATCH.take();
        scratch.resize_with(parts.len(), Vec::new);
        for heads in scratch.iter_mut() {
            heads.resize_with(d.kv_heads, Default::default);
        }
        for bi in 0..self.batch {
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

    /// Prefill: tiles of queries per KV head, each tile on a worker of its own.
    fn tiled(&self, ctx: &ComputeContext, out: &mut [f32]) -> ort::Result<()> {
        let d = self.d;
        let (s, hkv, hd, group) = (d.new, d.kv_heads, d.head_dim, d.q_heads / d.kv_heads);
        let tiles_per_head = s.div_ceil(attention::QUERY_TILE);
        let items = self.batch * hkv * tiles_per_head;
        let mut tiles = TILE_SCRATCH.take();
        tiles.resize_with(items, Default::default);
        let (tiles_ptr, out_ptr) = (SharedMut(tiles.as_mut_ptr()), SharedMut(out.as_mut_ptr()));
        parallel(ctx, OpKind::CausalAttention, items, |i| {
            let (bi, h, t) = (i / (hkv * tiles_per_head), i / tiles_per_head % hkv, i % tiles_per_head);
            let rows = t * attention::QUERY_TILE..((t + 1) * attention::QUERY_TILE).min(s);
            // SAFETY: item i is the only user of scratch i.
            let sc = unsafe { &mut *tiles_ptr.at(i) };
            attention::tile(self.queries(bi), self.head_cache(bi, h), d, h, rows.clone(), sc);
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
