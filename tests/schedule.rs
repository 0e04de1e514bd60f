//! Cron windows with a fake clock over the real ledger: a nightly run opens at its fire time in
//! its time zone, ends when the work is done, reports an overrun, and a window missed while the
//! daemon was down runs at the next start. Three daemons on one ledger (SQLite, and PostgreSQL on
//! a throwaway cluster) start, end and report a fire once, also across a restart of all of them.

mod common;

use std::path::Path;

use deltadoc::config::{self, Pipeline};
use deltadoc::ledger::{Discovery, Ledger, NewJob, PgLedger, SqliteLedger, WorkerId};
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

fn queue(l: &mut dyn Ledger, name: &str) {
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
    assert!(l.done(j.lease(), Path::new("/out/a.pdf.json"), secs(at("2026-11-24T02:10:00[Europe/Berlin]"))).unwrap());
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
    assert!(l.done(j.lease(), Path::new("/out/b.pdf.json"), secs(at("2026-11-25T03:35:00[Europe/Berlin]"))).unwrap());
    let ev = s.tick(at("2026-11-25T03:40:00[Europe/Berlin]"), &mut l, &ps).unwrap();
    assert!(matches!(&ev[..], [Event::Ended { documents: 1, overran: true, .. }]), "{ev:?}");

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

/// Three daemons, each with its own scheduler and ledger connection: `open` makes a connection.
fn fire_once_across_daemons(open: &dyn Fn() -> Box<dyn Ledger>) {
    let ps = [pipeline()];
    let p = &ps[0];
    let daemons = (0..3).map(|n| {
        let mut l = open();
        l.join(&WorkerId { name: format!("d{n}"), host: "h".into(), pid: n, lease_s: 30.0 }).unwrap();
        (Scheduler::default(), l)
    });
    let mut daemons: Vec<(Scheduler, Box<dyn Ledger>)> = daemons.collect();
    let tick = |daemons: &mut Vec<(Scheduler, Box<dyn Ledger>)>, t: &str| -> Vec<Event> {
        daemons.iter_mut().flat_map(|(s, l)| s.tick(at(t), &mut **l, &ps).unwrap()).collect()
    };
    assert!(tick(&mut daemons, "2026-11-23T15:00:00[Europe/Berlin]").is_empty());
    for name in ["a.pdf", "b.pdf"] {
        queue(&mut *daemons[0].1, name);
    }
    let ev = tick(&mut daemons, "2026-11-24T02:00:05[Europe/Berlin]");
    assert_eq!(ev, vec![Event::Started { pipeline: "nightly".into(), planned: at("2026-11-24T01:00:00Z"), catch_up: false }]);
    assert!(daemons.iter().all(|(s, _)| s.open(p)), "every daemon works in the run");

    // Two daemons take a document each; all of them are restarted mid-run (fresh schedulers):
    // they join the run, nobody starts another.
    let claimed: Vec<_> = daemons[..2]
        .iter_mut()
        .map(|(_, l)| l.claim(&["nightly"], secs(at("2026-11-24T02:00:06[Europe/Berlin]"))).unwrap().unwrap())
        .collect();
    for (s, _) in daemons.iter_mut() {
        *s = Scheduler::default();
    }
    assert!(tick(&mut daemons, "2026-11-24T02:30:00[Europe/Berlin]").is_empty());
    assert!(daemons.iter().all(|(s, _)| s.open(p)), "rejoined after the restart");

    // Past the window: reported once; then the work ends and the run ends once.
    let ev = tick(&mut daemons, "2026-11-24T03:00:01[Europe/Berlin]");
    assert_eq!(ev, vec![Event::Overrun { pipeline: "nightly".into() }]);
    for (j, (_, l)) in claimed.iter().zip(daemons.iter_mut()) {
        assert!(l.done(j.lease(), Path::new("/out/x.json"), secs(at("2026-11-24T03:10:00[Europe/Berlin]"))).unwrap());
    }
    let ev = tick(&mut daemons, "2026-11-24T03:20:00[Europe/Berlin]");
    assert!(matches!(&ev[..], [Event::Ended { documents: 2, ok: true, overran: true, .. }]), "{ev:?}");
    assert!(daemons.iter().all(|(s, _)| !s.open(p)));
    assert!(tick(&mut daemons, "2026-11-24T04:00:00[Europe/Berlin]").is_empty(), "the fire is served");
}

#[test]
fn a_fire_runs_once_across_three_daemons_and_their_restart() {
    let dir = tempfile::tempdir().unwrap();
    fire_once_across_daemons(&|| Box::new(SqliteLedger::open(dir.path()).unwrap()));
    if let Some(cluster) = common::pg_cluster::Cluster::start() {
        let (url, pw) = (cluster.database("schedules"), cluster.password_file());
        fire_once_across_daemons(&|| Box::new(PgLedger::connect(&url, Some(&pw)).unwrap()));
    }
}
