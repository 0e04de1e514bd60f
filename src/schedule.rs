//! Cron windows: a scheduled pipeline collects documents all day and processes them when its
//! cron expression fires (in its time zone). A fire missed while the daemon was down runs at
//! the next start; a run that outlasts its window is reported. Time comes from a [`Clock`] so
//! tests can move it.

use std::collections::HashMap;

use anyhow::Result;
use jiff::{SignedDuration, Timestamp};

use crate::config::{Pipeline, ScheduleSpec};
use crate::ledger::Ledger;

/// Source of the current time.
pub trait Clock: Send + Sync {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// A window that is due.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Due {
    /// The fire time it serves.
    pub planned: Timestamp,
    /// When the run is over its window.
    pub deadline: Timestamp,
    /// The fire was missed (its window passed before the run could start).
    pub catch_up: bool,
}

/// The run `spec` owes at `now`, given the last fire time already served and when the
/// pipeline was first seen (fires before that are not owed).
pub fn due(spec: &ScheduleSpec, now: Timestamp, last_planned: Option<Timestamp>, first_seen: Timestamp) -> Option<Due> {
    let zoned = now.to_zoned(spec.timezone.tz.clone());
    let prev = spec.cron.cron.find_previous_occurrence(&zoned, true).ok()?.timestamp();
    if prev < first_seen || last_planned.is_some_and(|l| l >= prev) {
        return None;
    }
    let window = SignedDuration::try_from(spec.window.0).unwrap_or(SignedDuration::MAX);
    let end = prev.checked_add(window).unwrap_or(Timestamp::MAX);
    let catch_up = now >= end;
    let deadline = if catch_up { now.checked_add(window).unwrap_or(Timestamp::MAX) } else { end };
    Some(Due { planned: prev, deadline, catch_up })
}

/// The next fire time after `now`, for status displays.
pub fn next_fire(spec: &ScheduleSpec, now: Timestamp) -> Option<Timestamp> {
    let zoned = now.to_zoned(spec.timezone.tz.clone());
    spec.cron.cron.find_next_occurrence(&zoned, false).ok().map(|z| z.timestamp())
}

/// A run in progress.
#[derive(Clone, Debug)]
pub struct ActiveRun {
    /// Ledger id.
    pub id: i64,
    /// Window it serves.
    pub due: Due,
    /// Documents finished in it.
    pub documents: u64,
    /// Documents quarantined in it.
    pub failures: u64,
    /// Overrun already reported.
    pub overrun_reported: bool,
}

/// What changed in one [`Scheduler::tick`].
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A run started.
    Started {
        /// The scheduled pipeline.
        pipeline: String,
        /// Fire time served.
        planned: Timestamp,
        /// It catches up a missed window.
        catch_up: bool,
    },
    /// A run passed its window with work left.
    Overrun {
        /// The scheduled pipeline.
        pipeline: String,
    },
    /// A run ended.
    Ended {
        /// The scheduled pipeline.
        pipeline: String,
        /// Documents finished.
        documents: u64,
        /// None quarantined.
        ok: bool,
        /// It ran past its window.
        overran: bool,
        /// Start time (Unix seconds).
        started: f64,
    },
}

/// Tracks the runs of scheduled pipelines.
#[derive(Default)]
pub struct Scheduler {
    active: HashMap<String, (ActiveRun, f64)>,
}

impl Scheduler {
    /// Starts due runs and ends finished ones.
    pub fn tick(&mut self, now: Timestamp, ledger: &mut dyn Ledger, pipelines: &[Pipeline]) -> Result<Vec<Event>> {
        let now_s = now.as_millisecond() as f64 / 1000.0;
        let mut events = Vec::new();
        for p in pipelines {
            let Some(spec) = &p.spec.schedule else { continue };
            let name = p.name().to_string();
            if let Some((run, started)) = self.active.get_mut(&name) {
                if !ledger.has_work(&name, now_s)? {
                    let overran = now > run.due.deadline;
                    ledger.end_run(run.id, now_s, run.documents, run.failures == 0, overran)?;
                    events.push(Event::Ended {
                        pipeline: name.clone(),
                        documents: run.documents,
                        ok: run.failures == 0,
                        overran,
                        started: *started,
                    });
                    self.active.remove(&name);
                } else if now > run.due.deadline && !run.overrun_reported {
                    run.overrun_reported = true;
                    events.push(Event::Overrun { pipeline: name.clone() });
                }
                continue;
            }
            let first = ledger.first_seen(&name, now_s)?;
            let first_seen = Timestamp::from_millisecond((first * 1000.0) as i64).unwrap_or(Timestamp::UNIX_EPOCH);
            let last = ledger.last_run(&name)?.and_then(|r| Timestamp::from_millisecond((r.planned_at * 1000.0) as i64).ok());
            if let Some(d) = due(spec, now, last, first_seen) {
                let planned_s = d.planned.as_millisecond() as f64 / 1000.0;
                let id = ledger.start_run(&name, planned_s, now_s)?;
                events.push(Event::Started { pipeline: name.clone(), planned: d.planned, catch_up: d.catch_up });
                self.active.insert(name, (ActiveRun { id, due: d, documents: 0, failures: 0, overrun_reported: false }, now_s));
            }
        }
        Ok(events)
    }

    /// Whether documents of `pipeline` may run now.
    pub fn open(&self, p: &Pipeline) -> bool {
        p.spec.schedule.is_none() || self.active.contains_key(p.name())
    }

    /// Counts a finished document towards its pipeline's run.
    pub fn record(&mut self, pipeline: &str, ok: bool) {
        if let Some((run, _)) = self.active.get_mut(pipeline) {
            run.documents += 1;
            if !ok {
                run.failures += 1;
            }
        }
    }
}
