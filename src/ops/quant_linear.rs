//! `QuantMatMul`: `y = x · Wᵀ` for block-quantised int8/int4 weights, the small-M matmul of decode
//! steps (the kernel: `deltadoc_kernels::quant_matmul`). It takes the same inputs and attributes
//! as ONNX Runtime's `com.microsoft::MatMulNBits` without zero points, so the graph can hand a
//! node's initialisers to either; an optional fourth input names the only output columns wanted
//! (the tokens a constrained decode step allows), so the model's head reads only their rows.

use std::ops::Range;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::quant_matmul::{Activations, Weights};
use super::{DOMAIN, SharedMut, dims, err, guarded, input, output};

const OP: &str = "QuantMatMul";

/// Output rows one task of ORT's pool computes at the least: fewer make the hand-offs cost more
/// than the rows.
const MIN_TASK_ROWS: usize = 16;

/// Tasks per call at the most: enough that the threads finish together.
const MAX_TASKS: usize = 64;

/// `x [..., K] · Wᵀ` with `W` as `codes [N, ⌈K/block⌉, block·bits/8]` (u8) and `scales [N ·
/// ⌈K/block⌉]` (f32); attributes `K`, `N`, `bits` (4 or 8) and `block_size`. With `rows [R]`
/// (i64, ascending, each below N; optional) only those output columns are computed, and every
/// other one is −∞: what a token mask would make of it. An empty `rows` asks for every column, so
/// a graph input can always be fed: no constrained step allows nothing (the constraint reports
/// the dead end before the model runs).
pub struct QuantMatMul;

/// Kernel of [`QuantMatMul`] for one graph node: its attributes.
pub struct QuantMatMulKernel {
    k: usize,
    n: usize,
    bits: u32,
    block: usize,
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
            OperatorInput::required(TensorElementType::Float32),
            OperatorInput::optional(TensorElementType::Int64),
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
        };
        // The layout check of an empty weight, to refuse bad attributes when the session loads.
        Weights::new(&[], &[], 0, kernel.k, kernel.bits, kernel.block).map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?;
        Ok(kernel)
    }

    // ORT cannot infer a custom op's outputs: x's shape with N for its last axis.
    fn infer_shape(&self, ctx: &mut ShapeInferenceContext) -> ort::Result<()> {
        let inputs = ctx.inputs();
        let ValueType::Tensor { shape, dimension_symbols, .. } = &inputs[0] else {
            return Err(err(format!("{OP}: x must be a tensor")));
        };
        let n = ctx.attr::<i64>("N").unwrap_or(-1);
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
        guarded(OP, || self.run(ctx))
    }
}

impl QuantMatMulKernel {
    fn run(&self, ctx: &ComputeContext) -> ort::Result<()> {
        inputs!(ctx, OP; (xs, x): f32 = 0 "x");
        let codes_value = input(ctx, 1, OP, "codes")?;
        let (_, codes) = codes_value.try_extract_tensor::<u8>()?;
        inputs!(ctx, OP; (_ss, scales): f32 = 2 "scales");
        let xd = dims(xs);
        if xd.last() != Some(&self.k) {
            return Err(err(format!("{DOMAIN}::{OP}: x {xd:?} must end in K = {}", self.k)));
        }
        let w = Weights::new(codes, scales, self.n, self.k, self.bits, self.block)
            .map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?;
        let m = x.len() / self.k;
        let mut shape = xs.to_vec();
        *shape.last_mut().expect("x has an axis") = self.n as i64;
        let mut y = output(ctx, 0, shape, OP)?;
        let (_, y) = y.try_extract_tensor_mut::<f32>()?;
        if m == 0 {
            return Ok(());
        }
        // A node of three inputs has no fourth to ask for; one given as "" asks and gets none.
        let wanted = match if ctx.num_inputs()? > 3 { ctx.input(3)? } else { None } {
            Some(v) => Some(v.try_extract_tensor::<i64>()?.1.to_vec()),
            None => None,
        };
        let runs = match wanted.as_deref() {
            Some(rows) if !rows.is_empty() => {
                y.fill(f32::NEG_INFINITY);
                runs(rows, self.n).map_err(|e| err(format!("{DOMAIN}::{OP}: rows: {e}")))?
            }
            _ => std::iter::once(0..self.n).collect(),
        };
        let a = Activations::new(x, m, &w);
        let n = self.n;
        let tasks = split(&runs, MIN_TASK_ROWS, MAX_TASKS, a.row_grain());
        let yp = SharedMut(y.as_mut_ptr());
        ctx.par_for(tasks.len(), tasks.len(), |t| {
            // Several rows of x come back `[m, run]` and are scattered into y; one buffer serves
            // every run of the task (a constrained head's rows can be hundreds of short runs).
            let mut out = Vec::new();
            for rows in &tasks[t] {
                if m == 1 {
                    // SAFETY: the tasks' row ranges are disjoint; this one writes only its own.
                    let out = unsafe { std::slice::from_raw_parts_mut(yp.at(rows.start), rows.len()) };
                    a.matmul_rows(&w, rows.clone(), out);
                } else {
                    out.resize(m * rows.len(), 0.0);
                    a.matmul_rows(&w, rows.clone(), &mut out);
                    for (r, part) in out.chunks_exact(rows.len()).enumerate() {
                        for (j, &v) in part.iter().enumerate() {
                            // SAFETY: as above, columns `rows` of each row.
                            unsafe { *yp.at(r * n + rows.start + j) = v };
                        }
                    }
                }
            }
        })
    }
}

/// The ascending, in-range `rows` as runs of consecutive rows.
fn runs(rows: &[i64], n: usize) -> Result<Vec<Range<usize>>, String> {
    let mut out: Vec<Range<usize>> = Vec::new();
    let mut last: Option<usize> = None;
    for &r in rows {
        let Some(r) = usize::try_from(r).ok().filter(|&r| r < n) else {
            return Err(format!("row {r} is not among the {n} outputs"));
        };
        if last.is_some_and(|l| r <= l) {
            return Err(format!("row {r} after row {}: rows must be ascending", last.unwrap_or(0)));
        }
        match out.last_mut() {
            Some(run) if run.end == r => run.end = r + 1,
            _ => out.push(r..r + 1),
        }
        last = Some(r);
    }
    Ok(out)
}

/// `runs` cut into at most `max_tasks` tasks of about equal rows (at least `min_rows` each, bar
/// the last), a multiple of `grain` rows each (bar the last).
fn split(runs: &[Range<usize>], min_rows: usize, max_tasks: usize, grain: usize) -> Vec<Vec<Range<usize>>> {
    let total: usize = runs.iter().map(|r| r.len()).sum();
    let tasks = (total / min_rows.max(grain)).clamp(1, max_tasks);
    let per_task = (total.div_ceil(grain).div_ceil(tasks) * grain).max(1);
    let mut tasks = vec![Vec::new()];
    let mut filled = 0;
    for run in runs {
        let mut run = run.clone();
        while !run.is_empty() {
            if filled == per_task {
                tasks.push(Vec::new());
                filled = 0;
            }
            let take = run.len().min(per_task - filled);
            tasks.last_mut().expect("one task at least").push(run.start..run.start + take);
            run.start += take;
            filled += take;
        }
    }
    tasks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_become_runs_and_runs_tasks_of_equal_rows() {
        assert_eq!(runs(&[0, 1, 2, 7, 9, 10], 11).unwrap(), vec![0..3, 7..8, 9..11]);
        assert!(runs(&[3, 3], 11).unwrap_err().contains("ascending"));
        assert!(runs(&[11], 11).unwrap_err().contains("not among the 11 outputs"));
        assert!(runs(&[-1], 11).unwrap_err().contains("row -1"));
        let tasks = split(&[0..50, 60..110], 16, 4, 1);
        assert_eq!(tasks.len(), 4);
        assert_eq!(tasks[0], vec![0..25]);
        assert_eq!(tasks[1], vec![25..50]);
        assert_eq!(tasks[2], vec![60..85]);
        assert_eq!(split(&[3..8, 9..9], 16, 64, 1), vec![vec![3..8]]);
        assert_eq!(split(&[], 16, 64, 1), vec![Vec::<Range<usize>>::new()]);
        // Panels of 32: 1024 rows in 32 tasks, not 64 of 16; 1000 in 15 of 64 and one of 40.
        let tasks = split(std::slice::from_ref(&(0..1024)), 16, 64, 32);
        assert_eq!(tasks.len(), 32);
        assert!(tasks.iter().all(|t| t.iter().map(|r| r.len()).sum::<usize>() == 32));
        let tasks = split(std::slice::from_ref(&(0..1000)), 16, 64, 32);
        assert_eq!(tasks.len(), 16);
        assert_eq!(tasks[1], vec![64..128]);
        assert_eq!(tasks[15], vec![960..1000]);
    }
}
