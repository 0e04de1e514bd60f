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

/// Which scheduled pipelines are in a run. The runs themselves live in the ledger, so that the
/// daemons sharing one each see the same runs: a fire starts one run however many daemons
/// notice it (the ledger keeps one run per pipeline and fire time), every daemon works in it
/// while it lasts, the first to find it out of work ends it, and the first to find it past its
/// window reports the overrun. A daemon that restarts during a run joins it again.
#[derive(Default)]
pub struct Scheduler {
    /// Open runs by pipeline: the run id.
    open: HashMap<String, i64>,
}

impl Scheduler {
    /// Starts due runs, joins and ends open ones; returns what this daemon did (another
    /// daemon's start or end is its to report).
    pub fn tick(&mut self, now: Timestamp, ledger: &mut dyn Ledger, pipelines: &[Pipeline]) -> Result<Vec<Event>> {
        let now_s = seconds(now);
        let mut events = Vec::new();
        self.open.retain(|name, _| pipelines.iter().any(|p| p.name() == name && p.spec.schedule.is_some()));
        for p in pipelines {
            let Some(spec) = &p.spec.schedule else { continue };
            let name = p.name().to_string();
            let last = ledger.last_run(&name)?;
            if let Some(run) = last.as_ref().filter(|r| r.ended_at.is_none()) {
                self.open.insert(name.clone(), run.id);
                if !ledger.has_work(&name, now_s)? {
                    let overran = now_s > run.deadline;
                    if let Some(ended) = ledger.end_run(run.id, now_s, overran)? {
                        events.push(Event::Ended {
                            pipeline: name.clone(),
                            documents: ended.documents,
                            ok: ended.ok.unwrap_or(true),
                            overran,
                            started: ended.started_at,
                        });
                    }
                    self.open.remove(&name);
                } else if now_s > run.deadline && !run.overrun_reported && ledger.report_overrun(run.id)? {
                    events.push(Event::Overrun { pipeline: name.clone() });
                }
                continue;
            }
            self.open.remove(&name);
            let first = ledger.first_seen(&name, now_s)?;
            let first_seen = Timestamp::from_millisecond((first * 1000.0) as i64).unwrap_or(Timestamp::UNIX_EPOCH);
            let last = last.and_then(|r| Timestamp::from_millisecond((r.planned_at * 1000.0) as i64).ok());
            // When the run exists already, another daemon started it a moment ago: the next tick
            // joins it.
            if let Some(d) = due(spec, now, last, first_seen)
                && let Some(id) = ledger.start_run(&name, seconds(d.planned), seconds(d.deadline), now_s)?
            {
                events.push(Event::Started { pipeline: name.clone(), planned: d.planned, catch_up: d.catch_up });
                self.open.insert(name, id);
            }
        }
        Ok(events)
    }

    /// Whether documents of `pipeline` may run now.
    pub fn open(&self, p: &Pipeline) -> bool {
        p.spec.schedule.is_none() || self.open.contains_key(p.name())
    }
}

fn seconds(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}
