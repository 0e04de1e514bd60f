//! The sessions' thread pool: its threads spin between the ops of a run, which decode steps need
//! (src/runtime.rs), and must stop when the run returns, or an idle daemon would keep every core
//! it was given busy.

mod common;

use std::time::Duration;

use deltadoc::generate::{Decoder, Logits};
use deltadoc::model::quant::Precision;
use deltadoc::runtime::SessionOptions;

/// CPU time, user and system, this whole process has used.
fn cpu_time() -> Duration {
    // SAFETY: `getrusage` only writes the struct it is given.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut u), 0);
        u
    };
    let t = |v: libc::timeval| Duration::from_secs(v.tv_sec as u64) + Duration::from_micros(v.tv_usec as u64);
    t(u.ru_utime) + t(u.ru_stime)
}

#[test]
fn pool_threads_stop_spinning_when_a_run_returns() {
    // int4: the projections run `QuantMatMul`, whose calls are shared over both threads.
    let dir = common::open(&common::imported("fullvocab", Precision::Int4));
    let mut dec = Decoder::open(&dir, &SessionOptions::with_threads(2)).unwrap();
    let prompt: Vec<u32> = (1000..1032).collect();
    dec.forward(&prompt, Logits::Last).unwrap();
    for t in 0..8 {
        dec.forward(&[2000 + t], Logits::Last).unwrap();
    }
    let (before, idle) = (cpu_time(), Duration::from_millis(100));
    std::thread::sleep(idle);
    let used = cpu_time() - before;
    // Without `session.force_spinning_stop` ONNX Runtime's threads spin on for a while after the
    // run: 27 ms of CPU in this window here; with it, 0.06 ms.
    assert!(used < idle / 10, "the process used {used:?} of CPU while idle for {idle:?}: a pool thread kept spinning");
}
