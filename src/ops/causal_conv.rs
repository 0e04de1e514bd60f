//! `CausalConv1dWithState`: the DeltaNet layer's causal depthwise conv with its carried window.

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::TensorElementType;

use super::conv::{self, Activation};
use super::{DOMAIN, OpKind, SharedMut, dims, err, guarded, input, output, parallel};

/// Causal depthwise conv over `x: [B, T, C]` with `weight: [C, K]` and `past_state: [B, C, K − 1]`.
pub struct CausalConv1dWithState;

const OP: &str = "CausalConv1dWithState";

/// Parts of the channels a decode step's conv is cut into, each a task on the pool.
const DECODE_PARTS: usize = 2;

/// Kernel of [`CausalConv1dWithState`] for one graph node.
pub struct ConvKernel {
    act: Activation,
}

impl Operator for CausalConv1dWithState {
    type Kernel<'a> = ConvKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        (0..3).map(|_| OperatorInput::required(TensorElementType::Float32))
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        (0..2).map(|_| OperatorOutput::required(TensorElementType::Float32))
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<ConvKernel> {
        let name = kctx.get::<String>("activation").unwrap_or_else(|| "silu".into());
        let act = Activation::parse(&name).ok_or_else(|| err(format!("{DOMAIN}::{OP}: unknown activation {name:?}")))?;
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
        guarded(OP, OpKind::CausalConv, || {
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
                // Decode: microseconds of work, done in place of a prepared layout. Two halves of
                // the channels on the pool all the same: the state, taps and input come from
                // memory (a 0.8B layer's 6144 channels read ~250 KB), and two threads wait on
                // it side by side: 46-48 -> 36-37 µs a call inside a decode step
                // (benches/RESULTS.md, "Where a decode step's time goes").
                let per = c.div_ceil(DECODE_PARTS);
                let (yp, np) = (SharedMut(y.as_mut_ptr()), SharedMut(ns.as_mut_ptr()));
                let act = self.act;
                return parallel(ctx, OpKind::CausalConv, b * DECODE_PARTS, |i| {
                    let (bi, ch) = (i / DECODE_PARTS, i % DECODE_PARTS * per..((i % DECODE_PARTS + 1) * per).min(c));
                    if ch.is_empty() {
                        // Fewer channels than parts.
                        return;
                    }
                    let rows = bi * c + ch.start..bi * c + ch.end;
                    let states = bi * srow + ch.start * (k - 1)..bi * srow + ch.end * (k - 1);
                    // SAFETY: part i writes only its own channels of y and of the new state.
                    let (out, next) = unsafe {
                        (
                            std::slice::from_raw_parts_mut(yp.at(rows.start), rows.len()),
                            std::slice::from_raw_parts_mut(np.at(states.start), states.len()),
                        )
                    };
                    conv::step(&x[rows], &w[ch.start * k..ch.end * k], &s[states], out, next, act);
                });
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
                parallel(ctx, OpKind::CausalConv, blocks, |blk| {
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
