//! Cron windows with a fake clock over the real ledger: a nightly run opens at its fire time in
//! its time zone, ends when the work is done, reports an overrun, and a window missed while the
//! daemon was down runs at the next start.

use std::path::Path;

use deltadoc::config::{self, Pipeline};
use deltadoc::ledger::{Discovery, Ledger, NewJob, SqliteLedger};
use deltadoc::schedule::{Event, Scheduler};
use jiff::Timestamp;

fn pipeline() -> Pipeline {
    let yaml = "name: nightly
inboxes: [{path: inbox}]
output: out
schedule: {cron: \"0 2 * * *\", timezone: Europe/Berlin, window: 1h}
stages: [{name: s, kind: summarize}]
";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("nightly.yaml");
    std::fs::write(&file, yaml).unwrap();
    config::load_pipeline(&file, Some(dir.path())).unwrap()
}

/// A wall-clock time with its zone (`…[Europe/Berlin]`) or a UTC instant (`…Z`).
fn at(s: &str) -> Timestamp {
    if s.contains('[') { s.parse::<jiff::Zoned>().unwrap().timestamp() } else { s.parse().unwrap() }
}

fn secs(t: Timestamp) -> f64 {
    t.as_millisecond() as f64 / 1000.0
}

fn queue(l: &mut SqliteLedger, name: &str) {
    let job = NewJob {
        key: name,
        pipeline: "nightly",
        priority: 0,
        inbox: Path::new("/in"),
        rel_path: Path::new(name),
        sha256: name,
        size: 1,
        reprocess_duplicates: false,
    };
    assert!(matches!(l.discover(&job).unwrap(), Discovery::Queued(_)));
}

#[test]
fn nightly_window_overrun_and_missed_run_catch_up() {
    let dir = tempfile::tempdir().unwrap();
    let mut l = SqliteLedger::open(dir.path()).unwrap();
    let ps = [pipeline()];
    let p = &ps[0];
    let mut s = Scheduler::default();

    // Installed in the afternoon: the 02:00 fire of that morning is not owed.
    assert!(s.tick(at("2026-11-23T15:00:00[Europe/Berlin]"), &mut l, &ps).unwrap().is_empty());
    assert!(!s.open(p), "documents wait for the window");
    queue(&mut l, "a.pdf");
    assert!(s.tick(at("2026-11-24T01:59:59[Europe/Berlin]"), &mut l, &ps).unwrap().is_empty());

    // 02:00 Berlin (01:00 UTC): the run starts and the pipeline opens.
    let ev = s.tick(at("2026-11-24T02:00:05[Europe/Berlin]"), &mut l, &ps).unwrap();
    assert_eq!(ev, vec![Event::Started { pipeline: "nightly".into(), planned: at("2026-11-24T01:00:00Z"), catch_up: false }]);
    assert!(s.open(p));
    let j = l.claim(&["nightly"], secs(at("2026-11-24T02:00:06[Europe/Berlin]"))).unwrap().unwrap();
    l.done(j.id, Path::new("/out/a.pdf.json"), secs(at("2026-11-24T02:10:00[Europe/Berlin]"))).unwrap();
    s.record("nightly", true);
    let ev = s.tick(at("2026-11-24T02:10:01[Europe/Berlin]"), &mut l, &ps).unwrap();
    assert!(matches!(&ev[..], [Event::Ended { documents: 1, ok: true, overran: false, .. }]), "{ev:?}");
    assert!(!s.open(p));
    // The same fire is not run twice.
    assert!(s.tick(at("2026-11-24T02:30:00[Europe/Berlin]"), &mut l, &ps).unwrap().is_empty());

    // Next night a long job outlasts the 1 h window: reported once, the run goes on.
    queue(&mut l, "b.pdf");
    s.tick(at("2026-11-25T02:00:00[Europe/Berlin]"), &mut l, &ps).unwrap();
    let j = l.claim(&["nightly"], secs(at("2026-11-25T02:00:01[Europe/Berlin]"))).unwrap().unwrap();
    let ev = s.tick(at("2026-11-25T03:00:01[Europe/Berlin]"), &mut l, &ps).unwrap();
    assert_eq!(ev, vec![Event::Overrun { pipeline: "nightly".into() }]);
    assert!(s.tick(at("2026-11-25T03:30:00[Europe/Berlin]"), &mut l, &ps).unwrap().is_empty(), "reported once");
    l.done(j.id, Path::new("/out/b.pdf.json"), 0.0).unwrap();
    let ev = s.tick(at("2026-11-25T03:40:00[Europe/Berlin]"), &mut l, &ps).unwrap();
    assert!(matches!(&ev[..], [Event::Ended { overran: true, .. }]), "{ev:?}");

    // The daemon is down through the night of the 26th; at 09:00 a new daemon (fresh
    // scheduler, same ledger) catches the missed 02:00 run up.
    queue(&mut l, "c.pdf");
    drop(s);
    let mut s = Scheduler::default();
    let ev = s.tick(at("2026-11-26T09:00:00[Europe/Berlin]"), &mut l, &ps).unwrap();
    assert_eq!(ev, vec![Event::Started { pipeline: "nightly".into(), planned: at("2026-11-26T01:00:00Z"), catch_up: true }]);
    assert!(s.open(p));
    let last = l.last_run("nightly").unwrap().unwrap();
    assert_eq!(last.planned_at, secs(at("2026-11-26T02:00:00[Europe/Berlin]")));

    // Daylight saving: in summer 02:00 Berlin is 00:00 UTC.
    let spec = &p.spec.schedule.as_ref().unwrap();
    let d = deltadoc::schedule::due(spec, at("2027-07-01T02:00:01[Europe/Berlin]"), None, Timestamp::UNIX_EPOCH).unwrap();
    assert_eq!(d.planned, at("2027-07-01T00:00:00Z"));
}
