//! The ledger's contract, held by both ledgers: SQLite (one daemon, several connections) and
//! PostgreSQL (a fleet; a throwaway cluster per test, tests/common/pg_cluster.rs). Leases,
//! fencing, concurrent claims and discoveries, takeovers of silent workers, restarts,
//! migrations and a server restart. The daemons themselves run on a shared ledger in
//! tests/fleet.rs.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::pg_cluster::Cluster;
use deltadoc::failure::{Failure, Reason};
use deltadoc::ledger::{Discovery, Ledger, NewJob, PgLedger, SqliteLedger, WorkerId, state};

fn new_job<'a>(key: &'a str, rel: &'a Path) -> NewJob<'a> {
    NewJob {
        key,
        pipeline: "p",
        priority: 0,
        inbox: Path::new("/in"),
        rel_path: rel,
        sha256: key,
        size: 1,
        reprocess_duplicates: false,
    }
}

fn worker(name: &str, lease_s: f64) -> WorkerId {
    WorkerId { name: name.into(), host: "test-host".into(), pid: std::process::id(), lease_s }
}

/// Opens new connections to one ledger.
type Open<'a> = &'a (dyn Fn() -> Box<dyn Ledger> + Sync);

/// Runs `check` against a SQLite ledger and, when PostgreSQL is installed, a PostgreSQL one.
fn on_both(check: impl Fn(Open)) {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().to_path_buf();
    check(&move || Box::new(SqliteLedger::open(&state).unwrap()));
    if let Some(cluster) = Cluster::start() {
        let (url, pw) = (cluster.database("contract"), cluster.password_file());
        check(&move || Box::new(PgLedger::connect(&url, Some(&pw)).unwrap()));
    }
}

#[test]
fn a_claim_leases_the_job_and_only_the_current_lease_may_finish_it() {
    on_both(|open| {
        let mut a = open();
        a.join(&worker("a", 30.0)).unwrap();
        let rel = Path::new("a.pdf");
        let Discovery::Queued(id) = a.discover(&new_job("k1", rel)).unwrap() else { panic!() };
        assert_eq!(a.discover(&new_job("k1", rel)).unwrap(), Discovery::Known);
        assert_eq!(a.discover(&new_job("k1", Path::new("copy.pdf"))).unwrap(), Discovery::Duplicate { of: id });
        let j = a.claim(&["p"], 1.0).unwrap().unwrap();
        assert_eq!((j.id, j.attempts, j.state.as_str(), j.lease), (id, 1, "running", 1), "{}", a.describe());
        assert!(a.claim(&["p"], 1.0).unwrap().is_none());
        assert!(a.holds(j.lease()).unwrap());
        a.set_stage(j.lease(), "summary").unwrap();
        assert_eq!(a.job(id).unwrap().unwrap().stage.as_deref(), Some("summary"));

        // Released (a drain) and claimed again: a new lease; the old one finishes nothing.
        a.release(j.lease()).unwrap();
        let again = a.claim(&["p"], 2.0).unwrap().unwrap();
        assert_eq!((again.attempts, again.lease), (1, 2), "a released attempt is not counted");
        let old = j.lease();
        assert!(!a.holds(old).unwrap());
        assert!(!a.done(old, Path::new("/out/a.json"), 3.0).unwrap(), "a stale lease writes no result");
        let f = Failure::new(Reason::Timeout, "summary", "slow");
        assert!(!a.failed(old, &f, None, None, 3.0).unwrap(), "nor a quarantine");
        a.set_stage(again.lease(), "extract").unwrap();
        a.set_stage(old, "stale").unwrap();
        assert_eq!(a.job(id).unwrap().unwrap().stage.as_deref(), Some("extract"), "nor a stage");

        assert!(a.failed(again.lease(), &f, Some(100.0), None, 3.0).unwrap());
        assert!(a.claim(&["p"], 50.0).unwrap().is_none(), "backoff respected");
        let third = a.claim(&["p"], 100.0).unwrap().unwrap();
        assert_eq!((third.attempts, third.lease), (2, 3));
        assert!(a.done(third.lease(), Path::new("/out/a.json"), 101.0).unwrap());
        assert_eq!(a.job(id).unwrap().unwrap().state, state::DONE);
        let w = a.workers().unwrap();
        assert_eq!((w.len(), w[0].documents, w[0].job), (1, 1, None), "{w:?}");
    });
}

#[test]
fn concurrent_workers_claim_every_job_exactly_once() {
    on_both(|open| {
        let mut l = open();
        for i in 0..300 {
            let (key, rel) = (format!("k{i}"), PathBuf::from(format!("{i}.pdf")));
            l.discover(&new_job(&key, &rel)).unwrap();
        }
        let claimed: Vec<i64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..3)
                .map(|n| {
                    s.spawn(move || {
                        let mut l = open();
                        l.join(&worker(&format!("w{n}"), 30.0)).unwrap();
                        let mut mine = Vec::new();
                        while let Some(j) = l.claim(&["p"], 1.0).unwrap() {
                            assert!(l.done(j.lease(), Path::new("/out/x.json"), 2.0).unwrap());
                            mine.push(j.id);
                        }
                        mine
                    })
                })
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        let distinct: HashSet<i64> = claimed.iter().copied().collect();
        assert_eq!((claimed.len(), distinct.len()), (300, 300), "{}", l.describe());
        let documents: u64 = l.workers().unwrap().iter().map(|w| w.documents).sum();
        assert_eq!(documents, 300);
    });
}

#[test]
fn daemons_that_see_the_same_files_at_once_record_each_once() {
    on_both(|open| {
        // Three daemons watching one shared inbox, each finding the same 100 files and a copy of
        // each under another name.
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(move || {
                    let mut l = open();
                    for i in 0..100 {
                        let key = format!("k{i}");
                        for rel in [format!("{i}.pdf"), format!("copy-{i}.pdf")] {
                            l.discover(&new_job(&key, Path::new(&rel))).unwrap();
                        }
                    }
                });
            }
        });
        let mut l = open();
        let counts = l.counts().unwrap();
        let n = |st: &str| counts.iter().filter(|(_, s, _)| s == st).map(|(_, _, n)| *n).sum::<u64>();
        assert_eq!((n(state::QUEUED), n(state::SKIPPED)), (100, 100), "{}: {counts:?}", l.describe());
    });
}

/// A PostgreSQL ledger on a fresh cluster: the cluster and a connection opener.
fn fleet() -> Option<(Cluster, impl Fn() -> PgLedger)> {
    let cluster = Cluster::start()?;
    let (url, pw) = (cluster.database("fleet"), cluster.password_file());
    Some((cluster, move || PgLedger::connect(&url, Some(&pw)).unwrap()))
}

#[test]
fn a_silent_workers_job_goes_to_another_and_the_silent_one_is_fenced() {
    let Some((_cluster, open)) = fleet() else { return };
    let (mut a, mut b) = (open(), open());
    let me = worker("a", 1.0);
    let wa = a.join(&me).unwrap();
    b.join(&worker("b", 30.0)).unwrap();
    for i in 0..2 {
        let (key, rel) = (format!("k{i}"), PathBuf::from(format!("{i}.pdf")));
        a.discover(&new_job(&key, &rel)).unwrap();
    }
    // While a's heartbeat goes, its lease holds however long the job takes.
    let kept = a.claim(&["p"], 1.0).unwrap().unwrap();
    for _ in 0..6 {
        std::thread::sleep(Duration::from_millis(300));
        assert!(!a.heartbeat(wa, &me).unwrap());
        assert!(b.reap().unwrap().is_empty(), "a live worker's job is not taken");
    }
    assert!(a.done(kept.lease(), Path::new("/out/0.json"), 2.0).unwrap());

    // Then a falls silent (paused, cut off) for longer than its lease.
    let stalled = a.claim(&["p"], 3.0).unwrap().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let taken = b.reap().unwrap();
    assert_eq!(taken.len(), 1, "{taken:?}");
    assert_eq!((taken[0].job, taken[0].document.as_path()), (stalled.id, Path::new("1.pdf")));
    assert!(taken[0].worker.starts_with("a (test-host, pid ") && taken[0].silent_s >= 1.0, "{taken:?}");
    assert!(b.reap().unwrap().is_empty(), "taken over once");
    let j = b.claim(&["p"], 4.0).unwrap().unwrap();
    assert_eq!((j.id, j.lease, j.attempts, j.interruptions), (stalled.id, stalled.lease + 1, 1, 1), "not a failed attempt");

    // a wakes up: its heartbeat renews nothing of b's, and it may write nothing.
    assert!(!a.heartbeat(wa, &me).unwrap());
    assert!(!a.holds(stalled.lease()).unwrap());
    assert!(!a.done(stalled.lease(), Path::new("/out/1.json"), 5.0).unwrap());
    let f = Failure::new(Reason::Model, "summary", "late");
    assert!(!a.failed(stalled.lease(), &f, None, None, 5.0).unwrap(), "nor quarantine it");
    assert!(b.done(j.lease(), Path::new("/out/1.json"), 6.0).unwrap());
    let workers = b.workers().unwrap();
    let docs: Vec<(String, u64)> = workers.iter().map(|w| (w.name.clone(), w.documents)).collect();
    assert_eq!(docs, [("a".to_string(), 1), ("b".to_string(), 1)]);
}

#[test]
fn a_worker_forgotten_after_a_day_of_silence_registers_again_at_its_next_heartbeat() {
    let Some((cluster, open)) = fleet() else { return };
    let (mut a, mut b) = (open(), open());
    let me = worker("a", 30.0);
    let wa = a.join(&me).unwrap();
    b.join(&worker("b", 30.0)).unwrap();
    a.discover(&new_job("k", Path::new("k.pdf"))).unwrap();
    // A day without a heartbeat (a network cut, a paused VM), while it held no job.
    let mut sql = cluster.client("fleet");
    sql.execute("UPDATE workers SET heartbeat_at = heartbeat_at - 90000 WHERE id = $1", &[&wa]).unwrap();
    assert!(b.reap().unwrap().is_empty());
    let names = |l: &mut PgLedger| l.workers().unwrap().into_iter().map(|w| w.name).collect::<Vec<_>>();
    assert_eq!(names(&mut b), ["b"], "forgotten");
    assert!(a.heartbeat(wa, &me).unwrap(), "registered again");
    assert!(!a.heartbeat(wa, &me).unwrap(), "once");
    assert_eq!(names(&mut b), ["a", "b"]);
    // And it works as before: its claims are leased, renewed and finished under its name.
    let j = a.claim(&["p"], 1.0).unwrap().unwrap();
    assert!(!a.heartbeat(wa, &me).unwrap());
    assert!(b.reap().unwrap().is_empty(), "its lease is renewed");
    assert!(a.done(j.lease(), Path::new("/out/k.json"), 2.0).unwrap());
    let w = b.workers().unwrap();
    assert_eq!((w[0].name.as_str(), w[0].documents), ("a", 1));
}

#[test]
fn a_restarted_daemon_takes_back_its_own_jobs_at_once_and_leaves_others_alone() {
    let Some((_cluster, open)) = fleet() else { return };
    let (mut a, mut b) = (open(), open());
    a.join(&worker("a", 30.0)).unwrap();
    b.join(&worker("b", 30.0)).unwrap();
    for i in 0..2 {
        let (key, rel) = (format!("k{i}"), PathBuf::from(format!("{i}.pdf")));
        a.discover(&new_job(&key, &rel)).unwrap();
    }
    let ja = a.claim(&["p"], 1.0).unwrap().unwrap();
    let jb = b.claim(&["p"], 1.0).unwrap().unwrap();
    // a is killed; its successor under the same name does not wait for the lease.
    drop(a);
    let mut a2 = open();
    a2.join(&worker("a", 30.0)).unwrap();
    let r = a2.recover(None, 3).unwrap();
    assert_eq!((r.requeued, r.crashed.is_none()), (1, true));
    let j = a2.job(ja.id).unwrap().unwrap();
    assert_eq!((j.state.as_str(), j.attempts, j.interruptions), ("queued", 0, 1));
    assert_eq!(a2.job(jb.id).unwrap().unwrap().state, "running", "b's job stays b's");
    let names: Vec<String> = a2.workers().unwrap().into_iter().map(|w| w.name).collect();
    assert_eq!(names, ["a", "b"], "the dead predecessor is gone from the list");

    // The crash rule across the fleet: a job the daemon died under at the same place twice in a
    // row is handed back, leased to the successor, to be quarantined.
    let j = a2.claim(&["p"], 2.0).unwrap().unwrap();
    drop(a2);
    let mut a3 = open();
    a3.join(&worker("a", 30.0)).unwrap();
    assert!(a3.recover(Some((j.id, "summary after 3 model steps")), 2).unwrap().crashed.is_none());
    let j = a3.claim(&["p"], 3.0).unwrap().unwrap();
    drop(a3);
    let mut a4 = open();
    a4.join(&worker("a", 30.0)).unwrap();
    let r = a4.recover(Some((j.id, "summary after 3 model steps")), 2).unwrap();
    let (crashed, in_a_row) = r.crashed.expect("the second death at one place");
    assert_eq!((crashed.id, in_a_row, crashed.state.as_str()), (j.id, 2, "running"));
    assert!(a4.holds(crashed.lease()).unwrap(), "leased to the successor");
    let f = Failure::new(Reason::Crashed, "summary", "crashed twice");
    assert!(a4.failed(crashed.lease(), &f, None, None, 4.0).unwrap());
}

#[test]
fn daemons_that_start_together_migrate_once_and_a_newer_schema_is_refused() {
    let Some(cluster) = Cluster::start() else { return };
    let (url, pw) = (cluster.database("fresh"), cluster.password_file());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| PgLedger::connect(&url, Some(&pw)).unwrap());
        }
    });
    let mut c = cluster.client("fresh");
    let versions: i64 = c.query_one("SELECT COUNT(*) FROM deltadoc_schema", &[]).unwrap().get(0);
    assert_eq!(versions, 1);
    c.execute("INSERT INTO deltadoc_schema(version) VALUES (99)", &[]).unwrap();
    let e = PgLedger::connect(&url, Some(&pw)).err().unwrap();
    let e = format!("{e:#}");
    assert!(e.contains("newer than this deltadoc") && e.contains("/fresh"), "{e}");
    assert!(!e.contains(common::pg_cluster::PASSWORD), "never the password: {e}");
}

#[test]
fn a_restarted_server_is_reached_again_and_its_outage_is_named() {
    let Some(cluster) = Cluster::start() else { return };
    let (url, pw) = (cluster.database("outage"), cluster.password_file());
    let mut l = PgLedger::connect(&url, Some(&pw)).unwrap();
    l.join(&worker("a", 30.0)).unwrap();
    l.discover(&new_job("k", Path::new("a.pdf"))).unwrap();
    let j = l.claim(&["p"], 1.0).unwrap().unwrap();
    cluster.pg_ctl("stop");
    let e = l.done(j.lease(), Path::new("/out/a.json"), 2.0).unwrap_err();
    assert!(e.chain().any(deltadoc::ledger::unreachable), "{e:#}");
    assert!(format!("{e:#}").contains("cannot be reached"), "{e:#}");
    cluster.pg_ctl("start");
    assert!(l.done(j.lease(), Path::new("/out/a.json"), 2.0).unwrap(), "the lease outlived the outage");
    assert_eq!(l.job(j.id).unwrap().unwrap().state, "done");
    // Without the password the server says no, and the message does not show one.
    let e = PgLedger::connect(&url, None).err().unwrap();
    assert!(format!("{e:#}").contains(&format!("postgres://deltadoc@127.0.0.1:{}/outage", cluster.port)), "{e:#}");
}

#[test]
fn a_ledger_moves_from_sqlite_to_postgres_and_back_without_redoing_work() {
    let dir = tempfile::tempdir().unwrap();
    let mut sqlite = SqliteLedger::open(&dir.path().join("a")).unwrap();
    sqlite.join(&worker("a", 30.0)).unwrap();
    for i in 0..3 {
        let (key, rel) = (format!("k{i}"), PathBuf::from(format!("{i}.pdf")));
        sqlite.discover(&new_job(&key, &rel)).unwrap();
        sqlite.remember_hash("p", &Path::new("/in").join(&rel), 1, 7, &key).unwrap();
    }
    let done = sqlite.claim(&["p"], 1.0).unwrap().unwrap();
    assert!(sqlite.done(done.lease(), Path::new("/out/0.pdf.json"), 2.0).unwrap());
    let running = sqlite.claim(&["p"], 3.0).unwrap().unwrap();
    sqlite.first_seen("p", 0.5).unwrap();
    sqlite.start_run("p", 10.0, 20.0, 11.0).unwrap();
    let exported = sqlite.export().unwrap();
    let moved = exported.jobs.iter().find(|j| j.id == running.id).unwrap();
    assert_eq!((moved.state.as_str(), moved.attempts, moved.interruptions), ("queued", 0, 1), "a running job moves queued");

    let Some(cluster) = Cluster::start() else { return };
    let (url, pw) = (cluster.database("moved"), cluster.password_file());
    let mut pg = PgLedger::connect(&url, Some(&pw)).unwrap();
    pg.import(&exported).unwrap();
    assert_eq!(pg.export().unwrap(), exported, "PostgreSQL holds what SQLite held");
    assert_eq!(pg.discover(&new_job("k0", Path::new("0.pdf"))).unwrap(), Discovery::Known, "done stays done");
    assert_eq!(pg.cached_hash("p", Path::new("/in/1.pdf"), 1, 7).unwrap().as_deref(), Some("k1"));
    let Discovery::Queued(new) = pg.discover(&new_job("k9", Path::new("9.pdf"))).unwrap() else { panic!() };
    assert!(new > 3, "new ids follow the imported ones: {new}");
    let e = pg.import(&exported).unwrap_err().to_string();
    assert!(e.contains("holds 4 jobs already"), "{e}");

    let mut back = SqliteLedger::open(&dir.path().join("b")).unwrap();
    let from_pg = pg.export().unwrap();
    back.import(&from_pg).unwrap();
    assert_eq!(back.export().unwrap(), from_pg, "and back");
}

#[test]
fn tls_to_the_ledger_encrypts_and_verifies_as_sslmode_and_sslrootcert_say() {
    let Some(cluster) = Cluster::start() else { return };
    let url = cluster.database("tls");
    let Some(root) = cluster.enable_tls() else { return };
    let stranger = cluster.authority("stranger");
    // From here on the server takes encrypted connections only.
    cluster.reload_with_hba(
        "local all all trust\nhostssl all all 127.0.0.1/32 scram-sha-256\nhostnossl all all 127.0.0.1/32 reject\n",
    );
    let pw = cluster.password_file();
    let connect = |query: &str| PgLedger::connect(&format!("{url}?{query}"), Some(&pw)).map_err(|e| format!("{e:#}"));
    let e = connect("sslmode=disable").err().expect("a plain connection is refused");
    assert!(e.contains("no encryption"), "{e}");
    // libpq's default and `require` encrypt without a root certificate to check against.
    for query in ["application_name=x", "sslmode=require"] {
        let mut l = connect(query).unwrap_or_else(|e| panic!("{query}: {e}"));
        l.join(&worker("tls", 30.0)).unwrap();
        assert!(matches!(l.discover(&new_job("k", Path::new("k.pdf"))).unwrap(), Discovery::Queued(_) | Discovery::Known));
    }
    let verified = format!("sslmode=verify-full&sslrootcert={}", root.display());
    let mut l = connect(&verified).unwrap_or_else(|e| panic!("{verified}: {e}"));
    l.join(&worker("verified", 30.0)).unwrap();
    let j = l.claim(&["p"], 1.0).unwrap().expect("the job recorded over TLS");
    assert!(l.done(j.lease(), Path::new("/out/k.json"), 2.0).unwrap());
    // A server whose certificate the named authority did not sign is refused, whatever the mode.
    for mode in ["require", "verify-full"] {
        let e = connect(&format!("sslmode={mode}&sslrootcert={}", stranger.display())).err().expect("an unknown issuer");
        assert!(e.contains("certificate"), "{mode}: {e}");
    }
}

#[test]
fn a_server_that_asks_for_a_client_certificate_gets_the_one_sslcert_and_sslkey_name() {
    let Some(cluster) = Cluster::start() else { return };
    let url = cluster.database("mtls");
    let Some(root) = cluster.enable_tls() else { return };
    let (cert, key) = cluster.client_certificate(common::pg_cluster::USER);
    // Certificate authentication: the client proves who it is by its certificate alone.
    cluster.reload_with_hba("local all all trust\nhostssl all all 127.0.0.1/32 cert\nhostnossl all all 127.0.0.1/32 reject\n");
    let verified = format!("{url}?sslmode=verify-full&sslrootcert={}", root.display());
    let connect = |extra: &str| PgLedger::connect(&format!("{verified}{extra}"), None).map_err(|e| format!("{e:#}"));
    let e = connect("").err().expect("no certificate, no connection");
    assert!(e.contains("certificate"), "{e}");
    let mut l = connect(&format!("&sslcert={}&sslkey={}", cert.display(), key.display())).unwrap();
    l.join(&worker("mtls", 30.0)).unwrap();
    assert!(matches!(l.discover(&new_job("k", Path::new("k.pdf"))).unwrap(), Discovery::Queued(_)));
}
