//! `QuantMatMul`: `y = x · Wᵀ` for block-quantised int8/int4 weights, the matmul of every int8/int4
//! graph from decode steps to prefill (the kernel: `deltadoc_kernels::quant_matmul`). It takes
//! ONNX Runtime's `com.microsoft::MatMulNBits` attributes (no zero points), its weights packed in
//! panels of 16 rows (`Weights::pack` of `MatMulNBits`'s codes and scales, done at import); an
//! optional third input names the only output columns wanted (the tokens a constrained decode step
//! allows), so the model's head reads only the panels that hold them. It also does the decoder's
//! small steps around a projection, an RMSNorm of `x` before it, SwiGLU and the residual add after
//! it: each was an ONNX node of its own, 193 of them in a 0.8B decode step at 2–4.5 µs each
//! (benches/RESULTS.md, "Norms, SwiGLU and residuals inside the matmul").

use std::ops::Range;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::quant_matmul::{Activations, PANEL_ROWS, Panels, Weights};
use super::{DOMAIN, OpKind, Pool, SharedMut, dims, err, guarded, input, optional_input, output, parallel};
use deltadoc_kernels::simd;

const OP: &str = "QuantMatMul";

/// The whole product of a SwiGLU node, before it is halved; one buffer for all such nodes, as
/// they run one after another.
static FULL_ROWS: Pool<Vec<f32>> = Pool::new();

/// Weight bytes of one task, about: each thread streams a whole number of them, so the threads
/// finish together, and a thread the OS holds up can leave its last ones to the others. Smaller
/// tasks cost more than they balance: 64 tasks per call (16 rows of a 1024 x 2048 int4 matrix
/// each) made a 0.8B int4 decode step 1.1x as slow as two, as each task starts its memory streams
/// anew (benches/RESULTS.md, "Decode step").
const TASK_BYTES: usize = 1 << 20;

/// Below this many weight bytes a call is one task: handing it to another thread costs more than
/// the bytes.
const ONE_TASK_BYTES: usize = 64 << 10;

/// `x [..., K] · Wᵀ` with `W` as `packed` (u8, `Weights::pack`'s bytes, any shape); attributes
/// `K`, `N`, `bits` (4 or 8) and `block_size`. With `rows [R]` (i64, ascending, each below N;
/// optional) only those output columns are computed, and every other one is −∞: what a token mask
/// would make of it. An empty `rows` asks for every column, so a graph input can always be fed:
/// no constrained step allows nothing (the constraint reports the dead end before the model runs).
///
/// Around the product, all optional: `norm [K]` (f32) RMS-normalises each row of `x` first,
/// `x · rsqrt(mean(x²) + epsilon) · norm` (attribute `epsilon`, default 1e-6); attribute
/// `activation = "swiglu"` turns the N columns into N/2, `silu(y[:N/2]) · y[N/2:]`; `residual`
/// (f32, the output's shape) is added last.
pub struct QuantMatMul {
    /// The session's intra-op threads, over which a call's rows are shared out evenly.
    pub threads: usize,
}

/// Kernel of [`QuantMatMul`] for one graph node: its attributes.
pub struct QuantMatMulKernel {
    k: usize,
    n: usize,
    bits: u32,
    block: usize,
    threads: usize,
    epsilon: f32,
    swiglu: bool,
}

/// Inputs after `x` and `packed`, by position.
const ROWS: usize = 2;
const NORM: usize = 3;
const RESIDUAL: usize = 4;

impl QuantMatMulKernel {
    /// Output columns: N, or N/2 after SwiGLU.
    fn n_out(&self) -> usize {
        if self.swiglu { self.n / 2 } else { self.n }
    }
}

/// The value of the `activation` attribute, `Ok(true)` for SwiGLU.
fn parse_activation(name: Option<String>) -> Result<bool, String> {
    match name.as_deref() {
        None | Some("") | Some("none") => Ok(false),
        Some("swiglu") => Ok(true),
        Some(other) => Err(format!("unknown activation {other:?} (\"swiglu\" or none)")),
    }
}

impl Operator for QuantMatMul {
    type Kernel<'a> = QuantMatMulKernel;

    fn name(&self) -> &str {
        OP
    }

    fn inputs(&self) -> impl IntoIterator<Item = OperatorInput> {
        [
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::required(TensorElementType::Uint8),
            OperatorInput::optional(TensorElementType::Int64),
            OperatorInput::optional(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Float32),
        ]
    }

    fn outputs(&self) -> impl IntoIterator<Item = OperatorOutput> {
        [OperatorOutput::required(TensorElementType::Float32)]
    }

    fn create_kernel<'a>(&self, kctx: &KernelContext<'a>) -> ort::Result<QuantMatMulKernel> {
        let positive = |name: &str| -> ort::Result<usize> {
            match kctx.get::<i64>(name) {
                Some(v) if v > 0 => Ok(v as usize),
                other => Err(err(format!("{DOMAIN}::{OP}: attribute {name} must be a positive int, got {other:?}"))),
            }
        };
        let kernel = QuantMatMulKernel {
            k: positive("K")?,
            n: positive("N")?,
            bits: positive("bits")? as u32,
            block: positive("block_size")?,
            threads: self.threads.max(1),
            epsilon: kctx.get::<f32>("epsilon").unwrap_or(1e-6),
            swiglu: parse_activation(kctx.get::<String>("activation")).map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?,
        };
        // To refuse bad attributes when the session loads.
        Weights::packed_len(kernel.n, kernel.k, kernel.bits, kernel.block).map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?;
        if kernel.swiglu && kernel.n % 2 == 1 {
            return Err(err(format!("{DOMAIN}::{OP}: swiglu needs an even N, got {}", kernel.n)));
        }
        Ok(kernel)
    }

    // ORT cannot infer a custom op's outputs: x's shape with N for its last axis.
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        let ValueType::Tensor { shape, dimension_symbols, .. } = &inputs[0] else {
            return Err(err(format!("{OP}: x must be a tensor")));
        };
        let n = ctx.attr::<i64>("N").unwrap_or(-1);
        let n = match parse_activation(ctx.attr::<String>("activation").ok()) {
            Ok(true) if n > 0 => n / 2,
            _ => n,
        };
        let mut dims: Vec<i64> = shape.iter().copied().collect();
        let mut symbols: Vec<String> = dimension_symbols.iter().cloned().collect();
        if let (Some(d), Some(s)) = (dims.last_mut(), symbols.last_mut()) {
            *d = n;
            s.clear();
        }
        let out = ValueType::Tensor {
            ty: TensorElementType::Float32,
            shape: Shape::new(dims),
            dimension_symbols: SymbolicDimensions::new(symbols),
        };
        ctx.set_output(0, &out)
    }
}

impl Kernel for QuantMatMulKernel {
    fn compute(&mut self, ctx: &ComputeContext) -> ort::Result<()> {
        guarded(OP, OpKind::QuantMatMul, || self.run(ctx))
    }
}

impl QuantMatMulKernel {
    fn run(&self, ctx: &ComputeContext) -> ort::Result<()> {
        inputs!(ctx, OP; (xs, x): f32 = 0 "x");
        let packed_value = input(ctx, 1, OP, "packed")?;
        let (_, packed) = packed_value.try_extract_tensor::<u8>()?;
        let xd = dims(xs);
        if xd.last() != Some(&self.k) {
            return Err(err(format!("{DOMAIN}::{OP}: x {xd:?} must end in K = {}", self.k)));
        }
        let w = Weights::new(packed, self.n, self.k, self.bits, self.block).map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?;
        let m = x.len() / self.k;
        let mut shape = xs.to_vec();
        *shape.last_mut().expect("x has an axis") = self.n_out() as i64;
        let mut y = output(ctx, 0, shape, OP)?;
        let (_, y) = y.try_extract_tensor_mut::<f32>()?;
        if m == 0 {
            return Ok(());
        }
        // A node of two inputs has no third to ask for; one given as "" asks and gets none.
        let wanted = match optional_input(ctx, ROWS)? {
            Some(v) => Some(v.try_extract_tensor::<i64>()?.1.to_vec()),
            None => None,
        };
        let n = self.n;
        let wanted = match wanted.as_deref() {
            Some(rows) if !rows.is_empty() => {
                if self.swiglu {
                    return Err(err(format!("{DOMAIN}::{OP}: rows cannot be asked of a swiglu node")));
                }
                y.fill(f32::NEG_INFINITY);
                let rows = checked(rows, n).map_err(|e| err(format!("{DOMAIN}::{OP}: rows: {e}")))?;
                Some((panels_of(&rows), rows))
            }
            _ => None,
        };
        let normed = match optional_input(ctx, NORM)? {
            Some(v) => {
                let (_, scale) = v.try_extract_tensor::<f32>()?;
                if scale.len() != self.k {
                    return Err(err(format!("{DOMAIN}::{OP}: norm has {} values for K = {}", scale.len(), self.k)));
                }
                Some(rms_norm(x, scale, self.epsilon))
            }
            None => None,
        };
        let x = normed.as_deref().unwrap_or(x);
        // SwiGLU needs both halves of a row at once: the product goes to a buffer of its own.
        // Taken only by SwiGLU nodes: the pool's lock is not free, and every other call skips it.
        let mut full = self.swiglu.then(|| FULL_ROWS.take());
        let dst: &mut [f32] = match full.as_mut() {
            Some(full) => {
                full.resize(m * n, 0.0);
                &mut full[..m * n]
            }
            None => y,
        };
        // The wanted rows' panels as one list, which the kernel reads as several streams at
        // once: one call per run of panels left each isolated panel's reads waiting on memory
        // one after another (benches/RESULTS.md, "The constrained head on panels").
        let panels = match &wanted {
            Some((panels, _)) => Panels::List(panels),
            None => Panels::from(0..w.panels()),
        };
        let bytes = panels.len() * w.panel_bytes();
        super::op_time::read_weights(bytes);
        let a = Activations::new(x, m, &w);
        let tasks = split(panels.len(), task_count(bytes, self.threads), a.panel_grain());
        let yp = SharedMut(dst.as_mut_ptr());
        parallel(ctx, OpKind::QuantMatMul, tasks.len(), |t| {
            let panels = panels.slice(tasks[t].clone());
            let width = PANEL_ROWS * panels.len();
            let Some((_, rows)) = &wanted else {
                let cols = PANEL_ROWS * panels.at(0)..PANEL_ROWS * panels.at(0) + width;
                if m == 1 && cols.end <= n {
                    // SAFETY: the tasks' panels are disjoint; this one writes only its own columns.
                    let out = unsafe { std::slice::from_raw_parts_mut(yp.at(cols.start), width) };
                    return a.matmul_panels(&w, panels, out);
                }
                let mut out = vec![0.0; m * width];
                a.matmul_panels(&w, panels, &mut out);
                let real = cols.end.min(n) - cols.start;
                for (r, part) in out.chunks_exact(width).enumerate() {
                    // SAFETY: as above, columns of this task's panels in each row of y.
                    unsafe { std::slice::from_raw_parts_mut(yp.at(r * n + cols.start), real) }.copy_from_slice(&part[..real]);
                }
                return;
            };
            let mut out = vec![0.0; m * width];
            a.matmul_panels(&w, panels, &mut out);
            // The wanted rows these panels hold, each at its panel's position in `out`.
            let first = PANEL_ROWS * panels.at(0);
            let last = PANEL_ROWS * (panels.at(panels.len() - 1) + 1);
            let keep = &rows[rows.partition_point(|&c| c < first)..rows.partition_point(|&c| c < last)];
            let mut at = 0;
            for &c in keep {
                while panels.at(at) < c / PANEL_ROWS {
                    at += 1;
                }
                for (r, part) in out.chunks_exact(width).enumerate() {
                    // SAFETY: as above: rows of this task's panels only, in each row of y.
                    unsafe { *yp.at(r * n + c) = part[PANEL_ROWS * at + c % PANEL_ROWS] };
                }
            }
        })?;
        if let Some(full) = &full {
            swiglu(&full[..m * n], n / 2, y);
        }
        if let Some(v) = optional_input(ctx, RESIDUAL)? {
            let (_, residual) = v.try_extract_tensor::<f32>()?;
            if residual.len() != y.len() {
                return Err(err(format!("{DOMAIN}::{OP}: residual has {} values for an output of {}", residual.len(), y.len())));
            }
            y.iter_mut().zip(residual).for_each(|(o, r)| *o += r);
        }
        Ok(())
    }
}

/// Each row of `x` (rows of `scale.len()`) RMS-normalised and scaled.
fn rms_norm(x: &[f32], scale: &[f32], epsilon: f32) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    for (row, o) in x.chunks_exact(scale.len()).zip(out.chunks_exact_mut(scale.len())) {
        simd::rms_norm(row, scale, epsilon, o);
    }
    out
}

/// `silu(gate) · up` per row of `full` (rows of `gate ‖ up`, `half` values each) into `y`.
fn swiglu(full: &[f32], half: usize, y: &mut [f32]) {
    for (row, out) in full.chunks_exact(2 * half).zip(y.chunks_exact_mut(half)) {
        let (gate, up) = row.split_at(half);
        simd::swiglu(gate, up, out);
    }
}

/// `rows` checked to be ascending and below `n`.
fn checked(rows: &[i64], n: usize) -> Result<Vec<usize>, String> {
    let mut out: Vec<usize> = Vec::with_capacity(rows.len());
    for &r in rows {
        let Some(r) = usize::try_from(r).ok().filter(|&r| r < n) else {
            return Err(format!("row {r} is not among the {n} outputs"));
        };
        if let Some(&last) = out.last().filter(|&&l| r <= l) {
            return Err(format!("row {r} after row {last}: rows must be ascending"));
        }
        out.push(r);
    }
    Ok(out)
}

/// The panels that hold the ascending `rows`, ascending.
fn panels_of(rows: &[usize]) -> Vec<usize> {
    let mut out: Vec<usize> = rows.iter().map(|r| r / PANEL_ROWS).collect();
    out.dedup();
    out
}

/// Tasks for a call that streams `bytes` of weights on `threads` threads: a multiple of the
/// threads, of about [`TASK_BYTES`] each; one for a call too small to share.
fn task_count(bytes: usize, threads: usize) -> usize {
    if bytes < ONE_TASK_BYTES {
        return 1;
    }
    threads * (bytes / threads / TASK_BYTES).max(1)
}

/// `panels` (positions) cut into `tasks` ranges of about equal panels, a multiple of `grain`
/// each (bar the last); fewer where the panels run out first.
fn split(panels: usize, tasks: usize, grain: usize) -> Vec<Range<usize>> {
    let per_task = (panels.div_ceil(grain).div_ceil(tasks.max(1)) * grain).max(1);
    (0..panels).step_by(per_task).map(|start| start..(start + per_task).min(panels)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_their_panels_and_panels_tasks_of_equal_length() {
        assert_eq!(checked(&[0, 1, 2, 70], 71).unwrap(), vec![0, 1, 2, 70]);
        assert!(checked(&[3, 3], 11).unwrap_err().contains("ascending"));
        assert!(checked(&[11], 11).unwrap_err().contains("not among the 11 outputs"));
        assert!(checked(&[-1], 11).unwrap_err().contains("row -1"));
        assert_eq!(panels_of(&[0, 1, 15, 16, 40, 100, 111, 112]), vec![0, 1, 2, 6, 7]);
        assert_eq!(split(100, 4, 1), vec![0..25, 25..50, 50..75, 75..100]);
        assert_eq!(split(5, 1, 1), vec![0..5]);
        assert_eq!(split(0, 2, 1), Vec::<Range<usize>>::new());
        // More tasks than panels: one panel each.
        assert_eq!(split(2, 4, 1), vec![0..1, 1..2]);
        // Pairs: 64 panels in 32 tasks of a pair; 63 in 2 of 32 and 31.
        let tasks = split(64, 32, 2);
        assert_eq!(tasks.len(), 32);
        assert!(tasks.iter().all(|t| t.len() == 2));
        assert_eq!(split(63, 2, 2), vec![0..32, 32..63]);
    }

    #[test]
    fn tasks_are_a_multiple_of_the_threads_and_about_a_mebibyte() {
        // A 0.8B decode step's matrices (int4 in blocks of 32) and its head.
        assert_eq!(task_count(1_310_720, 2), 2);
        assert_eq!(task_count(4_587_520, 2), 4);
        assert_eq!(task_count(158_924_800, 2), 150);
        assert_eq!(task_count(4_587_520, 16), 16);
        assert_eq!(task_count(4_587_520, 3), 3);
        // A constrained head's few rows: not worth a hand-off.
        assert_eq!(task_count(20 * 1280, 2), 1);
    }
}
