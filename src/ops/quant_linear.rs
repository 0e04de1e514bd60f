//! `QuantMatMul`: `y = x · Wᵀ` for block-quantised int8/int4 weights, the matmul of every int8/int4
//! graph from decode steps to prefill (the kernel: `deltadoc_kernels::quant_matmul`). It takes
//! ONNX Runtime's `com.microsoft::MatMulNBits` attributes (no zero points), its weights packed in
//! panels of 16 rows (`Weights::pack` of `MatMulNBits`'s codes and scales, done at import); an
//! optional third input names the only output columns wanted (the tokens a constrained decode step
//! allows), so the model's head reads only the panels that hold them.

use std::ops::Range;

use ort::operator::{ComputeContext, Kernel, KernelContext, Operator, OperatorInput, OperatorOutput, ShapeInferenceContext};
use ort::value::{Shape, SymbolicDimensions, TensorElementType, ValueType};

use super::quant_matmul::{Activations, PANEL_ROWS, Weights};
use super::{DOMAIN, SharedMut, dims, err, guarded, input, output};

const OP: &str = "QuantMatMul";

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
        };
        // To refuse bad attributes when the session loads.
        Weights::packed_len(kernel.n, kernel.k, kernel.bits, kernel.block).map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?;
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
        let packed_value = input(ctx, 1, OP, "packed")?;
        let (_, packed) = packed_value.try_extract_tensor::<u8>()?;
        let xd = dims(xs);
        if xd.last() != Some(&self.k) {
            return Err(err(format!("{DOMAIN}::{OP}: x {xd:?} must end in K = {}", self.k)));
        }
        let w = Weights::new(packed, self.n, self.k, self.bits, self.block).map_err(|e| err(format!("{DOMAIN}::{OP}: {e}")))?;
        let m = x.len() / self.k;
        let mut shape = xs.to_vec();
        *shape.last_mut().expect("x has an axis") = self.n as i64;
        let mut y = output(ctx, 0, shape, OP)?;
        let (_, y) = y.try_extract_tensor_mut::<f32>()?;
        if m == 0 {
            return Ok(());
        }
        // A node of two inputs has no third to ask for; one given as "" asks and gets none.
        let wanted = match if ctx.num_inputs()? > 2 { ctx.input(2)? } else { None } {
            Some(v) => Some(v.try_extract_tensor::<i64>()?.1.to_vec()),
            None => None,
        };
        let n = self.n;
        let (runs, wanted) = match wanted.as_deref() {
            Some(rows) if !rows.is_empty() => {
                y.fill(f32::NEG_INFINITY);
                let rows = checked(rows, n).map_err(|e| err(format!("{DOMAIN}::{OP}: rows: {e}")))?;
                (panel_runs(&rows), Some(rows))
            }
            _ => (std::iter::once(0..w.panels()).collect(), None),
        };
        let a = Activations::new(x, m, &w);
        let panels: usize = runs.iter().map(|r| r.len()).sum();
        let tasks = split(&runs, task_count(panels * w.panel_bytes(), self.threads), a.panel_grain());
        let yp = SharedMut(y.as_mut_ptr());
        ctx.par_for(tasks.len(), tasks.len(), |t| {
            // Each run comes back `[m, 16·run]` and its columns are copied into y; one buffer
            // serves every run of the task (a constrained head's can be hundreds of short ones).
            let mut out = Vec::new();
            for run in &tasks[t] {
                let cols = PANEL_ROWS * run.start..PANEL_ROWS * run.end;
                if m == 1 && wanted.is_none() && cols.end <= n {
                    // SAFETY: the tasks' panels are disjoint; this one writes only its own columns.
                    let out = unsafe { std::slice::from_raw_parts_mut(yp.at(cols.start), cols.len()) };
                    a.matmul_panels(&w, run.clone(), out);
                    continue;
                }
                out.resize(m * cols.len(), 0.0);
                a.matmul_panels(&w, run.clone(), &mut out);
                // The wanted columns of these panels, or all of them below N.
                let keep = wanted
                    .as_ref()
                    .map(|rows| &rows[rows.partition_point(|&r| r < cols.start)..rows.partition_point(|&r| r < cols.end)]);
                for (r, part) in out.chunks_exact(cols.len()).enumerate() {
                    let mut put = |c: usize| {
                        // SAFETY: as above, columns of this task's panels in each row of y.
                        unsafe { *yp.at(r * n + c) = part[c - cols.start] };
                    };
                    match keep {
                        Some(keep) => keep.iter().for_each(|&c| put(c)),
                        None => (cols.start..cols.end.min(n)).for_each(&mut put),
                    }
                }
            }
        })
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

/// The panels that hold the ascending `rows`, as runs of consecutive panels.
fn panel_runs(rows: &[usize]) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for p in rows.iter().map(|r| r / PANEL_ROWS) {
        match out.last_mut() {
            Some(run) if run.end > p => {}
            Some(run) if run.end == p => run.end = p + 1,
            _ => out.push(p..p + 1),
        }
    }
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

/// `runs` (of panels) cut into `tasks` tasks of about equal panels, a multiple of `grain` each
/// (bar the last); fewer where the panels run out first.
fn split(runs: &[Range<usize>], tasks: usize, grain: usize) -> Vec<Vec<Range<usize>>> {
    let total: usize = runs.iter().map(|r| r.len()).sum();
    let per_task = (total.div_ceil(grain).div_ceil(tasks.max(1)) * grain).max(1);
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
    fn rows_become_runs_of_panels_and_runs_tasks_of_equal_panels() {
        assert_eq!(checked(&[0, 1, 2, 70], 71).unwrap(), vec![0, 1, 2, 70]);
        assert!(checked(&[3, 3], 11).unwrap_err().contains("ascending"));
        assert!(checked(&[11], 11).unwrap_err().contains("not among the 11 outputs"));
        assert!(checked(&[-1], 11).unwrap_err().contains("row -1"));
        assert_eq!(panel_runs(&[0, 1, 15, 16, 40, 100, 111, 112]), vec![0..3, 6..8]);
        let tasks = split(&[0..50, 60..110], 4, 1);
        assert_eq!(tasks.len(), 4);
        assert_eq!(tasks[0], vec![0..25]);
        assert_eq!(tasks[1], vec![25..50]);
        assert_eq!(tasks[2], vec![60..85]);
        assert_eq!(split(&[3..8, 9..9], 1, 1), vec![vec![3..8]]);
        assert_eq!(split(&[], 2, 1), vec![Vec::<Range<usize>>::new()]);
        // More tasks than rows: one row each.
        assert_eq!(split(std::slice::from_ref(&(3..5)), 4, 1), vec![vec![3..4], vec![4..5]]);
        // Pairs: 64 panels in 32 tasks of a pair; 63 in 2 of 32 and 31.
        let tasks = split(std::slice::from_ref(&(0..64)), 32, 2);
        assert_eq!(tasks.len(), 32);
        assert!(tasks.iter().all(|t| t.iter().map(|r| r.len()).sum::<usize>() == 2));
        let tasks = split(std::slice::from_ref(&(0..63)), 2, 2);
        assert_eq!(tasks, vec![vec![0..32], vec![32..63]]);
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
