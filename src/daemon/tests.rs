//! The worker with a fake model ([`crate::llm::fake`]) and a fake clock over the real SQLite
//! ledger: retry with doubling backoff then quarantine, `deltadoc retry`, SIGHUP reload, and a
//! schedule window, each in milliseconds.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use jiff::{SignedDuration, Timestamp};

use super::crash_marker::CrashMarker;
use super::documents::Places;
use super::events::{InternalEvent, SchedulesSampled};
use super::health::Health;
use super::heartbeat::Watch;
use super::inbox::{self, Candidate};
use super::ingest::Ingest;
use super::metrics::Metrics;
use super::worker::{Exit, Shared, Tick, Worker};
use super::{Mode, Signals, reload};
use crate::bucket::Stores;
use crate::config::Config;
use crate::extract::ExtractLimits;
use crate::extract::isolated::Extraction;
use crate::ledger::{self, state};
use crate::llm::fake::{Answer, FakeModel};
use crate::schedule::{Clock, Scheduler};

/// Time that moves only when the test says so.
struct FakeClock(Mutex<Timestamp>);

impl FakeClock {
    fn at(t: &str) -> Self {
        Self(Mutex::new(t.parse().unwrap()))
    }

    fn advance(&self, secs: i64) {
        let mut t = self.0.lock().unwrap();
        *t = t.checked_add(SignedDuration::from_secs(secs)).unwrap();
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Timestamp {
        *self.0.lock().unwrap()
    }
}

/// A daemon installation in a temporary folder: config file, one pipeline `p` (more can be
/// written), inbox, output, quarantine, state.
struct Install {
    dir: tempfile::TempDir,
    marker: CrashMarker,
    watch: Watch,
    metrics: Metrics,
    health: Health,
    signals: Signals,
    clock: FakeClock,
}

const CONFIG: &str = "model: {path: model}\nstate_dir: state\ndata_dir: .\nlimits: {max_attempts: 3, retry_backoff: 60s}\n";

impl Install {
    /// The installation with `pipeline_extra` in pipeline `p`, its clock at `now`.
    fn new(pipeline_extra: &str, now: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (marker, _) = CrashMarker::open(dir.path(), 1).unwrap();
        let i = Self {
            dir,
            marker,
            watch: Watch::default(),
            metrics: Metrics::new().unwrap(),
            health: Health::new(std::time::Duration::from_secs(900)),
            signals: Signals::new(),
            clock: FakeClock::at(now),
        };
        i.write("config/deltadoc.yaml", CONFIG);
        i.write(
            "pipelines/p.yaml",
            &format!(
                "name: p\ninboxes: [{{path: inbox}}]\noutput: out\nquarantine: quarantine\nquarantine_mode: copy\n{pipeline_extra}\
                 stages: [{{name: summary, kind: summarize, max_new_tokens: 8}}]\n"
            ),
        );
        std::fs::create_dir_all(i.path("inbox")).unwrap();
        i
    }

    fn path(&self, rel: &str) -> std::path::PathBuf {
        self.dir.path().join(rel)
    }

    fn write(&self, rel: &str, text: &str) {
        let p = self.path(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn config(&self) -> Config {
        Config::load(Some(&self.path("config/deltadoc.yaml"))).unwrap()
    }

    fn worker(&self) -> Worker<'_> {
        let cfg = Arc::new(self.config());
        let places = Places::new(&cfg.daemon, Arc::new(Stores::new(&cfg.daemon.object_store)));
        let shared = Shared {
            extraction: Extraction::InProcess(ExtractLimits { max_pages: 100 }),
            cfg: cfg.clone(),
            metrics: &self.metrics,
            health: &self.health,
            clock: &self.clock,
            signals: &self.signals,
            marker: &self.marker,
            watch: &self.watch,
            places,
        };
        Worker { shared, ledger: ledger::open(&cfg.daemon).unwrap(), scheduler: Scheduler::default(), processed: 0 }
    }

    /// Drops `name` into the inbox and records it as the ingest thread would.
    fn drop_in(&self, w: &mut Worker, name: &str, text: &str) {
        self.write(&format!("inbox/{name}"), text);
        let c = Candidate { pipeline: "p".into(), inbox: self.path("inbox"), rel: name.into() };
        let (size, mtime) = inbox::signature(&c.path()).unwrap();
        let (waiting, stop) = (Mutex::default(), AtomicBool::new(false));
        let ingest = Ingest {
            cfg: &w.shared.cfg,
            model: "fake",
            metrics: &self.metrics,
            waiting: &waiting,
            mode: Mode::Serve,
            signals: &self.signals,
            stop: &stop,
            notified: &Default::default(),
            stores: &Stores::new(&Default::default()),
        };
        ingest.record(&mut *w.ledger, &c, size, mtime).unwrap();
    }

    /// A series' value, 0 when it has no sample yet.
    fn series(&self, name: &str, labels: &[&str]) -> f64 {
        self.metrics.sample(name, labels).unwrap_or(0.0)
    }
}

/// A model that answers `text` to everything.
fn answering(text: &'static str) -> FakeModel {
    FakeModel::new(262_144, move |_| Answer::Text(text.into()))
}

fn tick(w: &mut Worker, model: &mut FakeModel, mode: Mode) -> Tick {
    w.tick(model, mode, &AtomicBool::new(true), &mut false).unwrap()
}

fn job_state(w: &mut Worker) -> (String, u32) {
    let j = w.ledger.recent(1).unwrap().remove(0);
    (j.state, j.attempts)
}

#[test]
fn a_failing_document_is_retried_after_doubling_waits_then_quarantined_and_retry_queues_it_again() {
    let install = Install::new("", "2026-12-04T10:00:00Z");
    let mut w = install.worker();
    let failing = || Answer::Fail("the runtime crashed".into());
    let mut model = answering("fine").script([failing(), failing(), failing()]);
    install.drop_in(&mut w, "doc.md", "A supply agreement between Acme and Beta.");

    assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Worked);
    assert_eq!(job_state(&mut w), (state::RETRY_WAIT.into(), 1));
    // The first wait is retry_backoff (60 s), the second twice that.
    for (wait, attempt) in [(60, 2), (120, 3)] {
        install.clock.advance(wait - 1);
        assert!(matches!(tick(&mut w, &mut model, Mode::Serve), Tick::Idle(_)), "not before {wait} s");
        install.clock.advance(1);
        assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Worked);
        let expected = if attempt < 3 { state::RETRY_WAIT } else { state::QUARANTINED };
        assert_eq!(job_state(&mut w), (expected.into(), attempt));
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(install.path("quarantine/doc.md.error.json")).unwrap()).unwrap();
    assert_eq!((report["reason"].as_str(), report["attempts"].as_u64()), (Some("model"), Some(3)));
    assert!(install.path("inbox/doc.md").is_file(), "quarantine_mode copy leaves the inbox alone");
    assert_eq!(install.series("deltadoc_documents_total", &["outcome=\"failed\""]), 2.0);
    assert_eq!(install.series("deltadoc_documents_total", &["outcome=\"quarantined\""]), 1.0);
    assert_eq!(install.series("deltadoc_retries_total", &[]), 2.0);
    assert_eq!(install.series("deltadoc_failures_total", &["reason=\"model\"", "stage=\"summary\""]), 3.0);

    // `deltadoc retry JOB`: queued again with fresh attempts; the model works now.
    let id = w.ledger.recent(1).unwrap()[0].id;
    assert_eq!(ledger::open(&install.config().daemon).unwrap().retry(Some(id)).unwrap(), 1);
    assert_eq!(job_state(&mut w), (state::QUEUED.into(), 0));
    assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Worked);
    assert_eq!(job_state(&mut w), (state::DONE.into(), 1));
    let result: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(install.path("out/doc.md.json")).unwrap()).unwrap();
    assert_eq!(result["stages"]["summary"]["output"], "fine");
    assert_eq!(install.series("deltadoc_documents_total", &["outcome=\"ok\""]), 1.0);
}

#[test]
fn a_permanent_failure_is_quarantined_at_once() {
    let install = Install::new("", "2026-12-04T10:00:00Z");
    let mut w = install.worker();
    let mut model = answering("unused");
    install.drop_in(&mut w, "empty.md", "   \n\n  ");
    assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Worked);
    assert_eq!(job_state(&mut w), (state::QUARANTINED.into(), 1));
    assert_eq!(install.series("deltadoc_failures_total", &["reason=\"parse\"", "stage=\"extract\""]), 1.0);
    assert!(model.asked.is_empty(), "a document without text never reaches the model");
}

#[test]
fn sighup_ends_the_serving_worker_for_a_reload_that_keeps_start_up_settings_or_refuses_a_bad_file() {
    let install = Install::new("", "2026-12-04T10:00:00Z");
    let mut w = install.worker();
    let mut model = answering("ok");
    install.signals.request_reload();
    assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Exit(Exit::Reload));
    // `run --once` keeps its configuration.
    install.signals.request_reload();
    assert!(matches!(tick(&mut w, &mut model, Mode::Once), Tick::Exit(Exit::Done)), "and finishes its pass");

    let old = install.config();
    install
        .write("pipelines/q.yaml", "name: q\ninboxes: [{path: inbox-q}]\noutput: out-q\nstages: [{name: s, kind: summarize}]\n");
    install.write("config/deltadoc.yaml", &CONFIG.replace("path: model", "path: other-model"));
    let new = reload(&old, &install.metrics, &Stores::new(&old.daemon.object_store)).expect("the new files load");
    let names: Vec<&str> = new.pipelines.iter().map(|p| p.name()).collect();
    assert_eq!(names, ["p", "q"]);
    assert_eq!(new.daemon.model.path, old.daemon.model.path, "the loaded model stays until a restart");

    install
        .write("pipelines/q.yaml", "name: q\ninboxes: [{path: inbox-q}]\noutput: out-q\nstages: [{name: s, kind: sumarize}]\n");
    assert!(reload(&old, &install.metrics, &Stores::new(&old.daemon.object_store)).is_none(), "a broken file is refused");
    assert_eq!(install.series("deltadoc_config_reloads_total", &["outcome=\"failed\""]), 1.0);
}

#[test]
fn a_scheduled_pipeline_waits_for_its_window_then_reports_the_run() {
    let install = Install::new("schedule: {cron: \"0 2 * * *\", timezone: UTC, window: 1h}\n", "2026-12-04T00:00:00Z");
    let mut w = install.worker();
    let mut model = answering("ok");
    install.drop_in(&mut w, "a.md", "First document.");
    install.drop_in(&mut w, "b.md", "Second document.");
    assert!(matches!(tick(&mut w, &mut model, Mode::Serve), Tick::Idle(_)), "outside the window");
    install.clock.advance(3600 + 1800);
    assert!(matches!(tick(&mut w, &mut model, Mode::Serve), Tick::Idle(_)), "01:30: still closed");
    install.clock.advance(1800 + 30);
    assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Worked, "02:00:30: the run starts");
    assert_eq!(tick(&mut w, &mut model, Mode::Serve), Tick::Worked);
    assert!(matches!(tick(&mut w, &mut model, Mode::Serve), Tick::Idle(_)), "the run ends with the work");
    // What a scrape reads from the ledger (in a fleet, another daemon may have run it).
    SchedulesSampled::read(&w.shared.cfg.pipelines, &mut *w.ledger).unwrap().emit(&install.metrics);
    assert_eq!(install.series("deltadoc_last_run_documents", &["pipeline=\"p\""]), 2.0);
    assert_eq!(install.series("deltadoc_last_run_success", &["pipeline=\"p\""]), 1.0);
    let end = install.series("deltadoc_last_run_end_timestamp_seconds", &["pipeline=\"p\""]);
    assert!(end > 0.0);
    // `run --once` ignores schedules.
    install.drop_in(&mut w, "c.md", "Third document.");
    assert_eq!(tick(&mut w, &mut model, Mode::Once), Tick::Worked);
    assert!(Path::new(&install.path("out/c.md.json")).is_file());
}
