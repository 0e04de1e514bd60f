//! Where a run's time goes among deltadoc's own operators: process-wide totals per operator kind
//! (calls, seconds, and the weight bytes `QuantMatMul` read), which `deltadoc bench` takes around
//! its decode steps to split a step into the weight stream, the DeltaNet's and attention's own
//! work, and everything else (ONNX Runtime's nodes and the run's fixed cost). The weight stream's
//! rate inside the matmul calls is what the kernels can change; the rest of the step is not
//! theirs (benches/RESULTS.md, "Where a decode step's time goes").
//!
//! Counting costs two clock reads and two or three relaxed atomic adds a call, about 0.1 µs against the
//! 10-400 µs of a call. The totals are shared by every session in the process: they describe one
//! run only where one session runs at a time, as in `deltadoc bench`.

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
}

static TOTALS: [Totals; 4] =
    [const { Totals { nanos: AtomicU64::new(0), calls: AtomicU64::new(0), weight_bytes: AtomicU64::new(0) } }; 4];

/// One call of `kind` that began at `since`.
pub(crate) fn record(kind: OpKind, since: Instant) {
    let t = &TOTALS[kind as usize];
    t.nanos.fetch_add(since.elapsed().as_nanos() as u64, Relaxed);
    t.calls.fetch_add(1, Relaxed);
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
            }
        })
        .filter(|t| t.calls > 0)
        .collect()
}
