//! Where a run's time goes among deltadoc's own operators: process-wide totals per operator kind
//! (calls, seconds, and the weight bytes `QuantMatMul` read), which `deltadoc bench` takes around
//! its decode steps to split a step into the weight stream, the DeltaNet's and attention's own
//! work, and everything else (ONNX Runtime's nodes and the run's fixed cost). The weight stream's
//! rate inside the matmul calls is what the kernels can change; the rest of the step is not
//! theirs (benches/RESULTS.md, "Where a decode step's time goes").
//!
//! Each parallel section of a call ([`super::parallel`]) is counted too: its wall time and its
//! tasks' own time, whose difference is what handing work to the intra-op pool costs (waking the
//! other threads, waiting for the last task to end).
//!
//! Counting costs two clock reads and two or three relaxed atomic adds a call and a task, about
//! 0.1 µs against the 10-400 µs of a call. The totals are shared by every session in the process:
//! they describe one run only where one session runs at a time, as in `deltadoc bench`.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

/// The operator kinds counted apart; the three cache types of attention count as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    QuantMatMul,
    GatedDeltaRule,
    CausalConv,
    CausalAttention,
}

impl OpKind {
    const ALL: [OpKind; 4] = [OpKind::QuantMatMul, OpKind::GatedDeltaRule, OpKind::CausalConv, OpKind::CausalAttention];

    /// The operator's name in the graph (attention: the family's).
    pub(crate) fn name(self) -> &'static str {
        match self {
            OpKind::QuantMatMul => "QuantMatMul",
            OpKind::GatedDeltaRule => "GatedDeltaRule",
            OpKind::CausalConv => "CausalConv1dWithState",
            OpKind::CausalAttention => "CausalAttention",
        }
    }
}

struct Totals {
    nanos: AtomicU64,
    calls: AtomicU64,
    weight_bytes: AtomicU64,
    sections: AtomicU64,
    section_nanos: AtomicU64,
    task_nanos: AtomicU64,
}

static TOTALS: [Totals; 4] = [const {
    Totals {
        nanos: AtomicU64::new(0),
        calls: AtomicU64::new(0),
        weight_bytes: AtomicU64::new(0),
        sections: AtomicU64::new(0),
        section_nanos: AtomicU64::new(0),
        task_nanos: AtomicU64::new(0),
    }
}; 4];

/// One call of `kind` that began at `since`.
pub(crate) fn record(kind: OpKind, since: Instant) {
    let t = &TOTALS[kind as usize];
    t.nanos.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    t.calls.fetch_add(1, Relaxed);
}

/// One parallel section of `kind` that began at `since` and whose tasks ran `task_nanos` in all.
pub(crate) fn section(kind: OpKind, since: Instant, task_nanos: u64) {
    let t = &TOTALS[kind as usize];
    t.section_nanos.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    t.sections.fetch_add(1, Relaxed);
    t.task_nanos.fetch_add(task_nanos, Relaxed);
}

/// Packed weight bytes a `QuantMatMul` call reads.
pub(crate) fn read_weights(bytes: usize) {
    TOTALS[OpKind::QuantMatMul as usize].weight_bytes.fetch_add(bytes as u64, Relaxed);
}

/// Totals of one operator kind over a stretch of runs.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct OpTime {
    /// [`OpKind::name`].
    pub op: &'static str,
    /// Calls counted.
    pub calls: u64,
    /// Wall-clock seconds inside the calls, from the operator's entry to its return (inputs
    /// checked, outputs allocated, the work on the pool).
    pub seconds: f64,
    /// Packed weight bytes read (`QuantMatMul`; 0 for the others).
    pub weight_bytes: u64,
    /// Parallel sections the calls ran.
    pub sections: u64,
    /// Wall-clock seconds inside those sections.
    pub section_seconds: f64,
    /// Seconds the sections' tasks ran, summed over threads: with `threads` threads a section
    /// would take `task_seconds / threads` if the pool cost nothing.
    pub task_seconds: f64,
}

impl OpTime {
    /// Seconds the sections took beyond their tasks shared out evenly over `threads` threads.
    pub fn pool_seconds(&self, threads: usize) -> f64 {
        self.section_seconds - self.task_seconds / threads.max(1) as f64
    }
}

/// The totals since the last `take` (or the process start), every kind that ran, and zeroes
/// them. Calls in flight at the time may land on either side.
pub fn take() -> Vec<OpTime> {
    OpKind::ALL
        .iter()
        .map(|&kind| {
            let t = &TOTALS[kind as usize];
            OpTime {
                op: kind.name(),
                calls: t.calls.swap(0, Relaxed),
                seconds: t.nanos.swap(0, Relaxed) as f64 * 1e-9,
                weight_bytes: t.weight_bytes.swap(0, Relaxed),
                sections: t.sections.swap(0, Relaxed),
                section_seconds: t.section_nanos.swap(0, Relaxed) as f64 * 1e-9,
                task_seconds: t.task_nanos.swap(0, Relaxed) as f64 * 1e-9,
            }
        })
        .filter(|t| t.calls > 0)
        .collect()
}
