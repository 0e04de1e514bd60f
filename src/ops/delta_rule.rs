//! `GatedDeltaRule`: the DeltaNet recurrence over packed heads, chunked for prefill and
//! token by token for decode, heads spread over ORT's thread pool.

use deltadoc_kernels::simd;
use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::TensorElementType;

use super::gated_delta::{self, ChunkScratch, HeadInputs};
use super::{DOMAIN, OpKind, Pool, SharedMut, dims, err, guarded, input, optional_input, output, parallel};

/// Which gated-delta kernel a call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAlgorithm {
    /// Recurrent for single-token calls, chunked otherwise (what the reference does).
    Auto,
    /// Always the chunked kernel.
    Chunked,
    /// Always the token-by-token kernel.
    Recurrent,
}

/// Gated delta rule over packed heads: `q, k: [B, T, Hk·Dk]`, `v: [B, T, Hv·Dv]`,
/// `g, beta: [B, T, Hv]`, `past_state: [B, Hv, Dk, Dv]` (f32). Optionally the gates come raw
/// (inputs `neg_exp_a`, `dt_bias`: then `g` and `beta` are Qwen3.5's `a` and `b`), and the output
/// goes through the layer's gated RMSNorm (inputs `z`, `norm_weight`), so that a decode step runs
/// one node where the graph would run a dozen small ones (onnx/README.md, "GatedDeltaRule").
pub struct GatedDeltaRule;

/// Kernel of [`GatedDeltaRule`] for one graph node: its attributes.
pub struct RuleKernel {
    num_k_heads: usize,
    num_v_heads: usize,
    scale: f32,
    l2norm: bool,
    algorithm: RuleAlgorithm,
    norm_epsilon: f32,
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
    type Kernel<'a> = RuleKernel;

    fn name(&self) -> &str {
        "GatedDeltaRule"
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        let required = (0..6).map(|_| OperatorInput::required(TensorElementType::Float32));
        // neg_exp_a, dt_bias, z, norm_weight.
        required.chain((0..4).map(|_| OperatorInput::optional(TensorElementType::Float32)))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        (0..2).map(|_| OperatorOutput::required(TensorElementType::Float32))
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<RuleKernel> {
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
        let algorithm = match kctx.get::<String>("kernel").as_deref().unwrap_or("auto") {
            "auto" => RuleAlgorithm::Auto,
            "chunked" => RuleAlgorithm::Chunked,
            "recurrent" => RuleAlgorithm::Recurrent,
            other => return Err(err(format!("{DOMAIN}::{OP}: unknown kernel {other:?}"))),
        };
        Ok(RuleKernel {
            num_k_heads,
            num_v_heads,
            scale: kctx.get::<f32>("scale").unwrap_or(0.0),
            l2norm: kctx.get::<i64>("use_qk_l2norm").unwrap_or(1) != 0,
            algorithm,
            norm_epsilon: kctx.get::<f32>("norm_epsilon").unwrap_or(1e-6),
        })
    }

    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        ctx.set_output(0, &inputs[2])?;
        ctx.set_output(1, &inputs[5])
    }
}

impl Kernel for RuleKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        guarded(OP, OpKind::GatedDeltaRule, || self.run(ctx))
    }
}

/// Sizes of one call: batch, tokens, key and value head widths.
#[derive(Clone, Copy)]
struct Call {
    b: usize,
    t: usize,
    dk: usize,
    dv: usize,
}

const OP: &str = "GatedDeltaRule";

impl RuleKernel {
    fn run(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        inputs!(ctx, OP;
            (qs, q): f32 = 0 "q",
            (ks, k): f32 = 1 "k",
            (vs, v): f32 = 2 "v",
            (gs, g): f32 = 3 "g (or a)",
            (bs, beta): f32 = 4 "beta (or b)",
            (ss, s): f32 = 5 "past_state",
        );
        let c = self.sizes([&qs[..], &ks[..], &vs[..], &gs[..], &bs[..], &ss[..]])?;
        let extra = (6..10).map(|i| optional_input(ctx, i)).collect::<ort::Result<Vec<_>>>()?;
        let mut opt = Vec::with_capacity(extra.len());
        for (value, name) in extra.iter().zip(["neg_exp_a", "dt_bias", "z", "norm_weight"]) {
            opt.push(match value {
                Some(v) => Some((name, v.try_extract_tensor::<f32>()?)),
                None => None,
            });
        }
        let (b, t, hv, dv) = (c.b, c.t, self.num_v_heads, c.dv);
        let mut pair = |at: usize, shapes: [Vec<usize>; 2]| -> ort::Result<Option<[&[f32]; 2]>> {
            match (opt[at].take(), opt[at + 1].take()) {
                (None, None) => Ok(None),
                (Some(x), Some(y)) => {
                    for ((name, (shape, _)), want) in [&x, &y].into_iter().zip(&shapes) {
                        if dims(shape) != *want {
                            return Err(err(format!("{OP}: {name} has shape {:?}, expected {want:?}", dims(shape))));
                        }
                    }
                    Ok(Some([x.1.1, y.1.1]))
                }
                (Some((name, _)), None) | (None, Some((name, _))) => {
                    Err(err(format!("{OP}: {name} needs its partner input (neg_exp_a with dt_bias, z with norm_weight)")))
                }
            }
        };
        let gates = match pair(0, [vec![hv], vec![hv]])? {
            None => Gates::Given { g, beta },
            Some([neg_exp_a, dt_bias]) => Gates::Raw { a: g, b: beta, neg_exp_a, dt_bias },
        };
        let norm = pair(2, [vec![b, t, hv * dv], vec![dv]])?.map(|[z, w]| Norm { z, w, eps: self.norm_epsilon });
        let (mut o, mut ns) = (output(ctx, 0, vs.to_vec(), OP)?, output(ctx, 1, ss.to_vec(), OP)?);
        let (_, o) = o.try_extract_tensor_mut::<f32>()?;
        let (_, ns) = ns.try_extract_tensor_mut::<f32>()?;
        let mut scratch = RULE_SCRATCH.take();
        self.normalise_qk(ctx, c, q, k, &mut scratch)?;
        self.heads(ctx, c, HeadsIo { v, gates, norm, past: s, out: o, state: ns }, &mut scratch)
    }

    /// The call's sizes, once every input's shape agrees with them.
    fn sizes(&self, [qs, ks, vs, gs, bs, ss]: [&[i64]; 6]) -> ort::Result<Call> {
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
        Ok(Call { b, t, dk, dv })
    }

    /// Normalised (and scaled) q/k per key head, contiguous `[B, Hk, T, D]`, shared by the value
    /// heads of a group. Every element is overwritten, so resizing never needs to clear.
    fn normalise_qk(&self, ctx: &ComputeContext, c: Call, q: &[f32], k: &[f32], sc: &mut RuleScratch) -> ort::Result<()> {
        let (hk, Call { b, t, dk, .. }) = (self.num_k_heads, c);
        let scale = if self.scale > 0.0 { self.scale } else { (dk as f32).powf(-0.5) };
        sc.qn.resize(b * hk * t * dk, 0.0);
        sc.kn.resize(b * hk * t * dk, 0.0);
        let (q_ptr, k_ptr) = (SharedMut(sc.qn.as_mut_ptr()), SharedMut(sc.kn.as_mut_ptr()));
        let l2 = self.l2norm;
        let head = |i: usize| {
            let _flush = simd::FlushDenormals::new();
            let (bi, h) = (i / hk, i % hk);
            // SAFETY: worker i writes only rows [i·T·Dk, (i+1)·T·Dk) of qn and kn.
            let (qh, kh) = unsafe {
                (
                    std::slice::from_raw_parts_mut(q_ptr.at(i * t * dk), t * dk),
                    std::slice::from_raw_parts_mut(k_ptr.at(i * t * dk), t * dk),
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
        };
        // A decode step's q and k are 2 x 16 rows of 128 at the 0.8B shape: one thread does them
        // in 3.7 µs, a parallel section took 7.5 µs (benches/RESULTS.md, "The pool's cost").
        if t == 1 {
            (0..b * hk).for_each(head);
            return Ok(());
        }
        parallel(ctx, OpKind::GatedDeltaRule, b * hk, head)
    }

    /// The rule per (batch row, value head), each on a worker of its own.
    fn heads(&self, ctx: &ComputeContext, c: Call, io: HeadsIo, sc: &mut RuleScratch) -> ort::Result<()> {
        let (hk, hv, Call { b, t, dk, dv }) = (self.num_k_heads, self.num_v_heads, c);
        let HeadsIo { v, gates, norm, past, out, state } = io;
        let use_recurrent = match self.algorithm {
            RuleAlgorithm::Auto => t == 1,
            RuleAlgorithm::Recurrent => true,
            RuleAlgorithm::Chunked => false,
        };
        sc.heads.resize_with(b * hv, HeadScratch::default);
        let (out_ptr, state_ptr) = (SharedMut(out.as_mut_ptr()), SharedMut(state.as_mut_ptr()));
        let head_ptr = SharedMut(sc.heads.as_mut_ptr());
        let (qn, kn) = (&sc.qn, &sc.kn);
        let group = hv / hk;
        parallel(ctx, OpKind::GatedDeltaRule, b * hv, |i| {
            let _flush = simd::FlushDenormals::new();
            let (bi, h) = (i / hv, i % hv);
            let kh = bi * hk + h / group;
            // SAFETY: worker i is the only one to touch head scratch i.
            let hs = unsafe { &mut *head_ptr.at(i) };
            hs.v.resize(t * dv, 0.0);
            hs.g.resize(t, 0.0);
            hs.beta.resize(t, 0.0);
            hs.out.resize(t * dv, 0.0);
            for ti in 0..t {
                let row = bi * t + ti;
                hs.v[ti * dv..(ti + 1) * dv].copy_from_slice(&v[row * hv * dv + h * dv..row * hv * dv + (h + 1) * dv]);
                (hs.g[ti], hs.beta[ti]) = gates.at(row * hv + h, h);
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
            // of batch bi of `out`; no two workers share either.
            let state = unsafe { std::slice::from_raw_parts_mut(state_ptr.at(i * dk * dv), dk * dv) };
            let past = &past[i * dk * dv..(i + 1) * dk * dv];
            if use_recurrent {
                gated_delta::recurrent(&inp, past, state, &mut hs.out);
            } else {
                state.copy_from_slice(past);
                gated_delta::chunked(&inp, state, &mut hs.out, &mut hs.chunk);
            }
            for ti in 0..t {
                let dst = (bi * t + ti) * hv * dv + h * dv;
                if let Some(n) = &norm {
                    gated_delta::gated_norm(&mut hs.out[ti * dv..(ti + 1) * dv], &n.z[dst..dst + dv], n.w, n.eps);
                }
                // SAFETY: as above, these columns of this row are worker i's alone.
                unsafe { std::slice::from_raw_parts_mut(out_ptr.at(dst), dv) }.copy_from_slice(&hs.out[ti * dv..(ti + 1) * dv]);
            }
        })
    }
}

/// Where a call's gates come from, per token and value head.
#[derive(Clone, Copy)]
enum Gates<'a> {
    /// `g` and `beta` `[B, T, Hv]`, computed by the graph.
    Given { g: &'a [f32], beta: &'a [f32] },
    /// Qwen3.5's `a` and `b` `[B, T, Hv]` and the heads' `−exp(A_log)` and `dt_bias` `[Hv]`.
    Raw { a: &'a [f32], b: &'a [f32], neg_exp_a: &'a [f32], dt_bias: &'a [f32] },
}

impl Gates<'_> {
    /// `(g, beta)` at flat position `i` of `[B, T, Hv]`, value head `h`.
    fn at(&self, i: usize, h: usize) -> (f32, f32) {
        match *self {
            Gates::Given { g, beta } => (g[i], beta[i]),
            Gates::Raw { a, b, neg_exp_a, dt_bias } => {
                (gated_delta::log_decay(a[i], neg_exp_a[h], dt_bias[h]), gated_delta::write_strength(b[i]))
            }
        }
    }
}

/// The layer's gated RMSNorm on the rule's output: `z [B, T, Hv·Dv]`, its weight `w [Dv]`.
struct Norm<'a> {
    z: &'a [f32],
    w: &'a [f32],
    eps: f32,
}

/// The per-head inputs and the outputs of one call.
struct HeadsIo<'a> {
    v: &'a [f32],
    gates: Gates<'a>,
    norm: Option<Norm<'a>>,
    past: &'a [f32],
    out: &'a mut [f32],
    state: &'a mut [f32],
}
