//! Progress of long operations: a bar on a terminal, log lines (every 10 %) otherwise.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

/// A progress reporter for `len` units of work.
pub struct Progress {
    bar: Option<ProgressBar>,
    label: &'static str,
    len: u64,
    done: u64,
    next_log: u64,
    start: Instant,
}

impl Progress {
    /// Starts reporting on `len` units labelled `label`.
    pub fn new(len: u64, label: &'static str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(len);
            b.set_style(
                ProgressStyle::with_template("{msg:>16} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
                    .expect("static template")
                    .progress_chars("=> "),
            );
            b.set_message(label);
            b
        });
        Self { bar, label, len, done: 0, next_log: len.div_ceil(10).max(1), start: Instant::now() }
    }

    /// Records that `done` units are done in all (a resumed job starts past 0).
    pub fn reach(&mut self, done: u64) {
        self.inc(done.saturating_sub(self.done));
    }

    /// Records `n` more units done.
    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(b) => b.inc(n),
            None if self.done >= self.next_log || self.done == self.len => {
                tracing::info!("{}: {}/{} ({:.1}s)", self.label, self.done, self.len, self.start.elapsed().as_secs_f64());
                self.next_log = self.done + self.len.div_ceil(10).max(1);
            }
            None => {}
        }
    }

    /// Clears the bar (log mode has already said everything).
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// Progress of one document through its steps: a spinner line on a terminal showing the step
/// and the prompt tokens prefilled so far, a log line per step otherwise.
pub struct DocProgress {
    bar: Option<ProgressBar>,
    name: String,
    step: std::cell::RefCell<String>,
    tokens: std::cell::Cell<u64>,
}

impl DocProgress {
    /// Starts showing `name` (e.g. `[3/10] contracts/lease.pdf`).
    pub fn new(name: String) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(ProgressStyle::with_template("{spinner} {elapsed:>4} {msg}").expect("static template"));
            b.enable_steady_tick(std::time::Duration::from_millis(200));
            b.set_message(name.clone());
            b
        });
        Self { bar, name, step: Default::default(), tokens: Default::default() }
    }

    /// A step started.
    pub fn step(&self, step: &str) {
        if *self.step.borrow() == step {
            return;
        }
        *self.step.borrow_mut() = step.to_string();
        match &self.bar {
            Some(b) => b.set_message(format!("{}: {step}", self.name)),
            None => tracing::info!("{}: {step}", self.name),
        }
    }

    /// `n` more prompt tokens were prefilled.
    pub fn prefilled(&self, n: usize) {
        self.tokens.set(self.tokens.get() + n as u64);
        if let Some(b) = &self.bar {
            b.set_message(format!("{}: {} ({} tokens prefilled)", self.name, self.step.borrow(), self.tokens.get()));
        }
    }

    /// Ends the line with an outcome.
    pub fn finish(&self, outcome: &str) {
        match &self.bar {
            Some(b) => b.finish_with_message(format!("{}: {outcome}", self.name)),
            None => tracing::info!("{}: {outcome}", self.name),
        }
    }
}
